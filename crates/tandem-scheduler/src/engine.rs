//! The engine loop's synchronous core (nano-vllm's `LLMEngine`): schedule, execute, post-process.
//! Post-processing turns sampled tokens into text, applies stop conditions (EOS and end-of-turn
//! ids, stop strings, max_tokens, the context window) and frees finished sequences.

use crate::coserve::{CoserveConfig, CoserveMode, JobState, TrainingJob};
use crate::cost_model::{backward_features, forward_features, CostModel, SegmentCost};
use crate::scheduler::{AdmitError, Scheduler, SchedulerConfig};
use crate::sequence::{FinishReason, Sequence};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tandem_model::finetune::{Progress, TrainingRun};
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
}

/// What one iteration held and how long it took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IterationReport {
    /// The cost model's prediction for the work the iteration ran, and the measured time.
    pub predicted: Duration,
    pub measured: Duration,
    pub decode_tokens: u64,
    pub prefill_tokens: u64,
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

    /// Starts finetuning `run` on a new live adapter served as `name` (usable by requests at
    /// once: it starts as the base model, PEFT's B = 0).
    pub fn start_job(&mut self, name: &str, run: TrainingRun) -> Result<(), String> {
        if self.jobs.iter().any(|j| j.name == name) || self.runner.adapters.id(name).is_some() {
            return Err(format!("an adapter or job named `{name}` already exists"));
        }
        // A running job holds one adapter slot; requests keep at least one.
        let holding = self.jobs.iter().filter(|j| !j.state.is_final()).count();
        if holding + 1 >= self.runner.adapters.config().max_loras {
            return Err(format!(
                "no adapter slot for another job: {holding} job(s) hold slots of --max-loras {}",
                self.runner.adapters.config().max_loras
            ));
        }
        let r = run.lora.spec.r;
        let max = self.runner.adapters.config().max_lora_rank;
        if r > max {
            return Err(format!(
                "LoRA rank {r} is above the server's max LoRA rank {max}"
            ));
        }
        let blocks_needed = run.max_len().div_ceil(self.scheduler.blocks().block_size());
        if blocks_needed > self.scheduler.blocks().num_blocks() {
            return Err(format!(
                "the longest training example needs {blocks_needed} KV blocks, the cache has {}",
                self.scheduler.blocks().num_blocks()
            ));
        }
        let adapter = run.lora.to_adapter(None).map_err(|e| e.to_string())?;
        let id = self
            .runner
            .adapters
            .register_live(name, adapter)
            .map_err(|e| e.to_string())?;
        // A training adapter stays resident while its job runs; the scheduler admits requests
        // through one adapter fewer meanwhile.
        self.runner.adapters.pin(id);
        self.scheduler.cfg.max_loras = self.scheduler.cfg.max_loras.saturating_sub(1);
        self.jobs.push(TrainingJob {
            name: name.to_string(),
            run,
            adapter_id: id,
            seq_id: JOB_SEQ_BASE - self.jobs.len() as u64,
            state: JobState::Running,
            reports: Vec::new(),
            forward_tokens: 0,
            backward_steps: 0,
            trained_tokens: 0,
            checkpoint: None,
            checkpoints: Vec::new(),
            checkpoint_errors: Vec::new(),
        });
        Ok(())
    }

    /// Job `name` writes its adapter to `dir/step-N` every `every` optimizer steps and serves
    /// each as `<name>:ckpt-step-N`.
    pub fn set_job_checkpoints(
        &mut self,
        name: &str,
        dir: std::path::PathBuf,
        every: usize,
    ) -> Result<(), String> {
        let i = self.job_index(name)?;
        self.jobs[i].checkpoint = Some((dir, every.max(1)));
        Ok(())
    }

    /// Writes job `i`'s adapter as a checkpoint and registers it, if one is due at `step`.
    fn checkpoint(&mut self, i: usize, step: usize) -> Result<(), String> {
        let j = &self.jobs[i];
        let Some((_, every)) = &j.checkpoint else {
            return Ok(());
        };
        if !step.is_multiple_of(*every) || step >= j.run.total_steps() {
            return Ok(());
        }
        self.write_checkpoint(i, step).map(|_| ())
    }

    /// Checkpoints every running or paused job at its last optimizer step (unless it has one
    /// there already): a shutdown then loses no optimizer step. Returns what was written.
    pub fn checkpoint_active_jobs(&mut self) -> Vec<crate::engine_loop::CheckpointWritten> {
        let mut out = Vec::new();
        for i in 0..self.jobs.len() {
            let j = &self.jobs[i];
            let step = j.run.step;
            if j.state.is_final()
                || j.checkpoint.is_none()
                || step == 0
                || j.checkpoints.iter().any(|c| c.0 == step)
            {
                continue;
            }
            match self.write_checkpoint(i, step) {
                Ok((name, path)) => out.push(crate::engine_loop::CheckpointWritten {
                    job: self.jobs[i].name.clone(),
                    step,
                    name,
                    path,
                }),
                Err(e) => {
                    tracing::error!(job = %self.jobs[i].name, error = %e, "cannot write a checkpoint");
                    self.jobs[i].checkpoint_errors.push((step, e));
                }
            }
        }
        out
    }

    /// Writes job `i`'s state at `step` to `<dir>/step-<step>` and serves it as
    /// `<name>:ckpt-step-<step>`.
    fn write_checkpoint(
        &mut self,
        i: usize,
        step: usize,
    ) -> Result<(String, std::path::PathBuf), String> {
        let j = &mut self.jobs[i];
        let Some((dir, _)) = &j.checkpoint else {
            return Err("the job writes no checkpoints".into());
        };
        let path = dir.join(format!("step-{step}"));
        // The whole training state, so that a restart continues from here; it is also a PEFT
        // adapter directory, served at once.
        j.run
            .save_checkpoint(&path, None)
            .map_err(|e| e.to_string())?;
        let name = format!("{}:ckpt-step-{step}", j.name);
        j.checkpoints.push((step, name.clone(), path.clone()));
        self.runner
            .adapters
            .register(&name, &path)
            .map_err(|e| e.to_string())?;
        self.prune_checkpoints(i);
        Ok((name, path))
    }

    /// Keeps a job's newest `KEEP_CHECKPOINTS` checkpoints (OpenAI keeps a job's last three):
    /// older ones stop being served and leave the disk, so that a long job cannot fill it. One
    /// still in use by requests stays until a later pass.
    fn prune_checkpoints(&mut self, i: usize) {
        while self.jobs[i].checkpoints.len() > KEEP_CHECKPOINTS {
            let (step, name, path) = self.jobs[i].checkpoints[0].clone();
            if let Err(e) = self.runner.adapters.unregister(&name) {
                tracing::debug!(checkpoint = %name, error = %e, "an old checkpoint is in use; kept for now");
                return;
            }
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(checkpoint = %name, step, error = %e, "cannot remove an old checkpoint");
            }
            self.jobs[i].checkpoints.remove(0);
        }
    }

    /// Stops a job for good (its adapter keeps its last weights and stays served).
    pub fn cancel_job(&mut self, name: &str) -> Result<(), String> {
        let i = self.job_index(name)?;
        if self.jobs[i].state.is_final() {
            return Err(format!("job `{name}` has already finished"));
        }
        self.end_job(i, JobState::Cancelled);
        Ok(())
    }

    /// Pauses or resumes a running job (a paused job keeps its state and KV blocks).
    pub fn pause_job(&mut self, name: &str, pause: bool) -> Result<(), String> {
        let i = self.job_index(name)?;
        let j = &mut self.jobs[i];
        j.state = match (&j.state, pause) {
            (JobState::Running, true) => JobState::Paused,
            (JobState::Paused, false) => JobState::Running,
            (s, _) => return Err(format!("job `{name}` is {s:?}")),
        };
        Ok(())
    }

    fn job_index(&self, name: &str) -> Result<usize, String> {
        self.jobs
            .iter()
            .position(|j| j.name == name)
            .ok_or_else(|| format!("no job named `{name}`"))
    }

    fn end_job(&mut self, i: usize, state: JobState) {
        let j = &mut self.jobs[i];
        j.state = state;
        self.scheduler.blocks_mut().free(j.seq_id);
        self.runner.adapters.unpin(j.adapter_id);
        self.scheduler.cfg.max_loras += 1;
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

    fn training_due(&self) -> bool {
        self.coserve.mode != CoserveMode::InferenceOnly
            && self.jobs.iter().any(|j| j.state.is_active())
    }

    /// One iteration: inference as the scheduler decided, plus the finetuning work the
    /// co-serving policy fits in.
    pub fn step(&mut self) -> tandem_model::Result<Vec<RequestOutput>> {
        let t0 = Instant::now();
        self.iterations += 1;
        self.relieve_kv_pressure();
        let mut sched = self.scheduler.schedule();
        let inference = !sched.batch.segments.is_empty();
        let mut report = IterationReport::default();
        for seg in &sched.batch.segments {
            let n = seg.len as u64;
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
        let job = self.pick_job(inference);
        let budget = self.iteration_budget(t0);
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
        report.finetune_forward_tokens = sched
            .capture
            .first()
            .map_or(0, |&c| sched.batch.segments[c].len as u64);
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

    /// When the next iteration's inference wants more KV blocks than are free, jobs give theirs
    /// back first (their sequences restart from the first chunk later), before the scheduler
    /// would preempt a request.
    fn relieve_kv_pressure(&mut self) {
        if self.jobs.is_empty() || self.scheduler.kv_shortfall() == 0 {
            return;
        }
        for i in 0..self.jobs.len() {
            let seq_id = self.jobs[i].seq_id;
            if self.scheduler.blocks().table(seq_id).is_empty() {
                continue;
            }
            self.scheduler.blocks_mut().free(seq_id);
            let j = &mut self.jobs[i];
            j.run.restart_sequence();
            self.counters.finetune_kv_evictions += 1;
            tracing::info!(job = %j.name, "KV blocks taken back for inference; the training sequence restarts");
            if self.scheduler.kv_shortfall() == 0 {
                break;
            }
        }
    }

    /// The job that gets this iteration's finetuning work, if the mode gives it any.
    fn pick_job(&mut self, inference: bool) -> Option<usize> {
        match self.coserve.mode {
            CoserveMode::InferenceOnly => return None,
            // Requests that have waited for a slot for a quarter of the TTFT SLO come first.
            CoserveMode::Coserve
                if self
                    .scheduler
                    .longest_wait()
                    .is_some_and(|w| w * 4 >= self.coserve.ttft_slo) =>
            {
                return None
            }
            CoserveMode::Temporal
                if inference
                    && !self
                        .iterations
                        .is_multiple_of(self.coserve.temporal_every.max(1) as u64) =>
            {
                return None
            }
            _ => {}
        }
        let n = self.jobs.len();
        // Round robin over running jobs, one per iteration.
        (0..n)
            .map(|k| (self.iterations as usize + k) % n)
            .find(|&i| self.jobs[i].state.is_active())
    }

    /// Appends job `i`'s next forward chunk to the batch if tokens and KV blocks allow; returns
    /// the chunk index.
    fn place_forward_chunk(
        &mut self,
        i: usize,
        sched: &mut ScheduledBatch,
        deadline: Instant,
    ) -> Option<usize> {
        let used = sched.batch.num_tokens();
        let Some(len) = self.jobs[i].run.current_len() else {
            self.finish_job(i);
            return None;
        };
        let mut limit = usize::MAX;
        if used > 0 && self.coserve.mode == CoserveMode::Coserve {
            // With inference in the batch, the chunk is cut to the token budget and to what the
            // cost model says fits the iteration's latency budget.
            let (_, _, toks) = self.jobs[i].run.next_forward()?;
            let budget = self.scheduler.cfg.max_batched_tokens.saturating_sub(used);
            let inference = segment_costs(sched);
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            let x = forward_features(inference);
            let fits = |n: usize| self.cost.predict_forward(&x, Some(n)) <= left;
            let most = toks.len().min(budget);
            // Short chunks cost the backward nothing (it joins them back into chunks of the
            // configured size); each still pays the LM head's fixed cost, hence MIN_CHUNK.
            let least = toks.len().min(MIN_CHUNK);
            if most < least || !fits(least) {
                return None;
            }
            let (mut lo, mut hi) = (least, most);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if fits(mid) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            limit = lo;
        }
        let j = &mut self.jobs[i];
        let (c, start, toks) = j.run.next_forward_max(limit)?;
        // The batch's adapters and the job's must be resident together (max_loras slots);
        // otherwise the chunk waits for an iteration with room.
        let mut adapters: Vec<u32> = sched
            .batch
            .segments
            .iter()
            .filter_map(|s| s.adapter)
            .collect();
        adapters.push(j.adapter_id);
        adapters.sort_unstable();
        adapters.dedup();
        if self.runner.adapters.ensure_resident(&adapters).is_err() {
            return None;
        }
        // The whole sequence's KV blocks, taken when its first chunk runs, leaving a block of
        // headroom per running request.
        let blocks = self.scheduler.blocks();
        if blocks.blocks_missing(j.seq_id, len) + self.scheduler.num_running() > blocks.num_free()
            && self.scheduler.num_running() > 0
        {
            return None;
        }
        if !self.scheduler.blocks_mut().allocate(j.seq_id, len) {
            return None;
        }
        let table = self.scheduler.blocks().table(j.seq_id).to_vec();
        sched.batch.push_with_adapter(
            j.seq_id,
            &toks,
            start,
            table,
            LogitsWanted::None,
            Some(j.adapter_id),
        );
        sched.capture.push(sched.batch.segments.len() - 1);
        j.forward_tokens += toks.len() as u64;
        Some(c)
    }

    /// Backward steps of job `i` while the iteration's latency budget allows (at least one when
    /// no inference is running, every due step in finetune-only and temporal turns). Returns
    /// the steps' predicted seconds and their chunks' tokens.
    fn run_backward(&mut self, i: usize, deadline: Instant, inference: bool) -> (f64, u64) {
        let (mut predicted, mut tokens) = (0.0, 0);
        // Aim under the budget: step times vary and the iteration has work after the backward.
        let unlimited = matches!(
            self.coserve.mode,
            CoserveMode::FinetuneOnly | CoserveMode::Temporal
        );
        let mut steps = 0;
        loop {
            let j = &mut self.jobs[i];
            if !j.state.is_active() || !j.run.backward_due() {
                break;
            }
            let Some((start, len)) = j.run.next_backward_chunk() else {
                break;
            };
            let x = backward_features(start, len);
            let p = self.cost.backward.predict(&x);
            let fits = Instant::now() + Duration::from_secs_f64(p) <= deadline;
            if !(unlimited || fits || (steps == 0 && !inference)) {
                break;
            }
            predicted += p;
            tokens += len as u64;
            let table = self.scheduler.blocks().table(j.seq_id).to_vec();
            let seq_len = j.run.current_len().unwrap_or(0) as u64;
            let s0 = Instant::now();
            let r = j
                .run
                .backward_step(&self.runner.model, &self.runner.cache, &table);
            self.cost.backward.observe(&x, s0.elapsed().as_secs_f64());
            steps += 1;
            j.backward_steps += 1;
            match r {
                Ok(Progress::Stepped) => {}
                Ok(Progress::SequenceDone) => {
                    j.trained_tokens += seq_len;
                    self.scheduler.blocks_mut().free(j.seq_id);
                    if unlimited && inference {
                        break;
                    }
                }
                Ok(Progress::OptimizerStep(report)) => {
                    j.trained_tokens += seq_len;
                    self.scheduler.blocks_mut().free(j.seq_id);
                    tracing::info!(job = %j.name, step = report.step, loss = report.loss, "finetuning step");
                    j.reports.push(report);
                    let id = j.adapter_id;
                    let adapter = j.run.lora.to_adapter(None);
                    let done = j.run.is_done();
                    // Cached K/V of the old weights must not serve requests from now on.
                    self.scheduler.adapter_weights_changed(id);
                    if let Err(e) = adapter.and_then(|a| self.runner.adapters.replace_live(id, a)) {
                        self.fail_job(i, e.to_string());
                        break;
                    }
                    if let Err(e) = self.checkpoint(i, report.step) {
                        tracing::warn!(job = %self.jobs[i].name, error = %e, "cannot write a checkpoint");
                        self.jobs[i].checkpoint_errors.push((report.step, e));
                    }
                    if done {
                        self.finish_job(i);
                        break;
                    }
                    if unlimited && inference {
                        break;
                    }
                }
                Err(e) => {
                    self.fail_job(i, e.to_string());
                    break;
                }
            }
        }
        (predicted, tokens)
    }

    fn finish_job(&mut self, i: usize) {
        if !self.jobs[i].state.is_final() {
            self.end_job(i, JobState::Succeeded);
        }
    }

    fn fail_job(&mut self, i: usize, msg: String) {
        tracing::error!(job = %self.jobs[i].name, error = %msg, "finetuning job failed");
        self.end_job(i, JobState::Failed(msg));
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
