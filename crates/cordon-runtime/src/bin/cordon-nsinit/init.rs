//! Steps 3–5 in the sandbox init: namespaces, root filesystem, privilege drop, exec.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result};
use cordon_runtime::plan::{Jail, LaunchPlan, Payload, AGENT_MEMFD};
use nix::fcntl::{fcntl, AtFlags, FcntlArg, FdFlag, OFlag};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::unistd::{dup2_raw, setgroups, setresgid, setresuid, Gid, Uid};
use seccompiler::BpfProgram;

use crate::{mounts, privileges, seccomp, sys, Namespaces};

/// fd the `leak_host_fd` weakening leaves open in the agent.
const LEAKED_FD: i32 = 5;

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Sets the sandbox up and execs the agent; returns only on failure.
pub fn run(
    plan: &LaunchPlan,
    namespaces: &Namespaces,
    log: OwnedFd,
    filters: &[BpfProgram; seccomp::PROGRAMS],
) -> anyhow::Error {
    match setup_and_exec(plan, namespaces, log, filters) {
        Err(error) => error,
        Ok(never) => match never {},
    }
}

fn setup_and_exec(
    plan: &LaunchPlan,
    ns: &Namespaces,
    log: OwnedFd,
    filters: &[BpfProgram; seccomp::PROGRAMS],
) -> Result<Infallible> {
    // Step 3: our own mount namespace (the pid namespace came with the fork, the cgroup
    // namespace follows the last cgroup join); all owned by the host user namespace, so
    // nothing inside can mount.
    unshare(CloneFlags::CLONE_NEWNS).context("unshare the mount namespace")?;
    join_owned_namespaces(plan, ns)?;

    let leaked = if plan.weaken.leak_host_fd {
        Some(
            nix::fcntl::open(
                &plan.sandbox_dir,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .context("open the leaked fd")?,
        )
    } else {
        None
    };

    // Step 4: the root filesystem.
    let idmap = (!plan.weaken.no_user_namespace).then(|| ns.user.as_fd());
    match &plan.payload {
        Payload::Agent => mounts::mount_root(plan, idmap)?,
        Payload::Jail(jail) => mounts::mount_jail_root(plan, jail)?,
    }
    for procs in &plan.late_cgroup_procs {
        std::fs::write(procs, "0").with_context(|| format!("join cgroup {}", procs.display()))?;
    }
    unshare(CloneFlags::CLONE_NEWCGROUP).context("unshare the cgroup namespace")?;
    mounts::pivot_into("root")?;
    let populated = mounts::populate(plan)?;
    redirect_stdio(populated.dev_null, log)?;
    privileges::set_rlimits(plan.nproc_limit)?;

    // Step 5: become the sandbox's root, then drop what Docker drops.
    if !plan.weaken.no_user_namespace {
        setns(&ns.user, CloneFlags::CLONE_NEWUSER).context("join the sandbox user namespace")?;
        setgroups(&[]).context("setgroups")?;
        setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).context("setresgid")?;
        setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).context("setresuid")?;
    }
    match (&plan.payload, plan.weaken.all_capabilities) {
        (_, true) => {}
        (Payload::Agent, false) => privileges::drop_capabilities()?,
        (Payload::Jail(_), false) => privileges::drop_all_capabilities()?,
    }
    privileges::set_no_new_privs()?;
    if let Payload::Jail(jail) = &plan.payload {
        return exec_jailed(plan, jail, leaked, filters);
    }
    prepare_fds(leaked)?;
    let (argv, envp) = exec_args(plan)?;
    if !plan.weaken.no_seccomp {
        seccomp::install(filters)?;
    }
    // SAFETY: AGENT_MEMFD was checked to be an open, sealed memfd by main.
    let memfd = unsafe { BorrowedFd::borrow_raw(AGENT_MEMFD) };
    nix::unistd::execveat(memfd, c"", &argv, &envp, AtFlags::AT_EMPTY_PATH)
        .context("execveat the agent")?;
    unreachable!("execveat returned without an error")
}

