//! Running the build's helper programs (`debootstrap`, `chroot`): output streamed line by line
//! to the caller's progress, each in fresh mount and pid namespaces so that nothing they mount
//! and no process they start outlives them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;

use crate::error::{ImageError, IoContext};

/// Output lines kept for the error message of a failed command.
const TAIL_LINES: usize = 30;

/// The PATH the build's programs are found in and run with (debootstrap lives in /usr/sbin,
/// often missing from a user's PATH).
pub(crate) const BUILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `name` in [`BUILD_PATH`].
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    BUILD_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// A command running `program` under util-linux `unshare` in a private mount namespace and a
/// new pid namespace whose init it is:
/// - the `/proc` and `/sys` that debootstrap mounts in its target (and anything a maintainer
///   script mounts) exist only in that namespace and vanish with it, whichever way the build
///   ends, so the host never sees them;
/// - when `program` exits or is killed, the kernel kills every process left in its pid
///   namespace (debootstrap's forked subshells and dpkg included), and `unshare` kills
///   `program` when it dies itself; so nothing keeps writing into a tree we are deleting.
pub(crate) fn isolated(program: &Path) -> Result<Command, ImageError> {
    let unshare = find_program("unshare").ok_or(ImageError::MissingTool("util-linux"))?;
    let mut command = Command::new(unshare);
    command
        .args([
            "--mount",
            "--propagation=private",
            "--pid",
            "--fork",
            "--kill-child=SIGKILL",
            "--",
        ])
        .arg(program);
    Ok(command)
}

/// Runs `command` to completion, passing each output line (stdout and stderr, interleaved as
/// written) to `progress`. An error carries the last lines when it exits non-zero.
pub(crate) fn run_streamed(
    mut command: Command,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let description = describe(&command);
    let (reader, writer) = nix::unistd::pipe().context(|| "pipe".to_string())?;
    let writer_for_stderr = writer
        .try_clone()
        .context(|| "dup the output pipe".to_string())?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer_for_stderr));
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe { command.pre_exec(die_with_parent) };
    let mut child = command
        .spawn()
        .context(|| format!("start `{description}`"))?;
    // Our copies of the pipe's write end must go, or reading would never see EOF.
    drop(command);

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in BufReader::new(File::from(reader)).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        progress(line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
    }
    let status = child
        .wait()
        .context(|| format!("wait for `{description}`"))?;
    if status.success() {
        return Ok(());
    }
    Err(ImageError::CommandFailed {
        command: description,
        status: status.to_string(),
        tail: Vec::from(tail).join("\n"),
    })
}

/// In the child, before exec: die with the thread that started it, so a killed `cordon
/// prepare` takes the build (through [`isolated`]'s namespaces) down with it.
fn die_with_parent() -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    Ok(())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| arg.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
