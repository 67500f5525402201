//! The in-sandbox agent. See ARCHITECTURE.md, "The agent".

pub mod config;
pub mod connect;
pub mod exec;
pub mod files;
pub mod identity;
pub mod reaper;
mod router;

pub use router::{router, AppState};
