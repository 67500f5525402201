//! `cordon serve` against real sandboxes over real HTTP: auth, the control plane, workspaces,
//! validation, the data plane (WebSocket exec, files) and re-adoption after a crash.
//!
//! Needs root, the static agent (`make agent`) and the default snapshot (`cordon prepare`).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{raw, Server, KEY, OTHER_KEY};
use cordon_testkit::TestStateDir;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Not a test: the server process of [`Server::start`] (does nothing when run directly).
#[test]
#[ignore]
fn serve_child() {
    common::serve_child_main();
}

fn path_of(url: &str) -> String {
    url.split_once("//")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, path)| format!("/{path}"))
        .expect("url with a path")
}

#[tokio::test]
async fn auth_routing_and_snapshots() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;

    for path in [
        "/api/v2/sandboxes/boxes",
        "/v2/sandboxes/boxes",
        "/dp/x/execute",
        "/nope",
    ] {
        for key in [None, Some("wrong")] {
            let (status, body) = server.call("GET", path, key, None).await.unwrap();
            assert_eq!(status, 401, "{path}");
            assert_eq!(body["detail"]["error"], "Unauthorized", "{body}");
            assert!(body["detail"]["message"].is_string(), "{body}");
        }
    }
    // Header names are case-insensitive; all three prefixes serve the same router.
    let headers = [("X-API-KEY", KEY.to_string())];
    for prefix in ["/api/v2/sandboxes", "/v2/sandboxes", "/api/v1/v2/sandboxes"] {
        let url = server.url(&format!("{prefix}/boxes"));
        let (status, _, body) = raw("GET", &url, &headers, Bytes::new()).await.unwrap();
        assert_eq!(status, 200, "{prefix}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["sandboxes"], json!([]));
        assert_eq!(body["items"], json!([]));
        assert_eq!(body["next_cursor"], Value::Null);
        assert_eq!(body["offset"], 0);
    }
    // No redirects: a trailing slash is just another (unknown) path.
    let (status, body) = server.api("GET", "/boxes/", None).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = server.call("GET", "/healthz", None, None).await.unwrap();
    assert_eq!(status, 200);

    let (status, list) = server.api("GET", "/snapshots", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["snapshots"], list["items"]);
    let snapshot = &list["snapshots"][0];
    assert_eq!(snapshot["name"], "system/default");
    assert_eq!(snapshot["status"], "ready");
    assert_eq!(snapshot["tags"], json!(["latest"]));
    let id = snapshot["id"].as_str().unwrap();
    for reference in [
        "system%2Fdefault",
        "system%2Fdefault:latest",
        "system%2Fdefault%3Alatest",
        id,
    ] {
        let (status, got) = server
            .api("GET", &format!("/snapshots/{reference}"), None)
            .await;
        assert_eq!(status, 200, "{reference}");
        assert_eq!(got["id"], id);
    }
    for reference in ["system/default", "system%2Fdefault:v2", "nope"] {
        let (status, body) = server
            .api("GET", &format!("/snapshots/{reference}"), None)
            .await;
        assert_eq!(status, 404, "{reference}: {body}");
    }
    let (status, _) = server
        .api("GET", "/snapshots?name_contains=nothing-like-it", None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn sandbox_lifecycle() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;

    let generated = server.create(json!({"wait_for_ready": true})).await;
    let name = generated["name"].as_str().unwrap();
    assert!(name.starts_with("sandbox-") && name.len() == 16, "{name}");
    assert_eq!(generated["idle_ttl_seconds"], 600);
    assert_eq!(generated["delete_after_stop_seconds"], 14 * 86_400);

    let sandbox = server
        .create(json!({
            "name": "life", "idle_ttl_seconds": 0, "delete_after_stop_seconds": 120,
            "vcpus": 1, "mem_bytes": 256 << 20,
            "run_config": {"env_vars": {"GREETING": "hi"}},
            "snapshot": "system/default:latest",
        }))
        .await;
    let id = sandbox["id"].as_str().unwrap();
    let dp = sandbox["dataplane_url"].as_str().unwrap();
    assert_eq!(dp, server.url(&format!("/dp/{id}")));
    assert_eq!(sandbox["idle_ttl_seconds"], 0);
    assert_eq!(sandbox["mem_bytes"], 256 << 20);
    assert_eq!(sandbox["run_config"]["env_vars"]["GREETING"], "hi");

    // Get by name or id; names are unique per workspace.
    for key in ["life", id] {
        let (status, got) = server.api("GET", &format!("/boxes/{key}"), None).await;
        assert_eq!(status, 200);
        assert_eq!(got["id"], id);
    }
    let (status, _) = server
        .api("POST", "/boxes", Some(json!({"name": "life"})))
        .await;
    assert_eq!(status, 409);
    let (_, list) = server.api("GET", "/boxes", None).await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 2);

    // Rename (409 on conflict) and merge the run_config; later commands see it.
    let (status, _) = server
        .api("PATCH", "/boxes/life", Some(json!({"name": name})))
        .await;
    assert_eq!(status, 409);
    let (status, updated) = server
        .api(
            "PATCH",
            "/boxes/life",
            Some(json!({"name": "life2", "idle_ttl_seconds": 1200,
                        "run_config": {"env_vars": {"OTHER": "there"}}})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["name"], "life2");
    assert_eq!(updated["id"], id);
    assert_eq!(updated["dataplane_url"], dp);
    assert_eq!(updated["idle_ttl_seconds"], 1200);
    assert_eq!(updated["run_config"]["env_vars"]["GREETING"], "hi");
    assert_eq!(updated["run_config"]["env_vars"]["OTHER"], "there");
    let (status, _) = server.api("GET", "/boxes/life", None).await;
    assert_eq!(status, 404);
    assert_eq!(
        http_exec(dp, "echo $GREETING $OTHER; id -un").await,
        "hi there\nuser\n"
    );

    // Stop answers promptly; the data plane resumes a stopped sandbox.
    let (status, _) = server
        .api("POST", "/boxes/life2/stop", Some(json!({})))
        .await;
    assert_eq!(status, 204);
    let (_, got) = server.api("GET", "/boxes/life2/status", None).await;
    assert_eq!(got, json!({"status": "stopped", "status_message": null}));
    let (_, got) = server.api("GET", "/boxes/life2", None).await;
    assert!(got["stopped_at"].is_string(), "{got}");
    assert_eq!(http_exec(dp, "echo $OTHER").await, "there\n");
    server.wait_status("life2", "ready").await;

    // Stop, then start and poll as the clients do.
    server
        .api("POST", "/boxes/life2/stop", Some(json!({})))
        .await;
    let (status, started) = server
        .api("POST", "/boxes/life2/start", Some(json!({})))
        .await;
    assert_eq!(status, 200, "{started}");
    server.wait_status("life2", "ready").await;
    assert_eq!(http_exec(dp, "echo $GREETING").await, "hi\n");

    // wait_for_ready=false answers at once; timeout 0 expires at once (408, last status).
    let (status, quick) = server
        .api(
            "POST",
            "/boxes",
            Some(json!({"name": "quick", "wait_for_ready": false})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(quick["status"], "provisioning");
    server.wait_status("quick", "ready").await;
    let (status, body) = server
        .api(
            "POST",
            "/boxes",
            Some(json!({"name": "slow", "timeout": 0})),
        )
        .await;
    assert_eq!(status, 408, "{body}");
    assert!(
        body["detail"]["message"]
            .as_str()
            .unwrap()
            .contains("provisioning"),
        "{body}"
    );

    for sandbox in ["life2", id, "quick", "slow"] {
        let (status, _) = server
            .api("DELETE", &format!("/boxes/{sandbox}"), None)
            .await;
        assert!(
            status == 204 || (sandbox == id && status == 404),
            "{sandbox}"
        );
    }
    let (status, _) = server.api("GET", "/boxes/life2", None).await;
    assert_eq!(status, 404);
    let (status, _) = server.api("DELETE", "/boxes/life2", None).await;
    assert_eq!(status, 404);
    let (_, list) = server.api("GET", "/boxes", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn workspaces_are_isolated() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "mine"})).await;
    let id = sandbox["id"].as_str().unwrap();
    let dp_path = path_of(sandbox["dataplane_url"].as_str().unwrap());

    for (method, path) in [
        ("GET", "/boxes/mine".to_string()),
        ("GET", format!("/boxes/{id}")),
        ("GET", "/boxes/mine/status".to_string()),
        ("POST", "/boxes/mine/stop".to_string()),
        ("POST", "/boxes/mine/start".to_string()),
        ("PATCH", "/boxes/mine".to_string()),
        ("DELETE", "/boxes/mine".to_string()),
    ] {
        let (status, body) = server
            .api_as(OTHER_KEY, method, &path, Some(json!({})))
            .await;
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    let (_, list) = server.api_as(OTHER_KEY, "GET", "/boxes", None).await;
    assert_eq!(list["sandboxes"], json!([]));
    let (status, _) = server
        .call(
            "GET",
            &format!("{dp_path}/download?path=/etc/hostname"),
            Some(OTHER_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
    // The same name is free in the other workspace.
    let (status, _) = server
        .api_as(OTHER_KEY, "POST", "/boxes", Some(json!({"name": "mine"})))
        .await;
    assert_eq!(status, 200);
    let (_, got) = server.api("GET", "/boxes/mine", None).await;
    assert_eq!(got["id"], id);

    // Each workspace has its own sandbox count limit (4 in these tests).
    for name in ["two", "three", "four"] {
        server.create(json!({"name": name})).await;
    }
    let (status, body) = server
        .api("POST", "/boxes", Some(json!({"name": "five"})))
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(body["detail"]["message"]
        .as_str()
        .unwrap()
        .contains("sandbox count limit"));
    let (status, _) = server
        .api_as(OTHER_KEY, "POST", "/boxes", Some(json!({"name": "five"})))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn invalid_creates_are_422_without_side_effects() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let bad_bodies = [
        (json!({"name": "Bad_Name"}), "name"),
        (json!({"idle_ttl_seconds": 61}), "idle_ttl_seconds"),
        (
            json!({"delete_after_stop_seconds": -60}),
            "delete_after_stop_seconds",
        ),
        (json!({"vcpus": "two"}), "vcpus"),
        (json!({"mem_bytes": 1}), "mem_bytes"),
        (
            json!({"run_config": {"work_dir": "relative"}}),
            "run_config",
        ),
        (json!({"run_config": {"user": "a b"}}), "run_config"),
        (json!({"wait_for_ready": "yes"}), "wait_for_ready"),
    ];
    for (body, field) in bad_bodies {
        let (status, answer) = server.api("POST", "/boxes", Some(body.clone())).await;
        assert_eq!(status, 422, "{body}: {answer}");
        let first = &answer["detail"][0];
        assert_eq!(first["type"], "value_error", "{answer}");
        assert_eq!(first["loc"], json!(["body", field]), "{answer}");
        assert!(first["msg"].is_string());
    }
    let (status, answer) = server
        .call(
            "POST",
            "/api/v2/sandboxes/boxes",
            Some(KEY),
            Some(json!([1])),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = server
        .api("POST", "/boxes", Some(json!({"snapshot": "no/such:thing"})))
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = server
        .api(
            "PATCH",
            "/boxes/nothing",
            Some(json!({"idle_ttl_seconds": 30})),
        )
        .await;
    assert_eq!(status, 404, "{answer}");

    let (_, list) = server.api("GET", "/boxes", None).await;
    assert_eq!(list["sandboxes"], json!([]));
    assert!(
        !dir.path().join("sandboxes").exists()
            || std::fs::read_dir(dir.path().join("sandboxes"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[tokio::test]
async fn data_plane_websocket_and_files() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "files"})).await;
    let dp = sandbox["dataplane_url"].as_str().unwrap();

    let mut socket = websocket(dp, KEY).await;
    send_execute(
        &mut socket,
        json!({"command": "echo out; echo err >&2; pwd; exit 3"}),
    )
    .await;
    let run = read_until_exit(&mut socket).await;
    assert_eq!(run.stdout, "out\n/home/user\n");
    assert_eq!(run.stderr, "err\n");
    assert_eq!(run.exit_code, 3);

    // Upload (parents created), download, and HEAD through the data plane.
    let contents = b"binary \x00\xff contents\n".repeat(1000);
    let (content_type, body) = common::multipart_file(&contents);
    let headers = [
        ("x-api-key", KEY.to_string()),
        ("content-type", content_type),
    ];
    let upload = format!("{dp}/upload?path=%2Fhome%2Fuser%2Fdeep%2Fer%2Ff.bin");
    let (status, _, answer) = raw("POST", &upload, &headers, body).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let key = [("x-api-key", KEY.to_string())];
    let download = format!("{dp}/download?path=/home/user/deep/er/f.bin");
    let (status, _, got) = raw("GET", &download, &key, Bytes::new()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&got[..], &contents[..]);
    let (status, headers, _) = raw("HEAD", &download, &key, Bytes::new()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-length"],
        contents.len().to_string().as_str()
    );
    let missing = format!("{dp}/download?path=/home/user/missing");
    let (status, _, _) = raw("GET", &missing, &key, Bytes::new()).await.unwrap();
    assert_eq!(status, 404);

    // The agent's host-only routes are never reachable, however spelled.
    for path in ["/_cordon/health", "/%5Fcordon/health", "/_cordon/config"] {
        for method in ["GET", "PUT"] {
            let (status, _, _) = raw(method, &format!("{dp}{path}"), &key, Bytes::from("{}"))
                .await
                .unwrap();
            assert_eq!(status, 404, "{method} {path}");
        }
    }
    // No key, no data plane.
    let (status, _, _) = raw("GET", &download, &[], Bytes::new()).await.unwrap();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn commands_survive_a_server_crash() {
    let dir = TestStateDir::new();
    let mut server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "crash"})).await;
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();

    let mut socket = websocket(&dp, KEY).await;
    send_execute(
        &mut socket,
        json!({"command": "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.3; done",
               "timeout": 0}),
    )
    .await;
    let mut command_id = String::new();
    let mut seen = String::new();
    while !seen.contains("line1\n") {
        let message = next_json(&mut socket)
            .await
            .expect("message before the crash");
        match message["type"].as_str() {
            Some("started") => command_id = message["command_id"].as_str().unwrap().into(),
            Some("stdout") => seen.push_str(message["data"].as_str().unwrap()),
            _ => {}
        }
    }
    assert!(!command_id.is_empty());

    server.kill();
    drop(socket);
    let port = server.port;
    drop(server);
    let server = Server::start_on(dir.path(), port).await;
    let (_, status) = server.api("GET", "/boxes/crash/status", None).await;
    assert_eq!(status["status"], "ready");

    let mut socket = websocket(&dp, KEY).await;
    let reconnect = json!({"type": "reconnect", "command_id": command_id,
                           "stdout_offset": seen.len(), "stderr_offset": 0});
    socket
        .send(Message::text(reconnect.to_string()))
        .await
        .unwrap();
    let rest = read_until_exit(&mut socket).await;
    assert_eq!(rest.exit_code, 0);
    assert_eq!(
        format!("{seen}{}", rest.stdout),
        "line1\nline2\nline3\nline4\nline5\nline6\n"
    );
}

/// The sandbox object's `run_config` is what commands get (spec §2.1.2): the snapshot's
/// run_config with the sandbox's own layered over it, on create, get, list and update.
#[tokio::test]
async fn run_config_is_the_effective_one() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let plain = server.create(json!({"name": "plain"})).await;
    let config = &plain["run_config"];
    assert_eq!(config["user"], "user", "{plain}");
    assert_eq!(config["work_dir"], "/home/user", "{plain}");
    assert!(config["env_vars"]["PATH"].is_string(), "{plain}");

    let sandbox = server
        .create(json!({"name": "own", "run_config": {"work_dir": "/tmp",
                                                   "env_vars": {"MINE": "1"}}}))
        .await;
    let expected = |own: &Value| {
        assert_eq!(own["user"], "user", "{own}");
        assert_eq!(own["work_dir"], "/tmp", "{own}");
        assert_eq!(own["env_vars"]["MINE"], "1", "{own}");
        assert_eq!(own["env_vars"]["PATH"], config["env_vars"]["PATH"], "{own}");
    };
    expected(&sandbox["run_config"]);
    let (_, got) = server.api("GET", "/boxes/own", None).await;
    expected(&got["run_config"]);
    let (_, list) = server.api("GET", "/boxes", None).await;
    let listed = list["items"].as_array().unwrap();
    expected(&listed.iter().find(|s| s["name"] == "own").unwrap()["run_config"]);
    let (_, updated) = server
        .api(
            "PATCH",
            "/boxes/own",
            Some(json!({"run_config": {"user": "root"}})),
        )
        .await;
    assert_eq!(updated["run_config"]["user"], "root", "{updated}");
    assert_eq!(updated["run_config"]["work_dir"], "/tmp", "{updated}");
    let dp = sandbox["dataplane_url"].as_str().unwrap();
    let effective = &updated["run_config"];
    let seen = http_exec(dp, "id -un; pwd; echo $MINE; echo $PATH").await;
    let want = format!(
        "{}\n{}\n1\n{}\n",
        effective["user"].as_str().unwrap(),
        effective["work_dir"].as_str().unwrap(),
        effective["env_vars"]["PATH"].as_str().unwrap()
    );
    assert_eq!(seen, want);
}

/// `persistent: false` (spec §2.2.1, §2.2.8): writes are gone after a stop and start, while
/// a persistent sandbox keeps them; id, name and `dataplane_url` stay the same.
#[tokio::test]
async fn a_non_persistent_sandbox_discards_writes_on_stop() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let ephemeral = server
        .create(json!({"name": "ephemeral", "persistent": false}))
        .await;
    assert_eq!(ephemeral["persistent"], false);
    let kept = server.create(json!({"name": "kept"})).await;
    assert_eq!(kept["persistent"], true);
    let check = "cat /home/user/mark /home/user/deep/mark 2>/dev/null; true";
    for sandbox in [&ephemeral, &kept] {
        let dp = sandbox["dataplane_url"].as_str().unwrap();
        let write =
            "echo one > /home/user/mark; mkdir -p /home/user/deep; echo two > /home/user/deep/mark";
        http_exec(dp, write).await;
        assert_eq!(http_exec(dp, check).await, "one\ntwo\n");
    }

    for name in ["ephemeral", "kept"] {
        let (status, _) = server
            .api("POST", &format!("/boxes/{name}/stop"), Some(json!({})))
            .await;
        assert_eq!(status, 204);
        server.wait_status(name, "stopped").await;
        server
            .api("POST", &format!("/boxes/{name}/start"), Some(json!({})))
            .await;
        server.wait_status(name, "ready").await;
    }
    let (_, after) = server.api("GET", "/boxes/ephemeral", None).await;
    for field in ["id", "name", "dataplane_url", "persistent"] {
        assert_eq!(after[field], ephemeral[field], "{field}");
    }
    let dp = ephemeral["dataplane_url"].as_str().unwrap();
    assert_eq!(http_exec(dp, check).await, "");
    let dp = kept["dataplane_url"].as_str().unwrap();
    assert_eq!(http_exec(dp, check).await, "one\ntwo\n");

    // A data-plane request that resumes a stopped sandbox boots it clean as well.
    let dp = ephemeral["dataplane_url"].as_str().unwrap();
    http_exec(dp, "echo three > /home/user/mark").await;
    server
        .api("POST", "/boxes/ephemeral/stop", Some(json!({})))
        .await;
    server.wait_status("ephemeral", "stopped").await;
    assert_eq!(http_exec(dp, check).await, "");
}

/// SIGTERM: the server stops promptly, attached WebSockets get close 1001 (spec §3.3.7), the
/// command keeps running, and after a restart the client reattaches with its offsets.
#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_commands_survive() {
    let dir = TestStateDir::new();
    let mut server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "term"})).await;
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();

    let mut socket = websocket(&dp, KEY).await;
    send_execute(
        &mut socket,
        json!({"command": "for i in 1 2 3 4 5 6 7 8; do echo line$i; sleep 0.4; done",
               "timeout_seconds": 0}),
    )
    .await;
    let mut command_id = String::new();
    let mut seen = String::new();
    while !seen.contains("line1\n") {
        let message = next_json(&mut socket)
            .await
            .expect("message before SIGTERM");
        match message["type"].as_str() {
            Some("started") => command_id = message["command_id"].as_str().unwrap().into(),
            Some("stdout") => seen.push_str(message["data"].as_str().unwrap()),
            _ => {}
        }
    }
    assert!(!command_id.is_empty());

    let (took, success) = server.terminate();
    assert!(success, "server exited with an error after SIGTERM");
    assert!(took < Duration::from_secs(10), "took {took:?} to exit");
    let close = read_until_close(&mut socket, &mut seen).await;
    assert_eq!(close, Some(1001), "close code");
    assert!(
        !seen.contains("line8"),
        "the command ended before the test could check"
    );

    let port = server.port;
    drop(server);
    let server = Server::start_on(dir.path(), port).await;
    let (_, status) = server.api("GET", "/boxes/term/status", None).await;
    assert_eq!(status["status"], "ready");
    let mut socket = websocket(&dp, KEY).await;
    let reconnect = json!({"type": "reconnect", "command_id": command_id,
                           "stdout_offset": seen.len(), "stderr_offset": 0});
    socket
        .send(Message::text(reconnect.to_string()))
        .await
        .unwrap();
    let rest = read_until_exit(&mut socket).await;
    assert_eq!(rest.exit_code, 0);
    let all: String = (1..=8).map(|i| format!("line{i}\n")).collect();
    assert_eq!(format!("{seen}{}", rest.stdout), all);
}

