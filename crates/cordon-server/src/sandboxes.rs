//! The sandbox manager: the store, the runtime and one cached agent client per sandbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cordon_api::agent::AgentConfig;
use cordon_api::RunConfig;
use cordon_channel::AgentClient;
use cordon_image::{LayerStore, PreparedSnapshot};
use cordon_runtime::{Limits, Runtime, RuntimeError, SandboxSpec, SandboxState};
use tokio::sync::Notify;

use crate::error::ApiError;
use crate::model::{now_ms, LayerRef, SandboxBase, SandboxRecord, Status};
use crate::store::Store;

/// How long a data-plane request waits for a sandbox to become ready.
const DATAPLANE_READY_WAIT: Duration = Duration::from_secs(60);
/// Answers to stop must come within the clients' 10 s timeout (spec §1.5).
const STOP_ANSWER_WITHIN: Duration = Duration::from_secs(8);

/// Last data-plane use of a sandbox, for the idle TTL.
#[derive(Clone, Copy)]
struct Activity {
    last: Instant,
    open_connections: u32,
}

pub struct Sandboxes {
    pub store: Arc<Store>,
    runtime: Arc<dyn Runtime>,
    /// Where the layers of every snapshot but the default one live.
    layers: Arc<LayerStore>,
    /// Told when a sandbox is gone, so layers only it used are reclaimed.
    reclaim_wanted: Arc<Notify>,
    pub snapshot: PreparedSnapshot,
    /// The default snapshot's UUID (spec ids are UUIDs; the layer's identity is a digest).
    pub snapshot_id: String,
    clients: Mutex<HashMap<String, AgentClient>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    activity: Mutex<HashMap<String, Activity>>,
    /// Woken on every status change; waiters re-read the store.
    status_changed: Notify,
    /// The backend of a create that names none (`cordon serve --default-runtime`).
    pub default_runtime: cordon_runtime::Backend,
    /// The egress proxy behind every sandbox's relay; `None` with `--no-egress`.
    pub egress: Option<Arc<crate::egress::Egress>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sandboxes {
    pub fn new(
        store: Arc<Store>,
        runtime: Arc<dyn Runtime>,
        snapshot: PreparedSnapshot,
        layers: Arc<LayerStore>,
        reclaim_wanted: Arc<Notify>,
    ) -> Self {
        let snapshot_id = snapshot_uuid(&snapshot.id);
        Sandboxes {
            store,
            runtime,
            layers,
            reclaim_wanted,
            snapshot,
            snapshot_id,
            clients: Mutex::default(),
            locks: Mutex::default(),
            activity: Mutex::default(),
            status_changed: Notify::new(),
            default_runtime: cordon_runtime::Backend::Namespace,
            egress: None,
        }
    }

    /// After a restart: matches the store with what the runtime re-adopted. Agent channels
    /// are reconnected lazily, on first use.
    pub async fn reconcile(&self) -> Result<(), ApiError> {
        let adopted: HashMap<String, SandboxState> = self
            .runtime
            .adopt()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .into_iter()
            .collect();
        let records = self.store.list(None)?;
        for mut record in records {
            let (status, message) = match adopted.get(&record.id) {
                Some(SandboxState::Running { .. }) => (Status::Ready, None),
                Some(SandboxState::Failed(why)) => (Status::Failed, Some(why.clone())),
                Some(_) if record.status == Status::Failed => (Status::Failed, None),
                Some(_) => (Status::Stopped, None),
                None if record.status == Status::Provisioning => (
                    Status::Failed,
                    Some("server restarted during creation".into()),
                ),
                None => (Status::Stopped, None),
            };
            if status == Status::Stopped && record.stopped_at.is_none() {
                record.stopped_at = Some(now_ms());
            }
            record.status = status;
            record.status_message = message.or(record.status_message.take());
            self.store.update(&record)?;
            self.touch(&record.id);
            if status == Status::Ready && self.egress.is_some() {
                // Commands that outlived the old server need the egress relay's session back
                // now, not at the next data-plane request.
                let connect = self.agent(&record.id);
                if tokio::time::timeout(Duration::from_secs(2), connect)
                    .await
                    .is_err()
                {
                    tracing::warn!(sandbox = %record.id, "agent not reachable for egress");
                }
            }
        }
        for id in adopted.keys() {
            if self.store.get_by_id(id)?.is_none() {
                tracing::info!(sandbox = %id, "destroying a sandbox the store does not know");
                let _ = self.runtime.destroy(id).await;
            }
        }
        Ok(())
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.locks).entry(id.to_string()).or_default().clone()
    }

