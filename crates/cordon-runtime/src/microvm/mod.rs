//! The microVM backend: one QEMU `microvm` per sandbox, the same agent as its `/init`, the
//! snapshot's layers as read-only virtio-blk disks and the writable layer as its own disk
//! (see ARCHITECTURE.md, "The microVM backend").
//!
//! QEMU always runs inside a namespace-backend jail of its own (`plan::Payload::Jail`, launched
//! by `cordon-nsinit`): a per-VM uid range, its own cgroups (memory = guest RAM + overhead),
//! our seccomp allowlist under QEMU's own `-sandbox on`, no capabilities, a read-only root of
//! host `/usr` plus the VM's own directory, env cleared, fds closed. With TCG the jail is the
//! only boundary ([`crate::Isolation::MicrovmTcg`]); with KVM the VM is one too.
//!
//! The channel: the host binds the sandbox's `agent.sock` and QEMU inherits the listening fd
//! (`-chardev socket,fd=3,server=on`). QEMU serves one host connection at a time, so the
//! runtime hands the port to one holder at a time: a new [`Runtime::open_channel`] (or the
//! runtime's own stop/capture calls) shuts the previous holder's connection down first, and
//! each connection starts a fresh agent session (`cordon_channel::vm_link`).

mod accel;
mod images;
mod qemu;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cordon_channel::AgentClient;

use crate::cgroup::Cgroups;
use crate::error::{IoContext, RuntimeError};
use crate::ids::RANGE_SIZE;
use crate::namespace::launch;
use crate::namespace::store::{self, IdRegistry, Record, SandboxDir, AGENT_LOG};
use crate::plan::{is_alive, Jail, LaunchPlan, LaunchResult, Payload, WritableLayer};
use crate::sandbox_lifecycle::{self as lifecycle, state_of, SlotTable};
use crate::{ChannelIo, Isolation, Limits, ResourceUsage, Runtime, SandboxSpec, SandboxState};

pub use qemu::Accel;

/// Settings of a [`MicrovmRuntime`].
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// Host-only directory holding `sandboxes/<id>/`, `guest/` and `layer-images/`.
    pub state_dir: PathBuf,
    /// The `cordon-nsinit` launcher binary.
    pub nsinit_binary: PathBuf,
    /// `qemu-system-x86_64` (Debian's qemu-system-x86).
    pub qemu_binary: PathBuf,
    /// The guest kernel (`cordon_image::guest`, prepared by `cordon prepare`).
    pub kernel: PathBuf,
    /// The initramfs holding the agent as `/init` and the guest's modules.
    pub initramfs: PathBuf,
    pub cgroup_root: PathBuf,
    /// Host-wide registry of claimed uid/gid ranges (shared with the namespace backend).
    pub id_registry: PathBuf,
    /// Launch + guest boot + agent handshake.
    pub boot_timeout: Duration,
    /// How long the KVM probe guest may take to reach its init.
    pub kvm_probe_timeout: Duration,
    /// Never probe KVM: always TCG (tests that must not depend on the host's KVM).
    pub force_tcg: bool,
    /// Size bound of each VM's console log (`agent.log`, rotated once).
    pub log_max_bytes: u64,
    /// Guest RAM when the sandbox sets no memory limit.
    pub default_memory_bytes: u64,
    /// The writable disk when the sandbox sets no disk limit (sparse: costs what is used).
    pub default_disk_bytes: u64,
    /// Upper bound on vCPUs (the host's CPUs by default).
    pub max_vcpus: u32,
    /// QEMU's own memory beyond guest RAM, added to the VM's cgroup limit.
    pub qemu_overhead_bytes: u64,
    /// A graceful stop (sync, poweroff) may take this long before QEMU is killed.
    pub stop_timeout: Duration,
    /// Bound on the entries a capture copies.
    pub capture_max_entries: u64,
}

