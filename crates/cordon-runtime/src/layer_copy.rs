//! Copies a sandbox's overlay upper directory into a read-only layer directory.
//!
//! The source tree is sandbox-controlled, so every step is fd-relative and never follows a
//! symlink: directories are opened `O_NOFOLLOW | O_DIRECTORY` below the fd of their parent,
//! regular files `O_NOFOLLOW | O_NONBLOCK` and checked with `fstat` to be the regular file that
//! was listed (a fifo or a swapped-in symlink is never opened for reading), symlinks are
//! recreated as symlinks and never resolved. Nothing is written outside `dest`, which only this
//! copy writes to: every name is created exclusively in a directory this copy made.
//!
//! What is carried: directories, regular files (by content, holes preserved), hard links among
//! them, symlinks, fifos and overlay whiteouts (character device 0:0), each with its owner,
//! mode and times, and the `trusted.overlay.opaque` marker of directories. Not carried: other
//! device nodes and sockets (skipped), setuid/setgid bits of files (stripped), and every other
//! extended attribute. The runtime mounts its overlays with `redirect_dir=nofollow` and
//! `metacopy=off`, so an upper layer never depends on a lower one through
//! `trusted.overlay.redirect` or `trusted.overlay.metacopy`; a tree that has either (written
//! under other mount options) is refused rather than copied into a layer that would lose data.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstat, fstatat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags,
    FileStat, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};

use crate::ids::RANGE_SIZE;

const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";
const REDIRECT_XATTR: &CStr = c"trusted.overlay.redirect";
const METACOPY_XATTR: &CStr = c"trusted.overlay.metacopy";
/// Chunk size of the read/write fallback when `copy_file_range` cannot copy between the two
/// filesystems.
const COPY_CHUNK: usize = 1 << 20;

/// Bounds of one copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyLimits {
    /// File content bytes (holes are free).
    pub max_bytes: u64,
    /// Directory entries of every kind.
    pub max_entries: u64,
    /// Directory nesting; each level holds two open fds while it is copied.
    pub max_depth: usize,
}

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the writable layer holds more than {limit} bytes of file content")]
    TooLarge { limit: u64 },
    #[error("the writable layer holds more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("{path}: directories nest deeper than {limit} levels")]
    TooDeep { path: String, limit: usize },
    #[error("{path}: {what}")]
    Unsupported { path: String, what: String },
    #[error("{path} changed during the capture")]
    Changed { path: String },
    #[error("the destination {0} is not an empty directory")]
    DestinationNotEmpty(PathBuf),
    #[error("{path}: {source}")]
    Io { path: String, source: Errno },
}

/// What a copy carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CopyStats {
    pub bytes: u64,
    pub entries: u64,
    /// Device nodes and sockets left out.
    pub skipped: u64,
}

struct Copier<'a> {
    limits: CopyLimits,
    stats: CopyStats,
    dest_root: BorrowedFd<'a>,
    /// Source inode of a regular file with several links → its first copy, relative to dest.
    links: HashMap<u64, PathBuf>,
}

fn io_err(path: &Path) -> impl FnOnce(Errno) -> CaptureError + '_ {
    move |source| CaptureError::Io {
        path: shown(path),
        source,
    }
}

