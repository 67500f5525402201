//! Starting a fresh channel session on a link that outlives its host connections: a microVM's
//! virtio-serial port.
//!
//! A unix socket gives each host connection its own byte stream. A virtio-serial port does
//! not: it is one stream for the VM's life, the host side (QEMU's socket chardev) may be
//! dropped and re-connected at any time (a server restart), and bytes of the old connection
//! may still sit in either direction (unread host bytes in the guest's queue; a guest write
//! that QEMU delivers once the new host is there). yamux cannot resynchronise on such
//! garbage, so every host connection starts with a handshake of fixed-size ASCII lines:
//!
//! ```text
//! "CORDON/1 " VERB " " NONCE "\n"      48 bytes; VERB is 5 letters, NONCE 32 lowercase hex
//! host  → guest   HELLO <n>   repeated (250 ms, doubling to 2 s) until the host reads READY <n>
//! guest → host    READY <n>   once per distinct nonce the guest reads in a HELLO
//! host  → guest   START <n>   once; yamux follows immediately, in both directions
//! ```
//!
//! Each side discards anything that is not a well-formed line (stale yamux bytes of an older
//! connection) and skips lines for other nonces, so a stale HELLO, READY or START of an older
//! connection never starts a session. The guest answers READY only after the whole HELLO line,
//! and the host starts yamux only after the READY for its own fresh nonce, so neither side's
//! yamux ever reads a handshake byte. The guest sends nothing but READY lines until it has
//! read START, and the host nothing but HELLO lines until it has read READY; so both yamux
//! sessions begin at the first byte after START.
//!
//! The guest notices a host going away as end-of-file on the port (virtio-serial reads return
//! 0 once the host is disconnected and the queue is drained), drops its session and waits for
//! the next HELLO. If it misses a quick disconnect and reconnect, the new host's HELLO lines
//! reach the old yamux session as garbage, which ends it with a decode error; the host keeps
//! repeating HELLO, so the next complete one starts the new session.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Every handshake line starts with this.
const MAGIC: &[u8; 9] = b"CORDON/1 ";
/// Length of a whole line: magic, verb, space, nonce, newline.
pub const LINE_LEN: usize = MAGIC.len() + 5 + 1 + 32 + 1;
/// How soon the host repeats its HELLO while waiting for READY (the guest may still be
/// booting, or may have missed the first HELLO inside a dying session); the interval doubles
/// up to [`HELLO_INTERVAL_MAX`].
pub const HELLO_INTERVAL: Duration = Duration::from_millis(250);
pub const HELLO_INTERVAL_MAX: Duration = Duration::from_secs(2);

/// A handshake line's verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Hello,
    Ready,
    Start,
}

impl Verb {
    fn text(self) -> &'static [u8; 5] {
        match self {
            Verb::Hello => b"HELLO",
            Verb::Ready => b"READY",
            Verb::Start => b"START",
        }
    }

    fn parse(text: &[u8]) -> Option<Verb> {
        [Verb::Hello, Verb::Ready, Verb::Start]
            .into_iter()
            .find(|verb| verb.text() == text)
    }
}

/// A connection's identity: 16 random bytes as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonce([u8; 32]);

