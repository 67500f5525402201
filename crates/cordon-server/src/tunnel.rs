//! `GET /dp/{id}/tunnel` (spec §4): TCP tunnels into a sandbox for the Python client's
//! `sb.tunnel()`.
//!
//! The server terminates the WebSocket and treats its messages, binary or text, as one byte
//! stream ([`WsBytes`]), over which it runs a yamux server (the `yamux` crate, 256 KiB initial
//! windows, window updates as data is consumed, pings answered, go-away ends the session). It
//! never opens streams. Each stream the client opens starts with a connect header (version
//! `0x01`, port big-endian); the server answers one status byte (`ConnectStatus`) and, on
//! success, splices the stream with a connection from [`port_forward::connect`].

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use cordon_api::tunnel::{ConnectStatus, PROTOCOL_VERSION};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::error::ApiError;
use crate::port_forward::{self, PortError};
use crate::{dataplane, App, Workspace};

/// Most streams (TCP connections) open at once on one tunnel; more are reset.
pub(crate) const MAX_STREAMS_PER_TUNNEL: usize = 256;
/// Most tunnels open at once to one sandbox; another upgrade gets 429. Each tunnel's yamux
/// session may buffer up to its connection receive window, so this bounds what one sandbox's
/// tunnels can hold in the server's memory.
pub(crate) const MAX_TUNNELS_PER_SANDBOX: usize = 8;
/// Streams yamux itself tolerates beyond [`MAX_STREAMS_PER_TUNNEL`]: the ones we reset linger
/// in its table until collected, and past its limit it ends the whole session.
const YAMUX_STREAM_HEADROOM: usize = MAX_STREAMS_PER_TUNNEL / 8;
/// Largest WebSocket message the server sends (spec §4.2: ≤ 1 MiB).
const MAX_OUTBOUND_MESSAGE: usize = 1 << 20;
/// Largest message accepted: the client writes one yamux frame per message, and yamux frames
/// carry at most 1 MiB.
const MAX_INBOUND_MESSAGE: usize = 2 << 20;
/// A client pings every 30 s and answers the server's pings: silence this long means it is gone.
const CLIENT_SILENT_FOR: Duration = Duration::from_secs(90);
/// How long a new stream may take to send its connect header.
const HEADER_WITHIN: Duration = Duration::from_secs(30);
/// Once one direction of a stream has ended, how long the other may go without moving a byte.
/// (The Python client stops reading, and so stops granting window, once it has sent FIN.)
const HALF_CLOSED_STALL: Duration = Duration::from_secs(30);
/// How long a shutdown waits for the go-away to reach the client.
const GO_AWAY_WITHIN: Duration = Duration::from_secs(2);
/// WebSocket close code on server shutdown: "going away".
const CLOSE_GOING_AWAY: u16 = 1001;
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// `GET /dp/{id}/tunnel`: authorizes like the rest of the data plane (the sandbox must belong
/// to the key's workspace), wakes a stopped sandbox, then upgrades.
pub async fn open(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Err(error) = dataplane::ready_agent(&app, Some(&workspace), &id).await {
        return error.into_response();
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return ApiError::Invalid(format!("/tunnel needs a WebSocket upgrade: {rejection}"))
                .into_response()
        }
    };
    // Held until the session ends; dropped with the closure if the upgrade never completes.
    let Some(slot) = app.tunnels.take(&id) else {
        return ApiError::Quota(format!(
            "at most {MAX_TUNNELS_PER_SANDBOX} tunnels may be open to one sandbox"
        ))
        .into_response();
    };
    // Counted by the shutdown, which waits (bounded) for each tunnel's go-away.
    let tracked = app.shutdown.upgrades.token();
    upgrade
        .max_message_size(MAX_INBOUND_MESSAGE)
        .max_frame_size(MAX_INBOUND_MESSAGE)
        .on_upgrade(move |socket| async move {
            run_session(app, id, socket).await;
            drop(tracked);
            drop(slot);
        })
}

/// The tunnels open to each sandbox, at most [`MAX_TUNNELS_PER_SANDBOX`] apiece; an entry
/// lives while one of its sandbox's tunnels does.
#[derive(Default)]
pub(crate) struct TunnelSlots {
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl TunnelSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One of the sandbox's tunnels, or `None` when it has them all.
    pub(crate) fn take(&self, sandbox_id: &str) -> Option<TunnelSlot> {
        let mut open = self.lock();
        let count = open.entry(sandbox_id.to_string()).or_insert(0);
        if *count >= MAX_TUNNELS_PER_SANDBOX {
            return None;
        }
        *count += 1;
        Some(TunnelSlot {
            open: self.open.clone(),
            sandbox_id: sandbox_id.to_string(),
        })
    }
}

/// One open tunnel's place among its sandbox's; given back on drop.
pub(crate) struct TunnelSlot {
    open: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    sandbox_id: String,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.sandbox_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.sandbox_id);
            }
        }
    }
}

