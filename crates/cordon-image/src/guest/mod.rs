//! The microVM guest: a kernel from Debian's `linux-image-cloud-amd64` (fetched with apt and
//! unpacked once per host into the cache dir, like the default snapshot) and the initramfs the
//! microVM backend boots it with (the static agent as `/init`, plus the few modules it loads).
//!
//! ```text
//! <cache>/guest-kernel/<recipe hash>/
//!     vmlinux          uncompressed PVH-bootable ELF (or `vmlinuz`, the bzImage, if the
//!                      package's kernel could not be unpacked into one)
//!     modules/*.ko     exactly the modules the guest needs, and their dependencies
//!     kernel.json      package, release, boot format, module load order
//!     complete         the recipe hash, written last
//! ```
//!
//! The guest needs virtio-mmio (microvm's only bus), virtio-blk (its layers and writable disk),
//! virtio-console (the agent channel on a virtio-serial port, and the `hvc0` console), ext4
//! and overlayfs; the cloud kernel builds ext4 in and has the rest as modules.

mod cpio;
mod elf;
mod lz4;
mod modules;
mod vmlinux;

use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::{
    create_private_dir, discard_debris, lock_store, read_json, sync_filesystem, write_durably,
    write_json,
};
use crate::error::{ImageError, IoContext};
use crate::mounts::remove_tree;
use crate::process::{find_program, run_streamed, BUILD_PATH};

/// The Debian package whose kernel the guest runs (its dependency is the versioned package).
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Where `cordon prepare` keeps its builds unless told otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/cordon";
/// Modules the guest needs (dependencies are added; built-in ones are skipped).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    // The host's entropy: without it (and without RDRAND) getrandom() blocks for long after
    // boot under TCG, and the agent's first channel session with it.
    "virtio_rng",
    "ext4",
    "overlay",
];
/// Where the initramfs keeps the modules and their load order (one file name per line);
/// the agent's VM init reads these.
pub const INITRAMFS_MODULES_DIR: &str = "modules";
pub const INITRAMFS_LOAD_ORDER: &str = "modules/load-order";
/// Bump when the preparation below changes, to prepare again.
const GUEST_VERSION: u32 = 1;
const STORE_DIR: &str = "guest-kernel";
const MARKER: &str = "complete";
const METADATA: &str = "kernel.json";

/// How QEMU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelBoot {
    /// An uncompressed ELF with the Xen PVH entry note (fastest: no decompression, no
    /// real-mode setup).
    PvhElf,
    /// The compressed bzImage as packaged.
    BzImage,
}

/// A prepared guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    /// Its cache directory.
    pub dir: PathBuf,
    /// The image to pass to QEMU's `-kernel`.
    pub kernel: PathBuf,
    pub boot: KernelBoot,
    /// `uname -r` of the guest, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The versioned package it came from, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Module files in load order (dependencies first).
    pub modules: Vec<PathBuf>,
}

/// `kernel.json`.
#[derive(Debug, Serialize, Deserialize)]
struct KernelRecord {
    package: String,
    release: String,
    boot: KernelBoot,
    /// File names under `modules/`, in load order.
    modules: Vec<String>,
}

/// The cache key: everything the preparation depends on.
fn recipe_key() -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!(
        "version={GUEST_VERSION}\npackage={KERNEL_PACKAGE}\nmodules={}\n",
        GUEST_MODULES.join(",")
    ));
    format!("{:x}", hasher.finalize())[..16].to_string()
}

/// The prepared guest kernel in `cache_dir`, without preparing one (for a server that must
/// say "run `cordon prepare`" rather than start a download).
pub fn load_guest_kernel(cache_dir: &Path) -> Option<GuestKernel> {
    let key = recipe_key();
    let dir = cache_dir.join(STORE_DIR).join(&key);
    let marker = fs::read_to_string(dir.join(MARKER)).ok()?;
    if marker != key {
        return None;
    }
    let record: KernelRecord = read_json(&dir.join(METADATA)).ok()?;
    let kernel = dir.join(match record.boot {
        KernelBoot::PvhElf => "vmlinux",
        KernelBoot::BzImage => "vmlinuz",
    });
    Some(GuestKernel {
        kernel,
        boot: record.boot,
        release: record.release,
        package: record.package,
        modules: record
            .modules
            .iter()
            .map(|name| dir.join(INITRAMFS_MODULES_DIR).join(name))
            .collect(),
        dir,
    })
}

