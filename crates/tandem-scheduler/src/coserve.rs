//! Co-serving policy: how finetuning work shares the engine's iterations with inference.
//!
//! Each iteration the scheduler first takes every decode token and the prefill chunks that fit
//! its token budget; then a finetuning job's next forward chunk joins the same packed batch if
//! the leftover token budget and free KV blocks allow; after the forward, backward (layer,
//! chunk) steps run for as long as the iteration's latency budget (the TPOT SLO minus the
//! forward's measured time, each step's time predicted by the online cost model in
//! `cost_model`) allows. Under heavy inference load finetuning shrinks toward nothing; with no
//! inference it takes the iteration. Requests that have waited for a slot for a quarter of the
//! TTFT SLO stop finetuning until they run, and a shortage of KV blocks takes a job's blocks first
//! (its sequence restarts later).

use std::time::Duration;
use tandem_model::finetune::{StepReport, TrainingRun};

/// How inference and finetuning share the engine (benchmark baselines besides co-serving).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CoserveMode {
    /// Finetuning fills what each iteration's latency budget leaves.
    #[default]
    Coserve,
    /// Finetuning runs a whole sequence (forward and backward) every `temporal_every` iterations.
    Temporal,
    /// Finetuning jobs wait.
    InferenceOnly,
    /// Finetuning runs as fast as it can, inference only between its sequences.
    FinetuneOnly,
}

impl std::str::FromStr for CoserveMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "coserve" => Ok(Self::Coserve),
            "temporal" => Ok(Self::Temporal),
            "inference-only" => Ok(Self::InferenceOnly),
            "finetune-only" => Ok(Self::FinetuneOnly),
            _ => Err(format!(
                "unknown co-serving mode `{s}` (coserve, temporal, inference-only, finetune-only)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoserveConfig {
    pub mode: CoserveMode,
    /// The inference latency target per iteration (time per output token).
    pub tpot_slo: Duration,
    /// The time-to-first-token target: finetuning yields to requests that have waited for a
    /// batch slot for a quarter of it.
    pub ttft_slo: Duration,
    /// Temporal mode: iterations between finetuning turns.
    pub temporal_every: usize,
}

impl Default for CoserveConfig {
    fn default() -> Self {
        Self {
            mode: CoserveMode::Coserve,
            tpot_slo: Duration::from_millis(100),
            ttft_slo: Duration::from_millis(2000),
            temporal_every: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Running,
    Paused,
    Succeeded,
    Failed(String),
    Cancelled,
}

impl JobState {
    pub fn is_active(&self) -> bool {
        *self == JobState::Running
    }

    /// OpenAI's status name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::Failed(_) => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed(_) | Self::Cancelled)
    }
}

/// A finetuning job inside the engine: its run, the adapter it trains (served under `name`
/// while it trains and after), and what it has reported.
pub struct TrainingJob {
    pub name: String,
    pub run: TrainingRun,
    /// Registry id of the live adapter.
    pub adapter_id: u32,
    /// DPO's frozen reference: the adapter the job started from (pinned while the job runs),
    /// or None for the base model.
    pub reference: Option<u32>,
    /// Sequence id under which its KV blocks are held.
    pub seq_id: u64,
    pub state: JobState,
    pub reports: Vec<StepReport>,
    /// Tokens run forward / backward steps done, for metrics.
    pub forward_tokens: u64,
    pub backward_steps: u64,
    /// Tokens of sequences whose backward is complete (finetuning progress).
    pub trained_tokens: u64,
    /// Where and how often (in optimizer steps) to write servable checkpoints.
    pub checkpoint: Option<(std::path::PathBuf, usize)>,
    /// Checkpoints written: (step, adapter name it is served under, directory).
    pub checkpoints: Vec<(usize, String, std::path::PathBuf)>,
    /// Checkpoints that could not be written (a full disk): (step, why). Training goes on.
    pub checkpoint_errors: Vec<(usize, String)>,
    /// Reinforcement: the answers being sampled (or graded) now.
    pub rollouts: Option<crate::engine::RolloutBatch>,
    /// Reinforcement: answer tokens sampled, answers graded, and seconds from queuing a
    /// batch of answers to its rewards, since the job started.
    pub sampled_tokens: u64,
    pub answers_sampled: u64,
    pub sampling_seconds: f64,
    /// Reinforcement: the last graded batch, its request, answers and rewards (for reports).
    pub last_rollouts: Option<(
        tandem_model::finetune::RolloutRequest,
        Vec<tandem_model::finetune::Answer>,
        Vec<f64>,
    )>,
}
