//! `tandem bench attention`: checks tandem-kernels' `paged_attention` and `write_kv` against a
//! float64 CPU reference on fresh random inputs (GQA groups from 1 to 17, head sizes 32-128,
//! block sizes 1-32, decode tokens and prefill chunks over cached prefixes, sliding windows,
//! fragmented block tables), then times decode and prefill attention of Llama-3.1-8B's shape
//! beside the gathered candle-op path the engine used before, with the fraction of copy
//! bandwidth the K/V reads reach. On a GPU host `scripts/gpu-check.sh` runs it; on CPU it runs
//! the same code, smaller. On CUDA every check runs with the split-key policy's choice and with
//! 3 forced splits, and the timings show the kernel with and without splits (`key_splits`).

use crate::bench_kernels::{copy_bandwidth, device_median_us};
use crate::cli::BenchKernelsArgs;
use crate::generate::device;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use std::sync::atomic::Ordering;
use tandem_kernels::key_splits::ATTENTION_SPLITS;
use tandem_kernels::{paged_attention, write_kv, PagedAttentionMeta};
use tandem_model::attention::attention_gathered;
use tandem_model::batch::{LogitsWanted, PackedBatch};

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
    batch: PackedBatch,
    meta: PagedAttentionMeta,
}

/// Sequences as (cached prefix, new tokens); block tables a random permutation of the cache's
/// blocks.
fn case(rng: &mut StdRng, d: Dims, seqs: &[(usize, usize)], window: Option<usize>) -> Case {
    let need: Vec<usize> = seqs.iter().map(|&(p, n)| (p + n).div_ceil(d.bs)).collect();
    let blocks = need.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    ids.shuffle(rng);
    let mut batch = PackedBatch::default();
    let mut taken = 0;
    for (i, (&(prefix, n), &nb)) in seqs.iter().zip(&need).enumerate() {
        let table = ids[taken..taken + nb].to_vec();
        taken += nb;
        batch.push(i as u64, &vec![0; n], prefix, table, LogitsWanted::None);
    }
    let meta = batch.attention_meta(d.bs, window);
    Case {
        d,
        slots: blocks * d.bs,
        batch,
        meta,
    }
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// What `dtype` makes of `v` (the reference sees the inputs the kernel sees).
fn rounded(v: &[f32], dtype: DType) -> Result<Vec<f32>> {
    Ok(Tensor::new(v, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

fn reference(c: &Case, q: &[f32], k: &[f32], v: &[f32], scale: f64) -> Vec<f64> {
    let Dims { nh, nkv, hd, bs } = c.d;
    let m = &c.meta;
    let t = m.positions.len();
    let mut out = vec![0f64; t * nh * hd];
    for tok in 0..t {
        let pos = m.positions[tok] as usize;
        let table = &m.block_tables[m.token_segment[tok] as usize];
        let keys: Vec<usize> = (m.first_key(pos)..=pos)
            .map(|j| table[j / bs] as usize * bs + j % bs)
            .collect();
        for h in 0..nh {
            let g = h / (nh / nkv);
            let qr = &q[(tok * nh + h) * hd..][..hd];
            let scores: Vec<f64> = keys
                .iter()
                .map(|&s| {
                    let kr = &k[(s * nkv + g) * hd..][..hd];
                    qr.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let denom: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (sc, &s) in scores.iter().zip(&keys) {
                let w = (sc - max).exp() / denom;
                let vr = &v[(s * nkv + g) * hd..][..hd];
                for d in 0..hd {
                    out[(tok * nh + h) * hd + d] += w * vr[d] as f64;
                }
            }
        }
    }
    out
}

/// One check: the new tokens' K/V written through `write_kv` into a cache holding the prefix,
/// then attention; max |err| / max |reference|.
fn check(dev: &Device, dtype: DType, c: &Case, rng: &mut StdRng) -> Result<f64> {
    let Dims { nh, nkv, hd, .. } = c.d;
    let t = c.meta.positions.len();
    let q = rounded(&random(rng, t * nh * hd), dtype)?;
    let mut k = rounded(&random(rng, c.slots * nkv * hd), dtype)?;
    let mut v = rounded(&random(rng, c.slots * nkv * hd), dtype)?;
    let k_new = rounded(&random(rng, t * nkv * hd), dtype)?;
    let v_new = rounded(&random(rng, t * nkv * hd), dtype)?;
    let put = |cache: &Tensor, src: &[f32]| -> Result<()> {
        let s = Tensor::from_slice(src, (t, nkv, hd), dev)?.to_dtype(dtype)?;
        write_kv(cache, &s, &c.meta)?;
        Ok(())
    };
    let kc = Tensor::from_slice(&k, (c.slots, nkv, hd), dev)?.to_dtype(dtype)?;
    let vc = Tensor::from_slice(&v, (c.slots, nkv, hd), dev)?.to_dtype(dtype)?;
    put(&kc, &k_new)?;
    put(&vc, &v_new)?;
    let row = nkv * hd;
    for (tok, &slot) in c.meta.slots().iter().enumerate() {
        let s = slot as usize * row;
        k[s..s + row].copy_from_slice(&k_new[tok * row..][..row]);
        v[s..s + row].copy_from_slice(&v_new[tok * row..][..row]);
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let qt = Tensor::from_slice(&q, (t, nh, hd), dev)?.to_dtype(dtype)?;
    let got = paged_attention(&qt, &kc, &vc, &c.meta, scale)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let want = reference(c, &q, &k, &v, scale as f64);
    let max = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0f64, f64::max);
    // The cache round trip: what write_kv put there reads back exactly.
    let back = kc.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if back != k {
        bail!("write_kv: the K cache does not hold what was written");
    }
    Ok(err / max)
}

pub fn run(args: BenchKernelsArgs) -> Result<()> {
    let dev = device(args.device)?;
    let mut rng = StdRng::seed_from_u64(7);
    let dtypes: &[DType] = if dev.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    let d = |nh, nkv, hd, bs| Dims { nh, nkv, hd, bs };
    let smol = d(9, 3, 64, 16);
    let llama8b = d(32, 8, 128, 16);
    let decode32: Vec<(usize, usize)> = (0..32).map(|i| (1 + i * 61 % 2000, 1)).collect();
    type Check = (&'static str, Dims, Vec<(usize, usize)>, Option<usize>);
    let checks: Vec<Check> = vec![
        (
            "decode + chunks",
            smol,
            vec![(15, 1), (16, 1), (31, 40), (0, 77), (300, 1)],
            None,
        ),
        (
            "window 100",
            smol,
            vec![(250, 1), (90, 30), (0, 130)],
            Some(100),
        ),
        ("decode b32", llama8b, decode32, None),
        (
            "prefill after prefix",
            llama8b,
            vec![(700, 512), (0, 1)],
            None,
        ),
        ("MHA hd32 bs1", d(4, 4, 32, 1), vec![(40, 3), (0, 50)], None),
        (
            "hd96 bs32",
            d(12, 4, 96, 32),
            vec![(33, 20), (64, 1)],
            Some(40),
        ),
        ("group 17", d(34, 2, 64, 16), vec![(10, 9), (0, 1)], None),
    ];
    println!("| check | dtype | heads/kv/hd/block | sequences (prefix+new) | window | max rel err | limit |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut failed = 0;
    for (name, dims, seqs, window) in &checks {
        let seqs: Vec<(usize, usize)> = if args.quick {
            seqs.iter().map(|&(p, n)| (p / 8, n.div_ceil(8))).collect()
        } else {
            seqs.clone()
        };
        // CUDA: the policy's splits (0), then 3 forced splits (the merge on every case).
        let split_runs: &[usize] = if dev.is_cpu() { &[0] } else { &[0, 3] };
        for &splits in split_runs {
            ATTENTION_SPLITS.store(splits, Ordering::Relaxed);
            // A fresh meta per run: the device plans are kept in it.
            let c = case(&mut rng, *dims, &seqs, *window);
            for &dtype in dtypes {
                let err = check(&dev, dtype, &c, &mut rng)?;
                let limit = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                let ok = err <= limit;
                failed += usize::from(!ok);
                let shown: Vec<String> = seqs
                    .iter()
                    .take(4)
                    .map(|(p, n)| format!("{p}+{n}"))
                    .collect();
                println!(
                    "| {} {name}{} | {dtype:?} | {}/{}/{}/{} | {}{} | {window:?} | {err:.2e} | {limit:.0e} |",
                    if ok { "ok" } else { "FAIL" },
                    if splits > 0 { format!(" ({splits} splits)") } else { String::new() },
                    dims.nh,
                    dims.nkv,
                    dims.hd,
                    dims.bs,
                    shown.join(" "),
                    if seqs.len() > 4 { format!(" … ({} seqs)", seqs.len()) } else { String::new() },
                );
            }
        }
    }
    ATTENTION_SPLITS.store(0, Ordering::Relaxed);

    // Timings, Llama-3.1-8B shape (one layer): decode batches and a prefill chunk.
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let bw = copy_bandwidth(&dev)?;
    println!(
        "\n| timing ({dtype:?}, one layer, 32/8/128) | paged_attention us | no key splits us | gathered (candle ops) us | speedup | K/V bytes MB | % of copy bw |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let reps = if args.quick { 3 } else { 50 };
    let scale = 1.0 / (llama8b.hd as f32).sqrt();
    let div = if args.quick { 16 } else { 1 };
    for (name, seqs) in [
        ("decode b1 ctx 1024", vec![(1023 / div, 1)]),
        ("decode b32 ctx 1024", vec![(1023 / div, 1); 32]),
        (
            "decode b128 ctx 512",
            vec![(511 / div, 1); 128 / div.min(8)],
        ),
        ("prefill 1024", vec![(0, 1024 / div)]),
    ] {
        let c = case(&mut rng, llama8b, &seqs, None);
        let t = c.meta.positions.len();
        let Dims { nh, nkv, hd, .. } = llama8b;
        let q = Tensor::randn(0f32, 1.0, (t, nh, hd), &dev)?.to_dtype(dtype)?;
        let kc = Tensor::randn(0f32, 1.0, (c.slots, nkv, hd), &dev)?.to_dtype(dtype)?;
        let vc = Tensor::randn(0f32, 1.0, (c.slots, nkv, hd), &dev)?.to_dtype(dtype)?;
        let paged = device_median_us(&dev, reps, || {
            paged_attention(&q, &kc, &vc, &c.meta, scale)?;
            Ok(())
        })?;
        // The kernel without splits, where the policy splits (on CUDA; the CPU path has none).
        let unsplit = if dev.is_cpu() {
            "-".to_string()
        } else {
            ATTENTION_SPLITS.store(1, Ordering::Relaxed);
            let us = device_median_us(&dev, reps, || {
                paged_attention(&q, &kc, &vc, &c.meta, scale)?;
                Ok(())
            });
            ATTENTION_SPLITS.store(0, Ordering::Relaxed);
            format!("{:.1}", us?)
        };
        let gathered = device_median_us(&dev, reps.min(10), || {
            attention_gathered(&q, &kc, &vc, &c.meta, &c.batch, scale)?;
            Ok(())
        })?;
        let keys: usize = seqs.iter().map(|(p, n)| p + n).sum();
        let bytes = (2 * keys * nkv * hd + 2 * t * nh * hd) as f64 * dtype.size_in_bytes() as f64;
        let share = bw.map_or("-".to_string(), |bw| {
            format!("{:.0}%", bytes / (paged * 1e-6) / bw * 100.0)
        });
        println!(
            "| {name} | {paged:.1} | {unsplit} | {gathered:.1} | {:.1}x | {:.1} | {share} |",
            gathered / paged,
            bytes / 1e6
        );
    }
    if failed > 0 {
        bail!("{failed} attention checks failed");
    }
    Ok(())
}
