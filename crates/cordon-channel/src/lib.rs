//! The host ↔ agent channel.
//!
//! Each sandbox exposes exactly one byte stream to the host (a unix socket for namespace
//! sandboxes, a virtio-serial port for microVMs). Both ends run [yamux] over it; every yamux
//! stream carries one HTTP/1.1 connection, which may upgrade to a WebSocket. The agent side is
//! [`serve`]; the host side is [`AgentClient`].

mod client;
mod framed_io;
mod server;
mod session;
mod stream;
pub mod vm_link;

use std::time::Duration;

pub use client::{AgentClient, WebSocket};
pub use server::{serve, serve_with_opener, HostOpener};
pub use stream::ChannelStream;

/// Streams the host keeps open at once on one channel. yamux ends the whole session (every
/// command and transfer of the sandbox) when a stream beyond its own limit is opened, so the
/// host admits no more than this and refuses the one extra request instead.
pub const MAX_OPEN_STREAMS: usize = 512;
/// Streams the agent may have open to the host at once (reverse streams). The host refuses
/// (drops) any beyond this, so a hostile agent cannot make it hold unbounded streams.
pub const MAX_INBOUND_STREAMS: usize = 256;
/// How long opening a stream waits for a free slot before it is refused.
pub const OPEN_STREAM_WAIT: Duration = Duration::from_secs(2);
/// yamux's own limit on both ends, above [`MAX_OPEN_STREAMS`] + [`MAX_INBOUND_STREAMS`]: a stream the host has dropped
/// leaves the agent's table only once the agent's handler lets go of it, so the agent may
/// briefly count more streams than the host has open.
const YAMUX_MAX_STREAMS: usize = 2 * (MAX_OPEN_STREAMS + MAX_INBOUND_STREAMS);

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("agent channel closed")]
    Closed,
    #[error("too many open streams on the agent channel (at most {0}); this request was refused")]
    TooManyStreams(usize),
    #[error("agent channel: {0}")]
    Yamux(#[from] yamux::ConnectionError),
    #[error("agent HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("agent WebSocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    #[error("bad request for the agent: {0}")]
    Request(#[from] http::Error),
}

fn yamux_config() -> yamux::Config {
    let mut config = yamux::Config::default();
    // Larger frames cut per-frame overhead on a local, lossless stream.
    config.set_split_send_size(64 * 1024);
    config.set_max_num_streams(YAMUX_MAX_STREAMS);
    config
}
