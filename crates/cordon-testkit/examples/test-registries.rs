//! Starts two real OCI registries on loopback with the standard test images pushed, for
//! test suites in other languages (the Python client suite's conftest):
//!
//! ```text
//! cargo run -p cordon-testkit --example test-registries [-- --ignore-stdin]
//! # or the built binary: target/debug/examples/test-registries
//! ```
//!
//! Once both registries answer and every image is pushed, it prints exactly ONE line of JSON
//! on stdout (everything else goes to stderr):
//!
//! ```json
//! {"open": "127.0.0.1:P",            // plain HTTP, no auth: start `cordon serve` with
//!                                     // --insecure-registry 127.0.0.1:P
//!  "auth": "127.0.0.1:Q",            // HTTPS (cert for 127.0.0.1 from a test CA) + basic auth
//!  "ca_pem": "/tmp/…/certs/ca.crt",  // that test CA (PEM file)
//!  "username": "cordon", "password": "…",   // credentials for "auth"
//!  "images": {
//!    "busybox":         "127.0.0.1:P/tools/busybox:1",
//!    "private_busybox": "127.0.0.1:Q/private/busybox:1",
//!    "multiarch":       "127.0.0.1:P/tools/busybox-multiarch:1",
//!    "zstd":            "127.0.0.1:P/tools/busybox-zstd:1",
//!    "whiteout":        "127.0.0.1:P/tools/whiteout:1",
//!    "malicious":       "127.0.0.1:P/tools/malicious:1"}}
//! ```
//!
//! These keys are a contract: add new ones, never rename. The images
//! (`cordon_testkit::registry::TestRegistries` has the details):
//! - `busybox`, `private_busybox`, `multiarch` (an index whose linux/amd64 entry is this image)
//!   and `zstd` (zstd layers) hold the busybox test rootfs plus an app layer; the config has
//!   `Env` `PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin` and `GREETING=hello-from-image`,
//!   `WorkingDir` `/srv/app` (holding `hello.txt` = `hello from /srv/app\n`, owned by 1000),
//!   and `User` `1000` (home `/home/user`, writable by it);
//! - `whiteout`: the rootfs, then a layer with `/opt/doomed.txt` and `/opt/olddir/old.txt`,
//!   then a layer whiting out `doomed.txt`, making `olddir` opaque and adding
//!   `/opt/olddir/new.txt` (`new\n`): a sandbox sees neither `doomed.txt` nor `old.txt`;
//! - `malicious`: the rootfs plus a layer with the tar-slip entry `../escape`; it must be
//!   refused.
//!
//! It serves until its stdin reaches EOF (so start it with a pipe and close that to stop it;
//! `--ignore-stdin` serves until a signal instead) or it gets SIGTERM or SIGINT; then it stops
//! both registries and removes its temporary directories. Needs root for the image's file
//! owners, `docker-registry`, `skopeo`, `htpasswd` and `busybox-static`.

use std::io::{Read, Write};

use cordon_testkit::registry::TestRegistries;
use tokio::signal::unix::{signal, SignalKind};

fn main() {
    let ignore_stdin = std::env::args().skip(1).any(|arg| arg == "--ignore-stdin");
    // Started on the main thread: each registry dies with the thread that started it.
    let registries = match TestRegistries::start() {
        Ok(registries) => registries,
        Err(error) => {
            eprintln!("test-registries: {error}");
            std::process::exit(1);
        }
    };
    let line = registries.to_json().to_string();
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(1);
    }
    drop(stdout);
    eprintln!("test-registries: serving; close stdin or send SIGTERM to stop");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let reason = runtime.block_on(wait_for_stop(ignore_stdin));
    eprintln!("test-registries: {reason}; stopping");
    drop(registries);
}

/// Waits for stdin's EOF (unless ignored), SIGTERM or SIGINT; says which.
async fn wait_for_stop(ignore_stdin: bool) -> &'static str {
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let stdin_closed = async {
        if ignore_stdin {
            std::future::pending::<()>().await;
        }
        // A plain thread: a blocking stdin read cannot be cancelled, and the process exits
        // after a signal anyway.
        let (done, closed) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            let _ = done.send(());
        });
        let _ = closed.await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
        () = stdin_closed => "stdin closed",
    }
}
