//! Training data: JSONL, one example per line, in the shapes OpenAI's fine-tuning and HF TRL
//! accept:
//! - `{"prompt": "...", "completion": "..."}`: loss on the completion (and the EOS after it) only;
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: the chat template applied, loss on the
//!   assistant messages only (an assistant message with `"weight": 0` is context, not a target);
//!   with OpenAI's `tools` and assistant `tool_calls` (and `role: "tool"` results), rendered as
//!   serving renders them (`tool_calls.rs`), so the loss covers the assistant's calls;
//! - `{"text": "..."}`: loss on every token;
//! - from other tools: ShareGPT's `{"conversations": [{"from": "human" | "gpt" | ..., "value"}]}`,
//!   TRL's conversational `{"prompt": [messages], "completion": [messages]}` and Alpaca's
//!   `{"instruction", "input", "output"}` (a user turn and the assistant's answer), all read as
//!   chat messages.
//!
//! Bad lines give an error naming the file, the line number and the field.

use super::tool_lines::{tool_calls, tools_field};
use crate::chat_template::ChatMessage;
use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::Path;

/// One line of a training file, checked for shape (no tokenizer needed).
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Completion {
        prompt: String,
        completion: String,
    },
    /// Messages with, per message, whether it is a training target; the tools offered.
    Chat(Vec<(ChatMessage, bool)>, Vec<Value>),
    Text(String),
}

/// A tokenized example: `target[i]` says whether token i is predicted (from tokens before it)
/// and counts in the loss. `target[0]` is always false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub target: Vec<bool>,
}

impl Example {
    /// `prompt` as context, then `answer` as the target.
    pub fn with_prompt(prompt: &[u32], answer: &[u32]) -> Self {
        let mut tokens = prompt.to_vec();
        tokens.extend(answer);
        let target = (0..tokens.len()).map(|i| i >= prompt.len()).collect();
        Self { tokens, target }
    }

    pub fn num_targets(&self) -> usize {
        self.target.iter().filter(|&&t| t).count()
    }
}

pub(super) fn string_field(
    obj: &serde_json::Map<String, Value>,
    key: &str,
) -> std::result::Result<Option<String>, (String, String)> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err((
            key.to_string(),
            format!("must be a string, got {}", kind(other)),
        )),
    }
}

pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// OpenAI-style messages (`role`, `content` as a string or text parts, optional `weight` 0/1 on
/// assistant messages), the array under `name` (named in errors); per message, whether it is a
/// training target (an assistant message without `"weight": 0`).
pub(super) fn parse_messages(
    items: &[Value],
    name: &str,
) -> std::result::Result<Vec<(ChatMessage, bool)>, (String, String)> {
    let mut msgs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = |f: &str| format!("{name}[{i}].{f}");
        let Value::Object(o) = item else {
            return Err((
                format!("{name}[{i}]"),
                format!("must be an object, got {}", kind(item)),
            ));
        };
        let role = string_field(o, "role")
            .map_err(|(_, m)| (field("role"), m))?
            .ok_or_else(|| (field("role"), "is missing".to_string()))?;
        if !["system", "user", "assistant", "developer", "tool"].contains(&role.as_str()) {
            return Err((field("role"), format!("unknown role `{role}`")));
        }
        let tool_calls = tool_calls(o, &role, &field)?;
        let content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            // OpenAI's content parts: the text parts, concatenated.
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match p.get("text").and_then(Value::as_str) {
                        Some(t) if p.get("type").and_then(Value::as_str) == Some("text") => {
                            s.push_str(t)
                        }
                        _ => {
                            return Err((
                                field("content"),
                                "only text content parts are supported".into(),
                            ))
                        }
                    }
                }
                s
            }
            None | Some(Value::Null) if !tool_calls.is_empty() => String::new(),
            None | Some(Value::Null) => return Err((field("content"), "is missing".into())),
            Some(other) => {
                return Err((
                    field("content"),
                    format!("must be a string, got {}", kind(other)),
                ))
            }
        };
        let weight = match o.get("weight") {
            None | Some(Value::Null) => true,
            Some(Value::Number(n)) if n.as_f64() == Some(1.0) => true,
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => false,
            Some(_) => return Err((field("weight"), "must be 0 or 1".into())),
        };
        let target = role == "assistant" && weight;
        let mut msg = ChatMessage::new(role, content);
        msg.tool_calls = tool_calls;
        msg.tool_call_id =
            string_field(o, "tool_call_id").map_err(|(_, m)| (field("tool_call_id"), m))?;
        msgs.push((msg, target));
    }
    Ok(msgs)
}

