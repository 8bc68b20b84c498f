//! The engine loop's synchronous core (nano-vllm's `LLMEngine`): schedule, execute, post-process.
//! Post-processing turns sampled tokens into text, applies stop conditions (EOS and end-of-turn
//! ids, stop strings, max_tokens, the context window) and frees finished sequences. Finetuning
//! jobs' life and their share of each iteration live in `engine/jobs.rs`.

use crate::coserve::{CoserveConfig, CoserveMode, JobState, TrainingJob};
use crate::cost_model::{backward_features, forward_features, CostModel, SegmentCost};
use crate::scheduler::{AdmitError, Scheduler, SchedulerConfig};
use crate::sequence::{FinishReason, Sequence};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tandem_model::finetune::{ChunkRef, Progress, TrainingRun};
use tandem_model::{
    IncrementalDecoder, LogitsWanted, ModelRunner, SamplingParams, ScheduledBatch, TextTokenizer,
    TokenLogprobs,
};

/// The share of the TPOT SLO that co-serving plans to (room for misprediction).
pub const SLO_MARGIN: f64 = 0.85;

/// The longest iteration, in TPOT SLOs, however much slack the running requests have (bounds
/// the gap between two tokens of a request).
pub const MAX_ITERATION_SLOS: f64 = 4.0;

/// The shortest forward chunk a job runs beside inference (unless its sequence has fewer
/// tokens left).
pub const MIN_CHUNK: usize = 16;

/// Checkpoints kept per job (the newest; OpenAI's fine-tuning API keeps the last three).
pub const KEEP_CHECKPOINTS: usize = 3;

/// Sequence ids from here down hold finetuning jobs' KV blocks (one per job).
pub const JOB_SEQ_BASE: u64 = u64::MAX - 1;

mod job_checkpoints;
mod jobs;
mod rollouts;

pub use rollouts::RolloutBatch;

/// New output of one sequence after one step.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub seq_id: u64,
    /// The token sampled this step (None when the step only finished the sequence).
    pub token: Option<u32>,
    /// Text that became final this step (stop strings and held-back bytes excluded).
    pub text: String,
    pub finished: Option<FinishReason>,
    /// The token's log-probabilities, when the request asked for them.
    pub logprobs: Option<TokenLogprobs>,
    /// Prompt tokens served from the prefix cache (set when `finished` is).
    pub cached_tokens: usize,
}

#[derive(Default)]
struct TextState {
    decoder: IncrementalDecoder,
    /// All decoded text.
    text: String,
    /// How much of `text` has been handed out.
    emitted: usize,
}

pub struct LlmEngine {
    pub scheduler: Scheduler,
    pub runner: ModelRunner,
    pub tokenizer: TextTokenizer,
    texts: HashMap<u64, TextState>,
    next_id: u64,
    pub coserve: CoserveConfig,
    /// Finetuning jobs, in the order they were started (finished ones stay for their reports).
    pub jobs: Vec<TrainingJob>,
    /// Iteration times predicted from what they hold, fitted online.
    pub cost: CostModel,
    iterations: u64,
    /// Running totals of what iterations held.
    pub counters: IterationCounters,
    /// Called after every iteration (metrics).
    pub on_iteration: Option<IterationObserver>,
    /// Bytes the running jobs' kept forward graphs may take together (shared equally):
    /// a unit of short examples that starts in an iteration without inference runs its
    /// forward with its graphs kept, and its backward recomputes nothing. 0: always recompute.
    pub keep_budget: usize,
}

/// What one iteration held and how long it took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IterationReport {
    /// The cost model's prediction for the work the iteration ran, and the measured time.
    pub predicted: Duration,
    pub measured: Duration,
    pub decode_tokens: u64,
    pub prefill_tokens: u64,
    /// Of the decode and prefill tokens, those of engine-made sequences (rollouts).
    pub background_tokens: u64,
    pub finetune_forward_tokens: u64,
    /// Tokens of the chunks whose (layer, chunk) backward steps ran, summed over steps.
    pub finetune_backward_tokens: u64,
    pub finetune_backward_steps: u64,
    /// The latency budget the iteration was given (co-serving sizes finetuning work to it).
    pub budget: Duration,
    /// How long each request that ran for the first time in this iteration had waited, with
    /// the adapter it runs through.
    pub queue_times: Vec<(Option<String>, Duration)>,
    /// Time spent computing grammar masks for constrained sequences (beside the forward).
    pub mask_time: Duration,
}

