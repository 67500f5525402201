//! The `runtime` create field and the `isolation` field of sandbox objects (Cordon
//! extensions): validated, and honest about what the sandbox really has.
//!
//! Needs root, the static agent (`make agent`) and the default snapshot (`cordon prepare`).

mod common;

use common::Server;
use cordon_testkit::TestStateDir;
use serde_json::json;

/// Not a test: the server process of [`Server::start`] (does nothing when run directly).
#[test]
#[ignore]
fn serve_child() {
    common::serve_child_main();
}

#[tokio::test]
async fn runtime_is_validated_and_isolation_is_reported() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    for bad in [json!("qemu"), json!(5), json!("Namespace")] {
        let (status, answer) = server
            .api("POST", "/boxes", Some(json!({ "runtime": bad })))
            .await;
        assert_eq!(status, 422, "{bad}: {answer}");
        assert_eq!(
            answer["detail"][0]["loc"],
            json!(["body", "runtime"]),
            "{answer}"
        );
    }
    // This server has no microVM backend (no guest kernel given to it): refused, not created.
    let (status, answer) = server
        .api("POST", "/boxes", Some(json!({ "runtime": "microvm" })))
        .await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"][0]["msg"]
            .as_str()
            .is_some_and(|m| m.contains("not available")),
        "{answer}"
    );
    let (_, list) = server.api("GET", "/boxes", None).await;
    assert_eq!(list.to_string().matches("\"id\"").count(), 0, "{list}");

    let created = server.create(json!({ "runtime": "namespace" })).await;
    assert_eq!(created["runtime"], "namespace", "{created}");
    assert_eq!(created["isolation"], "namespace", "{created}");
    let name = created["name"].as_str().unwrap().to_string();
    let (status, fetched) = server.api("GET", &format!("/boxes/{name}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(fetched["isolation"], "namespace", "{fetched}");
    let defaulted = server.create(json!({})).await;
    assert_eq!(defaulted["runtime"], "namespace", "{defaulted}");
}
