//! Templates (spec §2.8): a snapshot reference, resources and sandbox settings defined once
//! per workspace and reused by `POST /boxes {template_name}` and by pools.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cordon_api::RunConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::control::json_object;
use crate::egress::StoredProxyConfig;
use crate::error::{ApiError, FieldError};
use crate::model::{iso8601, now_ms};
use crate::snapshots::names::ImageReference;
use crate::snapshots::record::{SnapshotRecord, SnapshotStatus};
use crate::snapshots::routes::{start_pull, PullRequest, DEFAULT_FS_CAPACITY};
use crate::store::StoreError;
use crate::validate::{valid_name, Fields};
use crate::{App, Workspace};

/// Most templates one workspace may hold.
const MAX_TEMPLATES_PER_WORKSPACE: usize = 256;
const MAX_VOLUME_MOUNTS: usize = 16;
const MAX_PATH_BYTES: usize = 4096;
const MAX_PROXY_CONFIG_BYTES: usize = 64 << 10;
const MAX_REFERENCE_BYTES: usize = 512;
const MAX_CPU_MILLICORES: u64 = 256_000;
const MIN_MEM_BYTES: u64 = 16 << 20;
const MAX_BYTES: u64 = 1 << 40;
const MIN_STORAGE_BYTES: u64 = 8 << 20;
/// What the legacy clients default `resources` to.
const DEFAULT_CPU: &str = "500m";
const DEFAULT_MEMORY: &str = "512Mi";
/// Where a template's own snapshot builds go: `templates/<template name>:<image tag>`.
const BUILD_NAMESPACE: &str = "templates/";
/// How often a create from a template whose snapshot is building looks again.
const BUILD_POLL: Duration = Duration::from_millis(250);
/// The only runtime backend this server has.
const RUNTIMES: &[&str] = &["namespace"];

type ApiResult = Result<Response, ApiError>;

/// `resources` as the client sent them (echoed) and as parsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu: String,
    pub memory: String,
    pub storage: Option<String>,
    pub cpu_millicores: u32,
    pub mem_bytes: u64,
    pub fs_capacity_bytes: Option<u64>,
}

/// One template as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub id: String,
    pub workspace: String,
    pub name: String,
    /// A snapshot reference (id, `name`, `name:tag`), resolved at every use so a moved tag
    /// takes effect; or an image reference the template built `snapshot_id` from (echoed as
    /// given).
    pub image: String,
    /// The snapshot this template built from `image` when `image` named no snapshot.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    pub resources: Resources,
    /// Accepted and echoed; volumes are not implemented, so nothing is mounted.
    pub volume_mounts: Vec<Value>,
    pub run_config: Option<RunConfig>,
    /// `proxy_config` (spec §6.1), sealed (bound to the template id), with the redacted copy
    /// responses show; applied to the sandboxes made from the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_proxy_config: Option<StoredProxyConfig>,
    /// A `proxy_config` an older server stored in plaintext: still read and applied, sealed
    /// at the template's next save.
    #[serde(
        default,
        rename = "proxy_config",
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_proxy_config: Option<Value>,
    pub runtime: Option<String>,
    pub idle_ttl_seconds: Option<u64>,
    pub delete_after_stop_seconds: Option<u64>,
    pub created_at: u64,
    pub updated_at: u64,
}

impl TemplateRecord {
    /// The snapshot reference sandboxes from this template boot from.
    pub fn snapshot_reference(&self) -> &str {
        self.snapshot_id.as_deref().unwrap_or(&self.image)
    }

