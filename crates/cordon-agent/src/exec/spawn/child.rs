//! Starting a process the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)`.
//!
//! The agent is a large multi-threaded process. A plain `fork` copies its page tables and
//! write-protects every page, so both the child (until it execs) and the agent (afterwards)
//! take copy-on-write faults; that was most of the cost of starting a command. A `CLONE_VM`
//! child shares the agent's memory instead and runs on a stack of its own while the calling
//! thread is suspended until the child execs or exits (`CLONE_VFORK`), exactly like glibc's
//! and musl's `posix_spawn`.
//!
//! Sharing memory makes the child's rules stricter than after `fork`: it only makes system calls
//! on data prepared beforehand, allocates nothing, takes no lock, and never goes through a
//! libc wrapper with process-wide side effects (glibc's `setuid`/`setgid`/`setgroups` signal
//! every thread of the *agent* to change their credentials, so raw syscalls are used; only
//! `sigaction`, a plain wrapper, is called through libc).
//! Signals are blocked across the clone and the child resets every caught signal to its default
//! before unblocking, so no agent signal handler ever runs in the child. Failures are reported
//! through memory the parent reads once the child is gone or has exec'd.

use std::ffi::{c_int, c_void, CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

/// Stack of the child until it execs. It runs only the short, non-recursive code below.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// The program to exec: path, argv and envp as C arrays.
pub struct Program {
    path: CString,
    /// Owns the strings the pointer arrays point into.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl Program {
    /// `args` includes argv[0]; `env` entries are `NAME=value`. None may contain a NUL byte.
    pub fn new(path: CString, args: Vec<CString>, env: Vec<CString>) -> Program {
        let argc = args.len();
        let strings: Vec<CString> = args.into_iter().chain(env).collect();
        let pointers = |range: &[CString]| {
            range
                .iter()
                .map(|s| s.as_ptr())
                .chain([ptr::null()])
                .collect::<Vec<_>>()
        };
        let argv = pointers(&strings[..argc]);
        let envp = pointers(&strings[argc..]);
        Program {
            path,
            _strings: strings,
            argv,
            envp,
        }
    }
}

/// Credentials the child switches to before exec.
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// Where the child starts.
pub enum StartDir {
    /// Must be entered, or the spawn fails.
    Required(CString),
    /// Entered when the run user can; `/` otherwise.
    OrRoot(CString),
}

/// What the child does between clone and exec, in this order: new session (and controlling
/// terminal), stdio, credentials, working directory, every other fd close-on-exec.
pub struct ChildSetup {
    /// Become fds 0, 1 and 2. Each must be 3 or above, so no dup overwrites another source.
    pub stdio: [RawFd; 3],
    /// fd 0 becomes the controlling terminal of the new session (a PTY slave).
    pub controlling_tty: bool,
    /// `None`: keep the agent's.
    pub credentials: Option<Credentials>,
    pub start_dir: StartDir,
}

/// The step of the child that failed, for the error message.
#[derive(Debug, Clone, Copy)]
#[repr(i32)]
enum Step {
    None = 0,
    Session,
    ControllingTty,
    Stdio,
    Credentials,
    StartDir,
    Exec,
}

impl Step {
    fn from_raw(raw: i32) -> Step {
        [
            Step::Session,
            Step::ControllingTty,
            Step::Stdio,
            Step::Credentials,
            Step::StartDir,
            Step::Exec,
        ]
        .into_iter()
        .find(|step| *step as i32 == raw)
        .unwrap_or(Step::None)
    }

    fn describe(self) -> &'static str {
        match self {
            Step::None | Step::Exec => "exec",
            Step::Session => "setsid",
            Step::ControllingTty => "acquiring the controlling terminal",
            Step::Stdio => "setting up stdio",
            Step::Credentials => "switching to the run user",
            Step::StartDir => "entering the work dir",
        }
    }
}

/// Everything the child reads (prepared by the parent) and the one thing it writes.
struct ChildContext<'a> {
    program: &'a Program,
    setup: &'a ChildSetup,
    /// The caller's signal mask, restored after the clone.
    signal_mask: KernelSigset,
    failed_step: AtomicI32,
    failed_errno: AtomicI32,
}

