//! Egress: every sandbox's way out goes through one [`EgressProxy`] per server. The agent's
//! relay opens reverse streams on the sandbox's channel; each is served by the proxy with that
//! sandbox's compiled `proxy_config` (spec §6.1), its workspace's secrets and a recorder.
//!
//! - `proxy_config` is stored sealed in the sandbox record (never plaintext in the store) with
//!   a redacted copy for responses; a changed one applies to new connections at once.
//! - Workspace secrets (Cordon extension): `PUT/DELETE {base}/secrets/{name}`, `GET
//!   {base}/secrets` (names and times only); sealed at rest, bounded in size and count.
//! - Egress records: written off the hot path in batches, the newest
//!   [`MAX_EVENTS_PER_SANDBOX`] kept per sandbox, read at `GET {base}/boxes/{name}/egress`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use cordon_api::agent::EgressConfig;
use cordon_api::proxy_config::ProxyConfig;
use cordon_channel::ChannelStream;
use cordon_proxy::{
    EgressEvent, EgressPolicy, EgressProxy, EgressRecorder, ProxySettings, ResolverSettings,
    SandboxEgress, SecretResolver,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::{ApiError, FieldError};
use crate::model::{iso8601, now_ms, SandboxRecord};
use crate::paging::{page, PageRequest};
use crate::secret_sealing::SealingKey;
use crate::store::Store;
use crate::templates::TemplateRecord;
use crate::{App, Workspace};

/// Egress records kept per sandbox; older ones are dropped.
pub const MAX_EVENTS_PER_SANDBOX: usize = 1000;
/// Records waiting to be written; beyond this (a store far behind) new ones are dropped.
const RECORD_QUEUE: usize = 4096;
/// Records written per transaction, and how long a partial batch waits.
const RECORD_BATCH: usize = 256;
const RECORD_FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Workspace secrets: bounds on what a client can make the server store.
pub const MAX_SECRETS_PER_WORKSPACE: usize = 256;
pub const MAX_SECRET_VALUE_BYTES: usize = 64 * 1024;
const MAX_SECRET_NAME_BYTES: usize = 128;
/// The largest `proxy_config` accepted (JSON bytes).
const MAX_PROXY_CONFIG_BYTES: usize = 256 * 1024;

/// A stored `proxy_config` (a template's) as responses may show it: opaque and key material
/// replaced by `is_set`; one that does not parse shows only that it is set.
pub fn redacted_json(value: &Value) -> Value {
    serde_json::from_value::<ProxyConfig>(value.clone())
        .ok()
        .and_then(|config| serde_json::to_value(config.redacted()).ok())
        .unwrap_or_else(|| json!({"is_set": true}))
}

/// `cordon serve`'s egress flags.
#[derive(Debug, Clone)]
pub struct EgressSettings {
    /// Off: sandboxes get no proxy environment and no way out (`--no-egress`).
    pub enabled: bool,
    /// Internal ranges allowed anyway (`--allow-egress-cidr`; tests use loopback).
    pub allowed_cidrs: Vec<ipnet::IpNet>,
    /// Extra CAs trusted for upstreams (`--egress-ca`).
    pub extra_roots: Vec<PathBuf>,
    /// One nameserver instead of the system's (`--egress-resolver`, tests).
    pub resolver: Option<SocketAddr>,
    /// Any port, not only 80 and 443, without an access-control `host:port` entry
    /// (`--egress-any-port`).
    pub any_port: bool,
}

impl Default for EgressSettings {
    fn default() -> Self {
        EgressSettings {
            enabled: true,
            allowed_cidrs: Vec::new(),
            extra_roots: Vec::new(),
            resolver: None,
            any_port: false,
        }
    }
}

/// A sandbox's `proxy_config` as its record keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProxyConfig {
    /// The whole config, sealed (bound to the sandbox id).
    pub sealed: String,
    /// What responses show: opaque and key material replaced by `is_set`.
    pub redacted: Value,
}

/// A compiled policy and the sealed config it came from (`None`: no `proxy_config`).
struct CompiledPolicy {
    source: Option<String>,
    policy: Arc<EgressPolicy>,
}

