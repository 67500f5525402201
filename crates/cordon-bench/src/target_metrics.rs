//! P1, P4, P5, P6, P8, P9 and P10 of design/TARGETS.md, each beside a baseline measured in the
//! same run.

use std::convert::Infallible;
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use cordon_api::exec::{ClientMessage, ExecuteRequest, ServerMessage};
use cordon_channel::AgentClient;
use cordon_runtime::{NamespaceRuntime, Runtime, SandboxState};
use cordon_testkit::{spec, TestOptions};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use tokio_tungstenite::tungstenite::Message;

use crate::{bwrap_true, exec_true, ms, percentiles, run_ok, time_n, Phases, Sections, Table};

const GIB: u64 = 1 << 30;
const MIB: usize = 1 << 20;

pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ratio(ours: f64, base: f64) -> String {
    format!("{:.2}×", ours / base)
}

/// A `cordon serve` on a free loopback port, killed on drop.
pub(crate) struct Server {
    child: Child,
    pub(crate) url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `extra`: more `cordon serve` arguments (limits a benchmark needs).
pub(crate) fn serve(data_dir: &Path, key: &str, extra: &[&str]) -> Result<Server> {
    let exe = std::env::current_exe()?
        .parent()
        .context("bench executable dir")?
        .join("cordon");
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = std::fs::File::create(data_dir.with_extension("log"))?;
    let child = Command::new(&exe)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data_dir)
        .args(["--api-key", key])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: bench\r\n\r\n")?;
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
                return Ok(server);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("cordon serve did not answer /healthz within 30 s")
}

/// The primary client's cached venv (tests/clients/venv.sh).
pub(crate) fn python_venv() -> Result<PathBuf> {
    let root = workspace_root();
    let output = Command::new(root.join("tests/clients/venv.sh"))
        .arg(root.join("tests/clients/python/requirements.txt"))
        .stderr(Stdio::inherit())
        .output()
        .context("tests/clients/venv.sh")?;
    if !output.status.success() {
        bail!("tests/clients/venv.sh failed: {}", output.status);
    }
    Ok(PathBuf::from(
        String::from_utf8(output.stdout)?.trim().to_string(),
    ))
}

/// `value[key]`: a list of milliseconds.
pub(crate) fn samples(value: &serde_json::Value, key: &str) -> Vec<Duration> {
    value[key]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|ms| ms.as_f64())
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
                .collect()
        })
        .unwrap_or_default()
}