impl MicrovmConfig {
    pub fn new(
        state_dir: impl Into<PathBuf>,
        nsinit_binary: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        initramfs: impl Into<PathBuf>,
    ) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        MicrovmConfig {
            state_dir: state_dir.into(),
            nsinit_binary: nsinit_binary.into(),
            qemu_binary: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            id_registry: PathBuf::from("/run/cordon/id-ranges"),
            boot_timeout: Duration::from_secs(60),
            kvm_probe_timeout: Duration::from_secs(8),
            force_tcg: false,
            log_max_bytes: 1 << 20,
            default_memory_bytes: 512 << 20,
            default_disk_bytes: DEFAULT_DISK_BYTES,
            max_vcpus: cpus,
            qemu_overhead_bytes: 256 << 20,
            stop_timeout: Duration::from_secs(10),
            capture_max_entries: 2_000_000,
        }
    }
}

/// The writable disk of a sandbox without a disk limit: 4 GiB, sparse.
pub const DEFAULT_DISK_BYTES: u64 = 4 << 30;
/// The least guest RAM a Debian cloud kernel plus the agent boot in.
pub const MIN_MEMORY_BYTES: u64 = 128 << 20;
/// QEMU's threads: vCPUs, the main loop, RCU, I/O workers.
const QEMU_PIDS: u64 = 128;
/// The jail's `/tmp` (QEMU writes nothing there).
const JAIL_TMP_BYTES: u64 = 4 << 20;
/// One agent control call (sync, freeze, thaw, poweroff).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on an agent control answer's body.
const CONTROL_BODY_MAX: usize = 4096;

struct Slot {
    dir: SandboxDir,
    inner: tokio::sync::Mutex<SlotState>,
    /// The connection that holds the VM's channel now (a duplicate of its socket fd), shut
    /// down when someone else needs the channel.
    holder: Mutex<Option<OwnedFd>>,
}

struct SlotState {
    spec: SandboxSpec,
    record: Record,
}

/// The microVM [`Runtime`].
pub struct MicrovmRuntime {
    config: MicrovmConfig,
    cgroups: Cgroups,
    slots: SlotTable<Slot>,
    ids: IdRegistry,
}

impl MicrovmRuntime {
    /// Prepares the state dir and installs the guest kernel and initramfs in it (so VM
    /// directories can hard-link them). Fails clearly when either is missing.
    pub fn new(config: MicrovmConfig) -> Result<MicrovmRuntime, RuntimeError> {
        accel::require_file(&config.kernel, "guest kernel")?;
        accel::require_file(&config.initramfs, "guest initramfs")?;
        accel::require_file(&config.qemu_binary, "QEMU (install qemu-system-x86)")?;
        for dir in ["", "sandboxes", "guest", "layer-images"] {
            store::create_private_dir(&config.state_dir.join(dir))?;
        }
        images::install_shared(&config.kernel, &config.state_dir.join("guest/kernel"))?;
        images::install_shared(&config.initramfs, &config.state_dir.join("guest/initramfs"))?;
        let cgroups = Cgroups::detect(&config.cgroup_root)?;
        let ids = IdRegistry::new(config.id_registry.clone());
        tracing::info!(state_dir = %config.state_dir.display(), "microvm runtime ready");
        Ok(MicrovmRuntime {
            config,
            cgroups,
            slots: SlotTable::new(),
            ids,
        })
    }

    /// KVM or TCG for this process's VMs: probes once (a short probe VM), then cached.
    pub async fn acceleration(&self) -> Accel {
        if self.config.force_tcg {
            return Accel::Tcg;
        }
        accel::decide(&accel::Probe {
            qemu: self.config.qemu_binary.clone(),
            kernel: self.guest_file("kernel"),
            timeout: self.config.kvm_probe_timeout,
        })
        .await
    }

    /// The isolation this runtime's VMs get (probing if nothing decided yet).
    pub async fn isolation_now(&self) -> Isolation {
        match self.acceleration().await {
            Accel::Kvm => Isolation::MicrovmKvm,
            Accel::Tcg => Isolation::MicrovmTcg,
        }
    }

    fn guest_file(&self, name: &str) -> PathBuf {
        self.config.state_dir.join("guest").join(name)
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.config.state_dir.join("sandboxes")
    }

