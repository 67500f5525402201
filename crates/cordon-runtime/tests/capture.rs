//! Capture of a real sandbox's writable layer (`Runtime::capture`), booted again as a layer of a
//! new sandbox. Needs root.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cordon_runtime::{
    CaptureError, Limits, NamespaceConfig, NamespaceRuntime, Runtime, RuntimeError,
};
use cordon_testkit::{
    agent_binary, nsinit_binary, try_exec_as, TestOptions, TestSandbox, TestStateDir,
};

const DISK: u64 = 64 << 20;

/// A read-only layer between the captured one and the busybox rootfs, so the test knows what
/// the sandbox deletes and replaces.
fn base_layer() -> tempfile::TempDir {
    let base = layer_dir();
    let b = base.path();
    fs::create_dir_all(b.join("data")).unwrap();
    fs::write(b.join("data/keep"), "kept\n").unwrap();
    fs::write(b.join("data/gone"), "deleted in the sandbox\n").unwrap();
    fs::create_dir_all(b.join("olddir")).unwrap();
    fs::write(b.join("olddir/a"), "a\n").unwrap();
    fs::write(b.join("olddir/b"), "b\n").unwrap();
    fs::create_dir_all(b.join("renamed")).unwrap();
    fs::write(b.join("renamed/x"), "x\n").unwrap();
    base
}

/// An empty directory for a layer (world-traversable like a layer store's).
fn layer_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cordon-layer-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn options(disk_bytes: Option<u64>, layers: &[&Path]) -> TestOptions {
    TestOptions {
        extra_layers: layers.iter().map(|l| l.to_path_buf()).collect(),
        limits: Limits {
            disk_bytes,
            ..Limits::default()
        },
        ..TestOptions::default()
    }
}

async fn sh_as(sandbox: &TestSandbox, user: &str, command: &str) -> String {
    let out = try_exec_as(&sandbox.client, command, Some(user), 60)
        .await
        .unwrap_or_else(|e| panic!("`{command}` as {user}: {e}"));
    assert_eq!(out.exit_code, 0, "`{command}` as {user}: {out:?}");
    out.stdout
}

/// The sandbox's changes: files of root and of the run user, a symlink, an empty directory, a
/// deleted base file, a replaced (opaque) base directory, a setuid file, a fifo, /tmp content.
const CHANGES: &str = "\
    echo root-data > /root-file && \
    mkdir -p /srv/deep/er && echo deep > /srv/deep/er/file && \
    ln -s /etc/passwd /link && \
    mkdir /emptydir && \
    rm /data/gone && \
    rm -r /olddir && mkdir /olddir && echo c > /olddir/c && \
    echo suid > /suid && chmod 4755 /suid && \
    mkfifo /fifo && \
    mv /renamed /moved && \
    echo scratch > /tmp/scratch";

/// What a sandbox booted on [captured, base, rootfs] must see.
const EXPECTED: &str = "\
root-data
0:0
deep
mine
1000:1000
/etc/passwd
empty
gone
kept
c
755
fifo
x
renamed-gone
no-scratch
";

const CHECK: &str = "\
    cat /root-file && stat -c %u:%g /root-file && \
    cat /srv/deep/er/file && \
    cat /home/user/mine && stat -c %u:%g /home/user/mine && \
    readlink /link && \
    [ -d /emptydir ] && [ -z \"$(ls -A /emptydir)\" ] && echo empty && \
    { [ -e /data/gone ] || echo gone; } && cat /data/keep && \
    ls /olddir && \
    stat -c %a /suid && \
    { [ -p /fifo ] && echo fifo; } && \
    cat /moved/x && { [ -e /renamed ] || echo renamed-gone; } && \
    { [ -e /tmp/scratch ] || echo no-scratch; }";

