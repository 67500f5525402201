//! Builds OCI image layouts for tests (`oci-layout`, `index.json`, `blobs/sha256/…`), good
//! for `skopeo copy oci:DIR:REF …` and for Cordon's own import.
//!
//! Layers come from a directory (tarred deterministically: sorted, owners, modes and mtimes
//! kept) or from raw tar bytes, which [`RawTar`] writes without any of the `tar` crate's path
//! checks so tests can craft malicious layers.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            LayerCompression::None => tar.to_vec(),
            LayerCompression::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(tar).expect("gzip in memory");
                encoder.finish().expect("gzip in memory")
            }
            LayerCompression::Zstd => zstd::encode_all(tar, 3).expect("zstd in memory"),
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// One layer: its blob, how that is compressed, and its diff id.
#[derive(Debug, Clone)]
pub struct TestLayer {
    pub blob: Vec<u8>,
    pub compression: LayerCompression,
    pub diff_id: String,
}

impl TestLayer {
    pub fn from_tar(tar: &[u8], compression: LayerCompression) -> TestLayer {
        TestLayer {
            blob: compression.compress(tar),
            compression,
            diff_id: sha256_digest(tar),
        }
    }
}

/// A test image: layers bottom first, plus the run config of its image config.
#[derive(Debug, Clone)]
pub struct OciImage {
    pub layers: Vec<TestLayer>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// Wrap the manifest in an image index that also lists a linux/arm64 image (whose only
    /// layer holds `/ARCH` = `arm64`), so resolution to linux/amd64 is exercised.
    pub multi_arch: bool,
    /// Replaces the config's `rootfs.diff_ids` (to test diff-id verification).
    pub diff_ids_override: Option<Vec<String>>,
}

/// What [`OciImage::write_layout`] wrote.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    /// The amd64 image manifest's digest.
    pub manifest_digest: String,
    /// The digest `index.json` points at for the reference (the index when multi-arch).
    pub top_digest: String,
    pub config_digest: String,
    /// Compressed layer blob digests, bottom first.
    pub layer_digests: Vec<String>,
    /// Uncompressed layer digests, bottom first (as in the config unless overridden).
    pub diff_ids: Vec<String>,
}

impl Default for OciImage {
    fn default() -> Self {
        OciImage::new()
    }
}

impl OciImage {
    pub fn new() -> OciImage {
        OciImage {
            layers: Vec::new(),
            env: Vec::new(),
            working_dir: None,
            user: None,
            multi_arch: false,
            diff_ids_override: None,
        }
    }

    /// Adds `dir` as the next layer (above those added before).
    pub fn layer_from_dir(self, dir: &Path, compression: LayerCompression) -> OciImage {
        let tar = tar_dir(dir).unwrap_or_else(|e| panic!("tar {}: {e}", dir.display()));
        self.layer_from_tar(tar, compression)
    }

    /// Adds an uncompressed tar as the next layer.
    pub fn layer_from_tar(mut self, tar: Vec<u8>, compression: LayerCompression) -> OciImage {
        self.layers.push(TestLayer::from_tar(&tar, compression));
        self
    }

