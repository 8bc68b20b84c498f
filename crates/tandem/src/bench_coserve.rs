//! `tandem bench coserve`: inference under Poisson arrivals at light, medium and heavy rates
//! (fractions of a measured capacity) while one finetuning job trains, for each co-serving mode,
//! in-process on the engine. Reports TTFT and TPOT p50/p99, TPOT SLO attainment, and finetuning
//! throughput (tokens of sequences whose backward completed, per second) beside the job alone.

use crate::bench_coserve_jobs::{new_job, prompt};
use crate::cli::BenchCoserveArgs;
use crate::generate::{engine, load};
use anyhow::Result;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tandem_model::finetune::TrainingRun;
use tandem_model::lora::RegistryConfig;
use tandem_model::SamplingParams;
use tandem_scheduler::{CoserveConfig, CoserveMode, LlmEngine};

struct Outcome {
    ttft: Vec<f64>,
    tpot: Vec<f64>,
    /// Every gap between consecutive tokens of a request (ms).
    gaps: Vec<f64>,
    finished: usize,
    submitted: usize,
    trained_tokens: u64,
    secs: f64,
    iterations: Vec<Iteration>,
    /// A reinforcement job's answers graded, answer tokens sampled, and seconds with answers
    /// in flight.
    answers: u64,
    sampled_tokens: u64,
    sampling_secs: f64,
}

/// What the bench keeps of each iteration's report.
#[derive(Clone, Copy)]
struct Iteration {
    /// Seconds.
    predicted: f64,
    measured: f64,
    budget: f64,
    inference_tokens: u64,
    finetune_forward_tokens: u64,
    finetune_backward_steps: u64,
}

/// Where the time of a run went (TANDEM_BENCH_VERBOSE): busy vs idle, iterations with and
/// without finetuning work, and how much of the latency budget iterations with both used.
fn breakdown(o: &Outcome) -> String {
    let sum = |f: &dyn Fn(&Iteration) -> bool| -> (usize, f64) {
        let v: Vec<_> = o.iterations.iter().filter(|i| f(i)).collect();
        (v.len(), v.iter().map(|i| i.measured).sum())
    };
    let training = |i: &Iteration| i.finetune_forward_tokens > 0 || i.finetune_backward_steps > 0;
    let (n_inf, t_inf) = sum(&|i| i.inference_tokens > 0 && !training(i));
    let (n_mix, t_mix) = sum(&|i| i.inference_tokens > 0 && training(i));
    let (n_ft, t_ft) = sum(&|i| i.inference_tokens == 0 && training(i));
    let mixed: Vec<_> = o
        .iterations
        .iter()
        .filter(|i| i.inference_tokens > 0 && training(i))
        .collect();
    let used = mixed.iter().map(|i| i.measured).sum::<f64>()
        / mixed.iter().map(|i| i.budget).sum::<f64>().max(1e-9);
    let over = mixed.iter().filter(|i| i.measured > i.budget).count();
    let fwd: u64 = mixed.iter().map(|i| i.finetune_forward_tokens).sum();
    let chunks = mixed
        .iter()
        .filter(|i| i.finetune_forward_tokens > 0)
        .count();
    format!(
        "wall {:.1} s, idle {:.1} s; inference only: {n_inf} iterations {t_inf:.1} s; inference + finetuning: {n_mix} iterations {t_mix:.1} s, {:.0}% of their budgets used, {over} over budget, {chunks} forward chunks of {:.0} tokens on average, {} backward steps; finetuning only: {n_ft} iterations {t_ft:.1} s",
        o.secs,
        o.secs - t_inf - t_mix - t_ft,
        100.0 * used,
        fwd as f64 / chunks.max(1) as f64,
        mixed.iter().map(|i| i.finetune_backward_steps).sum::<u64>(),
    )
}

