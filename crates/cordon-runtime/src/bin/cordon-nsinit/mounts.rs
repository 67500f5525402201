//! Step 4: the sandbox's root filesystem, built in its own mount namespace by the init while
//! it is still host root.
//!
//! The overlay's layers are attached under a private tmpfs in the host-only sandbox dir and
//! named relative to it, so `/proc/self/mountinfo` inside shows `lowerdir=l0,upperdir=rw/upper`
//! rather than host paths. After `pivot_root` everything is resolved inside the new root, and
//! a mount target that is a symlink (the writable layer is sandbox-controlled) fails the boot
//! instead of being followed.

use std::fs::{self, DirBuilder};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cordon_runtime::plan::{LaunchPlan, WritableLayer};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::sys;

/// runc's and podman's masked paths, united. Files get /dev/null bound over them,
/// directories an empty read-only tmpfs.
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/config.gz",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/dev/block",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
    "/sys/fs/selinux",
    "/sys/kernel/security",
];

/// Made read-only (runc's readonlyPaths; /proc/asound is masked above already).
const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Character devices of the minimal /dev: name, major, minor.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/ptmx", "pts/ptmx"),
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

const TTY_GID: u32 = 5;

fn flags_nosuid_nodev() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: &str) -> Result<()> {
    let data = (!data.is_empty()).then_some(data);
    mount(Some(fstype), target, Some(fstype), flags, data)
        .with_context(|| format!("mount {fstype} on {target}"))
}

fn mkdir(path: impl AsRef<Path>, mode: u32) -> Result<()> {
    let path = path.as_ref();
    match DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(e).with_context(|| format!("mkdir {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Mounts the overlay root at `root` under the staging tmpfs, which is left the cwd.
///
/// With `idmap` (always, unless the user namespace is weakened away) every layer is idmapped
/// to the sandbox's range, so the host-root-owned layers belong to the sandbox's root.
pub fn mount_root(plan: &LaunchPlan, idmap: Option<BorrowedFd<'_>>) -> Result<()> {
    // Nothing we mount may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private")?;
    let staging = plan.sandbox_dir.join("mnt");
    mkdir(&staging, 0o700)?;
    mount(
        Some("tmpfs"),
        &staging,
        Some("tmpfs"),
        flags_nosuid_nodev() | MsFlags::MS_NOEXEC,
        Some("mode=700,size=64k,nr_inodes=64"),
    )
    .context("mount the staging tmpfs")?;
    std::env::set_current_dir(&staging).context("chdir to staging")?;

    attach_writable_layer(&plan.writable, idmap)?;
    let mut lowers = Vec::new();
    for (index, layer) in plan.layers.iter().enumerate() {
        let name = format!("l{index}");
        attach_layer(
            layer,
            &name,
            idmap,
            sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
        )
        .with_context(|| format!("layer {}", layer.display()))?;
        lowers.push(name);
    }
    mkdir("root", 0o755)?;
    // No redirects and no metadata-only copy-ups, whatever the kernel's defaults: the upper
    // layer then stands on its own and can be captured as a layer (see layer_copy.rs). A
    // directory renamed from a lower layer gets EXDEV, and `mv` copies it instead.
    let options = format!(
        "lowerdir={},upperdir=rw/upper,workdir=rw/work,redirect_dir=nofollow,metacopy=off",
        lowers.join(":")
    );
    let mount_overlay = || {
        mount(
            Some("overlay"),
            "root",
            Some("overlay"),
            flags_nosuid_nodev(),
            Some(options.as_str()),
        )
        .context("mount the overlay root")
    };
    match idmap {
        Some(_) => as_sandbox_root(plan.id_base, mount_overlay),
        None => mount_overlay(),
    }
}

/// Runs `f` with fsuid/fsgid set to the sandbox root's host id, capabilities intact.
///
/// Overlayfs records its mounter's credentials and creates its work directories and copy-ups
/// with them. Through the idmapped upper layer only the sandbox's range is representable, so
/// host uid 0 would get EOVERFLOW; as the sandbox's root the upper layer is stored unshifted
/// (ids 0..65536 on disk), which also makes it usable as a lower layer of any other sandbox.
fn as_sandbox_root<T>(id_base: u32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    use caps::CapSet;
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(id_base));
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(id_base));
    // Leaving fsuid 0 cleared the file-system capabilities from the effective set.
    let raised = caps::read(None, CapSet::Permitted)
        .and_then(|permitted| caps::set(None, CapSet::Effective, &permitted))
        .context("raise capabilities for the overlay mount");
    let result = raised.and_then(|()| f());
    // Back to fsuid 0; the kernel restores the file-system capabilities with it.
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(0));
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(0));
    result
}

fn attach_layer(
    source: &Path,
    target: &str,
    idmap: Option<BorrowedFd<'_>>,
    attrs: u64,
) -> Result<()> {
    let tree = sys::clone_tree(source).context("open_tree")?;
    sys::set_tree_attrs(&tree, idmap, attrs).context("mount_setattr")?;
    mkdir(target, 0o700)?;
    sys::attach_tree(&tree, Path::new(target)).context("move_mount")?;
    Ok(())
}

