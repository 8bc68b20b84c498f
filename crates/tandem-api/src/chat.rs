//! `POST /v1/chat/completions`: messages (tool calls and results included) through the chat
//! template, the request's output constraint or forced tool calls compiled, handed to
//! `respond::run`.

use crate::error::ApiError;
use crate::openai::{self, content_text, ChatMessageIn, ChatRequest};
use crate::respond::{run, Generation, Kind};
use crate::routes::body;
use crate::tenants::Tenant;
use crate::tools::{message_calls, Tools};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde_json::Value;
use std::sync::Arc;
use tandem_model::ChatMessage;

/// The token ids of chat `messages` rendered with the model's chat template, offering `tools`.
pub(crate) fn chat_tokens(
    st: &AppState,
    messages: &[ChatMessageIn],
    tools: &[Value],
    generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
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
        let mut msg = ChatMessage::new(role, content_text(&m.content)?);
        msg.tool_calls = message_calls(m, i)?;
        msg.tool_call_id = m.tool_call_id.clone();
        msgs.push(msg);
    }
    let text = st
        .tokenizer
        .apply_chat_template_with_tools(&msgs, tools, generation_prompt)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    st.tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))
}

pub(crate) async fn chat(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = openai::parse(&body(b)?)?;
    let tools = Tools::from_request(&req)?;
    let constraint = crate::structured::requested(&req.sampling)?;
    let grammar = match (tools.forced_grammar(), constraint) {
        (Some(_), Some((_, param))) => {
            return Err(ApiError::invalid(
                format!("{param} cannot be combined with tool_choice required or a named function: the tool calls' arguments are what is constrained"),
                Some(param),
            ))
        }
        (Some(lark), None) => Some(
            crate::structured::compile_lark(&st, lark, "tool_call", "tools").await?,
        ),
        (None, Some((c, param))) => Some(crate::structured::compile(&st, c, param).await?),
        (None, None) => None,
    };
    let ids = chat_tokens(&st, &req.messages, tools.rendered(), true)?;
    let g = Generation {
        kind: Kind::Chat,
        default_max: None,
        echo: None,
        grammar,
        tool_calls: tools.output(),
    };
    run(st, t, req.sampling, vec![ids], g).await
}
