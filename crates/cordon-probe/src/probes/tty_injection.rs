//! Row 23: tty injection. TIOCSTI pushes bytes into a terminal's input queue, so a sandbox
//! sharing a terminal can type commands into the shell outside (CVE-2017-5226, bubblewrap);
//! flatpak's filter compared the ioctl number on 64 bits and `TIOCSTI | 1<<32` slipped
//! through (CVE-2019-10063), while the kernel only looks at the low 32; TIOCLINUX can paste
//! a VT selection (CVE-2023-28100). The filter must refuse all four forms.
//!
//! We test on a fresh pty of our own, made the controlling terminal of a forked child, so
//! that the kernel itself would allow TIOCSTI: any byte injected lands in our own pty. For
//! TIOCLINUX we ask a read-only subcode (TIOCL_GETFGCONSOLE); on a pty the kernel answers
//! ENOTTY/EINVAL, which still shows the call got past the filter.

use nix::errno::Errno;
use nix::sys::signal::Signal;

use crate::sys::{self, ChildEnd};
use crate::{Findings, Options};

const HIGH_BIT: u64 = 1 << 32;
/// Child exit code when no pty can be opened at all (no /dev/ptmx, no devpts).
const NO_PTY: i32 = 1;
/// TIOCL_GETFGCONSOLE: read-only TIOCLINUX subcode.
const TIOCL_GETFGCONSOLE: u8 = 12;

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    report_shared_terminal(&mut findings);
    match sys::in_child(ioctls_on_own_controlling_pty) {
        Ok(ChildEnd::Exited { code: 0, message }) => classify(&message, &mut findings),
        Ok(ChildEnd::Exited {
            code: NO_PTY,
            message,
        }) => findings.confined(format!("no pty to inject into: {message}")),
        Ok(ChildEnd::Exited { code, message }) => {
            findings.inconclusive(format!("tty ioctl child exited {code}: {message}"))
        }
        Ok(ChildEnd::Signaled(Signal::SIGSYS)) => {
            findings.confined("tty ioctl child killed by SIGSYS (seccomp kill)")
        }
        Ok(ChildEnd::Signaled(signal)) => {
            findings.inconclusive(format!("tty ioctl child killed by {signal:?}"))
        }
        Err(errno) => findings.inconclusive(format!("fork failed: {}", sys::name(errno))),
    }
    findings
}

/// Commands get pipes from the agent; a tty on 0/1/2 would be one shared with someone else.
fn report_shared_terminal(findings: &mut Findings) {
    // SAFETY: isatty has no preconditions.
    let ttys: Vec<String> = (0..3)
        .filter(|fd| unsafe { libc::isatty(*fd) } == 1)
        .map(|fd| fd.to_string())
        .collect();
    if ttys.is_empty() {
        findings.info("fds 0-2 are not terminals (no shared tty)");
    } else {
        findings.info(format!("fds {} are terminals", ttys.join(",")));
    }
}

/// Runs in the child: new session, new pty as controlling terminal, then the four ioctls.
/// Reports `name=ok` or `name=ERRNO` lines; exits [`NO_PTY`] when no pty can be made.
fn ioctls_on_own_controlling_pty() -> (i32, String) {
    let slave = match open_controlling_pty() {
        Ok(slave) => slave,
        Err(why) => return (NO_PTY, why),
    };
    let byte: u8 = b'#';
    let subcode: u8 = TIOCL_GETFGCONSOLE;
    let tiocsti: u64 = libc::TIOCSTI;
    let tioclinux: u64 = libc::TIOCLINUX;
    let results = [
        ("TIOCSTI", ioctl_raw(slave, tiocsti, &byte)),
        ("TIOCSTI|1<<32", ioctl_raw(slave, tiocsti | HIGH_BIT, &byte)),
        ("TIOCLINUX", ioctl_raw(slave, tioclinux, &subcode)),
        (
            "TIOCLINUX|1<<32",
            ioctl_raw(slave, tioclinux | HIGH_BIT, &subcode),
        ),
    ];
    let lines = results
        .iter()
        .map(|(name, result)| match result {
            Ok(()) => format!("{name}=ok"),
            Err(errno) => format!("{name}={}", sys::name(*errno)),
        })
        .collect::<Vec<_>>()
        .join("\n");
    (0, lines)
}

