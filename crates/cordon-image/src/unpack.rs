//! Safe unpacking of one layer tar into the layer store (SECURITY.md row 8): no entry lands
//! outside the layer (`..`, absolute names, symlink and hardlink tricks), no device nodes,
//! setuid/setgid bits handled deliberately, sizes and entry counts bounded. Every host-side
//! path is resolved fd-relative with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
//! OCI whiteouts (`.wh.<name>`) become overlay whiteouts and `.wh..wh..opq` an opaque marker,
//! so that layers stack as overlayfs lower directories.
//!
//! The `tar` crate only parses; nothing here uses its unpack functions. What is deliberate:
//!
//! - Names: a leading `/` is dropped (absolute names land inside the layer); any `..`
//!   component is refused. Parent directories are resolved from the layer's root fd with
//!   `RESOLVE_IN_ROOT`, so a symlink in the layer (`l -> /`, `l -> ../../..`) is followed as
//!   if the layer were `/`, which is how the sandbox will see it; missing ones are created.
//!   The last component is created with `*at` calls that never follow it.
//! - Hard links must name a regular file already unpacked in this layer (resolved in-root).
//! - Character and block devices (and whiteouts Docker-style, as 0:0 devices) are skipped and
//!   counted: a sandbox gets its own minimal `/dev`. Fifos are created.
//! - setuid and setgid bits are stripped: inside the sandbox they are inert anyway
//!   (`no_new_privs`), and on the host disk they would be set-id files owned by sandbox ids.
//! - Owners above the sandbox's 65536 ids become 65534 (nobody), which the idmapped mount can
//!   represent.
//! - Every extended attribute in the archive is ignored: `trusted.overlay.*` would let an image
//!   redirect overlayfs lookups (`redirect`, `metacopy`, `origin`) to paths outside the layer,
//!   and `security.capability` would grant file capabilities. The only xattr written is the
//!   opaque marker this module sets itself.
//! - Bounds ([`Budget`]): entries (implicitly created parents included), unpacked bytes (a file
//!   counts at its declared size, sparse or not, checked before anything is written), name
//!   length (4096) and component length (255), and at most 1 MiB of headers, long names and
//!   PAX records between two entries (the `tar` crate reads those into memory).
//! - The whole uncompressed stream, trailer included, is hashed and must match the diff id;
//!   otherwise nothing enters the store.

use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstat, fstatat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, Mode,
    SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::error::IoContext;
use crate::layer_store::LayerInfo;
use crate::{ImageError, LayerId, LayerStore};

const MAX_NAME_BYTES: usize = 4096;
const MAX_COMPONENT_BYTES: usize = 255;
/// Header blocks, GNU long names and PAX records the `tar` crate may read between two entries.
const MAX_METADATA_BYTES: u64 = 1 << 20;
/// Bytes accepted after the end-of-archive marker (padding to a record size).
const MAX_TRAILING_BYTES: u64 = 1 << 20;
/// Directory paths remembered to restore their mtimes at the end (later entries bump them).
const MAX_DIR_TIME_BYTES: usize = 64 << 20;
/// Sandbox ids are 0..65536; anything above becomes nobody.
const SANDBOX_IDS: u64 = 65536;
const NOBODY: u32 = 65534;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// How a layer blob is compressed (from its media type, or sniffed for archives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From an OCI or Docker layer media type; `None` when it is not a layer Cordon unpacks.
    pub(crate) fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// From a blob's first bytes (gzip and zstd magic numbers; anything else is a plain tar).
    pub(crate) fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// What is left of an image's [`crate::UnpackLimits`] while its layers are unpacked.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    pub unpacked_bytes: u64,
    pub entries: u64,
}

impl Budget {
    fn charge_entry(&mut self, name: &[u8]) -> Result<(), ImageError> {
        self.entries = self.entries.checked_sub(1).ok_or_else(|| {
            ImageError::LimitExceeded(format!(
                "more entries than the limit allows (at {:?})",
                String::from_utf8_lossy(name)
            ))
        })?;
        Ok(())
    }

    fn charge_bytes(&mut self, name: &[u8], size: u64) -> Result<(), ImageError> {
        self.unpacked_bytes = self.unpacked_bytes.checked_sub(size).ok_or_else(|| {
            ImageError::LimitExceeded(format!(
                "entry {:?} has {size} bytes, more than the {} left of the unpacked-size limit",
                String::from_utf8_lossy(name),
                self.unpacked_bytes
            ))
        })?;
        Ok(())
    }
}

