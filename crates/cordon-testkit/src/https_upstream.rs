//! A local HTTP(S) upstream for egress tests: its own rcgen CA (so a client or proxy must be
//! told to trust it), a certificate for `localhost`, 127.0.0.1 and any names given, and a
//! record of every request (method, path, headers, body). Responses are 200 `ok` unless a
//! path is scripted (e.g. a 302 to an internal address).
//!
//! ```no_run
//! # async fn f() {
//! use cordon_testkit::https_upstream::{HttpsUpstream, ScriptedResponse};
//! let up = HttpsUpstream::start_with_names(&["api.test"]).await;
//! up.script("/redirect", ScriptedResponse::redirect("http://169.254.169.254/"));
//! // trust up.ca_pem_path(), connect to up.addr(), then inspect up.requests()
//! # }
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use tokio::net::TcpListener;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// In arrival order, names lower-case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct ScriptedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ScriptedResponse {
    pub fn redirect(location: &str) -> ScriptedResponse {
        ScriptedResponse {
            status: 302,
            headers: vec![("location".into(), location.into())],
            body: Vec::new(),
        }
    }
    /// Switches protocols (101, echoing the request's `Upgrade`) and echoes every byte
    /// sent on the switched connection.
    pub fn upgrade_echo() -> ScriptedResponse {
        ScriptedResponse {
            status: 101,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
    pub fn json(status: u16, body: &serde_json::Value) -> ScriptedResponse {
        ScriptedResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }
}

#[derive(Default)]
struct State {
    requests: Vec<RecordedRequest>,
    scripts: HashMap<String, ScriptedResponse>,
}

pub struct HttpsUpstream {
    addr: SocketAddr,
    ca_pem: String,
    ca_file: Option<tempfile::NamedTempFile>,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsUpstream {
    /// HTTPS on 127.0.0.1 (a free port), certificate for `localhost` and 127.0.0.1.
    pub async fn start() -> HttpsUpstream {
        Self::start_with_names(&[]).await
    }

    /// HTTPS with `names` added to the certificate.
    pub async fn start_with_names(names: &[&str]) -> HttpsUpstream {
        let (ca_pem, server_config) = make_tls(names);
        let mut ca_file = tempfile::NamedTempFile::new().expect("CA temp file");
        std::io::Write::write_all(&mut ca_file, ca_pem.as_bytes()).expect("write CA");
        Self::listen(
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config))),
            ca_pem,
            Some(ca_file),
        )
        .await
    }

    /// Plain HTTP (no TLS) with the same recording and scripting.
    pub async fn start_plain() -> HttpsUpstream {
        Self::listen(None, String::new(), None).await
    }

    async fn listen(
        tls: Option<tokio_rustls::TlsAcceptor>,
        ca_pem: String,
        ca_file: Option<tempfile::NamedTempFile>,
    ) -> HttpsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                // As real servers do: without it, Nagle holds the TLS handshake's later
                // records until an ACK that a splicing proxy delays (40 ms per connection).
                let _ = tcp.set_nodelay(true);
                let (st, tls) = (st.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(tcp), svc)
                                .with_upgrades()
                                .await;
                        }
                    }
                });
            }
        });
        HttpsUpstream {
            addr,
            ca_pem,
            ca_file,
            state,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream's CA certificate (PEM); empty for a plain upstream.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A file holding [`ca_pem`](Self::ca_pem), alive as long as the upstream.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.ca_file
            .as_ref()
            .expect("a TLS upstream")
            .path()
            .to_path_buf()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Answer requests whose path (without query) is `path` with `response`.
    pub fn script(&self, path: &str, response: ScriptedResponse) {
        self.state
            .lock()
            .unwrap()
            .scripts
            .insert(path.to_string(), response);
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Taken before the body is read: a 101 script echoes on the switched connection.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes().to_vec())
        .unwrap_or_default();
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    let mut st = state.lock().unwrap();
    st.requests.push(recorded);
    let scripted = st.scripts.get(parts.uri.path()).cloned();
    drop(st);
    if let Some(s) = scripted.as_ref().filter(|s| s.status == 101) {
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let upgrade = parts.headers.get(http::header::UPGRADE).cloned();
        r.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        r.headers_mut().insert(
            http::header::UPGRADE,
            upgrade.unwrap_or(http::HeaderValue::from_static("websocket")),
        );
        for (n, v) in &s.headers {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(n.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                r.headers_mut().append(n, v);
            }
        }
        return Ok(r);
    }
    let mut resp = match scripted {
        Some(s) => {
            let mut r = Response::new(Full::new(Bytes::from(s.body)));
            *r.status_mut() =
                StatusCode::from_u16(s.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (n, v) in s.headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(n.as_bytes()),
                    http::HeaderValue::from_str(&v),
                ) {
                    r.headers_mut().append(n, v);
                }
            }
            r
        }
        None => Response::new(Full::new(Bytes::from_static(b"ok"))),
    };
    resp.headers_mut()
        .insert("x-test-upstream", http::HeaderValue::from_static("1"));
    Ok(resp)
}

/// A fresh CA and a server config whose leaf covers localhost, 127.0.0.1 and `names`.
fn make_tls(names: &[&str]) -> (String, rustls::ServerConfig) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cordon test upstream CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(
        ["localhost"]
            .iter()
            .chain(names.iter())
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
    )
    .expect("leaf params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf = params.signed_by(&key, &issuer).expect("leaf cert");
    let chain = vec![leaf.der().clone(), ca_cert.der().clone()];
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca_pem, config)
}
