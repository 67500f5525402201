//! Host-side walks of sandbox-controlled trees: every step is fd-relative and never follows
//! a symlink, so a sandbox that swaps a directory for a symlink cannot send the host outside
//! its writable layer.

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::dir::{Dir, Type};
use nix::fcntl::{open, openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, Mode};

const MAX_DEPTH: usize = 256;

fn open_dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Bytes allocated under `root` (like `du -s`), counting each inode once.
pub(crate) fn disk_usage(root: &Path) -> std::io::Result<u64> {
    let fd = open(root, open_dir_flags(), Mode::empty())?;
    let mut seen = HashSet::new();
    let mut total = 0;
    walk(fd, 0, &mut seen, &mut total)?;
    Ok(total)
}

fn walk(
    dir_fd: OwnedFd,
    depth: usize,
    seen: &mut HashSet<(u64, u64)>,
    total: &mut u64,
) -> std::io::Result<()> {
    let stat = nix::sys::stat::fstat(&dir_fd)?;
    *total += stat.st_blocks as u64 * 512;
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    let mut subdirs = Vec::new();
    let mut dir = Dir::from_fd(dir_fd.try_clone()?)?;
    for entry in dir.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        if entry.file_type() == Some(Type::Directory) {
            subdirs.push(name.to_owned());
            continue;
        }
        // Vanished entries are fine: the sandbox keeps writing while we count.
        if let Ok(st) = fstatat(dir_fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            if st.st_nlink <= 1 || seen.insert((st.st_dev, st.st_ino)) {
                *total += st.st_blocks as u64 * 512;
            }
        }
    }
    for name in subdirs {
        if let Ok(child) = openat(
            dir_fd.as_fd(),
            name.as_c_str(),
            open_dir_flags(),
            Mode::empty(),
        ) {
            walk(child, depth + 1, seen, total)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_but_not_symlink_targets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), vec![1u8; 64 * 1024]).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("big"), vec![1u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let used = disk_usage(dir.path()).unwrap();
        assert!(used >= 64 * 1024, "{used}");
        assert!(used < 1 << 20, "{used} followed the symlink");
    }
}
