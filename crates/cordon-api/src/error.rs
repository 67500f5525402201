//! The error body of spec §1.6: `{"detail": {"error": ..., "message": ..., "error_id": ...}}`.

use serde::{Deserialize, Serialize};

/// The body of every non-2xx JSON response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub detail: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The error type the clients map to exceptions (`ReadError`, `WriteError`, `NotReady`, ...).
    pub error: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_id: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            detail: ErrorDetail {
                error: error.into(),
                message: message.into(),
                error_id: None,
            },
        }
    }
}

/// Error types named by the spec (§1.6 tables C and D, §3.3.5).
pub mod kinds {
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    pub const NOT_FOUND: &str = "NotFound";
    pub const FILE_NOT_FOUND: &str = "FileNotFound";
    pub const READ_ERROR: &str = "ReadError";
    pub const WRITE_ERROR: &str = "WriteError";
    pub const COMMAND_ERROR: &str = "CommandError";
    pub const PERMISSION_DENIED: &str = "PermissionDenied";
    pub const NOT_READY: &str = "NotReady";
    pub const PAYLOAD_TOO_LARGE: &str = "PayloadTooLarge";
    pub const COMMAND_TIMEOUT: &str = "CommandTimeout";
    pub const COMMAND_NOT_FOUND: &str = "CommandNotFound";
    pub const SESSION_EXPIRED: &str = "SessionExpired";
    pub const SERVER_SHUTTING_DOWN: &str = "ServerShuttingDown";
    pub const INTERNAL: &str = "InternalError";
}
