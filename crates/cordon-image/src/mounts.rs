//! Keeping host mounts out of build trees.
//!
//! `debootstrap` mounts `/proc` and `/sys` (and, in some containers, binds host `/dev` nodes)
//! inside its target. We run it in a private mount namespace so those mounts die with it, but
//! a tree left by an older or killed build may still carry some in this namespace, and
//! deleting such a tree recursively would walk into the host's `/proc`, `/sys` or `/dev`.
//! So a build tree is only ever deleted through [`remove_tree`], which detaches everything
//! mounted below it first and refuses to delete while anything remains.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};
use tracing::warn;

use crate::error::{ImageError, IoContext};

/// Rounds of detaching before giving up: stacked mounts need one round per level.
const UNMOUNT_ROUNDS: usize = 8;

/// Mount points at or below `dir` in this process's mount namespace, in mount order.
pub(crate) fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .context(|| "read /proc/self/mountinfo".to_string())?;
    Ok(parse_mount_points(&mountinfo)
        .into_iter()
        .filter(|point| point.starts_with(dir))
        .collect())
}

/// The mount point (5th field) of every `/proc/self/mountinfo` line, unescaped.
fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mount paths as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or below `dir`, newest first; an error if any remain.
pub(crate) fn unmount_below(dir: &Path) -> Result<(), ImageError> {
    for _ in 0..UNMOUNT_ROUNDS {
        let mounts = mounts_below(dir)?;
        if mounts.is_empty() {
            return Ok(());
        }
        for point in mounts.iter().rev() {
            warn!(mount = %point.display(), "detaching a mount left inside a build tree");
            // Lazy detach: a busy mount still leaves this namespace at once, which is what
            // keeps a later recursive delete from reaching into it.
            if let Err(errno) = umount2(point, MntFlags::MNT_DETACH) {
                warn!(mount = %point.display(), %errno, "detach failed");
            }
        }
    }
    let mounts = mounts_below(dir)?;
    if mounts.is_empty() {
        Ok(())
    } else {
        Err(ImageError::MountsRemain {
            path: dir.to_path_buf(),
            mounts,
        })
    }
}

/// Deletes `dir` recursively after making sure nothing is mounted below it. Missing is fine.
pub(crate) fn remove_tree(dir: &Path) -> Result<(), ImageError> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    unmount_below(dir)?;
    fs::remove_dir_all(dir).context(|| format!("remove {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        let mountinfo = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                         90 22 0:50 / /var/cache/a\\040b\\134c rw - tmpfs tmpfs rw\n";
        assert_eq!(
            parse_mount_points(mountinfo),
            vec![PathBuf::from("/proc"), PathBuf::from("/var/cache/a b\\c")]
        );
    }

    #[test]
    fn a_tree_with_mounts_inside_is_detached_before_it_is_deleted() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let parent = tempfile::tempdir().unwrap();
        let tree = parent.path().join("tree");
        let inner = tree.join("proc");
        fs::create_dir_all(&inner).unwrap();
        fs::create_dir_all(tree.join("deep/sys")).unwrap();
        // A stand-in for debootstrap's /proc: a tmpfs with a file that must survive, mounted
        // twice (stacked) to need more than one round.
        let host_like = tempfile::tempdir().unwrap();
        fs::write(host_like.path().join("keep"), b"host file").unwrap();
        for target in [&inner, &inner, &tree.join("deep/sys")] {
            nix::mount::mount(
                Some(host_like.path()),
                target.as_path(),
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
        }
        assert_eq!(mounts_below(&tree).unwrap().len(), 3);

        remove_tree(&tree).unwrap();

        assert!(!tree.exists());
        assert!(mounts_below(parent.path()).unwrap().is_empty());
        assert_eq!(
            fs::read(host_like.path().join("keep")).unwrap(),
            b"host file",
            "deleting the tree reached into a mount"
        );
    }
}
