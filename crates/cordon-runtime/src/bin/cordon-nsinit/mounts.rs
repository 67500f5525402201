//! Step 4: the sandbox's root filesystem, built in its own mount namespace by the init while
//! it is still host root.
//!
//! The overlay's layers are attached under a private tmpfs in the host-only sandbox dir and
//! named relative to it, so `/proc/self/mountinfo` inside shows `lowerdir=l0,upperdir=rw/upper`
//! rather than host paths. After `pivot_root` the system mounts are made on targets inside the
//! new root, whose tree the image and earlier runs control: each is opened without following
//! anything (`targets`), checked, and mounted onto by fd; a symlink or a file where a
//! directory belongs fails the boot with a message naming the path.

use std::fs::{self, DirBuilder};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use cordon_runtime::plan::{Jail, LaunchPlan, Payload, WritableLayer, JAIL_VM_DIR};
use nix::fcntl::{open, AtFlags, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fstat, makedev, mkdirat, mknodat, Mode, SFlag};
use nix::unistd::{fchownat, symlinkat, Gid, Uid};

use crate::sys::{self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
use crate::targets;

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

/// Symlinks of the minimal /dev: name, target.
const DEV_LINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

const TTY_GID: u32 = 5;

fn flags_nosuid_nodev() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV
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

/// Builds a jail root at `root` under the staging tmpfs (left the cwd): a small tmpfs holding
/// the jail's read-only host binds, its links, the VM's directory (read-write, noexec) and
/// the mount points `populate` fills, then made read-only. Nothing of the host is visible but
/// what the plan names. The host paths come from the runtime, never from a sandbox.
pub fn mount_jail_root(plan: &LaunchPlan, jail: &Jail) -> Result<()> {
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
    std::env::set_current_dir(&staging).context("chdir to staging")?;
    mkdir("root", 0o755)?;
    mount(
        Some("tmpfs"),
        "root",
        Some("tmpfs"),
        flags_nosuid_nodev(),
        Some("mode=755,size=256k,nr_inodes=256"),
    )
    .context("mount the jail root tmpfs")?;
    for dir in ["dev", "proc", "sys", "tmp"] {
        mkdir(Path::new("root").join(dir), 0o755)?;
    }
    let ro = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    for source in &jail.ro_binds {
        let relative = source
            .strip_prefix("/")
            .with_context(|| format!("jail bind {} is not absolute", source.display()))?;
        let target = Path::new("root").join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
        attach_layer(source, &target.to_string_lossy(), None, ro)
            .with_context(|| format!("bind {} read-only", source.display()))?;
    }
    for (name, target) in &jail.links {
        std::os::unix::fs::symlink(target, Path::new("root").join(name))
            .with_context(|| format!("symlink /{name}"))?;
    }
    let vm = format!("root{JAIL_VM_DIR}");
    attach_layer(
        &jail.vm_dir,
        &vm,
        None,
        sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV | sys::MOUNT_ATTR_NOEXEC,
    )
    .context("bind the VM directory")?;
    mount(
        None::<&str>,
        "root",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags_nosuid_nodev(),
        None::<&str>,
    )
    .context("make the jail root read-only")
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

/// What [`populate`] leaves the init: `/dev/null` of the sandbox's own `/dev`, open for
/// reading and writing (its stdin).
pub struct Populated {
    pub dev_null: OwnedFd,
}

/// The mounts made on the new root's directories; each fd is the root of its mount.
struct SystemMounts {
    proc: OwnedFd,
    sys: OwnedFd,
}

/// Mounts /dev, /proc, /sys and /tmp in the new root (the cwd and `/` after [`pivot_into`]).
///
/// The root's tree is sandbox-controlled (see `targets`): the four mount points are resolved
/// and checked first, so a symlink or a non-directory fails the boot with nothing mounted,
/// and every mount is attached onto the fd that was checked. Missing ones are created, as the
/// sandbox's root, in the writable layer.
pub fn populate(plan: &LaunchPlan) -> Result<Populated> {
    let root = open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .context("open the new root")?;
    let dev = mount_point(plan, root.as_fd(), "dev")?;
    let proc = mount_point(plan, root.as_fd(), "proc")?;
    let sys = mount_point(plan, root.as_fd(), "sys")?;
    let tmp = mount_point(plan, root.as_fd(), "tmp")?;

    let dev_null = mount_dev(plan, dev.as_fd())?;
    let system = SystemMounts {
        proc: attach_new_fs(
            "proc",
            "",
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            proc.as_fd(),
            "/proc",
        )?,
        sys: attach_new_fs(
            "sysfs",
            "ro",
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            sys.as_fd(),
            "/sys",
        )?,
    };
    if !plan.weaken.no_proc_masking {
        mask_paths(&system, dev_null.as_fd())?;
        make_read_only(&system)?;
    }
    let tmp_options = format!(
        "mode=1777,size={},nr_inodes={},uid={base},gid={base}",
        plan.tmp_size_bytes,
        plan.tmp_inodes,
        base = plan.id_base
    );
    attach_new_fs(
        "tmpfs",
        &tmp_options,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        tmp.as_fd(),
        "/tmp",
    )?;
    Ok(Populated { dev_null })
}

/// The directory `/name` of the new root, created when missing; anything else it could be
/// (a symlink above all) fails the boot.
fn mount_point(plan: &LaunchPlan, root: BorrowedFd<'_>, name: &str) -> Result<OwnedFd> {
    let shown = format!("/{name}");
    if let Some(found) = targets::find(root, name, &shown)? {
        return targets::expect_directory(found, &shown);
    }
    // mkdirat never follows a symlink in its last component, and the parent is the root fd.
    // Through the idmapped upper layer only the sandbox's ids are representable.
    let create = || {
        mkdirat(root, name, Mode::from_bits_truncate(0o755))
            .with_context(|| format!("create the mount point {shown}"))
    };
    if plan.weaken.no_user_namespace {
        create()?;
    } else {
        as_sandbox_root(plan.id_base, create)?;
    }
    let found = targets::find(root, name, &shown)?
        .with_context(|| format!("{shown} vanished after it was created"))?;
    targets::expect_directory(found, &shown)
}

/// "a=b,c" → `[("a", Some("b")), ("c", None)]`.
fn fs_params(options: &str) -> Vec<cordon_runtime::newmount::FsParam<'_>> {
    options
        .split(',')
        .filter(|option| !option.is_empty())
        .map(|option| match option.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (option, None),
        })
        .collect()
}

