//! SECURITY.md row 3 (and row 4): mount targets in an attacker-controlled root filesystem.
//!
//! Each test boots a real sandbox on the busybox rootfs with a crafted layer on top (as an
//! image or a captured layer would be) whose `/dev`, `/proc`, `/sys`, `/tmp`, `/dev/null`,
//! `/dev/console`, `/etc/hostname`, … are symlinks to host canaries (a directory and a file in
//! a host temp dir, `/proc/sys/kernel`), or files where directories belong. Either the start
//! fails closed with a message naming the path, or the sandbox runs with its mounts inside its
//! own root; in both cases the canaries, `kernel.core_pattern` and the host's mount table are
//! unchanged. The positive controls show that a launcher resolving the same trees by path
//! would change the canaries, and that the checks notice. Needs root.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cordon_runtime::{Runtime, SandboxState};
use cordon_testkit::{runtime_in, spec, unique_id, TestOptions, TestSandbox, TestStateDir};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

const CORE_PATTERN: &str = "/proc/sys/kernel/core_pattern";
/// Host paths outside any temp dir that the crafted layers point at.
const HOST_TARGETS: &[&str] = &["/proc/sys", "/proc/sys/kernel", "/nonexistent", "/dev"];

/// Host canaries and what the host looked like before the test.
struct Host {
    root: tempfile::TempDir,
    before: HostView,
}

#[derive(Debug, PartialEq)]
struct HostView {
    canary_dir: Vec<String>,
    canary_file: String,
    core_pattern: String,
    mount_points: BTreeSet<String>,
}

impl Host {
    fn new() -> Host {
        let root = tempfile::Builder::new()
            .prefix("cordon-host-canary-")
            .tempdir()
            .unwrap();
        fs::create_dir(root.path().join("dir")).unwrap();
        fs::write(root.path().join("dir/keep"), "host data\n").unwrap();
        fs::write(root.path().join("file"), "host file\n").unwrap();
        let before = view(root.path());
        Host { root, before }
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("dir")
    }

    fn file(&self) -> PathBuf {
        self.root.path().join("file")
    }

    /// What changed on the host since [`Host::new`]; empty when nothing did.
    fn changes(&self) -> Vec<String> {
        let now = view(self.root.path());
        let mut changes = Vec::new();
        if now.canary_dir != self.before.canary_dir {
            changes.push(format!(
                "canary dir: {:?} → {:?}",
                self.before.canary_dir, now.canary_dir
            ));
        }
        if now.canary_file != self.before.canary_file {
            changes.push(format!(
                "canary file: {:?} → {:?}",
                self.before.canary_file, now.canary_file
            ));
        }
        if now.core_pattern != self.before.core_pattern {
            changes.push(format!(
                "core_pattern: {:?} → {:?}",
                self.before.core_pattern, now.core_pattern
            ));
        }
        // Other tests on this host may mount elsewhere; what a redirected mount of ours could
        // hit is the canaries and the host paths the layers point at.
        let ours = |point: &String| {
            point.starts_with(&*self.root.path().to_string_lossy())
                || HOST_TARGETS
                    .iter()
                    .any(|target| point == target || point.starts_with(&format!("{target}/")))
        };
        let new_mounts: Vec<_> = now
            .mount_points
            .difference(&self.before.mount_points)
            .filter(|point| ours(point))
            .collect();
        if !new_mounts.is_empty() {
            changes.push(format!("new host mounts: {new_mounts:?}"));
        }
        changes
    }

    fn assert_untouched(&self) {
        let changes = self.changes();
        assert!(changes.is_empty(), "the host changed: {changes:#?}");
    }
}

fn view(root: &Path) -> HostView {
    HostView {
        canary_dir: describe_tree(&root.join("dir")),
        canary_file: describe_entry(&root.join("file")),
        core_pattern: fs::read_to_string(CORE_PATTERN).unwrap(),
        mount_points: fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|line| line.split(' ').nth(4).map(str::to_string))
            .collect(),
    }
}

