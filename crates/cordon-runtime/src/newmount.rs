//! A new, detached filesystem instance through the new mount API (`fsopen` + `fsconfig` +
//! `fsmount`): `cordon-nsinit` creates the sandbox's filesystems with it, the runtime mounts a
//! disk image's ext4 for a capture. Internal to this crate's two halves; not a stable
//! interface.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One filesystem parameter: `key=value`, or a flag when the value is `None`.
pub type FsParam<'a> = (&'a str, Option<&'a str>);

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A new `fstype` filesystem from `source` with `params`, as a detached mount with mount
/// attributes `attrs` (`MOUNT_ATTR_*`): only the returned fd reaches it, and closing it
/// unmounts.
pub fn new_fs(
    fstype: &str,
    source: &str,
    params: &[FsParam<'_>],
    attrs: u64,
) -> io::Result<OwnedFd> {
    let name = CString::new(fstype).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C string, flags as documented for fsopen(2).
    let context =
        check(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), libc::FSOPEN_CLOEXEC) })?;
    // SAFETY: fsopen returned a new fd we now own.
    let context = unsafe { OwnedFd::from_raw_fd(context as RawFd) };
    fs_config(&context, libc::FSCONFIG_SET_STRING, "source", Some(source))?;
    for (key, value) in params {
        let command = match value {
            Some(_) => libc::FSCONFIG_SET_STRING,
            None => libc::FSCONFIG_SET_FLAG,
        };
        fs_config(&context, command, key, *value)?;
    }
    // SAFETY: a command without key or value.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            libc::FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })?;
    let attrs =
        libc::c_uint::try_from(attrs).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid filesystem context fd; fsmount(2) flags and attributes.
    let mount = check(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            context.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            attrs,
        )
    })?;
    // SAFETY: fsmount returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(mount as RawFd) })
}

fn fs_config(
    context: &OwnedFd,
    command: libc::c_uint,
    key: &str,
    value: Option<&str>,
) -> io::Result<()> {
    let invalid = |_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a mount option");
    let key_c = CString::new(key).map_err(invalid)?;
    let value_c = value.map(CString::new).transpose().map_err(invalid)?;
    let value_ptr = value_c
        .as_ref()
        .map_or(std::ptr::null(), |value| value.as_ptr());
    // SAFETY: valid fd and C strings that outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            command,
            key_c.as_ptr(),
            value_ptr,
            0,
        )
    })
    .map_err(|e| io::Error::new(e.kind(), format!("option {key}: {e}")))?;
    Ok(())
}