async fn captured_changes_are_seen_by_a_new_sandbox(disk_bytes: Option<u64>) {
    let base = base_layer();
    let source = TestSandbox::start(options(disk_bytes, &[base.path()])).await;
    sh_as(&source, "root", CHANGES).await;
    sh_as(&source, "user", "echo mine > /home/user/mine").await;

    let layer = layer_dir();
    let bytes = source
        .runtime
        .capture(&source.id, layer.path())
        .await
        .unwrap();
    // root-data, deep, mine, suid, c, and x of the renamed directory (which the overlay
    // copies, having no redirects); the rest are directories, links and nodes.
    assert_eq!(bytes, 10 + 5 + 5 + 5 + 2 + 2, "bytes copied");
    assert!(!layer.path().join("tmp/scratch").exists(), "/tmp captured");
    assert_eq!(
        source.sh("echo still running").await,
        "still running\n",
        "the source sandbox was not thawed"
    );

    let copy = TestSandbox::start(options(disk_bytes, &[layer.path(), base.path()])).await;
    assert_eq!(sh_as(&copy, "root", CHECK).await, EXPECTED);
    // The run user owns its file in the new sandbox too.
    sh_as(&copy, "user", "echo more >> /home/user/mine").await;
}

#[tokio::test]
async fn changes_of_a_sandbox_without_a_disk_limit_are_captured() {
    captured_changes_are_seen_by_a_new_sandbox(None).await;
}

#[tokio::test]
async fn changes_of_a_sandbox_with_a_disk_image_are_captured() {
    captured_changes_are_seen_by_a_new_sandbox(Some(DISK)).await;
}

/// v1 `freezer.state` or v2 `cgroup.events` of the sandbox, as one word.
fn freezer_state(id: &str) -> Option<String> {
    if let Ok(state) =
        fs::read_to_string(format!("/sys/fs/cgroup/freezer/cordon/{id}/freezer.state"))
    {
        return Some(state.trim().to_string());
    }
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .find_map(|root| fs::read_to_string(format!("{root}/cordon/{id}/cgroup.events")).ok())
        .map(|events| match events.lines().any(|l| l == "frozen 1") {
            true => "FROZEN".to_string(),
            false => "THAWED".to_string(),
        })
}