pub struct Egress {
    proxy: Arc<EgressProxy>,
    sealing: SealingKey,
    store: Arc<Store>,
    /// Compiled policies by sandbox id, each beside the sealed config it was compiled from:
    /// a connection uses the cached one only while the stored config is still that one.
    policies: Mutex<HashMap<String, CompiledPolicy>>,
    recorder: Arc<QueueRecorder>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn config_context(sandbox_id: &str) -> String {
    format!("sandbox-proxy-config:{sandbox_id}")
}

fn template_context(template_id: &str) -> String {
    format!("template-proxy-config:{template_id}")
}

fn secret_context(workspace: &str, name: &str) -> String {
    format!("workspace-secret:{workspace}:{name}")
}

impl Egress {
    /// Loads (or creates) the proxy CA under `data_dir` and starts the record writer.
    pub fn start(
        settings: &EgressSettings,
        data_dir: &Path,
        store: Arc<Store>,
    ) -> Result<Arc<Egress>, String> {
        let mut proxy = ProxySettings::new(
            data_dir.join("egress-ca.pem"),
            data_dir.join("egress-ca.key"),
        );
        proxy.extra_roots = settings.extra_roots.clone();
        proxy.allowed_cidrs = settings.allowed_cidrs.clone();
        if settings.any_port {
            proxy.default_ports = Vec::new();
        }
        if let Some(nameserver) = settings.resolver {
            proxy.resolver = ResolverSettings::Nameserver(nameserver);
        }
        let proxy = EgressProxy::new(proxy).map_err(|e| e.to_string())?;
        let sealing =
            SealingKey::load_or_create(&data_dir.join("secret.key")).map_err(|e| e.to_string())?;
        let (sender, receiver) = mpsc::channel(RECORD_QUEUE);
        tokio::spawn(write_records(store.clone(), receiver));
        Ok(Arc::new(Egress {
            proxy,
            sealing,
            store,
            policies: Mutex::default(),
            recorder: Arc::new(QueueRecorder { sender }),
        }))
    }

    /// Validates a `proxy_config` from a request (422 naming the field on error).
    pub fn parse(value: &Value) -> Result<ProxyConfig, ApiError> {
        let invalid =
            |msg: String| ApiError::Validation(vec![FieldError::value("proxy_config", msg)]);
        if value.to_string().len() > MAX_PROXY_CONFIG_BYTES {
            return Err(invalid(format!(
                "Value error, proxy_config is larger than {MAX_PROXY_CONFIG_BYTES} bytes"
            )));
        }
        let config: ProxyConfig = serde_json::from_value(value.clone())
            .map_err(|e| invalid(format!("Value error, {e}")))?;
        config
            .validate()
            .map_err(|e| invalid(format!("Value error, {e}")))?;
        Ok(config)
    }

    /// Checks that `config` compiles (the proxy's semantic checks) and seals it for `id`.
    pub fn seal(
        &self,
        sandbox_id: &str,
        config: &ProxyConfig,
    ) -> Result<StoredProxyConfig, ApiError> {
        self.seal_in(&config_context(sandbox_id), config)
    }

    fn seal_in(&self, context: &str, config: &ProxyConfig) -> Result<StoredProxyConfig, ApiError> {
        EgressPolicy::compile(config).map_err(|e| {
            ApiError::Validation(vec![FieldError::value(
                "proxy_config",
                format!("Value error, {e}"),
            )])
        })?;
        let plain = serde_json::to_vec(config).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(StoredProxyConfig {
            sealed: self.sealing.seal(&plain, context),
            redacted: serde_json::to_value(config.redacted())
                .map_err(|e| ApiError::Internal(e.to_string()))?,
        })
    }

    fn open_in(&self, context: &str, stored: &StoredProxyConfig) -> Result<ProxyConfig, ApiError> {
        let plain = self
            .sealing
            .open(&stored.sealed, context)
            .map_err(|e| ApiError::Internal(format!("{context}: {e}")))?;
        serde_json::from_slice(&plain).map_err(|e| ApiError::Internal(format!("{context}: {e}")))
    }

