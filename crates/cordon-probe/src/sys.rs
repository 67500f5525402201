//! Thin syscall helpers shared by the probes: raw-syscall error mapping, fork-and-report
//! children (for calls that change the caller, like `unshare`, or may be killed by seccomp),
//! and file identity.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult};

/// Maps a raw `syscall(2)` return to `Result`, reading errno on failure.
pub fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// Same for the `c_int`-returning libc wrappers.
pub fn check_int(ret: libc::c_int) -> Result<libc::c_int, Errno> {
    check(ret as libc::c_long).map(|value| value as libc::c_int)
}

/// Errnos a seccomp filter (or a missing capability) answers a refused call with. Anything
/// else means the call reached the code it was meant to keep the sandbox away from.
pub fn is_refusal(errno: Errno) -> bool {
    matches!(errno, Errno::EPERM | Errno::EACCES | Errno::ENOSYS)
}

/// `EPERM`, `ENOSYS`… (nix's Debug form is the bare name).
pub fn name(errno: Errno) -> String {
    format!("{errno:?}")
}

/// How a forked check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildEnd {
    /// The closure returned: its exit code and message.
    Exited { code: i32, message: String },
    /// Killed by a signal, e.g. SIGSYS from a `SECCOMP_RET_KILL_*` filter.
    Signaled(Signal),
}

/// Runs `check` in a forked child and returns how it ended. The child only reports through
/// a pipe and its exit status; it never returns into the caller's code (a panic is caught
/// and turned into [`CHILD_PANICKED`]), so nothing it does leaks into the probe's own process.
pub fn in_child<F>(check: F) -> Result<ChildEnd, Errno>
where
    F: FnOnce() -> (i32, String),
{
    let (read_end, write_end) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the probe is single-threaded; the child only runs `check` and `_exit`s.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(read_end);
            let (code, message) = catch_unwind(AssertUnwindSafe(check))
                .unwrap_or_else(|_| (CHILD_PANICKED, "check panicked in the child".to_string()));
            let mut pipe = std::fs::File::from(write_end);
            let _ = pipe.write_all(message.as_bytes());
            drop(pipe);
            // SAFETY: `_exit` skips atexit handlers and stdio flushing that belong to the parent.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut message = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut message);
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => {
                        return Ok(ChildEnd::Exited { code, message })
                    }
                    Ok(WaitStatus::Signaled(_, signal, _)) => {
                        return Ok(ChildEnd::Signaled(signal))
                    }
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(errno) => return Err(errno),
                }
            }
        }
    }
}

/// Forks a child that only sleeps until killed (a harmless target for ptrace checks).
pub fn spawn_sleeper() -> Result<nix::unistd::Pid, Errno> {
    // SAFETY: the child only loops on pause(2) until the parent kills it.
    match unsafe { fork() }? {
        ForkResult::Child => loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        },
        ForkResult::Parent { child } => Ok(child),
    }
}

/// Exit code of an `in_child` check whose closure panicked.
pub const CHILD_PANICKED: i32 = 125;

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
}

impl FileId {
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub fn major_minor(&self) -> (u32, u32) {
        (libc::major(self.dev), libc::minor(self.dev))
    }

    pub fn same_object(&self, other: &FileId) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

fn file_id(stat: &libc::stat) -> FileId {
    FileId {
        dev: stat.st_dev,
        ino: stat.st_ino,
        mode: stat.st_mode,
    }
}

pub fn fstat_id(fd: &OwnedFd) -> Result<FileId, Errno> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `stat` is a valid out-pointer for fstat.
    check_int(unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so the buffer is initialized.
    Ok(file_id(unsafe { &stat.assume_init() }))
}

/// `stat(path)`, following symlinks (resolved inside the caller's root).
pub fn stat_id(path: &str) -> Result<FileId, Errno> {
    let path = cstring(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid C string and out-pointer.
    check_int(unsafe { libc::stat(path.as_ptr(), stat.as_mut_ptr()) })?;
    // SAFETY: stat succeeded.
    Ok(file_id(unsafe { &stat.assume_init() }))
}

/// `lstat(path)`: the link itself.
pub fn lstat_id(path: &str) -> Result<FileId, Errno> {
    let path = cstring(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid C string and out-pointer.
    check_int(unsafe { libc::lstat(path.as_ptr(), stat.as_mut_ptr()) })?;
    // SAFETY: lstat succeeded.
    Ok(file_id(unsafe { &stat.assume_init() }))
}

/// `openat(dirfd, path, flags)`; `dirfd` None means `AT_FDCWD`.
pub fn open_at(dirfd: Option<&OwnedFd>, path: &str, flags: libc::c_int) -> Result<OwnedFd, Errno> {
    let path = cstring(path)?;
    let dirfd = dirfd.map_or(libc::AT_FDCWD, |fd| fd.as_raw_fd());
    // SAFETY: valid C string; the returned fd is owned by the caller.
    let fd = check_int(unsafe { libc::openat(dirfd, path.as_ptr(), flags | libc::O_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn open(path: &str, flags: libc::c_int) -> Result<OwnedFd, Errno> {
    open_at(None, path, flags)
}

/// Takes ownership of a raw fd returned by a syscall.
pub fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: callers pass an fd a syscall has just returned to them.
    unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }
}

pub fn cstring(value: &str) -> Result<CString, Errno> {
    CString::new(value).map_err(|_| Errno::EINVAL)
}

/// `readlink`, lossily decoded.
pub fn read_link(path: &str) -> Result<String, Errno> {
    std::fs::read_link(path)
        .map(|target| target.to_string_lossy().into_owned())
        .map_err(|error| io_errno(&error))
}

/// Reads a whole (small) file, lossily decoded; at most `limit` bytes.
pub fn read_text(path: &str, limit: usize) -> Result<String, Errno> {
    let file = std::fs::File::open(path).map_err(|error| io_errno(&error))?;
    let mut bytes = Vec::new();
    file.take(limit as u64)
        .read_to_end(&mut bytes)
        .map_err(|error| io_errno(&error))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub fn io_errno(error: &std::io::Error) -> Errno {
    Errno::from_raw(error.raw_os_error().unwrap_or(libc::EIO))
}

/// Numeric entries of `/proc`: every pid this process can see.
pub fn visible_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The seccomp mode from `/proc/self/status` (0 off, 1 strict, 2 filter), if readable.
pub fn seccomp_mode() -> Option<u32> {
    let status = read_text("/proc/self/status", 64 * 1024).ok()?;
    crate::parse::status_field(&status, "Seccomp")?.parse().ok()
}