    fn slot(&self, id: &str) -> Result<Arc<Slot>, RuntimeError> {
        self.slots.get(id)
    }

    fn vm_dir(dir: &SandboxDir) -> PathBuf {
        dir.path().join(images::VM_DIR)
    }

    fn guest_memory_bytes(&self, spec: &SandboxSpec) -> u64 {
        spec.limits
            .memory_bytes
            .unwrap_or(self.config.default_memory_bytes)
    }

    fn vcpus(&self, spec: &SandboxSpec) -> u32 {
        let wanted = spec.limits.cpu_millicores.map_or(1, |m| m.div_ceil(1000));
        wanted.clamp(1, self.config.max_vcpus.max(1))
    }

    /// Prepares the VM directory: the writable disk and links to the guest and the layers'
    /// images.
    async fn prepare_vm(
        &self,
        dir: &SandboxDir,
        spec: &SandboxSpec,
        id_base: u32,
    ) -> Result<(), RuntimeError> {
        let vm = images::create_vm_dir(dir.path())?;
        let disk = spec
            .limits
            .disk_bytes
            .unwrap_or(self.config.default_disk_bytes);
        images::create_rw_disk(&vm, disk, id_base).await?;
        self.link_guest(&vm)?;
        let cache = self.config.state_dir.join("layer-images");
        for (index, layer) in spec.layers.iter().enumerate() {
            let image = images::layer_image(&cache, layer).await?;
            images::link_into(&vm, &image, &qemu::layer_image_name(index))?;
        }
        Ok(())
    }

    fn link_guest(&self, vm: &Path) -> Result<(), RuntimeError> {
        images::link_into(vm, &self.guest_file("kernel"), qemu::KERNEL)?;
        images::link_into(vm, &self.guest_file("initramfs"), qemu::INITRAMFS)
    }

    fn plan(
        &self,
        dir: &SandboxDir,
        spec: &SandboxSpec,
        record: &Record,
        accel: Accel,
        procs: (Vec<PathBuf>, Vec<PathBuf>),
    ) -> LaunchPlan {
        let shape = qemu::VmShape {
            accel,
            memory_mib: self.guest_memory_bytes(spec).div_ceil(1 << 20),
            vcpus: self.vcpus(spec),
            layers: spec.layers.len(),
            hostname: spec.hostname.clone(),
            extra_cmdline: Vec::new(),
            tsc_khz: (accel == Accel::Tcg).then(accel::host_tsc_khz),
        };
        let binary = self.config.qemu_binary.to_string_lossy().into_owned();
        let devices = match accel {
            Accel::Kvm => vec![("kvm".to_string(), 10, 232)],
            Accel::Tcg => Vec::new(),
        };
        LaunchPlan {
            id: spec.id.clone(),
            sandbox_dir: dir.path().to_path_buf(),
            layers: Vec::new(),
            // Unused by a jail; the VM's disk is a file QEMU opens.
            writable: WritableLayer::Directory(Self::vm_dir(dir)),
            id_base: record.id_base,
            id_count: RANGE_SIZE,
            hostname: spec.hostname.clone(),
            cgroup_procs: procs.0,
            late_cgroup_procs: procs.1,
            tmp_size_bytes: JAIL_TMP_BYTES,
            tmp_inodes: 64,
            nproc_limit: QEMU_PIDS,
            log_path: dir.path().join(AGENT_LOG),
            log_max_bytes: self.config.log_max_bytes,
            agent_args: Vec::new(),
            weaken: spec.weaken.clone(),
            payload: Payload::Jail(Jail {
                args: qemu::args(&binary, &shape),
                binary: self.config.qemu_binary.clone(),
                ro_binds: vec![PathBuf::from("/usr")],
                links: ["bin", "sbin", "lib", "lib64"]
                    .into_iter()
                    .map(|name| (name.to_string(), format!("usr/{name}")))
                    .collect(),
                vm_dir: Self::vm_dir(dir),
                devices,
            }),
        }
    }

