//! Splices an upgraded WebSocket between the client and the agent, byte for byte, while
//! tracking the agent's frame boundaries so that, when the server shuts down, it can end the
//! client's side with a close frame of its own (spec §3.3.7: 1001 means "server going away,
//! reattach"; the command keeps running in the agent).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// "Going away": the JS client reconnects at once; Python reconnects with its backoff.
const CLOSE_GOING_AWAY: u16 = 1001;
/// Before `started`, spec §3.3.7 asks for 1000: both clients re-issue the same `command_id`,
/// whereas JS surfaces a 1001 before `started` as an error.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_REASON: &[u8] = b"server shutting down";
/// How long shutdown waits for the agent to finish the frame it is sending.
const FINISH_FRAME_WITHIN: Duration = Duration::from_secs(2);
/// How long, after our close frame, the client may still send (its close answer).
const CLIENT_CLOSE_GRACE: Duration = Duration::from_secs(1);
const BUFFER_BYTES: usize = 64 * 1024;

/// Copies both ways until both sides end (as `copy_bidirectional` does), or until
/// `going_away` fires: then the agent's current frame is finished and the client gets a
/// close frame instead of the rest of the stream.
pub async fn splice<C, A>(client: C, agent: A, going_away: CancellationToken)
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut agent_rd, mut agent_wr) = tokio::io::split(agent);
    let up = async {
        let _ = tokio::io::copy(&mut client_rd, &mut agent_wr).await;
        let _ = agent_wr.shutdown().await;
    };
    let down = async {
        let ending = forward_frames(&mut agent_rd, &mut client_wr, &going_away).await;
        if let Ending::GoingAway { code } = ending {
            let _ = client_wr.write_all(&close_frame(code)).await;
        }
        let _ = client_wr.shutdown().await;
        ending
    };
    tokio::pin!(up, down);
    tokio::select! {
        () = &mut up => {
            down.await;
        }
        ending = &mut down => match ending {
            Ending::GoingAway { .. } | Ending::Abandoned => {
                let _ = tokio::time::timeout(CLIENT_CLOSE_GRACE, up).await;
            }
            Ending::AgentEnded => up.await,
        },
    }
}

/// Why the agent-to-client direction stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The agent closed (or the copy failed): the stream ended on its own.
    AgentEnded,
    /// Shutdown, at a frame boundary: the client should get a close frame with `code`.
    GoingAway { code: u16 },
    /// Shutdown, but the agent did not finish its frame in time: no clean close is possible.
    Abandoned,
}

/// Copies agent bytes to the client, stopping only at a frame boundary once `going_away`
/// fires (a close frame in the middle of another frame would corrupt the stream). Only the
/// read is ever raced against `going_away`, so no byte read is lost.
async fn forward_frames<R, W>(
    agent: &mut R,
    client: &mut W,
    going_away: &CancellationToken,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = FrameTracker::default();
    let mut buffer = vec![0u8; BUFFER_BYTES];
    let mut finish_by = None;
    loop {
        let mut limit = buffer.len();
        if finish_by.is_some() && !frames.agent_closed {
            match frames.bytes_to_boundary() {
                None => {
                    return Ending::GoingAway {
                        code: frames.close_code(),
                    }
                }
                Some(left) => limit = left.min(limit),
            }
        }
        let read = match finish_by {
            Some(deadline) => {
                match tokio::time::timeout_at(deadline, agent.read(&mut buffer[..limit])).await {
                    Ok(read) => read,
                    Err(_) => return Ending::Abandoned,
                }
            }
            None => tokio::select! {
                read = agent.read(&mut buffer[..limit]) => read,
                () = going_away.cancelled() => {
                    finish_by = Some(tokio::time::Instant::now() + FINISH_FRAME_WITHIN);
                    continue;
                }
            },
        };
        let n = match read {
            Ok(0) | Err(_) => return Ending::AgentEnded,
            Ok(n) => n,
        };
        if client.write_all(&buffer[..n]).await.is_err() || client.flush().await.is_err() {
            return Ending::AgentEnded;
        }
        frames.advance(&buffer[..n]);
    }
}

/// An unmasked (server-to-client) close frame with `code` and a short reason.
fn close_frame(code: u16) -> Vec<u8> {
    let mut frame = vec![0x88, (2 + CLOSE_REASON.len()) as u8];
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(CLOSE_REASON);
    frame
}

/// Follows RFC 6455 frame headers through a byte stream, to know where frames end.
#[derive(Debug, Default)]
struct FrameTracker {
    /// Bytes of the current header seen so far (at most 14).
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// Data frames (text, binary, continuation) whose header has passed.
    data_frames: u64,
    /// The agent sent a close frame.
    agent_closed: bool,
}

