//! `GET /download?path=P` and `HEAD` (spec §3.5.2): streamed, with ETag, ranges and
//! conditional requests.

use std::fs::{File, Metadata};
use std::io::SeekFrom;
use std::os::unix::fs::OpenOptionsExt;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::{
    ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, LAST_MODIFIED,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cordon_api::error::kinds;
use cordon_api::ErrorBody;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::error::{Access, FileError};
use super::range::{self, Plan};
use super::{as_run_user, path_param, resolve_client_path, PathQuery};
use crate::AppState;

/// Bytes read from disk per body chunk; large chunks keep per-chunk overhead low.
const READ_CHUNK_BYTES: usize = 256 * 1024;

pub async fn download(
    State(state): State<AppState>,
    query: Result<Query<PathQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    respond(&state, query, &headers, BodyWanted::Yes)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `stat()` in the clients: the headers of a GET with the real `Content-Length`, no body.
pub async fn head(
    State(state): State<AppState>,
    query: Result<Query<PathQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    respond(&state, query, &headers, BodyWanted::No)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyWanted {
    Yes,
    No,
}

/// An open regular file and what it looked like when opened.
struct OpenedFile {
    file: File,
    metadata: Metadata,
}

async fn respond(
    state: &AppState,
    query: Result<Query<PathQuery>, QueryRejection>,
    headers: &HeaderMap,
    body_wanted: BodyWanted,
) -> Result<Response, FileError> {
    let client_path = path_param(query)?;
    let opened = as_run_user(state, move |identity| {
        let path = resolve_client_path(&client_path, &identity.home)?;
        open_regular_file(&path, &client_path)
    })
    .await?;

    let size = opened.metadata.len();
    let etag = range::etag(&opened.metadata);
    let validators = validator_headers(&etag, &opened.metadata);
    match range::plan(headers, &etag, size, body_wanted == BodyWanted::Yes) {
        Plan::NotModified => Ok((StatusCode::NOT_MODIFIED, validators).into_response()),
        Plan::Unsatisfiable => Ok(unsatisfiable(size, validators)),
        Plan::Full => {
            let body = file_body(opened.file, 0, size, body_wanted).await?;
            Ok(content_response(
                StatusCode::OK,
                validators,
                size,
                None,
                body,
            ))
        }
        Plan::Partial { first, last } => {
            let length = last - first + 1;
            let body = file_body(opened.file, first, length, body_wanted).await?;
            let content_range = format!("bytes {first}-{last}/{size}");
            Ok(content_response(
                StatusCode::PARTIAL_CONTENT,
                validators,
                length,
                Some(content_range),
                body,
            ))
        }
    }
}

/// Opens `path` for reading as the current (run) user and checks it is a regular file.
/// `O_NONBLOCK` keeps a FIFO from hanging the open; it changes nothing for regular files.
fn open_regular_file(path: &std::path::Path, client_path: &str) -> Result<OpenedFile, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| FileError::from_io(client_path, Access::Read, error))?;
    let metadata = file
        .metadata()
        .map_err(|error| FileError::from_io(client_path, Access::Read, error))?;
    if metadata.is_dir() {
        return Err(FileError::IsADirectory {
            path: client_path.into(),
            access: Access::Read,
        });
    }
    if !metadata.is_file() {
        return Err(FileError::NotARegularFile {
            path: client_path.into(),
            access: Access::Read,
        });
    }
    Ok(OpenedFile { file, metadata })
}

fn validator_headers(etag: &str, metadata: &Metadata) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(ETAG, value);
    }
    if let Ok(modified) = metadata.modified() {
        if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(modified)) {
            headers.insert(LAST_MODIFIED, value);
        }
    }
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers
}

/// `length` bytes of `file` from `offset`, streamed in chunks (never buffered whole).
async fn file_body(
    file: File,
    offset: u64,
    length: u64,
    body_wanted: BodyWanted,
) -> Result<Body, FileError> {
    if body_wanted == BodyWanted::No {
        return Ok(Body::empty());
    }
    let mut file = tokio::fs::File::from_std(file);
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|error| FileError::Internal(format!("seek: {error}")))?;
    }
    // `take` keeps the body exactly `Content-Length` long even if the file grows meanwhile.
    let reader = file.take(length);
    Ok(Body::from_stream(ReaderStream::with_capacity(
        reader,
        READ_CHUNK_BYTES,
    )))
}

fn content_response(
    status: StatusCode,
    mut headers: HeaderMap,
    length: u64,
    content_range: Option<String>,
    body: Body,
) -> Response {
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Set explicitly so a HEAD answer (empty body) still carries the file's real size.
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    if let Some(content_range) = content_range.and_then(|text| HeaderValue::from_str(&text).ok()) {
        headers.insert(CONTENT_RANGE, content_range);
    }
    (status, headers, body).into_response()
}

fn unsatisfiable(size: u64, mut headers: HeaderMap) -> Response {
    if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
        headers.insert(CONTENT_RANGE, value);
    }
    let body = ErrorBody::new(
        kinds::READ_ERROR,
        format!("range not satisfiable: the file has {size} bytes"),
    );
    (StatusCode::RANGE_NOT_SATISFIABLE, headers, Json(body)).into_response()
}
