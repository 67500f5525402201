//! Step 5's privilege drop: capabilities, no_new_privs, rlimits.

use std::collections::HashSet;

use anyhow::{Context, Result};
use caps::{CapSet, Capability};
use nix::sys::resource::{setrlimit, Resource};

/// Docker's default capability set.
const KEPT: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// Drops every capability outside [`KEPT`] from the bounding, permitted, effective and
/// inheritable sets and empties the ambient set. The bounding set matters most: it is what
/// root gets back at the next execve.
pub fn drop_capabilities() -> Result<()> {
    let kept: HashSet<Capability> = KEPT.into_iter().collect();
    caps::clear(None, CapSet::Ambient).context("clear ambient capabilities")?;
    for cap in caps::all() {
        if !kept.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("drop {cap} from the bounding set"))?;
        }
    }
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, &kept).with_context(|| format!("set {set:?} capabilities"))?;
    }
    Ok(())
}

/// Drops every capability from every set, the bounding set included, so not even an execve
/// as the namespace's root gets any back (the microVM backend's jailed QEMU).
pub fn drop_all_capabilities() -> Result<()> {
    caps::clear(None, CapSet::Ambient).context("clear ambient capabilities")?;
    for cap in caps::all() {
        caps::drop(None, CapSet::Bounding, cap)
            .with_context(|| format!("drop {cap} from the bounding set"))?;
    }
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).with_context(|| format!("clear {set:?} capabilities"))?;
    }
    Ok(())
}

pub fn set_no_new_privs() -> Result<()> {
    nix::sys::prctl::set_no_new_privs().context("set no_new_privs")
}

/// nsjail/Docker-style resource limits (soft = hard, so nothing inside can raise them).
pub fn set_rlimits(nproc: u64) -> Result<()> {
    let limits = [
        (Resource::RLIMIT_NPROC, nproc),
        (Resource::RLIMIT_NOFILE, 4096),
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_MEMLOCK, 64 * 1024),
        (Resource::RLIMIT_MSGQUEUE, 64 * 1024),
        (Resource::RLIMIT_RTPRIO, 0),
    ];
    for (resource, value) in limits {
        setrlimit(resource, value, value).with_context(|| format!("setrlimit {resource:?}"))?;
    }
    Ok(())
}
