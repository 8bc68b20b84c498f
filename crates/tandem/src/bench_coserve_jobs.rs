//! The jobs `tandem bench coserve` trains: synthetic supervised sequences, DPO pairs sharing
//! their first half, or reinforcement prompts graded by fuzzy match against a fixed text.

use crate::cli::BenchCoserveArgs;
use anyhow::Result;
use tandem_model::finetune::{
    Example, Method, PromptItem, Prompts, Reinforce, TrainConfig, TrainData, TrainableLora,
    TrainingRun,
};
use tandem_model::graders::Grader;
use tandem_scheduler::LlmEngine;

pub(crate) fn prompt(k: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((k * 7919 + j * 104_729) % (vocab - 200) + 100) as u32)
        .collect()
}

fn job_data(vocab: usize, len: usize) -> Vec<Example> {
    (0..64)
        .map(|k| Example {
            tokens: prompt(10_000 + k, len, vocab),
            target: (0..len).map(|i| i > 0).collect(),
        })
        .collect()
}

/// DPO pairs of `len`-token sequences: a shared first half (the prompt), different second
/// halves (the answers, the targets).
fn job_pairs(vocab: usize, len: usize) -> Vec<tandem_model::finetune::Pair> {
    let half = len / 2;
    let side = |k: usize| {
        let mut tokens = prompt(10_000 + k, len, vocab);
        tokens[..half].copy_from_slice(&prompt(20_000 + k / 2, half, vocab));
        Example {
            tokens,
            target: (0..len).map(|i| i >= half.max(1)).collect(),
        }
    };
    (0..32)
        .map(|k| tandem_model::finetune::Pair {
            chosen: side(2 * k),
            rejected: side(2 * k + 1),
        })
        .collect()
}

/// Prompts of `len` tokens and a fuzzy-match grader against a fixed text (rewards vary
/// between any two answers, so every step trains).
fn job_prompts(vocab: usize, len: usize) -> Result<TrainData> {
    let grader = Grader::parse(
        &serde_json::json!({"type": "text_similarity", "name": "bench",
            "input": "{{sample.output_text}}", "reference": "the quick brown fox",
            "evaluation_metric": "fuzzy_match"}),
        "",
    )
    .map_err(|(f, m)| anyhow::anyhow!("{f}: {m}"))?;
    let items = (0..32)
        .map(|k| PromptItem {
            prompt: prompt(30_000 + k, len.max(1), vocab),
            item: serde_json::json!({}),
        })
        .collect();
    Ok(TrainData::Prompts(Prompts { items, grader }))
}

/// The bench's job: a LoRA r16 on q/v at lr 1e-4 for `args.method`, 100 epochs (it runs until
/// the bench stops it).
pub(crate) fn new_job(e: &LlmEngine, args: &BenchCoserveArgs) -> Result<TrainingRun> {
    let vocab = e.runner.model.cfg.vocab_size;
    // A DPO job's steps hold as many sequences as a supervised one's (two per pair).
    let dpo = args.method == "dpo";
    let grpo = args.method == "grpo";
    let method = match args.method.as_str() {
        "dpo" => Method::Dpo { beta: 0.1 },
        "grpo" => Method::Reinforcement(Reinforce {
            max_tokens: (args.train_len / 2).max(1),
            ..Default::default()
        }),
        _ => Method::Supervised,
    };
    let cfg = TrainConfig {
        r: 16,
        alpha: 32.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        batch_size: if dpo || grpo { 2 } else { 4 },
        epochs: 100,
        chunk_tokens: args.chunk_tokens,
        lr: 1e-4,
        method,
        ..Default::default()
    };
    let lora = TrainableLora::new(&e.runner.model.cfg, cfg.spec()?, e.runner.model.device(), 0)?;
    let data: TrainData = match args.method.as_str() {
        "dpo" => job_pairs(vocab, args.train_len).into(),
        "grpo" => job_prompts(vocab, args.train_len / 2)?,
        _ => job_data(vocab, args.train_len).into(),
    };
    Ok(TrainingRun::new(data, cfg, lora)?)
}