fn yamux_config() -> yamux::Config {
    let mut config = yamux::Config::default();
    // The crate ends the whole session past its own limit; ours, below it, resets only the
    // stream that is one too many.
    let max_streams = MAX_STREAMS_PER_TUNNEL + YAMUX_STREAM_HEADROOM;
    config.set_max_num_streams(max_streams);
    // What one session may buffer: every stream keeps the 256 KiB of the spec, and yamux
    // requires no less (`>= max_num_streams * DEFAULT_CREDIT`, asserted on set), so ~72 MiB.
    config.set_max_connection_receive_window(Some(max_streams * yamux::DEFAULT_CREDIT as usize));
    config.set_split_send_size(64 * 1024);
    config
}

/// One tunnel: the yamux session over the WebSocket, until the client goes away, falls silent
/// or the server shuts down.
async fn run_session(app: Arc<App>, id: String, socket: WebSocket) {
    app.sandboxes.connection_opened(&id, true);
    let mut connection =
        yamux::Connection::new(WsBytes::new(socket), yamux_config(), yamux::Mode::Server);
    let going_away = app.shutdown.going_away.clone();
    let slots = Arc::new(Semaphore::new(MAX_STREAMS_PER_TUNNEL));
    // Dropped at the end: a stream cannot outlive its session.
    let mut streams = JoinSet::new();
    loop {
        let next = tokio::select! {
            next = poll_fn(|cx| connection.poll_next_inbound(cx)) => next,
            () = going_away.cancelled() => {
                let closing = poll_fn(|cx| connection.poll_close(cx));
                let _ = tokio::time::timeout(GO_AWAY_WITHIN, closing).await;
                break;
            }
        };
        while streams.try_join_next().is_some() {}
        match next {
            Some(Ok(stream)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    streams.spawn(serve_stream(app.clone(), id.clone(), stream, slot));
                }
                Err(_) => {
                    tracing::debug!(sandbox = %id, "tunnel: too many streams; resetting one");
                    drop(stream);
                }
            },
            Some(Err(error)) => {
                tracing::debug!(sandbox = %id, %error, "tunnel session failed");
                break;
            }
            None => break,
        }
    }
    tracing::debug!(sandbox = %id, "tunnel closed");
    app.sandboxes.connection_opened(&id, false);
}

type TunnelStream = Compat<yamux::Stream>;

/// One stream: the connect header, the status byte, then the bytes both ways.
async fn serve_stream(
    app: Arc<App>,
    id: String,
    stream: yamux::Stream,
    _slot: OwnedSemaphorePermit,
) {
    let mut stream = stream.compat();
    let port = match tokio::time::timeout(HEADER_WITHIN, read_connect_header(&mut stream)).await {
        Ok(Ok(Some(port))) => port,
        Ok(Ok(None)) => {
            finish(stream, ConnectStatus::UnsupportedVersion).await;
            return;
        }
        // No header: reset (dropped without a FIN).
        Ok(Err(_)) | Err(_) => return,
    };
    let connection = match port_forward::connect(&app, &id, port).await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(sandbox = %id, port, %error, "tunnel: no connection");
            let status = match error {
                PortError::NotAllowed(_) => ConnectStatus::PortNotAllowed,
                PortError::Refused { .. } | PortError::Unavailable(_) => ConnectStatus::DialFailed,
            };
            finish(stream, status).await;
            return;
        }
    };
    if stream.write_all(&[ConnectStatus::Ok.byte()]).await.is_err() {
        return;
    }
    splice(stream, connection).await;
}

/// The port of a version-1 connect header; `None` for another version (whose header may have
/// another length, so nothing after the version byte is read).
async fn read_connect_header(stream: &mut TunnelStream) -> io::Result<Option<u16>> {
    let version = stream.read_u8().await?;
    if version != PROTOCOL_VERSION {
        return Ok(None);
    }
    stream.read_u16().await.map(Some)
}

/// Answers a failed connect: the status byte, then FIN.
async fn finish(mut stream: TunnelStream, status: ConnectStatus) {
    let _ = stream.write_all(&[status.byte()]).await;
    let _ = stream.shutdown().await;
}

/// Copies both ways; each direction's end is passed on as a half-close. Ends when both
/// directions have, or when one has and the other stalls for [`HALF_CLOSED_STALL`].
async fn splice<C, S>(client: C, sandbox: S)
where
    C: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite,
{
    let progress = Progress::default();
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut sandbox_rd, mut sandbox_wr) = tokio::io::split(sandbox);
    let both = async {
        tokio::join!(
            copy_half(&mut client_rd, &mut sandbox_wr, &progress),
            copy_half(&mut sandbox_rd, &mut client_wr, &progress),
        )
    };
    tokio::pin!(both);
    loop {
        tokio::select! {
            _ = &mut both => return,
            () = tokio::time::sleep(HALF_CLOSED_STALL / 4) => {
                if progress.half_closed() && progress.idle_for() >= HALF_CLOSED_STALL {
                    return;
                }
            }
        }
    }
}

