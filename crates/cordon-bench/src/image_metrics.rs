//! The `images` section: building a snapshot from a ~100 MB image in a real registry, and
//! creating sandboxes from it.
//!
//! The image is the busybox test rootfs plus one layer of generated content (text-like files
//! that gzip well, random files that do not, in nested directories; the same bytes every run),
//! both gzip, pushed with `skopeo` to a `docker-registry` on loopback.
//!
//! - Pull, cold: `cordon_image::pull_image` into an empty layer store, beside `skopeo copy`
//!   of the same image into an OCI layout followed by `tar -xzf` of each layer blob into one
//!   directory (the same fetch, decompress and write work, by standard tools). Warm: the pull
//!   again into the store that already holds every layer.
//! - Sandbox create + start from the pulled layers with a 1 GiB disk limit (as the server
//!   gives sandboxes from snapshots), beside the busybox rootfs with the same limit and
//!   `bwrap … true`.
//!
//! Knobs: `CORDON_BENCH_IMAGE_MB` (100), `CORDON_BENCH_PULL_ROUNDS` (5),
//! `CORDON_BENCH_CREATE_ROUNDS` (10).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cordon_channel::AgentClient;
use cordon_image::{pull_image, Image, LayerStore, RegistryConfig, UnpackLimits};
use cordon_runtime::{Limits, NamespaceRuntime, Runtime, SandboxSpec};
use cordon_testkit::oci_layout::{busybox_image, LayerCompression};
use cordon_testkit::registry::TestRegistry;
use cordon_testkit::{spec, TestOptions};

use crate::target_metrics::env_or;
use crate::{percentiles, run_ok, Table};

const MIB: u64 = 1 << 20;
/// The disk limit of the sandboxes created from the image.
const SANDBOX_DISK_BYTES: u64 = 1 << 30;
/// Where the generated content lies in the image (and in the sandbox).
const CONTENT_DIR: &str = "usr/share/cordon-bench";
/// Bounds one pull (ours or the baseline's); a healthy one takes seconds.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Smallest and largest generated file: sizes are log-uniform in between, so most files are
/// small and most bytes are in large ones, as in real images.
const MIN_FILE_BYTES: u64 = 1 << 10;
const MAX_FILE_BYTES: u64 = 2 << 20;
/// Of every five files, this many are text-like; the others are random bytes.
const TEXT_FILES_PER_FIVE: u64 = 3;

