//! Route handlers: thin — validate, hand the request to the engine thread, shape the answer.

use crate::error::ApiError;
use crate::openai::{
    self, content_text, ChatMessageIn, ChatRequest, CompletionRequest, DetokenizeRequest,
    LoadAdapterRequest, Prompt, TokenizeRequest, UnloadAdapterRequest,
};
use crate::respond::{run, Kind};
use crate::tenants::Tenant;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use tandem_model::ChatMessage;

/// Request bodies above this get 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        // Adapter names may hold slashes (a path-like name given to load_lora_adapter).
        .route("/v1/models/{*id}", get(model_one))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route(
            "/v1/files",
            post(crate::files::upload)
                .layer(DefaultBodyLimit::max(crate::files::MAX_FILE_BYTES))
                .get(crate::files::list),
        )
        .route(
            "/v1/files/{id}",
            get(crate::files::get_one).delete(crate::files::delete),
        )
        .route("/v1/files/{id}/content", get(crate::files::content))
        .route(
            "/v1/fine_tuning/jobs",
            post(crate::jobs::create).get(crate::jobs::list),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(crate::jobs::get_one))
        .route("/v1/fine_tuning/jobs/{id}/events", get(crate::jobs::events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(crate::jobs::checkpoints),
        )
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(crate::jobs::cancel),
        )
        .route("/v1/fine_tuning/jobs/{id}/pause", post(crate::jobs::pause))
        .route(
            "/v1/fine_tuning/jobs/{id}/resume",
            post(crate::jobs::resume),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Every request gets an id (the client's `x-request-id` if it sent a usable one), returned in
/// the `x-request-id` response header; everything logged about the request, here and in the
/// engine thread, is logged in a span that carries it.
async fn request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{}", uuid::Uuid::new_v4().simple()));
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let span = tracing::info_span!("request", request_id = %id);
    let start = std::time::Instant::now();
    let mut resp = {
        use tracing::Instrument;
        next.run(req).instrument(span.clone()).await
    };
    span.in_scope(|| {
        // Health checks and scrapes are frequent: log them only at debug.
        let status = resp.status().as_u16();
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if path == "/health" || path == "/metrics" {
            tracing::debug!(%method, %path, status, ms, "http");
        } else {
            tracing::info!(%method, %path, status, ms, "http");
        }
    });
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Finds the request's tenant from its bearer key (401 if it has none that is known) and hands
/// it to the handler as an extension.
async fn auth(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match st.tenants.authenticate(given) {
        Some(t) => {
            req.extensions_mut().insert(t);
            next.run(req).await
        }
        None => ApiError::unauthorized().into_response(),
    }
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            let mut err = ApiError::invalid(
                format!("Request body is larger than {MAX_BODY_BYTES} bytes"),
                None,
            );
            err.status = StatusCode::PAYLOAD_TOO_LARGE;
            err
        } else {
            ApiError::invalid(format!("Cannot read the request body: {e}"), None)
        }
    })
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.engine.stats().await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let stats = st.engine.stats().await.map_err(ApiError::internal)?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(&stats),
    )
        .into_response())
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The model objects a tenant sees: the base model, then every adapter that is shared or its own
/// (`owned_by`: the owning tenant, or `tandem` for shared ones).
async fn model_list(st: &AppState, t: &Tenant) -> Result<Vec<Value>, ApiError> {
    let stats = st.engine.stats().await.map_err(ApiError::internal)?;
    let created = now();
    let mut data = vec![
        json!({"id": st.model_name, "object": "model", "created": created, "owned_by": "tandem",
        "root": st.model_name, "parent": null, "max_model_len": st.max_model_len}),
    ];
    for a in stats.adapters {
        let owner = st.tenants.owner(&a);
        if t.sees(owner.as_deref()) {
            let by = owner.unwrap_or_else(|| "tandem".into());
            data.push(json!({"id": a, "object": "model", "created": created, "owned_by": by, "root": a, "parent": st.model_name}));
        }
    }
    Ok(data)
}

async fn models(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"object": "list", "data": model_list(&st, &t).await?}),
    ))
}

