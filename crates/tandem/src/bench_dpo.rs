//! `tandem bench dpo`: DPO beside supervised training on the same data. Pairs of a shared
//! prompt and two answers (synthetic tokens, or a preference JSONL); supervised runs train on
//! the preferred sequences alone and on both sides (the same tokens DPO trains), DPO in two
//! epochs: the first runs the reference passes, the second reads them cached. Reported: pairs/s,
//! trained tokens/s, and the peak activation bytes per token of the unit in flight (a sequence,
//! or a pair's two sequences held together).

use crate::cli::BenchDpoArgs;
use crate::generate::load;
use anyhow::{Context, Result};
use std::time::Instant;
use tandem_model::finetune::{
    load_preference_jsonl, Example, Finetuner, Method, Pair, TrainConfig, TrainData,
};

fn synthetic(prompt: usize, answer: usize, vocab: usize, k: usize) -> Pair {
    let toks = |salt: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|j| ((k * 7919 + salt * 31 + j * 104_729) % (vocab - 200) + 100) as u32)
            .collect()
    };
    let side = |salt: usize| Example::with_prompt(&toks(0, prompt), &toks(salt, answer));
    Pair {
        chosen: side(1),
        rejected: side(2),
    }
}

struct Row {
    steps: usize,
    pairs: usize,
    tokens: usize,
    seconds: f64,
    bytes_per_token: f64,
}

/// Runs `epochs` epochs; one row per epoch.
fn train(
    ft: &mut Finetuner,
    epochs: usize,
    pairs_per_epoch: usize,
    unit_tokens: usize,
) -> Result<Vec<Row>> {
    let per_epoch = ft.total_steps() / epochs;
    let mut rows = Vec::new();
    for _ in 0..epochs {
        let t0 = Instant::now();
        let (mut tokens, mut peak) = (0, 0);
        for _ in 0..per_epoch {
            let r = ft.train_step()?;
            tokens += r.tokens;
            peak = peak.max(r.peak_activation_bytes);
        }
        rows.push(Row {
            steps: per_epoch,
            pairs: pairs_per_epoch,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
            bytes_per_token: peak as f64 / unit_tokens.max(1) as f64,
        });
    }
    Ok(rows)
}

pub fn run(args: BenchDpoArgs) -> Result<()> {
    let m = load(&args.model)?;
    let model = &m.model;
    let pairs: Vec<Pair> = match &args.data {
        Some(path) => load_preference_jsonl(path, &m.tokenizer, 2048)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => (0..args.pairs)
            .map(|k| synthetic(args.prompt_len, args.answer_len, model.cfg.vocab_size, k))
            .collect(),
    };
    let n = pairs.len();
    let cfg = TrainConfig {
        batch_size: args.batch_size.max(1),
        chunk_tokens: args.chunk_tokens,
        max_seq_len: usize::MAX,
        shuffle: false,
        ..Default::default()
    };
    let longest = |f: &dyn Fn(&Pair) -> usize| pairs.iter().map(f).max().unwrap_or(0);
    let seq_max = longest(&|p| p.chosen.tokens.len().max(p.rejected.tokens.len()));
    let pair_max = longest(&|p| p.chosen.tokens.len() + p.rejected.tokens.len());
    println!(
        "# tandem bench dpo: {} ({} layers), {n} pairs (longest sequence {seq_max} tokens), LoRA r{} on all seven projections, batches of {}, chunks of {} tokens, device {:?}, threads {}",
        m.name,
        model.cfg.num_hidden_layers,
        cfg.r,
        cfg.batch_size,
        cfg.chunk_tokens,
        args.model.device,
        candle_core::utils::get_num_threads()
    );
    let chosen: Vec<Example> = pairs.iter().map(|p| p.chosen.clone()).collect();
    let both: Vec<Example> = pairs
        .iter()
        .flat_map(|p| [p.chosen.clone(), p.rejected.clone()])
        .collect();
    let sup = |epochs: usize, batch: usize| TrainConfig {
        epochs,
        batch_size: batch,
        ..cfg.clone()
    };
    let mut rows = Vec::new();
    let mut ft = Finetuner::new(model, chosen, sup(1, cfg.batch_size), None)?;
    rows.push((
        "supervised, preferred sequences",
        train(&mut ft, 1, n, seq_max)?,
    ));
    let mut ft = Finetuner::new(model, both, sup(1, 2 * cfg.batch_size), None)?;
    rows.push(("supervised, both sides", train(&mut ft, 1, n, seq_max)?));
    let dpo = TrainConfig {
        epochs: 2,
        method: Method::Dpo { beta: args.beta },
        ..cfg.clone()
    };
    let mut ft = Finetuner::new(model, TrainData::Preference(pairs), dpo, None)?;
    let mut epochs = train(&mut ft, 2, n, pair_max)?.into_iter();
    let first = epochs.next().into_iter().collect();
    let second = epochs.collect();
    rows.push(("DPO, epoch 1 (with the reference passes)", first));
    rows.push(("DPO, epoch 2 (reference log-probs cached)", second));
    println!("\n| run | steps | tokens trained | pairs/s | tokens/s | peak activation bytes per token held |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let base = rows[1].1[0].tokens as f64 / rows[1].1[0].seconds;
    for (name, rs) in &rows {
        for r in rs {
            let tps = r.tokens as f64 / r.seconds;
            println!(
                "| {name} | {} | {} | {:.2} | {tps:.1} ({:.2}x both-sides SFT) | {:.0} |",
                r.steps,
                r.tokens,
                r.pairs as f64 / r.seconds,
                tps / base,
                r.bytes_per_token
            );
        }
    }
    Ok(())
}
