//! Lifecycle of real namespace sandboxes, driven through the real agent. Needs root.

use std::path::Path;

use cordon_runtime::{Runtime, SandboxState};
use cordon_testkit::{
    connect, exec, runtime_in, spec, test_rootfs, unique_id, TestOptions, TestSandbox, TestStateDir,
};

fn cgroup_exists(id: &str) -> bool {
    [
        "/sys/fs/cgroup/pids/cordon",
        "/sys/fs/cgroup/memory/cordon",
        "/sys/fs/cgroup/unified/cordon",
        "/sys/fs/cgroup/cordon",
    ]
    .iter()
    .any(|parent| Path::new(parent).join(id).exists())
}

#[tokio::test]
async fn create_start_stop_start_destroy_keeps_the_writable_layer() {
    let state = TestStateDir::new();
    let runtime = runtime_in(state.path());
    let id = unique_id("life");
    runtime
        .create(spec(&id, &TestOptions::default()))
        .await
        .unwrap();
    assert_eq!(runtime.state(&id).await.unwrap(), SandboxState::Created);

    runtime.start(&id).await.unwrap();
    let SandboxState::Running { pid } = runtime.state(&id).await.unwrap() else {
        panic!("not running")
    };
    let client = connect(&*runtime, &id).await;
    let out = exec(&client, "echo kept > /root/note && hostname && id -u").await;
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout, "sandbox\n0\n");

    runtime.stop(&id).await.unwrap();
    assert_eq!(runtime.state(&id).await.unwrap(), SandboxState::Stopped);
    let gone = cordon_runtime::plan::proc_stat(pid).is_none_or(|(state, _)| state == 'Z');
    assert!(gone, "the init outlived stop");
    assert!(!cgroup_exists(&id), "cgroups left after stop");
    assert!(
        runtime.open_channel(&id).await.is_err(),
        "channel to a stopped sandbox"
    );

    runtime.start(&id).await.unwrap();
    let client = connect(&*runtime, &id).await;
    let out = exec(&client, "cat /root/note").await;
    assert_eq!(out.stdout, "kept\n", "{out:?}");

    runtime.destroy(&id).await.unwrap();
    assert!(!state.path().join("sandboxes").join(&id).exists());
    assert!(!cgroup_exists(&id), "cgroups left after destroy");
    assert!(matches!(
        runtime.state(&id).await,
        Err(cordon_runtime::RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn sandbox_root_maps_to_its_own_unprivileged_range() {
    let sandbox = TestSandbox::start(TestOptions::default()).await;
    let map = sandbox
        .sh("cat /proc/self/uid_map /proc/self/gid_map")
        .await;
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            sandbox
                .state_dir()
                .unwrap()
                .join("sandboxes")
                .join(&sandbox.id)
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let base = record["id_base"].as_u64().unwrap();
    assert!(base >= 65536, "range {base} too close to host ids");
    let fields: Vec<u64> = map.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields, vec![0, base, 65536, 0, base, 65536], "{map}");
    // The agent as the host sees it: the range's first id, never host root.
    let SandboxState::Running { pid } = sandbox.runtime.state(&sandbox.id).await.unwrap() else {
        panic!()
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == base.to_string()),
        "{uid_line}"
    );
}

#[tokio::test]
async fn root_writes_to_usr_through_idmapped_layers_without_touching_the_shared_layer() {
    let sandbox = TestSandbox::start(TestOptions::default()).await;
    let out = sandbox
        .sh("mkdir -p /usr/lib/newpkg && echo data > /usr/lib/newpkg/file && chown 1000:1000 /usr/lib/newpkg/file && ls -ln /usr/lib/newpkg/file /bin/busybox")
        .await;
    let owners: Vec<(String, String)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2].to_string(), f[3].to_string())
        })
        .collect();
    // ls sorts: /bin/busybox (from the shared layer) first, then the new file.
    assert_eq!(
        owners,
        vec![
            ("0".to_string(), "0".to_string()),
            ("1000".to_string(), "1000".to_string())
        ],
        "{out}"
    );
    assert!(
        !test_rootfs().join("usr/lib/newpkg").exists(),
        "the shared layer was written"
    );
    // The writable layer stores ids unshifted (the upper is idmapped too).
    let upper = sandbox
        .state_dir()
        .unwrap()
        .join("sandboxes")
        .join(&sandbox.id)
        .join("rw/upper/usr/lib/newpkg/file");
    let meta = std::fs::metadata(&upper).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
}

#[tokio::test]
async fn a_failing_boot_is_reported_and_cleaned_up() {
    // A rootfs whose /proc is a symlink must fail closed, not be followed.
    let layer = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/", layer.path().join("proc")).unwrap();
    let state = TestStateDir::new();
    let runtime = runtime_in(state.path());
    let id = unique_id("fail");
    let options = TestOptions {
        extra_layers: vec![layer.path().to_path_buf()],
        ..TestOptions::default()
    };
    runtime.create(spec(&id, &options)).await.unwrap();
    let error = runtime.start(&id).await.unwrap_err().to_string();
    assert!(error.contains("/proc is not a directory"), "{error}");
    match runtime.state(&id).await.unwrap() {
        SandboxState::Failed(message) => assert!(message.contains("/proc"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(!cgroup_exists(&id));
    runtime.destroy(&id).await.unwrap();
}

#[tokio::test]
async fn a_new_runtime_re_adopts_running_sandboxes() {
    let state = TestStateDir::new();
    let id = unique_id("adopt");
    let sleeper_pid;
    {
        let runtime = runtime_in(state.path());
        runtime
            .create(spec(&id, &TestOptions::default()))
            .await
            .unwrap();
        runtime.start(&id).await.unwrap();
        let client = connect(&*runtime, &id).await;
        let out = exec(
            &client,
            "setsid sleep 1000 >/dev/null 2>&1 < /dev/null & echo $!",
        )
        .await;
        sleeper_pid = out.stdout.trim().to_string();
        assert!(!sleeper_pid.is_empty(), "{out:?}");
        // The runtime (the "server") goes away; the sandbox must not.
    }
    let runtime = runtime_in(state.path());
    let adopted = runtime.adopt().await.unwrap();
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(adopted[0].0, id);
    assert!(
        matches!(adopted[0].1, SandboxState::Running { .. }),
        "{adopted:?}"
    );
    let client = connect(&*runtime, &id).await;
    let out = exec(&client, &format!("kill -0 {sleeper_pid} && echo alive")).await;
    assert_eq!(out.stdout, "alive\n", "{out:?}");

    // A sandbox that died while no runtime watched comes back as Stopped.
    let SandboxState::Running { pid } = runtime.state(&id).await.unwrap() else {
        panic!()
    };
    drop(runtime);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cordon_runtime::plan::proc_stat(pid).is_some_and(|(s, _)| s != 'Z')
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let runtime = runtime_in(state.path());
    assert_eq!(
        runtime.adopt().await.unwrap(),
        vec![(id.clone(), SandboxState::Stopped)]
    );
    assert!(!cgroup_exists(&id));
    runtime.destroy(&id).await.unwrap();
}
