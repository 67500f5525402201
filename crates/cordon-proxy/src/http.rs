//! The proxy protocol toward the tool: HTTP/1.1 with `CONNECT host:port` (spliced, or
//! intercepted when a rule names the host) and absolute-form `http://` requests (forwarded
//! with keep-alive toward the tool). Refusals are answered with the spec's error body.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::address::{parse_host, Host};
use crate::connect::Refusal;
use crate::proxy::{EgressProxy, SandboxEgress};
use crate::record::{Decision, EgressEvent, EgressMode, EgressRecorder};

/// Body errors as one concrete type (a boxed trait object trips hyper's bounds in spawned
/// futures).
pub(crate) type BoxError = std::io::Error;
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;

/// A connection's slot in its sandbox's connection limit, shared with the tunnel it becomes.
pub(crate) type ConnectionPermit = Arc<tokio::sync::OwnedSemaphorePermit>;

/// Serves HTTP/1.1 proxy requests on one tool connection.
/// `permit` is the connection's slot in the sandbox's limit; a CONNECT tunnel outlives this
/// function (hyper hands the upgraded stream over), so the tunnel keeps a clone of it.
pub(crate) async fn serve_connection<S>(
    proxy: Arc<EgressProxy>,
    stream: S,
    sandbox: SandboxEgress,
    permit: ConnectionPermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = proxy.limits.clone();
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        let sandbox = sandbox.clone();
        let permit = permit.clone();
        async move { Ok::<_, Infallible>(handle(proxy, sandbox, req, permit).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "egress connection ended");
    }
}

/// Answers a connection over the per-sandbox limit and closes it.
pub(crate) async fn refuse_busy<S>(mut stream: S, sandbox: &SandboxEgress)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body = error_json("too many connections through the egress proxy from this sandbox");
    let head = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
    tracing::warn!(sandbox = %sandbox.sandbox_id, "egress connection limit reached");
}

async fn handle(
    proxy: Arc<EgressProxy>,
    sandbox: SandboxEgress,
    req: Request<Incoming>,
    permit: ConnectionPermit,
) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        return connect(proxy, sandbox, req, permit).await;
    }
    plain_http(proxy, sandbox, req).await
}

/// Longest host and path kept in a record (the tool controls both).
const MAX_RECORDED_HOST: usize = 256;
const MAX_RECORDED_PATH: usize = 2048;

fn bounded(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Path and query as a record keeps them.
pub(crate) fn recorded_path(uri: &http::Uri) -> Option<String> {
    uri.path_and_query()
        .map(|p| bounded(p.as_str(), MAX_RECORDED_PATH))
}

/// The record of one attempt, started before the outcome is known.
pub(crate) fn event(
    sandbox: &SandboxEgress,
    mode: EgressMode,
    method: &str,
    host: &str,
    port: u16,
) -> EgressEvent {
    EgressEvent {
        sandbox_id: sandbox.sandbox_id.clone(),
        time: SystemTime::now(),
        mode,
        method: method.to_string(),
        host: bounded(host, MAX_RECORDED_HOST),
        port,
        ip: None,
        path: None,
        status: None,
        bytes_up: 0,
        bytes_down: 0,
        decision: Decision::Allowed,
        reason: None,
        injected: Vec::new(),
    }
}

/// Records a refusal and builds the answer the tool gets.
pub(crate) fn refuse(
    sandbox: &SandboxEgress,
    mut ev: EgressEvent,
    refusal: Refusal,
) -> Response<ProxyBody> {
    ev.status = Some(refusal.status.as_u16());
    ev.decision = if refusal.denied {
        Decision::Denied
    } else {
        Decision::Allowed
    };
    ev.reason = Some(refusal.reason.clone());
    ev.ip = ev.ip.or(refusal.ip);
    tracing::info!(sandbox = %sandbox.sandbox_id, host = %ev.host, port = ev.port, reason = %refusal.reason, "egress refused");
    sandbox.recorder.record(ev);
    error_response(refusal.status, &refusal.reason)
}

fn error_json(message: &str) -> String {
    serde_json::json!({"error": "EgressDenied", "message": message, "detail": message}).to_string()
}

pub(crate) fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(full(error_json(message)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-cordon-egress", HeaderValue::from_static("denied"));
    resp
}

pub(crate) fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// `host:port` of a CONNECT target or URL authority.
fn target(
    authority: &http::uri::Authority,
    default_port: Option<u16>,
) -> Result<(Host, u16), Refusal> {
    let port = authority
        .port_u16()
        .or(default_port)
        .ok_or_else(|| Refusal::denied("CONNECT needs host:port"))?;
    let host = parse_host(authority.host()).map_err(|e| Refusal::denied(e.to_string()))?;
    Ok((host, port))
}

async fn connect(
    proxy: Arc<EgressProxy>,
    sandbox: SandboxEgress,
    req: Request<Incoming>,
    permit: ConnectionPermit,
) -> Response<ProxyBody> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut ev = event(&sandbox, EgressMode::Tunnel, "CONNECT", &raw, 0);
    let Some(authority) = req.uri().authority().cloned() else {
        return refuse(&sandbox, ev, Refusal::denied("CONNECT needs host:port"));
    };
    let (host, port) = match target(&authority, None) {
        Ok(t) => t,
        Err(r) => return refuse(&sandbox, ev, r),
    };
    ev.host = host.match_text();
    ev.port = port;
    let (tcp, ip) = match proxy
        .connect_checked(Some(&sandbox.policy), &host, port)
        .await
    {
        Ok(c) => c,
        Err(r) => return refuse(&sandbox, ev, r),
    };
    ev.ip = Some(ip);
    let intercept = sandbox.policy.intercepts(&host);
    tokio::spawn(async move {
        let _permit = permit;
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        if intercept {
            crate::intercept::run(proxy, sandbox, upgraded, host, port, ip, tcp, ev).await;
        } else {
            splice(sandbox, upgraded, tcp, ev).await;
        }
    });
    Response::new(full(Bytes::new()))
}

/// Byte-for-byte tunnel; recorded when it ends (with the bytes moved so far, also when a
/// side resets the connection).
async fn splice<S>(sandbox: SandboxEgress, client: S, upstream: TcpStream, mut ev: EgressEvent)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ev.status = Some(200);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut upstream_r, mut upstream_w) = upstream.into_split();
    // The first error ends both directions; a clean end of one half-closes the other.
    let result = tokio::try_join!(
        pump(&mut client_r, &mut upstream_w, &up),
        pump(&mut upstream_r, &mut client_w, &down),
    );
    if let Err(e) = result {
        ev.reason = Some(format!("tunnel ended: {e}"));
    }
    ev.bytes_up = up.load(Ordering::Relaxed);
    ev.bytes_down = down.load(Ordering::Relaxed);
    sandbox.recorder.record(ev);
}

