//! Snapshot handlers: build from an image (spec §2.3.1), get, list, delete, tags by name,
//! capture from a sandbox (§2.2.11) and the import extension (`POST /snapshots/import`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cordon_api::RunConfig;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;

use super::names::{
    is_system_name, split_reference, valid_snapshot_name, valid_tag, ImageReference, DEFAULT_TAG,
};
use super::record::{BuildSource, SnapshotRecord, SnapshotStatus};
use super::Found;
use crate::control::json_object;
use crate::error::{ApiError, FieldError};
use crate::model::{now_ms, Status};
use crate::paging::{page, PageRequest};
use crate::validate::Fields;
use crate::{App, Workspace};

type ApiResult = Result<Response, ApiError>;

/// `fs_capacity_bytes` of a capture, import or template build that names none and whose sandbox has none.
pub const DEFAULT_FS_CAPACITY: u64 = 8 << 30;
/// Longest an upload may pause between two chunks.
const UPLOAD_IDLE_LIMIT: Duration = Duration::from_secs(60);

fn missing(field: &str) -> FieldError {
    FieldError {
        loc: vec!["body".into(), field.into()],
        msg: "Field required".into(),
        kind: "missing",
    }
}

fn system_is_read_only() -> ApiError {
    ApiError::Forbidden("the system/ namespace is read-only".into())
}

/// A snapshot name and tag from a body, with their field errors.
fn name_and_tag(f: &mut Fields<'_>) -> (Option<String>, String) {
    let name = f.string("name");
    let tag = f.string("tag");
    if name.as_deref().is_some_and(|n| !valid_snapshot_name(n)) {
        f.errors.push(FieldError::value(
            "name",
            "Value error, name must be lowercase components ([a-z0-9] joined by '.', '_' or \
             '-') separated by '/', at most 255 characters",
        ));
    }
    if tag.as_deref().is_some_and(|t| !valid_tag(t)) {
        f.errors.push(FieldError::value(
            "tag",
            "Value error, tag must be 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
        ));
    }
    (name, tag.unwrap_or_default())
}

fn new_record(
    workspace: &Workspace,
    name: String,
    tag: String,
    source: BuildSource,
    fs_capacity_bytes: u64,
    requested_run_config: RunConfig,
) -> SnapshotRecord {
    let now = now_ms();
    SnapshotRecord {
        id: uuid::Uuid::new_v4().to_string(),
        workspace: workspace.0.clone(),
        name,
        status: SnapshotStatus::Building,
        status_message: None,
        source,
        tag,
        fs_capacity_bytes,
        fs_used_bytes: None,
        image_digest: None,
        layers: Vec::new(),
        requested_run_config,
        run_config: RunConfig::default(),
        created_at: now,
        updated_at: now,
    }
}

/// `POST {base}/snapshots`: answers at once with the `building` snapshot.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    body: Bytes,
) -> ApiResult {
    let body = json_object(&body)?;
    let mut f = Fields::new(&body);
    let (name, tag) = name_and_tag(&mut f);
    let docker_image = f.string("docker_image");
    let fs_capacity_bytes = f.fs_capacity_bytes();
    let registry_id = f.string("registry_id");
    let run_config = f.run_config().unwrap_or_default();
    let image = docker_image.as_deref().and_then(|image| {
        ImageReference::parse(image)
            .map_err(|e| f.errors.push(FieldError::value("docker_image", e)))
            .ok()
    });
    let mut errors = f.errors;
    for (field, absent) in [
        ("name", name.is_none()),
        ("docker_image", docker_image.is_none()),
        ("fs_capacity_bytes", fs_capacity_bytes.is_none()),
    ] {
        let reported = errors
            .iter()
            .any(|e| e.loc.last().is_some_and(|l| l == field));
        if absent && !reported {
            errors.push(missing(field));
        }
    }
    let (Some(name), Some(docker_image), Some(image), Some(fs_capacity_bytes), true) = (
        name,
        docker_image,
        image,
        fs_capacity_bytes,
        errors.is_empty(),
    ) else {
        return Err(ApiError::Validation(errors));
    };
    if is_system_name(&name) {
        return Err(system_is_read_only());
    }
    let pull = PullRequest {
        name,
        tag,
        docker_image,
        image,
        fs_capacity_bytes,
        registry_id,
        run_config,
    };
    let snapshot = start_pull(&app, &workspace, pull).await?;
    Ok(Json(snapshot.to_json(&[])).into_response())
}