/// Reads output into `seen` until the server closes; the close code, if a close frame came.
async fn read_until_close(socket: &mut Socket, seen: &mut String) -> Option<u16> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("close within 30 s");
        match frame {
            Some(Ok(Message::Text(text))) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                assert_ne!(message["type"], "exit", "the command ended: {message}");
                if message["type"] == "stdout" {
                    seen.push_str(message["data"].as_str().unwrap());
                }
            }
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn websocket(dataplane_url: &str, key: &str) -> Socket {
    let url = format!(
        "{}/execute/ws",
        dataplane_url.replacen("http://", "ws://", 1)
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("X-Api-Key", key.parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket through the data plane")
        .0
}

async fn send_execute(socket: &mut Socket, mut request: Value) {
    request["type"] = json!("execute");
    socket
        .send(Message::text(request.to_string()))
        .await
        .unwrap();
}

async fn next_json(socket: &mut Socket) -> Option<Value> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("websocket message within 30 s")?
            .ok()?;
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).ok();
        }
    }
}

#[derive(Default)]
struct Run {
    stdout: String,
    stderr: String,
    exit_code: i64,
}

async fn read_until_exit(socket: &mut Socket) -> Run {
    let mut run = Run::default();
    while let Some(message) = next_json(socket).await {
        match message["type"].as_str() {
            Some("stdout") => run.stdout.push_str(message["data"].as_str().unwrap()),
            Some("stderr") => run.stderr.push_str(message["data"].as_str().unwrap()),
            Some("exit") => {
                run.exit_code = message["exit_code"].as_i64().unwrap();
                return run;
            }
            Some("error") => panic!("command error: {message}"),
            _ => {}
        }
    }
    panic!("socket closed before exit");
}

