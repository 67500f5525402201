//! Snapshots through `cordon serve` over real HTTP: validation, names, tags, lookups, paging,
//! builds from real registries (open, and TLS + basic auth through the registries API),
//! capture, import, restarts during builds, deletes while in use, layer reclaiming and the
//! disk quota.
//!
//! Needs root, the static agent (`make agent`), the default snapshot (`cordon prepare`),
//! `docker-registry`, `skopeo` and `htpasswd`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{raw, Server, CA_ENV, INSECURE_ENV, INTERNAL_ENV, KEY, OTHER_KEY};
use cordon_testkit::registry::{busybox_image, TestRegistry};
use cordon_testkit::TestStateDir;
use serde_json::{json, Value};

/// Not a test: the server process of [`Server::start`] (does nothing when run directly).
#[test]
#[ignore]
fn serve_child() {
    common::serve_child_main();
}

const MIB: u64 = 1 << 20;

/// `POST {dp}/execute`: the command's stdout.
async fn http_exec(sandbox: &Value, command: &str) -> String {
    let dataplane_url = sandbox["dataplane_url"].as_str().unwrap();
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

/// Polls `GET /snapshots/{id}` until the snapshot leaves `building`.
async fn wait_built(server: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, snapshot) = server.api("GET", &format!("/snapshots/{id}"), None).await;
        assert_eq!(status, 200, "{snapshot}");
        if snapshot["status"] != "building" {
            return snapshot;
        }
        assert!(Instant::now() < deadline, "still building: {snapshot}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn build(server: &Server, body: Value) -> Value {
    let (status, snapshot) = server.api("POST", "/snapshots", Some(body)).await;
    assert_eq!(status, 200, "{snapshot}");
    assert_eq!(snapshot["status"], "building", "{snapshot}");
    let built = wait_built(server, snapshot["id"].as_str().unwrap()).await;
    assert_eq!(built["status"], "ready", "{built}");
    built
}

fn assert_error(status: u16, body: &Value, want: u16) {
    assert_eq!(status, want, "{body}");
    if want != 422 {
        assert!(body["detail"]["error"].is_string(), "{body}");
        assert!(body["detail"]["message"].is_string(), "{body}");
    } else {
        assert!(body["detail"].is_array(), "{body}");
    }
}

/// Names of the layer directories in the store.
fn stored_layers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("layers"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn invalid_requests_are_refused_and_change_nothing() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let image = "127.0.0.1:1/tools/busybox:1";
    let long = "a".repeat(256);
    for (body, want) in [
        (
            json!({"docker_image": image, "fs_capacity_bytes": 64 * MIB}),
            422,
        ),
        (json!({"name": "a", "fs_capacity_bytes": 64 * MIB}), 422),
        (json!({"name": "a", "docker_image": image}), 422),
        (
            json!({"name": "a", "docker_image": image, "fs_capacity_bytes": null}),
            422,
        ),
        (
            json!({"name": "Upper", "docker_image": image, "fs_capacity_bytes": 64 * MIB}),
            422,
        ),
        (
            json!({"name": "a//b", "docker_image": image, "fs_capacity_bytes": 64 * MIB}),
            422,
        ),
        (
            json!({"name": long, "docker_image": image, "fs_capacity_bytes": 64 * MIB}),
            422,
        ),
        (
            json!({"name": "a", "docker_image": "Not An Image", "fs_capacity_bytes": 64 * MIB}),
            422,
        ),
        (
            json!({"name": "a", "docker_image": image, "fs_capacity_bytes": 0}),
            422,
        ),
        (
            json!({"name": "a", "docker_image": image, "fs_capacity_bytes": 1u64 << 50}),
            422,
        ),
        (
            json!({"name": "a", "docker_image": image, "fs_capacity_bytes": 64 * MIB, "tag": "-x"}),
            422,
        ),
        (
            json!({"name": "a", "docker_image": image, "fs_capacity_bytes": 64 * MIB,
                "run_config": {"work_dir": "relative"}}),
            422,
        ),
        (
            json!({"name": "a", "docker_image": image, "fs_capacity_bytes": 64 * MIB,
                "registry_id": "no-such-registry"}),
            422,
        ),
        (
            json!({"name": "system/mine", "docker_image": image, "fs_capacity_bytes": 64 * MIB}),
            403,
        ),
    ] {
        let (status, answer) = server.api("POST", "/snapshots", Some(body.clone())).await;
        assert_error(status, &answer, want);
        if want == 403 {
            assert!(answer["detail"]["message"]
                .as_str()
                .unwrap()
                .contains("system/"));
        }
    }
    for query in [
        "limit=0",
        "limit=501",
        "limit=x",
        "offset=-1",
        "status=sleeping",
    ] {
        let (status, answer) = server
            .api("GET", &format!("/snapshots?{query}"), None)
            .await;
        assert_error(status, &answer, 400);
    }
    let (_, list) = server.api("GET", "/snapshots?limit=500", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["snapshots"][0]["name"], "system/default");

    for (method, path, want) in [
        ("GET", "/snapshots/nope", 404),
        (
            "GET",
            "/snapshots/00000000-0000-4000-8000-000000000000",
            404,
        ),
        ("DELETE", "/snapshots/nope:v1", 404),
        ("DELETE", "/snapshots/system%2Fdefault", 403),
        ("GET", "/snapshots-by-name/nope", 404),
        ("GET", "/snapshots-by-name/nope%3Alatest", 400),
    ] {
        let (status, answer) = server.api(method, path, None).await;
        assert_error(status, &answer, want);
    }
    let (status, tags) = server
        .api("GET", "/snapshots-by-name/system%2Fdefault", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(tags["tags"][0]["tag"], "latest", "{tags}");

    // Capture: the sandbox must exist and be persistent; Docker exports are not offered.
    server
        .create(json!({"name": "ephemeral", "persistent": false}))
        .await;
    let capture = |name: &str| format!("/boxes/{name}/snapshot");
    let (status, answer) = server
        .api("POST", &capture("nope"), Some(json!({"name": "x"})))
        .await;
    assert_error(status, &answer, 404);
    let (status, answer) = server
        .api("POST", &capture("ephemeral"), Some(json!({"name": "x"})))
        .await;
    assert_error(status, &answer, 400);
    assert!(answer["detail"]["message"]
        .as_str()
        .unwrap()
        .contains("persistent"));
    let (status, answer) = server
        .api(
            "POST",
            &capture("ephemeral"),
            Some(json!({"name": "x", "docker_image": "x:1"})),
        )
        .await;
    assert_error(status, &answer, 501);
    for body in [
        json!({}),
        json!({"name": "Bad"}),
        json!({"name": "x", "fs_capacity_bytes": -1}),
    ] {
        let (status, answer) = server.api("POST", &capture("ephemeral"), Some(body)).await;
        assert_error(status, &answer, 422);
    }
    let (status, answer) = server
        .api(
            "POST",
            &capture("ephemeral"),
            Some(json!({"name": "system/x"})),
        )
        .await;
    assert_error(status, &answer, 403);

    // Import: bad parameters and bodies leave nothing behind.
    let import = |query: &str| server.url(&format!("/api/v2/sandboxes/snapshots/import?{query}"));
    let headers = [("x-api-key", KEY.to_string())];
    for (query, body, want) in [
        ("tag=v1", Bytes::from_static(b"x"), 400),
        ("name=Bad", Bytes::from_static(b"x"), 400),
        ("name=ok&tag=-v", Bytes::from_static(b"x"), 400),
        ("name=ok&fs_capacity_bytes=0", Bytes::from_static(b"x"), 400),
        ("name=system%2Fx", Bytes::from_static(b"x"), 403),
        ("name=ok", Bytes::new(), 400),
    ] {
        let (status, _, answer) = raw("POST", &import(query), &headers, body).await.unwrap();
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_error(status, &answer, want);
    }
    let (_, list) = server.api("GET", "/snapshots", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    let leftovers = std::fs::read_dir(dir.path().join("imports"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "upload debris in the imports dir");
}

#[tokio::test]
async fn registries_api_keeps_credentials_sealed() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let password = "s3cret-Passw0rd-for-the-test";
    let (status, registry) = server
        .api(
            "POST",
            "/registries",
            Some(json!({"name": "private", "url": "https://127.0.0.1:5999",
                        "username": "tester", "password": password})),
        )
        .await;
    assert_eq!(status, 200, "{registry}");
    assert_eq!(registry["name"], "private");
    assert_eq!(registry["auth_type"], "DOCKER_CONFIG");
    let id = registry["id"].as_str().unwrap().to_string();
    for body in [
        json!({"name": "private", "url": "127.0.0.1:5999"}),
        json!({"name": "bad/name", "url": "127.0.0.1:5999"}),
        json!({"name": "x", "url": "https://"}),
        json!({"name": "x"}),
        json!({"name": "x", "url": "h:1", "username": "only"}),
        json!({"name": "x", "url": "h:1", "auth_type": "AWS_ROLE"}),
    ] {
        let (status, answer) = server.api("POST", "/registries", Some(body.clone())).await;
        assert!(status == 409 || status == 422, "{body}: {status} {answer}");
    }
    let (status, got) = server.api("GET", "/registries/private", None).await;
    assert_eq!((status, &got["id"]), (200, &json!(id)));
    let (status, _) = server
        .api_as(OTHER_KEY, "GET", "/registries/private", None)
        .await;
    assert_eq!(status, 404, "workspaces are isolated");
    let (status, patched) = server
        .api(
            "PATCH",
            "/registries/private",
            Some(json!({"url": "127.0.0.1:6000"})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["url"], "127.0.0.1:6000");
    let (_, list) = server.api("GET", "/registries?page_size=1", None).await;
    assert_eq!(list["items"], list["registries"]);
    assert_eq!(list["items"][0]["id"], json!(id));
    for answer in [&registry, &got, &patched, &list] {
        let text = answer.to_string();
        assert!(
            !text.contains(password) && !text.contains("tester"),
            "{text}"
        );
    }
    let key = std::fs::metadata(dir.path().join("secret.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    assert_eq!(key.len(), 32);
    for file in ["cordon.db", "cordon.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        let found = bytes
            .windows(password.len())
            .any(|w| w == password.as_bytes());
        assert!(!found, "{file} holds the password in plaintext");
    }
    let (status, _) = server.api("DELETE", "/registries/private", None).await;
    assert_eq!(status, 204);
    let (status, _) = server.api("GET", "/registries/private", None).await;
    assert_eq!(status, 404);
}

/// Builds from an open registry (insecure, plain HTTP) and from a TLS registry with basic
/// auth (its credentials through the registries API); tags move; every lookup form; paging;
/// sandboxes from snapshots run the image's binaries with its run_config, get its disk
/// capacity (ENOSPC inside) and keep files over stop/start; capture; delete while in use,
/// across a server restart; layers reclaimed once nothing uses them.
#[tokio::test]
async fn builds_tags_lookups_capture_and_delete_while_in_use() {
    let open = TestRegistry::open().unwrap();
    let auth = TestRegistry::tls_with_auth().unwrap();
    let layout = tempfile::tempdir().unwrap();
    cordon_testkit::oci_layout::busybox_image()
        .write_layout(layout.path(), "busybox")
        .unwrap();
    let public = open
        .push(layout.path(), "busybox", "tools/busybox:1")
        .unwrap();
    let private = auth
        .push(layout.path(), "busybox", "private/busybox:7")
        .unwrap();
    let app_image = app_image_in(&open);

    let dir = TestStateDir::new();
    let port = Server::free_port();
    let env = [
        (INSECURE_ENV, open.address().to_string()),
        (CA_ENV, auth.ca_path().unwrap().display().to_string()),
        (INTERNAL_ENV, auth.address().to_string()),
    ];
    let mut server = Server::start_with(dir.path(), port, &env).await;

    // Open registry; the tag defaults to the image's own.
    let first = build(
        &server,
        json!({"name": "tools/busybox", "docker_image": public, "fs_capacity_bytes": 64 * MIB}),
    )
    .await;
    assert_eq!(first["tags"], json!(["1"]), "{first}");
    assert_eq!(first["docker_image"], json!(public));
    assert!(first["image_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert!(first["fs_used_bytes"].as_u64().unwrap() > 0);
    assert_eq!(first["run_config"]["work_dir"], "/workspace", "{first}");

    // Private registry: anonymous fails with the registry's reason; with its registry it works.
    let (_, failed) = server
        .api(
            "POST",
            "/snapshots",
            Some(json!({"name": "private/busybox", "docker_image": private,
                        "fs_capacity_bytes": 64 * MIB})),
        )
        .await;
    let failed = wait_built(&server, failed["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(!failed["status_message"].as_str().unwrap_or("").is_empty());
    let (username, password) = auth.credentials().unwrap();
    let (status, registry) = server
        .api(
            "POST",
            "/registries",
            Some(
                json!({"name": "auth", "url": format!("https://{}", auth.address()),
                        "username": username, "password": password}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{registry}");
    let private_built = build(
        &server,
        json!({"name": "private/busybox", "docker_image": private, "fs_capacity_bytes": 64 * MIB,
               "registry_id": registry["id"], "tag": "latest",
               "run_config": {"env_vars": {"EXTRA": "yes"}, "user": "0"}}),
    )
    .await;
    assert_eq!(private_built["registry_id"], registry["id"]);
    assert_eq!(private_built["run_config"]["user"], "0");
    assert_eq!(private_built["run_config"]["env_vars"]["EXTRA"], "yes");
    assert_eq!(
        private_built["run_config"]["env_vars"]["GREETING"],
        "hello from the image"
    );
    let (status, _) = server.api("DELETE", "/registries/auth", None).await;
    assert_eq!(status, 204, "no build uses it any more");

    // Tags move: a new build under `tools/busybox:latest`, then another one.
    let app = build(
        &server,
        json!({"name": "tools/busybox", "docker_image": app_image, "tag": "latest",
               "fs_capacity_bytes": 32 * MIB}),
    )
    .await;
    let newer = build(
        &server,
        json!({"name": "tools/busybox", "docker_image": public, "tag": "latest",
               "fs_capacity_bytes": 64 * MIB}),
    )
    .await;
    let (_, app) = server
        .api(
            "GET",
            &format!("/snapshots/{}", app["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(app["tags"], json!([]), "the tag moved away: {app}");
    assert_eq!(newer["tags"], json!(["latest"]));
    let (_, by_name) = server
        .api("GET", "/snapshots-by-name/tools%2Fbusybox", None)
        .await;
    assert_eq!(
        by_name["tags"],
        json!([{"tag": "1", "snapshot_id": first["id"]}, {"tag": "latest", "snapshot_id": newer["id"]}])
    );
    for (reference, want) in [
        (first["id"].as_str().unwrap(), &first),
        ("tools%2Fbusybox", &newer),
        ("tools%2Fbusybox:latest", &newer),
        ("tools%2Fbusybox%3A1", &first),
        ("tools%2Fbusybox:1", &first),
    ] {
        let (status, got) = server
            .api("GET", &format!("/snapshots/{reference}"), None)
            .await;
        assert_eq!(status, 200, "{reference}");
        assert_eq!(got["id"], want["id"], "{reference}");
    }
    let (status, _) = server
        .api_as(OTHER_KEY, "GET", "/snapshots/tools%2Fbusybox:1", None)
        .await;
    assert_eq!(status, 404, "workspaces are isolated");

    // Paging: system + 5 (one failed) of this workspace.
    let (_, all) = server.api("GET", "/snapshots", None).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 6, "{all}");
    let (_, page) = server.api("GET", "/snapshots?limit=4&offset=0", None).await;
    assert_eq!(page["snapshots"].as_array().unwrap().len(), 4);
    assert_eq!(
        (page["offset"].clone(), page["next_cursor"].clone()),
        (json!(4), json!("4"))
    );
    let (_, page) = server.api("GET", "/snapshots?limit=4&offset=4", None).await;
    assert_eq!(page["snapshots"].as_array().unwrap().len(), 2);
    assert_eq!(
        (page["offset"].clone(), page["next_cursor"].clone()),
        (json!(0), Value::Null)
    );
    let (_, found) = server
        .api("GET", "/snapshots?name_contains=PRIVATE&status=ready", None)
        .await;
    assert_eq!(found["items"].as_array().unwrap().len(), 1, "{found}");

    // A sandbox from the app image: its binaries, env, work dir and user; its disk capacity.
    let sandbox = server
        .create(json!({"name": "from-app", "snapshot_id": app["id"]}))
        .await;
    assert_eq!(sandbox["snapshot_id"], app["id"]);
    assert_eq!(sandbox["fs_capacity_bytes"], 32 * MIB);
    let seen = http_exec(&sandbox, "pwd; id -u; echo $GREETING; cat hello.txt").await;
    assert_eq!(
        seen,
        format!(
            "{}\n{}\n{}\n{}",
            busybox_image::WORKDIR,
            busybox_image::USER,
            busybox_image::GREETING,
            busybox_image::APP_FILE_CONTENT
        )
    );
    let full = http_exec(
        &sandbox,
        "dd if=/dev/zero of=/home/user/big bs=1M count=64 2>&1; echo rc=$?; \
         rm -f /home/user/big; echo kept > /home/user/mark",
    )
    .await;
    assert!(full.contains("No space left"), "{full}");
    assert!(!full.contains("rc=0"), "{full}");

    // Capture it; a second sandbox sees the captured file over the image.
    let (status, captured) = server
        .api(
            "POST",
            "/boxes/from-app/snapshot",
            Some(json!({"name": "captured", "run_config": {"env_vars": {"CAPTURED": "1"}}})),
        )
        .await;
    assert_eq!(status, 200, "{captured}");
    let captured = wait_built(&server, captured["id"].as_str().unwrap()).await;
    assert_eq!(captured["status"], "ready", "{captured}");
    assert_eq!(captured["source_sandbox_id"], sandbox["id"]);
    assert_eq!(captured["fs_capacity_bytes"], 32 * MIB);
    assert_eq!(captured["run_config"]["work_dir"], busybox_image::WORKDIR);
    let second = server
        .create(json!({"name": "second", "snapshot": "captured"}))
        .await;
    assert_eq!(
        http_exec(&second, "cat /home/user/mark hello.txt; echo $CAPTURED").await,
        format!("kept\n{}1\n", busybox_image::APP_FILE_CONTENT)
    );

    // Delete the snapshots while sandboxes use them: they go on, also after a restart.
    for snapshot in [&app, &captured] {
        let (status, _) = server
            .api(
                "DELETE",
                &format!("/snapshots/{}", snapshot["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(status, 204);
    }
    let (status, _) = server.api("GET", "/snapshots/captured", None).await;
    assert_eq!(status, 404);
    assert_eq!(http_exec(&second, "cat /home/user/mark").await, "kept\n");
    server.kill();
    let server = Server::start_with(dir.path(), port, &env).await;
    for name in ["from-app", "second"] {
        server
            .api("POST", &format!("/boxes/{name}/stop"), Some(json!({})))
            .await;
        server.wait_status(name, "stopped").await;
        server
            .api("POST", &format!("/boxes/{name}/start"), Some(json!({})))
            .await;
        server.wait_status(name, "ready").await;
    }
    assert_eq!(
        http_exec(&sandbox, "cat /home/user/mark hello.txt").await,
        format!("kept\n{}", busybox_image::APP_FILE_CONTENT)
    );
    assert_eq!(
        http_exec(&second, "cat /home/user/mark; echo $CAPTURED").await,
        "kept\n1\n"
    );

    // Once nothing uses them, the layers are reclaimed.
    let used = stored_layers(dir.path());
    assert!(used.iter().any(|l| l.starts_with("capture-")), "{used:?}");
    for name in ["from-app", "second"] {
        let (status, _) = server.api("DELETE", &format!("/boxes/{name}"), None).await;
        assert_eq!(status, 204);
    }
    for snapshot in [&first, &failed, &private_built, &newer] {
        server
            .api(
                "DELETE",
                &format!("/snapshots/{}", snapshot["id"].as_str().unwrap()),
                None,
            )
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stored_layers(dir.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left: {:?}",
            stored_layers(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The standard busybox test image with its app layer (work dir, user 1000, greeting),
/// pushed to `registry` as `tools/app:2`.
fn app_image_in(registry: &TestRegistry) -> String {
    use cordon_testkit::oci_layout::{LayerCompression, OciImage};
    let app = tempfile::tempdir().unwrap();
    let uid = busybox_image::USER.parse::<u32>().unwrap();
    let workdir = app
        .path()
        .join(busybox_image::WORKDIR.trim_start_matches('/'));
    let home = app.path().join("home/user");
    std::fs::create_dir_all(&workdir).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        app.path()
            .join(busybox_image::APP_FILE.trim_start_matches('/')),
        busybox_image::APP_FILE_CONTENT,
    )
    .unwrap();
    for dir in [&workdir, &home] {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
    }
    let layout = tempfile::tempdir().unwrap();
    OciImage::new()
        .layer_from_dir(&cordon_testkit::test_rootfs(), LayerCompression::Gzip)
        .layer_from_dir(app.path(), LayerCompression::Gzip)
        .env("PATH", busybox_image::PATH)
        .env("GREETING", busybox_image::GREETING)
        .working_dir(busybox_image::WORKDIR)
        .user(busybox_image::USER)
        .write_layout(layout.path(), "app")
        .unwrap();
    registry.push(layout.path(), "app", "tools/app:2").unwrap()
}

/// `POST /snapshots/import` with an OCI layout tar; the server is killed while the build may
/// still run and finishes it after the restart; a sandbox from it runs the image.
#[tokio::test]
async fn import_and_a_restart_during_the_build() {
    let layout = tempfile::tempdir().unwrap();
    cordon_testkit::oci_layout::busybox_image()
        .write_layout(layout.path(), "v1")
        .unwrap();
    let archive = cordon_testkit::oci_layout::tar_dir(layout.path()).unwrap();

    let dir = TestStateDir::new();
    let port = Server::free_port();
    let mut server = Server::start_on(dir.path(), port).await;
    let url = server.url("/api/v2/sandboxes/snapshots/import?name=team%2Fimported&tag=v1");
    let headers = [("x-api-key", KEY.to_string())];
    let (status, _, answer) = raw("POST", &url, &headers, Bytes::from(archive.clone()))
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "building");
    server.kill();
    let server = Server::start_on(dir.path(), port).await;
    let imported = wait_built(&server, answer["id"].as_str().unwrap()).await;
    assert_eq!(imported["status"], "ready", "{imported}");
    assert_eq!(imported["tags"], json!(["v1"]));
    assert_eq!(imported["name"], "team/imported");
    let sandbox = server
        .create(json!({"name": "imported", "snapshot_name": "team/imported:v1"}))
        .await;
    assert_eq!(
        http_exec(&sandbox, "pwd; echo $GREETING").await,
        "/workspace\nhello from the image\n"
    );

    // Not an archive: the build fails with the importer's reason; nothing is left behind.
    let url = server.url("/api/v2/sandboxes/snapshots/import?name=garbage");
    let (status, _, answer) = raw("POST", &url, &headers, Bytes::from_static(b"not a tar"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    let garbage = wait_built(&server, answer["id"].as_str().unwrap()).await;
    assert_eq!(garbage["status"], "failed", "{garbage}");
    assert!(!garbage["status_message"].as_str().unwrap_or("").is_empty());
    let (status, answer) = server
        .api("POST", "/boxes", Some(json!({"snapshot": "garbage"})))
        .await;
    assert!(status == 400 || status == 404, "{status} {answer}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("imports"))
            .unwrap()
            .count(),
        0
    );
}
