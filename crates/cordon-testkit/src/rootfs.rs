//! A minimal busybox-static root filesystem, built once and cached under
//! `target/test-rootfs/busybox-v<N>/rootfs`. The tree is built in a temporary directory beside
//! it with a `complete` marker written last, then renamed into place in one step, so an
//! interrupted build is never mistaken for a finished one (and is rebuilt).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const BUSYBOX: &str = "/bin/busybox";
/// Bump when the layout below changes, so stale caches are rebuilt.
const VERSION: &str = "3";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nuser:x:1000:\nnogroup:x:65534:\n";

/// The path of the cached rootfs layer, building it on first use.
pub fn test_rootfs() -> PathBuf {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let cache = crate::target_dir()
                .join("test-rootfs")
                .join(format!("busybox-v{VERSION}"));
            if !cache.join("complete").is_file() {
                build(&cache).unwrap_or_else(|e| {
                    panic!("building the test rootfs at {}: {e}", cache.display())
                });
            }
            cache.join("rootfs")
        })
        .clone()
}

fn build(cache: &Path) -> std::io::Result<()> {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: apt-get install busybox-static"
    );
    // Build beside the final path and rename, so concurrent test binaries never see half a tree.
    let parent = cache.parent().expect("rootfs parent");
    fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(parent)?;
    let tree = &staging.path().join("rootfs");
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "etc",
        "root",
        "home/user",
        "tmp",
        "proc",
        "sys",
        "dev",
        "var/tmp",
        "workspace",
    ] {
        fs::create_dir_all(tree.join(dir))?;
    }
    fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(tree.join("root"), fs::Permissions::from_mode(0o700))?;
    fs::copy(BUSYBOX, tree.join("bin/busybox"))?;
    for applet in applets()? {
        let link = tree.join(applet.trim_start_matches('/'));
        if applet == "/bin/busybox" || link.symlink_metadata().is_ok() {
            continue;
        }
        fs::create_dir_all(link.parent().expect("applet dir"))?;
        symlink("/bin/busybox", &link)?;
    }
    if tree.join("bin/bash").symlink_metadata().is_err() {
        // Debian's busybox has no `bash` applet; `/bin/bash` is the clients' default shell
        // (`bash -c command`), so hand it to busybox's sh.
        fs::write(tree.join("bin/bash"), "#!/bin/sh\nexec /bin/sh \"$@\"\n")?;
        fs::set_permissions(tree.join("bin/bash"), fs::Permissions::from_mode(0o755))?;
    }
    fs::write(tree.join("etc/passwd"), PASSWD)?;
    fs::write(tree.join("etc/group"), GROUP)?;
    fs::write(tree.join("etc/hostname"), "sandbox\n")?;
    std::os::unix::fs::chown(tree.join("home/user"), Some(1000), Some(1000))?;
    fs::write(staging.path().join("complete"), VERSION)?;
    if cache.exists() {
        // Another process finished first, or an incomplete tree is in the way.
        if cache.join("complete").is_file() {
            return Ok(());
        }
        fs::remove_dir_all(cache)?;
    }
    match fs::rename(staging.path(), cache) {
        Ok(()) => {
            let _ = staging.keep();
            Ok(())
        }
        Err(_) if cache.join("complete").is_file() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Absolute paths of every applet (`busybox --list-full`).
fn applets() -> std::io::Result<Vec<String>> {
    let output = std::process::Command::new(BUSYBOX)
        .arg("--list-full")
        .output()?;
    if !output.status.success() {
        return Err(std::io::Error::other("busybox --list-full failed"));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| format!("/{}", l.trim()))
        .collect())
}
