//! The sandbox's seccomp policy: an allowlist derived from Docker's default profile
//! (moby/profiles `seccomp/default.json`), made stricter as SECURITY.md §2 asks.
//!
//! Default action EPERM; a non-native architecture (i386 via `int 0x80`) kills the process
//! (seccompiler emits the arch check); x32 numbers (`nr | 0x40000000`) never equal an allowed
//! number, so they get EPERM. `clone3` returns ENOSYS from a second filter so libcs fall back
//! to `clone`, whose namespace flags the first filter refuses. A third filter answers an audit
//! netlink socket with EPROTONOSUPPORT, what the kernel itself says outside the initial network
//! namespace: libaudit treats that as "no audit here", while EPERM makes shadow's `groupadd`
//! and `useradd` (run by many Debian packages' install scripts) abort.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Allowed without conditions. Docker's unconditional list minus what SECURITY.md §2 denies
/// (ptrace, process_vm_*, NUMA, the mount API, keyring, io_uring, userfaultfd, bpf, perf,
/// personality without filtering, …) and minus 32-bit-only names.
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_access,
    libc::SYS_adjtimex,
    libc::SYS_alarm,
    libc::SYS_arch_prctl,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_chroot,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_creat,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fanotify_mark,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    SYS_FCHMODAT2,
    SYS_CACHESTAT,
    SYS_MAP_SHADOW_STACK,
    SYS_FUTEX_WAKE,
    SYS_FUTEX_WAIT,
    SYS_FUTEX_REQUEUE,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fork,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_futimesat,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpgrp,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_get_robust_list,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_get_thread_area,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    SYS_IO_PGETEVENTS,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lchown,
    libc::SYS_lgetxattr,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_lstat,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_mincore,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_name_to_handle_at,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pause,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_process_mrelease,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rmdir,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_select,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_set_robust_list,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_set_thread_area,
    libc::SYS_set_tid_address,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_stat,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_time,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_utime,
    libc::SYS_utimensat,
    libc::SYS_utimes,
    libc::SYS_vfork,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
];

// x86_64 numbers the libc crate lacks (Docker's profile allows them all).
const SYS_CACHESTAT: libc::c_long = 451;
const SYS_MAP_SHADOW_STACK: libc::c_long = 453;
const SYS_FUTEX_WAKE: libc::c_long = 454;
const SYS_FUTEX_WAIT: libc::c_long = 455;
const SYS_FUTEX_REQUEUE: libc::c_long = 456;
const SYS_FCHMODAT2: libc::c_long = 452;
const SYS_IO_PGETEVENTS: libc::c_long = 333;

/// Namespace flags `clone` may not carry (Docker's mask 0x7E020000).
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// `personality` values Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32,
/// and the 0xffffffff query.
const PERSONALITY_ALLOWED: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// Socket families a sandbox may open; netlink only as NETLINK_ROUTE.
const SOCKET_FAMILIES: [i32; 3] = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

fn condition(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, len, op, value).context("seccomp condition")
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conditions).context("seccomp rule")
}

/// The allow rules, keyed by syscall number (an empty rule list = always allowed).
fn allow_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq, Ne};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // clone without namespace flags (glibc's fork and pthread_create use clone).
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![condition(
            0,
            Qword,
            MaskedEq(CLONE_NAMESPACE_FLAGS),
            0,
        )?])?],
    );
    // ioctl except TIOCSTI and TIOCLINUX, compared on the low 32 bits as the kernel does, so
    // high bits in the request number cannot dodge the check (CVE-2019-10063).
    rules.insert(
        libc::SYS_ioctl,
        vec![rule(vec![
            condition(1, Dword, Ne, libc::TIOCSTI)?,
            condition(1, Dword, Ne, libc::TIOCLINUX)?,
        ])?],
    );
    let mut personality = Vec::new();
    for value in PERSONALITY_ALLOWED {
        personality.push(rule(vec![condition(0, Dword, Eq, value)?])?);
    }
    rules.insert(libc::SYS_personality, personality);
    let mut socket = Vec::new();
    for family in SOCKET_FAMILIES {
        socket.push(rule(vec![condition(0, Dword, Eq, family as u64)?])?);
    }
    socket.push(rule(vec![
        condition(0, Dword, Eq, libc::AF_NETLINK as u64)?,
        condition(2, Dword, Eq, libc::NETLINK_ROUTE as u64)?,
    ])?);
    rules.insert(libc::SYS_socket, socket);
    Ok(rules)
}

