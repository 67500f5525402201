//! Row 10: kernel usermode helpers. `core_pattern` (`|/path`), `modprobe`, `uevent_helper`
//! and `binfmt_misc` make the kernel exec a path as host root; cr8escape (CVE-2022-0811)
//! injected `kernel.core_pattern` through a CRI-O sysctl. Being able to *open* any of these
//! for writing is the exposure. We open with `O_WRONLY` and close without writing: an open
//! of a sysctl or sysfs attribute changes nothing, only `write(2)` does.

use crate::sys;
use crate::{Findings, Options};

/// The four helper hooks linPEAS `5_Container_breakout.sh` checks.
const HELPER_FILES: [&str; 4] = [
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/modprobe",
    "/sys/kernel/uevent_helper",
    "/proc/sys/fs/binfmt_misc/register",
];

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    for path in HELPER_FILES {
        check_not_writable(path, &mut findings);
    }
    findings
}

fn check_not_writable(path: &str, findings: &mut Findings) {
    // No O_TRUNC, no O_CREAT: the open must not modify anything even when it succeeds.
    match sys::open(path, libc::O_WRONLY | libc::O_NOCTTY | libc::O_NONBLOCK) {
        Ok(fd) => {
            drop(fd);
            findings.exposed(format!(
                "{path} opened for writing (closed unwritten): a usermode helper is \
                 controllable (CVE-2022-0811 class)"
            ));
        }
        Err(errno) => findings.confined(format!("{path} not writable: {}", sys::name(errno))),
    }
}
