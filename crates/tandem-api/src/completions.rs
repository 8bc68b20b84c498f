//! `POST /v1/completions`: prompts as text, texts or token ids, echo, an output constraint,
//! handed to `respond::run`.

use crate::error::ApiError;
use crate::openai::{self, CompletionRequest, Prompt};
use crate::respond::{run, Generation, Kind};
use crate::routes::body;
use crate::tenants::Tenant;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use std::sync::Arc;

pub(crate) async fn completions(
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
    let grammar = match crate::structured::requested(&req.sampling)? {
        Some((c, param)) => Some(crate::structured::compile(&st, c, param).await?),
        None => None,
    };
    let g = Generation {
        kind: Kind::Completion,
        default_max: Some(16),
        echo,
        grammar,
        tool_calls: crate::respond::ToolOutput::Off,
    };
    run(st, t, req.sampling, encoded, g).await
}

/// A 400 naming `param` if a token id lies outside the model's vocabulary.
pub(crate) fn check_token_ids<'a>(
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
