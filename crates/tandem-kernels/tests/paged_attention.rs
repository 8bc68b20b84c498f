//! paged_attention and write_kv against float64 / plain references computed from each
//! sequence's logical keys.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use tandem_kernels::{paged_attention, work_list, write_kv, PagedAttentionMeta, WorkItem};

#[derive(Clone, Copy, Debug)]
struct Dims {
    nh: usize,
    nkv: usize,
    hd: usize,
    bs: usize,
}

struct Case {
    d: Dims,
    slots: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    meta: PagedAttentionMeta,
}

/// Sequences given as (cached prefix, query tokens): the queries sit at positions
/// prefix..prefix + tokens. Block tables are a random permutation of the cache's blocks (two
/// spare blocks), so neighbouring keys live in unrelated blocks.
fn case(d: Dims, seqs: &[(usize, usize)], window: Option<usize>, seed: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let need: Vec<usize> = seqs.iter().map(|&(p, n)| (p + n).div_ceil(d.bs)).collect();
    let blocks = need.iter().sum::<usize>() + 2;
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut block_tables = vec![];
    let mut taken = 0;
    for n in &need {
        block_tables.push(ids[taken..taken + n].to_vec());
        taken += n;
    }
    let mut token_segment = vec![];
    let mut positions = vec![];
    for (s, &(prefix, n)) in seqs.iter().enumerate() {
        for p in prefix..prefix + n {
            token_segment.push(s as u32);
            positions.push(p as u32);
        }
    }
    let t = positions.len();
    let slots = blocks * d.bs;
    let mut rand = |n: usize| {
        (0..n)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect::<Vec<f32>>()
    };
    Case {
        d,
        slots,
        q: rand(t * d.nh * d.hd),
        k: rand(slots * d.nkv * d.hd),
        v: rand(slots * d.nkv * d.hd),
        meta: PagedAttentionMeta::new(d.bs, token_segment, positions, block_tables, window),
    }
}

