//! The model runner: executes a `ScheduledBatch` (forward, then sampling) and returns host data.
//! It keeps per-sequence sampler state and nothing else about requests. Grammar masks of the
//! constrained sequences are computed in parallel, beside the forward pass.

use crate::batch::{LogitsWanted, ScheduledBatch, StepOutput};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::lora::{AdapterRegistry, RegistryConfig};
use crate::sampling::Sampler;
use std::collections::HashMap;

pub struct ModelRunner {
    pub model: Llama,
    pub cache: KvCache,
    pub adapters: AdapterRegistry,
    samplers: HashMap<u64, Sampler>,
    /// Adapter pinned by each live sequence.
    seq_adapter: HashMap<u64, u32>,
    /// Activations the last `execute` kept for `ScheduledBatch::capture` (finetuning chunks).
    pub captured: Vec<crate::llama::Captured>,
}

impl ModelRunner {
    pub fn new(model: Llama, num_blocks: usize, block_size: usize) -> Result<Self> {
        Self::with_adapters(model, num_blocks, block_size, RegistryConfig::default())
    }

    pub fn with_adapters(
        model: Llama,
        num_blocks: usize,
        block_size: usize,
        lora: RegistryConfig,
    ) -> Result<Self> {
        let c = &model.cfg;
        let cache = KvCache::new(
            c.num_hidden_layers,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
            model.dtype(),
            model.device(),
        )?;
        let adapters = AdapterRegistry::new(lora, &model.cfg, model.device(), model.dtype());
        Ok(Self {
            model,
            cache,
            adapters,
            samplers: HashMap::new(),
            seq_adapter: HashMap::new(),
            captured: Vec::new(),
        })
    }

    pub fn execute(&mut self, sched: &ScheduledBatch) -> Result<StepOutput> {
        for id in &sched.finished {
            self.samplers.remove(id);
            if let Some(a) = self.seq_adapter.remove(id) {
                self.adapters.unpin(a);
            }
        }
        for n in &sched.new_seqs {
            self.samplers
                .insert(n.seq_id, Sampler::with_prompt(n.params.clone(), &n.prompt));
            if let Some(a) = n.adapter {
                self.adapters.pin(a);
                self.seq_adapter.insert(n.seq_id, a);
            }
        }
        let batch = &sched.batch;
        if batch.segments.iter().any(|s| s.logits == LogitsWanted::All) {
            return Err(ModelError::Batch(
                "the runner samples from last-token logits only".into(),
            ));
        }
        self.captured.clear();
        if batch.segments.is_empty() {
            return Ok(StepOutput::default());
        }
        let mut used: Vec<u32> = batch.segments.iter().filter_map(|s| s.adapter).collect();
        used.sort_unstable();
        used.dedup();
        self.adapters.ensure_resident(&used)?;
        let wanted = batch.logit_rows();
        let sampling: std::collections::HashSet<u64> = wanted
            .iter()
            .map(|&(seg, _)| batch.segments[seg].seq_id)
            .collect();
        let mut constrained: Vec<&mut Sampler> = self
            .samplers
            .iter_mut()
            .filter(|(id, s)| s.is_constrained() && sampling.contains(id))
            .map(|(_, s)| s)
            .collect();
        let (model, cache, adapters) = (&self.model, &self.cache, &self.adapters);
        let forward = || model.forward_packed(batch, cache, Some(adapters), &sched.capture);
        let mut mask_seconds = 0.0;
        let (logits, captured) = if constrained.is_empty() {
            forward()?
        } else {
            std::thread::scope(|scope| {
                let masks = scope.spawn(|| {
                    use rayon::prelude::*;
                    let t = std::time::Instant::now();
                    constrained.par_iter_mut().for_each(|s| s.prepare());
                    t.elapsed().as_secs_f64()
                });
                let out = forward();
                mask_seconds = masks.join().unwrap_or(0.0);
                out
            })?
        };
        self.captured = captured;
        let mut samplers = Vec::with_capacity(wanted.len());
        for &(seg, _) in &wanted {
            let id = batch.segments[seg].seq_id;
            if !self.samplers.contains_key(&id) {
                return Err(ModelError::Batch(format!(
                    "sequence {id} was never announced with its sampling parameters"
                )));
            }
            samplers.push(id);
        }
        if samplers.is_empty() {
            return Ok(StepOutput::default());
        }
        // Off the CPU, a batch that only decodes greedily takes its argmax on the device and
        // copies one id per row instead of the [rows, vocab] logits.
        if !logits.device().is_cpu() && samplers.iter().all(|id| self.samplers[id].greedy_only()) {
            let ids = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
            let sampled = samplers.into_iter().zip(ids).collect();
            return Ok(StepOutput {
                sampled,
                logprobs: HashMap::new(),
                mask_seconds,
            });
        }
        let rows = crate::llama::logits_to_rows(&logits)?;
        let mut sampled = Vec::with_capacity(rows.len());
        let mut logprobs = HashMap::new();
        for (id, row) in samplers.into_iter().zip(rows) {
            let sampler = self.samplers.get_mut(&id).expect("checked above");
            let tok = sampler.sample(&row);
            if let Some(k) = sampler.params().logprobs {
                logprobs.insert(id, crate::sampling::TokenLogprobs::of(&row, tok, k));
            }
            sampled.push((id, tok));
        }
        Ok(StepOutput {
            sampled,
            logprobs,
            mask_seconds,
        })
    }
}