    /// Adds an already compressed blob claiming `diff_id` (e.g. a ratio bomb streamed into a
    /// compressor, or bytes that do not match their diff id).
    pub fn layer_from_blob(
        mut self,
        blob: Vec<u8>,
        compression: LayerCompression,
        diff_id: &str,
    ) -> OciImage {
        self.layers.push(TestLayer {
            blob,
            compression,
            diff_id: diff_id.to_string(),
        });
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> OciImage {
        self.env.push(format!("{name}={value}"));
        self
    }

    pub fn working_dir(mut self, dir: &str) -> OciImage {
        self.working_dir = Some(dir.to_string());
        self
    }

    pub fn user(mut self, user: &str) -> OciImage {
        self.user = Some(user.to_string());
        self
    }

    pub fn multi_arch(mut self, multi_arch: bool) -> OciImage {
        self.multi_arch = multi_arch;
        self
    }

    /// Writes the image into the OCI layout at `dir` (created if needed; an existing layout
    /// keeps its other references) under `reference` (`org.opencontainers.image.ref.name`).
    pub fn write_layout(&self, dir: &Path, reference: &str) -> io::Result<WrittenImage> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let amd64 = self.write_manifest(dir, "amd64", &self.layers)?;
        let top = if self.multi_arch {
            let arm64_layer = TestLayer::from_tar(
                &RawTar::new().file("ARCH", b"arm64\n", 0o644).finish(),
                LayerCompression::Gzip,
            );
            let arm64 = self.write_manifest(dir, "arm64", &[arm64_layer])?;
            let index = json!({
                "schemaVersion": 2,
                "mediaType": INDEX_MEDIA_TYPE,
                "manifests": [
                    descriptor_with_platform(&arm64.manifest, "arm64"),
                    descriptor_with_platform(&amd64.manifest, "amd64"),
                ],
            });
            write_blob(dir, INDEX_MEDIA_TYPE, &serde_json::to_vec(&index)?)?
        } else {
            amd64.manifest.clone()
        };
        add_to_index_json(dir, &top, reference)?;
        Ok(WrittenImage {
            manifest_digest: amd64.manifest.digest,
            top_digest: top.digest,
            config_digest: amd64.config_digest,
            layer_digests: amd64.layer_digests,
            diff_ids: amd64.diff_ids,
        })
    }

    fn write_manifest(
        &self,
        dir: &Path,
        architecture: &str,
        layers: &[TestLayer],
    ) -> io::Result<WrittenManifest> {
        let mut layer_descriptors = Vec::new();
        let (mut layer_digests, mut diff_ids) = (Vec::new(), Vec::new());
        for layer in layers {
            let descriptor = write_blob(dir, layer.compression.media_type(), &layer.blob)?;
            layer_digests.push(descriptor.digest.clone());
            layer_descriptors.push(descriptor.to_json());
            diff_ids.push(layer.diff_id.clone());
        }
        let config_diff_ids = match (&self.diff_ids_override, architecture) {
            (Some(ids), "amd64") => ids.clone(),
            _ => diff_ids.clone(),
        };
        let mut run = serde_json::Map::new();
        run.insert("Env".into(), json!(self.env));
        if let Some(dir) = &self.working_dir {
            run.insert("WorkingDir".into(), json!(dir));
        }
        if let Some(user) = &self.user {
            run.insert("User".into(), json!(user));
        }
        let config = json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": Value::Object(run),
            "rootfs": { "type": "layers", "diff_ids": config_diff_ids },
            "history": layers.iter().map(|_| json!({"created_by": "cordon-testkit"})).collect::<Vec<_>>(),
        });
        let config = write_blob(dir, CONFIG_MEDIA_TYPE, &serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.to_json(),
            "layers": layer_descriptors,
        });
        let manifest = write_blob(dir, MANIFEST_MEDIA_TYPE, &serde_json::to_vec(&manifest)?)?;
        Ok(WrittenManifest {
            manifest,
            config_digest: config.digest,
            layer_digests,
            diff_ids,
        })
    }
}

struct WrittenManifest {
    manifest: Descriptor,
    config_digest: String,
    layer_digests: Vec<String>,
    diff_ids: Vec<String>,
}

#[derive(Debug, Clone)]
struct Descriptor {
    media_type: String,
    digest: String,
    size: usize,
}

impl Descriptor {
    fn to_json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

fn descriptor_with_platform(descriptor: &Descriptor, architecture: &str) -> Value {
    let mut value = descriptor.to_json();
    value["platform"] = json!({"architecture": architecture, "os": "linux"});
    value
}

fn write_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> io::Result<Descriptor> {
    let digest = sha256_digest(bytes);
    let hex = digest.trim_start_matches("sha256:");
    fs::write(dir.join("blobs/sha256").join(hex), bytes)?;
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest,
        size: bytes.len(),
    })
}

