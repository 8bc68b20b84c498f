//! The async side's view of the engine thread: the handle (`EngineHandle`, cheap to clone)
//! whose methods send `Command`s to the thread and await its replies, and the plain data they
//! carry — requests and their event streams, job specs and snapshots, engine statistics. The
//! thread itself is `engine_loop.rs`.

use crate::coserve::JobState;
use crate::engine::{IterationCounters, LlmEngine};
use crate::scheduler::AdmitError;
use crate::sequence::FinishReason;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use tandem_model::finetune::{Eval, StepReport, TrainConfig, TrainData};
use tandem_model::{SamplingParams, TokenLogprobs};
use tokio::sync::{mpsc, oneshot};

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A sampled token, the text it completed (possibly empty), its log-probabilities if asked.
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The last event of a request.
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose K/V came from the prefix cache.
        cached_tokens: usize,
    },
    /// The engine failed while running this request (the request is over).
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub adapter: Option<String>,
    /// vLLM's `cache_salt`: requests with different salts never share prefix-cache blocks.
    pub cache_salt: Option<String>,
    /// The request's span (its request id): the engine thread logs what concerns the request in it.
    pub span: tracing::Span,
}

/// A snapshot of the engine for health checks and metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub num_blocks: usize,
    pub free_blocks: usize,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache and found there, since start.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Free KV blocks that still hold cached prefixes.
    pub cached_free_blocks: usize,
    /// Every registered adapter.
    pub adapters: Vec<String>,
    /// Adapters of running / waiting requests (vLLM's lora_requests_info labels).
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    pub max_loras: usize,
    /// Adapters in device slots now, and loads into / evictions from slots since start.
    pub adapters_resident: usize,
    pub adapter_loads: u64,
    pub adapter_evictions: u64,
    /// What the iterations held, summed since start.
    pub counters: IterationCounters,
    pub jobs: Vec<JobStat>,
}

/// A finetuning job's figures for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStat {
    pub name: String,
    /// OpenAI's status name.
    pub status: &'static str,
    pub trained_tokens: u64,
    /// The last optimizer step's loss.
    pub loss: Option<f64>,
    pub step: usize,
    pub total_steps: usize,
    /// Reinforcement: answer tokens sampled, and the last step's mean reward.
    pub sampled_tokens: u64,
    pub mean_reward: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error("{0}")]
    Adapter(String),
    #[error("the engine thread has stopped")]
    Stopped,
}

pub(crate) enum Command {
    Generate(
        Box<GenerateRequest>,
        mpsc::UnboundedSender<Event>,
        oneshot::Sender<Result<u64, AdmitError>>,
    ),
    Abort(u64),
    LoadAdapter(String, PathBuf, oneshot::Sender<Result<(), String>>),
    UnloadAdapter(String, oneshot::Sender<Result<(), String>>),
    Stats(oneshot::Sender<EngineStats>),
    StartJob(Box<JobSpec>, oneshot::Sender<Result<JobStart, String>>),
    /// Stop training and checkpoint every active job now (shutdown).
    CheckpointJobs(oneshot::Sender<Vec<CheckpointWritten>>),
    /// Checkpoint one job at its last optimizer step (it is handed to another replica).
    CheckpointJob(
        String,
        oneshot::Sender<Result<Option<CheckpointWritten>, String>>,
    ),
    /// Stop a job and forget it here (another replica trains it).
    ReleaseJob(String, oneshot::Sender<Result<(), String>>),
    Jobs(oneshot::Sender<Vec<JobSnapshot>>),
    /// Cancel (None), pause (Some(true)) or resume (Some(false)).
    ControlJob(String, Option<bool>, oneshot::Sender<Result<(), String>>),
    SaveJobAdapter(
        String,
        PathBuf,
        Option<String>,
        oneshot::Sender<Result<(), String>>,
    ),
}

/// What the engine needs to start (or continue) a finetuning job.
pub struct JobSpec {
    /// The adapter name it trains and serves.
    pub name: String,
    /// Supervised examples or preference pairs (as `cfg.method` wants).
    pub data: TrainData,
    /// Held-out items whose loss is evaluated after every epoch.
    pub validation: TrainData,
    pub cfg: TrainConfig,
    /// A served adapter to start from (its weights, rank and targets); for DPO it is also
    /// the frozen reference. None: a fresh LoRA on the base model.
    pub init: Option<String>,
    /// Write a checkpoint into this directory every N optimizer steps (served as
    /// `<name>:ckpt-step-N`).
    pub checkpoints: Option<(PathBuf, usize)>,
    /// Checkpoints to continue from, newest first: the first that loads is taken (a torn or
    /// corrupt one is skipped); none loads, or none given: the job starts afresh.
    pub resume_from: Vec<PathBuf>,
}

