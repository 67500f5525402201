//! File-operation errors and how they map onto the spec's error bodies (§1.6 tables C, D).

use std::io;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cordon_api::error::kinds;
use cordon_api::ErrorBody;

use crate::identity::IdentityError;

/// Whether a failing operation was reading or writing: picks `ReadError` or `WriteError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: permission denied")]
    PermissionDenied { path: String },
    #[error("{path}: is a directory")]
    IsADirectory { path: String, access: Access },
    #[error("{path}: not a directory")]
    NotADirectory { path: String, access: Access },
    #[error("{path}: not a regular file")]
    NotARegularFile { path: String, access: Access },
    #[error("upload is larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    /// The client's fault (bad path shape, loop, name too long): 400.
    #[error("{path}: {source}")]
    BadPath {
        path: String,
        access: Access,
        source: io::Error,
    },
    /// Anything else the filesystem reported: 500.
    #[error("{path}: {source}")]
    Io {
        path: String,
        access: Access,
        source: io::Error,
    },
    #[error("run user: {0}")]
    RunUser(#[from] IdentityError),
    #[error("{0}")]
    Internal(String),
}

impl FileError {
    /// Classifies an I/O error on `path` by what the client can do about it.
    pub fn from_io(path: &str, access: Access, error: io::Error) -> FileError {
        let path = path.to_string();
        match error.raw_os_error() {
            Some(libc::ENOENT) => FileError::NotFound { path },
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => FileError::PermissionDenied { path },
            Some(libc::EISDIR) => FileError::IsADirectory { path, access },
            Some(libc::ENOTDIR) => FileError::NotADirectory { path, access },
            Some(libc::ENAMETOOLONG | libc::ELOOP | libc::EINVAL | libc::EEXIST) => {
                FileError::BadPath {
                    path,
                    access,
                    source: error,
                }
            }
            _ => FileError::Io {
                path,
                access,
                source: error,
            },
        }
    }

    fn status_and_kind(&self) -> (StatusCode, &'static str) {
        let access_kind = |access: &Access| match access {
            Access::Read => kinds::READ_ERROR,
            Access::Write => kinds::WRITE_ERROR,
        };
        match self {
            FileError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, kinds::INVALID_REQUEST),
            FileError::NotFound { .. } => (StatusCode::NOT_FOUND, kinds::FILE_NOT_FOUND),
            FileError::PermissionDenied { .. } => (StatusCode::FORBIDDEN, kinds::PERMISSION_DENIED),
            FileError::IsADirectory { access, .. }
            | FileError::NotADirectory { access, .. }
            | FileError::NotARegularFile { access, .. }
            | FileError::BadPath { access, .. } => (StatusCode::BAD_REQUEST, access_kind(access)),
            FileError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, kinds::PAYLOAD_TOO_LARGE),
            FileError::Io { access, .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, access_kind(access))
            }
            FileError::RunUser(_) => (StatusCode::BAD_REQUEST, kinds::INVALID_REQUEST),
            FileError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, kinds::INTERNAL),
        }
    }
}

impl IntoResponse for FileError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        if status.is_server_error() {
            tracing::warn!(error = %self, "file operation failed");
        } else {
            tracing::debug!(error = %self, "file operation refused");
        }
        (status, Json(ErrorBody::new(kind, self.to_string()))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(errno: i32) -> (StatusCode, &'static str) {
        FileError::from_io("/p", Access::Read, io::Error::from_raw_os_error(errno))
            .status_and_kind()
    }

    #[test]
    fn errno_maps_to_spec_status_and_type() {
        assert_eq!(
            classify(libc::ENOENT),
            (StatusCode::NOT_FOUND, kinds::FILE_NOT_FOUND)
        );
        assert_eq!(
            classify(libc::EACCES),
            (StatusCode::FORBIDDEN, kinds::PERMISSION_DENIED)
        );
        assert_eq!(
            classify(libc::EPERM),
            (StatusCode::FORBIDDEN, kinds::PERMISSION_DENIED)
        );
        assert_eq!(
            classify(libc::EISDIR),
            (StatusCode::BAD_REQUEST, kinds::READ_ERROR)
        );
        assert_eq!(
            classify(libc::ENOSPC),
            (StatusCode::INTERNAL_SERVER_ERROR, kinds::READ_ERROR)
        );
    }

    #[test]
    fn directory_message_is_what_deepagents_looks_for() {
        let error = FileError::IsADirectory {
            path: "/tmp".into(),
            access: Access::Read,
        };
        assert_eq!(error.to_string(), "/tmp: is a directory");
    }
}