/// P1 and P4 through the official Python client (`py/p1_p4.py`) against a `cordon serve` of
/// this run; baselines: host spawn, `nsenter` into a running sandbox's init, `bwrap … true`.
pub(crate) async fn p1_p4(
    runtime: &Arc<NamespaceRuntime>,
    sections: &Sections,
    table: &mut Table,
    host: &[Duration],
    bwrap: &[Duration],
) -> Result<()> {
    let p1_rounds = if sections.has("p1") {
        env_or("CORDON_BENCH_P1_ROUNDS", 200usize)
    } else {
        0
    };
    let p4_rounds = if sections.has("p4") {
        env_or("CORDON_BENCH_P4_ROUNDS", 20usize)
    } else {
        0
    };
    let venv = python_venv()?;
    let data = tempfile::Builder::new()
        .prefix("cordon-bench-serve-")
        .tempdir()?;
    let data_dir = data.path().join("data");
    let key = "cordon-bench-key";
    let server = serve(&data_dir, key, &[])?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/p1_p4.py");
    let output = tokio::process::Command::new(venv.join("bin/python"))
        .arg(&script)
        .args([
            &server.url,
            key,
            &p1_rounds.to_string(),
            &p4_rounds.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .await?;
    drop(server);
    if !output.status.success() {
        bail!("{} failed: {}", script.display(), output.status);
    }
    let result: serde_json::Value = serde_json::from_slice(&output.stdout)?;

    if p1_rounds > 0 {
        let p1 = samples(&result, "p1_ms");
        // nsenter into the init of a running sandbox.
        let id = "bench-nsenter";
        runtime.create(spec(id, &TestOptions::default())).await?;
        runtime.start(id).await?;
        let nsenter = match runtime.state(id).await? {
            SandboxState::Running { pid } => time_n(100, || {
                let mut command = Command::new("nsenter");
                command
                    .args(["-t", &pid.to_string(), "-a", "/bin/true"])
                    .stderr(Stdio::null());
                run_ok(command)
            }),
            other => Err(anyhow::anyhow!("sandbox not running: {other:?}")),
        };
        runtime.destroy(id).await?;
        let target = "p50 ≤ 6 ms";
        table.row(
            "P1 sb.run(\"true\"), Python client",
            &p1,
            "host spawn `true`",
            host,
            target,
        );
        match nsenter {
            Ok(nsenter) => table.row(
                "P1 sb.run(\"true\"), Python client",
                &p1,
                "nsenter -t PID -a true",
                &nsenter,
                "",
            ),
            Err(error) => table
                .notes
                .push(format!("P1: nsenter baseline failed: {error:#}")),
        }
    }
    if p4_rounds > 0 {
        let p4 = samples(&result, "p4_ms");
        table.row(
            "P4 create → run(\"true\") → delete, cold",
            &p4,
            "bwrap … true",
            bwrap,
            "p50 ≤ 150 ms",
        );
        if which("crun") {
            table.notes.push(
                "P4: `crun` is installed, but no OCI bundle is set up here: no `crun run` baseline"
                    .into(),
            );
        } else {
            table
                .notes
                .push("P4: `crun` is not installed on this host: no `crun run` baseline".into());
        }
    }
    Ok(())
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// `cat FILE` with its stdout on a loopback TCP socket, read to the end by this process.
fn cat_over_tcp(file: &Path) -> Result<(u64, Duration)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let started = Instant::now();
    let reader = std::thread::spawn(move || -> Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; MIB];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let writer = TcpStream::connect(addr)?;
    let status = Command::new("cat")
        .arg(file)
        .stdout(Stdio::from(OwnedFd::from(writer)))
        .status()?;
    if !status.success() {
        bail!("cat failed: {status}");
    }
    let total = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok((total, started.elapsed()))
}

pub(crate) fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// Median and worst of throughputs in MB/s.
pub(crate) fn rate_stats(rates: &[f64]) -> (f64, f64) {
    let mut sorted = rates.to_vec();
    sorted.sort_by(f64::total_cmp);
    (sorted[sorted.len() / 2], sorted[0])
}

fn rate_row(table: &mut Table, metric: &str, ours: &[f64], baseline: &[f64], target: &str) {
    let (o50, omin) = rate_stats(ours);
    let (b50, bmin) = rate_stats(baseline);
    table.row_text([
        metric,
        &format!("{o50:.0} / {omin:.0} MB/s"),
        "cat over loopback TCP",
        &format!("{b50:.0} / {bmin:.0} MB/s"),
        &ratio(o50, b50),
        target,
    ]);
}

/// P5 (stdout of `cat` of 1 GiB over the WebSocket exec API) and P6 (upload and download of a
/// 1 GiB file over HTTP) through the agent channel; baseline `cat` of 1 GiB over loopback TCP.
pub(crate) async fn p5_p6(
    runtime: &Arc<NamespaceRuntime>,
    sections: &Sections,
    scratch: &Path,
    table: &mut Table,
) -> Result<()> {
    let bytes = env_or("CORDON_BENCH_BULK_MIB", 1024u64) << 20;
    let rounds = env_or("CORDON_BENCH_BULK_ROUNDS", 3usize).max(1);
    let host_file = scratch.join("bulk.bin");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&host_file)?);
        let chunk = vec![b'x'; MIB];
        for _ in 0..bytes / MIB as u64 {
            file.write_all(&chunk)?;
        }
        file.flush()?;
    }
    let mut baseline = Vec::new();
    for _ in 0..rounds {
        let (total, elapsed) = cat_over_tcp(&host_file)?;
        if total != bytes {
            bail!("cat over TCP moved {total} bytes, not {bytes}");
        }
        baseline.push(mbps(total, elapsed));
    }
    std::fs::remove_file(&host_file)?;

    let id = "bench-bulk";
    runtime.create(spec(id, &TestOptions::default())).await?;
    runtime.start(id).await?;
    let client = AgentClient::connect(runtime.open_channel(id).await?);
    let result = bulk(&client, sections, bytes, rounds).await;
    runtime.destroy(id).await?;
    let (upload, download, stream) = result?;
    let label = if bytes == GIB {
        "1 GiB".to_string()
    } else {
        format!("{} MiB", bytes >> 20)
    };
    if sections.has("p6") {
        rate_row(
            table,
            &format!("P6 upload {label}, channel (MB/s median / worst)"),
            &upload,
            &baseline,
            "≥ 500 MB/s",
        );
        rate_row(
            table,
            &format!("P6 download {label}, channel (MB/s median / worst)"),
            &download,
            &baseline,
            "≥ 500 MB/s",
        );
    }
    if sections.has("p5") {
        rate_row(
            table,
            &format!("P5 stdout {label} over WebSocket (MB/s median / worst)"),
            &stream,
            &baseline,
            "≥ 400 MB/s",
        );
    }
    Ok(())
}

