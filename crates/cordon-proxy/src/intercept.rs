//! TLS interception for hosts a rule names: the tool's TLS ends here with a leaf minted under
//! Cordon's CA, each request gets the matching rules' credentials, and goes on over TLS to the
//! address the CONNECT checked (verified against the real roots, SNI = the host).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::address::Host;
use crate::aws::{AwsSigner, Payload, SignPayload, SignTarget};
use crate::connect::Refusal;
use crate::gcp::GcpCredentials;
use crate::http::{
    counted, event, full, keep_upgrade, pass_response, pump, recorded_path, refuse,
    requested_upgrade, strip_hop_by_hop, PendingRecord, ProxyBody,
};
use crate::inject::{HeaderTemplate, SecretResolver};
use crate::policy::Action;
use crate::proxy::{EgressProxy, SandboxEgress};
use crate::record::{EgressEvent, EgressMode, InjectedHeader};

/// The upstream side of one intercepted CONNECT: the checked TCP connection until the first
/// request, then an HTTP/1.1 client over TLS, re-made (to the same address) if it closes.
struct Upstream {
    first_tcp: Option<TcpStream>,
    sender: Option<SendRequest<ProxyBody>>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<S>(
    proxy: Arc<EgressProxy>,
    sandbox: SandboxEgress,
    client: S,
    host: Host,
    port: u16,
    ip: IpAddr,
    tcp: TcpStream,
    mut connect_ev: EgressEvent,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = match proxy.leaves.get(&proxy.ca, &host) {
        Ok(c) => c,
        Err(e) => {
            connect_ev.reason = Some(format!("minting a certificate for {host}: {e}"));
            sandbox.recorder.record(connect_ev);
            return;
        }
    };
    let accepted = tokio::time::timeout(
        proxy.limits.connect_timeout,
        TlsAcceptor::from(config).accept(client),
    )
    .await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            connect_ev.reason = Some(format!(
                "the tool's TLS handshake failed (does it trust Cordon's CA?): {e}"
            ));
            sandbox.recorder.record(connect_ev);
            return;
        }
        Err(_) => {
            connect_ev.reason = Some("the tool's TLS handshake timed out".into());
            sandbox.recorder.record(connect_ev);
            return;
        }
    };
    let upstream = Arc::new(tokio::sync::Mutex::new(Upstream {
        first_tcp: Some(tcp),
        sender: None,
    }));
    let host = Arc::new(host);
    let limits = proxy.limits.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let (proxy, sandbox, upstream, host) = (
            proxy.clone(),
            sandbox.clone(),
            upstream.clone(),
            host.clone(),
        );
        async move {
            let mut ev = event(
                &sandbox,
                EgressMode::Intercepted,
                req.method().as_str(),
                &host.match_text(),
                port,
            );
            ev.ip = Some(ip);
            ev.path = recorded_path(req.uri());
            let mut up = upstream.lock().await;
            let sender = match ready_sender(&proxy, &host, ip, port, &mut up).await {
                Ok(s) => s,
                Err(r) => return Ok::<_, std::convert::Infallible>(refuse(&sandbox, ev, r)),
            };
            Ok(forward(&proxy, &sandbox, &host, port, true, req, sender, ev).await)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(tls), svc)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "intercepted connection ended");
    }
}

