//! Model routes: the model list a tenant sees, and LoRA adapters loaded and unloaded at run
//! time (vLLM's `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), confined to `--lora-root`.

use crate::error::ApiError;
use crate::openai::{self, LoadAdapterRequest, UnloadAdapterRequest};
use crate::routes::{body, now};
use crate::tenants::Tenant;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use std::sync::Arc;

/// The model objects a tenant sees: the base model, then every adapter that is shared or its own
/// (`owned_by`: the owning tenant, or `tandem` for shared ones).
async fn model_list(st: &AppState, t: &Tenant) -> Result<Vec<Value>, ApiError> {
    let stats = st.engine.stats().await.map_err(ApiError::internal)?;
    let created = now();
    let (unloaded, gone) = crate::shared_adapters::unloaded_adapters(st, &stats.adapters).await?;
    let mut data = vec![
        json!({"id": st.model_name, "object": "model", "created": created, "owned_by": "tandem",
        "root": st.model_name, "parent": null, "max_model_len": st.max_model_len}),
    ];
    for a in stats.adapters.into_iter().filter(|a| !gone.contains(a)) {
        let owner = st.tenants.owner(&a);
        if t.sees(owner.as_deref()) {
            let by = owner.unwrap_or_else(|| "tandem".into());
            data.push(json!({"id": a, "object": "model", "created": created, "owned_by": by, "root": a, "parent": st.model_name}));
        }
    }
    // Another replica's fine-tuned models: served here at the first request.
    for (a, owner) in unloaded {
        if t.sees(owner.as_deref()) {
            let by = owner.unwrap_or_else(|| "tandem".into());
            data.push(json!({"id": a, "object": "model", "created": created, "owned_by": by, "root": a, "parent": st.model_name}));
        }
    }
    Ok(data)
}

pub(crate) async fn models(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"object": "list", "data": model_list(&st, &t).await?}),
    ))
}

pub(crate) async fn model_one(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    model_list(&st, &t)
        .await?
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .map(Json)
        .ok_or_else(|| ApiError::model_not_found(&id))
}

/// `lora_path` if it lies under the runtime-LoRA root once symlinks are resolved; the error says
/// only that the path is not allowed (never whether something exists there).
fn allowed_path(st: &AppState, lora_path: &str) -> Result<std::path::PathBuf, ApiError> {
    let Some(root) = &st.lora_root else {
        let mut e = ApiError::invalid(
            "Loading LoRA adapters at run time is off: start the server with --allow-runtime-lora --lora-root DIR",
            Some("lora_path"),
        );
        e.status = StatusCode::FORBIDDEN;
        return Err(e);
    };
    let not_allowed = || {
        let mut e = ApiError::invalid(
            format!(
                "lora_path is not allowed: adapters load from under the server's --lora-root ({})",
                root.display()
            ),
            Some("lora_path"),
        );
        e.status = StatusCode::FORBIDDEN;
        e
    };
    let requested = std::path::Path::new(lora_path);
    let joined = if requested.is_absolute() {
        requested.to_path_buf()
    } else {
        root.join(requested)
    };
    // Canonical (symlinks resolved): a link out of the root is refused like any outside path. A
    // path that does not exist is judged by its deepest existing ancestor (no `..` below it), so
    // that inside the root the loader can say what is missing, and outside nothing is told.
    let mut existing = joined.as_path();
    let mut rest = Vec::new();
    let base = loop {
        match std::fs::canonicalize(existing) {
            Ok(p) => break p,
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = parent;
                }
                _ => return Err(not_allowed()),
            },
        }
    };
    if !base.starts_with(root) {
        return Err(not_allowed());
    }
    Ok(rest.iter().rev().fold(base, |p, n| p.join(n)))
}

