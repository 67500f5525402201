//! The microVM backend, end to end under TCG: real QEMU microVMs booting the guest kernel
//! (`cordon_image::guest`, prepared once and cached) with the real agent as `/init`, QEMU
//! jailed by `cordon-nsinit`. Needs root, qemu-system-x86 and the guest kernel package (apt).
//!
//! Each boot costs a few seconds of TCG, so the tests share VMs where they can.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cordon_runtime::{
    Backend, Isolation, Limits, MicrovmConfig, MicrovmRuntime, Runtime, SandboxSpec, SandboxState,
    Weakening,
};
use cordon_testkit::{
    agent_binary, connect, exec, nsinit_binary, spec, unique_id, TestOptions, TestStateDir,
};

/// The guest kernel and an initramfs with the agent under test (built once per process).
fn guest() -> &'static (PathBuf, PathBuf) {
    static GUEST: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    GUEST.get_or_init(|| {
        let cache = Path::new(cordon_image::guest::DEFAULT_CACHE_DIR);
        let kernel = match cordon_image::guest::load_guest_kernel(cache) {
            Some(kernel) => kernel,
            None => cordon_image::guest::prepare_guest_kernel(cache, &mut |line| {
                eprintln!("guest kernel: {line}")
            })
            .expect("prepare the guest kernel"),
        };
        let out = cordon_testkit::target_dir().join("test-guest");
        std::fs::create_dir_all(&out).unwrap();
        // Per process: tests of other binaries may rebuild it concurrently.
        let initramfs = out.join(format!("initramfs-{}", std::process::id()));
        cordon_image::guest::build_initramfs(&kernel, &agent_binary(), &initramfs)
            .expect("build the initramfs");
        (kernel.kernel, initramfs)
    })
}

fn microvm_in(state: &Path) -> Arc<MicrovmRuntime> {
    let (kernel, initramfs) = guest();
    let mut config = MicrovmConfig::new(state, nsinit_binary(), kernel, initramfs);
    config.force_tcg = true;
    config.boot_timeout = Duration::from_secs(90);
    Arc::new(MicrovmRuntime::new(config).expect("microvm runtime"))
}

fn vm_spec(id: &str, limits: Limits) -> SandboxSpec {
    let mut spec = spec(id, &TestOptions::default());
    spec.backend = Backend::Microvm;
    spec.limits = limits;
    spec
}

fn small() -> Limits {
    Limits {
        memory_bytes: Some(256 << 20),
        disk_bytes: Some(64 << 20),
        ..Limits::default()
    }
}

async fn boot(runtime: &MicrovmRuntime, spec: SandboxSpec) -> String {
    let id = spec.id.clone();
    runtime.create(spec).await.expect("create");
    runtime.start(&id).await.expect("start");
    id
}

async fn sh(runtime: &MicrovmRuntime, id: &str, command: &str) -> String {
    let client = connect(runtime, id).await;
    let out = exec(&client, command).await;
    assert_eq!(out.exit_code, 0, "`{command}`: {out:?}");
    out.stdout
}

fn qemu_pid(state: SandboxState) -> u32 {
    match state {
        SandboxState::Running { pid } => pid,
        other => panic!("not running: {other:?}"),
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} missing"))
        .trim()
        .to_string()
}

/// Boot, exec, files, devices, no host files or network, stop/start keeps files, isolation.
#[tokio::test]
async fn a_microvm_boots_runs_commands_and_sees_only_its_own_devices() {
    let state = TestStateDir::new();
    let runtime = microvm_in(state.path());
    let canary = std::env::temp_dir().join(format!("cordon-host-canary-{}", std::process::id()));
    std::fs::write(&canary, "host secret").unwrap();
    let id = boot(&runtime, vm_spec(&unique_id("vm"), small())).await;
    assert_eq!(runtime.isolation(&id), Isolation::MicrovmTcg);

    let out = sh(&runtime, &id, "hostname; id -u; cat /proc/cmdline").await;
    assert!(out.starts_with("sandbox\n0\n"), "{out}");
    assert!(out.contains("cordon.layers=1"), "{out}");

    // Only the configured virtio-mmio devices: 1 console/serial, 1 rng, 2 disks (rw + 1 layer).
    let devices = sh(&runtime, &id, "cat /sys/bus/virtio/devices/*/device").await;
    let mut ids: Vec<&str> = devices.lines().map(str::trim).collect();
    ids.sort();
    // virtio ids: 2 = block, 3 = console, 4 = rng.
    assert_eq!(ids, ["0x0002", "0x0002", "0x0003", "0x0004"], "{devices}");
    let serials = sh(
        &runtime,
        &id,
        "cat /sys/block/vd*/serial; ls /sys/class/block",
    )
    .await;
    assert!(
        serials.contains("cordon-rw") && serials.contains("cordon-l0"),
        "{serials}"
    );
    // No network device: only lo.
    let links = sh(&runtime, &id, "ls /sys/class/net").await;
    assert_eq!(links.trim(), "lo", "{links}");
    // The host's files are not there, by any path.
    let client = connect(&*runtime, &id).await;
    let probe = exec(
        &client,
        &format!(
            "cat {0} || cat /proc/1/root{0} || echo absent",
            canary.display()
        ),
    )
    .await;
    assert!(
        probe.stdout.contains("absent") && !probe.stdout.contains("host secret"),
        "{probe:?}"
    );

    sh(
        &runtime,
        &id,
        "echo kept > /root/note && mkdir -p /data && echo 1 > /data/x",
    )
    .await;
    runtime.stop(&id).await.unwrap();
    assert_eq!(runtime.state(&id).await.unwrap(), SandboxState::Stopped);
    runtime.start(&id).await.unwrap();
    assert_eq!(
        sh(&runtime, &id, "cat /root/note /data/x").await,
        "kept\n1\n"
    );
    runtime.destroy(&id).await.unwrap();
    let _ = std::fs::remove_file(canary);
}

