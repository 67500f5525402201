//! `GET /dp/{id}/tunnel` (spec §4) against a real sandbox: a yamux client over a real
//! WebSocket to an echo server inside the sandbox, the connect statuses, flow control with
//! many concurrent streams, pings and go-away.
//!
//! Needs root, the static agent (`make agent`) and the default snapshot (`cordon prepare`).

mod common;

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{Server, KEY, OTHER_KEY};
use cordon_channel::{AgentClient, ChannelStream};
use cordon_testkit::TestStateDir;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Not a test: the server process of [`Server::start`] (does nothing when run directly).
#[test]
#[ignore]
fn serve_child() {
    common::serve_child_main();
}

const ECHO_PORT: u16 = 7007;
/// Cordon's reserved in-sandbox port, with an echo server on it as the positive control.
const RESERVED_PORT: u16 = cordon_api::tunnel::EGRESS_RELAY_PORT;
const CLOSED_PORT: u16 = 7999;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[tokio::test]
async fn tunnels_into_a_sandbox() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "tunnel"})).await;
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    start_echo_servers(&dp, &[ECHO_PORT, RESERVED_PORT]).await;

    // Another workspace's key cannot open a tunnel to this sandbox.
    let (status, _) = upgrade_status(&dp, OTHER_KEY).await;
    assert_eq!(status, 404);
    let (status, _) = upgrade_status(&dp, "wrong-key").await;
    assert_eq!(status, 401);

    let tunnel = AgentClient::connect(WsBytes::new(open_tunnel(&dp).await));

    // The connect statuses (spec §4.4), each followed by the end of the stream.
    let mut echo = connect(&tunnel, ECHO_PORT).await;
    assert_eq!(read_status(&mut echo).await, 0x00);
    echo.write_all(b"ping\n").await.unwrap();
    let mut answer = [0u8; 5];
    echo.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"ping\n");
    drop(echo);
    for (port, want) in [(RESERVED_PORT, 0x01), (0, 0x01), (CLOSED_PORT, 0x02)] {
        let mut stream = connect(&tunnel, port).await;
        assert_eq!(read_status(&mut stream).await, want, "port {port}");
        assert_stream_ends(&mut stream).await;
    }
    let mut stream = tunnel.open_stream().await.unwrap();
    stream.write_all(&[0x02, 0x1b, 0x5f]).await.unwrap();
    assert_eq!(read_status(&mut stream).await, 0x03);
    assert_stream_ends(&mut stream).await;

    // Flow control: many streams at once, each moving more than four windows each way.
    let transfers = (0..12u8).map(|n| echo_bulk(&tunnel, n, 1_200_000 + usize::from(n) * 77_777));
    futures::future::join_all(transfers).await;

    // A half-close reaches the service, and its answer still comes back.
    let mut stream = connect(&tunnel, ECHO_PORT).await;
    assert_eq!(read_status(&mut stream).await, 0x00);
    stream.write_all(b"last words").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("echo ends after the half-close")
        .unwrap();
    assert_eq!(rest, b"last words");
}

#[tokio::test]
async fn pings_go_away_and_a_stopped_sandbox() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "raw"})).await;
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    start_echo_servers(&dp, &[ECHO_PORT]).await;
    let mut socket = open_tunnel(&dp).await;
    let mut frames = FrameReader::default();

    // Ping SYN on stream 0 is answered with ACK and the same opaque value.
    send(&mut socket, &header(2, SYN, 0, 0xC0FFEE)).await;
    let pong = frames
        .next_where(&mut socket, |f| f.kind == 2 && f.flags & ACK != 0)
        .await;
    assert_eq!((pong.stream, pong.length), (0, 0xC0FFEE));

    // A stream opened the way the Python client does: window update + SYN, header without
    // waiting for the ACK, split across messages at odd places.
    let mut opening = header(1, SYN, 1, 0).to_vec();
    opening.extend_from_slice(&header(0, 0, 1, 3));
    opening.extend_from_slice(&[0x01]);
    send(&mut socket, &opening[..7]).await;
    send(&mut socket, &opening[7..]).await;
    send(&mut socket, &ECHO_PORT.to_be_bytes()).await;
    let status = frames
        .next_where(&mut socket, |f| {
            f.kind == 0 && f.stream == 1 && f.length > 0
        })
        .await;
    assert_eq!(status.payload, [0x00]);
    let mut data = header(0, 0, 1, 5).to_vec();
    data.extend_from_slice(b"hello");
    send(&mut socket, &data).await;
    let echoed = frames
        .next_where(&mut socket, |f| {
            f.kind == 0 && f.stream == 1 && f.length > 0
        })
        .await;
    assert_eq!(echoed.payload, b"hello");

    // Go-away: the server ends the session, and with it the stream's connection.
    send(&mut socket, &header(3, 0, 0, 0)).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the session outlived the go-away");

    // A stopped sandbox is woken by the tunnel, as by the rest of the data plane.
    let (status, _) = server.api("POST", "/boxes/raw/stop", None).await;
    assert!(status < 300, "{status}");
    server.wait_status("raw", "stopped").await;
    let tunnel = AgentClient::connect(WsBytes::new(open_tunnel(&dp).await));
    let mut stream = connect(&tunnel, CLOSED_PORT).await;
    assert_eq!(read_status(&mut stream).await, 0x02);
}

