//! What `POST /v1/fine_tuning/jobs` asks for, checked: OpenAI's `method` (`supervised`, `dpo`
//! or `reinforcement` with its grader, each with its hyperparameters, any of which may be
//! `"auto"`; the deprecated top-level `hyperparameters` too), tandem's `lora` shape, and the
//! training / validation files read as the method needs them (supervised examples, preference
//! pairs, or prompts), with errors that name the field, the line and the line's field.

use crate::error::ApiError;
use crate::tenants::Tenant;
use crate::AppState;
use serde::Deserialize;
use serde_json::Value;
use tandem_model::finetune::grpo::{Reinforce, DEFAULT_GROUP};
use tandem_model::finetune::{
    parse_record, preference_pairs, prompt_items, tokenize, FileKind, Hyperparameters, Method,
    Prompts, TrainData, DEFAULT_BETA,
};
use tandem_model::graders::Grader;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Hyper {
    n_epochs: Option<Value>,
    batch_size: Option<Value>,
    learning_rate_multiplier: Option<Value>,
    /// DPO only.
    beta: Option<Value>,
}

#[derive(Deserialize)]
pub(crate) struct MethodReq {
    #[serde(rename = "type")]
    kind: Option<String>,
    supervised: Option<WithHyper>,
    dpo: Option<WithHyper>,
    reinforcement: Option<RlReq>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RlReq {
    grader: Option<Value>,
    hyperparameters: Option<RlHyper>,
}

/// OpenAI's reinforcement hyperparameters, and tandem's (`beta`: the KL penalty's weight,
/// `max_completion_tokens`: the longest sampled answer, `temperature`: the answers').
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RlHyper {
    n_epochs: Option<Value>,
    batch_size: Option<Value>,
    learning_rate_multiplier: Option<Value>,
    compute_multiplier: Option<Value>,
    eval_interval: Option<Value>,
    eval_samples: Option<Value>,
    reasoning_effort: Option<Value>,
    beta: Option<Value>,
    max_completion_tokens: Option<Value>,
    temperature: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WithHyper {
    hyperparameters: Option<Hyper>,
}

#[derive(Deserialize)]
pub(crate) struct Lora {
    pub r: Option<usize>,
    pub alpha: Option<f64>,
    pub target_modules: Option<Vec<String>>,
}

#[derive(Deserialize)]
pub struct CreateJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: Option<u64>,
    pub(crate) hyperparameters: Option<Hyper>,
    pub(crate) method: Option<MethodReq>,
    pub(crate) lora: Option<Lora>,
    /// OpenAI's metadata: up to 16 string pairs, kept on the job object.
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// `value` as an integer in `lo..=hi`, or None for `"auto"` (or left out).
fn int_param(
    v: &Option<Value>,
    name: &str,
    lo: usize,
    hi: usize,
) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if (lo as u64..=hi as u64).contains(&x) => Ok(Some(x as usize)),
            _ => Err(ApiError::invalid(
                format!("{name} must be an integer from {lo} to {hi}"),
                Some(name),
            )),
        },
        Some(_) => Err(ApiError::invalid(
            format!("{name} must be an integer or \"auto\""),
            Some(name),
        )),
    }
}

/// A number in `(0, hi]`, or None for `"auto"` (or left out).
fn positive_param(v: &Option<Value>, name: &str, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x > 0.0 && x <= hi => Ok(Some(x)),
            _ => Err(ApiError::invalid(
                format!("{name} must be in (0, {hi}]"),
                Some(name),
            )),
        },
        Some(_) => Err(ApiError::invalid(
            format!("{name} must be a number or \"auto\""),
            Some(name),
        )),
    }
}

/// The job's method and its hyperparameters as given ("auto" still unresolved).
pub(crate) struct MethodChoice {
    pub method: Method,
    pub hyper: Hyperparameters,
    /// Reinforcement: the grader, checked, and as given.
    pub grader: Option<(Grader, Value)>,
}

/// A non-negative number, or None for `"auto"` (or left out).
fn number_param(v: &Option<Value>, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::invalid(
                format!("{name} must be in [{lo}, {hi}]"),
                Some(name),
            )),
        },
        Some(_) => Err(ApiError::invalid(
            format!("{name} must be a number or \"auto\""),
            Some(name),
        )),
    }
}

