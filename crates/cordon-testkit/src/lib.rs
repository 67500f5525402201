//! Test support for Cordon: a cached busybox rootfs, the paths of the binaries under test, and
//! [`TestSandbox`], which boots a real namespace sandbox running the real agent.
//!
//! Needs root, `busybox-static` (`/bin/busybox`) and a static agent (`make agent`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cordon_api::agent::AgentConfig;
use cordon_api::exec::{HttpExecuteRequest, HttpExecuteResponse};
use cordon_api::RunConfig;
use cordon_channel::AgentClient;
use cordon_runtime::{Limits, NamespaceConfig, NamespaceRuntime, Runtime, SandboxSpec, Weakening};
use http_body_util::BodyExt;

pub mod dns;
pub mod https_upstream;
pub mod oci_layout;
pub mod registry;
mod rootfs;

pub use rootfs::test_rootfs;

/// The workspace's `target/` directory (`CARGO_TARGET_DIR` when set).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        // crates/cordon-testkit → the workspace root.
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .expect("workspace root")
            .join("target"),
    }
}

/// The static agent: `CORDON_AGENT_BIN`, else the `make agent` output.
pub fn agent_binary() -> PathBuf {
    let path = match std::env::var_os("CORDON_AGENT_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("x86_64-unknown-linux-gnu/release/cordon-agent"),
    };
    assert!(
        path.is_file(),
        "static agent not found at {} — build it with `make agent` (RUSTFLAGS=\"-C target-feature=+crt-static\" \
         cargo build --release -p cordon-agent --target x86_64-unknown-linux-gnu) or set CORDON_AGENT_BIN",
        path.display()
    );
    path
}

/// The launcher: `CORDON_NSINIT_BIN`, else `cordon-nsinit` next to the test executable's
/// directory (`target/<profile>/cordon-nsinit`, built with the package's tests).
pub fn nsinit_binary() -> PathBuf {
    let path = match std::env::var_os("CORDON_NSINIT_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().expect("current test executable");
            // target/<profile>/deps/<test> → target/<profile>/cordon-nsinit
            exe.parent()
                .and_then(Path::parent)
                .expect("test executable in target/<profile>/deps")
                .join("cordon-nsinit")
        }
    };
    assert!(
        path.is_file(),
        "cordon-nsinit not found at {} — `cargo build -p cordon-runtime` or set CORDON_NSINIT_BIN",
        path.display()
    );
    path
}

/// A temporary state dir that, when dropped, destroys every sandbox found in it (through a
/// fresh runtime and `adopt`), so a failing test leaks no process, mount or cgroup.
pub struct TestStateDir(Option<tempfile::TempDir>);

impl TestStateDir {
    pub fn new() -> TestStateDir {
        TestStateDir(Some(
            tempfile::Builder::new()
                .prefix("cordon-test-")
                .tempdir()
                .expect("state dir"),
        ))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("state dir").path()
    }
}

impl Default for TestStateDir {
    fn default() -> Self {
        TestStateDir::new()
    }
}

impl Drop for TestStateDir {
    fn drop(&mut self) {
        let dir = self.0.take().expect("state dir");
        if !dir.path().join("sandboxes").exists() {
            return;
        }
        block_on_cleanup(move || async move {
            let runtime = runtime_in(dir.path());
            for (id, _) in runtime.adopt().await.unwrap_or_default() {
                if let Err(error) = runtime.destroy(&id).await {
                    eprintln!("destroying leftover sandbox {id}: {error}");
                }
            }
            drop(dir);
        });
    }
}

/// Runs async cleanup from a `Drop`, which cannot await: on a private runtime in a thread.
fn block_on_cleanup<F, Fut>(cleanup: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let done = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cleanup runtime");
        rt.block_on(cleanup());
    });
    let _ = done.join();
}

/// A runtime over `state_dir`.
pub fn runtime_in(state_dir: &Path) -> Arc<NamespaceRuntime> {
    let config = NamespaceConfig::new(state_dir, agent_binary(), nsinit_binary());
    Arc::new(NamespaceRuntime::new(config).expect("namespace runtime"))
}

/// How to start a [`TestSandbox`].
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    /// Layers stacked on top of the base layer, top first.
    pub extra_layers: Vec<PathBuf>,
    /// The bottom layer; `None` means [`test_rootfs`] (e.g. a prepared snapshot instead).
    pub base_layer: Option<PathBuf>,
    pub limits: Limits,
    pub weaken: Weakening,
    pub run_config: RunConfig,
}

/// The output of one command run through the agent's `POST /execute`.
pub type ExecOutput = HttpExecuteResponse;

