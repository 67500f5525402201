//! SECURITY.md §3 escape probes, run inside real namespace sandboxes.
//!
//! Every row is checked twice: in a default (hardened) sandbox the probe must say `confined`,
//! and in a sandbox weakened with the matching [`Weakening`] knob it must say `exposed`, with
//! the exposure the knob opened. The second run is the positive control of §1.6: it shows the
//! probe can see the weakness at all, so its `confined` in the first run means something.
//! Where no knob can open a sub-check, the test says what stands in for the control: row 12's
//! block-device check runs on the host, row 32's mountinfo check fires on a known fragment,
//! and row 24's x32 half has none on kernels without the x32 ABI (the probe then reports
//! `inconclusive` for it).
//!
//! Needs root, busybox-static, the static agent and the static probe:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
//!     --target x86_64-unknown-linux-gnu -p cordon-agent -p cordon-probe
//! cargo build -p cordon-runtime --bin cordon-nsinit
//! cargo test -p cordon-probe --test escape_probes
//! ```
//!
//! `CORDON_PROBE_VERBOSE=1 … -- --nocapture` prints every report.
//!
//! The weakenings are chosen so the probes cannot harm the host even when they get through:
//! the probes never write a sysctl or a cgroup file, never signal anything outside their own
//! children, inject tty input only into a pty of their own, and mount only inside a throwaway
//! child namespace.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cordon_probe::{Report, Verdict};
use cordon_runtime::Weakening;
use cordon_testkit::{runtime_in, target_dir, TestOptions, TestSandbox};

/// Where the probe lives inside the sandbox (an extra rootfs layer).
const PROBE_IN_SANDBOX: &str = "/usr/local/bin/cordon-probe";

const BUILD_HINT: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release \
                          -p cordon-probe --target x86_64-unknown-linux-gnu";

/// The static probe: `CORDON_PROBE_BIN`, else the release build for the static target, which
/// must not be older than the probe's sources (a stale probe would test old code).
fn probe_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CORDON_PROBE_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "CORDON_PROBE_BIN={} is not a file",
            path.display()
        );
        return path;
    }
    let path = target_dir().join("x86_64-unknown-linux-gnu/release/cordon-probe");
    let built = std::fs::metadata(&path).and_then(|meta| meta.modified());
    let Ok(built) = built else {
        panic!(
            "static cordon-probe not found at {} — build it with `{BUILD_HINT}` or set CORDON_PROBE_BIN",
            path.display()
        );
    };
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    if let Some(newer) = newest_source(&sources).filter(|(modified, _)| *modified > built) {
        panic!(
            "static cordon-probe at {} is older than {}; rebuild it with `{BUILD_HINT}`",
            path.display(),
            newer.1.display()
        );
    }
    path
}

/// The most recently modified file under `dir`.
fn newest_source(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_source(&path)
        } else {
            entry
                .metadata()
                .and_then(|meta| meta.modified())
                .ok()
                .map(|time| (time, path))
        };
        if let Some(candidate) = candidate {
            if newest.as_ref().is_none_or(|(time, _)| candidate.0 > *time) {
                newest = Some(candidate);
            }
        }
    }
    newest
}

/// A rootfs layer holding only `usr/local/bin/cordon-probe`, under `target/test-probe-layer`.
/// The binary is copied once per test process and renamed into place, so a sandbox started
/// by another test process keeps the inode it already has.
fn probe_layer() -> PathBuf {
    static LAYER: OnceLock<PathBuf> = OnceLock::new();
    LAYER
        .get_or_init(|| {
            let layer = target_dir().join("test-probe-layer");
            let bin = layer.join("usr/local/bin");
            std::fs::create_dir_all(&bin).expect("create the probe layer");
            let staging = bin.join(format!(".cordon-probe.{}", std::process::id()));
            std::fs::copy(probe_binary(), &staging).expect("copy the probe");
            std::fs::rename(&staging, bin.join("cordon-probe")).expect("install the probe");
            layer.canonicalize().expect("absolute layer path")
        })
        .clone()
}

