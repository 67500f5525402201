//! Files: upload, download (with HEAD and ranges), glob and grep (spec §3.5).
//!
//! Every filesystem access runs on a blocking thread acting as the sandbox's run user (see
//! [`acting_as`]), so the sandbox's own permissions decide what a client may read or write.

mod acting_as;
mod download;
mod error;
mod glob;
mod grep;
mod range;
mod timestamp;
mod upload;
mod walk;

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use acting_as::ActingAs;
pub use error::{Access, FileError};

use crate::identity::{self, Identity};
use crate::AppState;

/// Largest JSON body accepted by `/glob` and `/grep`.
const MAX_JSON_BODY_BYTES: usize = 64 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        // Uploads enforce their own (configurable, much larger) cap while streaming.
        .route(
            "/upload",
            post(upload::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/download", get(download::download).head(download::head))
        .route(
            "/glob",
            post(glob::glob).layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES)),
        )
        .route(
            "/grep",
            post(grep::grep).layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES)),
        )
}

/// `?path=` of upload and download.
#[derive(Debug, Deserialize)]
pub(crate) struct PathQuery {
    path: String,
}

/// The `path` query parameter, or the spec's 400 `InvalidRequest` instead of axum's text.
pub(crate) fn path_param(
    query: Result<Query<PathQuery>, QueryRejection>,
) -> Result<String, FileError> {
    query
        .map(|Query(query)| query.path)
        .map_err(|rejection| FileError::InvalidRequest(format!("query: {}", rejection.body_text())))
}

/// A JSON request body, with every failure answered as a spec error body. Content type is not
/// checked: clients differ in what they send.
pub(crate) fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, FileError> {
    let body = body.map_err(|rejection| FileError::InvalidRequest(rejection.body_text()))?;
    serde_json::from_slice(&body)
        .map_err(|error| FileError::InvalidRequest(format!("invalid JSON body: {error}")))
}

/// Runs blocking file work on a blocking thread acting as the sandbox's current run user.
pub(crate) async fn as_run_user<T, F>(state: &AppState, work: F) -> Result<T, FileError>
where
    T: Send + 'static,
    F: FnOnce(&Identity) -> Result<T, FileError> + Send + 'static,
{
    let user = state.config.get().run_config.user;
    let task = tokio::task::spawn_blocking(move || {
        let identity = identity::resolve(user.as_deref())?;
        let _acting = ActingAs::enter(&identity)
            .map_err(|error| FileError::Internal(format!("cannot act as the run user: {error}")))?;
        work(&identity)
    });
    task.await
        .map_err(|error| FileError::Internal(format!("file operation failed: {error}")))?
}

/// A client path as a filesystem path: relative paths start at the run user's home (§3.5.2).
pub(crate) fn resolve_client_path(raw: &str, home: &str) -> Result<PathBuf, FileError> {
    check_path_shape(raw)?;
    let path = Path::new(raw);
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        Path::new(home).join(path)
    })
}

/// The root of a glob or grep: it must be absolute (§3.5.3). Trailing slashes are dropped so
/// that results read `/root/name`, not `/root//name`.
pub(crate) fn absolute_root(raw: &str) -> Result<PathBuf, FileError> {
    check_path_shape(raw)?;
    if !raw.starts_with('/') {
        return Err(FileError::InvalidRequest(format!(
            "path must be absolute, got {raw:?}"
        )));
    }
    let trimmed = raw.trim_end_matches('/');
    Ok(PathBuf::from(if trimmed.is_empty() {
        "/"
    } else {
        trimmed
    }))
}

fn check_path_shape(raw: &str) -> Result<(), FileError> {
    if raw.is_empty() {
        return Err(FileError::InvalidRequest("path must not be empty".into()));
    }
    if raw.contains('\0') {
        return Err(FileError::InvalidRequest(
            "path must not contain NUL".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_start_at_home() {
        let home = "/home/user";
        assert_eq!(
            resolve_client_path("a/b.txt", home).unwrap(),
            Path::new("/home/user/a/b.txt")
        );
        assert_eq!(
            resolve_client_path("/etc/x", home).unwrap(),
            Path::new("/etc/x")
        );
        assert!(resolve_client_path("", home).is_err());
        assert!(resolve_client_path("a\0b", home).is_err());
    }

    #[test]
    fn search_roots_are_absolute_without_trailing_slash() {
        assert_eq!(absolute_root("/tmp/").unwrap(), Path::new("/tmp"));
        assert_eq!(absolute_root("/").unwrap(), Path::new("/"));
        assert_eq!(absolute_root("//").unwrap(), Path::new("/"));
        assert!(matches!(
            absolute_root("tmp"),
            Err(FileError::InvalidRequest(_))
        ));
    }
}
