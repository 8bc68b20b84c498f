//! The unit a training run has in flight: one sequence (supervised), or a preference pair
//! (DPO) with the reference forwards its loss needs. Each member sequence has its own part of
//! the unit's KV blocks (`blocks`, whole blocks, in order), so the pair's two sequences are in
//! the cache together: their weights are known only once both forwards are done, and each
//! backward reads its own K/V.
//!
//! A GRPO unit is one sampled answer: its weight per token is its advantage's (known before
//! the forward) plus, with a KL penalty, a term of the policy's and the reference's
//! log-probabilities of the token, set once its reference pass and policy forward are done.
//!
//! A DPO member first runs a reference pass (forward only, the reference adapter: the base
//! model or the frozen adapter the job started from), which yields Σ log p of its answer; then
//! its policy forward (captured, as a supervised sequence's), whose top-layer gradients are
//! those of Σ -log p, scaled by the pair's DPO weight before the backward (`objective.rs`).

use super::objective::{DpoPair, Method};
use super::ref_pass::RefPass;
use super::step::KeptLayer;
use super::{Example, GradAccum, SeqPhase, SeqTrain, TrainableLora};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::Llama;
use candle_core::Tensor;
use std::ops::Range;

mod kept;
mod methods;

/// Names a forward chunk handed out by `TrainingRun::next_forward_max`, to hand it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Which sequence of the unit (0: the only one, or the preferred answer; 1: the other).
    pub member: usize,
    pub chunk: usize,
    /// A reference pass: run through the reference adapter, forward only.
    pub reference: bool,
}

/// A forward chunk to place in a packed batch (with `capture`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardChunk {
    pub id: ChunkRef,
    /// First position, and the tokens.
    pub start: usize,
    pub tokens: Vec<u32>,
    /// The member's blocks within the unit's block table.
    pub blocks: Range<usize>,
}

impl ForwardChunk {
    /// The chunk's block table, from the unit's.
    pub fn table(&self, unit_table: &[u32]) -> Vec<u32> {
        unit_table[self.blocks.start.min(unit_table.len())..self.blocks.end.min(unit_table.len())]
            .to_vec()
    }
}

struct Member {
    seq: SeqTrain,
    reference: Option<RefPass>,
    ref_logp: Option<f64>,
    /// The reference's log p per target (GRPO's KL term).
    ref_tokens: Option<Vec<f32>>,
    blocks: Range<usize>,
}

/// A GRPO answer's terms: its advantage, the batch's answers, the KL weight.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rl {
    advantage: f64,
    answers: usize,
    beta: f64,
}

/// One supervised sequence or one DPO pair, from its first forward chunk to its last
/// backward step (an evaluation unit: to the end of its forwards).
pub struct Unit {
    members: Vec<Member>,
    pub eval: bool,
    beta: Option<f64>,
    /// Pairs in the optimizer batch (DPO's mean).
    pairs: usize,
    /// The pair's DPO quantities, once its forwards are done.
    pub dpo: Option<DpoPair>,
    rl: Option<Rl>,
    /// GRPO with a KL penalty: the answer's mean token KL to the reference, once known.
    pub kl: Option<f64>,
    kv_block: usize,
    /// Per layer, from a forward that kept what its backward needs (`forward_kept`). Empty
    /// otherwise.
    kept: Vec<Option<KeptLayer>>,
    /// Estimated bytes of one kept layer's graph.
    kept_layer_bytes: usize,
}

