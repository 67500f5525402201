//! `cordon-agent`: PID 1 of every sandbox. Serves the host's channel connections.

use std::io::IsTerminal;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use cordon_agent::config::ConfigStore;
use cordon_agent::exec::Registry;
use cordon_agent::reaper::Reaper;
use cordon_agent::{router, AppState};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::UnixListener;

#[derive(Parser)]
#[command(version, about = "The in-sandbox agent of Cordon")]
struct Args {
    /// Inherited listening unix socket (the production path).
    #[arg(
        long,
        conflicts_with = "listen_unix",
        required_unless_present = "listen_unix"
    )]
    listen_fd: Option<RawFd>,
    /// Bind and listen on this unix socket path (development and tests).
    #[arg(long)]
    listen_unix: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    if cordon_agent::vm_init::is_vm_init() {
        vm_main();
    }
    init_logging();
    // Not dumpable: with seccomp off, sandbox processes still cannot ptrace or
    // process_vm_readv the agent without CAP_SYS_PTRACE, and its /proc files are root's.
    // Commands become dumpable again when they exec.
    nix::sys::prctl::set_dumpable(false).context("PR_SET_DUMPABLE")?;
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

/// PID 1 of a microVM (no `--listen-*`): boot the guest, then serve the host over the
/// virtio-serial channel. Never returns: a fatal error powers the VM off.
fn vm_main() -> ! {
    use cordon_agent::vm_init;
    let booted = vm_init::boot().unwrap_or_else(|error| vm_init::fatal(&error));
    init_logging();
    let served = (|| -> anyhow::Result<std::convert::Infallible> {
        nix::sys::prctl::set_dumpable(false).context("PR_SET_DUMPABLE")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        runtime.block_on(async {
            let reaper = Reaper::start().context("starting the reaper")?;
            let app = router(AppState {
                config: ConfigStore::default(),
                commands: Registry::new(reaper),
                vm: Some(cordon_agent::vm_control::VmControl::new(booted.rw_root)),
            });
            tracing::info!("agent ready (microVM)");
            vm_init::serve_channel(&booted.channel, |port| serve_connection(port, app.clone()))
                .await
        })
    })();
    match served {
        Err(error) => vm_init::fatal(&error),
        Ok(never) => match never {},
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORDON_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // In a sandbox stderr is the agent.log file: no colour codes there.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Before anything can spawn: every child must be reaped through it.
    let reaper = Reaper::start().context("starting the reaper")?;
    let listener = match (args.listen_fd, args.listen_unix) {
        (Some(fd), _) => inherited_listener(fd)?,
        (None, Some(path)) => {
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?
        }
        (None, None) => bail!("give --listen-fd or --listen-unix"),
    };
    let app = router(AppState {
        config: ConfigStore::default(),
        commands: Registry::new(reaper),
        vm: None,
    });
    tracing::info!(pid = std::process::id(), "agent ready");
    loop {
        match listener.accept().await {
            Ok((connection, _)) => {
                tokio::spawn(serve_connection(connection, app.clone()));
            }
            Err(error) => {
                // Out of fds or similar: keep serving the connections we have.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Takes ownership of the listening socket the launcher passed us.
fn inherited_listener(fd: RawFd) -> anyhow::Result<UnixListener> {
    // SAFETY: F_GETFD only reads the fd's flags; it fails with EBADF if the fd is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!("--listen-fd {fd} is not open");
    }
    // SAFETY: the fd is open (checked above) and nothing else in this process uses it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stat = nix::sys::stat::fstat(borrowed).context("fstat of --listen-fd")?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("--listen-fd {fd} is not a socket");
    }
    // SAFETY: the fd is open (fstat succeeded) and, by the launch contract, ours alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = std::os::unix::net::UnixListener::from(owned);
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// One host connection: a yamux session; every stream is one HTTP/1.1 connection.
async fn serve_connection<T>(connection: T, app: axum::Router)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Each session's requests carry its opener, so the host can make it the egress relay's.
    let served = cordon_channel::serve_with_opener(connection, move |opener| {
        let app = app.layer(axum::Extension(opener));
        move |stream| serve_stream(stream, app.clone())
    })
    .await;
    match served {
        Ok(()) => tracing::info!("host connection closed"),
        Err(error) => tracing::warn!(%error, "host connection failed"),
    }
}

/// One channel stream: one HTTP/1.1 connection into the router.
fn serve_stream(stream: cordon_channel::ChannelStream, app: axum::Router) {
    let service = TowerToHyperService::new(app);
    tokio::spawn(async move {
        let served = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await;
        if let Err(error) = served {
            tracing::debug!(%error, "channel stream ended");
        }
    });
}