pub(crate) async fn images(
    runtime: &Arc<NamespaceRuntime>,
    work_dir: &Path,
    bwrap: &[Duration],
    table: &mut Table,
) -> Result<()> {
    let image_bytes = env_or("CORDON_BENCH_IMAGE_MB", 100u64) * MIB;
    let pull_rounds = env_or("CORDON_BENCH_PULL_ROUNDS", 5usize).max(1);
    let create_rounds = env_or("CORDON_BENCH_CREATE_ROUNDS", 10usize).max(1);

    let work = tempfile::Builder::new()
        .prefix("images-")
        .tempdir_in(work_dir)?;
    let registry = TestRegistry::open().context("starting docker-registry")?;
    let (reference, content) = push_bench_image(&registry, work.path(), image_bytes)?;
    let registry_config = RegistryConfig {
        insecure_registries: vec![registry.address().to_string()],
        ..RegistryConfig::default()
    };

    let mut cold = Vec::with_capacity(pull_rounds);
    let mut baseline = Vec::with_capacity(pull_rounds);
    let mut pulled = None;
    for round in 0..pull_rounds {
        let store_dir = work.path().join(format!("store-{round}"));
        let store = LayerStore::open(&store_dir)?;
        let started = Instant::now();
        let image = pull(&store, &reference, &registry_config).await?;
        cold.push(started.elapsed());

        let skopeo_dir = work.path().join(format!("skopeo-{round}"));
        let started = Instant::now();
        skopeo_copy_and_untar(&reference, &skopeo_dir)?;
        baseline.push(started.elapsed());
        fs::remove_dir_all(&skopeo_dir)?;

        if let Some((old_store, _)) = pulled.replace((store, image)) {
            remove_store(old_store)?;
        }
    }
    let (store, image) = pulled.context("no pull round ran")?;
    let mut warm = Vec::with_capacity(pull_rounds);
    for _ in 0..pull_rounds {
        let started = Instant::now();
        let again = pull(&store, &reference, &registry_config).await?;
        warm.push(started.elapsed());
        if again.layers != image.layers {
            bail!("the warm pull resolved other layers than the cold one");
        }
    }

    let pull_name = format!("snapshot pull ~{} MB, cold (pull_image)", image_bytes / MIB);
    table.row(&pull_name, &cold, "skopeo copy + tar -xzf", &baseline, "");
    table.row(
        &format!(
            "snapshot pull ~{} MB, warm (layers present)",
            image_bytes / MIB
        ),
        &warm,
        "the cold pull",
        &cold,
        "",
    );
    table.notes.push(content.describe(&image));
    table.notes.push(throughput_note(&image, &cold, &baseline));

    let layers: Vec<PathBuf> = image.layers.iter().map(|id| store.layer_path(id)).collect();
    check_sandbox_sees_image(runtime, &layers, &image, content.files).await?;
    let mut from_image = Vec::with_capacity(create_rounds);
    let mut from_rootfs = Vec::with_capacity(create_rounds);
    for round in 0..create_rounds {
        let image_spec = image_sandbox_spec(&format!("bench-image-{round}"), &layers, &image);
        from_image.push(create_start_destroy(runtime, image_spec).await?);
        let rootfs_spec = spec(&format!("bench-rootfs-{round}"), &disk_limited());
        from_rootfs.push(create_start_destroy(runtime, rootfs_spec).await?);
    }
    let create_name = "sandbox create + start from the pulled image, 1 GiB disk";
    table.row(
        create_name,
        &from_image,
        "same from the busybox rootfs",
        &from_rootfs,
        "",
    );
    table.row(create_name, &from_image, "bwrap … true", bwrap, "");
    remove_store(store)?;
    Ok(())
}

async fn pull(store: &LayerStore, reference: &str, registry: &RegistryConfig) -> Result<Image> {
    // Bounds as loose as the server's defaults: the bench measures, it does not refuse.
    let limits = UnpackLimits {
        max_unpacked_bytes: 20 << 30,
        max_entries: 1_000_000,
        max_compressed_bytes: 20 << 30,
    };
    let pulling = pull_image(store, reference, registry, None, &limits);
    tokio::time::timeout(PULL_TIMEOUT, pulling)
        .await
        .with_context(|| format!("pulling {reference} took over {PULL_TIMEOUT:?}"))?
        .with_context(|| format!("pulling {reference}"))
}

fn remove_store(store: LayerStore) -> Result<()> {
    let root = store.root().to_path_buf();
    drop(store);
    fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))
}

/// Generates the content, builds the image in an OCI layout and pushes it; returns the
/// pullable reference and what the content holds.
fn push_bench_image(
    registry: &TestRegistry,
    work: &Path,
    image_bytes: u64,
) -> Result<(String, Content)> {
    let tree = work.join("content");
    let mut content = write_content(&tree.join(CONTENT_DIR), image_bytes)?;
    let layout = work.join("layout");
    let written = busybox_image()
        .layer_from_dir(&tree, LayerCompression::Gzip)
        .write_layout(&layout, "bench")?;
    fs::remove_dir_all(&tree)?;
    for digest in &written.layer_digests {
        let hex = digest.trim_start_matches("sha256:");
        content.gzip_bytes += fs::metadata(layout.join("blobs/sha256").join(hex))?.len();
    }
    let reference = registry
        .push(&layout, "bench", "bench/big:1")
        .context("pushing the bench image")?;
    fs::remove_dir_all(&layout)?;
    Ok((reference, content))
}

