//! `/execute/ws` against the agent as PID 1 of a real sandbox, with real processes: the message
//! contract of spec §3.3.

mod common;

use std::time::Duration;

use common::*;
use futures::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread")]
async fn started_comes_first_then_output_then_exit_and_close_1000() {
    let agent = connect_agent().await;
    let mut first = execute("printf abc; printf de >&2; printf fgh; exit 3");
    first["command_id"] = json!("cmd-basic");
    let transcript = run(&agent, first).await;
    let started = transcript.started.as_ref().expect("started");
    assert_eq!(started["command_id"], "cmd-basic");
    assert!(started["pid"].as_i64().unwrap() > 1);
    assert_eq!(transcript.stdout_text(), "abcfgh");
    assert_eq!(transcript.stderr_text(), "de");
    assert_eq!(transcript.exit_code, Some(3));
    assert_eq!(transcript.close, Some(CloseCode::Normal));
    assert!(transcript.other.is_empty(), "{:?}", transcript.other);
}

#[tokio::test(flavor = "multi_thread")]
async fn offsets_are_contiguous_raw_byte_positions() {
    let agent = connect_agent().await;
    let command = "for i in 1 2 3 4 5; do printf 'é%s' $i; printf 'x' >&2; sleep 0.02; done";
    let transcript = run(&agent, execute(command)).await;
    for stream in ["stdout", "stderr"] {
        let mut expected = 0;
        for (_, offset, len) in transcript.chunks.iter().filter(|(s, _, _)| s == stream) {
            assert_eq!(*offset, expected, "{stream} offsets must be contiguous");
            expected += *len as u64;
        }
    }
    assert_eq!(transcript.stdout_text(), "é1é2é3é4é5");
    assert_eq!(transcript.cursor("stdout", 0), 15);
    assert_eq!(transcript.cursor("stderr", 0), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_output_is_chunked_at_most_64k_on_character_boundaries() {
    let agent = connect_agent().await;
    // 1 + 300000 bytes of three-byte characters: every 64 KiB cut lands inside one.
    let command = "printf x; yes '€' | head -n 100000 | tr -d '\\n'";
    let transcript = run(&agent, execute(command)).await;
    assert_eq!(transcript.exit_code, Some(0));
    let expected = format!("x{}", "€".repeat(100_000));
    assert_eq!(transcript.stdout_text(), expected);
    assert!(transcript.chunks.len() >= 5, "expected several chunks");
    let mut next = 0;
    for (_, offset, len) in &transcript.chunks {
        assert!(*len <= 64 * 1024, "chunk of {len} bytes");
        assert_eq!(*offset, next);
        next += *len as u64;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn same_command_id_attaches_instead_of_spawning_again() {
    let agent = connect_agent().await;
    let mut first = execute("echo pid=$$; sleep 0.5; echo done");
    first["command_id"] = json!("shared-id");
    let mut one = agent.ws(first.clone()).await;
    let started_one = recv_json(&mut one).await;
    let mut two = agent.ws(first).await;
    let second = run_to_end(&mut two).await;
    let mut first_transcript = Transcript::default();
    record(&mut first_transcript, started_one.clone());
    continue_to_end(&mut one, &mut first_transcript).await;
    let started_two = second.started.as_ref().expect("second client gets started");
    assert_eq!(
        started_two["pid"], started_one["pid"],
        "one process, not two"
    );
    let pid = started_one["pid"].as_i64().unwrap();
    let expected = format!("pid={pid}\ndone\n");
    assert_eq!(first_transcript.stdout_text(), expected);
    assert_eq!(
        second.stdout_text(),
        expected,
        "the second client replays from offset 0"
    );
    assert_eq!(second.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_after_abrupt_drop_loses_and_repeats_nothing() {
    let agent = connect_agent().await;
    let command = "i=0; while [ $i -lt 400 ]; do echo line-$i; echo err-$i >&2; i=$((i+1)); sleep 0.003; done";
    let mut first = execute(command);
    first["command_id"] = json!("resume-me");
    let mut socket = agent.ws(first).await;
    let mut before = Transcript::default();
    while before.stdout.len() < 500 || before.stderr.is_empty() {
        let message = recv_json(&mut socket).await;
        assert!(!record(&mut before, message), "finished before the drop");
    }
    drop(socket); // no close frame: the client just vanishes
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (stdout_at, stderr_at) = (before.cursor("stdout", 0), before.cursor("stderr", 0));
    let mut socket = agent.ws(reconnect("resume-me", stdout_at, stderr_at)).await;
    let after = run_to_end(&mut socket).await;
    assert_eq!(after.started.as_ref().unwrap()["command_id"], "resume-me");
    assert_eq!(after.exit_code, Some(0));
    let expected = |prefix: &str| {
        (0..400)
            .map(|i| format!("{prefix}-{i}\n"))
            .collect::<String>()
    };
    let stdout = [before.stdout.clone(), after.stdout.clone()].concat();
    let stderr = [before.stderr.clone(), after.stderr.clone()].concat();
    assert_eq!(String::from_utf8(stdout).unwrap(), expected("line"));
    assert_eq!(String::from_utf8(stderr).unwrap(), expected("err"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_inside_a_character_resumes_at_the_next_one() {
    let agent = connect_agent().await;
    let mut first = execute("printf '€abc'");
    first["command_id"] = json!("mid-char");
    assert_eq!(run(&agent, first).await.stdout_text(), "€abc");
    let transcript = run(&agent, reconnect("mid-char", 1, 0)).await;
    assert_eq!(transcript.chunks, vec![("stdout".to_string(), 3, 3)]);
    assert_eq!(transcript.stdout_text(), "abc");
    assert_eq!(transcript.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn input_reaches_stdin_and_close_stdin_ends_it() {
    let agent = connect_agent().await;
    let mut first = execute("cat; echo end");
    first["close_stdin"] = json!(false);
    let mut socket = agent.ws(first).await;
    let mut transcript = expect_started(&mut socket).await;
    send(&mut socket, json!({"type": "input", "data": "hello\n"})).await;
    send(&mut socket, json!({"type": "input", "data": "wörld"})).await;
    send(&mut socket, json!({"type": "close_stdin"})).await;
    continue_to_end(&mut socket, &mut transcript).await;
    assert_eq!(transcript.stdout_text(), "hello\nwörldend\n");
    assert_eq!(transcript.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn close_stdin_at_spawn_gives_eof() {
    let agent = connect_agent().await;
    let transcript = run(&agent, execute("cat; echo eof-seen")).await;
    assert_eq!(transcript.stdout_text(), "eof-seen\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_then_immediate_close_kills_the_whole_process_group() {
    let agent = connect_agent().await;
    let mut first = execute("sleep 300 & echo $!; wait");
    first["command_id"] = json!("to-kill");
    let mut socket = agent.ws(first).await;
    let mut transcript = Transcript::default();
    while !transcript.stdout.ends_with(b"\n") {
        record(&mut transcript, recv_json(&mut socket).await);
    }
    let grandchild: u32 = transcript.stdout_text().trim().parse().unwrap();
    assert!(agent.process_exists(grandchild).await);
    // What the Python client does: kill, then close at once.
    socket
        .send(Message::text(json!({"type": "kill"}).to_string()))
        .await
        .unwrap();
    socket.close(None).await.unwrap();
    drop(socket);
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while agent.process_exists(grandchild).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "grandchild {grandchild} survived the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = run(&agent, reconnect("to-kill", 0, 0)).await;
    assert_eq!(after.exit_code, Some(137));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_with_socket_kept_open_reports_exit() {
    let agent = connect_agent().await;
    let mut socket = agent.ws(execute("sleep 300")).await;
    let mut transcript = expect_started(&mut socket).await;
    send(&mut socket, json!({"type": "kill"})).await;
    continue_to_end(&mut socket, &mut transcript).await;
    assert_eq!(transcript.exit_code, Some(137));
    assert_eq!(transcript.close, Some(CloseCode::Normal));
}

#[tokio::test(flavor = "multi_thread")]
async fn pty_gives_a_terminal_and_merges_stderr() {
    let agent = connect_agent().await;
    let mut first = execute("tty; echo to-stderr >&2");
    first["pty"] = json!(true);
    let transcript = run(&agent, first).await;
    let stdout = transcript.stdout_text();
    assert!(stdout.starts_with("/dev/pts/"), "{stdout:?}");
    assert!(stdout.contains("to-stderr"), "{stdout:?}");
    assert!(transcript.stderr.is_empty());
    assert_eq!(transcript.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn pty_input_is_echoed_and_read() {
    let agent = connect_agent().await;
    let mut first = execute("read line; echo got:$line");
    first["pty"] = json!(true);
    first["close_stdin"] = json!(false);
    let mut socket = agent.ws(first).await;
    let mut transcript = expect_started(&mut socket).await;
    send(&mut socket, json!({"type": "input", "data": "typed\n"})).await;
    continue_to_end(&mut socket, &mut transcript).await;
    assert!(
        transcript.stdout_text().contains("got:typed"),
        "{:?}",
        transcript.stdout_text()
    );
    assert_eq!(transcript.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_concurrent_commands_each_get_their_own_output() {
    let agent = std::sync::Arc::new(connect_agent().await);
    let runs = (0..20).map(|n| {
        let agent = agent.clone();
        tokio::spawn(async move {
            let transcript = run(
                &agent,
                execute(&format!("sleep 0.2; echo out-{n}; echo err-{n} >&2")),
            )
            .await;
            (n, transcript)
        })
    });
    for handle in runs {
        let (n, transcript) = handle.await.unwrap();
        assert_eq!(transcript.stdout_text(), format!("out-{n}\n"));
        assert_eq!(transcript.stderr_text(), format!("err-{n}\n"));
        assert_eq!(transcript.exit_code, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_70_kb_command_is_accepted() {
    let agent = connect_agent().await;
    let payload = "a".repeat(70_000);
    let transcript = run(&agent, execute(&format!("printf '%s' '{payload}' | wc -c"))).await;
    assert_eq!(transcript.stdout_text().trim(), "70000");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_config_sets_env_and_work_dir_over_a_clean_environment() {
    let agent = connect_agent().await;
    let dir = agent.sh("mktemp -d").await.trim().to_string();
    let canonical = agent.sh(&format!("cd '{dir}' && pwd -P")).await;
    let mut first = execute("echo $GREETING; pwd; env | cut -d= -f1 | sort | tr '\\n' ' '");
    first["run_config"] = json!({"work_dir": dir, "env_vars": {"GREETING": "hi"}});
    let transcript = run(&agent, first).await;
    let stdout = transcript.stdout_text();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hi");
    assert_eq!(lines[1], canonical.trim());
    // Nothing of the agent's own environment is inherited: only the clean defaults, the
    // run_config variable and what the shell itself exports.
    let clean = [
        "GREETING", "HOME", "HOSTNAME", "LOGNAME", "PATH", "PWD", "SHLVL", "USER",
    ];
    for name in lines[2].split_whitespace() {
        assert!(
            clean.contains(&name),
            "agent env leaked: {name} in {stdout}"
        );
    }
    assert!(
        lines[2].contains("PATH") && lines[2].contains("HOME"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_work_dir_is_a_command_error() {
    let agent = connect_agent().await;
    let mut first = execute("true");
    first["cwd"] = json!("/definitely/not/here");
    let transcript = run(&agent, first).await;
    assert!(transcript.started.is_none());
    assert_eq!(transcript.error.as_ref().unwrap().0, "CommandError");
    assert_eq!(transcript.close, Some(CloseCode::Normal));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_first_messages_get_invalid_request_and_close_1000() {
    let agent = connect_agent().await;
    for bad in [
        "not json",
        r#"{"type":"resize"}"#,
        r#"{"type":"input","data":"x"}"#,
        r#"{"type":"execute"}"#,
    ] {
        let mut socket = agent.client.websocket("/execute/ws").await.unwrap();
        socket.send(Message::text(bad)).await.unwrap();
        let transcript = run_to_end(&mut socket).await;
        assert!(transcript.started.is_none(), "{bad}");
        assert_eq!(
            transcript.error.as_ref().map(|e| e.0.as_str()),
            Some("InvalidRequest"),
            "{bad}"
        );
        assert_eq!(transcript.close, Some(CloseCode::Normal), "{bad}");
    }
    assert_eq!(agent.commands_running().await, 0, "nothing was started");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_control_message_detaches_but_the_command_keeps_running() {
    let agent = connect_agent().await;
    let mut first = execute("sleep 0.5; echo survived");
    first["command_id"] = json!("keeps-running");
    let mut socket = agent.ws(first).await;
    let mut rejected = expect_started(&mut socket).await;
    socket.send(Message::text("{not json")).await.unwrap();
    continue_to_end(&mut socket, &mut rejected).await;
    assert_eq!(rejected.error.as_ref().unwrap().0, "InvalidRequest");
    assert_eq!(rejected.close, Some(CloseCode::Normal));
    let transcript = run(&agent, reconnect("keeps-running", 0, 0)).await;
    assert_eq!(transcript.stdout_text(), "survived\n");
    assert_eq!(transcript.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_command_id_is_command_not_found() {
    let agent = connect_agent().await;
    let transcript = run(&agent, reconnect("never-existed", 0, 0)).await;
    assert_eq!(transcript.error.as_ref().unwrap().0, "CommandNotFound");
    assert_eq!(transcript.close, Some(CloseCode::Normal));
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_offsets_past_the_end_replay_nothing_and_change_nothing() {
    let agent = connect_agent().await;
    let mut first = execute("printf abc; printf de >&2");
    first["command_id"] = json!("short");
    // The clients' default shell is /bin/bash.
    first["shell"] = json!("/bin/bash");
    assert_eq!(run(&agent, first).await.stdout_text(), "abc");

    let beyond = run(&agent, reconnect("short", 1 << 40, u64::MAX)).await;
    assert_eq!(beyond.started.as_ref().unwrap()["command_id"], "short");
    assert!(beyond.chunks.is_empty(), "replayed {:?}", beyond.chunks);
    assert_eq!(beyond.exit_code, Some(0));
    assert!(beyond.error.is_none() && beyond.other.is_empty());

    // Offsets that are not byte counts are refused, and the session is still whole.
    let negative = json!({"type": "reconnect", "command_id": "short", "stdout_offset": -1, "stderr_offset": 0});
    let refused = run(&agent, negative).await;
    assert_eq!(refused.error.as_ref().unwrap().0, "InvalidRequest");
    let again = run(&agent, reconnect("short", 0, 0)).await;
    assert_eq!(again.stdout_text(), "abc");
    assert_eq!(again.stderr_text(), "de");
}

#[tokio::test(flavor = "multi_thread")]
async fn output_beyond_the_buffer_with_nobody_attached_evicts_the_oldest() {
    let agent = connect_agent().await;
    agent.set_output_buffer(64 * 1024).await;
    let mut first = execute("sleep 0.3; yes '€' | head -n 100000 | tr -d '\\n'");
    first["command_id"] = json!("evicting");
    let mut socket = agent.ws(first).await;
    assert_eq!(recv_json(&mut socket).await["type"], "started");
    drop(socket);
    agent.wait_idle().await;
    let transcript = run(&agent, reconnect("evicting", 0, 0)).await;
    let (_, first_offset, _) = transcript.chunks[0].clone();
    // The earliest byte kept is 300000 - 65536, moved on to the next character start.
    assert_eq!(first_offset, 234_465);
    assert_eq!(transcript.cursor("stdout", 0), 300_000);
    assert_eq!(
        transcript.stdout_text(),
        "€".repeat((300_000 - 234_465) / 3)
    );
    assert_eq!(transcript.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attached_client_loses_nothing_when_output_exceeds_the_buffer() {
    let agent = connect_agent().await;
    agent.set_output_buffer(64 * 1024).await;
    let transcript = run(&agent, execute("yes 0123456789 | head -n 100000")).await;
    assert_eq!(transcript.stdout.len(), 1_100_000);
    assert_eq!(transcript.exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn run_config_user_switches_uid_gid_and_home() {
    // The agent is root in the sandbox's user namespace, so it can always switch users.
    let agent = connect_agent().await;
    let mut first = execute("id -u; id -g; id -G; echo $HOME; echo $USER");
    first["run_config"] = json!({"user": "nobody"});
    let transcript = run(&agent, first).await;
    assert_eq!(transcript.exit_code, Some(0), "{:?}", transcript.error);
    let stdout = transcript.stdout_text();
    let lines: Vec<&str> = stdout.lines().collect();
    let nobody = agent
        .sh("cat /etc/passwd")
        .await
        .lines()
        .find(|line| line.starts_with("nobody:"))
        .map(|line| line.split(':').map(str::to_string).collect::<Vec<_>>())
        .expect("nobody in /etc/passwd");
    assert_eq!(lines[0], nobody[2], "uid");
    assert_eq!(lines[1], nobody[3], "gid");
    assert!(
        !lines[2].split(' ').any(|gid| gid == "0"),
        "root group kept: {}",
        lines[2]
    );
    assert_eq!(lines[3], nobody[5], "HOME");
    assert_eq!(lines[4], "nobody");

    let mut unknown = execute("true");
    unknown["run_config"] = json!({"user": "no-such-user-here"});
    let transcript = run(&agent, unknown).await;
    assert_eq!(transcript.error.as_ref().unwrap().0, "CommandError");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_becomes_replacement_characters_and_offsets_stay_raw() {
    let agent = connect_agent().await;
    let mut socket = agent
        .ws(execute("printf 'a\\377\\376'; sleep 0.2; printf 'b'"))
        .await;
    let mut transcript = expect_started(&mut socket).await;
    let mut output = Vec::new();
    loop {
        let message = recv_json(&mut socket).await;
        if message["type"] == "stdout" {
            output.push((message["offset"].as_u64().unwrap(), message["data"].clone()));
        }
        if record(&mut transcript, message) {
            break;
        }
    }
    assert_eq!(
        output,
        vec![(0, json!("a\u{FFFD}\u{FFFD}")), (3, json!("b"))]
    );
}
