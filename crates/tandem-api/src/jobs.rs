//! `/v1/fine_tuning/jobs`: OpenAI's fine-tuning jobs, trained by the engine between (and
//! inside) inference iterations. A job's adapter is served under its `fine_tuned_model` name.
//! Job objects and events live in the store; a watcher task per job copies the engine's
//! progress (steps, losses, final state) into them.

use crate::error::ApiError;
use crate::store::now;
use crate::tenants::{job_owner, Tenant};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tandem_model::finetune::{parse_record, tokenize, Example, Hyperparameters, TrainConfig};
use tandem_scheduler::{JobSpec, JobState};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Hyper {
    n_epochs: Option<Value>,
    batch_size: Option<Value>,
    learning_rate_multiplier: Option<Value>,
}

#[derive(Deserialize)]
struct Method {
    #[serde(rename = "type")]
    kind: Option<String>,
    supervised: Option<Supervised>,
}

#[derive(Deserialize)]
struct Supervised {
    hyperparameters: Option<Hyper>,
}

#[derive(Deserialize)]
struct Lora {
    r: Option<usize>,
    alpha: Option<f64>,
    target_modules: Option<Vec<String>>,
}

#[derive(Deserialize)]
pub struct CreateJob {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    suffix: Option<String>,
    seed: Option<u64>,
    hyperparameters: Option<Hyper>,
    method: Option<Method>,
    lora: Option<Lora>,
    /// OpenAI's metadata: up to 16 string pairs, kept on the job object.
    metadata: Option<serde_json::Map<String, Value>>,
}

/// `value` as an integer in `lo..=hi`, or None for `"auto"` (or left out).
fn int_param(
    v: &Option<Value>,
    name: &str,
    lo: usize,
    hi: usize,
) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if (lo as u64..=hi as u64).contains(&x) => Ok(Some(x as usize)),
            _ => Err(ApiError::invalid(
                format!("{name} must be an integer from {lo} to {hi}"),
                Some(name),
            )),
        },
        Some(_) => Err(ApiError::invalid(
            format!("{name} must be an integer or \"auto\""),
            Some(name),
        )),
    }
}

/// Longest training sequence (tokens); the same at creation and at recovery.
fn max_seq_len(st: &AppState) -> usize {
    st.max_model_len.min(2048)
}

/// A training or validation file's lines as tokenized examples (`field` names it in errors).
fn examples(st: &AppState, content: &[u8], field: &str) -> Result<Vec<Example>, ApiError> {
    let text = String::from_utf8_lossy(content);
    let mut data = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex = parse_record(line)
            .and_then(|r| tokenize(&r, &st.tokenizer, max_seq_len(st)))
            .map_err(|(f, m)| {
                ApiError::invalid(format!("{field} line {}: `{f}` {m}", i + 1), Some(field))
            })?;
        data.push(ex);
    }
    Ok(data)
}

/// The examples of stored file `id` (None if there is no such file, or the tenant may not see
/// it); `field` names it in errors.
fn file_examples(
    st: &AppState,
    t: &Tenant,
    id: &str,
    field: &str,
) -> Result<Option<Vec<Example>>, ApiError> {
    if crate::files::visible_file(st, t, id)?.is_none() {
        return Ok(None);
    }
    match st.store.file_content(id)? {
        Some(content) => examples(st, &content, field).map(Some),
        None => Ok(None),
    }
}

fn checkpoint_dir(st: &AppState, id: &str) -> std::path::PathBuf {
    match &st.data_dir {
        Some(d) => d.join("checkpoints").join(id),
        None => std::env::temp_dir().join("tandem-checkpoints").join(id),
    }
}

fn missing(id: &str) -> ApiError {
    ApiError::not_found(
        format!("No such fine-tuning job: {id}"),
        Some("fine_tuning_job_id"),
    )
}

