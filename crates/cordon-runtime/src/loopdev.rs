//! Loop devices for the sparse ext4 disk images: attaching one (`cordon-nsinit` at boot, the
//! runtime when it captures a stopped sandbox) and finding the one a running sandbox's image is
//! attached to. Internal to this crate's two halves; not a stable interface.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::{fstat, Mode};

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches `image` to a free loop device with autoclear (the device detaches itself when
/// its last user, the mount, goes away). Returns the device path and its open fd.
pub fn attach(image: BorrowedFd<'_>) -> io::Result<(String, OwnedFd)> {
    let control = open(
        "/dev/loop-control",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for _ in 0..32 {
        // SAFETY: ioctl without an argument on our loop-control fd.
        let number = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) })?;
        let path = format!("/dev/loop{number}");
        let device = open(
            path.as_str(),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: loop_config is plain data; all-zero is its documented default.
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = image.as_raw_fd() as u32;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: `config` is a valid loop_config for the duration of the call.
        let ret = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_CONFIGURE as _,
                &config as *const LoopConfig,
            )
        };
        if ret == 0 {
            return Ok((path, device));
        }
        let error = io::Error::last_os_error();
        // Another process took the same free device between the two calls: try the next.
        if error.raw_os_error() != Some(libc::EBUSY) {
            return Err(error);
        }
    }
    Err(io::Error::other("no free loop device"))
}

/// The loop device `image` is attached to, opened read-only (which keeps it attached, even with
/// autoclear, until the fd is closed); `None` when no loop device backs it.
pub fn find_attached(image: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    let stat = fstat(image)?;
    let entries = match std::fs::read_dir("/sys/block") {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty())
        else {
            continue;
        };
        // Only bound devices have `loop/`; skipping the rest avoids opening idle devices.
        if !entry.path().join("loop").exists() {
            continue;
        }
        let Ok(device) = open(
            format!("/dev/loop{number}").as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        if backing_file_of(&device)
            .is_some_and(|(dev, ino)| dev == stat.st_dev && ino == stat.st_ino)
        {
            return Ok(Some(device));
        }
    }
    Ok(None)
}

/// Device and inode number of the file a loop device is attached to (checked after opening
/// it, so a device detached and reused meanwhile is not mistaken for ours).
fn backing_file_of(device: &OwnedFd) -> Option<(u64, u64)> {
    // SAFETY: loop_info64 is plain data; the ioctl fills it.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid loop_info64 for the duration of the call.
    let ret = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_GET_STATUS64 as _,
            &mut info as *mut LoopInfo64,
        )
    };
    (ret == 0).then_some((info.lo_device, info.lo_inode))
}
