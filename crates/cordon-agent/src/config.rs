//! The sandbox-level settings the host pushes with `PUT /_cordon/config`.

use std::sync::{Arc, RwLock};

use cordon_api::agent::AgentConfig;

use crate::egress_relay::EgressSession;

/// Shared, swappable [`AgentConfig`]. Readers take a snapshot; a `PUT` replaces it whole and
/// affects only later commands and file operations.
#[derive(Clone, Default)]
pub struct ConfigStore {
    current: Arc<RwLock<AgentConfig>>,
    /// The host session the egress relay opens its streams on (also pushed by the host).
    pub egress_session: EgressSession,
}

impl ConfigStore {
    pub fn get(&self) -> AgentConfig {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set(&self, config: AgentConfig) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
    }
}
