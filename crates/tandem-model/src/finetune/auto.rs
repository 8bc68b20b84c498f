//! Defaults that teach: OpenAI's `"auto"` hyperparameters, resolved from the training set's
//! size, and the LoRA shape a job gets when its user names none.
//!
//! - Targets: every linear projection (q, k, v, o, gate, up, down). With PEFT's q_proj/v_proj
//!   default, twenty chat examples at lr 1e-3 taught neither tandem nor HF PEFT anything
//!   visible; all seven taught both (the QLoRA paper's finding).
//! - `n_epochs`: OpenAI's rule (its fine-tuning data-preparation guide): 3 epochs, raised so
//!   that an epoch count × examples reaches 100 on small data (at most 25 epochs), lowered so
//!   that it stays under 25,000 on large data (at least 1). Supervised jobs raise it to 50 seen
//!   examples instead of 100: on OpenAI's own "Marv" example data (10 lines) the default model
//!   trained 10 epochs memorised the training answers and gave them to unrelated held-out
//!   questions (1 of 8 facts right, the base model 5), while 5 epochs learned the style and kept
//!   4 and 3 epochs all 5 (docs/benchmarks.md, "Defaults that keep what the model knew").
//! - `batch_size`: about 0.2% of the examples, at least 1 and at most 256 (OpenAI's rule).
//!   Small data so trains one example per step, which keeps the number of optimizer steps
//!   (about 100 at least) useful.
//! - `learning_rate_multiplier`: 1, on a LoRA base rate of `LORA_BASE_LR`, scaled by the square
//!   root of the batch size past 8 (larger batches average noisier gradients away and take larger
//!   steps, as OpenAI's 0.05/0.1/0.2 by batch size does).

use crate::lora::Proj;

/// The learning rate a multiplier of 1 means, for LoRA (chosen by measurement on the default
/// model: docs/benchmarks.md, "Defaults that teach").
pub const LORA_BASE_LR: f64 = 1e-3;

/// DPO's learning rate for a multiplier of 1 (LoRA): a third of the supervised one. On a dozen
/// style pairs and the default model, 1e-3 taught the style but the answers repeated it until
/// max_tokens, 1e-4 taught it to half the held-out prompts, 3e-4 to all of them with answers
/// after it (docs/benchmarks.md, "Defaults that teach: DPO").
pub const DPO_BASE_LR: f64 = 3e-4;

/// Reinforcement fine-tuning's learning rate for a multiplier of 1 (LoRA; GRPO's per-token
/// weights are of the supervised mean's size, advantages being normalised). Chosen by
/// measurement on the default model: docs/benchmarks.md, "Defaults that teach: reinforcement".
pub const REINFORCEMENT_BASE_LR: f64 = 1e-3;

/// Every linear projection, PEFT's names.
pub fn default_targets() -> Vec<String> {
    Proj::ALL.iter().map(|p| p.name().to_string()).collect()
}

/// OpenAI's automatic epoch count for `n` training examples.
pub fn auto_epochs(n: usize) -> usize {
    epochs_seeing(n, 100)
}

/// The automatic epoch count of a supervised job: OpenAI's rule, small data raised to 50
/// examples seen rather than 100 (more repeats memorise the answers: the module's header).
pub fn auto_epochs_supervised(n: usize) -> usize {
    epochs_seeing(n, SUPERVISED_MIN_SEEN)
}

/// Small supervised data is repeated until this many examples were seen.
pub const SUPERVISED_MIN_SEEN: usize = 50;

fn epochs_seeing(n: usize, min_target_examples: usize) -> usize {
    const TARGET_EPOCHS: usize = 3;
    const MAX_TARGET_EXAMPLES: usize = 25_000;
    const MIN_EPOCHS: usize = 1;
    const MAX_EPOCHS: usize = 25;
    let n = n.max(1);
    if n * TARGET_EPOCHS < min_target_examples {
        MAX_EPOCHS.min(min_target_examples / n)
    } else if n * TARGET_EPOCHS > MAX_TARGET_EXAMPLES {
        MIN_EPOCHS.max(MAX_TARGET_EXAMPLES / n)
    } else {
        TARGET_EPOCHS
    }
}

/// OpenAI's automatic batch size for `n` training examples: ~0.2% of them, in 1..=256.
pub fn auto_batch_size(n: usize) -> usize {
    ((n as f64 * 0.002).round() as usize).clamp(1, 256)
}

