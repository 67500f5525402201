//! Importing images without a registry: an OCI image layout (directory or tar) or a
//! `docker save` archive.
//!
//! A tar is never extracted: its members are indexed once (names → offsets, data skipped by
//! seeking) and blobs are read in place. Docker 25+ archives are both an OCI layout and a
//! `docker save` archive; the OCI index is preferred. Every blob named by a digest is
//! verified, every layer's diff id is verified by the unpacker, image indexes are resolved to
//! linux/amd64, and sizes are bounded by [`UnpackLimits`].

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

use nix::fcntl::{fcntl, openat2, FcntlArg, OFlag, OpenHow, ResolveFlag};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::error::IoContext;
use crate::image_config;
use crate::unpack::{unpack_layer, Budget, Compression};
use crate::{Image, ImageError, LayerId, LayerStore, UnpackLimits};

/// index.json, manifests, image configs and `manifest.json`.
const MAX_JSON_BYTES: u64 = 4 << 20;
/// Members of an archive tar.
const MAX_ARCHIVE_MEMBERS: u64 = 100_000;
/// Headers and long names read between two members of an archive tar.
const MAX_MEMBER_HEADER_BYTES: u64 = 1 << 20;
const MAX_IMAGES: usize = 256;
/// Nested image indexes followed before giving up.
const MAX_INDEX_DEPTH: usize = 4;
/// Symlinks followed inside an archive tar (old `docker save` links repeated layers).
const MAX_MEMBER_LINKS: usize = 8;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Docker 25+ puts the full name here and only the tag in `REF_NAME`.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// One image found in an archive.
#[derive(Debug, Clone)]
pub struct ArchivedImage {
    /// The reference the archive names it by (`org.opencontainers.image.ref.name` or a
    /// `RepoTags` entry), if any.
    pub reference: Option<String>,
    pub image: Image,
}

/// Unpacks every image of the archive at `path` into `store`. Blocking.
pub fn import_archive(
    store: &LayerStore,
    path: &Path,
    limits: &UnpackLimits,
) -> Result<Vec<ArchivedImage>, ImageError> {
    let source = ArchiveSource::open(path)?;
    let images = if source.has("index.json") && source.has("oci-layout") {
        import_oci(store, &source, limits)?
    } else if source.has("manifest.json") {
        import_docker(store, &source, limits)?
    } else {
        return Err(ImageError::InvalidImage(format!(
            "{} is neither an OCI image layout (index.json and oci-layout) nor a `docker save` \
             archive (manifest.json)",
            path.display()
        )));
    };
    if images.is_empty() {
        return Err(ImageError::InvalidImage(format!(
            "{} holds no image",
            path.display()
        )));
    }
    Ok(images)
}

// ---------------------------------------------------------------------------------------------
// Where members come from: a directory or an indexed tar.

enum ArchiveSource {
    Dir(File),
    Tar {
        file: File,
        members: HashMap<String, Member>,
    },
}

enum Member {
    Data {
        offset: u64,
        size: u64,
    },
    /// A symlink (or hard link) to another member, its target already made archive-absolute.
    Link(String),
}

impl ArchiveSource {
    fn open(path: &Path) -> Result<ArchiveSource, ImageError> {
        let file = File::open(path).context(|| format!("open {}", path.display()))?;
        let meta = file
            .metadata()
            .context(|| format!("stat {}", path.display()))?;
        if meta.is_dir() {
            return Ok(ArchiveSource::Dir(file));
        }
        let mut head = [0u8; 4];
        let n = file
            .read_at(&mut head, 0)
            .context(|| format!("read {}", path.display()))?;
        if Compression::sniff(&head[..n]) != Compression::None {
            return Err(ImageError::InvalidImage(format!(
                "{} is compressed; decompress it first (docker save writes a plain tar)",
                path.display()
            )));
        }
        let members = index_tar(&file).map_err(|e| match e {
            ImageError::InvalidImage(reason) => {
                ImageError::InvalidImage(format!("{}: {reason}", path.display()))
            }
            other => other,
        })?;
        Ok(ArchiveSource::Tar { file, members })
    }

