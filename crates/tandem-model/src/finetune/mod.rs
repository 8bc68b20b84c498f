//! Token-level LoRA finetuning: training data, the (layer, chunk) backward pieces, a training
//! sequence's state machine, AdamW, and `Finetuner`, which runs whole optimizer steps on its own
//! KV cache (what `tandem finetune` does; the co-serving engine schedules the same units between
//! inference tokens).

pub mod adamw;
pub mod auto;
mod checkpoint;
pub mod data;
mod fused;
pub mod grpo;
mod head;
pub mod objective;
pub mod preference;
pub mod prompts;
mod ref_pass;
pub mod run;
pub mod seq;
pub mod step;
mod tool_lines;
pub mod trainer;
pub mod unit;

pub use adamw::{lr_factor, AdamW, AdamWConfig, Schedule, StepInfo};
pub use auto::{Hyperparameters, Resolved, LORA_BASE_LR};
pub use data::{load_jsonl, parse_record, tokenize, validate_jsonl, Example, Record};
pub use fused::LayerActs;
pub use grpo::{GrpoStats, Reinforce, Rollout};
pub use head::HeadOut;
pub use objective::{DpoPair, DpoStats, Method, DEFAULT_BETA};
pub use preference::{
    load_preference_jsonl, parse_preference, preference_pairs, tokenize_pair, validate_file,
    FileKind, Pair, PreferenceRecord,
};
pub use prompts::{load_prompt_jsonl, parse_prompt, prompt_items, PromptItem};
pub use run::{Answer, Eval, Progress, Prompts, RolloutRequest, TrainData, TrainingRun};
pub use seq::{SeqPhase, SeqTrain};
pub use step::{ChunkGrads, LayerLora, Segment};
pub use trainer::{peft_key, GradAccum, LoraSpec, TrainableLora};
pub use unit::{ChunkRef, ForwardChunk, Unit};

use crate::batch::{LogitsWanted, PackedBatch};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::lora::{AdapterRegistry, RegistryConfig};
use serde::{Deserialize, Serialize};
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
    /// Visit the examples in an order shuffled from (seed, epoch); false: in file order every
    /// epoch (to compare step for step with another trainer).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// The objective: supervised, or DPO with its β.
    #[serde(default)]
    pub method: Method,
    /// Pack short supervised examples of an optimizer batch into one unit (one backward step
    /// per layer for all of them); false: one example per unit.
    #[serde(default = "yes")]
    pub pack: bool,
    /// The most tokens of one packed unit (None: `chunk_tokens`, so that every backward step
    /// stays a chunk's size, as co-serving's latency budget needs; `tandem finetune`, alone on
    /// the machine, packs more for larger, faster steps).
    #[serde(default)]
    pub pack_tokens: Option<usize>,
}

