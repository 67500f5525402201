//! Pure parsers for the procfs files the probes read. Kept free of I/O so they are unit-tested
//! on the host with captured text.

/// Capability numbers, indexed by bit (include/uapi/linux/capability.h).
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Docker's default capability set (moby `oci/caps/defaults.go`), which the sandbox may keep
/// inside its user namespace; anything beyond it is the "privileged-ish" class of row 12.
pub const DOCKER_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The bit of a capability name, e.g. `SYS_ADMIN` → 21.
pub fn cap_bit(name: &str) -> Option<u32> {
    CAP_NAMES
        .iter()
        .position(|known| *known == name)
        .map(|bit| bit as u32)
}

/// The mask of Docker's default set.
pub fn docker_default_mask() -> u64 {
    DOCKER_DEFAULT_CAPS
        .iter()
        .map(|name| 1u64 << cap_bit(name).expect("known capability"))
        .fold(0, |mask, bit| mask | bit)
}

/// Names of the bits set in `mask`; unknown high bits are shown as `CAP_<n>`.
pub fn cap_names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|bit| mask & (1u64 << bit) != 0)
        .map(|bit| match CAP_NAMES.get(bit as usize) {
            Some(name) => (*name).to_string(),
            None => format!("CAP_{bit}"),
        })
        .collect()
}

/// The `CapInh`/`CapPrm`/`CapEff`/`CapBnd`/`CapAmb` lines of `/proc/<pid>/status`.
pub fn status_caps(status: &str) -> Vec<(String, u64)> {
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            if !key.starts_with("Cap") {
                return None;
            }
            let mask = u64::from_str_radix(value.trim(), 16).ok()?;
            Some((key.to_string(), mask))
        })
        .collect()
}

/// One `Key:\tvalue` field of `/proc/<pid>/status`, trimmed.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// The fields of `/proc/<pid>/stat` the pid-visibility probe needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub comm: String,
    pub ppid: i32,
    pub flags: u64,
}

/// `PF_KTHREAD` (include/linux/sched.h): kernel threads never appear inside a pid namespace.
pub const PF_KTHREAD: u64 = 0x0020_0000;

impl ProcStat {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// Parses `/proc/<pid>/stat`. `comm` may contain spaces and parentheses, so it is everything
/// between the first `(` and the last `)`.
pub fn proc_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    // After ")": state ppid pgrp session tty_nr tpgid flags ...
    let mut rest = text[close + 1..].split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    let flags = rest.nth(4)?.parse().ok()?;
    Some(ProcStat {
        pid,
        comm,
        ppid,
        flags,
    })
}

/// One row of `/proc/net/unix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocketEntry {
    pub inode: u64,
    /// `@name` for abstract sockets (NULs shown as `@`), a path for bound ones, None unbound.
    pub path: Option<String>,
}

/// Parses `/proc/net/unix`: `Num RefCount Protocol Flags Type St Inode [Path]`.
pub fn net_unix(text: &str) -> Vec<UnixSocketEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let inode = fields.nth(6)?.parse().ok()?;
            // A path may contain spaces; everything after the inode column is the path.
            let path = fields.collect::<Vec<_>>().join(" ");
            Some(UnixSocketEntry {
                inode,
                path: (!path.is_empty()).then_some(path),
            })
        })
        .collect()
}

/// The inode of a `socket:[N]` fd link target.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// What an fd link in `/proc/<pid>/fd` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdTarget {
    /// `socket:[N]`, `pipe:[N]`, `anon_inode:…`: no filesystem location to escape through.
    Anonymous,
    /// `/memfd:name (deleted)`: an anonymous file (e.g. the agent binary's sealed copy).
    Memfd,
    /// A filesystem path (possibly with a ` (deleted)` suffix).
    Path,
}

pub fn fd_target_kind(link: &str) -> FdTarget {
    if link.starts_with("/memfd:") {
        FdTarget::Memfd
    } else if link.starts_with('/') {
        FdTarget::Path
    } else {
        FdTarget::Anonymous
    }
}

/// `(total, nonzero)` address counts over the lines of `/proc/kallsyms`. With
/// `kptr_restrict` in force every address reads as zeros.
pub fn kallsyms_addresses(text: &str) -> (usize, usize) {
    let mut total = 0;
    let mut nonzero = 0;
    for line in text.lines() {
        let Some(address) = line.split_whitespace().next() else {
            continue;
        };
        let Ok(value) = u64::from_str_radix(address, 16) else {
            continue;
        };
        total += 1;
        if value != 0 {
            nonzero += 1;
        }
    }
    (total, nonzero)
}

