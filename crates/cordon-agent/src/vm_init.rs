//! The agent as a microVM's init (PID 1 with no `--listen-*` arguments; the initramfs's
//! `/init`). The guest kernel is not a security boundary (guest root is assumed; the VM is
//! the boundary), so this is plain, fast boot plumbing:
//!
//! 1. `/dev` (devtmpfs), `/proc`, `/sys`; stdio on `/dev/null` until the console exists.
//! 2. The modules listed in `/modules/load-order` (finit_module), then module loading is
//!    disabled for good (`kernel.modules_disabled = 1`). stdout/stderr go to `/dev/hvc0`.
//! 3. The disks, found by virtio serial (never by `vdX` order): `cordon-l0..l{N-1}` read-only
//!    layers (top first) and `cordon-rw` (the writable layer's `upper/` and `work/`). The
//!    overlay is assembled like the namespace backend's (`redirect_dir=nofollow,
//!    metacopy=off`), `/dev`, `/proc` and `/sys` are moved into it, fresh devpts, `/dev/shm`
//!    and `/tmp` are mounted, the layer mount points are detached and the initramfs emptied,
//!    and the overlay is moved onto `/` and chrooted into (switch_root).
//! 4. Hostname (`cordon.hostname=`, default `sandbox`) and `lo`; then the agent's router is
//!    served over the virtio-serial port named `cordon.channel`, one session per host
//!    connection (`cordon_channel::vm_link` starts each one cleanly).
//!
//! Anything fatal is written to the console and the VM powers off.

use std::fs;
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The virtio-serial port the host's channel is attached to.
pub const CHANNEL_PORT_NAME: &str = "cordon.channel";
/// Disk serials (`-device virtio-blk-device,serial=…`).
pub const RW_DISK_SERIAL: &str = "cordon-rw";
pub const LAYER_DISK_SERIAL_PREFIX: &str = "cordon-l";
/// The most read-only layers a guest accepts (`cordon.layers=`).
pub const MAX_LAYERS: usize = 64;
/// How long the disks and the console may take to appear (TCG boots are slow).
const DEVICE_WAIT: Duration = Duration::from_secs(30);
const CONSOLE_WAIT: Duration = Duration::from_secs(5);
/// How often a disconnected channel is checked for a host.
const HOST_POLL: Duration = Duration::from_millis(20);
const MODULES_DIR: &str = "/modules";
const LOAD_ORDER: &str = "/modules/load-order";
/// Where the guest assembles its root before switching to it (in the initramfs).
const STAGING: &str = "/cordon";
const DEFAULT_HOSTNAME: &str = "sandbox";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether this process is a microVM's init: PID 1, and not launched by the namespace
/// backend (which always passes `--listen-fd`; tests pass `--listen-unix`).
pub fn is_vm_init() -> bool {
    std::process::id() == 1 && !std::env::args().any(|arg| arg.starts_with("--listen"))
}

/// What the booted guest hands to the agent.
pub struct Booted {
    /// The writable disk's root directory (for sync and freeze).
    pub rw_root: OwnedFd,
    /// The channel's character device, e.g. `/dev/vport0p1`.
    pub channel: PathBuf,
}

/// The guest's kernel command line settings.
#[derive(Debug, PartialEq, Eq)]
struct Cmdline {
    layers: usize,
    hostname: String,
}

fn parse_cmdline(text: &str) -> anyhow::Result<Cmdline> {
    let mut layers = None;
    let mut hostname = DEFAULT_HOSTNAME.to_string();
    for word in text.split_whitespace() {
        if let Some(value) = word.strip_prefix("cordon.layers=") {
            let count: usize = value.parse().context("cordon.layers= is not a number")?;
            if count > MAX_LAYERS {
                bail!("cordon.layers={count}: at most {MAX_LAYERS}");
            }
            layers = Some(count);
        } else if let Some(value) = word.strip_prefix("cordon.hostname=") {
            if value.is_empty() || value.len() > 64 {
                bail!("cordon.hostname= must be 1..=64 bytes");
            }
            hostname = value.to_string();
        }
    }
    Ok(Cmdline {
        layers: layers.context("no cordon.layers= on the kernel command line")?,
        hostname,
    })
}

