//! Egress: HTTPS through the egress proxy (`cordon-proxy`), beside the same request sent
//! directly to the same local HTTPS upstream in the same run.
//!
//! The proxy runs in this process (`EgressProxy::serve_tcp` on a loopback listener), so the
//! sandbox → host channel hop is not in these numbers (P7 measures that hop). Routes:
//! - spliced: `CONNECT plain.test:PORT`, a host no rule matches, so the proxy only checks the
//!   destination and splices bytes; TLS is end to end with the upstream;
//! - intercepted: `CONNECT api.test:PORT`, matched by a header rule, so the proxy terminates
//!   TLS with a leaf from its CA, injects the header and speaks TLS again to the upstream;
//! - direct: TCP + TLS straight to the upstream (the baseline).
//!
//! Knobs: `CORDON_BENCH_EGRESS_ROUNDS` (200 requests per route and mode),
//! `CORDON_BENCH_EGRESS_MIB` (64: the download size), `CORDON_BENCH_EGRESS_DOWNLOADS` (5).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use cordon_api::proxy_config::ProxyConfig;
use cordon_proxy::{EgressPolicy, EgressProxy, ProxySettings, ResolverSettings, SandboxEgress};
use cordon_testkit::dns::TestDns;
use cordon_testkit::https_upstream::{HttpsUpstream, ScriptedResponse};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::target_metrics::{env_or, mbps, rate_stats};
use crate::Table;

/// The host a header rule matches (intercepted) and one nothing matches (spliced).
const INTERCEPTED_HOST: &str = "api.test";
const SPLICED_HOST: &str = "plain.test";
const SMALL_PATH: &str = "/small";
const BIG_PATH: &str = "/big";

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Direct,
    Spliced,
    Intercepted,
}

const ROUTES: [Route; 3] = [Route::Direct, Route::Spliced, Route::Intercepted];

/// Everything one run talks to: the upstream, the proxy and a TLS client trusting both CAs.
struct Bench {
    upstream: HttpsUpstream,
    proxy: SocketAddr,
    tls: TlsConnector,
    _dns: TestDns,
    _dir: tempfile::TempDir,
}

/// Latency (new connection and keep-alive) and download throughput per route.
pub(crate) async fn egress(table: &mut Table) -> Result<()> {
    let rounds = env_or("CORDON_BENCH_EGRESS_ROUNDS", 200usize).max(2);
    let mib = env_or("CORDON_BENCH_EGRESS_MIB", 64usize).max(1);
    let downloads = env_or("CORDON_BENCH_EGRESS_DOWNLOADS", 5usize).max(1);
    let bench = Bench::start(mib).await?;

    // Where a new connection's time goes: the CONNECT answer alone (resolve, address check,
    // upstream TCP connect) beside a TCP connect straight to the upstream.
    let (mut connects, mut tcp) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let started = Instant::now();
        drop(
            bench
                .connect_via_proxy(SPLICED_HOST, bench.upstream.addr().port())
                .await?,
        );
        connects.push(started.elapsed());
        let started = Instant::now();
        drop(TcpStream::connect(bench.upstream.addr()).await?);
        tcp.push(started.elapsed());
    }
    // Interleaved per round so that drift (other load on the host) hits every route alike.
    let mut fresh: [Vec<Duration>; 3] = Default::default();
    for _ in 0..rounds {
        for (i, route) in ROUTES.into_iter().enumerate() {
            let started = Instant::now();
            let mut sender = bench.open(route).await?;
            bench.get(&mut sender, route, SMALL_PATH).await?;
            fresh[i].push(started.elapsed());
        }
    }
    let mut kept: [Vec<Duration>; 3] = Default::default();
    let mut senders = Vec::with_capacity(ROUTES.len());
    for route in ROUTES {
        senders.push(bench.open(route).await?);
    }
    for _ in 0..rounds {
        for (i, route) in ROUTES.into_iter().enumerate() {
            let started = Instant::now();
            bench.get(&mut senders[i], route, SMALL_PATH).await?;
            kept[i].push(started.elapsed());
        }
    }
    drop(senders);
    let mut rates: [Vec<f64>; 3] = Default::default();
    for _ in 0..downloads {
        for (i, route) in ROUTES.into_iter().enumerate() {
            let started = Instant::now();
            let mut sender = bench.open(route).await?;
            let bytes = bench.get(&mut sender, route, BIG_PATH).await?;
            ensure!(bytes == (mib << 20) as u64, "downloaded {bytes} bytes");
            rates[i].push(mbps(bytes, started.elapsed()));
        }
    }
    bench.check_injection()?;

    let direct = "direct to the same upstream";
    table.row(
        "egress CONNECT answered (resolve + check + connect)",
        &connects,
        "TCP connect to the upstream",
        &tcp,
        "",
    );
    for (mode, samples) in [("new connection", &fresh), ("keep-alive", &kept)] {
        table.row(
            &format!("egress HTTPS GET, {mode}, spliced (CONNECT, no rule)"),
            &samples[1],
            direct,
            &samples[0],
            "",
        );
        table.row(
            &format!("egress HTTPS GET, {mode}, intercepted (header rule)"),
            &samples[2],
            direct,
            &samples[0],
            "",
        );
    }
    let (base50, base_min) = rate_stats(&rates[0]);
    for (name, i) in [("spliced", 1), ("intercepted", 2)] {
        let (o50, omin) = rate_stats(&rates[i]);
        table.row_text([
            &format!("egress HTTPS download of {mib} MiB, {name}"),
            &format!("{o50:.0} / {omin:.0} MB/s"),
            direct,
            &format!("{base50:.0} / {base_min:.0} MB/s"),
            &format!("{:.2}×", o50 / base50),
            "",
        ]);
    }
    table.notes.push(format!(
        "egress: in-process cordon-proxy (serve_tcp on loopback), so the sandbox→host channel \
         hop is not included (P7 measures it); {rounds} GETs of a 2-byte body per route and \
         mode, new connection = TCP + CONNECT + TLS + GET; downloads: MB/s median / slowest of \
         {downloads}, each on a new connection"
    ));
    Ok(())
}

