//! Shared test harness: the real static `cordon-agent` running as PID 1 of a real namespace
//! sandbox (booted by `cordon_testkit`), reached over the real channel; and small protocol
//! helpers.
//!
//! Everything a test checks about processes (their existence, zombies under the agent) is
//! checked inside the sandbox, through the agent's `POST /execute` run as the sandbox's root.
//!
//! Needs what `cordon_testkit` needs: root, `/bin/busybox`, the static agent (`make agent`) and
//! `target/debug/cordon-nsinit` (`cargo build -p cordon-runtime`).
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use cordon_api::agent::AgentConfig;
use cordon_api::exec::HttpExecuteResponse;
use cordon_channel::{AgentClient, WebSocket};
use cordon_testkit::{TestOptions, TestSandbox};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Longest any single wait in a test may take before it counts as a hang.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// The agent's pid inside its sandbox: it is the sandbox's init.
pub const AGENT_PID: u32 = 1;

/// Longest an inspection command may run inside the sandbox.
const SH_TIMEOUT_SECONDS: i64 = 60;

/// A sandbox running the agent, and a client connected to it. Dropping it destroys the sandbox
/// (and with it every process the agent started).
pub struct Agent {
    pub sandbox: TestSandbox,
    pub client: AgentClient,
    /// The agent's pid as seen inside the sandbox (always [`AGENT_PID`]), for checking its
    /// children there.
    pub pid: u32,
}

/// Boots a sandbox with the default agent config and connects to its agent.
pub async fn connect_agent() -> Agent {
    connect_agent_with(AgentConfig::default()).await
}

/// Boots a sandbox and sets `config` with `PUT /_cordon/config` (as the server does), the one
/// way to configure the agent. The one place that decides where the agent runs: as PID 1 of a
/// real namespace sandbox.
pub async fn connect_agent_with(config: AgentConfig) -> Agent {
    let sandbox = TestSandbox::start(TestOptions::default()).await;
    let client = sandbox.client.clone();
    let agent = Agent {
        sandbox,
        client,
        pid: AGENT_PID,
    };
    // The agent really is PID 1 of a sandbox: a command's parent is pid 1, and root is some
    // unprivileged host uid.
    let probe = agent.sh("echo $PPID; cat /proc/self/uid_map").await;
    let mut lines = probe.lines();
    assert_eq!(
        lines.next(),
        Some(AGENT_PID.to_string().as_str()),
        "the agent is not PID 1: {probe:?}"
    );
    let map: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(
        map.len() == 3 && map[0] == "0" && map[1] != "0",
        "not in a sandbox user namespace: {probe:?}"
    );
    agent.put_config(&config).await;
    agent
}

impl Agent {
    /// `PUT /_cordon/config` with `config`; it replaces the whole sandbox-level config.
    pub async fn put_config(&self, config: &AgentConfig) {
        let body = serde_json::to_value(config).expect("config as JSON");
        let (status, reply) = self.request_json("PUT", "/_cordon/config", body).await;
        assert_eq!(status, 204, "PUT /_cordon/config: {reply}");
    }

    /// Runs `command` with `/bin/sh -c` inside the sandbox as root (whatever run user the
    /// sandbox config names), through the agent's `POST /execute`.
    pub async fn exec(&self, command: &str) -> HttpExecuteResponse {
        cordon_testkit::try_exec_as(&self.client, command, Some("root"), SH_TIMEOUT_SECONDS)
            .await
            .unwrap_or_else(|error| panic!("`{command}`: {error}"))
    }

    /// Runs `command` inside the sandbox as root, asserts it exited 0 and returns its stdout.
    pub async fn sh(&self, command: &str) -> String {
        let output = self.exec(command).await;
        assert_eq!(output.exit_code, 0, "`{command}` failed: {output:?}");
        output.stdout
    }

    /// Whether `pid` (a pid inside the sandbox) still exists there; a zombie counts as
    /// existing.
    pub async fn process_exists(&self, pid: u32) -> bool {
        let output = self.exec(&format!("test -e /proc/{pid}")).await;
        match output.exit_code {
            0 => true,
            1 => false,
            _ => panic!("test -e /proc/{pid}: {output:?}"),
        }
    }

