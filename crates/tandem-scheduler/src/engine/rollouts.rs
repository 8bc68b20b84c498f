//! Reinforcement jobs' sampling inside the engine: the answers a job's run asks for
//! (`TrainingRun::rollout_request`) become ordinary sequences through the job's own live
//! adapter, queued behind every client request (`Sequence::background`) and run in the same
//! packed iterations; their outputs go to the job, not to a client. When a batch of answers is
//! complete it is graded: `score_model` graders' calls are recorded on a first pass, run as
//! more background sequences, and answered on a second pass; then the run takes the rewards.

use super::*;
use std::cell::RefCell;
use tandem_model::finetune::{Answer, RolloutRequest, StepReport};
use tandem_model::graders::{score_model_request, ModelCall};

/// A job's answers in flight.
pub struct RolloutBatch {
    pub request: RolloutRequest,
    /// Sequence id → the answer it writes.
    seqs: HashMap<u64, usize>,
    pub answers: Vec<Answer>,
    /// `score_model` calls: the recorded calls' sequences and their answers, once started.
    grading: Option<Grading>,
    /// When the first answer was queued.
    pub started: Instant,
}

struct Grading {
    seqs: HashMap<u64, usize>,
    texts: Vec<String>,
}

impl RolloutBatch {
    fn pending(&self) -> usize {
        self.seqs.len() + self.grading.as_ref().map_or(0, |g| g.seqs.len())
    }
}

/// A recorded `score_model` call: model, messages (role, content), sampling params.
type Call = (String, Vec<(String, String)>, serde_json::Value);

/// First grading pass: records each model call and answers it with nothing.
#[derive(Default)]
struct Recorder {
    calls: RefCell<Vec<Call>>,
}

impl ModelCall for Recorder {
    fn call(
        &self,
        model: &str,
        messages: &[(String, String)],
        params: &serde_json::Value,
    ) -> Result<String, String> {
        self.calls
            .borrow_mut()
            .push((model.to_string(), messages.to_vec(), params.clone()));
        Ok(String::new())
    }
}

/// Second pass: the recorded calls' answers, in the same order.
struct Replay {
    texts: Vec<String>,
    next: RefCell<usize>,
}

impl ModelCall for Replay {
    fn call(
        &self,
        _: &str,
        _: &[(String, String)],
        _: &serde_json::Value,
    ) -> Result<String, String> {
        let mut n = self.next.borrow_mut();
        let t = self
            .texts
            .get(*n)
            .cloned()
            .ok_or("a grader asked for more model answers than it did before")?;
        *n += 1;
        Ok(t)
    }
}

impl LlmEngine {
    /// Queues an engine-made sequence (behind client requests) through adapter id `adapter`.
    fn add_background(
        &mut self,
        prompt: Vec<u32>,
        mut params: SamplingParams,
        adapter: Option<u32>,
    ) -> Result<u64, AdmitError> {
        params.end_token_ids = params.stop_token_ids.clone();
        params
            .end_token_ids
            .extend(self.tokenizer.eos_token_ids.iter().copied());
        let id = self.next_id;
        self.next_id += 1;
        let mut seq = Sequence::new(id, prompt, params, adapter);
        seq.background = true;
        self.scheduler.add(seq)?;
        self.texts.insert(id, TextState::default());
        Ok(id)
    }

    /// Queues the answers every running reinforcement job asks for.
    pub(super) fn start_rollouts(&mut self) {
        for i in 0..self.jobs.len() {
            let j = &mut self.jobs[i];
            if !j.state.is_active() || j.rollouts.is_some() {
                continue;
            }
            let Some(req) = j.run.rollout_request() else {
                continue;
            };
            let adapter = j.adapter_id;
            let mut batch = RolloutBatch {
                request: req.clone(),
                seqs: HashMap::new(),
                answers: Vec::new(),
                grading: None,
                started: Instant::now(),
            };
            let mut failed = None;
            for (p, (item, prompt)) in req.prompts.iter().enumerate() {
                for k in 0..req.samples {
                    let params = SamplingParams {
                        max_tokens: req.max_tokens,
                        temperature: req.temperature as f32,
                        seed: Some(req.seed.wrapping_add((p * req.samples + k) as u64)),
                        ..Default::default()
                    };
                    match self.add_background(prompt.clone(), params, Some(adapter)) {
                        Ok(id) => {
                            batch.seqs.insert(id, batch.answers.len());
                            batch.answers.push(Answer {
                                item: *item,
                                tokens: Vec::new(),
                                text: String::new(),
                            });
                        }
                        Err(e) => failed = Some(format!("cannot sample an answer: {e}")),
                    }
                }
            }
            let ids: Vec<u64> = batch.seqs.keys().copied().collect();
            self.jobs[i].rollouts = Some(batch);
            if let Some(msg) = failed {
                for id in ids {
                    self.abort(id);
                }
                self.fail_job(i, msg);
            }
        }
    }

