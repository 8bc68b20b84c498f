//! The packed batch: plain host data that a scheduler builds and the engine executes.
//!
//! Tokens of many sequences are concatenated; each segment is one sequence's run of new tokens
//! (a prefill chunk, a decode step, later a finetuning chunk) with the block table that maps its
//! positions to KV cache slots.

use crate::error::{ModelError, Result};

/// Which logits a segment wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that does not reach the end of the prompt).
    None,
    /// The last token's (decode, or the final prefill chunk).
    Last,
    /// Every token's (scoring, tests).
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub seq_id: u64,
    /// Offset of the segment's first token in `PackedBatch::tokens`.
    pub start: usize,
    pub len: usize,
    /// Physical KV blocks of the sequence, in order; must cover positions up to the segment's last.
    pub block_table: Vec<u32>,
    pub logits: LogitsWanted,
    /// The LoRA adapter (registry id) this segment runs through, if any.
    pub adapter: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedBatch {
    /// [T] token ids.
    pub tokens: Vec<u32>,
    /// [T] position of each token in its sequence.
    pub positions: Vec<u32>,
    /// Segments in token order, covering `tokens` exactly.
    pub segments: Vec<Segment>,
}

impl PackedBatch {
    /// Appends a segment of `tokens` at positions `first_pos..`.
    pub fn push(
        &mut self,
        seq_id: u64,
        tokens: &[u32],
        first_pos: usize,
        block_table: Vec<u32>,
        logits: LogitsWanted,
    ) {
        self.push_with_adapter(seq_id, tokens, first_pos, block_table, logits, None);
    }

    /// Appends a segment of `tokens` at positions `first_pos..` that runs through `adapter`.
    pub fn push_with_adapter(
        &mut self,
        seq_id: u64,
        tokens: &[u32],
        first_pos: usize,
        block_table: Vec<u32>,
        logits: LogitsWanted,
        adapter: Option<u32>,
    ) {
        let start = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((first_pos..first_pos + tokens.len()).map(|p| p as u32));
        self.segments.push(Segment {
            seq_id,
            start,
            len: tokens.len(),
            block_table,
            logits,
            adapter,
        });
    }

    /// The varlen metadata tandem-kernels' attention ops take for this batch (built once per
    /// forward, shared by every layer).
    pub fn attention_meta(
        &self,
        block_size: usize,
        sliding_window: Option<usize>,
    ) -> tandem_kernels::PagedAttentionMeta {
        let mut token_segment = Vec::with_capacity(self.tokens.len());
        for (i, s) in self.segments.iter().enumerate() {
            token_segment.extend(std::iter::repeat_n(i as u32, s.len));
        }
        tandem_kernels::PagedAttentionMeta::new(
            block_size,
            token_segment,
            self.positions.clone(),
            self.segments
                .iter()
                .map(|s| s.block_table.clone())
                .collect(),
            sliding_window,
        )
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Rows of the logits the forward returns, as (segment index, token index in the batch).
    pub fn logit_rows(&self) -> Vec<(usize, usize)> {
        let mut rows = Vec::new();
        for (i, s) in self.segments.iter().enumerate() {
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push((i, s.start + s.len - 1)),
                LogitsWanted::All => rows.extend((s.start..s.start + s.len).map(|t| (i, t))),
            }
        }
        rows
    }

    /// Checks the batch's internal consistency against a cache of `num_blocks` blocks of
    /// `block_size` tokens and a context limit of `max_positions`.
    pub fn validate(
        &self,
        block_size: usize,
        num_blocks: usize,
        max_positions: usize,
    ) -> Result<()> {
        let bad = |m: String| Err(ModelError::Batch(m));
        if self.tokens.len() != self.positions.len() {
            return bad(format!(
                "{} tokens but {} positions",
                self.tokens.len(),
                self.positions.len()
            ));
        }
        let mut next = 0;
        for s in &self.segments {
            if s.start != next || s.len == 0 {
                return bad(format!(
                    "segment of sequence {} does not continue the previous one or is empty",
                    s.seq_id
                ));
            }
            next = s.start + s.len;
            if next > self.tokens.len() {
                return bad(format!(
                    "segment of sequence {} runs past the tokens",
                    s.seq_id
                ));
            }
            let last = self.positions[next - 1] as usize;
            if last >= max_positions {
                return bad(format!(
                    "sequence {} reaches position {last}, the model allows {max_positions}",
                    s.seq_id
                ));
            }
            if s.block_table.len() * block_size <= last {
                return bad(format!(
                    "sequence {} reaches position {last}, its {} blocks hold {}",
                    s.seq_id,
                    s.block_table.len(),
                    s.block_table.len() * block_size
                ));
            }
            if let Some(b) = s.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                return bad(format!(
                    "sequence {} names block {b}, the cache has {num_blocks}",
                    s.seq_id
                ));
            }
        }
        if next != self.tokens.len() {
            return bad("segments do not cover every token".into());
        }
        Ok(())
    }
}

/// What the scheduler hands the engine for one iteration (vLLM v1's `SchedulerOutput`): the
/// packed batch, sampling parameters of sequences seen for the first time, and the ids of
/// sequences that are gone.
#[derive(Debug, Clone, Default)]
pub struct ScheduledBatch {
    pub batch: PackedBatch,
    pub new_seqs: Vec<NewSequence>,
    pub finished: Vec<u64>,
    /// Segments (finetuning chunks) whose activations the engine keeps for their backward.
    pub capture: Vec<usize>,
}

/// A sequence the engine sees for the first time: how to sample it, which adapter it uses.
#[derive(Debug, Clone)]
pub struct NewSequence {
    pub seq_id: u64,
    pub params: crate::sampling::SamplingParams,
    pub adapter: Option<u32>,
    /// The prompt's tokens when the sampler needs them (a repetition penalty), else empty.
    pub prompt: Vec<u32>,
}

/// What the engine hands back: one sampled token per segment that asked for `Last` logits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// (sequence id, sampled token id)
    pub sampled: Vec<(u64, u32)>,
    /// Log-probabilities of sampled tokens, for sequences that asked for them.
    pub logprobs: std::collections::HashMap<u64, crate::sampling::TokenLogprobs>,
    /// Seconds spent computing grammar masks for this step (beside the forward pass).
    pub mask_seconds: f64,
}
