//! The agent's log: a host-side process copies the agent's stdout/stderr into a bounded
//! `agent.log`. The sandbox only ever holds the pipe's write end, never a host file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::unistd::{fork, setsid, ForkResult};

/// Forks the logger. It runs until every writer (the whole sandbox) is gone.
pub fn spawn(read_end: OwnedFd, path: &Path, max_bytes: u64) -> Result<()> {
    // SAFETY: single-threaded process.
    match unsafe { fork() }.context("fork the log copier")? {
        ForkResult::Parent { .. } => Ok(()),
        ForkResult::Child => {
            let code = match copy(read_end, path, max_bytes) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: exit the forked child without unwinding into the parent's state.
            unsafe { libc::_exit(code) }
        }
    }
}

fn copy(read_end: OwnedFd, path: &Path, max_bytes: u64) -> Result<()> {
    let source = detach_from_runtime(read_end)?;
    copy_bounded(source, path, max_bytes)
}

/// Leaves the runtime's session and pipes (or it would wait for our EOF) and closes every fd
/// but the log pipe's read end.
fn detach_from_runtime(read_end: OwnedFd) -> Result<File> {
    let _ = setsid();
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: replaces a standard fd of this forked child with /dev/null.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    drop(null);
    crate::sys::close_from_except(3, read_end.as_raw_fd() as u32)?;
    Ok(File::from(read_end))
}

/// Appends everything from `source` to `path`; when the file would pass `max_bytes` it
/// becomes `<path>.1` (replacing the older one) and a fresh file starts, so the log never
/// takes more than twice `max_bytes` on the host.
fn copy_bounded(mut source: impl Read, path: &Path, max_bytes: u64) -> Result<()> {
    let rotated = PathBuf::from(format!("{}.1", path.display()));
    let mut log = open_log(path)?;
    let mut written = log.metadata()?.len();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let mut chunk = &buffer[..n];
        while !chunk.is_empty() {
            if written >= max_bytes {
                std::fs::rename(path, &rotated)?;
                log = open_log(path)?;
                written = 0;
            }
            let take = chunk.len().min((max_bytes - written).max(1) as usize);
            log.write_all(&chunk[..take])?;
            written += take as u64;
            chunk = &chunk[take..];
        }
    }
}

fn open_log(path: &Path) -> Result<File> {
    Ok(OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let input: Vec<u8> = (0..10_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        copy_bounded(&input[..], &path, 4096).unwrap();
        let current = std::fs::read(&path).unwrap();
        let older = std::fs::read(dir.path().join("agent.log.1")).unwrap();
        assert!(
            current.len() <= 4096 && older.len() <= 4096,
            "{} {}",
            current.len(),
            older.len()
        );
        assert!(input.ends_with(&current), "the newest output is kept");
    }
}
