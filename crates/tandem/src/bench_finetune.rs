//! `tandem bench finetune`: token-level finetuning beside candle autograd on the same model.
//! - Activation memory: bytes kept per training token by the token-level path (its measured peak
//!   of saved layer inputs, output gradients and dK/dV buffers; the K/V cache, which inference
//!   keeps anyway, listed apart) vs what candle autograd keeps for the same sequence (the
//!   distinct storages of every tensor in the loss's graph, leaves excluded).
//! - Throughput: optimizer steps of `Finetuner` vs the same steps through candle autograd over
//!   whole sequences (same data, same AdamW), tokens/s; on CUDA, the peak device memory of the
//!   token-level run (weights included, as HF's baseline reports it).

use crate::cli::BenchFinetuneArgs;
use crate::generate::load;
use anyhow::Result;
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::time::Instant;
use tandem_model::finetune::{AdamW, AdamWConfig, Example, Finetuner, TrainConfig, TrainableLora};
use tandem_model::Llama;

/// Bytes of the distinct storages behind the non-leaf tensors of `loss`'s graph.
fn graph_bytes(loss: &Tensor) -> usize {
    let mut extent: HashMap<usize, usize> = HashMap::new();
    for t in loss.sorted_nodes() {
        if t.is_variable() {
            continue;
        }
        let (storage, layout) = t.storage_and_layout();
        let key = &*storage as *const _ as usize;
        let mut last = layout.start_offset();
        for (d, s) in layout.dims().iter().zip(layout.stride()) {
            last += d.saturating_sub(1) * s;
        }
        let bytes = (last + 1) * t.dtype().size_in_bytes();
        let e = extent.entry(key).or_default();
        *e = (*e).max(bytes);
    }
    extent.values().sum()
}

/// The whole-sequence loss through candle autograd (mean over targets).
fn autograd_loss(m: &Llama, lora: &TrainableLora, ex: &Example) -> Result<Tensor> {
    let mut x = m.embed(&ex.tokens)?;
    for l in 0..m.cfg.num_hidden_layers {
        x = m.layer_chunk(l, &x, 0, None, None, &lora.layers[l])?.0;
    }
    let labels: Vec<Option<u32>> = (0..ex.tokens.len())
        .map(|i| (i + 1 < ex.tokens.len() && ex.target[i + 1]).then(|| ex.tokens[i + 1]))
        .collect();
    let (nll, n) = m
        .head_nll(&x, &labels)?
        .ok_or_else(|| anyhow::anyhow!("no targets"))?;
    Ok((nll / n as f64)?)
}

fn synthetic(len: usize, vocab: usize, k: usize) -> Example {
    Example {
        tokens: (0..len)
            .map(|j| ((k * 7919 + j * 104_729) % (vocab - 200) + 100) as u32)
            .collect(),
        target: (0..len).map(|i| i > 0).collect(),
    }
}