pub async fn create(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: CreateJob = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("Invalid request: {e}"), None))?;
    if req.model != st.model_name {
        return Err(ApiError::invalid(
            format!(
                "Model {} is not available for fine-tuning here: the base model is {}",
                req.model, st.model_name
            ),
            Some("model"),
        ));
    }
    if let Some(m) = &req.method {
        if m.kind.as_deref().is_some_and(|k| k != "supervised") {
            return Err(ApiError::invalid(
                "Only the `supervised` method is supported",
                Some("method.type"),
            ));
        }
    }
    let hyper = req
        .method
        .and_then(|m| m.supervised)
        .and_then(|s| s.hyperparameters)
        .or(req.hyperparameters)
        .unwrap_or_default();
    let data = file_examples(&st, &t, &req.training_file, "training_file")?.ok_or_else(|| {
        ApiError::invalid(
            format!("Invalid training_file: {}: no such file", req.training_file),
            Some("training_file"),
        )
    })?;
    let validation = match &req.validation_file {
        Some(v) => file_examples(&st, &t, v, "validation_file")?.ok_or_else(|| {
            ApiError::invalid(
                format!("Invalid validation_file: {v}: no such file"),
                Some("validation_file"),
            )
        })?,
        None => Vec::new(),
    };
    let max_len = max_seq_len(&st);
    let mult = match &hyper.learning_rate_multiplier {
        None => None,
        Some(Value::String(s)) if s == "auto" => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x > 0.0 && x <= 100.0 => Some(x),
            _ => {
                return Err(ApiError::invalid(
                    "learning_rate_multiplier must be in (0, 100]",
                    Some("learning_rate_multiplier"),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "learning_rate_multiplier must be a number or \"auto\"",
                Some("learning_rate_multiplier"),
            ))
        }
    };
    // "auto" (or left out) resolved from the data's size, as OpenAI does; the job object
    // records the resolved values.
    let hp = Hyperparameters {
        n_epochs: int_param(&hyper.n_epochs, "n_epochs", 1, 50)?,
        batch_size: int_param(&hyper.batch_size, "batch_size", 1, 256)?,
        learning_rate_multiplier: mult,
    }
    .resolve(data.len());
    let (n_epochs, batch_size) = (hp.n_epochs, hp.batch_size);
    let lora = req.lora.unwrap_or(Lora {
        r: None,
        alpha: None,
        target_modules: None,
    });
    let r = lora.r.unwrap_or(8);
    let cfg = TrainConfig {
        r,
        alpha: lora.alpha.unwrap_or(2.0 * r as f64),
        targets: lora
            .target_modules
            .unwrap_or_else(tandem_model::finetune::auto::default_targets),
        lr: hp.lr,
        epochs: n_epochs,
        batch_size,
        chunk_tokens: 128,
        max_seq_len: max_len,
        seed: req.seed.unwrap_or(42),
        ..Default::default()
    };
    if r == 0 {
        return Err(ApiError::invalid(
            "lora.r must be at least 1",
            Some("lora.r"),
        ));
    }
    if cfg.alpha.is_nan() || cfg.alpha <= 0.0 {
        return Err(ApiError::invalid(
            "lora.alpha must be positive",
            Some("lora.alpha"),
        ));
    }
    cfg.spec()
        .map_err(|e| ApiError::invalid(e.to_string(), Some("lora.target_modules")))?;
    if let Some(s) = &req.suffix {
        if s.len() > 64
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ApiError::invalid(
                "suffix: up to 64 letters, digits, '-' or '_'",
                Some("suffix"),
            ));
        }
    }
    if let Some(m) = &req.metadata {
        let ok = m.len() <= 16
            && m.iter().all(|(k, v)| {
                k.chars().count() <= 64 && v.as_str().is_some_and(|v| v.chars().count() <= 512)
            });
        if !ok {
            return Err(ApiError::invalid(
                "metadata: up to 16 pairs, keys up to 64 characters, string values up to 512",
                Some("metadata"),
            ));
        }
    }
    let id = format!("ftjob-{}", uuid::Uuid::new_v4().simple());
    let adapter = format!(
        "ft:{}:{}:{}",
        st.model_name,
        req.suffix.as_deref().unwrap_or("tandem"),
        &id[6..14]
    );
    let hp = json!({"n_epochs": n_epochs, "batch_size": batch_size,
        "learning_rate_multiplier": hp.learning_rate_multiplier});
    let mut job = json!({
        "id": id,
        "object": "fine_tuning.job",
        "created_at": now(),
        "finished_at": null,
        "model": req.model,
        "fine_tuned_model": null,
        "organization_id": "org-tandem",
        "result_files": [],
        "status": "running",
        "validation_file": req.validation_file,
        "training_file": req.training_file,
        "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "trained_tokens": 0,
        "error": null,
        "seed": cfg.seed,
        "estimated_finish": null,
        "integrations": [],
        "user_provided_suffix": req.suffix,
        "metadata": req.metadata,
        "lora": {"r": cfg.r, "alpha": cfg.alpha, "target_modules": cfg.targets},
        "tandem_adapter": adapter,
        "tandem_owner": t.name,
        "tandem_config": cfg,
        "tandem_checkpoint_every": data.len().div_ceil(batch_size),
    });
    // A checkpoint at the end of every epoch, written and served while the job runs.
    let ckpt_dir = checkpoint_dir(&st, &id);
    std::fs::create_dir_all(&ckpt_dir).map_err(ApiError::internal)?;
    let every = data.len().div_ceil(batch_size);
    st.engine
        .start_job(JobSpec {
            name: adapter.clone(),
            data,
            validation,
            cfg,
            checkpoints: Some((ckpt_dir, every)),
            resume_from: Vec::new(),
        })
        .await
        .map_err(|e| ApiError::invalid(format!("Cannot start the job: {e}"), None))?;
    // Not recorded (a full disk): not acknowledged, so it must not train either.
    if let Err(e) = st.store.put_job(&job) {
        let _ = st.engine.control_job(adapter.clone(), None).await;
        let _ = st.engine.unload_adapter(adapter.clone()).await;
        return Err(e.into());
    }
    st.tenants.set_owner(&adapter, &t.name);
    event(&st, &id, "info", "Created fine-tuning job", None);
    event(&st, &id, "info", "Fine-tuning job started", None);
    tracing::info!(job = %id, adapter = %adapter, "fine-tuning job started");
    tokio::spawn(watch(st.clone(), id.clone(), adapter));
    job["status"] = json!("running");
    Ok(Json(job))
}

