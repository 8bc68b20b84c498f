//! The model runner: executes a `ScheduledBatch` (forward, then sampling) and returns host data.
//! It keeps per-sequence sampler state and nothing else about requests.

use crate::batch::{LogitsWanted, ScheduledBatch, StepOutput};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::sampling::Sampler;
use std::collections::HashMap;

pub struct ModelRunner {
    pub model: Llama,
    pub cache: KvCache,
    samplers: HashMap<u64, Sampler>,
}

impl ModelRunner {
    pub fn new(model: Llama, num_blocks: usize, block_size: usize) -> Result<Self> {
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
        Ok(Self {
            model,
            cache,
            samplers: HashMap::new(),
        })
    }

    pub fn execute(&mut self, sched: &ScheduledBatch) -> Result<StepOutput> {
        for (id, params) in &sched.new_seqs {
            self.samplers.insert(*id, Sampler::new(params.clone()));
        }
        for id in &sched.finished {
            self.samplers.remove(id);
        }
        let batch = &sched.batch;
        if batch.segments.iter().any(|s| s.logits == LogitsWanted::All) {
            return Err(ModelError::Batch(
                "the runner samples from last-token logits only".into(),
            ));
        }
        if batch.segments.is_empty() {
            return Ok(StepOutput::default());
        }
        let logits = self.model.forward(batch, &self.cache)?;
        let rows = crate::llama::logits_to_rows(&logits)?;
        let mut sampled = Vec::with_capacity(rows.len());
        for ((seg, _), row) in batch.logit_rows().into_iter().zip(rows) {
            let id = batch.segments[seg].seq_id;
            let sampler = self.samplers.get_mut(&id).ok_or_else(|| {
                ModelError::Batch(format!(
                    "sequence {id} was never announced with its sampling parameters"
                ))
            })?;
            sampled.push((id, sampler.sample(&row)));
        }
        Ok(StepOutput { sampled })
    }
}
