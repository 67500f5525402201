//! Starting a command: `shell -c command` in its own session, as the run user, in the work
//! dir, with a clean environment and no inherited descriptors.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use cordon_api::RunConfig;
use nix::unistd::{Gid, Uid};
use tokio::sync::oneshot;

use crate::identity::{self, Identity};
use crate::reaper::{ExitCode, Reaper};

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
        let work_dir = match &self.run_config.work_dir {
            Some(dir) if !Path::new(dir).is_dir() => {
                return Err(SpawnError::MissingWorkDir(dir.clone()))
            }
            Some(dir) => Some(CString::new(dir.as_str()).map_err(|_| SpawnError::Nul("work_dir"))?),
            None => None,
        };
        if self.command.contains('\0') {
            return Err(SpawnError::Nul("command"));
        }
        let shell = pick_shell(&self.shell);
        let mut command = Command::new(&shell);
        command
            .arg("-c")
            .arg(&self.command)
            .env_clear()
            .envs(command_env(&identity, &self.run_config, self.pty));
        let switch = UserSwitch::for_identity(&identity);
        let start_error = |source| SpawnError::Start {
            shell: shell.clone(),
            source,
        };
        if self.pty {
            spawn_on_pty(command, switch, work_dir, reaper).map_err(start_error)
        } else {
            spawn_on_pipes(command, switch, work_dir, self.close_stdin, reaper).map_err(start_error)
        }
    }
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

/// The credentials change done in the child; `None` when it already runs as that user.
#[derive(Clone)]
struct UserSwitch(Option<(Vec<Gid>, Gid, Uid)>);

impl UserSwitch {
    fn for_identity(identity: &Identity) -> Self {
        let (uid, gid) = (Uid::from_raw(identity.uid), Gid::from_raw(identity.gid));
        if !Uid::current().is_root() && uid == Uid::current() && gid == Gid::current() {
            return UserSwitch(None);
        }
        let groups = identity.groups.iter().copied().map(Gid::from_raw).collect();
        UserSwitch(Some((groups, gid, uid)))
    }

    /// Runs in the forked child: async-signal-safe calls only, nothing allocated.
    fn apply(&self) -> io::Result<()> {
        if let Some((groups, gid, uid)) = &self.0 {
            nix::unistd::setgroups(groups)?;
            nix::unistd::setgid(*gid)?;
            nix::unistd::setuid(*uid)?;
        }
        Ok(())
    }
}

/// The child-side setup shared by pipes and PTY, after std has wired fds 0-2.
fn child_setup(switch: &UserSwitch, work_dir: Option<&CString>, pty: bool) -> io::Result<()> {
    nix::unistd::setsid()?;
    if pty {
        // SAFETY: fd 0 is the PTY slave; TIOCSCTTY takes an int argument and touches no memory.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    switch.apply()?;
    if let Some(dir) = work_dir {
        // After the user switch, so the user's own permissions decide.
        nix::unistd::chdir(dir.as_c_str())?;
    }
    mark_inherited_fds_cloexec();
    Ok(())
}

/// Nothing but fds 0-2 may survive exec. CLOEXEC rather than close keeps std's own exec-error
/// pipe working.
fn mark_inherited_fds_cloexec() {
    // SAFETY: close_range only changes fd flags; no memory is passed.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if done != 0 {
        // Kernels before 5.11: flag them one by one.
        for fd in 3..65536 {
            // SAFETY: F_SETFD on a closed fd fails harmlessly with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

fn spawn_on_pipes(
    mut command: Command,
    switch: UserSwitch,
    work_dir: Option<CString>,
    close_stdin: bool,
    reaper: &Reaper,
) -> io::Result<Spawned> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only makes async-signal-safe syscalls on data prepared before fork.
    unsafe { command.pre_exec(move || child_setup(&switch, work_dir.as_ref(), false)) };
    let (mut child, exit) = reaper.spawn(&mut command)?;
    let stdin = child
        .stdin
        .take()
        .map(OwnedFd::from)
        .filter(|_| !close_stdin);
    let stdout = OwnedFd::from(child.stdout.take().ok_or_else(missing_pipe)?);
    let stderr = OwnedFd::from(child.stderr.take().ok_or_else(missing_pipe)?);
    Ok(Spawned {
        pid: child.id() as i32,
        stdin,
        stdout,
        stderr: Some(stderr),
        exit,
    })
}

fn spawn_on_pty(
    mut command: Command,
    switch: UserSwitch,
    work_dir: Option<CString>,
    reaper: &Reaper,
) -> io::Result<Spawned> {
    let pty = nix::pty::openpty(None, None)?;
    set_cloexec(&pty.master)?;
    command
        .stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave.try_clone()?));
    // SAFETY: as for pipes; TIOCSCTTY is a plain ioctl.
    unsafe { command.pre_exec(move || child_setup(&switch, work_dir.as_ref(), true)) };
    let (child, exit) = reaper.spawn(&mut command)?;
    // Our copies of the slave must go, or reading the master never sees the hangup.
    drop(command);
    drop(pty.slave);
    let input = pty.master.try_clone()?;
    Ok(Spawned {
        pid: child.id() as i32,
        stdin: Some(input),
        stdout: pty.master,
        stderr: None,
        exit,
    })
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

fn missing_pipe() -> io::Error {
    io::Error::other("child pipe missing")
}
