//! Test support: a `cordon serve` process on a temp data dir, and a small HTTP client.
//!
//! The server runs in a child process (this test binary re-run as `serve_child`), so a test
//! can SIGKILL it and start it again on the same data dir.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cordon_runtime::{NamespaceConfig, NamespaceRuntime};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub const KEY: &str = "test-key-one";
pub const OTHER_KEY: &str = "test-key-two";

const DIR_ENV: &str = "CORDON_TEST_SERVE_DIR";
const ADDR_ENV: &str = "CORDON_TEST_SERVE_ADDR";
/// Passed to the server process: one `--insecure-registry` and one `--registry-ca`.
pub const INSECURE_ENV: &str = "CORDON_TEST_SERVE_INSECURE_REGISTRY";
pub const CA_ENV: &str = "CORDON_TEST_SERVE_REGISTRY_CA";
/// Passed to the server process: one `--internal-registry` (an HTTPS registry on loopback).
pub const INTERNAL_ENV: &str = "CORDON_TEST_SERVE_INTERNAL_REGISTRY";
/// Passed to the server process: `--service-domain` and `--signing-key-rotation` (seconds).
pub const SERVICE_DOMAIN_ENV: &str = "CORDON_TEST_SERVE_SERVICE_DOMAIN";
pub const KEY_ROTATION_ENV: &str = "CORDON_TEST_SERVE_KEY_ROTATION";
/// Passed to the server process: `max_sandboxes_per_workspace` (default 4) and the pool
/// settings (durations in milliseconds, budgets in bytes and millicores).
pub const MAX_SANDBOXES_ENV: &str = "CORDON_TEST_SERVE_MAX_SANDBOXES";
pub const POOL_TICK_MS_ENV: &str = "CORDON_TEST_SERVE_POOL_TICK_MS";
pub const POOL_WINDOW_MS_ENV: &str = "CORDON_TEST_SERVE_POOL_WINDOW_MS";
pub const POOL_COOLDOWN_MS_ENV: &str = "CORDON_TEST_SERVE_POOL_COOLDOWN_MS";
pub const POOL_MEMORY_BUDGET_ENV: &str = "CORDON_TEST_SERVE_POOL_MEMORY_BUDGET";
pub const POOL_CPU_BUDGET_ENV: &str = "CORDON_TEST_SERVE_POOL_CPU_BUDGET";

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn pools_config_from_env() -> cordon_server::PoolsConfig {
    let defaults = cordon_server::PoolsConfig::default();
    let millis = |name, default| env_number(name).map_or(default, Duration::from_millis);
    cordon_server::PoolsConfig {
        tick: millis(POOL_TICK_MS_ENV, Duration::from_millis(200)),
        demand_window: millis(POOL_WINDOW_MS_ENV, defaults.demand_window),
        scale_down_cooldown: millis(POOL_COOLDOWN_MS_ENV, defaults.scale_down_cooldown),
        memory_budget_bytes: env_number(POOL_MEMORY_BUDGET_ENV),
        cpu_budget_millicores: env_number(POOL_CPU_BUDGET_ENV),
    }
}

/// Passed to the server process: the egress flags (`--allow-egress-cidr`, `--egress-ca`,
/// comma-separated; `--egress-resolver`; `--egress-any-port` when set).
pub const EGRESS_CIDRS_ENV: &str = "CORDON_TEST_SERVE_EGRESS_CIDRS";
pub const EGRESS_CAS_ENV: &str = "CORDON_TEST_SERVE_EGRESS_CAS";
pub const EGRESS_RESOLVER_ENV: &str = "CORDON_TEST_SERVE_EGRESS_RESOLVER";
pub const EGRESS_ANY_PORT_ENV: &str = "CORDON_TEST_SERVE_EGRESS_ANY_PORT";

