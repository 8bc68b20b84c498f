//! The life of finetuning jobs inside the engine: start (fresh, or from a served adapter with
//! a DPO reference), pause / resume / cancel (checkpoints are in `job_checkpoints.rs`), and each iteration's training work — which job runs, its
//! forward chunk placed beside inference, its (layer, chunk) backward steps within the budget,
//! its end. The engine's `step` (the parent module) asks these for the iteration's work.

use super::*;

impl LlmEngine {
    /// Starts finetuning `run` on a new live adapter served as `name` (usable by requests at
    /// once: it starts as the run's initial weights, the base model for a fresh LoRA).
    pub fn start_job(&mut self, name: &str, run: TrainingRun) -> Result<(), String> {
        self.start_job_with_reference(name, run, None)
    }

    /// `start_job` for a DPO run whose reference is the served adapter `reference` (the one it
    /// starts from; None: the base model). The reference stays pinned while the job runs.
    pub fn start_job_with_reference(
        &mut self,
        name: &str,
        mut run: TrainingRun,
        reference: Option<&str>,
    ) -> Result<(), String> {
        if self.jobs.iter().any(|j| j.name == name) || self.runner.adapters.id(name).is_some() {
            return Err(format!("an adapter or job named `{name}` already exists"));
        }
        let reference = match reference {
            None => None,
            Some(r) => {
                let id =
                    self.runner.adapters.id(r).ok_or_else(|| {
                        format!("no adapter named `{r}` to take as the reference")
                    })?;
                if self
                    .jobs
                    .iter()
                    .any(|j| j.adapter_id == id && !j.state.is_final())
                {
                    return Err(format!(
                        "`{r}` is still training; a reference must be frozen (start from one of its checkpoints, or when it has finished)"
                    ));
                }
                Some(id)
            }
        };
        // A running job holds one adapter slot (two with a reference); requests keep at least
        // one.
        let holding: usize = self
            .jobs
            .iter()
            .filter(|j| !j.state.is_final())
            .map(|j| 1 + usize::from(j.reference.is_some()))
            .sum();
        let wanted = 1 + usize::from(reference.is_some());
        if holding + wanted >= self.runner.adapters.config().max_loras {
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
        run.set_kv_block_size(self.scheduler.blocks().block_size());
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
        if let Some(r) = reference {
            self.runner.adapters.pin(r);
        }
        self.scheduler.cfg.max_loras = self.scheduler.cfg.max_loras.saturating_sub(wanted);
        self.jobs.push(TrainingJob {
            name: name.to_string(),
            run,
            adapter_id: id,
            reference,
            seq_id: JOB_SEQ_BASE - self.jobs.len() as u64,
            state: JobState::Running,
            reports: Vec::new(),
            forward_tokens: 0,
            backward_steps: 0,
            trained_tokens: 0,
            checkpoint: None,
            checkpoints: Vec::new(),
            checkpoint_errors: Vec::new(),
            rollouts: None,
            sampled_tokens: 0,
            answers_sampled: 0,
            sampling_seconds: 0.0,
            last_rollouts: None,
        });
        Ok(())
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

    /// Forgets job `name` here (another replica trains it now, or will): it stops if still
    /// active, leaves the job list and stops being served under its name, so that this engine
    /// can start it again later. Its checkpoints stay served. Refused while requests use its
    /// adapter (the job is then stopped but still listed; try again).
    pub fn release_job(&mut self, name: &str) -> Result<(), String> {
        let i = self.job_index(name)?;
        if !self.jobs[i].state.is_final() {
            self.end_job(i, JobState::Cancelled);
        }
        let id = self.jobs[i].adapter_id;
        if self.scheduler.uses_adapter(id) {
            return Err(format!(
                "the adapter `{name}` is in use by queued or running requests"
            ));
        }
        self.runner
            .adapters
            .unregister(name)
            .map_err(|e| e.to_string())?;
        self.jobs.remove(i);
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

    pub(super) fn job_index(&self, name: &str) -> Result<usize, String> {
        self.jobs
            .iter()
            .position(|j| j.name == name)
            .ok_or_else(|| format!("no job named `{name}`"))
    }

    pub(super) fn end_job(&mut self, i: usize, state: JobState) {
        self.drop_rollouts(i);
        let j = &mut self.jobs[i];
        j.state = state;
        self.scheduler.blocks_mut().free(j.seq_id);
        self.runner.adapters.unpin(j.adapter_id);
        if let Some(r) = j.reference {
            self.runner.adapters.unpin(r);
        }
        self.scheduler.cfg.max_loras += 1 + usize::from(j.reference.is_some());
    }

    pub(super) fn training_due(&self) -> bool {
        self.coserve.mode != CoserveMode::InferenceOnly
            && self
                .jobs
                .iter()
                .any(|j| j.state.is_active() && !j.run.awaiting_answers())
    }

    /// When the next iteration's inference wants more KV blocks than are free, jobs give theirs
    /// back first (their sequences restart from the first chunk later), before the scheduler
    /// would preempt a request.
    pub(super) fn relieve_kv_pressure(&mut self) {
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
    pub(super) fn pick_job(&mut self, inference: bool) -> Option<usize> {
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
            .find(|&i| self.jobs[i].state.is_active() && !self.jobs[i].run.awaiting_answers())
    }

    /// Appends job `i`'s next forward chunk to the batch if tokens and KV blocks allow; returns
    /// the chunk's name, to hand its activations back.
    pub(super) fn place_forward_chunk(
        &mut self,
        i: usize,
        sched: &mut ScheduledBatch,
        deadline: Instant,
    ) -> Option<ChunkRef> {
        let used = sched.batch.num_tokens();
        let Some(len) = self.jobs[i].run.current_len() else {
            // A reinforcement run between its answers' rewards and its next request waits.
            if self.jobs[i].run.is_done() {
                self.finish_job(i);
            }
            return None;
        };
        if used == 0 && !self.jobs[i].run.sequence_started() {
            // No inference in this iteration: a unit of short examples may run its whole
            // forward with its graphs kept (no KV needed: each example is one chunk), and its
            // backward, which follows in this iteration, recomputes nothing.
            let active = self.jobs.iter().filter(|j| j.state.is_active()).count();
            let budget = self.keep_budget / active.max(1);
            let model = &self.runner.model;
            let j = &mut self.jobs[i];
            match j.run.forward_kept(model, budget) {
                Ok(true) => {
                    j.forward_tokens += j.run.current_tokens() as u64;
                    return None;
                }
                Ok(false) => {}
                Err(e) => {
                    self.fail_job(i, e.to_string());
                    return None;
                }
            }
        }
        let mut limit = usize::MAX;
        if used > 0 && self.coserve.mode == CoserveMode::Coserve {
            // With inference in the batch, the chunk is cut to the token budget and to what the
            // cost model says fits the iteration's latency budget.
            let toks = self.jobs[i].run.next_forward()?.tokens;
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
        let chunk = j.run.next_forward_max(limit)?;
        // A DPO reference pass runs through the reference (or no adapter), a policy chunk
        // through the job's adapter.
        let adapter = if chunk.id.reference {
            j.reference
        } else {
            Some(j.adapter_id)
        };
        // The batch's adapters and the chunk's must be resident together (max_loras slots);
        // otherwise the chunk waits for an iteration with room.
        let mut adapters: Vec<u32> = sched
            .batch
            .segments
            .iter()
            .filter_map(|s| s.adapter)
            .collect();
        adapters.extend(adapter);
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
        let table = chunk.table(self.scheduler.blocks().table(j.seq_id));
        sched.batch.push_with_adapter(
            j.seq_id,
            &chunk.tokens,
            chunk.start,
            table,
            LogitsWanted::None,
            adapter,
        );
        sched.capture.push(sched.batch.segments.len() - 1);
        j.forward_tokens += chunk.tokens.len() as u64;
        Some(chunk.id)
    }

    /// Backward steps of job `i` while the iteration's latency budget allows (at least one when
    /// no inference is running, every due step in finetune-only and temporal turns). Returns
    /// the steps' predicted seconds and their chunks' tokens.
    pub(super) fn run_backward(
        &mut self,
        i: usize,
        deadline: Instant,
        inference: bool,
    ) -> (f64, u64) {
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
            let seq_len = j.run.current_tokens() as u64;
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
                    if self.after_optimizer_step(i, report) || (unlimited && inference) {
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

    pub(super) fn finish_job(&mut self, i: usize) {
        if !self.jobs[i].state.is_final() {
            self.end_job(i, JobState::Succeeded);
        }
    }

    pub(super) fn fail_job(&mut self, i: usize, msg: String) {
        tracing::error!(job = %self.jobs[i].name, error = %msg, "finetuning job failed");
        self.end_job(i, JobState::Failed(msg));
    }
}
