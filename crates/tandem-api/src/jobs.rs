//! `/v1/fine_tuning/jobs`: OpenAI's fine-tuning jobs, trained by the engine between (and
//! inside) inference iterations. A job's adapter is served under its `fine_tuned_model` name.
//! Job objects and events live in the store; a watcher task per job copies the engine's
//! progress (steps, losses, final state) into them.

use crate::error::ApiError;
use crate::job_life::event;
use crate::job_request::{
    check_grader_models, file_data, max_seq_len, reinforcement_hyperparameters, CreateJob, Lora,
    MethodChoice,
};
use crate::job_watch::watch;
use crate::store::now;
use crate::tenants::{job_owner, Tenant};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use tandem_model::finetune::{Method, TrainConfig, TrainData};
use tandem_scheduler::JobSpec;

/// Job `id`'s checkpoints: in the adapter store (`--adapter-store`), else the data dir, else a
/// temporary folder.
pub(crate) fn checkpoint_dir(st: &AppState, id: &str) -> PathBuf {
    match st.adapter_dir.as_ref().or(st.data_dir.as_ref()) {
        Some(d) => d.join("checkpoints").join(id),
        None => std::env::temp_dir().join("tandem-checkpoints").join(id),
    }
}

/// Where job `id`'s finished adapter is kept (none without a data dir or adapter store).
pub(crate) fn fine_tuned_dir(st: &AppState, id: &str) -> Option<PathBuf> {
    let root = st.adapter_dir.as_ref().or(st.data_dir.as_ref())?;
    Some(root.join("fine_tuned").join(id))
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
    let mut req: CreateJob = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("Invalid request: {e}"), None))?;
    // The base model, or a served adapter to continue from (a finished job's `ft:` model, a
    // checkpoint, an adapter loaded at start): OpenAI fine-tunes fine-tuned models too.
    let init = if req.model == st.model_name {
        None
    } else {
        crate::shared_adapters::ensure_served(&st, &req.model).await?;
        let stats = st.engine.stats().await.map_err(ApiError::internal)?;
        let visible = stats.adapters.iter().any(|a| a == &req.model)
            && t.sees(st.tenants.owner(&req.model).as_deref());
        if !visible {
            return Err(ApiError::invalid(
                format!(
                    "Model {} is not available for fine-tuning here: name the base model ({}) or a fine-tuned model this server serves",
                    req.model, st.model_name
                ),
                Some("model"),
            ));
        }
        Some(req.model.clone())
    };
    let MethodChoice {
        method,
        hyper,
        grader,
    } = req.method()?;
    if let Some((g, _)) = &grader {
        check_grader_models(&st, &t, g).await?;
    }
    let g = grader.as_ref().map(|(g, _)| g);
    let data = file_data(&st, &t, &req.training_file, "training_file", &method, g)
        .await?
        .ok_or_else(|| {
            ApiError::invalid(
                format!("Invalid training_file: {}: no such file", req.training_file),
                Some("training_file"),
            )
        })?;
    let validation = match &req.validation_file {
        Some(v) => file_data(&st, &t, v, "validation_file", &method, g)
            .await?
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("Invalid validation_file: {v}: no such file"),
                    Some("validation_file"),
                )
            })?,
        None => TrainData::Supervised(Vec::new()),
    };
    // "auto" (or left out) resolved from the data's size, as OpenAI does; the job object
    // records the resolved values.
    let hp = hyper.resolve_for(data.len(), &method);
    let (n_epochs, batch_size) = (hp.n_epochs, hp.batch_size);
    let lora = req.lora.take().unwrap_or(Lora {
        r: None,
        alpha: None,
        target_modules: None,
    });
    if init.is_some() && (lora.r.is_some() || lora.alpha.is_some() || lora.target_modules.is_some())
    {
        return Err(ApiError::invalid(
            "lora: a job that continues a fine-tuned model keeps its rank, alpha and targets",
            Some("lora"),
        ));
    }
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
        max_seq_len: max_seq_len(&st),
        seed: req.seed.unwrap_or(42),
        method,
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
    let mut hp = json!({"n_epochs": n_epochs, "batch_size": batch_size,
        "learning_rate_multiplier": hp.learning_rate_multiplier});
    if let Method::Dpo { beta } = method {
        hp["beta"] = json!(beta);
    }
    if let Method::Reinforcement(r) = method {
        reinforcement_hyperparameters(&r, data.len().div_ceil(batch_size), &mut hp);
    }
    let kind = method.name();
    let mut method_json = json!({"type": kind, kind: {"hyperparameters": hp}});
    if let Some((_, g)) = &grader {
        method_json[kind]["grader"] = g.clone();
    }
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
        "method": method_json,
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
        "tandem_init": init,
        "tandem_checkpoint_every": data.len().div_ceil(batch_size),
    });
    if st.store.is_shared() {
        // Replicas share the store: the job waits in it for one with room to claim it.
        job["status"] = json!("queued");
        st.store.put_job(&job).await?;
        st.tenants.set_owner(&adapter, &t.name);
        event(&st, &id, "info", "Created fine-tuning job", None).await;
        tracing::info!(job = %id, adapter = %adapter, method = kind, "fine-tuning job queued");
        crate::cluster::wake(&st);
        return Ok(Json(job));
    }
    // A checkpoint at the end of every epoch, written and served while the job runs.
    let ckpt_dir = checkpoint_dir(&st, &id);
    std::fs::create_dir_all(&ckpt_dir).map_err(ApiError::internal)?;
    let every = data.len().div_ceil(batch_size);
    let started = st
        .engine
        .start_job(JobSpec {
            name: adapter.clone(),
            data,
            validation,
            cfg,
            init,
            checkpoints: Some((ckpt_dir, every)),
            resume_from: Vec::new(),
        })
        .await
        .map_err(|e| ApiError::invalid(format!("Cannot start the job: {e}"), None))?;
    if let Some(c) = started.config {
        // Continuing a fine-tuned model: its LoRA shape.
        job["lora"] = json!({"r": c.r, "alpha": c.alpha, "target_modules": c.targets});
        job["tandem_config"] = json!(c);
    }
    // Not recorded (a full disk): not acknowledged, so it must not train either.
    if let Err(e) = st.store.put_job(&job).await {
        let _ = st.engine.control_job(adapter.clone(), None).await;
        let _ = st.engine.unload_adapter(adapter.clone()).await;
        return Err(e.into());
    }
    st.tenants.set_owner(&adapter, &t.name);
    event(&st, &id, "info", "Created fine-tuning job", None).await;
    event(&st, &id, "info", "Fine-tuning job started", None).await;
    tracing::info!(job = %id, adapter = %adapter, method = kind, "fine-tuning job started");
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
        .jobs()
        .await?
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
async fn visible_job(st: &AppState, t: &Tenant, id: &str) -> Result<Value, ApiError> {
    st.store
        .job(id)
        .await?
        .filter(|j| t.sees(Some(job_owner(j))))
        .ok_or_else(|| missing(id))
}

pub async fn get_one(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(visible_job(&st, &t, &id).await?))
}

pub async fn events(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    visible_job(&st, &t, &id).await?;
    Ok(page(st.store.events(&id).await?, &p))
}

pub async fn checkpoints(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let job = visible_job(&st, &t, &id).await?;
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
    let mut job = visible_job(&st, &t, &id).await?;
    let adapter = job["tandem_adapter"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if st.store.is_shared() {
        return crate::cluster::control(&st, job, pause).await.map(Json);
    }
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
    st.store.put_job(&job).await?;
    event(&st, &id, "info", msg, None).await;
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
