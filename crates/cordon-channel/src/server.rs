//! Agent side: accept yamux streams and hand each to a handler; optionally open streams to the
//! host (reverse streams, e.g. the egress relay's connections).

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::framed_io::FramedIo;
use crate::session::{drive, Ending, Inbound, Opener};
use crate::{yamux_config, ChannelError, ChannelStream, MAX_INBOUND_STREAMS};

/// Runs the server end of the channel over `io` until the host closes it. `on_stream` is called
/// for every stream the host opens and must not block (spawn the work).
pub async fn serve<T, F>(io: T, on_stream: F) -> Result<(), ChannelError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(ChannelStream),
{
    serve_with_opener(io, |_| on_stream).await
}

/// Like [`serve`], but the stream handler is made by `make_handler` from this session's
/// [`HostOpener`], which opens streams to the host (the host hands them to its
/// `connect_with_inbound` handler, or refuses them).
pub async fn serve_with_opener<T, F, M>(io: T, make_handler: M) -> Result<(), ChannelError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(ChannelStream),
    M: FnOnce(HostOpener) -> F,
{
    let connection = yamux::Connection::new(
        FramedIo::new(io.compat()),
        yamux_config(),
        yamux::Mode::Server,
    );
    let (opener, requests) = Opener::new(MAX_INBOUND_STREAMS);
    let on_stream = make_handler(HostOpener { opener });
    drive(
        connection,
        requests,
        Inbound::Unbounded(on_stream),
        Ending::WhenPeerCloses,
    )
    .await
}

/// Opens streams from the agent to the host on one session. Cheap to clone; useless (every
/// open fails with [`ChannelError::Closed`]) once that session has ended.
#[derive(Clone)]
pub struct HostOpener {
    opener: Opener,
}

impl HostOpener {
    /// Opens a stream to the host. At most [`MAX_INBOUND_STREAMS`] are open at once (the
    /// host's own bound); beyond that it waits up to
    /// [`OPEN_STREAM_WAIT`](crate::OPEN_STREAM_WAIT) for one to close, then fails with
    /// [`ChannelError::TooManyStreams`].
    pub async fn open_stream(&self) -> Result<ChannelStream, ChannelError> {
        self.opener.open().await
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        self.opener.is_closed()
    }
}
