//! The namespace backend: Linux namespaces, cgroups, seccomp and an overlay root per sandbox,
//! launched by `cordon-nsinit` (see ARCHITECTURE.md, "Launching a namespace sandbox").

pub(crate) mod agent;
pub(crate) mod capture;
pub(crate) mod launch;
pub(crate) mod store;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::UnixStream;

use crate::cgroup::Cgroups;
use crate::error::RuntimeError;
use crate::layer_copy::CopyLimits;
use crate::plan::{is_alive, WritableLayer};
use crate::sandbox_lifecycle::{self as lifecycle, state_of, SlotTable};
use crate::{fsutil, ChannelIo, ResourceUsage, Runtime, SandboxSpec, SandboxState};
use store::{IdRegistry, Record, SandboxDir};

/// Settings of a [`NamespaceRuntime`].
#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    /// Host-only directory holding `sandboxes/<id>/`. Created 0700.
    pub state_dir: PathBuf,
    /// The static `cordon-agent` binary; copied once into a sealed memfd.
    pub agent_binary: PathBuf,
    /// The `cordon-nsinit` launcher binary.
    pub nsinit_binary: PathBuf,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// Host-wide registry of claimed uid/gid ranges, shared by every runtime on the host.
    pub id_registry: PathBuf,
    /// How long a boot (launch + agent health + config) may take.
    pub boot_timeout: Duration,
    /// Size bound of each sandbox's `agent.log` (rotated once).
    pub log_max_bytes: u64,
    /// `/tmp` tmpfs size when the sandbox has no memory limit (else the limit, capped by this).
    pub tmp_max_bytes: u64,
    /// Bound on the file content a capture copies from a sandbox without a disk limit (with
    /// one, the disk limit is the bound).
    pub capture_max_bytes: u64,
    /// Bound on the entries (files, directories, links, …) a capture copies.
    pub capture_max_entries: u64,
}

impl NamespaceConfig {
    pub fn new(
        state_dir: impl Into<PathBuf>,
        agent_binary: impl Into<PathBuf>,
        nsinit_binary: impl Into<PathBuf>,
    ) -> Self {
        NamespaceConfig {
            state_dir: state_dir.into(),
            agent_binary: agent_binary.into(),
            nsinit_binary: nsinit_binary.into(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            id_registry: PathBuf::from("/run/cordon/id-ranges"),
            boot_timeout: Duration::from_secs(20),
            log_max_bytes: 1 << 20,
            tmp_max_bytes: 1 << 30,
            capture_max_bytes: 16 << 30,
            capture_max_entries: 2_000_000,
        }
    }
}

/// Directory nesting a capture follows (each level holds two fds while it is copied).
pub(crate) const CAPTURE_MAX_DEPTH: usize = 256;

/// One sandbox as this process knows it; the lock serialises lifecycle operations on it.
struct Slot {
    dir: SandboxDir,
    inner: tokio::sync::Mutex<SlotState>,
}

struct SlotState {
    spec: SandboxSpec,
    record: Record,
}

/// The namespace [`Runtime`].
pub struct NamespaceRuntime {
    config: NamespaceConfig,
    cgroups: Cgroups,
    agent_memfd: OwnedFd,
    slots: SlotTable<Slot>,
    ids: IdRegistry,
}

impl NamespaceRuntime {
    /// Prepares the state dir, detects the cgroup version and seals a copy of the agent.
    pub fn new(config: NamespaceConfig) -> Result<NamespaceRuntime, RuntimeError> {
        store::create_private_dir(&config.state_dir)?;
        store::create_private_dir(&config.state_dir.join("sandboxes"))?;
        let cgroups = Cgroups::detect(&config.cgroup_root)?;
        let agent_memfd = agent::sealed_copy(&config.agent_binary)?;
        tracing::info!(state_dir = %config.state_dir.display(), cgroup_v2 = cgroups.is_v2(), "namespace runtime ready");
        let ids = IdRegistry::new(config.id_registry.clone());
        Ok(NamespaceRuntime {
            config,
            cgroups,
            agent_memfd,
            slots: SlotTable::new(),
            ids,
        })
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.config.state_dir.join("sandboxes")
    }

    fn slot(&self, id: &str) -> Result<Arc<Slot>, RuntimeError> {
        self.slots.get(id)
    }

    fn writable_layer(&self, dir: &SandboxDir, spec: &SandboxSpec) -> WritableLayer {
        match spec.limits.disk_bytes {
            Some(_) => WritableLayer::Ext4Image(dir.path().join("disk.img")),
            None => WritableLayer::Directory(dir.path().join("rw")),
        }
    }