impl Bench {
    async fn start(mib: usize) -> Result<Bench> {
        // An error means a provider is installed already, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let upstream = HttpsUpstream::start_with_names(&[INTERCEPTED_HOST, SPLICED_HOST]).await;
        upstream.script(
            BIG_PATH,
            ScriptedResponse {
                status: 200,
                headers: vec![("content-type".into(), "application/octet-stream".into())],
                body: vec![0x5a; mib << 20],
            },
        );
        let dns = TestDns::start().await;
        for host in [INTERCEPTED_HOST, SPLICED_HOST] {
            dns.set(host, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        }
        let dir = tempfile::Builder::new()
            .prefix("cordon-bench-egress-")
            .tempdir()?;
        let mut settings = ProxySettings::new(dir.path().join("ca.pem"), dir.path().join("ca.key"));
        settings.system_roots = false;
        settings.extra_roots = vec![upstream.ca_pem_path()];
        settings.allowed_cidrs = vec!["127.0.0.0/8".parse()?];
        settings.default_ports = Vec::new();
        settings.resolver = ResolverSettings::Nameserver(dns.addr());
        let proxy = EgressProxy::new(settings).context("start the egress proxy")?;
        let config: ProxyConfig = serde_json::from_value(json!({"rules": [{
            "name": "bench", "match_hosts": [INTERCEPTED_HOST],
            "headers": [{"name": "X-Bench-Token", "type": "plaintext", "value": "bench-secret"}]
        }]}))?;
        let sandbox = SandboxEgress {
            sandbox_id: "bench".into(),
            policy: Arc::new(EgressPolicy::compile(&config).map_err(|e| anyhow::anyhow!("{e}"))?),
            secrets: Arc::new(()),
            recorder: Arc::new(()),
        };
        let tls = client_tls(&[upstream.ca_pem(), proxy.ca_cert_pem()])?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = listener.local_addr()?;
        tokio::spawn(proxy.serve_tcp(listener, sandbox));
        Ok(Bench {
            upstream,
            proxy: proxy_addr,
            tls,
            _dns: dns,
            _dir: dir,
        })
    }

    /// A TLS connection ready for HTTP/1.1 requests, along `route`.
    async fn open(&self, route: Route) -> Result<SendRequest<Empty<Bytes>>> {
        let port = self.upstream.addr().port();
        let (tcp, host) = match route {
            Route::Direct => (
                TcpStream::connect(self.upstream.addr()).await?,
                INTERCEPTED_HOST,
            ),
            Route::Spliced => (
                self.connect_via_proxy(SPLICED_HOST, port).await?,
                SPLICED_HOST,
            ),
            Route::Intercepted => (
                self.connect_via_proxy(INTERCEPTED_HOST, port).await?,
                INTERCEPTED_HOST,
            ),
        };
        tcp.set_nodelay(true)?;
        let tls = self
            .tls
            .connect(ServerName::try_from(host.to_string())?, tcp)
            .await
            .with_context(|| format!("TLS to {host}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// A tunnel to `host:port` through the proxy (`CONNECT`, answered 200).
    async fn connect_via_proxy(&self, host: &str, port: u16) -> Result<TcpStream> {
        let mut tcp = TcpStream::connect(self.proxy).await?;
        tcp.set_nodelay(true)?;
        let request = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            ensure!(head.len() < 16 << 10, "CONNECT answer too long");
            if tcp.read(&mut byte).await? == 0 {
                bail!("the proxy closed the CONNECT to {host}");
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        ensure!(
            head.starts_with("HTTP/1.1 200"),
            "CONNECT {host}: {}",
            head.lines().next().unwrap_or("")
        );
        Ok(tcp)
    }

    /// One GET; returns the body's length (read chunk by chunk, never kept).
    async fn get(
        &self,
        sender: &mut SendRequest<Empty<Bytes>>,
        route: Route,
        path: &str,
    ) -> Result<u64> {
        let host = if route == Route::Spliced {
            SPLICED_HOST
        } else {
            INTERCEPTED_HOST
        };
        let request = http::Request::get(path)
            .header(
                http::header::HOST,
                format!("{host}:{}", self.upstream.addr().port()),
            )
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        ensure!(
            response.status() == 200,
            "GET {path} via {host}: {}",
            response.status()
        );
        let mut body = response.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                bytes += data.len() as u64;
            }
        }
        Ok(bytes)
    }

    /// The intercepted route really went through the rule (else the comparison means nothing).
    fn check_injection(&self) -> Result<()> {
        let requests = self.upstream.requests();
        let injected = requests
            .iter()
            .filter(|r| r.header("x-bench-token") == Some("bench-secret"))
            .count();
        ensure!(injected > 0, "no request carried the injected header");
        Ok(())
    }
}

/// A client configuration trusting exactly the given PEM CAs.
fn client_tls(ca_pems: &[&str]) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in ca_pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert?)?;
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