impl Unit {
    /// `examples`: the sequences (one, or preferred then non-preferred); `weight`: the
    /// supervised weight; `refs`: reference log-probabilities already known per member;
    /// `pairs`: the DPO batch's pairs.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        examples: &[&Example],
        method: Method,
        chunk_tokens: usize,
        weight: f64,
        pairs: usize,
        refs: &[Option<f64>],
        kv_block: usize,
        eval: bool,
    ) -> Self {
        let beta = match method {
            Method::Dpo { beta } => Some(beta),
            Method::Supervised | Method::Reinforcement(_) => None,
        };
        let mut at = 0;
        let members = examples
            .iter()
            .enumerate()
            .map(|(k, ex)| {
                let blocks = ex.tokens.len().div_ceil(kv_block.max(1)).max(1);
                let range = at..at + blocks;
                at += blocks;
                let ref_logp = refs.get(k).copied().flatten();
                Member {
                    seq: match beta {
                        Some(_) => SeqTrain::deferred(ex.tokens.clone(), &ex.target, chunk_tokens),
                        None => SeqTrain::new(ex.tokens.clone(), &ex.target, chunk_tokens, weight),
                    },
                    reference: (beta.is_some() && ref_logp.is_none())
                        .then(|| RefPass::new(ex, chunk_tokens)),
                    ref_logp,
                    ref_tokens: None,
                    blocks: range,
                }
            })
            .collect();
        Self {
            members,
            eval,
            beta,
            pairs,
            dpo: None,
            rl: None,
            kl: None,
            kv_block: kv_block.max(1),
            kept: Vec::new(),
            kept_layer_bytes: 0,
        }
    }

    /// KV positions the unit needs (its members' whole blocks).
    pub fn kv_len(&self) -> usize {
        self.members.last().map_or(0, |m| m.blocks.end) * self.kv_block
    }

    /// Tokens of all members.
    pub fn tokens(&self) -> usize {
        self.members.iter().map(|m| m.seq.len()).sum()
    }

    /// Whether any forward chunk has run.
    pub fn started(&self) -> bool {
        self.members.iter().any(|m| {
            m.seq.phase != SeqPhase::Forward(0) || m.reference.as_ref().is_some_and(|r| r.done > 0)
        })
    }

    /// The reference log-probabilities known so far, per member.
    pub fn ref_logps(&self) -> Vec<Option<f64>> {
        self.members.iter().map(|m| m.ref_logp).collect()
    }

    /// The next forward chunk: reference passes first, then the policy forwards, in member
    /// order.
    pub fn next_forward_max(&self, max: usize) -> Option<ForwardChunk> {
        for (k, m) in self.members.iter().enumerate() {
            if let Some(r) = &m.reference {
                let (chunk, start, toks) = r.next(max);
                return Some(ForwardChunk {
                    id: ChunkRef {
                        member: k,
                        chunk,
                        reference: true,
                    },
                    start,
                    tokens: toks.to_vec(),
                    blocks: m.blocks.clone(),
                });
            }
        }
        for (k, m) in self.members.iter().enumerate() {
            if let Some((chunk, start, toks)) = m.seq.next_forward_max(max) {
                return Some(ForwardChunk {
                    id: ChunkRef {
                        member: k,
                        chunk,
                        reference: false,
                    },
                    start,
                    tokens: toks.to_vec(),
                    blocks: m.blocks.clone(),
                });
            }
        }
        None
    }

    /// The next forward chunk of every member that has one (each member's chunks run in
    /// order, members are independent): what one packed batch can run together.
    pub fn next_forwards_max(&self, max: usize) -> Vec<ForwardChunk> {
        let mut out = Vec::new();
        for (k, m) in self.members.iter().enumerate() {
            let next = match &m.reference {
                Some(r) => {
                    let (chunk, start, toks) = r.next(max);
                    Some((chunk, start, toks, true))
                }
                None => m
                    .seq
                    .next_forward_max(max)
                    .map(|(chunk, start, toks)| (chunk, start, toks, false)),
            };
            if let Some((chunk, start, toks, reference)) = next {
                out.push(ForwardChunk {
                    id: ChunkRef {
                        member: k,
                        chunk,
                        reference,
                    },
                    start,
                    tokens: toks.to_vec(),
                    blocks: m.blocks.clone(),
                });
            }
        }
        out
    }

    /// Hands back forward chunk `id`'s captured layer inputs (the last is the top output).
    pub fn finish_forward(
        &mut self,
        model: &Llama,
        id: ChunkRef,
        mut inputs: Vec<Tensor>,
    ) -> Result<()> {
        let m = self.members.get_mut(id.member).ok_or_else(|| {
            ModelError::Batch(format!("no training sequence {} in flight", id.member))
        })?;
        if id.reference {
            let r = m
                .reference
                .as_mut()
                .ok_or_else(|| ModelError::Batch("no reference pass is due".into()))?;
            let top = inputs
                .pop()
                .ok_or_else(|| ModelError::Batch("no captured activations".into()))?;
            if r.finish(model, id.chunk, &top)? {
                m.ref_logp = Some(-r.loss_sum);
                m.ref_tokens = Some(std::mem::take(&mut r.logps));
                m.reference = None;
            }
        } else {
            m.seq.finish_forward(model, id.chunk, inputs)?;
        }
        if self.forwards_done() && self.dpo.is_none() {
            if let Some(beta) = self.beta {
                self.weigh_pair(beta)?;
            }
        }
        if let Some(rl) = self.rl.filter(|r| r.beta != 0.0) {
            if self.forwards_done() && self.kl.is_none() {
                self.weigh_answer(rl)?;
            }
        }
        Ok(())
    }

    /// Every reference pass and policy forward is done.
    pub fn forwards_done(&self) -> bool {
        self.members
            .iter()
            .all(|m| m.reference.is_none() && !matches!(m.seq.phase, SeqPhase::Forward(_)))
    }

    fn backward_member(&self) -> Option<usize> {
        if self.eval || !self.forwards_done() {
            return None;
        }
        self.members
            .iter()
            .position(|m| matches!(m.seq.phase, SeqPhase::Backward(..)))
    }

    /// The layer of the next step when all members take it together: each member is a single
    /// chunk at that layer, and the unit has several (short sequences packed into one unit, a
    /// short DPO pair) or kept its forward graphs. One step then does the work of one per member.
    fn joint_layer(&self) -> Option<usize> {
        if self.members.len() < 2 && self.kept.is_empty() {
            return None;
        }
        self.backward_member()?;
        let l = self.members[0].seq.packable_layer()?;
        self.members
            .iter()
            .all(|m| m.seq.packable_layer() == Some(l))
            .then_some(l)
    }

    pub fn backward_due(&self) -> bool {
        self.backward_member().is_some()
    }

    /// The chunk the next backward step works on: (first position, tokens).
    pub fn next_backward_chunk(&self) -> Option<(usize, usize)> {
        if self.joint_layer().is_some() {
            return Some((0, self.tokens()));
        }
        let seq = &self.members[self.backward_member()?].seq;
        match seq.phase {
            SeqPhase::Backward(_, c) => Some(seq.chunks[c]),
            _ => None,
        }
    }

    /// One backward step (the unit's K/V through `table`, the unit's block table); returns
    /// whether the unit's backward is done.
    pub fn backward_step(
        &mut self,
        model: &Llama,
        cache: &KvCache,
        table: &[u32],
        lora: &TrainableLora,
        acc: &mut GradAccum,
    ) -> Result<bool> {
        if let Some(l) = self.joint_layer() {
            let kept =
                match self.kept.get_mut(l) {
                    Some(k) => Some(k.take().ok_or_else(|| {
                        ModelError::Batch(format!("layer {l}'s kept graph is gone"))
                    })?),
                    None => None,
                };
            let mut seqs: Vec<&mut SeqTrain> =
                self.members.iter_mut().map(|m| &mut m.seq).collect();
            SeqTrain::packed_step(&mut seqs, model, lora, acc, kept)?;
            let done = self.members.iter().all(|m| m.seq.phase == SeqPhase::Done);
            if done {
                self.kept.clear();
            }
            return Ok(done);
        }
        let k = self
            .backward_member()
            .ok_or_else(|| ModelError::Batch("no backward step is due".into()))?;
        let m = &mut self.members[k];
        let sub = table.get(m.blocks.clone()).ok_or_else(|| {
            ModelError::Batch(format!(
                "the unit's block table has {} blocks; sequence {k} needs {:?}",
                table.len(),
                m.blocks
            ))
        })?;
        m.seq.backward_step(model, cache, sub, lora, acc)?;
        Ok(self.members.iter().all(|m| m.seq.phase == SeqPhase::Done))
    }

    /// Σ -log p, targets and correct argmaxes over the members' policy forwards.
    pub fn loss(&self) -> (f64, usize, usize) {
        self.members.iter().fold((0.0, 0, 0), |(l, t, c), m| {
            (l + m.seq.loss_sum, t + m.seq.targets, c + m.seq.correct)
        })
    }

    /// Bytes of activations held now.
    pub fn held_bytes(&self) -> usize {
        let kept: usize = self
            .kept
            .iter()
            .flatten()
            .map(|k| k.bytes().unwrap_or(self.kept_layer_bytes))
            .sum();
        self.members
            .iter()
            .map(|m| m.seq.held_bytes())
            .sum::<usize>()
            + kept
    }
}
