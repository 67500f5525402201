//! The launch plan the runtime hands to `cordon-nsinit` on stdin, and nsinit's answer.
//! Internal to this crate's two halves; not a stable interface.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Weakening;

/// fd number of the agent channel's listening socket, in nsinit and in the agent.
pub const LISTEN_FD: i32 = 3;
/// fd number of the sealed memfd holding the agent binary, in nsinit.
pub const AGENT_MEMFD: i32 = 4;

/// Where the sandbox's writable layer lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WritableLayer {
    /// A host directory holding `upper/` and `work/`.
    Directory(PathBuf),
    /// A sparse ext4 image holding `upper/` and `work/`, loop-mounted in the sandbox mount ns.
    Ext4Image(PathBuf),
}

/// Everything nsinit needs to launch one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchPlan {
    pub id: String,
    /// The host-only sandbox directory (0700); also holds the mount staging directory.
    pub sandbox_dir: PathBuf,
    /// Read-only rootfs layers, top first.
    pub layers: Vec<PathBuf>,
    pub writable: WritableLayer,
    /// First host uid/gid of the sandbox's range; sandbox id 0 maps to it.
    pub id_base: u32,
    pub id_count: u32,
    pub hostname: String,
    /// `cgroup.procs` files nsinit writes itself into before creating the sandbox.
    pub cgroup_procs: Vec<PathBuf>,
    /// `cgroup.procs` files the init writes itself into after its mounts (the devices
    /// cgroup: it denies the loop device a disk image is mounted from).
    pub late_cgroup_procs: Vec<PathBuf>,
    pub tmp_size_bytes: u64,
    pub tmp_inodes: u64,
    /// RLIMIT_NPROC: a per-uid backstop to the pids cgroup (the uid range is the sandbox's own).
    pub nproc_limit: u64,
    /// The agent's log file and its size bound (rotated once to `<name>.1`).
    pub log_path: PathBuf,
    pub log_max_bytes: u64,
    pub agent_args: Vec<String>,
    pub weaken: Weakening,
    /// What the init execs: the agent (the namespace backend) or a jailed host binary.
    #[serde(default)]
    pub payload: Payload,
}

/// What the sandbox init finally execs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum Payload {
    /// The sealed agent memfd on fd 4, as PID 1 of the overlay root made of `layers` and
    /// `writable`, with Docker's default capabilities.
    #[default]
    Agent,
    /// A host binary (the microVM backend's QEMU) in a minimal jail root; see [`Jail`].
    Jail(Jail),
}

/// A jail for a host binary: the root is a small tmpfs holding read-only binds of host
/// directories, the VM's own directory and, optionally, a few device nodes. The binary runs
/// as the range's id 0 with no capabilities at all, env cleared; `layers` and `writable` of
/// the plan are unused.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Jail {
    /// Absolute path of the binary, inside the jail (it must live under a `ro_binds` entry).
    pub binary: PathBuf,
    /// argv, `argv[0]` included.
    pub args: Vec<String>,
    /// Host directories bound read-only at the same path inside (no symlinks: canonical).
    pub ro_binds: Vec<PathBuf>,
    /// Symlinks made in the jail root: (name, target), e.g. ("lib64", "usr/lib64").
    pub links: Vec<(String, String)>,
    /// Host directory bound read-write at [`JAIL_VM_DIR`]; owned by the range's id 0.
    pub vm_dir: PathBuf,
    /// Character devices made in the jail's /dev: (name, major, minor), owned by the range's
    /// id 0, mode 0600 (e.g. `kvm`, 10, 232).
    pub devices: Vec<(String, u64, u64)>,
}

/// Where [`Jail::vm_dir`] appears inside the jail.
pub const JAIL_VM_DIR: &str = "/vm";

/// What nsinit prints on stdout once the agent has been exec'd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchResult {
    /// The sandbox init's pid in the host pid namespace.
    pub pid: u32,
    /// Its start time (field 22 of `/proc/<pid>/stat`), to tell it from a reused pid.
    pub start_time: u64,
}

/// Reads field 22 (start time) and field 3 (state) of `/proc/<pid>/stat`.
/// `None` when the process does not exist.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain anything, so parse after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3; start time is field 22.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// True when `pid` is alive (not a zombie) and started at `start_time`.
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    matches!(proc_stat(pid), Some((state, start)) if start == start_time && state != 'Z' && state != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_stat_parses() {
        let (state, start) = proc_stat(std::process::id()).expect("own stat");
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(is_alive(std::process::id(), start));
        assert!(!is_alive(std::process::id(), start + 1));
    }
}