/// A validated build of a snapshot from a registry image.
pub struct PullRequest {
    pub name: String,
    /// Empty for the image's own tag.
    pub tag: String,
    pub docker_image: String,
    pub image: ImageReference,
    pub fs_capacity_bytes: u64,
    /// The registry asked for; else the workspace's registry for the image's host, if any.
    pub registry_id: Option<String>,
    pub run_config: RunConfig,
}

/// Records the `building` snapshot of `pull` and starts its build in the background, as
/// `POST /snapshots` does (templates that name an image build through here too).
pub async fn start_pull(
    app: &App,
    workspace: &Workspace,
    pull: PullRequest,
) -> Result<SnapshotRecord, ApiError> {
    let registry_id = registry_for(app, workspace, &pull.image, pull.registry_id.as_deref())?;
    let tag = if pull.tag.is_empty() {
        pull.image.tag().to_string()
    } else {
        pull.tag
    };
    let snapshot = new_record(
        workspace,
        pull.name,
        tag,
        BuildSource::Pull {
            docker_image: pull.docker_image,
            registry_id,
        },
        pull.fs_capacity_bytes,
        pull.run_config,
    );
    app.snapshots.insert_and_build(&snapshot).await?;
    Ok(snapshot)
}

/// The registry whose credentials a pull of `image` uses: the one asked for (which must
/// serve the image's host), else the workspace's registry for that host, if any.
fn registry_for(
    app: &App,
    workspace: &Workspace,
    image: &ImageReference,
    asked: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let host = image.host();
    let Some(asked) = asked else {
        let registries = app.store.list_registries(&workspace.0)?;
        let serving = registries
            .iter()
            .filter(|r| r.host().as_deref() == Some(host.as_str()))
            .min_by_key(|r| r.created_at);
        return Ok(serving.map(|r| r.id.clone()));
    };
    let invalid = |msg: String| ApiError::Validation(vec![FieldError::value("registry_id", msg)]);
    let registry = app
        .store
        .find_registry(&workspace.0, asked)?
        .ok_or_else(|| invalid(format!("Value error, registry '{asked}' not found")))?;
    if registry.host().as_deref() != Some(host.as_str()) {
        return Err(invalid(format!(
            "Value error, registry '{}' serves {}, but the image is on {host}",
            registry.name,
            registry.host().unwrap_or_default()
        )));
    }
    Ok(Some(registry.id))
}

/// `GET {base}/snapshots/{ref}` (spec §2.3.2).
pub async fn get(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(reference): Path<String>,
) -> ApiResult {
    let found = app.snapshots.find_or_404(&workspace.0, &reference)?;
    Ok(Json(app.snapshots.to_json(&found)?).into_response())
}

const STATUSES: [&str; 4] = ["building", "ready", "failed", "deleting"];

/// `GET {base}/snapshots` (spec §2.3.3): the system snapshot, then the workspace's newest
/// first.
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let request = PageRequest::from_query(&query, 50, 500)?;
    let status = query.get("status").map(String::as_str);
    if let Some(status) = status.filter(|s| !STATUSES.contains(s)) {
        return Err(ApiError::Invalid(format!(
            "status must be one of {}, got {status:?}",
            STATUSES.join(", ")
        )));
    }
    let needle = query.get("name_contains").map(|s| s.to_lowercase());
    let wanted = |name: &str, snapshot_status: &str| {
        needle.as_deref().is_none_or(|n| name.contains(n))
            && status.is_none_or(|s| s == snapshot_status)
    };
    let snapshots = &app.snapshots;
    let mut items = Vec::new();
    if wanted(snapshots.system_name(), "ready") {
        items.push(snapshots.system_json());
    }
    for snapshot in app.store.list_snapshots(&workspace.0)? {
        if wanted(&snapshot.name, snapshot.status.as_str()) {
            items.push(snapshot.to_json(&app.store.tags_of(&snapshot.id)?));
        }
    }
    Ok(Json(page(items, request.start, request.size, "snapshots")).into_response())
}

