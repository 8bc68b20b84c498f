//! Prometheus metrics. Where vLLM has a metric of the same meaning, tandem uses its name with
//! `tandem:` in place of `vllm:` (same labels, units and buckets), so vLLM dashboards and
//! LoRA-aware routers work by renaming; co-serving adds its own (iteration token mix, finetuning
//! progress, SLO attainment, predicted vs measured iteration time). docs/metrics.md lists all.
//!
//! Request figures are recorded by the handlers (labelled by the model the request named: the
//! base model or an adapter); per-iteration figures by the engine's iteration observer; engine
//! gauges and totals are read from the engine at scrape time.

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tandem_scheduler::{EngineStats, FinishReason, IterationObserver, IterationReport};

pub struct Metrics {
    registry: Registry,
    base_model: String,
    ttft_slo: Duration,
    tpot_slo: Duration,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    preemptions: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    success: IntCounterVec,
    ttft: HistogramVec,
    tpot: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    slo: IntCounterVec,
    lora_info: GaugeVec,
    adapters_resident: IntGauge,
    adapters_registered: IntGauge,
    adapter_loads: IntCounter,
    adapter_evictions: IntCounter,
    iteration_tokens: IntCounterVec,
    iterations: IntCounter,
    mixed_iterations: IntCounter,
    iteration_time: HistogramVec,
    mask_time: prometheus::Histogram,
    /// Generation requests by constraint kind (json_schema, regex, tool_call, ...).
    structured: IntCounterVec,
    backward_steps: IntCounter,
    trained_tokens: IntCounter,
    kv_evictions: IntCounter,
    job_trained_tokens: IntCounterVec,
    job_loss: GaugeVec,
    job_sampled_tokens: IntCounterVec,
    job_reward: GaugeVec,
    job_progress: GaugeVec,
    jobs: IntGaugeVec,
    job_replica: IntGaugeVec,
    /// Engine totals as of the last scrape (counters advance by the difference).
    last: Mutex<Totals>,
}

#[derive(Default)]
struct Totals {
    preemptions: u64,
    prefix_queries: u64,
    prefix_hits: u64,
    loads: u64,
    evictions: u64,
    trained: u64,
    kv_evictions: u64,
    backward_steps: u64,
    mixed: u64,
    jobs: HashMap<String, u64>,
    sampled: HashMap<String, u64>,
}

/// vLLM's request latency buckets.
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];
const TPOT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
const ITERATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0,
];