const SANDBOX_FILE: &str = "/bench/bulk.bin";

type Rates = (Vec<f64>, Vec<f64>, Vec<f64>);

async fn bulk(
    client: &AgentClient,
    sections: &Sections,
    bytes: u64,
    rounds: usize,
) -> Result<Rates> {
    let (mut up, mut down, mut stream) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        upload(client, bytes).await?;
        up.push(mbps(bytes, started.elapsed()));
        if !sections.has("p6") {
            break;
        }
        let started = Instant::now();
        let got = download(client).await?;
        if got != bytes {
            bail!("download returned {got} bytes, not {bytes}");
        }
        down.push(mbps(bytes, started.elapsed()));
    }
    if sections.has("p5") {
        for _ in 0..rounds {
            let started = Instant::now();
            let got = stream_stdout(client, &format!("cat {SANDBOX_FILE}")).await?;
            if got != bytes {
                bail!("stdout carried {got} bytes, not {bytes}");
            }
            stream.push(mbps(bytes, started.elapsed()));
        }
    }
    Ok((up, down, stream))
}

/// `POST /upload?path=…` with a multipart body of `bytes` bytes of `x`, streamed.
async fn upload(client: &AgentClient, bytes: u64) -> Result<()> {
    let boundary = "cordon-bench-boundary-7d1f";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bulk.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let length = head.len() as u64 + bytes + tail.len() as u64;
    let chunk = Bytes::from(vec![b'x'; MIB]);
    let chunks = std::iter::once(Bytes::from(head))
        .chain(std::iter::repeat_n(chunk, (bytes / MIB as u64) as usize))
        .chain(std::iter::once(Bytes::from(tail)))
        .map(|data| Ok::<_, Infallible>(hyper::body::Frame::data(data)));
    let body = StreamBody::new(futures::stream::iter(chunks));
    let request = http::Request::post(format!("/upload?path={SANDBOX_FILE}"))
        .header(http::header::HOST, "agent")
        .header(
            http::header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header(http::header::CONTENT_LENGTH, length)
        .body(body)?;
    let response = client.request(request).await?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("upload: {status}: {}", String::from_utf8_lossy(&answer));
    }
    Ok(())
}

/// `GET /download?path=…`, counting the body's bytes.
async fn download(client: &AgentClient) -> Result<u64> {
    let request = http::Request::get(format!("/download?path={SANDBOX_FILE}"))
        .header(http::header::HOST, "agent")
        .body(Bytes::new())?;
    let response = client.request_bytes(request).await?;
    if !response.status().is_success() {
        bail!("download: {}", response.status());
    }
    let mut body = response.into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            total += data.len() as u64;
        }
    }
    Ok(total)
}

/// Runs `command` over `/execute/ws` and counts the stdout bytes until `exit`.
async fn stream_stdout(client: &AgentClient, command: &str) -> Result<u64> {
    let mut socket = client.websocket("/execute/ws").await?;
    let mut request = ExecuteRequest::new(command);
    request.shell = "/bin/sh".into();
    request.close_stdin = true;
    let message = serde_json::to_string(&ClientMessage::Execute(request))?;
    socket.send(Message::text(message)).await?;
    let mut total = 0u64;
    while let Some(frame) = socket.next().await {
        if let Message::Text(text) = frame? {
            match serde_json::from_str::<ServerMessage>(&text)? {
                ServerMessage::Stdout { data, .. } => total += data.len() as u64,
                ServerMessage::Exit { exit_code: 0 } => return Ok(total),
                ServerMessage::Exit { exit_code } => bail!("`{command}` exited {exit_code}"),
                ServerMessage::Error { error, .. } => bail!("exec failed: {error}"),
                _ => {}
            }
        }
    }
    bail!("socket closed before exit")
}