/// The `major:minor` device of each mount in `/proc/<pid>/mountinfo`.
pub fn mountinfo_devices(text: &str) -> Vec<(u32, u32)> {
    text.lines()
        .filter_map(|line| {
            let field = line.split_whitespace().nth(2)?;
            let (major, minor) = field.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .collect()
}

/// Lines of mountinfo that reveal host paths: any line containing a harness-given host path
/// (e.g. the server's state dir), and overlay options naming absolute `lowerdir=`,
/// `upperdir=` or `workdir=` paths, which are host paths by construction (the sandbox cannot
/// mount overlays itself). Returns `(line, why)` pairs.
pub fn mountinfo_host_leaks(text: &str, host_paths: &[String]) -> Vec<(String, String)> {
    let mut leaks = Vec::new();
    for line in text.lines() {
        if let Some(path) = host_paths
            .iter()
            .find(|path| !path.is_empty() && line.contains(path.as_str()))
        {
            leaks.push((line.to_string(), format!("contains host path {path}")));
            continue;
        }
        if let Some(option) = overlay_layer_option(line) {
            leaks.push((line.to_string(), format!("overlay option {option}")));
        }
    }
    leaks
}

/// The first `lowerdir=/…`, `upperdir=/…` or `workdir=/…` option on an overlay mountinfo line.
fn overlay_layer_option(line: &str) -> Option<String> {
    // Optional fields end at " - "; then fstype, source, super options.
    let (_, tail) = line.split_once(" - ")?;
    let mut fields = tail.split_whitespace();
    if fields.next()? != "overlay" {
        return None;
    }
    let _source = fields.next()?;
    let options = fields.next()?;
    options
        .split(',')
        .find(|option| {
            [
                "lowerdir=/",
                "upperdir=/",
                "workdir=/",
                "lowerdir+=/",
                "datadir+=/",
            ]
            .iter()
            .any(|prefix| option.starts_with(prefix))
        })
        .map(str::to_string)
}

/// The cgroup v1 controllers a process belongs to, from `/proc/<pid>/cgroup`
/// (`N:controllers:path`; v2 lines have an empty controller list, named ones `name=`).
pub fn cgroup_v1_controllers(text: &str) -> Vec<String> {
    let mut controllers = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(list), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        for controller in list.split(',') {
            if !controller.is_empty() && !controller.starts_with("name=") {
                controllers.push(controller.to_string());
            }
        }
    }
    controllers
}

/// `PID:COMM`, the harness's "a host process you must not see" marker for row 16.
pub fn host_pid_marker(value: &str) -> Option<(i32, String)> {
    let (pid, comm) = value.split_once(':')?;
    Some((pid.parse().ok()?, comm.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_default_mask_matches_moby() {
        // 0x00000000a80425fb is what `docker run` shows in CapEff.
        assert_eq!(docker_default_mask(), 0x0000_0000_a804_25fb);
    }

    #[test]
    fn cap_names_decode_bits() {
        assert_eq!(
            cap_names(1 << 21 | 1 << 2),
            vec!["DAC_READ_SEARCH", "SYS_ADMIN"]
        );
        assert_eq!(cap_names(1 << 45), vec!["CAP_45"]);
    }

    #[test]
    fn status_caps_reads_every_set() {
        let status = "Name:\tsh\nCapInh:\t0000000000000000\nCapPrm:\t00000000a80425fb\n\
                      CapEff:\t00000000a80425fb\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
                      NoNewPrivs:\t1\nSeccomp:\t2\n";
        let caps = status_caps(status);
        assert_eq!(caps.len(), 5);
        assert_eq!(caps[3], ("CapBnd".to_string(), 0x1ff_ffff_ffff));
        assert_eq!(status_field(status, "Seccomp"), Some("2"));
        assert_eq!(status_field(status, "NoNewPrivs"), Some("1"));
        assert_eq!(status_field(status, "Missing"), None);
    }

    #[test]
    fn proc_stat_handles_parens_in_comm() {
        let stat = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 2 0 0";
        let parsed = proc_stat(stat).unwrap();
        assert_eq!(parsed.pid, 2);
        assert_eq!(parsed.comm, "kthreadd");
        assert_eq!(parsed.ppid, 0);
        assert!(parsed.is_kernel_thread());

        let odd = "417 (a) b (c)) R 1 417 417 0 -1 4194560 0";
        let parsed = proc_stat(odd).unwrap();
        assert_eq!(parsed.comm, "a) b (c)");
        assert_eq!(parsed.ppid, 1);
        assert!(!parsed.is_kernel_thread());
    }

    #[test]
    fn net_unix_reads_paths_and_abstract_names() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 23456 /run/containerd/containerd.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 23457 @/containerd-shim/abc.sock@\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 23458\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 23459 /tmp/with space.sock\n";
        let entries = net_unix(text);
        assert_eq!(entries.len(), 4);
        assert_eq!(
            entries[0].path.as_deref(),
            Some("/run/containerd/containerd.sock")
        );
        assert_eq!(
            entries[1].path.as_deref(),
            Some("@/containerd-shim/abc.sock@")
        );
        assert_eq!(entries[2].inode, 23458);
        assert_eq!(entries[2].path, None);
        assert_eq!(entries[3].path.as_deref(), Some("/tmp/with space.sock"));
    }

    #[test]
    fn fd_links_are_classified() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(fd_target_kind("pipe:[1]"), FdTarget::Anonymous);
        assert_eq!(
            fd_target_kind("anon_inode:[eventpoll]"),
            FdTarget::Anonymous
        );
        assert_eq!(
            fd_target_kind("/memfd:cordon-agent (deleted)"),
            FdTarget::Memfd
        );
        assert_eq!(fd_target_kind("/sys/fs/cgroup"), FdTarget::Path);
    }

    #[test]
    fn kallsyms_zeroed_versus_leaked() {
        let zeroed = "0000000000000000 T _text\n0000000000000000 T _stext\n";
        assert_eq!(kallsyms_addresses(zeroed), (2, 0));
        let leaked = "ffffffff81000000 T _text\n0000000000000000 A fixed_percpu_data\n";
        assert_eq!(kallsyms_addresses(leaked), (2, 1));
        assert_eq!(kallsyms_addresses(""), (0, 0));
    }

    const MOUNTINFO: &str = "\
22 1 0:45 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/cordon/snapshots/a/rootfs,upperdir=/var/lib/cordon/sandboxes/x/upper,workdir=/var/lib/cordon/sandboxes/x/work
23 22 0:46 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
24 22 0:47 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw,size=65536k
25 22 254:0 /srv/state/sandboxes/x/resolv.conf /etc/resolv.conf ro - ext4 /dev/vda rw
";

    #[test]
    fn mountinfo_devices_parse() {
        assert_eq!(
            mountinfo_devices(MOUNTINFO),
            vec![(0, 45), (0, 46), (0, 47), (254, 0)]
        );
    }

    #[test]
    fn mountinfo_leaks_find_overlay_layers_and_given_host_paths() {
        let leaks = mountinfo_host_leaks(MOUNTINFO, &["/srv/state".to_string()]);
        assert_eq!(leaks.len(), 2);
        assert!(leaks[0]
            .1
            .contains("lowerdir=/var/lib/cordon/snapshots/a/rootfs"));
        assert!(leaks[1].1.contains("/srv/state"));

        let clean = "22 1 0:45 / / rw - overlay overlay rw,lowerdir=l0:l1,upperdir=u,workdir=w\n";
        assert!(mountinfo_host_leaks(clean, &[]).is_empty());
        // An empty host path must not match every line.
        assert!(mountinfo_host_leaks(clean, &[String::new()]).is_empty());
    }

    #[test]
    fn cgroup_controllers_skip_v2_and_named_hierarchies() {
        let text = "12:rdma:/\n4:cpu,cpuacct:/x\n1:name=systemd:/x\n0::/x\n";
        assert_eq!(cgroup_v1_controllers(text), vec!["rdma", "cpu", "cpuacct"]);
    }

    #[test]
    fn host_pid_marker_parses() {
        assert_eq!(
            host_pid_marker("4242:escape_probes"),
            Some((4242, "escape_probes".to_string()))
        );
        assert_eq!(host_pid_marker("x:y"), None);
        assert_eq!(host_pid_marker("12"), None);
    }
}
