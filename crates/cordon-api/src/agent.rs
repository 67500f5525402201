//! The host ↔ agent control surface: routes under [`CONTROL_PREFIX`] that only the host may
//! call. The server's data-plane router never forwards a client request under this prefix.

use serde::{Deserialize, Serialize};

use crate::RunConfig;

/// Path prefix of the agent's host-only routes.
pub const CONTROL_PREFIX: &str = "/_cordon/";

/// `PUT /_cordon/config`: the sandbox-level settings commands inherit. The host sends it when
/// the sandbox starts (it doubles as the readiness probe) and again when they change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Snapshot layer merged with the sandbox layer (spec §2.1.2); commands add their own.
    #[serde(default)]
    pub run_config: RunConfig,
    /// Cap on the bytes kept per output stream of one command.
    #[serde(default = "default_output_cap")]
    pub output_buffer_bytes: u64,
}

pub fn default_output_cap() -> u64 {
    16 * 1024 * 1024
}

/// `GET /_cordon/health` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHealth {
    pub version: String,
    pub commands_running: u64,
}