    /// Zombie children of `parent` inside the sandbox (pids as seen there), from every
    /// `/proc/<pid>/stat` of the sandbox.
    pub async fn zombie_children(&self, parent: u32) -> Vec<u32> {
        // Processes may vanish between the glob and the read: cat then fails for that one.
        let stats = self.sh("cat /proc/[0-9]*/stat 2>/dev/null; true").await;
        let mut zombies = Vec::new();
        let mut saw_init = false;
        for stat in stats.lines() {
            let Some((pid, rest)) = stat.split_once(' ') else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            saw_init |= pid == AGENT_PID;
            // Fields after the parenthesised command name: state, ppid, ...
            let Some(after_name) = rest.rsplit_once(')').map(|(_, rest)| rest) else {
                continue;
            };
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            if fields.first() == Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str()) {
                zombies.push(pid);
            }
        }
        assert!(
            saw_init,
            "no /proc/1/stat in the sandbox's /proc: {stats:?}"
        );
        zombies
    }

    /// Sends one JSON request; returns the status and the JSON body (`Null` when empty).
    pub async fn request_json(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let (status, bytes) = self
            .request_raw(method, path, Bytes::from(body.to_string()))
            .await;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (status, value)
    }

    pub async fn request_raw(&self, method: &str, path: &str, body: Bytes) -> (u16, Bytes) {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "agent")
            .header("content-type", "application/json")
            .body(body)
            .expect("request");
        let response = tokio::time::timeout(STEP_TIMEOUT, self.client.request_bytes(request))
            .await
            .expect("response in time")
            .expect("request sent");
        let status = response.status().as_u16();
        let bytes = tokio::time::timeout(STEP_TIMEOUT, response.into_body().collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
        (status, bytes)
    }

    /// Sets the sandbox-level config, e.g. a small output buffer.
    pub async fn set_output_buffer(&self, bytes: u64) {
        let (status, _) = self
            .request_json(
                "PUT",
                "/_cordon/config",
                json!({"output_buffer_bytes": bytes}),
            )
            .await;
        assert_eq!(status, 204);
    }

    pub async fn commands_running(&self) -> u64 {
        let (status, health) = self
            .request_json("GET", "/_cordon/health", Value::Null)
            .await;
        assert_eq!(status, 200);
        health["commands_running"]
            .as_u64()
            .expect("commands_running")
    }

    /// Waits until no command is running.
    pub async fn wait_idle(&self) {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        while self.commands_running().await != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "commands still running"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens `/execute/ws` and sends `first` as the first message.
    pub async fn ws(&self, first: Value) -> WebSocket {
        let mut socket = self
            .client
            .websocket("/execute/ws")
            .await
            .expect("websocket");
        send(&mut socket, first).await;
        socket
    }
}

/// An `execute` message with the clients' usual fields.
pub fn execute(command: &str) -> Value {
    json!({
        "type": "execute",
        "command": command,
        "timeout_seconds": 60,
        "shell": "/bin/sh",
        "idle_timeout_seconds": 300,
        "kill_on_disconnect": false,
        "ttl_seconds": 600,
        "close_stdin": true,
    })
}

pub fn reconnect(command_id: &str, stdout_offset: u64, stderr_offset: u64) -> Value {
    json!({"type": "reconnect", "command_id": command_id, "stdout_offset": stdout_offset, "stderr_offset": stderr_offset})
}

pub async fn send(socket: &mut WebSocket, message: Value) {
    socket
        .send(Message::text(message.to_string()))
        .await
        .expect("send");
}

/// What arrived on the socket: a JSON message, or the close (with its code).
#[derive(Debug)]
pub enum Received {
    Json(Value),
    Closed(Option<CloseCode>),
}

