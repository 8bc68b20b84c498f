//! `tandem bench dense`: the batch-invariant CPU product (`tandem_kernels::dense`, what every
//! linear layer of the inference forward runs) beside candle's matmul (the gemm crate) on the
//! default model's projection shapes, at batch sizes from one decode row to a long prefill
//! chunk; and the check that made it worth having: a row's output bits alone vs in the batch.

use crate::cli::BenchDenseArgs;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;
use tandem_kernels::dense;

/// Median seconds of `reps` calls of `f` after one warm-up call.
fn median(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|f| f.to_bits())
        .collect())
}

pub fn run(args: BenchDenseArgs) -> Result<()> {
    let dev = Device::Cpu;
    // SmolLM2-135M: q/o, k/v, gate/up, down, the LM head.
    let shapes = [
        ("q_proj", 576, 576),
        ("k_proj", 192, 576),
        ("gate_proj", 1536, 576),
        ("down_proj", 576, 1536),
        ("lm_head", 49152, 576),
    ];
    println!(
        "# tandem bench dense: x [rows, k] · wᵀ [k, n], f32, CPU, threads {}; median of {} calls",
        candle_core::utils::get_num_threads(),
        args.reps
    );
    println!("| layer (n x k) | rows | dense ms | candle matmul ms | dense GFLOP/s | matmul / dense time | row alone = row in batch (bits) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (name, n, k) in shapes {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let wt = w.t()?;
        for &rows in &args.rows {
            if name == "lm_head" && rows > 64 {
                continue; // the head runs on sampled rows only
            }
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
            let reps = args.reps.max(1);
            let d = median(reps, || Ok(dense(&x, &w).map(drop)?))?;
            let g = median(reps, || Ok(x.matmul(&wt).map(drop)?))?;
            // The last row alone against the same row in the whole batch.
            let all = dense(&x, &w)?;
            let one = dense(&x.narrow(0, rows - 1, 1)?, &w)?;
            let same = bits(&all.narrow(0, rows - 1, 1)?)? == bits(&one)?;
            let g_all = x.matmul(&wt)?;
            let g_one = x.narrow(0, rows - 1, 1)?.matmul(&wt)?;
            let g_same = bits(&g_all.narrow(0, rows - 1, 1)?)? == bits(&g_one)?;
            println!(
                "| {name} ({n} x {k}) | {rows} | {:.3} | {:.3} | {:.1} | {:.2}x | dense {same}, matmul {g_same} |",
                d * 1e3,
                g * 1e3,
                2.0 * (rows * n * k) as f64 / d / 1e9,
                g / d,
            );
        }
    }
    Ok(())
}