/// A reinforcement job's sampling figures.
fn rollouts(o: &Outcome) -> String {
    format!(
        "{:.2} answers/s, {:.1} sampled tok/s, {:.1} trained tok/s, answers in flight {:.0}% of the wall time",
        o.answers as f64 / o.secs,
        o.sampled_tokens as f64 / o.secs,
        o.trained_tokens as f64 / o.secs,
        100.0 * o.sampling_secs / o.secs
    )
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// One timed run: Poisson arrivals at `rate` req/s (none if 0) for `secs`, with a finetuning
/// job if `job` is given.
fn run_once(
    e: &mut LlmEngine,
    args: &BenchCoserveArgs,
    rate: f64,
    job: Option<TrainingRun>,
    seed: u64,
) -> Result<Outcome> {
    let vocab = e.runner.model.cfg.vocab_size;
    let has_job = job.is_some();
    if let Some(run) = job {
        e.start_job("bench", run).map_err(anyhow::Error::msg)?;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let horizon = Duration::from_secs_f64(args.secs);
    let mut arrivals = Vec::new();
    if rate > 0.0 {
        let mut t = 0.0;
        loop {
            t += -(1.0 - rng.random::<f64>()).ln() / rate;
            if t >= args.secs {
                break;
            }
            arrivals.push(Duration::from_secs_f64(t));
        }
    }
    let params = SamplingParams {
        max_tokens: args.output_len,
        ignore_eos: true,
        ..Default::default()
    };
    let start = Instant::now();
    let mut next = 0;
    // id -> (arrival, token times)
    let mut live: HashMap<u64, (Duration, Vec<Duration>)> = HashMap::new();
    let mut out = Outcome {
        ttft: vec![],
        tpot: vec![],
        gaps: vec![],
        finished: 0,
        submitted: 0,
        trained_tokens: 0,
        secs: 0.0,
        iterations: Vec::new(),
        answers: 0,
        sampled_tokens: 0,
        sampling_secs: 0.0,
    };
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    e.on_iteration = Some(Box::new(move |r| {
        if let Ok(mut v) = sink.lock() {
            v.push(Iteration {
                predicted: r.predicted.as_secs_f64(),
                measured: r.measured.as_secs_f64(),
                budget: r.budget.as_secs_f64(),
                inference_tokens: r.decode_tokens + r.prefill_tokens,
                finetune_forward_tokens: r.finetune_forward_tokens,
                finetune_backward_steps: r.finetune_backward_steps,
            });
        }
    }));
    while start.elapsed() < horizon {
        let now = start.elapsed();
        while next < arrivals.len() && arrivals[next] <= now {
            let id = e
                .add_request(prompt(next, args.prompt_len, vocab), params.clone(), None)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            live.insert(id, (arrivals[next], vec![]));
            next += 1;
            out.submitted += 1;
        }
        if !e.has_work() {
            let wait = arrivals.get(next).map_or(horizon, |a| *a).min(horizon);
            std::thread::sleep(wait.saturating_sub(start.elapsed()));
            continue;
        }
        for o in e.step()? {
            let t = start.elapsed();
            if let Some((_, times)) = live.get_mut(&o.seq_id) {
                times.push(t);
            }
            if o.finished.is_some() {
                if let Some((arr, times)) = live.remove(&o.seq_id) {
                    out.finished += 1;
                    out.ttft.push((times[0] - arr).as_secs_f64() * 1e3);
                    if times.len() > 1 {
                        let span = (times[times.len() - 1] - times[0]).as_secs_f64() * 1e3;
                        out.tpot.push(span / (times.len() - 1) as f64);
                        out.gaps
                            .extend(times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3));
                    }
                }
            }
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    e.on_iteration = None;
    out.iterations = seen.lock().map(|v| v.clone()).unwrap_or_default();
    for id in live.keys() {
        e.abort(*id);
    }
    if has_job {
        let j = e.jobs.last().expect("started above");
        out.trained_tokens = j.trained_tokens;
        out.answers = j.answers_sampled;
        out.sampled_tokens = j.sampled_tokens;
        out.sampling_secs = j.sampling_seconds
            + j.rollouts
                .as_ref()
                .map_or(0.0, |b| b.started.elapsed().as_secs_f64());
        e.cancel_job("bench").ok();
        e.jobs.clear();
        e.runner.adapters.unregister("bench").ok();
    }
    Ok(out)
}

pub fn run(args: BenchCoserveArgs) -> Result<()> {
    let m = load(&args.model)?;
    let name = m.name.clone();
    let vocab = m.model.cfg.vocab_size;
    let blocks = 4096;
    let mut e = engine(
        m,
        blocks,
        args.max_num_seqs,
        args.max_batched_tokens,
        RegistryConfig::default(),
    )?;
    let slo = Duration::from_secs_f64(args.tpot_slo_ms / 1e3);
    let new_job = |e: &LlmEngine| new_job(e, &args);
    // Capacity: how many requests per second inference alone sustains with a full batch.
    e.coserve = CoserveConfig {
        mode: CoserveMode::InferenceOnly,
        tpot_slo: slo,
        ttft_slo: Duration::from_secs_f64(args.ttft_slo_ms / 1e3),
        temporal_every: 8,
    };
    let n = args.max_num_seqs;
    let params = SamplingParams {
        max_tokens: args.output_len,
        ignore_eos: true,
        ..Default::default()
    };
    let t0 = Instant::now();
    for k in 0..n {
        e.add_request(
            prompt(50_000 + k, args.prompt_len, vocab),
            params.clone(),
            None,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    while e.has_work() {
        e.step()?;
    }
    let capacity = n as f64 / t0.elapsed().as_secs_f64();
    println!(
        "# tandem bench coserve: {name}, prompt {} + output {} tokens per request, Poisson arrivals, {} s per run, TPOT SLO {} ms, TTFT SLO {} ms, job: {} LoRA r16 q/v, sequences of {} tokens in chunks of {}, threads {}",
        args.prompt_len,
        args.output_len,
        args.secs,
        args.tpot_slo_ms,
        args.ttft_slo_ms,
        args.method,
        args.train_len,
        args.chunk_tokens,
        candle_core::utils::get_num_threads()
    );
    println!("# capacity (a full batch of {n} requests, inference only): {capacity:.2} req/s");
    // The job alone.
    e.coserve.mode = CoserveMode::FinetuneOnly;
    let job = new_job(&e)?;
    let alone = run_once(&mut e, &args, 0.0, Some(job), 0)?;
    let alone_tps = alone.trained_tokens as f64 / alone.secs;
    println!("# finetune-only throughput: {alone_tps:.1} trained tokens/s");
    let grpo = args.method == "grpo";
    if grpo {
        println!("# finetune-only {}", rollouts(&alone));
    }
    println!("\n| load | rate req/s | mode | requests done | TTFT p50 / p99 ms | TPOT p50 / p99 ms | token gap p99 ms | TPOT SLO attainment | TTFT SLO attainment | finetune tok/s | share of finetune-only | iteration time: predicted / measured, median abs error |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, frac) in args.loads.iter().map(|l| l.rate()) {
        let rate = capacity * frac;
        let modes = [(CoserveMode::InferenceOnly, 0), (CoserveMode::Coserve, 0)]
            .into_iter()
            .chain(
                args.temporal_every
                    .iter()
                    .map(|&n| (CoserveMode::Temporal, n)),
            );
        for (mode, every) in modes {
            e.coserve.mode = mode;
            e.coserve.temporal_every = every;
            let name = match mode {
                CoserveMode::Temporal => format!("Temporal (every {every})"),
                m => format!("{m:?}"),
            };
            let job = (mode != CoserveMode::InferenceOnly)
                .then(|| new_job(&e))
                .transpose()?;
            let o = run_once(&mut e, &args, rate, job, 1)?;
            let attain = o.tpot.iter().filter(|&&t| t <= args.tpot_slo_ms).count() as f64
                / o.tpot.len().max(1) as f64;
            let ttft_attain = o.ttft.iter().filter(|&&t| t <= args.ttft_slo_ms).count() as f64
                / o.ttft.len().max(1) as f64;
            let tps = o.trained_tokens as f64 / o.secs;
            // Skip the first iterations (the fit starts from nothing).
            let fit: Vec<_> = o.iterations.iter().skip(20).collect();
            let ratio = fit.iter().map(|p| p.predicted).sum::<f64>()
                / fit.iter().map(|p| p.measured).sum::<f64>();
            let err: Vec<f64> = fit
                .iter()
                .map(|p| (p.predicted - p.measured).abs() * 1e3)
                .collect();
            println!(
                "| {label} | {rate:.2} | {name} | {}/{} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} | {:.1}% | {:.1}% | {tps:.1} | {:.0}% | {ratio:.2}, {:.1} ms |",
                o.finished,
                o.submitted,
                pct(&o.ttft, 0.5),
                pct(&o.ttft, 0.99),
                pct(&o.tpot, 0.5),
                pct(&o.tpot, 0.99),
                pct(&o.gaps, 0.99),
                attain * 100.0,
                ttft_attain * 100.0,
                100.0 * tps / alone_tps.max(1e-9),
                pct(&err, 0.5),
            );
            if grpo && mode != CoserveMode::InferenceOnly {
                println!("|  |  | {name}: {} |", rollouts(&o));
            }
            if std::env::var_os("TANDEM_BENCH_VERBOSE").is_some() {
                eprintln!("{label} {name}: {}", breakdown(&o));
                let c = &e.cost;
                let (f, k, b) = (
                    c.forward.coefficients(),
                    c.chunk.coefficients(),
                    c.backward.coefficients(),
                );
                eprintln!("{label} {name}: inference forward ms = {:.2} + {:.3}/token + {:.3}/logit row + {:.5}/(token x context); a training chunk adds {:.2} + {:.3}/token; backward step ms = {:.2} + {:.3}/token + {:.5}/(token x context)",
                    f[0] * 1e3, f[1] * 10.0, f[2] * 10.0, f[3] * 0.1, k[0] * 1e3, k[1] * 10.0, b[0] * 1e3, b[1] * 10.0, b[2] * 0.1);
            }
        }
    }
    Ok(())
}
