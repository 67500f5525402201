//! `make bench`: Cordon's numbers beside baselines measured in the same run, as ratios
//! (design/TARGETS.md). `CORDON_BENCH=p1,p5` picks sections (default all: p2, start, p1, p4,
//! p5, p6, p7, p8, p9, p10, images, egress, microvm); `CORDON_BENCH_EXEC_ONLY` runs P2 alone with its breakdown.
//!
//! - P2: exec round trip of `true` from a Rust client over the WebSocket API, through the
//!   channel, beside a host spawn of `true` and a `bwrap … true`.
//! - Sandbox start: create + boot + agent ready + destroy, beside `bwrap … true` and
//!   `unshare … chroot … true`.
//! - P1, P4: the official Python client (`py/p1_p4.py`, run with the cached client venv)
//!   against a `cordon serve` (the `cordon` binary beside this one) started by this run.
//! - P5, P6: 1 GiB of stdout over `/execute/ws`, upload and download of a 1 GiB file, through
//!   the agent channel; beside `cat` of 1 GiB over a loopback TCP socket.
//! - P7: 1 GiB upload and 1 GiB download through one `/tunnel` stream (yamux over the
//!   WebSocket of a `cordon serve` started by this run) to `py/p7_sink_source.py` inside a
//!   sandbox, beside the same transfers to the same script over loopback TCP on the host
//!   (`CORDON_BENCH_TUNNEL_MIB`, `CORDON_BENCH_TUNNEL_ROUNDS`: 1024, 3).
//! - P8: `CORDON_BENCH_IDLE` (200) idle sandboxes at once and host memory each, beside as many
//!   `bwrap … sleep`; P9: create+start+destroy rate beside `bwrap … true`; P10: exec p95 with
//!   100 commands in flight over 20 sandboxes beside one at a time. See `target_metrics.rs`
//!   for the other `CORDON_BENCH_*` knobs.
//! - images: snapshot pull of a ~100 MB image from a `docker-registry` on loopback, cold
//!   (empty layer store) beside `skopeo copy` + `tar -xzf` of its layers, and warm (layers
//!   present); sandbox create + start from the pulled layers with a 1 GiB disk limit, beside
//!   the busybox rootfs with the same limit and `bwrap … true`. Knobs in `image_metrics.rs`.
//! - egress: HTTPS GET latency (new connection, keep-alive) and download throughput through
//!   the egress proxy (in process, `serve_tcp`), spliced (CONNECT to a host no rule matches)
//!   and intercepted (a header rule matches), beside the same requests sent directly to the
//!   same local HTTPS upstream. Knobs in `egress_metrics.rs`.
//! - microvm: P11 boot to agent ready of a microVM sandbox (create + start) under the
//!   accelerator the runtime's probe picks (TCG / KVM, named in the row), beside a bare
//!   `qemu-system-x86_64 -M microvm` boot of the same kernel to an init that powers off; P12
//!   QEMU's PSS beyond the guest RAM it touched. `CORDON_BENCH_VM_ROUNDS` (5).

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

