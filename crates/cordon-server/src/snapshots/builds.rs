//! Background builds: a pull from a registry, an uploaded archive, or a sandbox capture,
//! each ending `ready` (its tag moves to it) or `failed` with the reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cordon_api::RunConfig;
use cordon_image::{ArchivedImage, Image, RegistryCredentials, UnpackLimits};
use tokio_util::sync::CancellationToken;

use super::record::{BuildSource, SnapshotRecord, SnapshotStatus};
use super::{lock, Snapshots};
use crate::error::ApiError;
use crate::model::{now_ms, LayerRef};

/// What a finished build produced.
struct Built {
    /// Top first.
    layers: Vec<LayerRef>,
    /// The image's (or the captured sandbox's) run_config, below the request's.
    run_config: RunConfig,
    image_digest: Option<String>,
    fs_used_bytes: u64,
}

impl Snapshots {
    /// Records a new `building` snapshot and starts its build; the caller answers at once.
    pub async fn insert_and_build(
        self: &Arc<Self>,
        snapshot: &SnapshotRecord,
    ) -> Result<(), ApiError> {
        let token = {
            // Registered under the gate: a reclaim never runs while a build is registered.
            let _claim = self.claim_layers().await;
            self.store.insert_snapshot(snapshot)?;
            self.register_build(&snapshot.id)
        };
        tracing::info!(snapshot = %snapshot.id, name = %snapshot.name, "building snapshot");
        tokio::spawn(self.clone().run_build(snapshot.id.clone(), token));
        Ok(())
    }

    /// After a restart: builds every snapshot still `building` again (nothing is lost).
    pub async fn resume_builds(self: &Arc<Self>) -> Result<(), ApiError> {
        let building = self.store.building_snapshots()?;
        let mut tokens = Vec::new();
        {
            let _claim = self.claim_layers().await;
            for snapshot in &building {
                tokens.push((snapshot.id.clone(), self.register_build(&snapshot.id)));
            }
        }
        for (id, token) in tokens {
            tracing::info!(snapshot = %id, "resuming a build interrupted by a restart");
            tokio::spawn(self.clone().run_build(id, token));
        }
        self.remove_orphaned_imports();
        Ok(())
    }

    fn register_build(&self, id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        lock(&self.builds).insert(id.to_string(), token.clone());
        token
    }

    async fn run_build(self: Arc<Self>, id: String, cancelled: CancellationToken) {
        let outcome = if self.is_capture(&id) {
            // Never dropped halfway: a capture may have frozen the sandbox, and only its own
            // end thaws it. The runtime bounds the copy; a deleted snapshot's layer is
            // reclaimed afterwards.
            Some(self.build_in_turn(&id).await)
        } else {
            tokio::select! {
                outcome = self.build_in_turn(&id) => Some(outcome),
                () = cancelled.cancelled() => None,
            }
        };
        if let Some(outcome) = outcome {
            self.finish(&id, outcome);
        }
        self.remove_import_archive(&id);
        lock(&self.builds).remove(&id);
        // Layers of a failed or cancelled build (and of anything deleted meanwhile) go now.
        self.reclaim_wanted.notify_one();
    }

    fn is_capture(&self, id: &str) -> bool {
        matches!(
            self.store.snapshot_by_id(id),
            Ok(Some(SnapshotRecord {
                source: BuildSource::Capture { .. },
                ..
            }))
        )
    }