    fn has(&self, name: &str) -> bool {
        match self {
            ArchiveSource::Dir(_) => self.open_member(name).is_ok(),
            ArchiveSource::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// A member's content and size. Names are archive paths without a leading `/`.
    fn open_member(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        let missing = || ImageError::InvalidImage(format!("the archive has no {name:?}"));
        match self {
            ArchiveSource::Dir(dir) => {
                // O_NONBLOCK: opening a FIFO (or a device) must not wait; it is refused by
                // the `is_file` check below and the flag is cleared for regular files.
                let how = OpenHow::new()
                    .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
                    .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
                let file = File::from(openat2(dir.as_fd(), name, how).map_err(|_| missing())?);
                let meta = file.metadata().context(|| format!("stat {name}"))?;
                if !meta.is_file() {
                    return Err(ImageError::InvalidImage(format!(
                        "{name:?} in the layout is not a regular file"
                    )));
                }
                fcntl(file.as_fd(), FcntlArg::F_SETFL(OFlag::O_RDONLY))
                    .map_err(io::Error::from)
                    .context(|| format!("clear O_NONBLOCK on {name}"))?;
                Ok((Box::new(file), meta.len()))
            }
            ArchiveSource::Tar { file, members } => {
                let mut name = name.to_string();
                for _ in 0..=MAX_MEMBER_LINKS {
                    match members.get(&name).ok_or_else(missing)? {
                        Member::Data { offset, size } => {
                            // `index_tar` keeps only members inside the file; checked anyway.
                            let end = offset.checked_add(*size).ok_or_else(|| {
                                ImageError::InvalidImage(format!("{name:?} has an invalid size"))
                            })?;
                            let section = Section {
                                file,
                                pos: *offset,
                                end,
                            };
                            return Ok((Box::new(section), *size));
                        }
                        Member::Link(target) => name = target.clone(),
                    }
                }
                Err(ImageError::InvalidImage(format!(
                    "{name:?}: too many links"
                )))
            }
        }
    }

    /// A small member (JSON), read whole.
    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let (reader, size) = self.open_member(name)?;
        if size > MAX_JSON_BYTES {
            return Err(ImageError::LimitExceeded(format!(
                "{name:?} has {size} bytes (at most {MAX_JSON_BYTES})"
            )));
        }
        let mut bytes = Vec::new();
        reader
            .take(MAX_JSON_BYTES)
            .read_to_end(&mut bytes)
            .context(|| format!("read {name:?} from the archive"))?;
        Ok(bytes)
    }
}

/// A byte range of the archive file, read with `pread`.
struct Section<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive truncated",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// A reader that fails once `remaining` is used up (shared so it can be refilled).
struct Capped<R> {
    inner: R,
    remaining: Rc<Cell<u64>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let left = self.remaining.get().checked_sub(n as u64).ok_or_else(|| {
            io::Error::other(format!(
                "a tar header or long name over {MAX_MEMBER_HEADER_BYTES} bytes"
            ))
        })?;
        self.remaining.set(left);
        Ok(n)
    }
}