impl Nonce {
    /// A fresh nonce from the kernel's random source.
    pub fn random() -> io::Result<Nonce> {
        let mut raw = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw)?;
        let mut hex = [0u8; 32];
        for (i, byte) in raw.iter().enumerate() {
            hex[2 * i] = HEX[usize::from(byte >> 4)];
            hex[2 * i + 1] = HEX[usize::from(byte & 0xf)];
        }
        Ok(Nonce(hex))
    }

    fn parse(text: &[u8]) -> Option<Nonce> {
        let hex: [u8; 32] = text.try_into().ok()?;
        hex.iter().all(|c| HEX.contains(c)).then_some(Nonce(hex))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The bytes of one handshake line.
pub fn line(verb: Verb, nonce: &Nonce) -> [u8; LINE_LEN] {
    let mut line = [0u8; LINE_LEN];
    line[..9].copy_from_slice(MAGIC);
    line[9..14].copy_from_slice(verb.text());
    line[14] = b' ';
    line[15..47].copy_from_slice(&nonce.0);
    line[47] = b'\n';
    line
}

/// Finds well-formed lines in a byte stream fed one byte at a time (so nothing after a line
/// is ever consumed, and each read is cancel-safe), discarding everything else.
#[derive(Default)]
struct LineScanner {
    buf: Vec<u8>,
}

impl LineScanner {
    /// Feeds one byte; returns a line when this byte completed one.
    fn push(&mut self, byte: u8) -> Option<(Verb, Nonce)> {
        self.buf.push(byte);
        self.resync();
        if self.buf.len() < LINE_LEN {
            return None;
        }
        let line = &self.buf[..LINE_LEN];
        let parsed = (line[14] == b' ' && line[47] == b'\n')
            .then(|| Some((Verb::parse(&line[9..14])?, Nonce::parse(&line[15..47])?)))
            .flatten();
        if parsed.is_some() {
            self.buf.clear();
        } else {
            // A line may start inside a malformed one (stale bytes that happened to contain
            // the magic): look again from the next byte.
            self.buf.remove(0);
            self.resync();
        }
        parsed
    }

    /// Drops leading bytes until the buffer is a candidate line: it starts with the magic, or
    /// with a prefix of it when shorter.
    fn resync(&mut self) {
        while !self.buf.is_empty() {
            let n = self.buf.len().min(MAGIC.len());
            if self.buf[..n] == MAGIC[..n] {
                return;
            }
            self.buf.remove(0);
        }
    }
}

async fn read_byte<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    match io.read(&mut byte).await? {
        0 => Ok(None),
        _ => Ok(Some(byte[0])),
    }
}

/// Guest side: waits for a host's HELLO, answers READY, and returns once that host's START
/// has been read; the next byte on `io` is the host's first yamux byte. `Ok(false)` when the
/// link reached end of file first (the host went away; wait for it and call again).
pub async fn guest_accept<T>(io: &mut T) -> io::Result<bool>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut scanner = LineScanner::default();
    let mut acked: Option<Nonce> = None;
    while let Some(byte) = read_byte(io).await? {
        match scanner.push(byte) {
            Some((Verb::Hello, nonce)) if acked != Some(nonce) => {
                // A newer host (or the first): answer it; older ones are forgotten.
                io.write_all(&line(Verb::Ready, &nonce)).await?;
                io.flush().await?;
                acked = Some(nonce);
            }
            Some((Verb::Start, nonce)) if acked == Some(nonce) => return Ok(true),
            _ => {}
        }
    }
    Ok(false)
}

/// Why the host could not start a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("agent channel handshake: {0}")]
    Io(#[from] io::Error),
    #[error("agent channel handshake: the link closed before the agent answered")]
    Closed,
    #[error("agent channel handshake: no answer from the agent within {0:?}")]
    TimedOut(Duration),
}

/// Host side, on a freshly connected link: sends HELLO (repeated, [`HELLO_INTERVAL`] backing off)
/// until the agent's READY for it arrives, then START. On success the next byte in either
/// direction belongs to the new yamux session: hand `io` to [`crate::AgentClient::connect`].
pub async fn host_connect<T>(io: &mut T, timeout: Duration) -> Result<(), HandshakeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let nonce = Nonce::random()?;
    let hello = line(Verb::Hello, &nonce);
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || HandshakeError::TimedOut(timeout);
    let mut scanner = LineScanner::default();
    let mut interval = HELLO_INTERVAL;
    let mut next_hello = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(timed_out());
        }
        if now >= next_hello {
            // Bounded too: while the guest has not opened its port, QEMU reads nothing, and
            // the socket's buffer fills up eventually.
            tokio::time::timeout_at(deadline, write_line(io, &hello))
                .await
                .map_err(|_| timed_out())??;
            next_hello = now + interval;
            interval = (interval * 2).min(HELLO_INTERVAL_MAX);
        }
        let wait = next_hello.min(deadline);
        // `read` of one byte is cancel-safe: a byte is either returned or left unread.
        let Ok(read) = tokio::time::timeout_at(wait, read_byte(io)).await else {
            continue;
        };
        match read? {
            None => return Err(HandshakeError::Closed),
            Some(byte) => {
                if scanner.push(byte) == Some((Verb::Ready, nonce)) {
                    tokio::time::timeout_at(deadline, write_line(io, &line(Verb::Start, &nonce)))
                        .await
                        .map_err(|_| timed_out())??;
                    return Ok(());
                }
            }
        }
    }
}

