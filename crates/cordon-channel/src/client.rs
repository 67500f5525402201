//! Host side: one yamux session per sandbox; each request or WebSocket gets its own stream.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::framed_io::FramedIo;
use crate::session::{drive, Ending, Inbound, Opener};
use crate::{yamux_config, ChannelError, ChannelStream, MAX_INBOUND_STREAMS, MAX_OPEN_STREAMS};

/// A WebSocket to the agent over one channel stream.
pub type WebSocket = WebSocketStream<ChannelStream>;

/// A connected agent. Cheap to clone; the session lives until every clone is dropped or the
/// byte stream fails.
#[derive(Clone)]
pub struct AgentClient {
    opener: Opener,
}

impl AgentClient {
    /// Starts the client end of the channel over `io`, refusing every stream the agent opens.
    /// The session is driven by a task on the current tokio runtime.
    pub fn connect<T>(io: T) -> AgentClient
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::start(io, Inbound::<fn(ChannelStream)>::Refuse)
    }

    /// Like [`AgentClient::connect`], but every stream the agent opens (a reverse stream, e.g.
    /// its egress relay) is handed to `on_stream`, which must not block (spawn the work). At
    /// most [`MAX_INBOUND_STREAMS`] are held at once; the agent's further ones are refused
    /// (dropped) until one of them is dropped, so a hostile agent cannot exhaust the host.
    pub fn connect_with_inbound<T, F>(io: T, on_stream: F) -> AgentClient
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: FnMut(ChannelStream) + Send + 'static,
    {
        Self::start(
            io,
            Inbound::Handle {
                handler: on_stream,
                slots: Arc::new(Semaphore::new(MAX_INBOUND_STREAMS)),
            },
        )
    }

    fn start<T, F>(io: T, inbound: Inbound<F>) -> AgentClient
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: FnMut(ChannelStream) + Send + 'static,
    {
        let connection = yamux::Connection::new(
            FramedIo::new(io.compat()),
            yamux_config(),
            yamux::Mode::Client,
        );
        let (opener, requests) = Opener::new(MAX_OPEN_STREAMS);
        tokio::spawn(async move {
            if let Err(error) = drive(connection, requests, inbound, Ending::WhenOpenersGone).await
            {
                tracing::debug!(%error, "agent channel ended");
            }
        });
        AgentClient { opener }
    }

    /// True once the session has ended; a closed client never recovers.
    pub fn is_closed(&self) -> bool {
        self.opener.is_closed()
    }

    /// Opens a new raw stream to the agent. With [`MAX_OPEN_STREAMS`] already open it waits
    /// up to [`OPEN_STREAM_WAIT`](crate::OPEN_STREAM_WAIT) for one to close, then fails with
    /// [`ChannelError::TooManyStreams`]; the session and its other streams carry on.
    pub async fn open_stream(&self) -> Result<ChannelStream, ChannelError> {
        self.opener.open().await
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