impl<R: io::Seek> io::Seek for Capped<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Member names → where their data lies in the file (data skipped by seeking).
fn index_tar(file: &File) -> Result<HashMap<String, Member>, ImageError> {
    let invalid = |e: io::Error| ImageError::InvalidImage(format!("reading the archive tar: {e}"));
    let remaining = Rc::new(Cell::new(0));
    let reader = Capped {
        inner: file.try_clone().context(|| "dup the archive".to_string())?,
        remaining: remaining.clone(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries_with_seek().map_err(invalid)?;
    let file_len = file
        .metadata()
        .context(|| "stat the archive".to_string())?
        .len();
    let mut members = HashMap::new();
    let mut count = 0u64;
    loop {
        remaining.set(MAX_MEMBER_HEADER_BYTES);
        let Some(entry) = entries.next() else { break };
        let entry = entry.map_err(invalid)?;
        count += 1;
        if count > MAX_ARCHIVE_MEMBERS {
            return Err(ImageError::LimitExceeded(format!(
                "the archive has more than {MAX_ARCHIVE_MEMBERS} members"
            )));
        }
        let Some(name) = normalize_member(&entry.path_bytes(), "") else {
            continue;
        };
        use tar::EntryType as T;
        let member = match entry.header().entry_type() {
            T::Regular | T::Continuous => {
                let offset = entry.raw_file_position();
                let size = entry.size();
                if offset.checked_add(size).is_none_or(|end| end > file_len) {
                    return Err(ImageError::InvalidImage(format!(
                        "member {name:?} declares {size} bytes at offset {offset}, past the end \
                         of the archive ({file_len} bytes)"
                    )));
                }
                Member::Data { offset, size }
            }
            T::Symlink | T::Link => {
                let base = if entry.header().entry_type() == T::Symlink {
                    name.rsplit_once('/').map_or("", |(dir, _)| dir).to_string()
                } else {
                    String::new()
                };
                let Some(target) = entry
                    .link_name_bytes()
                    .and_then(|target| normalize_member(&target, &base))
                else {
                    continue;
                };
                Member::Link(target)
            }
            _ => continue,
        };
        members.insert(name, member);
    }
    Ok(members)
}

/// `./a//b` → `a/b`, relative to `base` unless absolute; `None` when it leaves the archive or
/// is not UTF-8.
fn normalize_member(name: &[u8], base: &str) -> Option<String> {
    let name = std::str::from_utf8(name).ok()?;
    let mut parts: Vec<&str> = if name.starts_with('/') {
        Vec::new()
    } else {
        base.split('/').filter(|p| !p.is_empty()).collect()
    };
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

// ---------------------------------------------------------------------------------------------
// OCI image layouts.

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

fn import_oci(
    store: &LayerStore,
    source: &ArchiveSource,
    limits: &UnpackLimits,
) -> Result<Vec<ArchivedImage>, ImageError> {
    let index: Index = parse_json("index.json", &source.read_small("index.json")?)?;
    if index.manifests.len() > MAX_IMAGES {
        return Err(ImageError::LimitExceeded(format!(
            "the archive lists more than {MAX_IMAGES} images"
        )));
    }
    let mut images = Vec::new();
    for descriptor in &index.manifests {
        let reference = descriptor
            .annotations
            .get(CONTAINERD_NAME)
            .or_else(|| descriptor.annotations.get(REF_NAME))
            .cloned();
        let (manifest_digest, manifest) = resolve_manifest(source, descriptor, 0)?;
        let image = import_oci_image(store, source, manifest_digest, &manifest, limits)?;
        info!(reference = ?reference, manifest = %image.manifest_digest, "imported image");
        images.push(ArchivedImage { reference, image });
    }
    Ok(images)
}

/// Follows image indexes down to the linux/amd64 manifest; returns its digest and content.
fn resolve_manifest(
    source: &ArchiveSource,
    descriptor: &Descriptor,
    depth: usize,
) -> Result<(String, Manifest), ImageError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(ImageError::InvalidImage(
            "image indexes nested too deep".into(),
        ));
    }
    let bytes = read_json_blob(source, descriptor)?;
    let is_index = if INDEX_TYPES.contains(&descriptor.media_type.as_str()) {
        true
    } else if MANIFEST_TYPES.contains(&descriptor.media_type.as_str()) {
        false
    } else if descriptor.media_type.is_empty() {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|value| value.get("manifests").is_some())
    } else {
        return Err(ImageError::InvalidImage(format!(
            "{} has media type {:?}, not an image manifest or index",
            descriptor.digest, descriptor.media_type
        )));
    };
    if !is_index {
        let manifest = parse_json(&descriptor.digest, &bytes)?;
        return Ok((descriptor.digest.clone(), manifest));
    }
    let index: Index = parse_json(&descriptor.digest, &bytes)?;
    let is_amd64 = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    };
    match index.manifests.iter().find(is_amd64) {
        Some(chosen) => resolve_manifest(source, chosen, depth + 1),
        None => {
            let available: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            Err(ImageError::InvalidImage(format!(
                "image index {} has no linux/amd64 image (it has: {})",
                descriptor.digest,
                available.join(", ")
            )))
        }
    }
}