fn egress_settings_from_env() -> cordon_server::EgressSettings {
    let list = |name| {
        std::env::var(name)
            .map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    cordon_server::EgressSettings {
        allowed_cidrs: list(EGRESS_CIDRS_ENV)
            .iter()
            .map(|c| c.parse().expect("egress CIDR"))
            .collect(),
        extra_roots: list(EGRESS_CAS_ENV).into_iter().map(Into::into).collect(),
        resolver: std::env::var(EGRESS_RESOLVER_ENV)
            .ok()
            .map(|a| a.parse().expect("egress resolver")),
        any_port: std::env::var(EGRESS_ANY_PORT_ENV).is_ok(),
        ..Default::default()
    }
}

/// Passed to the server process: when set, it also has the microVM backend (the guest kernel
/// from `cordon prepare`'s cache, an initramfs with the agent under test, state in
/// `<data>/microvm`, as `cordon serve` sets it up) and `--default-runtime microvm`.
pub const MICROVM_ENV: &str = "CORDON_TEST_SERVE_MICROVM";

/// The microVM backend of `cordon serve` (crates/cordon/src/main.rs), for [`MICROVM_ENV`].
fn microvm_runtime(cache: &Path, data_dir: &Path) -> Arc<cordon_runtime::MicrovmRuntime> {
    let guest = cordon_image::guest::load_guest_kernel(cache)
        .expect("the guest kernel (run `cordon prepare`)");
    let state = data_dir.join("microvm");
    std::fs::create_dir_all(&state).expect("microvm state dir");
    let initramfs = state.join("initramfs.build");
    cordon_image::guest::build_initramfs(&guest, &cordon_testkit::agent_binary(), &initramfs)
        .expect("build the initramfs");
    let mut config = cordon_runtime::MicrovmConfig::new(
        &state,
        cordon_testkit::nsinit_binary(),
        &guest.kernel,
        &initramfs,
    );
    // TCG boots take seconds, more on a loaded CI box.
    config.boot_timeout = Duration::from_secs(120);
    Arc::new(cordon_runtime::MicrovmRuntime::new(config).expect("microvm runtime"))
}

/// Body of the `serve_child` test: serves when started by [`Server::start`], else returns.
pub fn serve_child_main() {
    let (Ok(dir), Ok(addr)) = (std::env::var(DIR_ENV), std::env::var(ADDR_ENV)) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async move {
        let cache = std::env::var("CORDON_CACHE_DIR").unwrap_or("/var/cache/cordon".into());
        let snapshot = cordon_image::default_snapshot::prepare(Path::new(&cache), &mut |_| {})
            .expect("default snapshot (run `cordon prepare`)");
        let runtime = NamespaceRuntime::new(NamespaceConfig::new(
            &dir,
            cordon_testkit::agent_binary(),
            cordon_testkit::nsinit_binary(),
        ))
        .expect("runtime");
        let microvm = std::env::var_os(MICROVM_ENV)
            .map(|_| microvm_runtime(Path::new(&cache), Path::new(&dir)));
        // Without it, the namespace runtime alone, as before.
        let (runtime, default_runtime): (Arc<dyn cordon_runtime::Runtime>, _) = match microvm {
            Some(vm) => (
                Arc::new(cordon_runtime::Runtimes::new(Arc::new(runtime), Some(vm))),
                cordon_runtime::Backend::Microvm,
            ),
            None => (Arc::new(runtime), Default::default()),
        };
        let config = cordon_server::ServerConfig {
            listen: addr.parse().expect("listen address"),
            data_dir: dir.into(),
            api_keys: vec![KEY.into(), OTHER_KEY.into()],
            public_url: None,
            snapshot,
            lifecycle_tick: Duration::from_secs(1),
            max_sandboxes_per_workspace: env_number(MAX_SANDBOXES_ENV).map_or(4, |n| n as usize),
            registry: cordon_server::RegistryConfig {
                insecure_registries: std::env::var(INSECURE_ENV)
                    .map(|r| vec![r])
                    .unwrap_or_default(),
                extra_root_pems: std::env::var(CA_ENV)
                    .map(|path| vec![std::fs::read(path).expect("registry CA")])
                    .unwrap_or_default(),
                internal_registries: std::env::var(INTERNAL_ENV)
                    .map(|r| vec![r])
                    .unwrap_or_default(),
            },
            snapshot_limits: cordon_server::SnapshotLimits::default(),
            service_links: cordon_server::ServiceLinksConfig {
                service_domain: std::env::var(SERVICE_DOMAIN_ENV).ok(),
                key_rotation: std::env::var(KEY_ROTATION_ENV)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .map_or(
                        cordon_server::ServiceLinksConfig::default().key_rotation,
                        Duration::from_secs,
                    ),
            },
            pools: pools_config_from_env(),
            default_runtime,
            egress: egress_settings_from_env(),
        };
        cordon_server::serve(config, runtime).await.expect("serve");
    });
}