/// Parses a reinforcement method: its grader (required) and hyperparameters.
fn reinforcement(r: Option<RlReq>) -> Result<MethodChoice, ApiError> {
    let r = r.ok_or_else(|| {
        ApiError::invalid(
            "method.reinforcement is missing: a reinforcement job needs {\"grader\": {...}}",
            Some("method.reinforcement"),
        )
    })?;
    let g = r.grader.ok_or_else(|| {
        ApiError::invalid(
            "method.reinforcement.grader is missing: the grader scores the sampled answers",
            Some("method.reinforcement.grader"),
        )
    })?;
    let grader = Grader::parse(&g, "method.reinforcement.grader.").map_err(|(f, m)| {
        ApiError::invalid(format!("Invalid grader: `{f}` {m}"), Some(f.as_str()))
    })?;
    let h = r.hyperparameters.unwrap_or_default();
    if let Some(e) = &h.reasoning_effort {
        if !["default", "low", "medium", "high"].iter().any(|k| e == k) {
            return Err(ApiError::invalid(
                "reasoning_effort must be one of default, low, medium, high",
                Some("reasoning_effort"),
            ));
        }
    }
    let multiplier = number_param(&h.compute_multiplier, "compute_multiplier", 0.1, 16.0)?;
    let d = Reinforce::default();
    let rl = Reinforce {
        group: multiplier.map_or(DEFAULT_GROUP, |m| {
            ((DEFAULT_GROUP as f64 * m).round() as usize).clamp(2, 64)
        }),
        beta: number_param(&h.beta, "beta", 0.0, 10.0)?.unwrap_or(d.beta),
        max_tokens: int_param(&h.max_completion_tokens, "max_completion_tokens", 1, 4096)?
            .unwrap_or(d.max_tokens),
        temperature: number_param(&h.temperature, "temperature", 0.0, 2.0)?
            .unwrap_or(d.temperature),
        eval_interval: int_param(&h.eval_interval, "eval_interval", 1, 10_000)?.unwrap_or(0),
        eval_samples: int_param(&h.eval_samples, "eval_samples", 1, 64)?.unwrap_or(1),
    };
    Ok(MethodChoice {
        method: Method::Reinforcement(rl),
        hyper: Hyperparameters {
            n_epochs: int_param(&h.n_epochs, "n_epochs", 1, 50)?,
            batch_size: int_param(&h.batch_size, "batch_size", 1, 256)?,
            learning_rate_multiplier: positive_param(
                &h.learning_rate_multiplier,
                "learning_rate_multiplier",
                100.0,
            )?,
        },
        grader: Some((grader, g)),
    })
}

impl CreateJob {
    pub(crate) fn method(&mut self) -> Result<MethodChoice, ApiError> {
        let m = self.method.take();
        let kind = match &m {
            Some(m) => match m.kind.as_deref() {
                Some(k) => k.to_string(),
                None if m.dpo.is_some() => "dpo".into(),
                None if m.reinforcement.is_some() => "reinforcement".into(),
                None => "supervised".into(),
            },
            None => "supervised".into(),
        };
        let (hyper, dpo) = match kind.as_str() {
            "supervised" => (m.and_then(|m| m.supervised), false),
            "dpo" => (m.and_then(|m| m.dpo), true),
            "reinforcement" => return reinforcement(m.and_then(|m| m.reinforcement)),
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "Unknown method `{other}` (supported: `supervised`, `dpo`, `reinforcement`)"
                    ),
                    Some("method.type"),
                ))
            }
        };
        let hyper = hyper
            .and_then(|h| h.hyperparameters)
            .or(self.hyperparameters.take())
            .unwrap_or_default();
        let method = match (dpo, &hyper.beta) {
            (true, b) => Method::Dpo {
                beta: positive_param(b, "beta", 10.0)?.unwrap_or(DEFAULT_BETA),
            },
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "beta is a hyperparameter of the `dpo` method",
                    Some("beta"),
                ))
            }
            (false, None) => Method::Supervised,
        };
        Ok(MethodChoice {
            method,
            hyper: Hyperparameters {
                n_epochs: int_param(&hyper.n_epochs, "n_epochs", 1, 50)?,
                batch_size: int_param(&hyper.batch_size, "batch_size", 1, 256)?,
                learning_rate_multiplier: positive_param(
                    &hyper.learning_rate_multiplier,
                    "learning_rate_multiplier",
                    100.0,
                )?,
            },
            grader: None,
        })
    }
}

/// Longest training sequence (tokens); the same at creation and at recovery.
pub(crate) fn max_seq_len(st: &AppState) -> usize {
    st.max_model_len.min(2048)
}

