//! P7 of design/TARGETS.md: 1 GiB up and down through one `/tunnel` stream (spec §4: yamux
//! over a WebSocket, to a TCP service inside the sandbox), beside the same transfers to the same
//! service (`py/p7_sink_source.py`) over a plain loopback TCP connection on the host.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use cordon_channel::AgentClient;
use futures::{Sink, Stream};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::target_metrics::{env_or, mbps, rate_stats, serve, Server};
use crate::Table;

const MIB: usize = 1 << 20;
const SINK_PORT: u16 = 7101;
const SOURCE_PORT: u16 = 7102;
const KEY: &str = "cordon-bench-key";
/// Bytes gathered into one WebSocket message before it goes out (the server takes ≤ 2 MiB).
const MESSAGE_BYTES: usize = 256 * 1024;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// P7: upload and download through the tunnel beside loopback TCP to the same service.
pub(crate) async fn p7(table: &mut Table) -> Result<()> {
    let bytes = env_or("CORDON_BENCH_TUNNEL_MIB", 1024u64) << 20;
    let rounds = env_or("CORDON_BENCH_TUNNEL_ROUNDS", 3usize).max(1);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/p7_sink_source.py");

    let host_service = HostService::start(&script)?;
    let mut tcp_up = Vec::with_capacity(rounds);
    let mut tcp_down = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let sink = tokio::net::TcpStream::connect(("127.0.0.1", host_service.sink)).await?;
        tcp_up.push(upload(sink, bytes).await?);
        let source = tokio::net::TcpStream::connect(("127.0.0.1", host_service.source)).await?;
        tcp_down.push(download(source, bytes).await?);
    }
    drop(host_service);

    let data = tempfile::Builder::new()
        .prefix("cordon-bench-p7-")
        .tempdir()?;
    let server = serve(&data.path().join("data"), KEY, &[])?;
    let (tunnel_up, tunnel_down) = through_tunnel(&server, &script, bytes, rounds).await?;
    drop(server);

    let label = format!("{} MiB", bytes >> 20);
    for (direction, ours, baseline) in [
        ("upload", &tunnel_up, &tcp_up),
        ("download", &tunnel_down, &tcp_down),
    ] {
        let (o50, omin) = rate_stats(ours);
        let (b50, bmin) = rate_stats(baseline);
        table.row_text([
            &format!("P7 tunnel {direction} of {label}, one stream"),
            &format!("{o50:.0} / {omin:.0} MB/s"),
            "same over loopback TCP",
            &format!("{b50:.0} / {bmin:.0} MB/s"),
            &format!("{:.2}×", o50 / b50),
            "",
        ]);
    }
    table.notes.push(format!(
        "P7: MB/s median / slowest of {rounds} rounds; both sides talk to py/p7_sink_source.py \
         (in the sandbox through /tunnel, on the host directly)"
    ));
    Ok(())
}

/// Creates a sandbox, starts the service in it, and times the transfers through one tunnel.
async fn through_tunnel(
    server: &Server,
    script: &Path,
    bytes: u64,
    rounds: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (status, sandbox) = api(
        &server.url,
        "POST",
        "/api/v2/sandboxes/boxes",
        json!({"name": "bench-p7"}),
    )
    .await?;
    ensure!(status == 200, "create failed: {status} {sandbox}");
    let dp = sandbox["dataplane_url"]
        .as_str()
        .context("no dataplane_url")?
        .to_string();
    let source = std::fs::read_to_string(script)?;
    let start = format!(
        "cat > /tmp/p7.py <<'EOF'\n{source}\nEOF\n\
         nohup python3 /tmp/p7.py {SINK_PORT} {SOURCE_PORT} >/dev/null 2>&1 &\n\
         for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {SOURCE_PORT}))' 2>/dev/null && exit 0; sleep 0.1; done; exit 1"
    );
    let (status, result) = api(
        &dp,
        "POST",
        "/execute",
        json!({"command": start, "timeout": 60}),
    )
    .await?;
    ensure!(
        status == 200 && result["exit_code"] == 0,
        "service did not start: {status} {result}"
    );

    let tunnel = AgentClient::connect(WsBytes::new(open_tunnel(&dp).await?));
    let mut up = Vec::with_capacity(rounds);
    let mut down = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        up.push(upload(connect(&tunnel, SINK_PORT).await?, bytes).await?);
        down.push(download(connect(&tunnel, SOURCE_PORT).await?, bytes).await?);
    }
    let (status, body) = api(
        &server.url,
        "DELETE",
        "/api/v2/sandboxes/boxes/bench-p7",
        Value::Null,
    )
    .await?;
    if status >= 300 {
        eprintln!("P7: delete of bench-p7 failed: {status} {body}");
    }
    Ok((up, down))
}