    /// The VM's cgroup limits: guest RAM plus QEMU's own overhead, QEMU's threads, and the
    /// sandbox's CPU share.
    fn jail_limits(&self, spec: &SandboxSpec) -> Limits {
        Limits {
            cpu_millicores: spec.limits.cpu_millicores,
            memory_bytes: Some(self.guest_memory_bytes(spec) + self.config.qemu_overhead_bytes),
            pids: Some(QEMU_PIDS),
            disk_bytes: None,
        }
    }

    async fn boot(&self, slot: &Slot, state: &mut SlotState) -> Result<(), RuntimeError> {
        let id = state.spec.id.clone();
        let accel = self.acceleration().await;
        let procs = {
            let (cgroups, id, limits) = (
                self.cgroups.clone(),
                id.clone(),
                self.jail_limits(&state.spec),
            );
            let kvm = accel == Accel::Kvm;
            tokio::task::spawn_blocking(move || {
                let procs = cgroups.create(&id, &limits)?;
                if kvm {
                    cgroups.allow_device(&id, "c 10:232 rwm")?;
                }
                Ok::<_, RuntimeError>(procs)
            })
            .await
            .map_err(|e| RuntimeError::io("cgroup setup task", std::io::Error::other(e)))??
        };
        // A kernel or initramfs installed since this VM was created (a newer `cordon prepare`).
        self.link_guest(&Self::vm_dir(&slot.dir))?;
        let listener = slot.dir.bind_socket()?;
        let plan = self.plan(&slot.dir, &state.spec, &state.record, accel, procs);
        let launched = launch::run_nsinit(
            &self.config.nsinit_binary,
            &plan,
            &listener,
            None,
            self.config.boot_timeout,
        )
        .await;
        drop(listener);
        let launched = match launched {
            Ok(launched) => launched,
            Err(message) => return Err(self.fail(&id, slot, state, message).await),
        };
        state.record.running = Some(launched);
        state.record.failed = None;
        state.record.started = true;
        slot.dir.save_record(&state.record)?;
        let deadline = Instant::now() + self.config.boot_timeout;
        if let Err(message) = self.handshake(slot, &state.spec, launched, deadline).await {
            let message = match slot.dir.agent_log_tail() {
                Some(tail) => format!("{message}; console: {tail}"),
                None => message,
            };
            return Err(self.fail(&id, slot, state, message).await);
        }
        tracing::info!(sandbox = %id, pid = launched.pid, ?accel, "microVM running");
        Ok(())
    }

    /// Waits for the guest's agent (health), then sends its config; fails early when QEMU dies.
    async fn handshake(
        &self,
        slot: &Slot,
        spec: &SandboxSpec,
        qemu: LaunchResult,
        deadline: Instant,
    ) -> Result<(), String> {
        let attempt = async {
            let client = self
                .connect(slot, deadline.saturating_duration_since(Instant::now()))
                .await
                .map_err(|e| e.to_string())?;
            let health = http::Request::get("http://agent/_cordon/health")
                .body(Bytes::new())
                .map_err(|e| e.to_string())?;
            crate::namespace::agent::expect_success(&client, health, "GET /_cordon/health").await?;
            let body = serde_json::to_vec(&spec.agent_config).map_err(|e| e.to_string())?;
            let put = http::Request::put("http://agent/_cordon/config")
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Bytes::from(body))
                .map_err(|e| e.to_string())?;
            crate::namespace::agent::expect_success(&client, put, "PUT /_cordon/config").await
        };
        let watch = async {
            while is_alive(qemu.pid, qemu.start_time) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let bound = deadline.saturating_duration_since(Instant::now());
        let result = tokio::select! {
            result = tokio::time::timeout(bound, attempt) => match result {
                Ok(result) => result,
                Err(_) => Err(format!("agent not ready after {:?}", self.config.boot_timeout)),
            },
            () = watch => Err("QEMU exited during boot".into()),
        };
        // A channel error is most often QEMU going away (the guest powered off or panicked):
        // say so, whichever side noticed first.
        result.map_err(|message| {
            let exited =
                !is_alive(qemu.pid, qemu.start_time) && !message.starts_with("QEMU exited");
            match exited {
                true => format!("QEMU exited during boot ({message})"),
                false => message,
            }
        })
    }

