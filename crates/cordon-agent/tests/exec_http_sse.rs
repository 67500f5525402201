//! `POST /execute` (spec §3.2) and the SSE transport (§3.4), against the agent as PID 1 of a
//! real sandbox.

mod common;

use bytes::Bytes;
use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn http_execute_returns_output_and_exit_code() {
    let agent = connect_agent().await;
    let body = json!({"command": "echo out; echo err >&2; cat; exit 7", "timeout": 30, "shell": "/bin/sh"});
    let (status, response) = agent.request_json("POST", "/execute", body).await;
    assert_eq!(status, 200);
    assert_eq!(
        response,
        json!({"stdout": "out\n", "stderr": "err\n", "exit_code": 7})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_execute_timeout_is_exit_code_124_with_a_note() {
    let agent = connect_agent().await;
    let body = json!({"command": "echo partial; sleep 300", "timeout": 1, "shell": "/bin/sh"});
    let (status, response) = agent.request_json("POST", "/execute", body).await;
    assert_eq!(status, 200);
    assert_eq!(response["exit_code"], 124);
    assert_eq!(response["stdout"], "partial\n");
    assert!(
        response["stderr"].as_str().unwrap().contains("timed out"),
        "{response}"
    );
    agent.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_execute_rejects_run_config_with_env_or_cwd() {
    let agent = connect_agent().await;
    let body = json!({"command": "true", "cwd": "/tmp", "run_config": {"work_dir": "/tmp"}});
    let (status, response) = agent.request_json("POST", "/execute", body).await;
    assert_eq!(status, 400);
    assert_eq!(response["detail"]["error"], "InvalidRequest");
    assert!(response["detail"]["message"]
        .as_str()
        .unwrap()
        .contains("run_config"));
}

#[tokio::test(flavor = "multi_thread")]
async fn http_execute_rejects_malformed_json_with_the_spec_body() {
    let agent = connect_agent().await;
    let (status, body) = agent
        .request_raw("POST", "/execute", Bytes::from_static(b"{nope"))
        .await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["detail"]["error"], "InvalidRequest");
}

fn sse_start(command: &str, command_id: &str) -> Value {
    json!({
        "command": command, "command_id": command_id, "shell": "/bin/sh",
        "timeout_seconds": 60, "idle_timeout_seconds": 300, "ttl_seconds": 600,
    })
}

async fn sse(agent: &Agent, path: &str, body: Value) -> (u16, Vec<(String, Value)>) {
    let (status, bytes) = agent
        .request_raw("POST", path, Bytes::from(body.to_string()))
        .await;
    (
        status,
        if status == 200 {
            parse_sse(&bytes)
        } else {
            Vec::new()
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_start_streams_base64_output_then_stream_ends_then_exit() {
    let agent = connect_agent().await;
    let (status, events) = sse(
        &agent,
        "/execute/stream/start",
        sse_start("printf 'h€llo'; printf e >&2; cat", "sse-1"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(events[0].0, "started");
    assert_eq!(events[0].1["command_id"], "sse-1");
    let stdout: Vec<u8> = events
        .iter()
        .filter(|(name, _)| name == "stdout")
        .flat_map(|(_, d)| base64_decode(&d["data"]))
        .collect();
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        "h€llo",
        "stdin was closed, so cat ended"
    );
    let ends: Vec<&Value> = events
        .iter()
        .filter(|(name, _)| name == "stream_end")
        .map(|(_, d)| d)
        .collect();
    assert!(
        ends.contains(&&json!({"stream": "stdout", "offset": 7})),
        "{ends:?}"
    );
    assert!(
        ends.contains(&&json!({"stream": "stderr", "offset": 1})),
        "{ends:?}"
    );
    assert_eq!(
        events.last().unwrap(),
        &("exit".to_string(), json!({"exit_code": 0}))
    );

    // Resuming at the final offsets repeats started, the stream ends and the exit.
    let resume = json!({"command_id": "sse-1", "stdout_offset": 7, "stderr_offset": 1});
    let (status, events) = sse(&agent, "/execute/stream/resume", resume).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["started", "stream_end", "stream_end", "exit"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_resume_of_an_unknown_command_is_404_command_not_found() {
    let agent = connect_agent().await;
    let resume = json!({"command_id": "nope", "stdout_offset": 0, "stderr_offset": 0});
    let (status, body) = agent
        .request_json("POST", "/execute/stream/resume", resume)
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["detail"]["error"], "CommandNotFound");
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_asks_for_acks_when_the_buffer_is_full_and_loses_nothing() {
    let agent = connect_agent().await;
    agent.set_output_buffer(64 * 1024).await;
    let (status, mut events) = sse(
        &agent,
        "/execute/stream/start",
        sse_start("yes 0123456789 | head -n 30000", "acked"),
    )
    .await;
    assert_eq!(status, 200);
    let mut stdout = Vec::new();
    let mut acks = 0;
    loop {
        assert_eq!(events[0].0, "started");
        let mut cursor = None;
        for (name, data) in &events[1..] {
            match name.as_str() {
                "stdout" => {
                    assert_eq!(
                        data["offset"].as_u64().unwrap(),
                        stdout.len() as u64,
                        "contiguous"
                    );
                    stdout.extend(base64_decode(&data["data"]));
                }
                "ack_required" => {
                    assert_eq!(data["stdout_offset"].as_u64().unwrap(), stdout.len() as u64);
                    cursor = Some((data["stdout_offset"].clone(), data["stderr_offset"].clone()));
                }
                "stream_end" | "stderr" | "exit" => {}
                other => panic!("unexpected event {other}"),
            }
        }
        let Some((stdout_offset, stderr_offset)) = cursor else {
            break;
        };
        acks += 1;
        assert!(acks < 1000);
        let resume = json!({"command_id": "acked", "stdout_offset": stdout_offset, "stderr_offset": stderr_offset});
        let (status, next) = sse(&agent, "/execute/stream/resume", resume).await;
        assert_eq!(status, 200);
        events = next;
    }
    assert!(
        acks >= 2,
        "330 KB through a 64 KiB buffer needs acks, got {acks}"
    );
    assert_eq!(stdout.len(), 330_000);
    assert_eq!(
        events.last().unwrap(),
        &("exit".to_string(), json!({"exit_code": 0}))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_start_with_an_existing_id_attaches() {
    let agent = connect_agent().await;
    let (_, first) = sse(
        &agent,
        "/execute/stream/start",
        sse_start("echo once", "sse-same"),
    )
    .await;
    let (_, second) = sse(
        &agent,
        "/execute/stream/start",
        sse_start("echo twice", "sse-same"),
    )
    .await;
    assert_eq!(first[0].1["pid"], second[0].1["pid"]);
    let stdout: Vec<u8> = second
        .iter()
        .filter(|(name, _)| name == "stdout")
        .flat_map(|(_, d)| base64_decode(&d["data"]))
        .collect();
    assert_eq!(stdout, b"once\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_timeout_is_a_command_timeout_error_event() {
    let agent = connect_agent().await;
    let mut start = sse_start("sleep 300", "sse-timeout");
    start["timeout_seconds"] = json!(1);
    let (_, events) = sse(&agent, "/execute/stream/start", start).await;
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["error_type"], "CommandTimeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn config_and_health_routes() {
    let agent = connect_agent().await;
    let config = json!({"run_config": {"env_vars": {"FROM_SANDBOX": "yes"}, "work_dir": "/tmp"}});
    let (status, _) = agent.request_json("PUT", "/_cordon/config", config).await;
    assert_eq!(status, 204);
    let body = json!({"command": "echo $FROM_SANDBOX; pwd", "timeout": 10, "shell": "/bin/sh"});
    let (_, response) = agent.request_json("POST", "/execute", body).await;
    assert_eq!(response["stdout"], "yes\n/tmp\n");
    let bad = json!({"run_config": {"work_dir": "relative"}});
    let (status, body) = agent.request_json("PUT", "/_cordon/config", bad).await;
    assert_eq!(status, 400);
    assert_eq!(body["detail"]["error"], "InvalidRequest");
    let (status, health) = agent
        .request_json("GET", "/_cordon/health", Value::Null)
        .await;
    assert_eq!(status, 200);
    assert_eq!(health["commands_running"], 0);
    assert!(health["version"].is_string());
}
