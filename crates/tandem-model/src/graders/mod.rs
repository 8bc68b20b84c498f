//! OpenAI's graders (reinforcement fine-tuning, `/v1/fine_tuning/alpha/graders/*`): parsed and
//! checked (`Grader::parse`, errors naming the field), then run on a sample and its item:
//! - `string_check`: `input` against `reference` by `operation` eq / ne / like (contains) /
//!   ilike (contains, case-insensitive): 1 or 0;
//! - `text_similarity`: `input` against `reference` by `evaluation_metric` (`similarity.rs`);
//! - `score_model`: a model served by this server asked with the grader's messages; the first
//!   number in its answer, clamped to `range` (the caller runs the model: `ModelCall`);
//! - `multi`: named sub-graders combined by `calculate_output` (`formula.rs`).
//!
//! Strings may hold `{{item.<path>}}` (the training line's fields), `{{sample.output_text}}`
//! and `{{sample.output_json.<path>}}`. `python` graders are refused: no user code runs in the
//! server.

pub mod formula;
pub mod porter;
pub mod similarity;

use serde_json::Value;
use std::collections::BTreeMap;

/// A checked grader.
#[derive(Debug, Clone, PartialEq)]
pub enum Grader {
    StringCheck {
        name: String,
        input: String,
        reference: String,
        operation: String,
    },
    TextSimilarity {
        name: String,
        input: String,
        reference: String,
        metric: String,
    },
    ScoreModel {
        name: String,
        model: String,
        /// Messages (`role`, `content` with templates).
        input: Vec<(String, String)>,
        range: (f64, f64),
        sampling_params: Value,
    },
    Multi {
        name: String,
        graders: BTreeMap<String, Grader>,
        formula: formula::Expr,
    },
}

/// (field, message).
pub type FieldError = (String, String);

/// Runs a served model for `score_model`: (model, messages as (role, content), sampling
/// params) → its answer.
pub trait ModelCall {
    fn call(
        &self,
        model: &str,
        messages: &[(String, String)],
        params: &Value,
    ) -> Result<String, String>;
}

/// What a `score_model` call runs: the messages through the chat template, tokenized, and the
/// grader's `sampling_params` (greedy, 64 tokens unless they say otherwise; at most 1024).
pub fn score_model_request(
    tok: &crate::tokenizer::TextTokenizer,
    messages: &[(String, String)],
    params: &Value,
) -> Result<(Vec<u32>, crate::sampling::SamplingParams), String> {
    let msgs: Vec<crate::chat_template::ChatMessage> = messages
        .iter()
        .map(|(r, c)| crate::chat_template::ChatMessage::new(r.clone(), c.clone()))
        .collect();
    let text = tok
        .apply_chat_template(&msgs, true)
        .map_err(|e| e.to_string())?;
    let prompt = tok.encode(&text, false).map_err(|e| e.to_string())?;
    let num = |k: &str| params.get(k).and_then(Value::as_f64);
    let sampling = crate::sampling::SamplingParams {
        max_tokens: num("max_completions_tokens")
            .or(num("max_tokens"))
            .map_or(64, |m| (m as usize).clamp(1, 1024)),
        temperature: num("temperature").unwrap_or(0.0) as f32,
        top_p: num("top_p").unwrap_or(1.0) as f32,
        seed: params.get("seed").and_then(Value::as_u64),
        ..Default::default()
    };
    Ok((prompt, sampling))
}

/// A grader's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Grade {
    pub reward: f64,
    /// Per sub-grader of a `multi`, by name.
    pub sub_rewards: BTreeMap<String, f64>,
}

fn text(o: &serde_json::Map<String, Value>, key: &str, at: &str) -> Result<String, FieldError> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err((format!("{at}{key}"), "is missing".into())),
        Some(_) => Err((format!("{at}{key}"), "must be a string".into())),
    }
}

/// Checks every `{{...}}` of `s` names `item.*` or `sample.output_text` / `sample.output_json.*`.
fn check_template(s: &str, field: &str) -> Result<(), FieldError> {
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        let Some(j) = rest[i..].find("}}") else {
            return Err((field.into(), "has a `{{` without `}}`".into()));
        };
        let var = rest[i + 2..i + j].trim();
        let ok = var.starts_with("item.")
            || var == "sample.output_text"
            || var.starts_with("sample.output_json.")
            || var == "sample.output_json";
        if !ok {
            return Err((
                field.into(),
                format!("`{{{{{var}}}}}`: templates read `item.<field>`, `sample.output_text` or `sample.output_json.<field>`"),
            ));
        }
        rest = &rest[i + j + 2..];
    }
    Ok(())
}

