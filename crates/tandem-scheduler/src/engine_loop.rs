//! The engine thread: owns the `LlmEngine` (model, KV cache, scheduler), runs one iteration at a
//! time, and talks to async tasks only through channels. Nothing async runs on it; it blocks on
//! its command channel when idle. Each request carries its own event channel; a request whose
//! receiver is dropped (client gone) is aborted and its KV blocks freed at the next iteration.

use crate::coserve::JobState;
use crate::engine::{IterationCounters, LlmEngine};
use crate::scheduler::AdmitError;
use crate::sequence::FinishReason;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use tandem_model::finetune::{
    Eval, StepReport, TrainConfig, TrainData, TrainableLora, TrainingRun,
};
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

enum Command {
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
            .spawn(move || run(engine, rx))?;
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

struct Live {
    events: mpsc::UnboundedSender<Event>,
    prompt_tokens: usize,
    completion_tokens: usize,
    span: tracing::Span,
}

fn run(mut engine: LlmEngine, rx: Receiver<Command>) {
    let mut live: HashMap<u64, Live> = HashMap::new();
    loop {
        // Take every pending command before the next iteration; block only when idle.
        let cmd = if engine.has_work() {
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) if live.is_empty() => return,
                Err(TryRecvError::Disconnected) => None,
            }
        } else {
            release_freed_memory();
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        if let Some(cmd) = cmd {
            handle(&mut engine, &mut live, cmd);
            continue;
        }
        // Clients that went away: free their sequences before computing for them.
        let gone: Vec<u64> = live
            .iter()
            .filter(|(_, l)| l.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            engine.abort(id);
            if let Some(l) = live.remove(&id) {
                l.span
                    .in_scope(|| tracing::info!(seq = id, "client went away; request aborted"));
            }
        }
        if !engine.has_work() {
            continue;
        }
        let span = tracing::debug_span!("iteration", n = engine.counters.iterations + 1);
        let result = span.in_scope(|| engine.step());
        match result {
            Ok(outputs) => {
                for o in outputs {
                    let Some(l) = live.get_mut(&o.seq_id) else {
                        continue;
                    };
                    if let Some(id) = o.token {
                        l.completion_tokens += 1;
                        let _ = l.events.send(Event::Token {
                            id,
                            text: o.text,
                            logprobs: o.logprobs,
                        });
                    }
                    if let Some(reason) = o.finished {
                        if let Some(l) = live.remove(&o.seq_id) {
                            l.span.in_scope(|| {
                                tracing::info!(
                                    seq = o.seq_id,
                                    finish_reason = reason.as_str(),
                                    prompt_tokens = l.prompt_tokens,
                                    completion_tokens = l.completion_tokens,
                                    cached_tokens = o.cached_tokens,
                                    "request finished"
                                )
                            });
                            let _ = l.events.send(Event::Finished {
                                reason,
                                prompt_tokens: l.prompt_tokens,
                                completion_tokens: l.completion_tokens,
                                cached_tokens: o.cached_tokens,
                            });
                        }
                    }
                }
            }
            Err(e) => {
                // A failed iteration fails the requests it held, never the process.
                tracing::error!(error = %e, "engine iteration failed");
                for (id, l) in live.drain() {
                    engine.abort(id);
                    l.span
                        .in_scope(|| tracing::error!(seq = id, error = %e, "request failed"));
                    let _ = l.events.send(Event::Failed(e.to_string()));
                }
            }
        }
    }
}

