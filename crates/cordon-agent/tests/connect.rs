//! `GET /_cordon/connect/{port}` (host-only), against the agent as PID 1 of a real sandbox: the
//! agent's own allow rule (the server checks it too, so it is tested here without the server),
//! dial failures, and a connection's bytes and half-close.

mod common;

use std::time::Duration;

use common::*;
use cordon_api::tunnel::{connect_path, CONNECT_UPGRADE, EGRESS_RELAY_PORT};
use http::{header, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO_PORT: u16 = 7007;

#[tokio::test(flavor = "multi_thread")]
async fn connects_to_loopback_ports_but_not_reserved_ones() {
    let agent = connect_agent().await;
    // Echo servers on an ordinary port and on Cordon's reserved one (the positive control:
    // something listens there, so its refusal is the rule's doing).
    for port in [ECHO_PORT, EGRESS_RELAY_PORT] {
        agent
            .sh(&format!(
                "nc -ll -p {port} -e cat >/dev/null 2>&1 </dev/null &"
            ))
            .await;
    }
    wait_listening(&agent, &[ECHO_PORT, EGRESS_RELAY_PORT]).await;

    let mut response = connect(&agent, &connect_path(ECHO_PORT)).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut tcp = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
    tcp.write_all(b"through the agent\n").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut echoed))
        .await
        .expect("the echo ends after our half-close")
        .unwrap();
    assert_eq!(echoed, b"through the agent\n");

    for (path, want) in [
        (connect_path(EGRESS_RELAY_PORT), StatusCode::FORBIDDEN),
        (connect_path(0), StatusCode::FORBIDDEN),
        (connect_path(7999), StatusCode::BAD_GATEWAY),
        (
            "/_cordon/connect/65536".to_string(),
            StatusCode::BAD_REQUEST,
        ),
        ("/_cordon/connect/x".to_string(), StatusCode::BAD_REQUEST),
    ] {
        let response = connect(&agent, &path).await;
        assert_eq!(response.status(), want, "{path}");
    }

    // Without the upgrade headers there is nothing to hand the connection to.
    let (status, _) = agent
        .request_raw("GET", &connect_path(ECHO_PORT), Default::default())
        .await;
    assert_eq!(status, 400);
}

async fn connect(agent: &Agent, path: &str) -> http::Response<hyper::body::Incoming> {
    let request = Request::get(path)
        .header(header::HOST, "agent")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, CONNECT_UPGRADE)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    agent.client.request(request).await.expect("agent request")
}

async fn wait_listening(agent: &Agent, ports: &[u16]) {
    for port in ports {
        let script = format!(
            "for i in $(seq 100); do \
             grep -qE ':{port:04X} 0+:0000 0A' /proc/net/tcp /proc/net/tcp6 && exit 0; \
             sleep 0.1; done; exit 1"
        );
        let result = agent.exec(&script).await;
        assert_eq!(
            result.exit_code, 0,
            "port {port} never listened: {result:?}"
        );
    }
}
