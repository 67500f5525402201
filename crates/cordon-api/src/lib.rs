//! Wire types of the LangSmith Sandbox API (see `shared/spec/langsmith-sandbox-api.md`),
//! shared by the server, the in-sandbox agent and the tests.
//!
//! Only types live here: no I/O, no policy. Every type mirrors a table of the spec, and the
//! doc comment on each names its section.

pub mod agent;
pub mod error;
pub mod exec;
pub mod files;
pub mod proxy_config;
pub mod run_config;
pub mod tunnel;

pub use error::{ErrorBody, ErrorDetail};
pub use run_config::{RunConfig, RunConfigError};
