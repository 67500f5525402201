//! The snapshot manager: workspace snapshots in the store, the read-only system snapshot
//! (the prepared default), reference resolution, background builds and layer reclaiming.

mod builds;
pub mod names;
pub mod record;
pub mod routes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cordon_image::{LayerStore, RegistryConfig};
use serde_json::{json, Value};
use tokio::sync::{Notify, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::model::{iso8601, SandboxBase};
use crate::sandboxes::Sandboxes;
use crate::secret_sealing::SealingKey;
use crate::store::Store;
use names::{split_reference, DEFAULT_TAG};
use record::{SnapshotRecord, SnapshotStatus};

/// Bounds on what snapshot builds and imports may cost the host.
#[derive(Debug, Clone)]
pub struct SnapshotLimits {
    /// Most unpacked (and downloaded) bytes of one image; a build's own bound is the smaller
    /// of this and its `fs_capacity_bytes`.
    pub max_image_bytes: u64,
    /// Most entries (files, directories, links) over all layers of one image.
    pub max_image_entries: u64,
    /// Largest archive `POST /snapshots/import` accepts.
    pub max_import_bytes: u64,
    /// Builds running at once; more wait their turn (still `building`).
    pub max_concurrent_builds: usize,
    /// Longest one build (pull, import or capture) may take.
    pub build_timeout: Duration,
}

impl Default for SnapshotLimits {
    fn default() -> Self {
        SnapshotLimits {
            max_image_bytes: 20 << 30,
            max_image_entries: 1_000_000,
            max_import_bytes: 20 << 30,
            max_concurrent_builds: 2,
            build_timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// A snapshot a reference resolved to.
pub enum Found {
    /// The default snapshot, shared read-only by every workspace.
    System,
    Workspace(Box<SnapshotRecord>),
}

pub struct Snapshots {
    pub store: Arc<Store>,
    pub layers: Arc<LayerStore>,
    pub sandboxes: Arc<Sandboxes>,
    /// Seals registry passwords at rest.
    pub sealing: SealingKey,
    pub limits: SnapshotLimits,
    registry: RegistryConfig,
    /// Uploaded archives wait here for their import build.
    imports_dir: PathBuf,
    /// Builds registered and not yet finished (queued or running), by snapshot id.
    builds: Mutex<HashMap<String, CancellationToken>>,
    build_slots: Semaphore,
    /// Held (shared) while a sandbox or build claims layers, (exclusive) while unused layers
    /// are deleted, so a layer is never deleted between being chosen and being recorded.
    layer_gate: RwLock<()>,
    /// Signalled when layers may have become unused.
    reclaim_wanted: Arc<Notify>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct SnapshotsConfig {
    pub store: Arc<Store>,
    pub layers: Arc<LayerStore>,
    pub sandboxes: Arc<Sandboxes>,
    pub sealing: SealingKey,
    pub limits: SnapshotLimits,
    pub registry: RegistryConfig,
    pub imports_dir: PathBuf,
    pub reclaim_wanted: Arc<Notify>,
}

impl Snapshots {
    pub fn new(config: SnapshotsConfig) -> Snapshots {
        Snapshots {
            build_slots: Semaphore::new(config.limits.max_concurrent_builds.max(1)),
            store: config.store,
            layers: config.layers,
            sandboxes: config.sandboxes,
            sealing: config.sealing,
            limits: config.limits,
            registry: config.registry,
            imports_dir: config.imports_dir,
            builds: Mutex::default(),
            layer_gate: RwLock::new(()),
            reclaim_wanted: config.reclaim_wanted,
        }
    }

    /// The system snapshot's name without its tag (`system/default`).
    pub fn system_name(&self) -> &str {
        split_reference(&self.sandboxes.snapshot.name).0
    }

    pub fn system_tag(&self) -> &str {
        split_reference(&self.sandboxes.snapshot.name)
            .1
            .unwrap_or(DEFAULT_TAG)
    }

    /// Resolves a reference (spec §2.3.2): id, `name:tag`, or a bare `name` (= `name:latest`,
    /// else the newest ready untagged snapshot of that name). The system snapshot is found
    /// from every workspace.
    pub fn find(&self, workspace: &str, reference: &str) -> Result<Option<Found>, ApiError> {
        let system = &self.sandboxes;
        if reference.eq_ignore_ascii_case(&system.snapshot_id) || reference == system.snapshot.id {
            return Ok(Some(Found::System));
        }
        if names::looks_like_uuid(reference) {
            let id = reference.to_ascii_lowercase();
            if let Some(snapshot) = self.store.workspace_snapshot(workspace, &id)? {
                return Ok(Some(Found::Workspace(Box::new(snapshot))));
            }
            // Else a name that happens to look like a UUID.
        }
        let (name, tag) = split_reference(reference);
        if name == self.system_name() {
            let matches = tag.unwrap_or(DEFAULT_TAG) == self.system_tag();
            return Ok(matches.then_some(Found::System));
        }
        let found = match tag {
            Some(tag) => self.store.tagged_snapshot(workspace, name, tag)?,
            None => match self.store.tagged_snapshot(workspace, name, DEFAULT_TAG)? {
                Some(snapshot) => Some(snapshot),
                None => self.store.newest_untagged_snapshot(workspace, name)?,
            },
        };
        Ok(found.map(|s| Found::Workspace(Box::new(s))))
    }

    pub fn find_or_404(&self, workspace: &str, reference: &str) -> Result<Found, ApiError> {
        self.find(workspace, reference)?
            .ok_or_else(|| ApiError::NotFound(format!("Snapshot '{reference}' not found")))
    }

    /// The Snapshot object of what was found.
    pub fn to_json(&self, found: &Found) -> Result<Value, ApiError> {
        match found {
            Found::System => Ok(self.system_json()),
            Found::Workspace(snapshot) => Ok(snapshot.to_json(&self.store.tags_of(&snapshot.id)?)),
        }
    }

    /// The default snapshot as a Snapshot object (spec §2.1.3).
    pub fn system_json(&self) -> Value {
        let snapshot = &self.sandboxes.snapshot;
        let built = iso8601(snapshot.built_at.saturating_mul(1000));
        json!({
            "id": self.sandboxes.snapshot_id,
            "name": self.system_name(),
            "status": "ready",
            "status_message": null,
            "fs_capacity_bytes": snapshot.size_bytes,
            "fs_used_bytes": snapshot.size_bytes,
            "docker_image": null,
            "image_digest": snapshot.id,
            "source_sandbox_id": null,
            "registry_id": null,
            "created_at": built,
            "updated_at": built,
            "tags": [self.system_tag()],
            "run_config": snapshot.run_config,
        })
    }

    /// What a sandbox created from `found` boots from: its id, base and default disk limit.
    /// Only ready snapshots qualify.
    pub fn sandbox_base(
        &self,
        found: Found,
        reference: &str,
    ) -> Result<(String, SandboxBase, Option<u64>), ApiError> {
        match found {
            Found::System => Ok((
                self.sandboxes.snapshot_id.clone(),
                self.sandboxes.default_base(),
                None,
            )),
            Found::Workspace(snapshot) => match snapshot.status {
                SnapshotStatus::Ready => Ok((
                    snapshot.id.clone(),
                    SandboxBase {
                        layers: snapshot.layers.clone(),
                        run_config: snapshot.run_config.clone(),
                    },
                    Some(snapshot.fs_capacity_bytes),
                )),
                SnapshotStatus::Building => Err(ApiError::Invalid(format!(
                    "snapshot '{reference}' is still building; retry once it is ready"
                ))),
                SnapshotStatus::Failed => Err(ApiError::Invalid(format!(
                    "snapshot '{reference}' failed to build: {}",
                    snapshot.status_message.as_deref().unwrap_or_default()
                ))),
            },
        }
    }

    /// Holds layers from being reclaimed while a sandbox or build records the ones it uses.
    pub async fn claim_layers(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.layer_gate.read().await
    }

    /// Deletes a workspace snapshot and its tags and cancels its build; its layers are
    /// reclaimed in the background unless something else still uses them.
    pub fn delete(&self, snapshot: &SnapshotRecord) -> Result<(), ApiError> {
        self.store.delete_snapshot(&snapshot.id)?;
        if let Some(build) = lock(&self.builds).get(&snapshot.id) {
            build.cancel();
        }
        tracing::info!(snapshot = %snapshot.id, name = %snapshot.name, "snapshot deleted");
        self.reclaim_wanted.notify_one();
        Ok(())
    }

    /// Reclaims unused layers whenever asked (and once now), for the life of the server.
    pub async fn reclaim_unused_layers_forever(self: Arc<Self>) {
        self.reclaim_wanted.notify_one();
        loop {
            self.reclaim_wanted.notified().await;
            if let Err(error) = self.reclaim_unused_layers().await {
                tracing::warn!(%error, "reclaiming unused layers");
            }
        }
    }

    async fn reclaim_unused_layers(&self) -> Result<(), ApiError> {
        let _exclusive = self.layer_gate.write().await;
        // A build's layers are recorded only when it finishes; it asks again then.
        if !lock(&self.builds).is_empty() {
            return Ok(());
        }
        let in_use = self.store.layers_in_use()?;
        let layers = self.layers.clone();
        let freed = tokio::task::spawn_blocking(move || layers.remove_unreferenced(&in_use))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if freed > 0 {
            tracing::info!(freed_bytes = freed, "reclaimed unused layers");
        }
        Ok(())
    }
}