    /// The Template object of spec §2.8 plus the extension fields; `build` is the snapshot
    /// it built from its image, if it did (`status` is `ready` for a snapshot reference).
    pub fn to_json(&self, build: Option<&SnapshotRecord>) -> Value {
        let r = &self.resources;
        let (status, status_message) = match (&self.snapshot_id, build) {
            (None, _) => ("ready", None),
            (Some(_), Some(build)) => (build.status.as_str(), build.status_message.clone()),
            (Some(_), None) => ("failed", Some("its snapshot was deleted".to_string())),
        };
        json!({
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "snapshot_id": self.snapshot_id,
            "status": status,
            "status_message": status_message,
            "resources": {"cpu": r.cpu, "memory": r.memory, "storage": r.storage},
            "cpu_millicores": r.cpu_millicores,
            "mem_bytes": r.mem_bytes,
            "fs_capacity_bytes": r.fs_capacity_bytes,
            "volume_mounts": self.volume_mounts,
            "run_config": self.run_config,
            "proxy_config": self.redacted_proxy_config(),
            "runtime": self.runtime,
            "idle_ttl_seconds": self.idle_ttl_seconds,
            "delete_after_stop_seconds": self.delete_after_stop_seconds,
            "created_at": iso8601(self.created_at),
            "updated_at": iso8601(self.updated_at),
        })
    }

    /// Whether a sandbox made from it differs from a plain one on its snapshot and resources
    /// in more than its resources: such a template's warm sandboxes serve only creates that
    /// name the template.
    pub fn has_sandbox_settings(&self) -> bool {
        self.run_config
            .as_ref()
            .is_some_and(|c| *c != RunConfig::default())
            || self.has_proxy_config()
    }

    pub fn has_proxy_config(&self) -> bool {
        self.sealed_proxy_config.is_some() || self.legacy_proxy_config.is_some()
    }

    /// The `proxy_config` responses show: opaque and key material replaced by `is_set`.
    fn redacted_proxy_config(&self) -> Option<Value> {
        match (&self.sealed_proxy_config, &self.legacy_proxy_config) {
            (Some(stored), _) => Some(stored.redacted.clone()),
            (None, Some(legacy)) => Some(crate::egress::redacted_json(legacy)),
            (None, None) => None,
        }
    }
}

/// A Kubernetes-style CPU quantity (`500m`, `1`, `0.5`) in millicores.
pub fn parse_cpu(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Some(milli) = text.strip_suffix('m') {
        return milli.parse::<u64>().ok();
    }
    let cores: f64 = text.parse().ok()?;
    (cores.is_finite() && cores >= 0.0 && cores <= MAX_CPU_MILLICORES as f64)
        .then(|| (cores * 1000.0).round() as u64)
}

/// A Kubernetes-style byte quantity (`512Mi`, `1Gi`, `1G`, `1000000`) in bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let multiplier: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// Reads one quantity field of `resources`, a string or a number.
fn quantity(
    resources: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match resources.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 32 => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            errors.push(resources_error(field, "Input should be a quantity string"));
            None
        }
    }
}

fn resources_error(field: &str, msg: &str) -> FieldError {
    FieldError {
        loc: vec!["body".into(), "resources".into(), field.into()],
        msg: msg.into(),
        kind: "value_error",
    }
}

fn in_range(value: Option<u64>, min: u64, max: u64) -> Option<u64> {
    value.filter(|v| (min..=max).contains(v))
}

