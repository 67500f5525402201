//! Step 2: the sandbox's user namespace, plus the net, uts and ipc namespaces it owns.
//!
//! A short-lived holder child unshares them; we write its id maps from outside (as host root,
//! so the maps may name any range), keep fds to its namespaces and let it exit. Creating
//! net/uts/ipc inside the new user namespace makes the sandbox's root their owner (it can bind
//! port 80 and configure `lo`) while the mount, pid and cgroup namespaces made later stay
//! owned by the host user namespace.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};
use cordon_runtime::plan::LaunchPlan;
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use crate::Namespaces;

pub fn create(plan: &LaunchPlan) -> Result<Namespaces> {
    let (ready_read, ready_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    let (done_read, done_write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: single-threaded process.
    let holder = match unsafe { fork() }.context("fork the namespace holder")? {
        ForkResult::Child => {
            drop((ready_read, done_write));
            let code = match hold(plan, ready_write, done_read) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: exit the forked child without touching the parent's state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop((ready_write, done_read));
    let result = configure(plan, holder, ready_read);
    // Closing `done_write` releases the holder; the namespaces live on through our fds.
    drop(done_write);
    let _ = waitpid(holder, None);
    result
}

fn hold(plan: &LaunchPlan, ready: OwnedFd, done: OwnedFd) -> Result<()> {
    unshare(CloneFlags::CLONE_NEWUSER)?;
    let mut owned = CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if !plan.weaken.no_net_namespace {
        owned |= CloneFlags::CLONE_NEWNET;
    }
    unshare(owned)?;
    nix::unistd::write(&ready, b"r")?;
    let mut byte = [0u8; 1];
    let _ = File::from(done).read(&mut byte);
    Ok(())
}

fn configure(plan: &LaunchPlan, holder: Pid, ready: OwnedFd) -> Result<Namespaces> {
    let mut byte = [0u8; 1];
    if File::from(ready)
        .read(&mut byte)
        .context("wait for the namespace holder")?
        != 1
    {
        bail!("the namespace holder could not unshare its namespaces");
    }
    let proc_dir = format!("/proc/{}", holder.as_raw());
    let map = format!("0 {} {}\n", plan.id_base, plan.id_count);
    // setgroups stays allowed: the map writer is host root, and the agent and tools such as
    // apt and su need setgroups to switch users inside the sandbox.
    std::fs::write(format!("{proc_dir}/uid_map"), &map).context("write uid_map")?;
    std::fs::write(format!("{proc_dir}/gid_map"), &map).context("write gid_map")?;
    let open_ns = |name: &str| -> Result<OwnedFd> {
        let file = File::open(format!("{proc_dir}/ns/{name}"))
            .with_context(|| format!("open the {name} namespace"))?;
        Ok(file.into())
    };
    Ok(Namespaces {
        user: open_ns("user")?,
        net: if plan.weaken.no_net_namespace {
            None
        } else {
            Some(open_ns("net")?)
        },
        uts: open_ns("uts")?,
        ipc: open_ns("ipc")?,
    })
}