    /// Kills the sandbox (if its init is still ours) and cleans its cgroups.
    async fn kill(
        &self,
        id: &str,
        dir: &SandboxDir,
        record: &mut Record,
    ) -> Result<(), RuntimeError> {
        if let Some(running) = record.running.take() {
            // Frozen tasks (a capture cut short) would not even die of SIGKILL.
            self.cgroups.thaw(id);
            launch::kill_init(running.pid, running.start_time).await;
        }
        let cgroups = self.cgroups.clone();
        let owned_id = id.to_string();
        tokio::task::spawn_blocking(move || cgroups.remove(&owned_id))
            .await
            .map_err(|e| RuntimeError::io("cgroup cleanup task", std::io::Error::other(e)))??;
        dir.remove_socket();
        dir.save_record(record)
    }

    /// Reconciles a record whose init died behind our back.
    async fn refresh(
        &self,
        id: &str,
        slot: &Slot,
        state: &mut SlotState,
    ) -> Result<(), RuntimeError> {
        if let Some(running) = state.record.running {
            if !is_alive(running.pid, running.start_time) {
                tracing::warn!(
                    sandbox = id,
                    pid = running.pid,
                    "sandbox init exited unexpectedly"
                );
                state.record.failed = Some(format!(
                    "the sandbox exited unexpectedly{}",
                    slot.dir
                        .agent_log_tail()
                        .map(|t| format!("; agent log: {t}"))
                        .unwrap_or_default()
                ));
                self.kill(id, &slot.dir, &mut state.record).await?;
            }
        }
        Ok(())
    }

    /// Makes sure an adopted sandbox still owns its id range in the host-wide registry (it is
    /// lost on reboot). A stopped sandbox whose range was taken meanwhile gets a new one: its
    /// writable layer stores ids unshifted, so nothing on disk depends on the range.
    fn keep_id_range(&self, dir: &SandboxDir, record: &mut Record) -> Result<(), RuntimeError> {
        if self.ids.reclaim(record.id_base, dir.path())? {
            return Ok(());
        }
        if record.running.is_some() {
            tracing::error!(sandbox = %dir.path().display(), id_base = record.id_base, "running sandbox shares its id range with another sandbox");
            return Ok(());
        }
        record.id_base = self.ids.claim(dir.path())?;
        dir.save_record(record)
    }

    async fn boot(&self, slot: &Slot, state: &mut SlotState) -> Result<(), RuntimeError> {
        let id = state.spec.id.clone();
        let procs = {
            let (cgroups, id, limits) =
                (self.cgroups.clone(), id.clone(), state.spec.limits.clone());
            tokio::task::spawn_blocking(move || cgroups.create(&id, &limits))
                .await
                .map_err(|e| RuntimeError::io("cgroup setup task", std::io::Error::other(e)))??
        };
        let listener = slot.dir.bind_socket()?;
        let plan = launch::plan(
            &self.config,
            &slot.dir,
            &state.spec,
            state.record.id_base,
            self.writable_layer(&slot.dir, &state.spec),
            procs,
        );
        let launched = launch::run_nsinit(
            &self.config.nsinit_binary,
            &plan,
            &listener,
            Some(&self.agent_memfd),
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
        let ready = agent::wait_ready(
            &slot.dir,
            &state.spec.agent_config,
            launched,
            self.config.boot_timeout,
        )
        .await;
        if let Err(message) = ready {
            let message = match slot.dir.agent_log_tail() {
                Some(tail) => format!("{message}; agent log: {tail}"),
                None => message,
            };
            return Err(self.fail(&id, slot, state, message).await);
        }
        tracing::info!(sandbox = %id, pid = launched.pid, "sandbox running");
        Ok(())
    }

    async fn fail(
        &self,
        id: &str,
        slot: &Slot,
        state: &mut SlotState,
        message: String,
    ) -> RuntimeError {
        tracing::warn!(sandbox = id, %message, "sandbox failed to boot");
        if let Err(error) = self.kill(id, &slot.dir, &mut state.record).await {
            tracing::warn!(sandbox = id, %error, "cleanup after a failed boot");
        }
        state.record.failed = Some(message.clone());
        let _ = slot.dir.save_record(&state.record);
        RuntimeError::Boot {
            id: id.to_string(),
            message,
        }
    }
}

#[async_trait]
impl Runtime for NamespaceRuntime {
    async fn capture(&self, id: &str, dest: &std::path::Path) -> Result<u64, RuntimeError> {
        let slot = self.slot(id)?;
        // Held for the whole copy: no start, stop or destroy meanwhile.
        let mut state = slot.inner.lock().await;
        self.refresh(id, &slot, &mut state).await?;
        let capture = capture::Capture {
            id: id.to_string(),
            layer: self.writable_layer(&slot.dir, &state.spec),
            running: state.record.running.is_some(),
            cgroups: self.cgroups.clone(),
            dest: dest.to_path_buf(),
            limits: CopyLimits {
                max_bytes: state
                    .spec
                    .limits
                    .disk_bytes
                    .unwrap_or(self.config.capture_max_bytes),
                max_entries: self.config.capture_max_entries,
                max_depth: CAPTURE_MAX_DEPTH,
            },
        };
        let stats = tokio::task::spawn_blocking(move || capture.run())
            .await
            .map_err(|e| RuntimeError::io("capture task", std::io::Error::other(e)))??;
        tracing::info!(
            sandbox = id,
            bytes = stats.bytes,
            entries = stats.entries,
            skipped = stats.skipped,
            "sandbox captured"
        );
        Ok(stats.bytes)
    }