#[tokio::test]
async fn tunnels_per_sandbox_are_bounded() {
    const MAX_TUNNELS: usize = 8;
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "many"})).await;
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();

    let mut open = Vec::new();
    for _ in 0..MAX_TUNNELS {
        open.push(open_tunnel(&dp).await);
    }
    // One more is refused before the upgrade, with the spec's error body.
    let (status, body) = upgrade_status(&dp, KEY).await;
    assert_eq!(status, 429);
    let body: Value = serde_json::from_slice(&body.expect("an error body")).unwrap();
    assert_eq!(body["detail"]["error"], "QuotaExceeded", "{body}");

    // Closing one gives its place back (once the server has seen the close).
    let mut closing = open.pop().unwrap();
    closing.close(None).await.unwrap();
    while let Some(Ok(_)) = closing.next().await {}
    let reopened = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match upgrade_status(&dp, KEY).await.0 {
                101 => break,
                429 => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("unexpected status {other}"),
            }
        }
    })
    .await;
    assert!(
        reopened.is_ok(),
        "a closed tunnel's place was not given back"
    );
    // (upgrade_status dropped that tunnel at once; wait for its place too, then fill it.)
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tokio_tungstenite::connect_async(tunnel_request(&dp, KEY)).await {
                Ok((socket, _)) => break socket,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the place of a dropped tunnel");
    open.push(last);
    assert_eq!(upgrade_status(&dp, KEY).await.0, 429);
    drop(open);
}

#[tokio::test]
async fn a_server_shutdown_sends_go_away_then_closes_with_1001() {
    let dir = TestStateDir::new();
    let mut server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "shutdown"})).await;
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    let mut socket = open_tunnel(&dp).await;
    let terminating = tokio::task::spawn_blocking(move || {
        let (_, clean) = server.terminate();
        clean
    });
    let mut frames = FrameReader::default();
    let go_away = frames.next_where(&mut socket, |f| f.kind == 3).await;
    assert_eq!(go_away.length, 0, "normal termination");
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("a close frame after the go-away");
    assert_eq!(close, Some(1001));
    assert!(terminating.await.unwrap(), "the server exits cleanly");
}

/// Starts a threaded echo server on each port inside the sandbox and waits until they listen.
async fn start_echo_servers(dp: &str, ports: &[u16]) {
    let script = r#"
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(512)
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def echo(c):
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),)).start()
"#;
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let command = format!(
        "cat > /tmp/echo.py <<'EOF'\n{script}\nEOF\nnohup python3 /tmp/echo.py {} >/dev/null 2>&1 &",
        ports.join(" ")
    );
    exec(dp, &command).await;
    let probe = format!(
        "for i in $(seq 100); do python3 -c 'import socket,sys; [socket.create_connection((\"127.0.0.1\", int(p))) for p in sys.argv[1:]]' {} 2>/dev/null && exit 0; sleep 0.1; done; exit 1",
        ports.join(" ")
    );
    let result = exec(dp, &probe).await;
    assert_eq!(
        result["exit_code"], 0,
        "echo servers did not start: {result}"
    );
}

