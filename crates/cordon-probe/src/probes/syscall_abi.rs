//! Row 24: seccomp ABI bypass. A filter that only matches x86_64 syscall numbers lets the
//! same call through as i386 (`int 0x80`, where numbers differ: i386 keyctl 288 is x86_64
//! accept4) or as x32 (`nr | 0x40000000`). The filter must kill or refuse every non-native
//! ABI. Each attempt runs in a forked child, since the right answer may be SIGSYS.
//!
//! The calls are blocked ones that do no harm if they get through: `unshare(CLONE_NEWUSER)`
//! in a child that exits at once, and `keyctl(KEYCTL_GET_KEYRING_ID, session, create=0)`.

use nix::errno::Errno;
use nix::sys::signal::Signal;

use crate::sys::{self, ChildEnd};
use crate::{Findings, Options};

const X32_SYSCALL_BIT: i64 = 0x4000_0000;
const KEYCTL_GET_KEYRING_ID: i64 = 0;
const KEY_SPEC_SESSION_KEYRING: i64 = -3;

#[derive(Clone, Copy)]
enum Abi {
    /// `int 0x80` with i386 numbers and registers.
    I386,
    /// The x86_64 `syscall` instruction with `nr | 0x40000000`.
    X32,
}

impl Abi {
    fn label(self) -> &'static str {
        match self {
            Abi::I386 => "i386 (int 0x80)",
            Abi::X32 => "x32 (nr|0x40000000)",
        }
    }
}

/// A call to issue: its name, per-ABI number and arguments.
struct Call {
    name: &'static str,
    i386_nr: u32,
    x32_nr: i64,
    args: [i64; 3],
}

const CALLS: [Call; 2] = [
    Call {
        name: "unshare(CLONE_NEWUSER)",
        i386_nr: 310,
        x32_nr: 272,
        args: [libc::CLONE_NEWUSER as i64, 0, 0],
    },
    Call {
        name: "keyctl(KEYCTL_GET_KEYRING_ID)",
        i386_nr: 288,
        x32_nr: 250,
        args: [KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0],
    },
];

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    let seccomp = sys::seccomp_mode();
    findings.info(format!(
        "seccomp mode {}",
        seccomp.map_or("unknown".to_string(), |mode| mode.to_string())
    ));
    for abi in [Abi::I386, Abi::X32] {
        for call in &CALLS {
            let end = sys::in_child(|| issue(abi, call));
            classify(abi, call.name, end, seccomp, &mut findings);
        }
    }
    findings
}

/// Runs in the child: issues the call and reports the raw return value.
fn issue(abi: Abi, call: &Call) -> (i32, String) {
    let ret = match abi {
        // SAFETY: int 0x80 with plain integer arguments; nothing is dereferenced.
        Abi::I386 => unsafe {
            int80(
                call.i386_nr,
                call.args[0] as u32,
                call.args[1] as u32,
                call.args[2] as u32,
            )
        },
        Abi::X32 => {
            // SAFETY: raw syscall with integer arguments.
            let ret = unsafe {
                libc::syscall(
                    (X32_SYSCALL_BIT | call.x32_nr) as libc::c_long,
                    call.args[0],
                    call.args[1],
                    call.args[2],
                )
            };
            if ret < 0 {
                -(Errno::last() as i64)
            } else {
                ret
            }
        }
    };
    (0, ret.to_string())
}

/// An i386 syscall from 64-bit code. Returns the kernel's raw value (negative errno).
#[cfg(target_arch = "x86_64")]
unsafe fn int80(nr: u32, arg1: u32, arg2: u32, arg3: u32) -> i64 {
    let ret: u32;
    // rbx is reserved by LLVM, so swap the first argument in and out around the trap.
    core::arch::asm!(
        "xchg {arg1:r}, rbx",
        "int 0x80",
        "xchg {arg1:r}, rbx",
        arg1 = inout(reg) arg1 as u64 => _,
        inlateout("eax") nr => ret,
        in("ecx") arg2,
        in("edx") arg3,
        lateout("r8") _,
        lateout("r9") _,
        lateout("r10") _,
        lateout("r11") _,
        lateout("r12") _,
        lateout("r13") _,
        lateout("r14") _,
        lateout("r15") _,
    );
    ret as i32 as i64
}

