use std::path::PathBuf;

use cordon_api::agent::AgentConfig;
use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// `pids.max` when the spec sets no pid limit.
pub const DEFAULT_PIDS_MAX: u64 = 1024;

/// Everything a sandbox is created with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// `[a-z0-9-]{1,64}`; checked by [`validate_id`].
    pub id: String,
    /// Read-only root filesystem layers, top first. Never written to.
    pub layers: Vec<PathBuf>,
    pub limits: Limits,
    pub hostname: String,
    /// Sent to the agent (`PUT /_cordon/config`) on every start.
    pub agent_config: AgentConfig,
    /// The backend that runs the sandbox (a [`crate::Runtimes`] routes by it).
    #[serde(default)]
    pub backend: Backend,
    /// Test-only weakenings; see [`Weakening`]. Never (de)serialised, so no JSON input (nor
    /// a `spec.json` on disk) can set it; a re-adopted sandbox restarts unweakened.
    #[doc(hidden)]
    #[serde(skip)]
    pub weaken: Weakening,
}

/// Which backend runs a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Namespaces, seccomp and cgroups (`NamespaceRuntime`).
    #[default]
    Namespace,
    /// A QEMU microVM (`MicrovmRuntime`).
    Microvm,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Namespace => "namespace",
            Backend::Microvm => "microvm",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(value: &str) -> Result<Backend, String> {
        match value {
            "namespace" => Ok(Backend::Namespace),
            "microvm" => Ok(Backend::Microvm),
            other => Err(format!(
                "unknown runtime {other:?}: expected \"namespace\" or \"microvm\""
            )),
        }
    }
}

/// Resource limits of one sandbox. `None` = the backend's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub cpu_millicores: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// Default [`DEFAULT_PIDS_MAX`].
    pub pids: Option<u64>,
    /// Size of the writable layer; `None` = unbounded (a plain host directory).
    pub disk_bytes: Option<u64>,
}

/// Deliberate weakenings, **for the security tests' positive controls only**: each probe must
/// be shown to detect a sandbox weakened this way. Reachable only from the Rust API; no server
/// input maps to any field, and the server must always pass `Weakening::default()`.
#[doc(hidden)]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weakening {
    /// Install no seccomp filter.
    pub no_seccomp: bool,
    /// Keep every capability (bounding, permitted, effective, inheritable).
    pub all_capabilities: bool,
    /// Do not join the sandbox user namespace: the init stays host root.
    pub no_user_namespace: bool,
    /// Share the host's pid namespace.
    pub no_pid_namespace: bool,
    /// Share the host's network namespace.
    pub no_net_namespace: bool,
    /// Mount /proc and /sys without masked or read-only paths.
    pub no_proc_masking: bool,
    /// Leave an fd to a host directory (the sandbox's state dir) open in the agent.
    pub leak_host_fd: bool,
}

impl Weakening {
    pub fn is_none(&self) -> bool {
        *self == Weakening::default()
    }
}

/// Checks a sandbox id: 1 to 64 characters of `[a-z0-9-]`.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(RuntimeError::InvalidId(id.to_string()))
    }
}

impl SandboxSpec {
    pub(crate) fn validate(&self) -> Result<(), RuntimeError> {
        validate_id(&self.id)?;
        if self.layers.is_empty() {
            return Err(RuntimeError::InvalidSpec(
                "at least one rootfs layer is required".into(),
            ));
        }
        if let Some(layer) = self.layers.iter().find(|l| !l.is_absolute()) {
            return Err(RuntimeError::InvalidSpec(format!(
                "layer {} is not absolute",
                layer.display()
            )));
        }
        let hostname_ok = !self.hostname.is_empty()
            && self.hostname.len() <= 64
            && self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !hostname_ok {
            return Err(RuntimeError::InvalidSpec(format!(
                "invalid hostname {:?}",
                self.hostname
            )));
        }
        if self.limits.cpu_millicores == Some(0) || self.limits.pids == Some(0) {
            return Err(RuntimeError::InvalidSpec(
                "cpu and pid limits must be positive".into(),
            ));
        }
        if matches!(self.limits.memory_bytes, Some(m) if m < 16 << 20) {
            return Err(RuntimeError::InvalidSpec(
                "memory limit below 16 MiB".into(),
            ));
        }
        if matches!(self.limits.disk_bytes, Some(d) if d < 8 << 20) {
            return Err(RuntimeError::InvalidSpec("disk limit below 8 MiB".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("abc-123").is_ok());
        assert!(validate_id(&"a".repeat(64)).is_ok());
        for bad in ["", "A", "a/b", "..", "a_b", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }
}