/// An array field, or None when absent; an error when it is there but not an array.
pub(super) fn array_field<'v>(
    obj: &'v serde_json::Map<String, Value>,
    key: &str,
) -> std::result::Result<Option<&'v Vec<Value>>, (String, String)> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(other) => Err((key.into(), format!("must be an array, got {}", kind(other)))),
    }
}

/// ShareGPT's `conversations` (`from`: system / human / user / gpt / assistant / tool, `value`)
/// as OpenAI messages.
fn sharegpt(items: &[Value]) -> std::result::Result<Vec<Value>, (String, String)> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |f: &str| format!("conversations[{i}].{f}");
            let Value::Object(o) = item else {
                return Err((
                    format!("conversations[{i}]"),
                    format!("must be an object, got {}", kind(item)),
                ));
            };
            let from = string_field(o, "from")
                .map_err(|(_, m)| (field("from"), m))?
                .ok_or_else(|| (field("from"), "is missing".to_string()))?;
            let role = match from.as_str() {
                "system" => "system",
                "human" | "user" => "user",
                "gpt" | "assistant" | "model" => "assistant",
                "tool" | "observation" | "function" => "tool",
                other => return Err((field("from"), format!("unknown speaker `{other}`"))),
            };
            let value = string_field(o, "value")
                .map_err(|(_, m)| (field("value"), m))?
                .ok_or_else(|| (field("value"), "is missing".to_string()))?;
            let mut m = serde_json::json!({"role": role, "content": value});
            if let Some(w) = o.get("weight") {
                m["weight"] = w.clone();
            }
            Ok(m)
        })
        .collect()
}

/// Parses one JSONL line. Errors are (field, message).
pub fn parse_record(line: &str) -> std::result::Result<Record, (String, String)> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| ("json".to_string(), format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err((
            "json".into(),
            format!("must be a JSON object, got {}", kind(&v)),
        ));
    };
    // OpenAI / TRL conversational: {"messages": [...]}; ShareGPT: {"conversations": [...]}.
    let conversation = match (
        array_field(&obj, "messages")?,
        array_field(&obj, "conversations")?,
    ) {
        (Some(items), _) => Some(parse_messages(items, "messages")?),
        (None, Some(items)) => Some(parse_messages(&sharegpt(items)?, "conversations")?),
        (None, None) => None,
    };
    // TRL's conversational prompt-completion: {"prompt": [messages], "completion": [messages]}.
    let conversation = match (conversation, obj.get("prompt"), obj.get("completion")) {
        (Some(c), _, _) => Some(c),
        (None, Some(Value::Array(p)), Some(Value::Array(c))) => {
            let mut msgs: Vec<_> = parse_messages(p, "prompt")?
                .into_iter()
                .map(|(m, _)| (m, false))
                .collect();
            msgs.extend(parse_messages(c, "completion")?);
            Some(msgs)
        }
        (None, Some(Value::Array(_)), _) => {
            return Err((
                "completion".into(),
                "must be a list of messages when `prompt` is one".into(),
            ))
        }
        _ => None,
    };
    if let Some(msgs) = conversation {
        if !msgs.iter().any(|(_, t)| *t) {
            return Err((
                "messages".into(),
                "has no assistant message to learn from".into(),
            ));
        }
        return Ok(Record::Chat(msgs, tools_field(&obj)?));
    }
    // Alpaca: {"instruction", "input" (optional), "output"}, optionally "system": one user turn
    // (the instruction, then the input after a blank line) and the assistant's output.
    if let Some(instruction) = string_field(&obj, "instruction")? {
        let output = string_field(&obj, "output")?
            .filter(|o| !o.is_empty())
            .ok_or_else(|| {
                (
                    "output".to_string(),
                    "is missing or empty (an `instruction` needs an `output`)".to_string(),
                )
            })?;
        let input = string_field(&obj, "input")?.unwrap_or_default();
        let user = if input.is_empty() {
            instruction
        } else {
            format!("{instruction}\n\n{input}")
        };
        let mut msgs = Vec::new();
        if let Some(system) = string_field(&obj, "system")?.filter(|s| !s.is_empty()) {
            msgs.push((ChatMessage::new("system", system), false));
        }
        msgs.push((ChatMessage::new("user", user), false));
        msgs.push((ChatMessage::new("assistant", output), true));
        return Ok(Record::Chat(msgs, Vec::new()));
    }
    let prompt = string_field(&obj, "prompt")?;
    let completion = string_field(&obj, "completion")?;
    match (prompt, completion) {
        (Some(prompt), Some(completion)) => {
            if completion.is_empty() {
                return Err(("completion".into(), "is empty".into()));
            }
            Ok(Record::Completion { prompt, completion })
        }
        (Some(_), None) => Err((
            "completion".into(),
            "is missing (a `prompt` needs a `completion`)".into(),
        )),
        (None, Some(completion)) => Ok(Record::Completion {
            prompt: String::new(),
            completion,
        }),
        (None, None) => match string_field(&obj, "text")? {
            Some(t) if !t.is_empty() => Ok(Record::Text(t)),
            Some(_) => Err(("text".into(), "is empty".into())),
            None if super::preference::is_preference(&obj) => Err((
                "json".into(),
                "is a preference pair (preferred / non-preferred outputs): train on it with the dpo method (`--method dpo`)".into(),
            )),
            None => Err((
                "json".into(),
                "needs `messages` (or ShareGPT's `conversations`), `prompt` and `completion`, `instruction` and `output` (Alpaca), or `text`".into(),
            )),
        },
    }
}