async fn model_one(
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

async fn load_adapter(
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

async fn unload_adapter(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: UnloadAdapterRequest = openai::parse(&body(b)?)?;
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

async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = openai::parse(&body(b)?)?;
    req.check_supported()?;
    let empty = || {
        ApiError::invalid(
            "prompt must be a non-empty string, list of strings, list of token ids or list of such lists",
            Some("prompt"),
        )
    };
    let encoded = match &req.prompt {
        Prompt::Text(t) => vec![encode(&st, t)?],
        Prompt::Texts(ts) => ts
            .iter()
            .map(|t| encode(&st, t))
            .collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(l) => l.clone(),
    };
    if encoded.is_empty() || encoded.iter().any(Vec::is_empty) {
        return Err(empty());
    }
    check_token_ids(&st, encoded.iter().flatten(), "prompt")?;
    // echo: each choice's text starts with its prompt's text.
    let echo = if req.echo {
        let text = |ids: &Vec<u32>| {
            st.tokenizer
                .decode(ids, false)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
        };
        match &req.prompt {
            Prompt::Text(t) => Some(vec![t.clone()]),
            Prompt::Texts(ts) => Some(ts.clone()),
            _ => Some(encoded.iter().map(text).collect::<Result<_, _>>()?),
        }
    } else {
        None
    };
    run(
        st,
        t,
        Kind::Completion,
        req.sampling,
        encoded,
        Some(16),
        echo,
    )
    .await
}

/// A 400 naming `param` if a token id lies outside the model's vocabulary.
fn check_token_ids<'a>(
    st: &AppState,
    mut ids: impl Iterator<Item = &'a u32>,
    param: &str,
) -> Result<(), ApiError> {
    match ids.find(|&&t| t as usize >= st.vocab_size) {
        Some(t) => Err(ApiError::invalid(
            format!(
                "token id {t} is outside the vocabulary (0..{})",
                st.vocab_size
            ),
            Some(param),
        )),
        None => Ok(()),
    }
}

fn encode(st: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::invalid(
            "prompt must not be an empty string",
            Some("prompt"),
        ));
    }
    st.tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
}

/// vLLM's `POST /tokenize`: `{"count", "max_model_len", "tokens"}` for a prompt (special
/// tokens added unless `add_special_tokens: false`) or for messages through the chat template
/// (with the generation prompt unless `add_generation_prompt: false`), as the engine sees them.
async fn tokenize(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = openai::parse(&body(b)?)?;
    if let Some(m) = &req.model {
        resolve_model(&st, &t, m).await?;
    }
    let tokens = match (&req.prompt, &req.messages) {
        (Some(p), None) => st
            .tokenizer
            .encode(p, req.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?,
        (None, Some(m)) => chat_tokens(&st, m, req.add_generation_prompt)?,
        _ => {
            return Err(ApiError::invalid(
                "give either prompt or messages",
                Some("prompt"),
            ))
        }
    };
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": st.max_model_len,
        "tokens": tokens,
    })))
}

/// vLLM's `POST /detokenize`: `{"prompt"}`, the text of `tokens`.
async fn detokenize(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = openai::parse(&body(b)?)?;
    if let Some(m) = &req.model {
        resolve_model(&st, &t, m).await?;
    }
    check_token_ids(&st, req.tokens.iter(), "tokens")?;
    let prompt = st
        .tokenizer
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("tokens")))?;
    Ok(Json(json!({ "prompt": prompt })))
}

/// The token ids of chat `messages` rendered with the model's chat template.
fn chat_tokens(
    st: &AppState,
    messages: &[ChatMessageIn],
    generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for m in messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::invalid(
                format!("unknown role `{}`", m.role),
                Some("messages"),
            ));
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        msgs.push(ChatMessage::new(role, content_text(&m.content)?));
    }
    let text = st
        .tokenizer
        .apply_chat_template(&msgs, generation_prompt)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    st.tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
}

async fn chat(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = openai::parse(&body(b)?)?;
    req.check_supported()?;
    let ids = chat_tokens(&st, &req.messages, true)?;
    run(st, t, Kind::Chat, req.sampling, vec![ids], None, None).await
}