/// `resources`, with the legacy defaults for what is missing.
fn parse_resources(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<Resources> {
    let empty = Map::new();
    let resources = match value {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(_) => {
            errors.push(FieldError::value(
                "resources",
                "Input should be a valid dictionary",
            ));
            return None;
        }
    };
    let before = errors.len();
    let cpu = quantity(resources, "cpu", errors).unwrap_or(DEFAULT_CPU.into());
    let memory = quantity(resources, "memory", errors).unwrap_or(DEFAULT_MEMORY.into());
    let storage = quantity(resources, "storage", errors);
    let cpu_millicores = in_range(parse_cpu(&cpu), 1, MAX_CPU_MILLICORES);
    if cpu_millicores.is_none() {
        errors.push(resources_error(
            "cpu",
            "Value error, cpu must be like \"500m\" or \"1\" (1m to 256 cores)",
        ));
    }
    let mem_bytes = in_range(parse_bytes(&memory), MIN_MEM_BYTES, MAX_BYTES);
    if mem_bytes.is_none() {
        errors.push(resources_error(
            "memory",
            "Value error, memory must be like \"512Mi\" or \"1Gi\" (16Mi to 1Ti)",
        ));
    }
    let fs_capacity_bytes = match &storage {
        None => None,
        Some(text) => {
            let bytes = in_range(parse_bytes(text), MIN_STORAGE_BYTES, MAX_BYTES);
            if bytes.is_none() {
                errors.push(resources_error(
                    "storage",
                    "Value error, storage must be like \"1Gi\" (8Mi to 1Ti)",
                ));
            }
            bytes
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(Resources {
        cpu,
        memory,
        storage,
        cpu_millicores: cpu_millicores? as u32,
        mem_bytes: mem_bytes?,
        fs_capacity_bytes,
    })
}

fn default_resources() -> Resources {
    Resources {
        cpu: DEFAULT_CPU.into(),
        memory: DEFAULT_MEMORY.into(),
        storage: None,
        cpu_millicores: parse_cpu(DEFAULT_CPU).unwrap_or(500) as u32,
        mem_bytes: parse_bytes(DEFAULT_MEMORY).unwrap_or(512 << 20),
        fs_capacity_bytes: None,
    }
}

/// `volume_mounts`: `[{volume_name, mount_path}]`, bounded; echoed only.
fn parse_volume_mounts(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Vec<Value> {
    let mounts = match value {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(mounts)) if mounts.len() <= MAX_VOLUME_MOUNTS => mounts,
        Some(_) => {
            errors.push(FieldError::value(
                "volume_mounts",
                format!("Input should be a list of at most {MAX_VOLUME_MOUNTS} mounts"),
            ));
            return Vec::new();
        }
    };
    let valid = mounts.iter().all(|mount| {
        let text = |key| mount.get(key).and_then(Value::as_str);
        matches!(
            (text("volume_name"), text("mount_path")),
            (Some(volume), Some(path))
                if valid_name(volume) && path.starts_with('/') && path.len() <= MAX_PATH_BYTES
        )
    });
    if !valid {
        errors.push(FieldError::value(
            "volume_mounts",
            "Value error, each mount needs a volume_name and an absolute mount_path",
        ));
        return Vec::new();
    }
    mounts.clone()
}

fn parse_proxy_config(f: &mut Fields) -> Option<Value> {
    let config = f.object("proxy_config")?;
    if config.to_string().len() > MAX_PROXY_CONFIG_BYTES {
        f.errors.push(FieldError::value(
            "proxy_config",
            "Value error, proxy_config too large",
        ));
        return None;
    }
    Some(config)
}

/// Sets the template's `proxy_config` from the body's (null clears it): validated and
/// compiled like a sandbox's, sealed at rest. Also seals a plaintext one left by an older
/// server.
fn apply_proxy_config(
    app: &App,
    given: Option<Value>,
    template: &mut TemplateRecord,
) -> Result<(), ApiError> {
    let egress = app.sandboxes.egress.as_ref();
    match (given, egress) {
        (None, Some(egress)) => egress.seal_legacy(template),
        (None, None) => {}
        (Some(_), None) => {
            return Err(ApiError::Invalid(
                "proxy_config: egress is disabled on this server".into(),
            ))
        }
        (Some(value), Some(egress)) => {
            template.sealed_proxy_config = Some(egress.template_update(template, &value)?);
            template.legacy_proxy_config = None;
        }
    }
    Ok(())
}

fn parse_runtime(f: &mut Fields) -> Option<String> {
    let runtime = f.string("runtime")?;
    if !RUNTIMES.contains(&runtime.as_str()) {
        f.errors.push(FieldError::value(
            "runtime",
            format!("Value error, runtime must be one of {RUNTIMES:?}"),
        ));
        return None;
    }
    Some(runtime)
}

/// What a template's `image` names.
enum ImageSource {
    Snapshot(String),
    /// An image to build the template's snapshot from.
    Build(String, ImageReference),
}

/// A snapshot of the workspace (or the system one) first; else a valid image reference.
fn parse_image(app: &App, workspace: &Workspace, f: &mut Fields) -> Option<ImageSource> {
    let image = f.string("image")?;
    if image.len() > MAX_REFERENCE_BYTES {
        f.errors.push(FieldError::value(
            "image",
            format!("Value error, image longer than {MAX_REFERENCE_BYTES} characters"),
        ));
        return None;
    }
    match app.snapshots.find(&workspace.0, &image) {
        Ok(Some(_)) => return Some(ImageSource::Snapshot(image)),
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(%error, "resolving a template's image");
        }
    }
    match ImageReference::parse(&image) {
        Ok(reference) => Some(ImageSource::Build(image, reference)),
        Err(why) => {
            f.errors.push(FieldError::value(
                "image",
                format!(
                    "Value error, image names no snapshot in this workspace (id, name or \
                     name:tag) and is no image to build from: {why}"
                ),
            ));
            None
        }
    }
}

/// Starts the build of the template's own snapshot, `templates/<name>:<image tag>`, as
/// `POST /snapshots` would; its disk is the template's `storage`, else the default
/// snapshot capacity (8 GiB), which also bounds the unpacked image.
async fn build_snapshot(
    app: &App,
    workspace: &Workspace,
    template: &TemplateRecord,
    image: ImageReference,
) -> Result<SnapshotRecord, ApiError> {
    let pull = PullRequest {
        name: format!("{BUILD_NAMESPACE}{}", template.name),
        tag: String::new(),
        docker_image: template.image.clone(),
        image,
        fs_capacity_bytes: template
            .resources
            .fs_capacity_bytes
            .unwrap_or(DEFAULT_FS_CAPACITY),
        registry_id: None,
        run_config: RunConfig::default(),
    };
    let snapshot = start_pull(app, workspace, pull).await?;
    tracing::info!(template = %template.name, snapshot = %snapshot.id, "building template image");
    Ok(snapshot)
}

/// The snapshot the template built, if it built one and it still exists.
fn own_build(app: &App, template: &TemplateRecord) -> Result<Option<SnapshotRecord>, ApiError> {
    match &template.snapshot_id {
        None => Ok(None),
        Some(id) => Ok(app.store.workspace_snapshot(&template.workspace, id)?),
    }
}

fn template_json(app: &App, template: &TemplateRecord) -> Result<Value, ApiError> {
    Ok(template.to_json(own_build(app, template)?.as_ref()))
}

/// Waits, at most `timeout`, until the snapshot the template built is ready; a clear error
/// when its build failed or outlasts the wait.
pub async fn wait_for_build(
    app: &App,
    template: &TemplateRecord,
    timeout: Duration,
) -> Result<(), ApiError> {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(build) = own_build(app, template)? else {
            if template.snapshot_id.is_some() {
                return Err(ApiError::Conflict(format!(
                    "template '{}': the snapshot built from image '{}' was deleted; set the \
                     image again to rebuild it",
                    template.name, template.image
                )));
            }
            return Ok(());
        };
        match build.status {
            SnapshotStatus::Ready => return Ok(()),
            SnapshotStatus::Failed => {
                return Err(ApiError::Conflict(format!(
                    "template '{}': building image '{}' failed: {}",
                    template.name,
                    template.image,
                    build.status_message.unwrap_or_default()
                )))
            }
            SnapshotStatus::Building if Instant::now() >= deadline => {
                return Err(ApiError::Timeout(format!(
                    "template '{}': image '{}' is still building after {} s; retry later",
                    template.name,
                    template.image,
                    timeout.as_secs()
                )))
            }
            SnapshotStatus::Building => tokio::time::sleep(BUILD_POLL).await,
        }
    }
}

/// Applies the fields present in `body` over `template` (a fresh one for a create); an
/// image to build from is returned for the caller to build once the template is valid.
fn apply_body(
    app: &App,
    workspace: &Workspace,
    body: &Map<String, Value>,
    template: &mut TemplateRecord,
) -> Result<Option<ImageReference>, ApiError> {
    let mut f = Fields::new(body);
    if let Some(name) = f.name() {
        template.name = name;
    }
    let mut to_build = None;
    match parse_image(app, workspace, &mut f) {
        None => {}
        Some(ImageSource::Snapshot(image)) => {
            template.image = image;
            template.snapshot_id = None;
        }
        Some(ImageSource::Build(image, reference)) => {
            // An unchanged image keeps its build (a failed one is retried).
            let unchanged = image == template.image && template.snapshot_id.is_some();
            let failed =
                own_build(app, template)?.is_none_or(|b| b.status == SnapshotStatus::Failed);
            if !unchanged || failed {
                to_build = Some(reference);
            }
            template.image = image;
        }
    }
    let mut errors = std::mem::take(&mut f.errors);
    if body.contains_key("resources") {
        if let Some(resources) = parse_resources(body.get("resources"), &mut errors) {
            template.resources = resources;
        }
    }
    if body.contains_key("volume_mounts") {
        template.volume_mounts = parse_volume_mounts(body.get("volume_mounts"), &mut errors);
    }
    f.errors = errors;
    if body.contains_key("run_config") {
        template.run_config = f.run_config();
    }
    let mut proxy_config = None;
    if body.contains_key("proxy_config") {
        proxy_config = parse_proxy_config(&mut f);
        if proxy_config.is_none() {
            template.sealed_proxy_config = None;
            template.legacy_proxy_config = None;
        }
    }
    if body.contains_key("runtime") {
        template.runtime = parse_runtime(&mut f);
    }
    if body.contains_key("idle_ttl_seconds") {
        template.idle_ttl_seconds = f.ttl("idle_ttl_seconds");
    }
    if body.contains_key("delete_after_stop_seconds") {
        template.delete_after_stop_seconds = f.ttl("delete_after_stop_seconds");
    }
    if !f.errors.is_empty() {
        return Err(ApiError::Validation(f.errors));
    }
    apply_proxy_config(app, proxy_config, template)?;
    Ok(to_build)
}

/// Builds the template's snapshot from `image` when asked to, recording its id.
async fn build_if_asked(
    app: &App,
    workspace: &Workspace,
    template: &mut TemplateRecord,
    image: Option<ImageReference>,
) -> Result<(), ApiError> {
    if let Some(image) = image {
        let snapshot = build_snapshot(app, workspace, template, image).await?;
        template.snapshot_id = Some(snapshot.id);
    }
    Ok(())
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("Template '{name}' not found"))
}