    /// The sandbox's config, unsealed.
    pub fn config_of(&self, record: &SandboxRecord) -> Result<Option<ProxyConfig>, ApiError> {
        record
            .proxy_config
            .as_ref()
            .map(|stored| self.open_in(&config_context(&record.id), stored))
            .transpose()
    }

    /// A template's config, unsealed; one an older server stored in plaintext is parsed
    /// and validated as a request's would be.
    pub fn template_config(
        &self,
        template: &TemplateRecord,
    ) -> Result<Option<ProxyConfig>, ApiError> {
        if let Some(stored) = &template.sealed_proxy_config {
            return self
                .open_in(&template_context(&template.id), stored)
                .map(Some);
        }
        template
            .legacy_proxy_config
            .as_ref()
            .map(Self::parse)
            .transpose()
    }

    /// A template's `proxy_config` from a create or PATCH body, validated and compiled like
    /// a sandbox's (422 on error) and sealed for the template. As for a sandbox's PATCH
    /// (spec §2.2.4), opaque values omitted from the new config carry over from the stored
    /// one, so a redacted config sent back does not lose them.
    pub fn template_update(
        &self,
        template: &TemplateRecord,
        value: &Value,
    ) -> Result<StoredProxyConfig, ApiError> {
        let merged = Self::patched(self.template_config(template)?, value)?;
        self.seal_in(&template_context(&template.id), &merged)
    }

    /// Seals a template's plaintext `proxy_config` left by an older server, when it still
    /// compiles (one that does not stays as it is: creates from it keep failing with 422).
    pub fn seal_legacy(&self, template: &mut TemplateRecord) {
        let Some(value) = &template.legacy_proxy_config else {
            return;
        };
        match Self::parse(value).and_then(|c| self.seal_in(&template_context(&template.id), &c)) {
            Ok(stored) => {
                template.sealed_proxy_config = Some(stored);
                template.legacy_proxy_config = None;
            }
            Err(error) => {
                tracing::warn!(template = %template.id, ?error, "a stored proxy_config is invalid")
            }
        }
    }

    /// `value` (a PATCH body's `proxy_config`) over `stored`: the rule set replaced, omitted
    /// hidden values carried over (`ProxyConfig::merged_update`), the result validated.
    fn patched(stored: Option<ProxyConfig>, value: &Value) -> Result<ProxyConfig, ApiError> {
        let update = Self::parse(value)?;
        let merged = match stored {
            Some(stored) => stored.merged_update(update),
            None => update,
        };
        merged.validate().map_err(|e| {
            ApiError::Validation(vec![FieldError::value(
                "proxy_config",
                format!("Value error, {e}"),
            )])
        })?;
        Ok(merged)
    }

    /// A PATCH's `proxy_config` (spec §2.2.4): rules replaced, omitted opaque values kept.
    pub fn update(&self, record: &mut SandboxRecord, value: &Value) -> Result<(), ApiError> {
        let merged = Self::patched(self.config_of(record)?, value)?;
        // Connections compare the stored config with the one their cached policy came from,
        // so the new policy applies as soon as the record is written.
        record.proxy_config = Some(self.seal(&record.id, &merged)?);
        Ok(())
    }

    /// Drops a deleted sandbox's compiled policy.
    pub fn forget(&self, sandbox_id: &str) {
        lock(&self.policies).remove(sandbox_id);
    }

    /// What the agent needs for the way out (`AgentConfig::egress`).
    pub fn agent_config(&self, record: &SandboxRecord) -> EgressConfig {
        let env_vars = match self.config_of(record) {
            Ok(Some(config)) => config.env_vars(),
            Ok(None) => Default::default(),
            Err(error) => {
                tracing::warn!(sandbox = %record.id, %error, "no rule env_vars");
                Default::default()
            }
        };
        EgressConfig {
            ca_pem: self.proxy.ca_cert_pem().to_string(),
            env_vars,
        }
    }

