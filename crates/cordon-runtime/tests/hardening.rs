//! The launcher's hardening, each check paired with its positive control: the same probe
//! must see the weakness in a deliberately weakened sandbox. Needs root.

use cordon_runtime::Weakening;
use cordon_testkit::{test_rootfs, TestOptions, TestSandbox};

async fn sandbox(weaken: Weakening) -> TestSandbox {
    TestSandbox::start(TestOptions {
        weaken,
        ..TestOptions::default()
    })
    .await
}

/// Docker's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
/// NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
const DOCKER_CAPS: &str = "00000000a80425fb";

#[tokio::test]
async fn capabilities_are_dockers_default_set() {
    let caps = |status: String| {
        status
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let strict = caps(
        sandbox(Weakening::default())
            .await
            .sh("grep Cap /proc/1/status")
            .await,
    );
    for line in &strict {
        if line.starts_with("CapAmb") {
            assert!(line.ends_with("0000000000000000"), "{line}");
        } else {
            assert!(line.ends_with(DOCKER_CAPS), "{line}");
        }
    }
    let weak = caps(
        sandbox(Weakening {
            all_capabilities: true,
            ..Weakening::default()
        })
        .await
        .sh("grep CapBnd /proc/1/status")
        .await,
    );
    assert!(!weak[0].ends_with(DOCKER_CAPS), "control: {weak:?}");
}

#[tokio::test]
async fn seccomp_denies_nested_namespaces_and_no_new_privs_is_set() {
    let probe = "unshare -U true 2>/dev/null; echo unshare=$?; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status";
    let strict = sandbox(Weakening::default()).await.sh(probe).await;
    assert!(strict.contains("unshare=1"), "{strict}");
    assert!(
        strict.contains("Seccomp:\t2") && strict.contains("NoNewPrivs:\t1"),
        "{strict}"
    );
    let weak = sandbox(Weakening {
        no_seccomp: true,
        ..Weakening::default()
    })
    .await
    .sh(probe)
    .await;
    assert!(weak.contains("unshare=0"), "control: {weak}");
}

#[tokio::test]
async fn proc_is_masked_and_mountinfo_shows_no_host_paths() {
    let probe = "cat /proc/timer_list /proc/keys /proc/interrupts | wc -c; ls /sys/firmware | wc -l; echo 1 > /proc/sys/kernel/domainname 2>/dev/null; echo sysctl=$?; cat /proc/self/mountinfo";
    let strict = sandbox(Weakening::default()).await;
    let out = strict.sh(probe).await;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"), "/proc paths not masked: {out}");
    assert_eq!(lines.next(), Some("0"), "/sys/firmware not masked: {out}");
    assert_eq!(lines.next(), Some("sysctl=1"), "/proc/sys writable: {out}");
    let rootfs = test_rootfs().display().to_string();
    let state = strict.state_dir().unwrap().display().to_string();
    for host_path in [
        rootfs.as_str(),
        state.as_str(),
        "test-rootfs",
        "cordon-test-",
        "/sandboxes/",
    ] {
        assert!(
            !out.contains(host_path),
            "mountinfo leaks {host_path}: {out}"
        );
    }
    let weak = sandbox(Weakening {
        no_proc_masking: true,
        ..Weakening::default()
    })
    .await
    .sh(probe)
    .await;
    assert_ne!(weak.lines().next(), Some("0"), "control: {weak}");
}

#[tokio::test]
async fn the_agent_binary_is_a_sealed_memfd_and_no_host_fd_leaks() {
    let probe = "readlink /proc/1/exe || echo exe=denied; (echo x >> /proc/1/exe) 2>/dev/null; \
                 echo write=$?; for f in /proc/1/fd/*; do [ -d \"$f\" ] && echo \"dirfd $f\"; done; true";
    // The agent is not dumpable: sandbox processes cannot even look at its exe or fds.
    let out = sandbox(Weakening::default()).await.sh(probe).await;
    assert!(out.starts_with("exe=denied"), "{out}");
    assert!(out.contains("write=1"), "{out}");
    assert!(!out.contains("dirfd"), "{out}");
    // With every capability (CAP_SYS_PTRACE) PID 1 can be inspected: its exe is the sealed
    // memfd, which still cannot be written, and it holds no directory fd.
    let inspectable = Weakening {
        all_capabilities: true,
        ..Weakening::default()
    };
    let out = sandbox(inspectable.clone()).await.sh(probe).await;
    assert!(out.starts_with("/memfd:cordon-agent"), "{out}");
    assert!(out.contains("write=1"), "{out}");
    assert!(!out.contains("dirfd"), "{out}");
    let weak = sandbox(Weakening {
        leak_host_fd: true,
        ..inspectable
    })
    .await
    .sh(probe)
    .await;
    assert!(weak.contains("dirfd /proc/1/fd/5"), "control: {weak}");
}

#[tokio::test]
async fn the_sandbox_sees_only_its_own_pids_and_loopback() {
    let probe = "ls /proc | grep -c '^[0-9]*$'; ls /sys/class/net";
    let out = sandbox(Weakening::default()).await.sh(probe).await;
    let mut lines = out.lines();
    let pids: u32 = lines.next().unwrap().parse().unwrap();
    assert!(pids < 10, "{out}");
    assert_eq!(lines.collect::<Vec<_>>(), vec!["lo"], "{out}");
    let weak = sandbox(Weakening {
        no_pid_namespace: true,
        no_net_namespace: true,
        ..Weakening::default()
    })
    .await
    .sh(probe)
    .await;
    let pids: u32 = weak.lines().next().unwrap().parse().unwrap();
    assert!(pids > 10, "control: {weak}");
    assert!(weak.lines().skip(1).count() > 1, "control: {weak}");
}

#[tokio::test]
async fn without_the_user_namespace_weakening_the_init_is_never_host_root() {
    let probe = "cat /proc/self/uid_map";
    let out = sandbox(Weakening::default()).await.sh(probe).await;
    assert!(!out.contains("4294967295"), "{out}");
    let weak = sandbox(Weakening {
        no_user_namespace: true,
        ..Weakening::default()
    })
    .await
    .sh(probe)
    .await;
    assert!(weak.contains("4294967295"), "control: {weak}");
}

#[tokio::test]
async fn nothing_inside_can_mount_even_without_seccomp() {
    // The mount namespace belongs to the host user namespace, so the sandbox's root lacks
    // CAP_SYS_ADMIN over it whatever the filter says.
    let probe = "mkdir -p /tmp/probe && mount -t tmpfs none /tmp/probe 2>&1; echo mount=$?";
    let unfiltered = Weakening {
        no_seccomp: true,
        all_capabilities: true,
        ..Weakening::default()
    };
    let out = sandbox(unfiltered.clone()).await.sh(probe).await;
    assert!(
        out.contains("permission denied") && out.ends_with("mount=1\n"),
        "{out}"
    );
    let host_root = Weakening {
        no_user_namespace: true,
        ..unfiltered
    };
    let weak = sandbox(host_root).await.sh(probe).await;
    assert_eq!(weak, "mount=0\n", "control: {weak}");
}