fn reference(c: &Case, scale: f64) -> Vec<f64> {
    let Dims { nh, nkv, hd, bs } = c.d;
    let t = c.meta.positions.len();
    let mut out = vec![0f64; t * nh * hd];
    for tok in 0..t {
        let pos = c.meta.positions[tok] as usize;
        let table = &c.meta.block_tables[c.meta.token_segment[tok] as usize];
        let first = c
            .meta
            .sliding_window
            .map_or(0, |w| (pos + 1).saturating_sub(w));
        for h in 0..nh {
            let g = h / (nh / nkv);
            let q = &c.q[(tok * nh + h) * hd..][..hd];
            let keys: Vec<usize> = (first..=pos)
                .map(|j| (table[j / bs] as usize * bs + j % bs) * nkv + g)
                .collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&row| {
                    q.iter()
                        .zip(&c.k[row * hd..][..hd])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let denom: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (s, &row) in scores.iter().zip(&keys) {
                let w = (s - max).exp() / denom;
                for d in 0..hd {
                    out[(tok * nh + h) * hd + d] += w * c.v[row * hd + d] as f64;
                }
            }
        }
    }
    out
}

fn run(c: &Case, scale: f32) -> candle_core::Result<Vec<f32>> {
    let dev = Device::Cpu;
    let Dims { nh, nkv, hd, .. } = c.d;
    let t = c.meta.positions.len();
    let q = Tensor::from_slice(&c.q, (t, nh, hd), &dev)?;
    let k = Tensor::from_slice(&c.k, (c.slots, nkv, hd), &dev)?;
    let v = Tensor::from_slice(&c.v, (c.slots, nkv, hd), &dev)?;
    paged_attention(&q, &k, &v, &c.meta, scale)?
        .flatten_all()?
        .to_vec1::<f32>()
}

fn max_err(c: &Case) -> f64 {
    let scale = 1.0 / (c.d.hd as f32).sqrt();
    let got = run(c, scale).unwrap();
    let want = reference(c, scale as f64);
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
}

const SMALL: Dims = Dims {
    nh: 6,
    nkv: 2,
    hd: 8,
    bs: 4,
};

/// A decode token at a block boundary, a prefill chunk continuing a cached prefix mid-block, a
/// whole prompt.
const MIXED: [(usize, usize); 3] = [(8, 1), (6, 13), (0, 13)];

#[test]
fn matches_float64_reference_with_gqa_and_block_boundaries() {
    for (window, seed) in [(None, 1), (Some(5), 2), (Some(1), 3)] {
        let err = max_err(&case(SMALL, &MIXED, window, seed));
        assert!(err < 1e-6, "window {window:?}: max |diff| {err}");
    }
}

#[test]
fn long_contexts_span_many_key_tiles() {
    // Contexts past several 32-key tiles; chunks starting and ending mid-tile; windows that
    // start mid-tile and that span tiles; decode tokens at tile and block boundaries.
    let seqs = [(95, 1), (31, 1), (32, 1), (40, 50), (0, 70), (127, 3)];
    for (d, window, seed) in [
        (SMALL, None, 10),
        (SMALL, Some(33), 11),
        (SMALL, Some(7), 12),
        (Dims { bs: 16, ..SMALL }, None, 13),
        (Dims { bs: 1, ..SMALL }, Some(40), 14),
    ] {
        let err = max_err(&case(d, &seqs, window, seed));
        assert!(err < 1e-5, "{d:?} window {window:?}: max |diff| {err}");
    }
}

#[test]
fn head_layouts_mha_and_groups_larger_than_a_work_item() {
    // MHA (group 1: 16 tokens per item), a group of 17 query heads per KV head (more rows than
    // one item holds: the group is sliced), a single KV head.
    for (d, seed) in [
        (
            Dims {
                nh: 4,
                nkv: 4,
                hd: 16,
                bs: 8,
            },
            20,
        ),
        (
            Dims {
                nh: 34,
                nkv: 2,
                hd: 4,
                bs: 4,
            },
            21,
        ),
        (
            Dims {
                nh: 8,
                nkv: 1,
                hd: 32,
                bs: 16,
            },
            22,
        ),
    ] {
        let err = max_err(&case(d, &[(3, 40), (60, 1), (0, 5)], None, seed));
        assert!(err < 1e-5, "{d:?}: max |diff| {err}");
    }
}

#[test]
fn work_items_cover_every_token_and_head_once() {
    let token_segment: Vec<u32> = [0u32; 37]
        .into_iter()
        .chain([1; 1])
        .chain([2; 20])
        .collect();
    for group in [1, 3, 4, 8, 16, 17, 40] {
        let items = work_list(&token_segment, group);
        let mut seen = vec![0u32; token_segment.len() * group];
        for WorkItem {
            segment,
            first_token,
            tokens,
            first_head,
            heads,
        } in &items
        {
            assert!(tokens * heads <= 16 && *tokens > 0 && *heads > 0);
            for t in *first_token..first_token + tokens {
                assert_eq!(token_segment[t as usize], *segment);
                for h in *first_head..first_head + heads {
                    seen[t as usize * group + h as usize] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "group {group}");
    }
}

#[test]
fn write_kv_puts_each_token_in_its_slot() {
    let c = case(SMALL, &MIXED, None, 30);
    let t = c.meta.positions.len();
    let row = SMALL.nkv * SMALL.hd;
    let src: Vec<f32> = (0..t * row).map(|i| i as f32).collect();
    let slots = c.meta.slots();
    for dtype in [DType::F32, DType::BF16] {
        let cache = Tensor::zeros((c.slots, SMALL.nkv, SMALL.hd), dtype, &Device::Cpu).unwrap();
        let s = Tensor::from_slice(&src, (t, SMALL.nkv, SMALL.hd), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        write_kv(&cache, &s, &c.meta).unwrap();
        let got = cache
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut want = vec![0f32; c.slots * row];
        for (tok, &slot) in slots.iter().enumerate() {
            // Small integers are exact in bf16 up to 256; compare after the same rounding.
            for i in 0..row {
                want[slot as usize * row + i] = half_round(src[tok * row + i], dtype);
            }
        }
        assert_eq!(got, want, "{dtype:?}");
    }
}

fn half_round(x: f32, dtype: DType) -> f32 {
    Tensor::new(&[x], &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

#[test]
fn errors_name_the_op_and_the_problem() {
    let mut c = case(SMALL, &MIXED, None, 4);
    c.meta.block_tables[1].truncate(2);
    let err = run(&c, 1.0).unwrap_err().to_string();
    assert!(
        err.contains("paged_attention") && err.contains("needs 3 blocks, its table has 2"),
        "{err}"
    );

    let c = case(SMALL, &MIXED, None, 5);
    let t = c.meta.positions.len();
    let q = Tensor::zeros((t, SMALL.nh, SMALL.hd), DType::F16, &Device::Cpu).unwrap();
    let k = Tensor::zeros((c.slots, SMALL.nkv, SMALL.hd), DType::F16, &Device::Cpu).unwrap();
    let err = paged_attention(&q, &k, &k, &c.meta, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("paged_attention") && err.contains("F16"),
        "{err}"
    );

    let cache = Tensor::zeros((c.slots, SMALL.nkv, SMALL.hd), DType::F32, &Device::Cpu).unwrap();
    let short = Tensor::zeros((t - 1, SMALL.nkv, SMALL.hd), DType::F32, &Device::Cpu).unwrap();
    let err = write_kv(&cache, &short, &c.meta).unwrap_err().to_string();
    assert!(err.contains("write_kv"), "{err}");
}