/// Each entry of `dir` (and `dir` itself) with its type, owner, mode, times and content.
fn describe_tree(dir: &Path) -> Vec<String> {
    let mut entries = vec![describe_entry(dir)];
    let mut names: Vec<_> = fs::read_dir(dir)
        .map(|entries| entries.map(|entry| entry.unwrap().path()).collect())
        .unwrap_or_default();
    names.sort();
    entries.extend(names.iter().map(|path| describe_entry(path)));
    entries
}

fn describe_entry(path: &Path) -> String {
    match fs::symlink_metadata(path) {
        Err(error) => format!("{}: {error}", path.display()),
        Ok(meta) => format!(
            "{} {:?} {}:{} {:o} {}.{} {:?}",
            path.display(),
            meta.file_type(),
            meta.uid(),
            meta.gid(),
            meta.mode(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.is_file().then(|| fs::read(path).unwrap_or_default()),
        ),
    }
}

/// A layer directory (world-traversable like a layer store's) built by `build`.
fn layer(build: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cordon-hostile-layer-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    build(dir.path());
    dir
}

fn options(layer: &Path) -> TestOptions {
    TestOptions {
        extra_layers: vec![layer.to_path_buf()],
        ..TestOptions::default()
    }
}

/// The sandbox must fail to start, saying `expected` (the path and what is wrong with it),
/// stay failed with that message, and leave the host as it was.
async fn assert_refused(layer: &Path, host: &Host, expected: &str) {
    let state = TestStateDir::new();
    let runtime = runtime_in(state.path());
    let id = unique_id("hostile");
    runtime.create(spec(&id, &options(layer))).await.unwrap();
    let error = match runtime.start(&id).await {
        Ok(()) => panic!("a sandbox on a hostile rootfs started (expected {expected:?})"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains(expected), "{expected:?} not in {error:?}");
    match runtime.state(&id).await.unwrap() {
        SandboxState::Failed(message) => assert!(message.contains(expected), "{message}"),
        other => panic!("state after a refused start: {other:?}"),
    }
    runtime.destroy(&id).await.unwrap();
    host.assert_untouched();
}

fn whiteout(path: &Path) {
    mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).unwrap();
}

#[tokio::test]
async fn system_mount_points_that_are_symlinks_fail_closed() {
    let host = Host::new();
    let cases: Vec<(&str, PathBuf)> = vec![
        // CVE-2026-41579: /dev → a host directory.
        ("dev", host.dir()),
        ("proc", host.dir()),
        ("sys", host.dir()),
        ("tmp", host.dir()),
        // Relative, climbing out of the root towards the host's sysctls (core_pattern).
        ("tmp", PathBuf::from("../../../../../../proc/sys/kernel")),
        ("proc", PathBuf::from("/proc/sys/kernel")),
        ("sys", PathBuf::from("/nonexistent")),
        // Inside the root, but still a symlink: refused all the same.
        ("dev", PathBuf::from("tmp")),
    ];
    for (name, target) in cases {
        let crafted = layer(|root| symlink(&target, root.join(name)).unwrap());
        let shown = format!("/{name}");
        assert_refused(
            crafted.path(),
            &host,
            &format!("{shown} is not a directory (a symlink)"),
        )
        .await;
    }
}

#[tokio::test]
async fn system_mount_points_that_are_not_directories_fail_closed() {
    let host = Host::new();
    let regular = |name: &'static str| move |root: &Path| fs::write(root.join(name), "").unwrap();
    let fifo = |name: &'static str| {
        move |root: &Path| {
            nix::unistd::mkfifo(&root.join(name), Mode::from_bits_truncate(0o644)).unwrap()
        }
    };
    let crafted = layer(regular("proc"));
    assert_refused(
        crafted.path(),
        &host,
        "/proc is not a directory (a regular file)",
    )
    .await;
    let crafted = layer(regular("tmp"));
    assert_refused(
        crafted.path(),
        &host,
        "/tmp is not a directory (a regular file)",
    )
    .await;
    let crafted = layer(fifo("dev"));
    assert_refused(crafted.path(), &host, "/dev is not a directory (a fifo)").await;
}