/// QEMU runs with no capabilities, as an unprivileged uid, under seccomp, in its own cgroup;
/// the positive control (a deliberately weakened jail) shows the checks detect the opposite.
#[tokio::test]
async fn qemu_is_jailed_without_privileges() {
    let state = TestStateDir::new();
    let runtime = microvm_in(state.path());
    let id = boot(&runtime, vm_spec(&unique_id("jail"), small())).await;
    let pid = qemu_pid(runtime.state(&id).await.unwrap());
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let uid: u32 = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(uid >= 1 << 30, "QEMU runs as host uid {uid}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory = cgroups
        .lines()
        .find(|l| l.contains(":memory:") || l.starts_with("0::"))
        .expect("memory cgroup");
    assert!(memory.ends_with(&format!("/cordon/{id}")), "{cgroups}");
    // Its root holds /usr and /vm, not the host's /etc or /root.
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        root.contains(&"vm".to_string()) && root.contains(&"usr".to_string()),
        "{root:?}"
    );
    assert!(
        !root.contains(&"etc".to_string()) && !root.contains(&"root".to_string()),
        "{root:?}"
    );
    // No network device in its namespace either: only lo.
    let net = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    assert_eq!(net.lines().skip(2).count(), 1, "{net}");
    runtime.destroy(&id).await.unwrap();

    // Positive control: all capabilities and no user namespace.
    let mut weak = vm_spec(&unique_id("weak"), small());
    weak.weaken = Weakening {
        all_capabilities: true,
        no_user_namespace: true,
        no_seccomp: true,
        ..Weakening::default()
    };
    let id = boot(&runtime, weak).await;
    let pid = qemu_pid(runtime.state(&id).await.unwrap());
    assert_ne!(status_field(pid, "CapEff"), "0000000000000000");
    assert!(status_field(pid, "Uid").starts_with("0\t"));
    runtime.destroy(&id).await.unwrap();
}

/// A QEMU that dies marks its sandbox failed with a message; another VM is unaffected.
/// Also: a runtime restart re-adopts a running VM and reconnects to its agent.
#[tokio::test]
async fn a_qemu_crash_fails_only_its_sandbox_and_running_vms_are_readopted() {
    let state = TestStateDir::new();
    let runtime = microvm_in(state.path());
    let victim = boot(&runtime, vm_spec(&unique_id("crash"), small())).await;
    let bystander = boot(&runtime, vm_spec(&unique_id("calm"), small())).await;
    sh(&runtime, &bystander, "echo before > /root/b").await;
    let pid = qemu_pid(runtime.state(&victim).await.unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    match runtime.state(&victim).await.unwrap() {
        SandboxState::Failed(message) => {
            assert!(message.contains("exited unexpectedly"), "{message}")
        }
        other => panic!("after a QEMU crash: {other:?}"),
    }
    assert_eq!(sh(&runtime, &bystander, "cat /root/b").await, "before\n");

    // A fresh runtime over the same state (a server restart) re-adopts the running VM.
    drop(runtime);
    let runtime = microvm_in(state.path());
    let adopted = runtime.adopt().await.unwrap();
    assert!(
        adopted
            .iter()
            .any(|(id, s)| *id == bystander && matches!(s, SandboxState::Running { .. })),
        "{adopted:?}"
    );
    assert_eq!(sh(&runtime, &bystander, "cat /root/b").await, "before\n");
    // The failed one can start again, with its files.
    runtime.start(&victim).await.unwrap();
    sh(&runtime, &victim, "true").await;
    for id in [victim, bystander] {
        runtime.destroy(&id).await.unwrap();
    }
}

/// The disk limit is real (ENOSPC), and capture is refused, running or stopped, without the
/// host ever mounting the guest-written disk (no mount of it appears on the host).
#[tokio::test]
async fn disk_quota_holds_and_capture_never_mounts_the_guest_disk() {
    let state = TestStateDir::new();
    let runtime = microvm_in(state.path());
    let id = boot(&runtime, vm_spec(&unique_id("disk"), small())).await;
    let client = connect(&*runtime, &id).await;
    let fill = exec(
        &client,
        "dd if=/dev/zero of=/root/fill bs=1M count=200 2>&1; sync",
    )
    .await;
    assert!(fill.stdout.contains("No space left"), "{fill:?}");
    let size = sh(&runtime, &id, "rm /root/fill && sync && echo ok").await;
    assert_eq!(size, "ok\n");

    for stopped in [false, true] {
        if stopped {
            runtime.stop(&id).await.unwrap();
        }
        let layer = state.path().join(format!("layer-{stopped}"));
        std::fs::create_dir(&layer).unwrap();
        let refused = runtime.capture(&id, &layer).await.unwrap_err();
        assert!(
            matches!(refused, cordon_runtime::RuntimeError::Unsupported(_)),
            "{refused}"
        );
        assert!(refused.to_string().contains("never mounted on the host"));
        assert_eq!(std::fs::read_dir(&layer).unwrap().count(), 0);
        assert_eq!(loop_devices_backed_by(&id), Vec::<String>::new());
    }
    runtime.start(&id).await.unwrap();
    assert_eq!(sh(&runtime, &id, "echo still-ok").await, "still-ok\n");
    runtime.destroy(&id).await.unwrap();
}

/// Host loop devices whose backing file belongs to sandbox `id`.
fn loop_devices_backed_by(id: &str) -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .unwrap()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"));
            backing.ok().filter(|b| b.contains(id)).map(|_| name)
        })
        .collect()
}