/// The guest kernel, fetching and unpacking it first when this host has none (seconds; needs
/// apt's package lists and write access to `cache_dir`). Blocking; concurrent callers wait for
/// one preparation.
pub fn prepare_guest_kernel(
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<GuestKernel, ImageError> {
    if let Some(guest) = load_guest_kernel(cache_dir) {
        return Ok(guest);
    }
    let key = recipe_key();
    let store = cache_dir.join(STORE_DIR);
    create_private_dir(&store)?;
    let _lock = lock_store(&store, progress)?;
    if let Some(guest) = load_guest_kernel(cache_dir) {
        return Ok(guest);
    }
    let finished = store.join(&key);
    discard_debris(&finished, progress)?;
    let staging = store.join(format!(".{key}.staging"));
    discard_debris(&staging, progress)?;
    create_private_dir(&staging)?;
    let prepared = prepare_into(&staging, &key, progress).and_then(|()| {
        fs::rename(&staging, &finished)
            .context(|| format!("rename {} to {}", staging.display(), finished.display()))
    });
    if let Err(error) = prepared {
        if let Err(cleanup) = remove_tree(&staging) {
            tracing::warn!(%cleanup, "could not discard the failed guest kernel");
        }
        return Err(error);
    }
    load_guest_kernel(cache_dir).ok_or_else(|| {
        ImageError::InvalidImage(format!(
            "{} vanished after preparing it",
            finished.display()
        ))
    })
}

/// Downloads and unpacks the package into `staging`, keeps what the guest needs, and writes
/// the metadata and then the marker.
fn prepare_into(
    staging: &Path,
    key: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let package = versioned_package(KERNEL_PACKAGE)?;
    progress(&format!("fetching the microVM guest kernel ({package})"));
    let download = staging.join("download");
    create_private_dir(&download)?;
    let apt_get = find_program("apt-get").ok_or(ImageError::MissingTool("apt"))?;
    let mut command = Command::new(apt_get);
    command
        .current_dir(&download)
        .env("PATH", BUILD_PATH)
        .args(["-q", "download", &package]);
    run_streamed(command, progress)?;
    let deb = single_file(&download, ".deb")?;

    let unpacked = staging.join("unpacked");
    let dpkg_deb = find_program("dpkg-deb").ok_or(ImageError::MissingTool("dpkg"))?;
    let mut command = Command::new(dpkg_deb);
    command.arg("-x").arg(&deb).arg(&unpacked);
    run_streamed(command, progress)?;

    let boot = keep_kernel(&unpacked, staging, progress)?;
    let (release, modules) = keep_modules(&unpacked, staging)?;
    remove_tree(&unpacked)?;
    remove_tree(&download)?;
    write_json(
        &staging.join(METADATA),
        &KernelRecord {
            package,
            release,
            boot,
            modules,
        },
    )?;
    sync_filesystem(staging)?;
    write_durably(&staging.join(MARKER), key.as_bytes())
}

/// The package the metapackage depends on (`linux-image-cloud-amd64` → `linux-image-<abi>-cloud-amd64`).
fn versioned_package(metapackage: &str) -> Result<String, ImageError> {
    let apt_cache = find_program("apt-cache").ok_or(ImageError::MissingTool("apt"))?;
    let output = Command::new(apt_cache)
        .env("PATH", BUILD_PATH)
        .args(["show", "--no-all-versions", metapackage])
        .output()
        .context(|| "run apt-cache".to_string())?;
    let text = String::from_utf8_lossy(&output.stdout);
    depends_on_kernel(&text).ok_or_else(|| {
        ImageError::InvalidImage(format!(
            "apt knows no package {metapackage} with a kernel dependency (run `apt-get update`; \
             apt-cache said: {})",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    })
}

/// The first `linux-image-*` package in a `Depends:` field of `apt-cache show` output.
fn depends_on_kernel(show: &str) -> Option<String> {
    let depends = show
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))?;
    depends
        .split([',', '|'])
        .filter_map(|item| item.split_whitespace().next())
        .find(|name| name.starts_with("linux-image-"))
        .map(str::to_string)
}

fn single_file(dir: &Path, suffix: &str) -> Result<PathBuf, ImageError> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .context(|| format!("list {}", dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(ImageError::InvalidImage(format!(
            "expected one {suffix} file in {}, found {n}",
            dir.display()
        ))),
    }
}

/// Keeps the kernel: the extracted PVH vmlinux when possible, else the bzImage.
fn keep_kernel(
    unpacked: &Path,
    staging: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<KernelBoot, ImageError> {
    let boot_dir = unpacked.join("boot");
    let vmlinuz = fs::read_dir(&boot_dir)
        .context(|| format!("list {}", boot_dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| {
            ImageError::InvalidImage("the kernel package has no boot/vmlinuz-*".into())
        })?;
    let image = fs::read(&vmlinuz).context(|| format!("read {}", vmlinuz.display()))?;
    let (name, bytes, boot) = match vmlinux::extract_pvh_vmlinux(&image) {
        Some(elf) => ("vmlinux", elf, KernelBoot::PvhElf),
        None => {
            progress("the guest kernel has no PVH-bootable payload; booting the bzImage");
            ("vmlinuz", image, KernelBoot::BzImage)
        }
    };
    write_read_only(&staging.join(name), &bytes)?;
    Ok(boot)
}

/// Copies the guest's modules into `staging/modules`; returns the release and the load order.
fn keep_modules(unpacked: &Path, staging: &Path) -> Result<(String, Vec<String>), ImageError> {
    let modules_root = unpacked.join("lib/modules");
    let release_dir = single_dir(&modules_root)?;
    let release = release_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let index = modules::index_modules(&release_dir)?;
    let builtin = modules::builtin_modules(&release_dir)?;
    let order = modules::load_order(
        GUEST_MODULES,
        &index,
        &builtin,
        &mut modules::dependencies_of_file,
    )?;
    let target = staging.join(INITRAMFS_MODULES_DIR);
    create_private_dir(&target)?;
    let mut names = Vec::new();
    for file in order {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = fs::read(&file).context(|| format!("read {}", file.display()))?;
        write_read_only(&target.join(&name), &bytes)?;
        names.push(name);
    }
    Ok((release, names))
}

fn single_dir(parent: &Path) -> Result<PathBuf, ImageError> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(parent)
        .context(|| format!("list {}", parent.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.is_dir())
        .collect();
    match dirs.len() {
        1 => Ok(dirs.remove(0)),
        n => Err(ImageError::InvalidImage(format!(
            "expected one kernel release in {}, found {n}",
            parent.display()
        ))),
    }
}

fn write_read_only(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .context(|| format!("create {}", path.display()))?;
    std::io::Write::write_all(&mut file, bytes).context(|| format!("write {}", path.display()))
}

/// Writes the guest's initramfs to `out` (replacing it atomically): an uncompressed newc cpio
/// with `/init` = `agent` (the static cordon-agent, which runs as the VM's init when it is
/// PID 1 without `--listen-*` arguments), the modules under `/modules` and their load order in
/// `/modules/load-order`. Uncompressed because the kernel unpacks it faster than it could
/// decompress it under TCG, and it is small.
pub fn build_initramfs(guest: &GuestKernel, agent: &Path, out: &Path) -> Result<(), ImageError> {
    let parent = out.parent().unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".initramfs-")
        .tempfile_in(parent)
        .context(|| format!("create a temporary file in {}", parent.display()))?;
    let mut writer = cpio::CpioWriter::new(BufWriter::new(staging.as_file()));
    let add = |writer: &mut cpio::CpioWriter<_>, name: &str, mode: u32, source: &Path| {
        let mut file = File::open(source).context(|| format!("open {}", source.display()))?;
        let len = file
            .metadata()
            .context(|| format!("stat {}", source.display()))?
            .len();
        writer
            .file(name, mode, len, &mut file)
            .context(|| format!("add {} to the initramfs", source.display()))
    };
    let io = |what: &str| {
        let what = what.to_string();
        move || what
    };
    let stripped = strip_debug_info(agent, parent);
    let agent = stripped.as_ref().map_or(agent, |file| file.path());
    add_device_nodes(&mut writer).context(io("write the initramfs"))?;
    add(&mut writer, "init", 0o755, agent)?;
    writer
        .dir(INITRAMFS_MODULES_DIR, 0o755)
        .context(io("write the initramfs"))?;
    let mut load_order = String::new();
    for module in &guest.modules {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                ImageError::InvalidImage(format!("bad module path {}", module.display()))
            })?;
        add(
            &mut writer,
            &format!("{INITRAMFS_MODULES_DIR}/{name}"),
            0o444,
            module,
        )?;
        load_order.push_str(&name);
        load_order.push('\n');
    }
    writer
        .file(
            INITRAMFS_LOAD_ORDER,
            0o444,
            load_order.len() as u64,
            &mut load_order.as_bytes(),
        )
        .context(io("write the initramfs"))?;
    writer
        .finish()
        .and_then(|buffered| buffered.into_inner().map_err(|e| e.into_error()))
        .context(io("write the initramfs"))?;
    staging
        .as_file()
        .sync_all()
        .context(io("sync the initramfs"))?;
    staging
        .persist(out)
        .map_err(|error| error.error)
        .context(|| format!("write {}", out.display()))?;
    Ok(())
}

