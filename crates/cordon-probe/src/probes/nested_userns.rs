//! Row 13: unprivileged-user-namespace kernel bugs (CVE-2022-0185 fsconfig, CVE-2021-22555
//! x_tables, CVE-2024-1086 nf_tables). All of them start by becoming "root" in a nested user
//! namespace and then reach rarely-used kernel code. Every entry point must be refused:
//! `unshare`, `clone` and `clone3` with CLONE_NEWUSER, `setns`, the new mount API, and
//! netfilter netlink sockets. Namespace-creating calls run in forked children that exit at
//! once.

use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::signal::Signal;

use crate::sys::{self, ChildEnd};
use crate::{Findings, Options};

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    check_unshare_newuser(&mut findings);
    check_clone_newuser(&mut findings);
    check_clone3_newuser(&mut findings);
    check_setns(&mut findings);
    check_fsopen(&mut findings);
    check_netlink_netfilter(&mut findings);
    findings
}

/// Records a raw call's outcome: success or a non-refusal errno is exposure.
fn record(findings: &mut Findings, call: &str, result: Result<(), Errno>) {
    match result {
        Ok(()) => findings.exposed(format!("{call} succeeded")),
        Err(errno) if sys::is_refusal(errno) => {
            findings.confined(format!("{call} refused: {}", sys::name(errno)))
        }
        Err(errno) => findings.exposed(format!(
            "{call} reached the kernel (failed with {}, not refused)",
            sys::name(errno)
        )),
    }
}

/// Records a forked child's outcome; the child exits with 0 or the errno of its call.
fn record_child(findings: &mut Findings, call: &str, end: Result<ChildEnd, Errno>) {
    match end {
        Ok(ChildEnd::Exited { code: 0, message }) => {
            findings.exposed(format!("{call} succeeded{message}"))
        }
        Ok(ChildEnd::Exited {
            code: sys::CHILD_PANICKED,
            message,
        }) => findings.inconclusive(format!("{call}: {message}")),
        Ok(ChildEnd::Exited { code, .. }) => record(findings, call, Err(Errno::from_raw(code))),
        Ok(ChildEnd::Signaled(Signal::SIGSYS)) => {
            findings.confined(format!("{call}: child killed by SIGSYS (seccomp kill)"))
        }
        Ok(ChildEnd::Signaled(signal)) => {
            findings.inconclusive(format!("{call}: child killed by {signal:?}"))
        }
        Err(errno) => findings.inconclusive(format!("{call}: fork failed: {}", sys::name(errno))),
    }
}

/// `unshare -U`; if that works, also `unshare -m` + `fsopen` as CVE-2022-0185 did.
fn check_unshare_newuser(findings: &mut Findings) {
    let end = sys::in_child(|| {
        // SAFETY: plain syscall in a single-threaded child.
        if let Err(errno) = sys::check_int(unsafe { libc::unshare(libc::CLONE_NEWUSER) }) {
            return (errno as i32, String::new());
        }
        // SAFETY: as above.
        let mount_ns = sys::check_int(unsafe { libc::unshare(libc::CLONE_NEWNS) });
        let fsopen = mount_ns.and_then(|_| fsopen("tmpfs"));
        let detail = match fsopen {
            Ok(()) => "; then fsopen(\"tmpfs\") in the nested user+mount ns succeeded \
                       (CVE-2022-0185 entry point)"
                .to_string(),
            Err(errno) => format!("; nested mount ns + fsopen failed: {}", sys::name(errno)),
        };
        (0, detail)
    });
    record_child(findings, "unshare(CLONE_NEWUSER)", end);
}

/// Raw `clone(CLONE_NEWUSER|SIGCHLD)` with no new stack: the child continues on a copy of
/// the caller's stack, like fork, and exits at once.
fn check_clone_newuser(findings: &mut Findings) {
    let end = sys::in_child(|| {
        let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: fork-like clone; the grandchild only calls _exit.
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
        match sys::check(pid) {
            Ok(0) => unsafe { libc::_exit(0) },
            Ok(pid) => {
                reap(pid as libc::pid_t);
                (0, String::new())
            }
            Err(errno) => (errno as i32, String::new()),
        }
    });
    record_child(findings, "clone(CLONE_NEWUSER)", end);
}

/// `clone3` must fail with ENOSYS/EPERM (Moby answers ENOSYS so glibc falls back to clone,
/// whose flags a filter can inspect; clone3's flags live in memory it cannot read).
fn check_clone3_newuser(findings: &mut Findings) {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
    }
    let end = sys::in_child(|| {
        let args = CloneArgs {
            flags: libc::CLONE_NEWUSER as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        // SAFETY: fork-like clone3 (no stack given); the grandchild only calls _exit.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match sys::check(pid) {
            Ok(0) => unsafe { libc::_exit(0) },
            Ok(pid) => {
                reap(pid as libc::pid_t);
                (0, String::new())
            }
            Err(errno) => (errno as i32, String::new()),
        }
    });
    record_child(findings, "clone3(CLONE_NEWUSER)", end);
}

fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
}

/// `setns` into our own user namespace: the kernel answers EINVAL (already a member), so
/// anything but a refusal shows setns is not filtered (§1.4: podman's profile allows it).
fn check_setns(findings: &mut Findings) {
    let ns = match sys::open("/proc/self/ns/user", libc::O_RDONLY) {
        Ok(ns) => ns,
        Err(errno) => {
            findings.inconclusive(format!(
                "cannot open /proc/self/ns/user: {}",
                sys::name(errno)
            ));
            return;
        }
    };
    // SAFETY: plain syscall on an fd we own.
    let result = sys::check_int(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUSER) });
    record(findings, "setns(own user ns)", result.map(drop));
}

fn fsopen(fstype: &str) -> Result<(), Errno> {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    let name = sys::cstring(fstype)?;
    // SAFETY: valid C string.
    let fd = sys::check(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })?;
    drop(sys::owned(fd));
    Ok(())
}

/// The new mount API (fsopen/fsconfig) is how CVE-2022-0185 reached its heap overflow.
fn check_fsopen(findings: &mut Findings) {
    record(findings, "fsopen(\"tmpfs\")", fsopen("tmpfs"));
}

/// NETLINK_NETFILTER is the door to nf_tables/x_tables (CVE-2024-1086, CVE-2021-22555).
fn check_netlink_netfilter(findings: &mut Findings) {
    // SAFETY: plain syscall.
    let fd = sys::check_int(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    });
    let result = fd.map(|fd| drop(sys::owned(fd as libc::c_long)));
    record(findings, "socket(AF_NETLINK, NETLINK_NETFILTER)", result);
}
