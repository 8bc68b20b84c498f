//! A training run cut into schedulable units, on a KV cache and adapter registry it does not
//! own: whoever runs it (`Finetuner` alone, or the co-serving engine between inference tokens)
//! asks for the next forward chunk, places it in a packed batch with `capture`, hands back the
//! captured activations, and runs backward steps as its budget allows. The run does the rest:
//! which sequence is next, the loss weighting over the optimizer batch, gradient accumulation,
//! AdamW and the learning-rate schedule.

use super::{
    lr_factor, AdamW, AdamWConfig, Example, GradAccum, SeqPhase, SeqTrain, StepReport, TrainConfig,
    TrainableLora,
};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::ModelConfig;
use candle_core::{DType, Device};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// What `backward_step` completed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// More of the current sequence's backward is due.
    Stepped,
    /// The sequence is done; its KV blocks may go.
    SequenceDone,
    /// The sequence is done and so is an optimizer step: the adapter's weights changed.
    OptimizerStep(StepReport),
}

/// One finished evaluation on the validation examples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    /// The optimizer step it followed.
    pub step: usize,
    /// Mean loss per target token.
    pub loss: f64,
    /// Share of target tokens that were the model's most likely token.
    pub accuracy: f64,
}

pub struct TrainingRun {
    pub cfg: TrainConfig,
    pub lora: TrainableLora,
    pub(crate) opt: AdamW,
    data: Vec<Example>,
    /// Optimizer steps done.
    pub step: usize,
    /// Examples of the optimizer step in progress, and how many have started.
    batch: Vec<usize>,
    started: usize,
    weight: f64,
    seq: Option<SeqTrain>,
    /// Gradients of the optimizer step so far, and of the sequence in flight (kept apart so
    /// that the sequence can restart).
    acc: GradAccum,
    seq_acc: GradAccum,
    loss: f64,
    targets: usize,
    correct: usize,
    tokens: usize,
    peak: usize,
    /// Held-out examples, evaluated (forward only) after every epoch's last step.
    validation: Vec<Example>,
    /// The evaluation in progress: (after step, next example, Σ loss, targets, correct).
    eval: Option<(usize, usize, f64, usize, usize)>,
    /// Whether the sequence in flight is a validation example (index).
    seq_eval: Option<usize>,
    /// Finished evaluations.
    pub evals: Vec<Eval>,
}

