//! `tandem bench kernels`: checks tandem-kernels' `lora_sgmv` against a float64 CPU reference on
//! fresh random inputs of many shapes, then times it beside the base layer's own GEMM (medians of
//! many runs; on CUDA with events, the launches queued behind a spin kernel after an L2 flush,
//! as triton's do_bench does). On a GPU host this is what `scripts/gpu-check.sh` runs; on CPU it
//! runs the same code, smaller.

use crate::cli::BenchKernelsArgs;
use crate::generate::device;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;
use tandem_kernels::{lora_sgmv, lora_sgmv_op, LoraSegment};

struct Case {
    tokens: usize,
    n_in: usize,
    n_out: usize,
    /// Rows in the pools (adapters × their max rank).
    rows: usize,
    segs: Vec<LoraSegment>,
}

/// Equal segments, one adapter of rank `rank` each (the shapes of lora_baseline.py).
fn equal_case(tokens: usize, n_in: usize, n_out: usize, adapters: usize, rank: usize) -> Case {
    let per = tokens.div_ceil(adapters);
    let segs: Vec<_> = (0..adapters)
        .filter_map(|i| {
            let start = i * per;
            (start < tokens).then(|| LoraSegment {
                start,
                len: per.min(tokens - start),
                row_offset: i * rank,
                rank,
                scale: 2.0,
            })
        })
        .collect();
    Case {
        tokens,
        n_in,
        n_out,
        rows: adapters * rank,
        segs,
    }
}

/// `pieces` runs of random lengths over `tokens`; about one in five is base-only (no segment),
/// the others use one of `adapters` adapters (some shared) whose ranks cycle through `ranks`.
fn random_case(
    rng: &mut StdRng,
    tokens: usize,
    n_in: usize,
    n_out: usize,
    pieces: usize,
    adapters: usize,
    ranks: &[usize],
) -> Case {
    let pieces = pieces.clamp(1, tokens);
    let mut cuts: Vec<usize> = (0..pieces - 1)
        .map(|_| rng.random_range(1..tokens))
        .collect();
    cuts.extend([0, tokens]);
    cuts.sort_unstable();
    cuts.dedup();
    let rank_of = |a: usize| ranks[a % ranks.len()];
    let offsets: Vec<usize> = (0..adapters)
        .scan(0, |acc, a| {
            let o = *acc;
            *acc += rank_of(a);
            Some(o)
        })
        .collect();
    let mut segs = Vec::new();
    for (i, w) in cuts.windows(2).enumerate() {
        if pieces > 1 && i > 0 && rng.random_range(0..5) == 0 {
            continue;
        }
        let a = if i < adapters {
            i
        } else {
            rng.random_range(0..adapters)
        };
        segs.push(LoraSegment {
            start: w[0],
            len: w[1] - w[0],
            row_offset: offsets[a],
            rank: rank_of(a),
            scale: rng.random_range(0.25..4.0),
        });
    }
    Case {
        tokens,
        n_in,
        n_out,
        rows: (0..adapters).map(rank_of).sum(),
        segs,
    }
}

type Host = (Vec<f32>, Vec<f32>, Vec<f32>);

fn inputs(c: &Case, rng: &mut StdRng) -> Host {
    let mut v = |n: usize, s: f32| {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s)
            .collect::<Vec<f32>>()
    };
    (
        v(c.tokens * c.n_in, 1.0),
        v(c.rows * c.n_in, 0.02),
        v(c.rows * c.n_out, 0.02),
    )
}

/// float64 reference of the op.
fn reference(c: &Case, (x, a, bt): &Host) -> Vec<f64> {
    let mut seg_of = vec![None; c.tokens];
    for s in &c.segs {
        seg_of[s.start..s.start + s.len].fill(Some(*s));
    }
    let mut y = vec![0f64; c.tokens * c.n_out];
    y.par_chunks_mut(c.n_out).enumerate().for_each(|(t, yrow)| {
        let Some(s) = seg_of[t] else { return };
        for r in 0..s.rank {
            let row = s.row_offset + r;
            let h: f64 = (0..c.n_in)
                .map(|i| x[t * c.n_in + i] as f64 * a[row * c.n_in + i] as f64)
                .sum::<f64>()
                * s.scale as f64;
            for (o, yo) in yrow.iter_mut().enumerate() {
                *yo += h * bt[row * c.n_out + o] as f64;
            }
        }
    });
    y
}

