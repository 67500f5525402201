//! The host ↔ agent channel.
//!
//! Each sandbox exposes exactly one byte stream to the host (a unix socket for namespace
//! sandboxes, a virtio-serial port for microVMs). Both ends run [yamux] over it; every yamux
//! stream carries one HTTP/1.1 connection, which may upgrade to a WebSocket. The agent side is
//! [`serve`]; the host side is [`AgentClient`].

mod client;
mod framed_io;
mod server;

pub use client::{AgentClient, WebSocket};
pub use server::serve;

/// One multiplexed stream, usable with tokio I/O.
pub type ChannelStream = tokio_util::compat::Compat<yamux::Stream>;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("agent channel closed")]
    Closed,
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
    config
}
