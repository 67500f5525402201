//! Thin safe wrappers for the syscalls no crate covers: the new mount API (idmapped mounts,
//! filesystems created and attached through fds), `close_range` and bringing `lo` up.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = libc::MOUNT_ATTR_NOEXEC;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount at `path` (`open_tree(OPEN_TREE_CLONE)`).
pub fn clone_tree(path: &Path) -> io::Result<OwnedFd> {
    let path = cstring(path)?;
    // SAFETY: valid C string, flags as documented for open_tree(2).
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        )
    })?;
    // SAFETY: open_tree returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sets `attrs` on the mount `tree` refers to (`mount_setattr`; detached, or attached in
/// this mount namespace) and, with `idmap`, idmaps it through that user namespace.
pub fn set_tree_attrs(tree: &OwnedFd, idmap: Option<BorrowedFd<'_>>, attrs: u64) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: attrs | idmap.map_or(0, |_| MOUNT_ATTR_IDMAP),
        attr_clr: 0,
        propagation: 0,
        userns_fd: idmap.map_or(0, |fd| fd.as_raw_fd() as u64),
    };
    // SAFETY: `attr` outlives the call and its size is passed along.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// Attaches a detached mount at `target` (`move_mount`).
pub fn attach_tree(tree: &OwnedFd, target: &Path) -> io::Result<()> {
    let target = cstring(target)?;
    // SAFETY: valid fd and C strings.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// A detached copy of the file or directory `fd` refers to (`open_tree(OPEN_TREE_CLONE)` with
/// an empty path): a bind mount of exactly that object, with nothing resolved by name.
pub fn clone_tree_at(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: valid fd and empty C string, flags as documented for open_tree(2).
    let tree = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            fd.as_raw_fd(),
            c"".as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    })?;
    // SAFETY: open_tree returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as RawFd) })
}

/// Attaches a detached mount onto the file or directory `target` refers to (`move_mount`
/// with both paths empty), so the kernel resolves no name at all.
pub fn attach_tree_at(tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fds and empty C strings.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Marks every fd from `first` up close-on-exec (`close_range(CLOSE_RANGE_CLOEXEC)`), so an
/// error pipe stays usable until the final exec, which then closes them all.
pub fn cloexec_from(first: u32) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes fd flags.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) })?;
    Ok(())
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `request`, which lives across the calls.
    unsafe {
        check(libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) as libc::c_long)?;
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) as libc::c_long)?;
    }
    Ok(())
}

/// Closes every fd from `first` up except `keep`.
pub fn close_from_except(first: u32, keep: u32) -> io::Result<()> {
    // SAFETY: closing fds nothing else in this single-threaded process uses.
    unsafe {
        if keep > first {
            check(libc::syscall(libc::SYS_close_range, first, keep - 1, 0))?;
        }
        check(libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0))?;
    }
    Ok(())
}
