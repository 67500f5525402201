//! `{base}/pools` (spec §2.8): CRUD of pools, with the error bodies the legacy clients map
//! (400 `TemplateNotFound`, 400 `ValidationError`, 409, 429, 504).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cordon_api::error::ErrorBody;
use serde_json::{json, Map, Value};

use super::PoolRecord;
use crate::control::json_object;
use crate::error::ApiError;
use crate::model::now_ms;
use crate::store::StoreError;
use crate::validate::{valid_name, MAX_CREATE_TIMEOUT};
use crate::{App, Workspace};

/// Largest size (and bound) one pool may be given.
pub const MAX_POOL_REPLICAS: u32 = 100;
const MAX_POOLS_PER_WORKSPACE: usize = 32;
const DEFAULT_WAIT_TIMEOUT: u64 = 30;

/// What a pool request fails with: the spec's 400s and 504 beside the shared errors.
pub enum PoolError {
    Invalid(String),
    TemplateNotFound(String),
    NotFilled(String),
    Api(ApiError),
}

impl From<ApiError> for PoolError {
    fn from(error: ApiError) -> Self {
        PoolError::Api(error)
    }
}

impl From<StoreError> for PoolError {
    fn from(error: StoreError) -> Self {
        PoolError::Api(error.into())
    }
}

impl IntoResponse for PoolError {
    fn into_response(self) -> Response {
        let (status, kind, message) = match self {
            PoolError::Api(error) => return error.into_response(),
            PoolError::Invalid(message) => (StatusCode::BAD_REQUEST, "ValidationError", message),
            PoolError::TemplateNotFound(name) => (
                StatusCode::BAD_REQUEST,
                "TemplateNotFound",
                format!("Template '{name}' not found"),
            ),
            PoolError::NotFilled(message) => (StatusCode::GATEWAY_TIMEOUT, "Timeout", message),
        };
        (status, Json(ErrorBody::new(kind, message))).into_response()
    }
}

type PoolResult<T = Response> = Result<T, PoolError>;

fn invalid(message: impl Into<String>) -> PoolError {
    PoolError::Invalid(message.into())
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("Pool '{name}' not found"))
}

fn name_conflict(error: StoreError) -> ApiError {
    match error {
        StoreError::NameTaken(name) => {
            ApiError::Conflict(format!("a pool named '{name}' already exists"))
        }
        other => other.into(),
    }
}

fn find(app: &App, workspace: &Workspace, name: &str) -> Result<PoolRecord, ApiError> {
    app.store
        .pool_by_name(&workspace.0, name)?
        .ok_or_else(|| not_found(name))
}

fn pool_json(app: &App, pool: &PoolRecord) -> Result<Value, ApiError> {
    let template_name = app
        .store
        .template_by_id(&pool.template_id)?
        .map(|t| t.name)
        .unwrap_or_default();
    app.pools.to_json(pool, &template_name)
}

/// A size field: absent, or an integer from 0 to [`MAX_POOL_REPLICAS`].
fn size(body: &Map<String, Value>, field: &str) -> PoolResult<Option<u32>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(n) if n <= u64::from(MAX_POOL_REPLICAS) => Ok(Some(n as u32)),
            _ => Err(invalid(format!(
                "{field} must be an integer from 0 to {MAX_POOL_REPLICAS}"
            ))),
        },
    }
}

/// Applies the size fields present in `body` and checks the bounds they make.
fn apply_sizes(body: &Map<String, Value>, pool: &mut PoolRecord) -> PoolResult<()> {
    if let Some(replicas) = size(body, "replicas")? {
        pool.replicas = replicas;
    }
    for (field, slot) in [
        ("min_replicas", &mut pool.min_replicas),
        ("max_replicas", &mut pool.max_replicas),
    ] {
        if body.contains_key(field) {
            *slot = size(body, field)?;
        }
    }
    if let Some(spare) = size(body, "target_spare")? {
        pool.target_spare = spare;
    }
    let bounds = pool.bounds();
    if bounds.min > bounds.max {
        return Err(invalid(format!(
            "min_replicas ({}) must not exceed max_replicas ({})",
            bounds.min, bounds.max
        )));
    }
    Ok(())
}

fn apply_name(body: &Map<String, Value>, pool: &mut PoolRecord) -> PoolResult<()> {
    match body.get("name") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(name)) if valid_name(name) => {
            pool.name = name.clone();
            Ok(())
        }
        Some(_) => Err(invalid(
            "name must be 1 to 63 lowercase letters, digits or '-', starting and ending with \
             a letter or digit",
        )),
    }
}

/// The `template_name` field, resolved in the workspace.
fn apply_template(
    app: &App,
    workspace: &Workspace,
    body: &Map<String, Value>,
    pool: &mut PoolRecord,
) -> PoolResult<()> {
    match body.get("template_name") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(name)) => match app.store.template_by_name(&workspace.0, name)? {
            // As the spec's server: volumes are per sandbox, so a pool cannot pre-provision
            // them.
            Some(template) if !template.volume_mounts.is_empty() => Err(invalid(format!(
                "Template '{name}' has volume mounts; pools cannot use templates with volumes"
            ))),
            Some(template) => {
                pool.template_id = template.id;
                Ok(())
            }
            None => Err(PoolError::TemplateNotFound(name.clone())),
        },
        Some(_) => Err(invalid("template_name must be a string")),
    }
}

