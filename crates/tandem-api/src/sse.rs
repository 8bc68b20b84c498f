//! Streamed answers: the engine's event streams of every choice forwarded as OpenAI's SSE chunks
//! (role first, text pieces, tool-call deltas, the finish reason, usage if asked, `[DONE]`).

use crate::metrics::RequestTimer;
use crate::respond::{finish_str, tool_call_json, usage, Head, Kind, Permit, ToolOutput};
use crate::AppState;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tandem_model::tool_calls::{new_call_id, Piece, ToolCallParser};
use tandem_scheduler::Event;
use tokio::sync::mpsc;

/// SSE: one chunk per text piece, a last chunk per choice with its finish_reason, the usage
/// chunk if asked, then `[DONE]`. When the client goes away the forwarding task ends, dropping
/// the engine streams, and the engine frees those sequences.
pub(crate) fn stream_response(
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
            // Chat with tools: each choice's text goes through a tool-call reader.
            let mut readers: Vec<Option<ToolCallParser>> = (0..n)
                .map(|_| (head.tool_calls != ToolOutput::Off).then(ToolCallParser::new))
                .collect();
            let mut calls = vec![0usize; n];
            while let Some((i, ev)) = merged.next().await {
                let chunks = match ev {
                    Event::Token { text, logprobs, .. } => {
                        timers[i].token(&st.metrics);
                        if text.is_empty() && logprobs.is_none() {
                            continue;
                        }
                        let lp = head.logprobs(&st.tokenizer, logprobs.as_slice(), offsets[i]);
                        offsets[i] += text.len();
                        match &mut readers[i] {
                            None => vec![head.choice(i, &text, None, true, lp)],
                            Some(r) => {
                                let pieces = r.push(&text);
                                tool_deltas(&head, i, pieces, &mut calls[i], lp)
                            }
                        }
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
                        let mut chunks = match &mut readers[i] {
                            Some(r) => {
                                let pieces = r.finish();
                                tool_deltas(&head, i, pieces, &mut calls[i], Value::Null)
                            }
                            None => Vec::new(),
                        };
                        let finish = finish_str(reason, calls[i] > 0);
                        chunks.push(head.choice(i, "", Some(finish), true, Value::Null));
                        chunks
                    }
                    Event::Failed(e) => {
                        tracing::error!(error = %e, "request failed mid-stream");
                        let err = json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}});
                        if tx.send(send(err)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                for c in chunks {
                    if tx
                        .send(send(head.object(true, vec![c], None)))
                        .await
                        .is_err()
                    {
                        return;
                    }
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

/// The delta choices for pieces read by a tool-call reader: content as content deltas, each call
/// as OpenAI streams it (its index, id and name with empty arguments as soon as the name is
/// written, then the arguments' fragments as they are generated).
/// `lp` (the tokens' logprobs) rides on the first delta, or on an empty one.
fn tool_deltas(
    head: &Head,
    i: usize,
    pieces: Vec<Piece>,
    calls: &mut usize,
    mut lp: Value,
) -> Vec<Value> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Content(_) if head.tool_calls == ToolOutput::Forced => {}
            Piece::Content(text) => {
                out.push(head.choice(i, &text, None, true, std::mem::take(&mut lp)));
            }
            Piece::Call { name, arguments } => {
                let k = *calls;
                *calls += 1;
                let opening = tool_call_json(Some(k), &new_call_id(), &name, "");
                out.push(json!({"index": i, "delta": {"tool_calls": [opening]}, "logprobs": std::mem::take(&mut lp), "finish_reason": null}));
                out.push(json!({"index": i, "delta": {"tool_calls": [{"index": k, "function": {"arguments": arguments}}]}, "logprobs": null, "finish_reason": null}));
            }
            Piece::CallStart { name } => {
                let opening = tool_call_json(Some(*calls), &new_call_id(), &name, "");
                *calls += 1;
                out.push(json!({"index": i, "delta": {"tool_calls": [opening]}, "logprobs": std::mem::take(&mut lp), "finish_reason": null}));
            }
            Piece::Args(fragment) => {
                let k = calls.saturating_sub(1);
                out.push(json!({"index": i, "delta": {"tool_calls": [{"index": k, "function": {"arguments": fragment}}]}, "logprobs": std::mem::take(&mut lp), "finish_reason": null}));
            }
            Piece::CallEnd => {}
        }
    }
    if !lp.is_null() {
        out.push(head.choice(i, "", None, true, lp));
    }
    out
}