fn name_conflict(error: StoreError) -> ApiError {
    match error {
        StoreError::NameTaken(name) => {
            ApiError::Conflict(format!("a template named '{name}' already exists"))
        }
        other => other.into(),
    }
}

/// The workspace's template `name`.
pub fn find(app: &App, workspace: &Workspace, name: &str) -> Result<TemplateRecord, ApiError> {
    app.store
        .template_by_name(&workspace.0, name)?
        .ok_or_else(|| not_found(name))
}

/// The template a box create names (`template_name`, spec §2.8), if any.
pub fn for_create(
    app: &App,
    workspace: &Workspace,
    body: &Map<String, Value>,
) -> Result<Option<TemplateRecord>, ApiError> {
    match body.get("template_name") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name)) => find(app, workspace, name).map(Some),
        Some(_) => Err(ApiError::Validation(vec![FieldError::value(
            "template_name",
            "Input should be a valid string",
        )])),
    }
}

/// Fills what the create body leaves out from the template: the snapshot, resources, TTLs;
/// the body's run_config goes over the template's.
pub(crate) fn apply_to_create(
    template: &TemplateRecord,
    body: &Map<String, Value>,
    request: &mut crate::control::CreateRequest,
) {
    let given = |field: &str| body.get(field).is_some_and(|v| !v.is_null());
    let record = &mut request.record;
    record.template_name = Some(template.name.clone());
    record.template_id = Some(template.id.clone());
    if request.snapshot.is_none() {
        request.snapshot = Some(template.snapshot_reference().to_string());
    }
    if !given("vcpus") && !given("cpu_millicores") {
        record.cpu_millicores = Some(template.resources.cpu_millicores);
    }
    if !given("mem_bytes") {
        record.mem_bytes = Some(template.resources.mem_bytes);
    }
    if !given("fs_capacity_bytes") {
        record.fs_capacity_bytes = template.resources.fs_capacity_bytes;
    }
    if let (false, Some(ttl)) = (given("idle_ttl_seconds"), template.idle_ttl_seconds) {
        record.idle_ttl_seconds = ttl;
    }
    if let (false, Some(ttl)) = (
        given("delete_after_stop_seconds"),
        template.delete_after_stop_seconds,
    ) {
        record.delete_after_stop_seconds = ttl;
    }
    if let Some(config) = &template.run_config {
        record.run_config = record.run_config.over(config);
    }
}

