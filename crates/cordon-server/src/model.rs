//! The stored sandbox record and its wire form (spec §2.1).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use cordon_api::RunConfig;
use cordon_image::LayerId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Lifecycle status as the clients spell it (spec §2.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Provisioning,
    Ready,
    Stopped,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Provisioning => "provisioning",
            Status::Ready => "ready",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }
}

/// One read-only root filesystem layer a snapshot or sandbox boots from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerRef {
    /// A layer of the layer store (`<data>/layers`), pulled or captured.
    Stored(LayerId),
    /// A layer outside it: the default snapshot's directory in the cache.
    Prepared(PathBuf),
}

/// What a sandbox boots from, copied from its snapshot when it is created, so that deleting
/// the snapshot never breaks the sandbox (its layers count as in use while it exists).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxBase {
    /// Top first, like `SandboxSpec.layers`.
    pub layers: Vec<LayerRef>,
    /// The snapshot's run_config: the lowest layer of the sandbox's effective one.
    pub run_config: RunConfig,
}

/// One sandbox as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// UUID; also the runtime id (lowercase hex and dashes fit `[a-z0-9-]`).
    pub id: String,
    pub workspace: String,
    pub name: String,
    pub status: Status,
    pub status_message: Option<String>,
    pub snapshot_id: String,
    pub cpu_millicores: Option<u32>,
    pub mem_bytes: Option<u64>,
    pub fs_capacity_bytes: Option<u64>,
    pub idle_ttl_seconds: u64,
    pub delete_after_stop_seconds: u64,
    pub persistent: bool,
    pub labels: BTreeMap<String, String>,
    /// Echoed back exactly as requested (spec §6.3); not enforced.
    pub access_delegation: Option<Value>,
    /// The sandbox layer only; the snapshot layer sits below it.
    pub run_config: RunConfig,
    /// Milliseconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
    pub stopped_at: Option<u64>,
    /// `None` in records written before snapshots existed: the default snapshot as prepared.
    #[serde(default)]
    pub base: Option<SandboxBase>,
    /// The template the sandbox was made from (spec §2.8), as named then; shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_name: Option<String>,
    /// Its id: what keeps the template from being deleted, whatever it is renamed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// The backend that runs it (Cordon extension `runtime`); records written before the
    /// microVM backend existed are namespace sandboxes.
    #[serde(default)]
    pub runtime: cordon_runtime::Backend,
    /// `proxy_config` (spec §6.1), sealed, with the redacted copy responses show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_config: Option<crate::egress::StoredProxyConfig>,
}

impl SandboxRecord {
    /// The Sandbox object of spec §2.1.1. Its `run_config` is the effective one (spec §2.1.2):
    /// the sandbox's own layer over `snapshot_run_config`, which is what commands get.
    pub fn to_json(&self, public_base: &str, snapshot_run_config: &RunConfig) -> Value {
        let mut object = json!({
            "id": self.id,
            "name": self.name,
            "dataplane_url": format!("{public_base}/dp/{}", self.id),
            "status": self.status.as_str(),
            "status_message": self.status_message,
            "created_at": iso8601(self.created_at),
            "updated_at": iso8601(self.updated_at),
            "stopped_at": self.stopped_at.map(iso8601),
            "idle_ttl_seconds": self.idle_ttl_seconds,
            "delete_after_stop_seconds": self.delete_after_stop_seconds,
            "snapshot_id": self.snapshot_id,
            "vcpus": self.cpu_millicores.map(|m| m.div_ceil(1000)),
            "cpu_millicores": self.cpu_millicores,
            "mem_bytes": self.mem_bytes,
            "fs_capacity_bytes": self.fs_capacity_bytes,
            "persistent": self.persistent,
            "labels": self.labels,
            "run_config": self.run_config.over(snapshot_run_config),
            // Cordon extensions: the backend, and the isolation the sandbox really has.
            "runtime": self.runtime.as_str(),
            "isolation": cordon_runtime::isolation_of(self.runtime).as_str(),
        });
        if let Some(map) = object.as_object_mut() {
            if let Some(delegation) = &self.access_delegation {
                map.insert("access_delegation".into(), delegation.clone());
            }
            if let Some(template) = &self.template_name {
                map.insert("template_name".into(), template.clone().into());
            }
            if let Some(proxy_config) = &self.proxy_config {
                map.insert("proxy_config".into(), proxy_config.redacted.clone());
            }
        }
        object
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, now (token `iat`/`exp`, key rotation).
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// `2026-01-02T03:04:05.678000+00:00`: an offset rather than `Z`, which older Pythons'
/// `datetime.fromisoformat` refuse.
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}000+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_iso8601() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(
            iso8601(1_709_251_199_123),
            "2024-02-29T23:59:59.123000+00:00"
        );
    }
}