fn shown(path: &Path) -> String {
    format!("/{}", path.display())
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Copies the tree below `src` into `dest` (an empty directory); returns what was copied.
pub(crate) fn copy_layer(
    src: BorrowedFd<'_>,
    dest: BorrowedFd<'_>,
    dest_path: &Path,
    limits: CopyLimits,
) -> Result<CopyStats, CaptureError> {
    let root = Path::new("");
    if !list(dest, root)?.is_empty() {
        return Err(CaptureError::DestinationNotEmpty(dest_path.to_path_buf()));
    }
    let mut copier = Copier {
        limits,
        stats: CopyStats::default(),
        dest_root: dest,
        links: HashMap::new(),
    };
    copier.copy_children(src, dest, root, 0)?;
    Ok(copier.stats)
}

/// The names in a directory, without `.` and `..`.
fn list(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<CString>, CaptureError> {
    let fd = openat(dir, c".", dir_flags(), Mode::empty()).map_err(io_err(path))?;
    let mut dir = Dir::from_fd(fd).map_err(io_err(path))?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(io_err(path))?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

impl Copier<'_> {
    fn count_entry(&mut self) -> Result<(), CaptureError> {
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(CaptureError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    fn count_bytes(&mut self, bytes: u64) -> Result<(), CaptureError> {
        self.stats.bytes = self.stats.bytes.saturating_add(bytes);
        if self.stats.bytes > self.limits.max_bytes {
            return Err(CaptureError::TooLarge {
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    fn copy_children(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        path: &Path,
        depth: usize,
    ) -> Result<(), CaptureError> {
        for name in list(src, path)? {
            self.count_entry()?;
            let child = path.join(OsStr::from_bytes(name.to_bytes()));
            self.copy_entry(src, dest, &name, &child, depth)?;
        }
        Ok(())
    }

    fn copy_entry(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        name: &CStr,
        path: &Path,
        depth: usize,
    ) -> Result<(), CaptureError> {
        let stat = fstatat(src, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io_err(path))?;
        check_ids(&stat, path)?;
        match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFDIR => self.copy_dir(src, dest, name, path, &stat, depth + 1),
            SFlag::S_IFREG => self.copy_file(src, dest, name, path, &stat),
            SFlag::S_IFLNK => copy_symlink(src, dest, name, path, &stat),
            SFlag::S_IFIFO => copy_node(dest, name, path, &stat, SFlag::S_IFIFO),
            SFlag::S_IFCHR if stat.st_rdev == 0 => {
                copy_node(dest, name, path, &stat, SFlag::S_IFCHR)
            }
            _ => {
                tracing::warn!(path = %shown(path), mode = format!("{:o}", stat.st_mode), "capture skips a device node or socket");
                self.stats.skipped += 1;
                Ok(())
            }
        }
    }

    fn copy_dir(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        name: &CStr,
        path: &Path,
        listed: &FileStat,
        depth: usize,
    ) -> Result<(), CaptureError> {
        if depth > self.limits.max_depth {
            return Err(CaptureError::TooDeep {
                path: shown(path),
                limit: self.limits.max_depth,
            });
        }
        let src_dir = openat(src, name, dir_flags(), Mode::empty()).map_err(io_err(path))?;
        let stat = same_inode(&src_dir, listed, path)?;
        refuse_xattr(
            &src_dir,
            REDIRECT_XATTR,
            path,
            "a renamed directory (overlay redirect)",
        )?;
        let opaque = xattr_is(&src_dir, OPAQUE_XATTR, b"y", path)?;
        mkdirat(dest, name, Mode::from_bits_truncate(0o700)).map_err(io_err(path))?;
        let dest_dir = openat(dest, name, dir_flags(), Mode::empty()).map_err(io_err(path))?;
        self.copy_children(src_dir.as_fd(), dest_dir.as_fd(), path, depth)?;
        if opaque {
            set_xattr(&dest_dir, OPAQUE_XATTR, b"y", path)?;
        }
        // Times last: creating the children changed them.
        set_owner_mode_times(&dest_dir, &stat, path)
    }

    fn copy_file(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        name: &CStr,
        path: &Path,
        listed: &FileStat,
    ) -> Result<(), CaptureError> {
        if listed.st_nlink > 1 {
            if let Some(first) = self.links.get(&listed.st_ino) {
                return link_to_first_copy(self.dest_root, first, dest, name, path);
            }
        }
        // O_NONBLOCK: should the entry have become a fifo, opening it must not hang.
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let src_file = openat(src, name, flags, Mode::empty()).map_err(io_err(path))?;
        let stat = same_inode(&src_file, listed, path)?;
        refuse_xattr(
            &src_file,
            METACOPY_XATTR,
            path,
            "metadata-only copy-up (overlay metacopy)",
        )?;
        let dest_file = openat(
            dest,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(io_err(path))?;
        self.copy_data(&src_file, &dest_file, stat.st_size as u64, path)?;
        set_owner_mode_times(&dest_file, &stat, path)?;
        if stat.st_nlink > 1 {
            self.links.insert(stat.st_ino, path.to_path_buf());
        }
        Ok(())
    }

    /// Copies the data extents of the first `size` bytes, leaving holes as holes.
    fn copy_data(
        &mut self,
        src: &OwnedFd,
        dest: &OwnedFd,
        size: u64,
        path: &Path,
    ) -> Result<(), CaptureError> {
        use nix::unistd::{lseek, Whence};
        let mut offset = 0u64;
        while offset < size {
            let data = match lseek(src, offset as i64, Whence::SeekData) {
                Ok(data) => data as u64,
                Err(Errno::ENXIO) => break,
                Err(e) => return Err(io_err(path)(e)),
            };
            if data >= size {
                break;
            }
            let hole = lseek(src, data as i64, Whence::SeekHole).map_err(io_err(path))? as u64;
            let end = hole.min(size);
            self.count_bytes(end - data)?;
            copy_range(src, dest, data, end, path)?;
            offset = end;
        }
        nix::unistd::ftruncate(dest, size as i64).map_err(io_err(path))
    }
}

fn copy_range(
    src: &OwnedFd,
    dest: &OwnedFd,
    start: u64,
    end: u64,
    path: &Path,
) -> Result<(), CaptureError> {
    let mut offset = start as i64;
    while (offset as u64) < end {
        let (mut off_in, mut off_out) = (offset, offset);
        let want = (end - offset as u64).min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), dest, Some(&mut off_out), want) {
            // The file ended early; the final truncate gives it its recorded size.
            Ok(0) => return Ok(()),
            Ok(n) => offset += n as i64,
            Err(Errno::EXDEV | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOSYS) => {
                return copy_range_by_reading(src, dest, offset as u64, end, path)
            }
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok(())
}

fn copy_range_by_reading(
    src: &OwnedFd,
    dest: &OwnedFd,
    start: u64,
    end: u64,
    path: &Path,
) -> Result<(), CaptureError> {
    let mut buffer = vec![0u8; COPY_CHUNK];
    let mut offset = start;
    while offset < end {
        let want = ((end - offset) as usize).min(COPY_CHUNK);
        let read =
            nix::sys::uio::pread(src, &mut buffer[..want], offset as i64).map_err(io_err(path))?;
        if read == 0 {
            return Ok(());
        }
        let mut written = 0;
        while written < read {
            written += nix::sys::uio::pwrite(
                dest,
                &buffer[written..read],
                (offset + written as u64) as i64,
            )
            .map_err(io_err(path))?;
        }
        offset += read as u64;
    }
    Ok(())
}

/// Ids must be ones the sandbox can see (its range, stored unshifted); anything else cannot
/// have been written through the sandbox's idmapped overlay.
fn check_ids(stat: &FileStat, path: &Path) -> Result<(), CaptureError> {
    if stat.st_uid >= RANGE_SIZE || stat.st_gid >= RANGE_SIZE {
        return Err(CaptureError::Unsupported {
            path: shown(path),
            what: format!(
                "owner {}:{} outside the sandbox's ids",
                stat.st_uid, stat.st_gid
            ),
        });
    }
    Ok(())
}

/// The `fstat` of what was opened, which must be the inode that was listed.
fn same_inode(fd: &OwnedFd, listed: &FileStat, path: &Path) -> Result<FileStat, CaptureError> {
    let stat = fstat(fd).map_err(io_err(path))?;
    let kind = |s: &FileStat| s.st_mode & SFlag::S_IFMT.bits();
    if stat.st_ino != listed.st_ino || stat.st_dev != listed.st_dev || kind(&stat) != kind(listed) {
        return Err(CaptureError::Changed { path: shown(path) });
    }
    Ok(stat)
}

/// Permission bits to give the copy: file setuid/setgid stripped (a captured layer must not
/// carry privilege); a directory keeps setgid, which only makes new entries inherit its group.
fn carried_mode(stat: &FileStat) -> Mode {
    let is_dir = stat.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits();
    let strip = if is_dir {
        libc::S_ISUID
    } else {
        libc::S_ISUID | libc::S_ISGID
    };
    Mode::from_bits_truncate(stat.st_mode & 0o7777 & !strip)
}

fn times_of(stat: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(stat.st_atime, stat.st_atime_nsec),
        TimeSpec::new(stat.st_mtime, stat.st_mtime_nsec),
    )
}

fn owner_of(stat: &FileStat) -> (Option<Uid>, Option<Gid>) {
    (
        Some(Uid::from_raw(stat.st_uid)),
        Some(Gid::from_raw(stat.st_gid)),
    )
}

fn set_owner_mode_times(fd: &OwnedFd, stat: &FileStat, path: &Path) -> Result<(), CaptureError> {
    let (uid, gid) = owner_of(stat);
    // chown before chmod: chown clears setuid/setgid.
    fchown(fd, uid, gid).map_err(io_err(path))?;
    fchmod(fd, carried_mode(stat)).map_err(io_err(path))?;
    let (atime, mtime) = times_of(stat);
    futimens(fd, &atime, &mtime).map_err(io_err(path))
}

/// Owner and times of an entry that cannot be opened (symlink, fifo, whiteout), by name in a
/// directory this copy created.
fn set_owner_times_at(
    dest: BorrowedFd<'_>,
    name: &CStr,
    stat: &FileStat,
    path: &Path,
) -> Result<(), CaptureError> {
    let (uid, gid) = owner_of(stat);
    fchownat(dest, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io_err(path))?;
    let (atime, mtime) = times_of(stat);
    utimensat(dest, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink).map_err(io_err(path))
}

fn copy_symlink(
    src: BorrowedFd<'_>,
    dest: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
    stat: &FileStat,
) -> Result<(), CaptureError> {
    let target = nix::fcntl::readlinkat(src, name).map_err(io_err(path))?;
    symlinkat(target.as_os_str(), dest, name).map_err(io_err(path))?;
    set_owner_times_at(dest, name, stat, path)
}

/// A fifo or a whiteout (character device 0:0).
fn copy_node(
    dest: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
    stat: &FileStat,
    kind: SFlag,
) -> Result<(), CaptureError> {
    mknodat(dest, name, kind, Mode::from_bits_truncate(0o600), 0).map_err(io_err(path))?;
    set_owner_times_at(dest, name, stat, path)?;
    // Not a symlink (this copy just made it), so following is the same as not; the umask
    // applied by mknod is undone here.
    fchmodat(dest, name, carried_mode(stat), FchmodatFlags::FollowSymlink).map_err(io_err(path))
}

/// Hard-links `name` to the earlier copy at `first` (relative to the destination root), found
/// without following anything.
fn link_to_first_copy(
    dest_root: BorrowedFd<'_>,
    first: &Path,
    dest: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
) -> Result<(), CaptureError> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let target = openat2(dest_root, first, how).map_err(io_err(path))?;
    linkat(target.as_fd(), c"", dest, name, AtFlags::AT_EMPTY_PATH).map_err(io_err(path))
}

fn refuse_xattr(fd: &OwnedFd, name: &CStr, path: &Path, what: &str) -> Result<(), CaptureError> {
    // SAFETY: a size query (null buffer, size 0) on a valid fd.
    let ret = unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if ret >= 0 {
        return Err(CaptureError::Unsupported {
            path: shown(path),
            what: format!("{what} cannot be captured"),
        });
    }
    match Errno::last() {
        Errno::ENODATA | Errno::EOPNOTSUPP => Ok(()),
        e => Err(io_err(path)(e)),
    }
}

/// True when the xattr `name` holds exactly `value`.
fn xattr_is(fd: &OwnedFd, name: &CStr, value: &[u8], path: &Path) -> Result<bool, CaptureError> {
    let mut buffer = [0u8; 8];
    // SAFETY: `buffer` is valid for its length during the call.
    let ret = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    if ret >= 0 {
        return Ok(&buffer[..ret as usize] == value);
    }
    match Errno::last() {
        Errno::ENODATA | Errno::EOPNOTSUPP | Errno::ERANGE => Ok(false),
        e => Err(io_err(path)(e)),
    }
}

fn set_xattr(fd: &OwnedFd, name: &CStr, value: &[u8], path: &Path) -> Result<(), CaptureError> {
    // SAFETY: `value` is valid for its length during the call.
    let ret = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if ret < 0 {
        return Err(io_err(path)(Errno::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    fn limits() -> CopyLimits {
        CopyLimits {
            max_bytes: 1 << 30,
            max_entries: 1000,
            max_depth: 16,
        }
    }

    fn open_dir(path: &Path) -> OwnedFd {
        nix::fcntl::open(path, dir_flags(), Mode::empty()).unwrap()
    }

    fn copy(src: &Path, dest: &Path, limits: CopyLimits) -> Result<CopyStats, CaptureError> {
        copy_layer(open_dir(src).as_fd(), open_dir(dest).as_fd(), dest, limits)
    }

    #[test]
    fn files_links_nodes_and_metadata_are_carried_and_setuid_is_not() {
        let (src, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = src.path();
        std::fs::create_dir_all(s.join("a/b")).unwrap();
        std::fs::write(s.join("a/b/file"), b"hello").unwrap();
        std::fs::set_permissions(s.join("a/b/file"), PermissionsExt::from_mode(0o4755)).unwrap();
        std::os::unix::fs::lchown(s.join("a/b/file"), Some(1000), Some(1001)).unwrap();
        std::fs::hard_link(s.join("a/b/file"), s.join("hard")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", s.join("link")).unwrap();
        nix::unistd::mkfifo(&s.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
        mknodat(
            nix::fcntl::AT_FDCWD,
            &s.join("whiteout"),
            SFlag::S_IFCHR,
            Mode::empty(),
            0,
        )
        .unwrap();
        mknodat(
            nix::fcntl::AT_FDCWD,
            &s.join("null"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        let stats = copy(s, dest.path(), limits()).unwrap();
        let d = dest.path();
        assert_eq!(stats.bytes, 5);
        assert_eq!(stats.skipped, 1);
        let file = std::fs::symlink_metadata(d.join("a/b/file")).unwrap();
        assert_eq!(std::fs::read(d.join("a/b/file")).unwrap(), b"hello");
        assert_eq!(file.mode() & 0o7777, 0o755, "setuid stripped");
        assert_eq!((file.uid(), file.gid()), (1000, 1001));
        assert_eq!(
            file.mtime(),
            std::fs::metadata(s.join("a/b/file")).unwrap().mtime()
        );
        assert_eq!(
            std::fs::metadata(d.join("hard")).unwrap().ino(),
            file.ino(),
            "hard link kept"
        );
        assert_eq!(
            std::fs::read_link(d.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(std::fs::symlink_metadata(d.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        let whiteout = std::fs::symlink_metadata(d.join("whiteout")).unwrap();
        assert_eq!(whiteout.rdev(), 0);
        assert!(!d.join("null").exists());
    }

    #[test]
    fn opaque_directories_keep_their_marker_and_other_overlay_xattrs_are_dropped() {
        let (src, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir(src.path().join("opaque")).unwrap();
        let fd = open_dir(&src.path().join("opaque"));
        set_xattr(&fd, OPAQUE_XATTR, b"y", Path::new("opaque")).unwrap();
        set_xattr(&fd, c"trusted.overlay.impure", b"y", Path::new("opaque")).unwrap();
        copy(src.path(), dest.path(), limits()).unwrap();
        let copied = open_dir(&dest.path().join("opaque"));
        assert!(xattr_is(&copied, OPAQUE_XATTR, b"y", Path::new("")).unwrap());
        assert!(!xattr_is(&copied, c"trusted.overlay.impure", b"y", Path::new("")).unwrap());
    }

    #[test]
    fn redirects_and_metacopy_are_refused() {
        let (src, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir(src.path().join("moved")).unwrap();
        let fd = open_dir(&src.path().join("moved"));
        set_xattr(&fd, REDIRECT_XATTR, b"/old", Path::new("")).unwrap();
        let error = copy(src.path(), dest.path(), limits()).unwrap_err();
        assert!(error.to_string().contains("redirect"), "{error}");

        let (src, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(src.path().join("meta"), b"").unwrap();
        let file =
            nix::fcntl::open(&src.path().join("meta"), OFlag::O_RDONLY, Mode::empty()).unwrap();
        set_xattr(&file, METACOPY_XATTR, b"", Path::new("")).unwrap();
        let error = copy(src.path(), dest.path(), limits()).unwrap_err();
        assert!(error.to_string().contains("metacopy"), "{error}");
    }

    #[test]
    fn holes_are_free_and_content_is_bounded() {
        let (src, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sparse = std::fs::File::create(src.path().join("sparse")).unwrap();
        sparse.set_len(1 << 40).unwrap();
        std::fs::write(src.path().join("data"), vec![7u8; 100_000]).unwrap();
        let stats = copy(src.path(), dest.path(), limits()).unwrap();
        assert_eq!(stats.bytes, 100_000);
        let copied = std::fs::metadata(dest.path().join("sparse")).unwrap();
        assert_eq!(copied.len(), 1 << 40);
        assert!(copied.blocks() < 64, "{}", copied.blocks());
        let small = CopyLimits {
            max_bytes: 50_000,
            ..limits()
        };
        let dest = tempfile::tempdir().unwrap();
        assert!(matches!(
            copy(src.path(), dest.path(), small),
            Err(CaptureError::TooLarge { limit: 50_000 })
        ));
    }

    #[test]
    fn entries_depth_and_a_non_empty_destination_are_refused() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("1/2/3/4")).unwrap();
        let shallow = CopyLimits {
            max_depth: 3,
            ..limits()
        };
        let dest = tempfile::tempdir().unwrap();
        assert!(matches!(
            copy(src.path(), dest.path(), shallow),
            Err(CaptureError::TooDeep { .. })
        ));
        let few = CopyLimits {
            max_entries: 2,
            ..limits()
        };
        let dest = tempfile::tempdir().unwrap();
        assert!(matches!(
            copy(src.path(), dest.path(), few),
            Err(CaptureError::TooManyEntries { limit: 2 })
        ));
        let dest = tempfile::tempdir().unwrap();
        std::fs::write(dest.path().join("x"), b"").unwrap();
        assert!(matches!(
            copy(src.path(), dest.path(), limits()),
            Err(CaptureError::DestinationNotEmpty(_))
        ));
    }

    #[test]
    fn ids_outside_the_sandbox_range_are_refused() {
        let (src, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(src.path().join("f"), b"").unwrap();
        std::os::unix::fs::lchown(src.path().join("f"), Some(RANGE_SIZE), Some(0)).unwrap();
        assert!(matches!(
            copy(src.path(), dest.path(), limits()),
            Err(CaptureError::Unsupported { .. })
        ));
    }
}
