//! The agent as the host handles it: its sealed binary, and the boot-time handshake.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cordon_api::agent::AgentConfig;
use cordon_channel::AgentClient;
use http_body_util::BodyExt;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use super::store::SandboxDir;
use crate::error::{IoContext, RuntimeError};
use crate::plan::{is_alive, LaunchResult};

/// Copies the agent into a memfd and seals it, so the sandbox's `/proc/1/exe` is an immutable
/// in-memory file rather than a writable host binary (CVE-2019-5736).
pub(crate) fn sealed_copy(binary: &Path) -> Result<OwnedFd, RuntimeError> {
    let mut source =
        File::open(binary).context(|| format!("open agent binary {}", binary.display()))?;
    let memfd = memfd_create(
        c"cordon-agent",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| RuntimeError::io("memfd_create", e.into()))?;
    let mut target = File::from(memfd);
    std::io::copy(&mut source, &mut target).context(|| "copy the agent into its memfd".into())?;
    // FUTURE_WRITE, not WRITE: both make shmem refuse write() and new writable mappings (and
    // no mapping of this memfd ever existed), but F_SEAL_WRITE also waits for the pages to be
    // unpinned and fails with EBUSY when freshly written pages still sit in another CPU's LRU
    // batch, which a loaded host hits now and then.
    let seals = SealFlag::F_SEAL_SEAL
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_FUTURE_WRITE;
    fcntl(&target, FcntlArg::F_ADD_SEALS(seals))
        .map_err(|e| RuntimeError::io("seal the agent memfd", e.into()))?;
    Ok(target.into())
}

/// Waits until the agent answers `GET /_cordon/health`, then sends its config.
/// Fails early when the init dies.
pub(crate) async fn wait_ready(
    dir: &SandboxDir,
    config: &AgentConfig,
    init: LaunchResult,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("no answer");
    while Instant::now() < deadline {
        if !is_alive(init.pid, init.start_time) {
            return Err(format!(
                "the sandbox init exited during boot ({last_error})"
            ));
        }
        match tokio::time::timeout(Duration::from_secs(2), handshake(dir, config)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => last_error = error,
            Err(_) => last_error = "agent did not answer within 2 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("agent not ready after {timeout:?}: {last_error}"))
}

async fn handshake(dir: &SandboxDir, config: &AgentConfig) -> Result<(), String> {
    let stream = dir.connect_socket().await.map_err(|e| e.to_string())?;
    let client = AgentClient::connect(stream);
    let health = http::Request::get("http://agent/_cordon/health")
        .body(Bytes::new())
        .map_err(|e| e.to_string())?;
    expect_success(&client, health, "GET /_cordon/health").await?;
    let body = serde_json::to_vec(config).map_err(|e| e.to_string())?;
    let put = http::Request::put("http://agent/_cordon/config")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body))
        .map_err(|e| e.to_string())?;
    expect_success(&client, put, "PUT /_cordon/config").await
}

pub(crate) async fn expect_success(
    client: &AgentClient,
    request: http::Request<Bytes>,
    what: &str,
) -> Result<(), String> {
    let response = client
        .request_bytes(request)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = response.status();
    // Bounded: the agent is inside the sandbox's trust boundary.
    let body = http_body_util::Limited::new(response.into_body(), 4096)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {status} {}",
            String::from_utf8_lossy(&body)
        ))
    }
}