    /// Takes the outputs that belong to jobs' answers (or their graders' calls) out of
    /// `outputs`; completes the batches they finish.
    pub(super) fn collect_rollouts(&mut self, outputs: &mut Vec<RequestOutput>) {
        if !self.jobs.iter().any(|j| j.rollouts.is_some()) {
            return;
        }
        let mut done = Vec::new();
        outputs.retain(|o| {
            for (i, j) in self.jobs.iter_mut().enumerate() {
                let Some(b) = j.rollouts.as_mut() else {
                    continue;
                };
                if let Some(&k) = b.seqs.get(&o.seq_id) {
                    let a = &mut b.answers[k];
                    a.tokens.extend(o.token);
                    a.text.push_str(&o.text);
                    j.sampled_tokens += u64::from(o.token.is_some());
                    if o.finished.is_some() {
                        b.seqs.remove(&o.seq_id);
                    }
                } else if let Some(g) = b.grading.as_mut() {
                    let Some(&k) = g.seqs.get(&o.seq_id) else {
                        continue;
                    };
                    g.texts[k].push_str(&o.text);
                    if o.finished.is_some() {
                        g.seqs.remove(&o.seq_id);
                    }
                } else {
                    continue;
                }
                if b.pending() == 0 {
                    done.push(i);
                }
                return false;
            }
            true
        });
        for i in done {
            self.grade_rollouts(i);
        }
    }

    /// Grades job `i`'s complete answers, starting its graders' model calls first if it has
    /// any; hands the rewards to the run.
    fn grade_rollouts(&mut self, i: usize) {
        let Some(mut b) = self.jobs[i].rollouts.take() else {
            return;
        };
        let graded = match b.grading.take() {
            Some(g) => self.jobs[i].run.grade(
                &b.answers,
                &Replay {
                    texts: g.texts,
                    next: RefCell::new(0),
                },
            ),
            None => {
                let rec = Recorder::default();
                let r = self.jobs[i].run.grade(&b.answers, &rec);
                let calls = rec.calls.into_inner();
                if r.is_ok() && !calls.is_empty() {
                    match self.start_grader_calls(calls) {
                        Ok(g) => {
                            b.grading = Some(g);
                            self.jobs[i].rollouts = Some(b);
                        }
                        Err(e) => self.fail_job(i, e),
                    }
                    return;
                }
                r
            }
        };
        let rewards = match graded {
            Ok(r) => r,
            Err(e) => return self.fail_job(i, format!("grading failed: {e}")),
        };
        let j = &mut self.jobs[i];
        j.answers_sampled += b.answers.len() as u64;
        j.sampling_seconds += b.started.elapsed().as_secs_f64();
        j.last_rollouts = Some((b.request, b.answers.clone(), rewards.clone()));
        match j.run.take_answers(b.answers, rewards) {
            Ok(Some(report)) => {
                self.after_optimizer_step(i, report);
            }
            Ok(None) => {}
            Err(e) => self.fail_job(i, e.to_string()),
        }
    }

    /// Queues `score_model` calls (chat messages through the named adapter, or the base model).
    fn start_grader_calls(&mut self, calls: Vec<Call>) -> Result<Grading, String> {
        let mut g = Grading {
            seqs: HashMap::new(),
            texts: vec![String::new(); calls.len()],
        };
        for (k, (model, messages, params)) in calls.into_iter().enumerate() {
            let (prompt, sampling) = score_model_request(&self.tokenizer, &messages, &params)
                .map_err(|e| format!("score_model grader: {e}"))?;
            let adapter = self.runner.adapters.id(&model);
            let id = self
                .add_background(prompt, sampling, adapter)
                .map_err(|e| format!("score_model grader: {e}"))?;
            g.seqs.insert(id, k);
        }
        Ok(g)
    }

    /// What follows an optimizer step of job `i`: its report, the live adapter's new weights,
    /// a checkpoint when due, the job's end when it was the last. Returns whether the job
    /// stopped.
    pub(super) fn after_optimizer_step(&mut self, i: usize, report: StepReport) -> bool {
        let j = &mut self.jobs[i];
        tracing::info!(job = %j.name, step = report.step, loss = report.loss, "finetuning step");
        j.reports.push(report);
        let id = j.adapter_id;
        let adapter = j.run.lora.to_adapter(None);
        let done = j.run.is_done();
        // Cached K/V of the old weights must not serve requests from now on.
        self.scheduler.adapter_weights_changed(id);
        if let Err(e) = adapter.and_then(|a| self.runner.adapters.replace_live(id, a)) {
            self.fail_job(i, e.to_string());
            return true;
        }
        if let Err(e) = self.checkpoint(i, report.step) {
            tracing::warn!(job = %self.jobs[i].name, error = %e, "cannot write a checkpoint");
            self.jobs[i].checkpoint_errors.push((report.step, e));
        }
        if done {
            self.finish_job(i);
        }
        done
    }

    /// Aborts a job's answers in flight (it stopped).
    pub(super) fn drop_rollouts(&mut self, i: usize) {
        if let Some(b) = self.jobs[i].rollouts.take() {
            let ids: Vec<u64> = b
                .seqs
                .keys()
                .chain(b.grading.iter().flat_map(|g| g.seqs.keys()))
                .copied()
                .collect();
            for id in ids {
                self.abort(id);
            }
        }
    }
}
