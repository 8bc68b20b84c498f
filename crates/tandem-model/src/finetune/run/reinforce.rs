//! A reinforcement run's sampling side: it asks for answers (`rollout_request`: the step's
//! prompts, `group` answers each, or the validation prompts for an evaluation), whoever runs it
//! samples them from the policy (the co-serving engine, as requests through the job's adapter),
//! the run grades them (`grade`), turns rewards into group-normalised advantages and the
//! answers into units (`take_answers`), then trains on them as on any units.

use super::super::grpo::{advantages, GrpoStats, Rollout};
use super::super::{Example, StepReport};
use super::{TrainData, TrainingRun};
use crate::error::{ModelError, Result};
use crate::finetune::objective::Method;
use crate::finetune::unit::Unit;
use crate::graders::{Grader, ModelCall};

/// Answers a run wants sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRequest {
    /// For an evaluation (on the validation prompts), not for training.
    pub eval: bool,
    /// (item index, prompt tokens), each answered `samples` times.
    pub prompts: Vec<(usize, Vec<u32>)>,
    pub samples: usize,
    pub max_tokens: usize,
    pub temperature: f64,
    /// Seeds the answers: answer `k` of prompt `j` uses `seed + j * samples + k`.
    pub seed: u64,
}

/// One sampled answer, in the request's order (prompt by prompt, `samples` each).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub item: usize,
    /// The answer's tokens (with the end-of-turn token that ended it, if one did).
    pub tokens: Vec<u32>,
    /// Its text, as a client would have got it.
    pub text: String,
}

#[derive(Debug, Default)]
pub(super) struct RlState {
    /// A request handed out and not answered yet (whether for an evaluation).
    asked: Option<bool>,
    /// The step's trainable answers, once graded.
    rollouts: Option<Vec<Rollout>>,
    /// Answers sampled for the step (GRPO's N).
    answers: usize,
    /// Σ -A_i / N over the step's answers (the loss's policy term).
    policy_term: f64,
    pub(super) stats: GrpoStats,
    /// An evaluation is due before the next step (before the first, and after every
    /// `eval_interval` steps and the last, when there are validation prompts).
    pub(super) eval_due: bool,
    started: bool,
}

impl TrainingRun {
    fn reinforce(&self) -> Option<crate::finetune::grpo::Reinforce> {
        match self.cfg.method {
            Method::Reinforcement(r) => Some(r),
            _ => None,
        }
    }

    /// The grader of a reinforcement run.
    pub fn grader(&self) -> Option<&Grader> {
        match &self.data {
            TrainData::Prompts(p) => Some(&p.grader),
            _ => None,
        }
    }

    /// The answers the run needs sampled before it can go on, once (None: none, or already
    /// asked and not answered).
    pub fn rollout_request(&mut self) -> Option<RolloutRequest> {
        let r = self.reinforce()?;
        if !self.rl.started {
            // The baseline evaluation, before the first step (a resumed run had it already).
            self.rl.started = true;
            self.rl.eval_due = !self.validation.is_empty() && self.step == 0;
        }
        if self.rl.asked.is_some() || self.unit.is_some() || self.rl.rollouts.is_some() {
            return None;
        }
        let (eval, data, idx, samples) = if self.rl.eval_due {
            let n = self.validation.len();
            (
                true,
                &self.validation,
                (0..n).collect(),
                r.eval_samples.max(1),
            )
        } else if self.step < self.total_steps() && self.started == 0 {
            (
                false,
                &self.data,
                self.batch_indices(self.step),
                r.group.max(1),
            )
        } else {
            return None;
        };
        let TrainData::Prompts(p) = data else {
            return None;
        };
        let prompts = idx
            .iter()
            .map(|&i| (i, p.items[i].prompt.clone()))
            .collect();
        self.rl.asked = Some(eval);
        Some(RolloutRequest {
            eval,
            prompts,
            samples,
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            seed: self
                .cfg
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(self.step as u64 * 7919 + u64::from(eval)),
        })
    }

    /// Whether the run waits for the answers it asked for.
    pub fn awaiting_answers(&self) -> bool {
        self.rl.asked.is_some()
    }

    /// Grades answers to the request in flight (`call` runs `score_model` graders).
    pub fn grade(
        &self,
        answers: &[Answer],
        call: &dyn ModelCall,
    ) -> std::result::Result<Vec<f64>, String> {
        let grader = self.grader().ok_or("not a reinforcement run")?;
        let data = if self.rl.asked == Some(true) {
            &self.validation
        } else {
            &self.data
        };
        let TrainData::Prompts(p) = data else {
            return Err("not a reinforcement run".into());
        };
        answers
            .iter()
            .map(|a| {
                let item = &p
                    .items
                    .get(a.item)
                    .ok_or_else(|| format!("no prompt {}", a.item))?
                    .item;
                grader.grade(&a.text, item, call).map(|g| g.reward)
            })
            .collect()
    }

