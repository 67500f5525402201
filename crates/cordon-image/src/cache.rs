//! Built-once layers in the cache dir: found in milliseconds when finished, rebuilt when the
//! recipe changed, discarded and redone when a build was interrupted.
//!
//! A layer is built in `<store>/.<key>.staging/`, gets its metadata and then its `complete`
//! marker (holding `key`) last, and is renamed to `<store>/<key>/` in one step. So a directory
//! named after a key either is finished or does not exist; anything else found is debris from
//! an interrupted build and is deleted (through [`remove_tree`], never following a mount).
//! Builds of one store are serialised by an exclusive `flock` on `<store>/.lock`, so two
//! processes (the CLI and a server, or parallel test binaries) never build the same thing.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cordon_api::RunConfig;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::digest::summarize_tree;
use crate::error::{ImageError, IoContext};
use crate::mounts::{remove_tree, unmount_below};

const LAYER_DIR: &str = "rootfs";
const MARKER: &str = "complete";
const SNAPSHOT_FILE: &str = "snapshot.json";
const RUN_CONFIG_FILE: &str = "run_config.json";
const LOCK_FILE: &str = ".lock";

/// A finished snapshot layer, ready to be a sandbox's lower layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedSnapshot {
    /// Registry-style name and tag, e.g. `system/default:latest`.
    pub name: String,
    /// Content digest of the layer (`sha256:<hex>`): the snapshot's identity.
    pub id: String,
    /// Hash of the recipe it was built from: the cache key, and the name of its directory.
    pub recipe: String,
    /// The read-only root filesystem layer (`SandboxSpec.layers`). Never write to it.
    pub path: PathBuf,
    /// Defaults for commands in sandboxes booted from it (spec §2.1.2, the lowest layer).
    pub run_config: RunConfig,
    /// Sum of its regular files' sizes.
    pub size_bytes: u64,
    /// When the build finished, seconds since the Unix epoch.
    pub built_at: u64,
}

/// What `snapshot.json` holds (the path is wherever the directory is found).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotRecord {
    name: String,
    id: String,
    recipe: String,
    size_bytes: u64,
    entries: u64,
    built_at: u64,
}

/// One cacheable layer: where it goes and what it is called.
pub(crate) struct CacheEntry<'a> {
    /// The directory holding every build of this kind of layer.
    pub store: &'a Path,
    /// The recipe hash; also the final directory's name.
    pub key: &'a str,
    pub name: &'a str,
    pub run_config: &'a RunConfig,
}

/// Fills the layer directory it is given (which exists and is empty).
pub(crate) type Build<'a> = dyn FnMut(&Path, &mut dyn FnMut(&str)) -> Result<(), ImageError> + 'a;

