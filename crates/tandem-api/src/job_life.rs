//! The life of a fine-tuning job after `POST /v1/fine_tuning/jobs` accepted it: `start_record`
//! starts (or resumes, from its newest readable checkpoint) the job a record describes — after
//! a restart (`recover`) or when a replica claims it; at shutdown, `checkpoint_on_shutdown`
//! makes every job checkpoint its last step.

use crate::error::ApiError;
pub(crate) use crate::job_events::event;
use crate::job_request::file_data;
use crate::job_watch::watch;
use crate::jobs::{checkpoint_dir, fine_tuned_dir};
use crate::store::now;
use crate::tenants::{job_owner, Tenant};
use crate::AppState;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem_model::finetune::{TrainConfig, TrainData};
use tandem_scheduler::JobSpec;

/// Every checkpoint of `job` still on disk (fetched from an object store adapter store if need
/// be), newest first; each served again under its name.
async fn serve_checkpoints(st: &AppState, job: &Value) -> Vec<(usize, PathBuf)> {
    let id = job["id"].as_str().unwrap_or_default();
    let mut candidates: Vec<(usize, PathBuf)> = Vec::new();
    for c in job["tandem_checkpoints"].as_array().into_iter().flatten() {
        let (Some(name), Some(step)) = (
            c["fine_tuned_model_checkpoint"].as_str(),
            c["step_number"].as_u64(),
        ) else {
            continue;
        };
        let path = checkpoint_dir(st, id).join(format!("step-{step}"));
        if !crate::adapter_files::present(st, &path).await {
            continue;
        }
        let served = st
            .engine
            .stats()
            .await
            .is_ok_and(|s| s.adapters.iter().any(|a| a == name));
        if !served {
            if let Err(e) = st.engine.load_adapter(name.to_string(), path.clone()).await {
                tracing::warn!(job = %id, checkpoint = name, error = %e, "cannot serve a checkpoint again");
            }
        }
        candidates.push((step as usize, path));
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    candidates
}

/// After a restart: serves every finished job's adapter and checkpoints again, and continues
/// jobs that were running (or paused) from their latest checkpoint (from the start if none).
/// A shared store's jobs are not this replica's to resume: replicas claim them.
pub async fn recover(st: Arc<AppState>) {
    if st.store.is_shared() {
        return;
    }
    let jobs = match st.store.jobs().await {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the job store");
            return;
        }
    };
    // Oldest first: a job that continues a fine-tuned model finds it served again.
    for job in jobs.into_iter().rev() {
        let id = job["id"].as_str().unwrap_or_default().to_string();
        let adapter = job["tandem_adapter"].as_str().unwrap_or_default();
        st.tenants.set_owner(adapter, job_owner(&job));
        match job["status"].as_str().unwrap_or_default() {
            "succeeded" => {
                serve_checkpoints(&st, &job).await;
                if let (Some(name), Some(path)) =
                    (job["fine_tuned_model"].as_str(), fine_tuned_dir(&st, &id))
                {
                    if let Err(e) = st.engine.load_adapter(name.to_string(), path).await {
                        tracing::warn!(job = %id, error = %e, "cannot serve a fine-tuned model again");
                    }
                }
            }
            "running" | "paused" | "queued" | "validating_files" => {
                start_record(&st, job, "after a restart").await;
            }
            _ => {
                serve_checkpoints(&st, &job).await;
            }
        }
    }
}

