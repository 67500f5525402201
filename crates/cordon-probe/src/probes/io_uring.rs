//! Row 14: io_uring. About 60% of Google kCTF VRP submissions in 2022 were io_uring bugs, and
//! seccomp cannot see the operations submitted through the ring, so `io_uring_setup` itself
//! must fail (with an errno, so runtimes like libuv fall back).

use crate::sys;
use crate::{Findings, Options};

pub fn run(_options: &Options) -> Findings {
    let mut findings = Findings::default();
    check_io_uring_setup(&mut findings);
    if let Ok(disabled) = sys::read_text("/proc/sys/kernel/io_uring_disabled", 64) {
        findings.info(format!("kernel.io_uring_disabled={}", disabled.trim()));
    }
    findings
}

fn check_io_uring_setup(findings: &mut Findings) {
    // struct io_uring_params is 120 bytes; all-zero asks for defaults.
    let mut params = [0u32; 30];
    // SAFETY: params is a zeroed io_uring_params-sized buffer the kernel fills in.
    let result =
        sys::check(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) });
    match result {
        Ok(fd) => {
            drop(sys::owned(fd));
            findings.exposed("io_uring_setup returned a ring fd (closed)");
        }
        Err(errno) if sys::is_refusal(errno) => {
            findings.confined(format!("io_uring_setup refused: {}", sys::name(errno)))
        }
        Err(errno) => findings.exposed(format!(
            "io_uring_setup reached the kernel (failed with {}, not refused)",
            sys::name(errno)
        )),
    }
}
