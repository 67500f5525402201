//! `POST /execute/stream/start|resume` (spec §3.4): one-way output as server-sent events.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use cordon_api::error::kinds;
use cordon_api::exec::{ExecuteRequest, ReconnectRequest, Stream};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

use super::session::{Cursors, SseNext};
use super::{Attachment, ExecError, Outcome};
use crate::AppState;

/// The spec asks for some line at least every 15 s; the client gives up after 60 s.
const KEEPALIVE: Duration = Duration::from_secs(10);

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ExecError> {
    serde_json::from_slice(body)
        .map_err(|error| ExecError::InvalidRequest(format!("invalid request: {error}")))
}

pub async fn start(State(state): State<AppState>, body: Bytes) -> Response {
    let mut request: ExecuteRequest = match parse(&body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    // SSE is one-way: no input, no terminal, and the client cannot ask for a kill.
    request.close_stdin = true;
    request.pty = false;
    request.kill_on_disconnect = false;
    match state.commands.execute(&request, &state.config.get()) {
        Ok(session) => event_stream(session.attach([0, 0]), Cursors::default(), [0, 0]),
        Err(error) => error.into_response(),
    }
}

pub async fn resume(State(state): State<AppState>, body: Bytes) -> Response {
    let request: ReconnectRequest = match parse(&body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    match state.commands.find(&request.command_id) {
        Ok(session) => {
            // The offsets acknowledge everything below them.
            let offsets = [request.stdout_offset, request.stderr_offset];
            event_stream(
                session.attach(offsets),
                Cursors::from_offsets(offsets),
                offsets,
            )
        }
        Err(error) => error.into_response(),
    }
}

fn event_stream(attachment: Attachment, cursors: Cursors, acked: [u64; 2]) -> Response {
    let (events, receiver) = mpsc::channel::<Bytes>(2);
    tokio::spawn(produce_events(attachment, cursors, acked, events));
    let body = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), receiver))
    });
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, "text/event-stream")
        .header(http::header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_default()
}

fn event(name: &str, data: serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// Writes events until the command finished, the buffer needs an acknowledgement, or the
/// client went away.
async fn produce_events(
    attachment: Attachment,
    mut cursors: Cursors,
    acked: [u64; 2],
    events: mpsc::Sender<Bytes>,
) {
    let session = attachment.session();
    let started = event(
        "started",
        json!({"command_id": session.id, "pid": session.pid}),
    );
    if events.send(started).await.is_err() {
        return;
    }
    let mut changes = session.subscribe_output();
    loop {
        changes.borrow_and_update();
        let mut awaiting_ack = None;
        let (next, last) = match session.next_raw(&mut cursors, acked) {
            SseNext::Output(stream, offset, bytes) => {
                let data = base64::engine::general_purpose::STANDARD.encode(bytes);
                (
                    event(stream_name(stream), json!({"offset": offset, "data": data})),
                    false,
                )
            }
            SseNext::StreamEnd(stream, offset) => (
                event(
                    "stream_end",
                    json!({"stream": stream_name(stream), "offset": offset}),
                ),
                false,
            ),
            SseNext::Finished(Outcome::Exited(code)) => {
                (event("exit", json!({"exit_code": code})), true)
            }
            SseNext::Finished(Outcome::TimedOut) => {
                let error = session.timeout_message();
                (
                    event(
                        "error",
                        json!({"error_type": kinds::COMMAND_TIMEOUT, "error": error}),
                    ),
                    true,
                )
            }
            SseNext::AckRequired([stdout, stderr]) => {
                awaiting_ack = Some([stdout, stderr]);
                (
                    event(
                        "ack_required",
                        json!({"stdout_offset": stdout, "stderr_offset": stderr}),
                    ),
                    true,
                )
            }
            SseNext::Wait => {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return } else { continue },
                    _ = tokio::time::sleep(KEEPALIVE) => (Bytes::from_static(b": keepalive\n\n"), false),
                    _ = events.closed() => return,
                }
            }
        };
        if events.send(next).await.is_err() {
            return;
        }
        if let Some(resume_at) = awaiting_ack {
            attachment.detach_awaiting_ack(resume_at);
            return;
        }
        if last {
            return;
        }
    }
}
