//! GRPO's arithmetic (DeepSeekMath, Shao et al. 2024; TRL's `GRPOTrainer`): rewards of the `k`
//! answers sampled per prompt become advantages normalised within their group, and each answer
//! token's loss weight follows from its advantage and, with a KL penalty, from the policy's and
//! the reference's log-probabilities of it (`objective.rs` has the loss). One optimizer step per
//! batch of sampled answers, so the importance ratio is 1 and no clipping applies.

use serde::{Deserialize, Serialize};

/// A reinforcement run's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reinforce {
    /// Answers sampled per prompt (the group an advantage is normalised in).
    pub group: usize,
    /// The KL penalty's weight (0: none, TRL's default).
    pub beta: f64,
    /// The longest sampled answer, in tokens.
    pub max_tokens: usize,
    /// Sampling temperature of the answers (train and eval).
    pub temperature: f64,
    /// Optimizer steps between evaluations on the validation prompts (0: after the last only).
    pub eval_interval: usize,
    /// Answers sampled per validation prompt in an evaluation.
    pub eval_samples: usize,
}

/// Answers per prompt with `compute_multiplier` 1.
pub const DEFAULT_GROUP: usize = 4;
/// The longest answer by default.
pub const DEFAULT_MAX_TOKENS: usize = 256;

impl Default for Reinforce {
    fn default() -> Self {
        Self {
            group: DEFAULT_GROUP,
            beta: 0.0,
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: 1.0,
            eval_interval: 0,
            eval_samples: 1,
        }
    }
}

/// Added to the group's standard deviation (TRL's 1e-4).
const STD_EPS: f64 = 1e-4;

/// Group-normalised advantages: `(r - mean) / (std + eps)` within each run of `group` rewards
/// (the last group may be shorter), `std` with Bessel's correction as torch's. A group whose
/// rewards are all equal teaches nothing: its advantages are 0.
pub fn advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group.max(1)) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let var = if g.len() > 1 {
            g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        let std = var.sqrt();
        out.extend(g.iter().map(|r| {
            if std == 0.0 {
                0.0
            } else {
                (r - mean) / (std + STD_EPS)
            }
        }));
    }
    out
}

/// The KL estimator `e^(r - l) - (r - l) - 1` (Schulman's k3: non-negative, unbiased).
pub fn kl_k3(policy: f64, reference: f64) -> f64 {
    let d = reference - policy;
    d.exp() - d - 1.0
}

/// Per answer token, the weight on its `-log p` for an answer with advantage `adv` in a batch
/// of `n` answers: `(adv - β(1 - e^(r - l))) / (n |o|)`. `reference` may be empty when β = 0.
pub fn token_weights(adv: f64, policy: &[f32], reference: &[f32], beta: f64, n: usize) -> Vec<f64> {
    let scale = 1.0 / (n.max(1) * policy.len().max(1)) as f64;
    policy
        .iter()
        .enumerate()
        .map(|(t, &l)| {
            let kl_grad = match reference.get(t) {
                Some(&r) if beta != 0.0 => beta * (1.0 - (r as f64 - l as f64).exp()),
                _ => 0.0,
            };
            (adv - kl_grad) * scale
        })
        .collect()
}

/// One sampled answer, graded.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The prompt's index in the run's data.
    pub item: usize,
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
    pub reward: f64,
    pub advantage: f64,
}

/// Rewards and KL over a step's (or an evaluation's) answers.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct GrpoStats {
    pub samples: usize,
    pub reward_sum: f64,
    pub reward_sq_sum: f64,
    /// Σ over trained answers of their mean token KL, and how many.
    pub kl_sum: f64,
    pub kl_answers: usize,
    /// Answer tokens sampled.
    pub tokens_sampled: usize,
    /// Answers trained on (those with a nonzero weight).
    pub trained: usize,
}

impl GrpoStats {
    pub fn add_reward(&mut self, r: f64, tokens: usize) {
        self.samples += 1;
        self.reward_sum += r;
        self.reward_sq_sum += r * r;
        self.tokens_sampled += tokens;
    }

    pub fn mean_reward(&self) -> f64 {
        self.reward_sum / self.samples.max(1) as f64
    }

    /// The rewards' standard deviation (population).
    pub fn reward_std(&self) -> f64 {
        let m = self.mean_reward();
        (self.reward_sq_sum / self.samples.max(1) as f64 - m * m)
            .max(0.0)
            .sqrt()
    }

    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.kl_answers.max(1) as f64
    }
}
