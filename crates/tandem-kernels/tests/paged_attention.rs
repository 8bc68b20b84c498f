//! paged_attention against a float64 reference computed from each sequence's logical keys.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tandem_kernels::{paged_attention, PagedAttentionMeta};

const NH: usize = 6;
const NKV: usize = 2;
const HD: usize = 8;
const BS: usize = 4;
const BLOCKS: usize = 24;

struct Case {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    meta: PagedAttentionMeta,
}

/// Three sequences: a decode token at a block boundary, a prefill chunk continuing a cached
/// prefix mid-block, and a whole prompt; fragmented block tables.
fn case(window: Option<usize>, seed: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rand = |n: usize| {
        (0..n)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect::<Vec<f32>>()
    };
    let block_tables = vec![vec![7, 3, 20], vec![1, 12, 5, 9, 2], vec![15, 0, 22, 4]];
    // (segment, positions of its query tokens)
    let queries: Vec<(u32, Vec<u32>)> =
        vec![(0, vec![8]), (1, (6..19).collect()), (2, (0..13).collect())];
    let mut token_segment = vec![];
    let mut positions = vec![];
    for (s, ps) in &queries {
        for &p in ps {
            token_segment.push(*s);
            positions.push(p);
        }
    }
    let t = positions.len();
    Case {
        q: rand(t * NH * HD),
        k: rand(BLOCKS * BS * NKV * HD),
        v: rand(BLOCKS * BS * NKV * HD),
        meta: PagedAttentionMeta {
            block_size: BS,
            token_segment,
            positions,
            block_tables,
            sliding_window: window,
        },
    }
}

fn reference(c: &Case, scale: f64) -> Vec<f64> {
    let t = c.meta.positions.len();
    let mut out = vec![0f64; t * NH * HD];
    for tok in 0..t {
        let pos = c.meta.positions[tok] as usize;
        let table = &c.meta.block_tables[c.meta.token_segment[tok] as usize];
        let first = c
            .meta
            .sliding_window
            .map_or(0, |w| (pos + 1).saturating_sub(w));
        for h in 0..NH {
            let g = h / (NH / NKV);
            let q = &c.q[(tok * NH + h) * HD..][..HD];
            let keys: Vec<usize> = (first..=pos)
                .map(|j| (table[j / BS] as usize * BS + j % BS) * NKV + g)
                .collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&row| {
                    q.iter()
                        .zip(&c.k[row * HD..][..HD])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let denom: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (s, &row) in scores.iter().zip(&keys) {
                let w = (s - max).exp() / denom;
                for d in 0..HD {
                    out[(tok * NH + h) * HD + d] += w * c.v[row * HD + d] as f64;
                }
            }
        }
    }
    out
}

fn run(c: &Case, scale: f32) -> candle_core::Result<Vec<f32>> {
    let dev = Device::Cpu;
    let t = c.meta.positions.len();
    let q = Tensor::from_slice(&c.q, (t, NH, HD), &dev)?;
    let k = Tensor::from_slice(&c.k, (BLOCKS * BS, NKV, HD), &dev)?;
    let v = Tensor::from_slice(&c.v, (BLOCKS * BS, NKV, HD), &dev)?;
    paged_attention(&q, &k, &v, &c.meta, scale)?
        .flatten_all()?
        .to_vec1::<f32>()
}

#[test]
fn matches_float64_reference_with_gqa_and_block_boundaries() {
    for (window, seed) in [(None, 1), (Some(5), 2), (Some(1), 3)] {
        let c = case(window, seed);
        let scale = 1.0 / (HD as f32).sqrt();
        let got = run(&c, scale).unwrap();
        let want = reference(&c, scale as f64);
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-6, "window {window:?}: max |diff| {err}");
    }
}

#[test]
fn errors_name_the_op_and_the_problem() {
    let mut c = case(None, 4);
    c.meta.block_tables[1].truncate(2);
    let err = run(&c, 1.0).unwrap_err().to_string();
    assert!(
        err.contains("paged_attention") && err.contains("needs 3 blocks, its table has 2"),
        "{err}"
    );

    let c = case(None, 5);
    let t = c.meta.positions.len();
    let q = Tensor::zeros((t, NH, HD), DType::F16, &Device::Cpu).unwrap();
    let k = Tensor::zeros((BLOCKS * BS, NKV, HD), DType::F16, &Device::Cpu).unwrap();
    let err = paged_attention(&q, &k, &k, &c.meta, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("paged_attention") && err.contains("F16"),
        "{err}"
    );
}
