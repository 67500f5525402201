//! Row 32: information that aids an escape (linPEAS list): kernel symbol addresses defeat
//! KASLR, `sched_debug`/`dmesg` reveal host tasks and kernel state, `config.gz` tells an
//! attacker which bugs are compiled in, `/sys/kernel/security` exposes LSM policy, and
//! mountinfo reveals host paths (the server's state dir, overlay layer dirs).

use std::io::Read;

use crate::parse::{kallsyms_addresses, mountinfo_host_leaks};
use crate::sys;
use crate::{Findings, Options};

const SYSLOG_ACTION_READ_ALL: libc::c_long = 3;

pub fn run(options: &Options) -> Findings {
    let mut findings = Findings::default();
    check_kallsyms(&mut findings);
    for path in [
        "/proc/sched_debug",
        "/proc/config.gz",
        "/proc/kcore",
        "/proc/timer_list",
    ] {
        check_unreadable(path, &mut findings);
    }
    check_security_fs(&mut findings);
    check_syslog(&mut findings);
    check_mountinfo(&options.host_paths, &mut findings);
    findings
}

/// Zeroed addresses (kptr_restrict) or an unreadable file are fine; real ones are not.
fn check_kallsyms(findings: &mut Findings) {
    match sys::read_text("/proc/kallsyms", 64 * 1024) {
        Ok(text) => match kallsyms_addresses(&text) {
            (0, _) => findings.confined("/proc/kallsyms is empty or masked"),
            (total, 0) => {
                findings.confined(format!("/proc/kallsyms addresses zeroed ({total} checked)"))
            }
            (total, nonzero) => findings.exposed(format!(
                "/proc/kallsyms shows real kernel addresses ({nonzero} of {total} non-zero): \
                 KASLR defeated"
            )),
        },
        Err(errno) => findings.confined(format!("/proc/kallsyms unreadable: {}", sys::name(errno))),
    }
}

/// The file must be absent, unreadable, or masked (reads as empty).
fn check_unreadable(path: &str, findings: &mut Findings) {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) => {
            findings.confined(format!(
                "{path} unreadable: {}",
                sys::name(sys::io_errno(&error))
            ));
            return;
        }
    };
    let mut head = [0u8; 64];
    match file.read(&mut head) {
        Ok(0) => findings.confined(format!("{path} is masked (reads empty)")),
        Ok(n) => findings.exposed(format!("{path} is readable ({n}+ bytes)")),
        Err(error) => findings.confined(format!(
            "{path} not readable: {}",
            sys::name(sys::io_errno(&error))
        )),
    }
}

/// securityfs must not be mounted (or must be empty) under /sys/kernel/security.
fn check_security_fs(findings: &mut Findings) {
    match std::fs::read_dir("/sys/kernel/security") {
        Ok(entries) => {
            let names: Vec<String> = entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect();
            if names.is_empty() {
                findings.confined("/sys/kernel/security is empty");
            } else {
                findings.exposed(format!("/sys/kernel/security lists {}", names.join(" ")));
            }
        }
        Err(error) => findings.confined(format!(
            "/sys/kernel/security not listable: {}",
            sys::name(sys::io_errno(&error))
        )),
    }
}

/// dmesg through syslog(2). READ_ALL is non-destructive (it does not clear the buffer).
fn check_syslog(findings: &mut Findings) {
    let mut buffer = vec![0u8; 4096];
    // SAFETY: buffer is valid for buffer.len() bytes.
    let result = sys::check(unsafe {
        libc::syscall(
            libc::SYS_syslog,
            SYSLOG_ACTION_READ_ALL,
            buffer.as_mut_ptr(),
            buffer.len(),
        )
    });
    match result {
        Ok(0) => findings.confined("syslog(READ_ALL) allowed but returned nothing"),
        Ok(n) => findings.exposed(format!("syslog(READ_ALL) returned {n} bytes of dmesg")),
        Err(errno) => findings.confined(format!("syslog(READ_ALL) refused: {}", sys::name(errno))),
    }
}

fn check_mountinfo(host_paths: &[String], findings: &mut Findings) {
    let text = match sys::read_text("/proc/self/mountinfo", 1 << 20) {
        Ok(text) => text,
        Err(errno) => {
            findings.confined(format!(
                "/proc/self/mountinfo unreadable: {}",
                sys::name(errno)
            ));
            return;
        }
    };
    let leaks = mountinfo_host_leaks(&text, host_paths);
    if leaks.is_empty() {
        findings.confined(format!(
            "/proc/self/mountinfo shows no host paths ({} harness paths searched)",
            host_paths.len()
        ));
    }
    for (line, why) in leaks {
        findings.exposed(format!("/proc/self/mountinfo {why}: {line}"));
    }
}
