//! `cordon-nsinit`: launches one namespace sandbox (see ARCHITECTURE.md, "Launching a
//! namespace sandbox").
//!
//! Runs as host root, single-threaded, spawned by the runtime with the launch plan as JSON on
//! stdin, the agent channel's listening socket on fd 3 and a sealed memfd of the agent on fd 4.
//! Prints `{"pid":…,"start_time":…}` once the agent has been exec'd as the sandbox's init, then
//! exits; the init is reparented and outlives both nsinit and the runtime. Any failure goes to
//! stderr and the exit status is 1.

mod init;
mod logger;
mod mounts;
mod privileges;
mod seccomp;
mod sys;
mod targets;
mod userns;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use anyhow::{bail, ensure, Context, Result};
use cordon_runtime::plan::{proc_stat, LaunchPlan, LaunchResult, Payload, AGENT_MEMFD, LISTEN_FD};
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe2, ForkResult};

fn main() {
    if let Err(error) = run() {
        eprintln!("cordon-nsinit: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_end(&mut input)
        .context("read the launch plan")?;
    let plan: LaunchPlan = serde_json::from_slice(&input).context("parse the launch plan")?;
    check_inherited_fds(&plan)?;
    // Compile the filters before anything forks: no allocation is needed later.
    let filters = seccomp::programs()?;

    let (log_read, log_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("log pipe")?;
    logger::spawn(log_read, &plan.log_path, plan.log_max_bytes)?;

    join_cgroups(&plan)?;
    let namespaces = userns::create(&plan)?;

    if !plan.weaken.no_pid_namespace {
        // Our next child is PID 1 of a new pid namespace owned by the host user namespace.
        unshare(CloneFlags::CLONE_NEWPID).context("unshare the pid namespace")?;
    }
    let (error_read, error_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("error pipe")?;
    // SAFETY: this process is single-threaded, so the child may do anything after fork.
    match unsafe { fork() }.context("fork the sandbox init")? {
        ForkResult::Child => {
            drop(error_read);
            // Far above the fds the init rearranges (0-5), so none of that can clobber it.
            let error_write = move_high(error_write);
            let error = init::run(&plan, &namespaces, log_write, &filters);
            let message = format!("{error:#}");
            let _ = nix::unistd::write(&error_write, message.as_bytes());
            // SAFETY: leave at once without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(1) }
        }
        ForkResult::Parent { child } => {
            drop((error_write, log_write, namespaces));
            // The pipe is CLOEXEC in the init: EOF without a message means exec succeeded.
            let mut message = String::new();
            std::fs::File::from(error_read)
                .take(64 * 1024)
                .read_to_string(&mut message)
                .context("read the init's status")?;
            if !message.is_empty() {
                let _ = waitpid(child, None);
                bail!("{message}");
            }
            let pid = child.as_raw() as u32;
            let (_, start_time) =
                proc_stat(pid).context("the sandbox init exited right after exec")?;
            let answer = serde_json::to_string(&LaunchResult { pid, start_time })?;
            std::io::stdout()
                .write_all(answer.as_bytes())
                .context("write the answer")?;
            Ok(())
        }
    }
}

/// Moves `fd` to a CLOEXEC fd ≥ 100 (or keeps it where it is if that fails).
fn move_high(fd: OwnedFd) -> OwnedFd {
    use std::os::fd::{AsFd, FromRawFd};
    match nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)) {
        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
        Ok(high) => unsafe { OwnedFd::from_raw_fd(high) },
        Err(_) => fd,
    }
}

/// The runtime must have passed a socket on fd 3 and, for the agent, a sealed memfd on fd 4.
fn check_inherited_fds(plan: &LaunchPlan) -> Result<()> {
    use nix::sys::stat::{fstat, SFlag};
    // SAFETY: only inspected, never closed through these borrows.
    let (listen, memfd) = unsafe {
        (
            std::os::fd::BorrowedFd::borrow_raw(LISTEN_FD),
            std::os::fd::BorrowedFd::borrow_raw(AGENT_MEMFD),
        )
    };
    let listen_kind =
        fstat(listen).context("fd 3 (channel listener)")?.st_mode & SFlag::S_IFMT.bits();
    ensure!(
        listen_kind == SFlag::S_IFSOCK.bits(),
        "fd 3 is not a socket"
    );
    if matches!(plan.payload, Payload::Jail(_)) {
        return Ok(());
    }
    let seals = nix::fcntl::fcntl(memfd, nix::fcntl::FcntlArg::F_GET_SEALS)
        .context("fd 4 (agent memfd)")?;
    ensure!(
        seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0,
        "the agent memfd is not sealed against writes"
    );
    Ok(())
}

/// Step 1: join the sandbox's cgroups, so everything forked from here is accounted there.
fn join_cgroups(plan: &LaunchPlan) -> Result<()> {
    for procs in &plan.cgroup_procs {
        std::fs::write(procs, "0").with_context(|| format!("join cgroup {}", procs.display()))?;
    }
    Ok(())
}

/// fds the init keeps; see `init::run`.
pub struct Namespaces {
    pub user: OwnedFd,
    pub net: Option<OwnedFd>,
    pub uts: OwnedFd,
    pub ipc: OwnedFd,
}
