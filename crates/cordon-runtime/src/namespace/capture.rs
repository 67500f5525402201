//! Capture: copying a sandbox's writable layer (the overlay's `upper/`) into a new read-only
//! layer.
//!
//! Reaching `upper/` from the host:
//! - a plain writable layer is a host directory (`rw/upper`);
//! - a disk image is loop-mounted only inside the sandbox's mount namespace, and even there
//!   only as the overlay's hidden upper layer (the staging mounts are detached before
//!   `pivot_root`). The host finds the loop device the image is attached to (by the image's
//!   device and inode, checked on the opened device) and mounts that device itself with the
//!   new mount API into a *detached* mount (`fsopen`/`fsmount`: read-only, nosuid, nodev,
//!   noexec) that is never attached anywhere, so no mount table shows it and no path leads to
//!   it. ext4 hands out the superblock it already has for the device, so the host reads the
//!   very filesystem the sandbox writes, page cache included. A stopped sandbox's image is
//!   attached to a fresh autoclear loop device for the copy. Keeping the image mounted on the
//!   host for the sandbox's whole life would also work, but would add a host mount to clean up
//!   on every stop, crash and adoption path.
//!
//! A running sandbox is frozen (its cgroup) for the copy, so the layer is one point in time,
//! and thawed afterwards whatever happened; a kill and an adoption thaw too, should the host
//! process die mid-copy. The copy itself (`crate::layer_copy`) trusts nothing in the tree.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::Mode;

use crate::cgroup::Cgroups;
use crate::error::{IoContext, RuntimeError};
use crate::layer_copy::{copy_layer, CopyLimits, CopyStats};
use crate::plan::WritableLayer;

/// How long the tasks of a running sandbox may take to freeze.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// One capture, run on a blocking thread.
pub(super) struct Capture {
    pub id: String,
    pub layer: WritableLayer,
    /// The sandbox is running: freeze it, and use the loop device its image is mounted from.
    pub running: bool,
    pub cgroups: Cgroups,
    pub dest: PathBuf,
    pub limits: CopyLimits,
}

/// Thaws the sandbox when dropped, also on error or panic.
struct Frozen<'a> {
    cgroups: &'a Cgroups,
    id: &'a str,
}

impl<'a> Frozen<'a> {
    fn new(cgroups: &'a Cgroups, id: &'a str) -> Result<Frozen<'a>, RuntimeError> {
        cgroups.freeze(id, FREEZE_TIMEOUT)?;
        Ok(Frozen { cgroups, id })
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.cgroups.thaw(self.id);
    }
}

/// An open `upper/`, with what keeps it reachable (the detached mount and the loop device).
struct Upper {
    dir: OwnedFd,
    _mount: Option<OwnedFd>,
    _loop_device: Option<OwnedFd>,
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

impl Capture {
    pub(super) fn run(self) -> Result<CopyStats, RuntimeError> {
        let dest = open(self.dest.as_path(), dir_flags(), Mode::empty())
            .map_err(std::io::Error::from)
            .context(|| format!("open the capture destination {}", self.dest.display()))?;
        let upper = open_upper(&self.layer, self.running)?;
        let copied = {
            let _frozen = match self.running {
                true => Some(Frozen::new(&self.cgroups, &self.id)?),
                false => None,
            };
            copy_layer(upper.dir.as_fd(), dest.as_fd(), &self.dest, self.limits)
        };
        drop(upper);
        copied.map_err(|source| {
            if !matches!(source, crate::CaptureError::DestinationNotEmpty(_)) {
                empty_dir(&self.dest);
            }
            RuntimeError::Capture {
                id: self.id.clone(),
                source,
            }
        })
    }
}

/// Removes what a failed copy left in `dest` (never following a symlink).
fn empty_dir(dest: &Path) {
    let Ok(entries) = std::fs::read_dir(dest) else {
        return;
    };
    for entry in entries.flatten() {
        let removed = match entry.file_type() {
            Ok(kind) if kind.is_dir() => std::fs::remove_dir_all(entry.path()),
            _ => std::fs::remove_file(entry.path()),
        };
        if let Err(error) = removed {
            tracing::warn!(path = %entry.path().display(), %error, "cleaning a failed capture");
        }
    }
}

fn open_upper(layer: &WritableLayer, running: bool) -> Result<Upper, RuntimeError> {
    match layer {
        WritableLayer::Directory(rw) => {
            let rw_fd = open(rw.as_path(), dir_flags(), Mode::empty())
                .map_err(std::io::Error::from)
                .context(|| format!("open {}", rw.display()))?;
            Ok(Upper {
                dir: open_upper_in(rw_fd.as_fd(), rw)?,
                _mount: None,
                _loop_device: None,
            })
        }
        WritableLayer::Ext4Image(image) => open_image_upper(image, running),
    }
}

fn open_upper_in(parent: BorrowedFd<'_>, shown: &Path) -> Result<OwnedFd, RuntimeError> {
    openat(parent, c"upper", dir_flags(), Mode::empty())
        .map_err(std::io::Error::from)
        .context(|| format!("open upper/ of {}", shown.display()))
}

fn open_image_upper(image: &Path, running: bool) -> Result<Upper, RuntimeError> {
    let file = open(
        image,
        OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)
    .context(|| format!("open {}", image.display()))?;
    let attached = crate::loopdev::find_attached(file.as_fd())
        .context(|| format!("find the loop device of {}", image.display()))?;
    let device = match attached {
        Some(device) => device,
        None if running => {
            return Err(RuntimeError::io(
                format!("the disk image {} of a running sandbox", image.display()),
                std::io::Error::other("is not attached to any loop device"),
            ))
        }
        None => {
            crate::loopdev::attach(file.as_fd())
                .context(|| format!("attach {} to a loop device", image.display()))?
                .1
        }
    };
    let mount = mount_detached_ext4(&device, running)
        .context(|| format!("mount {} (ext4)", image.display()))?;
    Ok(Upper {
        dir: open_upper_in(mount.as_fd(), image)?,
        _mount: Some(mount),
        _loop_device: Some(device),
    })
}

/// Mounts the ext4 filesystem on `device` read-only, nosuid, nodev and noexec as a detached
/// mount: only the returned fd reaches it, and closing it unmounts.
///
/// A stopped sandbox's image gets a superblock of its own, created read-only (`ro`), so ext4
/// does not open it for writing (no orphan processing, no write-back; a dirty journal is still
/// replayed, as the sandbox's next start would, since a read-only mount of an unclean ext4 needs
/// it for a consistent tree). A running sandbox's device already has a read-write superblock,
/// which ext4 hands back instead of creating one; asking for `ro` there would be refused
/// (`EBUSY`: the read-only flag must match the existing superblock's), so only the mount is
/// read-only.
fn mount_detached_ext4(device: &OwnedFd, running: bool) -> std::io::Result<OwnedFd> {
    // The fd's magic link names exactly the device we checked, whatever /dev holds now.
    let source = format!("/proc/self/fd/{}", device.as_raw_fd());
    let params: &[crate::newmount::FsParam<'_>] = if running { &[] } else { &[("ro", None)] };
    let attrs = libc::MOUNT_ATTR_RDONLY
        | libc::MOUNT_ATTR_NOSUID
        | libc::MOUNT_ATTR_NODEV
        | libc::MOUNT_ATTR_NOEXEC;
    crate::newmount::new_fs("ext4", &source, params, attrs)
}