pub fn run(args: BenchFinetuneArgs) -> Result<()> {
    let m = load(&args.model)?;
    let model = &m.model;
    let c = &model.cfg;
    let cfg = TrainConfig {
        r: 16,
        alpha: 32.0,
        targets: tandem_model::lora::Proj::ALL
            .iter()
            .map(|p| p.name().to_string())
            .collect(),
        batch_size: args.batch_size.max(1),
        chunk_tokens: args.chunk_tokens,
        max_seq_len: usize::MAX,
        ..Default::default()
    };
    let elem = model.dtype().size_in_bytes();
    println!(
        "# tandem bench finetune: {} ({} layers, hidden {}), LoRA r16 on all seven projections, chunks of {} tokens, device {:?}, threads {}",
        m.name,
        c.num_hidden_layers,
        c.hidden_size,
        args.chunk_tokens,
        args.model.device,
        candle_core::utils::get_num_threads()
    );
    let mem_lens: &[usize] = if args.no_reference {
        &[]
    } else {
        &args.mem_lens
    };
    if !mem_lens.is_empty() {
        println!("\n| seq len | token-level bytes/token | autograd bytes/token | token-level / autograd | KV cache bytes/token (both keep it) |");
        println!("| --- | --- | --- | --- | --- |");
    }
    for &len in mem_lens {
        let ex = synthetic(len, c.vocab_size, 0);
        let mut ft = Finetuner::new(model, vec![ex.clone()], cfg.clone(), None)?;
        let r = ft.train_step()?;
        let ours = r.peak_activation_bytes as f64 / len as f64;
        // Autograd: one layer's graph times the layers, plus the head (identical layers);
        // checked against the whole graph where that fits (--full-graph-max).
        let lora = ft.lora();
        let xv = Var::from_tensor(&model.embed(&ex.tokens)?)?;
        let (out, _, _) = model.layer_chunk(0, xv.as_tensor(), 0, None, None, &lora.layers[0])?;
        let layer = graph_bytes(&out.sum_all()?);
        let top = Var::from_tensor(&out.detach())?;
        let labels: Vec<Option<u32>> = (0..len)
            .map(|i| (i + 1 < len).then(|| ex.tokens[i + 1]))
            .collect();
        let head = model
            .head_nll(top.as_tensor(), &labels)?
            .map(|(t, _)| graph_bytes(&t))
            .unwrap_or(0);
        let mut theirs = (layer * c.num_hidden_layers + head) as f64;
        if len <= args.full_graph_max {
            let whole = graph_bytes(&autograd_loss(model, lora, &ex)?) as f64;
            eprintln!("len {len}: whole graph {whole:.0} bytes, per-layer estimate {theirs:.0}");
            theirs = whole;
        }
        let theirs = theirs / len as f64;
        let kv = 2 * c.num_hidden_layers * c.kv_dim() * elem;
        println!(
            "| {len} | {ours:.0} | {theirs:.0} | {:.1}% ({:.1}% less) | {kv} |",
            100.0 * ours / theirs,
            100.0 * (1.0 - ours / theirs)
        );
    }
    // Throughput: the same steps both ways.
    let data: Vec<Example> = (0..args.steps * cfg.batch_size)
        .map(|k| synthetic(args.seq_len, c.vocab_size, k + 1))
        .collect();
    let mut ft = Finetuner::new(
        model,
        data.clone(),
        TrainConfig {
            epochs: 1,
            ..cfg.clone()
        },
        None,
    )?;
    let t0 = Instant::now();
    let mut tokens = 0;
    while !ft.is_done() {
        tokens += ft.train_step()?.tokens;
    }
    let ours = tokens as f64 / t0.elapsed().as_secs_f64();
    // Model FLOPs per trained token, LoRA's usual count: forward 2N, input gradients 2N (no
    // weight gradients), and the forward recomputed in the backward 2N.
    println!(
        "\n# token-level training: {} optimizer steps of {} x {} tokens: {ours:.1} tokens/s, {:.2} TFLOP/s at 6N FLOPs/token (N = {:.2}e9 weights multiplied per token)",
        args.steps,
        cfg.batch_size,
        args.seq_len,
        6.0 * c.matmul_params() as f64 * ours / 1e12,
        c.matmul_params() as f64 / 1e9
    );
    // On CUDA: everything held at once so far (weights, activations, adapters, AdamW state),
    // the figure HF's baseline reports as max_memory_allocated.
    let peak = crate::device_memory::peak_line(model.device())?;
    if !peak.is_empty() {
        println!("# token-level training {peak}");
    }
    if args.no_reference {
        return Ok(());
    }
    let lora = TrainableLora::new(c, cfg.spec()?, model.device(), cfg.seed)?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: cfg.lr,
        ..Default::default()
    });
    let t0 = Instant::now();
    let mut tokens = 0;
    for ex in &data {
        let loss = autograd_loss(model, &lora, ex)?;
        let grads = loss.backward()?;
        let params = lora.named_params();
        let g: HashMap<String, Tensor> = params
            .iter()
            .filter_map(|(n, v)| Some((n.clone(), grads.get(v.as_tensor())?.clone())))
            .collect();
        opt.step(&params, &g, cfg.lr)?;
        tokens += ex.tokens.len();
    }
    let theirs = tokens as f64 / t0.elapsed().as_secs_f64();
    println!(
        "\n| training, {} steps of {} x {} tokens | tokens/s |\n| --- | --- |\n| tandem token-level (chunks of {}) | {ours:.1} |\n| candle autograd, whole sequence | {theirs:.1} |\n| ratio | {:.2}x |",
        args.steps,
        cfg.batch_size,
        args.seq_len,
        args.chunk_tokens,
        ours / theirs
    );
    Ok(())
}
