//! A training run cut into schedulable units, on a KV cache and adapter registry it does not
//! own: whoever runs it (`Finetuner` alone, or the co-serving engine between inference tokens)
//! asks for the next forward chunk, places it in a packed batch with `capture`, hands back the
//! captured activations, and runs backward steps as its budget allows. The run does the rest:
//! which sequence is next, the loss weighting over the optimizer batch, gradient accumulation,
//! AdamW and the learning-rate schedule.

use super::grpo::GrpoStats;
use super::objective::{DpoStats, Method};
use super::unit::{ChunkRef, ForwardChunk, Unit};
use super::{lr_factor, AdamW, AdamWConfig, GradAccum, StepReport, TrainConfig, TrainableLora};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::collections::HashMap;

/// What `backward_step` completed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// More of the current unit's backward is due.
    Stepped,
    /// The unit (a sequence, or a DPO pair) is done; its KV blocks may go.
    SequenceDone,
    /// The unit is done and so is an optimizer step: the adapter's weights changed.
    OptimizerStep(StepReport),
}

/// One finished evaluation on the validation examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    /// The optimizer step it followed.
    pub step: usize,
    /// Mean loss per target token (DPO: mean DPO loss per pair).
    pub loss: f64,
    /// Share of target tokens that were the model's most likely token.
    pub accuracy: f64,
    /// DPO: rewards over the validation pairs.
    pub dpo: Option<DpoStats>,
    /// Reinforcement: the validation prompts' sampled answers' rewards.
    pub grpo: Option<GrpoStats>,
}

/// An evaluation in progress.
#[derive(Debug, Clone, Copy)]
struct EvalProgress {
    step: usize,
    next: usize,
    loss_sum: f64,
    targets: usize,
    correct: usize,
    dpo: DpoStats,
}

pub struct TrainingRun {
    pub cfg: TrainConfig,
    pub lora: TrainableLora,
    pub(crate) opt: AdamW,
    data: TrainData,
    /// Optimizer steps done.
    pub step: usize,
    /// Items of the optimizer step in progress, and how many have started.
    batch: Vec<usize>,
    started: usize,
    /// Positions in `batch` of the unit in flight's items (several short examples packed
    /// into one unit, or one item).
    unit_items: std::ops::Range<usize>,
    weight: f64,
    unit: Option<Unit>,
    /// Gradients of the optimizer step so far, and of the unit in flight (kept apart so
    /// that the unit can restart).
    acc: GradAccum,
    seq_acc: GradAccum,
    loss: f64,
    targets: usize,
    correct: usize,
    tokens: usize,
    peak: usize,
    dpo: DpoStats,
    /// Held-out items, evaluated (forward only) after every epoch's last step.
    validation: TrainData,
    eval: Option<EvalProgress>,
    /// Whether the unit in flight is a validation item (index).
    seq_eval: Option<usize>,
    /// Finished evaluations.
    pub evals: Vec<Eval>,
    /// KV block size the units' members are laid out in.
    kv_block: usize,
    /// DPO: the frozen reference's Σ log p per (validation?, item), computed once.
    ref_logps: HashMap<(bool, usize), Vec<Option<f64>>>,
    /// Reinforcement: sampling, rewards and the step's answers.
    rl: reinforce::RlState,
}

mod packing;
mod reinforce;
mod train_data;
pub use reinforce::{Answer, RolloutRequest};
use train_data::check_kind;
pub use train_data::{Prompts, TrainData};