/// Starts `program` with `setup` and returns its pid once it has exec'd. The child is not
/// waited for: that is the reaper's job (also when it failed before exec and exited 127).
pub fn spawn(program: &Program, setup: &ChildSetup) -> io::Result<i32> {
    if setup.stdio.iter().any(|fd| *fd < 3) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "child stdio must not already be fds 0-2",
        ));
    }
    let mut stack: Vec<MaybeUninit<u8>> = Vec::with_capacity(CHILD_STACK_BYTES);
    // The stack grows down from its (16-byte aligned) end.
    let stack_top = {
        let end = stack.as_mut_ptr() as usize + CHILD_STACK_BYTES;
        (end & !15) as *mut c_void
    };
    let mut context = ChildContext {
        program,
        setup,
        signal_mask: 0,
        failed_step: AtomicI32::new(Step::None as i32),
        failed_errno: AtomicI32::new(0),
    };
    // Every signal, glibc's internal ones too (its `pthread_sigmask` would leave those out).
    let all_blocked = KernelSigset::MAX;
    // SAFETY: rt_sigprocmask reads `all_blocked` and writes the old mask into the context.
    let blocked = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all_blocked as *const KernelSigset,
            &mut context.signal_mask as *mut KernelSigset,
            KERNEL_SIGSET_BYTES,
        )
    };
    if blocked < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the child runs `child_main` on its own stack (`stack`, alive until clone returns,
    // which with CLONE_VFORK is after the child exec'd or exited) and only makes system calls
    // on `context`, which also outlives it. Signals are blocked, so no handler runs in it.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack_top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut context as *mut ChildContext as *mut c_void,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { set_signal_mask(&context.signal_mask) };
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    let step = Step::from_raw(context.failed_step.load(Ordering::Acquire));
    if !matches!(step, Step::None) {
        let errno = context.failed_errno.load(Ordering::Acquire);
        let cause = io::Error::from_raw_os_error(errno);
        return Err(io::Error::new(
            cause.kind(),
            format!("{}: {cause}", step.describe()),
        ));
    }
    Ok(pid)
}

/// The kernel's signal set: one bit per signal 1-64.
type KernelSigset = u64;
const KERNEL_SIGSET_BYTES: libc::c_long = std::mem::size_of::<KernelSigset>() as libc::c_long;

/// Sets the calling thread's signal mask with the raw syscall.
///
/// # Safety
/// Only changes which signals are blocked; callers decide when that is sound.
unsafe fn set_signal_mask(mask: &KernelSigset) -> libc::c_long {
    libc::syscall(
        libc::SYS_rt_sigprocmask,
        libc::SIG_SETMASK,
        mask as *const KernelSigset,
        ptr::null::<KernelSigset>(),
        KERNEL_SIGSET_BYTES,
    )
}

/// The child: runs until exec, or records what failed and exits 127.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildContext` that `spawn` keeps alive until we exec or exit.
    let context = unsafe { &*(arg as *const ChildContext) };
    let (step, errno) = match prepare_and_exec(context) {
        Err(failure) => failure,
        Ok(never) => match never {},
    };
    context.failed_errno.store(errno, Ordering::Release);
    context.failed_step.store(step as i32, Ordering::Release);
    // SAFETY: _exit only ends this process (the child), running no atexit handlers.
    unsafe { libc::_exit(127) }
}

enum Never {}

/// The current errno, read right after a failed call.
fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

/// Turns a raw syscall result into the failed step.
fn check(step: Step, result: libc::c_long) -> Result<(), (Step, i32)> {
    if result < 0 {
        Err((step, errno()))
    } else {
        Ok(())
    }
}

