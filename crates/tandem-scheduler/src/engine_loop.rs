//! The engine thread: owns the `LlmEngine` (model, KV cache, scheduler), runs one iteration at a
//! time, and talks to async tasks only through channels. Nothing async runs on it; it blocks on
//! its command channel when idle. Each request carries its own event channel; a request whose
//! receiver is dropped (client gone) is aborted and its KV blocks freed at the next iteration.
//! The handle the async side holds, and the data it sends, are in `engine_handle.rs`.

use crate::engine::LlmEngine;
use crate::engine_handle::{Command, EngineStats, Event, JobSnapshot, JobSpec, JobStart, JobStat};
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, TryRecvError};
use tandem_model::finetune::{TrainableLora, TrainingRun};
use tokio::sync::mpsc;

struct Live {
    events: mpsc::UnboundedSender<Event>,
    prompt_tokens: usize,
    completion_tokens: usize,
    span: tracing::Span,
}

pub(crate) fn run(mut engine: LlmEngine, rx: Receiver<Command>) {
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
        Command::CheckpointJob(name, reply) => {
            let _ = reply.send(engine.checkpoint_job(&name));
        }
        Command::ReleaseJob(name, reply) => {
            let _ = reply.send(engine.release_job(&name));
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