/// The image's /dev is covered by the sandbox's own tmpfs, so its `/dev/null`, `/dev/console`
/// (CVE-2025-31133, CVE-2025-52565) and `/dev/pts` links are never looked at.
#[tokio::test]
async fn dev_entries_that_are_symlinks_are_covered_not_followed() {
    let host = Host::new();
    let crafted = layer(|root| {
        fs::create_dir(root.join("dev")).unwrap();
        for name in ["null", "console", "ptmx", "zero"] {
            symlink(host.file(), root.join("dev").join(name)).unwrap();
        }
        for name in ["pts", "shm"] {
            symlink(host.dir(), root.join("dev").join(name)).unwrap();
        }
    });
    let sandbox = TestSandbox::start(options(crafted.path())).await;
    let out = sandbox
        .sh(
            "stat -c '%F %t:%T' /dev/null; echo overwritten > /dev/null; \
             [ -e /dev/console ] && echo console || echo no-console; \
             awk '$5 ~ /^\\/dev/ {print $5, $9}' /proc/self/mountinfo",
        )
        .await;
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "character special file 1:3",
            "no-console",
            "/dev tmpfs",
            "/dev/pts devpts",
            "/dev/shm tmpfs",
        ],
        "{out}"
    );
    drop(sandbox);
    host.assert_untouched();
}

/// Links inside the image's /proc and /sys are covered by fresh proc and sysfs mounts; the
/// masked and read-only paths are found on those, not in the image.
#[tokio::test]
async fn proc_and_sys_entries_that_are_symlinks_are_covered_not_followed() {
    let host = Host::new();
    let crafted = layer(|root| {
        fs::create_dir_all(root.join("proc")).unwrap();
        fs::create_dir_all(root.join("sys")).unwrap();
        symlink(host.file(), root.join("proc/kcore")).unwrap();
        symlink(host.dir(), root.join("proc/sys")).unwrap();
        symlink(host.dir(), root.join("proc/keys")).unwrap();
        symlink(host.dir(), root.join("sys/firmware")).unwrap();
    });
    let sandbox = TestSandbox::start(options(crafted.path())).await;
    let out = sandbox
        .sh(
            "cat /proc/keys /proc/timer_list | wc -c; ls /sys/firmware | wc -l; \
             (echo x > /proc/sys/kernel/domainname) 2>/dev/null; echo sysctl=$?; \
             awk '$5 == \"/proc\" || $5 == \"/sys\" {print $5, $9}' /proc/self/mountinfo",
        )
        .await;
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(
        lines,
        ["0", "0", "sysctl=1", "/proc proc", "/sys sysfs"],
        "{out}"
    );
    drop(sandbox);
    host.assert_untouched();
}

/// Nothing at launch writes /etc files, so symlinked ones are simply left alone.
#[tokio::test]
async fn etc_files_that_are_symlinks_are_never_written() {
    let host = Host::new();
    let crafted = layer(|root| {
        fs::create_dir(root.join("etc")).unwrap();
        for name in ["hostname", "hosts", "resolv.conf", "mtab"] {
            symlink(host.file(), root.join("etc").join(name)).unwrap();
        }
        // busybox's applets need these; keep them.
        for name in ["passwd", "group"] {
            let base = cordon_testkit::test_rootfs().join("etc").join(name);
            fs::copy(base, root.join("etc").join(name)).unwrap();
        }
    });
    let sandbox = TestSandbox::start(options(crafted.path())).await;
    assert_eq!(sandbox.sh("hostname").await.trim(), "sandbox");
    drop(sandbox);
    host.assert_untouched();
}