/// Execs the jailed host binary with an empty environment; only fds 0-2 and the channel
/// listener (fd 3) survive.
fn exec_jailed(
    plan: &LaunchPlan,
    jail: &Jail,
    leaked: Option<OwnedFd>,
    filters: &[BpfProgram; seccomp::PROGRAMS],
) -> Result<Infallible> {
    drop(leaked);
    sys::cloexec_from(4).context("mark fds close-on-exec")?;
    let binary =
        CString::new(jail.binary.as_os_str().as_encoded_bytes()).context("jailed binary path")?;
    let argv = jail
        .args
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .context("jailed binary arguments")?;
    if !plan.weaken.no_seccomp {
        seccomp::install(filters)?;
    }
    let envp: [CString; 0] = [];
    nix::unistd::execve(&binary, &argv, &envp)
        .with_context(|| format!("execve {}", jail.binary.display()))?;
    unreachable!("execve returned without an error")
}

/// Joins the net, uts and ipc namespaces the sandbox user namespace owns, while still host
/// root: sysfs mounted later then shows the sandbox's network, not the host's.
fn join_owned_namespaces(plan: &LaunchPlan, ns: &Namespaces) -> Result<()> {
    if let Some(net) = &ns.net {
        setns(net, CloneFlags::CLONE_NEWNET).context("join the network namespace")?;
        sys::loopback_up().context("bring lo up")?;
    }
    setns(&ns.uts, CloneFlags::CLONE_NEWUTS).context("join the uts namespace")?;
    nix::unistd::sethostname(&plan.hostname).context("sethostname")?;
    setns(&ns.ipc, CloneFlags::CLONE_NEWIPC).context("join the ipc namespace")?;
    Ok(())
}

/// stdin from the sandbox's /dev/null; stdout and stderr into the log pipe.
fn redirect_stdio(null: OwnedFd, log: OwnedFd) -> Result<()> {
    // SAFETY: fds 0-2 are ours; dup2 replaces them atomically.
    unsafe {
        dup2_raw(&null, 0).context("stdin")?.into_raw_fd_leak();
        dup2_raw(&log, 1).context("stdout")?.into_raw_fd_leak();
        dup2_raw(&log, 2).context("stderr")?.into_raw_fd_leak();
    }
    Ok(())
}

/// Only the channel listener (fd 3), the memfd being exec'd (closed by the exec) and, when
/// weakened, the leaked host fd survive the exec; every other fd is close-on-exec.
fn prepare_fds(leaked: Option<OwnedFd>) -> Result<()> {
    // SAFETY: fd 4 is the memfd main checked; only its flags change.
    let memfd = unsafe { BorrowedFd::borrow_raw(AGENT_MEMFD) };
    fcntl(memfd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).context("memfd cloexec")?;
    let first_closed = match leaked {
        Some(fd) if fd.as_raw_fd() == LEAKED_FD => {
            fd.into_raw_fd_leak();
            LEAKED_FD as u32 + 1
        }
        Some(fd) => {
            // SAFETY: whatever held fd 5 (a namespace fd already joined) is not needed any more.
            unsafe {
                dup2_raw(&fd, LEAKED_FD)
                    .context("place the leaked fd")?
                    .into_raw_fd_leak()
            };
            LEAKED_FD as u32 + 1
        }
        None => LEAKED_FD as u32,
    };
    sys::cloexec_from(first_closed).context("mark fds close-on-exec")
}

fn exec_args(plan: &LaunchPlan) -> Result<(Vec<CString>, Vec<CString>)> {
    let argv = plan
        .agent_args
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .context("agent arguments")?;
    let envp = [
        PATH.to_string(),
        "HOME=/root".to_string(),
        format!("HOSTNAME={}", plan.hostname),
    ]
    .into_iter()
    .map(CString::new)
    .collect::<Result<Vec<_>, _>>()
    .context("agent environment")?;
    Ok((argv, envp))
}

/// `dup2_raw` hands back an fd that must stay open: we only replaced a standard slot.
trait LeakFd {
    fn into_raw_fd_leak(self);
}

impl<T: std::os::fd::IntoRawFd> LeakFd for T {
    fn into_raw_fd_leak(self) {
        let _ = self.into_raw_fd();
    }
}