    /// Takes the VM's channel: shuts the previous holder's connection down, connects and runs
    /// the session handshake. The stream is the raw channel (run yamux over it).
    async fn connect_raw(
        &self,
        slot: &Slot,
        timeout: Duration,
    ) -> Result<tokio::net::UnixStream, RuntimeError> {
        if let Some(previous) = slot.holder.lock().expect("holder lock").take() {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&previous),
                nix::sys::socket::Shutdown::Both,
            );
        }
        let mut stream = slot.dir.connect_socket().await?;
        let dup = stream
            .as_fd()
            .try_clone_to_owned()
            .context(|| "duplicate the channel fd".into())?;
        *slot.holder.lock().expect("holder lock") = Some(dup);
        cordon_channel::vm_link::host_connect(&mut stream, timeout)
            .await
            .map_err(|e| RuntimeError::io("agent channel", std::io::Error::other(e)))?;
        Ok(stream)
    }

    async fn connect(&self, slot: &Slot, timeout: Duration) -> Result<AgentClient, RuntimeError> {
        Ok(AgentClient::connect(self.connect_raw(slot, timeout).await?))
    }

    /// One host-only control call to the running guest's agent (`POST /_cordon/<route>`).
    async fn control(&self, slot: &Slot, route: &str) -> Result<(), String> {
        let call = async {
            let client = self
                .connect(slot, CONTROL_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            let request = http::Request::post(format!("http://agent/_cordon/{route}"))
                .body(Bytes::new())
                .map_err(|e| e.to_string())?;
            let what = format!("POST /_cordon/{route}");
            let response = client
                .request_bytes(request)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let status = response.status();
            let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                response.into_body(),
                CONTROL_BODY_MAX,
            ))
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
            match status.is_success() {
                true => Ok(()),
                false => Err(format!(
                    "{what}: {status} {}",
                    String::from_utf8_lossy(&body)
                )),
            }
        };
        tokio::time::timeout(CONTROL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "POST /_cordon/{route}: no answer within {CONTROL_TIMEOUT:?}"
                ))
            })
    }

    /// Asks the guest to sync and power off, waits (bounded) for QEMU to exit, then kills
    /// whatever is left.
    async fn shut_down(
        &self,
        id: &str,
        slot: &Slot,
        record: &mut Record,
    ) -> Result<(), RuntimeError> {
        if let Some(running) = record.running {
            if is_alive(running.pid, running.start_time) {
                let deadline = Instant::now() + self.config.stop_timeout;
                if let Err(error) = self.control(slot, "sync").await {
                    tracing::warn!(sandbox = id, %error, "guest sync before stop");
                }
                match self.control(slot, "poweroff").await {
                    Ok(()) => {
                        while is_alive(running.pid, running.start_time) && Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Err(error) => tracing::warn!(sandbox = id, %error, "guest poweroff"),
                }
            }
        }
        self.kill(id, slot, record).await
    }

    /// Kills QEMU (if it is still ours) and cleans its cgroups.
    async fn kill(&self, id: &str, slot: &Slot, record: &mut Record) -> Result<(), RuntimeError> {
        slot.holder.lock().expect("holder lock").take();
        if let Some(running) = record.running.take() {
            self.cgroups.thaw(id);
            launch::kill_init(running.pid, running.start_time).await;
        }
        let cgroups = self.cgroups.clone();
        let owned_id = id.to_string();
        tokio::task::spawn_blocking(move || cgroups.remove(&owned_id))
            .await
            .map_err(|e| RuntimeError::io("cgroup cleanup task", std::io::Error::other(e)))??;
        slot.dir.remove_socket();
        slot.dir.save_record(record)
    }

    /// Reconciles a record whose QEMU died behind our back: the sandbox failed.
    async fn refresh(
        &self,
        id: &str,
        slot: &Slot,
        state: &mut SlotState,
    ) -> Result<(), RuntimeError> {
        if let Some(running) = state.record.running {
            if !is_alive(running.pid, running.start_time) {
                tracing::warn!(sandbox = id, pid = running.pid, "QEMU exited unexpectedly");
                state.record.failed = Some(format!(
                    "the microVM exited unexpectedly (QEMU pid {}){}",
                    running.pid,
                    slot.dir
                        .agent_log_tail()
                        .map(|t| format!("; console: {t}"))
                        .unwrap_or_default()
                ));
                self.kill(id, slot, &mut state.record).await?;
            }
        }
        Ok(())
    }

    async fn fail(
        &self,
        id: &str,
        slot: &Slot,
        state: &mut SlotState,
        message: String,
    ) -> RuntimeError {
        tracing::warn!(sandbox = id, %message, "microVM failed to boot");
        if let Err(error) = self.kill(id, slot, &mut state.record).await {
            tracing::warn!(sandbox = id, %error, "cleanup after a failed boot");
        }
        state.record.failed = Some(message.clone());
        let _ = slot.dir.save_record(&state.record);
        RuntimeError::Boot {
            id: id.to_string(),
            message,
        }
    }

    fn keep_id_range(&self, dir: &SandboxDir, record: &mut Record) -> Result<(), RuntimeError> {
        if self.ids.reclaim(record.id_base, dir.path())? {
            return Ok(());
        }
        if record.running.is_some() {
            tracing::error!(sandbox = %dir.path().display(), id_base = record.id_base, "running microVM shares its id range");
            return Ok(());
        }
        // The disk belongs to the old range's root: hand it to the new one.
        record.id_base = self.ids.claim(dir.path())?;
        let disk = Self::vm_dir(dir).join(qemu::RW_DISK);
        std::os::unix::fs::chown(&disk, Some(record.id_base), Some(record.id_base))
            .context(|| format!("chown {}", disk.display()))?;
        dir.save_record(record)
    }
}