/// What [`write_content`] wrote.
struct Content {
    files: u64,
    dirs: u64,
    text_bytes: u64,
    random_bytes: u64,
    /// The image's layer blobs together.
    gzip_bytes: u64,
}

impl Content {
    fn describe(&self, image: &Image) -> String {
        format!(
            "images: {} layers, {:.1} MB unpacked, {:.1} MB gzip; the generated layer holds {} \
             files in {} dirs, {:.1} MB text-like and {:.1} MB random",
            image.layers.len(),
            image.size_bytes as f64 / MIB as f64,
            self.gzip_bytes as f64 / MIB as f64,
            self.files,
            self.dirs,
            self.text_bytes as f64 / MIB as f64,
            self.random_bytes as f64 / MIB as f64,
        )
    }
}

fn throughput_note(image: &Image, cold: &[Duration], baseline: &[Duration]) -> String {
    let rate = |samples: &[Duration]| {
        image.size_bytes as f64 / MIB as f64 / percentiles(samples).0.as_secs_f64()
    };
    format!(
        "images: cold pull {:.0} MB/s unpacked (p50), skopeo + tar {:.0} MB/s; skopeo checks \
         blob digests, pull_image also checks diff ids and unpacks through its safety checks",
        rate(cold),
        rate(baseline),
    )
}

/// Writes about `total` bytes of files under `root` in 16 × 4 directories, deterministically.
fn write_content(root: &Path, total: u64) -> io::Result<Content> {
    let mut random = SplitMix64(0x00c0_7d01_bec4_0001);
    let mut content = Content {
        files: 0,
        dirs: 0,
        text_bytes: 0,
        random_bytes: 0,
        gzip_bytes: 0,
    };
    let mut written = 0u64;
    while written < total {
        let index = content.files;
        let size = log_uniform(&mut random, MIN_FILE_BYTES, MAX_FILE_BYTES).min(total - written);
        let dir = format!("lib{:02}/part{}", index % 16, (index / 16) % 4);
        let text = index % 5 < TEXT_FILES_PER_FIVE;
        let name = format!("{dir}/file{index:04}.{}", if text { "txt" } else { "bin" });
        let path = root.join(&name);
        if let Some(parent) = path.parent().filter(|parent| !parent.exists()) {
            fs::create_dir_all(parent)?;
            content.dirs += 1;
        }
        let mut file = io::BufWriter::new(fs::File::create(&path)?);
        if text {
            write_text(&mut file, &mut random, size)?;
            content.text_bytes += size;
        } else {
            write_random(&mut file, &mut random, size)?;
            content.random_bytes += size;
        }
        file.into_inner().map_err(io::IntoInnerError::into_error)?;
        written += size;
        content.files += 1;
    }
    Ok(content)
}

/// Lines of words drawn from a small vocabulary: compresses about like source code and docs.
fn write_text(out: &mut impl Write, random: &mut SplitMix64, size: u64) -> io::Result<()> {
    const WORDS: [&str; 32] = [
        "the", "sandbox", "layer", "image", "return", "value", "let", "mut", "fn", "self",
        "config", "error", "result", "match", "some", "none", "path", "file", "bytes", "size",
        "count", "index", "digest", "registry", "manifest", "blob", "snapshot", "agent", "runtime",
        "spec", "limits", "quota",
    ];
    let mut line = String::new();
    let mut left = size;
    while left > 0 {
        line.clear();
        let words = 3 + random.below(10);
        for _ in 0..words {
            line.push_str(WORDS[random.below(WORDS.len() as u64) as usize]);
            line.push(' ');
        }
        line.pop();
        line.push('\n');
        let take = (line.len() as u64).min(left) as usize;
        out.write_all(&line.as_bytes()[..take])?;
        left -= take as u64;
    }
    Ok(())
}

fn write_random(out: &mut impl Write, random: &mut SplitMix64, size: u64) -> io::Result<()> {
    let mut left = size;
    while left > 0 {
        let bytes = random.next().to_le_bytes();
        let take = (bytes.len() as u64).min(left) as usize;
        out.write_all(&bytes[..take])?;
        left -= take as u64;
    }
    Ok(())
}