pub type IterationObserver = Box<dyn FnMut(&IterationReport) + Send>;

/// Tokens per iteration by kind, summed since start (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IterationCounters {
    pub iterations: u64,
    pub decode_tokens: u64,
    pub prefill_tokens: u64,
    pub finetune_forward_tokens: u64,
    pub finetune_backward_steps: u64,
    pub finetune_backward_tokens: u64,
    /// Iterations that ran inference and finetuning work together.
    pub mixed_iterations: u64,
    /// Times a job's KV blocks were taken back for inference (its sequence restarted).
    pub finetune_kv_evictions: u64,
}

impl LlmEngine {
    pub fn new(runner: ModelRunner, tokenizer: TextTokenizer, cfg: SchedulerConfig) -> Self {
        Self {
            keep_budget: tandem_model::finetune::default_keep_budget(runner.model.device()),
            scheduler: Scheduler::new(cfg),
            runner,
            tokenizer,
            texts: HashMap::new(),
            next_id: 0,
            coserve: CoserveConfig::default(),
            jobs: Vec::new(),
            cost: CostModel::default(),
            iterations: 0,
            counters: IterationCounters::default(),
            on_iteration: None,
        }
    }

    /// Queues a request, through the registered adapter named `adapter` if given; returns its
    /// sequence id.
    pub fn add_request(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<&str>,
    ) -> Result<u64, AdmitError> {
        self.add_request_salted(prompt, params, adapter, None)
    }

