//! OpenAI tool calling on chat completions: `tools` (and the deprecated `functions`),
//! `tool_choice` (`none`, `auto`, `required`, a named function; `function_call` of old),
//! `parallel_tool_calls`; the messages' `tool_calls` and `role: "tool"` results. `required` and
//! a named function are forced through a grammar (`tool_calls::forced_calls_grammar`: up to one
//! call per tool under `required` with parallel calls, else one), so their arguments always parse
//! and validate; `auto` lets the model choose, and its text is parsed.

use crate::error::ApiError;
use crate::openai::{ChatMessageIn, ChatRequest};
use serde_json::{json, Value};
use tandem_model::tool_calls::{forced_calls_grammar, ToolCall};

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools, checked.
#[derive(Debug)]
pub(crate) struct Tools {
    /// The tools as OpenAI objects, `{"type": "function", "function": {...}}`.
    offered: Vec<Value>,
    /// (name, parameters schema) of each.
    functions: Vec<(String, Value)>,
    pub choice: Choice,
    parallel: bool,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg, Some(param))
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A function object `{"name", "description"?, "parameters"?}` checked; `param` names it.
fn function(f: &Value, param: &str) -> Result<(String, Value), ApiError> {
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(param, format!("{param} needs a function name")))?;
    if !valid_name(name) {
        return Err(bad(
            param,
            format!("function name `{name}` must be 1-64 letters, digits, underscores or dashes"),
        ));
    }
    let params = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(bad(
                param,
                format!("the parameters of `{name}` must be a JSON schema object"),
            ))
        }
    };
    Ok((name.to_string(), params))
}

impl Tools {
    pub(crate) fn from_request(req: &ChatRequest) -> Result<Self, ApiError> {
        let mut offered = Vec::new();
        let mut functions = Vec::new();
        for (i, t) in req.tools.iter().flatten().enumerate() {
            let p = format!("tools[{i}]");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad("tools", format!("{p}.type must be \"function\"")));
            }
            let f = t
                .get("function")
                .ok_or_else(|| bad("tools", format!("{p}.function is missing")))?;
            let (name, params) = function(f, "tools")?;
            offered.push(json!({"type": "function", "function": f}));
            functions.push((name, params));
        }
        for f in req.functions.iter().flatten() {
            let (name, params) = function(f, "functions")?;
            offered.push(json!({"type": "function", "function": f}));
            functions.push((name, params));
        }
        let mut names: Vec<&str> = functions.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad("tools", format!("function `{}` is given twice", w[0])));
        }
        let (raw, param) = match (&req.tool_choice, &req.function_call) {
            (Some(c), _) => (Some(c), "tool_choice"),
            (None, Some(c)) => (Some(c), "function_call"),
            (None, None) => (None, "tool_choice"),
        };
        let choice = match raw {
            None | Some(Value::Null) if functions.is_empty() => Choice::None,
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(bad(
                        param,
                        format!(
                            "{param} `{other}` is not none, auto, required or a named function"
                        ),
                    ))
                }
            },
            Some(o @ Value::Object(_)) => {
                let name = o
                    .pointer("/function/name")
                    .or_else(|| o.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        bad(param, format!("{param} names a function as {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"))
                    })?;
                Choice::Named(name.to_string())
            }
            Some(_) => return Err(bad(param, format!("{param} must be a string or an object"))),
        };
        match &choice {
            Choice::Required | Choice::Named(_) if functions.is_empty() => {
                return Err(bad(param, format!("{param} needs tools to choose from")))
            }
            Choice::Named(n) if !functions.iter().any(|(f, _)| f == n) => {
                return Err(bad(
                    param,
                    format!("{param} names `{n}`, which is not among the tools"),
                ))
            }
            _ => {}
        }
        Ok(Self {
            offered,
            functions,
            choice,
            parallel: req.parallel_tool_calls.unwrap_or(true),
        })
    }

    /// The tools the prompt offers (none under `tool_choice: "none"`).
    pub(crate) fn rendered(&self) -> &[Value] {
        if self.choice == Choice::None {
            &[]
        } else {
            &self.offered
        }
    }

    /// How the output is read for tool calls.
    pub(crate) fn output(&self) -> crate::respond::ToolOutput {
        use crate::respond::ToolOutput;
        match self.choice {
            _ if self.functions.is_empty() => ToolOutput::Off,
            Choice::None => ToolOutput::Off,
            Choice::Auto => ToolOutput::Parse,
            Choice::Required | Choice::Named(_) => ToolOutput::Forced,
        }
    }

    /// The grammar that forces the calls (`required`, a named function).
    pub(crate) fn forced_grammar(&self) -> Option<String> {
        match &self.choice {
            // In parallel, up to one call per offered function.
            Choice::Required => Some(forced_calls_grammar(
                &self.functions,
                if self.parallel {
                    self.functions.len()
                } else {
                    1
                },
            )),
            Choice::Named(n) => {
                let f: Vec<(String, Value)> = self
                    .functions
                    .iter()
                    .filter(|(name, _)| name == n)
                    .cloned()
                    .collect();
                Some(forced_calls_grammar(&f, 1))
            }
            _ => None,
        }
    }
}

/// A message's `tool_calls` as calls; the error names the message.
pub(crate) fn message_calls(m: &ChatMessageIn, i: usize) -> Result<Vec<ToolCall>, ApiError> {
    let mut out = Vec::new();
    for (k, c) in m.tool_calls.iter().flatten().enumerate() {
        let p = format!("messages[{i}].tool_calls[{k}]");
        let name = c
            .pointer("/function/name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("messages", format!("{p}.function.name is missing")))?;
        let arguments = match c.pointer("/function/arguments") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => "{}".into(),
            Some(v) => v.to_string(),
        };
        let id = c
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(tandem_model::tool_calls::new_call_id);
        out.push(ToolCall {
            id,
            name: name.to_string(),
            arguments,
        });
    }
    if !out.is_empty() && m.role != "assistant" {
        return Err(bad(
            "messages",
            format!("messages[{i}] has tool_calls but is not an assistant message"),
        ));
    }
    Ok(out)
}
