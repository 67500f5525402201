//! Command session lifecycle (spec §3.3.8) and PID 1 duties, against the agent as PID 1 of a
//! real sandbox.

mod common;

use std::time::{Duration, Instant};

use common::*;
use cordon_api::agent::AgentConfig;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_and_reports_command_timeout() {
    let agent = connect_agent().await;
    let mut first = execute("echo before; sleep 300");
    first["timeout_seconds"] = json!(1);
    let began = Instant::now();
    let transcript = run(&agent, first).await;
    assert!(began.elapsed() < Duration::from_secs(10));
    assert_eq!(
        transcript.stdout_text(),
        "before\n",
        "output before the timeout is delivered"
    );
    assert_eq!(transcript.error.as_ref().unwrap().0, "CommandTimeout");
    assert_eq!(transcript.exit_code, None);
    assert_eq!(transcript.close, Some(CloseCode::Normal));
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_counts_only_while_nobody_is_attached() {
    let agent = connect_agent().await;
    let mut first = execute("sleep 300");
    first["command_id"] = json!("idle");
    first["idle_timeout_seconds"] = json!(1);
    let mut socket = agent.ws(first).await;
    let mut attached = expect_started(&mut socket).await;
    // Attached for twice the idle timeout: nothing may happen.
    let quiet = tokio::time::timeout(Duration::from_millis(2000), recv(&mut socket)).await;
    assert!(quiet.is_err(), "idle timer ran while attached: {quiet:?}");
    drop(socket);
    attached.other.clear();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = run(&agent, reconnect("idle", 0, 0)).await;
    assert_eq!(after.exit_code, Some(137), "killed by the idle timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_on_disconnect_kills_when_the_last_client_leaves() {
    let agent = connect_agent().await;
    let mut first = execute("sleep 300");
    first["command_id"] = json!("kod");
    first["kill_on_disconnect"] = json!(true);
    let mut socket = agent.ws(first).await;
    expect_started(&mut socket).await;
    drop(socket);
    agent.wait_idle().await;
    let after = run(&agent, reconnect("kod", 0, 0)).await;
    assert_eq!(after.exit_code, Some(137));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_kill_on_disconnect_the_command_outlives_its_client() {
    let agent = connect_agent().await;
    let mut first = execute("sleep 1; echo still-here");
    first["command_id"] = json!("outlives");
    let mut socket = agent.ws(first).await;
    expect_started(&mut socket).await;
    drop(socket);
    agent.wait_idle().await;
    let after = run(&agent, reconnect("outlives", 0, 0)).await;
    assert_eq!(after.stdout_text(), "still-here\n");
    assert_eq!(after.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_sessions_expire_after_their_ttl() {
    let agent = connect_agent().await;
    let mut first = execute("echo kept");
    first["command_id"] = json!("short-lived");
    first["ttl_seconds"] = json!(1);
    assert_eq!(run(&agent, first).await.exit_code, Some(0));
    let replay = run(&agent, reconnect("short-lived", 0, 0)).await;
    assert_eq!(
        replay.stdout_text(),
        "kept\n",
        "reattach replays the buffer and exit"
    );
    assert_eq!(replay.exit_code, Some(0));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = run(&agent, reconnect("short-lived", 0, 0)).await;
    assert!(expired.started.is_none());
    assert_eq!(expired.error.as_ref().unwrap().0, "SessionExpired");
    assert_eq!(expired.close, Some(CloseCode::Normal));
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_reaped() {
    let agent = connect_agent().await;
    // Positive control: the in-sandbox zombie check sees a zombie under a parent that never
    // reaps (the shell, exec'd into `sleep`, leaves its background child unreaped).
    let mut first = execute("sleep 0 & exec sleep 300");
    first["command_id"] = json!("zombie-maker");
    let mut socket = agent.ws(first).await;
    let maker = expect_started(&mut socket).await;
    let parent = maker.started.as_ref().unwrap()["pid"].as_u64().unwrap() as u32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.zombie_children(parent).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the zombie under {parent} was never seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Killed, its zombie passes to the agent, which must reap it too (checked below).
    send(&mut socket, json!({"type": "kill"})).await;
    drop(socket);
    agent.wait_idle().await;

    let transcript = run(&agent, execute("sleep 0.1 & echo $!; exit 0")).await;
    assert_eq!(transcript.exit_code, Some(0));
    let orphan: u32 = transcript.stdout_text().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.process_exists(orphan).await {
        assert!(Instant::now() < deadline, "orphan {orphan} never reaped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(agent.zombie_children(agent.pid).await, Vec::<u32>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn background_children_holding_the_pipes_do_not_delay_exit_long() {
    let agent = connect_agent().await;
    let began = Instant::now();
    let transcript = run(&agent, execute("sleep 30 & echo main-done")).await;
    assert_eq!(transcript.stdout_text(), "main-done\n");
    assert_eq!(transcript.exit_code, Some(0));
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?}",
        began.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_counts_running_commands() {
    let agent = connect_agent().await;
    assert_eq!(agent.commands_running().await, 0);
    let mut socket = agent.ws(execute("sleep 300")).await;
    expect_started(&mut socket).await;
    assert_eq!(agent.commands_running().await, 1);
    send(&mut socket, json!({"type": "kill"})).await;
    drop(socket);
    agent.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_fd_serves_the_inherited_socket() {
    let mut agent = connect_agent().await;
    // The launcher starts the agent on the listening socket it inherits as fd 3.
    let cmdline = agent.sh("tr '\\0' ' ' < /proc/1/cmdline").await;
    assert_eq!(cmdline, "cordon-agent --listen-fd 3 ");
    // The agent is not dumpable, so processes in the sandbox cannot look into its fds.
    let peek = agent.exec("readlink /proc/1/fd/3").await;
    assert_ne!(
        peek.exit_code, 0,
        "sandbox root read the agent's fds: {peek:?}"
    );
    // A fresh host connection is accepted on it and serves commands.
    agent.sandbox.reconnect().await;
    agent.client = agent.sandbox.client.clone();
    let mut ws = agent.client.websocket("/execute/ws").await.unwrap();
    send(&mut ws, execute("echo via-fd")).await;
    let transcript = run_to_end(&mut ws).await;
    assert_eq!(transcript.stdout_text(), "via-fd\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_bounded_and_finished_ones_make_room() {
    let agent = connect_agent_with(AgentConfig {
        max_commands: 2,
        ..AgentConfig::default()
    })
    .await;
    let mut first = execute("sleep 300");
    first["command_id"] = json!("one");
    let mut one = agent.ws(first).await;
    expect_started(&mut one).await;
    let mut second = execute("sleep 300");
    second["command_id"] = json!("two");
    let mut two = agent.ws(second).await;
    expect_started(&mut two).await;

    let refused = run(&agent, execute("echo three")).await;
    assert!(refused.started.is_none());
    let (kind, message) = refused.error.expect("refused");
    assert_eq!(kind, "CommandError");
    assert!(message.contains("too many commands"), "{message}");

    // A finished session gives way to a new command (and counts as expired from then on).
    send(&mut one, json!({"type": "kill"})).await;
    assert_eq!(continue_to_end_of(&mut one).await.exit_code, Some(137));
    let third = run(&agent, execute("echo three")).await;
    assert_eq!(third.stdout_text(), "three\n");
    let gone = run(&agent, reconnect("one", 0, 0)).await;
    assert_eq!(gone.error.unwrap().0, "SessionExpired");
    send(&mut two, json!({"type": "kill"})).await;
}

/// Reads to the end of a socket whose `started` was already consumed.
async fn continue_to_end_of(socket: &mut cordon_channel::WebSocket) -> Transcript {
    let mut transcript = Transcript {
        started: Some(json!({"type": "started"})),
        ..Default::default()
    };
    continue_to_end(socket, &mut transcript).await;
    transcript
}