fn mem_available_kib() -> Result<u64> {
    let file = std::io::BufReader::new(std::fs::File::open("/proc/meminfo")?);
    for line in file.lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("MemAvailable:") {
            return Ok(rest.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no MemAvailable in /proc/meminfo")
}

/// Host memory in use, MiB, after the kernel settles a moment.
fn settled_used_mib() -> Result<f64> {
    std::thread::sleep(Duration::from_secs(2));
    Ok(-(mem_available_kib()? as f64) / 1024.0)
}

/// P8: N idle sandboxes alive at once and host memory per sandbox (MemAvailable delta), beside
/// N `bwrap … sleep` processes.
pub(crate) async fn p8(
    runtime: &Arc<NamespaceRuntime>,
    rootfs: &Path,
    table: &mut Table,
) -> Result<()> {
    let count = env_or("CORDON_BENCH_IDLE", 200usize).max(1);
    // Baseline first: bwrap sleepers.
    let before = settled_used_mib()?;
    let started = Instant::now();
    let mut sleepers = Vec::with_capacity(count);
    for _ in 0..count {
        let mut command = Command::new("bwrap");
        command
            .arg("--ro-bind")
            .arg(rootfs)
            .args([
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--unshare-all",
                "--die-with-parent",
                "/bin/sleep",
                "100000",
            ])
            .stdin(Stdio::null());
        sleepers.push(command.spawn()?);
    }
    let bwrap_start = started.elapsed();
    let bwrap_used = settled_used_mib()? - before;
    let mut bwrap_alive = 0usize;
    for child in &mut sleepers {
        if matches!(child.try_wait(), Ok(None)) {
            bwrap_alive += 1;
        }
    }
    for child in &mut sleepers {
        let _ = child.kill();
        let _ = child.wait();
    }

    let before = settled_used_mib()?;
    let started = Instant::now();
    let mut ids = Vec::with_capacity(count);
    let mut failure = None;
    for n in 0..count {
        let id = format!("bench-idle-{n}");
        let created = runtime.create(spec(&id, &TestOptions::default())).await;
        let result = match created {
            Ok(()) => {
                ids.push(id.clone());
                runtime.start(&id).await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            failure = Some(format!("sandbox {n} failed: {error}"));
            break;
        }
    }
    let cordon_start = started.elapsed();
    let cordon_used = settled_used_mib()? - before;
    let mut alive = 0;
    let mut cgroup_bytes = 0u64;
    for id in &ids {
        if matches!(runtime.state(id).await, Ok(SandboxState::Running { .. })) {
            alive += 1;
            cgroup_bytes += runtime.usage(id).await.map(|u| u.memory_bytes).unwrap_or(0);
        }
    }
    for id in &ids {
        let _ = runtime.destroy(id).await;
    }
    table.row_text([
        &format!("P8 idle sandboxes alive (of {count} started)"),
        &format!("{alive} in {:.1} s", cordon_start.as_secs_f64()),
        "bwrap … sleep",
        &format!("{bwrap_alive} in {:.1} s", bwrap_start.as_secs_f64()),
        &ratio(alive as f64, bwrap_alive as f64),
        "≥ 1000",
    ]);
    let ours = cordon_used / alive.max(1) as f64;
    let base = bwrap_used / bwrap_alive.max(1) as f64;
    table.row_text([
        "P8 host memory per idle sandbox (MemAvailable Δ)",
        &format!("{ours:.2} MiB"),
        "bwrap … sleep",
        &format!("{base:.2} MiB"),
        &ratio(ours, base),
        "≤ 2 MiB",
    ]);
    table.notes.push(format!(
        "P8: the sandboxes' own cgroups (agent, page cache, kernel memory charged to them) hold \
         {:.2} MiB each on average; MemAvailable Δ is host-wide and moved by other load",
        cgroup_bytes as f64 / (1 << 20) as f64 / alive.max(1) as f64
    ));
    if let Some(failure) = failure {
        table.notes.push(format!("P8: {failure}"));
    }
    Ok(())
}

/// P9: sandboxes created, started (agent ready) and destroyed per second, sustained, with
/// `CORDON_BENCH_RATE_WORKERS` (default 2) in parallel; beside `bwrap … true` the same way.
pub(crate) async fn p9(
    runtime: &Arc<NamespaceRuntime>,
    rootfs: &Path,
    table: &mut Table,
) -> Result<()> {
    let seconds = env_or("CORDON_BENCH_RATE_SECS", 10u64);
    let workers = env_or("CORDON_BENCH_RATE_WORKERS", 2usize).max(1);
    let window = Duration::from_secs(seconds);

    let started = Instant::now();
    let deadline = started + window;
    let mut handles = Vec::new();
    for _ in 0..workers {
        let rootfs = rootfs.to_path_buf();
        handles.push(std::thread::spawn(move || -> Result<Vec<Duration>> {
            let mut times = Vec::new();
            while Instant::now() < deadline {
                let one = Instant::now();
                run_ok(bwrap_true(&rootfs))?;
                times.push(one.elapsed());
            }
            Ok(times)
        }));
    }
    let mut base_times = Vec::new();
    for handle in handles {
        base_times.extend(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("worker panicked"))??,
        );
    }
    let base_rate = base_times.len() as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let runtime = runtime.clone();
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            let mut n = 0;
            while Instant::now() < deadline {
                let id = format!("bench-rate-{worker}-{n}");
                n += 1;
                let one = Instant::now();
                runtime.create(spec(&id, &TestOptions::default())).await?;
                let started = runtime.start(&id).await;
                runtime.destroy(&id).await?;
                started?;
                times.push(one.elapsed());
            }
            anyhow::Ok(times)
        }));
    }
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await??);
    }
    let rate = times.len() as f64 / started.elapsed().as_secs_f64();
    table.row_text([
        &format!("P9 create+start+destroy rate ({workers} workers, {seconds} s)"),
        &format!("{rate:.1} /s"),
        "bwrap … true, same workers",
        &format!("{base_rate:.1} /s"),
        &ratio(rate, base_rate),
        "≥ 50 /s",
    ]);
    table.row(
        "P9 one create+start+destroy, under that load",
        &times,
        "bwrap … true, same workers",
        &base_times,
        "",
    );
    Ok(())
}

