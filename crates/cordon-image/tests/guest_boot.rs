//! The microVM guest for real: the kernel prepared from Debian's package (shared cache:
//! `CORDON_CACHE_DIR`, else `/var/cache/cordon`; seconds the first time), an initramfs with
//! the static agent, booted by a bare QEMU `microvm` under TCG with a read-only layer disk and
//! a writable disk, and the agent reached over the virtio-serial channel: health, a command
//! that sees the overlay, the host-only controls, a host reconnect, power-off.
//!
//! Needs root (the cache), apt's package lists, `qemu-system-x86_64`, e2fsprogs and the static
//! agent (`make agent`). The runtime's own tests (cordon-runtime `microvm`) boot it jailed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cordon_channel::{vm_link, AgentClient};
use cordon_image::guest::{self, GuestKernel, KernelBoot};
use http_body_util::BodyExt;
use tokio::net::UnixStream;

fn cache_dir() -> PathBuf {
    std::env::var_os("CORDON_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(guest::DEFAULT_CACHE_DIR))
}

fn prepared() -> GuestKernel {
    let started = Instant::now();
    let kernel =
        guest::prepare_guest_kernel(&cache_dir(), &mut |line| eprintln!("prepare: {line}"))
            .expect("prepare the guest kernel");
    eprintln!(
        "guest kernel {} ready in {:?}",
        kernel.release,
        started.elapsed()
    );
    kernel
}

#[test]
fn the_prepared_kernel_is_pvh_with_the_module_closure() {
    let kernel = prepared();
    assert_eq!(
        kernel.boot,
        KernelBoot::PvhElf,
        "the cloud kernel has CONFIG_PVH"
    );
    let names: Vec<String> = kernel
        .modules
        .iter()
        .map(|m| m.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let position = |name: &str| {
        names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} missing from {names:?}"))
    };
    // Dependencies first; ext4 is built in, so it is not a module here.
    assert!(position("virtio_ring.ko") < position("virtio.ko"));
    assert!(position("virtio.ko") < position("virtio_mmio.ko"));
    for needed in ["virtio_blk.ko", "virtio_console.ko", "overlay.ko"] {
        position(needed);
    }
    assert!(!names.iter().any(|n| n == "ext4.ko"), "{names:?}");
    assert!(names.len() <= 8, "only what the guest needs: {names:?}");
    for module in &kernel.modules {
        assert!(module.is_file(), "{}", module.display());
    }
    // A second call finds the finished cache.
    let started = Instant::now();
    assert_eq!(prepared(), kernel);
    assert!(started.elapsed() < Duration::from_secs(1));
}

fn mkfs_ext4(image: &Path, from: &Path, megabytes: u64) {
    std::fs::File::create(image)
        .unwrap()
        .set_len(megabytes << 20)
        .unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", "root_owner=0:0", "-d"])
        .arg(from)
        .arg(image)
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(status.success());
}

/// A guest booted by a bare QEMU under TCG, killed on drop.
struct Guest {
    qemu: Child,
    socket: PathBuf,
    console: PathBuf,
    started: Instant,
    _dir: tempfile::TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

fn boot(kernel: &GuestKernel) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let initramfs = dir.path().join("initramfs.cpio");
    guest::build_initramfs(kernel, &cordon_testkit::agent_binary(), &initramfs).unwrap();
    let layer = dir.path().join("l0.img");
    mkfs_ext4(&layer, &cordon_testkit::test_rootfs(), 64);
    let seed = dir.path().join("rw-seed");
    std::fs::create_dir_all(seed.join("upper")).unwrap();
    std::fs::create_dir_all(seed.join("work")).unwrap();
    let rw = dir.path().join("rw.img");
    mkfs_ext4(&rw, &seed, 64);
    let socket = dir.path().join("agent.sock");
    let console = dir.path().join("console.log");
    let started = Instant::now();
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            // The PIT stays on under TCG: with no kvmclock, the kernel calibrates its TSC
            // against it, and hangs without one.
            "microvm,x-option-roms=off,pit=on,pic=off,rtc=off,isa-serial=off",
            "-accel",
            "tcg",
            // RDRAND seeds the guest's CRNG at boot; without it getrandom() blocks for long.
            "-cpu",
            "max",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(format!(
            "console=hvc0 quiet panic=-1 {} cordon.layers=1 cordon.hostname=vmtest {}",
            guest::tcg_kernel_args(),
            // The kernel hands `NAME=value` words it does not know to init's environment.
            std::env::var("CORDON_AGENT_LOG")
                .map(|filter| format!("CORDON_AGENT_LOG={filter}"))
                .unwrap_or_default()
        ))
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", console.display()))
        .args(["-device", "virtconsole,chardev=console"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=channel,path={},server=on,wait=off",
            socket.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=channel,name=cordon.channel",
        ])
        .arg("-drive")
        .arg(format!("id=rw,file={},format=raw,if=none", rw.display()))
        .args(["-device", "virtio-blk-device,drive=rw,serial=cordon-rw"])
        .arg("-drive")
        .arg(format!(
            "id=l0,file={},format=raw,if=none,readonly=on",
            layer.display()
        ))
        .args(["-device", "virtio-blk-device,drive=l0,serial=cordon-l0"])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (qemu-system-x86)");
    Guest {
        qemu,
        socket,
        console,
        started,
        _dir: dir,
    }
}

impl Guest {
    /// Connects to the channel socket and runs the handshake.
    async fn connect(&self, timeout: Duration) -> AgentClient {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match UnixStream::connect(&self.socket).await {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(error) => panic!("connect: {error}; console:\n{}", self.console_log()),
            }
        };
        eprintln!(
            "connected to the channel socket after {:?}",
            self.started.elapsed()
        );
        if let Err(error) = vm_link::host_connect(&mut stream, timeout).await {
            panic!("handshake: {error}; console:\n{}", self.console_log());
        }
        AgentClient::connect(stream)
    }

    fn console_log(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

/// One request, bounded (a hung guest fails the test with its console instead of hanging it).
async fn call(client: &AgentClient, method: &str, path: &str, body: &str) -> (u16, String) {
    tokio::time::timeout(
        Duration::from_secs(120),
        call_unbounded(client, method, path, body),
    )
    .await
    .unwrap_or_else(|_| {
        let console = std::fs::read_to_string(CONSOLE_COPY.get().unwrap()).unwrap_or_default();
        panic!("{method} {path}: no answer in 30 s; console:\n{console}")
    })
}

/// Where the running test's console log is, for [`call`]'s panic message.
static CONSOLE_COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

async fn call_unbounded(
    client: &AgentClient,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "agent")
        .header("content-type", "application/json")
        .body(Bytes::from(body.to_string()))
        .unwrap();
    let response = client.request_bytes(request).await.expect("agent request");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn sh(client: &AgentClient, command: &str) -> String {
    let body = serde_json::json!({"command": command, "shell": "/bin/sh", "timeout": 60});
    let (status, answer) = call(client, "POST", "/execute", &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["exit_code"], 0, "{answer}");
    answer["stdout"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_boots_under_tcg_and_serves_the_agent_over_virtio_serial() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no qemu-system-x86_64");
        return;
    }
    let kernel = prepared();
    let mut guest = boot(&kernel);
    CONSOLE_COPY.set(guest.console.clone()).unwrap();
    eprintln!("booting; console log at {}", guest.console.display());
    let client = guest.connect(Duration::from_secs(120)).await;
    let (status, health) = call(&client, "GET", "/_cordon/health", "").await;
    assert_eq!(status, 200, "{health}");
    eprintln!(
        "boot to agent ready (TCG, bare QEMU): {:?}",
        guest.started.elapsed()
    );

    // The overlay root: the layer's busybox, a writable upper, the API filesystems, the
    // hostname, and only the expected virtio devices.
    let seen = sh(
        &client,
        "hostname; echo hi > /written && cat /written; ls /bin/busybox; \
         grep -c overlay /proc/mounts; ls /sys/bus/virtio/devices | wc -l; \
         cat /proc/sys/kernel/modules_disabled; test -d /dev/pts && echo pts",
    )
    .await;
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "vmtest", "{seen}");
    assert_eq!(lines[1], "hi", "{seen}");
    assert_eq!(lines[2], "/bin/busybox", "{seen}");
    assert_eq!(lines[3], "1", "one overlay, the root: {seen}");
    // virtio-serial, console port bus, two disks: 3 virtio-mmio devices.
    assert_eq!(lines[4], "3", "{seen}");
    assert_eq!(lines[5], "1", "module loading disabled: {seen}");
    assert_eq!(lines[6], "pts", "{seen}");

    // Host-only controls.
    assert_eq!(call(&client, "POST", "/_cordon/sync", "").await.0, 204);
    assert_eq!(
        call(&client, "POST", "/_cordon/freeze", r#"{"timeout_secs": 2}"#)
            .await
            .0,
        204
    );
    assert_eq!(call(&client, "POST", "/_cordon/freeze", "").await.0, 409);
    assert_eq!(call(&client, "POST", "/_cordon/thaw", "").await.0, 204);
    assert_eq!(
        call(&client, "POST", "/_cordon/freeze", r#"{"timeout_secs": 1}"#)
            .await
            .0,
        204
    );
    // Thawed by itself: a write completes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sh(&client, "echo again > /written && sync && echo ok")
            .await
            .trim(),
        "ok"
    );

    // A new host connection (a server restart) gets a fresh session on the same port.
    drop(client);
    let client = guest.connect(Duration::from_secs(60)).await;
    assert_eq!(sh(&client, "cat /written").await.trim(), "again");

    assert_eq!(call(&client, "POST", "/_cordon/poweroff", "").await.0, 204);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = guest.qemu.try_wait().unwrap() {
            eprintln!("QEMU exited ({status}) after power-off");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no power-off; console:\n{}",
            guest.console_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
