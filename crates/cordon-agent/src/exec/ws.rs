//! `GET /execute/ws` (spec §3.3): one WebSocket is one client attached to one command.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use cordon_api::error::kinds;
use cordon_api::exec::{ClientMessage, ServerMessage, Stream};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};

use super::session::{Cursors, Next};
use super::{Attachment, ExecError, Outcome, Session};
use crate::AppState;

/// Largest client message: deepagents sends commands of 70 KB and more (spec §3.3.2).
const MAX_INCOMING_MESSAGE: usize = 32 << 20;
const MAX_INCOMING_FRAME: usize = 16 << 20;
/// How long a client may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Input received but not yet written to stdin; past this we stop reading the socket.
const MAX_QUEUED_INPUT: usize = 32 << 20;

pub async fn upgrade(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_INCOMING_MESSAGE)
        .max_frame_size(MAX_INCOMING_FRAME)
        .on_upgrade(move |socket| serve(socket, state))
}

/// A terminal `error` message: type and text.
struct Rejection {
    kind: &'static str,
    message: String,
}

impl Rejection {
    fn invalid(message: impl Into<String>) -> Self {
        Rejection {
            kind: kinds::INVALID_REQUEST,
            message: message.into(),
        }
    }
}

impl From<ExecError> for Rejection {
    fn from(error: ExecError) -> Self {
        Rejection {
            kind: error.kind(),
            message: error.to_string(),
        }
    }
}

/// How the output side of an attachment ended.
enum End {
    Finished(Outcome),
    Rejected(Rejection),
    ClientGone,
}

async fn serve(mut socket: WebSocket, state: AppState) {
    let (attachment, mut cursors) = match attach(&mut socket, &state).await {
        Ok(Some(attached)) => attached,
        Ok(None) => return,
        Err(rejection) => {
            let _ = send_rejection(&mut socket, &rejection).await;
            let _ = close(&mut socket).await;
            return;
        }
    };
    let session = attachment.session().clone();
    let started = ServerMessage::Started {
        command_id: session.id.clone(),
        pid: i64::from(session.pid),
    };
    if send(&mut socket, &started).await.is_err() {
        return;
    }
    let (mut sink, stream) = socket.split();
    let end = tokio::select! {
        rejection = read_controls(stream, &session) => match rejection {
            Some(rejection) => End::Rejected(rejection),
            None => End::ClientGone,
        },
        sent = send_output(&mut sink, &attachment, &mut cursors) => match sent {
            Ok(outcome) => End::Finished(outcome),
            Err(_) => End::ClientGone,
        },
    };
    let last = match end {
        End::Finished(Outcome::Exited(exit_code)) => ServerMessage::Exit { exit_code },
        End::Finished(Outcome::TimedOut) => ServerMessage::Error {
            error_type: kinds::COMMAND_TIMEOUT.to_string(),
            error: session.timeout_message(),
        },
        End::Rejected(rejection) => rejection_message(&rejection),
        End::ClientGone => return,
    };
    if send(&mut sink, &last).await.is_ok() {
        let _ = close(&mut sink).await;
    }
}

/// Reads the first message and attaches: `Ok(None)` when the client left first.
async fn attach(
    socket: &mut WebSocket,
    state: &AppState,
) -> Result<Option<(Attachment, Cursors)>, Rejection> {
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, first_text(socket))
        .await
        .map_err(|_| Rejection::invalid("no execute or reconnect message received in time"))??;
    let Some(first) = first else { return Ok(None) };
    let message: ClientMessage = serde_json::from_str(&first)
        .map_err(|error| Rejection::invalid(format!("invalid message: {error}")))?;
    match message {
        ClientMessage::Execute(request) => {
            let session = state.commands.execute(&request, &state.config.get())?;
            Ok(Some((session.attach([0, 0]), Cursors::default())))
        }
        ClientMessage::Reconnect(request) => {
            let session = state.commands.find(&request.command_id)?;
            let offsets = [request.stdout_offset, request.stderr_offset];
            Ok(Some((
                session.attach(offsets),
                Cursors::from_offsets(offsets),
            )))
        }
        _ => Err(Rejection::invalid(
            "the first message must be execute or reconnect",
        )),
    }
}

/// The first text message, skipping pings; `None` if the client closed first.
async fn first_text(socket: &mut WebSocket) -> Result<Option<String>, Rejection> {
    loop {
        match socket.recv().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(Message::Text(text))) => return Ok(Some(text.to_string())),
            Some(Ok(Message::Binary(_))) => {
                return Err(Rejection::invalid("messages must be text frames"))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
        }
    }
}

