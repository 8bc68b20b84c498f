//! lora_sgmv against a float64 reference (forward) and against candle autograd over the
//! unbatched per-segment formulation (backward), with mixed ranks and base-only gaps.

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Arc;
use tandem_kernels::{lora_sgmv, LoraSegment};

const IN: usize = 40;
const OUT: usize = 24;
const RMAX: usize = 64;
const SLOTS: usize = 5;

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Tokens 0..30: segments with adapters of ranks 4, 8, 16, 64 (slot 3 twice), gaps without one.
fn segments() -> Vec<LoraSegment> {
    let seg = |start, len, slot: usize, rank, scale| LoraSegment {
        start,
        len,
        row_offset: slot * RMAX,
        rank,
        scale,
    };
    vec![
        seg(0, 3, 0, 4, 2.0),
        seg(5, 1, 1, 8, 0.5),
        seg(6, 7, 2, 16, 1.0),
        seg(16, 4, 3, 64, 0.25),
        seg(24, 1, 3, 64, 0.25),
        seg(25, 2, 4, 8, 4.0),
    ]
}

#[test]
fn forward_matches_float64_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    let t = 30;
    let x = rand_vec(&mut rng, t * IN);
    let a = rand_vec(&mut rng, SLOTS * RMAX * IN);
    let bt = rand_vec(&mut rng, SLOTS * RMAX * OUT);
    let segs = segments();
    let dev = Device::Cpu;
    let y = lora_sgmv(
        &Tensor::from_slice(&x, (t, IN), &dev).unwrap(),
        &Tensor::from_slice(&a, (SLOTS * RMAX, IN), &dev).unwrap(),
        &Tensor::from_slice(&bt, (SLOTS * RMAX, OUT), &dev).unwrap(),
        Arc::from(segs.clone()),
    )
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    let mut want = vec![0f64; t * OUT];
    for s in &segs {
        for tok in s.start..s.start + s.len {
            for r in 0..s.rank {
                let row = s.row_offset + r;
                let h: f64 = (0..IN)
                    .map(|i| x[tok * IN + i] as f64 * a[row * IN + i] as f64)
                    .sum::<f64>()
                    * s.scale as f64;
                for o in 0..OUT {
                    want[tok * OUT + o] += h * bt[row * OUT + o] as f64;
                }
            }
        }
    }
    let max = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(err / max <= 1e-6, "rel err {}", err / max);
    // Tokens outside every segment get exactly zero.
    for tok in [3, 4, 13, 14, 15, 20, 23, 27, 29] {
        assert!(
            y[tok * OUT..(tok + 1) * OUT].iter().all(|v| *v == 0.0),
            "token {tok}"
        );
    }
}

#[test]
fn backward_matches_autograd_of_the_unbatched_formulation() {
    let mut rng = StdRng::seed_from_u64(2);
    let t = 30;
    let dev = Device::Cpu;
    let mut var = |rows: usize, cols: usize| {
        Var::from_tensor(
            &Tensor::from_vec(rand_vec(&mut rng, rows * cols), (rows, cols), &dev).unwrap(),
        )
        .unwrap()
    };
    let x = var(t, IN);
    let a = var(SLOTS * RMAX, IN);
    let bt = var(SLOTS * RMAX, OUT);
    let g = Tensor::from_vec(rand_vec(&mut rng, t * OUT), (t, OUT), &dev).unwrap();
    let segs = segments();

    // Batched op.
    let y = lora_sgmv(&x, &a, &bt, Arc::from(segs.clone())).unwrap();
    let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    // Unbatched: each segment's own matmuls with its adapter's rows (B = Btᵀ as PEFT stores it).
    let mut loss = Tensor::zeros((), candle_core::DType::F32, &dev).unwrap();
    for s in &segs {
        let xs = x.narrow(0, s.start, s.len).unwrap();
        let a_s = a.narrow(0, s.row_offset, s.rank).unwrap();
        let b_s = bt.narrow(0, s.row_offset, s.rank).unwrap().t().unwrap();
        let ys = (xs
            .matmul(&a_s.t().unwrap())
            .unwrap()
            .matmul(&b_s.t().unwrap())
            .unwrap()
            * s.scale as f64)
            .unwrap();
        loss = (loss
            + (ys * g.narrow(0, s.start, s.len).unwrap())
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
    }
    let want = loss.backward().unwrap();
    for (name, v) in [("x", &x), ("a_pool", &a), ("bt_pool", &bt)] {
        let got = grads
            .get(v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let exp = want
            .get(v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let max = exp.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&exp)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            max > 0.0 && err / max <= 1e-5,
            "{name}: rel err {}",
            err / max
        );
    }
}

#[test]
fn bad_segments_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, IN), candle_core::DType::F32, &dev).unwrap();
    let a = Tensor::zeros((8, IN), candle_core::DType::F32, &dev).unwrap();
    let bt = Tensor::zeros((8, OUT), candle_core::DType::F32, &dev).unwrap();
    let seg = |start, len, row_offset, rank| {
        Arc::from(vec![LoraSegment {
            start,
            len,
            row_offset,
            rank,
            scale: 1.0,
        }])
    };
    let err = lora_sgmv(&x, &a, &bt, seg(2, 3, 0, 4))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_sgmv") && err.contains("outside 4 tokens"),
        "{err}"
    );
    let err = lora_sgmv(&x, &a, &bt, seg(0, 1, 6, 4))
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside a pool of 8"), "{err}");
}