/// `/dev/console` and `/dev/null` before devtmpfs is mounted: the kernel opens the console
/// for init, and when there is none yet (hvc0 comes with a module), Rust's runtime opens
/// `/dev/null` for the closed standard fds before `main` and aborts if it cannot.
fn add_device_nodes<W: std::io::Write>(writer: &mut cpio::CpioWriter<W>) -> std::io::Result<()> {
    writer.dir("dev", 0o755)?;
    writer.char_device("dev/console", 0o600, 5, 1)?;
    writer.char_device("dev/null", 0o666, 1, 3)
}

/// Kernel arguments a guest needs under TCG (no kvmclock): the TSC frequency, which the guest
/// could only calibrate against the PIT, which fails or hangs on a busy host. Under TCG the
/// guest's TSC is the host's, so the host's frequency is the right one. Empty when unknown.
pub fn tcg_kernel_args() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    match host_tsc_khz(&cpuinfo) {
        Some(khz) => format!("tsc_early_khz={khz} no_timer_check"),
        None => "no_timer_check".to_string(),
    }
}

/// The host's TSC frequency from `/proc/cpuinfo` (`cpu MHz`, which is the TSC's frequency on
/// CPUs with `constant_tsc`, the case on every host with a stable TSC).
fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    if !cpuinfo.contains("constant_tsc") {
        return None;
    }
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("cpu MHz")?.split(':').nth(1))?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0 && mhz < 100_000.0).then(|| (mhz * 1000.0).round() as u64)
}