    /// The handler of the reverse streams a sandbox's agent opens: each is one connection
    /// from the relay, served by the proxy under the policy current when it arrives.
    pub fn inbound_handler(
        self: &Arc<Self>,
        sandbox_id: String,
    ) -> impl FnMut(ChannelStream) + Send + 'static {
        let egress = self.clone();
        move |stream| {
            let egress = egress.clone();
            let sandbox_id = sandbox_id.clone();
            tokio::spawn(async move {
                let Some(sandbox) = egress.sandbox_egress(&sandbox_id) else {
                    return; // dropping the stream refuses the connection
                };
                egress.proxy.serve(stream, sandbox).await;
            });
        }
    }

    fn sandbox_egress(self: &Arc<Self>, sandbox_id: &str) -> Option<SandboxEgress> {
        let policy = match self.policy(sandbox_id) {
            Ok(policy) => policy,
            Err(error) => {
                tracing::warn!(sandbox = %sandbox_id, %error, "egress refused: no policy");
                return None;
            }
        };
        Some(SandboxEgress {
            sandbox_id: sandbox_id.to_string(),
            policy,
            secrets: Arc::new(WorkspaceSecrets {
                egress: self.clone(),
                sandbox_id: sandbox_id.to_string(),
            }),
            recorder: self.recorder.clone(),
        })
    }

    /// The policy of the sandbox's stored `proxy_config`, read at every connection (one
    /// store lookup) so a PATCH can never be outlived by a policy cached before it.
    fn policy(&self, sandbox_id: &str) -> Result<Arc<EgressPolicy>, ApiError> {
        let record = self
            .store
            .get_by_id(sandbox_id)?
            .ok_or_else(|| ApiError::NotFound(format!("sandbox {sandbox_id}")))?;
        let source = record.proxy_config.as_ref().map(|c| c.sealed.clone());
        if let Some(cached) = lock(&self.policies).get(sandbox_id) {
            if cached.source == source {
                return Ok(cached.policy.clone());
            }
        }
        let policy = match self.config_of(&record)? {
            Some(config) => {
                EgressPolicy::compile(&config).map_err(|e| ApiError::Internal(e.to_string()))?
            }
            None => EgressPolicy::default(),
        };
        let policy = Arc::new(policy);
        lock(&self.policies).insert(
            sandbox_id.to_string(),
            CompiledPolicy {
                source,
                policy: policy.clone(),
            },
        );
        Ok(policy)
    }

    /// A workspace secret's value, unsealed.
    fn secret(&self, workspace: &str, name: &str) -> Option<String> {
        let stored = self.store.get_secret(workspace, name).ok()??;
        let plain = self
            .sealing
            .open(&stored.sealed, &secret_context(workspace, name))
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

/// Secrets of the workspace the sandbox belongs to now (a pool claim moves it).
struct WorkspaceSecrets {
    egress: Arc<Egress>,
    sandbox_id: String,
}

#[async_trait::async_trait]
impl SecretResolver for WorkspaceSecrets {
    async fn secret(&self, name: &str) -> Option<String> {
        let egress = self.egress.clone();
        let sandbox_id = self.sandbox_id.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let record = egress.store.get_by_id(&sandbox_id).ok()??;
            egress.secret(&record.workspace, &name)
        })
        .await
        .ok()?
    }
}

/// Hands records to the writer task; never blocks the proxy.
struct QueueRecorder {
    sender: mpsc::Sender<EgressEvent>,
}

impl EgressRecorder for QueueRecorder {
    fn record(&self, event: EgressEvent) {
        if self.sender.try_send(event).is_err() {
            tracing::warn!("egress record dropped: the writer is behind");
        }
    }
}

/// Writes records in batches until every sender is gone.
async fn write_records(store: Arc<Store>, mut receiver: mpsc::Receiver<EgressEvent>) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    loop {
        let Some(first) = receiver.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + RECORD_FLUSH_EVERY;
        while batch.len() < RECORD_BATCH {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(event)) => batch.push(event),
                Ok(None) | Err(_) => break,
            }
        }
        let rows: Vec<(String, String)> = batch
            .drain(..)
            .filter_map(|event| {
                let json = serde_json::to_string(&event).ok()?;
                Some((event.sandbox_id, json))
            })
            .collect();
        let store = store.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.append_egress_events(&rows, MAX_EVENTS_PER_SANDBOX)
        })
        .await;
        if let Ok(Err(error)) = written {
            tracing::warn!(%error, "writing egress records");
        }
    }
}

