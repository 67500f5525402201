//! Row 11: cgroup v1 `release_agent`, CVE-2022-0492. The public exploit runs
//! `unshare -UrmC`, mounts a cgroup v1 hierarchy it now "owns", and writes `release_agent`,
//! which the kernel runs as host root. We stop at the mount: a child process unshares
//! user+mount+cgroup namespaces, tries the mounts in its private mount namespace, unmounts and
//! exits. `release_agent` is never touched.

use nix::errno::Errno;
use nix::sys::signal::Signal;

use crate::parse::cgroup_v1_controllers;
use crate::sys::{self, ChildEnd};
use crate::{Findings, Options};

/// Child exit codes.
const MOUNTED: i32 = 0;
const UNSHARE_REFUSED: i32 = 1;
const MOUNT_REFUSED: i32 = 2;

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    match sys::in_child(unshare_and_mount_cgroup_v1) {
        Ok(ChildEnd::Exited {
            code: MOUNTED,
            message,
        }) => findings.exposed(format!(
            "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWCGROUP) and a cgroup v1 mount both \
             succeeded: {message} (CVE-2022-0492: release_agent would be writable next)"
        )),
        Ok(ChildEnd::Exited {
            code: UNSHARE_REFUSED,
            message,
        }) => findings.confined(message),
        Ok(ChildEnd::Exited {
            code: MOUNT_REFUSED,
            message,
        }) => findings.confined(message),
        Ok(ChildEnd::Exited { code, message }) => {
            findings.inconclusive(format!("child exited {code}: {message}"))
        }
        Ok(ChildEnd::Signaled(Signal::SIGSYS)) => {
            findings.confined("unshare child killed by SIGSYS (seccomp kill)")
        }
        Ok(ChildEnd::Signaled(signal)) => {
            findings.inconclusive(format!("unshare child killed by {signal:?}"))
        }
        Err(errno) => findings.inconclusive(format!("fork failed: {}", sys::name(errno))),
    }
    findings
}

/// Runs in the child: the CVE-2022-0492 sequence up to (not including) the write.
fn unshare_and_mount_cgroup_v1() -> (i32, String) {
    // Read before unsharing: /proc/self/cgroup names the v1 hierarchies that exist.
    let existing = sys::read_text("/proc/self/cgroup", 64 * 1024)
        .map(|text| cgroup_v1_controllers(&text))
        .unwrap_or_default();
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP;
    // SAFETY: plain syscall; the child is single-threaded.
    if let Err(errno) = sys::check_int(unsafe { libc::unshare(flags) }) {
        return (
            UNSHARE_REFUSED,
            format!(
                "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWCGROUP) refused: {}",
                sys::name(errno)
            ),
        );
    }
    map_root_to_self();
    make_mounts_private();
    let Some(target) = ["/tmp", "/mnt", "/"]
        .into_iter()
        .find(|dir| sys::stat_id(dir).is_ok_and(|id| id.is_dir()))
    else {
        return (
            MOUNT_REFUSED,
            "unshare succeeded; no directory to mount on".into(),
        );
    };

    // rdma is the exploit's choice (rarely mounted); existing hierarchies can be re-mounted
    // from a user namespace; a new named hierarchy is always allowed there.
    let mut attempts = vec!["rdma".to_string()];
    attempts.extend(existing);
    attempts.push("none,name=cordon_probe".to_string());
    let mut refusals = Vec::new();
    for options in attempts {
        match mount_cgroup_v1(target, &options) {
            Ok(()) => {
                unmount(target);
                return (
                    MOUNTED,
                    format!("mount -t cgroup -o {options} on {target} (unmounted again)"),
                );
            }
            Err(errno) => refusals.push(format!("-o {options}: {}", sys::name(errno))),
        }
    }
    (
        MOUNT_REFUSED,
        format!(
            "unshare succeeded (see row 13) but every cgroup v1 mount was refused: {}",
            refusals.join(", ")
        ),
    )
}

/// Like `unshare -r`: map uid/gid 0 to our own ids. Best effort; capabilities in the new
/// namespace do not depend on it.
fn map_root_to_self() {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let _ = std::fs::write("/proc/self/setgroups", "deny");
    let _ = std::fs::write("/proc/self/uid_map", format!("0 {uid} 1"));
    let _ = std::fs::write("/proc/self/gid_map", format!("0 {gid} 1"));
}

/// Nothing mounted in the child's namespace may propagate anywhere else.
fn make_mounts_private() {
    let root = sys::cstring("/").expect("static path");
    // SAFETY: valid C strings; null fstype/data are allowed for a propagation change.
    unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
    }
}

fn mount_cgroup_v1(target: &str, options: &str) -> Result<(), Errno> {
    let source = sys::cstring("cgroup")?;
    let target = sys::cstring(target)?;
    let options = sys::cstring(options)?;
    // SAFETY: valid C strings.
    sys::check_int(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    })
    .map(drop)
}

fn unmount(target: &str) {
    if let Ok(target) = sys::cstring(target) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
