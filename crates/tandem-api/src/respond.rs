//! Generation requests from submission to answer: the admission permit, every (prompt, choice)
//! handed to the engine, and the engine's event streams folded into one JSON response or
//! forwarded as SSE chunks (`sse.rs`), with usage (cached prompt tokens included); tool calls
//! read out of chat output.

use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::models::resolve_model;
use crate::openai::Sampling;
use crate::routes::now;
use crate::tenants::Tenant;
use crate::AppState;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;
use tandem_model::grammar::Grammar;
use tandem_model::tool_calls::{new_call_id, Piece, ToolCallParser};
use tandem_model::{SamplingParams, TextTokenizer, TokenLogprobs};
use tandem_scheduler::{EngineError, Event, FinishReason, GenerateRequest};
use tokio::sync::mpsc;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

/// A slot among `max_pending` requests in flight, held until the response (or stream) ends.
pub(crate) struct Permit(pub(crate) Arc<AppState>);

impl Permit {
    fn acquire(st: &Arc<AppState>) -> Result<Self, ApiError> {
        use std::sync::atomic::Ordering;
        let before = st.pending.fetch_add(1, Ordering::SeqCst);
        if before >= st.max_pending {
            st.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::overloaded(before));
        }
        Ok(Self(st.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How a route wants its prompts generated and answered.
pub(crate) struct Generation {
    pub kind: Kind,
    /// max_tokens when the request sets none (None: the room left in the context).
    pub default_max: Option<usize>,
    /// Per prompt, text that starts each of its choices (completions' `echo`).
    pub echo: Option<Vec<String>>,
    /// The output constraint every choice keeps to.
    pub grammar: Option<Grammar>,
    /// Whether the output is read for tool calls (chat with tools).
    pub tool_calls: ToolOutput,
}

/// How a chat answer's text is read for tool calls.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum ToolOutput {
    /// Not at all: the text is the content.
    Off,
    /// `tool_choice: "auto"`: calls are read out, the rest is content.
    Parse,
    /// `required` or a named function: the grammar allows only calls, so content is null (a
    /// call cut by max_tokens keeps the arguments written so far, as streamed, with
    /// `finish_reason: "length"`).
    Forced,
}

/// Submits every (prompt, choice) to the engine and answers in one JSON or as an SSE stream.
pub(crate) async fn run(
    st: Arc<AppState>,
    tenant: Tenant,
    s: Sampling,
    prompts: Vec<Vec<u32>>,
    g: Generation,
) -> Result<Response, ApiError> {
    let Generation {
        kind,
        default_max,
        echo,
        grammar,
        tool_calls,
    } = g;
    let adapter = resolve_model(&st, &tenant, &s.model).await?;
    // Tenants never share prefix-cache blocks.
    let cache_salt = tenant.cache_salt(s.cache_salt.as_deref());
    let permit = Permit::acquire(&st)?;
    let n = s.n()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = st.max_model_len.saturating_sub(longest);
    let mut params = s.to_params(
        default_max.unwrap_or(room).max(1),
        kind == Kind::Chat,
        st.vocab_size,
    )?;
    if let Some(g) = &grammar {
        st.metrics.structured_request(g.kind());
    }
    params.grammar = grammar;
    // Saturating: max_tokens may be any u64 (found by fuzzing: `longest + max_tokens` overflowed).
    if longest.saturating_add(params.max_tokens) > st.max_model_len {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} in the completion). Please reduce the length of the prompt or completion.",
            st.max_model_len,
            longest.saturating_add(params.max_tokens),
            longest,
            params.max_tokens
        )));
    }
    // The text each choice starts with (echo), in the order of `streams`.
    let starts: Vec<String> = match echo {
        Some(e) => e
            .into_iter()
            .flat_map(|t| std::iter::repeat_n(t, n))
            .collect(),
        None => vec![String::new(); prompts.len() * n],
    };
    let mut streams = Vec::with_capacity(prompts.len() * n);
    let mut prompt_tokens = 0;
    for p in prompts {
        prompt_tokens += p.len();
        st.metrics.prompt(&s.model, p.len());
        for i in 0..n {
            // Choices of one request differ: each gets its own seed.
            let params = SamplingParams {
                seed: params.seed.map(|s| s.wrapping_add(i as u64)),
                ..params.clone()
            };
            let req = GenerateRequest {
                prompt: p.clone(),
                params,
                adapter: adapter.clone(),
                cache_salt: cache_salt.clone(),
                span: tracing::Span::current(),
            };
            let (_, rx) = st.engine.generate(req).await.map_err(|e| match e {
                EngineError::Admit(a) => ApiError::context_length(a.to_string()),
                other => ApiError::internal(other),
            })?;
            streams.push(rx);
        }
    }
    let id = match kind {
        Kind::Completion => format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        Kind::Chat => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
    };
    let head = Head {
        id,
        created: now(),
        model: s.model.clone(),
        kind,
        token_ids: s.return_tokens_as_token_ids,
        tool_calls,
    };
    if s.stream {
        let usage = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(crate::sse::stream_response(
            st,
            permit,
            head,
            streams,
            starts,
            (prompt_tokens, n),
            usage,
        ))
    } else {
        let r = collect_response(&st, head, streams, starts, (prompt_tokens, n)).await;
        drop(permit);
        r
    }
}

pub(crate) struct Head {
    id: String,
    created: u64,
    pub model: String,
    pub kind: Kind,
    /// vLLM's `return_tokens_as_token_ids`: logprobs name tokens as `token_id:{id}`.
    token_ids: bool,
    /// Whether the output is read for tool calls.
    pub tool_calls: ToolOutput,
}

