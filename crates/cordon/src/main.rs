//! The `cordon` command line.

mod snapshot_import;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cordon_api::agent::AgentConfig;
use cordon_api::exec::{ClientMessage, ExecuteRequest, ServerMessage};
use cordon_channel::AgentClient;
use cordon_runtime::{Limits, NamespaceConfig, NamespaceRuntime, Runtime, SandboxSpec};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(name = "cordon", version, about = "Secure sandboxes for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with sandboxes directly on this host (no server).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Build the default snapshot into the cache (minutes the first time, then instant).
    Prepare(PrepareArgs),
    /// Serve the LangSmith Sandbox API (control plane and data plane).
    Serve(Box<ServeArgs>),
    /// Work with the snapshots of a running server.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Build a snapshot from an OCI image layout (tar) or `docker save` archive, without a
    /// registry: uploads it, waits for the build and prints the snapshot's id.
    Import(snapshot_import::ImportArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Where the store (`cordon.db`) and the sandboxes' state live.
    #[arg(long, default_value = "/var/lib/cordon")]
    data_dir: PathBuf,
    /// An API key; each key is its own workspace. Repeatable.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Base of every `dataplane_url` (default: http://<the request's Host>).
    #[arg(long)]
    public_url: Option<String>,
    /// Where built snapshots are cached.
    #[arg(long, env = "CORDON_CACHE_DIR", default_value = "/var/cache/cordon")]
    cache_dir: PathBuf,
    /// Most sandboxes one workspace (API key) may hold.
    #[arg(long, default_value_t = 100)]
    max_sandboxes_per_workspace: usize,
    /// The static agent binary (default: the static build output, then next to this executable).
    #[arg(long, env = "CORDON_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// The cordon-nsinit launcher (default: next to this executable).
    #[arg(long, env = "CORDON_NSINIT_BIN")]
    nsinit_bin: Option<PathBuf>,
    /// The backend of a sandbox whose create names no `runtime`: `namespace`, or `microvm`
    /// (QEMU microVMs; needs the guest kernel from `cordon prepare`). microVMs are available
    /// per sandbox whenever the guest kernel is prepared.
    #[arg(long, default_value = "namespace", value_parser = parse_backend)]
    default_runtime: cordon_runtime::Backend,
    /// An internal range (CIDR) sandboxes may reach through the egress proxy anyway; private,
    /// loopback, link-local, CGNAT and metadata ranges are refused otherwise. Repeatable.
    #[arg(long = "allow-egress-cidr", value_name = "CIDR")]
    allow_egress_cidrs: Vec<ipnet::IpNet>,
    /// A PEM file of CA certificates the egress proxy trusts for upstreams besides the
    /// system's. Repeatable.
    #[arg(long = "egress-ca", value_name = "FILE")]
    egress_cas: Vec<PathBuf>,
    /// The DNS server (IP:PORT) the egress proxy resolves with instead of the system's
    /// (tests).
    #[arg(long, value_name = "IP:PORT")]
    egress_resolver: Option<std::net::SocketAddr>,
    /// Let sandboxes reach any port through the egress proxy, not only 80 and 443.
    #[arg(long)]
    egress_any_port: bool,
    /// No egress proxy: sandboxes have no way out at all (loopback only).
    #[arg(long)]
    no_egress: bool,
    /// A registry (HOST:PORT) spoken to over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// An HTTPS registry (HOST:PORT, as image references name it) that image pulls may reach
    /// on an internal address (loopback, private, link-local...). Every other registry, token
    /// server and redirect must resolve to public addresses (--insecure-registry implies this).
    /// Repeatable.
    #[arg(long = "internal-registry", value_name = "HOST:PORT")]
    internal_registries: Vec<String>,
    /// A PEM file of CA certificates trusted for registries besides the system's. Repeatable.
    #[arg(long = "registry-ca", value_name = "FILE")]
    registry_cas: Vec<PathBuf>,
    /// Most bytes one image may unpack to (and download); each build is also bounded by its
    /// fs_capacity_bytes.
    #[arg(long, default_value_t = 20 << 30)]
    max_image_bytes: u64,
    /// Largest archive `cordon snapshot import` (POST /snapshots/import) may upload.
    #[arg(long, default_value_t = 20 << 30)]
    max_import_bytes: u64,
    /// Snapshot builds running at once; more wait their turn.
    #[arg(long, default_value_t = 2)]
    max_concurrent_builds: usize,
    /// Serve service URLs host-based at `{port}--{sandbox id}.DOMAIN` (`host[:port]`, with a
    /// wildcard DNS record and certificate in front); path-based under `/svc/` when absent.
    #[arg(long, env = "CORDON_SERVICE_DOMAIN")]
    service_domain: Option<String>,
    /// Age in seconds at which a new key takes over signing service-URL tokens; old public
    /// keys stay in the JWKS until their tokens have expired.
    #[arg(long, default_value_t = 86_400)]
    signing_key_rotation: u64,
    /// How often warm pools are checked, scaled and refilled (claims also wake the pass).
    #[arg(long, default_value_t = 2)]
    pool_tick_seconds: u64,
    /// A pool's target is the claims in this window plus its target_spare (60 = claims per
    /// minute), within min_replicas..=max_replicas.
    #[arg(long, default_value_t = 60)]
    pool_demand_window_seconds: u64,
    /// How long a pool goes without demand before it drops spare warm sandboxes.
    #[arg(long, default_value_t = 300)]
    pool_scale_down_cooldown_seconds: u64,
    /// Most memory all pools' warm sandboxes together may be given (default: unbounded).
    #[arg(long)]
    pool_memory_budget_bytes: Option<u64>,
    /// Most CPU all pools' warm sandboxes together may be given (default: unbounded).
    #[arg(long)]
    pool_cpu_budget_millicores: Option<u64>,
}

#[derive(Args)]
struct PrepareArgs {
    /// Where built snapshots are cached; kept apart from the data dir so that a fresh data
    /// dir starts in seconds.
    #[arg(long, env = "CORDON_CACHE_DIR", default_value = "/var/cache/cordon")]
    cache_dir: PathBuf,
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Boot a throwaway sandbox on a root filesystem, run one command in it, stream its output
    /// and exit with its exit code.
    Exec(ExecArgs),
}

#[derive(Args)]
struct ExecArgs {
    /// Root filesystem directory (read-only lower layer; writes go to a throwaway layer).
    #[arg(long)]
    rootfs: PathBuf,
    /// Memory limit in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// CPU limit in millicores (1000 = one CPU).
    #[arg(long)]
    cpu_millicores: Option<u32>,
    /// Shell the command runs under (`shell -c command`).
    #[arg(long, default_value = "/bin/sh")]
    shell: String,
    /// The static agent binary (default: the static build output, then next to this executable).
    #[arg(long, env = "CORDON_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// The cordon-nsinit launcher (default: next to this executable).
    #[arg(long, env = "CORDON_NSINIT_BIN")]
    nsinit_bin: Option<PathBuf>,
    /// The command line, joined with spaces.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // The server logs its work by default; the one-shot commands stay quiet.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CORDON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Sandbox(SandboxCommand::Exec(args)) => {
            let code = sandbox_exec(args).await?;
            std::process::exit(code);
        }
        Command::Prepare(args) => prepare(args),
        Command::Serve(args) => serve(*args).await,
        Command::Snapshot(SnapshotCommand::Import(args)) => snapshot_import::import(args).await,
    }
}