pub(crate) async fn load_adapter(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: LoadAdapterRequest = openai::parse(&body(b)?)?;
    if req.lora_name.is_empty() || req.lora_name == st.model_name {
        return Err(ApiError::invalid(
            format!("`{}` cannot name an adapter", req.lora_name),
            Some("lora_name"),
        ));
    }
    let path = allowed_path(&st, &req.lora_path)?;
    st.engine
        .load_adapter(req.lora_name.clone(), path.clone())
        .await
        .map_err(|e| ApiError::invalid(e.to_string(), Some("lora_path")))?;
    // An adapter a tenant loads is that tenant's; an admin's is shared.
    let owner = (!t.admin).then(|| t.name.clone());
    if let Some(o) = &owner {
        st.tenants.set_owner(&req.lora_name, o);
    }
    // Replicas sharing a store: recorded for all of them.
    if let Err(e) =
        crate::shared_adapters::record_loaded(&st, &req.lora_name, &path, owner.as_deref()).await
    {
        st.tenants.forget(&req.lora_name);
        let _ = st.engine.unload_adapter(req.lora_name.clone()).await;
        return Err(e);
    }
    if let Some(store) = &st.adapter_store {
        // Acknowledged means recorded: if the record cannot be written, the load is undone.
        if let Err(e) = store.put(&req.lora_name, &path, owner.as_deref()) {
            st.tenants.forget(&req.lora_name);
            let _ = st.engine.unload_adapter(req.lora_name.clone()).await;
            return Err(ApiError::internal(format!(
                "cannot record adapter {}: {e}",
                req.lora_name
            )));
        }
    }
    Ok(format!(
        "Success: LoRA adapter '{}' added successfully.",
        req.lora_name
    )
    .into_response())
}

pub(crate) async fn unload_adapter(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: UnloadAdapterRequest = openai::parse(&body(b)?)?;
    // Loaded on another replica sharing the store: served here first, then unloaded for all.
    crate::shared_adapters::ensure_served(&st, &req.lora_name).await?;
    let known = st
        .engine
        .stats()
        .await
        .map_err(ApiError::internal)?
        .adapters
        .contains(&req.lora_name);
    let owner = st.tenants.owner(&req.lora_name);
    if !known || !t.sees(owner.as_deref()) {
        return Err(ApiError::model_not_found(&req.lora_name));
    }
    // Shared adapters (the operator's) are the admin's to unload.
    if owner.is_none() && !t.admin {
        let mut e = ApiError::invalid(
            format!(
                "{} is shared: only an admin key may unload it",
                req.lora_name
            ),
            Some("lora_name"),
        );
        e.status = StatusCode::FORBIDDEN;
        return Err(e);
    }
    st.engine
        .unload_adapter(req.lora_name.clone())
        .await
        .map_err(|e| ApiError::invalid(e.to_string(), Some("lora_name")))?;
    st.tenants.forget(&req.lora_name);
    crate::shared_adapters::record_unloaded(&st, &req.lora_name).await?;
    if let Some(store) = &st.adapter_store {
        if let Err(e) = store.remove(&req.lora_name) {
            tracing::error!(error = %e, adapter = %req.lora_name, "cannot update the adapter record");
        }
    }
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        req.lora_name
    )
    .into_response())
}

/// None for the base model, the adapter's name otherwise; 404 for anything else, and for
/// another tenant's adapter.
pub(crate) async fn resolve_model(
    st: &AppState,
    t: &Tenant,
    model: &str,
) -> Result<Option<String>, ApiError> {
    if model == st.model_name {
        return Ok(None);
    }
    crate::shared_adapters::ensure_served(st, model).await?;
    if !t.sees(st.tenants.owner(model).as_deref()) {
        return Err(ApiError::model_not_found(model));
    }
    let adapters = st
        .engine
        .stats()
        .await
        .map_err(ApiError::internal)?
        .adapters;
    if adapters.iter().any(|a| a == model) {
        Ok(Some(model.to_string()))
    } else {
        Err(ApiError::model_not_found(model))
    }
}
