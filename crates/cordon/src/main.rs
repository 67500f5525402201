//! The `cordon` command line.

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
    Serve(ServeArgs),
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
    /// The static agent binary (default: next to this executable, then the build output).
    #[arg(long, env = "CORDON_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// The cordon-nsinit launcher (default: next to this executable).
    #[arg(long, env = "CORDON_NSINIT_BIN")]
    nsinit_bin: Option<PathBuf>,
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
    /// The static agent binary (default: next to this executable, then the build output).
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
        Command::Serve(args) => serve(args).await,
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
    let cache_dir = args.cache_dir;
    let snapshot = tokio::task::spawn_blocking(move || {
        cordon_image::default_snapshot::prepare(&cache_dir, &mut |line| tracing::info!("{line}"))
    })
    .await?
    .context("preparing the default snapshot")?;
    // Host-only: the store and every sandbox's state live here.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&args.data_dir)
        .with_context(|| format!("data dir {}", args.data_dir.display()))?;
    let runtime = NamespaceRuntime::new(NamespaceConfig::new(
        &args.data_dir,
        args.agent_bin.map_or_else(default_agent_binary, Ok)?,
        args.nsinit_bin
            .map_or_else(|| beside_this_executable("cordon-nsinit"), Ok)?,
    ))?;
    let config = cordon_server::ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        api_keys,
        public_url: args.public_url,
        snapshot,
        lifecycle_tick: std::time::Duration::from_secs(5),
        max_sandboxes_per_workspace: args.max_sandboxes_per_workspace,
    };
    cordon_server::serve(config, std::sync::Arc::new(runtime)).await?;
    Ok(())
}

/// Prepares the default snapshot, printing progress to stderr and a summary to stdout.
fn prepare(args: PrepareArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let snapshot =
        cordon_image::default_snapshot::prepare(&args.cache_dir, &mut |line| eprintln!("{line}"))
            .context("preparing the default snapshot")?;
    println!("{} {}", snapshot.name, snapshot.id);
    println!("  layer:   {}", snapshot.path.display());
    println!("  size:    {} MiB", snapshot.size_bytes >> 20);
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

/// The agent next to this executable (an installed layout), else the static build output
/// `target/x86_64-unknown-linux-gnu/release/cordon-agent` seen from `target/release/cordon`.
fn default_agent_binary() -> Result<PathBuf> {
    beside_this_executable("cordon-agent").or_else(|_| {
        let exe = std::env::current_exe()?;
        let target = exe
            .parent()
            .and_then(|p| p.parent())
            .context("target directory")?;
        let path = target.join("x86_64-unknown-linux-gnu/release/cordon-agent");
        if !path.is_file() {
            bail!(
                "static agent not found at {}: run `make agent`",
                path.display()
            );
        }
        Ok(path)
    })
}