/// `s` with its templates filled from the sample and the item.
pub fn render(s: &str, sample: &str, item: &Value) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let j = rest[i..]
            .find("}}")
            .ok_or_else(|| "a `{{` without `}}`".to_string())?;
        let var = rest[i + 2..i + j].trim();
        let value = if var == "sample.output_text" {
            Value::String(sample.to_string())
        } else {
            let (root, path) = match var.strip_prefix("item.") {
                Some(p) => (item.clone(), p),
                None => {
                    let json: Value = serde_json::from_str(sample)
                        .map_err(|_| format!("`{{{{{var}}}}}`: the sample is not JSON"))?;
                    (
                        json,
                        var.strip_prefix("sample.output_json")
                            .unwrap_or("")
                            .trim_start_matches('.'),
                    )
                }
            };
            path.split('.')
                .filter(|k| !k.is_empty())
                .try_fold(root, |v, k| v.get(k).cloned())
                .ok_or_else(|| format!("`{{{{{var}}}}}`: no such field"))?
        };
        match value {
            Value::String(s) => out.push_str(&s),
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[i + j + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Grader {
    /// Checks a grader object (`at` prefixes field names, e.g. `grader.`).
    pub fn parse(v: &Value, at: &str) -> Result<Grader, FieldError> {
        let Value::Object(o) = v else {
            return Err((
                at.trim_end_matches('.').to_string(),
                "must be an object".into(),
            ));
        };
        let kind = text(o, "type", at)?;
        let name = match o.get("name") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => kind.clone(),
            Some(_) => return Err((format!("{at}name"), "must be a string".into())),
        };
        let templ = |key: &str| -> Result<String, FieldError> {
            let s = text(o, key, at)?;
            check_template(&s, &format!("{at}{key}"))?;
            Ok(s)
        };
        match kind.as_str() {
            "string_check" => {
                let operation = text(o, "operation", at)?;
                if !["eq", "ne", "like", "ilike"].contains(&operation.as_str()) {
                    return Err((format!("{at}operation"), format!("`{operation}`: one of eq, ne, like, ilike")));
                }
                Ok(Grader::StringCheck { name, input: templ("input")?, reference: templ("reference")?, operation })
            }
            "text_similarity" => {
                let metric = text(o, "evaluation_metric", at)?;
                if !similarity::METRICS.contains(&metric.as_str()) {
                    let why = match metric.as_str() {
                        "cosine" => "is not supported by tandem yet (it needs an embedding model)",
                        _ => "is not a metric",
                    };
                    return Err((
                        format!("{at}evaluation_metric"),
                        format!("`{metric}` {why} (supported: {})", similarity::METRICS.join(", ")),
                    ));
                }
                Ok(Grader::TextSimilarity { name, input: templ("input")?, reference: templ("reference")?, metric })
            }
            "score_model" => {
                let model = text(o, "model", at)?;
                let Some(Value::Array(msgs)) = o.get("input") else {
                    return Err((format!("{at}input"), "must be an array of messages".into()));
                };
                let mut input = Vec::new();
                for (i, m) in msgs.iter().enumerate() {
                    let f = format!("{at}input[{i}].");
                    let Value::Object(mo) = m else {
                        return Err((format!("{at}input[{i}]"), "must be a message object".into()));
                    };
                    let role = text(mo, "role", &f)?;
                    let content = text(mo, "content", &f)?;
                    check_template(&content, &format!("{f}content"))?;
                    input.push((role, content));
                }
                let range = match o.get("range") {
                    None | Some(Value::Null) => (0.0, 1.0),
                    Some(Value::Array(r)) if r.len() == 2 => match (r[0].as_f64(), r[1].as_f64()) {
                        (Some(a), Some(b)) if a < b => (a, b),
                        _ => return Err((format!("{at}range"), "must be [low, high] with low < high".into())),
                    },
                    Some(_) => return Err((format!("{at}range"), "must be [low, high]".into())),
                };
                let sampling_params = o.get("sampling_params").cloned().unwrap_or(Value::Null);
                Ok(Grader::ScoreModel { name, model, input, range, sampling_params })
            }
            "multi" => {
                let Some(Value::Object(gs)) = o.get("graders") else {
                    return Err((format!("{at}graders"), "must be an object of named graders".into()));
                };
                let mut graders = BTreeMap::new();
                for (k, g) in gs {
                    graders.insert(k.clone(), Grader::parse(g, &format!("{at}graders.{k}."))?);
                }
                let f = text(o, "calculate_output", at)?;
                let formula = formula::parse(&f).map_err(|e| (format!("{at}calculate_output"), e))?;
                let mut vars = Vec::new();
                formula.vars(&mut vars);
                if let Some(v) = vars.iter().find(|v| !graders.contains_key(*v)) {
                    return Err((format!("{at}calculate_output"), format!("names `{v}`, which is not one of the graders")));
                }
                Ok(Grader::Multi { name, graders, formula })
            }
            "python" => Err((
                format!("{at}type"),
                "python graders are not supported: no user code runs in the server (use string_check, text_similarity, score_model or multi)".into(),
            )),
            other => Err((format!("{at}type"), format!("`{other}` is not a grader type (string_check, text_similarity, score_model, multi)"))),
        }
    }

    /// The models `score_model` graders (here or inside a `multi`) ask.
    pub fn models(&self, out: &mut Vec<String>) {
        match self {
            Grader::ScoreModel { model, .. } => out.push(model.clone()),
            Grader::Multi { graders, .. } => graders.values().for_each(|g| g.models(out)),
            _ => {}
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Grader::StringCheck { name, .. }
            | Grader::TextSimilarity { name, .. }
            | Grader::ScoreModel { name, .. }
            | Grader::Multi { name, .. } => name,
        }
    }

    /// The grader's reward for `sample` on `item`.
    pub fn grade(
        &self,
        sample: &str,
        item: &Value,
        model: &dyn ModelCall,
    ) -> Result<Grade, String> {
        let one = |reward| Grade {
            reward,
            sub_rewards: BTreeMap::new(),
        };
        match self {
            Grader::StringCheck {
                input,
                reference,
                operation,
                ..
            } => {
                let (a, b) = (
                    render(input, sample, item)?,
                    render(reference, sample, item)?,
                );
                let hit = match operation.as_str() {
                    "eq" => a == b,
                    "ne" => a != b,
                    "like" => a.contains(&b),
                    _ => a.to_lowercase().contains(&b.to_lowercase()),
                };
                Ok(one(if hit { 1.0 } else { 0.0 }))
            }
            Grader::TextSimilarity {
                input,
                reference,
                metric,
                ..
            } => {
                let (a, b) = (
                    render(input, sample, item)?,
                    render(reference, sample, item)?,
                );
                similarity::score(metric, &a, &b)
                    .map(one)
                    .ok_or_else(|| format!("unknown metric `{metric}`"))
            }
            Grader::ScoreModel {
                model: m,
                input,
                range,
                sampling_params,
                ..
            } => {
                let msgs = input
                    .iter()
                    .map(|(r, c)| Ok((r.clone(), render(c, sample, item)?)))
                    .collect::<Result<Vec<_>, String>>()?;
                let answer = model.call(m, &msgs, sampling_params)?;
                Ok(one(first_number(&answer)
                    .unwrap_or(range.0)
                    .clamp(range.0, range.1)))
            }
            Grader::Multi {
                graders, formula, ..
            } => {
                let mut sub = BTreeMap::new();
                for (k, g) in graders {
                    sub.insert(k.clone(), g.grade(sample, item, model)?.reward);
                }
                let reward = formula.eval(&|v| sub.get(v).copied())?;
                Ok(Grade {
                    reward,
                    sub_rewards: sub,
                })
            }
        }
    }
}

/// The first decimal number in `s` (a score model's answer).
fn first_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let neg = b[i] == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit);
        if b[i].is_ascii_digit() || neg {
            let start = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            return s[start..i].trim_end_matches('.').parse().ok();
        }
        i += 1;
    }
    None
}
