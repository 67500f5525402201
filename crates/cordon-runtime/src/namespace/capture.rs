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

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
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
    let mount =
        mount_detached_ext4(&device).context(|| format!("mount {} (ext4)", image.display()))?;
    Ok(Upper {
        dir: open_upper_in(mount.as_fd(), image)?,
        _mount: Some(mount),
        _loop_device: Some(device),
    })
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

fn syscall_fd(ret: libc::c_long) -> std::io::Result<OwnedFd> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// Mounts the ext4 filesystem on `device` read-only, nosuid, nodev and noexec as a detached
/// mount: only the returned fd reaches it, and closing it unmounts.
fn mount_detached_ext4(device: &OwnedFd) -> std::io::Result<OwnedFd> {
    // The fd's magic link names exactly the device we checked, whatever /dev holds now.
    let source = CString::new(format!("/proc/self/fd/{}", device.as_raw_fd()))
        .map_err(std::io::Error::other)?;
    // SAFETY: valid C strings; fsopen returns a new fd.
    let context =
        syscall_fd(unsafe { libc::syscall(libc::SYS_fsopen, c"ext4".as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: valid fd and C strings, as documented for fsconfig(2).
    let configured = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            FSCONFIG_SET_STRING,
            c"source".as_ptr(),
            source.as_ptr(),
            0,
        )
    };
    if configured < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; CMD_CREATE takes no key or value.
    let created = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if created < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
    // SAFETY: a configured fs context fd; fsmount returns a new fd.
    syscall_fd(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            context.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            attrs,
        )
    })
}