fn classify(
    abi: Abi,
    call: &str,
    end: Result<ChildEnd, Errno>,
    seccomp: Option<u32>,
    findings: &mut Findings,
) {
    let what = format!("{} {call}", abi.label());
    let ret = match end {
        Ok(ChildEnd::Exited { code: 0, message }) => match message.trim().parse::<i64>() {
            Ok(ret) => ret,
            Err(_) => {
                findings.inconclusive(format!("{what}: bad child report {message:?}"));
                return;
            }
        },
        Ok(ChildEnd::Signaled(Signal::SIGSYS)) => {
            findings.confined(format!("{what}: killed by SIGSYS (seccomp)"));
            return;
        }
        // With ia32_emulation=0 the kernel turns int 0x80 into a #GP (SIGSEGV).
        Ok(ChildEnd::Signaled(Signal::SIGSEGV)) if matches!(abi, Abi::I386) => {
            findings.inconclusive(format!(
                "{what}: SIGSEGV, the kernel has IA32 emulation disabled; bypass impossible, \
                 filter untested"
            ));
            return;
        }
        Ok(other) => {
            findings.inconclusive(format!("{what}: child ended {other:?}"));
            return;
        }
        Err(errno) => {
            findings.inconclusive(format!("{what}: fork failed: {}", sys::name(errno)));
            return;
        }
    };
    classify_return(abi, &what, ret, seccomp, findings);
}

/// Turns a raw return value into a finding.
fn classify_return(abi: Abi, what: &str, ret: i64, seccomp: Option<u32>, findings: &mut Findings) {
    if ret >= 0 {
        findings.exposed(format!(
            "{what} succeeded (returned {ret}): filter bypassed"
        ));
        return;
    }
    let errno = Errno::from_raw(-ret as i32);
    match errno {
        Errno::EPERM | Errno::EACCES => findings.confined(format!("{what}: {}", sys::name(errno))),
        Errno::ENOSYS if seccomp == Some(0) => findings.inconclusive(format!(
            "{what}: ENOSYS with no seccomp filter: the kernel lacks the {} ABI \
             ({}), so this bypass is impossible here and the filter untested",
            match abi {
                Abi::I386 => "i386",
                Abi::X32 => "x32",
            },
            match abi {
                Abi::I386 => "IA32 emulation off",
                Abi::X32 => "CONFIG_X86_X32_ABI off",
            }
        )),
        Errno::ENOSYS => findings.confined(format!(
            "{what}: ENOSYS (from the filter, or a kernel without this ABI)"
        )),
        _ => findings.exposed(format!(
            "{what} reached the kernel (failed with {}, not refused)",
            sys::name(errno)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Verdict;

    fn verdict_of(abi: Abi, end: ChildEnd, seccomp: Option<u32>) -> Verdict {
        let mut findings = Findings::default();
        classify(abi, "unshare", Ok(end), seccomp, &mut findings);
        findings.verdict()
    }

    fn returned(ret: i64) -> ChildEnd {
        ChildEnd::Exited {
            code: 0,
            message: ret.to_string(),
        }
    }

    #[test]
    fn sigsys_and_eperm_are_confined() {
        assert_eq!(
            verdict_of(Abi::I386, ChildEnd::Signaled(Signal::SIGSYS), Some(2)),
            Verdict::Confined
        );
        assert_eq!(
            verdict_of(Abi::X32, returned(-(libc::EPERM as i64)), Some(2)),
            Verdict::Confined
        );
    }

    #[test]
    fn success_or_a_kernel_errno_is_exposed() {
        assert_eq!(
            verdict_of(Abi::I386, returned(0), Some(2)),
            Verdict::Exposed
        );
        assert_eq!(
            verdict_of(Abi::I386, returned(-(libc::EINVAL as i64)), Some(2)),
            Verdict::Exposed
        );
    }

    #[test]
    fn enosys_without_a_filter_means_the_abi_is_missing() {
        assert_eq!(
            verdict_of(Abi::X32, returned(-(libc::ENOSYS as i64)), Some(0)),
            Verdict::Inconclusive
        );
        assert_eq!(
            verdict_of(Abi::X32, returned(-(libc::ENOSYS as i64)), Some(2)),
            Verdict::Confined
        );
        assert_eq!(
            verdict_of(Abi::I386, ChildEnd::Signaled(Signal::SIGSEGV), Some(2)),
            Verdict::Inconclusive
        );
    }
}