    async fn build_in_turn(&self, id: &str) -> Result<Built, String> {
        let _slot = self
            .build_slots
            .acquire()
            .await
            .map_err(|_| "the server is shutting down".to_string())?;
        let snapshot = match self.store.snapshot_by_id(id) {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return Err("deleted".into()),
            Err(error) => return Err(error.to_string()),
        };
        if matches!(snapshot.source, BuildSource::Capture { .. }) {
            return self.build(&snapshot).await; // not cut off: see `run_build`
        }
        let timeout = self.limits.build_timeout;
        match tokio::time::timeout(timeout, self.build(&snapshot)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "the build took longer than {} s and was stopped",
                timeout.as_secs()
            )),
        }
    }

    async fn build(&self, snapshot: &SnapshotRecord) -> Result<Built, String> {
        match &snapshot.source {
            BuildSource::Pull {
                docker_image,
                registry_id,
            } => {
                self.pull(snapshot, docker_image, registry_id.as_deref())
                    .await
            }
            BuildSource::Import { archive } => self.import(snapshot, archive).await,
            BuildSource::Capture { sandbox_id } => self.capture(sandbox_id).await,
        }
    }

    /// Records the outcome, unless the snapshot was deleted meanwhile.
    fn finish(&self, id: &str, outcome: Result<Built, String>) {
        let Ok(Some(mut snapshot)) = self.store.snapshot_by_id(id) else {
            return;
        };
        match outcome {
            Ok(built) => {
                snapshot.status = SnapshotStatus::Ready;
                snapshot.status_message = None;
                snapshot.layers = built.layers;
                snapshot.run_config = snapshot.requested_run_config.over(&built.run_config);
                snapshot.image_digest = built.image_digest;
                snapshot.fs_used_bytes = Some(built.fs_used_bytes);
                tracing::info!(snapshot = %id, name = %snapshot.name, "snapshot ready");
            }
            Err(message) => {
                tracing::warn!(snapshot = %id, %message, "snapshot build failed");
                snapshot.status = SnapshotStatus::Failed;
                snapshot.status_message = Some(message);
            }
        }
        snapshot.updated_at = now_ms();
        if let Err(error) = self.store.update_snapshot(&snapshot) {
            tracing::warn!(snapshot = %id, %error, "recording the build's outcome");
        }
    }

    fn unpack_limits(&self, snapshot: &SnapshotRecord) -> UnpackLimits {
        UnpackLimits {
            max_unpacked_bytes: snapshot.fs_capacity_bytes.min(self.limits.max_image_bytes),
            max_entries: self.limits.max_image_entries,
            max_compressed_bytes: self.limits.max_image_bytes,
        }
    }

    async fn pull(
        &self,
        snapshot: &SnapshotRecord,
        docker_image: &str,
        registry_id: Option<&str>,
    ) -> Result<Built, String> {
        let credentials = match registry_id {
            Some(id) => self.registry_credentials(&snapshot.workspace, id)?,
            None => None,
        };
        let image = cordon_image::pull_image(
            &self.layers,
            docker_image,
            &self.registry,
            credentials.as_ref(),
            &self.unpack_limits(snapshot),
        )
        .await
        .map_err(|e| format!("pulling {docker_image}: {e}"))?;
        Ok(built_from(image))
    }

    fn registry_credentials(
        &self,
        workspace: &str,
        registry_id: &str,
    ) -> Result<Option<RegistryCredentials>, String> {
        let registry = self
            .store
            .find_registry(workspace, registry_id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("registry {registry_id} no longer exists"))?;
        registry
            .credentials(&self.sealing)
            .map_err(|e| format!("registry '{}': {e}", registry.name))
    }

    async fn import(&self, snapshot: &SnapshotRecord, archive: &Path) -> Result<Built, String> {
        if !archive.is_file() {
            return Err(
                "the uploaded archive is gone (the server restarted before it was \
                        recorded); import it again"
                    .into(),
            );
        }
        let layers = self.layers.clone();
        let archive = archive.to_path_buf();
        let mut limits = self.unpack_limits(snapshot);
        limits.max_compressed_bytes = self.limits.max_import_bytes;
        let images = tokio::task::spawn_blocking(move || {
            cordon_image::import_archive(&layers, &archive, &limits)
        })
        .await
        .map_err(|e| format!("import: {e}"))?
        .map_err(|e| format!("importing the archive: {e}"))?;
        let image = pick_image(images, &snapshot.name, &snapshot.tag)?;
        Ok(built_from(image))
    }

    /// Copies the sandbox's writable layer into a new layer over the sandbox's own layers.
    async fn capture(&self, sandbox_id: &str) -> Result<Built, String> {
        let gone = || "the sandbox was deleted before it could be captured".to_string();
        let sandbox = self
            .store
            .get_by_id(sandbox_id)
            .map_err(|e| e.to_string())?
            .ok_or_else(gone)?;
        let base = sandbox
            .base
            .clone()
            .unwrap_or_else(|| self.sandboxes.default_base());
        let layers = self.layers.clone();
        let pending = tokio::task::spawn_blocking(move || layers.begin_layer())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("preparing the layer: {e}"))?;
        let copied = self
            .sandboxes
            .capture(sandbox_id, pending.path())
            .await
            .map_err(|e| format!("capturing the sandbox: {e}"))?;
        let captured = tokio::task::spawn_blocking(move || pending.commit())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("storing the captured layer: {e}"))?;
        let mut layers = vec![LayerRef::Stored(captured)];
        layers.extend(base.layers);
        Ok(Built {
            layers,
            // The sandbox's `env_vars` create field (generated client) is not carried over;
            // its run_config is (spec §2.2.11).
            run_config: sandbox.run_config.over(&base.run_config),
            image_digest: None,
            fs_used_bytes: copied,
        })
    }

    /// Where the archive uploaded for snapshot `id` waits for its build.
    pub fn import_archive_path(&self, id: &str) -> PathBuf {
        self.imports_dir.join(format!("{id}.archive"))
    }

    /// Removes the snapshot's uploaded archive, if it had one.
    pub fn remove_import_archive(&self, id: &str) {
        let archive = self.import_archive_path(id);
        match std::fs::remove_file(&archive) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(path = %archive.display(), %error, "removing archive"),
        }
    }

    /// Archives of imports that no build waits for any more (deleted, or cut off by a crash).
    fn remove_orphaned_imports(&self) {
        let Ok(entries) = std::fs::read_dir(&self.imports_dir) else {
            return;
        };
        let wanted: Vec<_> = lock(&self.builds).keys().cloned().collect();
        for entry in entries.flatten() {
            let path = entry.path();
            let id = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if !wanted.iter().any(|w| w == id) {
                tracing::info!(path = %path.display(), "removing an orphaned import archive");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

fn built_from(image: Image) -> Built {
    Built {
        layers: image.layers.into_iter().map(LayerRef::Stored).collect(),
        run_config: image.run_config,
        image_digest: Some(image.manifest_digest),
        fs_used_bytes: image.size_bytes,
    }
}

/// The image an import means: the only one, else the one the archive names `name:tag`
/// (or `name`, or just `tag`, as OCI layouts often do).
fn pick_image(mut images: Vec<ArchivedImage>, name: &str, tag: &str) -> Result<Image, String> {
    if images.len() == 1 {
        return Ok(images.remove(0).image);
    }
    if images.is_empty() {
        return Err("the archive holds no image".into());
    }
    let full = format!("{name}:{tag}");
    let named = |reference: &str| {
        reference == full
            || reference.ends_with(&format!("/{full}"))
            || reference == name
            || reference == tag
    };
    let count = images.len();
    let mut matching: Vec<ArchivedImage> = images
        .into_iter()
        .filter(|i| i.reference.as_deref().is_some_and(named))
        .collect();
    match matching.len() {
        1 => Ok(matching.remove(0).image),
        0 => Err(format!(
            "the archive holds {count} images and none is named {full}; \
             import an archive with one image or name the one you want"
        )),
        n => Err(format!(
            "the archive holds {n} images named {full}; import an archive with one image"
        )),
    }
}
