//! `POST /upload?path=P` (spec §3.5.1): multipart field `file`, create or overwrite, parents
//! created, streamed to disk, atomically replacing the target.
//!
//! The request body is pumped on the async side into a bounded channel; one blocking thread,
//! acting as the run user, creates the parents and a temporary file next to the target, writes
//! the chunks and renames the temporary file over the target. Readers see the old file or the
//! new one, never half of one; an aborted upload leaves the target untouched.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Multipart, Query, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cordon_api::agent::DEFAULT_UPLOAD_MAX_BYTES;
use serde::Serialize;
use tokio::sync::mpsc;

use super::error::{Access, FileError};
use super::{as_run_user, path_param, resolve_client_path, PathQuery};
use crate::AppState;

/// The multipart field carrying the file.
const FILE_FIELD: &str = "file";
/// Other fields skipped before giving up on finding `file`.
const MAX_SKIPPED_FIELDS: usize = 16;
/// Multipart framing allowed on top of the file itself when checking `Content-Length` early.
const MULTIPART_OVERHEAD_BYTES: u64 = 64 * 1024;
/// Chunks in flight between the network and the disk writer (bounds memory per upload).
const CHANNEL_CHUNKS: usize = 32;
/// Small network chunks are coalesced into writes of up to this size.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// What the pump sends the disk writer. The channel closing without `End` means "abort".
enum Piece {
    Data(Bytes),
    End,
}

#[derive(Serialize)]
struct Uploaded {
    path: String,
    size_bytes: u64,
}

pub async fn upload(
    State(state): State<AppState>,
    query: Result<Query<PathQuery>, QueryRejection>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    match receive_upload(&state, query, &headers, multipart).await {
        Ok(uploaded) => Json(uploaded).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn receive_upload(
    state: &AppState,
    query: Result<Query<PathQuery>, QueryRejection>,
    headers: &HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Uploaded, FileError> {
    let client_path = path_param(query)?;
    if client_path.ends_with('/') {
        return Err(FileError::IsADirectory {
            path: client_path,
            access: Access::Write,
        });
    }
    let limit = state
        .config
        .get()
        .upload_max_bytes
        .unwrap_or(DEFAULT_UPLOAD_MAX_BYTES);
    refuse_declared_oversize(headers, limit)?;
    let mut multipart = multipart.map_err(|rejection| {
        FileError::InvalidRequest(format!("multipart: {}", rejection.body_text()))
    })?;

    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    let writer_path = client_path.clone();
    let writer = as_run_user(state, move |identity| {
        let target = resolve_client_path(&writer_path, &identity.home)?;
        write_atomically(&target, &writer_path, receiver)
    });
    let (pumped, written) = tokio::join!(pump_file_field(&mut multipart, sender, limit), writer);
    match (pumped, written) {
        // The writer stopped first (disk full, permission denied): its error is the real one.
        (Err(PumpError::WriterGone), Err(error)) => Err(error),
        (Err(PumpError::Request(error)), _) => Err(error),
        (_, Err(error)) => Err(error),
        (Err(PumpError::WriterGone), Ok(_)) => {
            Err(FileError::Internal("upload writer stopped".into()))
        }
        (Ok(()), Ok(size_bytes)) => Ok(Uploaded {
            path: client_path,
            size_bytes,
        }),
    }
}

/// Answers 413 before reading anything when the declared body cannot fit.
fn refuse_declared_oversize(headers: &HeaderMap, limit: u64) -> Result<(), FileError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit.saturating_add(MULTIPART_OVERHEAD_BYTES) => {
            Err(FileError::TooLarge { limit })
        }
        _ => Ok(()),
    }
}

/// Finds the `file` field and pumps it; other fields are skipped (a bounded number of them).
async fn pump_file_field(
    multipart: &mut Multipart,
    sender: mpsc::Sender<Piece>,
    limit: u64,
) -> Result<(), PumpError> {
    for _ in 0..=MAX_SKIPPED_FIELDS {
        let field = multipart.next_field().await.map_err(|error| {
            PumpError::Request(FileError::InvalidRequest(format!(
                "multipart: {}",
                error.body_text()
            )))
        })?;
        let Some(field) = field else { break };
        if field.name() == Some(FILE_FIELD) {
            return pump(field, sender, limit).await;
        }
    }
    Err(PumpError::Request(FileError::InvalidRequest(format!(
        "multipart body has no {FILE_FIELD:?} field"
    ))))
}

enum PumpError {
    /// The request body was malformed, cut short or too large.
    Request(FileError),
    /// The disk writer hung up; it reports why.
    WriterGone,
}

/// Moves the field's bytes into the writer's channel, enforcing the size cap as it goes.
async fn pump(
    mut field: Field<'_>,
    sender: mpsc::Sender<Piece>,
    limit: u64,
) -> Result<(), PumpError> {
    let mut received: u64 = 0;
    loop {
        let chunk = field.chunk().await.map_err(|error| {
            PumpError::Request(FileError::InvalidRequest(format!(
                "upload body: {}",
                error.body_text()
            )))
        })?;
        let Some(chunk) = chunk else { break };
        received += chunk.len() as u64;
        if received > limit {
            return Err(PumpError::Request(FileError::TooLarge { limit }));
        }
        sender
            .send(Piece::Data(chunk))
            .await
            .map_err(|_| PumpError::WriterGone)?;
    }
    sender
        .send(Piece::End)
        .await
        .map_err(|_| PumpError::WriterGone)
}

/// Blocking, as the run user: writes everything received into a temporary file beside
/// `target` and renames it over `target` once the upload completed. Returns the size.
/// Nothing on disk changes before the first piece arrives, and an aborted upload removes the
/// directories it created.
fn write_atomically(
    target: &Path,
    client_path: &str,
    mut pieces: mpsc::Receiver<Piece>,
) -> Result<u64, FileError> {
    let io_error = |error| FileError::from_io(client_path, Access::Write, error);
    let aborted = || FileError::Internal("upload aborted".into());
    let Some(first) = pieces.blocking_recv() else {
        return Err(aborted());
    };
    let target = final_target(target, client_path)?;
    let directory = target.parent().ok_or_else(|| FileError::IsADirectory {
        path: client_path.into(),
        access: Access::Write,
    })?;
    let mut created = CreatedDirectories::create(directory).map_err(io_error)?;

    let temporary = TemporaryFile::create_in(directory).map_err(io_error)?;
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, &temporary.file);
    let mut written: u64 = 0;
    let mut next = Some(first);
    loop {
        match next {
            Some(Piece::Data(bytes)) => {
                writer.write_all(&bytes).map_err(io_error)?;
                written += bytes.len() as u64;
            }
            Some(Piece::End) => break,
            None => return Err(aborted()),
        }
        next = pieces.blocking_recv();
    }
    writer.flush().map_err(io_error)?;
    drop(writer);
    keep_mode_of_replaced_file(&temporary.file, &target);
    temporary.rename_to(&target).map_err(io_error)?;
    created.keep();
    Ok(written)
}

