//! Reinforcement fine-tuning data: one prompt per JSONL line, in OpenAI's shape: `{"messages":
//! [...], "tools": [...], <any other fields>}`. The messages (a trailing assistant message, a
//! reference answer some files carry, is dropped) are what the policy answers; the whole line
//! is the grader's `item` (`{{item.<field>}}`). Bad lines give errors naming line and field.

use super::data::{array_field, kind, parse_messages, read_text};
use super::tool_lines::tools_field;
use crate::chat_template::ChatMessage;
use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;
use serde_json::Value;
use std::path::Path;

/// One checked prompt line.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<Value>,
    /// The whole line, for the grader.
    pub item: Value,
}

/// A tokenized prompt and its line.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    /// The chat template's rendering with the generation prompt, tokenized.
    pub prompt: Vec<u32>,
    pub item: Value,
}

type FieldError = (String, String);

/// Parses one line.
pub fn parse_prompt(line: &str) -> std::result::Result<PromptRecord, FieldError> {
    let item: Value = serde_json::from_str(line)
        .map_err(|e| ("json".to_string(), format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = &item else {
        return Err((
            "json".into(),
            format!("must be a JSON object, got {}", kind(&item)),
        ));
    };
    let items = array_field(obj, "messages")?.ok_or_else(|| {
        (
            "messages".to_string(),
            "is missing (a reinforcement line is {\"messages\": [...], ...the fields its grader reads})".to_string(),
        )
    })?;
    let mut messages: Vec<ChatMessage> = parse_messages(items, "messages")?
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    while messages.last().is_some_and(|m| m.role == "assistant") {
        messages.pop();
    }
    if messages.is_empty() {
        return Err((
            "messages".into(),
            "has no prompt (a user or system message) to answer".into(),
        ));
    }
    let tools = tools_field(obj)?;
    Ok(PromptRecord {
        messages,
        tools,
        item,
    })
}

/// A record's prompt tokens: the chat template with its generation prompt.
pub fn tokenize_prompt(
    r: &PromptRecord,
    tok: &TextTokenizer,
    max_len: usize,
) -> std::result::Result<PromptItem, FieldError> {
    let text = tok
        .apply_chat_template_with_tools(&r.messages, &r.tools, true)
        .map_err(|e| ("messages".to_string(), e.to_string()))?;
    let prompt = tok
        .encode(&text, false)
        .map_err(|e| ("tokenizer".to_string(), e.to_string()))?;
    if prompt.len() >= max_len {
        return Err((
            "messages".into(),
            format!(
                "the prompt is {} tokens, no room to answer within {max_len}",
                prompt.len()
            ),
        ));
    }
    Ok(PromptItem {
        prompt,
        item: r.item.clone(),
    })
}

/// Parses and tokenizes prompt JSONL contents; errors are (line, field, message).
pub fn prompt_items(
    contents: &str,
    tok: &TextTokenizer,
    max_len: usize,
) -> std::result::Result<Vec<PromptItem>, (usize, String, String)> {
    let mut out = Vec::new();
    for (i, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p = parse_prompt(line)
            .and_then(|r| tokenize_prompt(&r, tok, max_len))
            .map_err(|(f, m)| (i + 1, f, m))?;
        out.push(p);
    }
    if out.is_empty() {
        return Err((0, "lines".into(), "the file has no prompts".into()));
    }
    Ok(out)
}

/// Reads, checks and tokenizes a prompt JSONL file.
pub fn load_prompt_jsonl(
    path: &Path,
    tok: &TextTokenizer,
    max_len: usize,
) -> Result<Vec<PromptItem>> {
    let contents = read_text(path)?;
    prompt_items(&contents, tok, max_len).map_err(|(line, f, m)| {
        if line == 0 {
            ModelError::field(path, f, m)
        } else {
            ModelError::field(path, format!("line {line}: {f}"), m)
        }
    })
}