/// The workspace must be able to hold the pool's floor on top of what it holds.
fn check_quota(app: &App, workspace: &Workspace, extra: u32) -> Result<(), ApiError> {
    let held =
        app.sandboxes.store.list(Some(&workspace.0))?.len() + app.pools.warm_count(&workspace.0)?;
    if held + extra as usize > app.max_sandboxes_per_workspace {
        return Err(ApiError::Quota(format!(
            "sandbox count limit reached: the pool needs {extra} sandboxes and the workspace \
             holds {held} of {}",
            app.max_sandboxes_per_workspace
        )));
    }
    Ok(())
}

/// `wait_for_ready` and `timeout` of a create.
fn wait_of(body: &Map<String, Value>) -> PoolResult<Option<Duration>> {
    let wait = match body.get("wait_for_ready") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(wait)) => *wait,
        Some(_) => return Err(invalid("wait_for_ready must be a boolean")),
    };
    let timeout = match body.get("timeout") {
        None | Some(Value::Null) => DEFAULT_WAIT_TIMEOUT,
        Some(value) => match value.as_f64() {
            Some(s) if s.is_finite() && (0.0..=MAX_CREATE_TIMEOUT as f64).contains(&s) => {
                s.ceil() as u64
            }
            _ => {
                return Err(invalid(format!(
                    "timeout must be a number from 0 to {MAX_CREATE_TIMEOUT}"
                )))
            }
        },
    };
    Ok(wait.then(|| Duration::from_secs(timeout)))
}

/// `POST {base}/pools`.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    body: Bytes,
) -> PoolResult {
    let body = json_object(&body).map_err(|_| invalid("the body must be a JSON object"))?;
    for field in ["name", "template_name"] {
        if body.get(field).is_none_or(Value::is_null) {
            return Err(invalid(format!("{field} is required")));
        }
    }
    let now = now_ms();
    let mut pool = PoolRecord {
        id: uuid::Uuid::new_v4().to_string(),
        workspace: workspace.0.clone(),
        name: String::new(),
        template_id: String::new(),
        replicas: 1,
        min_replicas: None,
        max_replicas: None,
        target_spare: 0,
        created_at: now,
        updated_at: now,
    };
    apply_name(&body, &mut pool)?;
    apply_sizes(&body, &mut pool)?;
    let wait = wait_of(&body)?;
    apply_template(&app, &workspace, &body, &mut pool)?;
    if app.store.list_pools(Some(&workspace.0))?.len() >= MAX_POOLS_PER_WORKSPACE {
        return Err(ApiError::Quota(format!(
            "pool limit reached ({MAX_POOLS_PER_WORKSPACE} per workspace)"
        ))
        .into());
    }
    check_quota(&app, &workspace, pool.bounds().min)?;
    if !app.store.insert_pool(&pool).map_err(name_conflict)? {
        let name = body["template_name"].as_str().unwrap_or_default();
        return Err(PoolError::TemplateNotFound(name.to_string()));
    }
    tracing::info!(pool = %pool.id, name = %pool.name, "pool created");
    app.pools.wake();
    if let Some(timeout) = wait {
        if !app.pools.wait_filled(&pool, timeout).await {
            return Err(PoolError::NotFilled(format!(
                "Pool '{}' not filled after {} s",
                pool.name,
                timeout.as_secs()
            )));
        }
    }
    Ok(Json(pool_json(&app, &pool)?).into_response())
}

/// `GET {base}/pools/{name}`: the pool, its counts and its last scaling decisions.
pub async fn get(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> PoolResult {
    let pool = find(&app, &workspace, &name)?;
    Ok(Json(pool_json(&app, &pool)?).into_response())
}

/// `GET {base}/pools`: `{pools: [...]}`, with `items` beside it.
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
) -> PoolResult {
    let pools = app
        .store
        .list_pools(Some(&workspace.0))?
        .iter()
        .map(|pool| pool_json(&app, pool))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({"pools": pools, "items": pools})).into_response())
}

/// `PATCH {base}/pools/{name}`: `{name?, replicas?}` (spec) and `min_replicas`,
/// `max_replicas`, `target_spare`, `template_name`.
pub async fn update(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
    body: Bytes,
) -> PoolResult {
    let body = json_object(&body).map_err(|_| invalid("the body must be a JSON object"))?;
    let before = find(&app, &workspace, &name)?;
    let mut pool = before.clone();
    apply_name(&body, &mut pool)?;
    apply_sizes(&body, &mut pool)?;
    apply_template(&app, &workspace, &body, &mut pool)?;
    let growth = pool.bounds().min.saturating_sub(before.bounds().min);
    if growth > 0 {
        check_quota(&app, &workspace, growth)?;
    }
    pool.updated_at = now_ms();
    app.store.update_pool(&pool).map_err(name_conflict)?;
    app.pools.wake();
    Ok(Json(pool_json(&app, &pool)?).into_response())
}

/// `DELETE {base}/pools/{name}`: deletes the pool and its unclaimed warm sandboxes.
pub async fn delete(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> PoolResult {
    let pool = find(&app, &workspace, &name)?;
    app.pools.delete(&pool).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
