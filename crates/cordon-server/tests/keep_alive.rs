//! One keep-alive connection carries a client's whole sequence (a data-plane upload, then stop,
//! start and status on the control plane): the official clients pool connections, and a server
//! that closes one after answering (say, because a request body was not read to its end) makes
//! the next call sent on it fail with "Server disconnected without sending a response".
//!
//! Needs root, the static agent (`make agent`) and the default snapshot (`cordon prepare`).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{multipart_file, Server, KEY};
use cordon_testkit::TestStateDir;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// Not a test: the server process of [`Server::start`] (does nothing when run directly).
#[test]
#[ignore]
fn serve_child() {
    common::serve_child_main();
}

const JSON: &str = "application/json";

#[tokio::test]
async fn one_connection_carries_upload_stop_start_and_status() {
    let data = TestStateDir::new();
    let server = Server::start(data.path()).await;
    let sandbox = server.create(json!({"name": "kept"})).await;
    let dp_path = sandbox["dataplane_url"]
        .as_str()
        .and_then(|url| url.split_once("/dp/"))
        .map(|(_, rest)| format!("/dp/{rest}"))
        .expect("dataplane_url");
    let api = |action: &str| format!("/api/v2/sandboxes/boxes/kept/{action}");

    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);

    let (upload_type, upload) = multipart_file(b"kept");
    let calls = [
        (
            "POST",
            format!("{dp_path}/upload?path=%2Fhome%2Fuser%2Fkept.txt"),
            upload_type,
            upload,
        ),
        ("POST", api("stop"), JSON.to_string(), Bytes::from("{}")),
        ("POST", api("start"), JSON.to_string(), Bytes::from("{}")),
        ("GET", api("status"), JSON.to_string(), Bytes::new()),
    ];
    for (method, path, content_type, body) in calls {
        // A close that follows an answer arrives a moment later; wait that moment so the check
        // does not depend on winning a race.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !sender.is_closed(),
            "the server closed the connection before {method} {path}"
        );
        let request = http::Request::builder()
            .method(method)
            .uri(&path)
            .header("host", format!("127.0.0.1:{}", server.port))
            .header("x-api-key", KEY)
            .header("content-type", content_type)
            .body(Full::new(body))
            .expect("request");
        let response = sender
            .send_request(request)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} on the kept-alive connection: {e}"));
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert!(status.is_success(), "{method} {path}: {status} {bytes:?}");
    }
}

/// httpx (under the official Python client) writes the headers and the body of a request in two
/// writes; a handler that answers before the body arrived must not cost the connection.
#[tokio::test]
async fn a_body_sent_after_the_headers_keeps_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let data = TestStateDir::new();
    let server = Server::start(data.path()).await;
    server.create(json!({"name": "later"})).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    for action in ["stop", "start", "start"] {
        let head = format!(
            "POST /api/v2/sandboxes/boxes/later/{action} HTTP/1.1\r\nhost: 127.0.0.1\r\n\
             x-api-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("headers");
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(b"{}").await.expect("body");
        let answer = read_one_response(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 2"),
            "{action} on the kept-alive connection: {answer:?}"
        );
    }

    async fn read_one_response(stream: &mut tokio::net::TcpStream) -> String {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // Small answers: the status line, headers and a short JSON body arrive together; a
        // closed connection reads as an empty answer.
        while !ends_a_response(&answer) {
            match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    fn ends_a_response(answer: &[u8]) -> bool {
        let text = String::from_utf8_lossy(answer);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        body.len() >= length
    }
}