/// How many BPF programs [`programs`] makes.
pub const PROGRAMS: usize = 3;

/// The BPF programs, in the order they must be installed.
pub fn programs() -> Result<[BpfProgram; PROGRAMS]> {
    let arch = TargetArch::x86_64;
    let main = SeccompFilter::new(
        allow_rules()?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .context("seccomp allowlist")?;
    // Installed second, so evaluated first: its ENOSYS wins over the allowlist's EPERM
    // (same precedence, first seen wins).
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .context("seccomp clone3 filter")?;
    let audit_socket = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_socket, vec![audit_netlink_socket()?])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPROTONOSUPPORT as u32),
        arch,
    )
    .context("seccomp audit socket filter")?;
    Ok([
        main.try_into().context("compile seccomp allowlist")?,
        clone3.try_into().context("compile clone3 filter")?,
        audit_socket
            .try_into()
            .context("compile audit socket filter")?,
    ])
}

/// `socket(AF_NETLINK, _, NETLINK_AUDIT)`.
fn audit_netlink_socket() -> Result<SeccompRule> {
    use SeccompCmpArgLen::Dword;
    use SeccompCmpOp::Eq;
    rule(vec![
        condition(0, Dword, Eq, libc::AF_NETLINK as u64)?,
        condition(2, Dword, Eq, libc::NETLINK_AUDIT as u64)?,
    ])
}