/// The finished layer for `entry`, building it with `build` first when there is none.
pub(crate) fn prepare_cached(
    entry: &CacheEntry<'_>,
    build: &mut Build<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<PreparedSnapshot, ImageError> {
    let finished = entry.store.join(entry.key);
    if let Some(snapshot) = load_finished(&finished, entry.key) {
        return Ok(snapshot);
    }
    create_private_dir(entry.store)?;
    let _lock = lock_store(entry.store, progress)?;
    // Another process may have finished it while we waited for the lock.
    if let Some(snapshot) = load_finished(&finished, entry.key) {
        return Ok(snapshot);
    }
    discard_debris(&finished, progress)?;
    let staging = entry.store.join(format!(".{}.staging", entry.key));
    discard_debris(&staging, progress)?;
    create_private_dir(&staging)?;

    let started = Instant::now();
    let built =
        build_into(&staging, entry, build, progress).and_then(|()| publish(&staging, &finished));
    if let Err(error) = built {
        if let Err(cleanup) = remove_tree(&staging) {
            warn!(%cleanup, "could not discard the failed build");
        }
        return Err(error);
    }
    let snapshot = load_finished(&finished, entry.key).ok_or_else(|| ImageError::Io {
        what: format!("read back {}", finished.display()),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    info!(id = %snapshot.id, elapsed = ?started.elapsed(), "snapshot built");
    Ok(snapshot)
}

/// Builds the layer in `staging` and writes its metadata, then the marker last.
fn build_into(
    staging: &Path,
    entry: &CacheEntry<'_>,
    build: &mut Build<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let layer = staging.join(LAYER_DIR);
    fs::create_dir(&layer).context(|| format!("create {}", layer.display()))?;
    build(&layer, progress)?;
    // A host mount left inside would be captured by the digest and exposed to sandboxes.
    unmount_below(staging)?;

    progress("computing the layer digest");
    let summary = summarize_tree(&layer)?;
    let record = SnapshotRecord {
        name: entry.name.to_string(),
        id: summary.digest,
        recipe: entry.key.to_string(),
        size_bytes: summary.size_bytes,
        entries: summary.entries,
        built_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    write_json(&staging.join(SNAPSHOT_FILE), &record)?;
    write_json(&staging.join(RUN_CONFIG_FILE), entry.run_config)?;
    // Everything must be on disk before the marker says it is.
    sync_filesystem(staging)?;
    write_durably(&staging.join(MARKER), entry.key.as_bytes())
}

/// Renames the finished staging directory into place.
fn publish(staging: &Path, finished: &Path) -> Result<(), ImageError> {
    fs::rename(staging, finished)
        .context(|| format!("rename {} to {}", staging.display(), finished.display()))?;
    if let Some(store) = finished.parent() {
        File::open(store)
            .and_then(|dir| dir.sync_all())
            .context(|| format!("sync {}", store.display()))?;
    }
    Ok(())
}

/// The snapshot in `dir` when its marker holds `key` and its metadata reads back.
fn load_finished(dir: &Path, key: &str) -> Option<PreparedSnapshot> {
    let marker = fs::read_to_string(dir.join(MARKER)).ok()?;
    if marker.trim() != key {
        warn!(dir = %dir.display(), "completion marker names another recipe");
        return None;
    }
    let loaded = read_json::<SnapshotRecord>(&dir.join(SNAPSHOT_FILE))
        .and_then(|record| Ok((record, read_json::<RunConfig>(&dir.join(RUN_CONFIG_FILE))?)));
    match loaded {
        Ok((record, run_config)) => Some(PreparedSnapshot {
            name: record.name,
            id: record.id,
            recipe: record.recipe,
            path: dir.join(LAYER_DIR),
            run_config,
            size_bytes: record.size_bytes,
            built_at: record.built_at,
        }),
        Err(error) => {
            warn!(%error, "finished snapshot has unreadable metadata; rebuilding");
            None
        }
    }
}

/// Deletes what an interrupted or broken build left at `path`, if anything.
pub(crate) fn discard_debris(
    path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    progress(&format!(
        "discarding an unfinished build at {}",
        path.display()
    ));
    remove_tree(path)
}

/// An exclusive lock on the store, held until dropped; says so when it has to wait.
pub(crate) fn lock_store(
    store: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Flock<File>, ImageError> {
    let path = store.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .context(|| format!("open {}", path.display()))?;
    let lock_failed = |errno: Errno| ImageError::Io {
        what: format!("lock {}", path.display()),
        source: errno.into(),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, Errno::EWOULDBLOCK)) => {
            progress("another process is building this snapshot; waiting for it");
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| lock_failed(errno))
        }
        Err((_, errno)) => Err(lock_failed(errno)),
    }
}

/// Creates `dir` (and parents) readable by all but writable by its owner only: layers are
/// read by every sandbox and must never be writable by anyone but the builder.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), ImageError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .context(|| format!("create {}", dir.display()))
}

pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<(), ImageError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| ImageError::Metadata {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    write_durably(path, &bytes)
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    let bytes = fs::read(path).context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|source| ImageError::Metadata {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut file = File::create(path).context(|| format!("create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .context(|| format!("write {}", path.display()))
}

/// `syncfs` on the filesystem holding `dir`: one call instead of an fsync per file.
pub(crate) fn sync_filesystem(dir: &Path) -> Result<(), ImageError> {
    let handle = File::open(dir).context(|| format!("open {}", dir.display()))?;
    nix::unistd::syncfs(handle.as_fd()).context(|| format!("syncfs {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;

    fn run_config() -> RunConfig {
        RunConfig {
            user: Some("user".into()),
            work_dir: Some("/home/user".into()),
            env_vars: Some(BTreeMap::from([("LANG".into(), "C.UTF-8".into())])),
        }
    }

    /// Prepares `key` in `store` with a build that writes `content` and counts its calls.
    fn prepare(
        store: &Path,
        key: &str,
        content: &str,
        builds: &mut u32,
    ) -> Result<PreparedSnapshot, ImageError> {
        let run_config = run_config();
        let entry = CacheEntry {
            store,
            key,
            name: "system/test:latest",
            run_config: &run_config,
        };
        let mut build = |layer: &Path, _: &mut dyn FnMut(&str)| {
            *builds += 1;
            fs::write(layer.join("file"), content).context(|| "write".into())
        };
        prepare_cached(&entry, &mut build, &mut |_| {})
    }

    #[test]
    fn a_finished_build_is_found_again_without_building() {
        let store = tempfile::tempdir().unwrap();
        let mut builds = 0;
        let first = prepare(store.path(), "k1", "one", &mut builds).unwrap();
        assert_eq!(builds, 1);
        assert_eq!(first.path, store.path().join("k1/rootfs"));
        assert_eq!(fs::read_to_string(first.path.join("file")).unwrap(), "one");
        assert_eq!(first.run_config, run_config());
        assert_eq!(first.size_bytes, 3);
        assert!(first.id.starts_with("sha256:"));

        let started = Instant::now();
        let again = prepare(store.path(), "k1", "ignored", &mut builds).unwrap();
        assert!(started.elapsed() < Duration::from_millis(200));
        assert_eq!(builds, 1, "a finished build was rebuilt");
        assert_eq!(again, first);
    }

    #[test]
    fn a_changed_recipe_builds_beside_the_old_one() {
        let store = tempfile::tempdir().unwrap();
        let mut builds = 0;
        let old = prepare(store.path(), "k1", "one", &mut builds).unwrap();
        let new = prepare(store.path(), "k2", "two", &mut builds).unwrap();
        assert_eq!(builds, 2);
        assert_ne!(old.id, new.id);
        assert_ne!(old.path, new.path);
        // Sandboxes may still run on the old layer: it stays.
        assert_eq!(fs::read_to_string(old.path.join("file")).unwrap(), "one");
    }

    #[test]
    fn an_interrupted_build_is_discarded_and_redone() {
        let store = tempfile::tempdir().unwrap();
        // What a killed build leaves: a staging tree without marker, and a final directory
        // whose marker names another recipe (e.g. tampered with).
        let staging = store.path().join(".k1.staging/rootfs");
        fs::create_dir_all(&staging).unwrap();
        fs::write(staging.join("half-written"), "x").unwrap();
        fs::create_dir_all(store.path().join("k1/rootfs")).unwrap();
        fs::write(store.path().join("k1/complete"), "k0").unwrap();

        let mut builds = 0;
        let snapshot = prepare(store.path(), "k1", "one", &mut builds).unwrap();
        assert_eq!(builds, 1);
        assert!(!store.path().join(".k1.staging").exists());
        assert!(!snapshot.path.join("half-written").exists());
        assert_eq!(
            fs::read_to_string(store.path().join("k1/complete")).unwrap(),
            "k1"
        );
    }

    #[test]
    fn a_failed_build_leaves_nothing_behind() {
        let store = tempfile::tempdir().unwrap();
        let run_config = run_config();
        let entry = CacheEntry {
            store: store.path(),
            key: "k1",
            name: "system/test:latest",
            run_config: &run_config,
        };
        let mut build = |layer: &Path, _: &mut dyn FnMut(&str)| {
            fs::write(layer.join("partial"), "x").context(|| "write".into())?;
            Err(ImageError::MissingTool("nothing"))
        };
        let error = prepare_cached(&entry, &mut build, &mut |_| {}).unwrap_err();
        assert!(matches!(error, ImageError::MissingTool(_)), "{error}");
        let left: Vec<_> = fs::read_dir(store.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| name != LOCK_FILE)
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