fn import_oci_image(
    store: &LayerStore,
    source: &ArchiveSource,
    manifest_digest: String,
    manifest: &Manifest,
    limits: &UnpackLimits,
) -> Result<Image, ImageError> {
    let config = image_config::parse(&read_json_blob(source, &manifest.config)?)?;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::InvalidImage(format!(
            "manifest {manifest_digest} has {} layers but its config {} diff ids",
            manifest.layers.len(),
            config.diff_ids.len()
        )));
    }
    let compressed: u64 = manifest
        .layers
        .iter()
        .map(|l| l.size)
        .fold(0, u64::saturating_add);
    check_compressed(compressed, limits)?;
    let mut budget = budget(limits);
    let mut layers = Vec::new();
    let mut size_bytes = 0;
    for (layer, diff_id) in manifest.layers.iter().zip(&config.diff_ids) {
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            ImageError::InvalidImage(format!(
                "layer {} has media type {:?}, which Cordon cannot unpack",
                layer.digest, layer.media_type
            ))
        })?;
        let (id, size) = import_oci_layer(store, source, layer, compression, diff_id, &mut budget)?;
        layers.push(id);
        size_bytes += size;
    }
    layers.reverse();
    Ok(Image {
        manifest_digest,
        layers,
        run_config: config.run_config,
        size_bytes,
    })
}

/// Unpacks one layer blob while hashing it; the blob digest is checked once it is read
/// through. (A layer that the unpacker committed before a blob mismatch is found is still
/// exactly its diff id, so keeping it in the store is harmless.)
fn import_oci_layer(
    store: &LayerStore,
    source: &ArchiveSource,
    layer: &Descriptor,
    compression: Compression,
    diff_id: &str,
    budget: &mut Budget,
) -> Result<(LayerId, u64), ImageError> {
    let id = LayerId::from_diff_id(diff_id)?;
    if store.contains(&id) {
        return Ok((id.clone(), store.layer_info(&id)?.size_bytes));
    }
    let (reader, size) = source.open_member(&blob_path(&layer.digest)?)?;
    if size != layer.size {
        return Err(size_mismatch(&layer.digest, layer.size, size));
    }
    let mut blob = DigestingReader {
        inner: reader,
        hasher: Sha256::new(),
    };
    let unpacked = unpack_layer(store, &mut blob, compression, diff_id, budget)?;
    io::copy(&mut blob, &mut io::sink()).context(|| format!("read layer {}", layer.digest))?;
    let actual = format!("sha256:{:x}", blob.hasher.finalize());
    if actual != layer.digest {
        return Err(ImageError::DigestMismatch {
            what: format!("layer blob {}", layer.digest),
            expected: layer.digest.clone(),
            actual,
        });
    }
    Ok(unpacked)
}

struct DigestingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for DigestingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A JSON blob (index, manifest, config) named by its descriptor, size and digest verified.
fn read_json_blob(source: &ArchiveSource, descriptor: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let bytes = source.read_small(&blob_path(&descriptor.digest)?)?;
    if bytes.len() as u64 != descriptor.size {
        return Err(size_mismatch(
            &descriptor.digest,
            descriptor.size,
            bytes.len() as u64,
        ));
    }
    verify_digest(&descriptor.digest, &bytes)?;
    Ok(bytes)
}