/// A copy of `agent` without debug information, when binutils' `objcopy` is at hand: the
/// release agent carries ~30 MiB of line tables, and `/init` stays in guest RAM for the VM's
/// life (a running executable's tmpfs pages cannot be freed). `None`: use it as it is.
fn strip_debug_info(agent: &Path, scratch_dir: &Path) -> Option<tempfile::NamedTempFile> {
    let objcopy = find_program("objcopy")?;
    let stripped = tempfile::Builder::new()
        .prefix(".agent-")
        .tempfile_in(scratch_dir)
        .ok()?;
    let status = Command::new(objcopy)
        .arg("--strip-debug")
        .arg(agent)
        .arg(stripped.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => Some(stripped),
        _ => {
            tracing::warn!(agent = %agent.display(), "objcopy --strip-debug failed; using the agent as it is");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_package_is_read_from_apt_cache_show() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n";
        assert_eq!(
            depends_on_kernel(show).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(depends_on_kernel("Package: x\n"), None);
    }

    #[test]
    fn the_initramfs_holds_init_the_modules_and_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"\x7fELF agent").unwrap();
        let modules = dir.path().join("modules");
        fs::create_dir(&modules).unwrap();
        for name in ["virtio_ring.ko", "virtio.ko"] {
            fs::write(modules.join(name), name.as_bytes()).unwrap();
        }
        let guest = GuestKernel {
            dir: dir.path().to_path_buf(),
            kernel: dir.path().join("vmlinux"),
            boot: KernelBoot::PvhElf,
            release: "6.1.0-test".into(),
            package: "linux-image-test".into(),
            modules: vec![modules.join("virtio_ring.ko"), modules.join("virtio.ko")],
        };
        let out = dir.path().join("initramfs.cpio");
        build_initramfs(&guest, &agent, &out).unwrap();
        let archive = fs::read(&out).unwrap();
        let entries: Vec<(String, Vec<u8>)> = cpio::tests::read_entries(&archive)
            .into_iter()
            .map(|(name, _, data)| (name, data))
            .collect();
        assert_eq!(
            entries,
            vec![
                ("dev".to_string(), vec![]),
                ("dev/console".to_string(), vec![]),
                ("dev/null".to_string(), vec![]),
                ("init".to_string(), b"\x7fELF agent".to_vec()),
                ("modules".to_string(), vec![]),
                (
                    "modules/virtio_ring.ko".to_string(),
                    b"virtio_ring.ko".to_vec()
                ),
                ("modules/virtio.ko".to_string(), b"virtio.ko".to_vec()),
                (
                    "modules/load-order".to_string(),
                    b"virtio_ring.ko\nvirtio.ko\n".to_vec()
                ),
            ]
        );
    }

    #[test]
    fn the_host_tsc_frequency_is_read_from_cpuinfo() {
        let cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2445.432\nflags\t\t: fpu constant_tsc\n";
        assert_eq!(host_tsc_khz(cpuinfo), Some(2_445_432));
        assert_eq!(host_tsc_khz("cpu MHz : 2445.432\nflags : fpu\n"), None);
        assert_eq!(host_tsc_khz("flags : constant_tsc\n"), None);
    }

    #[test]
    fn an_unfinished_cache_entry_is_not_loaded() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join(STORE_DIR).join(recipe_key());
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join(METADATA),
            r#"{"package":"p","release":"r","boot":"pvh-elf","modules":[]}"#,
        )
        .unwrap();
        assert_eq!(load_guest_kernel(cache.path()), None);
        fs::write(dir.join(MARKER), recipe_key()).unwrap();
        let guest = load_guest_kernel(cache.path()).unwrap();
        assert_eq!(guest.kernel, dir.join("vmlinux"));
    }
}
