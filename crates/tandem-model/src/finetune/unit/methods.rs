//! What the DPO and GRPO methods add to a unit: a GRPO answer's unit, and the loss weights a
//! unit learns only once its forwards are done — a DPO pair's (from the pair's and the
//! reference's log-probabilities) and a GRPO answer's per-token weights with its KL term.

use super::super::grpo::{kl_k3, token_weights};
use super::super::objective::DpoPair;
use super::super::ref_pass::RefPass;
use super::super::{Example, SeqTrain};
use super::{Member, Rl, Unit};
use crate::error::{ModelError, Result};

impl Unit {
    /// A GRPO unit: sampled answer `ex` (prompt as context) with `advantage`, one of `answers`
    /// in the optimizer batch; with `beta` > 0 a reference pass first (unless `ref_tokens`, the
    /// reference's log p per answer token, is known).
    pub fn rollout(
        ex: &Example,
        chunk_tokens: usize,
        advantage: f64,
        answers: usize,
        beta: f64,
        ref_tokens: Option<Vec<f32>>,
        kv_block: usize,
    ) -> Self {
        let kl = beta != 0.0;
        let seq = if kl {
            SeqTrain::deferred(ex.tokens.clone(), &ex.target, chunk_tokens)
        } else {
            let w = advantage / (answers.max(1) * ex.num_targets().max(1)) as f64;
            SeqTrain::new(ex.tokens.clone(), &ex.target, chunk_tokens, w)
        };
        let blocks = ex.tokens.len().div_ceil(kv_block.max(1)).max(1);
        let member = Member {
            seq,
            reference: (kl && ref_tokens.is_none()).then(|| RefPass::new(ex, chunk_tokens)),
            ref_logp: None,
            ref_tokens,
            blocks: 0..blocks,
        };
        Self {
            members: vec![member],
            eval: false,
            beta: None,
            pairs: 1,
            dpo: None,
            rl: Some(Rl {
                advantage,
                answers,
                beta,
            }),
            kl: None,
            kv_block: kv_block.max(1),
            kept: Vec::new(),
            kept_layer_bytes: 0,
        }
    }

    /// GRPO: the reference's log p per answer token, once its pass is done.
    pub fn ref_tokens(&self) -> Option<&[f32]> {
        self.members.first()?.ref_tokens.as_deref()
    }

    /// A GRPO answer's per-token weights with its KL term.
    pub(super) fn weigh_answer(&mut self, rl: Rl) -> Result<()> {
        let m = &mut self.members[0];
        let reference = m.ref_tokens.as_deref().ok_or_else(|| {
            ModelError::Batch("the answer's reference log-probabilities are missing".into())
        })?;
        let policy = &m.seq.token_logps;
        if reference.len() != policy.len() {
            return Err(ModelError::Batch(format!(
                "{} reference log-probabilities for {} answer tokens",
                reference.len(),
                policy.len()
            )));
        }
        let w = token_weights(rl.advantage, policy, reference, rl.beta, rl.answers);
        let kl: f64 = policy
            .iter()
            .zip(reference)
            .map(|(&l, &r)| kl_k3(l as f64, r as f64))
            .sum::<f64>()
            / policy.len().max(1) as f64;
        m.seq.set_token_weights(&w)?;
        self.kl = Some(kl);
        Ok(())
    }

    /// The pair's DPO loss and the weights of its two sequences.
    pub(super) fn weigh_pair(&mut self, beta: f64) -> Result<()> {
        let [c, r] = &mut self.members[..] else {
            return Err(ModelError::Batch("a DPO unit has two sequences".into()));
        };
        let (Some(rc), Some(rr)) = (c.ref_logp, r.ref_logp) else {
            return Err(ModelError::Batch(
                "the pair's reference log-probabilities are missing".into(),
            ));
        };
        let pair = DpoPair::new(
            beta,
            (c.seq.logprob_sum(), r.seq.logprob_sum()),
            (rc, rr),
            self.pairs,
        );
        if !self.eval {
            c.seq.set_weight(pair.chosen_weight)?;
            r.seq.set_weight(pair.rejected_weight)?;
        }
        self.dpo = Some(pair);
        Ok(())
    }
}
