//! `/v1/fine_tuning/jobs`: OpenAI's fine-tuning jobs, trained by the engine between (and
//! inside) inference iterations. A job's adapter is served under its `fine_tuned_model` name.
//! Job objects and events live in the store; a watcher task per job copies the engine's
//! progress (steps, losses, final state) into them.

use crate::error::ApiError;
use crate::job_life::{event, watch};
use crate::store::now;
use crate::tenants::{job_owner, Tenant};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tandem_model::finetune::{parse_record, tokenize, Example, Hyperparameters, TrainConfig};
use tandem_scheduler::JobSpec;

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
pub(crate) fn file_examples(
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

pub(crate) fn checkpoint_dir(st: &AppState, id: &str) -> std::path::PathBuf {
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