/// The automatic learning-rate multiplier for a batch size.
pub fn auto_lr_multiplier(batch_size: usize) -> f64 {
    (batch_size as f64 / 8.0).sqrt().max(1.0)
}

/// Hyperparameters as a user gave them: None is `"auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Hyperparameters {
    pub n_epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate_multiplier: Option<f64>,
}

/// Hyperparameters with every `"auto"` resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate_multiplier: f64,
    /// `LORA_BASE_LR` (DPO: `DPO_BASE_LR`) × the multiplier.
    pub lr: f64,
}

impl Hyperparameters {
    /// Resolves every `"auto"` for a training set of `n` examples. A batch is never larger than
    /// the data.
    pub fn resolve(&self, n: usize) -> Resolved {
        self.resolve_for(n, &super::Method::Supervised)
    }

    /// `resolve` for a method: DPO's base learning rate is `DPO_BASE_LR`.
    pub fn resolve_for(&self, n: usize, method: &super::Method) -> Resolved {
        let batch_size = self
            .batch_size
            .unwrap_or_else(|| auto_batch_size(n))
            .min(n.max(1));
        let learning_rate_multiplier = self
            .learning_rate_multiplier
            .unwrap_or_else(|| auto_lr_multiplier(batch_size));
        let auto = match method {
            super::Method::Supervised => auto_epochs_supervised(n),
            _ => auto_epochs(n),
        };
        Resolved {
            n_epochs: self.n_epochs.unwrap_or(auto),
            batch_size,
            learning_rate_multiplier,
            lr: learning_rate_multiplier
                * match method {
                    super::Method::Supervised => LORA_BASE_LR,
                    super::Method::Dpo { .. } => DPO_BASE_LR,
                    super::Method::Reinforcement(_) => REINFORCEMENT_BASE_LR,
                },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_follow_openais_rule() {
        // Small data: enough epochs for ~100 examples seen, at most 25.
        assert_eq!(auto_epochs(1), 25);
        assert_eq!(auto_epochs(3), 25);
        assert_eq!(auto_epochs(10), 10);
        assert_eq!(auto_epochs(12), 8);
        assert_eq!(auto_epochs(20), 5);
        assert_eq!(auto_epochs(40), 3);
        assert_eq!(auto_epochs(1000), 3);
        // Large data: under 25,000 examples seen, at least one epoch.
        assert_eq!(auto_epochs(10_000), 2);
        assert_eq!(auto_epochs(100_000), 1);
        // Supervised: 50 seen on small data.
        assert_eq!(auto_epochs_supervised(1), 25);
        assert_eq!(auto_epochs_supervised(10), 5);
        assert_eq!(auto_epochs_supervised(12), 4);
        assert_eq!(auto_epochs_supervised(16), 3);
        assert_eq!(auto_epochs_supervised(20), 3);
        assert_eq!(auto_epochs_supervised(10_000), 2);
    }

    #[test]
    fn batch_size_is_a_fraction_of_the_data() {
        assert_eq!(auto_batch_size(0), 1);
        assert_eq!(auto_batch_size(20), 1);
        assert_eq!(auto_batch_size(1000), 2);
        assert_eq!(auto_batch_size(10_000), 20);
        assert_eq!(auto_batch_size(1_000_000), 256);
    }

    #[test]
    fn resolve_keeps_what_was_given() {
        let r = Hyperparameters {
            n_epochs: Some(2),
            batch_size: Some(64),
            learning_rate_multiplier: Some(0.5),
        }
        .resolve(10);
        assert_eq!((r.n_epochs, r.batch_size), (2, 10));
        assert_eq!(r.learning_rate_multiplier, 0.5);
        assert_eq!(r.lr, LORA_BASE_LR * 0.5);
        let a = Hyperparameters::default().resolve(10_000);
        assert_eq!((a.n_epochs, a.batch_size), (2, 20));
        let small = Hyperparameters::default();
        assert_eq!(small.resolve(12).n_epochs, 4);
        let dpo = super::super::Method::Dpo {
            beta: super::super::DEFAULT_BETA,
        };
        assert_eq!(small.resolve_for(12, &dpo).n_epochs, 8);
        assert!((a.learning_rate_multiplier - (20f64 / 8.0).sqrt()).abs() < 1e-12);
    }
}