/// P10: exec `true` round trips with 100 commands in flight across 20 sandboxes, beside the
/// same exec one at a time.
pub(crate) async fn p10(runtime: &Arc<NamespaceRuntime>, table: &mut Table) -> Result<()> {
    let sandboxes = env_or("CORDON_BENCH_P10_SANDBOXES", 20usize).max(1);
    let concurrency = env_or("CORDON_BENCH_P10_CONCURRENCY", 100usize).max(1);
    let batches = env_or("CORDON_BENCH_P10_BATCHES", 5usize).max(1);
    let mut ids = Vec::new();
    let result = async {
        let mut clients = Vec::new();
        for n in 0..sandboxes {
            let id = format!("bench-conc-{n}");
            runtime.create(spec(&id, &TestOptions::default())).await?;
            ids.push(id.clone());
            runtime.start(&id).await?;
            clients.push(AgentClient::connect(runtime.open_channel(&id).await?));
        }
        let mut phases = Phases::default();
        let mut serial = Vec::new();
        for n in 0..concurrency {
            let started = Instant::now();
            exec_true(&clients[n % sandboxes], &mut phases).await?;
            serial.push(started.elapsed());
        }
        let mut concurrent = Vec::new();
        for _ in 0..batches {
            let runs = (0..concurrency).map(|n| {
                let client = &clients[n % sandboxes];
                async move {
                    let mut phases = Phases::default();
                    let started = Instant::now();
                    exec_true(client, &mut phases).await?;
                    anyhow::Ok(started.elapsed())
                }
            });
            for sample in futures::future::join_all(runs).await {
                concurrent.push(sample?);
            }
        }
        anyhow::Ok((serial, concurrent))
    }
    .await;
    for id in &ids {
        let _ = runtime.destroy(id).await;
    }
    let (serial, concurrent) = result?;
    let (c50, c95) = percentiles(&concurrent);
    let (s50, s95) = percentiles(&serial);
    table.row_text([
        &format!("P10 exec `true`, {concurrency} concurrent over {sandboxes} sandboxes"),
        &format!("{} / {}", ms(c50), ms(c95)),
        "the same, 1 at a time",
        &format!("{} / {}", ms(s50), ms(s95)),
        &format!("{} (p95)", ratio(c95.as_secs_f64(), s95.as_secs_f64())),
        "p95 ≤ 2× serial",
    ]);
    table.notes.push(format!(
        "P10: {} samples concurrent ({batches} batches of {concurrency}, one client task), {} serial",
        concurrent.len(),
        serial.len()
    ));
    Ok(())
}