    fn set_status(&self, id: &str, status: Status, message: Option<String>) {
        // A pool claim can move the row between the read and the write, which then writes
        // nothing; read again (a claim happens once, so a second try is enough).
        for _ in 0..2 {
            let Ok(Some(mut record)) = self.store.get_by_id(id) else {
                break;
            };
            record.status = status;
            record.status_message = message.clone();
            record.updated_at = now_ms();
            record.stopped_at = match status {
                Status::Stopped => Some(record.stopped_at.unwrap_or_else(now_ms)),
                _ => None,
            };
            match self.store.update(&record) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(error) => tracing::warn!(sandbox = id, %error, "recording status"),
            }
            break;
        }
        self.status_changed.notify_waiters();
    }

    /// Records the new sandbox and boots it in the background.
    pub fn create(self: &Arc<Self>, record: &SandboxRecord) -> Result<(), ApiError> {
        self.store.insert(record)?;
        self.boot_in_background(record.id.clone());
        Ok(())
    }

    /// Boots a stopped or failed sandbox in the background; the caller answers at once.
    pub fn start(self: &Arc<Self>, record: &SandboxRecord) {
        if matches!(record.status, Status::Ready | Status::Provisioning) {
            return;
        }
        self.set_status(&record.id, Status::Provisioning, None);
        self.boot_in_background(record.id.clone());
    }

    fn boot_in_background(self: &Arc<Self>, id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let op = this.op_lock(&id);
            let _guard = op.lock().await;
            match this.boot(&id).await {
                Ok(()) => {
                    this.touch(&id);
                    this.set_status(&id, Status::Ready, None);
                    tracing::info!(sandbox = %id, "sandbox ready");
                }
                Err(error) => {
                    tracing::warn!(sandbox = %id, %error, "sandbox failed to boot");
                    this.set_status(&id, Status::Failed, Some(error.to_string()));
                }
            }
        });
    }

    /// Creates the runtime sandbox if needed, starts it and pushes the current config.
    async fn boot(&self, id: &str) -> Result<(), ApiError> {
        let Some(record) = self.store.get_by_id(id)? else {
            return Ok(()); // deleted meanwhile
        };
        let internal = |e: RuntimeError| ApiError::Internal(e.to_string());
        match self.runtime.state(id).await {
            Err(RuntimeError::NotFound(_)) => {
                self.runtime
                    .create(self.spec_for(&record))
                    .await
                    .map_err(internal)?;
                self.runtime.start(id).await.map_err(internal)?;
            }
            Ok(SandboxState::Running { .. }) => {}
            // However it stopped (stop, idle TTL, a crash of its own or of the server), a
            // non-persistent sandbox comes back from the clean snapshot (spec §2.2.8).
            Ok(SandboxState::Stopped | SandboxState::Failed(_)) if !record.persistent => {
                self.discard_writes(&record).await?;
                self.runtime.start(id).await.map_err(internal)?;
            }
            Ok(SandboxState::Failed(_)) => {
                self.runtime.stop(id).await.map_err(internal)?;
                self.runtime.start(id).await.map_err(internal)?;
            }
            Ok(_) => self.runtime.start(id).await.map_err(internal)?,
            Err(error) => return Err(internal(error)),
        }
        lock(&self.clients).remove(id);
        // The runtime replays the config the sandbox was created with; updates since then
        // live in the store.
        self.push_config(&record).await
    }

    /// Replaces the stopped sandbox's runtime state by a fresh one with the same id, dropping
    /// its writable layer. The id, and so `dataplane_url`, stay; the store is not touched, so
    /// a crash in between leaves a record without a runtime sandbox, which `boot` creates.
    async fn discard_writes(&self, record: &SandboxRecord) -> Result<(), ApiError> {
        let internal = |e: RuntimeError| ApiError::Internal(e.to_string());
        match self.runtime.destroy(&record.id).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(error) => return Err(internal(error)),
        }
        tracing::info!(sandbox = %record.id, "non-persistent sandbox: discarded its writes");
        self.runtime
            .create(self.spec_for(record))
            .await
            .map_err(internal)
    }

    /// What a sandbox on the default snapshot boots from.
    pub fn default_base(&self) -> SandboxBase {
        SandboxBase {
            layers: vec![LayerRef::Prepared(self.snapshot.path.clone())],
            run_config: self.snapshot.run_config.clone(),
        }
    }

    /// The snapshot run_config below the sandbox's own.
    pub fn base_run_config<'a>(&'a self, record: &'a SandboxRecord) -> &'a RunConfig {
        record
            .base
            .as_ref()
            .map_or(&self.snapshot.run_config, |base| &base.run_config)
    }

    fn layer_paths(&self, record: &SandboxRecord) -> Vec<std::path::PathBuf> {
        let Some(base) = &record.base else {
            return vec![self.snapshot.path.clone()];
        };
        base.layers
            .iter()
            .map(|layer| match layer {
                LayerRef::Stored(id) => self.layers.layer_path(id),
                LayerRef::Prepared(path) => path.clone(),
            })
            .collect()
    }

    /// Whether the runtime can run sandboxes of `backend`.
    pub fn supports(&self, backend: cordon_runtime::Backend) -> bool {
        self.runtime.supports(backend)
    }

    fn spec_for(&self, record: &SandboxRecord) -> SandboxSpec {
        SandboxSpec {
            id: record.id.clone(),
            layers: self.layer_paths(record),
            limits: Limits {
                cpu_millicores: record.cpu_millicores,
                memory_bytes: record.mem_bytes,
                pids: None,
                disk_bytes: record.fs_capacity_bytes,
            },
            hostname: "sandbox".into(),
            agent_config: self.agent_config(record),
            backend: record.runtime,
            weaken: Default::default(),
        }
    }

    fn agent_config(&self, record: &SandboxRecord) -> AgentConfig {
        AgentConfig {
            run_config: record.run_config.over(self.base_run_config(record)),
            egress: self
                .egress
                .as_ref()
                .map(|egress| egress.agent_config(record)),
            ..AgentConfig::default()
        }
    }

    /// Sends the sandbox's merged settings to its agent (`PUT /_cordon/config`).
    pub async fn push_config(&self, record: &SandboxRecord) -> Result<(), ApiError> {
        let body = serde_json::to_vec(&self.agent_config(record))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let request = http::Request::put("/_cordon/config")
            .header(http::header::HOST, "agent")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Bytes::from(body))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let client = self.agent(&record.id).await?;
        let response = client
            .request_bytes(request)
            .await
            .map_err(|e| ApiError::AgentUnreachable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(ApiError::Internal(format!(
                "agent refused the config: {}",
                response.status()
            )));
        }
        Ok(())
    }

    /// The cached agent client, reconnected when its channel closed.
    pub async fn agent(&self, id: &str) -> Result<AgentClient, ApiError> {
        if let Some(client) = lock(&self.clients).get(id) {
            if !client.is_closed() {
                return Ok(client.clone());
            }
        }
        let io = self
            .runtime
            .open_channel(id)
            .await
            .map_err(|e| ApiError::AgentUnreachable(e.to_string()))?;
        let client = match &self.egress {
            Some(egress) => {
                let client =
                    AgentClient::connect_with_inbound(io, egress.inbound_handler(id.into()));
                attach_egress_session(&client, id).await;
                client
            }
            None => AgentClient::connect(io),
        };
        lock(&self.clients).insert(id.to_string(), client.clone());
        Ok(client)
    }

    /// Stops the sandbox, answering within the clients' timeout even if the stop goes on.
    pub async fn stop(self: &Arc<Self>, id: &str) {
        let this = self.clone();
        let owned = id.to_string();
        let task = tokio::spawn(async move {
            let op = this.op_lock(&owned);
            let _guard = op.lock().await;
            lock(&this.clients).remove(&owned);
            match this.runtime.stop(&owned).await {
                Ok(()) | Err(RuntimeError::NotFound(_)) => {
                    this.set_status(&owned, Status::Stopped, None)
                }
                Err(error) => this.set_status(&owned, Status::Failed, Some(error.to_string())),
            }
        });
        let _ = tokio::time::timeout(STOP_ANSWER_WITHIN, task).await;
    }

    /// Deletes the sandbox however it goes (the API, a TTL, a pool shrinking): its record,
    /// its egress records and compiled policy, then its runtime state in the background.
    pub fn delete(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        self.store.delete(id)?;
        if let Some(egress) = &self.egress {
            egress.forget(id);
            if let Err(error) = self.store.delete_egress_events(id) {
                tracing::warn!(sandbox = %id, %error, "deleting egress records");
            }
        }
        lock(&self.clients).remove(id);
        lock(&self.activity).remove(id);
        let this = self.clone();
        let owned = id.to_string();
        tokio::spawn(async move {
            let op = this.op_lock(&owned);
            let _guard = op.lock().await;
            match this.runtime.destroy(&owned).await {
                Ok(()) | Err(RuntimeError::NotFound(_)) => {}
                Err(error) => tracing::warn!(sandbox = %owned, %error, "destroying sandbox"),
            }
            lock(&this.locks).remove(&owned);
            this.reclaim_wanted.notify_one();
        });
        Ok(())
    }

    /// Copies the sandbox's writable layer into `dest` (see `Runtime::capture`), serialised
    /// with its other lifecycle operations.
    pub async fn capture(&self, id: &str, dest: &std::path::Path) -> Result<u64, ApiError> {
        let op = self.op_lock(id);
        let _guard = op.lock().await;
        self.runtime
            .capture(id, dest)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// Waits until the sandbox leaves `provisioning` or `timeout` passes; the latest record.
    pub async fn wait_settled(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<SandboxRecord>, ApiError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.status_changed.notified();
            let record = self.store.get_by_id(id)?;
            match &record {
                Some(r) if r.status == Status::Provisioning => {}
                _ => return Ok(record),
            }
            // Poll too, in case a change raced with the registration above.
            let tick = tokio::time::Instant::now() + Duration::from_millis(250);
            if tokio::time::timeout_at(tick.min(deadline), notified)
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Ok(record);
            }
        }
    }

    /// For the data plane: a ready sandbox, resuming a stopped one first (spec §3.1).
    pub async fn ensure_ready(self: &Arc<Self>, record: &SandboxRecord) -> Result<(), ApiError> {
        if record.status == Status::Ready {
            return Ok(());
        }
        self.start(record);
        match self.wait_settled(&record.id, DATAPLANE_READY_WAIT).await? {
            Some(r) if r.status == Status::Ready => Ok(()),
            Some(r) => Err(ApiError::NotReady(format!(
                "sandbox '{}' is {}{}",
                r.name,
                r.status.as_str(),
                r.status_message
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ))),
            None => Err(ApiError::NotFound(format!(
                "sandbox '{}' not found",
                record.name
            ))),
        }
    }

    /// When the runtime no longer runs a sandbox the store calls ready (it died on its own),
    /// records it stopped so the next data-plane request boots it again.
    pub async fn notice_if_dead(&self, id: &str) {
        let running = matches!(
            self.runtime.state(id).await,
            Ok(SandboxState::Running { .. })
        );
        let ready = matches!(self.store.get_by_id(id), Ok(Some(r)) if r.status == Status::Ready);
        if ready && !running {
            tracing::info!(
                sandbox = id,
                "sandbox is no longer running; marking it stopped"
            );
            lock(&self.clients).remove(id);
            self.set_status(id, Status::Stopped, None);
        }
    }

    /// Records data-plane use now.
    pub fn touch(&self, id: &str) {
        let mut activity = lock(&self.activity);
        let entry = activity.entry(id.to_string()).or_insert(Activity {
            last: Instant::now(),
            open_connections: 0,
        });
        entry.last = Instant::now();
    }

    /// Marks a long-lived connection (a WebSocket) open or closed; open ones count as activity.
    pub fn connection_opened(&self, id: &str, opened: bool) {
        self.touch(id);
        if let Some(entry) = lock(&self.activity).get_mut(id) {
            if opened {
                entry.open_connections += 1;
            } else {
                entry.open_connections = entry.open_connections.saturating_sub(1);
            }
        }
    }

    /// How long the sandbox has been idle; zero while a connection is open.
    pub fn idle_for(&self, id: &str) -> Duration {
        match lock(&self.activity).get(id) {
            Some(a) if a.open_connections > 0 => Duration::ZERO,
            Some(a) => a.last.elapsed(),
            None => Duration::ZERO,
        }
    }
}

/// A stable UUID from the layer digest `sha256:<hex>`.
fn snapshot_uuid(digest: &str) -> String {
    let hex: String = digest
        .trim_start_matches("sha256:")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(32)
        .collect();
    match u128::from_str_radix(&hex, 16) {
        Ok(value) if hex.len() == 32 => uuid::Uuid::from_u128(value).to_string(),
        _ => uuid::Uuid::nil().to_string(),
    }
}

/// Makes `client`'s session the one the agent's egress relay opens its streams on. A failure
/// (an old agent) only leaves the sandbox without a way out.
async fn attach_egress_session(client: &AgentClient, id: &str) {
    let request = http::Request::put(format!(
        "http://agent{}",
        cordon_api::agent::EGRESS_SESSION_PATH
    ))
    .body(Bytes::new());
    let attached = match request {
        Ok(request) => client.request_bytes(request).await.map(|r| r.status()),
        Err(error) => Err(error.into()),
    };
    match attached {
        Ok(status) if status.is_success() => {}
        Ok(status) => tracing::warn!(sandbox = %id, %status, "agent refused the egress session"),
        Err(error) => tracing::warn!(sandbox = %id, %error, "attaching the egress session"),
    }
}
