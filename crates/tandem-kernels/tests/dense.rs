//! `dense` (batch-invariant `x · wᵀ` on the CPU): equal to a float64 product to float rounding,
//! every element equal bit for bit to `dot_canonical`, and a row's result the same bits however
//! many rows are multiplied with it.

use candle_core::{DType, Device, Tensor};
use tandem_kernels::dense::{dense, dot_canonical};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn run(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let xt = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
    let wt = Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap();
    dense(&xt, &wt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn equals_float64_and_the_canonical_dot_bit_for_bit() {
    // Shapes of the default model's projections and of awkward tails.
    for &(m, n, k) in &[
        (1, 576, 576),
        (7, 192, 576),
        (33, 1536, 576),
        (70, 576, 1536),
        (3, 5, 17),
    ] {
        let x = values(m * k, 1 + m as u64);
        let w = values(n * k, 2 + n as u64);
        let y = run(&x, &w, m, n, k);
        for i in 0..m {
            for j in 0..n {
                let (xr, wr) = (&x[i * k..][..k], &w[j * k..][..k]);
                let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                let got = y[i * n + j];
                assert!(
                    (got as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                    "{m}x{n}x{k}"
                );
                assert_eq!(
                    got.to_bits(),
                    dot_canonical(xr, wr).to_bits(),
                    "{m}x{n}x{k} ({i},{j})"
                );
            }
        }
    }
}

#[test]
fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
    let (n, k) = (300, 576);
    let w = values(n * k, 9);
    let x = values(97 * k, 10);
    let all = run(&x, &w, 97, n, k);
    for &(first, m) in &[(0, 1), (5, 1), (3, 2), (10, 7), (40, 57), (0, 64), (1, 65)] {
        let part = run(&x[first * k..(first + m) * k], &w, m, n, k);
        let want = &all[first * n..(first + m) * n];
        assert!(
            part.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "rows {first}..{} alone differ from the same rows in 97",
            first + m
        );
    }
}

#[test]
fn leading_dimensions_and_other_dtypes_go_through() {
    let x = Tensor::from_slice(&values(2 * 3 * 8, 3), (2, 3, 8), &Device::Cpu).unwrap();
    let w = Tensor::from_slice(&values(4 * 8, 4), (4, 8), &Device::Cpu).unwrap();
    let y = dense(&x, &w).unwrap();
    assert_eq!(y.dims(), &[2, 3, 4]);
    let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    let diff = (y - &want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    // f64 falls back to candle's matmul.
    let y64 = dense(
        &x.to_dtype(DType::F64).unwrap(),
        &w.to_dtype(DType::F64).unwrap(),
    )
    .unwrap();
    assert_eq!(y64.dtype(), DType::F64);
    // A width mismatch is an error, not a panic.
    let bad = Tensor::zeros((4, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(dense(&x, &bad).is_err());
}