/// Checks every line of a JSONL file's contents; the error names the line and field.
/// Returns the number of examples.
pub fn validate_jsonl(contents: &str) -> std::result::Result<usize, String> {
    let mut n = 0;
    for (i, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        parse_record(line).map_err(|(f, m)| format!("line {}: `{f}` {m}", i + 1))?;
        n += 1;
    }
    if n == 0 {
        return Err("the file has no examples".into());
    }
    Ok(n)
}

/// Tokens and targets of one record; texts longer than `max_len` tokens are cut to it.
pub fn tokenize(
    record: &Record,
    tok: &TextTokenizer,
    max_len: usize,
) -> std::result::Result<Example, (String, String)> {
    let enc = |s: &str, special: bool| {
        tok.encode(s, special)
            .map_err(|e| ("tokenizer".to_string(), e.to_string()))
    };
    let eos = tok.eos_token_ids.first().copied();
    let mut ex = Example {
        tokens: Vec::new(),
        target: Vec::new(),
    };
    let push = |ids: Vec<u32>, target: bool, ex: &mut Example| {
        ex.target.extend(std::iter::repeat_n(target, ids.len()));
        ex.tokens.extend(ids);
    };
    match record {
        Record::Completion { prompt, completion } => {
            push(enc(prompt, true)?, false, &mut ex);
            let special = ex.tokens.is_empty();
            push(enc(completion, special)?, true, &mut ex);
            push(eos.into_iter().collect(), true, &mut ex);
        }
        Record::Text(t) => {
            push(enc(t, true)?, true, &mut ex);
            push(eos.into_iter().collect(), true, &mut ex);
        }
        Record::Chat(msgs, tools) => {
            // Render growing prefixes; each new piece of text is context or target.
            let all: Vec<ChatMessage> = msgs.iter().map(|(m, _)| m.clone()).collect();
            let render = |n: usize, gen: bool| {
                tok.apply_chat_template_with_tools(&all[..n], tools, gen)
                    .map_err(|e| ("messages".to_string(), e.to_string()))
            };
            let mut done = String::new();
            for (i, (_, target)) in msgs.iter().enumerate() {
                let pieces: Vec<(String, bool)> = if *target {
                    vec![(render(i, true)?, false), (render(i + 1, false)?, true)]
                } else {
                    vec![(render(i + 1, false)?, false)]
                };
                for (text, t) in pieces {
                    let Some(new) = text.strip_prefix(done.as_str()) else {
                        return Err((
                            format!("messages[{i}]"),
                            "the chat template does not render the conversation incrementally, so assistant tokens cannot be told apart".into(),
                        ));
                    };
                    push(enc(new, false)?, t, &mut ex);
                    done = text;
                }
            }
        }
    }
    ex.tokens.truncate(max_len);
    ex.target.truncate(max_len);
    if let Some(t) = ex.target.first_mut() {
        *t = false;
    }
    if ex.num_targets() == 0 {
        return Err((
            "json".into(),
            format!("has no tokens to learn from within the first {max_len} tokens"),
        ));
    }
    Ok(ex)
}

/// A data file's text (the error names the file).
pub(super) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|err| ModelError::Io {
        path: path.into(),
        err,
    })
}

/// Reads, checks and tokenizes a JSONL training file.
pub fn load_jsonl(path: &Path, tok: &TextTokenizer, max_len: usize) -> Result<Vec<Example>> {
    let contents = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex = parse_record(line)
            .and_then(|r| tokenize(&r, tok, max_len))
            .map_err(|(f, m)| ModelError::field(path, format!("line {}: {f}", i + 1), m))?;
        out.push(ex);
    }
    if out.is_empty() {
        return Err(ModelError::field(path, "lines", "the file has no examples"));
    }
    Ok(out)
}