/// Creates a new `fstype` filesystem with `options` and attaches it onto `target`; returns
/// the fd of the new mount's root.
fn attach_new_fs(
    fstype: &str,
    options: &str,
    attrs: u64,
    target: BorrowedFd<'_>,
    shown: &str,
) -> Result<OwnedFd> {
    let mount = cordon_runtime::newmount::new_fs(fstype, fstype, &fs_params(options), attrs)
        .with_context(|| format!("create a {fstype} for {shown}"))?;
    sys::attach_tree_at(mount.as_fd(), target)
        .with_context(|| format!("mount {fstype} on {shown}"))?;
    Ok(mount)
}

/// A fresh tmpfs on `/dev` with the device nodes, links, devpts and shm, then made read-only.
/// Everything is created through the new mount's fd, so nothing in the image's `/dev` (a
/// `/dev/null` or `/dev/console` symlink, say) is ever looked at. Returns `/dev/null`.
fn mount_dev(plan: &LaunchPlan, target: BorrowedFd<'_>) -> Result<OwnedFd> {
    let options = format!(
        "mode=755,size=64k,nr_inodes=64,uid={base},gid={base}",
        base = plan.id_base
    );
    let dev = attach_new_fs(
        "tmpfs",
        &options,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        target,
        "/dev",
    )?;
    make_device_nodes(plan, dev.as_fd())?;
    for dir in ["pts", "shm"] {
        mkdirat(dev.as_fd(), dir, Mode::from_bits_truncate(0o755))
            .with_context(|| format!("mkdir /dev/{dir}"))?;
    }
    let pts = format!(
        "newinstance,ptmxmode=0666,mode=0620,gid={}",
        plan.id_base + TTY_GID
    );
    attach_new_fs(
        "devpts",
        &pts,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
        dev_dir(dev.as_fd(), "pts")?.as_fd(),
        "/dev/pts",
    )?;
    let shm = format!(
        "mode=1777,size={},nr_inodes=4096,uid={base},gid={base}",
        plan.tmp_size_bytes.min(64 << 20),
        base = plan.id_base
    );
    attach_new_fs(
        "tmpfs",
        &shm,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        dev_dir(dev.as_fd(), "shm")?.as_fd(),
        "/dev/shm",
    )?;
    let dev_null = open_dev_null(dev.as_fd())?;
    // The /dev tmpfs itself is done: nothing may add nodes or links to it later.
    sys::set_tree_attrs(&dev, None, MOUNT_ATTR_RDONLY).context("make /dev read-only")?;
    Ok(dev_null)
}

fn dev_dir(dev: BorrowedFd<'_>, name: &str) -> Result<OwnedFd> {
    let shown = format!("/dev/{name}");
    let found = targets::find(dev, name, &shown)?.with_context(|| format!("{shown} is missing"))?;
    targets::expect_directory(found, &shown)
}