/// `cordon serve`: prepares the default snapshot, then serves until killed.
async fn serve(args: ServeArgs) -> Result<()> {
    let mut api_keys = args.api_keys;
    if let Ok(keys) = std::env::var("CORDON_API_KEYS") {
        api_keys.extend(
            keys.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from),
        );
    }
    if api_keys.is_empty() {
        bail!("no API key configured: pass --api-key KEY or set CORDON_API_KEYS");
    }
    if args.max_concurrent_builds == 0 {
        bail!("--max-concurrent-builds must be at least 1");
    }
    if args.signing_key_rotation == 0 {
        bail!("--signing-key-rotation must be at least 1 second");
    }
    let registry = registry_config(
        args.insecure_registries,
        args.internal_registries,
        &args.registry_cas,
    )?;
    let cache_dir = args.cache_dir.clone();
    let snapshot = tokio::task::spawn_blocking(move || {
        cordon_image::default_snapshot::prepare(&cache_dir, &mut |line| tracing::info!("{line}"))
    })
    .await?
    .context("preparing the default snapshot")?;
    // Host-only: the store and every sandbox's state live here.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&args.data_dir)
        .with_context(|| format!("data dir {}", args.data_dir.display()))?;
    let agent_bin = args.agent_bin.map_or_else(default_agent_binary, Ok)?;
    let nsinit_bin = args
        .nsinit_bin
        .map_or_else(|| beside_this_executable("cordon-nsinit"), Ok)?;
    let namespace = NamespaceRuntime::new(NamespaceConfig::new(
        &args.data_dir,
        agent_bin.clone(),
        nsinit_bin.clone(),
    ))?;
    let microvm = microvm_runtime(
        &args.cache_dir,
        &args.data_dir,
        &agent_bin,
        &nsinit_bin,
        args.default_runtime,
    )
    .await?;
    let runtime = cordon_runtime::Runtimes::new(std::sync::Arc::new(namespace), microvm);
    let config = cordon_server::ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        api_keys,
        public_url: args.public_url,
        snapshot,
        lifecycle_tick: std::time::Duration::from_secs(5),
        max_sandboxes_per_workspace: args.max_sandboxes_per_workspace,
        registry,
        snapshot_limits: cordon_server::SnapshotLimits {
            max_image_bytes: args.max_image_bytes,
            max_import_bytes: args.max_import_bytes,
            max_concurrent_builds: args.max_concurrent_builds,
            ..Default::default()
        },
        service_links: cordon_server::ServiceLinksConfig {
            service_domain: args.service_domain,
            key_rotation: std::time::Duration::from_secs(args.signing_key_rotation),
        },
        pools: cordon_server::PoolsConfig {
            tick: std::time::Duration::from_secs(args.pool_tick_seconds.max(1)),
            demand_window: std::time::Duration::from_secs(args.pool_demand_window_seconds.max(1)),
            scale_down_cooldown: std::time::Duration::from_secs(
                args.pool_scale_down_cooldown_seconds,
            ),
            memory_budget_bytes: args.pool_memory_budget_bytes,
            cpu_budget_millicores: args.pool_cpu_budget_millicores,
        },
        default_runtime: args.default_runtime,
        egress: cordon_server::EgressSettings {
            enabled: !args.no_egress,
            allowed_cidrs: args.allow_egress_cidrs,
            extra_roots: args.egress_cas,
            resolver: args.egress_resolver,
            any_port: args.egress_any_port,
        },
    };
    cordon_server::serve(config, std::sync::Arc::new(runtime)).await?;
    Ok(())
}