/// OpenAI's tool call object (`index` for stream deltas).
pub(crate) fn tool_call_json(index: Option<usize>, id: &str, name: &str, arguments: &str) -> Value {
    let mut v =
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

/// The finish reason a choice reports: `tool_calls` when it stopped after calling tools.
pub(crate) fn finish_str(r: FinishReason, called: bool) -> &'static str {
    match r {
        FinishReason::Length => "length",
        _ if called => "tool_calls",
        _ => "stop",
    }
}

impl Head {
    /// A whole chat message with tool calls read out of `text`: content (null when only tools
    /// were called) and `tool_calls`.
    fn tool_message(&self, text: &str) -> (Value, bool) {
        let mut content = String::new();
        let mut calls = Vec::new();
        for p in ToolCallParser::parse(text) {
            match p {
                Piece::Content(_) if self.tool_calls == ToolOutput::Forced => {}
                Piece::Content(c) => content.push_str(&c),
                Piece::Call { name, arguments } => {
                    calls.push(tool_call_json(None, &new_call_id(), &name, &arguments))
                }
                // `parse` gives whole calls.
                Piece::CallStart { .. } | Piece::Args(_) | Piece::CallEnd => {}
            }
        }
        let called = !calls.is_empty();
        let mut m = json!({"role": "assistant", "content": if content.is_empty() && called { Value::Null } else { json!(content) }});
        if called {
            m["tool_calls"] = json!(calls);
        }
        (m, called)
    }

    pub(crate) fn choice(
        &self,
        index: usize,
        text: &str,
        finish: Option<&str>,
        delta: bool,
        logprobs: Value,
    ) -> Value {
        match (self.kind, delta) {
            (Kind::Completion, _) => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Chat, true) => {
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Chat, false) => {
                json!({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// OpenAI's logprobs object for `entries` (Null when none were asked for). `offset` is the
    /// text offset of the first entry (completions' `text_offset`).
    pub(crate) fn logprobs(
        &self,
        tok: &TextTokenizer,
        entries: &[TokenLogprobs],
        mut offset: usize,
    ) -> Value {
        if entries.is_empty() {
            return Value::Null;
        }
        let text = |id: u32| tok.decode(&[id], false).unwrap_or_default();
        let name = |id: u32| {
            if self.token_ids {
                format!("token_id:{id}")
            } else {
                text(id)
            }
        };
        match self.kind {
            Kind::Completion => {
                let mut offsets = Vec::with_capacity(entries.len());
                for e in entries {
                    offsets.push(offset);
                    offset += text(e.token).len();
                }
                json!({
                    "tokens": entries.iter().map(|e| name(e.token)).collect::<Vec<_>>(),
                    "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                    "top_logprobs": entries.iter().map(|e| e.top.iter().map(|(t, l)| (name(*t), json!(l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
            Kind::Chat => {
                let item = |t: u32, l: f32| {
                    let s = name(t);
                    let bytes = text(t).into_bytes();
                    json!({"token": s, "logprob": l, "bytes": bytes})
                };
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let mut v = item(e.token, e.logprob);
                        v["top_logprobs"] = e.top.iter().map(|(t, l)| item(*t, *l)).collect();
                        v
                    })
                    .collect();
                json!({ "content": content })
            }
        }
    }

    pub(crate) fn object(&self, chunk: bool, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

/// OpenAI's usage object; `cached`: prompt tokens whose K/V came from the prefix cache.
pub(crate) fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached}})
}

async fn collect_response(
    st: &AppState,
    head: Head,
    streams: Vec<mpsc::UnboundedReceiver<Event>>,
    starts: Vec<String>,
    (prompt_tokens, n): (usize, usize),
) -> Result<Response, ApiError> {
    let mut choices = Vec::with_capacity(streams.len());
    let (mut completion_tokens, mut cached_tokens) = (0, 0);
    for ((i, mut rx), start) in streams.into_iter().enumerate().zip(starts) {
        let mut text = start;
        let mut finish = None;
        let mut timer = RequestTimer::start(&head.model);
        let mut lps = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token {
                    text: t, logprobs, ..
                } => {
                    timer.token(&st.metrics);
                    lps.extend(logprobs);
                    text.push_str(&t)
                }
                Event::Finished {
                    reason,
                    completion_tokens: c,
                    cached_tokens: cached,
                    ..
                } => {
                    timer.finish(&st.metrics, reason, c);
                    completion_tokens += c;
                    // A prompt's cached tokens: as its first choice found them.
                    if i % n == 0 {
                        cached_tokens += cached;
                    }
                    finish = Some(reason);
                    break;
                }
                Event::Failed(e) => return Err(ApiError::internal(e)),
            }
        }
        let Some(reason) = finish else {
            return Err(ApiError::internal(
                "the engine ended a request without finishing it",
            ));
        };
        let lp = head.logprobs(&st.tokenizer, &lps, 0);
        if head.tool_calls != ToolOutput::Off {
            let (message, called) = head.tool_message(&text);
            choices.push(json!({"index": i, "message": message, "logprobs": lp, "finish_reason": finish_str(reason, called)}));
        } else {
            choices.push(head.choice(i, &text, Some(finish_str(reason, false)), false, lp));
        }
    }
    Ok(Json(head.object(
        false,
        choices,
        Some(usage(prompt_tokens, completion_tokens, cached_tokens)),
    ))
    .into_response())
}
