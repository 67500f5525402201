//! The default snapshot, really built with debootstrap and really booted in a namespace
//! sandbox. The build goes to the shared cache (`CORDON_CACHE_DIR`, else `/var/cache/cordon`):
//! minutes the first time on a host, milliseconds afterwards.
//!
//! Needs root, debootstrap, the Debian mirror (first run only) and the static agent
//! (`make agent`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cordon_api::RunConfig;
use cordon_image::default_snapshot::{self, HOME, USER_ID};
use cordon_image::PreparedSnapshot;
use cordon_testkit::{TestOptions, TestSandbox};

fn cache_dir() -> PathBuf {
    std::env::var_os("CORDON_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/cordon"))
}

/// The default snapshot; parallel tests serialise on the cache's lock, so one builds.
fn prepared() -> PreparedSnapshot {
    let started = Instant::now();
    let snapshot =
        default_snapshot::prepare(&cache_dir(), &mut |line| eprintln!("prepare: {line}"))
            .expect("prepare the default snapshot");
    eprintln!("prepared {} in {:?}", snapshot.id, started.elapsed());
    snapshot
}

/// Mount points at or below `dir` in this process's mount namespace.
fn mounts_below(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| Path::new(point).starts_with(dir))
        .map(str::to_string)
        .collect()
}

async fn boot(snapshot: &PreparedSnapshot, run_config: RunConfig) -> TestSandbox {
    TestSandbox::start(TestOptions {
        base_layer: Some(snapshot.path.clone()),
        run_config,
        ..TestOptions::default()
    })
    .await
}

