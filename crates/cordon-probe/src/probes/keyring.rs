//! Row 15: the kernel keyring is not namespaced, so keys of the host or other sandboxes
//! under the same uid are reachable through `keyctl`/`add_key`/`request_key`, and
//! `/proc/keys` lists them. All three calls must be refused and `/proc/keys` masked.
//!
//! Harmless by construction: `add_key` names a key type that does not exist (the kernel
//! answers ENODEV once the call gets through), `request_key` has no callout, and
//! `KEYCTL_GET_KEYRING_ID` is asked not to create anything.

use std::os::fd::AsRawFd;

use nix::errno::Errno;

use crate::sys;
use crate::{Findings, Options};

const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
/// `PROC_SUPER_MAGIC`: the file is still procfs, i.e. not masked by a bind of /dev/null.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    check_keyctl(&mut findings);
    check_add_key(&mut findings);
    check_request_key(&mut findings);
    check_proc_keys(&mut findings);
    findings
}

fn record(findings: &mut Findings, call: &str, result: Result<libc::c_long, Errno>) {
    match result {
        Ok(serial) => findings.exposed(format!("{call} succeeded (returned {serial})")),
        Err(errno) if sys::is_refusal(errno) => {
            findings.confined(format!("{call} refused: {}", sys::name(errno)))
        }
        Err(errno) => findings.exposed(format!(
            "{call} reached the keyring code (failed with {}, not refused)",
            sys::name(errno)
        )),
    }
}

fn check_keyctl(findings: &mut Findings) {
    // SAFETY: plain syscall; create=0 so no keyring is made.
    let result = sys::check(unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_GET_KEYRING_ID,
            KEY_SPEC_SESSION_KEYRING,
            0,
        )
    });
    record(findings, "keyctl(KEYCTL_GET_KEYRING_ID, session)", result);
}

fn check_add_key(findings: &mut Findings) {
    let kind = sys::cstring("cordon_probe_no_such_type").expect("static");
    let description = sys::cstring("cordon-probe").expect("static");
    let payload = b"x";
    // SAFETY: valid C strings and payload buffer.
    let result = sys::check(unsafe {
        libc::syscall(
            libc::SYS_add_key,
            kind.as_ptr(),
            description.as_ptr(),
            payload.as_ptr(),
            payload.len(),
            KEY_SPEC_SESSION_KEYRING,
        )
    });
    record(findings, "add_key(bogus type)", result);
}

fn check_request_key(findings: &mut Findings) {
    let kind = sys::cstring("user").expect("static");
    let description = sys::cstring("cordon-probe-no-such-key").expect("static");
    // SAFETY: valid C strings; a null callout never runs /sbin/request-key.
    let result = sys::check(unsafe {
        libc::syscall(
            libc::SYS_request_key,
            kind.as_ptr(),
            description.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    });
    record(findings, "request_key(\"user\", no callout)", result);
}

/// runc and podman mask `/proc/keys`. (`/proc/key-users` only shows per-uid quota counts for
/// uids mapped in our user namespace, so it is reported, not judged.)
fn check_proc_keys(findings: &mut Findings) {
    match sys::open("/proc/keys", libc::O_RDONLY) {
        Ok(fd) if is_procfs(&fd) => findings.exposed("/proc/keys is readable procfs, not masked"),
        Ok(_) => findings.confined("/proc/keys is masked"),
        Err(errno) => findings.confined(format!("/proc/keys not readable: {}", sys::name(errno))),
    }
    if let Ok(fd) = sys::open("/proc/key-users", libc::O_RDONLY) {
        if is_procfs(&fd) {
            findings.info("/proc/key-users is readable (per-uid key quotas, own userns only)");
        }
    }
}

fn is_procfs(fd: &std::os::fd::OwnedFd) -> bool {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid out-pointer.
    let ok = unsafe { libc::fstatfs(fd.as_raw_fd(), stat.as_mut_ptr()) } == 0;
    // SAFETY: fstatfs succeeded.
    ok && unsafe { stat.assume_init() }.f_type == PROC_SUPER_MAGIC
}
