//! Tool calls in text, both ways, the same for serving and for fine-tuning.
//!
//! The format (Hermes', which Qwen 2.5's chat template writes too): a call is
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, a tool's result goes back as
//! `<tool_response>\n...\n</tool_response>` in a user turn. For chat templates that do not take
//! `tools` themselves (SmolLM2's), `fallback_messages` writes the tool list into the system
//! prompt and the calls and results into message text; templates that do take `tools` get
//! them, and structured messages, as HF transformers passes them. `ToolCallParser` reads calls
//! back out of generated text, piece by piece (streaming) or at once; both give the same pieces.

use crate::chat_template::ChatMessage;
use serde::ser::SerializeMap;
use serde_json::{json, Value};

pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// One call of a function: its id, name and JSON arguments (as text, as OpenAI sends them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl serde::Serialize for ToolCall {
    /// HF's shape for chat templates: arguments as an object when they parse.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let args: Value =
            serde_json::from_str(&self.arguments).unwrap_or(Value::String(self.arguments.clone()));
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("type", "function")?;
        m.serialize_entry("function", &json!({"name": self.name, "arguments": args}))?;
        m.end()
    }
}

impl ToolCall {
    /// The call as the model writes it, in the layout the forced-call grammar writes:
    /// `{"name": "f", "arguments": {"x": 1}}` (arguments in their own key order).
    pub fn to_text(&self) -> String {
        let name = Value::String(self.name.clone());
        let args = spaced_json(&self.arguments)
            .unwrap_or_else(|| Value::String(self.arguments.clone()).to_string());
        format!("{CALL_OPEN}\n{{\"name\": {name}, \"arguments\": {args}}}\n{CALL_CLOSE}")
    }
}

/// `text` (if it is JSON) laid out as Python's `json.dumps` does (`", "` and `": "`, no other
/// whitespace), keys in their order.
pub fn spaced_json(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_str, mut escaped) = (false, false);
    for c in text.trim().chars() {
        if in_str {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push(c);
            }
            ',' => out.push_str(", "),
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// A fresh OpenAI-style call id.
pub fn new_call_id() -> String {
    format!("call_{}", &uuid_like()[..24])
}

fn uuid_like() -> String {
    use rand::Rng;
    let mut r = rand::rng();
    (0..32)
        .map(|_| {
            let c = r.random_range(0..36u8);
            (if c < 10 { b'0' + c } else { b'a' + c - 10 }) as char
        })
        .collect()
}

/// The system-prompt block that offers `tools` (OpenAI tool objects) to a model whose template
/// does not render them.
pub fn tools_prompt(tools: &[Value]) -> String {
    let list: Vec<String> = tools.iter().map(Value::to_string).collect();
    format!(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        list.join("\n")
    )
}

/// Messages with tools, calls and results written as text, for templates without `tools`:
/// the tool block joins the system prompt (or opens one), an assistant's calls follow its
/// content, each tool result becomes a user turn.
pub fn fallback_messages(messages: &[ChatMessage], tools: &[Value]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let block = (!tools.is_empty()).then(|| tools_prompt(tools));
    let mut rest = messages;
    if let Some(block) = block {
        match messages.first() {
            Some(m) if m.role == "system" => {
                let content = if m.content.is_empty() {
                    block
                } else {
                    format!("{}\n\n{block}", m.content)
                };
                out.push(ChatMessage::new("system", content));
                rest = &messages[1..];
            }
            _ => out.push(ChatMessage::new("system", block)),
        }
    }
    for m in rest {
        if m.role == "tool" {
            out.push(ChatMessage::new(
                "user",
                format!("<tool_response>\n{}\n</tool_response>", m.content),
            ));
        } else if !m.tool_calls.is_empty() {
            let mut parts: Vec<String> = Vec::new();
            if !m.content.is_empty() {
                parts.push(m.content.clone());
            }
            parts.extend(m.tool_calls.iter().map(ToolCall::to_text));
            out.push(ChatMessage::new(m.role.clone(), parts.join("\n")));
        } else {
            out.push(ChatMessage::new(m.role.clone(), m.content.clone()));
        }
    }
    out
}

/// What a piece of generated text is.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    /// A complete call: its function's name and its arguments as JSON text.
    Call {
        name: String,
        arguments: String,
    },
    /// Streaming: a call's name, as soon as it is written (`{"name": "f", "arguments": ` seen)...
    CallStart {
        name: String,
    },
    /// ...then its arguments' text as it comes...
    Args(String),
    /// ...and its end.
    CallEnd,
}

