//! The API's one error type: OpenAI's error JSON with the right status code. User errors carry
//! their message; internal ones a generic message while the cause goes to the log.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
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

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &str,
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message: message.into(),
                    kind: kind.into(),
                    param: param.map(str::to_string),
                    code: code.map(str::to_string),
                },
            },
        }
    }

    /// 404 for a named object (file, job) that does not exist.
    pub fn not_found(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            message,
            param,
            None,
        )
    }

    /// 400, naming the parameter.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message,
            param,
            None,
        )
    }

    pub fn context_length(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message,
            Some("messages"),
            Some("context_length_exceeded"),
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist."),
            Some("model"),
            Some("model_not_found"),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect or missing API key.",
            None,
            Some("invalid_api_key"),
        )
    }

    pub fn overloaded(pending: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("The server is busy ({pending} requests in flight); retry shortly."),
            None,
            Some("rate_limit_exceeded"),
        )
    }

    /// 507: the data dir's disk is full; nothing was stored (the cause is logged).
    pub fn insufficient_storage(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "out of disk space");
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "server_error",
            "The server is out of disk space; nothing was stored. Retry later.",
            None,
            Some("insufficient_storage"),
        )
    }

    /// 503: the shared store cannot be reached now (restarting, network); nothing was done.
    pub fn store_unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "the store is unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The server's database is unavailable; nothing was done. Retry shortly.",
            None,
            Some("store_unavailable"),
        )
    }

    /// 503: an adapter the store records cannot be fetched from the adapter store now.
    pub fn adapter_store_unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "the adapter store is unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The adapter store is unavailable; the model cannot be loaded now. Retry shortly.",
            None,
            Some("adapter_store_unavailable"),
        )
    }

    /// 500 with a generic message; the cause is logged.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error while processing your request.",
            None,
            None,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_string(&self.body).unwrap_or_else(|_| "{}".into());
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_in_openai_shape() {
        let e = ApiError::invalid("temperature must be >= 0", Some("temperature"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            serde_json::to_value(&e.body).unwrap(),
            serde_json::json!({"error": {"message": "temperature must be >= 0", "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
    }
}