/// Installs the programs (no_new_privs must already be set).
pub fn install(programs: &[BpfProgram; PROGRAMS]) -> Result<()> {
    for program in programs {
        seccompiler::apply_filter(program).context("install seccomp filter")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions seccompiler emits, so the tests check
    /// the compiled programs rather than the rule table they came from.
    fn run_program(program: &BpfProgram, data: &[u8; 64]) -> u32 {
        let word = |offset: u32| {
            u32::from_le_bytes(
                data[offset as usize..offset as usize + 4]
                    .try_into()
                    .unwrap(),
            )
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let insn = &program[pc];
            pc += 1;
            match insn.code {
                0x20 => acc = word(insn.k),    // ld [k]
                0x54 => acc &= insn.k,         // and #k
                0x05 => pc += insn.k as usize, // ja
                0x06 => return insn.k,         // ret #k
                0x15 | 0x25 | 0x35 | 0x45 => {
                    let taken = match insn.code {
                        0x15 => acc == insn.k,
                        0x25 => acc > insn.k,
                        0x35 => acc >= insn.k,
                        _ => acc & insn.k != 0,
                    };
                    pc += if taken { insn.jt } else { insn.jf } as usize;
                }
                code => panic!("unexpected BPF opcode {code:#x}"),
            }
        }
    }

    /// What the kernel does with all the filters: most recent first, the action of highest
    /// precedence (lowest as a signed number) wins, the first seen among equals.
    fn decide(nr: i64, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (index, arg) in args.iter().enumerate() {
            data[16 + 8 * index..24 + 8 * index].copy_from_slice(&arg.to_le_bytes());
        }
        let programs = programs().unwrap();
        let mut result = u32::MAX;
        for program in programs.iter().rev() {
            let ret = run_program(program, &data);
            if result == u32::MAX || ((ret & 0xffff_0000) as i32) < ((result & 0xffff_0000) as i32)
            {
                result = ret;
            }
        }
        result
    }

    const X86_64: u32 = 0xc000_003e;
    const I386: u32 = 0x4000_0003;
    const ALLOW: u32 = 0x7fff_0000;
    const EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
    const ENOSYS: u32 = 0x0005_0000 | libc::ENOSYS as u32;
    const EPROTONOSUPPORT: u32 = 0x0005_0000 | libc::EPROTONOSUPPORT as u32;
    const KILL_PROCESS: u32 = 0x8000_0000;

    fn call(nr: i64, args: &[u64]) -> u32 {
        let mut all = [0u64; 6];
        all[..args.len()].copy_from_slice(args);
        decide(nr, X86_64, all)
    }

    #[test]
    fn the_compiled_filters_follow_the_policy() {
        assert_eq!(call(libc::SYS_read, &[]), ALLOW);
        assert_eq!(call(libc::SYS_mount, &[]), EPERM);
        assert_eq!(
            call(libc::SYS_unshare, &[libc::CLONE_NEWUSER as u64]),
            EPERM
        );
        assert_eq!(call(libc::SYS_keyctl, &[]), EPERM);
        assert_eq!(call(libc::SYS_io_uring_setup, &[]), EPERM);
        // x32 numbers never match the native allow rules.
        assert_eq!(call(libc::SYS_read | 0x4000_0000, &[]), EPERM);
        // Any other architecture (i386 via int 0x80) is killed.
        assert_eq!(decide(3, I386, [0; 6]), KILL_PROCESS);
        // clone3 reports ENOSYS so libcs fall back to clone, where flags are visible.
        assert_eq!(call(libc::SYS_clone3, &[]), ENOSYS);
        assert_eq!(call(libc::SYS_clone, &[libc::SIGCHLD as u64]), ALLOW);
        assert_eq!(
            call(
                libc::SYS_clone,
                &[(libc::CLONE_NEWUSER | libc::SIGCHLD) as u64]
            ),
            EPERM
        );
        assert_eq!(call(libc::SYS_clone, &[libc::CLONE_NEWNET as u64]), EPERM);
        // TIOCSTI is refused even with high bits set (compared on 32 bits).
        assert_eq!(call(libc::SYS_ioctl, &[0, libc::FIONREAD]), ALLOW);
        assert_eq!(call(libc::SYS_ioctl, &[0, libc::TIOCSTI]), EPERM);
        assert_eq!(
            call(libc::SYS_ioctl, &[0, libc::TIOCSTI | (1 << 32)]),
            EPERM
        );
        assert_eq!(call(libc::SYS_ioctl, &[0, libc::TIOCLINUX]), EPERM);
        // Sockets: unix and IP; netlink only for routing.
        assert_eq!(call(libc::SYS_socket, &[libc::AF_INET6 as u64]), ALLOW);
        assert_eq!(
            call(
                libc::SYS_socket,
                &[libc::AF_NETLINK as u64, 3, libc::NETLINK_ROUTE as u64]
            ),
            ALLOW
        );
        assert_eq!(
            call(
                libc::SYS_socket,
                &[libc::AF_NETLINK as u64, 3, libc::NETLINK_NETFILTER as u64]
            ),
            EPERM
        );
        // Audit netlink: "not supported here" (libaudit's cue to carry on), never allowed.
        assert_eq!(
            call(
                libc::SYS_socket,
                &[libc::AF_NETLINK as u64, 3, libc::NETLINK_AUDIT as u64]
            ),
            EPROTONOSUPPORT
        );
        assert_eq!(call(libc::SYS_socket, &[libc::AF_PACKET as u64]), EPERM);
        assert_eq!(call(libc::SYS_socket, &[libc::AF_VSOCK as u64]), EPERM);
        // personality: only Docker's safe values.
        assert_eq!(call(libc::SYS_personality, &[0xffff_ffff]), ALLOW);
        assert_eq!(
            call(libc::SYS_personality, &[libc::ADDR_NO_RANDOMIZE as u64]),
            EPERM
        );
    }

    #[test]
    fn denied_calls_are_not_allowlisted() {
        let rules = allow_rules().unwrap();
        for denied in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_clone3,
            libc::SYS_pivot_root,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_fsopen,
            libc::SYS_fsconfig,
            libc::SYS_fsmount,
            libc::SYS_fspick,
            libc::SYS_move_mount,
            libc::SYS_open_tree,
            libc::SYS_mount_setattr,
            libc::SYS_open_by_handle_at,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_reboot,
            libc::SYS_syslog,
            libc::SYS_acct,
            libc::SYS_quotactl,
            libc::SYS_settimeofday,
            libc::SYS_clock_settime,
            libc::SYS_iopl,
            libc::SYS_ioperm,
            libc::SYS_modify_ldt,
            libc::SYS_mbind,
            libc::SYS_set_mempolicy,
            libc::SYS_get_mempolicy,
            libc::SYS_migrate_pages,
            libc::SYS_move_pages,
            libc::SYS_sethostname,
            libc::SYS_kcmp,
            libc::SYS_pidfd_getfd,
        ] {
            assert!(
                !rules.contains_key(&denied),
                "syscall {denied} must not be allowed"
            );
        }
        programs().expect("filters compile");
    }
}