async fn exec(dp: &str, command: &str) -> Value {
    let (status, body) = common::call(
        "POST",
        &format!("{dp}/execute"),
        Some(KEY),
        Some(json!({"command": command, "timeout": 60})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

fn tunnel_request(dp: &str, key: &str) -> http::Request<()> {
    let url = format!("{}/tunnel", dp.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("X-Api-Key", key.parse().unwrap());
    request
}

async fn open_tunnel(dp: &str) -> Socket {
    tokio_tungstenite::connect_async(tunnel_request(dp, KEY))
        .await
        .expect("tunnel WebSocket")
        .0
}

/// The HTTP status a refused upgrade gets.
async fn upgrade_status(dp: &str, key: &str) -> (u16, Option<Bytes>) {
    match tokio_tungstenite::connect_async(tunnel_request(dp, key)).await {
        Ok(_) => (101, None),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => (
            response.status().as_u16(),
            response.body().clone().map(Bytes::from),
        ),
        Err(other) => panic!("upgrade failed oddly: {other}"),
    }
}

async fn connect(tunnel: &AgentClient, port: u16) -> ChannelStream {
    let mut stream = tunnel.open_stream().await.expect("open a tunnel stream");
    let mut header = vec![0x01];
    header.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&header).await.unwrap();
    stream
}

async fn read_status(stream: &mut ChannelStream) -> u8 {
    tokio::time::timeout(Duration::from_secs(20), stream.read_u8())
        .await
        .expect("status within 20 s")
        .expect("a status byte")
}

async fn assert_stream_ends(stream: &mut ChannelStream) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the stream ends after a failed connect");
    assert!(read.is_ok() || rest.is_empty(), "{read:?}");
    assert!(rest.is_empty(), "data after a failed status: {rest:?}");
}

/// Sends `len` bytes through the echo server while reading them back, and checks them.
async fn echo_bulk(tunnel: &AgentClient, seed: u8, len: usize) {
    let mut stream = connect(tunnel, ECHO_PORT).await;
    assert_eq!(read_status(&mut stream).await, 0x00);
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writing = async {
        for chunk in data.chunks(50_000) {
            wr.write_all(chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    };
    let reading = async {
        let mut back = Vec::with_capacity(len);
        rd.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(writing, reading)
    })
    .await
    .expect("bulk echo within 120 s");
    assert_eq!(back.len(), data.len(), "stream {seed}");
    assert!(back == data, "stream {seed}: bytes differ");
}

const SYN: u16 = 0x1;
const ACK: u16 = 0x2;

fn header(kind: u8, flags: u16, stream: u32, length: u32) -> [u8; 12] {
    let mut header = [0u8; 12];
    header[1] = kind;
    header[2..4].copy_from_slice(&flags.to_be_bytes());
    header[4..8].copy_from_slice(&stream.to_be_bytes());
    header[8..12].copy_from_slice(&length.to_be_bytes());
    header
}

async fn send(socket: &mut Socket, bytes: &[u8]) {
    socket.send(Message::binary(bytes.to_vec())).await.unwrap();
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u16,
    stream: u32,
    length: u32,
    payload: Vec<u8>,
}

/// Reassembles yamux frames from the server's messages, whatever their boundaries.
#[derive(Default)]
struct FrameReader {
    buffer: Vec<u8>,
}

impl FrameReader {
    async fn next(&mut self, socket: &mut Socket) -> Frame {
        loop {
            if self.buffer.len() >= 12 {
                let kind = self.buffer[1];
                let flags = u16::from_be_bytes([self.buffer[2], self.buffer[3]]);
                let stream = u32::from_be_bytes(self.buffer[4..8].try_into().unwrap());
                let length = u32::from_be_bytes(self.buffer[8..12].try_into().unwrap());
                let body = if kind == 0 { length as usize } else { 0 };
                if self.buffer.len() >= 12 + body {
                    let payload = self.buffer[12..12 + body].to_vec();
                    self.buffer.drain(..12 + body);
                    return Frame {
                        kind,
                        flags,
                        stream,
                        length,
                        payload,
                    };
                }
            }
            let message = tokio::time::timeout(Duration::from_secs(20), socket.next())
                .await
                .expect("a message within 20 s")
                .expect("the tunnel is open")
                .expect("a WebSocket message");
            assert!(message.len() <= 1 << 20, "message over 1 MiB");
            if message.is_binary() || message.is_text() {
                self.buffer.extend_from_slice(&message.into_data());
            }
        }
    }

    async fn next_where(&mut self, socket: &mut Socket, want: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            let frame = self.next(socket).await;
            if want(&frame) {
                return frame;
            }
        }
    }
}

/// The client's WebSocket as a byte stream for yamux: reads reassemble messages; each flush
/// sends what was written in deliberately odd-sized messages, so frames never align with
/// messages (spec §4.2).
struct WsBytes {
    socket: Socket,
    unread: Bytes,
    unsent: Vec<u8>,
}

impl WsBytes {
    fn new(socket: Socket) -> WsBytes {
        WsBytes {
            socket,
            unread: Bytes::new(),
            unsent: Vec::new(),
        }
    }
}

const ODD_MESSAGE_BYTES: usize = 7_777;

impl AsyncRead for WsBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.unread.is_empty() {
                let n = buf.remaining().min(this.unread.len());
                buf.put_slice(&this.unread.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.socket).poll_next(cx)) {
                Some(Ok(message)) => {
                    assert!(message.len() <= 1 << 20, "message over 1 MiB");
                    if message.is_binary() || message.is_text() {
                        this.unread = message.into_data();
                    } else if message.is_close() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for WsBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.unsent.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while !this.unsent.is_empty() {
            let mut socket = Pin::new(&mut this.socket);
            ready!(socket.as_mut().poll_ready(cx)).map_err(io::Error::other)?;
            let n = this.unsent.len().min(ODD_MESSAGE_BYTES);
            let chunk: Vec<u8> = this.unsent.drain(..n).collect();
            socket
                .start_send(Message::binary(chunk))
                .map_err(io::Error::other)?;
        }
        Pin::new(&mut this.socket)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.socket)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}
