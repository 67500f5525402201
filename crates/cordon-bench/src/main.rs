//! `make bench`: Cordon's numbers beside baselines measured in the same run, as ratios.
//!
//! - P2: exec round trip of `true` from a Rust client over the WebSocket API, through the
//!   channel, beside a host spawn of `true` and a `bwrap … true`.
//! - Sandbox start: create + boot + agent ready + destroy, beside `bwrap … true` and
//!   `unshare … chroot … true`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cordon_api::exec::{ClientMessage, ExecuteRequest, ServerMessage};
use cordon_channel::AgentClient;
use cordon_runtime::{NamespaceConfig, NamespaceRuntime, Runtime};
use cordon_testkit::{spec, test_rootfs, TestOptions};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const EXEC_ROUNDS: usize = 300;
const START_ROUNDS: usize = 30;

#[tokio::main]
async fn main() -> Result<()> {
    let state = tempfile::Builder::new().prefix("cordon-bench-").tempdir()?;
    let runtime = runtime(state.path())?;
    let rootfs = test_rootfs();

    let mut table = Table::default();
    let host = time_n(EXEC_ROUNDS, || run_ok(Command::new("true")))?;
    let bwrap = time_n(EXEC_ROUNDS / 3, || run_ok(bwrap_true(&rootfs)))?;
    let chroot = time_n(EXEC_ROUNDS / 3, || run_ok(unshare_chroot_true(&rootfs)))?;

    let id = "bench-exec";
    runtime.create(spec(id, &TestOptions::default())).await?;
    runtime.start(id).await?;
    let client = AgentClient::connect(runtime.open_channel(id).await?);
    let mut exec = Vec::with_capacity(EXEC_ROUNDS);
    for _ in 0..EXEC_ROUNDS {
        let started = Instant::now();
        exec_true(&client).await?;
        exec.push(started.elapsed());
    }
    runtime.destroy(id).await?;
    table.row(
        "P2 exec `true` over WebSocket",
        &exec,
        "host spawn `true`",
        &host,
        "p50 ≤ 2 ms, ≤ 4× host",
    );
    table.row(
        "P2 exec `true` over WebSocket",
        &exec,
        "bwrap … true",
        &bwrap,
        "",
    );

    let mut starts = Vec::with_capacity(START_ROUNDS);
    for round in 0..START_ROUNDS {
        let id = format!("bench-start-{round}");
        let started = Instant::now();
        runtime.create(spec(&id, &TestOptions::default())).await?;
        runtime.start(&id).await?;
        starts.push(started.elapsed());
        runtime.destroy(&id).await?;
    }
    table.row(
        "sandbox create + start (agent ready)",
        &starts,
        "bwrap … true",
        &bwrap,
        "",
    );
    table.row(
        "sandbox create + start (agent ready)",
        &starts,
        "unshare + chroot true",
        &chroot,
        "",
    );
    table.print();
    Ok(())
}

fn runtime(state_dir: &Path) -> Result<Arc<NamespaceRuntime>> {
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("bench executable dir")?
        .to_path_buf();
    let nsinit = std::env::var_os("CORDON_NSINIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| exe_dir.join("cordon-nsinit"));
    let config = NamespaceConfig::new(state_dir, cordon_testkit::agent_binary(), nsinit);
    Ok(Arc::new(NamespaceRuntime::new(config)?))
}

/// One `execute` of `true` on a new WebSocket, as the official clients do it, until `exit`.
async fn exec_true(client: &AgentClient) -> Result<()> {
    let mut socket = client.websocket("/execute/ws").await?;
    let mut request = ExecuteRequest::new("true");
    request.shell = "/bin/sh".into();
    request.close_stdin = true;
    let message = serde_json::to_string(&ClientMessage::Execute(request))?;
    socket.send(Message::text(message)).await?;
    while let Some(frame) = socket.next().await {
        if let Message::Text(text) = frame? {
            match serde_json::from_str::<ServerMessage>(&text)? {
                ServerMessage::Exit { exit_code: 0 } => return Ok(()),
                ServerMessage::Exit { exit_code } => bail!("`true` exited {exit_code}"),
                ServerMessage::Error { error, .. } => bail!("exec failed: {error}"),
                _ => {}
            }
        }
    }
    bail!("socket closed before exit")
}

fn bwrap_true(rootfs: &Path) -> Command {
    let mut command = Command::new("bwrap");
    command.arg("--ro-bind").arg(rootfs).args([
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--unshare-all",
        "/bin/true",
    ]);
    command
}

fn unshare_chroot_true(rootfs: &Path) -> Command {
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount", "--pid", "--fork", "--net", "--ipc", "--uts", "chroot",
        ])
        .arg(rootfs)
        .arg("/bin/true");
    command
}

fn run_ok(mut command: Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn time_n(rounds: usize, mut run: impl FnMut() -> Result<()>) -> Result<Vec<Duration>> {
    (0..rounds)
        .map(|_| {
            let started = Instant::now();
            run().map(|()| started.elapsed())
        })
        .collect()
}

/// p50 and p95 of a sample.
fn percentiles(samples: &[Duration]) -> (Duration, Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.95))
}

#[derive(Default)]
struct Table {
    rows: Vec<[String; 6]>,
}

impl Table {
    fn row(
        &mut self,
        metric: &str,
        ours: &[Duration],
        baseline_name: &str,
        baseline: &[Duration],
        target: &str,
    ) {
        let (ours50, ours95) = percentiles(ours);
        let (base50, base95) = percentiles(baseline);
        self.rows.push([
            metric.to_string(),
            format!("{} / {}", ms(ours50), ms(ours95)),
            baseline_name.to_string(),
            format!("{} / {}", ms(base50), ms(base95)),
            format!("{:.2}×", ours50.as_secs_f64() / base50.as_secs_f64()),
            target.to_string(),
        ]);
    }

    fn print(&self) {
        let header = [
            "metric",
            "cordon p50 / p95",
            "baseline",
            "baseline p50 / p95",
            "ratio (p50)",
            "target",
        ];
        let widths: Vec<usize> = (0..6)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: [&str; 6]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}", w = *w))
                .collect();
            println!("| {} |", padded.join(" | "));
        };
        line(header);
        println!(
            "|{}|",
            widths
                .iter()
                .map(|w| "-".repeat(w + 2))
                .collect::<Vec<_>>()
                .join("|")
        );
        for row in &self.rows {
            line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
        }
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}
