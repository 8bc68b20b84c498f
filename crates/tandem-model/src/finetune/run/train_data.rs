//! What a run trains on: supervised examples, preference pairs, or prompts with their grader
//! (reinforcement), and the check that a run's method fits its data.

use super::super::objective::Method;
use super::super::preference::Pair;
use super::super::prompts::PromptItem;
use super::super::Example;
use crate::error::{ModelError, Result};

/// A run's examples: supervised sequences, preference pairs, or prompts with a grader.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainData {
    Supervised(Vec<Example>),
    Preference(Vec<Pair>),
    Prompts(Prompts),
}

/// Reinforcement data: prompts, and the grader that scores answers to them.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    pub items: Vec<PromptItem>,
    pub grader: crate::graders::Grader,
}

impl From<Vec<Example>> for TrainData {
    fn from(v: Vec<Example>) -> Self {
        TrainData::Supervised(v)
    }
}

impl From<Vec<Pair>> for TrainData {
    fn from(v: Vec<Pair>) -> Self {
        TrainData::Preference(v)
    }
}

impl TrainData {
    pub fn len(&self) -> usize {
        match self {
            TrainData::Supervised(v) => v.len(),
            TrainData::Preference(v) => v.len(),
            TrainData::Prompts(p) => p.items.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Item `i`'s sequences.
    pub(super) fn members(&self, i: usize) -> Vec<&Example> {
        match self {
            TrainData::Supervised(v) => vec![&v[i]],
            TrainData::Preference(v) => vec![&v[i].chosen, &v[i].rejected],
            // Sampled answers are units, not the data's items (`reinforce.rs`).
            TrainData::Prompts(_) => Vec::new(),
        }
    }

    pub(super) fn targets(&self, i: usize) -> usize {
        self.members(i).iter().map(|e| e.num_targets()).sum()
    }

    /// KV positions item `i` needs, in whole blocks of `block` (a prompt: with the longest
    /// answer, `answer` tokens).
    pub(super) fn kv_len(&self, i: usize, block: usize, answer: usize) -> usize {
        if let TrainData::Prompts(p) = self {
            return (p.items[i].prompt.len() + answer).div_ceil(block).max(1) * block;
        }
        self.members(i)
            .iter()
            .map(|e| e.tokens.len().div_ceil(block).max(1) * block)
            .sum()
    }
}

/// A run's method must fit its data.
pub(super) fn check_kind(method: &Method, data: &TrainData) -> Result<()> {
    match (method, data) {
        (Method::Supervised, TrainData::Supervised(_))
        | (Method::Dpo { .. }, TrainData::Preference(_))
        | (Method::Reinforcement(_), TrainData::Prompts(_)) => Ok(()),
        (Method::Reinforcement(_), _) => Err(ModelError::Batch(
            "reinforcement fine-tuning trains on prompts with a grader, not on examples or pairs".into(),
        )),
        (_, TrainData::Prompts(_)) => Err(ModelError::Batch(
            "prompts with a grader are for the reinforcement method".into(),
        )),
        (Method::Dpo { .. }, TrainData::Supervised(_)) => Err(ModelError::Batch(
            "DPO trains on preference pairs (a prompt with a preferred and a non-preferred answer), not on supervised examples".into(),
        )),
        (Method::Supervised, TrainData::Preference(_)) => Err(ModelError::Batch(
            "supervised training takes examples, not preference pairs (use the dpo method)".into(),
        )),
    }
}