/// A running sandbox with a connected agent client. Destroyed on drop.
pub struct TestSandbox {
    pub runtime: Arc<NamespaceRuntime>,
    pub id: String,
    pub client: AgentClient,
    state_dir: Option<TestStateDir>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique sandbox id for this test process.
pub fn unique_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The spec a test sandbox is created with.
pub fn spec(id: &str, options: &TestOptions) -> SandboxSpec {
    let mut layers = options.extra_layers.clone();
    layers.push(options.base_layer.clone().unwrap_or_else(test_rootfs));
    SandboxSpec {
        id: id.to_string(),
        layers,
        limits: options.limits.clone(),
        hostname: "sandbox".into(),
        agent_config: AgentConfig {
            run_config: options.run_config.clone(),
            ..AgentConfig::default()
        },
        backend: Default::default(),
        weaken: options.weaken.clone(),
    }
}

impl TestSandbox {
    /// Creates and starts a sandbox in its own temporary state dir.
    pub async fn start(options: TestOptions) -> TestSandbox {
        let state_dir = TestStateDir::new();
        let runtime = runtime_in(state_dir.path());
        let mut sandbox = TestSandbox::start_in(runtime, options).await;
        sandbox.state_dir = Some(state_dir);
        sandbox
    }

    /// Creates and starts a sandbox on an existing runtime.
    pub async fn start_in(runtime: Arc<NamespaceRuntime>, options: TestOptions) -> TestSandbox {
        let id = unique_id("t");
        runtime
            .create(spec(&id, &options))
            .await
            .expect("create sandbox");
        if let Err(error) = runtime.start(&id).await {
            let _ = runtime.destroy(&id).await;
            panic!("start sandbox {id}: {error}");
        }
        let client = connect(&*runtime, &id).await;
        TestSandbox {
            runtime,
            id,
            client,
            state_dir: None,
        }
    }

    /// Runs `command` with `/bin/sh -c` through the agent.
    pub async fn exec(&self, command: &str) -> ExecOutput {
        exec(&self.client, command).await
    }

    /// Runs `command`, asserts it exited 0 and returns its stdout.
    pub async fn sh(&self, command: &str) -> String {
        let output = self.exec(command).await;
        assert_eq!(output.exit_code, 0, "`{command}` failed: {output:?}");
        output.stdout
    }

    /// The temporary state dir, when [`TestSandbox::start`] made one.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_ref().map(TestStateDir::path)
    }

    /// Opens a fresh channel (e.g. after a stop/start).
    pub async fn reconnect(&mut self) {
        self.client = connect(&*self.runtime, &self.id).await;
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        let (runtime, id) = (self.runtime.clone(), self.id.clone());
        block_on_cleanup(move || async move {
            match runtime.destroy(&id).await {
                Ok(()) | Err(cordon_runtime::RuntimeError::NotFound(_)) => {}
                Err(error) => eprintln!("destroying test sandbox {id}: {error}"),
            }
        });
    }
}

/// An [`AgentClient`] over a new channel to sandbox `id`.
pub async fn connect(runtime: &dyn Runtime, id: &str) -> AgentClient {
    let io = runtime.open_channel(id).await.expect("open channel");
    AgentClient::connect(io)
}

/// `POST /execute` with `/bin/sh` and a 60 s limit.
pub async fn exec(client: &AgentClient, command: &str) -> ExecOutput {
    try_exec(client, command, 60)
        .await
        .unwrap_or_else(|e| panic!("exec `{command}`: {e}"))
}

/// `POST /execute`; an error when the agent cannot be reached or answers non-2xx.
pub async fn try_exec(
    client: &AgentClient,
    command: &str,
    timeout_seconds: i64,
) -> Result<ExecOutput, String> {
    try_exec_as(client, command, None, timeout_seconds).await
}

/// [`try_exec`] as `user` (e.g. `root`, to prepare or inspect a test whatever run user the
/// agent's config names); `None` runs as that configured user.
pub async fn try_exec_as(
    client: &AgentClient,
    command: &str,
    user: Option<&str>,
    timeout_seconds: i64,
) -> Result<ExecOutput, String> {
    let body = HttpExecuteRequest {
        command: command.to_string(),
        timeout: timeout_seconds,
        shell: "/bin/sh".into(),
        env: None,
        cwd: None,
        run_config: user.map(|user| RunConfig {
            user: Some(user.to_string()),
            ..RunConfig::default()
        }),
    };
    let request = http::Request::post("http://agent/execute")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(
            serde_json::to_vec(&body).map_err(|e| e.to_string())?,
        ))
        .map_err(|e| e.to_string())?;
    let wait = Duration::from_secs(timeout_seconds.max(1) as u64 + 30);
    let response = tokio::time::timeout(wait, client.request_bytes(request))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&bytes)))
}
