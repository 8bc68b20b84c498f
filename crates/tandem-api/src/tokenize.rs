//! vLLM's `POST /tokenize` and `POST /detokenize`.

use crate::chat::chat_tokens;
use crate::completions::check_token_ids;
use crate::error::ApiError;
use crate::models::resolve_model;
use crate::openai::{self, DetokenizeRequest, TokenizeRequest};
use crate::routes::body;
use crate::tenants::Tenant;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::{Extension, Json};
use serde_json::{json, Value};
use std::sync::Arc;

/// vLLM's `POST /tokenize`: `{"count", "max_model_len", "tokens"}` for a prompt (special
/// tokens added unless `add_special_tokens: false`) or for messages through the chat template
/// (with the generation prompt unless `add_generation_prompt: false`), as the engine sees them.
pub(crate) async fn tokenize(
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
        (None, Some(m)) => chat_tokens(
            &st,
            m,
            req.tools.as_deref().unwrap_or_default(),
            req.add_generation_prompt,
        )?,
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
pub(crate) async fn detokenize(
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
