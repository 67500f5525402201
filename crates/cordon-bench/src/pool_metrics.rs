//! P3 (create → first `run("true")` → delete from a warm pool, official Python client) beside P4
//! (the same, cold) in the same run, and a burst of concurrent creates against a pool beside the
//! same burst cold: `py/p3_pool.py` against a `cordon serve` of this run.
//!
//! Knobs: `CORDON_BENCH_P3_ROUNDS` (20 rounds, each one P3 and one P4),
//! `CORDON_BENCH_P3_BURST` (100 concurrent creates; 0 skips the burst),
//! `CORDON_BENCH_P3_POOL` (10 warm sandboxes).

use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Result};

use crate::target_metrics::{env_or, python_venv, samples, serve};
use crate::Table;

const KEY: &str = "cordon-bench-key";

/// P3 beside P4, and the burst against a pool beside the same burst cold.
pub(crate) async fn p3(table: &mut Table) -> Result<()> {
    let rounds = env_or("CORDON_BENCH_P3_ROUNDS", 20usize);
    let burst = env_or("CORDON_BENCH_P3_BURST", 100usize);
    let pool = env_or("CORDON_BENCH_P3_POOL", 10usize);
    let venv = python_venv()?;
    let data = tempfile::Builder::new()
        .prefix("cordon-bench-pool-")
        .tempdir()?;
    // Every sandbox of the burst and every warm one count against the workspace's limit
    // (100 by default): room for both, and for the one P3/P4 round's sandbox.
    let limit = (burst + pool + 1).max(100).to_string();
    let server = serve(
        &data.path().join("data"),
        KEY,
        &["--max-sandboxes-per-workspace", &limit],
    )?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/p3_pool.py");
    let output = tokio::process::Command::new(venv.join("bin/python"))
        .arg(&script)
        .args([&server.url, KEY])
        .args([rounds, burst, pool].map(|n| n.to_string()))
        .stderr(Stdio::inherit())
        .output()
        .await?;
    drop(server);
    if !output.status.success() {
        bail!("{} failed: {}", script.display(), output.status);
    }
    let result: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    table.row(
        "P3 create → run(\"true\") → delete, warm pool",
        &samples(&result, "p3_ms"),
        "P4 the same, cold",
        &samples(&result, "p4_ms"),
        "p50 ≤ 25 ms, p95 ≤ 60 ms",
    );
    table.notes.push(format!(
        "P3: {} of {rounds} creates served by the pool (its `claimed` counter)",
        result["p3_served"]
    ));
    if burst > 0 {
        table.row(
            &format!("{burst} concurrent creates, pool of {pool} (each)"),
            &samples(&result, "burst_pool_ms"),
            "the same burst, cold",
            &samples(&result, "burst_cold_ms"),
            "",
        );
        table.notes.push(format!(
            "burst of {burst}: {:.0} ms in all against a pool of {pool} ({} served by it), {:.0} ms cold",
            result["burst_pool_wall_ms"].as_f64().unwrap_or(f64::NAN),
            result["burst_served"],
            result["burst_cold_wall_ms"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    Ok(())
}