    /// Takes the graded answers to the request in flight. An evaluation's become an `Eval`;
    /// a step's become its units, or, when every group's rewards were equal (no gradient), the
    /// step ends at once (its report is returned).
    pub fn take_answers(
        &mut self,
        answers: Vec<Answer>,
        rewards: Vec<f64>,
    ) -> Result<Option<StepReport>> {
        let r = self
            .reinforce()
            .ok_or_else(|| ModelError::Batch("not a reinforcement run".into()))?;
        let eval = self
            .rl
            .asked
            .take()
            .ok_or_else(|| ModelError::Batch("no answers were asked for".into()))?;
        if answers.len() != rewards.len() {
            return Err(ModelError::Batch(format!(
                "{} rewards for {} answers",
                rewards.len(),
                answers.len()
            )));
        }
        let mut stats = GrpoStats::default();
        for (a, &rw) in answers.iter().zip(&rewards) {
            stats.add_reward(rw, a.tokens.len());
        }
        if eval {
            self.rl.eval_due = false;
            self.evals.push(super::Eval {
                step: self.step,
                loss: -stats.mean_reward(),
                accuracy: stats.mean_reward(),
                dpo: None,
                grpo: Some(stats),
            });
            return Ok(None);
        }
        let adv = advantages(&rewards, r.group.max(1));
        let n = answers.len();
        self.rl.answers = n;
        self.rl.policy_term = -adv.iter().sum::<f64>() / n.max(1) as f64;
        let TrainData::Prompts(p) = &self.data else {
            return Err(ModelError::Batch("not a reinforcement run".into()));
        };
        let rollouts: Vec<Rollout> = answers
            .into_iter()
            .zip(rewards.iter().zip(&adv))
            .filter(|(a, (_, &ad))| !a.tokens.is_empty() && (ad != 0.0 || r.beta != 0.0))
            .map(|(a, (&reward, &advantage))| Rollout {
                item: a.item,
                prompt: p.items[a.item].prompt.clone(),
                answer: a.tokens,
                reward,
                advantage,
            })
            .collect();
        stats.trained = rollouts.len();
        self.rl.stats = stats;
        if rollouts.is_empty() {
            self.rl.rollouts = None;
            self.batch.clear();
            self.started = 0;
            return self.optimizer_step().map(Some);
        }
        self.rl.rollouts = Some(rollouts);
        Ok(None)
    }

    /// The next unit of the step's answers (None: waiting for answers, or the run is done).
    pub(super) fn rl_next_unit(&mut self) -> Option<usize> {
        let n = self.rl.rollouts.as_ref()?.len();
        if self.started == 0 {
            self.batch = (0..n).collect();
        }
        if self.started >= self.batch.len() {
            return None;
        }
        self.started += 1;
        self.unit = Some(self.new_unit());
        self.unit.as_ref().map(Unit::kv_len)
    }

    /// The unit for answer `k` of the step.
    pub(super) fn rl_unit(&self, k: usize) -> Unit {
        let r = self.reinforce().unwrap_or_default();
        let ro = &self.rl.rollouts.as_ref().expect("answers are taken")[k];
        Unit::rollout(
            &Example::with_prompt(&ro.prompt, &ro.answer),
            self.cfg.chunk_tokens,
            ro.advantage,
            self.rl.answers,
            r.beta,
            None,
            self.kv_block,
        )
    }

    /// The step's GRPO loss: `Σ_i (-A_i + β KL_i) / N`.
    pub(super) fn rl_loss(&self) -> f64 {
        let beta = self.reinforce().map_or(0.0, |r| r.beta);
        let kl = self.rl.stats.kl_sum / self.rl.answers.max(1) as f64;
        self.rl.policy_term + beta * kl
    }

    /// After a step's update: its answers go; an evaluation is due every `eval_interval`
    /// steps (every epoch when 0) and after the last.
    pub(super) fn rl_step_done(&mut self) {
        self.rl.rollouts = None;
        self.rl.stats = GrpoStats::default();
        // "auto" (0): every epoch.
        let interval = match self.reinforce().map_or(0, |r| r.eval_interval) {
            0 => self.steps_per_epoch(),
            n => n,
        };
        let last = self.step >= self.total_steps();
        self.rl.eval_due = !self.validation.is_empty()
            && (last || (interval > 0 && self.step.is_multiple_of(interval)));
    }
}