/// What this process's microVMs get: KVM only once the probe said so.
pub(crate) fn process_isolation() -> Isolation {
    match accel::decided() {
        Some(Accel::Kvm) => Isolation::MicrovmKvm,
        _ => Isolation::MicrovmTcg,
    }
}

#[async_trait]
impl Runtime for MicrovmRuntime {
    async fn create(&self, spec: SandboxSpec) -> Result<(), RuntimeError> {
        spec.validate()?;
        if matches!(spec.limits.memory_bytes, Some(m) if m < MIN_MEMORY_BYTES) {
            return Err(RuntimeError::InvalidSpec(format!(
                "a microVM needs at least {} MiB of memory",
                MIN_MEMORY_BYTES >> 20
            )));
        }
        lifecycle::check_layers_are_dirs(&spec)?;
        let (dir, record) =
            lifecycle::claim_sandbox_dir(&self.sandboxes_dir(), &self.cgroups, &self.ids, &spec)?;
        let id_base = record.id_base;
        if let Err(error) = self.prepare_vm(&dir, &spec, id_base).await {
            lifecycle::abandon_sandbox_dir(dir, &self.ids, id_base);
            return Err(error);
        }
        let slot = Arc::new(Slot {
            dir,
            inner: tokio::sync::Mutex::new(SlotState {
                spec: spec.clone(),
                record,
            }),
            holder: Mutex::new(None),
        });
        self.slots.insert(spec.id.clone(), slot);
        tracing::info!(sandbox = %spec.id, id_base, "microVM created");
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let slot = self.slot(id)?;
        let mut state = slot.inner.lock().await;
        self.refresh(id, &slot, &mut state).await?;
        if state.record.running.is_some() {
            return Err(lifecycle::wrong_state(id, &state.record, "start"));
        }
        self.boot(&slot, &mut state).await
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        let slot = self.slot(id)?;
        let mut state = slot.inner.lock().await;
        lifecycle::settle_for_stop(&mut state.record);
        self.shut_down(id, &slot, &mut state.record).await?;
        tracing::info!(sandbox = id, "microVM stopped");
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        let slot = self.slot(id)?;
        let mut state = slot.inner.lock().await;
        self.kill(id, &slot, &mut state.record).await?;
        slot.dir.remove_all();
        self.ids.release(state.record.id_base, slot.dir.path());
        self.slots.remove(id);
        tracing::info!(sandbox = id, "microVM destroyed");
        Ok(())
    }