/// `POST {base}/templates`.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    body: Bytes,
) -> ApiResult {
    let body = json_object(&body)?;
    let missing: Vec<FieldError> = ["name", "image"]
        .iter()
        .filter(|field| body.get(**field).is_none_or(Value::is_null))
        .map(|field| FieldError {
            loc: vec!["body".into(), (*field).into()],
            msg: "Field required".into(),
            kind: "missing",
        })
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::Validation(missing));
    }
    let now = now_ms();
    let mut template = TemplateRecord {
        id: uuid::Uuid::new_v4().to_string(),
        workspace: workspace.0.clone(),
        name: String::new(),
        image: String::new(),
        snapshot_id: None,
        resources: default_resources(),
        volume_mounts: Vec::new(),
        run_config: None,
        sealed_proxy_config: None,
        legacy_proxy_config: None,
        runtime: None,
        idle_ttl_seconds: None,
        delete_after_stop_seconds: None,
        created_at: now,
        updated_at: now,
    };
    let to_build = apply_body(&app, &workspace, &body, &mut template)?;
    if app.store.count_templates(&workspace.0)? >= MAX_TEMPLATES_PER_WORKSPACE {
        return Err(ApiError::Quota(format!(
            "template limit reached ({MAX_TEMPLATES_PER_WORKSPACE} per workspace)"
        )));
    }
    if app
        .store
        .template_by_name(&workspace.0, &template.name)?
        .is_some()
    {
        // Checked before building, so a refused create starts no build.
        return Err(name_conflict(StoreError::NameTaken(template.name.clone())));
    }
    build_if_asked(&app, &workspace, &mut template, to_build).await?;
    app.store
        .insert_template(&template)
        .map_err(name_conflict)?;
    tracing::info!(template = %template.id, name = %template.name, "template created");
    Ok(Json(template_json(&app, &template)?).into_response())
}

