//! OpenAI's grader routes: `POST /v1/fine_tuning/alpha/graders/validate` (`{"grader"}` →
//! the grader back, or a 400 naming the field) and `/run` (`{"grader", "model_sample",
//! "item"}` → `{"reward", "metadata", "sub_rewards"}`). A `score_model` grader asks a model this
//! server serves (the base model or an adapter the tenant sees), greedy unless its
//! `sampling_params` say otherwise.

use crate::error::ApiError;
use crate::tenants::Tenant;
use crate::AppState;
use axum::extract::State;
use axum::{Extension, Json};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;
use tandem_model::graders::{score_model_request, Grader, ModelCall};
use tandem_scheduler::{Event, GenerateRequest};

fn body(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::invalid("The body must be a JSON object", None)),
        Err(e) => Err(ApiError::invalid(format!("Invalid request: {e}"), None)),
    }
}

fn grader(o: &serde_json::Map<String, Value>) -> Result<(Grader, Value), ApiError> {
    let g = o.get("grader").ok_or_else(|| {
        ApiError::invalid("Missing required parameter: 'grader'.", Some("grader"))
    })?;
    let parsed = Grader::parse(g, "grader.").map_err(|(f, m)| {
        ApiError::invalid(format!("Invalid grader: `{f}` {m}"), Some(f.as_str()))
    })?;
    Ok((parsed, g.clone()))
}

pub async fn validate(body_bytes: axum::body::Bytes) -> Result<Json<Value>, ApiError> {
    let (_, g) = grader(&body(&body_bytes)?)?;
    Ok(Json(json!({"grader": g})))
}

/// `score_model`'s model calls through the engine, from a blocking thread.
struct EngineCall {
    st: Arc<AppState>,
    tenant: Tenant,
    rt: tokio::runtime::Handle,
}

impl ModelCall for EngineCall {
    fn call(
        &self,
        model: &str,
        messages: &[(String, String)],
        params: &Value,
    ) -> Result<String, String> {
        let adapter = if model == self.st.model_name {
            None
        } else if self.tenant.sees(self.st.tenants.owner(model).as_deref()) {
            Some(model.to_string())
        } else {
            return Err(format!("the model `{model}` does not exist"));
        };
        let (prompt, sampling) = score_model_request(&self.st.tokenizer, messages, params)?;
        let req = GenerateRequest {
            prompt,
            params: sampling,
            adapter,
            cache_salt: self.tenant.cache_salt(None),
            span: tracing::Span::current(),
        };
        let engine = self.st.engine.clone();
        let model = model.to_string();
        self.rt.block_on(async move {
            let (_, mut rx) = engine.generate(req).await.map_err(|e| e.to_string())?;
            let mut out = String::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Token { text, .. } => out.push_str(&text),
                    Event::Finished { .. } => break,
                    Event::Failed(e) => return Err(format!("the model `{model}` failed: {e}")),
                }
            }
            Ok(out)
        })
    }
}

pub async fn run(
    State(st): State<Arc<AppState>>,
    Extension(t): Extension<Tenant>,
    body_bytes: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let o = body(&body_bytes)?;
    let (g, _) = grader(&o)?;
    let sample = match o.get("model_sample") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => {
            return Err(ApiError::invalid(
                "Missing required parameter: 'model_sample'.",
                Some("model_sample"),
            ))
        }
    };
    let item = o.get("item").cloned().unwrap_or(json!({}));
    let call = EngineCall {
        st: st.clone(),
        tenant: t,
        rt: tokio::runtime::Handle::current(),
    };
    let t0 = Instant::now();
    let (kind, name) = (kind(&g), g.name().to_string());
    let graded = tokio::task::spawn_blocking(move || g.grade(&sample, &item, &call))
        .await
        .map_err(ApiError::internal)?;
    let secs = t0.elapsed().as_secs_f64();
    match graded {
        Ok(r) => Ok(Json(json!({
            "reward": r.reward,
            "metadata": {"name": name, "type": kind, "errors": {}, "execution_time": secs,
                "scores": r.sub_rewards, "token_usage": null, "sampled_model_name": null},
            "sub_rewards": r.sub_rewards,
            "model_grader_token_usage_per_model": {},
        }))),
        Err(e) => Err(ApiError::invalid(
            format!("The grader failed: {e}"),
            Some("grader"),
        )),
    }
}

fn kind(g: &Grader) -> &'static str {
    match g {
        Grader::StringCheck { .. } => "string_check",
        Grader::TextSimilarity { .. } => "text_similarity",
        Grader::ScoreModel { .. } => "score_model",
        Grader::Multi { .. } => "multi",
    }
}
