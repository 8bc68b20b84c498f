//! `tandem finetune`: token-level LoRA training on a JSONL file, one line of output per
//! optimizer step, an HF PEFT adapter at the end (and checkpoints on the way).

use crate::cli::{FinetuneArgs, TrainArgs};
use crate::generate::load;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::time::Instant;
use tandem_model::finetune::{load_jsonl, Finetuner, TrainConfig};
use tandem_model::lora::Proj;

/// The run's settings from the command line, checked.
pub fn train_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut targets: Vec<String> = Vec::new();
    for t in &a.targets {
        let t = t.trim();
        if t == "all-linear" {
            targets.extend(Proj::ALL.iter().map(|p| p.name().to_string()));
        } else if Proj::from_name(t).is_some() {
            targets.push(t.to_string());
        } else {
            bail!(
                "--targets: unknown module `{t}` (use {} or all-linear)",
                Proj::NAMES
            );
        }
    }
    targets.sort();
    targets.dedup();
    if a.rank == 0 {
        bail!("--rank must be at least 1");
    }
    if !(a.alpha > 0.0 && a.alpha.is_finite()) {
        bail!("--alpha must be a positive number");
    }
    if !(a.lr > 0.0 && a.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    for (flag, v) in [
        ("--epochs", a.epochs),
        ("--batch-size", a.batch_size),
        ("--chunk-tokens", a.chunk_tokens),
        ("--max-seq-len", a.max_seq_len),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    Ok(TrainConfig {
        r: a.rank,
        alpha: a.alpha,
        targets,
        use_rslora: a.rslora,
        lr: a.lr,
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        schedule: a
            .schedule
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--schedule: {e}"))?,
        warmup_steps: a.warmup_steps,
        epochs: a.epochs,
        batch_size: a.batch_size,
        chunk_tokens: a.chunk_tokens,
        max_seq_len: a.max_seq_len,
        seed: a.seed,
    })
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let cfg = train_config(&args.train)?;
    let m = load(&args.model)?;
    let data = load_jsonl(&args.data, &m.tokenizer, cfg.max_seq_len)
        .with_context(|| format!("cannot read training data {}", args.data.display()))?;
    let examples = data.len();
    let targets: usize = data.iter().map(|e| e.num_targets()).sum();
    let mut ft = match &args.resume {
        Some(dir) => Finetuner::resume(&m.model, data, dir)
            .with_context(|| format!("cannot resume from {}", dir.display()))?,
        None => Finetuner::new(&m.model, data, cfg, Some(m.name.clone()))?,
    };
    eprintln!(
        "finetune: {} on {examples} examples ({targets} target tokens), LoRA r={} alpha={} on {}, {} steps of {} sequences, lr {} ({:?}), chunks of {} tokens",
        m.name,
        ft.cfg().r,
        ft.cfg().alpha,
        ft.cfg().targets.join(","),
        ft.total_steps(),
        ft.cfg().batch_size,
        ft.cfg().lr,
        ft.cfg().schedule,
        ft.cfg().chunk_tokens,
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let start = Instant::now();
    let mut tokens = 0;
    let mut out = std::io::stdout().lock();
    while !ft.is_done() {
        let t0 = Instant::now();
        let r = ft.train_step()?;
        tokens += r.tokens;
        writeln!(
            out,
            "step {}/{} loss {:.6} lr {:.3e} grad_norm {:.6} tokens {} ({:.0} tok/s)",
            r.step,
            r.total_steps,
            r.loss,
            r.lr,
            r.grad_norm,
            r.tokens,
            r.tokens as f64 / t0.elapsed().as_secs_f64()
        )?;
        out.flush()?;
        if args.checkpoint_every > 0 && r.step % args.checkpoint_every == 0 && !ft.is_done() {
            let dir = args.out.join(format!("checkpoint-{}", r.step));
            ft.save_checkpoint(&dir)?;
            eprintln!("checkpoint: {}", dir.display());
        }
    }
    ft.adapter()?.save(&args.out)?;
    eprintln!(
        "adapter written to {} ({tokens} tokens in {:.1} s, {:.0} tok/s)",
        args.out.display(),
        start.elapsed().as_secs_f64(),
        tokens as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}
