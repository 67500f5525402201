//! Control-plane handlers of sandboxes (spec §2.2); snapshots are in `snapshots::routes`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, FieldError};
use crate::model::{now_ms, SandboxRecord, Status};
use crate::paging::page;
use crate::validate::{Fields, MAX_CREATE_TIMEOUT};
use crate::{App, Workspace};

const DEFAULT_IDLE_TTL: u64 = 600;
const DEFAULT_DELETE_AFTER_STOP: u64 = 14 * 86_400;
const DEFAULT_CREATE_TIMEOUT: u64 = 30;
/// Most items one list page holds.
const MAX_PAGE: usize = 1000;

type ApiResult = Result<Response, ApiError>;

/// The body as a JSON object, or the 422 array the clients expect.
pub(crate) fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let invalid = |msg: &str| {
        ApiError::Validation(vec![FieldError {
            loc: vec!["body".into()],
            msg: msg.into(),
            kind: "value_error",
        }])
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid("Input should be a valid dictionary")),
        Err(_) => Err(invalid("JSON decode error")),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("Sandbox '{name}' not found"))
}

fn find(app: &App, workspace: &Workspace, key: &str) -> Result<SandboxRecord, ApiError> {
    app.sandboxes
        .store
        .find(&workspace.0, key)?
        .ok_or_else(|| not_found(key))
}

fn sandbox_response(app: &App, headers: &HeaderMap, record: &SandboxRecord) -> Response {
    let json = record.to_json(
        &app.public_base(headers),
        app.sandboxes.base_run_config(record),
    );
    Json(json).into_response()
}

/// What a create body asks for, validated.
pub(crate) struct CreateRequest {
    pub name: Option<String>,
    pub wait_for_ready: bool,
    pub timeout: u64,
    pub snapshot: Option<String>,
    pub record: SandboxRecord,
}

fn parse_create(
    app: &App,
    workspace: &Workspace,
    body: &Map<String, Value>,
) -> Result<CreateRequest, ApiError> {
    let mut f = Fields::new(body);
    let name = f.name();
    let wait_for_ready = f.boolean("wait_for_ready").unwrap_or(true);
    let timeout = f
        .seconds("timeout", MAX_CREATE_TIMEOUT)
        .unwrap_or(DEFAULT_CREATE_TIMEOUT);
    let snapshot = ["snapshot_id", "snapshot", "snapshot_name"]
        .iter()
        .filter_map(|field| f.string(field))
        .next();
    let now = now_ms();
    let record = SandboxRecord {
        id: uuid::Uuid::new_v4().to_string(),
        workspace: workspace.0.clone(),
        name: String::new(),
        status: Status::Provisioning,
        status_message: None,
        snapshot_id: app.sandboxes.snapshot_id.clone(),
        cpu_millicores: f.vcpus_as_millicores(),
        mem_bytes: f.mem_bytes(),
        fs_capacity_bytes: f.fs_capacity_bytes(),
        idle_ttl_seconds: f.ttl("idle_ttl_seconds").unwrap_or(DEFAULT_IDLE_TTL),
        delete_after_stop_seconds: f
            .ttl("delete_after_stop_seconds")
            .unwrap_or(DEFAULT_DELETE_AFTER_STOP),
        persistent: f.boolean("persistent").unwrap_or(true),
        labels: f.labels().unwrap_or_default(),
        access_delegation: f.object("access_delegation"),
        run_config: f.run_config().unwrap_or_default(),
        created_at: now,
        updated_at: now,
        stopped_at: None,
        base: None,
        template_name: None,
        template_id: None,
        runtime: f.runtime().unwrap_or(app.sandboxes.default_runtime),
        proxy_config: None,
    };
    if !app.sandboxes.supports(record.runtime) {
        f.errors.push(crate::error::FieldError::value(
            "runtime",
            format!(
                "the {} runtime is not available on this server",
                record.runtime.as_str()
            ),
        ));
    }
    if !f.errors.is_empty() {
        return Err(ApiError::Validation(f.errors));
    }
    Ok(CreateRequest {
        name,
        wait_for_ready,
        timeout,
        snapshot,
        record,
    })
}

