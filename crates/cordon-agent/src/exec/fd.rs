//! Non-blocking reads and writes on a command's pipes and PTY master.

use std::io;
use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A pipe end or PTY master registered with the runtime.
pub struct CommandFd {
    fd: AsyncFd<OwnedFd>,
}

impl CommandFd {
    pub fn new(fd: OwnedFd, interest: Interest) -> io::Result<Self> {
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the `OwnedFd` is open, and the `AsyncFd` owns it until it deregisters and
        // closes it, so the raw fd stays valid and the same for the registration's lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(fd, interest) }?;
        Ok(CommandFd { fd })
    }

    /// Asks for a larger pipe buffer so a fast writer blocks less often; best effort (the
    /// kernel caps it for unprivileged users, and a PTY is not a pipe).
    pub fn enlarge_pipe(&self, bytes: i32) {
        let _ = fcntl(self.fd.get_ref(), FcntlArg::F_SETPIPE_SZ(bytes));
    }

    /// Reads some bytes; `Ok(0)` at end of stream. A PTY master reports the hangup of the last
    /// slave as EIO, which is its end of stream. Cancel-safe.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| nix::unistd::read(fd, buf).map_err(io::Error::from)) {
                Ok(Err(error)) if error.raw_os_error() == Some(Errno::EIO as i32) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|fd| nix::unistd::write(fd, data).map_err(io::Error::from)) {
                Ok(Ok(written)) => data = &data[written..],
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}
