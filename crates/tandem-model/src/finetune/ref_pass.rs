//! A forward-only pass over a sequence that sums (and keeps, per token) the log-probabilities
//! of its targets: DPO's and GRPO's reference passes, through the reference adapter or none.

use super::Example;
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use candle_core::Tensor;

/// A forward-only pass that sums log-probabilities of the targets.
pub(super) struct RefPass {
    pub(super) tokens: Vec<u32>,
    pub(super) labels: Vec<Option<u32>>,
    pub(super) done: usize,
    pub(super) chunks: usize,
    pub(super) chunk_tokens: usize,
    pub(super) loss_sum: f64,
    /// log p per target, in order.
    pub(super) logps: Vec<f32>,
}

impl RefPass {
    pub(super) fn new(ex: &Example, chunk_tokens: usize) -> Self {
        let n = ex.tokens.len();
        let labels = (0..n)
            .map(|i| (i + 1 < n && ex.target[i + 1]).then(|| ex.tokens[i + 1]))
            .collect();
        Self {
            tokens: ex.tokens.clone(),
            labels,
            done: 0,
            chunks: 0,
            chunk_tokens: chunk_tokens.max(1),
            loss_sum: 0.0,
            logps: Vec::new(),
        }
    }

    pub(super) fn next(&self, max: usize) -> (usize, usize, &[u32]) {
        let n = self
            .chunk_tokens
            .min(max)
            .max(1)
            .min(self.tokens.len() - self.done);
        (
            self.chunks,
            self.done,
            &self.tokens[self.done..self.done + n],
        )
    }

    /// Takes chunk `c`'s top-layer output; returns whether the pass is done.
    pub(super) fn finish(&mut self, model: &Llama, c: usize, top: &Tensor) -> Result<bool> {
        let n = top.dim(0)?;
        if c != self.chunks || n == 0 || self.done + n > self.tokens.len() {
            return Err(ModelError::Batch(format!(
                "reference chunk {c} of {n} tokens is not the next one"
            )));
        }
        let head = model.head_loss(top, &self.labels[self.done..self.done + n])?;
        self.loss_sum += head.loss_sum;
        self.logps.extend_from_slice(&head.logps);
        self.done += n;
        self.chunks += 1;
        Ok(self.done == self.tokens.len())
    }
}
