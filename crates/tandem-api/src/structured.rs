//! Structured-output requests: OpenAI's `response_format`, vLLM's `structured_outputs` and its
//! older `guided_*` fields, read into one constraint and compiled (off the async threads) into
//! the grammar the sampler enforces. A bad schema, regex or grammar is a 400 naming its field.

use crate::error::ApiError;
use crate::openai::Sampling;
use crate::AppState;
use serde_json::Value;
use tandem_model::grammar::{Constraint, Grammar};

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(msg, Some(param))
}

/// A schema given as an object, or as JSON text (vLLM takes both).
fn schema(v: &Value, param: &str) -> Result<Value, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| bad(param, format!("{param} is not valid JSON: {e}"))),
        _ => Err(bad(param, format!("{param} must be a JSON schema object"))),
    }
}

fn string(v: &Value, param: &str) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(param, format!("{param} must be a string")))
}

fn choices(v: &Value, param: &str) -> Result<Vec<String>, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| bad(param, format!("{param} must be a list of strings")))?;
    let out: Option<Vec<String>> = list
        .iter()
        .map(|c| c.as_str().map(str::to_string))
        .collect();
    match out {
        Some(l) if !l.is_empty() => Ok(l),
        _ => Err(bad(
            param,
            format!("{param} must be a non-empty list of strings"),
        )),
    }
}

fn response_format(f: &Value) -> Result<Option<Constraint>, ApiError> {
    const P: &str = "response_format";
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let js = f
                .get("json_schema")
                .filter(|j| j.is_object())
                .ok_or_else(|| {
                    bad(
                        P,
                        "response_format json_schema needs a json_schema object with a schema",
                    )
                })?;
            let strict = js.get("strict").and_then(Value::as_bool).unwrap_or(false);
            match js.get("schema") {
                None | Some(Value::Null) => Ok(Some(Constraint::JsonObject)),
                Some(s) => Ok(Some(Constraint::JsonSchema {
                    schema: schema(s, P)?,
                    strict,
                })),
            }
        }
        Some(t) => Err(bad(
            P,
            format!("response_format type `{t}` is not one of text, json_object, json_schema"),
        )),
        None => Err(bad(
            P,
            "response_format must be an object with type text, json_object or json_schema",
        )),
    }
}

fn structured_outputs(v: &Value) -> Result<Option<Constraint>, ApiError> {
    const P: &str = "structured_outputs";
    let Some(o) = v.as_object() else {
        return Err(bad(P, "structured_outputs must be an object"));
    };
    let mut found = Vec::new();
    if let Some(j) = o.get("json").filter(|j| !j.is_null()) {
        found.push(Constraint::JsonSchema {
            schema: schema(j, "structured_outputs.json")?,
            strict: false,
        });
    }
    if let Some(r) = o.get("regex").filter(|r| !r.is_null()) {
        found.push(Constraint::Regex(string(r, "structured_outputs.regex")?));
    }
    if let Some(c) = o.get("choice").filter(|c| !c.is_null()) {
        found.push(Constraint::Choice(choices(c, "structured_outputs.choice")?));
    }
    if let Some(g) = o.get("grammar").filter(|g| !g.is_null()) {
        found.push(Constraint::Grammar(string(
            g,
            "structured_outputs.grammar",
        )?));
    }
    if o.get("json_object").and_then(Value::as_bool) == Some(true) {
        found.push(Constraint::JsonObject);
    }
    if o.get("structural_tag").is_some_and(|t| !t.is_null()) {
        return Err(bad(P, "structured_outputs.structural_tag is not supported"));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(bad(
            P,
            "structured_outputs takes one of json, regex, choice, grammar, json_object",
        )),
    }
}

/// The request's constraint and the field it came from, if it has one; a 400 if it names more
/// than one.
pub(crate) fn requested(s: &Sampling) -> Result<Option<(Constraint, &'static str)>, ApiError> {
    let mut found: Vec<(Constraint, &'static str)> = Vec::new();
    if let Some(f) = s.response_format.as_ref().filter(|f| !f.is_null()) {
        found.extend(response_format(f)?.map(|c| (c, "response_format")));
    }
    if let Some(v) = s.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        found.extend(structured_outputs(v)?.map(|c| (c, "structured_outputs")));
    }
    if let Some(j) = s.guided_json.as_ref().filter(|v| !v.is_null()) {
        let c = Constraint::JsonSchema {
            schema: schema(j, "guided_json")?,
            strict: false,
        };
        found.push((c, "guided_json"));
    }
    if let Some(r) = s.guided_regex.as_ref().filter(|v| !v.is_null()) {
        found.push((
            Constraint::Regex(string(r, "guided_regex")?),
            "guided_regex",
        ));
    }
    if let Some(c) = s.guided_choice.as_ref().filter(|v| !v.is_null()) {
        found.push((
            Constraint::Choice(choices(c, "guided_choice")?),
            "guided_choice",
        ));
    }
    if let Some(g) = s.guided_grammar.as_ref().filter(|v| !v.is_null()) {
        found.push((
            Constraint::Grammar(string(g, "guided_grammar")?),
            "guided_grammar",
        ));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(_, p)| *p).collect();
        return Err(bad(
            names[1],
            format!(
                "give one output constraint, not several ({})",
                names.join(", ")
            ),
        ));
    }
    Ok(found.pop())
}

/// Compiles on a blocking thread (a large schema takes milliseconds); the error names `param`.
pub(crate) async fn compile(
    st: &AppState,
    c: Constraint,
    param: &'static str,
) -> Result<Grammar, ApiError> {
    let compiler = st.grammars.clone();
    let what = c.kind();
    tokio::task::spawn_blocking(move || compiler.compile(&c))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| bad(param, format!("invalid {what} in {param}: {e}")))
}

/// Compiles a grammar tandem wrote (forced tool calls); its failure is the request's tools'.
pub(crate) async fn compile_lark(
    st: &AppState,
    lark: String,
    kind: &'static str,
    param: &'static str,
) -> Result<Grammar, ApiError> {
    let compiler = st.grammars.clone();
    tokio::task::spawn_blocking(move || compiler.compile_lark(&lark, kind))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            bad(
                param,
                format!("cannot constrain output to these {param}: {e}"),
            )
        })
}