/// Unpacks `blob` as the layer whose uncompressed digest is `diff_id` (`sha256:<hex>`),
/// verifying that digest; a layer already in the store is not unpacked again. Returns the
/// layer and its unpacked size.
pub(crate) fn unpack_layer(
    store: &LayerStore,
    blob: &mut dyn Read,
    compression: Compression,
    diff_id: &str,
    budget: &mut Budget,
) -> Result<(LayerId, u64), ImageError> {
    let id = LayerId::from_diff_id(diff_id)?;
    if store.contains(&id) {
        debug!(layer = %id, "layer already in the store");
        return Ok((id.clone(), store.layer_info(&id)?.size_bytes));
    }
    // Dropped on any error below, which deletes the staging dir: nothing enters the store.
    let pending = store.begin_layer_as(id.clone())?;
    let state = Rc::new(StreamState::default());
    let stream = HashingStream {
        inner: decompressor(blob, compression)?,
        state: state.clone(),
    };
    let root = open_layer_root(pending.path())?;
    let mut writer = LayerWriter::new(root);
    let mut archive = tar::Archive::new(stream);
    unpack_entries(&mut archive, &mut writer, budget, &state)?;
    read_trailer(archive.into_inner(), &state)?;
    let actual = format!("sha256:{:x}", state.hasher.take().finalize());
    if actual != diff_id {
        return Err(ImageError::DigestMismatch {
            what: "layer (uncompressed)".into(),
            expected: diff_id.to_string(),
            actual,
        });
    }
    writer.restore_dir_times();
    let info = writer.info;
    if writer.skipped_devices > 0 || writer.stripped_setid > 0 {
        warn!(layer = %id, devices = writer.skipped_devices, setid = writer.stripped_setid,
            "skipped device nodes and stripped setuid/setgid bits");
    }
    let id = pending.commit_with(info)?;
    info!(layer = %id, size = info.size_bytes, entries = info.entries, "unpacked layer");
    Ok((id, info.size_bytes))
}

fn decompressor<'a>(
    blob: &'a mut dyn Read,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    Ok(match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(blob)
                .context(|| "start zstd decompression".to_string())?,
        ),
    })
}

/// Shared between the stream the `tar` crate owns and this module.
#[derive(Default)]
struct StreamState {
    hasher: RefCell<Sha256>,
    total: Cell<u64>,
    /// Reading past this many bytes fails (set while the `tar` crate reads headers).
    limit: Cell<Option<u64>>,
    limit_hit: Cell<bool>,
}

/// The uncompressed stream: hashed as it is read, and bounded while the `tar` crate reads
/// headers, long names and PAX records into memory.
struct HashingStream<'a> {
    inner: Box<dyn Read + 'a>,
    state: Rc<StreamState>,
}

impl Read for HashingStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.hasher.borrow_mut().update(&buf[..n]);
        let total = self.state.total.get() + n as u64;
        self.state.total.set(total);
        if self.state.limit.get().is_some_and(|limit| total > limit) {
            self.state.limit_hit.set(true);
            return Err(io::Error::other("tar metadata over its limit"));
        }
        Ok(n)
    }
}

fn unpack_entries(
    archive: &mut tar::Archive<HashingStream<'_>>,
    writer: &mut LayerWriter,
    budget: &mut Budget,
    state: &StreamState,
) -> Result<(), ImageError> {
    let mut entries = archive.entries().map_err(|e| tar_error(e, state))?;
    loop {
        state
            .limit
            .set(Some(state.total.get() + MAX_METADATA_BYTES));
        let next = entries.next();
        state.limit.set(None);
        let Some(entry) = next else {
            return Ok(());
        };
        let mut entry = entry.map_err(|e| tar_error(e, state))?;
        let meta = EntryMeta::read(&mut entry).map_err(|e| tar_error(e, state))?;
        budget.charge_entry(&meta.name)?;
        // Every entry's data counts, checked before any of it is written.
        budget.charge_bytes(&meta.name, meta.size)?;
        writer.write(&meta, &mut entry, budget)?;
        // Data of skipped entries is read here, not inside `next` under the metadata limit.
        io::copy(&mut entry, &mut io::sink()).map_err(|e| tar_error(e, state))?;
    }
}

