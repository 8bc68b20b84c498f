//! Preference data for DPO: one pair per JSONL line, a prompt with a preferred and a
//! non-preferred answer, in the shapes OpenAI's DPO fine-tuning and HF TRL accept:
//! - OpenAI: `{"input": {"messages": [...], "tools": [...]}, "preferred_output": [assistant
//!   message], "non_preferred_output": [assistant message]}`;
//! - TRL, explicit prompt: `{"prompt": "..." | [messages], "chosen": "..." | [messages],
//!   "rejected": "..." | [messages]}`;
//! - TRL, implicit prompt: `{"chosen": [messages], "rejected": [messages]}`, the messages both
//!   share being the prompt; Anthropic HH-RLHF's `{"chosen": "...", "rejected": "..."}`, the
//!   text both begin with being the prompt.
//!
//! Each side becomes an ordinary training record (the prompt as context, the answer as the
//! target), tokenized as supervised lines are. Bad lines give errors naming line and field.

use super::data::{array_field, kind, parse_messages, parse_record, tokenize, Example, Record};
use super::tool_lines::tools_field;
use crate::chat_template::ChatMessage;
use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::Path;

/// One preference line, checked for shape: the two sides as training records.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRecord {
    pub chosen: Record,
    pub rejected: Record,
}

/// A tokenized preference pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub chosen: Example,
    pub rejected: Example,
}

type FieldError = (String, String);

/// Whether a parsed line is in a preference shape (it has one of the pair's fields).
pub fn is_preference(obj: &serde_json::Map<String, Value>) -> bool {
    [
        "preferred_output",
        "non_preferred_output",
        "chosen",
        "rejected",
    ]
    .iter()
    .any(|k| obj.contains_key(*k))
}

/// Assistant messages of one side (`name` in errors): a non-empty list of assistant messages,
/// each a target.
fn answer(items: &Value, name: &str) -> std::result::Result<Vec<(ChatMessage, bool)>, FieldError> {
    let Value::Array(items) = items else {
        return Err((
            name.into(),
            format!("must be an array of messages, got {}", kind(items)),
        ));
    };
    if items.is_empty() {
        return Err((
            name.into(),
            "is empty (it needs an assistant message)".into(),
        ));
    }
    let msgs = parse_messages(items, name)?;
    for (i, (m, _)) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            return Err((
                format!("{name}[{i}].role"),
                format!("must be `assistant`, got `{}`", m.role),
            ));
        }
        if m.content.trim().is_empty() && m.tool_calls.is_empty() {
            return Err((format!("{name}[{i}].content"), "is empty".into()));
        }
    }
    Ok(msgs.into_iter().map(|(m, _)| (m, true)).collect())
}

/// The prompt's messages, all context.
fn context(
    items: &[Value],
    name: &str,
) -> std::result::Result<Vec<(ChatMessage, bool)>, FieldError> {
    Ok(parse_messages(items, name)?
        .into_iter()
        .map(|(m, _)| (m, false))
        .collect())
}

fn chat(
    prompt: &[(ChatMessage, bool)],
    answer: Vec<(ChatMessage, bool)>,
    tools: &[Value],
) -> Record {
    let mut msgs = prompt.to_vec();
    msgs.extend(answer);
    Record::Chat(msgs, tools.to_vec())
}

/// Parses one preference line. Errors are (field, message).
pub fn parse_preference(line: &str) -> std::result::Result<PreferenceRecord, FieldError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| ("json".to_string(), format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err((
            "json".into(),
            format!("must be a JSON object, got {}", kind(&v)),
        ));
    };
    let pair = if obj.contains_key("preferred_output") || obj.contains_key("non_preferred_output") {
        openai(&obj)?
    } else if obj.contains_key("chosen") || obj.contains_key("rejected") {
        trl(&obj)?
    } else if parse_record(line).is_ok() {
        return Err((
            "json".into(),
            "is a supervised example, not a preference pair: train on it with the supervised method, or give `input`, `preferred_output` and `non_preferred_output`".into(),
        ));
    } else {
        return Err((
            "json".into(),
            "needs `input`, `preferred_output` and `non_preferred_output` (OpenAI's preference format), or `chosen` and `rejected` (TRL's)".into(),
        ));
    };
    if pair.chosen == pair.rejected {
        return Err((
            "non_preferred_output".into(),
            "is the same as the preferred output".into(),
        ));
    }
    Ok(pair)
}

