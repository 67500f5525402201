//! Reaching an upstream: check the host, resolve it once, check every address, connect to
//! exactly a checked address; and the TLS trust used toward upstreams.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use http::StatusCode;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::address::{classify_ip, Host};
use crate::policy::EgressPolicy;
use crate::proxy::{EgressProxy, ProxyError};

/// Why a target was not reached, as the tool will be told.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub reason: String,
    /// The address connected to or refused, when resolving got that far.
    pub ip: Option<IpAddr>,
    /// Denied by policy (as opposed to failing upstream).
    pub denied: bool,
}

impl Refusal {
    pub(crate) fn denied(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::FORBIDDEN,
            reason: reason.into(),
            ip: None,
            denied: true,
        }
    }
    pub(crate) fn failed(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_GATEWAY,
            reason: reason.into(),
            ip: None,
            denied: false,
        }
    }
    fn at(mut self, ip: IpAddr) -> Refusal {
        self.ip = Some(ip);
        self
    }
}

impl EgressProxy {
    /// Checks `host:port` against `policy` (none: only the address checks, for the proxy's own
    /// requests such as GCP token fetches), resolves it once, refuses internal addresses not
    /// inside an operator CIDR, and connects to a checked address.
    pub(crate) async fn connect_checked(
        &self,
        policy: Option<&EgressPolicy>,
        host: &Host,
        port: u16,
    ) -> Result<(TcpStream, IpAddr), Refusal> {
        if port == 0 {
            return Err(Refusal::denied("port 0"));
        }
        if let Some(policy) = policy {
            policy
                .check_host(host, port, &self.default_ports)
                .map_err(Refusal::denied)?;
        }
        let ips = match host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => self.resolver.lookup(name).await.map_err(Refusal::failed)?,
        };
        // A mapped address reaches its IPv4 host: judge and connect to that one.
        let ips: Vec<IpAddr> = ips.into_iter().map(|ip| ip.to_canonical()).collect();
        // Every address must pass: which one a tool ends up on must not matter.
        for ip in &ips {
            self.check_address(host, *ip).map_err(|r| r.at(*ip))?;
        }
        if let Some(policy) = policy {
            policy
                .check_ips(host, &ips, port, &self.default_ports)
                .map_err(|r| Refusal::denied(r).at(ips[0]))?;
        }
        let mut last = String::new();
        for ip in &ips {
            let addr = SocketAddr::new(*ip, port);
            match tokio::time::timeout(self.limits.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, *ip));
                }
                Ok(Err(e)) => last = format!("connecting to {addr}: {e}"),
                Err(_) => last = format!("connecting to {addr} timed out"),
            }
        }
        Err(Refusal::failed(last).at(ips[0]))
    }

    /// Internal addresses are refused unless an operator CIDR contains them.
    fn check_address(&self, host: &Host, ip: IpAddr) -> Result<(), Refusal> {
        let Some(why) = classify_ip(ip) else {
            return Ok(());
        };
        if self
            .allowed_cidrs
            .iter()
            .any(|net| net.contains(&ip) || mapped_v4(ip).is_some_and(|v4| net.contains(&v4)))
        {
            return Ok(());
        }
        let shown = match host {
            Host::Ip(_) => format!("{ip} is {why}"),
            Host::Name(n) => format!("{n} resolves to {ip}, {why}"),
        };
        Err(Refusal::denied(format!(
            "{shown}: internal addresses are never reachable"
        )))
    }

    /// TLS to an upstream over a connected stream, verifying `host` against the system roots
    /// and the operator's CAs.
    pub(crate) async fn tls_connect(
        &self,
        host: &Host,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, Refusal> {
        let name = match host {
            Host::Name(n) => ServerName::try_from(n.clone())
                .map_err(|e| Refusal::failed(format!("bad server name: {e}")))?,
            Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        };
        let connector = TlsConnector::from(self.upstream_tls.clone());
        tokio::time::timeout(self.limits.connect_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| Refusal::failed(format!("TLS handshake with {host} timed out")))?
            .map_err(|e| Refusal::failed(format!("TLS with {host}: {e}")))
    }
}

fn mapped_v4(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    }
}

/// The client TLS config for upstreams: system roots (unless off) plus the operator's CAs.
pub(crate) fn upstream_tls_config(
    system_roots: bool,
    extra: &[PathBuf],
) -> Result<Arc<rustls::ClientConfig>, ProxyError> {
    let mut roots = RootCertStore::empty();
    if system_roots {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "skipping a system root certificate");
        }
        roots.add_parsable_certificates(native.certs);
    }
    for path in extra {
        let roots_err = |message: String| ProxyError::Roots {
            path: path.clone(),
            message,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| roots_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| roots_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(roots_err("no certificate in the file".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| roots_err(e.to_string()))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ProxyError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
