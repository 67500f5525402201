//! The layer store: unpacked read-only root filesystem layers under `<data>/layers/`, shared by
//! every snapshot (and sandbox) that uses them.
//!
//! Pulled layers are content-addressed (named by their diff id, the digest of the uncompressed
//! tar); captured layers get a fresh name. A layer directory either is complete or does not
//! exist: it is filled under a staging name and renamed into place last.
//!
//! ```text
//! <root>/                          0700
//!     <id>/rootfs/                 the layer (an overlay lower dir: nothing else goes in it)
//!     <id>/layer.json              its unpacked size and entry count
//!     .staging-<pid>-<uuid>/       a layer being filled by process <pid>
//!     .deleting-<uuid>/            a layer being removed
//! ```

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use walkdir::WalkDir;

use crate::error::IoContext;
use crate::mounts::remove_tree;
use crate::ImageError;

const STAGING_PREFIX: &str = ".staging-";
const DELETING_PREFIX: &str = ".deleting-";
const ROOTFS: &str = "rootfs";
const METADATA: &str = "layer.json";

/// Names one layer directory: `sha256-<hex>` for a pulled layer (its diff id), `capture-<uuid>`
/// for a captured one. Safe as a single path component.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct LayerId(pub String);

impl std::fmt::Display for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl LayerId {
    /// The id of the layer whose uncompressed tar has digest `diff_id` (`sha256:<hex>`).
    pub fn from_diff_id(diff_id: &str) -> Result<LayerId, ImageError> {
        match diff_id.strip_prefix("sha256:") {
            Some(hex) if is_lower_hex(hex, 64) => Ok(LayerId(format!("sha256-{hex}"))),
            _ => Err(ImageError::InvalidImage(format!(
                "diff id {diff_id:?} is not sha256:<64 lowercase hex digits>"
            ))),
        }
    }

    /// A fresh id for a captured layer.
    pub fn new_capture() -> LayerId {
        LayerId(format!("capture-{}", uuid::Uuid::new_v4()))
    }

    /// True for the two shapes this store creates; anything else (a `/`, `..`, a dot file) is
    /// never used as a path component.
    pub fn is_valid(&self) -> bool {
        if let Some(hex) = self.0.strip_prefix("sha256-") {
            return is_lower_hex(hex, 64);
        }
        self.0
            .strip_prefix("capture-")
            .and_then(|rest| uuid::Uuid::try_parse(rest).ok())
            .is_some_and(|uuid| uuid.hyphenated().to_string() == self.0["capture-".len()..])
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What `layer.json` records about a complete layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Sum of the regular files' sizes (each hard-linked name counted).
    pub size_bytes: u64,
    /// Entries in the layer (files, directories, links, whiteouts).
    pub entries: u64,
}

/// The directory of layers (0700, root only: layers hold files owned by sandbox ids).
pub struct LayerStore {
    root: PathBuf,
}

/// A layer being filled: its directory exists, empty, under a staging name. Dropped without
/// [`PendingLayer::commit`], it is deleted.
pub struct PendingLayer {
    id: LayerId,
    path: PathBuf,
    staging: PathBuf,
    store_root: PathBuf,
}

impl LayerStore {
    /// Opens (creating, 0700) the store at `root` and removes debris of interrupted writes.
    pub fn open(root: impl Into<PathBuf>) -> Result<LayerStore, ImageError> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .context(|| format!("create layer store {}", root.display()))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .context(|| format!("chmod 0700 {}", root.display()))?;
        let store = LayerStore { root };
        store.remove_debris()?;
        Ok(store)
    }

    /// The read-only root filesystem directory of a layer (what `SandboxSpec.layers` takes).
    pub fn layer_path(&self, id: &LayerId) -> PathBuf {
        self.root.join(&id.0).join(ROOTFS)
    }

    /// True when the layer is complete in the store.
    pub fn contains(&self, id: &LayerId) -> bool {
        id.is_valid()
            && fs::symlink_metadata(self.layer_path(id)).is_ok_and(|meta| meta.file_type().is_dir())
    }

