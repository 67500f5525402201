//! Row 12: privileged-ish configurations. Capabilities beyond Docker's default set
//! (CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_DAC_READ_SEARCH for "shocker"'s `open_by_handle_at`,
//! …), device-node creation, and host block devices are each a known escape (CDK
//! `cap-dac-read-search`, `mount-disk`, `rewrite-cgroup-devices`).

use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;

use crate::parse::{cap_names, docker_default_mask, status_caps, status_field};
use crate::sys;
use crate::{Findings, Options};

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    check_capability_sets(&mut findings);
    check_open_by_handle_at(&mut findings);
    check_mknod_char_device(&mut findings);
    check_block_devices(&mut findings);
    findings
}

/// Every Cap* set of `/proc/self/status` must be a subset of Docker's default set.
fn check_capability_sets(findings: &mut Findings) {
    let status = match sys::read_text("/proc/self/status", 64 * 1024) {
        Ok(status) => status,
        Err(errno) => {
            findings.inconclusive(format!(
                "/proc/self/status unreadable: {}",
                sys::name(errno)
            ));
            return;
        }
    };
    let allowed = docker_default_mask();
    let sets = status_caps(&status);
    if sets.is_empty() {
        findings.inconclusive("no Cap* lines in /proc/self/status");
        return;
    }
    for (set, mask) in sets {
        let extra = mask & !allowed;
        if extra == 0 {
            findings.confined(format!("{set}={mask:016x} within Docker's default set"));
        } else {
            findings.exposed(format!(
                "{set}={mask:016x} has capabilities beyond Docker's default set: {}",
                cap_names(extra).join(" ")
            ));
        }
    }
    if let Some(nnp) = status_field(&status, "NoNewPrivs") {
        findings.info(format!("NoNewPrivs={nnp}"));
    }
}

/// "Shocker": `open_by_handle_at` opens any inode of a filesystem by handle, bypassing path
/// checks and the mount root; it needs CAP_DAC_READ_SEARCH. We pass a handle for `/`
/// (from `name_to_handle_at`, or a zeroed one if that is denied too). Any answer other than
/// a refusal means the capability check passed.
fn check_open_by_handle_at(findings: &mut Findings) {
    const HANDLE_BYTES: usize = 128;
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    #[repr(C)]
    struct FileHandle {
        handle_bytes: u32,
        handle_type: i32,
        f_handle: [u8; HANDLE_BYTES],
    }
    let mut handle = FileHandle {
        handle_bytes: HANDLE_BYTES as u32,
        handle_type: 0,
        f_handle: [0; HANDLE_BYTES],
    };
    let root = match sys::open("/", libc::O_RDONLY | libc::O_DIRECTORY) {
        Ok(root) => root,
        Err(errno) => {
            findings.inconclusive(format!("cannot open /: {}", sys::name(errno)));
            return;
        }
    };
    let mut mount_id: libc::c_int = 0;
    let path = sys::cstring("/").expect("static path");
    // SAFETY: handle points to a buffer of handle_bytes bytes; mount_id is an out-pointer.
    let named = sys::check(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            path.as_ptr(),
            &mut handle as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    });
    if named.is_err() {
        // A well-formed but bogus handle still reaches the capability check first.
        handle.handle_bytes = 8;
        handle.handle_type = 1;
    }
    // SAFETY: handle is a valid struct file_handle.
    let opened = sys::check(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            root.as_raw_fd(),
            &mut handle as *mut FileHandle,
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    });
    match opened {
        Ok(fd) => {
            drop(sys::owned(fd));
            findings.exposed("open_by_handle_at opened / by handle (shocker, CAP_DAC_READ_SEARCH)");
        }
        Err(errno) if sys::is_refusal(errno) => {
            findings.confined(format!("open_by_handle_at refused: {}", sys::name(errno)))
        }
        Err(errno) => findings.exposed(format!(
            "open_by_handle_at passed the capability check (failed later with {})",
            sys::name(errno)
        )),
    }
}

/// Creating a char device node would give access to any device the device cgroup/eBPF
/// program lets through. We make `/dev/null`'s numbers in a scratch dir and delete it at once.
fn check_mknod_char_device(findings: &mut Findings) {
    let mut skipped = Vec::new();
    for dir in ["/tmp", "/dev/shm", "/var/tmp", "/run", "/"] {
        let path = format!("{dir}/.cordon-probe-mknod-{}", std::process::id()).replace("//", "/");
        let Ok(c_path) = sys::cstring(&path) else {
            continue;
        };
        // SAFETY: valid C string.
        let made = sys::check_int(unsafe {
            libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3))
        });
        match made {
            Ok(_) => {
                // SAFETY: valid C string; removes the node we just made.
                unsafe { libc::unlink(c_path.as_ptr()) };
                findings.exposed(format!(
                    "mknod of char device 1:3 succeeded at {path} (removed)"
                ));
                return;
            }
            Err(Errno::EPERM) => {
                findings.confined(format!("mknod of a char device refused in {dir}: EPERM"));
                return;
            }
            Err(errno) => skipped.push(format!("{dir}: {}", sys::name(errno))),
        }
    }
    findings.inconclusive(format!(
        "no directory to try mknod in: {}",
        skipped.join(", ")
    ));
}

/// No block device may be openable (CDK `mount-disk`).
fn check_block_devices(findings: &mut Findings) {
    let mut blocks = Vec::new();
    collect_block_devices(Path::new("/dev"), 0, &mut blocks);
    let mut opened = Vec::new();
    for device in &blocks {
        let path = device.to_string_lossy();
        if sys::open(&path, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY).is_ok() {
            opened.push(path.into_owned());
        }
    }
    if !opened.is_empty() {
        findings.exposed(format!(
            "block devices open for reading: {}",
            opened.join(", ")
        ));
    } else {
        findings.confined(format!(
            "no block device openable ({} block nodes under /dev)",
            blocks.len()
        ));
    }
}

fn collect_block_devices(dir: &Path, depth: usize, out: &mut Vec<std::path::PathBuf>) {
    use std::os::unix::fs::FileTypeExt;
    if depth > 3 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_block_device() {
            out.push(entry.path());
        } else if kind.is_dir() {
            collect_block_devices(&entry.path(), depth + 1, out);
        }
    }
}
