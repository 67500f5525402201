//! Row 16: ptrace / process_vm of host or other-sandbox processes. With a shared pid
//! namespace `/proc` lists the host (kernel threads, the supervisor), and the ptrace family
//! reaches whatever it can name. Checks:
//!
//! - `/proc` shows no kernel thread (they live only in the initial pid namespace), no second
//!   pid whose parent is 0, and not the harness's own process (`--host-pid PID:COMM`);
//! - `ptrace(PTRACE_ATTACH)` is refused even on a child of our own (no pid-1 attach: that
//!   would SIGSTOP the agent, and the permission check is the same one process_vm_readv
//!   makes below);
//! - `process_vm_readv` on pid 1 is refused. We read from an unmapped address, so a call
//!   that gets past the permission check fails with EFAULT and reads nothing.

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::parse::proc_stat;
use crate::sys;
use crate::{Findings, Options};

pub fn run(options: &Options) -> Findings {
    let mut findings = Findings::default();
    check_proc_listing(&mut findings);
    if let Some((pid, comm)) = &options.host_pid {
        check_host_marker(*pid, comm, &mut findings);
    }
    check_ptrace_attach(&mut findings);
    check_process_vm_readv_pid1(&mut findings);
    findings
}

/// Signs of the host's pid namespace in `/proc`.
fn check_proc_listing(findings: &mut Findings) {
    let pids = sys::visible_pids();
    let mut kernel_threads = Vec::new();
    let mut orphans = Vec::new();
    for pid in &pids {
        let Ok(text) = sys::read_text(&format!("/proc/{pid}/stat"), 4096) else {
            continue;
        };
        let Some(stat) = proc_stat(&text) else {
            continue;
        };
        if stat.is_kernel_thread() {
            kernel_threads.push(format!("{} ({})", stat.pid, stat.comm));
        } else if stat.ppid == 0 && stat.pid != 1 {
            orphans.push(format!("{} ({})", stat.pid, stat.comm));
        }
    }
    if pids.is_empty() {
        findings.inconclusive("/proc lists no pids");
        return;
    }
    if !kernel_threads.is_empty() {
        findings.exposed(format!(
            "/proc shows {} kernel threads, i.e. the host pid namespace: {}",
            kernel_threads.len(),
            sample(&kernel_threads)
        ));
    }
    if !orphans.is_empty() {
        findings.exposed(format!(
            "/proc shows processes other than pid 1 with parent 0 (another init): {}",
            sample(&orphans)
        ));
    }
    if kernel_threads.is_empty() && orphans.is_empty() {
        findings.confined(format!(
            "/proc lists {} pids, no kernel threads, one init",
            pids.len()
        ));
    }
}

fn sample(items: &[String]) -> String {
    let mut shown = items.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > 5 {
        shown.push_str(", …");
    }
    shown
}

/// The harness's own host pid and comm: visible means we share its pid namespace.
fn check_host_marker(pid: i32, comm: &str, findings: &mut Findings) {
    match sys::read_text(&format!("/proc/{pid}/comm"), 256) {
        Ok(seen) if seen.trim_end() == comm => {
            findings.exposed(format!("host process {pid} ({comm}) is visible in /proc"))
        }
        Ok(seen) => findings.confined(format!(
            "pid {pid} here is {:?}, not the host's {comm:?}",
            seen.trim_end()
        )),
        Err(errno) => findings.confined(format!(
            "host process {pid} not visible: {}",
            sys::name(errno)
        )),
    }
}

/// PTRACE_ATTACH on a sleeping child of ours. Allowed by every kernel default (same uid, our
/// descendant, Yama scope 1), so only the seccomp filter can refuse it.
fn check_ptrace_attach(findings: &mut Findings) {
    let sleeper = match sys::spawn_sleeper() {
        Ok(pid) => pid,
        Err(errno) => {
            findings.inconclusive(format!("fork failed: {}", sys::name(errno)));
            return;
        }
    };
    // SAFETY: plain syscall on our own child.
    let attached =
        sys::check(unsafe { libc::ptrace(libc::PTRACE_ATTACH, sleeper.as_raw(), 0usize, 0usize) });
    let _ = kill(sleeper, Signal::SIGKILL);
    reap(sleeper);
    match attached {
        Ok(_) => findings.exposed(
            "ptrace(PTRACE_ATTACH) on a child succeeded: the ptrace family is not filtered",
        ),
        Err(errno) => findings.confined(format!(
            "ptrace(PTRACE_ATTACH) on a child refused: {}",
            sys::name(errno)
        )),
    }
}

fn reap(pid: Pid) {
    loop {
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WALL)) {
            Err(Errno::EINTR) => continue,
            Ok(
                nix::sys::wait::WaitStatus::Exited(..) | nix::sys::wait::WaitStatus::Signaled(..),
            )
            | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

/// process_vm_readv(1) passes `PTRACE_MODE_ATTACH_REALCREDS` before touching memory.
fn check_process_vm_readv_pid1(findings: &mut Findings) {
    let mut buffer = [0u8; 8];
    let local = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // Page 1 is never mapped (mmap_min_addr), so nothing is read even if allowed.
    let remote = libc::iovec {
        iov_base: 0x1000 as *mut libc::c_void,
        iov_len: buffer.len(),
    };
    // SAFETY: local iovec points to our buffer; remote is only read by the kernel.
    let result = sys::check(unsafe {
        libc::syscall(
            libc::SYS_process_vm_readv,
            1,
            &local as *const libc::iovec,
            1,
            &remote as *const libc::iovec,
            1,
            0,
        )
    });
    match result {
        Ok(_) | Err(Errno::EFAULT) => findings.exposed(format!(
            "process_vm_readv on pid 1 passed the ptrace access check ({})",
            result.map_or_else(sys::name, |n| format!("read {n} bytes"))
        )),
        Err(errno) => findings.confined(format!(
            "process_vm_readv on pid 1 refused: {}",
            sys::name(errno)
        )),
    }
}