    /// The recorded size and entry count of a complete layer.
    pub fn layer_info(&self, id: &LayerId) -> Result<LayerInfo, ImageError> {
        if !self.contains(id) {
            return Err(ImageError::InvalidImage(format!(
                "layer {id} is not in the store"
            )));
        }
        let path = self.root.join(&id.0).join(METADATA);
        let bytes = fs::read(&path).context(|| format!("read {}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Metadata { path, source })
    }

    /// A fresh, empty layer directory for a capture; [`PendingLayer::commit`] it once filled.
    pub fn begin_layer(&self) -> Result<PendingLayer, ImageError> {
        self.begin_layer_as(LayerId::new_capture())
    }

    /// A fresh, empty staging directory that will become layer `id`.
    pub(crate) fn begin_layer_as(&self, id: LayerId) -> Result<PendingLayer, ImageError> {
        let staging = self.root.join(format!(
            "{STAGING_PREFIX}{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        let path = staging.join(ROOTFS);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .context(|| format!("create {}", staging.display()))?;
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .context(|| format!("create {}", path.display()))?;
        Ok(PendingLayer {
            id,
            path,
            staging,
            store_root: self.root.clone(),
        })
    }

    /// Deletes every layer not in `in_use` (never following a symlink or crossing a mount);
    /// returns the bytes freed.
    pub fn remove_unreferenced(&self, in_use: &HashSet<LayerId>) -> Result<u64, ImageError> {
        let mut freed = 0;
        for id in self.list()? {
            if in_use.contains(&id) {
                continue;
            }
            let size = self
                .layer_info(&id)
                .map(|info| info.size_bytes)
                .unwrap_or(0);
            // Renamed away first, so the layer stops being "complete" at once and a delete cut
            // short leaves debris that the next open removes, never half a layer.
            let doomed = self
                .root
                .join(format!("{DELETING_PREFIX}{}", uuid::Uuid::new_v4()));
            fs::rename(self.root.join(&id.0), &doomed)
                .context(|| format!("move layer {id} away for deletion"))?;
            remove_tree(&doomed)?;
            info!(layer = %id, size, "removed unreferenced layer");
            freed += size;
        }
        Ok(freed)
    }

    /// Every complete layer in the store.
    pub fn list(&self) -> Result<Vec<LayerId>, ImageError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.root).context(|| format!("list {}", self.root.display()))? {
            let entry = entry.context(|| format!("list {}", self.root.display()))?;
            let id = LayerId(entry.file_name().to_string_lossy().into_owned());
            if self.contains(&id) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes staging dirs of processes that are gone and half-deleted layers.
    fn remove_debris(&self) -> Result<(), ImageError> {
        for entry in fs::read_dir(&self.root).context(|| format!("list {}", self.root.display()))? {
            let entry = entry.context(|| format!("list {}", self.root.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_debris = name.starts_with(DELETING_PREFIX)
                || name
                    .strip_prefix(STAGING_PREFIX)
                    .is_some_and(|rest| !staging_owner_is_alive(rest));
            if is_debris {
                warn!(path = %entry.path().display(), "removing debris of an interrupted layer write");
                remove_tree(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// A staging dir named `<pid>-<uuid>` belongs to a live writer when that pid exists (our own
/// pid included: another store in this process may be filling it right now).
fn staging_owner_is_alive(rest: &str) -> bool {
    let Some(pid) = rest
        .split('-')
        .next()
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        return false;
    };
    Path::new("/proc").join(pid.to_string()).exists()
}

impl PendingLayer {
    pub fn id(&self) -> &LayerId {
        &self.id
    }

    /// The empty directory to fill (the layer's root filesystem).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the filled layer into place; from now on it is visible to [`LayerStore::contains`].
    pub fn commit(self) -> Result<LayerId, ImageError> {
        let info = measure_tree(&self.path)?;
        self.commit_with(info)
    }

    /// [`PendingLayer::commit`] with the size and entry count already known. When another
    /// writer committed the same layer first, this copy is discarded and theirs kept.
    pub(crate) fn commit_with(self, info: LayerInfo) -> Result<LayerId, ImageError> {
        let metadata = self.staging.join(METADATA);
        let json = serde_json::to_vec(&info).map_err(|source| ImageError::Metadata {
            path: metadata.clone(),
            source,
        })?;
        fs::write(&metadata, json).context(|| format!("write {}", metadata.display()))?;
        let target = self.store_root.join(&self.id.0);
        match renameat2(
            AT_FDCWD,
            &self.staging,
            AT_FDCWD,
            &target,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => Ok(self.id.clone()),
            Err(Errno::EEXIST) => {
                debug!(layer = %self.id, "layer already committed by another writer; discarding this copy");
                Ok(self.id.clone())
            }
            Err(errno) => Err(errno).context(|| format!("move layer {} into place", self.id)),
        }
        // Drop removes the staging dir when it is still there (the EEXIST case).
    }
}

impl Drop for PendingLayer {
    fn drop(&mut self) {
        if let Err(error) = remove_tree(&self.staging) {
            warn!(path = %self.staging.display(), %error, "removing an abandoned layer");
        }
    }
}

/// Size and entry count of a tree filled by a capture (walked without following symlinks).
fn measure_tree(root: &Path) -> Result<LayerInfo, ImageError> {
    let mut info = LayerInfo::default();
    for entry in WalkDir::new(root).follow_links(false).min_depth(1) {
        let entry = entry.map_err(|e| ImageError::Io {
            what: format!("walk {}", root.display()),
            source: e.into(),
        })?;
        let meta = entry.metadata().map_err(|e| ImageError::Io {
            what: format!("stat {}", entry.path().display()),
            source: e.into(),
        })?;
        if meta.file_type().is_file() {
            info.size_bytes += meta.len();
        }
        info.entries += 1;
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ids_are_single_safe_components() {
        let hex = "a".repeat(64);
        let id = LayerId::from_diff_id(&format!("sha256:{hex}")).unwrap();
        assert_eq!(id.0, format!("sha256-{hex}"));
        assert!(id.is_valid());
        assert!(LayerId::new_capture().is_valid());
        for bad in [
            "sha256:../../etc",
            "sha512:abc",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(LayerId::from_diff_id(bad).is_err(), "{bad}");
        }
        for bad in ["..", ".staging-1-x", "capture-../x", "sha256-abc", ""] {
            assert!(!LayerId(bad.into()).is_valid(), "{bad}");
        }
    }

    #[test]
    fn a_committed_layer_is_complete_and_debris_is_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path().join("layers")).unwrap();
        let pending = store.begin_layer().unwrap();
        fs::write(pending.path().join("file"), b"12345").unwrap();
        let id = pending.id().clone();
        assert!(!store.contains(&id));
        assert_eq!(pending.commit().unwrap(), id);
        assert!(store.contains(&id));
        assert_eq!(
            fs::read(store.layer_path(&id).join("file")).unwrap(),
            b"12345"
        );
        assert_eq!(store.layer_info(&id).unwrap().size_bytes, 5);
        // Nothing but the layer's files inside rootfs.
        assert_eq!(fs::read_dir(store.layer_path(&id)).unwrap().count(), 1);

        // An abandoned pending layer is removed on drop; a dead writer's on open.
        drop(store.begin_layer().unwrap());
        let dead = dir.path().join("layers/.staging-999999999-x/rootfs");
        fs::create_dir_all(&dead).unwrap();
        fs::create_dir_all(dir.path().join("layers/.deleting-y/rootfs")).unwrap();
        let live = store.begin_layer().unwrap();
        let store = LayerStore::open(dir.path().join("layers")).unwrap();
        let mut names: Vec<_> = fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&id.0));
        assert!(
            live.path().is_dir(),
            "a live writer's staging dir was removed"
        );
        assert_eq!(
            fs::metadata(store.root()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_second_commit_of_the_same_layer_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path()).unwrap();
        let id = LayerId::from_diff_id(&format!("sha256:{}", "b".repeat(64))).unwrap();
        let first = store.begin_layer_as(id.clone()).unwrap();
        let second = store.begin_layer_as(id.clone()).unwrap();
        fs::write(first.path().join("who"), b"first").unwrap();
        fs::write(second.path().join("who"), b"second").unwrap();
        first.commit().unwrap();
        second.commit().unwrap();
        assert_eq!(
            fs::read(store.layer_path(&id).join("who")).unwrap(),
            b"first"
        );
        assert_eq!(store.list().unwrap(), vec![id]);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "staging left behind"
        );
    }

    #[test]
    fn unreferenced_layers_are_removed_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("canary"), b"keep").unwrap();
        let store = LayerStore::open(dir.path().join("layers")).unwrap();
        let keep = store.begin_layer().unwrap();
        fs::write(keep.path().join("a"), b"aa").unwrap();
        let keep = keep.commit().unwrap();
        let drop_me = store.begin_layer().unwrap();
        fs::write(drop_me.path().join("b"), b"bbb").unwrap();
        std::os::unix::fs::symlink(outside.path(), drop_me.path().join("escape")).unwrap();
        let drop_me = drop_me.commit().unwrap();

        let freed = store
            .remove_unreferenced(&HashSet::from([keep.clone()]))
            .unwrap();
        assert_eq!(freed, 3);
        assert!(store.contains(&keep));
        assert!(!store.contains(&drop_me));
        assert_eq!(fs::read(outside.path().join("canary")).unwrap(), b"keep");
        assert_eq!(store.list().unwrap(), vec![keep]);
    }
}
