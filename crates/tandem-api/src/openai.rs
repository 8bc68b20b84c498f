//! OpenAI request shapes (the fields tandem reads; others are ignored, as OpenAI's clients send
//! many) and their validation into engine sampling parameters.

use crate::error::ApiError;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use tandem_model::SamplingParams;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, texts, token ids, or lists of token ids (as OpenAI and vLLM take).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by completions and chat completions.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<u64>,
    pub stop: Option<StringOrList>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// vLLM's extension (1 = off).
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string key) → bias in -100..=100.
    pub logit_bias: Option<HashMap<String, f64>>,
    /// vLLM's extensions: min-p sampling, stop token ids, a minimum of generated tokens.
    pub min_p: Option<f64>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub min_tokens: Option<u64>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u64>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM's extension: logprobs name tokens as `token_id:{id}`.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    /// vLLM's extension: requests with different salts never share prefix-cache blocks.
    pub cache_salt: Option<String>,
    /// Structured output, OpenAI's way: `{"type": "text" | "json_object" | "json_schema"}`.
    pub response_format: Option<Value>,
    /// vLLM's: `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`.
    pub structured_outputs: Option<Value>,
    /// vLLM's older fields.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(default)]
    pub echo: bool,
    pub best_of: Option<u64>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl CompletionRequest {
    /// 400 for what tandem cannot do rather than a silent default.
    pub fn check_supported(&self) -> Result<(), ApiError> {
        let n = self.sampling.n.unwrap_or(1);
        if let Some(b) = self.best_of.filter(|&b| b != n) {
            return Err(ApiError::invalid(
                format!("best_of is not supported (got {b} with n = {n}); omit it or set it to n"),
                Some("best_of"),
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "suffix (insertion) is not supported",
                Some("suffix"),
            ));
        }
        if self.echo && !matches!(self.sampling.logprobs, None | Some(Value::Null)) {
            return Err(ApiError::invalid(
                "echo with logprobs (the prompt's logprobs) is not supported; use echo or logprobs",
                Some("echo"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Value>,
    /// An assistant's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    pub tool_calls: Option<Vec<Value>>,
    /// A tool result's call.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// OpenAI's deprecated forms of `tools` and `tool_choice`.
    pub functions: Option<Vec<Value>>,
    pub function_call: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// vLLM's `POST /tokenize`: a prompt (completions) or messages (chat template applied).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Tools offered with the messages (as a chat request offers them).
    pub tools: Option<Vec<Value>>,
    pub add_special_tokens: Option<bool>,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

/// vLLM's `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct LoadAdapterRequest {
    pub lora_name: String,
    pub lora_path: String,
}

#[derive(Debug, Deserialize)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}

/// Parses a JSON body into `T`, with a 400 that says what is wrong.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        // serde names the missing or mistyped field in backticks.
        let param = msg.split('`').nth(1).map(str::to_string);
        ApiError::invalid(format!("Invalid request body: {msg}"), param.as_deref())
    })
}

impl Sampling {
    /// Engine parameters, or a 400 naming the parameter. `default_max_tokens` applies when the
    /// request sets none (16 for completions, as OpenAI; the room left for chat).
    /// `vocab`: the model's vocabulary size (the range of logit_bias's tokens).
    pub fn to_params(
        &self,
        default_max_tokens: usize,
        chat: bool,
        vocab: usize,
    ) -> Result<SamplingParams, ApiError> {
        let bad = |p: &str, m: String| Err(ApiError::invalid(m, Some(p)));
        if self.cache_salt.as_deref().is_some_and(str::is_empty) {
            return bad("cache_salt", "cache_salt must be a non-empty string".into());
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => return bad("max_tokens", "max_tokens must be at least 1".into()),
            Some(m) => m as usize,
            None => default_max_tokens,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return bad(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            );
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return bad("top_p", format!("top_p must be in (0, 1], got {top_p}"));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return bad(
                    "top_k",
                    format!("top_k must be -1 (off) or positive, got {k}"),
                )
            }
        };
        for (p, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v.filter(|v| !(-2.0..=2.0).contains(v)) {
                return bad(p, format!("{p} must be between -2 and 2, got {v}"));
            }
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!("repetition_penalty must be a positive number, got {repetition_penalty}"),
            );
        }
        let mut logit_bias = Vec::new();
        for (k, &b) in self.logit_bias.iter().flatten() {
            let t = match k.trim().parse::<u32>() {
                Ok(t) if (t as usize) < vocab => t,
                _ => {
                    return bad(
                        "logit_bias",
                        format!("logit_bias keys must be token ids below {vocab}, got `{k}`"),
                    )
                }
            };
            if !(-100.0..=100.0).contains(&b) {
                return bad(
                    "logit_bias",
                    format!(
                        "logit_bias values must be between -100 and 100, got {b} for token {t}"
                    ),
                );
            }
            logit_bias.push((t, b as f32));
        }
        logit_bias.sort_by_key(|&(t, _)| t);
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return bad(
                "min_p",
                format!("min_p must be between 0 and 1, got {min_p}"),
            );
        }
        let stop_token_ids = self.stop_token_ids.clone().unwrap_or_default();
        if let Some(t) = stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return bad(
                "stop_token_ids",
                format!("stop_token_ids must be token ids below {vocab}, got {t}"),
            );
        }
        let min_tokens = self.min_tokens.unwrap_or(0) as usize;
        if min_tokens > max_tokens {
            return bad(
                "min_tokens",
                format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"),
            );
        }
        let logprobs = self.logprobs_wanted(chat)?;
        let stop = self.stop.as_ref().map(|s| match s {
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::Many(v) => v.clone(),
        });
        let stop = stop.unwrap_or_default();
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return bad("stop", "stop takes up to 4 non-empty strings".into());
        }
        Ok(SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed: self.seed,
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos,
            logprobs,
            presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            repetition_penalty: repetition_penalty as f32,
            logit_bias,
            min_p: min_p as f32,
            stop_token_ids,
            min_tokens,
            end_token_ids: Vec::new(),
            grammar: None,
        })
    }

    /// Completions: `logprobs` is a number of alternatives (0-5). Chat: `logprobs: true`, with
    /// `top_logprobs` alternatives (0-20).
    fn logprobs_wanted(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let bad = |p: &str, m: &str| Err(ApiError::invalid(m, Some(p)));
        match (chat, &self.logprobs) {
            (_, None | Some(Value::Null)) | (true, Some(Value::Bool(false))) => {
                if chat && self.top_logprobs.is_some_and(|t| t > 0) {
                    return bad("top_logprobs", "top_logprobs needs logprobs: true");
                }
                Ok(None)
            }
            (true, Some(Value::Bool(true))) => match self.top_logprobs.unwrap_or(0) {
                t @ 0..=20 => Ok(Some(t as usize)),
                _ => bad("top_logprobs", "top_logprobs must be between 0 and 20"),
            },
            (false, Some(v)) => match v.as_u64() {
                Some(k @ 0..=5) => Ok(Some(k as usize)),
                _ => bad("logprobs", "logprobs must be an integer between 0 and 5"),
            },
            (true, Some(_)) => bad("logprobs", "logprobs must be true or false"),
        }
    }

    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n @ 1..=16) => Ok(n as usize),
            Some(n) => Err(ApiError::invalid(
                format!("n must be between 1 and 16, got {n}"),
                Some("n"),
            )),
        }
    }
}

/// The text of a chat message's content: a string, or a list of `{"type": "text", "text"}` parts.
pub fn content_text(v: &Option<Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            "only text content parts are supported",
                            Some("messages"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid(
            "message content must be a string or a list of text parts",
            Some("messages"),
        )),
    }
}
