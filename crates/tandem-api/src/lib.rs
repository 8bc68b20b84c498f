//! tandem-api: the HTTP face of tandem (OpenAI-compatible routes, files and fine-tuning jobs,
//! adapters, /metrics). The routes arrive with the server issue; this crate holds, for now,
//! the one error shape every route will return.
//!
//! Owns: request validation and response shapes. Must not touch: tensors, scheduling policy.

use serde::Serialize;

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ErrorBody {
    /// A 400-class invalid request naming the offending parameter.
    pub fn invalid_request(
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: "invalid_request_error".into(),
                param: param.map(str::to_string),
                code: code.map(str::to_string),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_in_openai_shape() {
        let e = ErrorBody::invalid_request("temperature must be >= 0", Some("temperature"), None);
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"error": {"message": "temperature must be >= 0", "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
    }
}