/// Reads what follows the end-of-archive marker so it is hashed too; only padding is expected.
fn read_trailer(mut stream: HashingStream<'_>, state: &StreamState) -> Result<(), ImageError> {
    let trailing = io::copy(
        &mut (&mut stream).take(MAX_TRAILING_BYTES + 1),
        &mut io::sink(),
    )
    .map_err(|e| tar_error(e, state))?;
    if trailing > MAX_TRAILING_BYTES {
        return Err(ImageError::InvalidImage(format!(
            "layer has more than {MAX_TRAILING_BYTES} bytes after the end of its tar"
        )));
    }
    Ok(())
}

fn tar_error(error: io::Error, state: &StreamState) -> ImageError {
    if state.limit_hit.get() {
        ImageError::LimitExceeded(format!(
            "a tar header, long name or PAX record of over {MAX_METADATA_BYTES} bytes"
        ))
    } else {
        ImageError::InvalidImage(format!("reading the layer tar: {error}"))
    }
}

/// One tar entry's header, PAX overrides applied.
struct EntryMeta {
    kind: tar::EntryType,
    name: Vec<u8>,
    link: Option<Vec<u8>>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    /// Bytes of data (for a sparse file, its full size).
    size: u64,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<EntryMeta> {
        let header = entry.header();
        let mut mtime = header.mtime()?;
        if let Some(extensions) = entry.pax_extensions()? {
            for extension in extensions {
                let extension = extension?;
                if extension.key_bytes() == b"mtime" {
                    let value = String::from_utf8_lossy(extension.value_bytes()).into_owned();
                    if let Some(seconds) = value.split('.').next().and_then(|s| s.parse().ok()) {
                        mtime = seconds;
                    }
                }
            }
        }
        let header = entry.header();
        Ok(EntryMeta {
            kind: header.entry_type(),
            name: entry.path_bytes().into_owned(),
            link: entry.link_name_bytes().map(|link| link.into_owned()),
            mode: header.mode()?,
            uid: sandbox_id(header.uid()?),
            gid: sandbox_id(header.gid()?),
            mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
            size: entry.size(),
        })
    }

    fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

fn sandbox_id(id: u64) -> u32 {
    if id < SANDBOX_IDS {
        id as u32
    } else {
        NOBODY
    }
}

/// The components of an entry name: empty and `.` ones dropped (so a leading `/` is too),
/// `..` refused, lengths bounded.
fn split_name(name: &[u8]) -> Result<Vec<&[u8]>, ImageError> {
    let refuse = |reason: &str| ImageError::UnsafeEntry {
        entry: String::from_utf8_lossy(name).into_owned(),
        reason: reason.to_string(),
    };
    if name.len() > MAX_NAME_BYTES {
        return Err(refuse("name longer than 4096 bytes"));
    }
    if name.contains(&0) {
        return Err(refuse("name contains a NUL byte"));
    }
    let mut components = Vec::new();
    for component in name.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(refuse("name has a `..` component")),
            _ if component.len() > MAX_COMPONENT_BYTES => {
                return Err(refuse("a name component is longer than 255 bytes"))
            }
            _ => components.push(component),
        }
    }
    Ok(components)
}

fn join(components: &[&[u8]]) -> CString {
    if components.is_empty() {
        return CString::new(".").expect("no NUL");
    }
    CString::new(components.join(&b'/')).expect("split_name refused NUL")
}

fn cstring(bytes: &[u8]) -> CString {
    CString::new(bytes).expect("split_name refused NUL")
}

/// Resolution of paths inside the layer: the layer's root fd acts as `/`.
fn in_root() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

fn open_in_root(root: BorrowedFd<'_>, path: &CString, flags: OFlag) -> nix::Result<OwnedFd> {
    openat2(
        root,
        path.as_c_str(),
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(in_root()),
    )
}

fn open_layer_root(path: &std::path::Path) -> Result<OwnedFd, ImageError> {
    let dir = File::open(path).context(|| format!("open {}", path.display()))?;
    Ok(OwnedFd::from(dir))
}

/// Writes entries into one layer directory through its root fd.
struct LayerWriter {
    root: OwnedFd,
    info: LayerInfo,
    skipped_devices: u64,
    stripped_setid: u64,
    dir_times: Vec<(CString, i64)>,
    dir_time_bytes: usize,
}

impl LayerWriter {
    fn new(root: OwnedFd) -> LayerWriter {
        LayerWriter {
            root,
            info: LayerInfo::default(),
            skipped_devices: 0,
            stripped_setid: 0,
            dir_times: Vec::new(),
            dir_time_bytes: 0,
        }
    }

