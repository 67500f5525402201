//! The in-sandbox agent. See ARCHITECTURE.md, "The agent".

pub mod config;
pub mod connect;
pub mod egress_env;
pub mod egress_relay;
pub mod exec;
pub mod files;
pub mod identity;
pub mod reaper;
mod router;
pub mod vm_control;
pub mod vm_init;

pub use router::{router, AppState};