/// Gives memory freed during busy iterations back to the OS when the engine goes idle. glibc's
/// malloc keeps freed blocks in its per-thread arenas (the engine, tokio and rayon threads each
/// have one), so without this the resident size stays at the busiest moment's high-water mark.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the OS; it takes no pointers and is
    // safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn handle(engine: &mut LlmEngine, live: &mut HashMap<u64, Live>, cmd: Command) {
    match cmd {
        Command::Generate(req, events, reply) => {
            let req = *req;
            let prompt_tokens = req.prompt.len();
            let span = req.span;
            match engine.add_request_salted(
                req.prompt,
                req.params,
                req.adapter.as_deref(),
                req.cache_salt,
            ) {
                Ok(id) => {
                    span.in_scope(|| {
                        tracing::info!(seq = id, prompt_tokens, adapter = ?req.adapter, "request queued")
                    });
                    live.insert(
                        id,
                        Live {
                            events,
                            prompt_tokens,
                            completion_tokens: 0,
                            span,
                        },
                    );
                    let _ = reply.send(Ok(id));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        Command::Abort(id) => {
            engine.abort(id);
            live.remove(&id);
        }
        Command::LoadAdapter(name, path, reply) => {
            let r = engine
                .runner
                .adapters
                .register(&name, &path)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = reply.send(r);
        }
        Command::UnloadAdapter(name, reply) => {
            let queued = engine
                .runner
                .adapters
                .id(&name)
                .is_some_and(|id| engine.scheduler.uses_adapter(id));
            let r = if queued {
                Err(format!(
                    "the adapter `{name}` is in use by queued or running requests"
                ))
            } else {
                engine
                    .runner
                    .adapters
                    .unregister(&name)
                    .map_err(|e| e.to_string())
            };
            let _ = reply.send(r);
        }
        Command::StartJob(spec, reply) => {
            let _ = reply.send(start_job(engine, *spec));
        }
        Command::CheckpointJobs(reply) => {
            engine.coserve.mode = crate::coserve::CoserveMode::InferenceOnly;
            let _ = reply.send(engine.checkpoint_active_jobs());
        }
        Command::Jobs(reply) => {
            let snaps = engine
                .jobs
                .iter()
                .map(|j| JobSnapshot {
                    name: j.name.clone(),
                    state: j.state.clone(),
                    step: j.run.step,
                    total_steps: j.run.total_steps(),
                    trained_tokens: j.trained_tokens,
                    reports: j.reports.clone(),
                    evals: j.run.evals.clone(),
                    checkpoints: j.checkpoints.clone(),
                    checkpoint_errors: j.checkpoint_errors.clone(),
                })
                .collect();
            let _ = reply.send(snaps);
        }
        Command::ControlJob(name, pause, reply) => {
            let r = match pause {
                None => engine.cancel_job(&name),
                Some(p) => engine.pause_job(&name, p),
            };
            let _ = reply.send(r);
        }
        Command::SaveJobAdapter(name, dir, base, reply) => {
            let r = match engine.jobs.iter().find(|j| j.name == name) {
                None => Err(format!("no job named `{name}`")),
                Some(j) => j
                    .run
                    .lora
                    .to_adapter(base)
                    .and_then(|a| a.save(&dir))
                    .map_err(|e| e.to_string()),
            };
            let _ = reply.send(r);
        }
        Command::Stats(reply) => {
            let s = &engine.scheduler;
            let reg = &engine.runner.adapters;
            let names = |ids: Vec<u32>| -> Vec<String> {
                ids.into_iter()
                    .filter_map(|id| reg.name(id).map(str::to_string))
                    .collect()
            };
            let (running, waiting) = s.adapters_in_use();
            let _ = reply.send(EngineStats {
                running: s.num_running(),
                waiting: s.num_waiting(),
                num_blocks: s.blocks().num_blocks(),
                free_blocks: s.blocks().num_free(),
                preemptions: s.num_preemptions,
                prefix_cache_queries: s.prefix_cache_queries,
                prefix_cache_hits: s.prefix_cache_hits,
                cached_free_blocks: s.blocks().num_cached_free(),
                adapters: reg.names(),
                running_adapters: names(running),
                waiting_adapters: names(waiting),
                max_loras: reg.config().max_loras,
                adapters_resident: reg.resident().len(),
                adapter_loads: reg.loads,
                adapter_evictions: reg.evictions,
                counters: engine.counters,
                jobs: engine
                    .jobs
                    .iter()
                    .map(|j| JobStat {
                        name: j.name.clone(),
                        status: j.state.name(),
                        trained_tokens: j.trained_tokens,
                        loss: j.reports.last().map(|r| r.loss),
                        step: j.run.step,
                        total_steps: j.run.total_steps(),
                        sampled_tokens: j.sampled_tokens,
                        mean_reward: j
                            .reports
                            .last()
                            .and_then(|r| r.grpo)
                            .map(|g| g.mean_reward()),
                    })
                    .collect(),
            });
        }
    }
}

fn start_job(engine: &mut LlmEngine, spec: JobSpec) -> Result<JobStart, String> {
    let m = &engine.runner.model;
    let mut start = JobStart::default();
    let mut resumed = None;
    for dir in &spec.resume_from {
        match TrainingRun::resume(dir, spec.data.clone(), &m.cfg, m.device()) {
            Ok((run, _)) => {
                start.resumed_from = Some(dir.clone());
                resumed = Some(run);
                break;
            }
            Err(e) => {
                tracing::warn!(job = %spec.name, checkpoint = %dir.display(), error = %e, "cannot resume from a checkpoint; trying an earlier one");
                start.skipped.push((dir.clone(), e.to_string()));
            }
        }
    }
    let mut run = match resumed {
        Some(run) => run,
        None => {
            let mut cfg = spec.cfg;
            let lora = match &spec.init {
                Some(name) => {
                    let reg = &engine.runner.adapters;
                    let id = reg
                        .id(name)
                        .ok_or_else(|| format!("no adapter named `{name}` to start from"))?;
                    let init = reg.adapter(id).map_err(|e| e.to_string())?;
                    let lora =
                        TrainableLora::from_adapter(&init, m.cfg.num_hidden_layers, m.device())
                            .map_err(|e| e.to_string())?;
                    cfg.adopt(&lora.spec);
                    lora
                }
                None => cfg
                    .spec()
                    .and_then(|spec| TrainableLora::new(&m.cfg, spec, m.device(), cfg.seed))
                    .map_err(|e| e.to_string())?,
            };
            TrainingRun::new(spec.data, cfg, lora).map_err(|e| e.to_string())?
        }
    };
    run.set_validation(spec.validation)
        .map_err(|e| e.to_string())?;
    start.config = Some(run.cfg.clone());
    // DPO's reference, and a reinforcement run's for its KL term: the adapter it starts from.
    let kl =
        matches!(run.cfg.method, tandem_model::finetune::Method::Reinforcement(r) if r.beta != 0.0);
    let reference = spec
        .init
        .as_deref()
        .filter(|_| run.cfg.method.is_dpo() || kl);
    engine.start_job_with_reference(&spec.name, run, reference)?;
    if let Some((dir, every)) = spec.checkpoints {
        engine.set_job_checkpoints(&spec.name, dir, every)?;
        engine.adopt_checkpoints(&spec.name, &spec.resume_from)?;
    }
    Ok(start)
}