/// Attaches the writable layer, idmapped, at `rw` (holding `upper/` and `work/`).
fn attach_writable_layer(layer: &WritableLayer, idmap: Option<BorrowedFd<'_>>) -> Result<()> {
    let attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    match layer {
        WritableLayer::Directory(dir) => {
            attach_layer(dir, "rw", idmap, attrs).context("writable layer")
        }
        WritableLayer::Ext4Image(image) => {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(image)
                .with_context(|| format!("open {}", image.display()))?;
            let (device, device_fd) = cordon_runtime::loopdev::attach(file.as_fd())
                .context("attach the disk image to a loop device")?;
            mkdir("disk", 0o700)?;
            // Autoclear detaches the loop device once this mount (held by the overlay) is gone.
            let mounted = mount(
                Some(device.as_str()),
                "disk",
                Some("ext4"),
                flags_nosuid_nodev(),
                // discard punches holes in the sparse image when files are deleted, so the
                // image's size on the host tracks what the sandbox really uses.
                Some("discard"),
            );
            drop((device_fd, file));
            mounted.with_context(|| format!("mount {device} (ext4)"))?;
            attach_layer(Path::new("disk"), "rw", idmap, attrs).context("writable layer")?;
            umount2("disk", MntFlags::MNT_DETACH).context("detach the plain disk mount")?;
            Ok(())
        }
    }
}

/// Pivots into the root `mount_root` made; returns with `/` and the cwd in the new root.
pub fn pivot_into(new_root: &str) -> Result<()> {
    std::env::set_current_dir(new_root).context("chdir to the new root")?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it drops
    // every host mount (and the staging tmpfs) from this namespace.
    nix::unistd::pivot_root(".", ".").context("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).context("detach the old root")?;
    std::env::set_current_dir("/").context("chdir /")?;
    Ok(())
}

/// A mount point inside the new root must be a real directory, never a symlink.
fn ensure_mount_dir(path: &str) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_dir() => Ok(()),
        Ok(_) => bail!("rootfs {path} is not a directory (a symlink?); refusing to mount over it"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => mkdir(path, 0o755),
        Err(e) => Err(e).with_context(|| format!("stat {path}")),
    }
}

/// Mounts /dev, /proc, /sys and /tmp in the new root.
pub fn populate(plan: &LaunchPlan) -> Result<()> {
    for dir in ["/dev", "/proc", "/sys", "/tmp"] {
        ensure_mount_dir(dir)?;
    }
    mount_dev(plan)?;
    mount_fs(
        "proc",
        "/proc",
        flags_nosuid_nodev() | MsFlags::MS_NOEXEC,
        "",
    )?;
    mount_fs(
        "sysfs",
        "/sys",
        flags_nosuid_nodev() | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        "",
    )?;
    if !plan.weaken.no_proc_masking {
        mask_paths()?;
        make_read_only()?;
    }
    let tmp = format!(
        "mode=1777,size={},nr_inodes={},uid={base},gid={base}",
        plan.tmp_size_bytes,
        plan.tmp_inodes,
        base = plan.id_base
    );
    mount_fs("tmpfs", "/tmp", flags_nosuid_nodev(), &tmp)
}

fn mount_dev(plan: &LaunchPlan) -> Result<()> {
    let dev_options = format!(
        "mode=755,size=64k,nr_inodes=64,uid={base},gid={base}",
        base = plan.id_base
    );
    mount_fs(
        "tmpfs",
        "/dev",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        &dev_options,
    )?;
    let old_umask = nix::sys::stat::umask(Mode::empty());
    for (name, major, minor) in DEVICES {
        let path = format!("/dev/{name}");
        mknod(
            path.as_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .with_context(|| format!("mknod {path}"))?;
    }
    nix::sys::stat::umask(old_umask);
    for (link, target) in DEV_LINKS {
        std::os::unix::fs::symlink(target, link).with_context(|| format!("symlink {link}"))?;
    }
    // Owned by the sandbox's root, as in any container (the tmpfs is made read-only below).
    let device_paths = DEVICES.iter().map(|(name, _, _)| format!("/dev/{name}"));
    for path in device_paths.chain(DEV_LINKS.iter().map(|(link, _)| link.to_string())) {
        std::os::unix::fs::lchown(&path, Some(plan.id_base), Some(plan.id_base))
            .with_context(|| format!("chown {path}"))?;
    }
    for dir in ["/dev/pts", "/dev/shm"] {
        mkdir(dir, 0o755)?;
    }
    let pts = format!(
        "newinstance,ptmxmode=0666,mode=0620,gid={}",
        plan.id_base + TTY_GID
    );
    mount_fs(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        &pts,
    )?;
    let shm = format!(
        "mode=1777,size={},nr_inodes=4096,uid={base},gid={base}",
        plan.tmp_size_bytes.min(64 << 20),
        base = plan.id_base
    );
    mount_fs(
        "tmpfs",
        "/dev/shm",
        flags_nosuid_nodev() | MsFlags::MS_NOEXEC,
        &shm,
    )?;
    // The /dev tmpfs itself is done: nothing may add nodes or links to it later.
    mount(
        None::<&str>,
        "/dev",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(dev_options.as_str()),
    )
    .context("remount /dev read-only")?;
    Ok(())
}

fn mask_paths() -> Result<()> {
    for path in MASKED {
        let Ok(meta) = fs::symlink_metadata(path) else {
            continue;
        };
        if meta.is_dir() {
            mount(
                Some("tmpfs"),
                *path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | flags_nosuid_nodev() | MsFlags::MS_NOEXEC,
                Some("size=0,nr_inodes=1,mode=0500"),
            )
            .with_context(|| format!("mask {path}"))?;
        } else if !meta.file_type().is_symlink() {
            mount(
                Some("/dev/null"),
                *path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("mask {path}"))?;
        }
    }
    Ok(())
}

fn make_read_only() -> Result<()> {
    for path in READ_ONLY {
        let Ok(meta) = fs::symlink_metadata(path) else {
            continue;
        };
        if meta.file_type().is_symlink() || meta.file_type().is_socket() {
            continue;
        }
        let target = PathBuf::from(path);
        mount(
            Some(&target),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("bind {path}"))?;
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | flags_nosuid_nodev()
            | MsFlags::MS_NOEXEC;
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
            .with_context(|| format!("remount {path} read-only"))?;
    }
    Ok(())
}