#[test]
fn a_second_prepare_is_fast_and_finds_the_same_snapshot() {
    let first = prepared();

    let started = Instant::now();
    let again = default_snapshot::prepare(&cache_dir(), &mut |line| {
        panic!("a cached prepare did work: {line}")
    })
    .unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(500), "took {elapsed:?}");
    assert_eq!(again, first);
    assert!(first.id.starts_with("sha256:"), "{}", first.id);
    assert_eq!(first.name, default_snapshot::NAME);

    // The run_config beside the layer is what the server will expose.
    let on_disk: RunConfig = serde_json::from_slice(
        &std::fs::read(first.path.parent().unwrap().join("run_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(on_disk, default_snapshot::run_config());
    assert_eq!(first.run_config, on_disk);

    // debootstrap mounted /proc and /sys inside the target: none of it may be left.
    assert_eq!(mounts_below(&cache_dir()), Vec::<String>::new());
}

#[test]
fn the_layer_is_slim_and_sane() {
    let snapshot = prepared();
    let layer = &snapshot.path;
    let mode = |path: &str| {
        std::fs::metadata(layer.join(path))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("tmp"), 0o1777);
    let home = std::fs::metadata(layer.join(HOME.trim_start_matches('/'))).unwrap();
    assert_eq!((home.uid(), home.gid()), (USER_ID, USER_ID));
    let listed = |path: &str| {
        let mut names: Vec<_> = std::fs::read_dir(layer.join(path))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(listed("var/lib/apt/lists"), ["partial"]);
    assert_eq!(listed("dev"), Vec::<String>::new());
    assert_eq!(listed("proc"), Vec::<String>::new());
    assert!(
        std::fs::read_dir(layer.join("var/cache/apt/archives"))
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".deb")),
        "downloaded packages left in the image"
    );
    let resolv = std::fs::read_to_string(layer.join("etc/resolv.conf")).unwrap();
    assert!(
        !resolv.lines().any(|line| line.starts_with("nameserver")),
        "the host's resolvers leaked in: {resolv}"
    );
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/hostname")).unwrap(),
        "sandbox\n"
    );
    assert!(
        snapshot.size_bytes < 400 << 20,
        "{} bytes",
        snapshot.size_bytes
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tools_the_clients_use_work_as_the_run_user() {
    let snapshot = tokio::task::spawn_blocking(prepared).await.unwrap();
    let sandbox = boot(&snapshot, snapshot.run_config.clone()).await;

    assert_eq!(
        sandbox
            .sh("id -u; id -un; pwd; echo $HOME; echo $LANG")
            .await,
        "1000\nuser\n/home/user\n/home/user\nC.UTF-8\n"
    );
    assert!(sandbox.sh("bash --version").await.contains("GNU bash"));
    assert_eq!(
        sandbox
            .sh("bash -c 'set -euo pipefail; cat <<EOF\nheredoc\nEOF'")
            .await,
        "heredoc\n"
    );
    assert_eq!(
        sandbox
            .exec("bash -c 'set -o pipefail; false | true'")
            .await
            .exit_code,
        1
    );
    assert_eq!(sandbox.sh("python3 -c 'print(1)'").await, "1\n");
    assert_eq!(
        sandbox
            .sh("python -c 'import sys; print(sys.version_info[0])'")
            .await,
        "3\n"
    );
    assert!(sandbox.sh("rg --version").await.starts_with("ripgrep "));
    assert!(sandbox
        .sh("git --version")
        .await
        .starts_with("git version "));
    assert!(sandbox.sh("curl --version").await.starts_with("curl "));
    assert!(sandbox.sh("ps --version").await.contains("procps"));
    assert!(sandbox.sh("less --version").await.starts_with("less "));
    assert!(sandbox.sh("awk --version").await.starts_with("GNU Awk"));
    assert_eq!(sandbox.sh("echo 'a b c' | awk '{print $2}'").await, "b\n");
    // GNU find's -printf, as JS deepagents lists files.
    assert_eq!(
        sandbox
            .sh("find /etc/hostname -printf '%s\\t%y\\t%p\\n'")
            .await,
        "8\tf\t/etc/hostname\n"
    );
    // GNU grep with NUL after the file name, as deepagents' grep fallback runs it.
    assert_eq!(
        sandbox
            .sh(
                "mkdir -p d/.git && printf 'a\\nneedle\\n' > d/f && cp d/f d/.git/f && \
                 grep -rHnFZ --exclude-dir=.git --include=f -e needle d"
            )
            .await,
        "d/f\u{0}2:needle\n"
    );
    assert_eq!(
        sandbox
            .sh("rg --no-config --hidden --no-ignore --color never -HnF0 needle d/f")
            .await,
        "d/f\u{0}2:needle\n"
    );
    assert_eq!(
        sandbox
            .sh(
                "tar -cf /tmp/t.tar -C /etc hostname && tar -tf /tmp/t.tar && \
                 mkdir x && tar -xf /tmp/t.tar -C x && cat x/hostname"
            )
            .await,
        "hostname\nsandbox\n"
    );
    assert_eq!(
        sandbox.sh("stat -c '%u:%g %a' /home/user /tmp").await,
        "1000:1000 755\n0:0 1777\n"
    );
    // Not root: `chmod 000` holds (langchain-tests), and the system is not writable.
    let unreadable = sandbox
        .exec("echo secret > f && chmod 000 f && cat f")
        .await;
    assert_ne!(unreadable.exit_code, 0, "{unreadable:?}");
    assert_ne!(sandbox.exec("touch /usr/local/bin/x").await.exit_code, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn root_can_write_the_system_through_the_idmapped_layers() {
    let snapshot = tokio::task::spawn_blocking(prepared).await.unwrap();
    let as_root = RunConfig {
        user: Some("0".into()),
        ..RunConfig::default()
    }
    .over(&snapshot.run_config);
    let sandbox = boot(&snapshot, as_root).await;

    // HOME follows the run user (the snapshot does not pin it to /home/user).
    assert_eq!(sandbox.sh("id -u; echo $HOME").await, "0\n/root\n");
    assert_eq!(
        sandbox
            .sh("touch /usr/local/bin/x && stat -c '%u:%g' /usr/local/bin/x /usr/bin/python3")
            .await,
        "0:0\n0:0\n"
    );
    assert!(sandbox
        .sh("dpkg-query -W python3")
        .await
        .starts_with("python3\t3.11"));
    // Writes go to the sandbox's own layer, never to the snapshot.
    assert!(!snapshot.path.join("usr/local/bin/x").exists());
}
