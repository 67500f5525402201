//! Per-sandbox cgroups, v1 (one hierarchy per controller) or v2 (one unified hierarchy).
//!
//! Every sandbox gets `<hierarchy>/cordon/<id>`. The sandbox never sees a cgroupfs (none is
//! mounted inside and it has no capability in the host user namespace), so it cannot change
//! its own limits.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::RuntimeError;
use crate::{Limits, DEFAULT_PIDS_MAX};

const PARENT: &str = "cordon";
const CFS_PERIOD_US: u64 = 100_000;
/// v1 controllers a sandbox joins. `cpu` and `cpuacct` are often one co-mounted hierarchy;
/// `freezer` holds the sandbox still while its writable layer is captured.
const V1_CONTROLLERS: [&str; 6] = ["memory", "pids", "cpu", "cpuacct", "devices", "freezer"];
/// How often a freeze in progress is checked.
const FREEZE_POLL: Duration = Duration::from_millis(5);
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// Devices the sandbox's minimal /dev holds; everything else (mknod included) is denied.
const V1_ALLOWED_DEVICES: [&str; 8] = [
    "c 1:3 rwm",   // null
    "c 1:5 rwm",   // zero
    "c 1:7 rwm",   // full
    "c 1:8 rwm",   // random
    "c 1:9 rwm",   // urandom
    "c 5:0 rwm",   // tty
    "c 5:2 rwm",   // ptmx
    "c 136:* rwm", // pts
];