/// Steps 1–4 up to serving (synchronous, before any thread exists).
pub fn boot() -> anyhow::Result<Booted> {
    let started = Instant::now();
    mount_early_filesystems()?;
    std::env::set_var("PATH", PATH);
    let cmdline_text = fs::read_to_string("/proc/cmdline")?;
    let cmdline = parse_cmdline(&cmdline_text)?;
    set_wall_clock(&cmdline_text);
    load_modules()?;
    fs::write("/proc/sys/kernel/modules_disabled", "1").context("disable module loading")?;
    attach_console();
    eprintln!(
        "cordon-agent: modules loaded after {:?} of init",
        started.elapsed()
    );
    let disks = wait_for_disks(cmdline.layers)?;
    let rw_root = assemble_root(&disks)?;
    switch_root()?;
    nix::unistd::sethostname(&cmdline.hostname).context("set the hostname")?;
    loopback_up().context("bring lo up")?;
    let channel = find_channel_port()?;
    eprintln!(
        "cordon-agent: root assembled after {:?} of init",
        started.elapsed()
    );
    Ok(Booted { rw_root, channel })
}

/// The host's launch time in Unix milliseconds (`cordon.epoch_ms=`), if given and sane.
fn launch_epoch_ms(cmdline: &str) -> Option<u64> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix("cordon.epoch_ms="))
        .and_then(|value| value.parse().ok())
}

/// Sets CLOCK_REALTIME to the host's launch time plus this guest's uptime: the microvm
/// machine has no RTC, and a guest stuck in 1970 rejects every TLS certificate. Best effort:
/// a guest without the parameter keeps its clock (logged).
fn set_wall_clock(cmdline: &str) {
    let Some(epoch_ms) = launch_epoch_ms(cmdline) else {
        eprintln!("cordon-agent: no cordon.epoch_ms= on the kernel command line: clock not set");
        return;
    };
    let mut boot = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass.
    let uptime = if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut boot) } == 0 {
        Duration::new(boot.tv_sec as u64, boot.tv_nsec as u32)
    } else {
        Duration::ZERO
    };
    let now = Duration::from_millis(epoch_ms) + uptime;
    let spec = libc::timespec {
        tv_sec: now.as_secs() as libc::time_t,
        tv_nsec: now.subsec_nanos() as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass and has no other memory effects.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &spec) } != 0 {
        eprintln!(
            "cordon-agent: could not set the clock: {}",
            io::Error::last_os_error()
        );
    }
}

fn mount_early_filesystems() -> anyhow::Result<()> {
    for (source, target, fstype) in [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
    ] {
        fs::create_dir_all(target)?;
        mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .with_context(|| format!("mount {fstype} on {target}"))?;
    }
    // The kernel found no console to give us (virtio-console is a module): fds 0-2 may be
    // closed, and the first files we open must not land on them.
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: F_GETFD only reads flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: dup2 onto a closed standard fd.
            if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                return Err(io::Error::last_os_error().into());
            }
        }
    }
    Ok(())
}

fn load_modules() -> anyhow::Result<()> {
    let order = fs::read_to_string(LOAD_ORDER).with_context(|| format!("read {LOAD_ORDER}"))?;
    for name in order.lines().map(str::trim).filter(|n| !n.is_empty()) {
        if name.contains('/') {
            bail!("bad module name {name:?} in {LOAD_ORDER}");
        }
        let path = Path::new(MODULES_DIR).join(name);
        let file = fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let params = c"";
        // SAFETY: finit_module reads the module from the fd and the NUL-terminated params.
        let result =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if result < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EEXIST) {
                return Err(error).with_context(|| format!("load module {name}"));
            }
        }
    }
    Ok(())
}