fn log_uniform(random: &mut SplitMix64, min: u64, max: u64) -> u64 {
    let unit = random.next() as f64 / u64::MAX as f64;
    let (low, high) = ((min as f64).ln(), (max as f64).ln());
    (low + unit * (high - low)).exp() as u64
}

/// SplitMix64: a tiny deterministic generator, enough for bench content.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// The baseline: `skopeo copy` into an OCI layout, then `tar -xzf` of each layer blob, bottom
/// first, into one directory.
fn skopeo_copy_and_untar(reference: &str, dir: &Path) -> Result<()> {
    let layout = dir.join("layout");
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    let mut copy = Command::new("timeout");
    copy.arg(PULL_TIMEOUT.as_secs().to_string())
        .args([
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:x", layout.display()));
    run_ok(copy)?;
    for blob in layer_blobs(&layout)? {
        let mut untar = Command::new("tar");
        untar.arg("-xzf").arg(&blob).arg("-C").arg(&rootfs);
        run_ok(untar)?;
    }
    Ok(())
}

/// The layer blobs of the layout's only image, in manifest order (bottom first).
fn layer_blobs(layout: &Path) -> Result<Vec<PathBuf>> {
    let blob = |digest: &serde_json::Value| -> Result<PathBuf> {
        let digest = digest.as_str().context("descriptor without a digest")?;
        let hex = digest
            .strip_prefix("sha256:")
            .context("digest is not sha256")?;
        Ok(layout.join("blobs/sha256").join(hex))
    };
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(&index["manifests"][0]["digest"])?)?)?;
    manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|layer| blob(&layer["digest"]))
        .collect()
}

fn disk_limited() -> TestOptions {
    TestOptions {
        limits: Limits {
            disk_bytes: Some(SANDBOX_DISK_BYTES),
            ..Limits::default()
        },
        ..TestOptions::default()
    }
}

/// A sandbox on the image's layers (top first) with its run config, as the server makes one.
fn image_sandbox_spec(id: &str, layers: &[PathBuf], image: &Image) -> SandboxSpec {
    let mut spec = spec(id, &disk_limited());
    spec.layers = layers.to_vec();
    spec.agent_config.run_config = image.run_config.clone();
    spec
}

/// Create + start (the agent is ready when `start` returns); the sandbox is destroyed after.
async fn create_start_destroy(
    runtime: &Arc<NamespaceRuntime>,
    spec: SandboxSpec,
) -> Result<Duration> {
    let id = spec.id.clone();
    let started = Instant::now();
    let booted = match runtime.create(spec).await {
        Ok(()) => runtime.start(&id).await.map(|()| started.elapsed()),
        Err(error) => return Err(error.into()),
    };
    runtime.destroy(&id).await?;
    Ok(booted?)
}

/// Before timing: a sandbox on the pulled layers runs the image's busybox and sees every
/// generated file, so the rows measure a working sandbox.
async fn check_sandbox_sees_image(
    runtime: &Arc<NamespaceRuntime>,
    layers: &[PathBuf],
    image: &Image,
    files: u64,
) -> Result<()> {
    let id = "bench-image-check";
    runtime
        .create(image_sandbox_spec(id, layers, image))
        .await?;
    let checked = async {
        runtime.start(id).await?;
        let client = AgentClient::connect(runtime.open_channel(id).await?);
        let command = format!("find /{CONTENT_DIR} -type f | wc -l");
        let output = cordon_testkit::try_exec_as(&client, &command, Some("root"), 60)
            .await
            .map_err(anyhow::Error::msg)?;
        if output.exit_code != 0 || output.stdout.trim().parse::<u64>().ok() != Some(files) {
            bail!("`{command}` in a sandbox from the image (expected {files}): {output:?}");
        }
        Ok(())
    }
    .await;
    runtime.destroy(id).await?;
    checked
}
