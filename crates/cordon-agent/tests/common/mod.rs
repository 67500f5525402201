//! Shared test harness: a connected agent, and small protocol helpers.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use cordon_channel::{AgentClient, WebSocket};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Longest any single wait in a test may take before it counts as a hang.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running agent and a client connected to it. Dropping it kills the agent.
pub struct Agent {
    pub client: AgentClient,
    /// The agent's pid, for checking its children.
    pub pid: u32,
    _process: tokio::process::Child,
    _dir: tempfile::TempDir,
}

/// Starts an agent and connects to it.
pub async fn connect_agent() -> Agent {
    connect_agent_with(&[]).await
}

/// Starts an agent with extra command-line arguments and connects to it. The one place that
/// decides where the agent runs: today a plain process listening on a unix socket in a
/// temporary directory.
pub async fn connect_agent_with(extra_args: &[&str]) -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_cordon-agent"))
        .arg("--listen-unix")
        .arg(&socket)
        .args(extra_args)
        .env(
            "CORDON_AGENT_LOG",
            std::env::var("CORDON_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true)
        .spawn()
        .expect("spawning cordon-agent");
    let pid = process.id().expect("agent pid");
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let stream = loop {
        match UnixStream::connect(&socket).await {
            Ok(stream) => break stream,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(error) => panic!("agent never listened: {error}"),
        }
    };
    Agent {
        client: AgentClient::connect(stream),
        pid,
        _process: process,
        _dir: dir,
    }
}

impl Agent {
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

/// Whether `pid` still exists (a zombie counts as existing).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Zombie children of `parent`.
pub fn zombie_children(parent: u32) -> Vec<u32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let Some(after_name) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str()) {
            zombies.push(pid);
        }
    }
    zombies
}