impl Metrics {
    /// Metrics of a server for `model_name`, judging requests against the TTFT and TPOT SLOs.
    pub fn new(
        model_name: &str,
        ttft_slo: Duration,
        tpot_slo: Duration,
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let opts =
            |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model_name);
        // Request series carry the model the request named (base or adapter) as model_name.
        let per_model = |name: &str, help: &str| Opts::new(name, help);
        let hist = |name: &str, help: &str, b: &[f64]| {
            HistogramOpts::from(per_model(name, help)).buckets(b.to_vec())
        };
        let reg = &registry;
        fn add<T: prometheus::core::Collector + Clone + 'static>(
            reg: &Registry,
            c: prometheus::Result<T>,
        ) -> prometheus::Result<T> {
            let c = c?;
            reg.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let m = Self {
            running: add(reg, IntGauge::with_opts(opts(
                "tandem:num_requests_running",
                "Number of requests in model execution batches.",
            )))?,
            waiting: add(reg, IntGauge::with_opts(opts(
                "tandem:num_requests_waiting",
                "Number of requests waiting to be processed.",
            )))?,
            kv_usage: add(reg, Gauge::with_opts(opts(
                "tandem:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage (finetuning jobs' blocks included).",
            )))?,
            preemptions: add(reg, IntCounter::with_opts(opts(
                "tandem:num_preemptions_total",
                "Cumulative number of preemptions from the engine.",
            )))?,
            prefix_queries: add(reg, IntCounter::with_opts(opts(
                "tandem:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            )))?,
            prefix_hits: add(reg, IntCounter::with_opts(opts(
                "tandem:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            )))?,
            prompt_tokens: add(reg, IntCounterVec::new(
                per_model("tandem:prompt_tokens_total", "Number of prefill tokens processed."),
                &["model_name"],
            ))?,
            generation_tokens: add(reg, IntCounterVec::new(
                per_model(
                    "tandem:generation_tokens_total",
                    "Number of generation tokens processed.",
                ),
                &["model_name"],
            ))?,
            success: add(reg, IntCounterVec::new(
                per_model(
                    "tandem:request_success_total",
                    "Count of successfully processed requests.",
                ),
                &["model_name", "finished_reason"],
            ))?,
            ttft: add(reg, HistogramVec::new(
                hist(
                    "tandem:time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                    LATENCY_BUCKETS,
                ),
                &["model_name"],
            ))?,
            tpot: add(reg, HistogramVec::new(
                hist(
                    "tandem:time_per_output_token_seconds",
                    "Histogram of time per output token in seconds.",
                    TPOT_BUCKETS,
                ),
                &["model_name"],
            ))?,
            e2e: add(reg, HistogramVec::new(
                hist(
                    "tandem:e2e_request_latency_seconds",
                    "Histogram of end to end request latency in seconds.",
                    LATENCY_BUCKETS,
                ),
                &["model_name"],
            ))?,
            queue: add(reg, HistogramVec::new(
                hist(
                    "tandem:request_queue_time_seconds",
                    "Histogram of time spent in WAITING phase for request.",
                    LATENCY_BUCKETS,
                ),
                &["model_name"],
            ))?,
            slo: add(reg, IntCounterVec::new(
                per_model(
                    "tandem:request_slo_total",
                    "Finished requests judged against an SLO (slo: ttft or tpot; outcome: met or missed).",
                ),
                &["model_name", "slo", "outcome"],
            ))?,
            lora_info: add(reg, GaugeVec::new(
                opts(
                    "tandem:lora_requests_info",
                    "Running stats on LoRA requests (value: the time of the last update).",
                ),
                &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            ))?,
            adapters_resident: add(reg, IntGauge::with_opts(opts(
                "tandem:lora_adapters_resident",
                "LoRA adapters in device memory now (at most max_lora).",
            )))?,
            adapters_registered: add(reg, IntGauge::with_opts(opts(
                "tandem:lora_adapters_registered",
                "LoRA adapters servable by name (resident or on disk), checkpoints included.",
            )))?,
            adapter_loads: add(reg, IntCounter::with_opts(opts(
                "tandem:lora_adapter_loads_total",
                "LoRA adapters made resident (loaded into a device slot).",
            )))?,
            adapter_evictions: add(reg, IntCounter::with_opts(opts(
                "tandem:lora_adapter_evictions_total",
                "Idle LoRA adapters evicted from device memory to make room.",
            )))?,
            iteration_tokens: add(reg, IntCounterVec::new(
                opts(
                    "tandem:iteration_tokens_total",
                    "Tokens of engine iterations by kind: decode, prefill, finetune_forward, finetune_backward (tokens of the chunks backward steps ran on).",
                ),
                &["kind"],
            ))?,
            iterations: add(reg, IntCounter::with_opts(opts(
                "tandem:iterations_total",
                "Engine iterations (one packed forward each).",
            )))?,
            mixed_iterations: add(reg, IntCounter::with_opts(opts(
                "tandem:coserve_mixed_iterations_total",
                "Iterations that ran inference and finetuning work together.",
            )))?,
            iteration_time: add(reg, HistogramVec::new(
                HistogramOpts::from(opts(
                    "tandem:iteration_time_seconds",
                    "Engine iteration time in seconds: measured, and as the online cost model predicted it (source).",
                ))
                .buckets(ITERATION_BUCKETS.to_vec()),
                &["source"],
            ))?,
            mask_time: add(reg, prometheus::Histogram::with_opts(
                HistogramOpts::from(opts(
                    "tandem:structured_output_mask_seconds",
                    "Time per iteration spent computing grammar masks for constrained sequences (in parallel, beside the forward pass).",
                ))
                .buckets(vec![1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0]),
            ))?,
            structured: add(reg, IntCounterVec::new(
                opts(
                    "tandem:structured_output_requests_total",
                    "Generation requests with an output constraint, by kind (json_schema, json_object, regex, choice, grammar, tool_call).",
                ),
                &["kind"],
            ))?,
            backward_steps: add(reg, IntCounter::with_opts(opts(
                "tandem:finetune_backward_steps_total",
                "Token-level backward (layer, chunk) steps run.",
            )))?,
            trained_tokens: add(reg, IntCounter::with_opts(opts(
                "tandem:finetune_trained_tokens_total",
                "Tokens of training sequences whose backward completed, over all jobs.",
            )))?,
            kv_evictions: add(reg, IntCounter::with_opts(opts(
                "tandem:finetune_kv_evictions_total",
                "Times a finetuning job gave its KV blocks back to inference (its sequence restarts).",
            )))?,
            job_trained_tokens: add(reg, IntCounterVec::new(
                opts(
                    "tandem:finetune_job_trained_tokens_total",
                    "Tokens of training sequences whose backward completed, by job.",
                ),
                &["job"],
            ))?,
            job_loss: add(reg, GaugeVec::new(
                opts(
                    "tandem:finetune_loss",
                    "Training loss (mean over target tokens) of the job's last optimizer step.",
                ),
                &["job"],
            ))?,
            job_sampled_tokens: add(reg, IntCounterVec::new(
                opts(
                    "tandem:finetune_job_sampled_tokens_total",
                    "Answer tokens a reinforcement job sampled (its rollouts), by job.",
                ),
                &["job"],
            ))?,
            job_reward: add(reg, GaugeVec::new(
                opts(
                    "tandem:finetune_mean_reward",
                    "Mean grader reward of a reinforcement job's last optimizer step's answers.",
                ),
                &["job"],
            ))?,
            job_progress: add(reg, GaugeVec::new(
                opts(
                    "tandem:finetune_progress_ratio",
                    "Optimizer steps done over the job's total (1 = done).",
                ),
                &["job"],
            ))?,
            jobs: add(reg, IntGaugeVec::new(
                opts(
                    "tandem:finetune_jobs",
                    "Fine-tuning jobs in the engine, by status.",
                ),
                &["status"],
            ))?,
            job_replica: add(reg, IntGaugeVec::new(
                opts(
                    "tandem:finetune_job_replica",
                    "1 for each fine-tuning job this replica trains (replicas sharing a store).",
                ),
                &["job", "replica"],
            ))?,
            last: Mutex::new(Totals::default()),
            base_model: model_name.to_string(),
            ttft_slo,
            tpot_slo,
            registry,
        };
        let slo_target = add(
            &m.registry,
            GaugeVec::new(
                opts(
                    "tandem:slo_target_seconds",
                    "The server's latency targets (--ttft-slo-ms, --tpot-slo-ms).",
                ),
                &["slo"],
            ),
        )?;
        slo_target
            .with_label_values(&["ttft"])
            .set(ttft_slo.as_secs_f64());
        slo_target
            .with_label_values(&["tpot"])
            .set(tpot_slo.as_secs_f64());
        // Known label sets start at zero, so that ratios and rates have series from the start.
        for slo in ["ttft", "tpot"] {
            for outcome in ["met", "missed"] {
                m.slo.with_label_values(&[model_name, slo, outcome]);
            }
        }
        for reason in ["stop", "length", "abort"] {
            m.success.with_label_values(&[model_name, reason]);
        }
        for kind in ["decode", "prefill", "finetune_forward", "finetune_backward"] {
            m.iteration_tokens.with_label_values(&[kind]);
        }
        Ok(m)
    }

    /// What the engine calls after each iteration.
    pub fn iteration_observer(&self) -> IterationObserver {
        let tokens = self.iteration_tokens.clone();
        let iterations = self.iterations.clone();
        let time = self.iteration_time.clone();
        let mask_time = self.mask_time.clone();
        let queue = self.queue.clone();
        let base = self.base_model.clone();
        Box::new(move |r: &IterationReport| {
            iterations.inc();
            for (kind, n) in [
                ("decode", r.decode_tokens),
                ("prefill", r.prefill_tokens),
                ("finetune_forward", r.finetune_forward_tokens),
                ("finetune_backward", r.finetune_backward_tokens),
            ] {
                tokens.with_label_values(&[kind]).inc_by(n);
            }
            time.with_label_values(&["measured"])
                .observe(r.measured.as_secs_f64());
            time.with_label_values(&["predicted"])
                .observe(r.predicted.as_secs_f64());
            if !r.mask_time.is_zero() {
                mask_time.observe(r.mask_time.as_secs_f64());
            }
            for (adapter, t) in &r.queue_times {
                let model = adapter.as_deref().unwrap_or(&base);
                queue.with_label_values(&[model]).observe(t.as_secs_f64());
            }
        })
    }

    /// A generation request constrained by a grammar of `kind`.
    pub fn structured_request(&self, kind: &str) {
        self.structured.with_label_values(&[kind]).inc();
    }

    /// Prometheus text, with the engine gauges as of now.
    /// Job `job` is trained by this replica (`on`), or no longer.
    pub fn job_replica(&self, job: &str, replica: &str, on: bool) {
        if on {
            self.job_replica.with_label_values(&[job, replica]).set(1);
        } else {
            let _ = self.job_replica.remove_label_values(&[job, replica]);
        }
    }

    pub fn render(&self, s: &EngineStats) -> String {
        self.running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        let used = s.num_blocks.saturating_sub(s.free_blocks);
        self.kv_usage.set(if s.num_blocks == 0 {
            0.0
        } else {
            used as f64 / s.num_blocks as f64
        });
        self.adapters_resident.set(s.adapters_resident as i64);
        self.adapters_registered.set(s.adapters.len() as i64);
        let c = &s.counters;
        if let Ok(mut last) = self.last.lock() {
            let adv = |counter: &IntCounter, last: &mut u64, now: u64| {
                counter.inc_by(now.saturating_sub(*last));
                *last = now.max(*last);
            };
            adv(&self.preemptions, &mut last.preemptions, s.preemptions);
            adv(
                &self.prefix_queries,
                &mut last.prefix_queries,
                s.prefix_cache_queries,
            );
            adv(
                &self.prefix_hits,
                &mut last.prefix_hits,
                s.prefix_cache_hits,
            );
            adv(&self.adapter_loads, &mut last.loads, s.adapter_loads);
            adv(
                &self.adapter_evictions,
                &mut last.evictions,
                s.adapter_evictions,
            );
            adv(
                &self.kv_evictions,
                &mut last.kv_evictions,
                c.finetune_kv_evictions,
            );
            adv(
                &self.backward_steps,
                &mut last.backward_steps,
                c.finetune_backward_steps,
            );
            adv(&self.mixed_iterations, &mut last.mixed, c.mixed_iterations);
            let trained: u64 = s.jobs.iter().map(|j| j.trained_tokens).sum();
            adv(&self.trained_tokens, &mut last.trained, trained);
            for j in &s.jobs {
                let l = last.jobs.entry(j.name.clone()).or_default();
                let counter = self.job_trained_tokens.with_label_values(&[&j.name]);
                adv(&counter, l, j.trained_tokens);
                if j.sampled_tokens > 0 {
                    let l = last.sampled.entry(j.name.clone()).or_default();
                    let counter = self.job_sampled_tokens.with_label_values(&[&j.name]);
                    adv(&counter, l, j.sampled_tokens);
                }
            }
        }
        for j in &s.jobs {
            if let Some(loss) = j.loss {
                self.job_loss.with_label_values(&[&j.name]).set(loss);
            }
            if let Some(r) = j.mean_reward {
                self.job_reward.with_label_values(&[&j.name]).set(r);
            }
            let p = j.step as f64 / j.total_steps.max(1) as f64;
            self.job_progress.with_label_values(&[&j.name]).set(p);
        }
        for status in ["running", "paused", "succeeded", "failed", "cancelled"] {
            let n = s.jobs.iter().filter(|j| j.status == status).count();
            self.jobs.with_label_values(&[status]).set(n as i64);
        }
        // One series, labelled with the adapters as of now (as vLLM does).
        self.lora_info.reset();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.lora_info
            .with_label_values(&[
                &s.max_loras.to_string(),
                &s.running_adapters.join(","),
                &s.waiting_adapters.join(","),
            ])
            .set(now);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn prompt(&self, model: &str, tokens: usize) {
        self.prompt_tokens
            .with_label_values(&[model])
            .inc_by(tokens as u64);
    }
}

/// Timing of one choice, from submission to its last token.
pub struct RequestTimer {
    model: String,
    start: Instant,
    first: Option<Instant>,
}

impl RequestTimer {
    /// Starts timing a request for `model` (the name it asked for).
    pub fn start(model: &str) -> Self {
        Self {
            model: model.to_string(),
            start: Instant::now(),
            first: None,
        }
    }

    pub fn token(&mut self, m: &Metrics) {
        m.generation_tokens.with_label_values(&[&self.model]).inc();
        if self.first.is_none() {
            self.first = Some(Instant::now());
            let ttft = self.start.elapsed();
            m.ttft
                .with_label_values(&[&self.model])
                .observe(ttft.as_secs_f64());
        }
    }

    pub fn finish(&self, m: &Metrics, reason: FinishReason, completion_tokens: usize) {
        let model = self.model.as_str();
        m.e2e
            .with_label_values(&[model])
            .observe(self.start.elapsed().as_secs_f64());
        let outcome = |met: bool| if met { "met" } else { "missed" };
        if let Some(first) = self.first {
            let ttft = first - self.start;
            m.slo
                .with_label_values(&[model, "ttft", outcome(ttft <= m.ttft_slo)])
                .inc();
            if completion_tokens > 1 {
                let tpot = first.elapsed() / (completion_tokens - 1) as u32;
                m.tpot
                    .with_label_values(&[model])
                    .observe(tpot.as_secs_f64());
                m.slo
                    .with_label_values(&[model, "tpot", outcome(tpot <= m.tpot_slo)])
                    .inc();
            }
        }
        let label = match reason {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Abort => "abort",
        };
        m.success.with_label_values(&[model, label]).inc();
    }
}
