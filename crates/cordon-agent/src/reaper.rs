//! PID 1 duty: reap every child and orphan, and hand command exit statuses to their owners.
//!
//! One task owns every `waitpid(-1)` call. Spawns go through [`Reaper::spawn`], which holds
//! the waiter table's lock across spawn+register, and the reaper holds the same lock while it
//! waits: so no exit can be reaped before its waiter is registered. A child that failed before
//! exec is never registered and is reaped like any orphan.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Exit code as shells report it: the status, or 128 + N when killed by signal N.
pub type ExitCode = i64;

type Waiters = HashMap<i32, oneshot::Sender<ExitCode>>;

/// Handle to the process-wide reaper. Cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts the reaping task. Call once, before any spawn,
    /// from inside the tokio runtime. When not PID 1 (tests, dev), becomes a child subreaper so
    /// orphans of our commands still come to us.
    pub fn start() -> io::Result<Reaper> {
        if nix::unistd::getpid().as_raw() != 1 {
            nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)?;
        }
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            waiters: Arc::default(),
        };
        let task_handle = reaper.clone();
        tokio::spawn(async move {
            loop {
                // Reap first: children may have exited before the handler was installed.
                task_handle.reap_exited();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Runs `start`, which starts a child and returns its pid, and registers for the child's
    /// exit status.
    pub fn spawn(
        &self,
        start: impl FnOnce() -> io::Result<i32>,
    ) -> io::Result<(i32, oneshot::Receiver<ExitCode>)> {
        let mut waiters = self.lock();
        let pid = start()?;
        let (exit_tx, exit_rx) = oneshot::channel();
        waiters.insert(pid, exit_tx);
        Ok((pid, exit_rx))
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Collects every exited child; orphans are dropped, registered ones are reported.
    fn reap_exited(&self) {
        let mut waiters = self.lock();
        loop {
            let (pid, code) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, status)) => (pid, i64::from(status)),
                Ok(WaitStatus::Signaled(pid, signal, _core)) => (pid, 128 + signal as i64),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "waitpid failed");
                    return;
                }
            };
            match waiters.remove(&pid.as_raw()) {
                Some(waiter) => {
                    let _ = waiter.send(code);
                }
                None => tracing::trace!(pid = pid.as_raw(), code, "reaped orphan"),
            }
        }
    }
}