/// Starts the job `job` describes, from its newest checkpoint that loads (from the start if
/// none), and its watcher; `why` goes into the event ("after a restart", "on replica r1"). A
/// job that cannot start is recorded failed, unless the store could not be read (it is tried
/// again later). True if it started.
pub(crate) async fn start_record(st: &Arc<AppState>, job: Value, why: &str) -> bool {
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let adapter = job["tandem_adapter"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let status = job["status"].as_str().unwrap_or_default().to_string();
    st.tenants.set_owner(&adapter, job_owner(&job));
    let owner = Tenant {
        name: job_owner(&job).to_string(),
        admin: false,
    };
    let candidates = serve_checkpoints(st, &job).await;
    let restart = async {
        let cfg: TrainConfig = serde_json::from_value(job["tandem_config"].clone())
            .map_err(|e| ApiError::invalid(format!("stored config: {e}"), None))?;
        let m = &cfg.method;
        let grader =
            match &job["method"]["reinforcement"]["grader"] {
                Value::Null => None,
                g => Some(tandem_model::graders::Grader::parse(g, "grader.").map_err(
                    |(f, e)| ApiError::invalid(format!("stored grader: `{f}` {e}"), None),
                )?),
            };
        let g = grader.as_ref();
        // A score_model grader's model is served here before answers are graded.
        let mut graders_models = Vec::new();
        if let Some(g) = g {
            g.models(&mut graders_models);
        }
        for m in &graders_models {
            crate::shared_adapters::ensure_served(st, m).await?;
        }
        let file = job["training_file"].as_str().unwrap_or_default();
        let data = file_data(st, &owner, file, "training_file", m, g)
            .await?
            .ok_or_else(|| ApiError::invalid("the training file is gone", Some("training_file")))?;
        let validation = match job["validation_file"].as_str() {
            Some(v) => file_data(st, &owner, v, "validation_file", m, g).await?.unwrap_or_else(|| {
                tracing::warn!(job = %id, file = v, "the validation file is gone; the job resumes without evaluation");
                TrainData::Supervised(Vec::new())
            }),
            None => TrainData::Supervised(Vec::new()),
        };
        let init = job["tandem_init"].as_str().map(str::to_string);
        if let Some(init) = &init {
            crate::shared_adapters::ensure_served(st, init).await?;
        }
        let every = job["tandem_checkpoint_every"].as_u64().unwrap_or(1) as usize;
        let dir = checkpoint_dir(st, &id);
        std::fs::create_dir_all(&dir).map_err(ApiError::internal)?;
        let start = st
            .engine
            .start_job(JobSpec {
                name: adapter.clone(),
                data,
                validation,
                cfg,
                init,
                checkpoints: Some((dir, every)),
                resume_from: candidates.iter().map(|(_, p)| p.clone()).collect(),
            })
            .await
            .map_err(|e| ApiError::invalid(e.to_string(), None))?;
        if status == "paused" {
            st.engine
                .control_job(adapter.clone(), Some(true))
                .await
                .map_err(|e| ApiError::invalid(e.to_string(), None))?;
        }
        Ok::<_, ApiError>(start)
    };
    match restart.await {
        Ok(start) => {
            for (path, why) in &start.skipped {
                let step = candidates.iter().find(|c| &c.1 == path).map_or(0, |c| c.0);
                let msg = format!("The checkpoint at step {step} cannot be read ({why}); resuming from an earlier one");
                event(st, &id, "warn", &msg, None).await;
            }
            let from = start
                .resumed_from
                .as_ref()
                .and_then(|p| candidates.iter().find(|c| &c.1 == p))
                .map_or(0, |c| c.0);
            let msg = if status == "queued" || status == "validating_files" {
                format!("Fine-tuning job started {why}")
            } else {
                format!("Resumed {why} from step {from}")
            };
            event(st, &id, "info", &msg, None).await;
            tracing::info!(job = %id, step = from, why, "fine-tuning job started");
            if let Some(c) = start.config {
                // Continuing a fine-tuned model: its LoRA shape.
                let mut job = job.clone();
                job["lora"] = json!({"r": c.r, "alpha": c.alpha, "target_modules": c.targets});
                job["tandem_config"] = json!(c);
                if let Err(e) = crate::cluster::write_job(st, &job).await {
                    tracing::warn!(job = %id, error = %e, "cannot record the job's LoRA shape");
                }
            }
            tokio::spawn(watch(st.clone(), id.clone(), adapter.clone()));
            true
        }
        Err(e) if e.status == axum::http::StatusCode::SERVICE_UNAVAILABLE => {
            tracing::warn!(job = %id, "the store cannot be read; the job is tried again later");
            false
        }
        Err(e) => {
            let msg = e.body.error.message.clone();
            let mut job = job.clone();
            job["status"] = json!("failed");
            job["finished_at"] = json!(now());
            job["error"] = json!({"code": "resume_failed", "message": msg, "param": null});
            if let Err(e) = crate::cluster::write_final(st, &job).await {
                tracing::error!(job = %id, error = %e, "cannot record the job's failure");
            }
            let msg = format!("Cannot start the job {why}: {msg}");
            event(st, &id, "error", &msg, None).await;
            false
        }
    }
}

/// At shutdown: training stops, every running or paused job writes a checkpoint at its last
/// optimizer step, and this waits (at most `timeout`) until each job's record holds that
/// checkpoint and its last step's event, so that the restarted server resumes there and no
/// optimizer step is lost.
pub async fn checkpoint_on_shutdown(st: Arc<AppState>, timeout: Duration) {
    let work = async {
        match st.engine.checkpoint_jobs().await {
            Ok(written) => {
                for w in written {
                    tracing::info!(job = %w.job, step = w.step, "checkpoint written at shutdown");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot checkpoint the jobs at shutdown");
                return;
            }
        }
        let Ok(snaps) = st.engine.jobs().await else {
            return;
        };
        // The jobs' watchers record steps and checkpoints (they are the one writer of a job
        // object); wait for them to catch up with the engine.
        for snap in snaps.iter().filter(|s| !s.state.is_final()) {
            let Some(latest) = snap.checkpoints.iter().map(|c| c.0).max() else {
                continue;
            };
            loop {
                let job = st
                    .store
                    .jobs()
                    .await
                    .ok()
                    .into_iter()
                    .flatten()
                    .find(|j| j["tandem_adapter"].as_str() == Some(&snap.name));
                let Some(job) = job else { break };
                let id = job["id"].as_str().unwrap_or_default().to_string();
                let has_ckpt = job["tandem_checkpoints"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["step_number"] == json!(latest)));
                let has_step = match snap.reports.last() {
                    None => true,
                    Some(r) => st
                        .store
                        .events(&id)
                        .await
                        .ok()
                        .into_iter()
                        .flatten()
                        .any(|e| e["type"] == "metrics" && e["data"]["step"] == json!(r.step)),
                };
                if has_ckpt && has_step {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    if tokio::time::timeout(timeout, work).await.is_err() {
        tracing::warn!(
            ?timeout,
            "shutdown checkpoints took too long; the jobs resume from earlier ones"
        );
    }
    // Replicas sharing the store take the jobs over at once, not after the leases lapse.
    crate::cluster::release_all(&st).await;
}