/// `GET {base}/templates/{name}`.
pub async fn get(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> ApiResult {
    Ok(Json(template_json(&app, &find(&app, &workspace, &name)?)?).into_response())
}

/// `GET {base}/templates`: `{templates: [...]}`, with `items` beside it.
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
) -> ApiResult {
    let templates = app
        .store
        .list_templates(&workspace.0)?
        .iter()
        .map(|template| template_json(&app, template))
        .collect::<Result<Vec<Value>, ApiError>>()?;
    Ok(Json(json!({"templates": templates, "items": templates})).into_response())
}

/// `PATCH {base}/templates/{name}`: `{name}` (spec), and any other create field. Pools pick
/// the change up on their next pass: warm sandboxes that no longer match are replaced.
pub async fn update(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body = json_object(&body)?;
    let mut template = find(&app, &workspace, &name)?;
    let to_build = apply_body(&app, &workspace, &body, &mut template)?;
    if template.name != name
        && app
            .store
            .template_by_name(&workspace.0, &template.name)?
            .is_some()
    {
        return Err(name_conflict(StoreError::NameTaken(template.name.clone())));
    }
    build_if_asked(&app, &workspace, &mut template, to_build).await?;
    template.updated_at = now_ms();
    app.store
        .update_template(&template)
        .map_err(name_conflict)?;
    app.pools.wake();
    Ok(Json(template_json(&app, &template)?).into_response())
}