/// Writes `bytes` zeros, half-closes, and waits for the sink's count: MB/s.
async fn upload<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, bytes: u64) -> Result<f64> {
    let chunk = vec![0u8; MIB];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_string(&mut answer))
        .await
        .context("the sink's count within 60 s")??;
    let elapsed = started.elapsed();
    ensure!(
        answer.trim() == bytes.to_string(),
        "the sink counted {answer:?}, not {bytes}"
    );
    Ok(mbps(bytes, elapsed))
}

/// Asks the source for `bytes` and reads them to its end: MB/s.
async fn download<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, bytes: u64) -> Result<f64> {
    let mut buffer = vec![0u8; MIB];
    let started = Instant::now();
    stream.write_all(&bytes.to_be_bytes()).await?;
    stream.flush().await?;
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let elapsed = started.elapsed();
    ensure!(total == bytes, "downloaded {total} bytes, not {bytes}");
    Ok(mbps(bytes, elapsed))
}

/// Opens a tunnel stream to `port` (spec §4.3) and checks its status byte.
async fn connect(tunnel: &AgentClient, port: u16) -> Result<cordon_channel::ChannelStream> {
    let mut stream = tunnel.open_stream().await?;
    let mut header = vec![0x01];
    header.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&header).await?;
    let status = tokio::time::timeout(Duration::from_secs(20), stream.read_u8())
        .await
        .context("tunnel status within 20 s")??;
    ensure!(status == 0, "tunnel to port {port}: status {status:#04x}");
    Ok(stream)
}

async fn open_tunnel(dp: &str) -> Result<Socket> {
    let url = format!("{}/tunnel", dp.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("X-Api-Key", KEY.parse()?);
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

/// One JSON request with the bench's API key over a fresh HTTP/1.0 connection.
async fn api(base: &str, method: &str, path: &str, body: Value) -> Result<(u16, Value)> {
    let url = format!("{base}{path}");
    let method = method.to_string();
    tokio::task::spawn_blocking(move || blocking_api(&url, &method, &body)).await?
}

fn blocking_api(url: &str, method: &str, body: &Value) -> Result<(u16, Value)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut stream = TcpStream::connect(authority)?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {authority}\r\nX-Api-Key: {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("no end of the response head")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let value = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    Ok((status, value))
}

/// The service on the host, for the baseline: killed on drop.
struct HostService {
    child: Child,
    sink: u16,
    source: u16,
}

impl HostService {
    fn start(script: &Path) -> Result<HostService> {
        let mut child = Command::new("python3")
            .arg(script)
            .args(["0", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .context("python3 on the host")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let mut service = HostService {
            child,
            sink: 0,
            source: 0,
        };
        let ports: Vec<u16> = line
            .split_whitespace()
            .filter_map(|port| port.parse().ok())
            .collect();
        let [sink, source] = ports[..] else {
            bail!("the host service printed {line:?}, not two ports");
        };
        (service.sink, service.source) = (sink, source);
        Ok(service)
    }
}

impl Drop for HostService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tunnel's WebSocket as a byte stream for yamux: reads are the messages' bytes in order,
/// writes are gathered into messages sent on flush (or when [`MESSAGE_BYTES`] are waiting).
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
            unsent: Vec::with_capacity(MESSAGE_BYTES),
        }
    }

    fn poll_send_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unsent.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.socket).poll_ready(cx)).map_err(io::Error::other)?;
        let message = Message::binary(std::mem::take(&mut self.unsent));
        Pin::new(&mut self.socket)
            .start_send(message)
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(()))
    }
}

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
                Some(Ok(Message::Binary(data))) => this.unread = data,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(io::Error::other(error))),
            }
        }
    }
}

impl AsyncWrite for WsBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.unsent.len() >= MESSAGE_BYTES {
            ready!(self.poll_send_unsent(cx))?;
        }
        let room = (2 * MESSAGE_BYTES).saturating_sub(self.unsent.len());
        let n = buf.len().min(room);
        self.unsent.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_unsent(cx))?;
        Pin::new(&mut self.socket)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_unsent(cx))?;
        Pin::new(&mut self.socket)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}