/// A running server process; SIGKILLed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Starts a server on a free port and waits for `/healthz`.
    pub async fn start(data_dir: &Path) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        Server::start_on(data_dir, port).await
    }

    pub async fn start_on(data_dir: &Path, port: u16) -> Server {
        Server::start_with(data_dir, port, &[]).await
    }

    /// A free port for [`Server::start_with`].
    pub fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    }

    /// As [`Server::start_on`], with extra environment for the server process (e.g.
    /// [`INSECURE_ENV`], [`CA_ENV`]).
    pub async fn start_with(data_dir: &Path, port: u16, env: &[(&str, String)]) -> Server {
        let child = Command::new(std::env::current_exe().expect("test exe"))
            .args(["--exact", "serve_child", "--ignored", "--nocapture"])
            .env(DIR_ENV, data_dir)
            .env(ADDR_ENV, format!("127.0.0.1:{port}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn server");
        let server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = server.call("GET", "/healthz", None, None).await {
                return server;
            }
            assert!(Instant::now() < deadline, "server did not become healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as a service manager stopping the server would; waits for the process to
    /// exit and returns how long that took and whether it exited successfully.
    pub fn terminate(&mut self) -> (Duration, bool) {
        let started = Instant::now();
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) has no memory effects; the pid is our own, not yet reaped, child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the server") {
                return (started.elapsed(), status.success());
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM for 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A JSON request to a path of this server.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        call(method, &self.url(path), key, body).await
    }

    /// `{base}` + path under `/api/v2/sandboxes`, with [`KEY`]; panics on transport errors.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_as(KEY, method, path, body).await
    }

    pub async fn api_as(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(method, &format!("/api/v2/sandboxes{path}"), Some(key), body)
            .await
            .expect("request")
    }

    /// Creates a ready sandbox and returns its JSON.
    pub async fn create(&self, body: Value) -> Value {
        let (status, sandbox) = self.api("POST", "/boxes", Some(body)).await;
        assert_eq!(status, 200, "{sandbox}");
        assert_eq!(sandbox["status"], "ready", "{sandbox}");
        sandbox
    }

    /// Polls `/status` until it says `want`.
    pub async fn wait_status(&self, name: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, status) = self
                .api("GET", &format!("/boxes/{name}/status"), None)
                .await;
            if status["status"] == want {
                return;
            }
            assert!(Instant::now() < deadline, "status stuck at {status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One JSON request; the body parsed as JSON (`Null` when empty or not JSON).
pub async fn call(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let mut headers = vec![("content-type", "application/json".to_string())];
    if let Some(key) = key {
        headers.push(("x-api-key", key.to_string()));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, _, bytes) = raw(method, url, &headers, Bytes::from(body)).await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn raw(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<(u16, http::HeaderMap, Bytes), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let authority = uri.authority().ok_or("no authority")?.to_string();
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", authority);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, bytes))
}

/// A `multipart/form-data` body with one `file` field, and its content type.
pub fn multipart_file(contents: &[u8]) -> (String, Bytes) {
    let boundary = "cordon-test-boundary-7d1f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(contents);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(body),
    )
}