async fn write_line<T: AsyncWrite + Unpin>(io: &mut T, line: &[u8]) -> io::Result<()> {
    io.write_all(line).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonce(c: u8) -> Nonce {
        Nonce([c; 32])
    }

    #[test]
    fn scanner_skips_garbage_and_malformed_lines() {
        let mut scanner = LineScanner::default();
        // Garbage, a false start, and a line cut short by the start of a real one.
        let mut input = b"\0\0\x01CORDON/CORDON/1 HEL".to_vec();
        input.extend_from_slice(&line(Verb::Hello, &nonce(b'a')));
        let mut bad = line(Verb::Ready, &nonce(b'b'));
        bad[20] = b'Z'; // not hex
        input.extend_from_slice(&bad);
        input.extend_from_slice(&line(Verb::Start, &nonce(b'c')));
        let lines: Vec<_> = input.iter().filter_map(|&b| scanner.push(b)).collect();
        assert_eq!(
            lines,
            vec![(Verb::Hello, nonce(b'a')), (Verb::Start, nonce(b'c'))]
        );
    }

    #[test]
    fn random_nonces_are_hex_and_differ() {
        let (a, b) = (Nonce::random().unwrap(), Nonce::random().unwrap());
        assert_ne!(a, b);
        assert!(Nonce::parse(&a.0).is_some());
    }

    /// Stale bytes in both directions, a stale HELLO/START of an older host and repeated
    /// HELLOs: both sides still start at the same byte.
    #[tokio::test]
    async fn handshake_survives_stale_bytes_of_an_older_connection() {
        let (mut host, mut guest) = tokio::io::duplex(4096);
        // What older hosts left in the guest's queue: yamux bytes, the HELLO of a host that
        // gave up before the guest answered, and a START for a nonce never acknowledged.
        host.write_all(b"\0\x01\0\0garbage").await.unwrap();
        host.write_all(&line(Verb::Hello, &nonce(b'0')))
            .await
            .unwrap();
        host.write_all(&line(Verb::Start, &nonce(b'1')))
            .await
            .unwrap();
        // What the guest's old session wrote that the new host will read first.
        guest.write_all(b"\0\x02stale yamux").await.unwrap();

        let guest_task = tokio::spawn(async move {
            // Slow guest: the host repeats HELLO meanwhile.
            tokio::time::sleep(HELLO_INTERVAL * 2).await;
            assert!(guest_accept(&mut guest).await.unwrap());
            let mut first = [0u8; 5];
            guest.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"yamux");
            guest.write_all(b"reply").await.unwrap();
        });
        host_connect(&mut host, Duration::from_secs(5))
            .await
            .unwrap();
        host.write_all(b"yamux").await.unwrap();
        let mut reply = [0u8; 5];
        host.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
        guest_task.await.unwrap();
    }

    #[tokio::test]
    async fn host_times_out_without_an_agent() {
        let (mut host, _guest) = tokio::io::duplex(1 << 20);
        let error = host_connect(&mut host, Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(matches!(error, HandshakeError::TimedOut(_)), "{error}");
    }

    #[tokio::test]
    async fn guest_reports_end_of_file() {
        let (host, mut guest) = tokio::io::duplex(64);
        drop(host);
        assert!(!guest_accept(&mut guest).await.unwrap());
    }
}