/// Records an event on job `job`; false if the store refused it (a full disk), logged.
fn event(st: &AppState, job: &str, level: &str, message: &str, data: Option<Value>) -> bool {
    let kind = if data.is_some() { "metrics" } else { "message" };
    let e = json!({
        "id": format!("ftevent-{}", uuid::Uuid::new_v4().simple()),
        "object": "fine_tuning.job.event",
        "created_at": now(),
        "level": level,
        "message": message,
        "type": kind,
        "data": data.unwrap_or(json!({})),
    });
    match st.store.add_event(job, &e) {
        Ok(()) => true,
        Err(err) => {
            tracing::error!(job, error = %err, "cannot record a job event");
            false
        }
    }
}

/// Copies the engine's progress on `adapter` into job `id` until the job ends.
async fn watch(st: Arc<AppState>, id: String, adapter: String) {
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
                    "Step {}/{}: training loss={:.4}",
                    r.step, r.total_steps, r.loss
                ),
                Some(
                    json!({"step": r.step, "total_steps": r.total_steps, "train_loss": r.loss,
                    "train_mean_token_accuracy": r.accuracy, "learning_rate": r.lr,
                    "grad_norm": r.grad_norm}),
                ),
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
                &format!("Step {}: validation loss={:.4}", e.step, e.loss),
                Some(
                    json!({"step": e.step, "total_steps": snap.total_steps, "valid_loss": e.loss,
                    "valid_mean_token_accuracy": e.accuracy}),
                ),
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
        // Validation losses arrive after their checkpoint: fill them in.
        for c in ckpts.iter_mut() {
            let step = c["step_number"].as_u64().unwrap_or(0) as usize;
            if let Some(e) = snap.evals.iter().find(|e| e.step == step) {
                c["metrics"]["valid_loss"] = json!(e.loss);
                c["metrics"]["valid_mean_token_accuracy"] = json!(e.accuracy);
            }
        }
        for (step, name, _) in snap.checkpoints.iter().filter(|c| c.0 > last) {
            let report = snap.reports.iter().find(|r| r.step == *step);
            let eval = snap.evals.iter().find(|e| e.step == *step);
            ckpts.push(json!({
                "id": format!("ftckpt-{}-{step}", &id[6..]),
                "object": "fine_tuning.job.checkpoint",
                "created_at": now(),
                "fine_tuned_model_checkpoint": name,
                "fine_tuning_job_id": id,
                "metrics": {"step": step, "train_loss": report.map(|r| r.loss),
                    "train_mean_token_accuracy": report.map(|r| r.accuracy),
                    "valid_loss": eval.map(|e| e.loss),
                    "valid_mean_token_accuracy": eval.map(|e| e.accuracy)},
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

#[derive(Deserialize)]
pub struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

fn page(items: Vec<Value>, p: &Page) -> Json<Value> {
    let start = match &p.after {
        Some(a) => items
            .iter()
            .position(|j| j["id"] == json!(a))
            .map_or(items.len(), |i| i + 1),
        None => 0,
    };
    let limit = p.limit.unwrap_or(20).clamp(1, 100);
    let data: Vec<Value> = items.iter().skip(start).take(limit).cloned().collect();
    let has_more = start + data.len() < items.len();
    Json(json!({"object": "list", "data": data, "has_more": has_more}))
}

pub async fn list(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Query(p): Query<Page>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    // OpenAI's `metadata[key]=value` filters: jobs whose metadata has every pair.
    let wanted: Vec<(&str, &str)> = q
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((key, v.as_str()))
        })
        .collect();
    let jobs = st
        .store
        .jobs()?
        .into_iter()
        .filter(|j| t.sees(Some(job_owner(j))))
        .filter(|j| {
            wanted
                .iter()
                .all(|(k, v)| j["metadata"][*k].as_str() == Some(*v))
        })
        .collect();
    Ok(page(jobs, &p))
}

/// Job `id` if the tenant may see it (another tenant's job is a 404, like a missing one).
fn visible_job(st: &AppState, t: &Tenant, id: &str) -> Result<Value, ApiError> {
    st.store
        .job(id)?
        .filter(|j| t.sees(Some(job_owner(j))))
        .ok_or_else(|| missing(id))
}

pub async fn get_one(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(visible_job(&st, &t, &id)?))
}

pub async fn events(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    visible_job(&st, &t, &id)?;
    Ok(page(st.store.events(&id)?, &p))
}

pub async fn checkpoints(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let job = visible_job(&st, &t, &id)?;
    // Newest first, as OpenAI lists them.
    let mut items: Vec<Value> = job["tandem_checkpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    items.reverse();
    Ok(page(items, &p))
}

async fn control(
    st: Arc<AppState>,
    t: Tenant,
    id: String,
    pause: Option<bool>,
) -> Result<Json<Value>, ApiError> {
    let mut job = visible_job(&st, &t, &id)?;
    let adapter = job["tandem_adapter"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    st.engine
        .control_job(adapter, pause)
        .await
        .map_err(|e| ApiError::invalid(format!("Cannot change job {id}: {e}"), None))?;
    let (status, msg) = match pause {
        None => ("cancelled", "The job was cancelled"),
        Some(true) => ("paused", "The job was paused"),
        Some(false) => ("running", "The job was resumed"),
    };
    job["status"] = json!(status);
    if pause.is_none() {
        job["finished_at"] = json!(now());
    }
    st.store.put_job(&job)?;
    event(&st, &id, "info", msg, None);
    Ok(Json(job))
}

pub async fn cancel(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    control(st, t, id, None).await
}

pub async fn pause(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    control(st, t, id, Some(true)).await
}

pub async fn resume(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    control(st, t, id, Some(false)).await
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
    for job in jobs {
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
                    let file = job["training_file"].as_str().unwrap_or_default();
                    let data =
                        file_examples(&st, &owner, file, "training_file")?.ok_or_else(|| {
                            ApiError::invalid("the training file is gone", Some("training_file"))
                        })?;
                    let validation = match job["validation_file"].as_str() {
                        Some(v) => file_examples(&st, &owner, v, "validation_file")?.unwrap_or_else(|| {
                            tracing::warn!(job = %id, file = v, "the validation file is gone; the job resumes without evaluation");
                            Vec::new()
                        }),
                        None => Vec::new(),
                    };
                    let cfg: TrainConfig = serde_json::from_value(job["tandem_config"].clone())
                        .map_err(|e| ApiError::invalid(format!("stored config: {e}"), None))?;
                    let every = job["tandem_checkpoint_every"].as_u64().unwrap_or(1) as usize;
                    let start = st
                        .engine
                        .start_job(JobSpec {
                            name: adapter.clone(),
                            data,
                            validation,
                            cfg,
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