/// How a job started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobStart {
    /// The checkpoint it continues from (None: from the start).
    pub resumed_from: Option<PathBuf>,
    /// Newer checkpoints that could not be read, with why.
    pub skipped: Vec<(PathBuf, String)>,
    /// The settings the job runs with (a job that starts from an adapter takes its rank,
    /// alpha and targets).
    pub config: Option<TrainConfig>,
}

/// A checkpoint written on request (shutdown): job name, optimizer step, served name, where.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointWritten {
    pub job: String,
    pub step: usize,
    pub name: String,
    pub path: PathBuf,
}

/// A finetuning job as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSnapshot {
    pub name: String,
    pub state: JobState,
    pub step: usize,
    pub total_steps: usize,
    pub trained_tokens: u64,
    pub reports: Vec<StepReport>,
    /// Evaluations after each epoch, when the job has validation examples.
    pub evals: Vec<Eval>,
    /// (step, served name, directory) of each checkpoint written.
    pub checkpoints: Vec<(usize, String, PathBuf)>,
    /// (step, why) of checkpoints that could not be written.
    pub checkpoint_errors: Vec<(usize, String)>,
}

/// The async side's handle on the engine thread. Cheap to clone; the thread ends when every
/// handle is dropped and no work is left.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
}

impl EngineHandle {
    pub fn spawn(engine: LlmEngine) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || crate::engine_loop::run(engine, rx))?;
        Ok(Self { tx })
    }

    /// Queues a request; returns its id and its event stream.
    pub async fn generate(
        &self,
        req: GenerateRequest,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Event>), EngineError> {
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Generate(Box::new(req), events, reply))
            .map_err(|_| EngineError::Stopped)?;
        let id = answer.await.map_err(|_| EngineError::Stopped)??;
        Ok((id, rx))
    }

    pub fn abort(&self, id: u64) {
        let _ = self.tx.send(Command::Abort(id));
    }

    pub async fn load_adapter(&self, name: String, path: PathBuf) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::LoadAdapter(name, path, reply))
            .map_err(|_| EngineError::Stopped)?;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Adapter)
    }

    pub async fn unload_adapter(&self, name: String) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::UnloadAdapter(name, reply))
            .map_err(|_| EngineError::Stopped)?;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Adapter)
    }

    /// Starts (or, with `resume_from`, continues) a finetuning job; the LoRA weights live on
    /// the engine's device.
    pub async fn start_job(&self, spec: JobSpec) -> Result<JobStart, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::StartJob(Box::new(spec), reply))
            .map_err(|_| EngineError::Stopped)?;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Adapter)
    }

    /// For a shutdown: stops finetuning (inference goes on) and writes a checkpoint of every
    /// running or paused job at its last optimizer step, so that a restart loses no optimizer
    /// step. The jobs keep their status.
    pub async fn checkpoint_jobs(&self) -> Result<Vec<CheckpointWritten>, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::CheckpointJobs(reply))
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)
    }

    /// Writes a checkpoint of job `name` at its last optimizer step unless it has one there:
    /// what was written, if anything.
    pub async fn checkpoint_job(
        &self,
        name: String,
    ) -> Result<Option<CheckpointWritten>, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::CheckpointJob(name, reply))
            .map_err(|_| EngineError::Stopped)?;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Adapter)
    }

    /// Stops job `name` if it is active and forgets it, its adapter no longer served under
    /// its name (another replica trains it now); refused while requests use the adapter.
    pub async fn release_job(&self, name: String) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::ReleaseJob(name, reply))
            .map_err(|_| EngineError::Stopped)?;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Adapter)
    }

    pub async fn jobs(&self) -> Result<Vec<JobSnapshot>, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Jobs(reply))
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)
    }

    /// Cancels (`pause` None), pauses (Some(true)) or resumes (Some(false)) a job.
    pub async fn control_job(&self, name: String, pause: Option<bool>) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::ControlJob(name, pause, reply))
            .map_err(|_| EngineError::Stopped)?;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Adapter)
    }

    /// Writes a job's adapter as it is now, in PEFT format, to `dir`.
    pub async fn save_job_adapter(
        &self,
        name: String,
        dir: PathBuf,
        base_model: Option<String>,
    ) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::SaveJobAdapter(name, dir, base_model, reply))
            .map_err(|_| EngineError::Stopped)?;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(EngineError::Adapter)
    }

    pub async fn stats(&self) -> Result<EngineStats, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Stats(reply))
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)
    }
}