fn make_device_nodes(plan: &LaunchPlan, dev: BorrowedFd<'_>) -> Result<()> {
    let old_umask = nix::sys::stat::umask(Mode::empty());
    let made = DEVICES.iter().try_for_each(|(name, major, minor)| {
        mknodat(
            dev,
            *name,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .with_context(|| format!("mknod /dev/{name}"))
    });
    nix::sys::stat::umask(old_umask);
    made?;
    make_jail_devices(plan, dev)?;
    for (link, target) in DEV_LINKS {
        symlinkat(*target, dev, *link).with_context(|| format!("symlink /dev/{link}"))?;
    }
    // Owned by the sandbox's root, as in any container (the tmpfs is made read-only later).
    let names = DEVICES.iter().map(|(name, _, _)| *name);
    for name in names.chain(DEV_LINKS.iter().map(|(link, _)| *link)) {
        let id = Some(plan.id_base);
        fchownat(
            dev,
            name,
            id.map(Uid::from_raw),
            id.map(Gid::from_raw),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("chown /dev/{name}"))?;
    }
    Ok(())
}

/// The extra device nodes of a jail (`/dev/kvm`), 0600 and owned by the range's id 0: the
/// jailed process, never anything else.
fn make_jail_devices(plan: &LaunchPlan, dev: BorrowedFd<'_>) -> Result<()> {
    let Payload::Jail(jail) = &plan.payload else {
        return Ok(());
    };
    for (name, major, minor) in &jail.devices {
        mknodat(
            dev,
            name.as_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(*major, *minor),
        )
        .with_context(|| format!("mknod /dev/{name}"))?;
        let id = Some(plan.id_base);
        fchownat(
            dev,
            name.as_str(),
            id.map(Uid::from_raw),
            id.map(Gid::from_raw),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("chown /dev/{name}"))?;
    }
    Ok(())
}

/// The `/dev/null` just made, checked to be the null device: it is bound over masked files.
fn open_dev_null(dev: BorrowedFd<'_>) -> Result<OwnedFd> {
    let null = targets::open_beneath(dev, "null", OFlag::O_RDWR).context("open /dev/null")?;
    let stat = fstat(&null).context("stat /dev/null")?;
    let is_char = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR;
    if !is_char || stat.st_rdev != makedev(1, 3) {
        bail!("/dev/null is not the null device");
    }
    Ok(null)
}

/// The mount root a masked or read-only path lives on, and the path below it.
fn locate<'a>(system: &'a SystemMounts, path: &'a str) -> (BorrowedFd<'a>, &'a str) {
    match (path.strip_prefix("/proc/"), path.strip_prefix("/sys/")) {
        (Some(below), _) => (system.proc.as_fd(), below),
        (_, Some(below)) => (system.sys.as_fd(), below),
        _ => unreachable!("masked and read-only paths are all under /proc or /sys"),
    }
}

fn mask_paths(system: &SystemMounts, dev_null: BorrowedFd<'_>) -> Result<()> {
    for path in MASKED {
        let (mount, below) = locate(system, path);
        let Some(found) = targets::find(mount, below, path)? else {
            continue;
        };
        match found.kind {
            // Only the kernel makes links in /proc and /sys; none is on the list.
            SFlag::S_IFLNK => continue,
            SFlag::S_IFDIR => {
                attach_new_fs(
                    "tmpfs",
                    "size=0,nr_inodes=1,mode=0500",
                    MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                    found.fd.as_fd(),
                    path,
                )
                .with_context(|| format!("mask {path}"))?;
            }
            _ => {
                let null = sys::clone_tree_at(dev_null).context("bind /dev/null")?;
                sys::attach_tree_at(null.as_fd(), found.fd.as_fd())
                    .with_context(|| format!("mask {path}"))?;
            }
        }
    }
    Ok(())
}

fn make_read_only(system: &SystemMounts) -> Result<()> {
    for path in READ_ONLY {
        let (mount, below) = locate(system, path);
        let Some(found) = targets::find(mount, below, path)? else {
            continue;
        };
        if matches!(found.kind, SFlag::S_IFLNK | SFlag::S_IFSOCK) {
            continue;
        }
        let tree = sys::clone_tree_at(found.fd.as_fd()).with_context(|| format!("bind {path}"))?;
        sys::set_tree_attrs(
            &tree,
            None,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )
        .with_context(|| format!("make {path} read-only"))?;
        sys::attach_tree_at(tree.as_fd(), found.fd.as_fd())
            .with_context(|| format!("mount {path} read-only"))?;
    }
    Ok(())
}
