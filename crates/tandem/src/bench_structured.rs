//! `tandem bench structured`: the cost of constrained decoding on the engine, in process: decode
//! throughput of a batch with every sequence under a JSON schema vs the same batch unconstrained,
//! in one run on the same model; the time spent computing grammar masks per iteration and per
//! token (p50, p99); grammar compile time.

use crate::cli::BenchStructuredArgs;
use crate::generate::{engine, load};
use anyhow::Result;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_model::grammar::{Constraint, GrammarCompiler};
use tandem_model::lora::RegistryConfig;
use tandem_model::{LoadedModel, SamplingParams};

/// A schema no answer finishes within the bench's tokens (at least 100 strings), so every
/// sequence decodes all of them under the grammar.
fn schema() -> serde_json::Value {
    json!({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 100}
    }, "required": ["title", "notes"]})
}

struct Run {
    decode_tokens: usize,
    decode_secs: f64,
    /// Mask wall time of each iteration that computed masks, and the rows it sampled.
    masks: Vec<(Duration, usize)>,
}

fn run_batch(
    m: &LoadedModel,
    args: &BenchStructuredArgs,
    grammar: Option<&tandem_model::grammar::Grammar>,
) -> Result<Run> {
    let mut e = engine(m.clone(), 4096, args.batch, 4096, RegistryConfig::default())?;
    let masks = Arc::new(Mutex::new(Vec::new()));
    let sink = masks.clone();
    e.on_iteration = Some(Box::new(move |r| {
        if !r.mask_time.is_zero() {
            if let Ok(mut v) = sink.lock() {
                v.push((r.mask_time, r.decode_tokens as usize));
            }
        }
    }));
    for i in 0..args.batch {
        let prompt = m.tokenizer.encode(
            &format!("Write notes about topic number {i} as JSON."),
            false,
        )?;
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(i as u64),
            max_tokens: args.output_tokens,
            ignore_eos: grammar.is_none(),
            grammar: grammar.cloned(),
            ..Default::default()
        };
        e.add_request(prompt, p, None)
            .map_err(|err| anyhow::anyhow!("{err}"))?;
    }
    let (mut decode_tokens, mut decode_secs) = (0, 0.0);
    while e.has_work() {
        let prefill_before = e.counters.prefill_tokens;
        let t = Instant::now();
        let out = e.step()?;
        let dt = t.elapsed().as_secs_f64();
        // Decode-only iterations: every sequence past its prompt.
        if e.counters.prefill_tokens == prefill_before {
            decode_secs += dt;
            decode_tokens += out.iter().filter(|o| o.token.is_some()).count();
        }
    }
    let masks = std::mem::take(&mut *masks.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(Run {
        decode_tokens,
        decode_secs,
        masks,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(args: BenchStructuredArgs) -> Result<()> {
    let m = load(&args.model)?;
    println!(
        "# tandem bench structured: {} on {:?}, threads {}; batch {}, {} output tokens each, temperature 1",
        m.name,
        m.model.device(),
        rayon::current_num_threads(),
        args.batch,
        args.output_tokens
    );
    let compiler = GrammarCompiler::new(m.tokenizer.clone(), m.model.cfg.vocab_size);
    let c = Constraint::JsonSchema {
        schema: schema(),
        strict: true,
    };
    let t = Instant::now();
    let grammar = compiler.compile(&c).map_err(|e| anyhow::anyhow!(e))?;
    let first = t.elapsed();
    let t = Instant::now();
    compiler.compile(&c).map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "grammar: first compile (token trie included) {:.1} ms, again (cached) {:.3} ms",
        first.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    println!("run            decode_tok  decode_s  tok/s");
    let mut rates = [0.0; 2];
    let mut constrained_masks = Vec::new();
    for round in 0..args.rounds {
        for (k, g) in [None, Some(&grammar)].into_iter().enumerate() {
            let r = run_batch(&m, &args, g)?;
            let rate = r.decode_tokens as f64 / r.decode_secs.max(1e-9);
            if round + 1 == args.rounds || args.rounds == 1 {
                rates[k] += rate;
            }
            println!(
                "{:13}  {:10}  {:8.2}  {:6.1}",
                if g.is_some() {
                    "json_schema"
                } else {
                    "unconstrained"
                },
                r.decode_tokens,
                r.decode_secs,
                rate
            );
            if g.is_some() {
                constrained_masks.extend(r.masks);
            }
        }
    }
    println!(
        "decode throughput, constrained / unconstrained (last round): {:.3}",
        rates[1] / rates[0].max(1e-9)
    );
    let mut per_iter: Vec<f64> = constrained_masks
        .iter()
        .map(|(d, _)| d.as_secs_f64() * 1e3)
        .collect();
    let mut per_token: Vec<f64> = constrained_masks
        .iter()
        .filter(|(_, rows)| *rows > 0)
        .map(|(d, rows)| d.as_secs_f64() * 1e6 / *rows as f64)
        .collect();
    per_iter.sort_by(f64::total_cmp);
    per_token.sort_by(f64::total_cmp);
    println!(
        "mask time per iteration (wall, in parallel): p50 {:.3} ms, p99 {:.3} ms over {} iterations",
        percentile(&per_iter, 0.5),
        percentile(&per_iter, 0.99),
        per_iter.len()
    );
    println!(
        "mask time per token (iteration wall / rows): p50 {:.1} us, p99 {:.1} us",
        percentile(&per_token, 0.5),
        percentile(&per_token, 0.99)
    );
    Ok(())
}
