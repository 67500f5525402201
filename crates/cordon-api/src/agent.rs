//! The host ↔ agent control surface: routes under [`CONTROL_PREFIX`] that only the host may
//! call. The server's data-plane router never forwards a client request under this prefix.

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
}

impl Default for AgentConfig {
    /// The same values a `PUT` with an empty JSON object gives.
    fn default() -> Self {
        AgentConfig {
            run_config: RunConfig::default(),
            output_buffer_bytes: default_output_cap(),
            upload_max_bytes: None,
            max_commands: default_max_commands(),
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
}