pub async fn recv(socket: &mut WebSocket) -> Received {
    loop {
        let message = tokio::time::timeout(STEP_TIMEOUT, socket.next())
            .await
            .expect("message in time");
        match message {
            Some(Ok(Message::Text(text))) => {
                return Received::Json(serde_json::from_str(&text).expect("server sends JSON"))
            }
            Some(Ok(Message::Close(frame))) => return Received::Closed(frame.map(|f| f.code)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            None | Some(Err(_)) => return Received::Closed(None),
        }
    }
}

pub async fn recv_json(socket: &mut WebSocket) -> Value {
    match recv(socket).await {
        Received::Json(value) => value,
        Received::Closed(code) => panic!("closed ({code:?}) while waiting for a message"),
    }
}

/// Everything one attachment saw.
#[derive(Debug, Default)]
pub struct Transcript {
    pub started: Option<Value>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `(stream, offset, raw length)` of every output message, in order.
    pub chunks: Vec<(String, u64, usize)>,
    pub exit_code: Option<i64>,
    pub error: Option<(String, String)>,
    pub close: Option<CloseCode>,
    /// Messages that were none of the above (should stay empty).
    pub other: Vec<Value>,
}

impl Transcript {
    pub fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("utf-8 stdout")
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8(self.stderr.clone()).expect("utf-8 stderr")
    }
    /// Where this client would resume each stream.
    pub fn cursor(&self, stream: &str, start: u64) -> u64 {
        self.chunks
            .iter()
            .filter(|(s, _, _)| s == stream)
            .map(|(_, offset, len)| offset + *len as u64)
            .next_back()
            .unwrap_or(start)
    }
}

/// Applies one message to the transcript; true once it was terminal.
pub fn record(transcript: &mut Transcript, message: Value) -> bool {
    let kind = message["type"].as_str().unwrap_or_default().to_string();
    match kind.as_str() {
        "started" => {
            assert!(transcript.started.is_none(), "second started: {message}");
            assert!(transcript.chunks.is_empty(), "started after output");
            transcript.started = Some(message);
        }
        "stdout" | "stderr" => {
            assert!(transcript.started.is_some(), "output before started");
            let data = message["data"].as_str().expect("data").as_bytes().to_vec();
            let offset = message["offset"].as_u64().expect("offset");
            transcript.chunks.push((kind.clone(), offset, data.len()));
            if kind == "stdout" {
                transcript.stdout.extend(data)
            } else {
                transcript.stderr.extend(data)
            }
        }
        "exit" => {
            transcript.exit_code = Some(message["exit_code"].as_i64().expect("exit_code"));
            return true;
        }
        "error" => {
            let error_type = message["error_type"]
                .as_str()
                .expect("error_type")
                .to_string();
            let error = message["error"].as_str().expect("error").to_string();
            transcript.error = Some((error_type, error));
            return true;
        }
        _ => transcript.other.push(message),
    }
    false
}

/// Reads the `started` message, which must come first; returns the transcript it began.
pub async fn expect_started(socket: &mut WebSocket) -> Transcript {
    let message = recv_json(socket).await;
    assert_eq!(message["type"], "started", "{message}");
    let mut transcript = Transcript::default();
    record(&mut transcript, message);
    transcript
}

/// Reads until `exit`/`error` and the close after it.
pub async fn run_to_end(socket: &mut WebSocket) -> Transcript {
    let mut transcript = Transcript::default();
    continue_to_end(socket, &mut transcript).await;
    transcript
}

pub async fn continue_to_end(socket: &mut WebSocket, transcript: &mut Transcript) {
    loop {
        match recv(socket).await {
            Received::Json(message) => {
                if record(transcript, message) {
                    transcript.close = match recv(socket).await {
                        Received::Closed(code) => code,
                        Received::Json(extra) => panic!("message after the terminal one: {extra}"),
                    };
                    return;
                }
            }
            Received::Closed(code) => {
                transcript.close = code;
                return;
            }
        }
    }
}

/// Runs `command` to its end on a fresh socket.
pub async fn run(agent: &Agent, first: Value) -> Transcript {
    let mut socket = agent.ws(first).await;
    run_to_end(&mut socket).await
}

/// Server-sent events of one response, parsed: `(event, data)`.
pub fn parse_sse(body: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(body).expect("utf-8 SSE");
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|block| !block.trim().is_empty()) {
        let mut name = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(value) = line.strip_prefix("event: ") {
                name = Some(value.to_string());
            } else if let Some(value) = line.strip_prefix("data: ") {
                data.push_str(value);
            } else {
                assert!(line.starts_with(':'), "unexpected SSE line {line:?}");
            }
        }
        if let Some(name) = name {
            events.push((name, serde_json::from_str(&data).expect("SSE data is JSON")));
        }
    }
    events
}

pub fn base64_decode(data: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(data.as_str().expect("base64 string"))
        .expect("base64")
}
