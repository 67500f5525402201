//! The yamux driver both ends share: serves local open requests and hands streams the peer
//! opens to a handler, keeping every stream's I/O moving.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{ChannelError, ChannelStream, OPEN_STREAM_WAIT};

pub(crate) type StreamReply = oneshot::Sender<Result<yamux::Stream, ChannelError>>;

/// Opens streams to the peer on one session, at most `limit` at once. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Opener {
    requests: mpsc::UnboundedSender<StreamReply>,
    /// One permit per stream that may be open; each [`ChannelStream`] holds one until dropped.
    slots: Arc<Semaphore>,
    limit: usize,
}

impl Opener {
    pub(crate) fn new(limit: usize) -> (Opener, mpsc::UnboundedReceiver<StreamReply>) {
        let (requests, receiver) = mpsc::unbounded_channel();
        let opener = Opener {
            requests,
            slots: Arc::new(Semaphore::new(limit)),
            limit,
        };
        (opener, receiver)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.requests.is_closed()
    }

    /// With `limit` streams already open it waits up to [`OPEN_STREAM_WAIT`] for one to close,
    /// then fails with [`ChannelError::TooManyStreams`]; the session carries on.
    pub(crate) async fn open(&self) -> Result<ChannelStream, ChannelError> {
        let slot = tokio::time::timeout(OPEN_STREAM_WAIT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| ChannelError::TooManyStreams(self.limit))?
            .map_err(|_| ChannelError::Closed)?;
        let (reply, stream) = oneshot::channel();
        self.requests
            .send(reply)
            .map_err(|_| ChannelError::Closed)?;
        let stream = stream.await.map_err(|_| ChannelError::Closed)??;
        Ok(ChannelStream::new(stream, Some(slot)))
    }
}

/// What happens to streams the peer opens.
pub(crate) enum Inbound<F> {
    /// Every one is dropped (refused) at once.
    Refuse,
    /// Each is handed to the handler while it holds a slot of `slots`; beyond that they are
    /// refused, so a hostile peer cannot make this end hold unbounded streams.
    Handle { handler: F, slots: Arc<Semaphore> },
    /// Each is handed to the handler unbounded (the agent side: the host bounds its own).
    Unbounded(F),
}

/// When the driver stops.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// When every opener is gone (and nothing waits): the session is closed so the peer sees
    /// EOF. The host side: its clients own the session.
    WhenOpenersGone,
    /// Only when the peer closes or the stream fails (the agent side).
    WhenPeerCloses,
}

/// Drives `connection` until it ends (see [`Ending`]).
pub(crate) async fn drive<T, F>(
    mut connection: yamux::Connection<T>,
    mut requests: mpsc::UnboundedReceiver<StreamReply>,
    mut inbound: Inbound<F>,
    ending: Ending,
) -> Result<(), ChannelError>
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
    F: FnMut(ChannelStream),
{
    let mut waiting: VecDeque<StreamReply> = VecDeque::new();
    let mut openers_gone = false;
    poll_fn(|cx| {
        while !openers_gone {
            match requests.poll_recv(cx) {
                Poll::Ready(Some(reply)) => waiting.push_back(reply),
                Poll::Ready(None) => openers_gone = true,
                Poll::Pending => break,
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
        // Polling for inbound streams is also what drives the I/O of every open stream.
        loop {
            match connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => accept(&mut inbound, stream),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        if ending == Ending::WhenOpenersGone && openers_gone && waiting.is_empty() {
            return connection.poll_close(cx).map_err(ChannelError::from);
        }
        Poll::Pending
    })
    .await
}

fn accept<F: FnMut(ChannelStream)>(inbound: &mut Inbound<F>, stream: yamux::Stream) {
    match inbound {
        Inbound::Refuse => drop(stream),
        Inbound::Unbounded(handler) => handler(ChannelStream::new(stream, None)),
        Inbound::Handle { handler, slots } => match slots.clone().try_acquire_owned() {
            Ok(slot) => handler(ChannelStream::new(stream, Some(slot))),
            Err(_) => {
                tracing::warn!("agent opened more streams than allowed; one was refused");
                drop(stream);
            }
        },
    }
}