/// What a stream's two copies share: when a byte last moved, and how many have ended.
struct Progress {
    since: Instant,
    last_millis: AtomicU64,
    ended: AtomicU8,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            since: Instant::now(),
            last_millis: AtomicU64::new(0),
            ended: AtomicU8::new(0),
        }
    }
}

impl Progress {
    fn moved(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }

    fn half_closed(&self) -> bool {
        self.ended.load(Ordering::Relaxed) > 0
    }
}

/// Copies until EOF or an error, then shuts the writer down (a half-close on the other side).
async fn copy_half<R, W>(reader: &mut R, writer: &mut W, progress: &Progress)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let n = match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if writer.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        progress.moved();
    }
    let _ = writer.shutdown().await;
    progress.moved();
    progress.ended.fetch_add(1, Ordering::Relaxed);
}

/// A WebSocket as the byte stream yamux runs on. Inbound messages, binary or text, are read as
/// one stream of bytes, whatever their boundaries (spec §4.2); outbound bytes go out as binary
/// messages, one per flush, at most [`MAX_OUTBOUND_MESSAGE`] each.
struct WsBytes {
    socket: WebSocket,
    unread: Bytes,
    unsent: Vec<u8>,
    silence: Pin<Box<Sleep>>,
    closing: bool,
}

impl WsBytes {
    fn new(socket: WebSocket) -> WsBytes {
        WsBytes {
            socket,
            unread: Bytes::new(),
            unsent: Vec::new(),
            silence: Box::pin(tokio::time::sleep(CLIENT_SILENT_FOR)),
            closing: false,
        }
    }

    fn heard_from_client(&mut self) {
        self.silence
            .as_mut()
            .reset(Instant::now() + CLIENT_SILENT_FOR);
    }

    /// Hands the gathered bytes to the WebSocket as one message.
    fn poll_send_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unsent.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let mut socket = Pin::new(&mut self.socket);
        ready!(socket.as_mut().poll_ready(cx)).map_err(io::Error::other)?;
        let message = Message::Binary(Bytes::from(std::mem::take(&mut self.unsent)));
        socket.start_send(message).map_err(io::Error::other)?;
        Poll::Ready(Ok(()))
    }
}

impl futures::AsyncRead for WsBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if !this.unread.is_empty() {
                let n = buf.len().min(this.unread.len());
                buf[..n].copy_from_slice(&this.unread.split_to(n));
                return Poll::Ready(Ok(n));
            }
            match Pin::new(&mut this.socket).poll_next(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    this.heard_from_client();
                    match message {
                        Message::Binary(_) | Message::Text(_) => this.unread = message.into_data(),
                        Message::Close(_) => return Poll::Ready(Ok(0)),
                        // Answered by the WebSocket itself.
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(io::Error::other(error))),
                Poll::Ready(None) => return Poll::Ready(Ok(0)),
                Poll::Pending => {
                    if this.silence.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the tunnel client fell silent",
                        )));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl futures::AsyncWrite for WsBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.unsent.len() >= MAX_OUTBOUND_MESSAGE {
            ready!(this.poll_send_unsent(cx))?;
        }
        let n = buf.len().min(MAX_OUTBOUND_MESSAGE - this.unsent.len());
        this.unsent.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send_unsent(cx))?;
        Pin::new(&mut this.socket)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    /// Only a server shutdown closes a tunnel from this side: the close says "going away".
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send_unsent(cx))?;
        let mut socket = Pin::new(&mut this.socket);
        if !this.closing {
            ready!(socket.as_mut().poll_ready(cx)).map_err(io::Error::other)?;
            let close = Message::Close(Some(CloseFrame {
                code: CLOSE_GOING_AWAY,
                reason: "server shutting down".into(),
            }));
            socket
                .as_mut()
                .start_send(close)
                .map_err(io::Error::other)?;
            this.closing = true;
        }
        socket.poll_close(cx).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yamux_config_meets_the_crates_own_bounds() {
        // The crate asserts its window against its stream limit: this must not panic.
        let _ = yamux_config();
    }

    #[test]
    fn tunnels_per_sandbox_are_bounded_and_given_back() {
        let slots = TunnelSlots::default();
        let mut held: Vec<TunnelSlot> = (0..MAX_TUNNELS_PER_SANDBOX)
            .map(|_| slots.take("a").expect("a slot"))
            .collect();
        assert!(slots.take("a").is_none());
        // Another sandbox has its own.
        let other = slots.take("b").expect("another sandbox's slot");
        held.pop();
        let again = slots.take("a").expect("a slot given back");
        assert!(slots.take("a").is_none());
        drop((held, again, other));
        assert!(slots.lock().is_empty());
    }
}
