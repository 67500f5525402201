//! The byte stream under yamux, with its small reads and writes batched.
//!
//! yamux writes every frame as two writes (its 12-byte header, then the body) and flushes after
//! each frame, and reads every frame as two reads (header, then body). On a unix socket each is
//! a system call, and a header sent alone can wake the peer before its body is there. Here
//! writes are gathered until yamux flushes, so a frame goes out in one write (large bodies are
//! never copied: they go out after, or with one vectored write together with, what is
//! pending), and reads are served from a small buffer filled by one read.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::io::BufReader;
use futures::{AsyncRead, AsyncWrite};

/// Bytes gathered before a write goes through: a header plus a typical small frame. Larger
/// writes are not copied.
const GATHER_BYTES: usize = 16 * 1024;
/// Read buffer: fits many small frames; larger bodies are read straight into yamux's buffer.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// `io` with batched writes (see the module documentation) and buffered reads.
pub(crate) struct FramedIo<T> {
    reader: BufReader<GatheringWriter<T>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> FramedIo<T> {
    pub(crate) fn new(io: T) -> Self {
        let writer = GatheringWriter {
            io,
            pending: Vec::with_capacity(GATHER_BYTES),
            sent: 0,
        };
        FramedIo {
            reader: BufReader::with_capacity(READ_BUFFER_BYTES, writer),
        }
    }

    fn writer(&mut self) -> Pin<&mut GatheringWriter<T>> {
        Pin::new(self.reader.get_mut())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for FramedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FramedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writer().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer().poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer().poll_close(cx)
    }
}

/// Gathers writes until a flush or until they would not fit.
struct GatheringWriter<T> {
    io: T,
    pending: Vec<u8>,
    /// How much of `pending` the socket has taken.
    sent: usize,
}

impl<T: AsyncWrite + Unpin> GatheringWriter<T> {
    fn unsent(&self) -> &[u8] {
        &self.pending[self.sent..]
    }

    fn mark_sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.pending.len() {
            self.pending.clear();
            self.sent = 0;
        }
    }

    /// Writes out everything gathered.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.unsent().is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.mark_sent(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GatheringWriter<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.len() + buf.len() <= GATHER_BYTES {
            this.pending.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // Too large to gather: send what is pending and `buf` together, without copying.
        loop {
            if this.unsent().is_empty() {
                return Pin::new(&mut this.io).poll_write(cx, buf);
            }
            let pending = this.unsent().len();
            let slices = [IoSlice::new(&this.pending[this.sent..]), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.mark_sent(n.min(pending));
            if n > pending {
                return Poll::Ready(Ok(n - pending));
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GatheringWriter<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Records each write the socket sees.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let joined: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            let n = joined.len();
            self.writes.push(joined);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(0))
        }
    }

    #[test]
    fn small_writes_go_out_together_on_flush() {
        futures::executor::block_on(async {
            let mut io = FramedIo::new(Recorder::default());
            io.write_all(b"header").await.unwrap();
            io.write_all(b"body").await.unwrap();
            assert!(io.reader.get_ref().io.writes.is_empty());
            io.flush().await.unwrap();
            assert_eq!(io.reader.get_ref().io.writes, vec![b"headerbody".to_vec()]);
        });
    }

    #[test]
    fn large_writes_are_not_gathered_and_keep_their_order() {
        futures::executor::block_on(async {
            let mut io = FramedIo::new(Recorder::default());
            let large = vec![7u8; GATHER_BYTES * 2];
            io.write_all(b"head").await.unwrap();
            io.write_all(&large).await.unwrap();
            io.write_all(b"tail").await.unwrap();
            io.close().await.unwrap();
            let writes = &io.reader.get_ref().io.writes;
            assert_eq!(writes.len(), 2);
            assert_eq!(&writes[0][..4], b"head");
            assert_eq!(writes[0].len(), 4 + large.len());
            assert_eq!(writes[1], b"tail");
            let mut rest = Vec::new();
            io.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        });
    }
}
