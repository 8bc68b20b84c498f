//! A packed batch of several sequences, mixing prefill chunks and decode steps over a shared,
//! fragmented paged cache, gives each sequence the logits it gets alone.

use candle_core::{DType, Device};
use tandem_model::testing::Tiny;
use tandem_model::{load_checkpoint, KvCache, Llama, LogitsWanted, PackedBatch};

const BLOCK: usize = 4;

fn model(dir: &std::path::Path) -> Llama {
    let (cfg, map, src) = load_checkpoint(dir, &Device::Cpu, DType::F32).unwrap();
    Llama::from_tensors(cfg, map, &src, &Device::Cpu, DType::F32).unwrap()
}

fn cache(m: &Llama, blocks: usize) -> KvCache {
    let c = &m.cfg;
    KvCache::new(
        c.num_hidden_layers,
        blocks,
        BLOCK,
        c.num_key_value_heads,
        c.head_dim,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// Each sequence alone, in one prefill: logits at every position.
fn alone(m: &Llama, tokens: &[u32]) -> Vec<Vec<f32>> {
    let c = cache(m, tokens.len().div_ceil(BLOCK));
    let mut b = PackedBatch::default();
    b.push(
        0,
        tokens,
        0,
        (0..tokens.len().div_ceil(BLOCK) as u32).collect(),
        LogitsWanted::All,
    );
    m.forward(&b, &c).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn packed_mixed_batch_equals_each_sequence_alone() {
    let t = Tiny::gqa();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 5);
    let m = model(dir.path());
    let seqs: Vec<Vec<u32>> = [5usize, 11, 17, 9, 2]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 17 + s * 29 + 1) % t.vocab) as u32)
                .collect()
        })
        .collect();
    let want: Vec<_> = seqs.iter().map(|s| alone(&m, s)).collect();

    // Chunk schedule per sequence: sequence 0 decodes token by token from the start (crossing
    // block boundaries), the others prefill in chunks of different sizes, one starts late.
    let chunk = [1usize, 3, 5, 2, 1];
    let start_step = [0usize, 0, 1, 2, 3];
    let c = cache(&m, 64);
    // Hand out blocks interleaved between sequences, in scrambled order: tables are fragmented.
    let mut free: Vec<u32> = (0..64u32).map(|i| (i * 37) % 64).collect();
    let mut tables: Vec<Vec<u32>> = vec![vec![]; seqs.len()];
    let mut done = vec![0usize; seqs.len()];
    let mut got: Vec<Vec<Vec<f32>>> = vec![vec![]; seqs.len()];
    let mut step = 0;
    while done.iter().zip(&seqs).any(|(d, s)| d < &s.len()) {
        let mut b = PackedBatch::default();
        let mut order = vec![];
        for s in 0..seqs.len() {
            if step < start_step[s] || done[s] == seqs[s].len() {
                continue;
            }
            let n = chunk[s].min(seqs[s].len() - done[s]);
            while tables[s].len() * BLOCK < done[s] + n {
                tables[s].push(free.remove(0));
            }
            b.push(
                s as u64,
                &seqs[s][done[s]..done[s] + n],
                done[s],
                tables[s].clone(),
                LogitsWanted::All,
            );
            order.push((s, n));
        }
        let rows = m.forward(&b, &c).unwrap().to_vec2::<f32>().unwrap();
        let mut it = rows.into_iter();
        for (s, n) in order {
            got[s].extend(it.by_ref().take(n));
            done[s] += n;
        }
        step += 1;
    }
    for s in 0..seqs.len() {
        assert!(
            tables[s].windows(2).any(|w| w[1] != w[0] + 1) || tables[s].len() < 2,
            "table of {s} is contiguous"
        );
        for (pos, (g, w)) in got[s].iter().zip(&want[s]).enumerate() {
            let d = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d <= 1e-4, "sequence {s} position {pos}: max |diff| {d}");
        }
    }
}

#[test]
fn last_logits_are_the_last_row_of_all() {
    let t = Tiny::tied_mha();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 6);
    let m = model(dir.path());
    let toks: Vec<u32> = (0..10).map(|i| (i * 7 % t.vocab) as u32).collect();
    let all = alone(&m, &toks);
    let c = cache(&m, 3);
    let mut b = PackedBatch::default();
    b.push(0, &toks, 0, vec![2, 0, 1], LogitsWanted::Last);
    let last = m.forward(&b, &c).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(last.len(), 1);
    let d = last[0]
        .iter()
        .zip(&all[9])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn invalid_batches_are_rejected_with_a_reason() {
    let t = Tiny::tied_mha();
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), 7);
    let m = model(dir.path());
    let c = cache(&m, 2);
    let mut b = PackedBatch::default();
    b.push(0, &[1, 2, 3, 4, 5], 0, vec![0], LogitsWanted::Last);
    let err = m.forward(&b, &c).unwrap_err().to_string();
    assert!(err.contains("blocks hold 4"), "{err}");
    let mut b = PackedBatch::default();
    b.push(0, &[1, 2], 0, vec![7], LogitsWanted::Last);
    let err = m.forward(&b, &c).unwrap_err().to_string();
    assert!(err.contains("names block 7"), "{err}");
}
