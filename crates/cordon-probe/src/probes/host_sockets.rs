//! Row 17: unix sockets to host daemons. The containerd-shim API was an *abstract* socket
//! (CVE-2020-15257), reachable from any container sharing the host network namespace, since
//! abstract names live in the netns, not the filesystem. Checks:
//!
//! - every socket in `/proc/net/unix` (our netns's view) is held by a process we can see; a
//!   socket nobody in the sandbox holds belongs to someone outside, i.e. a shared netns;
//! - connecting to the harness's abstract canary (`--abstract-socket`), to any
//!   `@/containerd-shim/*`, and to the well-known daemon socket paths fails.
//!
//! Connects are non-blocking and closed at once; nothing is sent.

use std::collections::HashSet;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

use crate::parse::{net_unix, socket_inode, UnixSocketEntry};
use crate::sys;
use crate::{Findings, Options};

/// Host daemon sockets a sandbox must never reach (botb `-find-sockets`, CDK
/// `docker-sock-check`).
const WELL_KNOWN_SOCKETS: [&str; 7] = [
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/run/dbus/system_bus_socket",
    "/run/systemd/private",
    "/run/systemd/journal/stdout",
];

pub fn run(options: &Options) -> Findings {
    let mut findings = Findings::default();
    let listed = check_socket_owners(&mut findings);
    for name in &options.abstract_sockets {
        check_abstract(name, "harness canary in the host netns", &mut findings);
    }
    for path in listed.iter().filter_map(|entry| entry.path.as_deref()) {
        if let Some(name) = path.strip_prefix('@') {
            if name.starts_with("/containerd-shim/") {
                // /proc shows NULs as '@'; a trailing one is part of the name's padding.
                check_abstract(name.trim_end_matches('@'), "containerd-shim", &mut findings);
            }
        }
    }
    for path in WELL_KNOWN_SOCKETS {
        check_path_socket(path, &mut findings);
    }
    findings
}

/// Sockets listed for our netns that no visible process holds.
fn check_socket_owners(findings: &mut Findings) -> Vec<UnixSocketEntry> {
    let listed = match sys::read_text("/proc/net/unix", 4 << 20) {
        Ok(text) => net_unix(&text),
        Err(errno) => {
            findings.confined(format!("/proc/net/unix unreadable: {}", sys::name(errno)));
            return Vec::new();
        }
    };
    let (held, hidden) = socket_inodes_held_by_visible_processes();
    let mut unheld: Vec<&UnixSocketEntry> = listed
        .iter()
        .filter(|entry| !held.contains(&entry.inode))
        .collect();
    if !unheld.is_empty() {
        // A sandbox process may have made or closed a socket between the two reads; only a
        // socket that is still listed and still unheld on a second look counts.
        let (held_again, _) = socket_inodes_held_by_visible_processes();
        let still_listed: HashSet<u64> = sys::read_text("/proc/net/unix", 4 << 20)
            .map(|text| {
                net_unix(&text)
                    .into_iter()
                    .map(|entry| entry.inode)
                    .collect()
            })
            .unwrap_or_default();
        unheld.retain(|entry| {
            still_listed.contains(&entry.inode) && !held_again.contains(&entry.inode)
        });
    }
    let foreign: Vec<String> = unheld
        .iter()
        .map(|entry| match &entry.path {
            Some(path) => format!("{} {path}", entry.inode),
            None => entry.inode.to_string(),
        })
        .collect();
    if foreign.is_empty() {
        findings.confined(format!(
            "all {} unix sockets of this network namespace are held by sandbox processes",
            listed.len()
        ));
    } else if hidden > 0 {
        findings.inconclusive(format!(
            "{} unix sockets not held by an inspectable process ({hidden} processes \
             could not be inspected): {}",
            foreign.len(),
            sample(&foreign)
        ));
    } else {
        findings.exposed(format!(
            "{} unix sockets in this network namespace are held outside the sandbox \
             (shared netns): {}",
            foreign.len(),
            sample(&foreign)
        ));
    }
    listed
}

fn sample(items: &[String]) -> String {
    let mut shown = items.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > 8 {
        shown.push_str(", …");
    }
    shown
}

/// Socket inodes in the fd tables of every visible process, and how many processes could
/// not be inspected.
fn socket_inodes_held_by_visible_processes() -> (HashSet<u64>, usize) {
    let mut held = HashSet::new();
    let mut hidden = 0;
    for pid in sys::visible_pids() {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            if sys::stat_id(&format!("/proc/{pid}")).is_ok() {
                hidden += 1;
            }
            continue;
        };
        // A non-dumpable process (the agent) lists its fd directory but refuses each link.
        let mut refused = false;
        for entry in entries.flatten() {
            match std::fs::read_link(entry.path()) {
                Ok(target) => {
                    if let Some(inode) = socket_inode(&target.to_string_lossy()) {
                        held.insert(inode);
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                    refused = true
                }
                Err(_) => {}
            }
        }
        if refused {
            hidden += 1;
        }
    }
    (held, hidden)
}

fn check_abstract(name: &str, what: &str, findings: &mut Findings) {
    let mut address = Vec::with_capacity(name.len() + 1);
    address.push(0);
    address.extend_from_slice(name.as_bytes());
    record_connect(
        &format!("@{name} ({what})"),
        connect_unix(&address),
        findings,
    );
}

fn check_path_socket(path: &str, findings: &mut Findings) {
    record_connect(path, connect_unix(path.as_bytes()), findings);
}

fn record_connect(what: &str, result: Result<(), Errno>, findings: &mut Findings) {
    match result {
        Ok(()) => findings.exposed(format!("connected to {what}")),
        Err(errno) => findings.confined(format!("{what} not connectable: {}", sys::name(errno))),
    }
}

/// Non-blocking connect to a unix address (`sun_path` bytes, leading NUL for abstract).
/// EINPROGRESS/EAGAIN count as reached: a listener exists.
fn connect_unix(sun_path: &[u8]) -> Result<(), Errno> {
    // SAFETY: zeroed sockaddr_un is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if sun_path.len() > address.sun_path.len() {
        return Err(Errno::ENAMETOOLONG);
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(sun_path) {
        *slot = *byte as libc::c_char;
    }
    let length = std::mem::size_of::<libc::sa_family_t>() + sun_path.len();
    // SAFETY: plain syscall.
    let fd = sys::check_int(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    let fd = sys::owned(fd as libc::c_long);
    // SAFETY: address is a valid sockaddr_un of `length` bytes.
    let connected = sys::check_int(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast(),
            length as libc::socklen_t,
        )
    });
    match connected {
        Ok(_) | Err(Errno::EINPROGRESS) | Err(Errno::EAGAIN) => Ok(()),
        Err(errno) => Err(errno),
    }
}