/// The host pid and comm of this test process: visible inside only without a pid namespace.
fn host_pid_marker() -> String {
    let comm = std::fs::read_to_string("/proc/self/comm").expect("own comm");
    format!("{}:{}", std::process::id(), comm.trim_end())
}

/// A sandbox with the probe layer and the given weakening, in a state dir whose path we know
/// (so row 32 can look for it).
struct ProbeSandbox {
    sandbox: TestSandbox,
    state_dir: tempfile::TempDir,
    weakening: Weakening,
}

impl ProbeSandbox {
    async fn start(weaken: Weakening) -> ProbeSandbox {
        let state_dir = tempfile::Builder::new()
            .prefix("cordon-probe-state-")
            .tempdir()
            .expect("state dir");
        let options = TestOptions {
            extra_layers: vec![probe_layer()],
            weaken: weaken.clone(),
            ..TestOptions::default()
        };
        let sandbox = TestSandbox::start_in(runtime_in(state_dir.path()), options).await;
        ProbeSandbox {
            sandbox,
            state_dir,
            weakening: weaken,
        }
    }

    fn state_dir(&self) -> &Path {
        self.state_dir.path()
    }

    /// Runs `cordon-probe <args>` through the agent and parses its one-line report.
    async fn probe(&self, args: &[&str]) -> Report {
        let command = std::iter::once(PROBE_IN_SANDBOX)
            .chain(args.iter().copied())
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ");
        let output = self.sandbox.exec(&command).await;
        assert_eq!(
            output.exit_code, 0,
            "`{command}` failed in sandbox: {output:?}"
        );
        let report: Report = serde_json::from_str(output.stdout.trim())
            .unwrap_or_else(|error| panic!("`{command}` printed no report ({error}): {output:?}"));
        // CORDON_PROBE_VERBOSE=1 with --nocapture shows every report, to review what each
        // verdict rests on.
        if std::env::var_os("CORDON_PROBE_VERBOSE").is_some() {
            let label = if self.weakening.is_none() {
                "hardened".to_string()
            } else {
                format!("{:?}", self.weakening)
            };
            eprintln!("{label}: {}", pretty(&report));
        }
        report
    }
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Starts a sandbox with `weaken`, runs one probe, destroys the sandbox.
async fn probe_with(weaken: Weakening, args: &[&str]) -> Report {
    ProbeSandbox::start(weaken).await.probe(args).await
}

async fn hardened(args: &[&str]) -> Report {
    probe_with(Weakening::default(), args).await
}

fn pretty(report: &Report) -> String {
    serde_json::to_string_pretty(report).expect("report serializes")
}

#[track_caller]
fn assert_confined(report: &Report) {
    assert_eq!(
        report.verdict,
        Verdict::Confined,
        "hardened sandbox must be confined:\n{}",
        pretty(report)
    );
}

/// The positive control: the weakened sandbox is `exposed`, and the exposure is the one the
/// weakening opened (an `exposed:` line containing `needle`), not some unrelated finding.
#[track_caller]
fn assert_exposed(report: &Report, needle: &str) {
    assert_eq!(
        report.verdict,
        Verdict::Exposed,
        "positive control: the weakened sandbox must be exposed:\n{}",
        pretty(report)
    );
    assert!(
        report.exposures().iter().any(|line| line.contains(needle)),
        "positive control: expected an exposure mentioning {needle:?}:\n{}",
        pretty(report)
    );
}

fn weaken(apply: impl FnOnce(&mut Weakening)) -> Weakening {
    let mut weakening = Weakening::default();
    apply(&mut weakening);
    weakening
}

/// Row 2, CVE-2024-21626: no fd or cwd of any sandbox process points outside its root.
/// Control: `leak_host_fd` leaves an fd to the host sandbox dir open in the agent. The agent is
/// not dumpable, so sandbox processes can reach its fds only with CAP_SYS_PTRACE: the control
/// also keeps every capability.
#[tokio::test]
async fn row02_fd_leak() {
    assert_confined(&hardened(&["fd-leak"]).await);
    let leaky = weaken(|w| {
        w.leak_host_fd = true;
        w.all_capabilities = true;
    });
    let report = probe_with(leaky, &["fd-leak"]).await;
    assert_exposed(&report, "resolves outside the sandbox root");
}

/// Row 10, usermode helpers (cr8escape, CVE-2022-0811). The probe opens for writing, never
/// writes. Control: host root (no user namespace) with a writable /proc/sys (no masking);
/// either protection alone keeps core_pattern closed, which the middle run shows.
#[tokio::test]
async fn row10_usermode_helpers() {
    assert_confined(&hardened(&["usermode-helpers"]).await);
    // The user namespace alone suffices: sandbox root is not host root for sysctls.
    let unmasked = probe_with(weaken(|w| w.no_proc_masking = true), &["usermode-helpers"]).await;
    assert_confined(&unmasked);
    let report = probe_with(
        weaken(|w| {
            w.no_user_namespace = true;
            w.no_proc_masking = true;
        }),
        &["usermode-helpers"],
    )
    .await;
    assert_exposed(&report, "core_pattern");
}

/// Row 11, cgroup v1 release_agent (CVE-2022-0492): unshare -UrmC then mount cgroup v1.
/// Control: no seccomp, so the nested user namespace (and its mount) is allowed.
#[tokio::test]
async fn row11_cgroup_release_agent() {
    assert_confined(&hardened(&["cgroup-release-agent"]).await);
    let report = probe_with(weaken(|w| w.no_seccomp = true), &["cgroup-release-agent"]).await;
    assert_exposed(&report, "cgroup v1 mount");
}

/// Row 12, privileged-ish configs. Control 1: every capability kept (inside the user
/// namespace). mknod and open_by_handle_at need their capability in the *initial* user
/// namespace, so the user namespace alone refuses them; control 2 (host root, every
/// capability, no filter) shows the probe detects both when they do get through. The probe
/// only makes a /dev/null-numbered node in /tmp and removes it at once.
#[tokio::test]
async fn row12_capabilities() {
    assert_confined(&hardened(&["capabilities"]).await);
    let report = probe_with(weaken(|w| w.all_capabilities = true), &["capabilities"]).await;
    assert_exposed(&report, "SYS_ADMIN");
    let report = probe_with(
        weaken(|w| {
            w.no_user_namespace = true;
            w.all_capabilities = true;
            w.no_seccomp = true;
        }),
        &["capabilities"],
    )
    .await;
    assert_exposed(&report, "mknod of char device 1:3 succeeded");
    assert_exposed(&report, "open_by_handle_at");
}

/// Row 12's block-device check: no weakening puts host block devices into a sandbox's
/// minimal /dev, so its positive control is the host itself (root, every device node). Only
/// the capabilities probe runs here, and it is harmless on the host: devices are opened
/// read-only and non-blocking and closed, the /tmp mknod node is removed at once, and the
/// handle opened by open_by_handle_at is closed.
#[test]
fn row12_block_devices_detected_on_the_host() {
    use std::os::unix::fs::FileTypeExt;
    let host_has_block_devices = std::fs::read_dir("/dev")
        .expect("host /dev")
        .flatten()
        .any(|entry| entry.file_type().is_ok_and(|kind| kind.is_block_device()));
    if !host_has_block_devices {
        eprintln!("row 12: the host has no block device in /dev; nothing to detect");
        return;
    }
    let output = std::process::Command::new(probe_binary())
        .arg("capabilities")
        .output()
        .expect("run the probe on the host");
    assert!(
        output.status.success(),
        "probe failed on the host: {output:?}"
    );
    let report: Report = serde_json::from_slice(&output.stdout).expect("host report");
    assert_exposed(&report, "block devices open for reading");
}

/// Row 13, nested user namespaces and the kernel surface behind them (CVE-2022-0185,
/// CVE-2021-22555, CVE-2024-1086). Control: no seccomp.
#[tokio::test]
async fn row13_nested_userns() {
    let report = hardened(&["nested-userns"]).await;
    assert_confined(&report);
    // clone3 must be ENOSYS so libcs fall back to the inspectable clone.
    assert!(
        report.mentions("clone3(CLONE_NEWUSER) refused: ENOSYS"),
        "{}",
        pretty(&report)
    );
    let report = probe_with(weaken(|w| w.no_seccomp = true), &["nested-userns"]).await;
    assert_exposed(&report, "unshare(CLONE_NEWUSER) succeeded");
    assert_exposed(&report, "clone(CLONE_NEWUSER) succeeded");
    assert_exposed(&report, "NETLINK_NETFILTER");
}

/// Row 14, io_uring. Control: no seccomp.
#[tokio::test]
async fn row14_io_uring() {
    assert_confined(&hardened(&["io-uring"]).await);
    let report = probe_with(weaken(|w| w.no_seccomp = true), &["io-uring"]).await;
    assert_exposed(&report, "io_uring_setup");
}

/// Row 15, the unnamespaced keyring. Two controls: no seccomp opens the syscalls, no proc
/// masking exposes /proc/keys.
#[tokio::test]
async fn row15_keyring() {
    assert_confined(&hardened(&["keyring"]).await);
    let report = probe_with(weaken(|w| w.no_seccomp = true), &["keyring"]).await;
    assert_exposed(&report, "keyctl(KEYCTL_GET_KEYRING_ID");
    let report = probe_with(weaken(|w| w.no_proc_masking = true), &["keyring"]).await;
    assert_exposed(&report, "/proc/keys");
}

/// Row 16, ptrace/process_vm and pid visibility. Two controls: the host pid namespace shows
/// kernel threads and this very test process; no seccomp lets ptrace through. The probe never
/// signals anything but its own child (no `kill -1` without a pid namespace).
#[tokio::test]
async fn row16_pid_visibility() {
    let marker = host_pid_marker();
    let args = ["pid-visibility", "--host-pid", marker.as_str()];
    assert_confined(&hardened(&args).await);
    let report = probe_with(weaken(|w| w.no_pid_namespace = true), &args).await;
    assert_exposed(&report, "kernel threads");
    assert_exposed(&report, "is visible in /proc");
    let report = probe_with(weaken(|w| w.no_seccomp = true), &args).await;
    assert_exposed(&report, "PTRACE_ATTACH");
}

/// Row 17, host unix sockets (CVE-2020-15257: the containerd-shim abstract socket). We listen
/// on an abstract canary in the host network namespace; only a shared netns reaches it.
/// Control: no network namespace.
#[tokio::test]
async fn row17_host_sockets() {
    let name = format!("cordon-probe-canary-{}", std::process::id());
    let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
    let _canary = UnixListener::bind_addr(&address).expect("bind the abstract canary");
    let args = ["host-sockets", "--abstract-socket", name.as_str()];
    assert_confined(&hardened(&args).await);
    let report = probe_with(weaken(|w| w.no_net_namespace = true), &args).await;
    assert_exposed(&report, "harness canary");
}

/// Row 23, TIOCSTI/TIOCLINUX (CVE-2017-5226, CVE-2019-10063, CVE-2023-28100), tried on the
/// probe's own pty. Control: no seccomp. With `dev.tty.legacy_tiocsti=0` the kernel refuses
/// TIOCSTI by itself, but TIOCLINUX still reaches the tty layer, so the control holds.
#[tokio::test]
async fn row23_tty_injection() {
    let report = hardened(&["tty-injection"]).await;
    assert_confined(&report);
    assert!(
        report.mentions("TIOCSTI|1<<32 refused"),
        "{}",
        pretty(&report)
    );
    let report = probe_with(weaken(|w| w.no_seccomp = true), &["tty-injection"]).await;
    assert_exposed(&report, "TIOCLINUX");
    if legacy_tiocsti_enabled() {
        assert_exposed(&report, "TIOCSTI|1<<32 injected");
    }
}

fn legacy_tiocsti_enabled() -> bool {
    // Before Linux 6.2 the sysctl does not exist and TIOCSTI is always allowed.
    std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti")
        .map_or(true, |value| value.trim() == "1")
}

/// Row 24, seccomp ABI bypass via i386 `int 0x80` and x32 numbers. Control: no seccomp.
/// The x32 half has no positive control on kernels without CONFIG_X86_X32_ABI (most
/// distributions, and this CI kernel): there x32 numbers are ENOSYS with or without a
/// filter, the bypass is impossible, and the probe says so as `inconclusive`.
#[tokio::test]
async fn row24_syscall_abi() {
    let report = hardened(&["syscall-abi"]).await;
    assert_confined(&report);
    let report = probe_with(weaken(|w| w.no_seccomp = true), &["syscall-abi"]).await;
    if report.mentions("lacks the i386 ABI") || report.mentions("IA32 emulation disabled") {
        eprintln!(
            "row 24: this kernel has no IA32 emulation; the i386 positive control cannot run:\n{}",
            pretty(&report)
        );
        return;
    }
    assert_exposed(&report, "i386 (int 0x80) unshare(CLONE_NEWUSER) succeeded");
    if !report.mentions("x32 (nr|0x40000000) unshare(CLONE_NEWUSER) succeeded") {
        assert!(
            report.mentions("lacks the x32 ABI"),
            "x32 must either get through without a filter or be reported missing:\n{}",
            pretty(&report)
        );
    }
}

/// Row 32, information leaks. Controls: without proc masking `/proc/config.gz` and
/// `/proc/timer_list` are readable; host root with every capability and no filter sees real
/// kallsyms addresses and dmesg. The mountinfo check has no weakening that adds host paths
/// (the runtime names overlay layers relatively), so its detector is shown to fire on a
/// fragment the sandbox's mountinfo must contain.
#[tokio::test]
async fn row32_info_leaks() {
    let sandbox = ProbeSandbox::start(Weakening::default()).await;
    let state_dir = sandbox.state_dir().to_string_lossy().into_owned();
    let layer = probe_layer().to_string_lossy().into_owned();
    let rootfs = cordon_testkit::test_rootfs().to_string_lossy().into_owned();
    let report = sandbox
        .probe(&[
            "info-leaks",
            "--host-path",
            &state_dir,
            "--host-path",
            &layer,
            "--host-path",
            &rootfs,
        ])
        .await;
    assert_confined(&report);
    // Detector self-test: the overlay's relative layer names are in every sandbox's mountinfo.
    let report = sandbox
        .probe(&["info-leaks", "--host-path", "lowerdir=l0"])
        .await;
    assert_exposed(&report, "contains host path lowerdir=l0");
    drop(sandbox);

    let report = probe_with(weaken(|w| w.no_proc_masking = true), &["info-leaks"]).await;
    assert_exposed(&report, "/proc/config.gz");
    let report = probe_with(
        weaken(|w| {
            w.no_user_namespace = true;
            w.all_capabilities = true;
            w.no_seccomp = true;
        }),
        &["info-leaks"],
    )
    .await;
    if kptr_restrict() < 2 {
        assert_exposed(&report, "/proc/kallsyms shows real kernel addresses");
    }
    assert_exposed(&report, "syslog(READ_ALL)");
}

fn kptr_restrict() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/kptr_restrict")
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}