impl TrainingRun {
    pub fn new(data: impl Into<TrainData>, cfg: TrainConfig, lora: TrainableLora) -> Result<Self> {
        let data = data.into();
        if data.is_empty() {
            return Err(ModelError::Batch("no training examples".into()));
        }
        check_kind(&cfg.method, &data)?;
        let opt = AdamW::new(AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
            ..Default::default()
        });
        let validation = match &data {
            TrainData::Supervised(_) => TrainData::Supervised(Vec::new()),
            TrainData::Preference(_) => TrainData::Preference(Vec::new()),
            TrainData::Prompts(p) => TrainData::Prompts(Prompts {
                items: Vec::new(),
                grader: p.grader.clone(),
            }),
        };
        Ok(Self {
            cfg,
            lora,
            opt,
            data,
            step: 0,
            batch: Vec::new(),
            started: 0,
            unit_items: 0..0,
            weight: 0.0,
            unit: None,
            acc: GradAccum::default(),
            seq_acc: GradAccum::default(),
            loss: 0.0,
            targets: 0,
            correct: 0,
            tokens: 0,
            peak: 0,
            dpo: DpoStats::default(),
            validation,
            eval: None,
            seq_eval: None,
            evals: Vec::new(),
            kv_block: 16,
            ref_logps: HashMap::new(),
            rl: Default::default(),
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.data.len().div_ceil(self.cfg.batch_size)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.cfg.epochs
    }

    /// Every optimizer step and the last evaluation are done.
    pub fn is_done(&self) -> bool {
        self.step >= self.total_steps() && self.eval.is_none() && !self.rl.eval_due
    }

    /// Evaluates the loss on `examples` (forward only) after the last step of every epoch.
    /// Items of the other kind than the training data's are refused.
    pub fn set_validation(&mut self, examples: impl Into<TrainData>) -> Result<()> {
        let v = examples.into();
        if !v.is_empty() {
            check_kind(&self.cfg.method, &v)?;
        }
        self.validation = v;
        Ok(())
    }

    /// Lays units out in KV blocks of `block` positions (the cache's block size).
    pub fn set_kv_block_size(&mut self, block: usize) {
        self.kv_block = block.max(1);
    }

    /// The most KV positions one unit needs (a sequence, or a pair's two sequences in whole
    /// blocks).
    pub fn max_len(&self) -> usize {
        let b = self.kv_block;
        let answer = match self.cfg.method {
            Method::Reinforcement(r) => r.max_tokens,
            _ => 0,
        };
        let most = |d: &TrainData| {
            (0..d.len())
                .map(|i| d.kv_len(i, b, answer))
                .max()
                .unwrap_or(0)
        };
        let single = most(&self.data).max(most(&self.validation));
        if !self.cfg.pack || !matches!(self.data, TrainData::Supervised(_)) {
            return single;
        }
        // A packed unit: at most the pack budget's tokens, each member in whole blocks.
        let budget = self.pack_budget();
        let members = self.cfg.batch_size.min(budget);
        single.max((budget.div_ceil(b) + members) * b)
    }

    /// The items of optimizer step `step` (0-based): each epoch visits every item once, in an
    /// order shuffled from the seed and the epoch (in file order without `shuffle`).
    pub fn batch_indices(&self, step: usize) -> Vec<usize> {
        let spe = self.steps_per_epoch();
        let (epoch, i) = (step / spe, step % spe);
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(
                self.cfg.seed.wrapping_add(epoch as u64),
            ));
        }
        let bs = self.cfg.batch_size;
        order[i * bs..((i + 1) * bs).min(order.len())].to_vec()
    }

    /// The unit in flight, starting the next one of the optimizer batch if none is. Returns
    /// the KV positions it needs (None when the run is done).
    pub fn current_len(&mut self) -> Option<usize> {
        if self.unit.is_none() {
            if let Some(e) = self.eval {
                self.seq_eval = Some(e.next);
                self.unit = Some(self.new_unit());
                return self.unit.as_ref().map(Unit::kv_len);
            }
            if self.is_done() {
                return None;
            }
            if self.cfg.method.is_reinforcement() {
                return self.rl_next_unit();
            }
            if self.started == 0 {
                self.batch = self.batch_indices(self.step);
                let total: usize = self.batch.iter().map(|&i| self.data.targets(i)).sum();
                self.weight = 1.0 / total.max(1) as f64;
            }
            let first = self.started;
            self.started += self.pack_len(first);
            self.unit_items = first..self.started;
            self.unit = Some(self.new_unit());
        }
        self.unit.as_ref().map(Unit::kv_len)
    }

    /// Tokens of the unit in flight (its sequences', unpadded); 0 when none is.
    pub fn current_tokens(&self) -> usize {
        self.unit.as_ref().map_or(0, Unit::tokens)
    }

    /// A fresh unit for the item `started` points past (or the validation item in flight).
    fn new_unit(&self) -> Unit {
        if self.cfg.method.is_reinforcement() {
            return self.rl_unit(self.batch[self.started - 1]);
        }
        let (data, i, eval) = match self.seq_eval {
            Some(i) => (&self.validation, i, true),
            None => (&self.data, self.batch[self.started - 1], false),
        };
        let refs = self.ref_logps.get(&(eval, i)).cloned().unwrap_or_default();
        let members = match eval {
            true => data.members(i),
            false => self
                .unit_items
                .clone()
                .flat_map(|p| data.members(self.batch[p]))
                .collect(),
        };
        Unit::new(
            &members,
            self.cfg.method,
            self.cfg.chunk_tokens,
            if eval { 1.0 } else { self.weight },
            if eval { 1 } else { self.batch.len() },
            &refs,
            self.kv_block,
            eval,
        )
    }

    /// Drops the unit in flight's progress (its activations, gradients and loss) so that it
    /// starts again from its first forward chunk: for when its KV blocks had to go. Returns
    /// whether a unit was in flight.
    pub fn restart_sequence(&mut self) -> bool {
        if self.unit.is_none() {
            return false;
        }
        self.seq_acc = GradAccum::default();
        self.unit = Some(self.new_unit());
        true
    }

    /// Whether a unit is in flight past its first forward chunk (holding KV it needs).
    pub fn sequence_started(&self) -> bool {
        self.unit.as_ref().is_some_and(Unit::started)
    }

    /// The next forward chunk of the unit in flight.
    pub fn next_forward(&mut self) -> Option<ForwardChunk> {
        self.next_forward_max(usize::MAX)
    }

    /// The next forward chunk, at most `max` tokens (at least one; the configured chunk size
    /// is the most).
    pub fn next_forward_max(&mut self, max: usize) -> Option<ForwardChunk> {
        self.current_len()?;
        self.unit.as_ref()?.next_forward_max(max)
    }

    /// Hands back the captured activations of forward chunk `id`. Returns true when that
    /// ended a validation item (its KV blocks may go).
    pub fn finish_forward(
        &mut self,
        model: &Llama,
        id: ChunkRef,
        inputs: Vec<candle_core::Tensor>,
    ) -> Result<bool> {
        let unit = self
            .unit
            .as_mut()
            .ok_or_else(|| ModelError::Batch("no training sequence in flight".into()))?;
        unit.finish_forward(model, id, inputs)?;
        self.peak = self.peak.max(unit.held_bytes());
        if id.reference && self.cfg.method.is_dpo() {
            let key = match self.seq_eval {
                Some(i) => (true, i),
                None => (false, self.batch[self.started - 1]),
            };
            self.ref_logps.insert(key, unit.ref_logps());
        }
        if self.seq_eval.is_none() || !unit.forwards_done() {
            return Ok(false);
        }
        let (loss, targets, correct) = unit.loss();
        let pair = unit.dpo;
        self.unit = None;
        self.seq_eval = None;
        if let Some(mut e) = self.eval.take() {
            e.loss_sum += loss;
            e.targets += targets;
            e.correct += correct;
            if let Some(p) = &pair {
                e.dpo.add(p);
            }
            if e.next + 1 < self.validation.len() {
                e.next += 1;
                self.eval = Some(e);
            } else {
                let dpo = pair.map(|_| e.dpo);
                self.evals.push(Eval {
                    step: e.step,
                    loss: match dpo {
                        Some(d) => d.loss(),
                        None => e.loss_sum / e.targets.max(1) as f64,
                    },
                    accuracy: e.correct as f64 / e.targets.max(1) as f64,
                    dpo,
                    grpo: None,
                });
            }
        }
        Ok(true)
    }

    /// Whether the unit in flight is in its backward.
    pub fn backward_due(&self) -> bool {
        self.unit.as_ref().is_some_and(Unit::backward_due)
    }

    /// The chunk the next backward step works on: (first position, tokens).
    pub fn next_backward_chunk(&self) -> Option<(usize, usize)> {
        self.unit.as_ref()?.next_backward_chunk()
    }

    /// One backward step of the unit in flight (its K/V in `cache` through `block_table`, the
    /// unit's blocks); at the end of the optimizer batch, the AdamW update.
    pub fn backward_step(
        &mut self,
        model: &Llama,
        cache: &KvCache,
        block_table: &[u32],
    ) -> Result<Progress> {
        let unit = self
            .unit
            .as_mut()
            .ok_or_else(|| ModelError::Batch("no training sequence in flight".into()))?;
        let done = unit.backward_step(model, cache, block_table, &self.lora, &mut self.seq_acc)?;
        self.peak = self.peak.max(unit.held_bytes());
        if !done {
            return Ok(Progress::Stepped);
        }
        self.acc.merge(std::mem::take(&mut self.seq_acc))?;
        let (loss, targets, correct) = unit.loss();
        self.loss += loss;
        self.targets += targets;
        self.correct += correct;
        self.tokens += unit.tokens();
        if let Some(p) = &unit.dpo {
            self.dpo.add(p);
        }
        if let Some(kl) = unit.kl {
            self.rl.stats.kl_sum += kl;
            self.rl.stats.kl_answers += 1;
        }
        self.unit = None;
        if self.started < self.batch.len() {
            return Ok(Progress::SequenceDone);
        }
        Ok(Progress::OptimizerStep(self.optimizer_step()?))
    }

    /// The AdamW update at the end of an optimizer batch, its report, and the evaluation due
    /// after it.
    fn optimizer_step(&mut self) -> Result<StepReport> {
        let total_steps = self.total_steps();
        let lr = self.cfg.lr
            * lr_factor(
                self.cfg.schedule,
                self.step,
                self.cfg.warmup_steps,
                total_steps,
            );
        let grads: HashMap<String, candle_core::Tensor> = std::mem::take(&mut self.acc.grads);
        // A reinforcement batch whose answers all got their group's reward has no gradient: the
        // step counts, the weights stay.
        let info = if grads.is_empty() && self.cfg.method.is_reinforcement() {
            super::StepInfo { grad_norm: 0.0, lr }
        } else {
            self.opt.step(&self.lora.named_params(), &grads, lr)?
        };
        self.step += 1;
        let dpo = self.cfg.method.is_dpo().then_some(self.dpo);
        let grpo = self.cfg.method.is_reinforcement().then_some(self.rl.stats);
        let report = StepReport {
            step: self.step,
            total_steps,
            loss: match (dpo, grpo) {
                (Some(d), _) => d.loss(),
                (_, Some(_)) => self.rl_loss(),
                _ => self.loss / self.targets.max(1) as f64,
            },
            accuracy: self.correct as f64 / self.targets.max(1) as f64,
            lr,
            grad_norm: info.grad_norm,
            tokens: self.tokens,
            targets: self.targets,
            peak_activation_bytes: self.peak,
            dpo,
            grpo,
        };
        self.started = 0;
        (
            self.loss,
            self.targets,
            self.correct,
            self.tokens,
            self.peak,
        ) = (0.0, 0, 0, 0, 0);
        self.dpo = DpoStats::default();
        if self.cfg.method.is_reinforcement() {
            self.rl_step_done();
            return Ok(report);
        }
        let epoch_end =
            self.step.is_multiple_of(self.steps_per_epoch()) || self.step >= total_steps;
        if epoch_end && !self.validation.is_empty() {
            self.eval = Some(EvalProgress {
                step: self.step,
                next: 0,
                loss_sum: 0.0,
                targets: 0,
                correct: 0,
                dpo: DpoStats::default(),
            });
        }
        Ok(report)
    }
}