/// `mkdir -p` that remembers what it made, so a failed upload can take it back.
struct CreatedDirectories {
    /// Outermost first.
    paths: Vec<PathBuf>,
}

impl CreatedDirectories {
    fn create(directory: &Path) -> std::io::Result<CreatedDirectories> {
        let missing: Vec<&Path> = directory
            .ancestors()
            .take_while(|ancestor| std::fs::symlink_metadata(ancestor).is_err())
            .collect();
        let mut created = CreatedDirectories {
            paths: Vec::with_capacity(missing.len()),
        };
        for path in missing.into_iter().rev() {
            match std::fs::create_dir(path) {
                Ok(()) => created.paths.push(path.to_path_buf()),
                // Someone else made it meanwhile: fine, and not ours to remove.
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
        }
        Ok(created)
    }

    fn keep(&mut self) {
        self.paths.clear();
    }
}

impl Drop for CreatedDirectories {
    fn drop(&mut self) {
        // `remove_dir` only removes empty directories: anything put there meanwhile stays.
        for path in self.paths.iter().rev() {
            if std::fs::remove_dir(path).is_err() {
                break;
            }
        }
    }
}

/// The file to replace: a symlink at `target` is followed (like `open(2)` would), so uploading
/// onto a link updates what it points to rather than replacing the link.
fn final_target(target: &Path, client_path: &str) -> Result<PathBuf, FileError> {
    match std::fs::symlink_metadata(target) {
        Ok(metadata) if metadata.is_dir() => Err(FileError::IsADirectory {
            path: client_path.into(),
            access: Access::Write,
        }),
        Ok(metadata) if metadata.file_type().is_symlink() => match std::fs::canonicalize(target) {
            Ok(resolved) if resolved.is_dir() => Err(FileError::IsADirectory {
                path: client_path.into(),
                access: Access::Write,
            }),
            Ok(resolved) => Ok(resolved),
            // A dangling link: replace the link itself.
            Err(_) => Ok(target.to_path_buf()),
        },
        _ if target.file_name().is_none() => Err(FileError::BadPath {
            path: client_path.into(),
            access: Access::Write,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        }),
        _ => Ok(target.to_path_buf()),
    }
}

/// Overwriting keeps the old file's permission bits (an executable script stays executable),
/// but never setuid, setgid or sticky: the new file may have another owner.
fn keep_mode_of_replaced_file(new_file: &File, target: &Path) {
    if let Ok(old) = std::fs::metadata(target) {
        if old.is_file() {
            let mode = old.permissions().mode() & 0o777;
            if let Err(error) = new_file.set_permissions(std::fs::Permissions::from_mode(mode)) {
                tracing::debug!(%error, "could not keep the replaced file's mode");
            }
        }
    }
}

/// A uniquely named file beside the target; removed on drop unless renamed into place.
struct TemporaryFile {
    file: File,
    path: PathBuf,
    renamed: bool,
}

impl TemporaryFile {
    fn create_in(directory: &Path) -> std::io::Result<TemporaryFile> {
        // Short fixed-length name: the target's own name may already be at NAME_MAX.
        let path = directory.join(format!(".cordon-upload-{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TemporaryFile {
            file,
            path,
            renamed: false,
        })
    }

