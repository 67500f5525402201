//! Host-only control of a microVM guest's writable disk and power: `POST /_cordon/sync`,
//! `/_cordon/freeze`, `/_cordon/thaw` and `/_cordon/poweroff` (cordon-api `agent.rs`). The
//! host freezes the disk for a consistent capture of a running VM; a host that dies while
//! the disk is frozen must not leave the guest stuck, so every freeze thaws by itself after
//! its bounded timeout.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use cordon_api::agent::{
    FreezeRequest, FREEZE_MAX_SECS, FREEZE_PATH, POWEROFF_PATH, SYNC_PATH, THAW_PATH,
};
use cordon_api::error::kinds;
use http::StatusCode;
use tokio::sync::Mutex;

use crate::exec::error_response;
use crate::AppState;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` (linux/fs.h); not in the libc crate.
const FIFREEZE: u32 = 0xC004_5877;
const FITHAW: u32 = 0xC004_5878;
/// How long `poweroff` waits before acting, so its 204 reaches the host first.
const POWEROFF_GRACE: Duration = Duration::from_millis(200);

/// The guest's writable disk, held open (its mount point is detached after the overlay is
/// assembled, so the fd is the only way to it).
pub struct VmControl {
    rw_root: OwnedFd,
    /// `Some(generation)` while frozen; a timer only thaws the freeze it was started for.
    frozen: Mutex<Option<u64>>,
    generation: std::sync::atomic::AtomicU64,
}

impl VmControl {
    pub fn new(rw_root: OwnedFd) -> Arc<VmControl> {
        Arc::new(VmControl {
            rw_root,
            frozen: Mutex::new(None),
            generation: Default::default(),
        })
    }

    fn fs_ioctl(&self, request: u32) -> std::io::Result<()> {
        let mut unused: libc::c_int = 0;
        // SAFETY: FIFREEZE/FITHAW take an int argument the kernel ignores; the fd is open.
        let result = unsafe {
            libc::ioctl(
                self.rw_root.as_raw_fd(),
                request as _,
                &mut unused as *mut libc::c_int,
            )
        };
        if result < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    async fn thaw(&self, only: Option<u64>) -> std::io::Result<()> {
        let mut frozen = self.frozen.lock().await;
        match *frozen {
            Some(generation) if only.is_none_or(|only| only == generation) => {
                self.fs_ioctl(FITHAW)?;
                *frozen = None;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(SYNC_PATH, post(sync))
        .route(FREEZE_PATH, post(freeze))
        .route(THAW_PATH, post(thaw))
        .route(POWEROFF_PATH, post(poweroff))
}

fn not_a_vm() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        kinds::NOT_FOUND,
        "only a microVM sandbox has this control route",
    )
}

fn io_failure(what: &str, error: std::io::Error) -> Response {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        kinds::INTERNAL,
        format!("{what}: {error}"),
    )
}

/// `syncfs` of the writable disk (of `/` in a namespace sandbox). Blocks while frozen.
async fn sync(State(state): State<AppState>) -> Response {
    let vm = state.vm.clone();
    let synced = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        match vm {
            Some(vm) => nix::unistd::syncfs(vm.rw_root.as_fd())?,
            None => nix::unistd::syncfs(std::fs::File::open("/")?.as_fd())?,
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|join| Err(std::io::Error::other(join)));
    match synced {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => io_failure("sync", error),
    }
}

async fn freeze(State(state): State<AppState>, body: Bytes) -> Response {
    let Some(vm) = state.vm.clone() else {
        return not_a_vm();
    };
    let request = if body.is_empty() {
        FreezeRequest::default()
    } else {
        match serde_json::from_slice::<FreezeRequest>(&body) {
            Ok(request) => request,
            Err(error) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    kinds::INVALID_REQUEST,
                    format!("invalid freeze request: {error}"),
                )
            }
        }
    };
    if !(1..=FREEZE_MAX_SECS).contains(&request.timeout_secs) {
        return error_response(
            StatusCode::BAD_REQUEST,
            kinds::INVALID_REQUEST,
            format!("timeout_secs must be 1..={FREEZE_MAX_SECS}"),
        );
    }
    let mut frozen = vm.frozen.lock().await;
    if frozen.is_some() {
        return error_response(
            StatusCode::CONFLICT,
            kinds::INVALID_REQUEST,
            "the writable disk is already frozen",
        );
    }
    // FIFREEZE writes back everything dirty first: it may take a while.
    let ioctl_vm = vm.clone();
    let result = tokio::task::spawn_blocking(move || ioctl_vm.fs_ioctl(FIFREEZE))
        .await
        .unwrap_or_else(|join| Err(std::io::Error::other(join)));
    if let Err(error) = result {
        return io_failure("freeze", error);
    }
    let generation = vm
        .generation
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *frozen = Some(generation);
    drop(frozen);
    let timeout = Duration::from_secs(request.timeout_secs);
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if let Err(error) = vm.thaw(Some(generation)).await {
            tracing::error!(%error, "automatic thaw failed");
        } else {
            tracing::debug!("automatic thaw (if still frozen)");
        }
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn thaw(State(state): State<AppState>) -> Response {
    let Some(vm) = state.vm.clone() else {
        return not_a_vm();
    };
    match vm.thaw(None).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => io_failure("thaw", error),
    }
}

/// Answers, then: every other process killed, the disk synced and frozen (ext4 checkpoints
/// its journal on freeze, so the image is clean on the host), power off.
async fn poweroff(State(state): State<AppState>) -> Response {
    let Some(vm) = state.vm.clone() else {
        return not_a_vm();
    };
    tokio::spawn(async move {
        tokio::time::sleep(POWEROFF_GRACE).await;
        tracing::info!("powering off at the host's request");
        // Thaw first so the final freeze below is ours and complete.
        let _ = vm.thaw(None).await;
        let _ = tokio::task::spawn_blocking(move || {
            // SAFETY: kill(-1) signals every process but init (us); sync has no arguments.
            unsafe {
                libc::kill(-1, libc::SIGKILL);
                libc::sync();
            }
            if let Err(error) = vm.fs_ioctl(FIFREEZE) {
                tracing::warn!(%error, "could not freeze the writable disk before power-off");
            }
            crate::vm_init::power_off();
        })
        .await;
    });
    StatusCode::NO_CONTENT.into_response()
}