/// stdout and stderr to the virtio console (`hvc0`), the host's log of this VM.
fn attach_console() {
    let deadline = Instant::now() + CONSOLE_WAIT;
    loop {
        let opened = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/hvc0");
        match opened {
            Ok(console) => {
                for fd in [1, 2] {
                    // SAFETY: replaces our own stdout/stderr; nothing holds them as owned.
                    unsafe { libc::dup2(console.as_raw_fd(), fd) };
                }
                return;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return, // no console device: the VM runs without a log
        }
    }
}

/// The disks the guest needs, by serial: `(rw device, layer devices top first)`.
struct Disks {
    rw: PathBuf,
    layers: Vec<PathBuf>,
}

fn wait_for_disks(layers: usize) -> anyhow::Result<Disks> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        let found = disks_by_serial()?;
        let wanted = |serial: &str| {
            found
                .iter()
                .find(|(s, _)| s == serial)
                .map(|(_, d)| d.clone())
        };
        let rw = wanted(RW_DISK_SERIAL);
        let layer_devices: Vec<_> = (0..layers)
            .map_while(|i| wanted(&format!("{LAYER_DISK_SERIAL_PREFIX}{i}")))
            .collect();
        if let (Some(rw), true) = (rw.clone(), layer_devices.len() == layers) {
            return Ok(Disks {
                rw,
                layers: layer_devices,
            });
        }
        if Instant::now() >= deadline {
            bail!(
                "disks missing after {DEVICE_WAIT:?}: want {RW_DISK_SERIAL} and {layers} layers, \
                 found {found:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `(serial, /dev/vdX)` of every virtio disk present now.
fn disks_by_serial() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut disks = Vec::new();
    for entry in fs::read_dir("/sys/block")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        if let Ok(serial) = fs::read_to_string(format!("/sys/block/{name}/serial")) {
            disks.push((
                serial.trim().to_string(),
                PathBuf::from(format!("/dev/{name}")),
            ));
        }
    }
    Ok(disks)
}

/// Mounts the layers and the writable disk, the overlay over them at `STAGING/root`, and the
/// API filesystems inside it. Returns the writable disk's root, held open.
fn assemble_root(disks: &Disks) -> anyhow::Result<OwnedFd> {
    let staging = Path::new(STAGING);
    let mut lowers = Vec::new();
    for (i, device) in disks.layers.iter().enumerate() {
        let target = staging.join(format!("l{i}"));
        fs::create_dir_all(&target)?;
        // `noload`: a read-only device cannot replay a journal, and a layer never needs one.
        mount_ext4(device, &target, MsFlags::MS_RDONLY, "noload")?;
        lowers.push(target);
    }
    if lowers.is_empty() {
        // overlayfs needs a lower layer: an empty directory stands for "no layers".
        let empty = staging.join("empty");
        fs::create_dir_all(&empty)?;
        lowers.push(empty);
    }
    let rw = staging.join("rw");
    fs::create_dir_all(&rw)?;
    mount_ext4(&disks.rw, &rw, MsFlags::empty(), "")?;
    let rw_root = fs::File::open(&rw)?.into();

    let root = staging.join("root");
    fs::create_dir_all(&root)?;
    let lowerdir = lowers
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let options = format!(
        "lowerdir={lowerdir},upperdir={0}/upper,workdir={0}/work,redirect_dir=nofollow,metacopy=off",
        rw.display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::MS_NOSUID,
        Some(options.as_str()),
    )
    .context("mount the overlay root")?;
    // The overlay holds its own references to its layers: the mount points can go, so
    // nothing inside the sandbox sees them.
    for target in lowers.iter().chain([&rw]) {
        if target.ends_with("empty") {
            continue;
        }
        umount2(target, MntFlags::MNT_DETACH)
            .with_context(|| format!("detach {}", target.display()))?;
    }
    mount_api_filesystems(&root)?;
    Ok(rw_root)
}

fn mount_ext4(device: &Path, target: &Path, flags: MsFlags, options: &str) -> anyhow::Result<()> {
    mount(
        Some(device),
        target,
        Some("ext4"),
        flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .with_context(|| format!("mount {} (ext4) on {}", device.display(), target.display()))
}

/// `/dev`, `/proc` and `/sys` moved in from the initramfs; devpts, `/dev/shm` and `/tmp` new.
/// A target the image lacks is created (in the writable layer).
fn mount_api_filesystems(root: &Path) -> anyhow::Result<()> {
    for name in ["dev", "proc", "sys"] {
        let target = ensure_dir(root, name)?;
        mount(
            Some(Path::new("/").join(name).as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .with_context(|| format!("move /{name} into the new root"))?;
    }
    let pts = ensure_dir(root, "dev/pts")?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .context("mount devpts")?;
    let shm = ensure_dir(root, "dev/shm")?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .context("mount /dev/shm")?;
    let tmp = ensure_dir(root, "tmp")?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .context("mount /tmp")?;
    Ok(())
}

/// `root/name` as a directory: created when missing; a non-directory is an error (a broken
/// image should fail the boot with a message, not be mounted over).
fn ensure_dir(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = root.join(name);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => Ok(path),
        Ok(_) => bail!("/{name} in the sandbox's image is not a directory"),
        Err(_) => {
            fs::create_dir_all(&path).with_context(|| format!("create /{name}"))?;
            Ok(path)
        }
    }
}

/// Frees the initramfs's memory and makes the assembled overlay the root (`switch_root`:
/// the initramfs cannot be pivot_root'ed away).
fn switch_root() -> anyhow::Result<()> {
    for path in ["/init", MODULES_DIR] {
        let _ = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path));
    }
    let root = Path::new(STAGING).join("root");
    std::env::set_current_dir(&root)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("move the new root onto /")?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    std::env::set_current_dir("/")?;
    Ok(())
}

fn loopback_up() -> io::Result<()> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `request`, which lives across the calls.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `/dev/<port>` of the virtio-serial port named [`CHANNEL_PORT_NAME`].
fn find_channel_port() -> anyhow::Result<PathBuf> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if name.trim() == CHANNEL_PORT_NAME {
                    return Ok(Path::new("/dev").join(entry.file_name()));
                }
            }
        }
        if Instant::now() >= deadline {
            bail!("no virtio-serial port named {CHANNEL_PORT_NAME}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes `error` to the console and powers the VM off.
pub fn fatal(error: &anyhow::Error) -> ! {
    let message = format!("cordon-agent: vm init failed: {error:#}\n");
    let _ = io::stderr().write_all(message.as_bytes());
    if let Ok(mut kmsg) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(message.as_bytes());
    }
    power_off()
}

/// Syncs and powers the VM off (QEMU exits). Never returns.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; as PID 1 we may power off.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    // Only reached if the kernel refused; PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Serves host connections on the channel port forever: for each, waits for the host, runs
/// the `vm_link` handshake and hands the port to `serve_session` until the session ends.
pub async fn serve_channel<F, Fut>(channel: &Path, mut serve_session: F) -> !
where
    F: FnMut(VirtioPort) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let mut port = match VirtioPort::open_when_connected(channel).await {
            Ok(port) => port,
            Err(error) => {
                // EBUSY right after the previous session's close: try again shortly.
                tracing::warn!(%error, "cannot open the channel port");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match cordon_channel::vm_link::guest_accept(&mut port).await {
            Ok(true) => {
                tracing::info!("host connected");
                // On a worker like the namespace agent's sessions, not on the thread that
                // runs `block_on`.
                if let Err(error) = tokio::spawn(serve_session(port)).await {
                    tracing::warn!(%error, "host session task failed");
                }
                tracing::info!("host session ended");
            }
            Ok(false) => tracing::debug!("host left during the handshake"),
            Err(error) => tracing::warn!(%error, "channel handshake failed"),
        }
    }
}

/// The guest end of a virtio-serial port, as a tokio byte stream. Reads return end of file
/// once the host has disconnected (and everything it sent was read).
pub struct VirtioPort {
    fd: AsyncFd<OwnedFd>,
}

impl VirtioPort {
    /// Opens the port once a host is connected to it. The port reports POLLHUP while none is,
    /// and tokio never forgets a hang-up it has seen (it would make every later wait return
    /// at once), so the fd is registered with the runtime only after the hang-up is gone; a
    /// hang-up during the session then ends it (see the `poll_*` methods).
    async fn open_when_connected(path: &Path) -> io::Result<VirtioPort> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)?;
        let fd = OwnedFd::from(file);
        // There is no readiness edge for "no longer hung up", so this polls.
        while hung_up(&fd) {
            tokio::time::sleep(HOST_POLL).await;
        }
        // SAFETY: the `OwnedFd` is open, and the `AsyncFd` owns it until it deregisters and
        // closes it, so the raw fd stays valid and the same for the registration's lifetime.
        let fd = unsafe {
            AsyncFd::register_with_interest(
                fd,
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
            )
        }?;
        Ok(VirtioPort { fd })
    }
}

