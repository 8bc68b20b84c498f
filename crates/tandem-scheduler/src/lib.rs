//! tandem-scheduler: decides what runs in each engine iteration.
//!
//! Owns: sequence state, KV block accounting, preemption, the token budget, the co-serving
//! policy (how much finetuning work each iteration takes, and which job), and the engine
//! loop (its synchronous core: schedule, execute, post-process; and the thread that runs it,
//! fed through channels). It hands the engine a plain
//! `ScheduledBatch` and reads back host data.
//! Must not touch: tensors or devices (the engine in tandem-model owns those), HTTP.

pub mod block_manager;
pub mod coserve;
pub mod cost_model;
pub mod engine;
pub mod engine_handle;
pub mod engine_loop;
pub mod scheduler;
pub mod sequence;

pub use block_manager::BlockManager;
pub use coserve::{CoserveConfig, CoserveMode, JobState, TrainingJob};
pub use cost_model::CostModel;
pub use engine::{IterationCounters, IterationObserver, IterationReport, LlmEngine, RequestOutput};
pub use engine_handle::{
    CheckpointWritten, EngineError, EngineHandle, EngineStats, Event, GenerateRequest, JobSnapshot,
    JobSpec, JobStart, JobStat,
};
pub use scheduler::{AdmitError, Scheduler, SchedulerConfig};
pub use sequence::{FinishReason, Sequence};