fn parse_backend(value: &str) -> Result<cordon_runtime::Backend, String> {
    value.parse()
}

/// The microVM backend when the guest kernel is prepared (its initramfs built with this
/// agent, the KVM probe run); required with `--default-runtime microvm`. Its state lives in
/// `<data>/microvm`, apart from the namespace backend's.
async fn microvm_runtime(
    cache_dir: &std::path::Path,
    data_dir: &std::path::Path,
    agent_bin: &std::path::Path,
    nsinit_bin: &std::path::Path,
    default: cordon_runtime::Backend,
) -> Result<Option<std::sync::Arc<cordon_runtime::MicrovmRuntime>>> {
    let Some(guest) = cordon_image::guest::load_guest_kernel(cache_dir) else {
        if default == cordon_runtime::Backend::Microvm {
            bail!(
                "--default-runtime microvm needs the guest kernel: run `cordon prepare` (cache dir {})",
                cache_dir.display()
            );
        }
        tracing::info!("no guest kernel prepared: microVM sandboxes are unavailable");
        return Ok(None);
    };
    let state_dir = data_dir.join("microvm");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&state_dir)
        .with_context(|| format!("microvm state dir {}", state_dir.display()))?;
    let initramfs = state_dir.join("initramfs.build");
    cordon_image::guest::build_initramfs(&guest, agent_bin, &initramfs)
        .context("building the microVM initramfs")?;
    let runtime = cordon_runtime::MicrovmRuntime::new(cordon_runtime::MicrovmConfig::new(
        &state_dir,
        nsinit_bin,
        &guest.kernel,
        &initramfs,
    ))?;
    let isolation = runtime.isolation_now().await;
    tracing::info!(isolation = isolation.as_str(), "microVM backend ready");
    Ok(Some(std::sync::Arc::new(runtime)))
}

/// `--insecure-registry`, `--internal-registry` and `--registry-ca`, checked: each CA file
/// must hold a PEM certificate.
fn registry_config(
    insecure_registries: Vec<String>,
    internal_registries: Vec<String>,
    ca_files: &[PathBuf],
) -> Result<cordon_server::RegistryConfig> {
    let named = insecure_registries
        .iter()
        .map(|r| ("--insecure-registry", r))
        .chain(
            internal_registries
                .iter()
                .map(|r| ("--internal-registry", r)),
        );
    for (flag, registry) in named {
        let valid = !registry.is_empty()
            && !registry.contains('/')
            && registry.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            });
        if !valid {
            bail!("{flag} {registry:?}: expected HOST:PORT");
        }
    }
    let mut extra_root_pems = Vec::new();
    for file in ca_files {
        let pem =
            std::fs::read(file).with_context(|| format!("--registry-ca {}", file.display()))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            bail!("--registry-ca {}: no PEM certificate in it", file.display());
        }
        extra_root_pems.push(pem);
    }
    Ok(cordon_server::RegistryConfig {
        insecure_registries,
        extra_root_pems,
        internal_registries,
    })
}