/// A training or validation file's lines as the method's data (`field` names it in errors);
/// reinforcement prompts come with the job's grader.
fn read_data(
    st: &AppState,
    content: &[u8],
    field: &str,
    method: &Method,
    grader: Option<&Grader>,
) -> Result<TrainData, ApiError> {
    let text = String::from_utf8_lossy(content);
    let bad = |msg: String| ApiError::invalid(format!("{field}: {msg}"), Some(field));
    let kind = tandem_model::finetune::validate_file(&text).map_err(bad)?.0;
    if let (Method::Reinforcement(_), Some(g)) = (method, grader) {
        if kind == FileKind::Preference {
            return Err(bad("the reinforcement method trains on prompts: lines of {\"messages\": [...], ...the fields the grader reads}".into()));
        }
        let items = prompt_items(&text, &st.tokenizer, max_seq_len(st))
            .map_err(|(line, f, m)| bad(format!("line {line}: `{f}` {m}")))?;
        return Ok(TrainData::Prompts(Prompts {
            items,
            grader: g.clone(),
        }));
    }
    match (method, kind) {
        (_, FileKind::Prompts) => {
            return Err(bad("the file holds prompts without answers: train on it with method {\"type\": \"reinforcement\"} and a grader".into()))
        }
        (Method::Dpo { .. }, FileKind::Supervised) => {
            return Err(bad("the dpo method trains on preference pairs: lines of {\"input\": {\"messages\": [...]}, \"preferred_output\": [...], \"non_preferred_output\": [...]}".into()))
        }
        (Method::Supervised, FileKind::Preference) => {
            return Err(bad("the file holds preference pairs: train on it with method {\"type\": \"dpo\"}".into()))
        }
        _ => {}
    }
    let max = max_seq_len(st);
    if method.is_dpo() {
        let pairs = preference_pairs(&text, &st.tokenizer, max)
            .map_err(|(line, f, m)| bad(format!("line {line}: `{f}` {m}")))?;
        return Ok(TrainData::Preference(pairs));
    }
    let mut data = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex = parse_record(line)
            .and_then(|r| tokenize(&r, &st.tokenizer, max))
            .map_err(|(f, m)| bad(format!("line {}: `{f}` {m}", i + 1)))?;
        data.push(ex);
    }
    Ok(TrainData::Supervised(data))
}

/// The data of stored file `id` for `method` (None if there is no such file, or the tenant may
/// not see it); `field` names it in errors.
pub(crate) async fn file_data(
    st: &AppState,
    t: &Tenant,
    id: &str,
    field: &str,
    method: &Method,
    grader: Option<&Grader>,
) -> Result<Option<TrainData>, ApiError> {
    if crate::files::visible_file(st, t, id).await?.is_none() {
        return Ok(None);
    }
    match st.store.file_content(id).await? {
        Some(content) => read_data(st, &content, field, method, grader).map(Some),
        None => Ok(None),
    }
}

/// A `score_model` grader (or one inside a `multi`) must name the base model or a served
/// adapter the tenant sees.
pub(crate) async fn check_grader_models(
    st: &AppState,
    t: &Tenant,
    g: &Grader,
) -> Result<(), ApiError> {
    let mut models = Vec::new();
    g.models(&mut models);
    if models.iter().all(|m| *m == st.model_name) {
        return Ok(());
    }
    for m in &models {
        crate::shared_adapters::ensure_served(st, m).await?;
    }
    let stats = st.engine.stats().await.map_err(ApiError::internal)?;
    for m in models {
        let ok = m == st.model_name
            || (stats.adapters.contains(&m) && t.sees(st.tenants.owner(&m).as_deref()));
        if !ok {
            return Err(ApiError::invalid(
                format!("Invalid grader: the model `{m}` does not exist here"),
                Some("method.reinforcement.grader.model"),
            ));
        }
    }
    Ok(())
}

/// A reinforcement job's resolved hyperparameters, as the job object reports them (`"auto"`
/// eval_interval: one epoch of `steps_per_epoch`).
pub(crate) fn reinforcement_hyperparameters(r: &Reinforce, steps_per_epoch: usize, hp: &mut Value) {
    hp["compute_multiplier"] = serde_json::json!(r.group as f64 / DEFAULT_GROUP as f64);
    hp["eval_interval"] = serde_json::json!(if r.eval_interval == 0 {
        steps_per_epoch
    } else {
        r.eval_interval
    });
    hp["eval_samples"] = serde_json::json!(r.eval_samples);
    hp["beta"] = serde_json::json!(r.beta);
    hp["max_completion_tokens"] = serde_json::json!(r.max_tokens);
    hp["temperature"] = serde_json::json!(r.temperature);
}
