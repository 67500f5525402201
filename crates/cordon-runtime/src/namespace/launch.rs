//! Running `cordon-nsinit` and killing what it launched.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;

use super::store::{SandboxDir, AGENT_LOG};
use super::NamespaceConfig;
use crate::ids::RANGE_SIZE;
use crate::plan::{is_alive, LaunchPlan, LaunchResult, WritableLayer, AGENT_MEMFD, LISTEN_FD};
use crate::SandboxSpec;

/// Bound on what we keep of nsinit's stderr.
const STDERR_MAX: usize = 4096;

pub(crate) fn plan(
    config: &NamespaceConfig,
    dir: &SandboxDir,
    spec: &SandboxSpec,
    id_base: u32,
    writable: WritableLayer,
    (cgroup_procs, late_cgroup_procs): (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>),
) -> LaunchPlan {
    let tmp_size_bytes = spec
        .limits
        .memory_bytes
        .unwrap_or(u64::MAX)
        .min(config.tmp_max_bytes);
    LaunchPlan {
        id: spec.id.clone(),
        sandbox_dir: dir.path().to_path_buf(),
        layers: spec.layers.clone(),
        writable,
        id_base,
        id_count: RANGE_SIZE,
        hostname: spec.hostname.clone(),
        cgroup_procs,
        late_cgroup_procs,
        tmp_size_bytes,
        tmp_inodes: (tmp_size_bytes / 4096).clamp(1024, 1 << 20),
        nproc_limit: spec.limits.pids.unwrap_or(crate::DEFAULT_PIDS_MAX),
        log_path: dir.path().join(AGENT_LOG),
        log_max_bytes: config.log_max_bytes,
        agent_args: vec![
            "cordon-agent".into(),
            "--listen-fd".into(),
            LISTEN_FD.to_string(),
        ],
        weaken: spec.weaken.clone(),
        payload: crate::plan::Payload::Agent,
    }
}

/// A CLOEXEC duplicate at fd ≥ 10, so the child can dup2 it onto 3 or 4 without clobbering.
fn high_dup(fd: &impl AsFd) -> Result<OwnedFd, String> {
    let raw = fcntl(fd.as_fd(), FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(|e| format!("dup: {e}"))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Runs nsinit with `plan`; on success the agent has been exec'd as the sandbox's PID 1.
/// The error is nsinit's own message.
pub(crate) async fn run_nsinit(
    nsinit: &Path,
    plan: &LaunchPlan,
    listener: &UnixListener,
    agent_memfd: Option<&OwnedFd>,
    timeout: Duration,
) -> Result<LaunchResult, String> {
    let listen_fd = high_dup(listener)?;
    let memfd = agent_memfd.map(high_dup).transpose()?;
    let (listen_raw, memfd_raw) = (
        listen_fd.as_raw_fd(),
        memfd.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
    );
    let mut command = tokio::process::Command::new(nsinit);
    command
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: dup2 is async-signal-safe; the sources are open CLOEXEC fds ≥ 10, and dup2
    // clears CLOEXEC on the targets, so exactly these extra fds reach nsinit (the memfd only
    // for the agent; a jail gets the listener alone).
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(listen_raw, LISTEN_FD) < 0
                || (memfd_raw >= 0 && libc::dup2(memfd_raw, AGENT_MEMFD) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", nsinit.display()))?;
    drop((listen_fd, memfd));
    let input = serde_json::to_vec(plan).map_err(|e| e.to_string())?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = async move {
        let _ = stdin.write_all(&input).await;
    };
    let (_, output) = tokio::join!(
        writer,
        tokio::time::timeout(timeout, child.wait_with_output())
    );
    let output = match output {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("waiting for nsinit: {e}")),
        Err(_) => return Err(format!("nsinit did not finish within {timeout:?}")),
    };
    let stderr = String::from_utf8_lossy(&output.stderr[..output.stderr.len().min(STDERR_MAX)])
        .trim()
        .to_string();
    if !output.status.success() {
        return Err(if stderr.is_empty() {
            format!("nsinit {}", output.status)
        } else {
            stderr
        });
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("nsinit answer: {e}; stderr: {stderr}"))
}

/// SIGKILLs the init (its pid namespace, and so every process in it, dies with it) and waits
/// until it is gone. Checks the start time first so a reused pid is never hit.
pub(crate) async fn kill_init(pid: u32, start_time: u64) {
    if !is_alive(pid, start_time) {
        return;
    }
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(pid, start_time) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
