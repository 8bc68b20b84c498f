//! Prometheus metrics under vLLM's names with `tandem:` in place of `vllm:` (same labels, units
//! and meaning), so vLLM dashboards and LoRA-aware routers work by renaming. Engine gauges are
//! read from the engine at scrape time; request figures are recorded by the handlers.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::sync::Mutex;
use std::time::Instant;
use tandem_scheduler::{EngineStats, FinishReason};

pub struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: prometheus::Gauge,
    preemptions: IntCounter,
    last_preemptions: Mutex<u64>,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    success: IntCounterVec,
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    lora_info: prometheus::GaugeVec,
    iteration_tokens: IntCounterVec,
    iterations: IntCounter,
    mixed_iterations: IntCounter,
    backward_steps: IntCounter,
    trained_tokens: IntCounter,
    jobs: prometheus::IntGaugeVec,
    /// Engine totals as of the last scrape (counters advance by the difference).
    last: Mutex<[u64; 7]>,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];
const TPOT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];

impl Metrics {
    pub fn new(model_name: &str) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let opts =
            |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model_name);
        let hist = |name: &str, help: &str, b: &[f64]| {
            HistogramOpts::from(opts(name, help)).buckets(b.to_vec())
        };
        let m = Self {
            running: IntGauge::with_opts(opts(
                "tandem:num_requests_running",
                "Number of requests in model execution batches.",
            ))?,
            waiting: IntGauge::with_opts(opts(
                "tandem:num_requests_waiting",
                "Number of requests waiting to be processed.",
            ))?,
            kv_usage: prometheus::Gauge::with_opts(opts(
                "tandem:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
            ))?,
            preemptions: IntCounter::with_opts(opts(
                "tandem:num_preemptions_total",
                "Cumulative number of preemptions from the engine.",
            ))?,
            last_preemptions: Mutex::new(0),
            prompt_tokens: IntCounter::with_opts(opts(
                "tandem:prompt_tokens_total",
                "Number of prefill tokens processed.",
            ))?,
            generation_tokens: IntCounter::with_opts(opts(
                "tandem:generation_tokens_total",
                "Number of generation tokens processed.",
            ))?,
            success: IntCounterVec::new(
                opts(
                    "tandem:request_success_total",
                    "Count of successfully processed requests.",
                ),
                &["finished_reason"],
            )?,
            ttft: Histogram::with_opts(hist(
                "tandem:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                LATENCY_BUCKETS,
            ))?,
            tpot: Histogram::with_opts(hist(
                "tandem:time_per_output_token_seconds",
                "Histogram of time per output token in seconds.",
                TPOT_BUCKETS,
            ))?,
            e2e: Histogram::with_opts(hist(
                "tandem:e2e_request_latency_seconds",
                "Histogram of end to end request latency in seconds.",
                LATENCY_BUCKETS,
            ))?,
            lora_info: prometheus::GaugeVec::new(
                opts(
                    "tandem:lora_requests_info",
                    "Running stats on LoRA requests (value: the time of the last update).",
                ),
                &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )?,
            iteration_tokens: IntCounterVec::new(
                opts(
                    "tandem:iteration_tokens_total",
                    "Tokens run through the model, by kind: decode, prefill, finetune_forward.",
                ),
                &["kind"],
            )?,
            iterations: IntCounter::with_opts(opts(
                "tandem:iterations_total",
                "Engine iterations (one packed forward each).",
            ))?,
            mixed_iterations: IntCounter::with_opts(opts(
                "tandem:coserve_mixed_iterations_total",
                "Iterations that ran inference and finetuning work together.",
            ))?,
            backward_steps: IntCounter::with_opts(opts(
                "tandem:finetune_backward_steps_total",
                "Token-level backward (layer, chunk) steps run.",
            ))?,
            trained_tokens: IntCounter::with_opts(opts(
                "tandem:finetune_trained_tokens_total",
                "Tokens of training sequences whose backward completed, over all jobs.",
            ))?,
            jobs: prometheus::IntGaugeVec::new(
                opts(
                    "tandem:finetune_jobs",
                    "Fine-tuning jobs in the engine, by status.",
                ),
                &["status"],
            )?,
            last: Mutex::new([0; 7]),
            registry,
        };
        m.registry.register(Box::new(m.running.clone()))?;
        m.registry.register(Box::new(m.waiting.clone()))?;
        m.registry.register(Box::new(m.kv_usage.clone()))?;
        m.registry.register(Box::new(m.preemptions.clone()))?;
        m.registry.register(Box::new(m.prompt_tokens.clone()))?;
        m.registry.register(Box::new(m.generation_tokens.clone()))?;
        m.registry.register(Box::new(m.success.clone()))?;
        m.registry.register(Box::new(m.ttft.clone()))?;
        m.registry.register(Box::new(m.tpot.clone()))?;
        m.registry.register(Box::new(m.e2e.clone()))?;
        m.registry.register(Box::new(m.lora_info.clone()))?;
        m.registry.register(Box::new(m.iteration_tokens.clone()))?;
        m.registry.register(Box::new(m.iterations.clone()))?;
        m.registry.register(Box::new(m.mixed_iterations.clone()))?;
        m.registry.register(Box::new(m.backward_steps.clone()))?;
        m.registry.register(Box::new(m.trained_tokens.clone()))?;
        m.registry.register(Box::new(m.jobs.clone()))?;
        Ok(m)
    }

    /// Prometheus text, with the engine gauges as of now.
    pub fn render(&self, s: &EngineStats) -> String {
        self.running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        let used = s.num_blocks.saturating_sub(s.free_blocks);
        self.kv_usage.set(if s.num_blocks == 0 {
            0.0
        } else {
            used as f64 / s.num_blocks as f64
        });
        if let Ok(mut last) = self.last_preemptions.lock() {
            self.preemptions.inc_by(s.preemptions.saturating_sub(*last));
            *last = s.preemptions.max(*last);
        }
        let c = &s.counters;
        let trained: u64 = s.jobs.iter().map(|j| j.1).sum();
        let now_totals = [
            c.decode_tokens,
            c.prefill_tokens,
            c.finetune_forward_tokens,
            c.iterations,
            c.mixed_iterations,
            c.finetune_backward_steps,
            trained,
        ];
        if let Ok(mut last) = self.last.lock() {
            let d = |i: usize, last: &[u64; 7]| now_totals[i].saturating_sub(last[i]);
            self.iteration_tokens
                .with_label_values(&["decode"])
                .inc_by(d(0, &last));
            self.iteration_tokens
                .with_label_values(&["prefill"])
                .inc_by(d(1, &last));
            self.iteration_tokens
                .with_label_values(&["finetune_forward"])
                .inc_by(d(2, &last));
            self.iterations.inc_by(d(3, &last));
            self.mixed_iterations.inc_by(d(4, &last));
            self.backward_steps.inc_by(d(5, &last));
            self.trained_tokens.inc_by(d(6, &last));
            for (l, n) in last.iter_mut().zip(now_totals) {
                *l = (*l).max(n);
            }
        }
        for status in ["running", "paused", "succeeded", "failed", "cancelled"] {
            let n = s.jobs.iter().filter(|j| j.0 == status).count();
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

    pub fn prompt(&self, tokens: usize) {
        self.prompt_tokens.inc_by(tokens as u64);
    }
}

/// Timing of one choice, from submission to its last token.
pub struct RequestTimer {
    start: Instant,
    first: Option<Instant>,
}

impl RequestTimer {
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
            first: None,
        }
    }

    pub fn token(&mut self, m: &Metrics) {
        m.generation_tokens.inc();
        if self.first.is_none() {
            self.first = Some(Instant::now());
            m.ttft.observe(self.start.elapsed().as_secs_f64());
        }
    }

    pub fn finish(&self, m: &Metrics, reason: FinishReason, completion_tokens: usize) {
        let e2e = self.start.elapsed().as_secs_f64();
        m.e2e.observe(e2e);
        if let (Some(first), true) = (self.first, completion_tokens > 1) {
            m.tpot
                .observe(first.elapsed().as_secs_f64() / (completion_tokens - 1) as f64);
        }
        let label = match reason {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Abort => "abort",
        };
        m.success.with_label_values(&[label]).inc();
    }
}