async fn ready_sender<'a>(
    proxy: &EgressProxy,
    host: &Host,
    ip: IpAddr,
    port: u16,
    up: &'a mut Upstream,
) -> Result<&'a mut SendRequest<ProxyBody>, Refusal> {
    if let Some(sender) = up.sender.as_mut() {
        if sender.ready().await.is_ok() {
            return Ok(up.sender.as_mut().expect("checked above"));
        }
    }
    up.sender = None;
    let tcp = match up.first_tcp.take() {
        Some(tcp) => tcp,
        None => {
            // Reconnect to the address that was checked, never to a fresh resolution.
            let addr = SocketAddr::new(ip, port);
            let tcp = tokio::time::timeout(proxy.limits.connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| Refusal::failed(format!("connecting to {addr} timed out")))?
                .map_err(|e| Refusal::failed(format!("connecting to {addr}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            tcp
        }
    };
    let tls = proxy.tls_connect(host, tcp).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| Refusal::failed(format!("HTTP with {host}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(up.sender.insert(sender))
}

/// Where a request goes: its absolute URL on the pinned host (what a signature covers).
struct Destination {
    url: String,
}

/// Applies the matching rules to one request and sends it upstream over `sender`
/// (intercepted TLS when `tls`, else plain HTTP); the answer streams back as it comes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    proxy: &EgressProxy,
    sandbox: &SandboxEgress,
    host: &Host,
    port: u16,
    tls: bool,
    req: Request<Incoming>,
    sender: &mut SendRequest<ProxyBody>,
    mut ev: EgressEvent,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let upgrade = requested_upgrade(&parts.headers);
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();
    let dest = match pin_to_host(&mut parts, host, port, tls) {
        Ok(d) => d,
        Err(r) => return refuse(sandbox, ev, r),
    };
    if !tls && sandbox.policy.intercepts(host) {
        // Credentials never cross the network in clear text (an on-path observer or a spoofed
        // DNS answer would have them): rule-matched hosts are reached over https only.
        return refuse(
            sandbox,
            ev,
            Refusal::denied(format!(
                "{host} gets credentials from a rule, which are only sent over TLS: use https"
            )),
        );
    }
    if let Some(u) = &upgrade {
        keep_upgrade(&mut parts.headers, u.clone());
    }
    let up_bytes = Arc::new(AtomicU64::new(0));
    let mut body = counted(body, up_bytes.clone());
    if let Err(r) = apply_rules(proxy, sandbox, host, &dest, &mut parts, &mut body, &mut ev).await {
        return refuse(sandbox, ev, r);
    }
    let resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                sandbox,
                ev,
                Refusal::failed(format!("upstream {host}: {e}")),
            )
        }
    };
    let pending = PendingRecord {
        event: Some(ev),
        up: up_bytes,
        down: Arc::new(AtomicU64::new(0)),
        recorder: sandbox.recorder.clone(),
    };
    match (resp.status(), client_upgrade) {
        (StatusCode::SWITCHING_PROTOCOLS, Some(client)) if upgrade.is_some() => {
            switch_protocols(resp, client, pending)
        }
        _ => pass_response(resp, pending),
    }
}

/// The upstream agreed to switch protocols (WebSocket): answer the tool with its 101 and
/// splice the two upgraded connections; the credentials went with the handshake.
fn switch_protocols(
    mut resp: Response<Incoming>,
    client: OnUpgrade,
    mut pending: PendingRecord,
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let upgrade = parts.headers.get(http::header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade {
        keep_upgrade(&mut parts.headers, u);
    }
    if let Some(ev) = pending.event.as_mut() {
        ev.status = Some(101);
    }
    tokio::spawn(async move {
        let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
            return; // recorded as it is when `pending` drops
        };
        let (mut client_r, mut client_w) = tokio::io::split(TokioIo::new(client));
        let (mut up_r, mut up_w) = tokio::io::split(TokioIo::new(upstream));
        let _ = tokio::try_join!(
            pump(&mut client_r, &mut up_w, &pending.up),
            pump(&mut up_r, &mut client_w, &pending.down),
        );
    });
    Response::from_parts(parts, full(Bytes::new()))
}

/// Makes the request go to the checked host and nowhere else: origin-form URI, `Host` set
/// to the pinned host whatever the tool sent, hop-by-hop headers dropped.
fn pin_to_host(
    parts: &mut Parts,
    host: &Host,
    port: u16,
    tls: bool,
) -> Result<Destination, Refusal> {
    strip_hop_by_hop(&mut parts.headers);
    let (scheme, default_port) = if tls { ("https", 443) } else { ("http", 80) };
    let authority = if port == default_port {
        host.to_string()
    } else {
        format!("{host}:{port}")
    };
    let host_value = HeaderValue::from_str(&authority).map_err(|_| Refusal::denied("bad host"))?;
    parts.headers.insert(http::header::HOST, host_value);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    parts.uri = path_and_query
        .parse::<Uri>()
        .map_err(|_| Refusal::denied("bad request path"))?;
    let url = format!("{scheme}://{authority}{path_and_query}");
    Ok(Destination { url })
}

