//! Templates, warm pools and autoscaling (spec §2.8 and extensions) against a real server and
//! real sandboxes on the default snapshot.
//!
//! Needs root, the static agent (`make agent`) and the default snapshot (`cordon prepare`).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Server, INSECURE_ENV, KEY, OTHER_KEY};
use cordon_testkit::registry::TestRegistry;
use cordon_testkit::TestStateDir;
use serde_json::{json, Value};

/// Not a test: the server process of [`Server::start`] (does nothing when run directly).
#[test]
#[ignore]
fn serve_child() {
    common::serve_child_main();
}

/// A server whose workspaces may hold `max` sandboxes, with the pool settings in `env`.
async fn start(dir: &Path, max: usize, env: &[(&str, &str)]) -> Server {
    let mut env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
    env.push((common::MAX_SANDBOXES_ENV, max.to_string()));
    Server::start_with(dir, Server::free_port(), &env).await
}

/// The runtime's sandboxes: every id with a state directory.
fn runtime_ids(dir: &Path) -> HashSet<String> {
    std::fs::read_dir(dir.join("sandboxes"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

async fn create_template(server: &Server, key: &str, name: &str, extra: Value) {
    let mut body = json!({
        "name": name, "image": "system/default",
        "resources": {"cpu": "250m", "memory": "64Mi"},
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (status, template) = server.api_as(key, "POST", "/templates", Some(body)).await;
    assert_eq!(status, 200, "{template}");
}

async fn create_pool(server: &Server, key: &str, body: Value) -> Value {
    let (status, pool) = server.api_as(key, "POST", "/pools", Some(body)).await;
    assert_eq!(status, 200, "{pool}");
    pool
}

async fn pool(server: &Server, key: &str, name: &str) -> Value {
    let (status, pool) = server
        .api_as(key, "GET", &format!("/pools/{name}"), None)
        .await;
    assert_eq!(status, 200, "{pool}");
    pool
}

/// Polls the pool until `check` holds.
async fn wait_pool(
    server: &Server,
    key: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pool = pool(server, key, name).await;
        if check(&pool) {
            return pool;
        }
        assert!(Instant::now() < deadline, "pool never {what}: {pool}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_box(server: &Server, key: &str, body: Value) -> Value {
    let (status, sandbox) = server.api_as(key, "POST", "/boxes", Some(body)).await;
    assert_eq!(status, 200, "{sandbox}");
    assert_eq!(sandbox["status"], "ready", "{sandbox}");
    sandbox
}

/// `POST {dp}/execute` as `key`: (status, stdout).
async fn exec(sandbox: &Value, key: &str, command: &str) -> (u16, String) {
    let (status, body) = common::call(
        "POST",
        &format!("{}/execute", sandbox["dataplane_url"].as_str().unwrap()),
        Some(key),
        Some(json!({"command": command})),
    )
    .await
    .unwrap();
    (
        status,
        body["stdout"].as_str().unwrap_or_default().to_string(),
    )
}

fn error_type(body: &Value) -> &str {
    body["detail"]["error"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn templates_crud_validation_and_boxes_from_them() {
    let dir = TestStateDir::new();
    let server = start(dir.path(), 8, &[]).await;

    // Bad input: the field named, nothing stored.
    for (body, field) in [
        (json!({"image": "system/default"}), "name"),
        (json!({"name": "t"}), "image"),
        // Neither a snapshot nor an image reference.
        (json!({"name": "t", "image": "No Such/Image!"}), "image"),
        (json!({"name": "T!", "image": "system/default"}), "name"),
        (
            json!({"name": "t", "image": "system/default", "resources": {"cpu": "lots"}}),
            "cpu",
        ),
        (
            json!({"name": "t", "image": "system/default", "resources": {"memory": "1Ki"}}),
            "memory",
        ),
        (
            json!({"name": "t", "image": "system/default", "resources": {"storage": "9Pi"}}),
            "storage",
        ),
        (
            json!({"name": "t", "image": "system/default", "idle_ttl_seconds": 61}),
            "idle_ttl_seconds",
        ),
        (
            json!({"name": "t", "image": "system/default", "runtime": "docker"}),
            "runtime",
        ),
        (
            json!({"name": "t", "image": "system/default", "volume_mounts": [{"volume_name": "v"}]}),
            "volume_mounts",
        ),
    ] {
        let (status, error) = server.api("POST", "/templates", Some(body.clone())).await;
        assert_eq!(status, 422, "{body} → {error}");
        let loc = error["detail"][0]["loc"].as_array().unwrap();
        assert_eq!(loc.last().unwrap(), field, "{body} → {error}");
    }
    let (_, list) = server.api("GET", "/templates", None).await;
    assert_eq!(list["templates"], json!([]));

    create_template(
        &server,
        KEY,
        "small",
        json!({
            "resources": {"cpu": "500m", "memory": "256Mi", "storage": "1Gi"},
            "volume_mounts": [{"volume_name": "data", "mount_path": "/data"}],
            "run_config": {"env_vars": {"FROM_TEMPLATE": "yes"}},
            "proxy_config": {"rules": []},
            "runtime": "namespace",
            "idle_ttl_seconds": 120,
        }),
    )
    .await;
    let (status, template) = server.api("GET", "/templates/small", None).await;
    assert_eq!(status, 200);
    assert_eq!(template["image"], "system/default");
    assert_eq!(
        template["resources"],
        json!({"cpu": "500m", "memory": "256Mi", "storage": "1Gi"})
    );
    assert_eq!(
        (
            template["cpu_millicores"].as_u64(),
            template["mem_bytes"].as_u64()
        ),
        (Some(500), Some(256 << 20))
    );
    assert_eq!(template["fs_capacity_bytes"], 1u64 << 30);
    assert_eq!(template["volume_mounts"][0]["mount_path"], "/data");
    assert_eq!(template["proxy_config"], json!({"rules": []}));
    for key in ["id", "created_at", "updated_at"] {
        assert!(template[key].is_string(), "{key}: {template}");
    }
    let (status, conflict) = server
        .api(
            "POST",
            "/templates",
            Some(json!({"name": "small", "image": "system/default"})),
        )
        .await;
    assert_eq!(status, 409, "{conflict}");
    let (_, list) = server.api("GET", "/templates", None).await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"], list["templates"]);

    // Rename (the spec's PATCH {name}); the old name is gone.
    let (status, renamed) = server
        .api("PATCH", "/templates/small", Some(json!({"name": "tiny"})))
        .await;
    assert_eq!(
        (status, &renamed["name"]),
        (200, &json!("tiny")),
        "{renamed}"
    );
    assert_eq!(server.api("GET", "/templates/small", None).await.0, 404);

    // Another workspace sees none of it.
    assert_eq!(
        server
            .api_as(OTHER_KEY, "GET", "/templates/tiny", None)
            .await
            .0,
        404
    );
    let (_, other) = server.api_as(OTHER_KEY, "GET", "/templates", None).await;
    assert_eq!(other["templates"], json!([]));

    // A box from the template, the legacy way.
    let sandbox = create_box(
        &server,
        KEY,
        json!({"template_name": "tiny", "name": "from-template", "wait_for_ready": true, "timeout": 60}),
    )
    .await;
    assert_eq!(sandbox["template_name"], "tiny");
    let (_, got) = server.api("GET", "/boxes/from-template", None).await;
    assert_eq!(got["template_name"], "tiny", "{got}");
    let (_, boxes) = server.api("GET", "/boxes", None).await;
    assert_eq!(boxes["sandboxes"][0]["template_name"], "tiny", "{boxes}");
    assert_eq!(sandbox["cpu_millicores"], 500);
    assert_eq!(sandbox["mem_bytes"], 256 << 20);
    assert_eq!(sandbox["fs_capacity_bytes"], 1u64 << 30);
    assert_eq!(sandbox["idle_ttl_seconds"], 120);
    assert_eq!(
        exec(&sandbox, KEY, "echo $FROM_TEMPLATE").await,
        (200, "yes\n".into())
    );
    let (status, missing) = server
        .api(
            "POST",
            "/boxes",
            Some(json!({"template_name": "nope", "wait_for_ready": true})),
        )
        .await;
    assert_eq!(status, 404, "{missing}");

    // Pools: the spec's errors.
    let (status, error) = server
        .api(
            "POST",
            "/pools",
            Some(json!({"name": "p", "template_name": "nope", "replicas": 1})),
        )
        .await;
    assert_eq!(
        (status, error_type(&error)),
        (400, "TemplateNotFound"),
        "{error}"
    );
    for bad in [
        json!({"name": "p", "template_name": "tiny", "replicas": -1}),
        json!({"name": "p", "template_name": "tiny", "replicas": 1000}),
        json!({"name": "p", "template_name": "tiny", "min_replicas": 3, "max_replicas": 2}),
        json!({"name": "P P", "template_name": "tiny", "replicas": 1}),
        json!({"template_name": "tiny", "replicas": 1}),
    ] {
        let (status, error) = server.api("POST", "/pools", Some(bad.clone())).await;
        assert_eq!(
            (status, error_type(&error)),
            (400, "ValidationError"),
            "{bad} → {error}"
        );
    }
    // Volumes are per sandbox: no pool on a template that mounts one.
    let (status, error) = server
        .api(
            "POST",
            "/pools",
            Some(json!({"name": "p", "template_name": "tiny", "replicas": 1})),
        )
        .await;
    assert_eq!(
        (status, error_type(&error)),
        (400, "ValidationError"),
        "{error}"
    );
    let (status, patched) = server
        .api(
            "PATCH",
            "/templates/tiny",
            Some(json!({"volume_mounts": []})),
        )
        .await;
    assert_eq!(
        (status, &patched["volume_mounts"]),
        (200, &json!([])),
        "{patched}"
    );
    // 1 box held + 8 warm > the limit of 8.
    let (status, error) = server
        .api(
            "POST",
            "/pools",
            Some(json!({"name": "p", "template_name": "tiny", "replicas": 8})),
        )
        .await;
    assert_eq!(status, 429, "{error}");
    assert!(error["detail"]["message"]
        .as_str()
        .unwrap()
        .contains("sandbox count limit"));
    let (_, pools) = server.api("GET", "/pools", None).await;
    assert_eq!(pools["pools"], json!([]));

    create_pool(
        &server,
        KEY,
        json!({"name": "p", "template_name": "tiny", "replicas": 1}),
    )
    .await;
    let (status, error) = server
        .api(
            "POST",
            "/pools",
            Some(json!({"name": "p", "template_name": "tiny", "replicas": 1})),
        )
        .await;
    assert_eq!(status, 409, "{error}");
    let (status, in_use) = server.api("DELETE", "/templates/tiny", None).await;
    assert_eq!(status, 409, "{in_use}");
    assert_eq!(server.api("DELETE", "/pools/p", None).await.0, 204);
    // The sandbox made from it still refers to it (under its old name, too).
    let (status, in_use) = server.api("DELETE", "/templates/tiny", None).await;
    assert_eq!((status, error_type(&in_use)), (409, "Conflict"), "{in_use}");
    assert_eq!(server.api("GET", "/templates/tiny", None).await.0, 200);
    assert_eq!(
        server.api("DELETE", "/boxes/from-template", None).await.0,
        204
    );
    assert_eq!(server.api("DELETE", "/templates/tiny", None).await.0, 204);
}

#[tokio::test]
async fn a_pool_serves_a_burst_of_50_and_refills() {
    let dir = TestStateDir::new();
    let server = start(dir.path(), 80, &[]).await;
    create_template(&server, KEY, "warm", json!({})).await;
    let created = create_pool(
        &server,
        KEY,
        json!({"name": "warm", "template_name": "warm", "replicas": 5, "wait_for_ready": true, "timeout": 120}),
    )
    .await;
    assert_eq!(
        (created["ready"].as_u64(), created["template_name"].as_str()),
        (Some(5), Some("warm")),
        "{created}"
    );

    // Warm sandboxes are invisible until claimed.
    let warm = runtime_ids(dir.path());
    assert_eq!(warm.len(), 5);
    let (_, list) = server.api("GET", "/boxes", None).await;
    assert_eq!(list["items"], json!([]));
    for id in &warm {
        assert_eq!(
            server.api("GET", &format!("/boxes/{id}"), None).await.0,
            404
        );
        let (status, _) = common::call(
            "POST",
            &server.url(&format!("/dp/{id}/execute")),
            Some(KEY),
            Some(json!({"command": "true"})),
        )
        .await
        .unwrap();
        assert_eq!(status, 404, "the data plane reached a warm sandbox");
    }

    // One create is served by a warm sandbox: one that existed before the request.
    let asked = Instant::now();
    let one = create_box(
        &server,
        KEY,
        json!({"template_name": "warm", "name": "first", "wait_for_ready": true, "timeout": 60}),
    )
    .await;
    let took = asked.elapsed();
    assert!(
        warm.contains(one["id"].as_str().unwrap()),
        "not served from the pool: {one}"
    );
    assert_eq!(
        (one["name"].as_str(), one["template_name"].as_str()),
        (Some("first"), Some("warm"))
    );
    let (_, got) = server.api("GET", "/boxes/first", None).await;
    assert_eq!(
        (got["id"].as_str(), got["template_name"].as_str()),
        (one["id"].as_str(), Some("warm")),
        "{got}"
    );
    assert_eq!(one["idle_ttl_seconds"], 600, "the request's TTLs apply");
    assert!(took < Duration::from_secs(1), "a warm create took {took:?}");
    println!("create served from the pool in {took:?}");
    assert_eq!(
        exec(&one, KEY, "echo served").await,
        (200, "served\n".into())
    );
    assert_eq!(pool(&server, KEY, "warm").await["claimed"], 1);
    wait_pool(&server, KEY, "warm", "refilled", |p| p["ready"] == 5).await;

    // A burst of 50 against the 5 warm ones: all succeed, none handed out twice.
    let before = runtime_ids(dir.path());
    let burst: Vec<_> = (0..50)
        .map(|i| {
            let server = &server;
            async move {
                server
                    .api("POST", "/boxes", Some(json!({"template_name": "warm", "name": format!("burst-{i}"), "wait_for_ready": true, "timeout": 120})))
                    .await
            }
        })
        .collect();
    let started = Instant::now();
    let results = futures::future::join_all(burst).await;
    println!("burst of 50 creates took {:?}", started.elapsed());
    let mut ids = HashSet::new();
    let mut from_pool = 0;
    for (status, sandbox) in &results {
        assert_eq!(*status, 200, "{sandbox}");
        assert_eq!(sandbox["status"], "ready", "{sandbox}");
        let id = sandbox["id"].as_str().unwrap();
        assert!(ids.insert(id.to_string()), "handed out twice: {id}");
        from_pool += usize::from(before.contains(id));
    }
    assert!(
        from_pool >= 5,
        "only {from_pool} of the burst came from the pool"
    );
    assert!(!ids.contains(one["id"].as_str().unwrap()));
    let (_, list) = server.api("GET", "/boxes", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 51);
    let refilled = wait_pool(&server, KEY, "warm", "refilled after the burst", |p| {
        p["ready"] == 5
    })
    .await;
    assert!(refilled["claimed"].as_u64().unwrap() >= 6, "{refilled}");

    // Deleting the pool deletes its warm sandboxes, not the claimed ones.
    let warm_now: HashSet<String> = runtime_ids(dir.path())
        .difference(&ids)
        .filter(|id| *id != one["id"].as_str().unwrap())
        .cloned()
        .collect();
    assert_eq!(warm_now.len(), 5);
    assert_eq!(server.api("DELETE", "/pools/warm", None).await.0, 204);
    wait_until_gone(dir.path(), &warm_now).await;
    assert_eq!(exec(&one, KEY, "echo still").await, (200, "still\n".into()));
}

async fn wait_until_gone(dir: &Path, ids: &HashSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while runtime_ids(dir).intersection(ids).next().is_some() {
        assert!(
            Instant::now() < deadline,
            "warm sandboxes outlived their pool"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pools_scale_with_demand_within_the_budget() {
    let dir = TestStateDir::new();
    let server = start(
        dir.path(),
        40,
        &[
            (common::POOL_WINDOW_MS_ENV, "10000"),
            (common::POOL_COOLDOWN_MS_ENV, "1000"),
            // Four warm sandboxes of 64 MiB.
            (
                common::POOL_MEMORY_BUDGET_ENV,
                &(4u64 * (64 << 20)).to_string(),
            ),
        ],
    )
    .await;
    create_template(&server, KEY, "auto", json!({})).await;
    create_pool(
        &server,
        KEY,
        json!({"name": "auto", "template_name": "auto", "replicas": 1, "max_replicas": 8, "target_spare": 1, "wait_for_ready": true, "timeout": 60}),
    )
    .await;
    let first = pool(&server, KEY, "auto").await;
    assert_eq!(
        (first["target"].as_u64(), first["ready"].as_u64()),
        (Some(1), Some(1)),
        "{first}"
    );

    // Sustained demand: six creates in a row, from the current client's form too (a snapshot
    // and no resources: the template has no sandbox settings, so the pool serves it).
    let warm = runtime_ids(dir.path());
    let by_snapshot = create_box(
        &server,
        KEY,
        json!({"snapshot": "system/default", "wait_for_ready": true}),
    )
    .await;
    assert!(
        warm.contains(by_snapshot["id"].as_str().unwrap()),
        "not served from the pool: {by_snapshot}"
    );
    assert_eq!(by_snapshot["mem_bytes"], 64 << 20);
    for _ in 0..5 {
        create_box(
            &server,
            KEY,
            json!({"template_name": "auto", "wait_for_ready": true, "timeout": 60}),
        )
        .await;
    }
    let scaled = wait_pool(&server, KEY, "auto", "scaled up", |p| p["target"] == 7).await;
    let decisions = scaled["decisions"].as_array().unwrap();
    assert!(
        decisions
            .iter()
            .any(|d| d["reason"].as_str().unwrap().starts_with("scale up")),
        "{scaled}"
    );
    // The budget holds it at four, however high the target.
    let capped = wait_pool(&server, KEY, "auto", "capped", |p| p["ready"] == 4).await;
    assert!(
        capped["capped_by"]
            .as_str()
            .unwrap()
            .contains("memory budget"),
        "{capped}"
    );
    assert!(
        capped["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["reason"].as_str().unwrap().contains("capped by")),
        "{capped}"
    );
    for _ in 0..10 {
        let now = pool(&server, KEY, "auto").await;
        assert!(
            now["ready"].as_u64().unwrap() + now["starting"].as_u64().unwrap() <= 4,
            "{now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Idle: after the window and the cool-down it shrinks back to its floor, oldest first.
    let idle = wait_pool(&server, KEY, "auto", "scaled down", |p| {
        p["target"] == 1 && p["ready"] == 1
    })
    .await;
    let last = idle["decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        last["reason"].as_str().unwrap().starts_with("scale down"),
        "{idle}"
    );
    assert_eq!(last["to"], 1, "{idle}");
    // The creates it served are untouched.
    let (_, list) = server.api("GET", "/boxes", None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn pools_survive_a_server_restart() {
    let dir = TestStateDir::new();
    let port = Server::free_port();
    let env = [(common::MAX_SANDBOXES_ENV, "10".to_string())];
    let mut server = Server::start_with(dir.path(), port, &env).await;
    create_template(&server, KEY, "kept", json!({})).await;
    create_pool(&server, KEY, json!({"name": "kept", "template_name": "kept", "replicas": 2, "wait_for_ready": true, "timeout": 60})).await;
    let warm = runtime_ids(dir.path());
    assert_eq!(warm.len(), 2);

    server.kill();
    let server = Server::start_with(dir.path(), port, &env).await;
    let adopted = wait_pool(&server, KEY, "kept", "adopted", |p| p["ready"] == 2).await;
    assert_eq!(adopted["template_name"], "kept");
    assert_eq!(
        runtime_ids(dir.path()),
        warm,
        "the warm sandboxes were replaced, not adopted"
    );
    let sandbox = create_box(
        &server,
        KEY,
        json!({"template_name": "kept", "wait_for_ready": true}),
    )
    .await;
    assert!(warm.contains(sandbox["id"].as_str().unwrap()), "{sandbox}");
    assert_eq!(
        exec(&sandbox, KEY, "echo adopted").await,
        (200, "adopted\n".into())
    );

    // A template change replaces the warm sandboxes; a size change resizes the pool.
    let (status, _) = server
        .api(
            "PATCH",
            "/templates/kept",
            Some(json!({"resources": {"cpu": "250m", "memory": "96Mi"}})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, resized) = server
        .api("PATCH", "/pools/kept", Some(json!({"replicas": 3})))
        .await;
    assert_eq!(
        (status, &resized["replicas"]),
        (200, &json!(3)),
        "{resized}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while runtime_ids(dir.path()).intersection(&warm).count() > 1
        || pool(&server, KEY, "kept").await["ready"] != 3
    {
        assert!(
            Instant::now() < deadline,
            "outdated warm sandboxes were kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = create_box(&server, KEY, json!({"template_name": "kept"})).await;
    assert_eq!(fresh["mem_bytes"], 96 << 20);
    assert!(!warm.contains(fresh["id"].as_str().unwrap()));
}

#[tokio::test]
async fn tenants_pools_stay_apart() {
    let dir = TestStateDir::new();
    let server = start(dir.path(), 6, &[]).await;
    create_template(&server, KEY, "same", json!({})).await;
    create_pool(
        &server,
        KEY,
        json!({"name": "same", "template_name": "same", "replicas": 2, "wait_for_ready": true}),
    )
    .await;
    let ours = runtime_ids(dir.path());
    // The other tenant's names are its own; it cannot use ours.
    let (status, error) = server
        .api_as(
            OTHER_KEY,
            "POST",
            "/pools",
            Some(json!({"name": "x", "template_name": "same", "replicas": 1})),
        )
        .await;
    assert_eq!(
        (status, error_type(&error)),
        (400, "TemplateNotFound"),
        "{error}"
    );
    create_template(&server, OTHER_KEY, "same", json!({})).await;
    create_pool(
        &server,
        OTHER_KEY,
        json!({"name": "same", "template_name": "same", "replicas": 2, "wait_for_ready": true}),
    )
    .await;
    let theirs: HashSet<String> = runtime_ids(dir.path()).difference(&ours).cloned().collect();
    assert_eq!(theirs.len(), 2);
    let (_, listed) = server.api_as(OTHER_KEY, "GET", "/pools", None).await;
    assert_eq!(listed["pools"].as_array().unwrap().len(), 1);

    // Each tenant's creates are served from its own pool only, also for the same snapshot.
    let sandbox = create_box(
        &server,
        OTHER_KEY,
        json!({"template_name": "same", "wait_for_ready": true}),
    )
    .await;
    assert!(
        theirs.contains(sandbox["id"].as_str().unwrap()),
        "{sandbox}"
    );
    let sandbox = create_box(
        &server,
        OTHER_KEY,
        json!({"snapshot": "system/default", "wait_for_ready": true}),
    )
    .await;
    assert!(
        theirs.contains(sandbox["id"].as_str().unwrap()),
        "{sandbox}"
    );
    // Neither tenant reaches the other's warm or claimed sandboxes.
    assert_eq!(exec(&sandbox, KEY, "true").await.0, 404);
    for id in &ours {
        assert_eq!(
            server
                .api_as(OTHER_KEY, "GET", &format!("/boxes/{id}"), None)
                .await
                .0,
            404
        );
    }
    // Warm sandboxes count against their workspace: 2 claimed + 2 warm of 6, so a pool of 3
    // more does not fit.
    let (status, _) = server
        .api_as(
            OTHER_KEY,
            "POST",
            "/pools",
            Some(json!({"name": "more", "template_name": "same", "replicas": 3})),
        )
        .await;
    assert_eq!(status, 429);

    // Deleting our pool leaves theirs.
    assert_eq!(server.api("DELETE", "/pools/same", None).await.0, 204);
    wait_until_gone(dir.path(), &ours).await;
    wait_pool(&server, OTHER_KEY, "same", "refilled", |p| p["ready"] == 2).await;
    let (_, boxes) = server.api_as(OTHER_KEY, "GET", "/boxes", None).await;
    assert_eq!(boxes["items"].as_array().unwrap().len(), 2);
    // Theirs: 2 claimed + 2 warm; ours all gone.
    assert_eq!(runtime_ids(dir.path()).len(), 4);
}

/// Polls the template until its snapshot build settles.
async fn wait_template_built(server: &Server, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, template) = server.api("GET", &format!("/templates/{name}"), None).await;
        assert_eq!(status, 200, "{template}");
        if template["status"] != "building" {
            return template;
        }
        assert!(Instant::now() < deadline, "still building: {template}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A template whose `image` is a registry image builds its own snapshot as `POST /snapshots`
/// would: a create from it waits for the build and runs the image with its env; a pool on it
/// fills once the build is ready; an image that cannot be pulled shows the failed build, and
/// creates from it get its reason.
#[tokio::test]
async fn templates_build_their_snapshot_from_an_image() {
    let registry = TestRegistry::open().unwrap();
    let layout = tempfile::tempdir().unwrap();
    cordon_testkit::oci_layout::busybox_image()
        .write_layout(layout.path(), "busybox")
        .unwrap();
    let image = registry
        .push(layout.path(), "busybox", "tools/busybox:3")
        .unwrap();
    let dir = TestStateDir::new();
    let env = [
        (INSECURE_ENV, registry.address().to_string()),
        (common::POOL_TICK_MS_ENV, "200".to_string()),
        (common::MAX_SANDBOXES_ENV, "8".to_string()),
    ];
    let server = Server::start_with(dir.path(), Server::free_port(), &env).await;

    let (status, template) = server
        .api(
            "POST",
            "/templates",
            Some(json!({"name": "busy", "image": image,
                        "resources": {"cpu": "250m", "memory": "64Mi", "storage": "64Mi"}})),
        )
        .await;
    assert_eq!(status, 200, "{template}");
    assert_eq!(template["image"], json!(image), "echoed as given");
    let snapshot_id = template["snapshot_id"].as_str().unwrap().to_string();
    assert!(
        ["building", "ready"].contains(&template["status"].as_str().unwrap()),
        "{template}"
    );
    let (status, snapshot) = server
        .api("GET", &format!("/snapshots/{snapshot_id}"), None)
        .await;
    assert_eq!(status, 200, "{snapshot}");
    assert_eq!(snapshot["name"], "templates/busy");
    assert_eq!(snapshot["docker_image"], json!(image));
    assert_eq!(
        snapshot["fs_capacity_bytes"],
        64 << 20,
        "the template's storage"
    );

    // Sent at once: the create waits for the build.
    let sandbox = create_box(
        &server,
        KEY,
        json!({"template_name": "busy", "timeout": 120}),
    )
    .await;
    assert_eq!(sandbox["snapshot_id"], json!(snapshot_id), "{sandbox}");
    let (status, stdout) = exec(&sandbox, KEY, "echo $GREETING; busybox | head -1").await;
    assert_eq!(status, 200);
    assert!(
        stdout.starts_with("hello from the image\nBusyBox"),
        "{stdout:?}"
    );
    let template = wait_template_built(&server, "busy").await;
    assert_eq!(template["status"], "ready", "{template}");
    assert_eq!(template["snapshot_id"], json!(snapshot_id));

    // A pool on it fills; a create then claims a warm sandbox of the built snapshot.
    create_pool(
        &server,
        KEY,
        json!({"name": "busy-pool", "template_name": "busy", "replicas": 1}),
    )
    .await;
    wait_pool(&server, KEY, "busy-pool", "one ready", |p| p["ready"] == 1).await;
    let claimed = create_box(&server, KEY, json!({"template_name": "busy"})).await;
    let (_, stdout) = exec(&claimed, KEY, "echo $GREETING").await;
    assert_eq!(stdout, "hello from the image\n");

    // An image the registry does not have: the template shows the failed build; creates from
    // it get the build's reason and nothing is created.
    let missing = format!("{}/tools/nothing-here:1", registry.address());
    let (status, broken) = server
        .api(
            "POST",
            "/templates",
            Some(json!({"name": "broken", "image": missing,
                        "resources": {"cpu": "250m", "memory": "64Mi"}})),
        )
        .await;
    assert_eq!(status, 200, "{broken}");
    let broken = wait_template_built(&server, "broken").await;
    assert_eq!(broken["status"], "failed", "{broken}");
    let reason = broken["status_message"].as_str().unwrap().to_string();
    assert!(!reason.is_empty(), "{broken}");
    let (_, before) = server.api("GET", "/boxes", None).await;
    let (status, error) = server
        .api("POST", "/boxes", Some(json!({"template_name": "broken"})))
        .await;
    assert_eq!(status, 409, "{error}");
    let message = error.to_string();
    assert!(
        message.contains("failed") && message.contains(&reason),
        "{error}"
    );
    let (_, after) = server.api("GET", "/boxes", None).await;
    assert_eq!(before, after, "nothing created");

    // Pointing it at the good image (PATCH) rebuilds it, and creates work again.
    let (status, fixed) = server
        .api("PATCH", "/templates/broken", Some(json!({"image": image})))
        .await;
    assert_eq!(status, 200, "{fixed}");
    assert_ne!(fixed["snapshot_id"], broken["snapshot_id"]);
    create_box(
        &server,
        KEY,
        json!({"template_name": "broken", "timeout": 120}),
    )
    .await;
}