/// Streams output until the command finished and the client has every byte.
async fn send_output(
    sink: &mut SplitSink<WebSocket, Message>,
    attachment: &Attachment,
    cursors: &mut Cursors,
) -> Result<Outcome, axum::Error> {
    let session = attachment.session();
    let mut changes = session.subscribe_output();
    loop {
        changes.borrow_and_update();
        match session.next_text(cursors) {
            Next::Output(stream, chunk) => {
                let message = match stream {
                    Stream::Stdout => ServerMessage::Stdout {
                        data: chunk.data,
                        offset: chunk.offset,
                    },
                    Stream::Stderr => ServerMessage::Stderr {
                        data: chunk.data,
                        offset: chunk.offset,
                    },
                };
                send(sink, &message).await?;
                attachment.release_below(stream, chunk.next);
            }
            Next::Finished(outcome) => return Ok(outcome),
            Next::Wait => {
                if changes.changed().await.is_err() {
                    return Ok(Outcome::Exited(-1));
                }
            }
        }
    }
}

enum StdinOp {
    Write(String),
    Close,
}

type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

fn apply(session: &Arc<Session>, op: StdinOp) -> Pending {
    let session = session.clone();
    Box::pin(async move {
        match op {
            StdinOp::Write(data) => session.write_input(data.as_bytes()).await,
            StdinOp::Close => session.close_input().await,
        }
    })
}

/// Handles control messages until the client goes (`None`) or breaks the protocol. Every
/// message is read and acted on in order, so a `kill` right before a close still kills; stdin
/// writes run beside the reading so a full pipe never delays a `kill`.
async fn read_controls(
    mut stream: SplitStream<WebSocket>,
    session: &Arc<Session>,
) -> Option<Rejection> {
    let mut queue: VecDeque<StdinOp> = VecDeque::new();
    let mut queued_bytes = 0usize;
    let mut writing: Option<Pending> = None;
    let rejection = loop {
        if writing.is_none() {
            if let Some(op) = queue.pop_front() {
                if let StdinOp::Write(data) = &op {
                    queued_bytes -= data.len();
                }
                writing = Some(apply(session, op));
            }
        }
        tokio::select! {
            () = finish_write(&mut writing), if writing.is_some() => writing = None,
            message = stream.next(), if queued_bytes < MAX_QUEUED_INPUT => {
                let text = match message {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Binary(_))) => break Some(Rejection::invalid("messages must be text frames")),
                    Some(Ok(Message::Text(text))) => text,
                };
                match serde_json::from_str::<ClientMessage>(&text) {
                    Ok(ClientMessage::Input { data }) => {
                        queued_bytes += data.len();
                        queue.push_back(StdinOp::Write(data));
                    }
                    Ok(ClientMessage::CloseStdin) => queue.push_back(StdinOp::Close),
                    Ok(ClientMessage::Kill) => session.kill(),
                    Ok(ClientMessage::Execute(_) | ClientMessage::Reconnect(_)) => {
                        break Some(Rejection::invalid("the command is already attached"))
                    }
                    Err(error) => break Some(Rejection::invalid(format!("invalid message: {error}"))),
                }
            }
        }
    };
    finish_stdin_in_background(session, writing, queue);
    rejection
}

/// Completes the stdin write in progress (never resolves when there is none).
async fn finish_write(writing: &mut Option<Pending>) {
    match writing.as_mut() {
        Some(write) => write.await,
        None => std::future::pending().await,
    }
}

/// Input the client sent before leaving still reaches the command, in order.
fn finish_stdin_in_background(
    session: &Arc<Session>,
    writing: Option<Pending>,
    queue: VecDeque<StdinOp>,
) {
    if writing.is_none() && queue.is_empty() {
        return;
    }
    let session = session.clone();
    tokio::spawn(async move {
        if let Some(writing) = writing {
            writing.await;
        }
        for op in queue {
            apply(&session, op).await;
        }
    });
}

fn rejection_message(rejection: &Rejection) -> ServerMessage {
    ServerMessage::Error {
        error_type: rejection.kind.to_string(),
        error: rejection.message.clone(),
    }
}

async fn send_rejection<S>(sink: &mut S, rejection: &Rejection) -> Result<(), axum::Error>
where
    S: futures::Sink<Message, Error = axum::Error> + Unpin,
{
    send(sink, &rejection_message(rejection)).await
}

async fn send<S>(sink: &mut S, message: &ServerMessage) -> Result<(), axum::Error>
where
    S: futures::Sink<Message, Error = axum::Error> + Unpin,
{
    let text = serde_json::to_string(message).map_err(axum::Error::new)?;
    sink.send(Message::Text(text.into())).await
}

async fn close<S>(sink: &mut S) -> Result<(), axum::Error>
where
    S: futures::Sink<Message, Error = axum::Error> + Unpin,
{
    let frame = CloseFrame {
        code: close_code::NORMAL,
        reason: "".into(),
    };
    sink.send(Message::Close(Some(frame))).await
}
