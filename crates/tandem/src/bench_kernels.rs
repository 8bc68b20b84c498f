//! `tandem bench kernels`: checks tandem-kernels' `lora_sgmv` against a float64 CPU reference on
//! random shapes, then times it beside the base layer's own GEMM (medians of many runs). On a
//! GPU host this is what `scripts/gpu-check.sh` runs; on CPU it runs the same code, smaller.

use crate::cli::BenchKernelsArgs;
use crate::generate::device;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;
use tandem_kernels::{lora_sgmv, LoraSegment};

struct Case {
    tokens: usize,
    n_in: usize,
    n_out: usize,
    adapters: usize,
    ranks: Vec<usize>,
}

/// Equal segments, one adapter each (ranks cycle through `ranks`), rows packed by `max_rank`.
fn segments(c: &Case, max_rank: usize) -> Vec<LoraSegment> {
    let per = c.tokens.div_ceil(c.adapters);
    (0..c.adapters)
        .filter_map(|i| {
            let start = i * per;
            (start < c.tokens).then(|| LoraSegment {
                start,
                len: per.min(c.tokens - start),
                row_offset: i * max_rank,
                rank: c.ranks[i % c.ranks.len()],
                scale: 2.0,
            })
        })
        .collect()
}

fn inputs(c: &Case, max_rank: usize, rng: &mut StdRng) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut v = |n: usize, s: f32| {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect::<Vec<f32>>()
    };
    let rows = c.adapters * max_rank;
    (
        v(c.tokens * c.n_in, 1.0),
        v(rows * c.n_in, 0.02),
        v(rows * c.n_out, 0.02),
    )
}

fn reference(c: &Case, segs: &[LoraSegment], x: &[f32], a: &[f32], bt: &[f32]) -> Vec<f64> {
    let mut y = vec![0f64; c.tokens * c.n_out];
    for s in segs {
        for t in s.start..s.start + s.len {
            for r in 0..s.rank {
                let row = s.row_offset + r;
                let h: f64 = (0..c.n_in)
                    .map(|i| x[t * c.n_in + i] as f64 * a[row * c.n_in + i] as f64)
                    .sum::<f64>()
                    * s.scale as f64;
                for o in 0..c.n_out {
                    y[t * c.n_out + o] += h * bt[row * c.n_out + o] as f64;
                }
            }
        }
    }
    y
}

/// The op's inputs on `dev` as `dtype`.
fn upload(
    dev: &Device,
    dtype: DType,
    c: &Case,
    host: &(Vec<f32>, Vec<f32>, Vec<f32>),
    max_rank: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rows = c.adapters * max_rank;
    let x = Tensor::from_slice(&host.0, (c.tokens, c.n_in), dev)?.to_dtype(dtype)?;
    let a = Tensor::from_slice(&host.1, (rows, c.n_in), dev)?.to_dtype(dtype)?;
    let bt = Tensor::from_slice(&host.2, (rows, c.n_out), dev)?.to_dtype(dtype)?;
    Ok((x, a, bt))
}

fn median_us(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

pub fn kernels(args: BenchKernelsArgs) -> Result<()> {
    let dev = device(args.device)?;
    let scale = if args.quick { 16 } else { 1 };
    let mut rng = StdRng::seed_from_u64(0);
    let dtypes: &[DType] = if dev.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    // Correctness on fresh random inputs: ranks 8-64 (mixed), 1-64 segments, 1-4096 tokens.
    let checks = [
        (1, 4096, 4096, 1, vec![8]),
        (7, 4096, 14336, 3, vec![8, 64, 16]),
        (256, 4096, 4096, 32, vec![16]),
        (300, 14336, 4096, 64, vec![8, 32, 64, 16]),
        (4096, 4096, 4096, 8, vec![64, 8]),
    ];
    println!("| check | dtype | tokens | in -> out | adapters | ranks | max rel err | limit |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut failed = 0;
    for (tokens, n_in, n_out, adapters, ranks) in checks {
        let c = Case {
            tokens: (tokens / scale).max(1),
            n_in: n_in / scale,
            n_out: n_out / scale,
            adapters: adapters.min((tokens / scale).max(1)),
            ranks,
        };
        let max_rank = *c.ranks.iter().max().unwrap_or(&1);
        let segs = segments(&c, max_rank);
        let host = inputs(&c, max_rank, &mut rng);
        let want = reference(&c, &segs, &host.0, &host.1, &host.2);
        let max = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for &dtype in dtypes {
            let (xt, at, btt) = upload(&dev, dtype, &c, &host, max_rank)?;
            let got = lora_sgmv(&xt, &at, &btt, Arc::from(segs.clone()))?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (*g as f64 - w).abs())
                .fold(0f64, f64::max)
                / max;
            let limit = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let ok = err <= limit;
            failed += usize::from(!ok);
            println!(
                "| {} | {dtype:?} | {} | {} -> {} | {} | {:?} | {err:.2e} | {limit:.0e} |",
                if ok { "ok" } else { "FAIL" },
                c.tokens,
                c.n_in,
                c.n_out,
                segs.len(),
                c.ranks
            );
        }
    }
    // Timings: the shapes of ../shared/bench/lora_baseline.py.
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    println!("\n| timing ({dtype:?}) | base GEMM us | lora_sgmv us | lora/base |");
    println!("| --- | --- | --- | --- |");
    for (tokens, n_in, n_out, adapters, rank) in [
        (256, 4096, 4096, 32, 16),
        (256, 4096, 14336, 32, 16),
        (64, 4096, 4096, 64, 16),
        (1024, 4096, 4096, 8, 64),
    ] {
        let c = Case {
            tokens: tokens / scale,
            n_in: n_in / scale,
            n_out: n_out / scale,
            adapters: adapters.min(tokens / scale),
            ranks: vec![rank],
        };
        let segs = segments(&c, rank);
        let host = inputs(&c, rank, &mut rng);
        let (xt, at, btt) = upload(&dev, dtype, &c, &host, rank)?;
        let s: Arc<[LoraSegment]> = Arc::from(segs.clone());
        let w = Tensor::randn(0f32, 0.02, (c.n_out, c.n_in), &dev)?.to_dtype(dtype)?;
        let reps = if args.quick { 5 } else { 200 };
        let base = median_us(&dev, reps, || {
            xt.matmul(&w.t()?)?;
            Ok(())
        })?;
        let lora = median_us(&dev, reps, || {
            lora_sgmv(&xt, &at, &btt, s.clone())?;
            Ok(())
        })?;
        println!(
            "| T{} H{} O{} A{} r{} | {base:.1} | {lora:.1} | {:.2} |",
            c.tokens,
            c.n_in,
            c.n_out,
            segs.len(),
            rank,
            lora / base
        );
    }
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    Ok(())
}
