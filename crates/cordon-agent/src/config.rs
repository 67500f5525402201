//! The sandbox-level settings the host pushes with `PUT /_cordon/config`.

use std::sync::{Arc, RwLock};

use cordon_api::agent::AgentConfig;

/// Shared, swappable [`AgentConfig`]. Readers take a snapshot; a `PUT` replaces it whole and
/// affects only later commands and file operations.
#[derive(Clone, Default)]
pub struct ConfigStore {
    current: Arc<RwLock<AgentConfig>>,
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