fn openai(
    obj: &serde_json::Map<String, Value>,
) -> std::result::Result<PreferenceRecord, FieldError> {
    let input = match obj.get("input") {
        Some(Value::Object(o)) => o,
        None | Some(Value::Null) => return Err(("input".into(), "is missing".into())),
        Some(other) => {
            return Err((
                "input".into(),
                format!("must be an object, got {}", kind(other)),
            ))
        }
    };
    let items = array_field(input, "messages")
        .map_err(|(_, m)| ("input.messages".to_string(), m))?
        .ok_or_else(|| ("input.messages".to_string(), "is missing".to_string()))?;
    if items.is_empty() {
        return Err(("input.messages".into(), "is empty".into()));
    }
    let prompt = context(items, "input.messages")?;
    let tools = tools_field(input).map_err(|(f, m)| (format!("input.{f}"), m))?;
    let side = |key: &str| {
        let v = obj.get(key).filter(|v| !v.is_null()).ok_or_else(|| {
            (
                key.to_string(),
                "is missing (a preference pair needs both outputs)".to_string(),
            )
        })?;
        answer(v, key)
    };
    let chosen = side("preferred_output")?;
    let rejected = side("non_preferred_output")?;
    Ok(PreferenceRecord {
        chosen: chat(&prompt, chosen, &tools),
        rejected: chat(&prompt, rejected, &tools),
    })
}

fn trl(obj: &serde_json::Map<String, Value>) -> std::result::Result<PreferenceRecord, FieldError> {
    let get = |key: &str| {
        obj.get(key).filter(|v| !v.is_null()).ok_or_else(|| {
            (
                key.to_string(),
                "is missing (a preference pair needs both `chosen` and `rejected`)".to_string(),
            )
        })
    };
    let (chosen, rejected) = (get("chosen")?, get("rejected")?);
    let tools = tools_field(obj)?;
    match (obj.get("prompt"), chosen, rejected) {
        // Strings: a completion pair.
        (p, Value::String(c), Value::String(r)) => {
            let (prompt, c, r) = match p {
                // Implicit prompt (Anthropic HH-RLHF's shape): the text both sides begin with,
                // up to before the space the answers start with (as TRL's `extract_prompt`).
                None | Some(Value::Null) => {
                    let mut at = c
                        .char_indices()
                        .zip(r.chars())
                        .find(|((_, a), b)| a != b)
                        .map_or(c.len().min(r.len()), |((i, _), _)| i);
                    while !c.is_char_boundary(at) {
                        at -= 1;
                    }
                    if at > 0 && c[..at].ends_with(' ') {
                        at -= 1;
                    }
                    (c[..at].to_string(), &c[at..], &r[at..])
                }
                Some(Value::String(s)) => (s.clone(), c.as_str(), r.as_str()),
                Some(other) => {
                    return Err((
                        "prompt".into(),
                        format!("must be a string when `chosen` is one, got {}", kind(other)),
                    ))
                }
            };
            for (k, s) in [("chosen", c), ("rejected", r)] {
                if s.trim().is_empty() {
                    return Err((k.into(), "is empty".into()));
                }
            }
            let side = |completion: &str| Record::Completion {
                prompt: prompt.clone(),
                completion: completion.to_string(),
            };
            Ok(PreferenceRecord {
                chosen: side(c),
                rejected: side(r),
            })
        }
        (Some(Value::Array(p)), c, r) => {
            let prompt = context(p, "prompt")?;
            Ok(PreferenceRecord {
                chosen: chat(&prompt, answer(c, "chosen")?, &tools),
                rejected: chat(&prompt, answer(r, "rejected")?, &tools),
            })
        }
        (None | Some(Value::Null), Value::Array(c), Value::Array(r)) => {
            // Implicit prompt: the messages both conversations begin with.
            let shared = c.iter().zip(r).take_while(|(a, b)| a == b).count();
            if shared == 0 {
                return Err((
                    "prompt".into(),
                    "is missing, and `chosen` and `rejected` share no first messages to take as the prompt".into(),
                ));
            }
            let prompt = context(&c[..shared], "chosen")?;
            let tail = |items: &[Value], name: &str| answer(&Value::Array(items.to_vec()), name);
            Ok(PreferenceRecord {
                chosen: chat(&prompt, tail(&c[shared..], "chosen")?, &tools),
                rejected: chat(&prompt, tail(&r[shared..], "rejected")?, &tools),
            })
        }
        (_, c, r) => {
            let (key, v) = if matches!(c, Value::String(_) | Value::Array(_)) {
                ("rejected", r)
            } else {
                ("chosen", c)
            };
            Err((
                key.into(),
                format!(
                    "must be a string or an array of messages like the other side, got {}",
                    kind(v)
                ),
            ))
        }
    }
}