mod egress_metrics;
mod image_metrics;
mod microvm_metrics;
mod pool_metrics;
mod target_metrics;
mod tunnel_metrics;

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
    let exec_only = std::env::var_os("CORDON_BENCH_EXEC_ONLY").is_some();
    let sections = Sections::from_env(exec_only);

    if sections.has("p2") {
        p2(&runtime, &mut table, &host, &bwrap, exec_only).await?;
        if exec_only {
            return Ok(());
        }
    }
    if sections.has("start") {
        let chroot = time_n(EXEC_ROUNDS / 3, || run_ok(unshare_chroot_true(&rootfs)))?;
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
    }
    if sections.has("p1") || sections.has("p4") {
        if let Err(error) =
            target_metrics::p1_p4(&runtime, &sections, &mut table, &host, &bwrap).await
        {
            table.notes.push(format!("P1/P4: not measured: {error:#}"));
        }
    }
    if sections.has("p5") || sections.has("p6") {
        if let Err(error) =
            target_metrics::p5_p6(&runtime, &sections, state.path(), &mut table).await
        {
            table.notes.push(format!("P5/P6: not measured: {error:#}"));
        }
    }
    if sections.has("p7") {
        if let Err(error) = tunnel_metrics::p7(&mut table).await {
            table.notes.push(format!("P7: not measured: {error:#}"));
        }
    }
    if sections.has("p8") {
        if let Err(error) = target_metrics::p8(&runtime, &rootfs, &mut table).await {
            table.notes.push(format!("P8: not measured: {error:#}"));
        }
    }
    if sections.has("p9") {
        if let Err(error) = target_metrics::p9(&runtime, &rootfs, &mut table).await {
            table.notes.push(format!("P9: not measured: {error:#}"));
        }
    }
    if sections.has("p10") {
        if let Err(error) = target_metrics::p10(&runtime, &mut table).await {
            table.notes.push(format!("P10: not measured: {error:#}"));
        }
    }
    if sections.has("images") {
        if let Err(error) = image_metrics::images(&runtime, state.path(), &bwrap, &mut table).await
        {
            table.notes.push(format!("images: not measured: {error:#}"));
        }
    }
    if sections.has("egress") {
        if let Err(error) = egress_metrics::egress(&mut table).await {
            table.notes.push(format!("egress: not measured: {error:#}"));
        }
    }
    if sections.has("microvm") {
        if let Err(error) = microvm_metrics::microvm(state.path(), &mut table).await {
            table
                .notes
                .push(format!("P11/P12 (microvm): not measured: {error:#}"));
        }
    }
    if sections.has("p3") {
        if let Err(error) = pool_metrics::p3(&mut table).await {
            table.notes.push(format!("P3: not measured: {error:#}"));
        }
    }
    table.print();
    for note in &table.notes {
        println!("{note}");
    }
    Ok(())
}

/// Which sections run: `CORDON_BENCH=p1,p5` (default: all of them).
pub(crate) struct Sections(Option<Vec<String>>);

