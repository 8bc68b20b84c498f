//! What `POST /v1/fine_tuning/jobs` asks for, checked: OpenAI's `method` (`supervised` or
//! `dpo`, each with its hyperparameters, any of which may be `"auto"`; the deprecated top-level
//! `hyperparameters` too), tandem's `lora` shape, and the training / validation files read as
//! the method needs them (supervised examples or preference pairs), with errors that name the
//! field, the line and the line's field.

use crate::error::ApiError;
use crate::tenants::Tenant;
use crate::AppState;
use serde::Deserialize;
use serde_json::Value;
use tandem_model::finetune::{
    parse_record, preference_pairs, tokenize, FileKind, Hyperparameters, Method, TrainData,
    DEFAULT_BETA,
};

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
    reinforcement: Option<Value>,
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
            "reinforcement" => return Err(ApiError::invalid(
                "The `reinforcement` method is not supported yet (supported: `supervised`, `dpo`)",
                Some("method.type"),
            )),
            other => {
                return Err(ApiError::invalid(
                    format!("Unknown method `{other}` (supported: `supervised`, `dpo`)"),
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
        })
    }
}

/// Longest training sequence (tokens); the same at creation and at recovery.
pub(crate) fn max_seq_len(st: &AppState) -> usize {
    st.max_model_len.min(2048)
}

/// A training or validation file's lines as the method's data (`field` names it in errors).
fn read_data(
    st: &AppState,
    content: &[u8],
    field: &str,
    method: &Method,
) -> Result<TrainData, ApiError> {
    let text = String::from_utf8_lossy(content);
    let bad = |msg: String| ApiError::invalid(format!("{field}: {msg}"), Some(field));
    let kind = tandem_model::finetune::validate_file(&text).map_err(bad)?.0;
    match (method, kind) {
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
pub(crate) fn file_data(
    st: &AppState,
    t: &Tenant,
    id: &str,
    field: &str,
    method: &Method,
) -> Result<Option<TrainData>, ApiError> {
    if crate::files::visible_file(st, t, id)?.is_none() {
        return Ok(None);
    }
    match st.store.file_content(id)? {
        Some(content) => read_data(st, &content, field, method).map(Some),
        None => Ok(None),
    }
}
