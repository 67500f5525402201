//! The disks of a microVM: read-only ext4 images of the snapshot's layers (built once per
//! layer, cached, shared by every VM) and each VM's directory, which the jailed QEMU sees as
//! `/vm`: hard links to the guest kernel, the initramfs and the layer images (root-owned,
//! 0444) and the VM's own writable disk (owned by the VM's uid, 0600). The directory itself
//! is root's (0711), so QEMU can neither add nor remove anything in it.

use std::fs::{self, DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, RuntimeError};

/// The VM directory inside a sandbox directory.
pub(crate) const VM_DIR: &str = "vm";

/// Bytes per inode of a layer image: small files are common in root filesystems.
const LAYER_BYTES_PER_INODE: u64 = 4096;

/// FNV-1a, 64 bits: names a layer's cached image after its path (layers are immutable and
/// their paths content-addressed, so the path names the content).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn cache_name(layer: &Path) -> String {
    let tail: String = layer
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
        .take(64)
        .collect();
    format!(
        "{:016x}-{tail}.img",
        fnv1a(layer.as_os_str().as_encoded_bytes())
    )
}

/// The cached read-only ext4 image of `layer` in `cache`, built on first use with
/// `mkfs.ext4 -d` (the layer's tree at the image's root: ownership, modes, xattrs such as
/// `trusted.overlay.opaque`, and whiteouts, which are char 0:0 device nodes, are kept). Built
/// under a temporary name and renamed into place, so a half-built image is never used.
pub(crate) async fn layer_image(cache: &Path, layer: &Path) -> Result<PathBuf, RuntimeError> {
    let image = cache.join(cache_name(layer));
    if image.is_file() {
        return Ok(image);
    }
    let layer_owned = layer.to_path_buf();
    let used = tokio::task::spawn_blocking(move || crate::fsutil::disk_usage(&layer_owned))
        .await
        .map_err(|e| RuntimeError::io("layer size task", std::io::Error::other(e)))?
        .context(|| format!("measure layer {}", layer.display()))?;
    // Room for the metadata ext4 adds (inode tables, journal-less, directories' blocks).
    let size = (used + used / 4 + (32 << 20)).next_multiple_of(1 << 20);
    let staging = tempfile::Builder::new()
        .prefix(".building-")
        .tempfile_in(cache)
        .context(|| format!("staging image in {}", cache.display()))?;
    staging
        .as_file()
        .set_len(size)
        .context(|| "size the layer image".into())?;
    crate::namespace::store::run_mkfs_ext4(
        tokio::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
            .arg("-i")
            .arg(LAYER_BYTES_PER_INODE.to_string())
            .args(["-E", "root_owner=0:0", "-d"])
            .arg(layer)
            .arg(staging.path())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        || format!("mkfs.ext4 -d {}", layer.display()),
    )
    .await?;
    fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o444))
        .context(|| "chmod the layer image".into())?;
    staging
        .persist(&image)
        .map_err(|e| RuntimeError::io(format!("rename into {}", image.display()), e.error))?;
    tracing::info!(layer = %layer.display(), image = %image.display(), bytes = size, "layer image built");
    Ok(image)
}