/// Opens /dev/ptmx and its slave after `setsid`, so the slave becomes our controlling tty.
fn open_controlling_pty() -> Result<libc::c_int, String> {
    // SAFETY: plain libc calls on fds we own; this runs in a throwaway child.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if master < 0 {
            return Err(format!("posix_openpt: {}", sys::name(Errno::last())));
        }
        if libc::grantpt(master) != 0 || libc::unlockpt(master) != 0 {
            return Err(format!("grantpt/unlockpt: {}", sys::name(Errno::last())));
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(master, name.as_mut_ptr(), name.len()) != 0 {
            return Err(format!("ptsname_r: {}", sys::name(Errno::last())));
        }
        libc::setsid();
        let slave = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if slave < 0 {
            return Err(format!("open pty slave: {}", sys::name(Errno::last())));
        }
        // Opening without O_NOCTTY as a session leader already made it ours; be explicit.
        libc::ioctl(slave, libc::TIOCSCTTY, 0);
        // The raw master fd stays open for the child's lifetime, keeping the pty alive.
        Ok(slave)
    }
}

/// ioctl through syscall(2), so the full 64-bit request reaches the seccomp filter.
fn ioctl_raw(fd: libc::c_int, request: u64, arg: &u8) -> Result<(), Errno> {
    // SAFETY: arg points to one readable byte; both ioctls only read it.
    sys::check(unsafe { libc::syscall(libc::SYS_ioctl, fd, request, arg as *const u8) }).map(drop)
}

/// Parses the child's lines and turns each into a finding.
fn classify(message: &str, findings: &mut Findings) {
    for line in message.lines() {
        let Some((name, outcome)) = line.split_once('=') else {
            continue;
        };
        let is_sti = name.starts_with("TIOCSTI");
        match outcome {
            "ok" if is_sti => findings.exposed(format!(
                "{name} injected a byte into the probe's own controlling pty (not filtered)"
            )),
            "ok" => findings.exposed(format!("{name} succeeded (not filtered)")),
            "EPERM" | "EACCES" | "ENOSYS" => {
                findings.confined(format!("{name} refused: {outcome}"))
            }
            // dev.tty.legacy_tiocsti=0 (Linux 6.2+): the kernel itself refuses TIOCSTI.
            "EIO" if is_sti => findings.confined(format!(
                "{name} refused by the kernel (dev.tty.legacy_tiocsti=0); the filter is untested"
            )),
            _ => findings.exposed(format!(
                "{name} reached the tty layer ({outcome}): the filter does not block it"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Verdict;

    #[test]
    fn refusals_are_confined_and_high_bit_bypass_is_exposed() {
        let mut findings = Findings::default();
        classify(
            "TIOCSTI=EPERM\nTIOCSTI|1<<32=ok\nTIOCLINUX=EPERM\nTIOCLINUX|1<<32=EPERM",
            &mut findings,
        );
        let report = findings.into_report(23, "tty-injection");
        assert_eq!(report.verdict, Verdict::Exposed);
        assert_eq!(report.exposures().len(), 1);
        assert!(report.exposures()[0].contains("TIOCSTI|1<<32"));
    }

    #[test]
    fn tioclinux_reaching_a_pty_is_exposed() {
        let mut findings = Findings::default();
        classify("TIOCLINUX=ENOTTY", &mut findings);
        assert_eq!(findings.verdict(), Verdict::Exposed);
    }

    #[test]
    fn legacy_tiocsti_off_is_confined() {
        let mut findings = Findings::default();
        classify("TIOCSTI=EIO\nTIOCSTI|1<<32=EIO", &mut findings);
        assert_eq!(findings.verdict(), Verdict::Confined);
    }
}
