//! The stored snapshot record and its wire form (spec §2.1.3).

use std::path::PathBuf;

use cordon_api::RunConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::{iso8601, LayerRef};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    Building,
    Ready,
    Failed,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Building => "building",
            SnapshotStatus::Ready => "ready",
            SnapshotStatus::Failed => "failed",
        }
    }
}

/// Where a snapshot's layers come from; kept so that a build interrupted by a restart can be
/// run again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BuildSource {
    /// `POST /snapshots`: an image from a registry.
    Pull {
        docker_image: String,
        registry_id: Option<String>,
    },
    /// `POST /snapshots/import`: an uploaded archive, in the data dir until the build ends.
    Import { archive: PathBuf },
    /// `POST /boxes/{name}/snapshot`: a sandbox's writable layer over its base.
    Capture { sandbox_id: String },
}

/// One workspace snapshot as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub workspace: String,
    pub name: String,
    pub status: SnapshotStatus,
    pub status_message: Option<String>,
    pub source: BuildSource,
    /// The tag that moves to this snapshot once it is ready.
    pub tag: String,
    pub fs_capacity_bytes: u64,
    pub fs_used_bytes: Option<u64>,
    pub image_digest: Option<String>,
    /// Top first; empty until ready.
    pub layers: Vec<LayerRef>,
    /// The request's run_config, laid over the image's (or sandbox's) at build.
    pub requested_run_config: RunConfig,
    /// The effective one once ready: what sandboxes from this snapshot start with.
    pub run_config: RunConfig,
    pub created_at: u64,
    pub updated_at: u64,
}

impl SnapshotRecord {
    /// The Snapshot object; `tags` are those currently pointing at it.
    pub fn to_json(&self, tags: &[String]) -> Value {
        let (docker_image, registry_id, source_sandbox_id) = match &self.source {
            BuildSource::Pull {
                docker_image,
                registry_id,
            } => (Some(docker_image), registry_id.as_ref(), None),
            BuildSource::Import { .. } => (None, None, None),
            BuildSource::Capture { sandbox_id } => (None, None, Some(sandbox_id)),
        };
        json!({
            "id": self.id,
            "name": self.name,
            "status": self.status.as_str(),
            "status_message": self.status_message,
            "fs_capacity_bytes": self.fs_capacity_bytes,
            "fs_used_bytes": self.fs_used_bytes,
            "docker_image": docker_image,
            "image_digest": self.image_digest,
            "source_sandbox_id": source_sandbox_id,
            "registry_id": registry_id,
            "created_at": iso8601(self.created_at),
            "updated_at": iso8601(self.updated_at),
            "tags": tags,
            "run_config": self.run_config,
        })
    }

    pub fn registry_id(&self) -> Option<&str> {
        match &self.source {
            BuildSource::Pull { registry_id, .. } => registry_id.as_deref(),
            _ => None,
        }
    }
}
