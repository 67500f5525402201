//! Agent side: accept yamux streams and hand each to a handler.

use std::future::poll_fn;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::framed_io::FramedIo;
use crate::{yamux_config, ChannelError, ChannelStream};

/// Runs the server end of the channel over `io` until the host closes it. `on_stream` is called
/// for every stream the host opens and must not block (spawn the work).
pub async fn serve<T, F>(io: T, mut on_stream: F) -> Result<(), ChannelError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(ChannelStream),
{
    let mut connection = yamux::Connection::new(
        FramedIo::new(io.compat()),
        yamux_config(),
        yamux::Mode::Server,
    );
    // Polling for inbound streams is also what drives the I/O of every open stream.
    while let Some(stream) = poll_fn(|cx| connection.poll_next_inbound(cx)).await {
        on_stream(ChannelStream::new(stream?, None));
    }
    Ok(())
}
