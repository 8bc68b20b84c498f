//! `tandem bench decode`: packed decode throughput of tandem's engine at several batch sizes,
//! and candle-transformers' own Llama on the same weights at batch 1, in one run; with
//! `--ablate`, each batch size again without the fused element-wise kernels and without split
//! keys in paged attention (what each is worth, on CUDA, from one model load).

use crate::cli::{BenchDecodeArgs, BenchLoraArgs};
use crate::generate::{device, engine, load, BLOCK_SIZE};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as reference;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tandem_kernels::key_splits::ATTENTION_SPLITS;
use tandem_model::lora::{Proj, RegistryConfig};
use tandem_model::{
    default_dtype, load_checkpoint, KvCache, LoadedModel, LogitsWanted, ModelConfig, PackedBatch,
    SamplingParams,
};

fn prompt(seq: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((seq * 7919 + j * 104_729) % (vocab - 200) + 100) as u32)
        .collect()
}

pub fn decode(args: BenchDecodeArgs) -> Result<()> {
    let dev = device(args.model.device)?;
    println!(
        "# tandem bench decode: prompt {} tokens, {} timed decode steps, device {:?}, threads {}",
        args.prompt_len,
        args.steps,
        args.model.device,
        candle_core::utils::get_num_threads()
    );
    let mut tandem_b1 = None;
    let loaded = load(&args.model)?;
    // On CUDA: what one decode step must read (every weight once, each sequence's K/V) against
    // the measured copy bandwidth.
    let bw = crate::bench_kernels::copy_bandwidth(&dev)?;
    let cfg = loaded.model.cfg.clone();
    let elem = loaded.model.dtype().size_in_bytes();
    if let Some(bw) = bw {
        println!(
            "# weights read per step: {:.2} GB; copy bandwidth (1 GiB device-to-device): {:.2} TB/s",
            (cfg.matmul_params() * elem) as f64 / 1e9,
            bw / 1e12
        );
    }
    for &b in &args.batch_sizes {
        let (tps, step, prefill) = decode_batch(loaded.clone(), b, &args)?;
        if b == 1 {
            tandem_b1 = Some(tps);
        }
        let vs_b1 = tandem_b1.map_or(String::new(), |x| format!("{:.2}x", tps / x));
        // Mean context over the timed steps.
        let ctx = args.prompt_len + 1 + args.steps / 2;
        let roofline = bw.map_or(String::new(), |bw| {
            let kv = b * ctx * 2 * cfg.num_hidden_layers * cfg.kv_dim() * elem;
            let bytes = (cfg.matmul_params() * elem + kv) as f64;
            format!(
                "  roofline {:.2} ms ({:.2} GB weights + KV): {:.0}%",
                bytes / bw * 1e3,
                bytes / 1e9,
                100.0 * bytes / bw / step
            )
        });
        println!(
            "tandem packed decode  batch {b:>3}: {tps:8.1} tok/s  ({:.1} ms/step, prefill {:.0} ms)  vs tandem batch 1: {vs_b1}{roofline}",
            step * 1e3,
            prefill * 1e3
        );
        if args.ablate {
            let mut unfused = loaded.clone();
            unfused.model.set_fused_elementwise(false);
            let (u, ustep, _) = decode_batch(unfused, b, &args)?;
            ATTENTION_SPLITS.store(1, Ordering::Relaxed);
            let unsplit = decode_batch(loaded.clone(), b, &args);
            ATTENTION_SPLITS.store(0, Ordering::Relaxed);
            let (n, nstep, _) = unsplit?;
            println!(
                "  without fused element-wise kernels: {u:8.1} tok/s ({:.1} ms/step, {:.2}x of the default); without key splits: {n:8.1} tok/s ({:.1} ms/step, {:.2}x)",
                ustep * 1e3,
                u / tps,
                nstep * 1e3,
                n / tps
            );
        }
    }
    if !args.no_reference {
        let tps = reference_decode(&args, &dev)?;
        let ratio = tandem_b1.map_or(String::new(), |x| {
            format!("  tandem/reference at batch 1: {:.2}x", x / tps)
        });
        println!("candle-transformers   batch   1: {tps:8.1} tok/s{ratio}");
    }
    Ok(())
}

