//! The loss weights a unit learns only once its forwards are done: a DPO pair's (from the
//! pair's and the reference's log-probabilities) and a GRPO answer's per-token weights with
//! its KL term.

use super::super::grpo::{kl_k3, token_weights};
use super::super::objective::DpoPair;
use super::{Rl, Unit};
use crate::error::{ModelError, Result};

impl Unit {
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
