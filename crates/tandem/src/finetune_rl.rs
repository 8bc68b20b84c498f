//! `tandem finetune --method grpo`: reinforcement fine-tuning from the command line. The
//! answers are sampled by the engine (the job's adapter, as in the server), so the run goes
//! through an `LlmEngine` with no client requests rather than through `Finetuner`. One line of
//! output per optimizer step (mean reward, spread, KL, tokens sampled) and per evaluation; an
//! HF PEFT adapter at the end.

use crate::cli::FinetuneArgs;
use crate::finetune::train_config;
use crate::generate::{engine, load};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::time::Instant;
use tandem_model::finetune::{load_prompt_jsonl, Prompts, TrainData, TrainableLora, TrainingRun};
use tandem_model::graders::Grader;
use tandem_model::lora::{LoraAdapter, RegistryConfig};
use tandem_scheduler::JobState;

/// KV blocks of the run's engine (16 tokens each).
const NUM_BLOCKS: usize = 2048;

/// The grader in `path`: a grader object, or `{"grader": {...}}` as the grader routes take.
fn read_grader(path: &std::path::Path) -> Result<Grader> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--grader: cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--grader {}: not valid JSON", path.display()))?;
    let g = v.get("grader").unwrap_or(&v);
    Grader::parse(g, "").map_err(|(f, m)| anyhow::anyhow!("--grader {}: `{f}` {m}", path.display()))
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let Some(grader_path) = &args.grader else {
        bail!("--method grpo needs --grader FILE.json (the grader that scores the answers)");
    };
    if args.dump_tokens.is_some() {
        bail!("--dump-tokens is for supervised and dpo data");
    }
    let grader = read_grader(grader_path)?;
    let m = load(&args.model)?;
    let max = args.train.max_seq_len;
    let prompts = |p: &std::path::Path| -> Result<TrainData> {
        let items = load_prompt_jsonl(p, &m.tokenizer, max)
            .with_context(|| format!("cannot read prompts {}", p.display()))?;
        Ok(TrainData::Prompts(Prompts {
            items,
            grader: grader.clone(),
        }))
    };
    let data = prompts(&args.data)?;
    let validation = args.validation.as_deref().map(prompts).transpose()?;
    let examples = data.len();
    let mut cfg = train_config(&args.train, examples)?;
    let dev = m.model.device().clone();
    let init = match &args.init_adapter {
        Some(dir) => Some(
            LoraAdapter::load(dir, &m.model.cfg, &dev, candle_core::DType::F32)
                .with_context(|| format!("--init-adapter {}", dir.display()))?,
        ),
        None => None,
    };
    let mut run = match &args.resume {
        Some(dir) => {
            TrainingRun::resume(dir, data, &m.model.cfg, &dev)
                .with_context(|| format!("cannot resume from {}", dir.display()))?
                .0
        }
        None => {
            let lora = match &init {
                Some(a) => {
                    let l = TrainableLora::from_adapter(a, m.model.cfg.num_hidden_layers, &dev)?;
                    cfg.adopt(&l.spec);
                    l
                }
                None => TrainableLora::new(&m.model.cfg, cfg.spec()?, &dev, cfg.seed)?,
            };
            TrainingRun::new(data, cfg, lora)?
        }
    };
    if let Some(v) = validation {
        run.set_validation(v)?;
    }
    let cfg = run.cfg.clone();
    let name = m.name.clone();
    let mut e = engine(
        m,
        NUM_BLOCKS,
        64,
        2048,
        RegistryConfig {
            max_loras: 4,
            max_lora_rank: cfg.r.max(8),
        },
    )?;
    let reference = match init {
        Some(a) => Some(e.runner.adapters.register_live("init", a).map(|_| "init")?),
        None => None,
    };
    let kl =
        matches!(cfg.method, tandem_model::finetune::Method::Reinforcement(r) if r.beta != 0.0);
    e.start_job_with_reference("grpo", run, reference.filter(|_| kl))
        .map_err(|m| anyhow::anyhow!("cannot start the run: {m}"))?;
    if args.checkpoint_every > 0 {
        e.set_job_checkpoints("grpo", args.out.clone(), args.checkpoint_every)
            .map_err(anyhow::Error::msg)?;
    }
    let (steps, group) = (
        e.jobs[0].run.total_steps(),
        match cfg.method {
            tandem_model::finetune::Method::Reinforcement(r) => r.group,
            _ => 0,
        },
    );
    eprintln!(
        "finetune (grpo): {name} on {examples} prompts, {group} answers each, LoRA r={} alpha={} on {}, {} epochs, {steps} steps of {} prompts, lr {}",
        cfg.r,
        cfg.alpha,
        cfg.targets.join(","),
        cfg.epochs,
        cfg.batch_size,
        cfg.lr,
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    let (mut reported, mut evals) = (0, 0);
    loop {
        if !e.has_work() && !e.jobs[0].state.is_final() {
            bail!("the run stalled (no work left before its last step): a bug, please report it");
        }
        e.step()?;
        let j = &e.jobs[0];
        for r in &j.reports[reported..] {
            let g = r.grpo.unwrap_or_default();
            writeln!(
                out,
                "step {}/{} reward {:.4} reward_std {:.4} kl {:.6} loss {:.6} answers {} trained {} tokens_sampled {} lr {:.3e} grad_norm {:.6}",
                r.step, r.total_steps, g.mean_reward(), g.reward_std(), g.mean_kl(), r.loss,
                g.samples, g.trained, g.tokens_sampled, r.lr, r.grad_norm
            )?;
        }
        reported = j.reports.len();
        for ev in &j.run.evals[evals..] {
            let g = ev.grpo.unwrap_or_default();
            writeln!(
                out,
                "eval after step {} reward {:.4} reward_std {:.4} answers {}",
                ev.step,
                g.mean_reward(),
                g.reward_std(),
                g.samples
            )?;
        }
        evals = j.run.evals.len();
        out.flush()?;
        match &j.state {
            JobState::Succeeded => break,
            JobState::Failed(msg) => bail!("the run failed: {msg}"),
            _ => {}
        }
    }
    let j = &e.jobs[0];
    j.run.lora.to_adapter(Some(name))?.save(&args.out)?;
    eprintln!(
        "adapter written to {} ({} answers, {} tokens sampled, {} trained in {:.1} s)",
        args.out.display(),
        j.answers_sampled,
        j.sampled_tokens,
        j.trained_tokens,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
