//! The proxy as the server holds it: settings, shared state (CA, upstream trust, resolver,
//! per-sandbox connection limits) and the entry points.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::certs::{CertificateAuthority, LeafCache};
use crate::gcp::TokenCache;
use crate::inject::SecretResolver;
use crate::policy::EgressPolicy;
use crate::record::EgressRecorder;
use crate::resolve::Resolver;

/// Which DNS server the proxy asks.
#[derive(Debug, Clone, Default)]
pub enum ResolverSettings {
    /// `/etc/resolv.conf`.
    #[default]
    System,
    /// One nameserver (UDP and TCP), e.g. a test DNS server on loopback.
    Nameserver(SocketAddr),
}

/// Bounds on what a sandbox can make the proxy hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request or response head (request line + headers).
    pub max_header_bytes: usize,
    /// Connections one sandbox may have open through the proxy at once.
    pub max_connections_per_sandbox: usize,
    /// Resolving a name.
    pub resolve_timeout: Duration,
    /// Opening the TCP connection (and TLS handshake) to an upstream.
    pub connect_timeout: Duration,
    /// Reading a request head from the tool, and an idle keep-alive connection.
    pub idle_timeout: Duration,
    /// Largest request body buffered to compute a SigV4 payload hash (others are streamed).
    pub max_signed_body_bytes: usize,
    /// Minted leaf certificates kept.
    pub leaf_cache_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_connections_per_sandbox: 256,
            resolve_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(120),
            max_signed_body_bytes: 16 << 20,
            leaf_cache_entries: 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The CA certificate (PEM). Created with its key when both files are missing.
    pub ca_cert: PathBuf,
    /// The CA private key (PEM, written 0600).
    pub ca_key: PathBuf,
    /// Trust the system's roots for upstreams (off only in tests).
    pub system_roots: bool,
    /// Extra PEM files of CAs trusted for upstreams (`--egress-ca`).
    pub extra_roots: Vec<PathBuf>,
    /// Internal ranges an operator allows anyway (`--allow-egress-cidr`).
    pub allowed_cidrs: Vec<IpNet>,
    /// Ports reachable without an access-control entry naming the port (`host:port`); empty
    /// means any port.
    pub default_ports: Vec<u16>,
    pub resolver: ResolverSettings,
    pub limits: Limits,
}

impl ProxySettings {
    /// Defaults with the CA at the given paths.
    pub fn new(ca_cert: impl Into<PathBuf>, ca_key: impl Into<PathBuf>) -> Self {
        ProxySettings {
            ca_cert: ca_cert.into(),
            ca_key: ca_key.into(),
            system_roots: true,
            extra_roots: Vec::new(),
            allowed_cidrs: Vec::new(),
            default_ports: vec![80, 443],
            resolver: ResolverSettings::System,
            limits: Limits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("egress CA {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("egress CA file {path}: {message}")]
    Roots { path: PathBuf, message: String },
    #[error("resolver: {0}")]
    Resolver(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// What the proxy needs to know about the sandbox a connection comes from.
#[derive(Clone)]
pub struct SandboxEgress {
    pub sandbox_id: String,
    /// Its compiled `proxy_config` (compile once per config change, share the Arc).
    pub policy: Arc<EgressPolicy>,
    /// Workspace secrets, looked up per request (so updates apply at once).
    pub secrets: Arc<dyn SecretResolver>,
    pub recorder: Arc<dyn EgressRecorder>,
}

/// State shared by every connection (one per server).
pub struct EgressProxy {
    pub(crate) ca: CertificateAuthority,
    pub(crate) leaves: LeafCache,
    pub(crate) upstream_tls: Arc<rustls::ClientConfig>,
    pub(crate) allowed_cidrs: Vec<IpNet>,
    pub(crate) default_ports: Vec<u16>,
    pub(crate) resolver: Resolver,
    pub(crate) limits: Limits,
    pub(crate) gcp_tokens: TokenCache,
    per_sandbox: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl EgressProxy {
    /// Loads (or creates) the CA, reads the upstream trust and sets up the resolver.
    pub fn new(settings: ProxySettings) -> Result<Arc<EgressProxy>, ProxyError> {
        let ca = CertificateAuthority::load_or_create(&settings.ca_cert, &settings.ca_key)?;
        let upstream_tls =
            crate::connect::upstream_tls_config(settings.system_roots, &settings.extra_roots)?;
        let resolver = Resolver::new(&settings.resolver, settings.limits.resolve_timeout)?;
        Ok(Arc::new(EgressProxy {
            leaves: LeafCache::new(settings.limits.leaf_cache_entries),
            ca,
            upstream_tls,
            allowed_cidrs: settings.allowed_cidrs,
            default_ports: settings.default_ports,
            resolver,
            limits: settings.limits,
            gcp_tokens: TokenCache::default(),
            per_sandbox: Mutex::new(HashMap::new()),
        }))
    }

    /// The CA certificate (PEM) sandboxes must trust.
    pub fn ca_cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Serves one tool connection to completion: CONNECT or absolute-form requests, with
    /// keep-alive. Never fails: problems are answered to the tool and recorded.
    pub async fn serve<S>(self: &Arc<Self>, stream: S, sandbox: SandboxEgress)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(permit) = self.connection_permit(&sandbox.sandbox_id) else {
            crate::http::refuse_busy(stream, &sandbox).await;
            return;
        };
        crate::http::serve_connection(self.clone(), stream, sandbox, Arc::new(permit)).await;
        self.forget_idle_sandboxes();
    }

    /// Accepts TCP connections and serves each for `sandbox` (standalone use: benchmarks,
    /// tests). Runs until the listener fails.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener, sandbox: SandboxEgress) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let sandbox = sandbox.clone();
            tokio::spawn(async move { proxy.serve(stream, sandbox).await });
        }
    }

    fn connection_permit(&self, sandbox_id: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.per_sandbox.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(sandbox_id.to_string())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(self.limits.max_connections_per_sandbox))
                })
                .clone()
        };
        sem.try_acquire_owned().ok()
    }

    /// Drops the limit entries of sandboxes with no connection open, so the map stays small.
    fn forget_idle_sandboxes(&self) {
        let mut map = self.per_sandbox.lock().unwrap_or_else(|e| e.into_inner());
        let max = self.limits.max_connections_per_sandbox;
        map.retain(|_, sem| Arc::strong_count(sem) > 1 || sem.available_permits() < max);
    }
}