#[derive(Debug, Clone)]
pub(crate) enum Cgroups {
    /// Controller name → its hierarchy's mount point.
    V1(Vec<(&'static str, PathBuf)>),
    V2(PathBuf),
}

fn cgroup_err(path: &Path, source: std::io::Error) -> RuntimeError {
    RuntimeError::Cgroup {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), RuntimeError> {
    fs::write(path, value).map_err(|e| cgroup_err(path, e))
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Cgroups {
    /// Picks v2 when the memory, pids and cpu controllers are available in a unified hierarchy
    /// (`root` itself, or the hybrid `root/unified`); v1 otherwise.
    pub(crate) fn detect(root: &Path) -> Result<Cgroups, RuntimeError> {
        for unified in [root.to_path_buf(), root.join("unified")] {
            if let Ok(controllers) = fs::read_to_string(unified.join("cgroup.controllers")) {
                let available: Vec<&str> = controllers.split_whitespace().collect();
                if V2_CONTROLLERS.iter().all(|c| available.contains(c)) {
                    return Ok(Cgroups::V2(unified));
                }
            }
        }
        let mut hierarchies: Vec<(&'static str, PathBuf)> = Vec::new();
        for controller in V1_CONTROLLERS {
            let mount = root.join(controller);
            let canonical = mount.canonicalize().map_err(|e| cgroup_err(&mount, e))?;
            // A co-mounted hierarchy (cpu,cpuacct) is joined and cleaned once.
            if !hierarchies.iter().any(|(_, p)| *p == canonical) {
                hierarchies.push((controller, canonical));
            }
        }
        Ok(Cgroups::V1(hierarchies))
    }

    pub(crate) fn is_v2(&self) -> bool {
        matches!(self, Cgroups::V2(_))
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V1(hierarchies) => hierarchies
                .iter()
                .map(|(_, mount)| mount.join(PARENT).join(id))
                .collect(),
            Cgroups::V2(root) => vec![root.join(PARENT).join(id)],
        }
    }

    fn controller_dir(&self, id: &str, controller: &str) -> PathBuf {
        match self {
            Cgroups::V1(hierarchies) => {
                let mount = hierarchies
                    .iter()
                    .find(|(name, mount)| {
                        *name == controller
                            || mount.file_name().is_some_and(|n| {
                                n.to_string_lossy()
                                    .split(',')
                                    .any(|part| part == controller)
                            })
                    })
                    .map(|(_, mount)| mount.clone())
                    .unwrap_or_default();
                mount.join(PARENT).join(id)
            }
            Cgroups::V2(root) => root.join(PARENT).join(id),
        }
    }

    /// Creates the sandbox's cgroups with `limits` applied; returns the `cgroup.procs` files
    /// the launcher joins first, and those the init joins once its mounts are done (the v1
    /// devices cgroup, which would forbid the loop device of a disk image).
    pub(crate) fn create(
        &self,
        id: &str,
        limits: &Limits,
    ) -> Result<(Vec<PathBuf>, Vec<PathBuf>), RuntimeError> {
        // A leftover from a crash would keep stale limits; start clean.
        self.remove(id)?;
        match self {
            Cgroups::V1(_) => self.create_v1(id, limits)?,
            Cgroups::V2(root) => create_v2(root, id, limits)?,
        }
        let devices = match self {
            Cgroups::V1(_) => Some(self.controller_dir(id, "devices")),
            Cgroups::V2(_) => None,
        };
        let (late, early): (Vec<PathBuf>, Vec<PathBuf>) = self
            .dirs(id)
            .into_iter()
            .partition(|d| Some(d) == devices.as_ref());
        let procs = |dirs: Vec<PathBuf>| dirs.into_iter().map(|d| d.join("cgroup.procs")).collect();
        Ok((procs(early), procs(late)))
    }

    fn create_v1(&self, id: &str, limits: &Limits) -> Result<(), RuntimeError> {
        for dir in self.dirs(id) {
            fs::create_dir_all(&dir).map_err(|e| cgroup_err(&dir, e))?;
        }
        let memory = self.controller_dir(id, "memory");
        if let Some(bytes) = limits.memory_bytes {
            write(&memory.join("memory.limit_in_bytes"), &bytes.to_string())?;
            // Same value for memory+swap: the sandbox gets no swap. Absent without swap
            // accounting, where there is nothing to limit.
            match fs::write(
                memory.join("memory.memsw.limit_in_bytes"),
                bytes.to_string(),
            ) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(cgroup_err(&memory.join("memory.memsw.limit_in_bytes"), e))
                }
                _ => {}
            }
        }
        let pids = self.controller_dir(id, "pids");
        write(
            &pids.join("pids.max"),
            &limits.pids.unwrap_or(DEFAULT_PIDS_MAX).to_string(),
        )?;
        if let Some(millicores) = limits.cpu_millicores {
            let cpu = self.controller_dir(id, "cpu");
            write(&cpu.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
            write(
                &cpu.join("cpu.cfs_quota_us"),
                &cfs_quota_us(millicores).to_string(),
            )?;
        }
        let devices = self.controller_dir(id, "devices");
        write(&devices.join("devices.deny"), "a")?;
        for rule in V1_ALLOWED_DEVICES {
            write(&devices.join("devices.allow"), rule)?;
        }
        Ok(())
    }

    /// Allows one more device in the sandbox's v1 devices cgroup (`/dev/kvm` for a jailed
    /// QEMU on KVM). v2 has no devices file (the eBPF controller is not used): nothing to do.
    pub(crate) fn allow_device(&self, id: &str, rule: &str) -> Result<(), RuntimeError> {
        match self {
            Cgroups::V1(_) => write(
                &self.controller_dir(id, "devices").join("devices.allow"),
                rule,
            ),
            Cgroups::V2(_) => Ok(()),
        }
    }

    /// Memory bytes, CPU nanoseconds and number of tasks in the sandbox's cgroups.
    pub(crate) fn usage(&self, id: &str) -> (u64, u64, u64) {
        match self {
            Cgroups::V1(_) => {
                let memory = read_u64(
                    &self
                        .controller_dir(id, "memory")
                        .join("memory.usage_in_bytes"),
                );
                let cpu = read_u64(&self.controller_dir(id, "cpuacct").join("cpuacct.usage"));
                let pids = read_u64(&self.controller_dir(id, "pids").join("pids.current"));
                (memory.unwrap_or(0), cpu.unwrap_or(0), pids.unwrap_or(0))
            }
            Cgroups::V2(root) => {
                let dir = root.join(PARENT).join(id);
                let memory = read_u64(&dir.join("memory.current")).unwrap_or(0);
                let pids = read_u64(&dir.join("pids.current")).unwrap_or(0);
                let cpu_usec = fs::read_to_string(dir.join("cpu.stat"))
                    .ok()
                    .and_then(|stat| {
                        stat.lines()
                            .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
                    })
                    .unwrap_or(0);
                (memory, cpu_usec * 1000, pids)
            }
        }
    }

    /// True when tasks live in the sandbox's cgroups.
    pub(crate) fn is_populated(&self, id: &str) -> bool {
        let procs = self.controller_dir(id, "pids").join("cgroup.procs");
        fs::read_to_string(procs).is_ok_and(|list| !list.trim().is_empty())
    }

    /// Freezes every task of the sandbox; returns once all are frozen. After `timeout` the
    /// sandbox is thawed again and the freeze fails.
    pub(crate) fn freeze(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let (control, frozen_when): (PathBuf, fn(&str) -> bool) = match self {
            Cgroups::V1(_) => (
                self.controller_dir(id, "freezer").join("freezer.state"),
                |state| state.trim() == "FROZEN",
            ),
            Cgroups::V2(root) => (root.join(PARENT).join(id).join("cgroup.events"), |events| {
                events.lines().any(|l| l.trim() == "frozen 1")
            }),
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // v1 needs the request repeated while tasks are still FREEZING; v2 ignores a repeat.
            self.request_freeze(id, true)?;
            let state = fs::read_to_string(&control).map_err(|e| cgroup_err(&control, e))?;
            if frozen_when(&state) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                self.thaw(id);
                return Err(cgroup_err(
                    &control,
                    std::io::Error::new(
                        ErrorKind::TimedOut,
                        format!("the sandbox did not freeze within {timeout:?}"),
                    ),
                ));
            }
            std::thread::sleep(FREEZE_POLL);
        }
    }

    /// Thaws the sandbox (a no-op when it is not frozen or its cgroups are gone). Frozen v1
    /// tasks cannot even be killed, so every kill thaws first.
    pub(crate) fn thaw(&self, id: &str) {
        if let Err(error) = self.request_freeze(id, false) {
            tracing::debug!(sandbox = id, %error, "thaw");
        }
    }

    fn request_freeze(&self, id: &str, frozen: bool) -> Result<(), RuntimeError> {
        let (file, value) = match (self, frozen) {
            (Cgroups::V1(_), true) => ("freezer.state", "FROZEN"),
            (Cgroups::V1(_), false) => ("freezer.state", "THAWED"),
            (Cgroups::V2(_), true) => ("cgroup.freeze", "1"),
            (Cgroups::V2(_), false) => ("cgroup.freeze", "0"),
        };
        let dir = match self {
            Cgroups::V1(_) => self.controller_dir(id, "freezer"),
            Cgroups::V2(root) => root.join(PARENT).join(id),
        };
        write(&dir.join(file), value)
    }

    /// SIGKILLs every task left in the sandbox's cgroups (those outside its pid namespace
    /// survive the init's death only when the pid namespace was weakened away).
    pub(crate) fn kill_all(&self, id: &str) {
        self.thaw(id);
        if let Cgroups::V2(root) = self {
            let _ = fs::write(root.join(PARENT).join(id).join("cgroup.kill"), "1");
        }
        let procs = self.controller_dir(id, "pids").join("cgroup.procs");
        for _ in 0..50 {
            let Ok(list) = fs::read_to_string(&procs) else {
                return;
            };
            let pids: Vec<i32> = list.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the sandbox's cgroups, killing anything still in them.
    pub(crate) fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.kill_all(id);
        for dir in self.dirs(id) {
            remove_dir_retrying(&dir)?;
        }
        Ok(())
    }
}

fn create_v2(root: &Path, id: &str, limits: &Limits) -> Result<(), RuntimeError> {
    let enable = V2_CONTROLLERS
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let parent = root.join(PARENT);
    fs::create_dir_all(&parent).map_err(|e| cgroup_err(&parent, e))?;
    write(&root.join("cgroup.subtree_control"), &enable)?;
    write(&parent.join("cgroup.subtree_control"), &enable)?;
    let dir = parent.join(id);
    fs::create_dir(&dir).map_err(|e| cgroup_err(&dir, e))?;
    if let Some(bytes) = limits.memory_bytes {
        write(&dir.join("memory.max"), &bytes.to_string())?;
        match fs::write(dir.join("memory.swap.max"), "0") {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(cgroup_err(&dir.join("memory.swap.max"), e))
            }
            _ => {}
        }
        // memory.oom.group stays 0 on purpose: the agent is the sandbox's PID 1, and a group
        // kill on the first OOM would take the whole sandbox (and every command session) down.
        // The OOM killer picks the biggest task, which is the hog, not the agent.
    }
    write(
        &dir.join("pids.max"),
        &limits.pids.unwrap_or(DEFAULT_PIDS_MAX).to_string(),
    )?;
    if let Some(millicores) = limits.cpu_millicores {
        write(
            &dir.join("cpu.max"),
            &format!("{} {CFS_PERIOD_US}", cfs_quota_us(millicores)),
        )?;
    }
    Ok(())
}

fn cfs_quota_us(millicores: u32) -> u64 {
    (u64::from(millicores) * CFS_PERIOD_US / 1000).max(1000)
}

/// rmdir, retrying while the last tasks finish exiting.
fn remove_dir_retrying(dir: &Path) -> Result<(), RuntimeError> {
    for attempt in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 99 => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(cgroup_err(dir, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn v2_is_picked_when_the_unified_hierarchy_has_the_controllers() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("unified")).unwrap();
        fs::write(
            root.path().join("unified/cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let cgroups = Cgroups::detect(root.path()).unwrap();
        assert!(cgroups.is_v2());
        let limits = Limits {
            cpu_millicores: Some(500),
            memory_bytes: Some(64 << 20),
            pids: None,
            disk_bytes: None,
        };
        let (early, late) = cgroups.create("box", &limits).unwrap();
        let dir = root.path().join("unified/cordon/box");
        assert_eq!(early, vec![dir.join("cgroup.procs")]);
        assert!(late.is_empty());
        assert_eq!(
            read(&root.path().join("unified/cordon/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(read(&dir.join("memory.max")), (64u64 << 20).to_string());
        assert_eq!(read(&dir.join("memory.swap.max")), "0");
        assert_eq!(read(&dir.join("pids.max")), DEFAULT_PIDS_MAX.to_string());
        assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
    }

    #[test]
    fn v1_writes_limits_per_controller_and_joins_devices_late() {
        let root = tempfile::tempdir().unwrap();
        // A hybrid host: an empty unified hierarchy, v1 controllers, cpu and cpuacct co-mounted.
        fs::create_dir(root.path().join("unified")).unwrap();
        fs::write(root.path().join("unified/cgroup.controllers"), "").unwrap();
        for dir in ["memory", "pids", "cpu,cpuacct", "devices", "freezer"] {
            fs::create_dir(root.path().join(dir)).unwrap();
        }
        for link in ["cpu", "cpuacct"] {
            std::os::unix::fs::symlink("cpu,cpuacct", root.path().join(link)).unwrap();
        }
        let cgroups = Cgroups::detect(root.path()).unwrap();
        assert!(!cgroups.is_v2());
        let limits = Limits {
            cpu_millicores: Some(200),
            memory_bytes: Some(32 << 20),
            pids: Some(10),
            disk_bytes: None,
        };
        let (early, late) = cgroups.create("box", &limits).unwrap();
        assert_eq!(
            early.len(),
            4,
            "memory, pids, cpu,cpuacct once and freezer: {early:?}"
        );
        assert_eq!(
            late,
            vec![root.path().join("devices/cordon/box/cgroup.procs")]
        );
        assert_eq!(
            read(&root.path().join("memory/cordon/box/memory.limit_in_bytes")),
            (32u64 << 20).to_string()
        );
        assert_eq!(
            read(
                &root
                    .path()
                    .join("memory/cordon/box/memory.memsw.limit_in_bytes")
            ),
            (32u64 << 20).to_string()
        );
        assert_eq!(read(&root.path().join("pids/cordon/box/pids.max")), "10");
        assert_eq!(
            read(&root.path().join("cpu,cpuacct/cordon/box/cpu.cfs_quota_us")),
            "20000"
        );
        assert_eq!(
            read(&root.path().join("devices/cordon/box/devices.deny")),
            "a"
        );
    }

    fn fake_v2() -> (tempfile::TempDir, Cgroups, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpu io memory pids\n",
        )
        .unwrap();
        let cgroups = Cgroups::detect(root.path()).unwrap();
        cgroups.create("box", &Limits::default()).unwrap();
        let dir = root.path().join("cordon/box");
        (root, cgroups, dir)
    }

    #[test]
    fn v2_freeze_waits_for_the_kernel_to_report_frozen_and_thaw_undoes_it() {
        let (_root, cgroups, dir) = fake_v2();
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        cgroups.freeze("box", Duration::from_secs(1)).unwrap();
        assert_eq!(read(&dir.join("cgroup.freeze")), "1");
        cgroups.thaw("box");
        assert_eq!(read(&dir.join("cgroup.freeze")), "0");
    }

    #[test]
    fn v2_freeze_that_never_completes_fails_and_thaws() {
        let (_root, cgroups, dir) = fake_v2();
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let error = cgroups
            .freeze("box", Duration::from_millis(50))
            .unwrap_err();
        assert!(error.to_string().contains("did not freeze"), "{error}");
        assert_eq!(read(&dir.join("cgroup.freeze")), "0");
    }

    #[test]
    fn v1_freeze_and_thaw_use_the_freezer_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["memory", "pids", "cpu", "cpuacct", "devices", "freezer"] {
            fs::create_dir(root.path().join(dir)).unwrap();
        }
        let cgroups = Cgroups::detect(root.path()).unwrap();
        cgroups.create("box", &Limits::default()).unwrap();
        // A plain file reads back what was written, as a freezer that froze at once would.
        cgroups.freeze("box", Duration::from_secs(1)).unwrap();
        let state = root.path().join("freezer/cordon/box/freezer.state");
        assert_eq!(read(&state), "FROZEN");
        cgroups.thaw("box");
        assert_eq!(read(&state), "THAWED");
    }

    #[test]
    fn killing_a_sandbox_thaws_it_first() {
        let (_root, cgroups, dir) = fake_v2();
        fs::write(dir.join("cgroup.freeze"), "1").unwrap();
        cgroups.kill_all("box");
        assert_eq!(read(&dir.join("cgroup.freeze")), "0");
    }

    #[test]
    fn quota_follows_millicores() {
        assert_eq!(cfs_quota_us(200), 20_000);
        assert_eq!(cfs_quota_us(2000), 200_000);
        assert_eq!(cfs_quota_us(1), 1000);
    }
}
