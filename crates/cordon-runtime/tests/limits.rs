//! Resource limits of real sandboxes. Needs root.

use std::time::Duration;

use cordon_runtime::{Limits, Runtime};
use cordon_testkit::{exec, try_exec, TestOptions, TestSandbox};

fn limited(limits: Limits) -> TestOptions {
    TestOptions {
        limits,
        ..TestOptions::default()
    }
}

#[tokio::test]
async fn a_memory_hog_is_oom_killed_while_the_agent_and_other_sandboxes_carry_on() {
    let sandbox = TestSandbox::start(limited(Limits {
        memory_bytes: Some(96 << 20),
        ..Limits::default()
    }))
    .await;
    let neighbour = TestSandbox::start(TestOptions::default()).await;
    // dd touches its whole 300 MiB buffer; the shell survives to report how dd ended.
    let out = sandbox
        .exec("dd if=/dev/zero of=/dev/null bs=300M count=1 2>/dev/null; echo status=$?")
        .await;
    assert_eq!(
        out.stdout, "status=137\n",
        "the hog was not SIGKILLed: {out:?}"
    );
    assert_eq!(sandbox.sh("echo still here").await, "still here\n");
    assert_eq!(neighbour.sh("echo fine").await, "fine\n");
    let usage = sandbox.runtime.usage(&sandbox.id).await.unwrap();
    assert!(usage.memory_bytes <= 96 << 20, "{usage:?}");
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_pid_limit_and_the_sandbox_still_answers() {
    let sandbox = TestSandbox::start(limited(Limits {
        pids: Some(64),
        ..Limits::default()
    }))
    .await;
    let client = sandbox.client.clone();
    let bomb = tokio::spawn(async move {
        try_exec(&client, "n=0; while [ $n -lt 300 ]; do sleep 6 2>/dev/null & n=$((n+1)); done 2>/dev/null; echo tried", 60).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let usage = sandbox.runtime.usage(&sandbox.id).await.unwrap();
    assert!(usage.pids <= 64, "{usage:?}");
    assert!(usage.pids >= 40, "the bomb did not run: {usage:?}");
    // The agent keeps answering while the sandbox is at its limit.
    let health = sandbox
        .client
        .request_bytes(
            http::Request::get("http://agent/_cordon/health")
                .body(bytes::Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(health.status().is_success());
    let _ = bomb.await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(sandbox.sh("echo recovered").await, "recovered\n");
}

#[tokio::test]
async fn the_cpu_quota_holds() {
    let sandbox = TestSandbox::start(limited(Limits {
        cpu_millicores: Some(200),
        ..Limits::default()
    }))
    .await;
    let client = sandbox.client.clone();
    let busy = tokio::spawn(async move {
        exec(&client, "timeout 5 sh -c 'while :; do :; done'; echo done").await
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = sandbox.runtime.usage(&sandbox.id).await.unwrap().cpu_ns;
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = sandbox.runtime.usage(&sandbox.id).await.unwrap().cpu_ns - before;
    let cpus = used as f64 / started.elapsed().as_nanos() as f64;
    assert!(
        (0.12..=0.28).contains(&cpus),
        "busy loop under 200 millicores used {cpus:.3} CPUs"
    );
    busy.await.unwrap();
}

#[tokio::test]
async fn the_disk_limit_gives_enospc_inside_and_files_survive_stop_start() {
    let mut sandbox = TestSandbox::start(limited(Limits {
        disk_bytes: Some(64 << 20),
        ..Limits::default()
    }))
    .await;
    sandbox.sh("echo keep > /root/keep").await;
    let out = sandbox
        .exec("dd if=/dev/zero of=/big bs=1M count=200; echo status=$?")
        .await;
    assert!(out.stderr.contains("No space left on device"), "{out:?}");
    assert_ne!(out.stdout, "status=0\n");
    let image = sandbox
        .state_dir()
        .unwrap()
        .join("sandboxes")
        .join(&sandbox.id)
        .join("disk.img");
    assert!(
        loop_device_backs(&image),
        "no loop device backs the running sandbox"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        meta.blocks() * 512 <= 64 << 20,
        "the image grew past its size"
    );
    let usage = sandbox.runtime.usage(&sandbox.id).await.unwrap();
    assert!(usage.disk_bytes > 40 << 20, "{usage:?}");

    sandbox.runtime.stop(&sandbox.id).await.unwrap();
    assert!(
        !loop_device_backs(&image),
        "the loop device outlived the sandbox"
    );
    sandbox.runtime.start(&sandbox.id).await.unwrap();
    sandbox.reconnect().await;
    assert_eq!(
        sandbox
            .sh("cat /root/keep && rm /big && echo x > /after")
            .await,
        "keep\n"
    );
}

/// True when some loop device is attached to `image`.
fn loop_device_backs(image: &std::path::Path) -> bool {
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return false;
    };
    devices.flatten().any(|device| {
        std::fs::read_to_string(device.path().join("loop/backing_file"))
            .is_ok_and(|backing| std::path::Path::new(backing.trim()) == image)
    })
}
