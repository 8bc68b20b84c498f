//! Chat templates: the model's Jinja template (from tokenizer_config.json or GGUF metadata)
//! rendered with minijinja under the same settings as HF transformers, with `tools` and
//! structured tool calls for templates that take them.

use crate::error::{ModelError, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's function calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<crate::tool_calls::ToolCall>,
    /// A tool result's call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether the template reads `tools` (else tools are written into the messages).
    takes_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    pub fn new(source: String) -> Result<Self> {
        let takes_tools = source.contains("tools");
        let mut env = Environment::new();
        // HF transformers renders with trim_blocks and lstrip_blocks, and Python string methods.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_today(&fmt)
        });
        env.add_template_owned("chat", source)
            .map_err(|e| ModelError::ChatTemplate(format!("cannot parse: {e}")))?;
        Ok(Self { env, takes_tools })
    }

    /// Whether the template renders `tools`, tool calls and tool results itself.
    pub fn takes_tools(&self) -> bool {
        self.takes_tools
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        self.render_with_tools(messages, &[], add_generation_prompt, bos_token, eos_token)
    }

    /// `render`, offering `tools` (OpenAI tool objects) when there are any: to the template if
    /// it takes them, else written into the messages (`tool_calls::fallback_messages`).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let tpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        let tooled = !tools.is_empty()
            || messages
                .iter()
                .any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        let rendered = if !tooled {
            tpl.render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        } else if self.takes_tools {
            tpl.render(context! {
                messages => messages,
                tools => (!tools.is_empty()).then_some(tools),
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        } else {
            tpl.render(context! {
                messages => crate::tool_calls::fallback_messages(messages, tools),
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        };
        rendered.map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }
}

/// Today's UTC date in the few strftime codes chat templates use (%d %m %Y %b %B).
fn strftime_today(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const NAMES: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = NAMES[(month - 1) as usize];
    fmt.replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", name)
        .replace("%b", &name[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_python_methods() {
        let src = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(src.into()).unwrap();
        let out = t
            .render(&[ChatMessage::new("user", " hi ")], true, "", "")
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn templates_that_take_tools_get_them_and_structured_calls() {
        let src = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls %}[{{ c.function.name }}({{ c.function.arguments.city }}) {{ c.id }}]{% endfor %}{% if m.tool_call_id %}<{{ m.tool_call_id }}>{% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src.into()).unwrap();
        assert!(t.takes_tools());
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![crate::tool_calls::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        }];
        let mut result = ChatMessage::new("tool", "18C");
        result.tool_call_id = Some("call_1".into());
        let tools = [serde_json::json!({"type": "function", "function": {"name": "get_weather"}})];
        let out = t
            .render_with_tools(
                &[ChatMessage::new("user", "weather?"), call, result],
                &tools,
                false,
                "",
                "",
            )
            .unwrap();
        // Arguments reach the template as an object, as HF transformers passes them (newlines
        // after block tags go: trim_blocks).
        assert_eq!(
            out,
            "TOOLS:get_weather;user: weather?assistant: [get_weather(Paris) call_1]tool: 18C<call_1>"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}".into()).unwrap();
        let err = t.render(&[], false, "", "").unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }
}