async fn a_busy_sandbox_is_frozen_for_the_copy_and_thawed_after(disk_bytes: Option<u64>) {
    let sandbox = TestSandbox::start(options(disk_bytes, &[])).await;
    // Enough content that the copy takes a while; a writer that keeps /a and /b equal but for
    // the instant between its two writes.
    sandbox
        .sh(
            // The bulk file is written before the command returns (`;`, not `&&`: an and-list
            // ending in `&` would put dd in the background too); only the renamer runs on.
            "mkdir /w && dd if=/dev/urandom of=/w/bulk bs=1M count=24 2>/dev/null; \
             (i=0; while :; do echo $i > /w/a.new; mv /w/a.new /w/a; echo $i > /w/b.new; mv /w/b.new /w/b; i=$((i+1)); done) >/dev/null 2>&1 &",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The watcher thread samples the freezer state while the copy runs; on a loaded machine it
    // may not be scheduled during a short copy, so a capture in which it saw nothing is retried
    // (a few times); the last capture is checked for being one point in time.
    let mut captures = Vec::new();
    let mut seen_frozen = false;
    while !seen_frozen && captures.len() < 4 {
        let done = Arc::new(AtomicBool::new(false));
        let sampled = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (done, sampled, id) = (done.clone(), sampled.clone(), sandbox.id.clone());
            std::thread::spawn(move || {
                let mut seen_frozen = false;
                while !done.load(Ordering::Relaxed) {
                    seen_frozen |= freezer_state(&id).as_deref() == Some("FROZEN");
                    sampled.store(true, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
                seen_frozen
            })
        };
        while !sampled.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let layer = layer_dir();
        let bytes = sandbox
            .runtime
            .capture(&sandbox.id, layer.path())
            .await
            .unwrap();
        done.store(true, Ordering::Relaxed);
        seen_frozen = watcher.join().unwrap();
        captures.push((layer, bytes));
    }
    assert!(
        seen_frozen,
        "the sandbox was never seen frozen in {} captures",
        captures.len()
    );
    let (layer, bytes) = captures.pop().expect("one capture");
    assert!(bytes >= 24 << 20, "{bytes}");
    assert_eq!(freezer_state(&sandbox.id).as_deref(), Some("THAWED"));

    let read = |name: &str| -> i64 {
        fs::read_to_string(layer.path().join("w").join(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (a, b) = (read("a"), read("b"));
    assert!(
        a - b == 0 || a - b == 1,
        "not one point in time: a={a} b={b}"
    );

    // The writer goes on after the thaw.
    let before: i64 = sandbox.sh("cat /w/a").await.trim().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after: i64 = sandbox.sh("cat /w/a").await.trim().parse().unwrap();
    assert!(after > before, "the writer stopped: {before} → {after}");
}

#[tokio::test]
async fn a_busy_sandbox_is_frozen_for_the_copy_and_thawed_after_without_a_disk_limit() {
    a_busy_sandbox_is_frozen_for_the_copy_and_thawed_after(None).await;
}

#[tokio::test]
async fn a_busy_sandbox_is_frozen_for_the_copy_and_thawed_after_with_a_disk_image() {
    a_busy_sandbox_is_frozen_for_the_copy_and_thawed_after(Some(DISK)).await;
}

async fn a_stopped_sandbox_is_captured_and_starts_again(disk_bytes: Option<u64>) {
    let mut sandbox = TestSandbox::start(options(disk_bytes, &[])).await;
    sandbox.sh("echo before-stop > /root/note").await;
    sandbox.runtime.stop(&sandbox.id).await.unwrap();

    let layer = layer_dir();
    let bytes = sandbox
        .runtime
        .capture(&sandbox.id, layer.path())
        .await
        .unwrap();
    assert_eq!(bytes, "before-stop\n".len() as u64);

    sandbox.runtime.start(&sandbox.id).await.unwrap();
    sandbox.reconnect().await;
    sandbox.sh("echo after > /root/later").await;
    assert_eq!(sandbox.sh("cat /root/note").await, "before-stop\n");

    let copy = TestSandbox::start(options(disk_bytes, &[layer.path()])).await;
    assert_eq!(copy.sh("cat /root/note").await, "before-stop\n");
    assert_eq!(copy.exec("cat /root/later").await.exit_code, 1);
}

#[tokio::test]
async fn a_stopped_sandbox_without_a_disk_limit_is_captured() {
    a_stopped_sandbox_is_captured_and_starts_again(None).await;
}

#[tokio::test]
async fn a_stopped_sandbox_with_a_disk_image_is_captured() {
    a_stopped_sandbox_is_captured_and_starts_again(Some(DISK)).await;
}

#[tokio::test]
async fn a_destination_that_is_not_empty_is_refused_and_left_alone() {
    let sandbox = TestSandbox::start(TestOptions::default()).await;
    let layer = layer_dir();
    fs::write(layer.path().join("mine"), "not yours").unwrap();
    let error = sandbox
        .runtime
        .capture(&sandbox.id, layer.path())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            RuntimeError::Capture {
                source: CaptureError::DestinationNotEmpty(_),
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        fs::read_to_string(layer.path().join("mine")).unwrap(),
        "not yours"
    );
    assert_eq!(sandbox.sh("echo ok").await, "ok\n");
}

/// Freezes the sandbox behind the runtime's back, as a capture cut short by a crash would
/// leave it.
fn freeze_directly(id: &str) {
    let v1 = format!("/sys/fs/cgroup/freezer/cordon/{id}/freezer.state");
    if Path::new(&v1).exists() {
        fs::write(&v1, "FROZEN").unwrap();
    } else {
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(|root| format!("{root}/cordon/{id}/cgroup.freeze"))
            .find(|path| Path::new(path).exists())
            .expect("a freezer");
        fs::write(v2, "1").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while freezer_state(id).as_deref() != Some("FROZEN") {
        assert!(Instant::now() < deadline, "did not freeze");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test]
async fn a_sandbox_left_frozen_by_a_crash_is_thawed_on_adoption() {
    let state = TestStateDir::new();
    let runtime = cordon_testkit::runtime_in(state.path());
    let mut sandbox = TestSandbox::start_in(runtime, TestOptions::default()).await;
    freeze_directly(&sandbox.id);
    // A new runtime process over the same state dir adopts it.
    let restarted = cordon_testkit::runtime_in(state.path());
    restarted.adopt().await.unwrap();
    assert_eq!(freezer_state(&sandbox.id).as_deref(), Some("THAWED"));
    sandbox.runtime = restarted;
    sandbox.reconnect().await;
    assert_eq!(sandbox.sh("echo thawed").await, "thawed\n");
}

#[tokio::test]
async fn a_frozen_sandbox_can_still_be_stopped_and_destroyed() {
    let sandbox = TestSandbox::start(TestOptions::default()).await;
    freeze_directly(&sandbox.id);
    let stop = tokio::time::timeout(Duration::from_secs(10), sandbox.runtime.stop(&sandbox.id));
    stop.await.expect("stop hung on a frozen sandbox").unwrap();
    assert_eq!(
        sandbox.runtime.state(&sandbox.id).await.unwrap(),
        cordon_runtime::SandboxState::Stopped
    );
    sandbox.runtime.start(&sandbox.id).await.unwrap();
    freeze_directly(&sandbox.id);
    let destroy = tokio::time::timeout(
        Duration::from_secs(10),
        sandbox.runtime.destroy(&sandbox.id),
    );
    destroy
        .await
        .expect("destroy hung on a frozen sandbox")
        .unwrap();
}

/// A host file the sandbox points symlinks at.
struct Canary {
    dir: tempfile::TempDir,
    modified: std::time::SystemTime,
}

const CANARY: &str = "CANARY-7f3a-host-secret";

impl Canary {
    fn new() -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("cordon-canary-")
            .tempdir()
            .unwrap();
        fs::write(dir.path().join("secret"), CANARY).unwrap();
        let modified = fs::metadata(dir.path().join("secret"))
            .unwrap()
            .modified()
            .unwrap();
        Canary { dir, modified }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    fn assert_untouched(&self) {
        assert_eq!(fs::read_to_string(self.file()).unwrap(), CANARY);
        assert_eq!(
            fs::metadata(self.file()).unwrap().modified().unwrap(),
            self.modified
        );
        let names: Vec<_> = fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("secret")],
            "something was written beside the canary"
        );
    }
}

/// Regular files under `root` (never following a symlink) that hold the canary's content.
fn files_leaking_the_canary(root: &Path) -> Vec<PathBuf> {
    let mut leaks = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file()
                && meta.blocks() > 0
                && meta.len() < 1 << 20
                && fs::read(entry.path())
                    .unwrap()
                    .windows(CANARY.len())
                    .any(|w| w == CANARY.as_bytes())
            {
                leaks.push(entry.path());
            }
        }
    }
    leaks
}

/// The positive control: a copy that follows symlinks (as `cp -L` would) for the top-level
/// entries of the sandbox's upper directory.
fn naive_copy(upper: &Path, dest: &Path) {
    for entry in fs::read_dir(upper).unwrap().flatten() {
        // fs::metadata follows the symlink: the mistake under test.
        if let Ok(meta) = fs::metadata(entry.path()) {
            if meta.is_file() && meta.len() < 1 << 20 {
                fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
            }
        }
    }
}

/// Symlinks at host paths, a directory/symlink swap race running during the capture, a huge
/// sparse file and fifos.
async fn a_hostile_tree_is_captured_confined_and_bounded(
    disk_bytes: Option<u64>,
) -> (TestSandbox, Canary, tempfile::TempDir) {
    let canary = Canary::new();
    let host_dir = canary.dir.path().display().to_string();
    let sandbox = TestSandbox::start(options(disk_bytes, &[])).await;
    sandbox
        .sh(&format!(
            "ln -s {secret} /leak && ln -s {host_dir} /leakdir && \
             ln -s ../../../../../../../../ /up && ln -s /proc/1/root /p1root && \
             mkdir -p /race && \
             truncate -s 10G /sparse && \
             mkfifo /fifo /race/fifo && \
             (while :; do mkdir /race/d 2>/dev/null; rmdir /race/d 2>/dev/null; \
                           ln -s {host_dir} /race/d 2>/dev/null; rm -f /race/d; \
                           ln -s {secret} /race/f 2>/dev/null; rm -f /race/f; echo x > /race/f; rm -f /race/f; \
                           done) >/dev/null 2>&1 &",
            secret = canary.file().display(),
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let layer = layer_dir();
    let started = Instant::now();
    let bytes = sandbox
        .runtime
        .capture(&sandbox.id, layer.path())
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(bytes < 1 << 20, "holes were copied: {bytes}");

    canary.assert_untouched();
    assert_eq!(
        files_leaking_the_canary(layer.path()),
        Vec::<PathBuf>::new()
    );
    let l = layer.path();
    assert_eq!(fs::read_link(l.join("leak")).unwrap(), canary.file());
    assert_eq!(
        fs::read_link(l.join("up")).unwrap(),
        Path::new("../../../../../../../../")
    );
    assert_eq!(
        fs::read_link(l.join("p1root")).unwrap(),
        Path::new("/proc/1/root")
    );
    let sparse = fs::symlink_metadata(l.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 10 << 30);
    assert!(sparse.blocks() < 64, "{}", sparse.blocks());
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(l.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // Whatever state the race was frozen in, /race/d is a directory or a symlink, never the
    // host directory's content.
    if let Ok(meta) = fs::symlink_metadata(l.join("race/d")) {
        assert!(meta.is_dir() || meta.file_type().is_symlink());
        if meta.is_dir() {
            assert_eq!(fs::read_dir(l.join("race/d")).unwrap().count(), 0);
        }
    }
    assert_eq!(sandbox.sh("echo alive").await, "alive\n");
    (sandbox, canary, layer)
}

#[tokio::test]
async fn a_hostile_tree_stays_confined_and_a_naive_copy_would_not() {
    let (sandbox, canary, _layer) = a_hostile_tree_is_captured_confined_and_bounded(None).await;
    // Positive control: the same checks catch a copy that follows the sandbox's symlinks.
    let upper = sandbox
        .state_dir()
        .unwrap()
        .join("sandboxes")
        .join(&sandbox.id)
        .join("rw/upper");
    let naive = layer_dir();
    naive_copy(&upper, naive.path());
    assert_eq!(
        files_leaking_the_canary(naive.path()),
        vec![naive.path().join("leak")],
        "the canary check cannot see a leak"
    );
    canary.assert_untouched();
}

#[tokio::test]
async fn a_hostile_tree_in_a_disk_image_stays_confined() {
    a_hostile_tree_is_captured_confined_and_bounded(Some(DISK)).await;
}

#[tokio::test]
async fn a_capture_beyond_the_bound_fails_cleanly_and_the_sandbox_carries_on() {
    let state = TestStateDir::new();
    let mut config = NamespaceConfig::new(state.path(), agent_binary(), nsinit_binary());
    config.capture_max_bytes = 1 << 20;
    let runtime = Arc::new(NamespaceRuntime::new(config).unwrap());
    let sandbox = TestSandbox::start_in(runtime, TestOptions::default()).await;
    sandbox
        .sh("mkdir /big && dd if=/dev/zero of=/big/file bs=1M count=2 2>/dev/null")
        .await;
    let layer = layer_dir();
    let error = sandbox
        .runtime
        .capture(&sandbox.id, layer.path())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            RuntimeError::Capture {
                source: CaptureError::TooLarge { limit: 1048576 },
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        fs::read_dir(layer.path()).unwrap().count(),
        0,
        "a partial layer was left"
    );
    assert_eq!(freezer_state(&sandbox.id).as_deref(), Some("THAWED"));
    assert_eq!(sandbox.sh("echo ok").await, "ok\n");
}