/// `DELETE {base}/snapshots/{ref}`: sandboxes from it keep their layers.
pub async fn delete(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(reference): Path<String>,
) -> ApiResult {
    match app.snapshots.find_or_404(&workspace.0, &reference)? {
        Found::System => Err(system_is_read_only()),
        Found::Workspace(snapshot) => {
            app.snapshots.delete(&snapshot)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// `GET {base}/snapshots-by-name/{name}` (spec §2.3.5).
pub async fn tags_by_name(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> ApiResult {
    if name.contains(':') {
        return Err(ApiError::Invalid(format!(
            "'{name}' names a tag; ask for the name alone"
        )));
    }
    let snapshots = &app.snapshots;
    if name == snapshots.system_name() {
        let tags = [
            json!({"tag": snapshots.system_tag(), "snapshot_id": snapshots.sandboxes.snapshot_id}),
        ];
        return Ok(Json(json!({"name": name, "tags": tags})).into_response());
    }
    let tags = app.store.tags_by_name(&workspace.0, &name)?;
    if tags.is_empty() && !app.store.snapshot_name_exists(&workspace.0, &name)? {
        return Err(ApiError::NotFound(format!("Snapshot '{name}' not found")));
    }
    let tags: Vec<Value> = tags
        .into_iter()
        .map(|(tag, id)| json!({"tag": tag, "snapshot_id": id}))
        .collect();
    Ok(Json(json!({"name": name, "tags": tags})).into_response())
}

/// `POST {base}/boxes/{name}/snapshot` (spec §2.2.11): the sandbox's persistent filesystem
/// over its base becomes a new snapshot; answers at once with it `building`.
pub async fn capture(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(sandbox_name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body: Map<String, Value> = json_object(&body)?;
    let sandbox = app
        .store
        .find(&workspace.0, &sandbox_name)?
        .ok_or_else(|| ApiError::NotFound(format!("Sandbox '{sandbox_name}' not found")))?;
    let mut f = Fields::new(&body);
    let (name, tag) = name_and_tag(&mut f);
    let docker_image = f.string("docker_image");
    let fs_capacity_bytes = f.fs_capacity_bytes();
    let run_config = f.run_config().unwrap_or_default();
    let mut errors = f.errors;
    if name.is_none() {
        errors.push(missing("name"));
    }
    let (Some(name), true) = (name, errors.is_empty()) else {
        return Err(ApiError::Validation(errors));
    };
    if is_system_name(&name) {
        return Err(system_is_read_only());
    }
    if docker_image.is_some() {
        return Err(ApiError::NotImplemented(
            "exporting a Docker image from inside a sandbox is not supported: sandboxes here \
             run no Docker daemon; capture the root filesystem instead (omit docker_image)"
                .into(),
        ));
    }
    if !sandbox.persistent {
        return Err(ApiError::Invalid(format!(
            "sandbox '{}' is not persistent: its filesystem is discarded on stop and cannot \
             be captured",
            sandbox.name
        )));
    }
    if sandbox.status == Status::Provisioning {
        return Err(ApiError::NotReady(format!(
            "sandbox '{}' is still provisioning; capture it once it is ready",
            sandbox.name
        )));
    }
    let snapshot = new_record(
        &workspace,
        name,
        if tag.is_empty() {
            DEFAULT_TAG.into()
        } else {
            tag
        },
        BuildSource::Capture {
            sandbox_id: sandbox.id.clone(),
        },
        fs_capacity_bytes
            .or(sandbox.fs_capacity_bytes)
            .unwrap_or(DEFAULT_FS_CAPACITY),
        run_config,
    );
    app.snapshots.insert_and_build(&snapshot).await?;
    Ok(Json(snapshot.to_json(&[])).into_response())
}

/// `POST {base}/snapshots/import?name=NAME[&tag=TAG][&fs_capacity_bytes=N]` with an OCI
/// layout (tar) or `docker save` archive as the body: stored in the data dir, then built in
/// the background like a pull. An archive with several images must name one `name:tag`.
pub async fn import(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let (name, tag, fs_capacity_bytes) = import_params(&query)?;
    if is_system_name(&name) {
        return Err(system_is_read_only());
    }
    let limit = app.snapshots.limits.max_import_bytes;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let mut snapshot = new_record(
        &workspace,
        name,
        tag,
        BuildSource::Import {
            archive: Default::default(),
        },
        fs_capacity_bytes,
        RunConfig::default(),
    );
    let archive = app.snapshots.import_archive_path(&snapshot.id);
    // Removes the upload however this handler ends, a dropped connection included, until
    // the build owns it.
    let upload = UploadedFile(Some(archive.clone()));
    receive_archive(body, &archive, limit).await?;
    snapshot.source = BuildSource::Import { archive };
    app.snapshots.insert_and_build(&snapshot).await?;
    upload.hand_over();
    Ok(Json(snapshot.to_json(&[])).into_response())
}

/// An uploaded file, removed on drop unless handed over to its build.
struct UploadedFile(Option<std::path::PathBuf>);

impl UploadedFile {
    fn hand_over(mut self) {
        self.0 = None;
    }
}

impl Drop for UploadedFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "the archive is larger than this server accepts ({limit} bytes, --max-import-bytes)"
    ))
}

/// `name` (which may carry `:tag`), `tag` and `fs_capacity_bytes` of an import.
fn import_params(query: &HashMap<String, String>) -> Result<(String, String, u64), ApiError> {
    let invalid = |msg: String| ApiError::Invalid(msg);
    let reference = query
        .get("name")
        .ok_or_else(|| invalid("the name query parameter is required".into()))?;
    let (name, tag_in_name) = split_reference(reference);
    let tag = query
        .get("tag")
        .map(String::as_str)
        .or(tag_in_name)
        .unwrap_or(DEFAULT_TAG);
    if !valid_snapshot_name(name) {
        return Err(invalid(format!(
            "invalid snapshot name {name:?}: lowercase components separated by '/'"
        )));
    }
    if !valid_tag(tag) {
        return Err(invalid(format!("invalid tag {tag:?}")));
    }
    let capacity = match query.get("fs_capacity_bytes") {
        None => DEFAULT_FS_CAPACITY,
        Some(value) => {
            let object = Map::from_iter([(
                "fs_capacity_bytes".to_string(),
                value.parse::<u64>().map(Value::from).unwrap_or(Value::Null),
            )]);
            let mut f = Fields::new(&object);
            match f.fs_capacity_bytes() {
                Some(n) => n,
                None => {
                    return Err(invalid(format!(
                        "fs_capacity_bytes must be a byte count from 8 MiB to 1 TiB, got {value:?}"
                    )))
                }
            }
        }
    };
    Ok((name.to_string(), tag.to_string(), capacity))
}

/// Streams the request body into `path` (created 0600), at most `limit` bytes.
async fn receive_archive(body: Body, path: &std::path::Path, limit: u64) -> Result<(), ApiError> {
    let internal = |e: std::io::Error| ApiError::Internal(format!("storing the upload: {e}"));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(internal)?;
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    loop {
        let chunk = match tokio::time::timeout(UPLOAD_IDLE_LIMIT, stream.next()).await {
            Err(_) => return Err(ApiError::Invalid("the upload stalled".into())),
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return Err(ApiError::Invalid(format!("reading the upload: {error}")))
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        received = received.saturating_add(chunk.len() as u64);
        if received > limit {
            return Err(too_large(limit));
        }
        file.write_all(&chunk).await.map_err(internal)?;
    }
    if received == 0 {
        return Err(ApiError::Invalid(
            "the request body is empty: send the archive as the body".into(),
        ));
    }
    file.sync_all().await.map_err(internal)
}
