//! The test harness shared by the egress suites: a real proxy on a loopback listener, curl
//! through it, raw proxy requests, and the events it recorded.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cordon_api::proxy_config::ProxyConfig;
use cordon_proxy::{
    EgressEvent, EgressPolicy, EgressProxy, ProxySettings, ResolverSettings, SandboxEgress,
};
use cordon_testkit::dns::TestDns;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub port: u16,
    pub ca: PathBuf,
    pub events: Arc<Mutex<Vec<EgressEvent>>>,
    _dir: tempfile::TempDir,
}

pub struct Setup<'a> {
    pub config: serde_json::Value,
    pub cidrs: &'a [&'a str],
    pub default_ports: Vec<u16>,
    pub roots: Vec<PathBuf>,
    pub secrets: HashMap<String, String>,
    pub max_connections: usize,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            config: json!({"rules": []}),
            cidrs: &["127.0.0.0/8"],
            default_ports: vec![],
            roots: vec![],
            secrets: HashMap::new(),
            max_connections: 64,
        }
    }
}

pub async fn start(dns: &TestDns, setup: Setup<'_>) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = ProxySettings::new(dir.path().join("ca.pem"), dir.path().join("ca.key"));
    settings.system_roots = false;
    settings.extra_roots = setup.roots;
    settings.allowed_cidrs = setup.cidrs.iter().map(|c| c.parse().unwrap()).collect();
    settings.default_ports = setup.default_ports;
    settings.resolver = ResolverSettings::Nameserver(dns.addr());
    settings.limits.max_connections_per_sandbox = setup.max_connections;
    let proxy = EgressProxy::new(settings).unwrap();
    let config: ProxyConfig = serde_json::from_value(setup.config).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sandbox = SandboxEgress {
        sandbox_id: "sb-test".into(),
        policy: Arc::new(EgressPolicy::compile(&config).unwrap()),
        secrets: Arc::new(setup.secrets),
        recorder: events.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(proxy.serve_tcp(listener, sandbox));
    Proxy {
        port,
        ca: dir.path().join("ca.pem"),
        events,
        _dir: dir,
    }
}

pub struct Curl {
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

/// curl through the proxy, trusting `cacert`; `extra` are more curl arguments.
pub async fn curl(proxy: &Proxy, cacert: &Path, url: &str, extra: &[&str]) -> Curl {
    let out = tokio::process::Command::new("curl")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args([
            "-sS",
            "--max-time",
            "20",
            "--noproxy",
            "",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--proxy")
        .arg(format!("http://127.0.0.1:{}", proxy.port))
        .arg("--cacert")
        .arg(cacert)
        .args(extra)
        .arg(url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Curl {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends one raw request line to the proxy and returns the status code of its answer.
pub async fn raw(proxy: &Proxy, request: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

pub async fn raw_connect(proxy: &Proxy, target: &str) -> u16 {
    raw(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    )
    .await
}

pub fn events(p: &Proxy) -> Vec<EgressEvent> {
    p.events.lock().unwrap().clone()
}

pub fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}