/// Points `reference` at `top` in the layout's `index.json`, keeping other references.
fn add_to_index_json(dir: &Path, top: &Descriptor, reference: &str) -> io::Result<()> {
    let path = dir.join("index.json");
    let mut manifests: Vec<Value> = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes)?["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    manifests.retain(|m| m["annotations"][REF_NAME_ANNOTATION] != json!(reference));
    let mut entry = top.to_json();
    entry["annotations"] = json!({ REF_NAME_ANNOTATION: reference });
    manifests.push(entry);
    let index = json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests});
    fs::write(path, serde_json::to_vec_pretty(&index)?)
}

/// The busybox test image: the [`crate::test_rootfs`] as one gzip layer, with `PATH`,
/// `GREETING=hello from the image`, `WorkingDir` `/workspace` and user `root`.
pub fn busybox_image() -> OciImage {
    OciImage::new()
        .layer_from_dir(&crate::test_rootfs(), LayerCompression::Gzip)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("GREETING", "hello from the image")
        .working_dir("/workspace")
        .user("root")
}

/// A deterministic uncompressed tar of `dir`'s contents (sorted; owners, modes and mtimes
/// kept; names relative, directories with a trailing `/`; no user names or access times).
pub fn tar_dir(dir: &Path) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    append_tree(&mut builder, dir, Path::new(""))?;
    builder.into_inner()
}

fn append_tree(
    builder: &mut tar::Builder<Vec<u8>>,
    root: &Path,
    relative: &Path,
) -> io::Result<()> {
    let mut names: Vec<PathBuf> = fs::read_dir(root.join(relative))?
        .map(|entry| entry.map(|e| relative.join(e.file_name())))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let path = root.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid().into());
        header.set_gid(meta.gid().into());
        header.set_mtime(meta.mtime().max(0) as u64);
        let file_type = meta.file_type();
        if file_type.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            let mut dir_name = name.clone().into_os_string();
            dir_name.push("/");
            builder.append_data(&mut header, dir_name, io::empty())?;
            append_tree(builder, root, &name)?;
        } else if file_type.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, &name, fs::read_link(&path)?)?;
        } else if file_type.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            builder.append_data(&mut header, &name, fs::File::open(&path)?)?;
        }
        // Device nodes, fifos and sockets are not part of test images built from trees.
    }
    Ok(())
}

/// Writes `value` into a numeric header field: NUL-terminated octal when it fits, else GNU's
/// base-256 (high bit set, big-endian), as GNU tar does for sizes of 8 GiB and more.
fn octal(field: &mut [u8], value: u64) {
    let text = format!("{value:0width$o}\0", width = field.len() - 1);
    if text.len() == field.len() {
        field.copy_from_slice(text.as_bytes());
    } else {
        field.fill(0);
        let bytes = value.to_be_bytes();
        let start = field.len() - bytes.len();
        field[start..].copy_from_slice(&bytes);
        field[0] |= 0x80;
    }
}

/// A tar written entry by entry with names and link targets taken verbatim (`..`, absolute
/// paths, anything), for crafting malicious layers. Names over 100 bytes go in PAX records.
pub struct RawTar {
    builder: tar::Builder<Vec<u8>>,
    pending_pax: Vec<(String, Vec<u8>)>,
}

