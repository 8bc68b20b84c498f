//! A job's watcher: a task per running job copies the engine's progress (steps, evaluations,
//! checkpoints, the final state) into the store, retrying what a full disk refuses. In a shared
//! store its writes are the lease's heartbeats: a replica that lost the lease stops training,
//! and a paused job is handed back to the store (no replica holds it while paused);
//! checkpoints and the finished adapter are published to an object store adapter store before
//! they are recorded.

use crate::cluster::{self, Held};
use crate::job_events::{eval_metrics, event, method_note, step_metrics};
use crate::jobs::{checkpoint_dir, fine_tuned_dir};
use crate::store::now;
use crate::AppState;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tandem_scheduler::JobState;

/// Copies the engine's progress on `adapter` into job `id` until the job ends.
pub(crate) async fn watch(st: Arc<AppState>, id: String, adapter: String) {
    let (mut seen, mut seen_evals, mut seen_ckpt_errors) = (0, 0, 0);
    // Progress since this watcher started, for estimated_finish.
    let started = std::time::Instant::now();
    let mut first_step: Option<usize> = None;
    let mut keeper = cluster::Keeper::new();
    // Paused in a shared store: handed back once its last checkpoint is recorded.
    let mut handing_off = false;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(jobs) = st.engine.jobs().await else {
            return;
        };
        let Some(snap) = jobs.into_iter().find(|j| j.name == adapter) else {
            return;
        };
        let mut job = match st.store.job(&id).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(e) => {
                // The store cannot be read now: try again next pass (a shared store's lease is
                // kept from lapsing under a job that trains on).
                tracing::warn!(job = %id, error = %e, "cannot read the job's record");
                let running = snap.state == JobState::Running;
                keeper.failed(&st, &id, &adapter, running).await;
                continue;
            }
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
            )
            .await;
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
            )
            .await;
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
            if !event(&st, &id, "warn", &msg, None).await {
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
        let ckpts: Vec<Value> = job["tandem_checkpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let last = ckpts
            .last()
            .and_then(|c| c["step_number"].as_u64())
            .unwrap_or(0) as usize;
        // The engine keeps a job's newest checkpoints and deletes older ones: the record lists
        // those still on disk (and an object store's copies of the others go too).
        let mut kept = Vec::with_capacity(ckpts.len());
        for c in ckpts {
            let step = c["step_number"].as_u64().unwrap_or(0) as usize;
            let dir = checkpoint_dir(&st, &id).join(format!("step-{step}"));
            let newer = snap.checkpoints.iter().filter(|k| k.0 > step).count();
            if dir.exists() {
                kept.push(c);
            } else if st.adapter_remote.is_none()
                || newer >= tandem_scheduler::engine::KEEP_CHECKPOINTS
            {
                crate::adapter_files::unpublish(&st, &dir).await;
            } else {
                // Not fetched here (the object store did not answer at the start): still
                // the store's.
                kept.push(c);
            }
        }
        let mut ckpts = kept;
        // Validation losses arrive after their checkpoint: fill them in.
        for c in ckpts.iter_mut() {
            let step = c["step_number"].as_u64().unwrap_or(0) as usize;
            if let Some(e) = snap.evals.iter().find(|e| e.step == step) {
                eval_metrics(e, &mut c["metrics"]);
            }
        }
        let mut unpublished = false;
        for (step, name, path) in snap.checkpoints.iter().filter(|c| c.0 > last) {
            // Recorded once every replica can read it.
            if let Err(e) = crate::adapter_files::publish(&st, path).await {
                tracing::warn!(job = %id, step, error = %e, "cannot publish a checkpoint to the object store; retrying");
                unpublished = true;
                break;
            }
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
            )
            .await;
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
        job["status"] = json!(keeper.status(status));
        if snap.state.is_final() {
            job["finished_at"] = json!(now());
            match &snap.state {
                JobState::Succeeded => {
                    job["fine_tuned_model"] = json!(adapter);
                    if let Some(out) = fine_tuned_dir(&st, &id) {
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
                            // Every replica must be able to serve it before it is recorded.
                            let mut wait = Duration::from_secs(1);
                            while let Err(e) = crate::adapter_files::publish(&st, &out).await {
                                tracing::warn!(job = %id, error = %e, "cannot publish the adapter to the object store; retrying");
                                tokio::time::sleep(wait).await;
                                wait = (wait * 2).min(Duration::from_secs(60));
                            }
                            job["result_files"] = json!([]);
                            tracing::info!(job = %id, path = %out.display(), "adapter saved");
                        }
                    }
                    event(&st, &id, "info", "The job has successfully completed", None).await;
                }
                JobState::Failed(msg) => {
                    job["error"] =
                        json!({"code": "training_failed", "message": msg, "param": null});
                    event(&st, &id, "error", &format!("The job failed: {msg}"), None).await;
                }
                _ => {
                    event(&st, &id, "info", "The job was cancelled", None).await;
                }
            }
        }
        if snap.state.is_final() {
            // The final state must reach the store: retry while it refuses (a full disk).
            let mut wait = Duration::from_secs(1);
            while let Err(e) = cluster::write_final(&st, &job).await {
                tracing::warn!(job = %id, error = %e, "cannot record the job's final state; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
            cluster::trained_here(&st, &id, false);
            return;
        }
        match cluster::write_job(&st, &job).await {
            Ok(Held::Yes(wanted)) => {
                keeper.written(&st, &id, &adapter).await;
                if let Some(action) = wanted {
                    handing_off = cluster::apply_wanted(&st, &id, &adapter, &action).await;
                } else if handing_off
                    && snap.state == JobState::Paused
                    && !unpublished
                    && cluster::hand_off(&st, &id, &adapter, job).await
                {
                    return;
                }
            }
            Ok(Held::Lost) => {
                cluster::lost(&st, &id, &adapter).await;
                return;
            }
            Err(e) => {
                tracing::error!(job = %id, error = %e, "cannot record the job");
                let running = snap.state == JobState::Running;
                keeper.failed(&st, &id, &adapter, running).await;
            }
        }
    }
}