/// Prepares the default snapshot and the microVM guest kernel, printing progress to stderr and a summary to stdout.
fn prepare(args: PrepareArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let snapshot =
        cordon_image::default_snapshot::prepare(&args.cache_dir, &mut |line| eprintln!("{line}"))
            .context("preparing the default snapshot")?;
    println!("{} {}", snapshot.name, snapshot.id);
    println!("  layer:   {}", snapshot.path.display());
    println!("  size:    {} MiB", snapshot.size_bytes >> 20);
    let guest =
        cordon_image::guest::prepare_guest_kernel(&args.cache_dir, &mut |line| eprintln!("{line}"))
            .context("preparing the microVM guest kernel")?;
    println!("microVM guest kernel {} ({:?})", guest.release, guest.boot);
    println!("  kernel:  {}", guest.kernel.display());
    println!("  took:    {:.1?}", started.elapsed());
    Ok(())
}

async fn sandbox_exec(args: ExecArgs) -> Result<i32> {
    let rootfs = std::fs::canonicalize(&args.rootfs)
        .with_context(|| format!("root filesystem {}", args.rootfs.display()))?;
    let state = tempfile::Builder::new().prefix("cordon-exec-").tempdir()?;
    let config = NamespaceConfig::new(
        state.path(),
        args.agent_bin
            .clone()
            .map_or_else(default_agent_binary, Ok)?,
        args.nsinit_bin
            .clone()
            .map_or_else(|| beside_this_executable("cordon-nsinit"), Ok)?,
    );
    let runtime = NamespaceRuntime::new(config)?;
    let id = format!("exec-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    runtime
        .create(SandboxSpec {
            id: id.clone(),
            layers: vec![rootfs],
            limits: Limits {
                memory_bytes: args.memory_mib.map(|mib| mib << 20),
                cpu_millicores: args.cpu_millicores,
                ..Limits::default()
            },
            hostname: "sandbox".into(),
            agent_config: AgentConfig::default(),
            backend: Default::default(),
            weaken: Default::default(),
        })
        .await?;
    let outcome = async {
        runtime.start(&id).await?;
        let client = AgentClient::connect(runtime.open_channel(&id).await?);
        stream_command(&client, &args.shell, &args.command.join(" ")).await
    }
    .await;
    runtime.destroy(&id).await?;
    outcome
}

/// Runs `command` over the WebSocket exec API and copies its output to ours as it arrives.
async fn stream_command(client: &AgentClient, shell: &str, command: &str) -> Result<i32> {
    let mut socket = client.websocket("/execute/ws").await?;
    let mut request = ExecuteRequest::new(command);
    request.shell = shell.to_string();
    request.close_stdin = true;
    request.timeout_seconds = 0;
    socket
        .send(Message::text(serde_json::to_string(
            &ClientMessage::Execute(request),
        )?))
        .await?;
    while let Some(frame) = socket.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        match serde_json::from_str::<ServerMessage>(&text)? {
            ServerMessage::Stdout { data, .. } => print_flushed(std::io::stdout(), &data)?,
            ServerMessage::Stderr { data, .. } => print_flushed(std::io::stderr(), &data)?,
            ServerMessage::Exit { exit_code } => return Ok(exit_code as i32),
            ServerMessage::Error { error_type, error } => bail!("{error_type}: {error}"),
            ServerMessage::Started { .. } => {}
        }
    }
    bail!("the agent closed the stream before the command exited")
}

fn print_flushed(mut out: impl Write, data: &str) -> Result<()> {
    out.write_all(data.as_bytes())?;
    Ok(out.flush()?)
}

fn beside_this_executable(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("executable directory")?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found (build the workspace, or pass its path)",
            path.display()
        );
    }
    Ok(path)
}

/// The static agent build output `target/x86_64-unknown-linux-gnu/release/cordon-agent` seen
/// from `target/{debug,release}/cordon` (a development tree, where `target/debug/cordon-agent`
/// beside us is a dynamically linked build that cannot run on images without its loader),
/// else the agent next to this executable (an installed layout).
fn default_agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let static_build = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|target| target.join("x86_64-unknown-linux-gnu/release/cordon-agent"));
    if let Some(path) = static_build.filter(|p| p.is_file()) {
        return Ok(path);
    }
    beside_this_executable("cordon-agent").context("static agent not found: run `make agent`")
}