/// The op's inputs on `dev` as `dtype`.
fn upload(dev: &Device, dtype: DType, c: &Case, host: &Host) -> Result<(Tensor, Tensor, Tensor)> {
    let x = Tensor::from_slice(&host.0, (c.tokens, c.n_in), dev)?.to_dtype(dtype)?;
    let a = Tensor::from_slice(&host.1, (c.rows, c.n_in), dev)?.to_dtype(dtype)?;
    let bt = Tensor::from_slice(&host.2, (c.rows, c.n_out), dev)?.to_dtype(dtype)?;
    Ok((x, a, bt))
}

/// Median wall time of `f` in microseconds (the device synchronized after each run).
fn wall_median_us(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
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
    Ok(median(times))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Device time of `f` in microseconds, median over `reps`: before each run the L2 cache is
/// flushed (a 256 MiB memset) and a spin kernel holds the GPU while the host queues the run
/// between two events, so that launch latency is not counted. Wall time on CPU.
#[cfg(feature = "cuda")]
pub(crate) fn device_median_us(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let Device::Cuda(cd) = dev else {
        return wall_median_us(dev, reps, f);
    };
    let stream = cd.cuda_stream();
    let ctx = stream.context().clone();
    let mut flush = stream.alloc_zeros::<u8>(256 << 20)?;
    for _ in 0..3 {
        f()?;
    }
    let mut events = Vec::with_capacity(reps);
    for _ in 0..reps {
        stream.memset_zeros(&mut flush)?;
        tandem_kernels::cuda::spin(cd, 200_000)?;
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&stream)?;
        f()?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        end.record(&stream)?;
        events.push((start, end));
    }
    let mut times = Vec::with_capacity(reps);
    for (s, e) in events {
        times.push(s.elapsed_ms(&e)? as f64 * 1e3);
    }
    Ok(median(times))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn device_median_us(
    dev: &Device,
    reps: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    wall_median_us(dev, reps, f)
}

/// Device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB buffer), if on CUDA.
#[cfg(feature = "cuda")]
pub(crate) fn copy_bandwidth(dev: &Device) -> Result<Option<f64>> {
    let Device::Cuda(cd) = dev else {
        return Ok(None);
    };
    let stream = cd.cuda_stream();
    let n = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(n)?;
    let mut dst = stream.alloc_zeros::<u8>(n)?;
    let us = device_median_us(dev, 20, || {
        stream.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    })?;
    Ok(Some(2.0 * n as f64 / (us * 1e-6)))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn copy_bandwidth(_: &Device) -> Result<Option<f64>> {
    Ok(None)
}

/// Which CUDA kernels bf16 runs through.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// What the engine uses: the two tensor-core kernels (shrink, then expand) where they apply,
    /// else the CUDA-core ones.
    Auto,
    /// The fused cluster kernel (sm_90): shrink and expand in one launch.
    Fused,
    /// The CUDA-core kernels.
    CudaCores,
}

fn force_path(p: Path) {
    #[cfg(feature = "cuda")]
    {
        use std::sync::atomic::Ordering::Relaxed;
        tandem_kernels::cuda::FORCE_CUDA_CORES.store(p == Path::CudaCores, Relaxed);
        tandem_kernels::cuda::USE_FUSED.store(p == Path::Fused, Relaxed);
    }
    let _ = p;
}

pub fn kernels(args: BenchKernelsArgs) -> Result<()> {
    let dev = device(args.device)?;
    let div = if args.quick { 16 } else { 1 };
    let mut rng = StdRng::seed_from_u64(0);
    // (dtype, kernels): bf16 through each of its paths.
    let dtypes: &[(DType, Path)] = if dev.is_cpu() {
        &[(DType::F32, Path::Auto)]
    } else {
        &[
            (DType::F32, Path::Auto),
            (DType::BF16, Path::Auto),
            (DType::BF16, Path::Fused),
            (DType::BF16, Path::CudaCores),
        ]
    };
    // Correctness on fresh random inputs: ranks 8-64 mixed in one launch, 1-64 segments (some
    // adapters shared, base-only runs between them), 1-4096 tokens, hidden 4096 and 14336.
    // (tokens, in, out, pieces, adapters, ranks)
    type Check = (usize, usize, usize, usize, usize, &'static [usize]);
    let checks: [Check; 9] = [
        (1, 4096, 4096, 1, 1, &[8]),
        (1, 14336, 4096, 1, 1, &[64]),
        (7, 4096, 14336, 5, 3, &[8, 64, 16]),
        (64, 4096, 4096, 64, 48, &[16, 8, 32]),
        (256, 4096, 4096, 32, 32, &[16]),
        (300, 14336, 4096, 40, 24, &[8, 32, 64, 16]),
        (333, 4096, 14336, 12, 6, &[64, 16]),
        (1024, 4096, 4096, 8, 8, &[64]),
        (4096, 4096, 4096, 16, 8, &[64, 8, 16, 32]),
    ];
    println!("| check | dtype | tokens | in -> out | segments | adapters (ranks) | max rel err | limit |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut failed = 0;
    for (tokens, n_in, n_out, pieces, adapters, ranks) in checks {
        let tokens = (tokens / div).max(1);
        let c = random_case(
            &mut rng,
            tokens,
            n_in / div,
            n_out / div,
            pieces,
            adapters.min(tokens),
            ranks,
        );
        let host = inputs(&c, &mut rng);
        let want = reference(&c, &host);
        let max = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for &(dtype, path) in dtypes {
            let (xt, at, btt) = upload(&dev, dtype, &c, &host)?;
            force_path(path);
            let got = lora_sgmv(&xt, &at, &btt, Arc::from(c.segs.clone()));
            force_path(Path::Auto);
            let got = got?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
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
                "| {} | {dtype:?}{} | {} | {} -> {} | {} | {} ({ranks:?}) | {err:.2e} | {limit:.0e} |",
                if ok { "ok" } else { "FAIL" },
                match path {
                    Path::Auto => "",
                    Path::Fused => " (fused)",
                    Path::CudaCores => " (CUDA cores)",
                },
                c.tokens,
                c.n_in,
                c.n_out,
                c.segs.len(),
                adapters.min(tokens),
            );
        }
    }
    // Timings: the shapes of ../shared/bench/lora_baseline.py, equal segments.
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let bw = copy_bandwidth(&dev)?;
    if let Some(bw) = bw {
        println!(
            "\ncopy bandwidth (1 GiB device-to-device, read + write): {:.2} TB/s",
            bw / 1e12
        );
    }
    println!(
        "\n| timing ({dtype:?}) | base GEMM us | lora_sgmv us | with upload us | lora/base | LoRA bytes MB | % of copy bw | fused kernel us | CUDA-core path us |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let reps = if args.quick { 5 } else { 100 };
    for (tokens, n_in, n_out, adapters, rank) in [
        (256, 4096, 4096, 32, 16),
        (256, 4096, 14336, 32, 16),
        (64, 4096, 4096, 64, 16),
        (1024, 4096, 4096, 8, 64),
    ] {
        let c = equal_case(
            tokens / div,
            n_in / div,
            n_out / div,
            adapters.min(tokens / div),
            rank,
        );
        let host = inputs(&c, &mut rng);
        let (xt, at, btt) = upload(&dev, dtype, &c, &host)?;
        let segs: Arc<[LoraSegment]> = Arc::from(c.segs.clone());
        let w = Tensor::randn(0f32, 0.02, (c.n_out, c.n_in), &dev)?.to_dtype(dtype)?;
        let base = device_median_us(&dev, reps, || {
            xt.matmul(&w.t()?)?;
            Ok(())
        })?;
        // The op as the engine applies it to every layer: segment list uploaded once.
        let op = lora_sgmv_op(segs.clone());
        let lora = device_median_us(&dev, reps, || {
            xt.apply_op3_arc(&at, &btt, op.clone())?;
            Ok(())
        })?;
        // A fresh op per call: the segment list uploaded each time.
        let with_upload = device_median_us(&dev, reps, || {
            lora_sgmv(&xt, &at, &btt, segs.clone())?;
            Ok(())
        })?;
        let timed_path = |path: Path| -> Result<String> {
            if dtype != DType::BF16 {
                return Ok("-".to_string());
            }
            force_path(path);
            let op = lora_sgmv_op(segs.clone());
            let t = device_median_us(&dev, reps, || {
                xt.apply_op3_arc(&at, &btt, op.clone())?;
                Ok(())
            });
            force_path(Path::Auto);
            Ok(format!("{:.1}", t?))
        };
        let fused = timed_path(Path::Fused)?;
        let cores = timed_path(Path::CudaCores)?;
        let elem = dtype.size_in_bytes() as f64;
        let bytes = (c.tokens * (c.n_in + c.n_out) + c.rows * (c.n_in + c.n_out)) as f64 * elem;
        let share = bw.map_or("-".to_string(), |bw| {
            format!("{:.0}%", bytes / (lora * 1e-6) / bw * 100.0)
        });
        println!(
            "| T{} H{} O{} A{} r{} | {base:.1} | {lora:.1} | {with_upload:.1} | {:.2} | {:.1} | {share} | {fused} | {cores} |",
            c.tokens,
            c.n_in,
            c.n_out,
            c.segs.len(),
            rank,
            lora / base,
            bytes / 1e6,
        );
    }
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    Ok(())
}