/// Copies `from` to `to` until end of stream, counting bytes; then half-closes `to`.
pub(crate) async fn pump<R, W>(from: &mut R, to: &mut W, counter: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Headers that belong to one hop and never travel on.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for name in listed {
        headers.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The `Upgrade` value of a request asking to switch protocols (a WebSocket handshake).
pub(crate) fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    asks.then(|| headers.get(http::header::UPGRADE).cloned())
        .flatten()
}

/// Puts back the two hop-by-hop headers a protocol switch needs.
pub(crate) fn keep_upgrade(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    headers.insert(http::header::UPGRADE, upgrade);
}

/// Counts body bytes and records the event when the body is done (or dropped).
pub(crate) struct PendingRecord {
    pub event: Option<EgressEvent>,
    pub up: Arc<AtomicU64>,
    pub down: Arc<AtomicU64>,
    pub recorder: Arc<dyn EgressRecorder>,
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if let Some(mut ev) = self.event.take() {
            ev.bytes_up = self.up.load(Ordering::Relaxed);
            ev.bytes_down = self.down.load(Ordering::Relaxed);
            self.recorder.record(ev);
        }
    }
}

/// `body` with its data bytes added to `counter`.
pub(crate) fn counted<B>(body: B, counter: Arc<AtomicU64>) -> ProxyBody
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: std::fmt::Display,
{
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        frame
    })
    .map_err(|e| std::io::Error::other(e.to_string()))
    .boxed()
}

/// The upstream's response, passed through (3xx included: redirects are never followed),
/// recorded when its body ends.
pub(crate) fn pass_response(
    resp: Response<Incoming>,
    mut pending: PendingRecord,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(ev) = pending.event.as_mut() {
        ev.status = Some(parts.status.as_u16());
    }
    let down = pending.down.clone();
    let body = body
        .map_frame(move |frame| {
            let _keep = &pending; // recorded when the body is dropped
            if let Some(data) = frame.data_ref() {
                down.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        })
        .map_err(std::io::Error::other)
        .boxed();
    Response::from_parts(parts, body)
}

/// An absolute-form `http://host[:port]/path` request.
async fn plain_http(
    proxy: Arc<EgressProxy>,
    sandbox: SandboxEgress,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let method = req.method().to_string();
    let mut ev = event(&sandbox, EgressMode::PlainHttp, &method, "", 0);
    ev.path = recorded_path(req.uri());
    match req.uri().scheme_str() {
        Some("http") => {}
        Some(_) => {
            return refuse(
                &sandbox,
                ev,
                Refusal::denied(
                    "only http:// URLs are proxied in absolute form; use CONNECT for https",
                ),
            )
        }
        None => {
            return refuse(
                &sandbox,
                ev,
                Refusal::denied(
                    "this is a proxy: send absolute-form requests (http://host/path) or CONNECT",
                ),
            )
        }
    }
    let Some(authority) = req.uri().authority().cloned() else {
        return refuse(&sandbox, ev, Refusal::denied("request URL has no host"));
    };
    let (host, port) = match target(&authority, Some(80)) {
        Ok(t) => t,
        Err(r) => return refuse(&sandbox, ev, r),
    };
    ev.host = host.match_text();
    ev.port = port;
    let (tcp, ip) = match proxy
        .connect_checked(Some(&sandbox.policy), &host, port)
        .await
    {
        Ok(c) => c,
        Err(r) => return refuse(&sandbox, ev, r),
    };
    ev.ip = Some(ip);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(h) => h,
        Err(e) => {
            return refuse(
                &sandbox,
                ev,
                Refusal::failed(format!("HTTP with {host}: {e}")),
            )
        }
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    crate::intercept::forward(&proxy, &sandbox, &host, port, false, req, &mut sender, ev).await
}