fn yes() -> bool {
    true
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            targets: auto::default_targets(),
            use_rslora: false,
            lr: LORA_BASE_LR,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            epochs: 1,
            batch_size: 4,
            chunk_tokens: 128,
            max_seq_len: 1024,
            seed: 0,
            shuffle: true,
            method: Method::Supervised,
            pack: true,
            pack_tokens: None,
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

    /// Takes the shape of an adapter training starts from (rank, alpha, rsLoRA, targets).
    pub fn adopt(&mut self, spec: &LoraSpec) {
        self.r = spec.r;
        self.alpha = spec.alpha;
        self.use_rslora = spec.use_rslora;
        self.targets = spec.targets.iter().map(|p| p.name().to_string()).collect();
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
        if self.pack_tokens == Some(0) {
            return bad("pack tokens must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("learning rate must be a positive number");
        }
        if let Method::Dpo { beta } = self.method {
            if !(beta > 0.0 && beta.is_finite()) {
                return bad("DPO beta must be a positive number");
            }
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
    /// Share of the batch's target tokens that were the model's most likely token (OpenAI's
    /// `train_mean_token_accuracy`).
    pub accuracy: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens run (forward and backward) in the step.
    pub tokens: usize,
    pub targets: usize,
    /// Largest activation bytes any sequence held during the step.
    pub peak_activation_bytes: usize,
    /// DPO: the step's pairs' loss, reward accuracy and margins (`loss` is then the mean DPO
    /// loss per pair).
    pub dpo: Option<DpoStats>,
    /// Reinforcement: the step's answers' rewards, KL and tokens sampled.
    pub grpo: Option<GrpoStats>,
}

/// Runs optimizer steps of token-level LoRA training on its own KV cache.
pub struct Finetuner<'m> {
    model: &'m Llama,
    pub run: TrainingRun,
    registry: AdapterRegistry,
    adapter_id: u32,
    /// The frozen reference a DPO run's reference passes go through (None: the base model).
    reference_id: Option<u32>,
    cache: KvCache,
    block_table: Vec<u32>,
    base_model: Option<String>,
    /// Bytes a unit's kept forward graphs may take (`TrainingRun::forward_kept`); 0 keeps
    /// none, and every backward step recomputes its layer from the saved input.
    pub keep_budget: usize,
}

/// A quarter of the memory the system reports available (Linux's MemAvailable), for kept
/// forward graphs on the CPU; 0 where that cannot be read, or on another device.
pub fn default_keep_budget(device: &candle_core::Device) -> usize {
    if !device.is_cpu() {
        return 0;
    }
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024 / 4)
}

const BLOCK: usize = 16;

impl<'m> Finetuner<'m> {
    pub fn new(
        model: &'m Llama,
        data: impl Into<TrainData>,
        cfg: TrainConfig,
        base_model: Option<String>,
    ) -> Result<Self> {
        cfg.check()?;
        let lora = TrainableLora::new(&model.cfg, cfg.spec()?, model.device(), cfg.seed)?;
        Self::with_run(model, TrainingRun::new(data, cfg, lora)?, base_model, None)
    }

    /// Training that starts from `init` (a PEFT adapter): its rank, alpha, rsLoRA setting and
    /// targets replace those of `cfg`. For DPO, `init` frozen is also the reference.
    pub fn from_adapter(
        model: &'m Llama,
        data: impl Into<TrainData>,
        mut cfg: TrainConfig,
        init: &crate::lora::LoraAdapter,
        base_model: Option<String>,
    ) -> Result<Self> {
        cfg.check()?;
        let lora = TrainableLora::from_adapter(init, model.cfg.num_hidden_layers, model.device())?;
        cfg.adopt(&lora.spec);
        let reference = cfg.method.is_dpo().then_some(init);
        Self::with_run(
            model,
            TrainingRun::new(data, cfg, lora)?,
            base_model,
            reference,
        )
    }

    fn with_run(
        model: &'m Llama,
        mut run: TrainingRun,
        base_model: Option<String>,
        reference: Option<&crate::lora::LoraAdapter>,
    ) -> Result<Self> {
        run.set_kv_block_size(BLOCK);
        let blocks = run.max_len().div_ceil(BLOCK).max(1);
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
                max_loras: 1 + usize::from(reference.is_some()),
                max_lora_rank: run.lora.spec.r.max(reference.map_or(0, |r| r.config.r)),
            },
            mc,
            model.device(),
            model.dtype(),
        );
        let adapter_id = registry.register_live("training", run.lora.to_adapter(None)?)?;
        let reference_id = match reference {
            Some(r) => Some(registry.register_live("reference", r.clone())?),
            None => None,
        };
        Ok(Self {
            model,
            run,
            registry,
            adapter_id,
            reference_id,
            cache,
            block_table: (0..blocks as u32).collect(),
            base_model,
            keep_budget: default_keep_budget(model.device()),
        })
    }

    pub fn cfg(&self) -> &TrainConfig {
        &self.run.cfg
    }

    pub fn lora(&self) -> &TrainableLora {
        &self.run.lora
    }

    pub fn step(&self) -> usize {
        self.run.step
    }

    pub fn total_steps(&self) -> usize {
        self.run.total_steps()
    }

    pub fn is_done(&self) -> bool {
        self.run.is_done()
    }

    /// One optimizer step: the batch's sequences forward chunk by chunk, then backward step
    /// by step, then AdamW; the new weights go into the registry slot. On the CPU the step runs
    /// on rayon's worker 0 with the other workers polling for its parallel sections
    /// (`tandem_kernels::pool::on_worker`).
    pub fn train_step(&mut self) -> Result<StepReport> {
        if self.model.device().is_cpu() {
            tandem_kernels::pool::on_worker(|| self.step_here())
        } else {
            self.step_here()
        }
    }

    fn step_here(&mut self) -> Result<StepReport> {
        loop {
            self.run.forward_kept(self.model, self.keep_budget)?;
            loop {
                // Every sequence of the unit that has a forward chunk due, in one batch; a
                // DPO reference pass alone, first (its log-probabilities are cached across
                // epochs, so the policy forwards must batch the same way whether or not it ran:
                // a resumed run then continues exactly).
                let mut chunks = self.run.next_forwards();
                if let Some(r) = chunks.iter().position(|c| c.id.reference) {
                    chunks = vec![chunks.swap_remove(r)];
                }
                if chunks.is_empty() {
                    break;
                }
                let mut batch = PackedBatch::default();
                for (k, chunk) in chunks.iter().enumerate() {
                    let adapter = if chunk.id.reference {
                        self.reference_id
                    } else {
                        Some(self.adapter_id)
                    };
                    batch.push_with_adapter(
                        k as u64,
                        &chunk.tokens,
                        chunk.start,
                        chunk.table(&self.block_table),
                        LogitsWanted::None,
                        adapter,
                    );
                }
                let capture: Vec<usize> = (0..chunks.len()).collect();
                let (_, caps) = self.model.forward_packed(
                    &batch,
                    &self.cache,
                    Some(&self.registry),
                    &capture,
                )?;
                for (chunk, cap) in chunks.iter().zip(caps) {
                    self.run.finish_forward(self.model, chunk.id, cap.inputs)?;
                }
            }
            if !self.run.backward_due() {
                if self.run.current_len().is_some() {
                    continue; // a validation example ended; the next sequence starts
                }
                return Err(ModelError::Batch("the training run is done".into()));
            }
            if let Progress::OptimizerStep(r) =
                self.run
                    .backward_step(self.model, &self.cache, &self.block_table)?
            {
                self.registry
                    .replace_live(self.adapter_id, self.run.lora.to_adapter(None)?)?;
                return Ok(r);
            }
        }
    }

    /// The adapter as it is now, in PEFT form.
    pub fn adapter(&self) -> Result<crate::lora::LoraAdapter> {
        self.run.lora.to_adapter(self.base_model.clone())
    }

    /// Writes a checkpoint: the adapter (PEFT), the optimizer state and the position in the
    /// data, so that `resume` continues exactly. Written to a temporary folder and renamed.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.run.save_checkpoint(dir, self.base_model.clone())
    }

    /// Continues the run checkpointed in `dir` on the same data (a DPO run: against the
    /// same `reference`, None for the base model).
    pub fn resume(
        model: &'m Llama,
        data: impl Into<TrainData>,
        dir: &Path,
        reference: Option<&crate::lora::LoraAdapter>,
    ) -> Result<Self> {
        let (run, base_model) = TrainingRun::resume(dir, data, &model.cfg, model.device())?;
        Self::with_run(model, run, base_model, reference)
    }
}
