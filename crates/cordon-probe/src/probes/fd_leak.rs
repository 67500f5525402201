//! Row 2: Leaky Vessels, CVE-2024-21626. runc leaked an `O_PATH` fd to the host's
//! `/sys/fs/cgroup` into the container init; `cwd=/proc/self/fd/7` then put a process outside
//! the container root. We open every fd, cwd and root of every visible process through its
//! `/proc/<pid>/…` magic link and check that the object lies inside our root:
//!
//! - directories: one on a device that no mount of our namespace has is a host directory
//!   (this catches the leak even when we may not search it, e.g. the 0700 state dir owned by
//!   an unmapped uid). Otherwise walk `openat(fd, "..")` until `..` stops moving: inside our
//!   root the walk stops at our root (the kernel pins `..` there); from a host directory it
//!   ends at some other root (the host's, or a detached old root), which is the escape.
//! - other files: the link's path, resolved inside our root, must name the same dev/ino;
//!   failing that, a device that no mount in our namespace has is a host object.
//!
//! Processes whose fds we may not open are reported as `info`: sandbox code cannot open
//! them through /proc either, and ptrace is row 16's business.

use std::os::fd::OwnedFd;

use nix::errno::Errno;

use crate::parse::{fd_target_kind, mountinfo_devices, FdTarget};
use crate::sys::{self, FileId};
use crate::{Findings, Options};

/// How far `..` is walked before giving up; far beyond any real depth.
const MAX_DEPTH: usize = 4096;

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    let root = match sys::stat_id("/") {
        Ok(root) => root,
        Err(errno) => {
            findings.inconclusive(format!("cannot stat / ({})", sys::name(errno)));
            return findings;
        }
    };
    let mount_devices = sys::read_text("/proc/self/mountinfo", 1 << 20)
        .map(|text| mountinfo_devices(&text))
        .unwrap_or_default();
    let context = Context {
        root,
        mount_devices,
    };

    let mut tally = Tally::default();
    for pid in sys::visible_pids() {
        check_process(pid, &context, &mut findings, &mut tally);
    }
    summarize(&tally, &mut findings);
    findings
}

struct Context {
    root: FileId,
    mount_devices: Vec<(u32, u32)>,
}

#[derive(Default)]
struct Tally {
    inside: usize,
    anonymous: usize,
    processes: usize,
    /// Pids whose fds we were not allowed to open (other uid or not dumpable).
    hidden: Vec<String>,
}

fn summarize(tally: &Tally, findings: &mut Findings) {
    if !tally.hidden.is_empty() {
        findings.info(format!(
            "could not inspect {} (EACCES/EPERM): {}",
            tally.hidden.len(),
            tally.hidden.join(", ")
        ));
    }
    if tally.inside == 0 {
        findings.inconclusive("no fd, cwd or root of any process could be resolved");
    } else {
        findings.confined(format!(
            "{} fd/cwd/root links of {} processes resolve inside the sandbox root \
             ({} sockets/pipes/anon inodes skipped)",
            tally.inside, tally.processes, tally.anonymous
        ));
    }
}

/// Every `/proc/<pid>/{cwd,root,fd/*}` of one process.
fn check_process(pid: i32, context: &Context, findings: &mut Findings, tally: &mut Tally) {
    let mut links = vec![format!("/proc/{pid}/cwd"), format!("/proc/{pid}/root")];
    match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(entries) => links.extend(entries.filter_map(|entry| {
            let name = entry.ok()?.file_name();
            Some(format!("/proc/{pid}/fd/{}", name.to_str()?))
        })),
        Err(error) if is_denied(sys::io_errno(&error)) => {}
        // The process exited while we looked.
        Err(_) => return,
    }
    tally.processes += 1;
    let mut denied = false;
    for link in links {
        match check_link(&link, context) {
            LinkVerdict::Inside => tally.inside += 1,
            LinkVerdict::Anonymous => tally.anonymous += 1,
            LinkVerdict::Outside(why) => findings.exposed(format!(
                "{link} -> {} resolves outside the sandbox root: {why} (CVE-2024-21626)",
                sys::read_link(&link).unwrap_or_default()
            )),
            LinkVerdict::Unknown(why) => findings.inconclusive(format!("{link}: {why}")),
            LinkVerdict::Denied => denied = true,
            LinkVerdict::Gone => {}
        }
    }
    if denied {
        tally.hidden.push(format!("pid {pid}"));
    }
}

fn is_denied(errno: Errno) -> bool {
    matches!(errno, Errno::EACCES | Errno::EPERM)
}

#[derive(Debug)]
enum LinkVerdict {
    Inside,
    Outside(String),
    Anonymous,
    Unknown(String),
    Denied,
    Gone,
}