/// Adds the credentials of every rule matching the request, in config order, and notes
/// which headers each set. A rule whose credentials cannot be produced refuses the request.
async fn apply_rules(
    proxy: &EgressProxy,
    sandbox: &SandboxEgress,
    host: &Host,
    dest: &Destination,
    parts: &mut Parts,
    body: &mut ProxyBody,
    ev: &mut EgressEvent,
) -> Result<(), Refusal> {
    let path = parts.uri.path().to_string();
    if has_dot_segment(&path) {
        // Rules match the path as sent and the upstream resolves `..` after: `/public/../admin`
        // would carry `/public/**` credentials to `/admin`. Tools normalise paths themselves.
        return Err(Refusal::denied(
            "a path with `.` or `..` segments (plain or %2e-encoded) is refused on hosts where \
             credentials are injected",
        ));
    }
    let rules: Vec<_> = sandbox
        .policy
        .matching_rules(host, &path, &parts.headers)
        .cloned()
        .collect();
    let secrets = &*sandbox.secrets;
    for rule in &rules {
        let applied = match &rule.action {
            Action::Headers(templates) => {
                apply_headers(templates, secrets, &mut parts.headers).await
            }
            Action::Aws(signer) => apply_aws(proxy, signer, secrets, host, dest, parts, body).await,
            Action::Gcp(creds) => apply_gcp(proxy, creds, secrets, &mut parts.headers).await,
        };
        let names = applied.map_err(|e| deny_502(format!("rule {:?}: {e}", rule.name)))?;
        ev.injected
            .extend(names.into_iter().map(|header| InjectedHeader {
                rule: rule.name.clone(),
                header,
            }));
    }
    Ok(())
}

/// Whether some segment of `path` is `.` or `..`, also with the dots percent-encoded.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

async fn apply_headers(
    templates: &[HeaderTemplate],
    secrets: &dyn SecretResolver,
    headers: &mut HeaderMap,
) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for t in templates {
        let value = t.render(secrets).await.map_err(|e| e.to_string())?;
        headers.insert(t.name.clone(), value);
        names.push(t.name.to_string());
    }
    Ok(names)
}

/// SigV4 over the request; reads the body (bounded) when the signature must cover it.
async fn apply_aws(
    proxy: &EgressProxy,
    signer: &AwsSigner,
    secrets: &dyn SecretResolver,
    host: &Host,
    dest: &Destination,
    parts: &mut Parts,
    body: &mut ProxyBody,
) -> Result<Vec<String>, String> {
    let host_text = host.match_text();
    let method = parts.method.to_string();
    let target = SignTarget {
        method: &method,
        uri: &dest.url,
        host: &host_text,
    };
    match signer.payload(&host_text, &parts.headers)? {
        Payload::Precomputed(hash) => {
            let payload = SignPayload::Precomputed(&hash);
            signer
                .sign(
                    target,
                    &mut parts.headers,
                    payload,
                    secrets,
                    SystemTime::now(),
                )
                .await
        }
        Payload::NeedBody => {
            let limit = proxy.limits.max_signed_body_bytes;
            let taken = std::mem::replace(body, full(Bytes::new()));
            let bytes = Limited::new(taken, limit)
                .collect()
                .await
                .map_err(|e| format!("reading the body to sign it (at most {limit} bytes): {e}"))?
                .to_bytes();
            let payload = SignPayload::Bytes(&bytes);
            let signed = signer
                .sign(
                    target,
                    &mut parts.headers,
                    payload,
                    secrets,
                    SystemTime::now(),
                )
                .await;
            *body = full(bytes);
            signed
        }
    }
}

async fn apply_gcp(
    proxy: &EgressProxy,
    creds: &GcpCredentials,
    secrets: &dyn SecretResolver,
    headers: &mut HeaderMap,
) -> Result<Vec<String>, String> {
    let token = proxy.gcp_token(creds, secrets).await?;
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token endpoint returned an unusable token".to_string())?;
    value.set_sensitive(true);
    headers.insert(http::header::AUTHORIZATION, value);
    Ok(vec!["authorization".to_string()])
}

/// A request refused because its credentials could not be produced: never sent without them.
fn deny_502(reason: String) -> Refusal {
    Refusal {
        status: StatusCode::BAD_GATEWAY,
        reason,
        ip: None,
        denied: true,
    }
}

#[cfg(test)]
mod tests {
    use super::has_dot_segment;

    #[test]
    fn dot_segments_are_found_in_every_spelling() {
        for path in [
            "/a/../b",
            "/a/./b",
            "/a/..",
            "/..",
            "/a/%2e%2E/b",
            "/a/.%2e/b",
            "/%2E/x",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/",
            "/a/b",
            "/a/..b/c",
            "/a/b../c",
            "/.well-known/x",
            "/a/%2e%2ex",
            "/a%2fb",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }
}
