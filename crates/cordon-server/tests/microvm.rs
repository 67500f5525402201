//! The server on the microVM backend, end to end under TCG (nested KVM is broken on the CI
//! machines; a KVM host runs the same test with `microvm-kvm`): a sandbox created with
//! `"runtime": "microvm"` runs commands and keeps its files across stop/start; after a SIGKILL
//! of the server the restarted server re-adopts the running VM, which still serves; and the
//! egress proxy works from inside the VM (curl through HTTPS_PROXY to a recording upstream on
//! loopback, the rule's header injected on the way).
//!
//! One VM, booted twice (create, start). Needs root, qemu-system-x86, the static agent
//! (`make agent`), the default snapshot and the guest kernel (`cordon prepare`).

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{
    Server, EGRESS_ANY_PORT_ENV, EGRESS_CAS_ENV, EGRESS_CIDRS_ENV, EGRESS_RESOLVER_ENV, KEY,
    MICROVM_ENV,
};
use cordon_testkit::dns::TestDns;
use cordon_testkit::https_upstream::HttpsUpstream;
use cordon_testkit::TestStateDir;
use serde_json::{json, Value};

#[test]
#[ignore = "the server process of the other tests"]
fn serve_child() {
    common::serve_child_main();
}

/// `POST {dp}/execute` (the HTTP exec route); panics unless it ran and exited 0.
async fn exec(dataplane_url: &str, command: &str) -> String {
    let (status, body) = common::call(
        "POST",
        &format!("{dataplane_url}/execute"),
        Some(KEY),
        Some(json!({"command": command, "timeout": 60})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "`{command}`: {body}");
    assert_eq!(body["exit_code"], 0, "`{command}`: {body}");
    body["stdout"].as_str().unwrap_or_default().to_string()
}

async fn start_server(
    dir: &std::path::Path,
    port: u16,
    dns: &TestDns,
    upstream: &HttpsUpstream,
) -> Server {
    Server::start_with(
        dir,
        port,
        &[
            (MICROVM_ENV, "1".into()),
            (EGRESS_CIDRS_ENV, "127.0.0.0/8".into()),
            (EGRESS_CAS_ENV, upstream.ca_pem_path().display().to_string()),
            (EGRESS_RESOLVER_ENV, dns.addr().to_string()),
            (EGRESS_ANY_PORT_ENV, "1".into()),
        ],
    )
    .await
}

fn assert_microvm(sandbox: &Value) {
    assert_eq!(sandbox["runtime"], "microvm", "{sandbox}");
    let isolation = sandbox["isolation"].as_str().unwrap_or_default();
    assert!(
        ["microvm-tcg", "microvm-kvm"].contains(&isolation),
        "{sandbox}"
    );
}

#[tokio::test]
async fn a_microvm_sandbox_keeps_files_survives_a_server_crash_and_reaches_egress() {
    let dns = TestDns::start().await;
    let upstream = HttpsUpstream::start_with_names(&["api.example.test"]).await;
    dns.set("api.example.test", vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let dir = TestStateDir::new();
    let port = Server::free_port();
    let mut server = start_server(dir.path(), port, &dns, &upstream).await;

    let sandbox = server
        .create(json!({
            "name": "vm",
            "runtime": "microvm",
            "proxy_config": {"rules": [{
                "name": "api",
                "match_hosts": ["api.example.test"],
                "headers": [{"name": "x-injected", "type": "opaque", "value": "by-the-proxy"}]
            }]}
        }))
        .await;
    assert_microvm(&sandbox);
    let _reaper = KillVmOnDrop(sandbox["id"].as_str().unwrap().to_string());
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    // The guest's own kernel (Debian's cloud kernel), not the host's.
    assert!(exec(&dp, "uname -r").await.contains("cloud"));
    exec(
        &dp,
        "mkdir -p /home/user/keep && echo kept > /home/user/keep/f",
    )
    .await;

    // Stop, start: a fresh boot with the same writable disk.
    let (status, answer) = server.api("POST", "/boxes/vm/stop", Some(json!({}))).await;
    assert_eq!(status, 204, "{answer}");
    server.wait_status("vm", "stopped").await;
    let (status, started) = server.api("POST", "/boxes/vm/start", Some(json!({}))).await;
    assert_eq!(status, 200, "{started}");
    wait_ready(&server, "vm").await;
    assert_eq!(exec(&dp, "cat /home/user/keep/f").await, "kept\n");
    let boot_id = exec(&dp, "cat /proc/sys/kernel/random/boot_id").await;

    // SIGKILL the server: the VM runs on; the restarted server re-adopts it (same boot).
    server.kill();
    let server = start_server(dir.path(), port, &dns, &upstream).await;
    let (status, fetched) = server.api("GET", "/boxes/vm", None).await;
    assert_eq!(status, 200, "{fetched}");
    assert_eq!(fetched["status"], "ready", "{fetched}");
    assert_microvm(&fetched);
    assert_eq!(
        exec(&dp, "cat /proc/sys/kernel/random/boot_id").await,
        boot_id,
        "re-adopted, not rebooted"
    );
    assert_eq!(exec(&dp, "cat /home/user/keep/f").await, "kept\n");

    // The guest's wall clock is the host's (TLS certificates are checked against it): QEMU's
    // microvm machine runs here without an RTC.
    let guest_now: i64 = exec(&dp, "date +%s").await.trim().parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() < 120,
        "the guest's clock is off: guest {guest_now}, host {host_now}"
    );

    // Egress from inside the VM: through the proxy (the agent's relay over the VM channel),
    // which injects the rule's header upstream.
    let upstream_port = upstream.addr().port();
    let out = exec(
        &dp,
        &format!(
            "curl -sS --max-time 30 -o /dev/null -w '%{{http_code}}' \
             https://api.example.test:{upstream_port}/from-vm"
        ),
    )
    .await;
    assert_eq!(out.trim(), "200");
    let received = upstream.requests();
    let last = received.last().expect("the upstream got the request");
    assert_eq!(last.path, "/from-vm");
    assert_eq!(last.header("x-injected"), Some("by-the-proxy"));

    let (status, _) = server.api("DELETE", "/boxes/vm", None).await;
    assert!(matches!(status, 200 | 204), "delete: {status}");
}

/// Polls `/status` for `ready`, with room for a TCG boot (the common helper allows 30 s).
async fn wait_ready(server: &Server, name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(150);
    loop {
        let (_, status) = server
            .api("GET", &format!("/boxes/{name}/status"), None)
            .await;
        if status["status"] == "ready" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status stuck at {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A microVM outlives the server by design (that is what re-adoption is for), so a failing
/// test would leave its QEMU running after the state dir is gone: on drop, SIGKILL whatever
/// is left in the sandbox's cgroup (nothing once the test deleted it).
struct KillVmOnDrop(String);

impl Drop for KillVmOnDrop {
    fn drop(&mut self) {
        for base in [
            "/sys/fs/cgroup/pids/cordon",
            "/sys/fs/cgroup/unified/cordon",
            "/sys/fs/cgroup/cordon",
        ] {
            let procs = format!("{base}/{}/cgroup.procs", self.0);
            let Ok(listed) = std::fs::read_to_string(procs) else {
                continue;
            };
            for pid in listed.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) has no memory effects; the pid is in this test's VM cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
