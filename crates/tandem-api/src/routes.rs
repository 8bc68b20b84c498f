//! The router and what every route shares: request ids, authentication, body limits; health and
//! metrics. The route groups live in their own files (chat, completions, tokenize, models,
//! files, jobs); handlers are thin — validate, hand the request to the engine, shape the answer.

use crate::error::ApiError;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

/// Request bodies above this get 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(crate::completions::completions))
        .route("/v1/chat/completions", post(crate::chat::chat))
        .route("/v1/models", get(crate::models::models))
        // Adapter names may hold slashes (a path-like name given to load_lora_adapter).
        .route("/v1/models/{*id}", get(crate::models::model_one))
        .route("/tokenize", post(crate::tokenize::tokenize))
        .route("/detokenize", post(crate::tokenize::detokenize))
        .route("/v1/load_lora_adapter", post(crate::models::load_adapter))
        .route(
            "/v1/unload_lora_adapter",
            post(crate::models::unload_adapter),
        )
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
        .route(
            "/v1/fine_tuning/alpha/graders/validate",
            post(crate::graders::validate),
        )
        .route(
            "/v1/fine_tuning/alpha/graders/run",
            post(crate::graders::run),
        )
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

pub(crate) fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
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