/// Tokens and targets of both sides of a pair (each cut to `max_len` tokens).
pub fn tokenize_pair(
    rec: &PreferenceRecord,
    tok: &TextTokenizer,
    max_len: usize,
) -> std::result::Result<Pair, FieldError> {
    let side = |r: &Record, name: &str| {
        tokenize(r, tok, max_len).map_err(|(f, m)| (format!("{name}: {f}"), m))
    };
    Ok(Pair {
        chosen: side(&rec.chosen, "preferred_output")?,
        rejected: side(&rec.rejected, "non_preferred_output")?,
    })
}

/// Whether a JSONL file's lines are supervised examples or preference pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Supervised,
    Preference,
    /// Prompts without an answer to learn (reinforcement fine-tuning's lines), perhaps with
    /// supervised lines (whose assistant answers a reinforcement job drops).
    Prompts,
}

/// Checks every line of a JSONL file's contents, supervised or preference lines (not both);
/// the error names the line and field. Returns the kind and the number of lines.
pub fn validate_file(contents: &str) -> std::result::Result<(FileKind, usize), String> {
    let mut kind_seen: Option<(FileKind, usize)> = None;
    let mut n = 0;
    for (i, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let pref = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => is_preference(&o),
            _ => false,
        };
        let this = if pref {
            parse_preference(line).map(|_| FileKind::Preference)
        } else {
            parse_record(line)
                .map(|_| FileKind::Supervised)
                .or_else(|e| {
                    super::prompts::parse_prompt(line)
                        .map(|_| FileKind::Prompts)
                        .map_err(|_| e)
                })
        }
        .map_err(|(f, m)| format!("line {}: `{f}` {m}", i + 1))?;
        match kind_seen {
            // Supervised lines are prompts too (their answers dropped).
            Some((FileKind::Supervised, first)) if this == FileKind::Prompts => {
                kind_seen = Some((this, first))
            }
            Some((FileKind::Prompts, _)) if this == FileKind::Supervised => {}
            Some((k, first)) if k != this => {
                return Err(format!(
                "line {}: a {} line in a file whose line {first} is a {} line (one kind per file)",
                i + 1,
                name(this),
                name(k)
            ))
            }
            None => kind_seen = Some((this, i + 1)),
            _ => {}
        }
        n += 1;
    }
    match kind_seen {
        Some((k, _)) => Ok((k, n)),
        None => Err("the file has no examples".into()),
    }
}

fn name(k: FileKind) -> &'static str {
    match k {
        FileKind::Supervised => "supervised",
        FileKind::Preference => "preference",
        FileKind::Prompts => "prompt",
    }
}

/// Parses and tokenizes preference JSONL contents; errors are (line, field, message).
pub fn preference_pairs(
    contents: &str,
    tok: &TextTokenizer,
    max_len: usize,
) -> std::result::Result<Vec<Pair>, (usize, String, String)> {
    let mut out = Vec::new();
    for (i, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let pair = parse_preference(line)
            .and_then(|r| tokenize_pair(&r, tok, max_len))
            .map_err(|(f, m)| (i + 1, f, m))?;
        out.push(pair);
    }
    if out.is_empty() {
        return Err((0, "lines".into(), "the file has no preference pairs".into()));
    }
    Ok(out)
}

/// Reads, checks and tokenizes a preference JSONL file.
pub fn load_preference_jsonl(
    path: &Path,
    tok: &TextTokenizer,
    max_len: usize,
) -> Result<Vec<Pair>> {
    let contents = super::data::read_text(path)?;
    preference_pairs(&contents, tok, max_len).map_err(|(line, f, m)| {
        if line == 0 {
            ModelError::field(path, f, m)
        } else {
            ModelError::field(path, format!("line {line}: {f}"), m)
        }
    })
}