/// Pieces with each streamed call (`CallStart`, `Args`..., `CallEnd`) as one `Call`.
pub fn fold(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out = Vec::with_capacity(pieces.len());
    let mut open: Option<(String, String)> = None;
    for p in pieces {
        match p {
            Piece::CallStart { name } => open = Some((name, String::new())),
            Piece::Args(a) => {
                if let Some((_, args)) = &mut open {
                    args.push_str(&a);
                }
            }
            Piece::CallEnd => {
                if let Some((name, arguments)) = open.take() {
                    out.push(Piece::Call { name, arguments });
                }
            }
            other => out.push(other),
        }
    }
    if let Some((name, arguments)) = open {
        out.push(Piece::Call { name, arguments });
    }
    out
}

/// Where a call's arguments object ends, read as it arrives (strings and escapes respected).
#[derive(Debug, Default, Clone)]
struct ArgScan {
    depth: usize,
    in_str: bool,
    escaped: bool,
    done: bool,
}

impl ArgScan {
    /// How many bytes of `text` belong to the arguments (all, unless they end inside it).
    fn feed(&mut self, text: &str) -> usize {
        for (i, c) in text.char_indices() {
            if self.in_str {
                match (self.escaped, c) {
                    (true, _) => self.escaped = false,
                    (false, '\\') => self.escaped = true,
                    (false, '"') => self.in_str = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => self.in_str = true,
                '{' | '[' => self.depth += 1,
                '}' | ']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.done = true;
                        return i + 1;
                    }
                }
                _ => {}
            }
        }
        text.len()
    }
}

/// `{"name": "<name>", "arguments": ` (or `"parameters"`) before an object: the name and the
/// header's length, once all of it has arrived.
fn call_header(buf: &str) -> Option<(String, usize)> {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(r#"^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*\{"#)
            .expect("a valid regex")
    });
    let m = re.captures(buf)?;
    let name: String = serde_json::from_str(m.get(1)?.as_str()).ok()?;
    Some((name, m.get(0)?.end() - 1))
}

/// Reads tool calls out of generated text as it arrives. Content outside calls is passed on,
/// but for text that may still open a call, whitespace at the start and after a call, and
/// trailing whitespace (given back only when more content follows).
#[derive(Debug, Default, Clone)]
pub struct ToolCallParser {
    buf: String,
    in_call: bool,
    /// Whitespace held back: it is content only if content follows.
    ws: String,
    /// Whether anything (content or call) has been given out.
    started: bool,
    calls: usize,
    /// The call whose arguments are being streamed.
    args: Option<ArgScan>,
}

/// `{"name": ..., "arguments": {...}}` (or `"parameters"`, as Llama 3.1 writes) as a call; the
/// arguments as the model wrote them (a JSON string holding them is unwrapped).
fn read_call(json_text: &str) -> Option<Piece> {
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        name: String,
        #[serde(borrow, alias = "parameters")]
        arguments: Option<&'a serde_json::value::RawValue>,
    }
    let raw: Raw = serde_json::from_str(json_text.trim()).ok()?;
    let arguments = match raw.arguments.map(|r| r.get()) {
        None => "{}".to_string(),
        Some(a) if a.starts_with('"') => serde_json::from_str::<String>(a).ok()?,
        Some(a) => a.to_string(),
    };
    Some(Piece::Call {
        name: raw.name,
        arguments,
    })
}

