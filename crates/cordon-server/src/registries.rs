//! Private registries of a workspace (spec §2.6): their credentials, sealed at rest and never
//! returned, are what a snapshot build with `registry_id` pulls with.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cordon_image::RegistryCredentials;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::control::json_object;
use crate::error::ApiError;
use crate::model::{iso8601, now_ms};
use crate::paging::{page, PageRequest};
use crate::secret_sealing::{SealingError, SealingKey};
use crate::snapshots::names::registry_host;
use crate::snapshots::record::SnapshotStatus;
use crate::validate::Fields;
use crate::{App, Workspace};

const AUTH_DOCKER_CONFIG: &str = "DOCKER_CONFIG";
const MAX_REGISTRY_NAME: usize = 100;
const MAX_URL_LEN: usize = 2048;
const MAX_USERNAME_LEN: usize = 256;
const MAX_PASSWORD_LEN: usize = 8192;

type ApiResult = Result<Response, ApiError>;

/// One registry as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryRecord {
    pub id: String,
    pub workspace: String,
    pub name: String,
    /// As given; [`registry_host`] of it is the host its credentials apply to.
    pub url: String,
    pub auth_type: String,
    pub username: Option<String>,
    /// The password sealed by [`SealingKey`] for [`RegistryRecord::sealing_context`].
    pub sealed_password: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
}

impl RegistryRecord {
    /// The Registry object: never the username or password.
    fn to_json(&self) -> Value {
        let provider = match self.host().as_deref() {
            Some("docker.io") => "DOCKER_HUB",
            Some("ghcr.io") => "GHCR",
            _ => "DOCKER_REGISTRY",
        };
        json!({
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "auth_type": self.auth_type,
            "aws_role_arn": null,
            "provider": provider,
            "repository_search_mode": "NONE",
            "created_at": iso8601(self.created_at),
            "updated_at": iso8601(self.updated_at),
            "created_by": null,
            "updated_by": null,
        })
    }

    pub fn host(&self) -> Option<String> {
        registry_host(&self.url)
    }

    fn sealing_context(&self) -> String {
        format!("registry:{}", self.id)
    }

    /// Basic-auth credentials when both username and password are set.
    pub fn credentials(
        &self,
        key: &SealingKey,
    ) -> Result<Option<RegistryCredentials>, SealingError> {
        let (Some(username), Some(sealed)) = (&self.username, &self.sealed_password) else {
            return Ok(None);
        };
        let password = key.open(sealed, &self.sealing_context())?;
        let password = String::from_utf8(password).map_err(|_| SealingError::Unseal)?;
        Ok(Some(RegistryCredentials {
            username: username.clone(),
            password,
        }))
    }
}