/// `POST {base}/boxes` (spec §2.2.1).
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let body = json_object(&body)?;
    let template = crate::templates::for_create(&app, &workspace, &body)?;
    let mut request = parse_create(&app, &workspace, &body)?;
    if let Some(template) = &template {
        crate::templates::apply_to_create(template, &body, &mut request);
        let timeout = Duration::from_secs(request.timeout);
        crate::templates::wait_for_build(&app, template, timeout).await?;
    }
    // Until the record is in the store, its snapshot's layers must not be reclaimed.
    let claim = app.snapshots.claim_layers().await;
    let (snapshot_id, base, default_fs_capacity) = match &request.snapshot {
        Some(reference) => {
            let found = app.snapshots.find_or_404(&workspace.0, reference)?;
            app.snapshots.sandbox_base(found, reference)?
        }
        None => (
            app.sandboxes.snapshot_id.clone(),
            app.sandboxes.default_base(),
            None,
        ),
    };
    request.record.snapshot_id = snapshot_id;
    request.record.base = Some(base);
    request.record.fs_capacity_bytes = request.record.fs_capacity_bytes.or(default_fs_capacity);
    request.record.proxy_config =
        proxy_config_for_create(&app, &request.record, &body, template.as_ref())?;
    // A warm sandbox has no proxy_config of its own.
    let claimable = request.record.proxy_config.is_none();
    if let Some(warm) = claimable
        .then(|| {
            app.pools
                .try_claim(&workspace.0, &request, template.as_ref(), &body)
        })
        .transpose()?
        .flatten()
    {
        return Ok(sandbox_response(&app, &headers, &warm));
    }
    check_quota(&app, &workspace)?;
    let record = insert_with_name(&app, request.record, request.name)?;
    drop(claim);
    tracing::info!(sandbox = %record.id, name = %record.name, "creating sandbox");
    if !request.wait_for_ready {
        return Ok(sandbox_response(&app, &headers, &record));
    }
    let settled = app
        .sandboxes
        .wait_settled(&record.id, Duration::from_secs(request.timeout))
        .await?
        .ok_or_else(|| not_found(&record.name))?;
    match settled.status {
        Status::Ready => Ok(sandbox_response(&app, &headers, &settled)),
        Status::Provisioning => Err(ApiError::Timeout(format!(
            "Sandbox '{}' not ready after {} s (last status: provisioning)",
            settled.name, request.timeout
        ))),
        status => Err(ApiError::CreationFailed(format!(
            "Sandbox '{}' is {}: {}",
            settled.name,
            status.as_str(),
            settled.status_message.unwrap_or_default()
        ))),
    }
}

/// The create's `proxy_config`, else its template's: validated, compiled once, sealed.
fn proxy_config_for_create(
    app: &App,
    record: &SandboxRecord,
    body: &Map<String, Value>,
    template: Option<&crate::templates::TemplateRecord>,
) -> Result<Option<crate::egress::StoredProxyConfig>, ApiError> {
    let Some(egress) = &app.sandboxes.egress else {
        return Ok(None);
    };
    let config = match body.get("proxy_config").filter(|v| !v.is_null()) {
        Some(value) => Some(crate::egress::Egress::parse(value)?),
        None => match template {
            Some(template) => egress.template_config(template)?,
            None => None,
        },
    };
    config
        .map(|config| egress.seal(&record.id, &config))
        .transpose()
}

fn check_quota(app: &App, workspace: &Workspace) -> Result<(), ApiError> {
    // A pool's warm sandboxes count against its workspace.
    let held =
        app.sandboxes.store.list(Some(&workspace.0))?.len() + app.pools.warm_count(&workspace.0)?;
    if held >= app.max_sandboxes_per_workspace {
        return Err(ApiError::Quota(format!(
            "sandbox count limit reached ({} per workspace)",
            app.max_sandboxes_per_workspace
        )));
    }
    Ok(())
}

/// Inserts the record under the requested name, or a generated `sandbox-<8 hex>`.
fn insert_with_name(
    app: &Arc<App>,
    mut record: SandboxRecord,
    name: Option<String>,
) -> Result<SandboxRecord, ApiError> {
    if let Some(name) = name {
        record.name = name;
        app.sandboxes.create(&record)?;
        return Ok(record);
    }
    for _ in 0..8 {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        record.name = format!("sandbox-{}", &suffix[..8]);
        match app.sandboxes.create(&record) {
            Err(ApiError::Conflict(_)) => continue,
            other => return other.map(|()| record),
        }
    }
    Err(ApiError::Internal("could not generate a free name".into()))
}

/// `GET {base}/boxes/{name}`.
pub async fn get(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let record = find(&app, &workspace, &name)?;
    Ok(sandbox_response(&app, &headers, &record))
}