/// Creates `<sandbox dir>/vm` (root, 0711).
pub(crate) fn create_vm_dir(sandbox_dir: &Path) -> Result<PathBuf, RuntimeError> {
    let dir = sandbox_dir.join(VM_DIR);
    DirBuilder::new()
        .mode(0o711)
        .create(&dir)
        .context(|| format!("create {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
        .context(|| format!("chmod {}", dir.display()))?;
    Ok(dir)
}

/// Hard-links a shared read-only file into the VM directory under `name` (replacing an
/// older link, e.g. of a kernel that was upgraded since).
pub(crate) fn link_into(vm_dir: &Path, source: &Path, name: &str) -> Result<(), RuntimeError> {
    let target = vm_dir.join(name);
    let _ = fs::remove_file(&target);
    fs::hard_link(source, &target).context(|| {
        format!(
            "link {} into {} (the runtime's state dir must hold it on the same filesystem)",
            source.display(),
            vm_dir.display()
        )
    })
}

/// Copies `source` into `dest` (root, 0444) unless an identical-looking copy is there; the
/// shared kernel and initramfs live in the state dir so VM directories can link them.
pub(crate) fn install_shared(source: &Path, dest: &Path) -> Result<(), RuntimeError> {
    let source_len = fs::metadata(source)
        .context(|| format!("guest file {}", source.display()))?
        .len();
    if fs::metadata(dest).is_ok_and(|m| m.len() == source_len) && same_content(source, dest) {
        return Ok(());
    }
    let tmp = dest.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    fs::copy(source, &tmp).context(|| format!("copy {}", source.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))
        .context(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, dest).context(|| format!("rename into {}", dest.display()))
}

fn same_content(a: &Path, b: &Path) -> bool {
    matches!((fs::read(a), fs::read(b)), (Ok(x), Ok(y)) if x == y)
}

/// The VM's writable disk: the namespace backend's sparse ext4 image (`upper/`, `work/`),
/// then handed to the VM's uid.
pub(crate) async fn create_rw_disk(
    vm_dir: &Path,
    bytes: u64,
    owner: u32,
) -> Result<(), RuntimeError> {
    let image = vm_dir.join(super::qemu::RW_DISK);
    crate::namespace::store::prepare_writable_layer(
        &crate::plan::WritableLayer::Ext4Image(image.clone()),
        Some(bytes),
    )
    .await?;
    std::os::unix::fs::chown(&image, Some(owner), Some(owner))
        .context(|| format!("chown {}", image.display()))
}

/// Opens the writable disk read-only without following links (the directory is host-only,
/// but the check is cheap).
pub(crate) fn rw_disk_blocks(vm_dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(vm_dir.join(super::qemu::RW_DISK))
        .and_then(|f| f.metadata())
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debugfs(image: &Path, request: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", request])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whiteouts (char 0:0) and opaque markers (`trusted.overlay.opaque`) must reach the
    /// guest's overlay as they are in the layer; needs root (mknod, trusted xattrs).
    #[tokio::test]
    async fn layer_images_keep_whiteouts_and_opaque_markers() {
        let root = tempfile::tempdir().unwrap();
        let layer = root.path().join("layer");
        fs::create_dir_all(layer.join("opaque")).unwrap();
        fs::write(layer.join("opaque/file"), "kept").unwrap();
        nix::sys::stat::mknod(
            &layer.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
            0,
        )
        .unwrap();
        let path =
            std::ffi::CString::new(layer.join("opaque").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C strings and a 1-byte value.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let cache = root.path().join("cache");
        fs::create_dir(&cache).unwrap();
        let image = layer_image(&cache, &layer).await.unwrap();
        // Cached: the same image the second time.
        assert_eq!(layer_image(&cache, &layer).await.unwrap(), image);
        let mode = fs::metadata(&image).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444);
        let whiteout = debugfs(&image, "stat /gone");
        assert!(whiteout.contains("character special"), "{whiteout}");
        assert!(whiteout.contains("00:00"), "{whiteout}");
        let opaque = debugfs(&image, "ea_get /opaque trusted.overlay.opaque");
        assert!(opaque.contains("= \"y\""), "{opaque}");
        assert!(debugfs(&image, "cat /opaque/file").contains("kept"));
    }

    #[test]
    fn cache_names_differ_per_layer_and_are_safe() {
        let a = cache_name(Path::new("/var/lib/cordon/layers/sha256-abc"));
        let b = cache_name(Path::new("/var/lib/cordon/layers/sha256-abd"));
        assert_ne!(a, b);
        let odd = cache_name(Path::new("/x/../we ird/$name"));
        assert!(odd
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)));
    }
}
