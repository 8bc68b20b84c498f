//! Packing a batch's short supervised examples into one unit, and running a unit's forward
//! with its graphs kept (no recompute in its backward) where memory allows.

use super::super::unit::ForwardChunk;
use super::{TrainData, TrainingRun};
use crate::error::Result;
use crate::llama::Llama;

impl TrainingRun {
    /// How many items of the optimizer batch from position `first` go into one unit: short
    /// supervised examples (each at most one chunk) are packed while their tokens fit the pack
    /// budget together, and the unit's backward runs one packed step per layer for all of
    /// them; anything else is a unit of its own.
    pub(super) fn pack_len(&self, first: usize) -> usize {
        let TrainData::Supervised(examples) = &self.data else {
            return 1;
        };
        if !self.cfg.pack {
            return 1;
        }
        let budget = self.pack_budget();
        let chunk = self.cfg.chunk_tokens;
        let len = |p: usize| examples[self.batch[p]].tokens.len();
        let mut total = len(first);
        if total > chunk {
            return 1;
        }
        let mut k = 1;
        while first + k < self.batch.len()
            && len(first + k) <= chunk
            && total + len(first + k) <= budget
        {
            total += len(first + k);
            k += 1;
        }
        k
    }

    /// The most tokens of a packed unit.
    pub(super) fn pack_budget(&self) -> usize {
        self.cfg.pack_tokens.unwrap_or(self.cfg.chunk_tokens).max(1)
    }

    /// Runs the whole forward of the unit in flight with its layers' graphs kept, if it can
    /// (`Unit::can_keep`: supervised, each sequence one chunk) and their estimated bytes fit
    /// `budget`; returns whether it did. Its backward steps then recompute nothing: memory is
    /// spent to save a third of the arithmetic, only where memory allows.
    pub fn forward_kept(&mut self, model: &Llama, budget: usize) -> Result<bool> {
        if self.current_len().is_none() {
            return Ok(false);
        }
        let Some(unit) = self.unit.as_mut() else {
            return Ok(false);
        };
        if !unit.can_keep() || unit.kept_bytes(&model.cfg) > budget {
            return Ok(false);
        }
        unit.forward_kept(model, &self.lora)?;
        self.peak = self.peak.max(unit.held_bytes());
        Ok(true)
    }

    /// The next forward chunk of every sequence of the unit in flight that has one: what one
    /// packed batch can run together (a packed unit's examples, a pair's two sequences).
    pub fn next_forwards(&mut self) -> Vec<ForwardChunk> {
        if self.current_len().is_none() {
            return Vec::new();
        }
        self.unit
            .as_ref()
            .map_or_else(Vec::new, |u| u.next_forwards_max(usize::MAX))
    }
}