impl ToolCallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many calls were read.
    pub fn calls(&self) -> usize {
        self.calls
    }

    fn content(&mut self, text: &str, out: &mut Vec<Piece>) {
        if text.is_empty() {
            return;
        }
        let trimmed = text.trim_end();
        let (body, tail) = text.split_at(trimmed.len());
        if body.is_empty() {
            // Whitespace only: held, unless nothing was said yet (leading whitespace goes).
            if self.started {
                self.ws.push_str(tail);
            }
            return;
        }
        let mut s = std::mem::take(&mut self.ws);
        s.push_str(if self.started {
            body
        } else {
            body.trim_start()
        });
        if !s.is_empty() {
            out.push(Piece::Content(s));
            self.started = true;
        }
        self.ws.push_str(tail);
    }

    /// Adds generated text; returns the pieces it completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let close = self.buf.find(CALL_CLOSE);
                if let Some(scan) = &mut self.args {
                    if !scan.done {
                        // Arguments up to a close tag; a tail that may start one waits.
                        let limit = close.unwrap_or_else(|| {
                            self.buf.len() - partial_suffix(&self.buf, CALL_CLOSE)
                        });
                        let n = scan.feed(&self.buf[..limit]);
                        if n > 0 {
                            out.push(Piece::Args(self.buf[..n].to_string()));
                            self.buf.drain(..n);
                        }
                        if !scan.done && close.is_none() {
                            break;
                        }
                    }
                    let Some(end) = self.buf.find(CALL_CLOSE) else {
                        break;
                    };
                    self.buf.drain(..end + CALL_CLOSE.len());
                    self.in_call = false;
                    self.args = None;
                    out.push(Piece::CallEnd);
                    continue;
                }
                if let Some((name, len)) = call_header(&self.buf) {
                    self.buf.drain(..len);
                    self.args = Some(ArgScan::default());
                    // Whitespace between calls, or before the first, is no content.
                    self.ws.clear();
                    self.started = true;
                    self.calls += 1;
                    out.push(Piece::CallStart { name });
                    continue;
                }
                let Some(end) = close else {
                    break;
                };
                let body: String = self.buf[..end].to_string();
                self.buf.drain(..end + CALL_CLOSE.len());
                self.in_call = false;
                self.emit_call(&body, true, &mut out);
            } else if let Some(start) = self.buf.find(CALL_OPEN) {
                let before: String = self.buf[..start].to_string();
                self.content(&before, &mut out);
                self.buf.drain(..start + CALL_OPEN.len());
                self.in_call = true;
            } else {
                // Keep back the longest tail that could start `<tool_call>`.
                let keep = partial_suffix(&self.buf, CALL_OPEN);
                let cut = self.buf.len() - keep;
                let text: String = self.buf[..cut].to_string();
                self.buf.drain(..cut);
                self.content(&text, &mut out);
                break;
            }
        }
        out
    }

    fn emit_call(&mut self, body: &str, closed: bool, out: &mut Vec<Piece>) {
        match read_call(body) {
            Some(call) => {
                // Whitespace between calls, or before the first, is no content.
                self.ws.clear();
                self.started = true;
                self.calls += 1;
                out.push(call);
            }
            None => {
                let raw = format!("{CALL_OPEN}{body}{}", if closed { CALL_CLOSE } else { "" });
                self.content(&raw, out);
            }
        }
    }

    /// The end of the text: an unclosed call that parses is a call; anything else held is
    /// content (trailing whitespace is dropped).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        if let Some(scan) = self.args.take() {
            // Cut off while streaming the arguments (or before the close tag): what came of
            // the arguments is the call's.
            self.in_call = false;
            if !scan.done && !rest.is_empty() {
                out.push(Piece::Args(rest));
            }
            out.push(Piece::CallEnd);
        } else if self.in_call {
            self.in_call = false;
            self.emit_call(&rest, false, &mut out);
        } else {
            self.content(&rest, &mut out);
        }
        self.ws.clear();
        out
    }

    /// All pieces of a whole text, each call as one `Call`.
    pub fn parse(text: &str) -> Vec<Piece> {
        let mut p = Self::new();
        let mut out = p.push(text);
        out.extend(p.finish());
        fold(out)
    }
}

/// The length of the longest tail of `buf` that `marker` starts with (shorter than `marker`).
fn partial_suffix(buf: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .find(|&k| {
            buf.len() >= k
                && buf.is_char_boundary(buf.len() - k)
                && marker.starts_with(&buf[buf.len() - k..])
        })
        .unwrap_or(0)
}