/// A layer that deletes /proc, /sys, /dev and /tmp (whiteouts): the mount points are made
/// again, owned by the sandbox's root in its writable layer, and mounted as usual.
#[tokio::test]
async fn missing_mount_points_are_created_in_the_writable_layer() {
    let host = Host::new();
    let crafted = layer(|root| {
        for name in ["proc", "sys", "dev", "tmp"] {
            whiteout(&root.join(name));
        }
    });
    let sandbox = TestSandbox::start(options(crafted.path())).await;
    let out = sandbox
        .sh("awk '$5 ~ /^\\/(proc|sys|dev|tmp)$/ {print $5, $9}' /proc/self/mountinfo | sort")
        .await;
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(
        lines,
        ["/dev tmpfs", "/proc proc", "/sys sysfs", "/tmp tmpfs"],
        "{out}"
    );
    let upper = sandbox
        .state_dir()
        .unwrap()
        .join("sandboxes")
        .join(&sandbox.id)
        .join("rw/upper");
    for name in ["proc", "sys", "dev", "tmp"] {
        let meta = fs::symlink_metadata(upper.join(name)).unwrap();
        assert!(meta.is_dir(), "{name}: {meta:?}");
        // Stored unshifted: the sandbox's root, as every other file of the layer.
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{name}");
    }
    drop(sandbox);
    host.assert_untouched();
}

/// The writable layer outlives a run: what one run (or a tampered layer) leaves there is as
/// hostile as an image at the next start.
#[tokio::test]
async fn a_writable_layer_left_hostile_fails_the_next_start() {
    let host = Host::new();
    let state = TestStateDir::new();
    let runtime = runtime_in(state.path());
    let id = unique_id("hostile");
    runtime
        .create(spec(&id, &TestOptions::default()))
        .await
        .unwrap();
    runtime.start(&id).await.unwrap();
    runtime.stop(&id).await.unwrap();
    let upper = state.path().join("sandboxes").join(&id).join("rw/upper");
    let _ = fs::remove_dir(upper.join("tmp"));
    symlink(host.dir(), upper.join("tmp")).unwrap();

    let error = runtime.start(&id).await.unwrap_err().to_string();
    assert!(
        error.contains("/tmp is not a directory (a symlink)"),
        "{error}"
    );
    assert!(matches!(
        runtime.state(&id).await.unwrap(),
        SandboxState::Failed(message) if message.contains("/tmp is not a directory (a symlink)")
    ));
    runtime.destroy(&id).await.unwrap();
    host.assert_untouched();
}

/// What a launcher that prepares mount points by path before `pivot_root` would do (runc
/// before CVE-2021-30465, CVE-2026-41579): join the target onto the root and follow it.
fn naive_prepare(root: &Path) {
    let _ = fs::create_dir_all(root.join("dev/pts"));
    let _ = fs::write(root.join("etc/hostname"), "sandbox\n");
}

/// Positive control: the crafted layers really point at the canaries, and the checks notice
/// when a path-following launcher touches them.
#[test]
fn control_a_path_following_launcher_changes_the_canaries() {
    let host = Host::new();
    let crafted = layer(|root| {
        symlink(host.dir(), root.join("dev")).unwrap();
        fs::create_dir(root.join("etc")).unwrap();
        symlink(host.file(), root.join("etc/hostname")).unwrap();
    });
    assert!(host.changes().is_empty());
    naive_prepare(crafted.path());
    let changes = host.changes();
    assert!(
        changes.iter().any(|c| c.starts_with("canary dir")),
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|c| c.starts_with("canary file")),
        "{changes:?}"
    );
}

/// Positive control: a mount over a canary in the host's mount namespace is noticed.
#[test]
fn control_a_host_mount_on_a_canary_is_noticed() {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let host = Host::new();
    let scratch = tempfile::tempdir().unwrap();
    mount(
        Some(scratch.path()),
        &host.dir(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let changes = host.changes();
    umount2(&host.dir(), MntFlags::MNT_DETACH).unwrap();
    assert!(
        changes.iter().any(|c| c.starts_with("new host mounts")),
        "{changes:?}"
    );
    host.assert_untouched();
}