impl FrameTracker {
    /// 1001 once the client has had a message (so `started`), else 1000.
    fn close_code(&self) -> u16 {
        if self.data_frames > 0 {
            CLOSE_GOING_AWAY
        } else {
            CLOSE_NORMAL
        }
    }

    fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.payload_left == 0
    }

    /// At most how many bytes may be read without passing the end of the current frame;
    /// `None` at a boundary.
    fn bytes_to_boundary(&self) -> Option<usize> {
        if self.at_boundary() {
            return None;
        }
        if self.payload_left > 0 {
            return Some(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
        }
        // Inside a header: read just up to its end, which the first two bytes tell.
        let have = self.header.len();
        Some(
            header_len(&self.header)
                .map_or(2 - have.min(2), |len| len - have)
                .max(1),
        )
    }

    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let take = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= take as u64;
                bytes = &bytes[take..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            if header_len(&self.header) == Some(self.header.len()) {
                self.finish_header();
            }
        }
    }

    fn finish_header(&mut self) {
        let opcode = self.header[0] & 0x0f;
        match opcode {
            0x0..=0x2 => self.data_frames += 1,
            0x8 => self.agent_closed = true,
            _ => {}
        }
        self.payload_left = payload_len(&self.header);
        self.header.clear();
    }
}

/// The full header length, once its first two bytes are known.
fn header_len(header: &[u8]) -> Option<usize> {
    let second = *header.get(1)?;
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    Some(2 + extended + mask)
}

/// The payload length of a complete header.
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => header[2..10]
            .iter()
            .fold(0u64, |len, &byte| (len << 8) | u64::from(byte)),
        len => u64::from(len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match payload_len {
            0..=125 => frame.push(payload_len as u8),
            126..=65535 => {
                frame.push(126);
                frame.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                frame.push(127);
                frame.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        frame.extend(std::iter::repeat_n(b'x', payload_len));
        frame
    }

    #[test]
    fn tracks_boundaries_byte_by_byte_and_in_chunks() {
        let stream: Vec<u8> = [frame(1, 5), frame(9, 0), frame(2, 300), frame(1, 70_000)].concat();
        let mut one_by_one = FrameTracker::default();
        let mut boundaries = 0;
        for byte in &stream {
            assert!(one_by_one.bytes_to_boundary().is_none_or(|n| n >= 1));
            one_by_one.advance(std::slice::from_ref(byte));
            boundaries += usize::from(one_by_one.at_boundary());
        }
        assert_eq!(boundaries, 4);
        assert_eq!(one_by_one.data_frames, 3);
        assert!(!one_by_one.agent_closed);

        let mut chunked = FrameTracker::default();
        chunked.advance(&stream[..1]);
        assert_eq!(chunked.bytes_to_boundary(), Some(1));
        chunked.advance(&stream[1..2]);
        assert_eq!(chunked.bytes_to_boundary(), Some(5));
        chunked.advance(&stream[2..]);
        assert!(chunked.at_boundary());
    }

    #[test]
    fn a_close_from_the_agent_is_noticed() {
        let mut frames = FrameTracker::default();
        frames.advance(&frame(8, 2));
        assert!(frames.agent_closed && frames.at_boundary());
    }

    #[tokio::test]
    async fn going_away_finishes_the_frame_then_closes() {
        let (client, mut client_peer) = tokio::io::duplex(1 << 20);
        let (agent, mut agent_peer) = tokio::io::duplex(1 << 20);
        let going_away = CancellationToken::new();
        let task = tokio::spawn(splice(client, agent, going_away.clone()));

        let first = frame(1, 10);
        agent_peer.write_all(&first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        client_peer.read_exact(&mut got).await.unwrap();
        // Half a frame is in flight when shutdown begins: it must be completed first.
        let second = frame(1, 1000);
        agent_peer.write_all(&second[..500]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        going_away.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        agent_peer.write_all(&second[500..]).await.unwrap();
        agent_peer.write_all(&frame(1, 7)).await.unwrap();

        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(&rest[..second.len()], &second[..]);
        assert_eq!(&rest[second.len()..], &close_frame(1001)[..]);
        drop(client_peer);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn going_away_before_any_message_closes_normally() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (agent, _agent_peer) = tokio::io::duplex(1024);
        let going_away = CancellationToken::new();
        going_away.cancel();
        splice(client, agent, going_away).await;
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, close_frame(1000));
    }
}