/// The Lark grammar that forces tool calls: one to `max_calls` calls of the named functions,
/// each `{"name": <that name>, "arguments": <its parameters' schema>}`, a newline between two.
/// `tools`: (name, parameters schema) pairs. A bound, because a small model under a grammar
/// that allows another call tends to repeat the last one until max_tokens.
pub fn forced_calls_grammar(tools: &[(String, Value)], max_calls: usize) -> String {
    let mut lark = String::new();
    let alts: Vec<String> = (1..=max_calls.max(1))
        .map(|n| vec!["call"; n].join(" \"\\n\" "))
        .collect();
    lark.push_str(&format!("start: {}\n", alts.join(" | ")));
    let alts: Vec<String> = (0..tools.len()).map(|i| format!("fn_{i}")).collect();
    lark.push_str(&format!(
        "call: \"<tool_call>\\n\" ({}) \"\\n</tool_call>\"\n",
        alts.join(" | ")
    ));
    for (i, (name, params)) in tools.iter().enumerate() {
        let params = if params.is_object() {
            params.clone()
        } else {
            json!({"type": "object"})
        };
        let schema = crate::grammar::layout_schema(
            &json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
            }),
            false,
        );
        lark.push_str(&format!("fn_{i}: %json {schema}\n"));
    }
    lark
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> Piece {
        Piece::Call {
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn calls_and_content_come_apart() {
        let text = "  Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>\n";
        assert_eq!(
            ToolCallParser::parse(text),
            [
                Piece::Content("Let me check.".into()),
                call("get_weather", r#"{"city": "Paris"}"#),
                call("time", "{}"),
            ]
        );
    }

    #[test]
    fn streamed_pieces_equal_the_whole() {
        let text = "Hi <tool <tool_call>{\"name\": \"f\", \"parameters\": {\"x\": 1}}</tool_call> bye <tool_call>not json</tool_call>";
        let whole = ToolCallParser::parse(text);
        for step in [1, 2, 3, 5, 11] {
            let mut p = ToolCallParser::new();
            let mut pieces = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for c in chars.chunks(step) {
                pieces.extend(p.push(&c.iter().collect::<String>()));
            }
            pieces.extend(p.finish());
            let pieces = fold(pieces);
            // Content may arrive in more pieces: compare the joined content and the calls.
            let join = |ps: &[Piece]| {
                let mut out: Vec<Piece> = Vec::new();
                for piece in ps {
                    match (out.last_mut(), piece) {
                        (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(b),
                        _ => out.push(piece.clone()),
                    }
                }
                out
            };
            assert_eq!(join(&pieces), join(&whole), "step {step}");
        }
        assert_eq!(
            whole,
            [
                // Whitespace before a call is no content.
                Piece::Content("Hi <tool".into()),
                call("f", r#"{"x": 1}"#),
                Piece::Content(" bye".into()),
                // Text that is no call stays content.
                Piece::Content(" <tool_call>not json</tool_call>".into()),
            ]
        );
    }

    #[test]
    fn a_call_streams_its_name_first_then_its_arguments() {
        let mut p = ToolCallParser::new();
        let mut got = Vec::new();
        for piece in [
            "<tool_call>\n{\"name\": \"get_",
            "weather\", \"arguments\": {\"city\": \"Pa",
            "ris}\\\"\"}",
            "}\n</tool",
            "_call>",
        ] {
            got.push(p.push(piece));
        }
        got.push(p.finish());
        assert_eq!(
            got,
            vec![
                vec![],
                vec![
                    Piece::CallStart {
                        name: "get_weather".into()
                    },
                    Piece::Args(r#"{"city": "Pa"#.into())
                ],
                // A brace inside a string does not end the arguments.
                vec![Piece::Args(r#"ris}\""}"#.into())],
                vec![],
                vec![Piece::CallEnd],
                vec![],
            ]
        );
    }

    #[test]
    fn an_unclosed_call_that_parses_counts() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}}";
        assert_eq!(ToolCallParser::parse(text), [call("f", r#"{"a": [1, 2]}"#)]);
        assert_eq!(
            ToolCallParser::parse("<tool_call>{\"na"),
            [Piece::Content("<tool_call>{\"na".into())]
        );
    }

    #[test]
    fn fallback_rendering_writes_tools_calls_and_results_as_text() {
        let tools = vec![json!({"type": "function", "function": {"name": "f"}})];
        let mut asst = ChatMessage::new("assistant", "");
        asst.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: r#"{"y":"a, b:c","x":1}"#.into(),
        }];
        let mut result = ChatMessage::new("tool", "42");
        result.tool_call_id = Some("call_1".into());
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "go"),
            asst,
            result,
        ];
        let out = fallback_messages(&msgs, &tools);
        assert_eq!(out.len(), 4);
        assert!(out[0].content.starts_with("Be brief.\n\n# Tools"));
        assert!(
            out[0].content.contains(r#""name":"f""#),
            "{}",
            out[0].content
        );
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"y\": \"a, b:c\", \"x\": 1}}\n</tool_call>"
        );
        assert_eq!(
            (out[3].role.as_str(), out[3].content.as_str()),
            ("user", "<tool_response>\n42\n</tool_response>")
        );
        // What the fallback writes, the parser reads back.
        assert_eq!(
            ToolCallParser::parse(&out[2].content),
            [call("f", r#"{"y": "a, b:c", "x": 1}"#)]
        );
    }
}