impl Sections {
    fn from_env(exec_only: bool) -> Sections {
        if exec_only {
            return Sections(Some(vec!["p2".into()]));
        }
        Sections(std::env::var("CORDON_BENCH").ok().and_then(|list| {
            let names: Vec<String> = list
                .split(',')
                .map(|name| name.trim().to_ascii_lowercase())
                .filter(|name| !name.is_empty() && name != "all")
                .collect();
            (!names.is_empty()).then_some(names)
        }))
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.0
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

/// P2: exec round trip of `true` over the agent's WebSocket, through the channel.
async fn p2(
    runtime: &Arc<NamespaceRuntime>,
    table: &mut Table,
    host: &[Duration],
    bwrap: &[Duration],
    exec_only: bool,
) -> Result<()> {
    let id = "bench-exec";
    runtime.create(spec(id, &TestOptions::default())).await?;
    runtime.start(id).await?;
    let client = AgentClient::connect(runtime.open_channel(id).await?);
    let exec_rounds = std::env::var("CORDON_BENCH_EXEC_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(EXEC_ROUNDS);
    let mut exec = Vec::with_capacity(exec_rounds);
    let mut phases = Phases::default();
    let cpu_before = runtime.usage(id).await?.cpu_ns;
    for _ in 0..exec_rounds {
        let started = Instant::now();
        exec_true(&client, &mut phases).await?;
        exec.push(started.elapsed());
    }
    // CPU the sandbox (agent and commands) spent per exec: unlike latency, barely moved by
    // other load on the machine.
    phases.sandbox_cpu_per_exec = Duration::from_nanos(
        runtime.usage(id).await?.cpu_ns.saturating_sub(cpu_before) / exec_rounds.max(1) as u64,
    );
    let mut no_spawn = Vec::with_capacity(EXEC_ROUNDS);
    for _ in 0..EXEC_ROUNDS {
        let started = Instant::now();
        reconnect_unknown(&client).await?;
        no_spawn.push(started.elapsed());
    }
    runtime.destroy(id).await?;
    table.row(
        "P2 exec `true` over WebSocket",
        &exec,
        "host spawn `true`",
        host,
        "p50 ≤ 2 ms, ≤ 4× host",
    );
    if exec_only {
        table.print();
        phases.print(&no_spawn);
        return Ok(());
    }
    table.row(
        "P2 exec `true` over WebSocket",
        &exec,
        "bwrap … true",
        bwrap,
        "",
    );
    phases.print(&no_spawn);
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

/// Where the time of each exec round trip went, as seen by the client.
#[derive(Default)]
pub(crate) struct Phases {
    /// Stream open, HTTP upgrade and WebSocket handshake.
    handshake: Vec<Duration>,
    /// `execute` sent until `started` arrived: session creation and spawn.
    to_started: Vec<Duration>,
    /// `started` until `exit`: the command runs, is reaped, its pipes end.
    to_exit: Vec<Duration>,
    /// Mean CPU time of the sandbox's cgroup per exec.
    sandbox_cpu_per_exec: Duration,
}

impl Phases {
    fn print(&self, no_spawn: &[Duration]) {
        println!();
        println!("P2 breakdown (client side, p50 / p95):");
        let rows = [
            ("open stream + WebSocket handshake", &self.handshake[..]),
            ("execute → started (session + spawn)", &self.to_started[..]),
            ("started → exit (run, reap, pipes)", &self.to_exit[..]),
            (
                "whole round trip of a reconnect to an unknown id (no spawn)",
                no_spawn,
            ),
        ];
        for (name, samples) in rows {
            let (p50, p95) = percentiles(samples);
            println!("  {name:<62} {} / {}", ms(p50), ms(p95));
        }
        println!(
            "  {:<62} {} (mean)",
            "sandbox CPU per exec (agent + command)",
            ms(self.sandbox_cpu_per_exec)
        );
    }
}

/// One `execute` of `true` on a new WebSocket, as the official clients do it, until `exit`.
pub(crate) async fn exec_true(client: &AgentClient, phases: &mut Phases) -> Result<()> {
    let opened = Instant::now();
    let mut socket = client.websocket("/execute/ws").await?;
    phases.handshake.push(opened.elapsed());
    let mut request = ExecuteRequest::new("true");
    request.shell = "/bin/sh".into();
    request.close_stdin = true;
    let message = serde_json::to_string(&ClientMessage::Execute(request))?;
    let sent = Instant::now();
    let mut started_at = None;
    socket.send(Message::text(message)).await?;
    while let Some(frame) = socket.next().await {
        if let Message::Text(text) = frame? {
            match serde_json::from_str::<ServerMessage>(&text)? {
                ServerMessage::Started { .. } => {
                    phases.to_started.push(sent.elapsed());
                    started_at = Some(Instant::now());
                }
                ServerMessage::Exit { exit_code: 0 } => {
                    if let Some(started_at) = started_at {
                        phases.to_exit.push(started_at.elapsed());
                    }
                    return Ok(());
                }
                ServerMessage::Exit { exit_code } => bail!("`true` exited {exit_code}"),
                ServerMessage::Error { error, .. } => bail!("exec failed: {error}"),
                _ => {}
            }
        }
    }
    bail!("socket closed before exit")
}

/// The same WebSocket round trip without a spawn: a `reconnect` to an id that does not exist,
/// answered with an `error`.
async fn reconnect_unknown(client: &AgentClient) -> Result<()> {
    let mut socket = client.websocket("/execute/ws").await?;
    let message = serde_json::json!({
        "type": "reconnect",
        "command_id": "no-such-command",
        "stdout_offset": 0,
        "stderr_offset": 0,
    });
    socket.send(Message::text(message.to_string())).await?;
    while let Some(frame) = socket.next().await {
        if let Message::Text(text) = frame? {
            if let ServerMessage::Error { .. } = serde_json::from_str::<ServerMessage>(&text)? {
                return Ok(());
            }
        }
    }
    bail!("socket closed before the error")
}

pub(crate) fn bwrap_true(rootfs: &Path) -> Command {
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

pub(crate) fn run_ok(mut command: Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn time_n(rounds: usize, mut run: impl FnMut() -> Result<()>) -> Result<Vec<Duration>> {
    (0..rounds)
        .map(|_| {
            let started = Instant::now();
            run().map(|()| started.elapsed())
        })
        .collect()
}

/// p50 and p95 of a sample.
pub(crate) fn percentiles(samples: &[Duration]) -> (Duration, Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.95))
}

#[derive(Default)]
pub(crate) struct Table {
    rows: Vec<[String; 6]>,
    /// Lines printed under the table (what could not be measured, and why).
    pub(crate) notes: Vec<String>,
}

impl Table {
    /// A row whose cells are already formatted (rates, sizes).
    pub(crate) fn row_text(&mut self, cells: [&str; 6]) {
        self.rows.push(cells.map(str::to_string));
    }

    pub(crate) fn row(
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

pub(crate) fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}
