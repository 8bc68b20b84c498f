//! Generation requests from submission to answer: the admission permit, every (prompt, choice)
//! handed to the engine, and the engine's event streams folded into one JSON response or
//! forwarded as SSE chunks, with usage (cached prompt tokens included).

use crate::error::ApiError;
use crate::metrics::RequestTimer;
use crate::openai::Sampling;
use crate::routes::{now, resolve_model};
use crate::tenants::Tenant;
use crate::AppState;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tandem_model::{SamplingParams, TextTokenizer, TokenLogprobs};
use tandem_scheduler::{EngineError, Event, FinishReason, GenerateRequest};
use tokio::sync::mpsc;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

/// A slot among `max_pending` requests in flight, held until the response (or stream) ends.
pub(crate) struct Permit(Arc<AppState>);

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

/// Submits every (prompt, choice) to the engine and answers in one JSON or as an SSE stream.
/// `echo`: per prompt, text that starts each of its choices (completions' `echo`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    st: Arc<AppState>,
    tenant: Tenant,
    kind: Kind,
    s: Sampling,
    prompts: Vec<Vec<u32>>,
    default_max: Option<usize>,
    echo: Option<Vec<String>>,
) -> Result<Response, ApiError> {
    let adapter = resolve_model(&st, &tenant, &s.model).await?;
    // Tenants never share prefix-cache blocks.
    let cache_salt = tenant.cache_salt(s.cache_salt.as_deref());
    let permit = Permit::acquire(&st)?;
    let n = s.n()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = st.max_model_len.saturating_sub(longest);
    let params = s.to_params(
        default_max.unwrap_or(room).max(1),
        kind == Kind::Chat,
        st.vocab_size,
    )?;
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
    };
    if s.stream {
        let usage = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(stream_response(
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

struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// vLLM's `return_tokens_as_token_ids`: logprobs name tokens as `token_id:{id}`.
    token_ids: bool,
}

impl Head {
    fn choice(
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
    fn logprobs(&self, tok: &TextTokenizer, entries: &[TokenLogprobs], mut offset: usize) -> Value {
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

    fn object(&self, chunk: bool, choices: Vec<Value>, usage: Option<Value>) -> Value {
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
fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached}})
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        _ => "stop",
    }
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
                    finish = Some(finish_str(reason));
                    break;
                }
                Event::Failed(e) => return Err(ApiError::internal(e)),
            }
        }
        if finish.is_none() {
            return Err(ApiError::internal(
                "the engine ended a request without finishing it",
            ));
        }
        let lp = head.logprobs(&st.tokenizer, &lps, 0);
        choices.push(head.choice(i, &text, finish, false, lp));
    }
    Ok(Json(head.object(
        false,
        choices,
        Some(usage(prompt_tokens, completion_tokens, cached_tokens)),
    ))
    .into_response())
}

/// SSE: one chunk per text piece, a last chunk per choice with its finish_reason, the usage
/// chunk if asked, then `[DONE]`. When the client goes away the forwarding task ends, dropping
/// the engine streams, and the engine frees those sequences.
fn stream_response(
    st: Arc<AppState>,
    permit: Permit,
    head: Head,
    streams: Vec<mpsc::UnboundedReceiver<Event>>,
    starts: Vec<String>,
    (prompt_tokens, per_prompt): (usize, usize),
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    let n = streams.len();
    let span = tracing::Span::current();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let _permit = permit;
            let send = |v: Value| SseEvent::default().data(v.to_string());
            if head.kind == Kind::Chat {
                for i in 0..n {
                    let first = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    if tx
                        .send(send(head.object(true, vec![first], None)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            for (i, start) in starts.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
                let chunk = head.object(
                    true,
                    vec![head.choice(i, start, None, true, Value::Null)],
                    None,
                );
                if tx.send(send(chunk)).await.is_err() {
                    return;
                }
            }
            let merged = stream::select_all(streams.into_iter().enumerate().map(|(i, rx)| {
                stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
                    .map(move |e| (i, e))
                    .boxed()
            }));
            futures_util::pin_mut!(merged);
            let (mut completion_tokens, mut cached_tokens) = (0, 0);
            let mut timers: Vec<RequestTimer> =
                (0..n).map(|_| RequestTimer::start(&head.model)).collect();
            let mut offsets = vec![0usize; n];
            while let Some((i, ev)) = merged.next().await {
                let chunk = match ev {
                    Event::Token { text, logprobs, .. } => {
                        timers[i].token(&st.metrics);
                        if text.is_empty() && logprobs.is_none() {
                            continue;
                        }
                        let lp = head.logprobs(&st.tokenizer, logprobs.as_slice(), offsets[i]);
                        offsets[i] += text.len();
                        head.object(true, vec![head.choice(i, &text, None, true, lp)], None)
                    }
                    Event::Finished {
                        reason,
                        completion_tokens: c,
                        cached_tokens: cached,
                        ..
                    } => {
                        timers[i].finish(&st.metrics, reason, c);
                        completion_tokens += c;
                        if i % per_prompt == 0 {
                            cached_tokens += cached;
                        }
                        head.object(
                            true,
                            vec![head.choice(i, "", Some(finish_str(reason)), true, Value::Null)],
                            None,
                        )
                    }
                    Event::Failed(e) => {
                        tracing::error!(error = %e, "request failed mid-stream");
                        json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}})
                    }
                };
                if tx.send(send(chunk)).await.is_err() {
                    return;
                }
            }
            if include_usage {
                let _ = tx
                    .send(send(head.object(
                        true,
                        vec![],
                        Some(usage(prompt_tokens, completion_tokens, cached_tokens)),
                    )))
                    .await;
            }
            let _ = tx.send(SseEvent::default().data("[DONE]")).await;
        },
        span,
    ));
    let events = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
