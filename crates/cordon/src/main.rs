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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("CORDON_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Sandbox(SandboxCommand::Exec(args)) => {
            let code = sandbox_exec(args).await?;
            std::process::exit(code);
        }
        Command::Prepare(args) => prepare(args),
    }
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
