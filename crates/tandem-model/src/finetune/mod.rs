//! Token-level LoRA finetuning: training data, the (layer, chunk) backward pieces, a training
//! sequence's state machine, AdamW, and `Finetuner`, which runs whole optimizer steps on its own
//! KV cache (what `tandem finetune` does; the co-serving engine schedules the same units between
//! inference tokens).

pub mod adamw;
pub mod data;
pub mod step;
pub mod trainer;

pub use adamw::{lr_factor, AdamW, AdamWConfig, Schedule, StepInfo};
pub use data::{load_jsonl, parse_record, tokenize, validate_jsonl, Example, Record};
pub use step::{ChunkGrads, LayerLora};
pub use trainer::{peft_key, GradAccum, LoraSpec, SeqPhase, SeqTrain, TrainableLora};

use crate::batch::{LogitsWanted, PackedBatch};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::lora::{AdapterRegistry, RegistryConfig};
use candle_core::Tensor;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Everything that decides a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub r: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub use_rslora: bool,
    pub lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub chunk_tokens: usize,
    pub max_seq_len: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            lr: 1e-4,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            epochs: 1,
            batch_size: 4,
            chunk_tokens: 128,
            max_seq_len: 1024,
            seed: 0,
        }
    }
}

impl TrainConfig {
    pub fn spec(&self) -> Result<LoraSpec> {
        let targets = self
            .targets
            .iter()
            .map(|t| {
                crate::lora::Proj::from_name(t).ok_or_else(|| {
                    ModelError::Batch(format!(
                        "unknown target module `{t}` (supported: {})",
                        crate::lora::Proj::NAMES
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraSpec {
            r: self.r,
            alpha: self.alpha,
            targets,
            use_rslora: self.use_rslora,
        })
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(ModelError::Batch(m.to_string()));
        if self.batch_size == 0 {
            return bad("batch size must be at least 1");
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1");
        }
        if self.chunk_tokens == 0 {
            return bad("chunk tokens must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("learning rate must be a positive number");
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// 1-based.
    pub step: usize,
    pub total_steps: usize,
    /// Mean loss per target token over the batch.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens run (forward and backward) in the step.
    pub tokens: usize,
    pub targets: usize,
    /// Largest activation bytes any sequence held during the step.
    pub peak_activation_bytes: usize,
}

/// Runs optimizer steps of token-level LoRA training on its own KV cache.
pub struct Finetuner<'m> {
    model: &'m Llama,
    pub cfg: TrainConfig,
    pub lora: TrainableLora,
    opt: AdamW,
    registry: AdapterRegistry,
    adapter_id: u32,
    cache: KvCache,
    block_table: Vec<u32>,
    data: Vec<Example>,
    /// Optimizer steps done.
    pub step: usize,
    base_model: Option<String>,
}

const BLOCK: usize = 16;

impl<'m> Finetuner<'m> {
    pub fn new(
        model: &'m Llama,
        data: Vec<Example>,
        cfg: TrainConfig,
        base_model: Option<String>,
    ) -> Result<Self> {
        cfg.check()?;
        let lora = TrainableLora::new(&model.cfg, cfg.spec()?, model.device(), cfg.seed)?;
        Self::with_lora(model, data, cfg, lora, base_model)
    }

    fn with_lora(
        model: &'m Llama,
        data: Vec<Example>,
        cfg: TrainConfig,
        lora: TrainableLora,
        base_model: Option<String>,
    ) -> Result<Self> {
        if data.is_empty() {
            return Err(ModelError::Batch("no training examples".into()));
        }
        let longest = data.iter().map(|e| e.tokens.len()).max().unwrap_or(1);
        let blocks = longest.div_ceil(BLOCK).max(1);
        let mc = &model.cfg;
        let cache = KvCache::new(
            mc.num_hidden_layers,
            blocks,
            BLOCK,
            mc.num_key_value_heads,
            mc.head_dim,
            model.dtype(),
            model.device(),
        )?;
        let mut registry = AdapterRegistry::new(
            RegistryConfig {
                max_loras: 1,
                max_lora_rank: lora.spec.r,
            },
            mc,
            model.device(),
            model.dtype(),
        );
        let adapter_id = registry.register_live("training", lora.to_adapter(None)?)?;
        let opt = AdamW::new(AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
            ..Default::default()
        });
        Ok(Self {
            model,
            cfg,
            lora,
            opt,
            registry,
            adapter_id,
            cache,
            block_table: (0..blocks as u32).collect(),
            data,
            step: 0,
            base_model,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.data.len().div_ceil(self.cfg.batch_size)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.cfg.epochs
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// The examples of optimizer step `step` (0-based): each epoch visits every example once,
    /// in an order shuffled from the seed and the epoch.
    pub fn batch_indices(&self, step: usize) -> Vec<usize> {
        let spe = self.steps_per_epoch();
        let (epoch, i) = (step / spe, step % spe);
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            self.cfg.seed.wrapping_add(epoch as u64),
        ));
        let bs = self.cfg.batch_size;
        order[i * bs..((i + 1) * bs).min(order.len())].to_vec()
    }

    /// Gradients of the mean loss over `examples` (token-level path), without an update.
    /// Returns (Σ loss, targets, tokens, peak activation bytes) besides the gradients.
    pub fn gradients(
        &mut self,
        examples: &[usize],
    ) -> Result<(GradAccum, f64, usize, usize, usize)> {
        let total: usize = examples.iter().map(|&i| self.data[i].num_targets()).sum();
        let weight = 1.0 / total.max(1) as f64;
        let mut acc = GradAccum::default();
        let (mut loss, mut targets, mut tokens, mut peak) = (0.0, 0, 0, 0);
        for &i in examples {
            let ex = &self.data[i];
            let mut seq =
                SeqTrain::new(ex.tokens.clone(), &ex.target, self.cfg.chunk_tokens, weight);
            while let Some((c, start, toks)) = seq.next_forward() {
                let mut batch = PackedBatch::default();
                batch.push_with_adapter(
                    0,
                    toks,
                    start,
                    self.block_table.clone(),
                    LogitsWanted::None,
                    Some(self.adapter_id),
                );
                let (_, mut caps) =
                    self.model
                        .forward_packed(&batch, &self.cache, Some(&self.registry), &[0])?;
                let inputs = caps.pop().map(|c| c.inputs).unwrap_or_default();
                seq.finish_forward(self.model, c, inputs)?;
                peak = peak.max(seq.held_bytes());
            }
            while seq.phase != SeqPhase::Done {
                seq.backward_step(
                    self.model,
                    &self.cache,
                    &self.block_table,
                    &self.lora,
                    &mut acc,
                )?;
                peak = peak.max(seq.held_bytes());
            }
            loss += seq.loss_sum;
            targets += seq.targets;
            tokens += seq.len();
        }
        Ok((acc, loss, targets, tokens, peak))
    }

    /// One optimizer step over the next batch.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let total_steps = self.total_steps();
        let idx = self.batch_indices(self.step);
        let (acc, loss, targets, tokens, peak) = self.gradients(&idx)?;
        let lr = self.cfg.lr
            * lr_factor(
                self.cfg.schedule,
                self.step,
                self.cfg.warmup_steps,
                total_steps,
            );
        let info = self.opt.step(&self.lora.named_params(), &acc.grads, lr)?;
        self.step += 1;
        self.registry
            .replace_live(self.adapter_id, self.lora.to_adapter(None)?)?;
        Ok(StepReport {
            step: self.step,
            total_steps,
            loss: loss / targets.max(1) as f64,
            lr,
            grad_norm: info.grad_norm,
            tokens,
            targets,
            peak_activation_bytes: peak,
        })
    }

    /// The adapter as it is now, in PEFT form.
    pub fn adapter(&self) -> Result<crate::lora::LoraAdapter> {
        self.lora.to_adapter(self.base_model.clone())
    }

    /// Writes a checkpoint: the adapter (PEFT), the optimizer state and the position in the
    /// data, so that `resume` continues exactly. Written to a temporary folder and renamed.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        self.adapter()?.save(&tmp)?;
        let state: HashMap<String, Tensor> = self.opt.state_tensors();
        let opt_path = tmp.join("optimizer.safetensors");
        candle_core::safetensors::save(&state, &opt_path)?;
        let meta = serde_json::json!({
            "step": self.step,
            "total_steps": self.total_steps(),
            "config": self.cfg,
            "base_model": self.base_model,
        });
        let meta_path = tmp.join("trainer_state.json");
        std::fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&meta).unwrap_or_default(),
        )
        .map_err(|e| ModelError::io(&meta_path, e))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))?;
        Ok(())
    }

    /// Continues the run checkpointed in `dir` on the same data.
    pub fn resume(model: &'m Llama, data: Vec<Example>, dir: &Path) -> Result<Self> {
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
        let adapter = crate::lora::LoraAdapter::load(
            dir,
            &model.cfg,
            model.device(),
            candle_core::DType::F32,
        )?;
        let lora =
            TrainableLora::from_adapter(&adapter, model.cfg.num_hidden_layers, model.device())?;
        let mut ft = Self::with_lora(model, data, cfg, lora, base_model)?;
        let opt_path = dir.join("optimizer.safetensors");
        let state = candle_core::safetensors::load(&opt_path, model.device()).map_err(|e| {
            ModelError::field(&opt_path, "tensors", crate::error::candle_message(&e))
        })?;
        ft.opt.restore(step, state)?;
        ft.step = step;
        Ok(ft)
    }
}