/// Child side. Only raw system calls on prepared data; see the module documentation.
fn prepare_and_exec(context: &ChildContext) -> Result<Never, (Step, i32)> {
    let setup = context.setup;
    reset_signal_handlers();
    // SAFETY (all calls below): plain system calls on integers and on C strings and arrays the
    // parent prepared, which stay alive and unchanged until we exec or exit.
    check(Step::Session, unsafe { libc::syscall(libc::SYS_setsid) })?;
    for (target, source) in setup.stdio.iter().enumerate() {
        // dup3 (every architecture has it) without O_CLOEXEC; sources are never 0-2, so never
        // the target itself.
        check(Step::Stdio, unsafe {
            libc::syscall(
                libc::SYS_dup3,
                libc::c_long::from(*source),
                target as libc::c_long,
                0 as libc::c_long,
            )
        })?;
    }
    if setup.controlling_tty {
        check(Step::ControllingTty, unsafe {
            libc::syscall(
                libc::SYS_ioctl,
                0 as libc::c_long,
                libc::TIOCSCTTY,
                0 as libc::c_long,
            )
        })?;
    }
    if let Some(credentials) = &setup.credentials {
        // Raw syscalls: they change this process only (see the module documentation).
        check(Step::Credentials, unsafe {
            libc::syscall(
                libc::SYS_setgroups,
                credentials.groups.len() as libc::c_long,
                credentials.groups.as_ptr(),
            )
        })?;
        check(Step::Credentials, unsafe {
            libc::syscall(libc::SYS_setgid, libc::c_long::from(credentials.gid))
        })?;
        check(Step::Credentials, unsafe {
            libc::syscall(libc::SYS_setuid, libc::c_long::from(credentials.uid))
        })?;
    }
    // After the user switch, so the user's own permissions decide.
    enter_start_dir(&setup.start_dir)?;
    mark_inherited_fds_cloexec();
    // The exec'd program starts with no signal blocked, as with std's spawn.
    check(Step::Exec, unsafe { set_signal_mask(&0) })?;
    let program = context.program;
    unsafe {
        libc::syscall(
            libc::SYS_execve,
            program.path.as_ptr(),
            program.argv.as_ptr(),
            program.envp.as_ptr(),
        )
    };
    Err((Step::Exec, errno()))
}

fn enter_start_dir(dir: &StartDir) -> Result<(), (Step, i32)> {
    let chdir = |path: &CStr| unsafe { libc::syscall(libc::SYS_chdir, path.as_ptr()) };
    match dir {
        StartDir::Required(path) => check(Step::StartDir, chdir(path)),
        StartDir::OrRoot(path) => {
            if chdir(path) < 0 {
                check(Step::StartDir, chdir(c"/"))?;
            }
            Ok(())
        }
    }
}

/// Every caught signal goes back to its default, and SIGPIPE (which the Rust runtime ignores)
/// too, while all signals are still blocked: a signal that arrives before exec then never runs
/// an agent handler on the agent's memory.
fn reset_signal_handlers() {
    for signal in 1..libc::SIGRTMAX() + 1 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        let mut current = MaybeUninit::<libc::sigaction>::zeroed();
        // SAFETY: sigaction only reads the disposition into `current`; signals glibc reserves
        // for itself fail with EINVAL and are skipped.
        if unsafe { libc::sigaction(signal, ptr::null(), current.as_mut_ptr()) } != 0 {
            continue;
        }
        // SAFETY: zero-initialised, then filled in by the kernel.
        let handler = unsafe { current.assume_init() }.sa_sigaction;
        let caught = handler != libc::SIG_DFL && handler != libc::SIG_IGN;
        if caught || (signal == libc::SIGPIPE && handler == libc::SIG_IGN) {
            let mut default = unsafe { current.assume_init() };
            default.sa_sigaction = libc::SIG_DFL;
            default.sa_flags = 0;
            // SAFETY: installs SIG_DFL for this process only (no CLONE_SIGHAND).
            unsafe { libc::sigaction(signal, &default, ptr::null_mut()) };
        }
    }
}

/// Nothing but fds 0-2 may survive exec.
fn mark_inherited_fds_cloexec() {
    // SAFETY: close_range only changes fd flags; no memory is passed.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_long,
            libc::c_long::from(u32::MAX),
            libc::CLOSE_RANGE_CLOEXEC as libc::c_long,
        )
    };
    if done != 0 {
        // Kernels before 5.11: flag them one by one.
        for fd in 3..65536 {
            // SAFETY: F_SETFD on a closed fd fails harmlessly with EBADF.
            unsafe {
                libc::syscall(
                    libc::SYS_fcntl,
                    fd as libc::c_long,
                    libc::F_SETFD as libc::c_long,
                    libc::FD_CLOEXEC as libc::c_long,
                )
            };
        }
    }
}
