//! A content digest of a layer tree: the snapshot's id, so two hosts (or two builds) that
//! produced the same files agree on it, and a rebuild that changed anything gets a new one.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};
use walkdir::WalkDir;

use crate::error::{ImageError, IoContext};

/// What a tree hashes to and how big it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TreeSummary {
    /// `sha256:<hex>` over every entry's path, type, mode, owner and content (or link target),
    /// in sorted order. Timestamps are left out: they change on every build.
    pub digest: String,
    /// Sum of the regular files' sizes (each hard-linked file counted once per name).
    pub size_bytes: u64,
    pub entries: u64,
}

pub(crate) fn summarize_tree(root: &Path) -> Result<TreeSummary, ImageError> {
    let mut hasher = Sha256::new();
    let (mut size_bytes, mut entries) = (0u64, 0u64);
    for entry in WalkDir::new(root).follow_links(false).sort_by_file_name() {
        let entry = entry.map_err(|e| ImageError::Io {
            what: format!("walk {}", root.display()),
            source: e.into(),
        })?;
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap_or(path);
        let meta = entry.metadata().map_err(|e| ImageError::Io {
            what: format!("stat {}", path.display()),
            source: e.into(),
        })?;
        hash_entry_header(&mut hasher, relative, &meta);
        let file_type = meta.file_type();
        if file_type.is_file() {
            size_bytes += meta.len();
            hash_file_content(&mut hasher, path)?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(path).context(|| format!("readlink {}", path.display()))?;
            hasher.update(target.as_os_str().as_encoded_bytes());
        } else {
            // Device nodes: their numbers are their content.
            hasher.update(meta.rdev().to_le_bytes());
        }
        hasher.update([0]);
        entries += 1;
    }
    Ok(TreeSummary {
        digest: format!("sha256:{:x}", hasher.finalize()),
        size_bytes,
        entries,
    })
}

fn hash_entry_header(hasher: &mut Sha256, relative: &Path, meta: &fs::Metadata) {
    hasher.update(relative.as_os_str().as_encoded_bytes());
    hasher.update([0]);
    let kind = match meta.file_type() {
        t if t.is_dir() => b'd',
        t if t.is_file() => b'f',
        t if t.is_symlink() => b'l',
        _ => b'o',
    };
    hasher.update([kind]);
    hasher.update((meta.permissions().mode() & 0o7777).to_le_bytes());
    hasher.update(meta.uid().to_le_bytes());
    hasher.update(meta.gid().to_le_bytes());
}

fn hash_file_content(hasher: &mut Sha256, path: &Path) -> Result<(), ImageError> {
    let mut file = File::open(path).context(|| format!("open {}", path.display()))?;
    io::copy(&mut file, hasher).context(|| format!("read {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_follows_content_and_mode_not_time() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("etc/a"), b"one").unwrap();
        std::os::unix::fs::symlink("etc/a", dir.path().join("link")).unwrap();
        let first = summarize_tree(dir.path()).unwrap();
        assert_eq!(first.size_bytes, 3);
        assert_eq!(first.entries, 4);

        // Same content rewritten later: same digest.
        fs::write(dir.path().join("etc/a"), b"one").unwrap();
        assert_eq!(summarize_tree(dir.path()).unwrap().digest, first.digest);

        fs::set_permissions(dir.path().join("etc/a"), fs::Permissions::from_mode(0o600)).unwrap();
        let chmodded = summarize_tree(dir.path()).unwrap();
        assert_ne!(chmodded.digest, first.digest);

        fs::write(dir.path().join("etc/a"), b"two").unwrap();
        assert_ne!(summarize_tree(dir.path()).unwrap().digest, chmodded.digest);
    }
}
