//! `tandem finetune`: token-level LoRA training on a JSONL file, one line of output per
//! optimizer step, an HF PEFT adapter at the end (and checkpoints on the way).

use crate::cli::{FinetuneArgs, TrainArgs};
use crate::generate::load;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::time::Instant;
use tandem_model::finetune::{
    load_jsonl, load_preference_jsonl, Finetuner, Hyperparameters, Method, Reinforce, TrainConfig,
    TrainData,
};
use tandem_model::lora::{LoraAdapter, Proj};

/// `value` of `flag` as a number, or None for `auto`.
fn auto_or<T: std::str::FromStr>(flag: &str, value: &str) -> Result<Option<T>> {
    if value == "auto" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("{flag}: `{value}` is neither a number nor auto"))
}

/// The run's settings from the command line, checked, with every `auto` resolved for a
/// training set of `examples` examples.
pub fn train_config(a: &TrainArgs, examples: usize) -> Result<TrainConfig> {
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
    let lr: Option<f64> = auto_or("--lr", &a.lr)?;
    if lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
        bail!("--lr must be a positive number or auto");
    }
    let method = match a.method.as_str() {
        "supervised" | "sft" => Method::Supervised,
        "dpo" => {
            if !(a.beta > 0.0 && a.beta.is_finite()) {
                bail!("--beta must be a positive number");
            }
            Method::Dpo { beta: a.beta }
        }
        "grpo" | "reinforcement" => {
            if !(a.kl >= 0.0 && a.kl.is_finite()) {
                bail!("--kl must be a number of at least 0");
            }
            if a.group < 2 {
                bail!("--group must be at least 2 (advantages compare answers to one prompt)");
            }
            if a.max_answer_tokens == 0 {
                bail!("--max-answer-tokens must be at least 1");
            }
            if !(0.0..=2.0).contains(&a.temperature) {
                bail!("--temperature must be in [0, 2]");
            }
            Method::Reinforcement(Reinforce {
                group: a.group,
                beta: a.kl,
                max_tokens: a.max_answer_tokens,
                temperature: a.temperature,
                ..Default::default()
            })
        }
        other => bail!("--method: `{other}` is not a method (supervised, dpo or grpo)"),
    };
    let hp = Hyperparameters {
        n_epochs: auto_or("--epochs", &a.epochs)?,
        batch_size: auto_or("--batch-size", &a.batch_size)?,
        learning_rate_multiplier: None,
    }
    .resolve_for(examples, &method);
    for (flag, v) in [
        ("--epochs", hp.n_epochs),
        ("--batch-size", hp.batch_size),
        ("--chunk-tokens", a.chunk_tokens),
        ("--pack-tokens", a.pack_tokens),
        ("--max-seq-len", a.max_seq_len),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    Ok(TrainConfig {
        method,
        r: a.rank,
        alpha: a.alpha,
        targets,
        use_rslora: a.rslora,
        lr: lr.unwrap_or(hp.lr),
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        schedule: a
            .schedule
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--schedule: {e}"))?,
        warmup_steps: a.warmup_steps,
        epochs: hp.n_epochs,
        batch_size: hp.batch_size,
        chunk_tokens: a.chunk_tokens,
        max_seq_len: a.max_seq_len,
        seed: a.seed,
        shuffle: !a.no_shuffle,
        pack: !a.no_pack,
        pack_tokens: Some(a.pack_tokens),
    })
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    // Bad flags are reported before the model and data load (the autos resolve after).
    let method = train_config(&args.train, 1)?.method;
    if method.is_reinforcement() {
        return crate::finetune_rl::run(args);
    }
    if args.grader.is_some() {
        bail!("--grader is for --method grpo");
    }
    let m = load(&args.model)?;
    let dpo = method.is_dpo();
    let max = args.train.max_seq_len;
    let data: TrainData = if dpo {
        load_preference_jsonl(&args.data, &m.tokenizer, max).map(TrainData::Preference)
    } else {
        load_jsonl(&args.data, &m.tokenizer, max).map(TrainData::Supervised)
    }
    .with_context(|| format!("cannot read training data {}", args.data.display()))?;
    let examples = data.len();
    if let Some(path) = &args.dump_tokens {
        let line = |e: &tandem_model::finetune::Example| serde_json::json!({"tokens": e.tokens, "target": e.target});
        let mut out = String::new();
        match &data {
            TrainData::Supervised(v) => {
                for e in v {
                    out.push_str(&line(e).to_string());
                    out.push('\n');
                }
            }
            TrainData::Preference(v) => {
                for p in v {
                    let pair = serde_json::json!({"chosen": line(&p.chosen), "rejected": line(&p.rejected)});
                    out.push_str(&pair.to_string());
                    out.push('\n');
                }
            }
            TrainData::Prompts(_) => {}
        }
        std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "{examples} tokenized examples written to {}",
            path.display()
        );
        return Ok(());
    }
    let cfg = train_config(&args.train, examples)?;
    let targets: usize = match &data {
        TrainData::Supervised(v) => v.iter().map(|e| e.num_targets()).sum(),
        TrainData::Preference(v) => v
            .iter()
            .map(|p| p.chosen.num_targets() + p.rejected.num_targets())
            .sum(),
        TrainData::Prompts(_) => 0,
    };
    let init = match &args.init_adapter {
        Some(dir) => Some(
            LoraAdapter::load(dir, &m.model.cfg, m.model.device(), candle_core::DType::F32)
                .with_context(|| format!("--init-adapter {}", dir.display()))?,
        ),
        None => None,
    };
    let mut ft = match (&args.resume, &init) {
        (Some(dir), _) => Finetuner::resume(&m.model, data, dir, init.as_ref().filter(|_| dpo))
            .with_context(|| format!("cannot resume from {}", dir.display()))?,
        (None, Some(init)) => {
            Finetuner::from_adapter(&m.model, data, cfg, init, Some(m.name.clone())).with_context(
                || {
                    format!(
                        "--init-adapter {}",
                        args.init_adapter
                            .as_deref()
                            .unwrap_or_else(|| std::path::Path::new(""))
                            .display()
                    )
                },
            )?
        }
        (None, None) => Finetuner::new(&m.model, data, cfg, Some(m.name.clone()))?,
    };
    if args.train.recompute {
        ft.keep_budget = 0;
    }
    eprintln!(
        "finetune ({}): {} on {examples} {} ({targets} target tokens), LoRA r={} alpha={} on {}, {} epochs, {} steps of {} sequences, lr {} ({:?}), chunks of {} tokens",
        ft.cfg().method.name(),
        m.name,
        if dpo { "pairs" } else { "examples" },
        ft.cfg().r,
        ft.cfg().alpha,
        ft.cfg().targets.join(","),
        ft.cfg().epochs,
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
        let rewards = r.dpo.map_or(String::new(), |d| {
            format!(
                " reward_accuracy {:.4} reward_margin {:.6}",
                d.reward_accuracy(),
                d.reward_margin()
            )
        });
        writeln!(
            out,
            "step {}/{} loss {:.6} accuracy {:.4}{rewards} lr {:.3e} grad_norm {:.6} tokens {} ({:.0} tok/s)",
            r.step,
            r.total_steps,
            r.loss,
            r.accuracy,
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