fn egress_of(app: &App) -> Result<&Arc<Egress>, ApiError> {
    app.sandboxes
        .egress
        .as_ref()
        .ok_or_else(|| ApiError::NotImplemented("egress is disabled on this server".into()))
}

/// `GET {base}/boxes/{name}/egress`: the sandbox's egress records, newest first, paged like
/// other lists (`limit`/`offset` or `page_size`/`cursor`; default 100, at most 1000).
pub async fn list_events(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let record = app
        .sandboxes
        .store
        .find(&workspace.0, &name)?
        .ok_or_else(|| ApiError::NotFound(format!("Sandbox '{name}' not found")))?;
    let request = PageRequest::from_query(&query, 100, MAX_EVENTS_PER_SANDBOX)?;
    let store = app.sandboxes.store.clone();
    let id = record.id.clone();
    let rows = tokio::task::spawn_blocking(move || store.egress_events(&id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let items: Vec<Value> = rows
        .iter()
        .filter_map(|row| serde_json::from_str(row).ok())
        .collect();
    Ok(Json(page(items, request.start, request.size, "events")).into_response())
}

#[derive(Deserialize)]
struct SecretBody {
    value: String,
}

fn check_secret_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "secret name must be 1 to {MAX_SECRET_NAME_BYTES} of A-Z a-z 0-9 _ - ."
        )))
    }
}

/// `PUT {base}/secrets/{name}` with `{"value": "…"}`: creates or replaces a workspace secret.
pub async fn put_secret(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let egress = egress_of(&app)?;
    check_secret_name(&name)?;
    let body: SecretBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::Validation(vec![FieldError::value(
            "value",
            "Field required: a string value",
        )])
    })?;
    if body.value.len() > MAX_SECRET_VALUE_BYTES {
        return Err(ApiError::TooLarge(format!(
            "secret value is larger than {MAX_SECRET_VALUE_BYTES} bytes"
        )));
    }
    let store = &app.sandboxes.store;
    if store.get_secret(&workspace.0, &name)?.is_none()
        && store.count_secrets(&workspace.0)? >= MAX_SECRETS_PER_WORKSPACE
    {
        return Err(ApiError::Quota(format!(
            "secret count limit reached ({MAX_SECRETS_PER_WORKSPACE} per workspace)"
        )));
    }
    let sealed = egress
        .sealing
        .seal(body.value.as_bytes(), &secret_context(&workspace.0, &name));
    store.put_secret(&workspace.0, &name, &sealed, now_ms())?;
    let stored = store
        .get_secret(&workspace.0, &name)?
        .ok_or_else(|| ApiError::Internal("secret vanished".into()))?;
    Ok(Json(secret_json(&stored)).into_response())
}

/// `GET {base}/secrets`: names and times only, never values.
pub async fn list_secrets(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
) -> Result<Response, ApiError> {
    egress_of(&app)?;
    let secrets: Vec<Value> = app
        .sandboxes
        .store
        .list_secrets(&workspace.0)?
        .iter()
        .map(secret_json)
        .collect();
    Ok(Json(json!({ "secrets": secrets })).into_response())
}

/// `DELETE {base}/secrets/{name}`.
pub async fn delete_secret(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    UrlPath(name): UrlPath<String>,
) -> Result<Response, ApiError> {
    egress_of(&app)?;
    if app.sandboxes.store.delete_secret(&workspace.0, &name)? {
        Ok(http::StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound(format!("Secret '{name}' not found")))
    }
}

fn secret_json(secret: &crate::store::StoredSecret) -> Value {
    json!({
        "name": secret.name,
        "is_set": true,
        "created_at": iso8601(secret.created_at),
        "updated_at": iso8601(secret.updated_at),
    })
}