/// `POST {dp}/execute`: the command's stdout.
async fn http_exec(dataplane_url: &str, command: &str) -> String {
    let (status, body) = common::call(
        "POST",
        &format!("{dataplane_url}/execute"),
        Some(KEY),
        Some(json!({"command": command})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    body["stdout"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_sandbox_that_died_is_booted_again_by_the_data_plane() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "dies"})).await;
    let id = sandbox["id"].as_str().unwrap();
    let dp = sandbox["dataplane_url"].as_str().unwrap();
    assert_eq!(http_exec(dp, "echo before").await, "before\n");

    let state_file = dir.path().join("sandboxes").join(id).join("state.json");
    let state: Value = serde_json::from_slice(&std::fs::read(state_file).unwrap()).unwrap();
    let pid = state["running"]["pid"].as_i64().expect("init pid") as i32;
    // SAFETY: kill(2) has no memory effects; the pid is the init of the sandbox made above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_until_dead(pid).await;

    assert_eq!(http_exec(dp, "echo after").await, "after\n");
    let (_, status) = server.api("GET", "/boxes/dies/status", None).await;
    assert_eq!(status["status"], "ready");
}

/// Waits until `pid` is gone or a zombie.
async fn wait_until_dead(pid: i32) {
    for _ in 0..100 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if matches!(state, None | Some('Z') | Some('X')) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sandbox init {pid} did not die");
}

/// The lifecycle task: idle sandboxes stop after `idle_ttl_seconds`, stopped ones are deleted
/// after `delete_after_stop_seconds` (both at their 60 s minimum, so this takes two minutes).
#[tokio::test]
async fn ttls_stop_idle_and_delete_stopped_sandboxes() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    server
        .create(json!({"name": "ttl", "idle_ttl_seconds": 60, "delete_after_stop_seconds": 60}))
        .await;
    server
        .create(json!({"name": "keep", "idle_ttl_seconds": 0, "delete_after_stop_seconds": 0}))
        .await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    let (_, status) = server.api("GET", "/boxes/ttl/status", None).await;
    assert_eq!(status["status"], "ready", "stopped before its idle TTL");
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (_, status) = server.api("GET", "/boxes/ttl/status", None).await;
    assert_eq!(status["status"], "stopped");
    tokio::time::sleep(Duration::from_secs(65)).await;
    let (status, _) = server.api("GET", "/boxes/ttl", None).await;
    assert_eq!(status, 404, "not deleted after delete_after_stop_seconds");
    let (_, status) = server.api("GET", "/boxes/keep/status", None).await;
    assert_eq!(status["status"], "ready");
}