fn verify_digest(digest: &str, bytes: &[u8]) -> Result<(), ImageError> {
    let actual = format!("sha256:{:x}", Sha256::digest(bytes));
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            what: format!("blob {digest}"),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

fn size_mismatch(digest: &str, declared: u64, actual: u64) -> ImageError {
    ImageError::InvalidImage(format!(
        "blob {digest} has {actual} bytes but its descriptor says {declared}"
    ))
}

/// `sha256:<hex>` → `blobs/sha256/<hex>`; other algorithms and malformed digests refused.
fn blob_path(digest: &str) -> Result<String, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(format!("blobs/sha256/{hex}"))
        }
        _ => Err(ImageError::InvalidImage(format!(
            "digest {digest:?} is not sha256:<64 lowercase hex digits>"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// `docker save` archives.

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn import_docker(
    store: &LayerStore,
    source: &ArchiveSource,
    limits: &UnpackLimits,
) -> Result<Vec<ArchivedImage>, ImageError> {
    let entries: Vec<DockerManifestEntry> =
        parse_json("manifest.json", &source.read_small("manifest.json")?)?;
    if entries.len() > MAX_IMAGES {
        return Err(ImageError::LimitExceeded(format!(
            "the archive lists more than {MAX_IMAGES} images"
        )));
    }
    let mut images = Vec::new();
    for entry in &entries {
        let reference = entry
            .repo_tags
            .as_ref()
            .and_then(|tags| tags.first())
            .cloned();
        let image = import_docker_image(store, source, entry, limits)?;
        info!(reference = ?reference, config = %image.manifest_digest, "imported image");
        images.push(ArchivedImage { reference, image });
    }
    Ok(images)
}

/// A `docker save` image has no manifest digest; its config digest (the image id) stands in.
fn import_docker_image(
    store: &LayerStore,
    source: &ArchiveSource,
    entry: &DockerManifestEntry,
    limits: &UnpackLimits,
) -> Result<Image, ImageError> {
    let config_name = member_name(&entry.config)?;
    let config_bytes = source.read_small(&config_name)?;
    let config_digest = format!("sha256:{:x}", Sha256::digest(&config_bytes));
    if let Some(named) = digest_in_name(&config_name) {
        verify_digest(&named, &config_bytes)?;
    }
    let config = image_config::parse(&config_bytes)?;
    if config.diff_ids.len() != entry.layers.len() {
        return Err(ImageError::InvalidImage(format!(
            "manifest.json lists {} layers but config {} has {} diff ids",
            entry.layers.len(),
            entry.config,
            config.diff_ids.len()
        )));
    }
    let mut compressed = 0u64;
    for layer in &entry.layers {
        compressed = compressed.saturating_add(source.open_member(&member_name(layer)?)?.1);
    }
    check_compressed(compressed, limits)?;
    let mut budget = budget(limits);
    let mut layers = Vec::new();
    let mut size_bytes = 0;
    for (layer, diff_id) in entry.layers.iter().zip(&config.diff_ids) {
        let id = LayerId::from_diff_id(diff_id)?;
        let (id, size) = if store.contains(&id) {
            (id.clone(), store.layer_info(&id)?.size_bytes)
        } else {
            let (mut reader, _) = source.open_member(&member_name(layer)?)?;
            let mut head = Vec::with_capacity(4);
            (&mut reader)
                .take(4)
                .read_to_end(&mut head)
                .context(|| format!("read layer {layer}"))?;
            let compression = Compression::sniff(&head);
            let mut blob = io::Cursor::new(head).chain(reader);
            unpack_layer(store, &mut blob, compression, diff_id, &mut budget)?
        };
        layers.push(id);
        size_bytes += size;
    }
    layers.reverse();
    Ok(Image {
        manifest_digest: config_digest,
        layers,
        run_config: config.run_config,
        size_bytes,
    })
}

fn member_name(name: &str) -> Result<String, ImageError> {
    normalize_member(name.as_bytes(), "")
        .ok_or_else(|| ImageError::InvalidImage(format!("manifest.json names {name:?}")))
}

/// `<hex>.json` (old `docker save`) or `blobs/sha256/<hex>` (Docker 25+) name their digest.
fn digest_in_name(name: &str) -> Option<String> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{hex}"))
}

// ---------------------------------------------------------------------------------------------

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::InvalidImage(format!("{what}: {e}")))
}

fn check_compressed(compressed: u64, limits: &UnpackLimits) -> Result<(), ImageError> {
    if compressed > limits.max_compressed_bytes {
        return Err(ImageError::LimitExceeded(format!(
            "the image's layers have {compressed} bytes, more than the limit of {}",
            limits.max_compressed_bytes
        )));
    }
    Ok(())
}

fn budget(limits: &UnpackLimits) -> Budget {
    Budget {
        unpacked_bytes: limits.max_unpacked_bytes,
        entries: limits.max_entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_normalized_and_confined() {
        assert_eq!(normalize_member(b"./a//b/", "").as_deref(), Some("a/b"));
        assert_eq!(
            normalize_member(b"../x/layer.tar", "y").as_deref(),
            Some("x/layer.tar")
        );
        assert_eq!(normalize_member(b"/abs", "y").as_deref(), Some("abs"));
        assert_eq!(normalize_member(b"../../x", "y"), None);
        assert_eq!(normalize_member(b"./", ""), None);
    }

    #[test]
    fn blob_paths_come_only_from_sha256_digests() {
        let hex = "0".repeat(64);
        assert_eq!(
            blob_path(&format!("sha256:{hex}")).unwrap(),
            format!("blobs/sha256/{hex}")
        );
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:00",
            "sha256:",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(blob_path(bad).is_err(), "{bad}");
        }
        assert_eq!(
            digest_in_name(&format!("{hex}.json")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(digest_in_name("config.json"), None);
    }
}
