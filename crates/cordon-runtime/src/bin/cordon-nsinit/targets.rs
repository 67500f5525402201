//! Mount targets inside the sandbox's root, a tree the image and earlier runs of the sandbox
//! control (SECURITY.md row 3: CVE-2021-30465, CVE-2025-31133, CVE-2025-52565,
//! CVE-2025-52881).
//!
//! Every target is opened below a directory fd with `openat2`, refusing symlinks, magic links
//! and mount crossings at every step; its type is checked on the open fd; and the mount is
//! attached onto that same fd (`move_mount` with an empty path). Nothing is resolved by name
//! twice, so no symlink, mount or swapped entry in the tree can redirect a mount or slip past
//! the check.

use std::os::fd::{BorrowedFd, OwnedFd};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, SFlag};

/// What a target was found to be.
pub struct Found {
    /// An `O_PATH` fd of the target itself (of the symlink, when it is one).
    pub fd: OwnedFd,
    pub kind: SFlag,
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

/// Opens `path` below `dir` without leaving it, following no symlink and crossing no mount.
/// A symlink as the last component is opened itself (`O_PATH | O_NOFOLLOW`), never followed.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(resolve_flags());
    openat2(dir, path, how)
}

/// Finds `path` below `dir`; `None` when it does not exist. `shown` names it in errors (its
/// path as the sandbox sees it).
pub fn find(dir: BorrowedFd<'_>, path: &str, shown: &str) -> Result<Option<Found>> {
    let fd = match open_beneath(dir, path, OFlag::O_PATH) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => {
            bail!("rootfs {shown}: a directory on its path is a symlink; refusing to mount there")
        }
        Err(Errno::EXDEV) => {
            bail!("rootfs {shown}: its path leaves the root or crosses a mount point")
        }
        Err(Errno::ENOTDIR) => {
            bail!("rootfs {shown}: a component of its path is not a directory")
        }
        Err(error) => return Err(error).with_context(|| format!("open rootfs {shown}")),
    };
    let kind =
        SFlag::from_bits_truncate(fstat(&fd).with_context(|| format!("stat {shown}"))?.st_mode)
            & SFlag::S_IFMT;
    Ok(Some(Found { fd, kind }))
}

/// The target must be a real directory: never a symlink (to be followed) or anything else.
pub fn expect_directory(found: Found, shown: &str) -> Result<OwnedFd> {
    if found.kind != SFlag::S_IFDIR {
        bail!(
            "rootfs {shown} is not a directory ({}); refusing to mount over it",
            describe(found.kind)
        );
    }
    Ok(found.fd)
}

/// "a symlink", "a regular file", …: for error messages.
pub fn describe(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symlink",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFIFO => "a fifo",
        SFlag::S_IFSOCK => "a socket",
        _ => "of an unknown type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn open_dir(path: &std::path::Path) -> OwnedFd {
        nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn symlinks_are_found_as_symlinks_and_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dir")).unwrap();
        std::fs::write(root.path().join("file"), "").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("dir", root.path().join("rel")).unwrap();
        let fd = open_dir(root.path());
        let dir = fd.as_fd();

        let found = find(dir, "dir", "/dir").unwrap().unwrap();
        assert!(expect_directory(found, "/dir").is_ok());
        for link in ["abs", "rel"] {
            let found = find(dir, link, link).unwrap().unwrap();
            assert_eq!(found.kind, SFlag::S_IFLNK);
            let error = expect_directory(found, link).unwrap_err().to_string();
            assert!(error.contains("is not a directory (a symlink)"), "{error}");
        }
        let error = expect_directory(find(dir, "file", "/file").unwrap().unwrap(), "/file");
        assert!(error.unwrap_err().to_string().contains("(a regular file)"));
        // Through a symlinked directory, even one that stays inside: refused.
        std::fs::create_dir(root.path().join("dir/sub")).unwrap();
        let error = find(dir, "rel/sub", "/rel/sub").err().unwrap().to_string();
        assert!(error.contains("symlink"), "{error}");
        assert!(find(dir, "abs/x", "/abs/x").is_err());
        assert!(find(dir, "../x", "/../x").is_err());
        assert!(find(dir, "missing", "/missing").unwrap().is_none());
    }
}
