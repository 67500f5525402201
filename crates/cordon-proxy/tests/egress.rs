//! The egress proxy end to end on loopback: a real proxy (TCP listener), real clients (curl,
//! and raw CONNECT lines for odd spellings curl would normalise itself), local upstreams with
//! their own CA, and a test DNS server. Each denial has a positive control showing the same
//! request succeeds when the policy allows it.

mod common;

use std::collections::HashMap;

use common::*;
use cordon_proxy::Decision;
use cordon_testkit::dns::TestDns;
use cordon_testkit::https_upstream::{HttpsUpstream, ScriptedResponse};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn secrets_are_injected_only_for_matching_requests() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    let up = HttpsUpstream::start_with_names(&["api.test"]).await;
    let port = up.addr().port();
    let mut secrets = HashMap::new();
    secrets.insert("WS_KEY".to_string(), "ws-SECRET-42".to_string());
    let proxy = start(
        &dns,
        Setup {
            config: json!({"rules": [{
                "name": "api", "match_hosts": ["api.test"], "match_paths": ["/v1/**"],
                "headers": [
                    {"name": "Authorization", "type": "opaque", "value": "Bearer sk-OPAQUE-1"},
                    {"name": "X-Ws", "type": "workspace_secret", "value": "Key {WS_KEY}"}]
            }, {
                "name": "tenant", "match_hosts": ["api.test"], "match_headers": ["x-tenant: blue"],
                "headers": [{"name": "X-Tenant-Key", "type": "plaintext", "value": "blue-key"}]
            }]}),
            roots: vec![up.ca_pem_path()],
            secrets,
            ..Setup::default()
        },
    )
    .await;

    // The tool trusts only Cordon's CA: the connection is intercepted.
    let r = curl(
        &proxy,
        &proxy.ca,
        &format!("https://api.test:{port}/v1/chat"),
        &["-H", "Authorization: Bearer dummy"],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.stderr);
    let r2 = curl(
        &proxy,
        &proxy.ca,
        &format!("https://api.test:{port}/v2/other"),
        &[],
    )
    .await;
    assert_eq!(r2.status, 200, "{}", r2.stderr);
    let r3 = curl(
        &proxy,
        &proxy.ca,
        &format!("https://api.test:{port}/v2/x"),
        &["-H", "X-Tenant: blue"],
    )
    .await;
    assert_eq!(r3.status, 200, "{}", r3.stderr);

    let reqs = up.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].header("authorization"), Some("Bearer sk-OPAQUE-1"));
    assert_eq!(reqs[0].header("x-ws"), Some("Key ws-SECRET-42"));
    assert_eq!(
        reqs[1].header("authorization"),
        None,
        "path /v2 does not match"
    );
    assert_eq!(reqs[1].header("x-ws"), None);
    assert_eq!(reqs[1].header("x-tenant-key"), None, "no x-tenant header");
    assert_eq!(reqs[2].header("x-tenant-key"), Some("blue-key"));
    assert!(reqs
        .iter()
        .all(|r| r.header("host") == Some(&format!("api.test:{port}")[..])));

    // Records name the headers, never the values; responses never carry them.
    let evs = serde_json::to_string(&events(&proxy)).unwrap();
    assert!(
        !evs.contains("sk-OPAQUE-1") && !evs.contains("ws-SECRET-42"),
        "{evs}"
    );
    assert!(evs.contains("\"header\":\"authorization\""), "{evs}");
    assert!(!r.body.contains("sk-OPAQUE") && !r.stderr.contains("sk-OPAQUE"));
    let ev = events(&proxy)
        .into_iter()
        .find(|e| e.path.as_deref() == Some("/v1/chat"))
        .unwrap();
    assert_eq!(ev.status, Some(200));
    assert_eq!(ev.bytes_down, 2);
}

#[tokio::test]
async fn missing_workspace_secret_denies_the_request() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    let up = HttpsUpstream::start_with_names(&["api.test"]).await;
    let proxy = start(&dns, Setup {
        config: json!({"rules": [{"name": "api", "match_hosts": ["api.test"],
            "headers": [{"name": "Authorization", "type": "workspace_secret", "value": "Bearer {NOT_SET}"}]}]}),
        roots: vec![up.ca_pem_path()],
        ..Setup::default()
    })
    .await;
    let r = curl(
        &proxy,
        &proxy.ca,
        &format!("https://api.test:{}/x", up.addr().port()),
        &[],
    )
    .await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("NOT_SET"), "{}", r.body);
    assert!(
        up.requests().is_empty(),
        "nothing sent without the secret, and never the literal"
    );
}

