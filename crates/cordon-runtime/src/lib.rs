//! Sandbox runtimes: the backend-neutral [`Runtime`] trait and its namespace backend
//! ([`NamespaceRuntime`]), which launches every sandbox through the `cordon-nsinit` binary.
//!
//! A microVM backend implements the same trait; nothing in the trait mentions namespaces.
//!
//! The namespace backend needs: root; Linux ≥ 5.19 (idmapped overlayfs layers,
//! `LOOP_CONFIGURE`, `close_range`, `fsopen`); rootfs layers and the state dir on a filesystem that
//! supports idmapped mounts (ext4, xfs, btrfs; tmpfs from 6.3; not overlayfs or NFS); cgroup
//! v1 (memory, pids, cpu, cpuacct, devices, freezer) or v2 with the memory, pids and cpu controllers;
//! and, for sandboxes with a disk limit, `mkfs.ext4` (e2fsprogs ≥ 1.43, for `-d`) and
//! `/dev/loop-control`.

mod cgroup;
mod error;
mod fsutil;
mod ids;
mod layer_copy;
#[doc(hidden)]
pub mod loopdev;
mod namespace;
#[doc(hidden)]
pub mod newmount;
#[doc(hidden)]
pub mod plan;
mod spec;

use std::path::Path;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

pub use error::RuntimeError;
pub use layer_copy::CaptureError;
pub use namespace::{NamespaceConfig, NamespaceRuntime};
pub use spec::{validate_id, Limits, SandboxSpec, Weakening, DEFAULT_PIDS_MAX};

/// One byte stream to a sandbox's agent (run `cordon_channel::AgentClient::connect` over it).
pub trait ChannelIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ChannelIo for T {}

/// Where a sandbox is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SandboxState {
    /// Prepared (state dir, writable layer) but never started.
    Created,
    /// Booted; `pid` is the sandbox init as the host sees it.
    Running { pid: u32 },
    /// Not running; the writable layer is kept.
    Stopped,
    /// Boot failed or the sandbox died on its own; the message says why.
    Failed(String),
}

/// What a sandbox currently uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResourceUsage {
    pub memory_bytes: u64,
    pub cpu_ns: u64,
    pub pids: u64,
    pub disk_bytes: u64,
}

/// A sandbox backend.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// Prepares the sandbox's state and writable layer. Does not boot it.
    async fn create(&self, spec: SandboxSpec) -> Result<(), RuntimeError>;
    /// Boots the sandbox; returns once its agent answered the health check and took its config.
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// Kills everything in the sandbox and keeps its writable layer.
    async fn stop(&self, id: &str) -> Result<(), RuntimeError>;
    /// Stops the sandbox if needed and removes everything it had.
    async fn destroy(&self, id: &str) -> Result<(), RuntimeError>;
    /// Opens one byte stream to the sandbox's agent.
    async fn open_channel(&self, id: &str) -> Result<Box<dyn ChannelIo>, RuntimeError>;
    /// The sandbox's current state.
    async fn state(&self, id: &str) -> Result<SandboxState, RuntimeError>;
    /// Copies the sandbox's writable layer (its changes to the root filesystem: files with the
    /// ids the sandbox sees, overlay whiteouts and opaque markers) into `dest`, an empty
    /// directory, as a read-only layer usable in another sandbox's `SandboxSpec.layers`.
    /// A running sandbox is frozen during the copy, so the layer is one point in time; `/tmp`
    /// and processes are not part of it. Returns the bytes copied.
    async fn capture(&self, id: &str, dest: &Path) -> Result<u64, RuntimeError>;
    /// The sandbox's current resource usage.
    async fn usage(&self, id: &str) -> Result<ResourceUsage, RuntimeError>;
    /// After a restart of the host process: finds every sandbox the backend knows about,
    /// re-adopts the running ones and marks the dead ones stopped.
    async fn adopt(&self) -> Result<Vec<(String, SandboxState)>, RuntimeError>;
}
