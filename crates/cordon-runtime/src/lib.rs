//! Sandbox runtimes: the backend-neutral [`Runtime`] trait and its namespace backend
//! ([`NamespaceRuntime`]), which launches every sandbox through the `cordon-nsinit` binary.
//!
//! The microVM backend ([`MicrovmRuntime`]) implements the same trait, and [`Runtimes`]
//! routes each sandbox to the backend its spec names.
//!
//! The namespace backend needs: root; Linux ≥ 5.19 (idmapped overlayfs layers,
//! `LOOP_CONFIGURE`, `close_range`, `fsopen`); rootfs layers and the state dir on a filesystem that
//! supports idmapped mounts (ext4, xfs, btrfs; tmpfs from 6.3; not overlayfs or NFS); cgroup
//! v1 (memory, pids, cpu, cpuacct, devices, freezer) or v2 with the memory, pids and cpu controllers;
//! and, for sandboxes with a disk limit, `mkfs.ext4` (e2fsprogs ≥ 1.43, for `-d`) and
//! `/dev/loop-control`.
//!
//! The microVM backend needs, besides the namespace backend's needs (its QEMU runs in the same
//! jail): `qemu-system-x86_64` (Debian's qemu-system-x86, 7.2+), the guest kernel and
//! initramfs (`cordon_image::guest`), `mkfs.ext4` for the layer images, and its state dir on
//! one filesystem (VM directories hard-link the shared kernel and layer images).

mod cgroup;
mod dispatch;
mod error;
mod fsutil;
mod ids;
mod layer_copy;
#[doc(hidden)]
pub mod loopdev;
mod microvm;
mod namespace;
#[doc(hidden)]
pub mod newmount;
#[doc(hidden)]
pub mod plan;
mod sandbox_lifecycle;
mod spec;

use std::path::Path;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

pub use dispatch::Runtimes;
pub use error::RuntimeError;
pub use layer_copy::CaptureError;
pub use microvm::{Accel, MicrovmConfig, MicrovmRuntime, DEFAULT_DISK_BYTES, MIN_MEMORY_BYTES};
pub use namespace::{NamespaceConfig, NamespaceRuntime};
pub use spec::{validate_id, Backend, Limits, SandboxSpec, Weakening, DEFAULT_PIDS_MAX};

/// The isolation a sandbox really has (the API's `isolation` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// Linux namespaces, seccomp, cgroups (the namespace backend).
    Namespace,
    /// A KVM microVM, its QEMU jailed like a namespace sandbox.
    MicrovmKvm,
    /// A microVM under TCG emulation: no hardware isolation; the jail around QEMU is the
    /// boundary ("container-grade").
    MicrovmTcg,
}

/// The isolation a sandbox of `backend` gets in this process: a microVM is `microvm-kvm`
/// only once the KVM probe (see [`MicrovmRuntime::acceleration`]) succeeded.
pub fn isolation_of(backend: Backend) -> Isolation {
    match backend {
        Backend::Namespace => Isolation::Namespace,
        Backend::Microvm => microvm::process_isolation(),
    }
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Namespace => "namespace",
            Isolation::MicrovmKvm => "microvm-kvm",
            Isolation::MicrovmTcg => "microvm-tcg",
        }
    }
}

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
    /// The isolation the sandbox `id` has (or would have, if it is not running).
    fn isolation(&self, _id: &str) -> Isolation {
        Isolation::Namespace
    }
    /// Whether sandboxes of `backend` can be created here.
    fn supports(&self, backend: Backend) -> bool {
        backend == Backend::Namespace
    }
}