#[derive(Deserialize)]
pub struct ListQuery {
    offset: Option<usize>,
    limit: Option<usize>,
    page_size: Option<usize>,
    cursor: Option<String>,
    name_contains: Option<String>,
    status: Option<String>,
}

/// `GET {base}/boxes` (spec §2.2.3): both envelopes, paged by offset (the cursor is one).
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> ApiResult {
    let base = app.public_base(&headers);
    let items: Vec<Value> = app
        .sandboxes
        .store
        .list(Some(&workspace.0))?
        .into_iter()
        .filter(|r| matches_filters(r, &query))
        .map(|r| r.to_json(&base, app.sandboxes.base_run_config(&r)))
        .collect();
    let start = query
        .cursor
        .as_deref()
        .and_then(|c| c.parse().ok())
        .or(query.offset)
        .unwrap_or(0);
    let size = query
        .page_size
        .or(query.limit)
        .unwrap_or(MAX_PAGE)
        .clamp(1, MAX_PAGE);
    Ok(Json(page(items, start, size, "sandboxes")).into_response())
}

fn matches_filters(record: &SandboxRecord, query: &ListQuery) -> bool {
    let name_ok = query
        .name_contains
        .as_deref()
        .is_none_or(|s| record.name.contains(&s.to_lowercase()));
    let status_ok = query
        .status
        .as_deref()
        .is_none_or(|s| s == record.status.as_str());
    name_ok && status_ok
}

/// `PATCH {base}/boxes/{name}` (spec §2.2.4).
pub async fn update(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let body = json_object(&body)?;
    let mut record = find(&app, &workspace, &name)?;
    let mut f = Fields::new(&body);
    let new_name = f.name();
    let idle = f.ttl("idle_ttl_seconds");
    let delete_after = f.ttl("delete_after_stop_seconds");
    let run_config = f.run_config();
    let labels = f.labels();
    if !f.errors.is_empty() {
        return Err(ApiError::Validation(f.errors));
    }
    let proxy_config = body.get("proxy_config").filter(|v| !v.is_null());
    if let Some(value) = proxy_config {
        let egress = app.sandboxes.egress.as_ref().ok_or_else(|| {
            ApiError::Invalid("proxy_config: egress is disabled on this server".into())
        })?;
        egress.update(&mut record, value)?;
    }
    record.name = new_name.unwrap_or(record.name);
    record.idle_ttl_seconds = idle.unwrap_or(record.idle_ttl_seconds);
    record.delete_after_stop_seconds = delete_after.unwrap_or(record.delete_after_stop_seconds);
    record.labels = labels.unwrap_or(record.labels);
    if let Some(config) = &run_config {
        record.run_config = config.over(&record.run_config);
    }
    record.updated_at = now_ms();
    app.sandboxes.store.update(&record)?;
    if (run_config.is_some() || proxy_config.is_some()) && record.status == Status::Ready {
        // Later commands see the change; a stopped sandbox gets it on its next start.
        if let Err(error) = app.sandboxes.push_config(&record).await {
            tracing::warn!(sandbox = %record.id, %error, "pushing the new run_config");
        }
    }
    Ok(sandbox_response(&app, &headers, &record))
}

/// `DELETE {base}/boxes/{name}`.
pub async fn delete(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> ApiResult {
    let record = find(&app, &workspace, &name)?;
    app.sandboxes.delete(&record.id)?;
    tracing::info!(sandbox = %record.id, name = %record.name, "sandbox deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET {base}/boxes/{name}/status`.
pub async fn status(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> ApiResult {
    let record = find(&app, &workspace, &name)?;
    Ok(Json(json!({
        "status": record.status.as_str(),
        "status_message": record.status_message,
    }))
    .into_response())
}

/// `POST {base}/boxes/{name}/start`: boots in the background; clients poll `/status`.
pub async fn start(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let record = find(&app, &workspace, &name)?;
    app.sandboxes.start(&record);
    let record = find(&app, &workspace, &record.id)?;
    Ok(sandbox_response(&app, &headers, &record))
}

/// `POST {base}/boxes/{name}/stop`.
pub async fn stop(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> ApiResult {
    let record = find(&app, &workspace, &name)?;
    app.sandboxes.stop(&record.id).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Any other path under the API: the JSON 404.
pub async fn fallback() -> ApiResult {
    Err(ApiError::NotFound("not found".into()))
}
