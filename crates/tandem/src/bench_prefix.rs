//! `tandem bench prefix`: automatic prefix caching on the engine, in process, with caching on and
//! off in one run on the same model:
//! 1. requests that share a long system prompt, one after another: time to first token of the
//!    first request and of the later ones;
//! 2. a multi-turn chat workload: conversations run side by side, each turn resending the whole
//!    history plus a new user message: wall time, requests/s and prompt tokens/s;
//!
//! with the prefix-cache hit rate (hit tokens over queried prompt tokens) of each.

use crate::cli::BenchPrefixArgs;
use crate::generate::{engine, load};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::time::Instant;
use tandem_model::lora::RegistryConfig;
use tandem_model::{LoadedModel, SamplingParams};
use tandem_scheduler::LlmEngine;

/// `len` tokens of natural text (a paragraph repeated), tokenized by the model's tokenizer, with
/// `tag` making it unique.
fn text_tokens(m: &LoadedModel, tag: &str, len: usize) -> Result<Vec<u32>> {
    const PARAGRAPH: &str = "The library opens at nine in the morning and closes at six in the \
        evening. Visitors may borrow up to five books at a time for three weeks. Quiet rooms on \
        the second floor can be booked at the front desk. ";
    let mut out = m.tokenizer.encode(&format!("{tag}: "), false)?;
    let para = m.tokenizer.encode(PARAGRAPH, false)?;
    while out.len() < len {
        out.extend_from_slice(&para);
    }
    out.truncate(len);
    Ok(out)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn engine_for(m: &LoadedModel, caching: bool, max_batched_tokens: usize) -> Result<LlmEngine> {
    let mut e = engine(
        m.clone(),
        4096,
        16,
        max_batched_tokens,
        RegistryConfig::default(),
    )?;
    e.scheduler.cfg.enable_prefix_caching = caching;
    Ok(e)
}

fn hit_rate(e: &LlmEngine) -> f64 {
    e.scheduler.prefix_cache_hits as f64 / e.scheduler.prefix_cache_queries.max(1) as f64
}

/// Runs one request to its end; returns its time to first token (s).
fn one(e: &mut LlmEngine, prompt: Vec<u32>, output: usize) -> Result<f64> {
    let t0 = Instant::now();
    let id = e
        .add_request(prompt, greedy(output), None)
        .map_err(|err| anyhow::anyhow!("{err}"))?;
    let mut ttft = None;
    while e.has_work() {
        for o in e.step()? {
            if o.seq_id == id && o.token.is_some() {
                ttft.get_or_insert(t0.elapsed().as_secs_f64());
            }
        }
    }
    ttft.context("the request produced no token")
}

/// The shared-system-prompt run: (first TTFT, mean TTFT of the later requests, hit rate).
fn shared_system(
    m: &LoadedModel,
    caching: bool,
    args: &BenchPrefixArgs,
) -> Result<(f64, f64, f64)> {
    let mut e = engine_for(m, caching, args.max_batched_tokens)?;
    let system = text_tokens(m, "System", args.system_tokens)?;
    let mut ttfts = Vec::new();
    for k in 0..args.requests {
        let q = text_tokens(m, &format!("Question {k}"), args.question_tokens)?;
        ttfts.push(one(
            &mut e,
            [&system[..], &q[..]].concat(),
            args.output_tokens,
        )?);
    }
    let later = ttfts[1..].iter().sum::<f64>() / (ttfts.len() - 1).max(1) as f64;
    Ok((ttfts[0], later, hit_rate(&e)))
}

/// The multi-turn run: (seconds, requests, prompt tokens, hit rate).
fn multi_turn(
    m: &LoadedModel,
    caching: bool,
    args: &BenchPrefixArgs,
) -> Result<(f64, usize, usize, f64)> {
    let mut e = engine_for(m, caching, args.max_batched_tokens)?;
    let mut history: Vec<Vec<u32>> = (0..args.conversations)
        .map(|c| text_tokens(m, &format!("Conversation {c} system"), args.turn_tokens))
        .collect::<Result<_>>()?;
    let mut turn = vec![0usize; args.conversations];
    let mut live: HashMap<u64, (usize, Vec<u32>)> = HashMap::new();
    let (mut requests, mut prompt_tokens) = (0, 0);
    let t0 = Instant::now();
    let mut submit = |e: &mut LlmEngine,
                      live: &mut HashMap<u64, (usize, Vec<u32>)>,
                      history: &mut Vec<Vec<u32>>,
                      c: usize,
                      t: usize|
     -> Result<()> {
        let user = text_tokens(m, &format!("User turn {t} of {c}"), args.turn_tokens)?;
        history[c].extend_from_slice(&user);
        prompt_tokens += history[c].len();
        requests += 1;
        let id = e
            .add_request(history[c].clone(), greedy(args.output_tokens), None)
            .map_err(|err| anyhow::anyhow!("{err}"))?;
        live.insert(id, (c, Vec::new()));
        Ok(())
    };
    for c in 0..args.conversations {
        submit(&mut e, &mut live, &mut history, c, 0)?;
    }
    while e.has_work() {
        for o in e.step()? {
            let Some(entry) = live.get_mut(&o.seq_id) else {
                continue;
            };
            entry.1.extend(o.token);
            if o.finished.is_none() {
                continue;
            }
            let (c, out) = live.remove(&o.seq_id).context("live")?;
            history[c].extend_from_slice(&out);
            turn[c] += 1;
            if turn[c] < args.turns {
                submit(&mut e, &mut live, &mut history, c, turn[c])?;
            }
        }
    }
    Ok((
        t0.elapsed().as_secs_f64(),
        requests,
        prompt_tokens,
        hit_rate(&e),
    ))
}

pub fn run(args: BenchPrefixArgs) -> Result<()> {
    let m = load(&args.model)?;
    println!(
        "# tandem bench prefix: {} on {:?}, threads {}; caching on vs off in one run",
        m.name,
        m.model.device(),
        rayon::current_num_threads()
    );
    println!(
        "## shared system prompt: {} tokens, then {} requests one after another ({} question tokens, {} output tokens)",
        args.system_tokens, args.requests, args.question_tokens, args.output_tokens
    );
    println!("caching  first_ttft_ms  later_ttft_ms  hit_rate");
    let mut later = [0.0; 2];
    for (i, caching) in [false, true].into_iter().enumerate() {
        let (first, l, hits) = shared_system(&m, caching, &args)?;
        later[i] = l;
        println!(
            "{:7}  {:13.1}  {:13.1}  {:8.3}",
            if caching { "on" } else { "off" },
            first * 1e3,
            l * 1e3,
            hits
        );
    }
    println!(
        "later requests' TTFT, off / on: {:.1}x",
        later[0] / later[1].max(1e-9)
    );
    println!(
        "## multi-turn chat: {} conversations x {} turns, {} tokens per user message, {} output tokens",
        args.conversations, args.turns, args.turn_tokens, args.output_tokens
    );
    println!("caching  secs    requests/s  prompt_tok/s  hit_rate");
    let mut rps = [0.0; 2];
    for (i, caching) in [false, true].into_iter().enumerate() {
        let (secs, n, prompt, hits) = multi_turn(&m, caching, &args)?;
        rps[i] = n as f64 / secs;
        println!(
            "{:7}  {:6.2}  {:10.2}  {:12.0}  {:8.3}",
            if caching { "on" } else { "off" },
            secs,
            rps[i],
            prompt as f64 / secs,
            hits
        );
    }
    println!(
        "multi-turn throughput, on / off: {:.1}x",
        rps[1] / rps[0].max(1e-9)
    );
    Ok(())
}