/// Letters, digits, `.`, `_`, `-`; starting with a letter or digit.
fn valid_registry_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REGISTRY_NAME
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The fields of a create or update body, validated; `None` = not sent.
struct RegistryFields {
    name: Option<String>,
    url: Option<String>,
    auth_type: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

fn parse_fields(body: &Map<String, Value>) -> Result<RegistryFields, ApiError> {
    let mut f = Fields::new(body);
    let name = f.string("name");
    let url = f.string("url");
    let auth_type = f.string("auth_type");
    let username = f.string("username");
    let password = f.string("password");
    let mut errors = f.errors;
    let mut fail = |field: &str, msg: &str| {
        errors.push(crate::error::FieldError::value(field, msg));
    };
    if name.as_deref().is_some_and(|n| !valid_registry_name(n)) {
        fail(
            "name",
            "Value error, name must be 1 to 100 letters, digits, '.', '_' or '-'",
        );
    }
    if url
        .as_deref()
        .is_some_and(|u| u.len() > MAX_URL_LEN || registry_host(u).is_none())
    {
        fail(
            "url",
            "Value error, url must name a registry: host[:port], optionally with https://",
        );
    }
    match auth_type.as_deref() {
        None | Some(AUTH_DOCKER_CONFIG) => {}
        Some("AWS_ROLE") => fail(
            "auth_type",
            "Value error, AWS_ROLE is not supported by this server; use DOCKER_CONFIG",
        ),
        Some(_) => fail("auth_type", "Value error, auth_type must be DOCKER_CONFIG"),
    }
    if username
        .as_deref()
        .is_some_and(|u| u.len() > MAX_USERNAME_LEN)
    {
        fail("username", "Value error, username too long");
    }
    if password
        .as_deref()
        .is_some_and(|p| p.len() > MAX_PASSWORD_LEN)
    {
        fail("password", "Value error, password too long");
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    Ok(RegistryFields {
        name,
        url,
        auth_type,
        username,
        password,
    })
}

fn find(app: &App, workspace: &Workspace, key: &str) -> Result<RegistryRecord, ApiError> {
    app.store
        .find_registry(&workspace.0, key)?
        .ok_or_else(|| ApiError::NotFound(format!("Registry '{key}' not found")))
}

/// `POST {base}/registries`.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    body: Bytes,
) -> ApiResult {
    let fields = parse_fields(&json_object(&body)?)?;
    let (Some(name), Some(url)) = (fields.name, fields.url) else {
        let missing = |field: &str| crate::error::FieldError {
            loc: vec!["body".into(), field.into()],
            msg: "Field required".into(),
            kind: "missing",
        };
        return Err(ApiError::Validation(vec![missing("name"), missing("url")]));
    };
    if fields.username.is_some() != fields.password.is_some() {
        return Err(ApiError::Validation(vec![crate::error::FieldError::value(
            "password",
            "Value error, username and password go together",
        )]));
    }
    let now = now_ms();
    let mut registry = RegistryRecord {
        id: uuid::Uuid::new_v4().to_string(),
        workspace: workspace.0.clone(),
        name,
        url,
        auth_type: fields
            .auth_type
            .unwrap_or_else(|| AUTH_DOCKER_CONFIG.into()),
        username: fields.username,
        sealed_password: None,
        created_at: now,
        updated_at: now,
    };
    if let Some(password) = fields.password {
        registry.sealed_password = Some(
            app.snapshots
                .sealing
                .seal(password.as_bytes(), &registry.sealing_context()),
        );
    }
    app.store.insert_registry(&registry)?;
    tracing::info!(registry = %registry.id, name = %registry.name, "registry created");
    Ok(Json(registry.to_json()).into_response())
}

/// `GET {base}/registries/{name}`.
pub async fn get(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> ApiResult {
    Ok(Json(find(&app, &workspace, &name)?.to_json()).into_response())
}

/// `PATCH {base}/registries/{name}`: only the fields sent change; a password not sent stays.
pub async fn update(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let fields = parse_fields(&json_object(&body)?)?;
    let mut registry = find(&app, &workspace, &name)?;
    registry.name = fields.name.unwrap_or(registry.name);
    registry.url = fields.url.unwrap_or(registry.url);
    registry.auth_type = fields.auth_type.unwrap_or(registry.auth_type);
    registry.username = fields.username.or(registry.username);
    if let Some(password) = fields.password {
        registry.sealed_password = Some(
            app.snapshots
                .sealing
                .seal(password.as_bytes(), &registry.sealing_context()),
        );
    }
    registry.updated_at = now_ms();
    app.store.update_registry(&registry)?;
    Ok(Json(registry.to_json()).into_response())
}

/// `GET {base}/registries`: newest first.
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let cursor_style = query.contains_key("cursor") || query.contains_key("page_size");
    let (default, max) = if cursor_style { (20, 100) } else { (50, 500) };
    let request = PageRequest::from_query(&query, default, max)?;
    let needle = query.get("name_contains").map(|s| s.to_lowercase());
    let items: Vec<Value> = app
        .store
        .list_registries(&workspace.0)?
        .iter()
        .filter(|r| {
            needle
                .as_deref()
                .is_none_or(|n| r.name.to_lowercase().contains(n))
        })
        .map(RegistryRecord::to_json)
        .collect();
    Ok(Json(page(items, request.start, request.size, "registries")).into_response())
}

/// `DELETE {base}/registries/{name}`: refused while a build is pulling with it.
pub async fn delete(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(name): Path<String>,
) -> ApiResult {
    let registry = find(&app, &workspace, &name)?;
    let in_use = app
        .store
        .list_snapshots(&workspace.0)?
        .iter()
        .any(|s| s.status == SnapshotStatus::Building && s.registry_id() == Some(&registry.id));
    if in_use {
        return Err(ApiError::Conflict(format!(
            "registry '{}' is used by a snapshot build in progress",
            registry.name
        )));
    }
    app.store.delete_registry(&registry.id)?;
    tracing::info!(registry = %registry.id, name = %registry.name, "registry deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names() {
        for ok in ["a", "My-Registry_1.0"] {
            assert!(valid_registry_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a/b", "a b", &"a".repeat(101)] {
            assert!(!valid_registry_name(bad), "{bad}");
        }
    }
}
