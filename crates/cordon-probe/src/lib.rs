//! Escape probes for Cordon sandboxes (SECURITY.md §3). Each probe runs *inside* a sandbox,
//! tries one escape class without doing harm (opens for write but never writes, mounts only
//! in a throwaway child namespace, injects only into its own pty) and prints one JSON
//! [`Report`]. The security tests run every probe against a hardened sandbox (expect
//! `confined`) and against a deliberately weakened one (expect `exposed`, the positive
//! control of §1.6).
//!
//! The binary is built static so it runs in a busybox rootfs with no libc of its own.

pub mod parse;
pub mod probes;
pub mod report;
pub mod sys;

pub use report::{Findings, Report, Verdict};

/// Harness-supplied facts about the host that a probe cannot learn from inside.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    /// Host paths that must never appear in the sandbox's view (row 32: mountinfo).
    pub host_paths: Vec<String>,
    /// A host process (pid and comm) that must not be visible (row 16).
    pub host_pid: Option<(i32, String)>,
    /// Abstract unix socket names the harness listens on in the host network namespace
    /// (row 17): connecting to one proves the sandbox shares the host's netns.
    pub abstract_sockets: Vec<String>,
}

/// One probe: the §3 row it covers, its subcommand name, and its checks.
pub struct Probe {
    pub row: u32,
    pub name: &'static str,
    pub run: fn(&Options) -> Findings,
}

impl Probe {
    pub fn report(&self, options: &Options) -> Report {
        (self.run)(options).into_report(self.row, self.name)
    }
}

/// Every probe, in row order.
pub const PROBES: &[Probe] = &[
    Probe {
        row: 2,
        name: "fd-leak",
        run: probes::fd_leak::run,
    },
    Probe {
        row: 10,
        name: "usermode-helpers",
        run: probes::usermode_helpers::run,
    },
    Probe {
        row: 11,
        name: "cgroup-release-agent",
        run: probes::cgroup_release_agent::run,
    },
    Probe {
        row: 12,
        name: "capabilities",
        run: probes::capabilities::run,
    },
    Probe {
        row: 13,
        name: "nested-userns",
        run: probes::nested_userns::run,
    },
    Probe {
        row: 14,
        name: "io-uring",
        run: probes::io_uring::run,
    },
    Probe {
        row: 15,
        name: "keyring",
        run: probes::keyring::run,
    },
    Probe {
        row: 16,
        name: "pid-visibility",
        run: probes::pid_visibility::run,
    },
    Probe {
        row: 17,
        name: "host-sockets",
        run: probes::host_sockets::run,
    },
    Probe {
        row: 23,
        name: "tty-injection",
        run: probes::tty_injection::run,
    },
    Probe {
        row: 24,
        name: "syscall-abi",
        run: probes::syscall_abi::run,
    },
    Probe {
        row: 32,
        name: "info-leaks",
        run: probes::info_leaks::run,
    },
];

/// A probe by subcommand name (`io-uring`) or row number (`14`, `row14`).
pub fn find_probe(selector: &str) -> Option<&'static Probe> {
    let row = selector.strip_prefix("row").unwrap_or(selector);
    PROBES
        .iter()
        .find(|probe| probe.name == selector || row.parse() == Ok(probe.row))
}

/// Parsed command line: which probes to run and the harness options.
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    pub probes: Vec<&'static str>,
    pub options: Options,
}

pub const USAGE: &str = "usage: cordon-probe <probe|row|all> \
[--host-path PATH]... [--host-pid PID:COMM] [--abstract-socket NAME]...\n\
probes: fd-leak(2) usermode-helpers(10) cgroup-release-agent(11) capabilities(12) \
nested-userns(13) io-uring(14) keyring(15) pid-visibility(16) host-sockets(17) \
tty-injection(23) syscall-abi(24) info-leaks(32)";

/// Parses `cordon-probe <probe|row|all> [options]`.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Invocation, String> {
    let mut args = args.into_iter();
    let selector = args.next().ok_or("missing probe name")?;
    let probes = if selector == "all" {
        PROBES.iter().map(|probe| probe.name).collect()
    } else {
        vec![
            find_probe(&selector)
                .ok_or(format!("unknown probe {selector:?}"))?
                .name,
        ]
    };
    let mut options = Options::default();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--host-path" => options.host_paths.push(value()?),
            "--host-pid" => {
                let raw = value()?;
                options.host_pid =
                    Some(parse::host_pid_marker(&raw).ok_or(format!("bad --host-pid {raw:?}"))?);
            }
            "--abstract-socket" => options.abstract_sockets.push(value()?),
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    Ok(Invocation { probes, options })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn every_in_scope_row_has_exactly_one_probe() {
        let rows: Vec<u32> = PROBES.iter().map(|probe| probe.row).collect();
        assert_eq!(rows, vec![2, 10, 11, 12, 13, 14, 15, 16, 17, 23, 24, 32]);
    }

    #[test]
    fn probes_are_found_by_name_or_row() {
        assert_eq!(find_probe("io-uring").unwrap().row, 14);
        assert_eq!(find_probe("14").unwrap().name, "io-uring");
        assert_eq!(find_probe("row32").unwrap().name, "info-leaks");
        assert!(find_probe("3").is_none());
    }

    #[test]
    fn args_parse_options() {
        let invocation = parse_args(args(&[
            "info-leaks",
            "--host-path",
            "/srv/state",
            "--host-path",
            "/tmp/x",
            "--host-pid",
            "77:escape_probes",
            "--abstract-socket",
            "cordon-canary",
        ]))
        .unwrap();
        assert_eq!(invocation.probes, vec!["info-leaks"]);
        assert_eq!(invocation.options.host_paths, vec!["/srv/state", "/tmp/x"]);
        assert_eq!(
            invocation.options.host_pid,
            Some((77, "escape_probes".to_string()))
        );
        assert_eq!(invocation.options.abstract_sockets, vec!["cordon-canary"]);
    }

    #[test]
    fn args_reject_unknowns() {
        assert!(parse_args(args(&[])).is_err());
        assert!(parse_args(args(&["nope"])).is_err());
        assert!(parse_args(args(&["2", "--bogus"])).is_err());
        assert!(parse_args(args(&["2", "--host-path"])).is_err());
        assert!(parse_args(args(&["16", "--host-pid", "x"])).is_err());
        assert_eq!(
            parse_args(args(&["all"])).unwrap().probes.len(),
            PROBES.len()
        );
    }
}
