//! Host side: one yamux session per sandbox; each request or WebSocket gets its own stream.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::framed_io::FramedIo;
use crate::{yamux_config, ChannelError, ChannelStream, MAX_OPEN_STREAMS, OPEN_STREAM_WAIT};

type StreamReply = oneshot::Sender<Result<yamux::Stream, ChannelError>>;

/// A WebSocket to the agent over one channel stream.
pub type WebSocket = WebSocketStream<ChannelStream>;

/// A connected agent. Cheap to clone; the session lives until every clone is dropped or the
/// byte stream fails.
#[derive(Clone)]
pub struct AgentClient {
    open_requests: mpsc::UnboundedSender<StreamReply>,
    /// One permit per stream that may be open; each [`ChannelStream`] holds one until dropped.
    slots: Arc<Semaphore>,
}

impl AgentClient {
    /// Starts the client end of the channel over `io`. The session is driven by a task on the
    /// current tokio runtime.
    pub fn connect<T>(io: T) -> AgentClient
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let connection = yamux::Connection::new(
            FramedIo::new(io.compat()),
            yamux_config(),
            yamux::Mode::Client,
        );
        let (open_requests, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            if let Err(error) = drive(connection, requests).await {
                tracing::debug!(%error, "agent channel ended");
            }
        });
        AgentClient {
            open_requests,
            slots: Arc::new(Semaphore::new(MAX_OPEN_STREAMS)),
        }
    }

    /// True once the session has ended; a closed client never recovers.
    pub fn is_closed(&self) -> bool {
        self.open_requests.is_closed()
    }

    /// Opens a new raw stream to the agent. With [`MAX_OPEN_STREAMS`] already open it waits
    /// up to [`OPEN_STREAM_WAIT`] for one to close, then fails with
    /// [`ChannelError::TooManyStreams`]; the session and its other streams carry on.
    pub async fn open_stream(&self) -> Result<ChannelStream, ChannelError> {
        let slot = tokio::time::timeout(OPEN_STREAM_WAIT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| ChannelError::TooManyStreams(MAX_OPEN_STREAMS))?
            .map_err(|_| ChannelError::Closed)?;
        let (reply, stream) = oneshot::channel();
        self.open_requests
            .send(reply)
            .map_err(|_| ChannelError::Closed)?;
        let stream = stream.await.map_err(|_| ChannelError::Closed)??;
        Ok(ChannelStream::new(stream, Some(slot)))
    }

    /// Sends one HTTP/1.1 request on a fresh stream. Upgrades (WebSocket) are supported: the
    /// connection task keeps running after the response for `hyper::upgrade::on`.
    pub async fn request<B>(&self, request: Request<B>) -> Result<Response<Incoming>, ChannelError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.open_stream().await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "agent HTTP connection ended");
            }
        });
        Ok(sender.send_request(request).await?)
    }

    /// Convenience for a request with a fully buffered body.
    pub async fn request_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Incoming>, ChannelError> {
        let (parts, body) = request.into_parts();
        self.request(Request::from_parts(parts, http_body_util::Full::new(body)))
            .await
    }

    /// Opens a WebSocket to `path_and_query` on the agent (e.g. `/execute/ws`).
    pub async fn websocket(&self, path_and_query: &str) -> Result<WebSocket, ChannelError> {
        let stream = self.open_stream().await?;
        let url = format!("ws://agent{path_and_query}");
        let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
        let (socket, _response) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .map_err(Box::new)?;
        Ok(socket)
    }
}

/// Drives the yamux connection: serves open requests and keeps every stream's I/O moving.
async fn drive<T>(
    mut connection: yamux::Connection<T>,
    mut requests: mpsc::UnboundedReceiver<StreamReply>,
) -> Result<(), ChannelError>
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut waiting: VecDeque<StreamReply> = VecDeque::new();
    let mut clients_gone = false;
    poll_fn(|cx| {
        while let Poll::Ready(request) = requests.poll_recv(cx) {
            match request {
                Some(reply) => waiting.push_back(reply),
                None => {
                    clients_gone = true;
                    break;
                }
            }
        }
        while !waiting.is_empty() {
            match connection.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    if let Some(reply) = waiting.pop_front() {
                        let _ = reply.send(Ok(stream));
                    }
                }
                Poll::Ready(Err(error)) => {
                    for reply in waiting.drain(..) {
                        let _ = reply.send(Err(ChannelError::Closed));
                    }
                    return Poll::Ready(Err(ChannelError::from(error)));
                }
                Poll::Pending => break,
            }
        }
        loop {
            match connection.poll_next_inbound(cx) {
                // The agent never opens streams; refuse any it tries.
                Poll::Ready(Some(Ok(stream))) => drop(stream),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        if clients_gone && waiting.is_empty() {
            // No clone of the client is left: close so the agent sees EOF.
            return connection.poll_close(cx).map_err(ChannelError::from);
        }
        Poll::Pending
    })
    .await
}