/// `DELETE {base}/templates/{name}`: 409 while a pool or a sandbox made from it exists.
pub async fn delete(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> ApiResult {
    let template = find(&app, &workspace, &name)?;
    if !app.store.delete_unused_template(&template.id)? {
        return Err(ApiError::Conflict(format!(
            "Template '{name}' is in use by sandboxes or pools; delete them first"
        )));
    }
    tracing::info!(template = %template.id, name = %template.name, "template deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities() {
        assert_eq!(parse_cpu("500m"), Some(500));
        assert_eq!(parse_cpu("1"), Some(1000));
        assert_eq!(parse_cpu("0.25"), Some(250));
        assert_eq!(parse_cpu("x"), None);
        assert_eq!(parse_cpu("-1"), None);
        assert_eq!(parse_bytes("512Mi"), Some(512 << 20));
        assert_eq!(parse_bytes("1Gi"), Some(1 << 30));
        assert_eq!(parse_bytes("2G"), Some(2_000_000_000));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("1Pi"), None);
        assert_eq!(parse_bytes("Mi"), None);
        assert_eq!(parse_bytes("99999999999999999999Gi"), None);
    }

    /// A record an older server wrote keeps its plaintext `proxy_config` readable (shown
    /// redacted); a new record writes only the sealed form.
    #[test]
    fn legacy_plaintext_proxy_config_still_loads() {
        let legacy = json!({
            "id": "t1", "workspace": "w", "name": "old", "image": "system/default",
            "resources": {"cpu": "500m", "memory": "512Mi", "storage": null,
                "cpu_millicores": 500, "mem_bytes": 536870912, "fs_capacity_bytes": null},
            "volume_mounts": [], "run_config": null,
            "proxy_config": {"rules": [{"name": "api", "match_hosts": ["api.test"],
                "headers": [{"name": "x-key", "type": "opaque", "value": "legacy-secret"}]}]},
            "runtime": null, "idle_ttl_seconds": null, "delete_after_stop_seconds": null,
            "created_at": 1, "updated_at": 1
        });
        let mut record: TemplateRecord = serde_json::from_value(legacy).unwrap();
        assert!(record.legacy_proxy_config.is_some() && record.sealed_proxy_config.is_none());
        assert!(record.has_sandbox_settings());
        let shown = record.to_json(None)["proxy_config"].clone();
        assert_eq!(shown["rules"][0]["headers"][0]["is_set"], true, "{shown}");
        assert!(!shown.to_string().contains("legacy-secret"), "{shown}");

        record.legacy_proxy_config = None;
        record.sealed_proxy_config = Some(StoredProxyConfig {
            sealed: "c2VhbGVk".into(),
            redacted: shown.clone(),
        });
        let written = serde_json::to_value(&record).unwrap();
        assert!(written.get("proxy_config").is_none(), "{written}");
        let back: TemplateRecord = serde_json::from_value(written).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.to_json(None)["proxy_config"], shown);
    }

    #[test]
    fn resources_default_and_refuse_out_of_range() {
        let mut errors = Vec::new();
        let r = parse_resources(None, &mut errors).unwrap();
        assert_eq!((r.cpu_millicores, r.mem_bytes), (500, 512 << 20));
        let bad = json!({"cpu": "0m", "memory": "1Ki", "storage": "lots"});
        assert!(parse_resources(Some(&bad), &mut errors).is_none());
        let fields: Vec<_> = errors.iter().map(|e| e.loc[2].as_str()).collect();
        assert_eq!(fields, ["cpu", "memory", "storage"]);
    }
}