impl Default for RawTar {
    fn default() -> Self {
        RawTar::new()
    }
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar {
            builder: tar::Builder::new(Vec::new()),
            pending_pax: Vec::new(),
        }
    }

    /// Adds a PAX record (e.g. `SCHILY.xattr.trusted.overlay.redirect`) to the next entry.
    pub fn pax(mut self, key: &str, value: &[u8]) -> RawTar {
        self.pending_pax.push((key.to_string(), value.to_vec()));
        self
    }

    pub fn dir(self, name: &str, mode: u32) -> RawTar {
        self.entry(name, tar::EntryType::Directory, mode, b"", None)
    }

    pub fn file(self, name: &str, content: &[u8], mode: u32) -> RawTar {
        self.entry(name, tar::EntryType::Regular, mode, content, None)
    }

    pub fn symlink(self, name: &str, target: &str) -> RawTar {
        self.entry(name, tar::EntryType::Symlink, 0o777, b"", Some(target))
    }

    pub fn hardlink(self, name: &str, target: &str) -> RawTar {
        self.entry(name, tar::EntryType::Link, 0o644, b"", Some(target))
    }

    pub fn fifo(self, name: &str, mode: u32) -> RawTar {
        self.entry(name, tar::EntryType::Fifo, mode, b"", None)
    }

    /// A character (`block == false`) or block device node.
    pub fn device(mut self, name: &str, block: bool, major: u32, minor: u32) -> RawTar {
        let kind = if block {
            tar::EntryType::Block
        } else {
            tar::EntryType::Char
        };
        let mut header = self.header(name, kind, 0o666, 0, None);
        header.set_device_major(major).expect("ustar header");
        header.set_device_minor(minor).expect("ustar header");
        header.set_cksum();
        self.builder
            .append(&header, io::empty())
            .expect("tar in memory");
        self
    }

    /// A regular file whose header declares `declared_size` bytes but that is followed by
    /// only `content` (and then the end of the archive): a lying header, e.g. a "10 GB" file.
    pub fn file_declaring_size(mut self, name: &str, declared_size: u64, content: &[u8]) -> RawTar {
        let mut header = self.header(name, tar::EntryType::Regular, 0o644, 0, None);
        header.set_size(declared_size);
        header.set_cksum();
        let mut bytes = std::mem::take(self.builder.get_mut());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(content);
        *self.builder.get_mut() = bytes;
        self
    }

    /// A GNU sparse file of `real_size` bytes whose only data is `tail` at its end: tiny in
    /// the archive, `real_size` when unpacked.
    pub fn sparse_file(mut self, name: &str, real_size: u64, tail: &[u8]) -> RawTar {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(tar::EntryType::GNUSparse);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_size(tail.len() as u64);
        let gnu = header.as_gnu_mut().expect("gnu header");
        octal(&mut gnu.realsize, real_size);
        octal(&mut gnu.sparse[0].offset, real_size - tail.len() as u64);
        octal(&mut gnu.sparse[0].numbytes, tail.len() as u64);
        header.set_cksum();
        self.builder.append(&header, tail).expect("tar in memory");
        self
    }

    /// A regular file with explicit owner ids and mode bits (e.g. setuid, uid 70000).
    pub fn file_owned(
        mut self,
        name: &str,
        content: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> RawTar {
        let mut header = self.header(
            name,
            tar::EntryType::Regular,
            mode,
            content.len() as u64,
            None,
        );
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_cksum();
        self.builder
            .append(&header, content)
            .expect("tar in memory");
        self
    }

    /// Any entry type with raw bytes for content.
    pub fn entry(
        mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        content: &[u8],
        link: Option<&str>,
    ) -> RawTar {
        let header = self.header(name, kind, mode, content.len() as u64, link);
        self.builder
            .append(&header, content)
            .expect("tar in memory");
        self
    }

    /// The finished archive (two zero blocks at the end).
    pub fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("tar in memory")
    }

    fn header(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        size: u64,
        link: Option<&str>,
    ) -> tar::Header {
        let mut pax = std::mem::take(&mut self.pending_pax);
        let mut header = tar::Header::new_ustar();
        if name.len() <= 100 {
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        } else {
            pax.push(("path".into(), name.as_bytes().to_vec()));
        }
        if let Some(link) = link {
            if link.len() <= 100 {
                header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            } else {
                pax.push(("linkpath".into(), link.as_bytes().to_vec()));
            }
        }
        if !pax.is_empty() {
            self.builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .expect("tar in memory");
        }
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        header
    }
}