    fn rename_to(mut self, target: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, target)?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        if !self.renamed {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(%error, path = %self.path.display(), "cannot remove upload temp file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(pieces: Vec<Piece>) -> mpsc::Receiver<Piece> {
        let (sender, receiver) = mpsc::channel(pieces.len().max(1));
        for piece in pieces {
            assert!(sender.try_send(piece).is_ok());
        }
        receiver
    }

    fn entries(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_creates_parents_and_leaves_no_temporary() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("a/b/c.txt");
        let pieces = feed(vec![
            Piece::Data(Bytes::from("hello ")),
            Piece::Data(Bytes::from("world")),
            Piece::End,
        ]);
        assert_eq!(write_atomically(&target, "a/b/c.txt", pieces).unwrap(), 11);
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
        assert_eq!(entries(&root.path().join("a/b")), vec!["c.txt"]);
    }

    #[test]
    fn aborted_upload_keeps_the_old_file() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("f");
        std::fs::write(&target, "old").unwrap();
        // No `End`: the sender went away mid-upload.
        let pieces = feed(vec![Piece::Data(Bytes::from("partial"))]);
        assert!(write_atomically(&target, "f", pieces).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(entries(root.path()), vec!["f"]);
    }

    #[test]
    fn aborted_upload_removes_the_directories_it_made() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("existing")).unwrap();
        let target = root.path().join("existing/new/deeper/f");
        let pieces = feed(vec![Piece::Data(Bytes::from("partial"))]);
        assert!(write_atomically(&target, "f", pieces).is_err());
        assert_eq!(entries(root.path()), vec!["existing"]);
        assert!(entries(&root.path().join("existing")).is_empty());
    }

    #[test]
    fn nothing_is_touched_before_the_first_piece() {
        let root = tempfile::tempdir().unwrap();
        let (sender, receiver) = mpsc::channel(1);
        drop(sender);
        let result = write_atomically(&root.path().join("a/b"), "a/b", receiver);
        assert!(result.is_err());
        assert!(entries(root.path()).is_empty());
    }

    #[test]
    fn overwrite_keeps_mode_and_follows_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("script.sh");
        std::fs::write(&real, "old").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o4751)).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write_atomically(
            &link,
            "link",
            feed(vec![Piece::Data(Bytes::from("new")), Piece::End]),
        )
        .unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        // The permission bits are kept, the setuid bit is not.
        assert_eq!(
            std::fs::metadata(&real).unwrap().permissions().mode() & 0o7777,
            0o751
        );
    }

    #[test]
    fn directory_target_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let result = write_atomically(root.path(), "dir", feed(vec![Piece::End]));
        assert!(matches!(result, Err(FileError::IsADirectory { .. })));
    }

    #[test]
    fn declared_oversize_is_refused_early() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, "2000000".parse().unwrap());
        assert!(matches!(
            refuse_declared_oversize(&headers, 1000),
            Err(FileError::TooLarge { limit: 1000 })
        ));
        assert!(refuse_declared_oversize(&headers, 10_000_000).is_ok());
        assert!(refuse_declared_oversize(&HeaderMap::new(), 1).is_ok());
    }
}