#[tokio::test]
async fn unmatched_hosts_are_spliced_not_intercepted() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    dns.set("other.test", vec![v4("127.0.0.1")]);
    let up = HttpsUpstream::start_with_names(&["api.test", "other.test"]).await;
    let port = up.addr().port();
    let proxy = start(
        &dns,
        Setup {
            config: json!({"rules": [{"name": "api", "match_hosts": ["api.test"],
            "headers": [{"name": "X-K", "type": "plaintext", "value": "v"}]}]}),
            roots: vec![up.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    // Spliced: the tool sees the upstream's own certificate.
    let r = curl(
        &proxy,
        &up.ca_pem_path(),
        &format!("https://other.test:{port}/"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.stderr);
    let r = curl(
        &proxy,
        &proxy.ca,
        &format!("https://other.test:{port}/"),
        &[],
    )
    .await;
    assert_eq!(r.status, 0, "Cordon's CA must not verify a spliced host");
    // Control: the matched host is intercepted, so the upstream's CA alone fails there.
    let r = curl(
        &proxy,
        &up.ca_pem_path(),
        &format!("https://api.test:{port}/"),
        &[],
    )
    .await;
    assert_eq!(r.status, 0);
    let r = curl(&proxy, &proxy.ca, &format!("https://api.test:{port}/"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.stderr);
    let tunnel = events(&proxy)
        .into_iter()
        .find(|e| e.host == "other.test" && e.status == Some(200))
        .unwrap();
    assert!(tunnel.bytes_up > 0 && tunnel.bytes_down > 0);
}

#[tokio::test]
async fn internal_addresses_are_refused_unless_a_cidr_allows_them() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    let up = HttpsUpstream::start_with_names(&["api.test"]).await;
    let url = format!("https://api.test:{}/", up.addr().port());
    let denied = start(
        &dns,
        Setup {
            cidrs: &[],
            roots: vec![up.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    let r = curl(&denied, &up.ca_pem_path(), &url, &[]).await;
    assert_ne!(r.status, 200);
    assert!(r.stderr.contains("403"), "{}", r.stderr);
    let plain = raw(
        &denied,
        &format!(
            "GET http://api.test:{}/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
            up.addr().port()
        ),
    )
    .await;
    assert_eq!(plain, 403);
    assert!(up.requests().is_empty());
    let ev = events(&denied);
    assert!(ev.iter().all(|e| e.decision == Decision::Denied));
    assert!(
        ev[0].reason.as_deref().unwrap().contains("loopback"),
        "{:?}",
        ev[0].reason
    );
    // Positive control: the same request with the range allowed.
    let allowed = start(
        &dns,
        Setup {
            cidrs: &["127.0.0.1/32"],
            roots: vec![up.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    assert_eq!(
        curl(&allowed, &up.ca_pem_path(), &url, &[]).await.status,
        200
    );
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn metadata_private_ranges_and_ip_literal_spellings_are_refused() {
    let dns = TestDns::start().await;
    let up = HttpsUpstream::start_plain().await;
    let port = up.addr().port();
    // Only 127.0.0.2 is allowed: every spelling of 127.0.0.1 must be refused.
    let proxy = start(
        &dns,
        Setup {
            cidrs: &["127.0.0.2/32"],
            ..Setup::default()
        },
    )
    .await;
    let spellings = [
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.1",
        "127.0.0.1",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::1]",
        "0.0.0.0",
        "0",
        "localhost",
        "localhost.",
        "LOCALHOST",
        "[::]",
    ];
    for host in spellings {
        assert_eq!(
            raw_connect(&proxy, &format!("{host}:{port}")).await,
            403,
            "CONNECT {host}"
        );
        let get = format!("GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}\r\n\r\n");
        assert_eq!(raw(&proxy, &get).await, 403, "GET {host}");
    }
    for target in [
        "169.254.169.254:80",
        "[fd00:ec2::254]:80",
        "100.100.100.200:80",
        "169.254.170.2:80",
        "10.0.0.1:443",
        "172.16.0.1:443",
        "192.168.1.1:443",
        "100.64.0.1:443",
        "[fe80::1]:443",
        "[fc00::1]:443",
        "224.0.0.1:80",
        "[::ffff:169.254.169.254]:80",
        "metadata.google.internal:80",
    ] {
        let status = raw_connect(&proxy, target).await;
        assert!(status == 403 || status == 502, "CONNECT {target}: {status}");
    }
    dns.set("metadata.google.internal", vec![v4("169.254.169.254")]);
    assert_eq!(
        raw_connect(&proxy, "metadata.google.internal:80").await,
        403
    );
    assert!(
        up.requests().is_empty(),
        "the upstream on 127.0.0.1 saw nothing"
    );

    // Positive control: with 127.0.0.1 allowed, the numeric spellings reach it (they are
    // normalised to the same address, not refused as strings).
    let open = start(
        &dns,
        Setup {
            cidrs: &["127.0.0.1/32"],
            ..Setup::default()
        },
    )
    .await;
    for host in ["2130706433", "0x7f000001", "0177.0.0.1", "127.1"] {
        let get = format!("GET http://{host}:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(raw(&open, &get).await, 200, "GET {host}");
    }
    assert_eq!(up.requests().len(), 4);
}

#[tokio::test]
async fn dns_rebinding_cannot_move_a_connection_to_a_checked_name() {
    let dns = TestDns::start().await;
    let up = HttpsUpstream::start_with_names(&["rebind.test"]).await;
    let port = up.addr().port();
    // The first answer (127.0.0.2) is allowed; every later one is 127.0.0.1, which is not.
    dns.rebind("rebind.test", v4("127.0.0.2"), v4("127.0.0.1"));
    let pinned = TcpListener::bind(("127.0.0.2", port)).await.unwrap();
    let proxy = start(
        &dns,
        Setup {
            cidrs: &["127.0.0.2/32"],
            config: json!({"rules": [{"name": "r", "match_hosts": ["rebind.test"],
            "headers": [{"name": "X-K", "type": "opaque", "value": "secret"}]}]}),
            roots: vec![up.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    let accepted = tokio::spawn(async move {
        let (s, _) = pinned.accept().await.unwrap();
        drop(s);
        1
    });
    let _ = raw_connect(&proxy, &format!("rebind.test:{port}")).await;
    assert_eq!(
        accepted.await.unwrap(),
        1,
        "the proxy connected to the address it checked"
    );
    // A second connection resolves afresh, gets 127.0.0.1 and is refused.
    assert_eq!(
        raw_connect(&proxy, &format!("rebind.test:{port}")).await,
        403
    );
    assert!(
        up.requests().is_empty(),
        "the upstream on 127.0.0.1 must see nothing"
    );
    assert!(dns.queries("rebind.test") >= 2);
}

#[tokio::test]
async fn redirects_to_internal_addresses_are_not_followed() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    let up = HttpsUpstream::start_with_names(&["api.test"]).await;
    up.script(
        "/go",
        ScriptedResponse::redirect("http://169.254.169.254/latest/meta-data/"),
    );
    let proxy = start(
        &dns,
        Setup {
            cidrs: &["127.0.0.1/32"],
            config: json!({"rules": [{"name": "r", "match_hosts": ["api.test"],
            "headers": [{"name": "X-K", "type": "opaque", "value": "secret"}]}]}),
            roots: vec![up.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    let url = format!("https://api.test:{}/go", up.addr().port());
    let r = curl(&proxy, &proxy.ca, &url, &[]).await;
    assert_eq!(r.status, 302, "the 3xx is passed through: {}", r.stderr);
    assert_eq!(up.requests().len(), 1);
    // A tool that follows it makes a new request, checked afresh: refused.
    let r = curl(&proxy, &proxy.ca, &url, &["-L"]).await;
    assert_eq!(r.status, 403, "{}", r.stderr);
    let evs = events(&proxy);
    assert!(evs
        .iter()
        .any(|e| e.host == "169.254.169.254" && e.decision == Decision::Denied));
}

#[tokio::test]
async fn allow_and_deny_lists_with_regex_and_cidr() {
    let dns = TestDns::start().await;
    for n in ["ok1.test", "ok2.test", "nope.test", "bad.test"] {
        dns.set(n, vec![v4("127.0.0.1")]);
    }
    let up = HttpsUpstream::start_plain().await;
    let port = up.addr().port();
    let get = |h: &str| format!("GET http://{h}:{port}/ HTTP/1.1\r\nHost: {h}\r\n\r\n");
    let lists = start(&dns, Setup {
        config: json!({"access_control": {"allow_list": ["~^ok\\d\\.test$", "bad.test"], "deny_list": ["bad.test", "ok2.test"]}}),
        ..Setup::default()
    })
    .await;
    assert_eq!(raw(&lists, &get("ok1.test")).await, 200);
    assert_eq!(raw(&lists, &get("ok2.test")).await, 403, "deny wins");
    assert_eq!(
        raw(&lists, &get("nope.test")).await,
        403,
        "not in the allow list"
    );
    assert_eq!(raw(&lists, &get("bad.test")).await, 403);
    let by_cidr = start(&dns, Setup {
        config: json!({"access_control": {"allow_list": ["127.0.0.0/24"], "deny_list": ["127.0.0.1"]}}),
        ..Setup::default()
    })
    .await;
    assert_eq!(
        raw(&by_cidr, &get("nope.test")).await,
        403,
        "denied by resolved IP"
    );
    let by_cidr = start(
        &dns,
        Setup {
            config: json!({"access_control": {"allow_list": ["127.0.0.0/24"]}}),
            ..Setup::default()
        },
    )
    .await;
    assert_eq!(
        raw(&by_cidr, &get("nope.test")).await,
        200,
        "allowed by resolved IP"
    );
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn raw_tcp_needs_an_entry_naming_the_port() {
    let dns = TestDns::start().await;
    dns.set("db.test", vec![v4("127.0.0.1")]);
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let closed = start(
        &dns,
        Setup {
            default_ports: vec![80, 443],
            ..Setup::default()
        },
    )
    .await;
    assert_eq!(raw_connect(&closed, &format!("db.test:{port}")).await, 403);
    let open = start(
        &dns,
        Setup {
            default_ports: vec![80, 443],
            config: json!({"access_control": {"allow_list": [format!("db.test:{port}")]}}),
            ..Setup::default()
        },
    )
    .await;
    let mut s = TcpStream::connect(("127.0.0.1", open.port)).await.unwrap();
    s.write_all(format!("CONNECT db.test:{port} HTTP/1.1\r\nHost: db.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.write_all(b"\x00\x01raw bytes").await.unwrap();
    let mut echoed = [0u8; 11];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"\x00\x01raw bytes");
}

#[tokio::test]
async fn plain_http_to_a_matched_host_is_refused_and_others_pass_with_keep_alive() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    dns.set("other.test", vec![v4("127.0.0.1")]);
    let up = HttpsUpstream::start_plain().await;
    let port = up.addr().port();
    let proxy = start(
        &dns,
        Setup {
            config: json!({"rules": [{"name": "api", "match_hosts": ["api.test"],
            "headers": [{"name": "X-Api-Key", "type": "opaque", "value": "plain-SECRET"}]}]}),
            ..Setup::default()
        },
    )
    .await;
    // Two requests on one kept-alive connection, to two hosts: each is checked on its own.
    // The rule-matched host is refused (credentials only go over TLS); the other passes
    // untouched, which shows the refusal is the rule's and not a broken setup.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    for (host, status) in [("api.test", "HTTP/1.1 403"), ("other.test", "HTTP/1.1 200")] {
        let req = format!(
            "GET http://{host}:{port}/p HTTP/1.1\r\nHost: {host}\r\nX-Api-Key: dummy\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with(status), "{host}: {text}");
        assert!(!text.contains("plain-SECRET"));
        if host == "api.test" {
            assert!(text.contains("use https"), "{text}");
        }
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1, "only the unmatched host was reached");
    assert_eq!(
        reqs[0].header("x-api-key"),
        Some("dummy"),
        "other hosts get what the tool sent"
    );
    assert_eq!(reqs[0].path, "/p", "origin-form upstream");
}

#[tokio::test]
async fn the_ca_is_created_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let first = cordon_proxy::CertificateAuthority::load_or_create(&cert, &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = cordon_proxy::CertificateAuthority::load_or_create(&cert, &key).unwrap();
    assert_eq!(first.cert_pem(), again.cert_pem());
    std::fs::remove_file(&key).unwrap();
    let err = cordon_proxy::CertificateAuthority::load_or_create(&cert, &key).unwrap_err();
    assert!(err.to_string().contains("key is missing"), "{err}");
}

#[tokio::test]
async fn connections_per_sandbox_are_bounded() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    let up = HttpsUpstream::start_plain().await;
    let port = up.addr().port();
    let proxy = start(
        &dns,
        Setup {
            max_connections: 2,
            ..Setup::default()
        },
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        s.write_all(
            format!("CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    assert_eq!(raw_connect(&proxy, &format!("api.test:{port}")).await, 429);
    drop(held);
    // Freed slots are usable again.
    let mut ok = false;
    for _ in 0..50 {
        if raw_connect(&proxy, &format!("api.test:{port}")).await == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "a closed connection gives its slot back");
}

#[tokio::test]
async fn large_bodies_stream_through_every_mode() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    dns.set("other.test", vec![v4("127.0.0.1")]);
    let big = vec![b'x'; 3 << 20];
    let tls = HttpsUpstream::start_with_names(&["api.test", "other.test"]).await;
    let plain = HttpsUpstream::start_plain().await;
    for up in [&tls, &plain] {
        up.script(
            "/big",
            ScriptedResponse {
                status: 200,
                headers: vec![],
                body: big.clone(),
            },
        );
    }
    let proxy = start(
        &dns,
        Setup {
            config: json!({"rules": [{"name": "api", "match_hosts": ["api.test"],
                "headers": [{"name": "X-K", "type": "opaque", "value": "v"}]}]}),
            roots: vec![tls.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    let upload = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(upload.path(), vec![b'y'; 2 << 20]).unwrap();
    let data = format!("@{}", upload.path().display());
    let cases = [
        (
            format!("https://api.test:{}/big", tls.addr().port()),
            proxy.ca.clone(),
        ),
        (
            format!("https://other.test:{}/big", tls.addr().port()),
            tls.ca_pem_path(),
        ),
        // Plain HTTP goes to an unmatched host: matched ones are reached over TLS only.
        (
            format!("http://other.test:{}/big", plain.addr().port()),
            proxy.ca.clone(),
        ),
    ];
    for (url, ca) in &cases {
        let r = curl(&proxy, ca, url, &["--data-binary", &data]).await;
        assert_eq!(r.status, 200, "{url}: {}", r.stderr);
        assert_eq!(r.body.len(), big.len(), "{url}");
    }
    for up in [&tls, &plain] {
        assert!(up.requests().iter().all(|r| r.body.len() == 2 << 20));
    }
    let evs = events(&proxy);
    let intercepted = evs
        .iter()
        .find(|e| e.host == "api.test" && e.port == tls.addr().port())
        .unwrap();
    assert_eq!(intercepted.bytes_up, 2 << 20);
    assert_eq!(intercepted.bytes_down, 3 << 20);
}

/// Reads an HTTP response head (up to the blank line) byte by byte, so nothing after it is
/// consumed.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "connection closed in the head"
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

async fn upgrade_and_echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    request_target: &str,
    host: &str,
) {
    let req = format!(
        "GET {request_target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    s.write_all(b"frames both ways").await.unwrap();
    let mut echoed = [0u8; 16];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"frames both ways");
}

#[tokio::test]
async fn websocket_upgrades_pass_with_credentials() {
    let dns = TestDns::start().await;
    dns.set("api.test", vec![v4("127.0.0.1")]);
    dns.set("other.test", vec![v4("127.0.0.1")]);
    let tls_up = HttpsUpstream::start_with_names(&["api.test"]).await;
    let plain_up = HttpsUpstream::start_plain().await;
    for up in [&tls_up, &plain_up] {
        up.script("/ws", ScriptedResponse::upgrade_echo());
    }
    let proxy = start(
        &dns,
        Setup {
            config: json!({"rules": [{"name": "api", "match_hosts": ["api.test"],
                "headers": [{"name": "Authorization", "type": "opaque", "value": "Bearer ws-SECRET"}]}]}),
            roots: vec![tls_up.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;

    // Plain HTTP, absolute form, to an unmatched host (matched ones get TLS only).
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let port = plain_up.addr().port();
    upgrade_and_echo(
        &mut s,
        &format!("http://other.test:{port}/ws"),
        "other.test",
    )
    .await;

    // Intercepted: CONNECT, TLS with Cordon's CA, then the handshake.
    let port = tls_up.addr().port();
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(format!("CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&proxy.ca).unwrap();
    for cert in pem_certs(&ca) {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, s)
        .await
        .unwrap();
    upgrade_and_echo(&mut tls, "/ws", "api.test").await;

    let plain = plain_up.requests();
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].header("authorization"), None);
    let intercepted = tls_up.requests();
    assert_eq!(intercepted.len(), 1);
    assert_eq!(
        intercepted[0].header("authorization"),
        Some("Bearer ws-SECRET")
    );
}

fn pem_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[tokio::test]
async fn default_settings_start_with_system_roots_and_resolver() {
    let dir = tempfile::tempdir().unwrap();
    let settings =
        cordon_proxy::ProxySettings::new(dir.path().join("ca.pem"), dir.path().join("ca.key"));
    assert_eq!(settings.default_ports, vec![80, 443]);
    assert!(settings.allowed_cidrs.is_empty());
    let proxy = cordon_proxy::EgressProxy::new(settings).unwrap();
    assert!(proxy
        .ca_cert_pem()
        .starts_with("-----BEGIN CERTIFICATE-----"));
}
