//! The channel end to end over an in-memory byte stream: both yamux ends, HTTP on each stream,
//! many streams at once, a large body, and a WebSocket upgrade.

use std::convert::Infallible;

use bytes::Bytes;
use cordon_channel::{serve, AgentClient, ChannelStream};
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::Message;

/// Answers `/echo` with the request body and `/big` with 8 MiB of a known pattern; upgrades
/// `/ws` to a WebSocket that echoes text frames.
async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    match request.uri().path() {
        "/echo" => {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            Ok(Response::new(Full::new(body)))
        }
        "/big" => Ok(Response::new(Full::new(big_body()))),
        "/ws" => {
            let key = request.headers()["sec-websocket-key"].clone();
            tokio::spawn(async move {
                let upgraded = hyper::upgrade::on(request).await.unwrap();
                let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_text() {
                        socket.send(message).await.unwrap();
                    }
                }
            });
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            Ok(Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(Full::new(Bytes::new()))
                .unwrap())
        }
        _ => Ok(Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap()),
    }
}

fn big_body() -> Bytes {
    (0..8 << 20)
        .map(|i: u32| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

fn serve_stream(stream: ChannelStream) {
    tokio::spawn(async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service_fn(handle))
            .with_upgrades()
            .await;
    });
}

fn connected_pair() -> AgentClient {
    let (host_end, agent_end) = tokio::io::duplex(1 << 20);
    tokio::spawn(serve(agent_end, serve_stream));
    AgentClient::connect(host_end)
}

#[tokio::test]
async fn many_concurrent_requests_each_get_their_own_answer() {
    let client = connected_pair();
    let requests = (0..64).map(|i| {
        let client = client.clone();
        async move {
            let body = format!("request {i}");
            let request = Request::post("/echo")
                .body(Bytes::from(body.clone()))
                .unwrap();
            let response = client.request_bytes(request).await.unwrap();
            let echoed = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(echoed, body.as_bytes());
        }
    });
    futures::future::join_all(requests).await;
}

#[tokio::test]
async fn large_bodies_arrive_intact() {
    let client = connected_pair();
    let request = Request::get("/big").body(Bytes::new()).unwrap();
    let response = client.request_bytes(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, big_body());
}

#[tokio::test]
async fn websocket_upgrades_work_over_a_stream() {
    let client = connected_pair();
    let mut socket = client.websocket("/ws").await.unwrap();
    socket.send(Message::text("ping")).await.unwrap();
    let reply = socket.next().await.unwrap().unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "ping");
}

#[tokio::test]
async fn a_closed_channel_fails_cleanly() {
    let (host_end, agent_end) = tokio::io::duplex(1024);
    drop(agent_end);
    let client = AgentClient::connect(host_end);
    let request = Request::get("/echo").body(Bytes::new()).unwrap();
    assert!(client.request_bytes(request).await.is_err());
}
