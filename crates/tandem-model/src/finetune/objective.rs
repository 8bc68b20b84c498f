//! The training objective of every method, as one shape: the loss of an optimizer batch is a
//! weighted sum of per-token log-probabilities, `L = Σ_seq w_seq · Σ_t -log p(t)`, with each
//! sequence's weight known once the forwards it depends on are done:
//! - supervised: `w = 1 / target tokens of the batch` (known before any forward), the mean
//!   token cross-entropy;
//! - DPO (Rafailov et al. 2023): per pair, `z = β((π_c - ρ_c) - (π_r - ρ_r))` with `π` the
//!   policy's and `ρ` the reference's summed log-probabilities of the answer tokens, loss
//!   `-log σ(z)`, mean over the batch's pairs. Its gradient through `π_c` is `-β σ(-z) / N`,
//!   so `w_c = β σ(-z) / N` and `w_r = -β σ(-z) / N` on the two sequences' Σ -log p.
//!
//! - reinforcement (GRPO): per sampled answer `i` of `N` in the batch, advantage `A_i` (its
//!   reward normalised in its prompt's group), per answer token `t` the policy's `l_t` and the
//!   reference's `r_t` log-probabilities; loss `Σ_i 1/(N|o_i|) Σ_t [-A_i l_t + β KL_t]` with
//!   `KL_t = e^(r_t - l_t) - (r_t - l_t) - 1`, so per token `w_t = (A_i - β(1 - e^(r_t - l_t)))
//!   / (N|o_i|)`: known before the forward when β = 0, after it otherwise (`grpo.rs`).
//!
//! The token-level backward takes those weights as a scale on each sequence's top-layer
//! gradient, so every method keeps its memory per token.

use serde::{Deserialize, Serialize};

/// How a run turns its sequences' log-probabilities into a loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Method {
    /// Mean cross-entropy over the target tokens.
    #[default]
    Supervised,
    /// Direct preference optimization on (preferred, non-preferred) pairs against a frozen
    /// reference (the base model, or the adapter the job started from).
    Dpo { beta: f64 },
    /// Reinforcement fine-tuning (GRPO, Shao et al. 2024): answers sampled from the policy
    /// itself, graded, weighted by their group-normalised advantage (`grpo.rs`).
    Reinforcement(super::grpo::Reinforce),
}

/// OpenAI's and TRL's default DPO β.
pub const DEFAULT_BETA: f64 = 0.1;

impl Method {
    pub fn is_dpo(&self) -> bool {
        matches!(self, Method::Dpo { .. })
    }

    pub fn is_reinforcement(&self) -> bool {
        matches!(self, Method::Reinforcement(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Supervised => "supervised",
            Method::Dpo { .. } => "dpo",
            Method::Reinforcement(_) => "reinforcement",
        }
    }
}

/// One pair's DPO quantities, from summed log-probabilities over the answer tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoPair {
    /// `-log σ(z)`.
    pub loss: f64,
    /// Implicit rewards `β (π - ρ)` of the preferred and the non-preferred answer.
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    /// Weights on the two sequences' Σ -log p for a batch of `pairs` pairs.
    pub chosen_weight: f64,
    pub rejected_weight: f64,
}

impl DpoPair {
    /// `policy` and `reference`: (preferred, non-preferred) Σ log p.
    pub fn new(beta: f64, policy: (f64, f64), reference: (f64, f64), pairs: usize) -> Self {
        let chosen_reward = beta * (policy.0 - reference.0);
        let rejected_reward = beta * (policy.1 - reference.1);
        let z = chosen_reward - rejected_reward;
        // -log σ(z) = softplus(-z), stable both ways; σ(-z) likewise.
        let loss = if z > 0.0 {
            (-z).exp().ln_1p()
        } else {
            -z + z.exp().ln_1p()
        };
        let sig_neg = if z >= 0.0 {
            let e = (-z).exp();
            e / (1.0 + e)
        } else {
            1.0 / (1.0 + z.exp())
        };
        let w = beta * sig_neg / pairs.max(1) as f64;
        Self {
            loss,
            chosen_reward,
            rejected_reward,
            chosen_weight: w,
            rejected_weight: -w,
        }
    }

    pub fn margin(&self) -> f64 {
        self.chosen_reward - self.rejected_reward
    }
}

/// DPO metrics summed over pairs (an optimizer step's or an evaluation's).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DpoStats {
    pub pairs: usize,
    pub loss_sum: f64,
    /// Pairs whose preferred answer's reward is above the other's.
    pub wins: usize,
    pub margin_sum: f64,
    pub chosen_sum: f64,
    pub rejected_sum: f64,
}

impl DpoStats {
    pub fn add(&mut self, p: &DpoPair) {
        self.pairs += 1;
        self.loss_sum += p.loss;
        self.wins += usize::from(p.margin() > 0.0);
        self.margin_sum += p.margin();
        self.chosen_sum += p.chosen_reward;
        self.rejected_sum += p.rejected_reward;
    }

    fn mean(&self, x: f64) -> f64 {
        x / self.pairs.max(1) as f64
    }

    /// Mean DPO loss per pair.
    pub fn loss(&self) -> f64 {
        self.mean(self.loss_sum)
    }

    /// Share of pairs whose preferred answer wins (TRL's `rewards/accuracies`).
    pub fn reward_accuracy(&self) -> f64 {
        self.mean(self.wins as f64)
    }

    /// Mean reward margin (TRL's `rewards/margins`).
    pub fn reward_margin(&self) -> f64 {
        self.mean(self.margin_sum)
    }

    pub fn chosen_reward(&self) -> f64 {
        self.mean(self.chosen_sum)
    }

    pub fn rejected_reward(&self) -> f64 {
        self.mean(self.rejected_sum)
    }
}
