//! The life of a fine-tuning job after `POST /v1/fine_tuning/jobs` accepted it: a watcher task
//! per job copies the engine's progress (steps, evaluations, checkpoints, the final state) into
//! the store, retrying what a full disk refuses; after a restart, `recover` serves finished jobs'
//! adapters again and resumes running ones from their newest readable checkpoint; at shutdown,
//! `checkpoint_on_shutdown` makes every job checkpoint its last step.

use crate::error::ApiError;
pub(crate) use crate::job_events::event;
use crate::job_events::{eval_metrics, method_note, step_metrics};
use crate::job_request::file_data;
use crate::jobs::checkpoint_dir;
use crate::store::now;
use crate::tenants::{job_owner, Tenant};
use crate::AppState;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tandem_model::finetune::{TrainConfig, TrainData};
use tandem_scheduler::{JobSpec, JobState};

/// Copies the engine's progress on `adapter` into job `id` until the job ends.
pub(crate) async fn watch(st: Arc<AppState>, id: String, adapter: String) {
    let (mut seen, mut seen_evals, mut seen_ckpt_errors) = (0, 0, 0);
    // Progress since this watcher started, for estimated_finish.
    let started = std::time::Instant::now();
    let mut first_step: Option<usize> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(jobs) = st.engine.jobs().await else {
            return;
        };
        let Some(snap) = jobs.into_iter().find(|j| j.name == adapter) else {
            return;
        };
        let Ok(Some(mut job)) = st.store.job(&id) else {
            return;
        };
        // Each list is recorded in order up to the first event the store refuses (a full disk);
        // the rest are tried again on the next pass.
        for r in &snap.reports[seen.min(snap.reports.len())..] {
            let ok = event(
                &st,
                &id,
                "info",
                &format!(
                    "Step {}/{}: training loss={:.4}{}",
                    r.step,
                    r.total_steps,
                    r.loss,
                    method_note(r.dpo.as_ref(), r.grpo.as_ref())
                ),
                Some(step_metrics(r)),
            );
            if !ok {
                break;
            }
            seen += 1;
        }
        for e in &snap.evals[seen_evals.min(snap.evals.len())..] {
            let ok = event(
                &st,
                &id,
                "info",
                &match &e.grpo {
                    Some(g) => format!(
                        "Step {}: validation mean reward={:.4} (std {:.4}, {} answers)",
                        e.step,
                        g.mean_reward(),
                        g.reward_std(),
                        g.samples
                    ),
                    None => format!(
                        "Step {}: validation loss={:.4}{}",
                        e.step,
                        e.loss,
                        method_note(e.dpo.as_ref(), None)
                    ),
                },
                Some({
                    let mut m = json!({"step": e.step, "total_steps": snap.total_steps});
                    eval_metrics(e, &mut m);
                    m
                }),
            );
            if !ok {
                break;
            }
            seen_evals += 1;
        }
        for (step, why) in
            &snap.checkpoint_errors[seen_ckpt_errors.min(snap.checkpoint_errors.len())..]
        {
            let msg = format!(
                "The checkpoint at step {step} could not be written ({why}); training goes on"
            );
            if !event(&st, &id, "warn", &msg, None) {
                break;
            }
            seen_ckpt_errors += 1;
        }
        let step0 = *first_step.get_or_insert(snap.step);
        if snap.state == JobState::Running && snap.step > step0 && snap.step < snap.total_steps {
            let per_step = started.elapsed().as_secs_f64() / (snap.step - step0) as f64;
            let left = per_step * (snap.total_steps - snap.step) as f64;
            job["estimated_finish"] = json!(now() + left.ceil() as i64);
        } else if snap.state != JobState::Running {
            job["estimated_finish"] = Value::Null;
        }
        let mut ckpts: Vec<Value> = job["tandem_checkpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let last = ckpts
            .last()
            .and_then(|c| c["step_number"].as_u64())
            .unwrap_or(0) as usize;
        // The engine keeps a job's newest checkpoints and deletes older ones: the record lists
        // those still on disk.
        ckpts.retain(|c| {
            let step = c["step_number"].as_u64().unwrap_or(0);
            checkpoint_dir(&st, &id)
                .join(format!("step-{step}"))
                .exists()
        });
        // Validation losses arrive after their checkpoint: fill them in.
        for c in ckpts.iter_mut() {
            let step = c["step_number"].as_u64().unwrap_or(0) as usize;
            if let Some(e) = snap.evals.iter().find(|e| e.step == step) {
                eval_metrics(e, &mut c["metrics"]);
            }
        }
        for (step, name, _) in snap.checkpoints.iter().filter(|c| c.0 > last) {
            let report = snap.reports.iter().find(|r| r.step == *step);
            let eval = snap.evals.iter().find(|e| e.step == *step);
            let mut metrics = json!({"step": step, "train_loss": report.map(|r| r.loss),
                "train_mean_token_accuracy": report.map(|r| r.accuracy),
                "valid_loss": null, "valid_mean_token_accuracy": null});
            if let Some(r) = report {
                let m = step_metrics(r);
                for k in [
                    "train_reward_accuracy",
                    "train_reward_margin",
                    "train_mean_reward",
                ] {
                    if !m[k].is_null() {
                        metrics[k] = m[k].clone();
                    }
                }
            }
            if let Some(e) = eval {
                eval_metrics(e, &mut metrics);
            }
            ckpts.push(json!({
                "id": format!("ftckpt-{}-{step}", &id[6..]),
                "object": "fine_tuning.job.checkpoint",
                "created_at": now(),
                "fine_tuned_model_checkpoint": name,
                "fine_tuning_job_id": id,
                "metrics": metrics,
                "step_number": step,
            }));
            event(
                &st,
                &id,
                "info",
                &format!("Checkpoint written and served as {name}"),
                None,
            );
        }
        job["tandem_checkpoints"] = json!(ckpts);
        job["trained_tokens"] = json!(snap.trained_tokens);
        let status = match &snap.state {
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Succeeded => "succeeded",
            JobState::Failed(_) => "failed",
            JobState::Cancelled => "cancelled",
        };
        job["status"] = json!(status);
        if snap.state.is_final() {
            job["finished_at"] = json!(now());
            match &snap.state {
                JobState::Succeeded => {
                    job["fine_tuned_model"] = json!(adapter);
                    if let Some(dir) = &st.data_dir {
                        let out = dir.join("fine_tuned").join(&id);
                        if let Err(e) = st
                            .engine
                            .save_job_adapter(
                                adapter.clone(),
                                out.clone(),
                                Some(st.model_name.clone()),
                            )
                            .await
                        {
                            tracing::error!(job = %id, error = %e, "cannot save the adapter");
                        } else {
                            job["result_files"] = json!([]);
                            tracing::info!(job = %id, path = %out.display(), "adapter saved");
                        }
                    }
                    event(&st, &id, "info", "The job has successfully completed", None);
                }
                JobState::Failed(msg) => {
                    job["error"] =
                        json!({"code": "training_failed", "message": msg, "param": null});
                    event(&st, &id, "error", &format!("The job failed: {msg}"), None);
                }
                _ => {
                    event(&st, &id, "info", "The job was cancelled", None);
                }
            }
        }
        if let Err(e) = st.store.put_job(&job) {
            tracing::error!(job = %id, error = %e, "cannot record the job");
        }
        if snap.state.is_final() {
            // The final state must reach the store: retry while it refuses (a full disk).
            let mut wait = Duration::from_secs(1);
            while let Err(e) = st.store.put_job(&job) {
                tracing::warn!(job = %id, error = %e, "cannot record the job's final state; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
            return;
        }
    }
}

/// After a restart: serves every finished job's adapter and checkpoints again, and continues
/// jobs that were running (or paused) from their latest checkpoint (from the start if none).
pub async fn recover(st: Arc<AppState>) {
    let jobs = match st.store.jobs() {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the job store");
            return;
        }
    };
    // Oldest first: a job that continues a fine-tuned model finds it served again.
    for job in jobs.into_iter().rev() {
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
        // Every checkpoint on disk, to resume from the newest that loads.
        let mut candidates: Vec<(usize, std::path::PathBuf)> = Vec::new();
        for c in job["tandem_checkpoints"].as_array().into_iter().flatten() {
            let (Some(name), Some(step)) = (
                c["fine_tuned_model_checkpoint"].as_str(),
                c["step_number"].as_u64(),
            ) else {
                continue;
            };
            let path = checkpoint_dir(&st, &id).join(format!("step-{step}"));
            if !path.exists() {
                continue;
            }
            if let Err(e) = st.engine.load_adapter(name.to_string(), path.clone()).await {
                tracing::warn!(job = %id, checkpoint = name, error = %e, "cannot serve a checkpoint again");
            }
            candidates.push((step as usize, path));
        }
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        match status.as_str() {
            "succeeded" => {
                if let (Some(dir), Some(name)) = (&st.data_dir, job["fine_tuned_model"].as_str()) {
                    let path = dir.join("fine_tuned").join(&id);
                    if let Err(e) = st.engine.load_adapter(name.to_string(), path).await {
                        tracing::warn!(job = %id, error = %e, "cannot serve a fine-tuned model again");
                    }
                }
            }
            "running" | "paused" | "queued" => {
                let restart = async {
                    let cfg: TrainConfig = serde_json::from_value(job["tandem_config"].clone())
                        .map_err(|e| ApiError::invalid(format!("stored config: {e}"), None))?;
                    let m = &cfg.method;
                    let grader = match &job["method"]["reinforcement"]["grader"] {
                        Value::Null => None,
                        g => Some(tandem_model::graders::Grader::parse(g, "grader.").map_err(
                            |(f, e)| ApiError::invalid(format!("stored grader: `{f}` {e}"), None),
                        )?),
                    };
                    let g = grader.as_ref();
                    let file = job["training_file"].as_str().unwrap_or_default();
                    let data =
                        file_data(&st, &owner, file, "training_file", m, g)?.ok_or_else(|| {
                            ApiError::invalid("the training file is gone", Some("training_file"))
                        })?;
                    let validation = match job["validation_file"].as_str() {
                        Some(v) => file_data(&st, &owner, v, "validation_file", m, g)?.unwrap_or_else(|| {
                            tracing::warn!(job = %id, file = v, "the validation file is gone; the job resumes without evaluation");
                            TrainData::Supervised(Vec::new())
                        }),
                        None => TrainData::Supervised(Vec::new()),
                    };
                    let init = job["tandem_init"].as_str().map(str::to_string);
                    let every = job["tandem_checkpoint_every"].as_u64().unwrap_or(1) as usize;
                    let start = st
                        .engine
                        .start_job(JobSpec {
                            name: adapter.clone(),
                            data,
                            validation,
                            cfg,
                            init,
                            checkpoints: Some((checkpoint_dir(&st, &id), every)),
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
                            event(&st, &id, "warn", &msg, None);
                        }
                        let from = start
                            .resumed_from
                            .as_ref()
                            .and_then(|p| candidates.iter().find(|c| &c.1 == p))
                            .map_or(0, |c| c.0);
                        let msg = format!("Resumed after a restart from step {from}");
                        event(&st, &id, "info", &msg, None);
                        tracing::info!(job = %id, step = from, "fine-tuning job resumed");
                        tokio::spawn(watch(st.clone(), id.clone(), adapter.clone()));
                    }
                    Err(e) => {
                        let msg = e.body.error.message.clone();
                        let mut job = job.clone();
                        job["status"] = json!("failed");
                        job["finished_at"] = json!(now());
                        job["error"] =
                            json!({"code": "resume_failed", "message": msg, "param": null});
                        let _ = st.store.put_job(&job);
                        event(
                            &st,
                            &id,
                            "error",
                            &format!("Cannot resume after a restart: {msg}"),
                            None,
                        );
                    }
                }
            }
            _ => {}
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
                    .ok()
                    .into_iter()
                    .flatten()
                    .find(|j| j["tandem_adapter"].as_str() == Some(&snap.name));
                let Some(job) = job else { break };
                let id = job["id"].as_str().unwrap_or_default().to_string();
                let has_ckpt = job["tandem_checkpoints"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["step_number"] == json!(latest)));
                let has_step = snap.reports.last().is_none_or(|r| {
                    st.store
                        .events(&id)
                        .ok()
                        .into_iter()
                        .flatten()
                        .any(|e| e["type"] == "metrics" && e["data"]["step"] == json!(r.step))
                });
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
}
