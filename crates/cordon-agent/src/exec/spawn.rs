//! Starting a command: `shell -c command` in its own session, as the run user, in the work
//! dir (or the run user's home), with a clean environment and no inherited descriptors.

mod child;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cordon_api::RunConfig;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::unistd::{Gid, Uid};
use tokio::sync::oneshot;

use crate::identity::{self, Identity};
use crate::reaper::{ExitCode, Reaper};
use child::{ChildSetup, Credentials, Program, StartDir};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The clients' default shell; images without bash (alpine, distroless) get `/bin/sh`.
const DEFAULT_SHELL: &str = "/bin/bash";
const FALLBACK_SHELL: &str = "/bin/sh";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("invalid run_config: {0}")]
    InvalidRunConfig(#[from] cordon_api::RunConfigError),
    #[error("cannot resolve run user: {0}")]
    User(#[from] identity::IdentityError),
    #[error("work_dir {0:?} does not exist or is not a directory")]
    MissingWorkDir(String),
    #[error("invalid {0}: contains a NUL byte")]
    Nul(&'static str),
    #[error("cannot start {shell:?}: {source}")]
    Start { shell: String, source: io::Error },
}

/// Everything needed to start one command, resolved before forking.
pub struct SpawnPlan {
    pub shell: String,
    pub command: String,
    pub run_config: RunConfig,
    pub pty: bool,
    pub close_stdin: bool,
}

/// A started command: its pid (also its process group), its pipes and its exit status.
pub struct Spawned {
    pub pid: i32,
    /// Where input goes (a pipe, or the PTY master). `None` once stdin was closed at spawn.
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    /// `None` for a PTY: stderr is merged into stdout.
    pub stderr: Option<OwnedFd>,
    pub exit: oneshot::Receiver<ExitCode>,
}

impl SpawnPlan {
    pub fn spawn(self, reaper: &Reaper) -> Result<Spawned, SpawnError> {
        self.run_config.validate()?;
        let identity = run_identity(self.run_config.user.as_deref())?;
        let start_dir = start_dir(self.run_config.work_dir.as_deref(), &identity.home)?;
        let env = command_env(&identity, &self.run_config, self.pty);
        let shell = pick_shell(&self.shell);
        let program = shell_program(&shell, &self.command, env)?;
        let credentials = credentials_for(&identity);
        let start_error = |source| SpawnError::Start {
            shell: shell.clone(),
            source,
        };
        let setup = |stdio, controlling_tty| ChildSetup {
            stdio,
            controlling_tty,
            credentials,
            start_dir,
        };
        if self.pty {
            spawn_on_pty(&program, setup, reaper).map_err(start_error)
        } else {
            spawn_on_pipes(&program, setup, self.close_stdin, reaper).map_err(start_error)
        }
    }
}

/// Where a command starts: the configured `work_dir`, which must exist; without one, the run
/// user's home when it is a directory (relative file API paths resolve against it too), else
/// `/`. A home the user cannot enter also falls back to `/`.
fn start_dir(work_dir: Option<&str>, home: &str) -> Result<StartDir, SpawnError> {
    let c_path = |path: &str, what| CString::new(path).map_err(|_| SpawnError::Nul(what));
    match work_dir {
        Some(dir) if !Path::new(dir).is_dir() => Err(SpawnError::MissingWorkDir(dir.to_string())),
        Some(dir) => Ok(StartDir::Required(c_path(dir, "work_dir")?)),
        None if home.starts_with('/') && Path::new(home).is_dir() => {
            Ok(StartDir::OrRoot(c_path(home, "home")?))
        }
        None => Ok(StartDir::Required(c"/".to_owned())),
    }
}

/// `shell -c command` with `env` (later entries override earlier ones with the same name).
fn shell_program(
    shell: &str,
    command: &str,
    env: Vec<(String, String)>,
) -> Result<Program, SpawnError> {
    let c_string = |text: String, what| CString::new(text).map_err(|_| SpawnError::Nul(what));
    let env: BTreeMap<String, String> = env.into_iter().collect();
    let path = resolve_program(shell, env.get("PATH").map(String::as_str))?;
    let args = vec![
        c_string(shell.to_string(), "shell")?,
        c"-c".to_owned(),
        c_string(command.to_string(), "command")?,
    ];
    let env = env
        .into_iter()
        .map(|(name, value)| c_string(format!("{name}={value}"), "env_vars"))
        .collect::<Result<_, _>>()?;
    Ok(Program::new(c_string(path, "shell")?, args, env))
}

/// A shell named without a slash is looked up in the command's own `PATH`, like `execvp`.
fn resolve_program(shell: &str, path: Option<&str>) -> Result<String, SpawnError> {
    if shell.contains('/') {
        return Ok(shell.to_string());
    }
    let executable = |candidate: &Path| {
        candidate
            .metadata()
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    path.unwrap_or(DEFAULT_PATH)
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(shell))
        .find(|candidate| executable(candidate))
        .map(|found| found.to_string_lossy().into_owned())
        .ok_or_else(|| SpawnError::Start {
            shell: shell.to_string(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        })
}

fn pick_shell(requested: &str) -> String {
    if requested == DEFAULT_SHELL && !Path::new(DEFAULT_SHELL).exists() {
        return FALLBACK_SHELL.to_string();
    }
    requested.to_string()
}

/// The run user. With no user configured anywhere the command runs as the agent itself: root
/// in a sandbox, the developer in tests (who cannot switch users anyway).
fn run_identity(user: Option<&str>) -> Result<Identity, identity::IdentityError> {
    match user {
        Some(user) => identity::resolve(Some(user)),
        None if Uid::current().is_root() => identity::resolve(None),
        None => Ok(Identity {
            uid: Uid::current().as_raw(),
            gid: Gid::current().as_raw(),
            groups: Vec::new(),
            home: "/".to_string(),
            name: None,
        }),
    }
}

/// The clean environment: defaults, then the merged run_config env on top.
fn command_env(identity: &Identity, run_config: &RunConfig, pty: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOME".to_string(), identity.home.clone()),
    ];
    if let Some(name) = &identity.name {
        env.push(("USER".to_string(), name.clone()));
        env.push(("LOGNAME".to_string(), name.clone()));
    }
    if let Ok(uts) = nix::sys::utsname::uname() {
        env.push((
            "HOSTNAME".to_string(),
            uts.nodename().to_string_lossy().into_owned(),
        ));
    }
    if pty {
        env.push(("TERM".to_string(), "xterm-256color".to_string()));
    }
    env.extend(run_config.env_vars.clone().unwrap_or_default());
    env
}

/// The credentials the child switches to; `None` when it already runs as that user.
fn credentials_for(identity: &Identity) -> Option<Credentials> {
    let (uid, gid) = (Uid::from_raw(identity.uid), Gid::from_raw(identity.gid));
    if !Uid::current().is_root() && uid == Uid::current() && gid == Gid::current() {
        return None;
    }
    Some(Credentials {
        uid: identity.uid,
        gid: identity.gid,
        groups: identity.groups.clone(),
    })
}

/// A pipe whose ends are close-on-exec and not fds 0-2 (the child's stdio slots).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((above_stdio(read)?, above_stdio(write)?))
}

/// `fd`, or a close-on-exec copy of it at 3 or above when it is one of 0-2 (only when the
/// agent itself runs with stdio closed).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let raw = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

fn spawn_on_pipes(
    program: &Program,
    setup: impl FnOnce([i32; 3], bool) -> ChildSetup,
    close_stdin: bool,
    reaper: &Reaper,
) -> io::Result<Spawned> {
    let (stdin_read, stdin_write) = pipe()?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let setup = setup(
        [
            stdin_read.as_raw_fd(),
            stdout_write.as_raw_fd(),
            stderr_write.as_raw_fd(),
        ],
        false,
    );
    let (pid, exit) = reaper.spawn(|| child::spawn(program, &setup))?;
    // Our copies of the child's ends go, so its exit is the end of its output.
    drop((stdin_read, stdout_write, stderr_write));
    Ok(Spawned {
        pid,
        // Dropping the write end at once is how stdin gets closed at spawn.
        stdin: Some(stdin_write).filter(|_| !close_stdin),
        stdout: stdout_read,
        stderr: Some(stderr_read),
        exit,
    })
}

fn spawn_on_pty(
    program: &Program,
    setup: impl FnOnce([i32; 3], bool) -> ChildSetup,
    reaper: &Reaper,
) -> io::Result<Spawned> {
    let pty = nix::pty::openpty(None, None)?;
    fcntl(&pty.master, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    fcntl(&pty.slave, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    let master = above_stdio(pty.master)?;
    let slave = above_stdio(pty.slave)?;
    let setup = setup([slave.as_raw_fd(); 3], true);
    let (pid, exit) = reaper.spawn(|| child::spawn(program, &setup))?;
    // Our copy of the slave must go, or reading the master never sees the hangup.
    drop(slave);
    let input = master.try_clone()?;
    Ok(Spawned {
        pid,
        stdin: Some(input),
        stdout: master,
        stderr: None,
        exit,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;

    use super::*;

    #[test]
    fn start_dir_is_work_dir_else_home_else_root() {
        let home = tempfile::tempdir().unwrap();
        let home = home.path().to_str().unwrap();
        let dir = |start: StartDir| match start {
            StartDir::Required(path) => ("required", path.into_string().unwrap()),
            StartDir::OrRoot(path) => ("or root", path.into_string().unwrap()),
        };
        assert_eq!(
            dir(start_dir(Some("/tmp"), home).unwrap()),
            ("required", "/tmp".to_string())
        );
        assert!(matches!(
            start_dir(Some("/no/such/dir"), home),
            Err(SpawnError::MissingWorkDir(_))
        ));
        assert_eq!(
            dir(start_dir(None, home).unwrap()),
            ("or root", home.to_string())
        );
        assert_eq!(
            dir(start_dir(None, "/nonexistent").unwrap()),
            ("required", "/".to_string())
        );
    }

    #[test]
    fn shell_without_a_slash_is_found_on_the_commands_path() {
        assert_eq!(resolve_program("/bin/sh", None).unwrap(), "/bin/sh");
        let found = resolve_program("sh", Some("/nonexistent:/bin")).unwrap();
        assert_eq!(found, "/bin/sh");
        assert!(resolve_program("no-such-shell", Some("/bin")).is_err());
    }

    /// Runs `command` in `start`, returning its stdout and exit status.
    fn run(shell: &str, command: &str, start: StartDir) -> io::Result<(String, WaitStatus)> {
        let env = vec![("PATH".to_string(), DEFAULT_PATH.to_string())];
        let program = shell_program(shell, command, env).map_err(io::Error::other)?;
        let (stdin_read, _stdin_write) = pipe()?;
        let (stdout_read, stdout_write) = pipe()?;
        let (_stderr_read, stderr_write) = pipe()?;
        let setup = ChildSetup {
            stdio: [
                stdin_read.as_raw_fd(),
                stdout_write.as_raw_fd(),
                stderr_write.as_raw_fd(),
            ],
            controlling_tty: false,
            credentials: None,
            start_dir: start,
        };
        let pid = child::spawn(&program, &setup)?;
        drop((stdout_write, stderr_write));
        let mut output = String::new();
        std::fs::File::from(stdout_read).read_to_string(&mut output)?;
        let status = waitpid(Pid::from_raw(pid), None)?;
        Ok((output, status))
    }

    #[test]
    fn child_runs_in_its_own_session_and_dir_with_only_stdio() {
        let dir = tempfile::tempdir().unwrap();
        let path = std::fs::canonicalize(dir.path()).unwrap();
        let start = StartDir::Required(CString::new(path.to_str().unwrap()).unwrap());
        // An fd of ours without close-on-exec must still not reach the command.
        let leaky = std::fs::File::open("/dev/null").unwrap();
        let leaky = nix::unistd::dup(&leaky).unwrap();
        let command = format!(
            "cut -d' ' -f6 /proc/$$/stat; echo $$; pwd -P; \
             if [ -e /proc/$$/fd/{fd} ]; then echo leaked; else echo closed; fi",
            fd = leaky.as_raw_fd()
        );
        let (output, status) = run("/bin/sh", &command, start).unwrap();
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 4, "{output}");
        assert_eq!(lines[0], lines[1], "session id is the shell's pid");
        assert_eq!(lines[2], path.to_str().unwrap());
        assert_eq!(lines[3], "closed");
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    }

    #[test]
    fn unenterable_home_falls_back_to_root() {
        let start = StartDir::OrRoot(c"/no/such/home".to_owned());
        let (output, _) = run("/bin/sh", "pwd", start).unwrap();
        assert_eq!(output.trim(), "/");
    }

    #[test]
    fn failures_before_exec_are_reported() {
        let missing = run("/no/such/shell", "true", StartDir::OrRoot(c"/".to_owned()));
        let error = missing.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
        let no_dir = run(
            "/bin/sh",
            "true",
            StartDir::Required(c"/no/such".to_owned()),
        );
        assert!(no_dir.unwrap_err().to_string().contains("work dir"));
    }
}