/// One batch size: `b` prompts prefilled together, a warm-up step, then `args.steps` timed
/// decode steps. Returns (tokens/s, seconds per step, prefill seconds).
fn decode_batch(m: LoadedModel, b: usize, args: &BenchDecodeArgs) -> Result<(f64, f64, f64)> {
    let vocab = m.model.cfg.vocab_size;
    let per_seq = (args.prompt_len + args.steps + 2).div_ceil(BLOCK_SIZE);
    let mut e = engine(
        m,
        per_seq * b + b,
        b,
        b * args.prompt_len,
        RegistryConfig::default(),
    )?;
    for s in 0..b {
        let params = SamplingParams {
            max_tokens: args.steps + 2,
            ignore_eos: true,
            ..Default::default()
        };
        e.add_request(prompt(s, args.prompt_len, vocab), params, None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let t0 = Instant::now();
    e.step()?; // prefill of every prompt, one packed batch
    let prefill = t0.elapsed().as_secs_f64();
    e.step()?; // warm-up decode step
    let t0 = Instant::now();
    let mut tokens = 0;
    for _ in 0..args.steps {
        tokens += e.step()?.len();
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((tokens as f64 / secs, secs / args.steps as f64, prefill))
}

fn reference_config(c: &ModelConfig) -> reference::Config {
    reference::Config {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        use_flash_attn: false,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: c.max_position_embeddings,
        tie_word_embeddings: c.tie_word_embeddings,
    }
}

/// candle-transformers' Llama, batch 1, greedy, with its own KV cache.
fn reference_decode(args: &BenchDecodeArgs, dev: &Device) -> Result<f64> {
    let path = match &args.model.model {
        Some(p) => p.clone(),
        None => tandem_model::default_model::ensure_default_model()?,
    };
    let dtype = default_dtype(dev);
    let (cfg, map, _) =
        load_checkpoint(&path, dev, dtype).context("reference: cannot load the checkpoint")?;
    let rcfg = reference_config(&cfg);
    let vb = candle_nn::VarBuilder::from_tensors(map, dtype, dev);
    let model = reference::Llama::load(vb, &rcfg)?;
    let mut cache = reference::Cache::new(true, dtype, &rcfg, dev)?;
    let p = prompt(0, args.prompt_len, cfg.vocab_size);
    let input = Tensor::new(p.as_slice(), dev)?.unsqueeze(0)?;
    let mut logits = model.forward(&input, 0, &mut cache)?;
    let mut pos = p.len();
    let step = |logits: &Tensor, pos: usize, cache: &mut reference::Cache| -> Result<Tensor> {
        let next = logits
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .argmax(0)?
            .to_scalar::<u32>()?;
        let input = Tensor::new(&[next], dev)?.unsqueeze(0)?;
        Ok(model.forward(&input, pos, cache)?)
    };
    logits = step(&logits, pos, &mut cache)?; // warm-up
    pos += 1;
    let t0 = Instant::now();
    for _ in 0..args.steps {
        logits = step(&logits, pos, &mut cache)?;
        pos += 1;
    }
    Ok(args.steps as f64 / t0.elapsed().as_secs_f64())
}

/// Batch decode with the batch spread evenly over `n` distinct adapters (0: no adapter at all).
/// Prints `{"tokens": [...], "logits": [[...], ...]}`: the model's logits (f32) at every
/// position of the prompt, from one packed forward over a fresh cache.
pub fn logits(args: crate::cli::BenchLogitsArgs) -> Result<()> {
    let m = load(&args.model)?;
    let tokens = m
        .tokenizer
        .encode(&args.prompt, true)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
    anyhow::ensure!(!tokens.is_empty(), "the prompt has no tokens");
    let c = &m.model.cfg;
    let block = 16;
    let blocks = tokens.len().div_ceil(block);
    let cache = KvCache::new(
        c.num_hidden_layers,
        blocks,
        block,
        c.num_key_value_heads,
        c.head_dim,
        m.model.dtype(),
        m.model.device(),
    )?;
    let mut b = PackedBatch::default();
    b.push(
        0,
        &tokens,
        0,
        (0..blocks as u32).collect(),
        LogitsWanted::All,
    );
    let logits = m.model.forward(&b, &cache)?.to_vec2::<f32>()?;
    use std::io::Write;
    writeln!(
        std::io::stdout(),
        "{}",
        serde_json::json!({"tokens": tokens, "logits": logits})
    )?;
    Ok(())
}

pub fn lora(args: BenchLoraArgs) -> Result<()> {
    let targets = args
        .targets
        .iter()
        .map(|t| {
            Proj::from_name(t).ok_or_else(|| {
                anyhow::anyhow!(
                    "--targets: unknown module `{t}` (supported: {})",
                    Proj::NAMES
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    println!(
        "# tandem bench lora: batch {}, rank {} on {}, prompt {} tokens, {} timed decode steps, threads {}",
        args.batch,
        args.rank,
        args.targets.join(","),
        args.prompt_len,
        args.steps,
        candle_core::utils::get_num_threads()
    );
    let dir = std::env::temp_dir().join(format!(
        "tandem-bench-lora-{}-{}",
        std::process::id(),
        args.targets.join("-")
    ));
    let mut base_tps = None;
    let loaded = load(&args.model)?;
    for &n in &args.adapters {
        let m = loaded.clone();
        let cfg = m.model.cfg.clone();
        let vocab = cfg.vocab_size;
        let per_seq = (args.prompt_len + args.steps + 2).div_ceil(BLOCK_SIZE);
        let lora = RegistryConfig {
            max_loras: n.max(1),
            max_lora_rank: args.rank,
        };
        let mut e = engine(
            m,
            per_seq * args.batch + args.batch,
            args.batch,
            args.batch * args.prompt_len,
            lora,
        )?;
        for i in 0..n {
            let path = dir.join(format!("a{i}"));
            if !path.exists() {
                tandem_model::testing::random_adapter(
                    &cfg,
                    args.rank,
                    2.0 * args.rank as f64,
                    &targets,
                    false,
                    i as u64,
                )
                .save(&path)?;
            }
            e.runner.adapters.register(&format!("a{i}"), &path)?;
        }
        for s in 0..args.batch {
            let params = SamplingParams {
                max_tokens: args.steps + 2,
                ignore_eos: true,
                ..Default::default()
            };
            let name = (n > 0).then(|| format!("a{}", s % n));
            e.add_request(prompt(s, args.prompt_len, vocab), params, name.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        e.step()?; // prefill
        e.step()?; // warm-up decode
        let t0 = Instant::now();
        let mut tokens = 0;
        for _ in 0..args.steps {
            tokens += e.step()?.len();
        }
        let tps = tokens as f64 / t0.elapsed().as_secs_f64();
        let base = *base_tps.get_or_insert(tps);
        println!(
            "{:>2} distinct adapters: {tps:8.1} tok/s  cost vs base model alone: {:.2}x",
            n,
            base / tps
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