    /// `add_request` with a cache salt: only requests with the same salt (or both none) share
    /// prefix-cache blocks.
    pub fn add_request_salted(
        &mut self,
        prompt: Vec<u32>,
        mut params: SamplingParams,
        adapter: Option<&str>,
        cache_salt: Option<String>,
    ) -> Result<u64, AdmitError> {
        // What ends generation, for the sampler to hold back before min_tokens.
        params.end_token_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            params
                .end_token_ids
                .extend(self.tokenizer.eos_token_ids.iter().copied());
        }
        let adapter = match adapter {
            Some(name) => Some(
                self.runner
                    .adapters
                    .id(name)
                    .ok_or_else(|| AdmitError::UnknownAdapter(name.to_string()))?,
            ),
            None => None,
        };
        let id = self.next_id;
        self.next_id += 1;
        let mut seq = Sequence::new(id, prompt, params, adapter);
        seq.cache_salt = cache_salt;
        self.scheduler.add(seq)?;
        self.texts.insert(id, TextState::default());
        Ok(id)
    }

    pub fn abort(&mut self, id: u64) {
        self.scheduler.finish(id);
        self.texts.remove(&id);
        if let Err(e) = self.release_finished() {
            tracing::error!(error = %e, "releasing an aborted sequence failed");
        }
    }

    /// Hands the runner the sequences that left at once (sampler state, adapter pins), rather
    /// than with the next batch: an idle engine must not keep an adapter pinned.
    fn release_finished(&mut self) -> tandem_model::Result<()> {
        let finished = self.scheduler.take_finished();
        if !finished.is_empty() {
            self.runner.execute(&ScheduledBatch {
                finished,
                ..Default::default()
            })?;
        }
        Ok(())
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work() || self.training_due()
    }

    /// One iteration: inference as the scheduler decided, plus the finetuning work the
    /// co-serving policy fits in.
    pub fn step(&mut self) -> tandem_model::Result<Vec<RequestOutput>> {
        let t0 = Instant::now();
        self.iterations += 1;
        self.start_rollouts();
        self.relieve_kv_pressure();
        // Background sequences (rollouts) join client requests only while the batch's
        // predicted forward stays within what is left of the iteration's latency budget (none
        // when it is spent: a fit may predict zero).
        let budget = self.iteration_budget(t0);
        let room = budget
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        let cost = &self.cost;
        let mut fits = |segs: &[SegmentCost]| {
            room > 0.0 && cost.predict_forward(&forward_features(segs.to_vec()), None) <= room
        };
        let mut sched = self.scheduler.schedule_within(&mut fits);
        let inference = !sched.batch.segments.is_empty();
        let mut report = IterationReport::default();
        for seg in &sched.batch.segments {
            let n = seg.len as u64;
            if self.scheduler.get(seg.seq_id).is_some_and(|q| q.background) {
                report.background_tokens += n;
            }
            // A one-token segment past the prompt is a decode step.
            if seg.len == 1
                && self
                    .scheduler
                    .get(seg.seq_id)
                    .is_some_and(|q| q.num_computed >= q.prompt_len)
            {
                report.decode_tokens += n;
            } else {
                report.prefill_tokens += n;
            }
        }
        report.queue_times = sched
            .new_seqs
            .iter()
            .filter_map(|n| self.scheduler.get(n.seq_id))
            .map(|q| {
                let adapter = q
                    .adapter
                    .and_then(|a| self.runner.adapters.name(a))
                    .map(str::to_string);
                (adapter, q.arrival.elapsed())
            })
            .collect();
        let backward_before: u64 = self.jobs.iter().map(|j| j.backward_steps).sum();
        let forward_before: u64 = self.jobs.iter().map(|j| j.forward_tokens).sum();
        let job = self.pick_job(inference);
        let mut forward_chunk = None;
        if let Some(i) = job {
            forward_chunk = self.place_forward_chunk(i, &mut sched, budget);
        }
        let fwd_x = forward_features(segment_costs(&sched));
        let chunk_len = sched.capture.first().map(|&c| sched.batch.segments[c].len);
        let mut predicted = self.cost.predict_forward(&fwd_x, chunk_len);
        let out = self.runner.execute(&sched)?;
        report.mask_time = Duration::from_secs_f64(out.mask_seconds);
        self.scheduler.update(&out.sampled);
        if let (Some(i), Some(c)) = (job, forward_chunk) {
            let inputs = self
                .runner
                .captured
                .pop()
                .map(|c| c.inputs)
                .unwrap_or_default();
            let j = &mut self.jobs[i];
            match j.run.finish_forward(&self.runner.model, c, inputs) {
                // A validation example ended: its blocks go.
                Ok(true) => self.scheduler.blocks_mut().free(j.seq_id),
                Ok(false) => {}
                Err(e) => self.fail_job(i, e.to_string()),
            }
        }
        if !sched.batch.segments.is_empty() {
            self.cost
                .observe_forward(&fwd_x, chunk_len, t0.elapsed().as_secs_f64());
        }
        if let Some(i) = job {
            let span = tracing::debug_span!("finetune_backward", job = %self.jobs[i].name);
            let (p, tokens) = span.in_scope(|| self.run_backward(i, budget, inference));
            predicted += p;
            report.finetune_backward_tokens = tokens;
        }
        report.finetune_backward_steps =
            self.jobs.iter().map(|j| j.backward_steps).sum::<u64>() - backward_before;
        // Forward tokens placed in the batch, or run by a kept-graph forward.
        report.finetune_forward_tokens =
            self.jobs.iter().map(|j| j.forward_tokens).sum::<u64>() - forward_before;
        let c = &mut self.counters;
        c.iterations += 1;
        c.decode_tokens += report.decode_tokens;
        c.prefill_tokens += report.prefill_tokens;
        c.finetune_forward_tokens += report.finetune_forward_tokens;
        c.finetune_backward_steps += report.finetune_backward_steps;
        c.finetune_backward_tokens += report.finetune_backward_tokens;
        if inference && (report.finetune_forward_tokens > 0 || report.finetune_backward_steps > 0) {
            c.mixed_iterations += 1;
        }
        let mut outputs = Vec::with_capacity(out.sampled.len());
        for (id, tok) in out.sampled {
            let mut o = self.postprocess(id, tok)?;
            o.logprobs = out.logprobs.get(&id).cloned();
            outputs.push(o);
        }
        self.collect_rollouts(&mut outputs);
        self.release_finished()?;
        report.predicted = Duration::from_secs_f64(predicted);
        report.budget = budget.saturating_duration_since(t0);
        report.measured = t0.elapsed();
        if let Some(f) = self.on_iteration.as_mut() {
            f(&report);
        }
        Ok(outputs)
    }

    /// When this iteration must end (its latency budget): as long as every running request's
    /// time per output token, averaged over its output so far, stays within the TPOT SLO (with
    /// SLO_MARGIN), and at most MAX_ITERATION_SLOS SLOs; one SLO (with the margin) while no
    /// request has a token yet.
    fn iteration_budget(&self, t0: Instant) -> Instant {
        let slo = self.coserve.tpot_slo.mul_f64(SLO_MARGIN);
        let cap = self.coserve.tpot_slo.mul_f64(MAX_ITERATION_SLOS);
        let room = self
            .scheduler
            .latency_budget(slo)
            .map_or(slo, |b| b.min(cap));
        t0 + room
    }

    fn postprocess(&mut self, id: u64, tok: u32) -> tandem_model::Result<RequestOutput> {
        let Some(seq) = self.scheduler.get(id) else {
            return Ok(RequestOutput {
                seq_id: id,
                token: Some(tok),
                text: String::new(),
                finished: Some(FinishReason::Abort),
                logprobs: None,
                cached_tokens: 0,
            });
        };
        let params = &seq.params;
        let n_out = seq.output().len();
        let len = seq.tokens.len();
        let is_eos = (!params.ignore_eos && self.tokenizer.eos_token_ids.contains(&tok))
            || params.stop_token_ids.contains(&tok);
        let state = self.texts.entry(id).or_default();
        if !is_eos {
            let piece = state.decoder.push(&self.tokenizer, tok)?;
            state.text.push_str(&piece);
        }
        let mut finished = if is_eos {
            Some(FinishReason::Stop)
        } else if n_out >= params.max_tokens || len >= self.scheduler.cfg.max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        // Stop strings: search only where a new match can start, cut the text before it.
        let longest = params.stop.iter().map(String::len).max().unwrap_or(0);
        if longest > 0 {
            let from = floor_boundary(&state.text, state.emitted.saturating_sub(longest));
            if let Some(cut) = params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| state.text[from..].find(s.as_str()).map(|p| from + p))
                .min()
            {
                state.text.truncate(cut);
                finished = Some(FinishReason::Stop);
            }
        }
        // Hold back a tail that could still become a stop string.
        let end = if finished.is_some() {
            state.text.len()
        } else {
            floor_boundary(
                &state.text,
                state.text.len().saturating_sub(longest.saturating_sub(1)),
            )
        };
        let text = if end > state.emitted {
            let t = state.text[state.emitted..end].to_string();
            state.emitted = end;
            t
        } else {
            String::new()
        };
        let mut cached_tokens = 0;
        if finished.is_some() {
            cached_tokens = self.scheduler.finish(id).map_or(0, |s| s.cached_tokens);
            self.texts.remove(&id);
        }
        Ok(RequestOutput {
            seq_id: id,
            token: Some(tok),
            text,
            finished,
            logprobs: None,
            cached_tokens,
        })
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What the cost model needs of each inference segment of a scheduled batch.
fn segment_costs(sched: &ScheduledBatch) -> Vec<SegmentCost> {
    let b = &sched.batch;
    b.segments
        .iter()
        .enumerate()
        .filter(|(k, _)| !sched.capture.contains(k))
        .map(|(_, s)| SegmentCost {
            start: b.positions[s.start] as usize,
            len: s.len,
            logits: match s.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => 1,
                LogitsWanted::All => s.len,
            },
        })
        .collect()
}