/// Whether the port has no host connected now.
fn hung_up(fd: &OwnedFd) -> bool {
    let mut poll = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO) {
        Ok(_) => poll[0]
            .revents()
            .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP)),
        Err(_) => true,
    }
}

fn raw_io(result: isize) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}

impl AsyncRead for VirtioPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let hung_up = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            let fd: RawFd = guard.get_inner().as_raw_fd();
            // SAFETY: reads at most `unfilled.len()` bytes into `unfilled`.
            let result = guard.try_io(|_| {
                raw_io(unsafe { libc::read(fd, unfilled.as_mut_ptr().cast(), unfilled.len()) })
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                // The host hung up since registration (and may be back): this session is
                // over either way; end of file ends it.
                Err(_would_block) if hung_up => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VirtioPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let hung_up = guard.ready().is_write_closed();
            let fd: RawFd = guard.get_inner().as_raw_fd();
            // SAFETY: writes at most `data.len()` bytes from `data`.
            let result = guard
                .try_io(|_| raw_io(unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) }));
            match result {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) if hung_up => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_settings_are_parsed_and_bounded() {
        let parsed =
            parse_cmdline("console=hvc0 quiet cordon.layers=2 cordon.hostname=box1\n").unwrap();
        assert_eq!(
            parsed,
            Cmdline {
                layers: 2,
                hostname: "box1".into()
            }
        );
        assert_eq!(
            parse_cmdline("cordon.layers=0").unwrap().hostname,
            "sandbox"
        );
        assert_eq!(
            launch_epoch_ms("quiet cordon.epoch_ms=1795753741123 cordon.layers=1"),
            Some(1_795_753_741_123)
        );
        assert_eq!(launch_epoch_ms("cordon.epoch_ms=soon"), None);
        assert!(parse_cmdline("quiet").is_err());
        assert!(parse_cmdline("cordon.layers=x").is_err());
        assert!(parse_cmdline("cordon.layers=65").is_err());
        assert!(parse_cmdline("cordon.layers=1 cordon.hostname=").is_err());
    }
}
