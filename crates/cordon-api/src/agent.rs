//! The host ↔ agent control surface: routes under [`CONTROL_PREFIX`] that only the host may
//! call. The server's data-plane router never forwards a client request under this prefix.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::RunConfig;

/// Path prefix of the agent's host-only routes.
pub const CONTROL_PREFIX: &str = "/_cordon/";

/// `PUT /_cordon/config`: the sandbox-level settings commands inherit. The host sends it when
/// the sandbox starts (it doubles as the readiness probe) and again when they change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Snapshot layer merged with the sandbox layer (spec §2.1.2); commands add their own.
    #[serde(default)]
    pub run_config: RunConfig,
    /// Cap on the bytes kept per output stream of one command.
    #[serde(default = "default_output_cap")]
    pub output_buffer_bytes: u64,
    /// Largest file `POST /upload` accepts; `None` means [`DEFAULT_UPLOAD_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_max_bytes: Option<u64>,
    /// Most command sessions kept at once, running or finished within their TTL (at least 1).
    /// When full, the oldest finished session expires early; when all are running, new
    /// commands are refused.
    #[serde(default = "default_max_commands")]
    pub max_commands: u64,
    /// The way out through the host's egress proxy; `None`: the sandbox has no way out (no
    /// proxy environment, nothing added to its trust store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressConfig>,
}

/// `AgentConfig::egress`: what commands need to use the egress relay
/// ([`EGRESS_RELAY_PORT`](crate::tunnel::EGRESS_RELAY_PORT)) and the proxy behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressConfig {
    /// The proxy's CA certificate (PEM): it signs the certificates of intercepted hosts, so
    /// it goes into the sandbox's trust store. Public, never a secret.
    pub ca_pem: String,
    /// `env_vars` of the enabled proxy rules (dummy credentials for tools; spec §6.1). They
    /// sit under the run_config env, which wins.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
}

/// Bounds on [`EgressConfig`]: it is host input, but an operator CA file or many rules could
/// still make it large.
pub const MAX_EGRESS_CA_PEM_BYTES: usize = 256 * 1024;
pub const MAX_EGRESS_ENV_BYTES: usize = crate::run_config::MAX_ENV_BYTES;

/// Host-only: marks the channel session this request arrives on as the one the agent's egress
/// relay opens its streams on (the host accepts reverse streams there). The newest wins.
pub const EGRESS_SESSION_PATH: &str = "/_cordon/egress/session";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressConfigError {
    #[error("egress CA is not a PEM certificate")]
    NotPem,
    #[error("egress CA is larger than {MAX_EGRESS_CA_PEM_BYTES} bytes")]
    CaTooLarge,
    #[error("egress env_vars: {0}")]
    Env(#[from] crate::RunConfigError),
    #[error("egress env_vars carry more than {MAX_EGRESS_ENV_BYTES} bytes")]
    EnvTooLarge,
}

impl EgressConfig {
    pub fn validate(&self) -> Result<(), EgressConfigError> {
        if self.ca_pem.len() > MAX_EGRESS_CA_PEM_BYTES {
            return Err(EgressConfigError::CaTooLarge);
        }
        if !self.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(EgressConfigError::NotPem);
        }
        let env_bytes: usize = self.env_vars.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > MAX_EGRESS_ENV_BYTES {
            return Err(EgressConfigError::EnvTooLarge);
        }
        crate::RunConfig {
            env_vars: Some(self.env_vars.clone()),
            ..Default::default()
        }
        .validate()?;
        Ok(())
    }
}

impl Default for AgentConfig {
    /// The same values a `PUT` with an empty JSON object gives.
    fn default() -> Self {
        AgentConfig {
            run_config: RunConfig::default(),
            output_buffer_bytes: default_output_cap(),
            upload_max_bytes: None,
            max_commands: default_max_commands(),
            egress: None,
        }
    }
}

/// Upload size cap when the host sets none.
pub const DEFAULT_UPLOAD_MAX_BYTES: u64 = 8 << 30;

pub fn default_output_cap() -> u64 {
    16 * 1024 * 1024
}

pub fn default_max_commands() -> u64 {
    1024
}

/// `GET /_cordon/health` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHealth {
    pub version: String,
    pub commands_running: u64,
}

/// Host-only routes of a microVM guest's filesystem and power (all `POST`, answered 204):
/// `sync` flushes the writable disk; `freeze` stops writes to it (FIFREEZE) until `thaw` or
/// [`FreezeRequest::timeout_secs`]; `poweroff` answers, then stops every process, leaves the
/// writable disk clean and powers the VM off. A namespace sandbox answers `sync` only.
pub const SYNC_PATH: &str = "/_cordon/sync";
pub const FREEZE_PATH: &str = "/_cordon/freeze";
pub const THAW_PATH: &str = "/_cordon/thaw";
pub const POWEROFF_PATH: &str = "/_cordon/poweroff";

/// `POST /_cordon/freeze` body (optional; an empty body means the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeRequest {
    /// Thaw automatically after this long, whatever happens to the host (1 ..= [`FREEZE_MAX_SECS`]).
    #[serde(default = "default_freeze_secs")]
    pub timeout_secs: u64,
}

impl Default for FreezeRequest {
    fn default() -> Self {
        FreezeRequest {
            timeout_secs: default_freeze_secs(),
        }
    }
}

pub const FREEZE_MAX_SECS: u64 = 300;

pub fn default_freeze_secs() -> u64 {
    30
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matches_an_empty_put() {
        let from_json: AgentConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(AgentConfig::default(), from_json);
        assert!(AgentConfig::default().output_buffer_bytes > 0);
        assert!(AgentConfig::default().max_commands > 0);
    }

    #[test]
    fn egress_config_is_checked() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let good = EgressConfig {
            ca_pem: pem.into(),
            env_vars: [("AWS_ACCESS_KEY_ID".to_string(), "dummy".to_string())].into(),
        };
        assert_eq!(good.validate(), Ok(()));
        let not_pem = EgressConfig {
            ca_pem: "hello".into(),
            ..good.clone()
        };
        assert_eq!(not_pem.validate(), Err(EgressConfigError::NotPem));
        let bad_env = EgressConfig {
            env_vars: [("A=B".to_string(), "x".to_string())].into(),
            ..good.clone()
        };
        assert!(matches!(bad_env.validate(), Err(EgressConfigError::Env(_))));
        let huge = EgressConfig {
            ca_pem: pem.repeat(MAX_EGRESS_CA_PEM_BYTES / pem.len() + 1),
            ..good
        };
        assert_eq!(huge.validate(), Err(EgressConfigError::CaTooLarge));
    }
}
