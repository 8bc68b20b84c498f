//! Tool calls in training lines (OpenAI's fine-tuning format): an assistant message's
//! `tool_calls` (or the deprecated `function_call`) and the line's `tools` (or `functions`),
//! checked with errors that name the field.

use super::data::{array_field, kind};
use crate::tool_calls::ToolCall;
use serde_json::Value;

/// An assistant message's `tool_calls` (or the deprecated `function_call`), OpenAI's shape:
/// `[{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}]`.
pub(super) fn tool_calls(
    o: &serde_json::Map<String, Value>,
    role: &str,
    field: &dyn Fn(&str) -> String,
) -> std::result::Result<Vec<ToolCall>, (String, String)> {
    // (field, function object, the call's id)
    let mut items: Vec<(String, &Value, String)> = Vec::new();
    match o.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for (k, c) in a.iter().enumerate() {
                let f = field(&format!("tool_calls[{k}]"));
                if c.get("type").is_some_and(|t| t != "function") {
                    return Err((format!("{f}.type"), "must be \"function\"".into()));
                }
                let func = c
                    .get("function")
                    .ok_or_else(|| (format!("{f}.function"), "is missing".to_string()))?;
                let id = c
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("call_{k}"), str::to_string);
                items.push((format!("{f}.function"), func, id));
            }
        }
        Some(other) => {
            return Err((
                field("tool_calls"),
                format!("must be an array, got {}", kind(other)),
            ))
        }
    }
    if let Some(fc) = o.get("function_call").filter(|v| !v.is_null()) {
        items.push((field("function_call"), fc, "call_0".to_string()));
    }
    if !items.is_empty() && role != "assistant" {
        return Err((
            field("tool_calls"),
            "only assistant messages call tools".into(),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (f, func, id) in items {
        let name = match func.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => return Err((format!("{f}.name"), "must be a non-empty string".into())),
        };
        let arguments = match func.get("arguments") {
            None | Some(Value::Null) => "{}".to_string(),
            Some(Value::String(s)) => {
                serde_json::from_str::<Value>(s)
                    .map_err(|e| (format!("{f}.arguments"), format!("is not valid JSON: {e}")))?;
                s.clone()
            }
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(other) => {
                return Err((
                    format!("{f}.arguments"),
                    format!("must be a JSON string, got {}", kind(other)),
                ))
            }
        };
        out.push(ToolCall {
            id,
            name,
            arguments,
        });
    }
    Ok(out)
}

/// The line's `tools` (or the deprecated `functions`), as OpenAI tool objects.
pub(super) fn tools_field(
    obj: &serde_json::Map<String, Value>,
) -> std::result::Result<Vec<Value>, (String, String)> {
    let mut tools = Vec::new();
    for (i, t) in array_field(obj, "tools")?.into_iter().flatten().enumerate() {
        let name = t.pointer("/function/name").and_then(Value::as_str);
        if t.get("type").and_then(Value::as_str) != Some("function")
            || name.is_none_or(str::is_empty)
        {
            return Err((
                format!("tools[{i}]"),
                "must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}".into(),
            ));
        }
        tools.push(t.clone());
    }
    for (i, f) in array_field(obj, "functions")?
        .into_iter()
        .flatten()
        .enumerate()
    {
        if f.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err((
                format!("functions[{i}].name"),
                "must be a non-empty string".into(),
            ));
        }
        tools.push(serde_json::json!({"type": "function", "function": f}));
    }
    Ok(tools)
}