fn check_link(link: &str, context: &Context) -> LinkVerdict {
    let target = match sys::read_link(link) {
        Ok(target) => target,
        Err(errno) if is_denied(errno) => return LinkVerdict::Denied,
        Err(_) => return LinkVerdict::Gone,
    };
    match fd_target_kind(&target) {
        FdTarget::Anonymous | FdTarget::Memfd => return LinkVerdict::Anonymous,
        FdTarget::Path => {}
    }
    // Following the magic link gives us the very object the process holds, wherever it is.
    let fd = match sys::open(link, libc::O_PATH) {
        Ok(fd) => fd,
        Err(errno) if is_denied(errno) => return LinkVerdict::Denied,
        Err(_) => return LinkVerdict::Gone,
    };
    let id = match sys::fstat_id(&fd) {
        Ok(id) => id,
        Err(errno) => return LinkVerdict::Unknown(format!("fstat failed: {}", sys::name(errno))),
    };
    if id.is_dir() {
        directory_verdict(fd, id, context)
    } else {
        file_verdict(&target, id, context)
    }
}

/// A directory on a device that no mount of our namespace has cannot be under our root.
/// (Only directories: overlayfs reports the underlying device for non-directories.)
fn on_foreign_device(id: FileId, context: &Context) -> Option<LinkVerdict> {
    let (major, minor) = id.major_minor();
    (!context.mount_devices.is_empty() && !context.mount_devices.contains(&(major, minor))).then(
        || {
            LinkVerdict::Outside(format!(
                "directory on dev {major}:{minor}, which no mount of the sandbox has"
            ))
        },
    )
}

/// Walks `..` from the directory to the top of its tree and compares with our root. The
/// device test comes first: a host directory we may not search (e.g. the 0700 sandbox state
/// dir, owned by an unmapped uid) cannot be walked, but its device gives it away.
fn directory_verdict(fd: OwnedFd, id: FileId, context: &Context) -> LinkVerdict {
    if let Some(outside) = on_foreign_device(id, context) {
        return outside;
    }
    match topmost_ancestor(fd, id) {
        Ok(top) if top.same_object(&context.root) => LinkVerdict::Inside,
        Ok(top) => LinkVerdict::Outside(format!(
            "walking .. ends at dev {}:{} ino {}, not the sandbox root",
            top.major_minor().0,
            top.major_minor().1,
            top.ino
        )),
        Err(errno) => LinkVerdict::Unknown(format!("walking .. failed: {}", sys::name(errno))),
    }
}

/// The directory where `openat(fd, "..")` stops moving.
fn topmost_ancestor(mut fd: OwnedFd, mut id: FileId) -> Result<FileId, Errno> {
    for _ in 0..MAX_DEPTH {
        let parent = sys::open_at(Some(&fd), "..", libc::O_PATH | libc::O_DIRECTORY)?;
        let parent_id = sys::fstat_id(&parent)?;
        if parent_id.same_object(&id) {
            return Ok(id);
        }
        fd = parent;
        id = parent_id;
    }
    Err(Errno::ELOOP)
}

/// A non-directory: its path must resolve, inside our root, to the same object.
fn file_verdict(target: &str, id: FileId, context: &Context) -> LinkVerdict {
    if !target.ends_with(" (deleted)") {
        if let Ok(resolved) = sys::stat_id(target) {
            if resolved.same_object(&id) {
                return LinkVerdict::Inside;
            }
        }
    }
    let (major, minor) = id.major_minor();
    if !context.mount_devices.is_empty() && !context.mount_devices.contains(&(major, minor)) {
        return LinkVerdict::Outside(format!(
            "dev {major}:{minor} is not any mount of the sandbox and the path does not \
             resolve to it inside the sandbox"
        ));
    }
    LinkVerdict::Unknown(format!(
        "{target} does not resolve to the open file (deleted or renamed) and its device is \
         not known to be foreign"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walking_dotdot_from_a_directory_ends_at_the_root() {
        let dir = sys::open("/proc/self", libc::O_PATH | libc::O_DIRECTORY).unwrap();
        let id = sys::fstat_id(&dir).unwrap();
        let top = topmost_ancestor(dir, id).unwrap();
        assert!(top.same_object(&sys::stat_id("/").unwrap()));
    }

    #[test]
    fn a_directory_on_an_unmounted_device_is_outside() {
        let root = sys::stat_id("/").unwrap();
        let context = Context {
            root,
            mount_devices: vec![(0, 45)],
        };
        let foreign = FileId {
            dev: libc::makedev(254, 0),
            ino: 2,
            mode: libc::S_IFDIR,
        };
        assert!(matches!(
            on_foreign_device(foreign, &context),
            Some(LinkVerdict::Outside(_))
        ));
        let local = FileId {
            dev: libc::makedev(0, 45),
            ..foreign
        };
        assert!(on_foreign_device(local, &context).is_none());
        // Unreadable mountinfo proves nothing either way.
        let blind = Context {
            root,
            mount_devices: Vec::new(),
        };
        assert!(on_foreign_device(foreign, &blind).is_none());
    }
}
