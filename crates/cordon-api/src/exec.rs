//! Command execution messages: WebSocket (spec §3.3), HTTP (§3.2) and SSE (§3.4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::RunConfig;

/// Largest raw output chunk put in one message (spec §3.3.2 recommends ≤ 64 KiB).
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

fn default_shell() -> String {
    "/bin/bash".to_string()
}
fn default_timeout() -> i64 {
    60
}
fn default_idle_timeout() -> i64 {
    300
}
fn default_ttl() -> i64 {
    600
}

/// The `execute` message (§3.3.3), also the body of SSE start (§3.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecuteRequest {
    pub command: String,
    /// Wall-clock limit in seconds; 0 = no limit.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: i64,
    #[serde(default = "default_shell")]
    pub shell: String,
    /// Kill after this long with no client attached; -1 = never.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: i64,
    #[serde(default)]
    pub kill_on_disconnect: bool,
    /// Keep a finished session this long; -1 = forever.
    #[serde(default = "default_ttl")]
    pub ttl_seconds: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_config: Option<RunConfig>,
    #[serde(default)]
    pub close_stdin: bool,
    #[serde(default)]
    pub pty: bool,
}

impl ExecuteRequest {
    /// A request with the clients' defaults for everything but the command.
    pub fn new(command: impl Into<String>) -> Self {
        ExecuteRequest {
            command: command.into(),
            timeout_seconds: default_timeout(),
            shell: default_shell(),
            idle_timeout_seconds: default_idle_timeout(),
            kill_on_disconnect: false,
            ttl_seconds: default_ttl(),
            command_id: None,
            env: None,
            cwd: None,
            run_config: None,
            close_stdin: false,
            pty: false,
        }
    }

    /// The per-command run_config layer: `run_config`, or the deprecated `env`/`cwd` pair.
    /// Giving both forms is an error (§3.3.3).
    pub fn command_layer(&self) -> Result<RunConfig, &'static str> {
        match (&self.run_config, self.env.is_some() || self.cwd.is_some()) {
            (Some(_), true) => Err("run_config cannot be combined with env or cwd"),
            (Some(rc), false) => Ok(rc.clone()),
            (None, _) => Ok(RunConfig {
                user: None,
                work_dir: self.cwd.clone(),
                env_vars: self.env.clone(),
            }),
        }
    }
}

/// First and later messages a client sends on `/execute/ws` (§3.3.3, §3.3.4, §3.3.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Execute(ExecuteRequest),
    Reconnect(ReconnectRequest),
    Input { data: String },
    CloseStdin,
    Kill,
}

/// `reconnect` (§3.3.4), also the body of SSE resume (§3.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectRequest {
    pub command_id: String,
    #[serde(default)]
    pub stdout_offset: u64,
    #[serde(default)]
    pub stderr_offset: u64,
}

/// Messages the server sends on `/execute/ws` (§3.3.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Started { command_id: String, pid: i64 },
    Stdout { data: String, offset: u64 },
    Stderr { data: String, offset: u64 },
    Exit { exit_code: i64 },
    Error { error_type: String, error: String },
}

/// Which output stream of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// `POST /execute` body (§3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpExecuteRequest {
    pub command: String,
    #[serde(default = "default_timeout")]
    pub timeout: i64,
    #[serde(default = "default_shell")]
    pub shell: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_config: Option<RunConfig>,
}

/// `POST /execute` response (§3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpExecuteResponse {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_with_client_defaults() {
        let msg: ClientMessage =
            serde_json::from_str(r#"{"type":"execute","command":"echo hi"}"#).unwrap();
        let ClientMessage::Execute(req) = msg else {
            panic!("not execute")
        };
        assert_eq!(req, ExecuteRequest::new("echo hi"));
        let kill: ClientMessage = serde_json::from_str(r#"{"type":"kill"}"#).unwrap();
        assert_eq!(kill, ClientMessage::Kill);
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"resize"}"#).is_err());
    }

    #[test]
    fn server_messages_carry_the_type_tag() {
        let started = ServerMessage::Started {
            command_id: "c1".into(),
            pid: 7,
        };
        assert_eq!(
            serde_json::to_string(&started).unwrap(),
            r#"{"type":"started","command_id":"c1","pid":7}"#
        );
    }

    #[test]
    fn run_config_and_env_are_exclusive() {
        let mut req = ExecuteRequest::new("true");
        req.cwd = Some("/tmp".into());
        assert_eq!(
            req.command_layer().unwrap().work_dir.as_deref(),
            Some("/tmp")
        );
        req.run_config = Some(RunConfig::default());
        assert!(req.command_layer().is_err());
    }
}