    async fn open_channel(&self, id: &str) -> Result<Box<dyn ChannelIo>, RuntimeError> {
        let slot = self.slot(id)?;
        let mut state = slot.inner.lock().await;
        self.refresh(id, &slot, &mut state).await?;
        if state.record.running.is_none() {
            return Err(lifecycle::wrong_state(id, &state.record, "open a channel"));
        }
        Ok(Box::new(self.connect_raw(&slot, CONTROL_TIMEOUT).await?))
    }

    async fn state(&self, id: &str) -> Result<SandboxState, RuntimeError> {
        let slot = self.slot(id)?;
        let mut state = slot.inner.lock().await;
        self.refresh(id, &slot, &mut state).await?;
        Ok(state_of(&state.record))
    }

    /// Refused for now. The writable disk holds blocks the guest wrote, and guest root is not
    /// a boundary: mounting that image on the host (even read-only) would feed the host
    /// kernel's ext4 driver metadata an attacker chose. A capture must come out of the guest
    /// instead (its agent streaming the upper layer as a tar into the confined unpacker).
    async fn capture(&self, id: &str, _dest: &Path) -> Result<u64, RuntimeError> {
        self.slot(id)?;
        Err(RuntimeError::Unsupported(format!(
            "capture of microVM sandbox {id} is not supported yet: its disk is written by the \
             guest and is never mounted on the host"
        )))
    }

    async fn usage(&self, id: &str) -> Result<ResourceUsage, RuntimeError> {
        let slot = self.slot(id)?;
        let vm = Self::vm_dir(&slot.dir);
        let (cgroups, owned_id) = (self.cgroups.clone(), id.to_string());
        tokio::task::spawn_blocking(move || {
            let (memory_bytes, cpu_ns, pids) = cgroups.usage(&owned_id);
            ResourceUsage {
                memory_bytes,
                cpu_ns,
                pids,
                disk_bytes: images::rw_disk_blocks(&vm),
            }
        })
        .await
        .map_err(|e| RuntimeError::io("usage task", std::io::Error::other(e)))
    }

    async fn adopt(&self) -> Result<Vec<(String, SandboxState)>, RuntimeError> {
        let mut found = Vec::new();
        for (dir, spec, mut record) in store::scan(&self.sandboxes_dir()) {
            let id = spec.id.clone();
            if self.slots.contains(&id) {
                found.push((id.clone(), self.state(&id).await?));
                continue;
            }
            let slot = Arc::new(Slot {
                dir,
                inner: tokio::sync::Mutex::new(SlotState {
                    spec: spec.clone(),
                    record: record.clone(),
                }),
                holder: Mutex::new(None),
            });
            match record.running {
                Some(running) if is_alive(running.pid, running.start_time) => {
                    tracing::info!(sandbox = %id, pid = running.pid, "re-adopted running microVM");
                }
                Some(_) => {
                    tracing::info!(sandbox = %id, "microVM died while we were away; marking it stopped");
                    self.kill(&id, &slot, &mut record).await?;
                }
                None => self.kill(&id, &slot, &mut record).await?,
            }
            self.keep_id_range(&slot.dir, &mut record)?;
            found.push((id.clone(), state_of(&record)));
            slot.inner.lock().await.record = record;
            self.slots.insert(id, slot);
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    fn supports(&self, backend: crate::Backend) -> bool {
        backend == crate::Backend::Microvm
    }

    fn isolation(&self, _id: &str) -> Isolation {
        match accel::decided() {
            Some(Accel::Kvm) if !self.config.force_tcg => Isolation::MicrovmKvm,
            _ => Isolation::MicrovmTcg,
        }
    }
}