    fn write(
        &mut self,
        meta: &EntryMeta,
        data: &mut dyn Read,
        budget: &mut Budget,
    ) -> Result<(), ImageError> {
        let components = split_name(&meta.name)?;
        let Some((leaf, parents)) = components.split_last() else {
            return self.write_root_dir(meta);
        };
        if let Some(hidden) = leaf.strip_prefix(WHITEOUT_PREFIX) {
            return self.write_whiteout(meta, parents, hidden, budget);
        }
        use tar::EntryType as T;
        match meta.kind {
            T::Char | T::Block => {
                debug!(entry = %meta.display_name(), "skipping a device node");
                self.skipped_devices += 1;
                return Ok(());
            }
            T::XGlobalHeader => return Ok(()),
            T::Regular
            | T::Continuous
            | T::GNUSparse
            | T::Directory
            | T::Symlink
            | T::Link
            | T::Fifo => {}
            other => {
                return Err(ImageError::UnsafeEntry {
                    entry: meta.display_name(),
                    reason: format!("unsupported entry type {:?}", other.as_byte() as char),
                })
            }
        }
        let parent = self.open_parent(parents, meta, budget)?;
        let leaf = cstring(leaf);
        let io_error = |what: &str| {
            let name = meta.display_name();
            let what = what.to_string();
            move || format!("{what} {name:?} in the layer")
        };
        match meta.kind {
            T::Directory => self.write_dir(parent.as_fd(), &leaf, meta, &components),
            T::Symlink => self.write_symlink(parent.as_fd(), &leaf, meta),
            T::Link => self.write_hardlink(parent.as_fd(), &leaf, meta),
            T::Fifo => {
                clear_leaf(parent.as_fd(), &leaf, false).context(io_error("replace"))?;
                mknodat(
                    parent.as_fd(),
                    leaf.as_c_str(),
                    SFlag::S_IFIFO,
                    Mode::empty(),
                    0,
                )
                .context(io_error("create fifo"))?;
                self.finish_at(parent.as_fd(), &leaf, meta)
                    .context(io_error("set metadata of"))?;
                self.info.entries += 1;
                Ok(())
            }
            _ => self.write_file(parent.as_fd(), &leaf, meta, data),
        }
    }

    /// `./` or `/`: the layer's root directory itself.
    fn write_root_dir(&mut self, meta: &EntryMeta) -> Result<(), ImageError> {
        if meta.kind != tar::EntryType::Directory {
            return Err(ImageError::UnsafeEntry {
                entry: meta.display_name(),
                reason: "names the layer root but is not a directory".into(),
            });
        }
        let root = self
            .root
            .try_clone()
            .context(|| "dup the layer root".to_string())?;
        self.set_dir_metadata(&root, meta)
            .context(|| "set metadata of the layer root".to_string())?;
        self.remember_dir_time(join(&[]), meta.mtime);
        Ok(())
    }