    async fn create(&self, spec: SandboxSpec) -> Result<(), RuntimeError> {
        spec.validate()?;
        lifecycle::check_layers_are_dirs(&spec)?;
        let (dir, record) =
            lifecycle::claim_sandbox_dir(&self.sandboxes_dir(), &self.cgroups, &self.ids, &spec)?;
        let id_base = record.id_base;
        let layer = self.writable_layer(&dir, &spec);
        if let Err(error) = store::prepare_writable_layer(&layer, spec.limits.disk_bytes).await {
            lifecycle::abandon_sandbox_dir(dir, &self.ids, id_base);
            return Err(error);
        }
        let slot = Arc::new(Slot {
            dir,
            inner: tokio::sync::Mutex::new(SlotState {
                spec: spec.clone(),
                record,
            }),
        });
        self.slots.insert(spec.id.clone(), slot);
        tracing::info!(sandbox = %spec.id, id_base, "sandbox created");
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
        self.kill(id, &slot.dir, &mut state.record).await?;
        tracing::info!(sandbox = id, "sandbox stopped");
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        let slot = self.slot(id)?;
        let mut state = slot.inner.lock().await;
        self.kill(id, &slot.dir, &mut state.record).await?;
        slot.dir.remove_all();
        self.ids.release(state.record.id_base, slot.dir.path());
        self.slots.remove(id);
        tracing::info!(sandbox = id, "sandbox destroyed");
        Ok(())
    }

    async fn open_channel(&self, id: &str) -> Result<Box<dyn ChannelIo>, RuntimeError> {
        let slot = self.slot(id)?;
        let mut state = slot.inner.lock().await;
        self.refresh(id, &slot, &mut state).await?;
        if state.record.running.is_none() {
            return Err(lifecycle::wrong_state(id, &state.record, "open a channel"));
        }
        let stream: UnixStream = slot.dir.connect_socket().await?;
        Ok(Box::new(stream))
    }

    async fn state(&self, id: &str) -> Result<SandboxState, RuntimeError> {
        let slot = self.slot(id)?;
        let mut state = slot.inner.lock().await;
        self.refresh(id, &slot, &mut state).await?;
        Ok(state_of(&state.record))
    }

    async fn usage(&self, id: &str) -> Result<ResourceUsage, RuntimeError> {
        let slot = self.slot(id)?;
        let state = slot.inner.lock().await;
        let layer = self.writable_layer(&slot.dir, &state.spec);
        drop(state);
        let (cgroups, owned_id) = (self.cgroups.clone(), id.to_string());
        tokio::task::spawn_blocking(move || {
            let (memory_bytes, cpu_ns, pids) = cgroups.usage(&owned_id);
            let disk_bytes = writable_layer_usage(&layer);
            ResourceUsage {
                memory_bytes,
                cpu_ns,
                pids,
                disk_bytes,
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
            match record.running {
                Some(running) if is_alive(running.pid, running.start_time) => {
                    // A capture cut short by a crash of the host process left it frozen.
                    self.cgroups.thaw(&id);
                    tracing::info!(sandbox = %id, pid = running.pid, "re-adopted running sandbox");
                }
                Some(_) => {
                    tracing::info!(sandbox = %id, "sandbox died while we were away; marking it stopped");
                    self.kill(&id, &dir, &mut record).await?;
                }
                // Not recorded as running, but a boot cut short by a crash of the host process
                // may have left processes in its cgroups: kill them.
                None => self.kill(&id, &dir, &mut record).await?,
            }
            self.keep_id_range(&dir, &mut record)?;
            found.push((id.clone(), state_of(&record)));
            let slot = Arc::new(Slot {
                dir,
                inner: tokio::sync::Mutex::new(SlotState { spec, record }),
            });
            self.slots.insert(id, slot);
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }
}

fn writable_layer_usage(layer: &WritableLayer) -> u64 {
    match layer {
        WritableLayer::Directory(path) => fsutil::disk_usage(path).unwrap_or(0),
        // The image lives in a host-only directory and is a plain file we created.
        WritableLayer::Ext4Image(path) => {
            use std::os::unix::fs::MetadataExt;
            std::fs::symlink_metadata(path)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0)
        }
    }
}
