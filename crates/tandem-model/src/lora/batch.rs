//! One forward's view of the adapters: which token ranges run through which resident slot.

use super::{AdapterRegistry, Proj};
use crate::batch::PackedBatch;
use crate::error::{ModelError, Result};
use candle_core::Tensor;
use std::sync::Arc;
use tandem_kernels::{lora_sgmv, LoraSegment};

pub struct LoraBatch<'a> {
    registry: &'a AdapterRegistry,
    /// (first token, tokens, slot) of each segment that has an adapter.
    segs: Vec<(usize, usize, usize)>,
}

impl<'a> LoraBatch<'a> {
    /// None when no segment of `batch` uses an adapter. Every adapter used must be resident.
    pub fn new(registry: &'a AdapterRegistry, batch: &PackedBatch) -> Result<Option<Self>> {
        let mut segs = Vec::new();
        for s in &batch.segments {
            if let Some(id) = s.adapter {
                let slot = registry.slot(id).ok_or_else(|| {
                    ModelError::Batch(format!(
                        "adapter {id} of sequence {} is not resident",
                        s.seq_id
                    ))
                })?;
                segs.push((s.start, s.len, slot));
            }
        }
        Ok((!segs.is_empty()).then_some(Self { registry, segs }))
    }

    /// `y + Σ scale·(x Aᵀ)Bᵀ` over the segments whose adapter targets (layer, projection).
    pub fn apply(&self, layer: usize, p: Proj, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let Some(pool) = self.registry.pool(layer, p) else {
            return Ok(y);
        };
        let segs: Vec<LoraSegment> = self
            .segs
            .iter()
            .filter_map(|&(start, len, slot)| {
                let (row_offset, rank, scale) = self.registry.slot_module(slot, layer, p)?;
                Some(LoraSegment {
                    start,
                    len,
                    row_offset,
                    rank,
                    scale,
                })
            })
            .collect();
        if segs.is_empty() {
            return Ok(y);
        }
        let delta = lora_sgmv(&x.contiguous()?, &pool.a, &pool.bt, Arc::from(segs))?;
        Ok((y + delta)?)
    }
}