    /// The directory that will hold an entry, resolved in-root, created (0755, root) when
    /// missing. Each directory created counts as an entry.
    fn open_parent(
        &mut self,
        parents: &[&[u8]],
        meta: &EntryMeta,
        budget: &mut Budget,
    ) -> Result<OwnedFd, ImageError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        match open_in_root(self.root.as_fd(), &join(parents), flags) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => {}
            other => return other.map_err(|errno| parent_error(meta, errno)),
        }
        let mut dir = self
            .root
            .try_clone()
            .context(|| "dup the layer root".to_string())?;
        for depth in 1..=parents.len() {
            let name = cstring(parents[depth - 1]);
            let missing = match open_in_root(self.root.as_fd(), &join(&parents[..depth]), flags) {
                Ok(fd) => {
                    dir = fd;
                    continue;
                }
                Err(Errno::ENOENT) => true,
                // A whiteout of this layer stands where a directory of this layer goes: the
                // directory wins (whiteouts only hide lower layers).
                Err(Errno::ENOTDIR) if is_whiteout_at(dir.as_fd(), &name) => {
                    unlinkat(dir.as_fd(), name.as_c_str(), UnlinkatFlags::NoRemoveDir)
                        .map_err(|errno| parent_error(meta, errno))?;
                    true
                }
                Err(errno) => return Err(parent_error(meta, errno)),
            };
            if missing {
                budget.charge_entry(&meta.name)?;
                dir =
                    create_dir_at(dir.as_fd(), &name).map_err(|errno| parent_error(meta, errno))?;
                self.info.entries += 1;
            }
        }
        Ok(dir)
    }

    fn write_file(
        &mut self,
        parent: BorrowedFd<'_>,
        leaf: &CString,
        meta: &EntryMeta,
        data: &mut dyn Read,
    ) -> Result<(), ImageError> {
        let name = meta.display_name();
        clear_leaf(parent, leaf, false).context(|| format!("replace {name:?} in the layer"))?;
        let fd = openat(
            parent,
            leaf.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .context(|| format!("create {name:?} in the layer"))?;
        let mut file = File::from(fd);
        let written = io::copy(&mut data.take(meta.size), &mut file).map_err(|e| {
            ImageError::InvalidImage(format!("reading {name:?} from the layer tar: {e}"))
        })?;
        if written != meta.size {
            return Err(ImageError::InvalidImage(format!(
                "{name:?} is truncated ({written} of {} bytes)",
                meta.size
            )));
        }
        fchown(
            &file,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .context(|| format!("chown {name:?}"))?;
        fchmod(&file, self.file_mode(meta.mode)).context(|| format!("chmod {name:?}"))?;
        futimens(&file, &time(meta.mtime), &time(meta.mtime))
            .context(|| format!("set times of {name:?}"))?;
        self.info.entries += 1;
        self.info.size_bytes += meta.size;
        Ok(())
    }

    fn write_dir(
        &mut self,
        parent: BorrowedFd<'_>,
        leaf: &CString,
        meta: &EntryMeta,
        components: &[&[u8]],
    ) -> Result<(), ImageError> {
        let name = meta.display_name();
        let merged = clear_leaf(parent, leaf, true).context(|| format!("replace {name:?}"))?;
        if !merged {
            mkdirat(parent, leaf.as_c_str(), Mode::from_bits_truncate(0o700))
                .context(|| format!("create directory {name:?} in the layer"))?;
            self.info.entries += 1;
        }
        let dir = openat(
            parent,
            leaf.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .context(|| format!("open directory {name:?} in the layer"))?;
        self.set_dir_metadata(&dir, meta)
            .context(|| format!("set metadata of {name:?}"))?;
        self.remember_dir_time(join(components), meta.mtime);
        Ok(())
    }

    fn set_dir_metadata(&mut self, dir: &OwnedFd, meta: &EntryMeta) -> nix::Result<()> {
        fchown(
            dir,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )?;
        // The sticky bit is kept (`/tmp`); setgid on directories is stripped with the rest.
        let mode = self.file_mode(meta.mode).bits() | (meta.mode & 0o1000);
        fchmod(dir, Mode::from_bits_truncate(mode))
    }

    fn write_symlink(
        &mut self,
        parent: BorrowedFd<'_>,
        leaf: &CString,
        meta: &EntryMeta,
    ) -> Result<(), ImageError> {
        let name = meta.display_name();
        let target = meta.link.as_deref().unwrap_or_default();
        if target.is_empty() || target.len() > MAX_NAME_BYTES || target.contains(&0) {
            return Err(ImageError::UnsafeEntry {
                entry: name,
                reason: "symlink target is empty, over 4096 bytes or has a NUL byte".into(),
            });
        }
        clear_leaf(parent, leaf, false).context(|| format!("replace {name:?}"))?;
        // The target is stored as written: only the sandbox's kernel ever follows it, inside
        // the sandbox's root. This module resolves it only in-root.
        symlinkat(cstring(target).as_c_str(), parent, leaf.as_c_str())
            .context(|| format!("create symlink {name:?} in the layer"))?;
        fchownat(
            parent,
            leaf.as_c_str(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .context(|| format!("chown symlink {name:?}"))?;
        utimensat(
            parent,
            leaf.as_c_str(),
            &time(meta.mtime),
            &time(meta.mtime),
            UtimensatFlags::NoFollowSymlink,
        )
        .context(|| format!("set times of symlink {name:?}"))?;
        self.info.entries += 1;
        Ok(())
    }

    fn write_hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        leaf: &CString,
        meta: &EntryMeta,
    ) -> Result<(), ImageError> {
        let name = meta.display_name();
        let refuse = |reason: &str| ImageError::UnsafeEntry {
            entry: name.clone(),
            reason: reason.to_string(),
        };
        let target = split_name(meta.link.as_deref().unwrap_or_default())?;
        if target.is_empty() {
            return Err(refuse("hard link without a target"));
        }
        let source = open_in_root(
            self.root.as_fd(),
            &join(&target),
            OFlag::O_PATH | OFlag::O_NOFOLLOW,
        )
        .map_err(|errno| match errno {
            Errno::ENOENT | Errno::ENOTDIR => {
                refuse("hard link target is not a file of this layer")
            }
            errno => refuse(&format!("hard link target cannot be opened: {errno}")),
        })?;
        let stat = fstat(&source).context(|| format!("stat the target of {name:?}"))?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(refuse("hard link target is not a regular file"));
        }
        clear_leaf(parent, leaf, false).context(|| format!("replace {name:?}"))?;
        linkat(
            &source,
            c"",
            parent,
            leaf.as_c_str(),
            AtFlags::AT_EMPTY_PATH,
        )
        .context(|| format!("create hard link {name:?} in the layer"))?;
        self.info.entries += 1;
        self.info.size_bytes += stat.st_size.max(0) as u64;
        Ok(())
    }

    /// `.wh.<name>` hides `<name>` of the layers below; `.wh..wh..opq` hides everything below
    /// in its directory. Entries of this same layer are not hidden (OCI image spec), so a
    /// whiteout whose name exists already is dropped.
    fn write_whiteout(
        &mut self,
        meta: &EntryMeta,
        parents: &[&[u8]],
        hidden: &[u8],
        budget: &mut Budget,
    ) -> Result<(), ImageError> {
        let name = meta.display_name();
        let whiteout = [WHITEOUT_PREFIX, hidden].concat();
        if whiteout == OPAQUE_MARKER {
            let dir = self.open_parent(parents, meta, budget)?;
            return set_opaque(&dir).context(|| format!("mark {name:?} opaque"));
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            debug!(entry = %name, "skipping AUFS metadata");
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(ImageError::UnsafeEntry {
                entry: name,
                reason: "whiteout names no file".into(),
            });
        }
        let parent = self.open_parent(parents, meta, budget)?;
        let hidden = cstring(hidden);
        match fstatat(
            parent.as_fd(),
            hidden.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::ENOENT) => {}
            Err(errno) => {
                return Err(errno).context(|| format!("stat whiteout target of {name:?}"))
            }
        }
        // An overlayfs whiteout: a 0:0 character device, created here on purpose.
        mknodat(
            parent.as_fd(),
            hidden.as_c_str(),
            SFlag::S_IFCHR,
            Mode::empty(),
            0,
        )
        .context(|| format!("create whiteout {name:?}"))?;
        self.info.entries += 1;
        Ok(())
    }

    /// Owner and times of a non-directory just created at `leaf`, never following it.
    fn finish_at(
        &self,
        parent: BorrowedFd<'_>,
        leaf: &CString,
        meta: &EntryMeta,
    ) -> nix::Result<()> {
        fchownat(
            parent,
            leaf.as_c_str(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        // A fifo we just created in a directory only this process writes: no one can have
        // swapped it for a symlink, and fchmodat cannot refuse to follow on older kernels.
        fchmodat(
            parent,
            leaf.as_c_str(),
            self.file_mode(meta.mode),
            FchmodatFlags::FollowSymlink,
        )?;
        utimensat(
            parent,
            leaf.as_c_str(),
            &time(meta.mtime),
            &time(meta.mtime),
            UtimensatFlags::NoFollowSymlink,
        )
    }

    /// Permission bits without setuid/setgid (see the module docs).
    fn file_mode(&self, mode: u32) -> Mode {
        Mode::from_bits_truncate(mode & 0o777)
    }

    fn remember_dir_time(&mut self, path: CString, mtime: i64) {
        let bytes = path.as_bytes().len();
        if self.dir_time_bytes + bytes <= MAX_DIR_TIME_BYTES {
            self.dir_time_bytes += bytes;
            self.dir_times.push((path, mtime));
        }
    }

    /// Directory mtimes are set last: creating entries inside bumped them.
    fn restore_dir_times(&mut self) {
        for (path, mtime) in std::mem::take(&mut self.dir_times) {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
            if let Ok(dir) = open_in_root(self.root.as_fd(), &path, flags) {
                let _ = futimens(&dir, &time(mtime), &time(mtime));
            }
        }
    }
}

/// An overlayfs whiteout (a 0:0 character device) at `name`, not followed.
fn is_whiteout_at(parent: BorrowedFd<'_>, name: &CString) -> bool {
    fstatat(parent, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|stat| {
        SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR
            && stat.st_rdev == 0
    })
}

/// A directory owned by root with mode 0755 whatever the umask, opened.
fn create_dir_at(parent: BorrowedFd<'_>, name: &CString) -> nix::Result<OwnedFd> {
    mkdirat(parent, name.as_c_str(), Mode::from_bits_truncate(0o700))?;
    let dir = openat(
        parent,
        name.as_c_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    fchmod(&dir, Mode::from_bits_truncate(0o755))?;
    Ok(dir)
}

fn parent_error(meta: &EntryMeta, errno: Errno) -> ImageError {
    let reason = match errno {
        Errno::ENOTDIR | Errno::EEXIST => "a parent is not a directory".to_string(),
        Errno::EXDEV => "a parent crosses a mount".to_string(),
        Errno::ELOOP => "too many symlinks in its parents".to_string(),
        errno => format!("its parent directory cannot be opened: {errno}"),
    };
    ImageError::UnsafeEntry {
        entry: meta.display_name(),
        reason,
    }
}

fn time(seconds: i64) -> TimeSpec {
    TimeSpec::new(seconds, 0)
}

fn set_opaque(dir: &OwnedFd) -> nix::Result<()> {
    // SAFETY: valid fd, NUL-terminated name, value pointer and length of a live slice.
    let result = unsafe {
        libc::fsetxattr(
            dir.as_raw_fd(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    Errno::result(result).map(drop)
}

/// Makes room for a new entry at `leaf`: a directory stays when the new entry is a directory
/// too (the two merge, as in every tar unpacker); anything else is removed. Returns whether a
/// directory was kept.
fn clear_leaf(parent: BorrowedFd<'_>, leaf: &CString, keep_dir: bool) -> nix::Result<bool> {
    let stat = match fstatat(parent, leaf.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::ENOENT) => return Ok(false),
        Err(errno) => return Err(errno),
    };
    let is_dir = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    match (is_dir, keep_dir) {
        (true, true) => Ok(true),
        (true, false) => remove_dir_at(parent, leaf).map(|()| false),
        (false, _) => unlinkat(parent, leaf.as_c_str(), UnlinkatFlags::NoRemoveDir).map(|()| false),
    }
}

/// Removes the directory `name` in `parent` and everything in it, fd-relative and without
/// following any symlink (they are unlinked as entries).
///
/// Iterative, holding one directory fd at a time whatever the depth (an image can build trees
/// far deeper than a path may be long, through symlinked parents): it walks down into each
/// subdirectory and back up through `..`, checking that `..` is the directory it came from.
/// Memory is the names still to visit, bounded by what the layer holds.
fn remove_dir_at(parent: BorrowedFd<'_>, name: &CString) -> nix::Result<()> {
    /// A directory being emptied: its name in its parent, its identity, and the
    /// subdirectories still to remove.
    struct Level {
        name: CString,
        id: (u64, u64),
        subdirs: Vec<CString>,
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let (mut dir, top) = enter_dir(parent, name, flags)?;
    let mut levels = vec![top];
    loop {
        let Some(level) = levels.last_mut() else {
            return Ok(());
        };
        if let Some(child) = level.subdirs.pop() {
            let (child_dir, child_level) = enter_dir(dir.as_fd(), &child, flags)?;
            dir = child_dir;
            levels.push(child_level);
            continue;
        }
        // Empty now: step up and remove it.
        let done = levels.pop().ok_or(Errno::EIO)?;
        match levels.last() {
            None => {
                drop(dir);
                return unlinkat(parent, done.name.as_c_str(), UnlinkatFlags::RemoveDir);
            }
            Some(up) => {
                let up_dir = openat(dir.as_fd(), c"..", flags, Mode::empty())?;
                let stat = fstat(up_dir.as_fd())?;
                if (stat.st_dev as u64, stat.st_ino as u64) != up.id {
                    // Something moved the tree while it was being removed.
                    return Err(Errno::ESTALE);
                }
                dir = up_dir;
                unlinkat(dir.as_fd(), done.name.as_c_str(), UnlinkatFlags::RemoveDir)?;
            }
        }
    }

    /// Opens the directory `name` in `parent` (no-follow), unlinks every non-directory in it
    /// and lists its subdirectories.
    fn enter_dir(
        parent: BorrowedFd<'_>,
        name: &CString,
        flags: OFlag,
    ) -> nix::Result<(OwnedFd, Level)> {
        let dir = openat(parent, name.as_c_str(), flags, Mode::empty())?;
        let stat = fstat(dir.as_fd())?;
        let children: Vec<(CString, Option<bool>)> = {
            let mut listing = nix::dir::Dir::from_fd(
                dir.try_clone()
                    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?,
            )?;
            let mut children = Vec::new();
            for entry in listing.iter() {
                let entry = entry?;
                if matches!(entry.file_name().to_bytes(), b"." | b"..") {
                    continue;
                }
                let is_dir = entry
                    .file_type()
                    .map(|kind| kind == nix::dir::Type::Directory);
                children.push((entry.file_name().to_owned(), is_dir));
            }
            children
        };
        let mut subdirs = Vec::new();
        for (child, is_dir) in children {
            let is_dir = match is_dir {
                Some(is_dir) => is_dir,
                // DT_UNKNOWN: ask the inode.
                None => {
                    let stat =
                        fstatat(dir.as_fd(), child.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
                    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                }
            };
            if is_dir {
                subdirs.push(child);
            } else {
                unlinkat(dir.as_fd(), child.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
            }
        }
        let level = Level {
            name: name.clone(),
            id: (stat.st_dev as u64, stat.st_ino as u64),
            subdirs,
        };
        Ok((dir, level))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_split_confined_and_bounded() {
        assert_eq!(
            split_name(b"/usr/./bin//sh").unwrap(),
            vec![&b"usr"[..], b"bin", b"sh"]
        );
        assert!(split_name(b"./").unwrap().is_empty());
        for bad in [&b"../x"[..], b"a/../../x", b"a/..", b"a\0b"] {
            assert!(matches!(
                split_name(bad),
                Err(ImageError::UnsafeEntry { .. })
            ));
        }
        assert!(split_name(&vec![b'a'; 256]).is_err());
        assert!(split_name(&vec![b'a'; 255]).is_ok());
        let long = b"a/".repeat(2049);
        assert!(split_name(&long).is_err());
    }

    #[test]
    fn compression_is_sniffed_and_read_from_media_types() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"usr/"), Compression::None);
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::from_media_type("application/json"), None);
    }

    #[test]
    fn ids_above_the_sandbox_range_become_nobody() {
        assert_eq!(sandbox_id(0), 0);
        assert_eq!(sandbox_id(65535), 65535);
        assert_eq!(sandbox_id(65536), NOBODY);
        assert_eq!(sandbox_id(u64::MAX), NOBODY);
    }
}

#[cfg(test)]
mod remove_tests {
    use super::*;

    fn open_dir(path: &std::path::Path) -> OwnedFd {
        OwnedFd::from(File::open(path).unwrap())
    }

    /// A tree deeper than the fd limit (as symlinked parents let an image build) is removed
    /// with a bounded number of fds, and no symlink in it is followed.
    #[test]
    fn a_tree_deeper_than_the_fd_limit_is_removed_without_following_links() {
        const DEPTH: usize = 3000;
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"keep").unwrap();
        let root = open_dir(tmp.path());
        let top = cstring(b"top");
        let mut dir = create_dir_at(root.as_fd(), &top).unwrap();
        for depth in 0..DEPTH {
            if depth % 500 == 0 {
                let file = cstring(b"f");
                let fd = openat(
                    dir.as_fd(),
                    file.as_c_str(),
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .unwrap();
                drop(fd);
                symlinkat(outside.as_path(), dir.as_fd(), c"link").unwrap();
                mkdirat(dir.as_fd(), c"sibling", Mode::from_bits_truncate(0o700)).unwrap();
            }
            dir = create_dir_at(dir.as_fd(), &cstring(b"d")).unwrap();
        }
        drop(dir);

        // Well under DEPTH: one fd per level would run out.
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid pointers to live rlimit structs.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
            let low = libc::rlimit {
                rlim_cur: old.rlim_cur.min(512),
                rlim_max: old.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
        }
        let result = remove_dir_at(root.as_fd(), &top);
        // SAFETY: as above.
        unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &old), 0) };
        result.unwrap();

        assert!(!tmp.path().join("top").exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    }

    #[test]
    fn removing_a_missing_or_non_directory_name_fails_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("link")).unwrap();
        let root = open_dir(tmp.path());
        assert_eq!(
            remove_dir_at(root.as_fd(), &cstring(b"missing")),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            remove_dir_at(root.as_fd(), &cstring(b"file")),
            Err(Errno::ENOTDIR)
        );
        // O_NOFOLLOW | O_DIRECTORY: a symlink is not a directory here.
        assert_eq!(
            remove_dir_at(root.as_fd(), &cstring(b"link")),
            Err(Errno::ENOTDIR)
        );
        assert!(tmp.path().join("file").exists());
        assert!(tmp.path().join("link").symlink_metadata().is_ok());
    }
}