impl TrainingRun {
    pub fn new(data: Vec<Example>, cfg: TrainConfig, lora: TrainableLora) -> Result<Self> {
        if data.is_empty() {
            return Err(ModelError::Batch("no training examples".into()));
        }
        let opt = AdamW::new(AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
            ..Default::default()
        });
        Ok(Self {
            cfg,
            lora,
            opt,
            data,
            step: 0,
            batch: Vec::new(),
            started: 0,
            weight: 0.0,
            seq: None,
            acc: GradAccum::default(),
            seq_acc: GradAccum::default(),
            loss: 0.0,
            targets: 0,
            correct: 0,
            tokens: 0,
            peak: 0,
            validation: Vec::new(),
            eval: None,
            seq_eval: None,
            evals: Vec::new(),
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
        self.step >= self.total_steps() && self.eval.is_none()
    }

    /// Evaluates the loss on `examples` (forward only) after the last step of every epoch.
    pub fn set_validation(&mut self, examples: Vec<Example>) {
        self.validation = examples;
    }

    /// The longest example, in tokens (what one sequence's KV needs at most).
    pub fn max_len(&self) -> usize {
        self.data
            .iter()
            .chain(&self.validation)
            .map(|e| e.tokens.len())
            .max()
            .unwrap_or(0)
    }

    /// The examples of optimizer step `step` (0-based): each epoch visits every example once,
    /// in an order shuffled from the seed and the epoch (in file order without `shuffle`).
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

    /// The sequence in flight, starting the next one of the optimizer batch if none is.
    /// Returns its length in tokens (None when the run is done).
    pub fn current_len(&mut self) -> Option<usize> {
        if self.seq.is_none() {
            if let Some((_, next, ..)) = self.eval {
                self.seq_eval = Some(next);
                self.seq = Some(self.new_seq());
                return self.seq.as_ref().map(SeqTrain::len);
            }
            if self.is_done() {
                return None;
            }
            if self.started == 0 {
                self.batch = self.batch_indices(self.step);
                let total: usize = self.batch.iter().map(|&i| self.data[i].num_targets()).sum();
                self.weight = 1.0 / total.max(1) as f64;
            }
            self.started += 1;
            self.seq = Some(self.new_seq());
        }
        self.seq.as_ref().map(SeqTrain::len)
    }

    /// A fresh state for the example `started` points past.
    fn new_seq(&self) -> SeqTrain {
        let (ex, weight) = match self.seq_eval {
            Some(i) => (&self.validation[i], 1.0),
            None => (&self.data[self.batch[self.started - 1]], self.weight),
        };
        SeqTrain::new(ex.tokens.clone(), &ex.target, self.cfg.chunk_tokens, weight)
    }

    /// Drops the sequence in flight's progress (its activations, gradients and loss) so that
    /// it starts again from its first forward chunk: for when its KV blocks had to go.
    /// Returns whether a sequence was in flight.
    pub fn restart_sequence(&mut self) -> bool {
        if self.seq.is_none() {
            return false;
        }
        self.seq_acc = GradAccum::default();
        self.seq = Some(self.new_seq());
        true
    }

    /// Whether a sequence is in flight past its first forward chunk (holding KV it needs).
    pub fn sequence_started(&self) -> bool {
        self.seq
            .as_ref()
            .is_some_and(|s| s.phase != SeqPhase::Forward(0))
    }

    /// The next forward chunk of the sequence in flight: (chunk, first position, tokens).
    pub fn next_forward(&mut self) -> Option<(usize, usize, Vec<u32>)> {
        self.next_forward_max(usize::MAX)
    }

    /// The next forward chunk, at most `max` tokens (at least one; the configured chunk size
    /// is the most).
    pub fn next_forward_max(&mut self, max: usize) -> Option<(usize, usize, Vec<u32>)> {
        self.current_len()?;
        let (c, s, t) = self.seq.as_ref()?.next_forward_max(max)?;
        Some((c, s, t.to_vec()))
    }

    /// Hands back the captured activations of forward chunk `c`. Returns true when that ended
    /// a validation example (its KV blocks may go).
    pub fn finish_forward(
        &mut self,
        model: &Llama,
        c: usize,
        inputs: Vec<candle_core::Tensor>,
    ) -> Result<bool> {
        let seq = self
            .seq
            .as_mut()
            .ok_or_else(|| ModelError::Batch("no training sequence in flight".into()))?;
        seq.finish_forward(model, c, inputs)?;
        self.peak = self.peak.max(seq.held_bytes());
        if self.seq_eval.is_none() || matches!(seq.phase, SeqPhase::Forward(_)) {
            return Ok(false);
        }
        let (loss, targets, correct) = (seq.loss_sum, seq.targets, seq.correct);
        self.seq = None;
        self.seq_eval = None;
        if let Some((step, next, sum, n, ok)) = self.eval.take() {
            let (sum, n, ok) = (sum + loss, n + targets, ok + correct);
            if next + 1 < self.validation.len() {
                self.eval = Some((step, next + 1, sum, n, ok));
            } else {
                self.evals.push(Eval {
                    step,
                    loss: sum / n.max(1) as f64,
                    accuracy: ok as f64 / n.max(1) as f64,
                });
            }
        }
        Ok(true)
    }

    /// Whether the sequence in flight is in its backward.
    pub fn backward_due(&self) -> bool {
        matches!(
            self.seq.as_ref().map(|s| s.phase),
            Some(SeqPhase::Backward(..))
        )
    }

    /// The chunk the next backward step works on: (first position, tokens).
    pub fn next_backward_chunk(&self) -> Option<(usize, usize)> {
        let seq = self.seq.as_ref()?;
        match seq.phase {
            SeqPhase::Backward(_, c) => Some(seq.chunks[c]),
            _ => None,
        }
    }

    /// One backward step of the sequence in flight (its K/V in `cache` through `block_table`);
    /// at the end of the optimizer batch, the AdamW update.
    pub fn backward_step(
        &mut self,
        model: &Llama,
        cache: &KvCache,
        block_table: &[u32],
    ) -> Result<Progress> {
        let seq = self
            .seq
            .as_mut()
            .ok_or_else(|| ModelError::Batch("no training sequence in flight".into()))?;
        seq.backward_step(model, cache, block_table, &self.lora, &mut self.seq_acc)?;
        self.peak = self.peak.max(seq.held_bytes());
        if seq.phase != SeqPhase::Done {
            return Ok(Progress::Stepped);
        }
        self.acc.merge(std::mem::take(&mut self.seq_acc))?;
        self.loss += seq.loss_sum;
        self.targets += seq.targets;
        self.correct += seq.correct;
        self.tokens += seq.len();
        self.seq = None;
        if self.started < self.batch.len() {
            return Ok(Progress::SequenceDone);
        }
        let total_steps = self.total_steps();
        let lr = self.cfg.lr
            * lr_factor(
                self.cfg.schedule,
                self.step,
                self.cfg.warmup_steps,
                total_steps,
            );
        let grads: HashMap<String, candle_core::Tensor> = std::mem::take(&mut self.acc.grads);
        let info = self.opt.step(&self.lora.named_params(), &grads, lr)?;
        self.step += 1;
        let report = StepReport {
            step: self.step,
            total_steps,
            loss: self.loss / self.targets.max(1) as f64,
            accuracy: self.correct as f64 / self.targets.max(1) as f64,
            lr,
            grad_norm: info.grad_norm,
            tokens: self.tokens,
            targets: self.targets,
            peak_activation_bytes: self.peak,
        };
        self.started = 0;
        (
            self.loss,
            self.targets,
            self.correct,
            self.tokens,
            self.peak,
        ) = (0.0, 0, 0, 0, 0);
        let epoch_end =
            self.step.is_multiple_of(self.steps_per_epoch()) || self.step >= total_steps;
        if epoch_end && !self.validation.is_empty() {
            self.eval = Some((self.step, 0, 0.0, 0, 0));
        }
        Ok(Progress::OptimizerStep(report))
    }

    /// Writes a checkpoint: the adapter (PEFT), the AdamW state (`optimizer.safetensors`) and
    /// `trainer_state.json` (step, config), so that `resume` continues exactly. Written to a
    /// temporary folder and renamed into place.
    pub fn save_checkpoint(&self, dir: &Path, base_model: Option<String>) -> Result<()> {
        let tmp = dir.with_extension("tmp");
        let r = self.write_checkpoint(&tmp, dir, base_model);
        if r.is_err() {
            // A write that failed (a full disk) leaves nothing behind to take space.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r
    }

    fn write_checkpoint(&self, tmp: &Path, dir: &Path, base_model: Option<String>) -> Result<()> {
        let _ = std::fs::remove_dir_all(tmp);
        std::fs::create_dir_all(tmp).map_err(|e| ModelError::io(tmp, e))?;
        self.lora.to_adapter(base_model.clone())?.save(tmp)?;
        let state = self.opt.state_tensors();
        candle_core::safetensors::save(&state, tmp.join("optimizer.safetensors"))?;
        let meta = serde_json::json!({
            "step": self.step,
            "total_steps": self.total_steps(),
            "config": self.cfg,
            "base_model": base_model,
        });
        let meta_path = tmp.join("trainer_state.json");
        std::fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&meta).unwrap_or_default(),
        )
        .map_err(|e| ModelError::io(&meta_path, e))?;
        // On disk before the rename makes it the checkpoint (a crash then leaves the old one or
        // the new one whole; a torn one is skipped at resume).
        let sync = |p: &Path| {
            std::fs::File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(|e| ModelError::io(p, e))
        };
        for entry in std::fs::read_dir(tmp).map_err(|e| ModelError::io(tmp, e))? {
            sync(&entry.map_err(|e| ModelError::io(tmp, e))?.path())?;
        }
        sync(tmp)?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(tmp, dir).map_err(|e| ModelError::io(dir, e))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync(parent)?;
        }
        Ok(())
    }

    /// The run checkpointed in `dir`, to continue on the same `data`; with the base model name
    /// it recorded.
    pub fn resume(
        dir: &Path,
        data: Vec<Example>,
        model: &ModelConfig,
        device: &Device,
    ) -> Result<(Self, Option<String>)> {
        let meta_path = dir.join("trainer_state.json");
        let text =
            std::fs::read_to_string(&meta_path).map_err(|e| ModelError::io(&meta_path, e))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
                path: meta_path.clone(),
                format: "JSON",
                msg: e.to_string(),
            })?;
        let cfg: TrainConfig = serde_json::from_value(meta["config"].clone())
            .map_err(|e| ModelError::field(&meta_path, "config", e.to_string()))?;
        let step = meta["step"]
            .as_u64()
            .ok_or_else(|| ModelError::field(&meta_path, "step", "missing"))?
            as usize;
        let base_model = meta["base_model"].as_str().map(String::from);
        let adapter = crate::lora::LoraAdapter::load(dir, model, device, DType::F32)?;
        let lora = TrainableLora::from_adapter(&adapter, model.num_hidden_layers, device)?;
        let mut run = TrainingRun::new(data, cfg, lora)?;
        let opt_path = dir.join("optimizer.safetensors");
        let state = candle_core::safetensors::load(&opt_path, device).map_err(|e| {
            ModelError::field(&opt_path, "tensors", crate::error::candle_message(&e))
        })?;
        run.opt.restore(step, state)?;
        run.step = step;
        Ok((run, base_model))
    }
}
