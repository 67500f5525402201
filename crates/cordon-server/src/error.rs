//! API errors and their wire form (spec §1.6).

use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cordon_api::error::ErrorBody;
use futures::StreamExt;
use serde::Serialize;

/// One pydantic-style field error (spec §1.6: the 422 array form used by create).
#[derive(Debug, Clone, Serialize)]
pub struct FieldError {
    pub loc: Vec<String>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl FieldError {
    /// A value error on `body.<field>`; clients map `value_error` to their `ValidationError`.
    pub fn value(field: &str, msg: impl Into<String>) -> FieldError {
        FieldError {
            loc: vec!["body".into(), field.into()],
            msg: msg.into(),
            kind: "value_error",
        }
    }
}

/// Everything a request can fail with, each mapped to the status the clients expect.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// Phrased so the clients derive `quota_type` from the message (spec §1.6).
    #[error("{0}")]
    Quota(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    CreationFailed(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    AgentUnreachable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status_and_kind(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "ValidationError"),
            ApiError::Quota(_) => (StatusCode::TOO_MANY_REQUESTS, "QuotaExceeded"),
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "Timeout"),
            ApiError::NotReady(_) => (StatusCode::BAD_REQUEST, "NotReady"),
            // Table B: a 422 whose detail is an object becomes ResourceCreationError.
            ApiError::CreationFailed(_) => (StatusCode::UNPROCESSABLE_ENTITY, "CrashLoop"),
            ApiError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "NotImplemented"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"),
            ApiError::AgentUnreachable(_) => (StatusCode::BAD_GATEWAY, "ConnectionError"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        match self {
            ApiError::Validation(errors) => {
                (status, Json(serde_json::json!({ "detail": errors }))).into_response()
            }
            ApiError::Quota(message) => {
                // Not transient: `Retry-After: 0` keeps the Python client's retries instant.
                let body = Json(ErrorBody::new(kind, message));
                (status, [(axum::http::header::RETRY_AFTER, "0")], body).into_response()
            }
            other => {
                if status.is_server_error() {
                    tracing::warn!(error = %other, "request failed");
                }
                (status, Json(ErrorBody::new(kind, other.to_string()))).into_response()
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        match error {
            crate::store::StoreError::NameTaken(name) => {
                ApiError::Conflict(format!("a sandbox named '{name}' already exists"))
            }
            crate::store::StoreError::RegistryNameTaken(name) => {
                ApiError::Conflict(format!("a registry named '{name}' already exists"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Most request-body bytes read (and discarded) before answering a rejected request.
const REJECTED_BODY_READ_LIMIT: usize = 1 << 20;
/// Longest a rejected request's body is read for.
const REJECTED_BODY_READ_TIME: Duration = Duration::from_secs(2);

/// Answers `error` after reading and discarding the request body, up to a bound. A client still
/// sending its body when the answer and the connection close arrives (Node's fetch uploading a
/// file) sees a broken pipe instead of the error; reading what it sends first lets it read the
/// answer. Bodies past the bound are cut off as before.
pub async fn reject_after_reading_body(request: Request, error: ApiError) -> Response {
    let mut body = request.into_body().into_data_stream();
    let mut read = 0;
    let discard = async {
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len();
            if read > REJECTED_BODY_READ_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(REJECTED_BODY_READ_TIME, discard).await;
    error.into_response()
}
