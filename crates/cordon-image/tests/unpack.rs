//! Safe layer unpacking (SECURITY.md row 8), through the public import path: every trick is a
//! real layer in a real OCI layout. Each asserts confinement or a clear error, and that host
//! canaries are untouched; a deliberately naive extractor is shown to escape with the same
//! archives, so the canary checks can fail.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cordon_image::{import_archive, ImageError, LayerId, LayerStore, UnpackLimits};
use cordon_testkit::oci_layout::{sha256_digest, LayerCompression, OciImage, RawTar};
use cordon_testkit::{TestOptions, TestSandbox};

const CANARY: &[u8] = b"host canary\n";

fn limits() -> UnpackLimits {
    UnpackLimits {
        max_unpacked_bytes: 1 << 30,
        max_entries: 100_000,
        max_compressed_bytes: 1 << 30,
    }
}

/// `<tmp>/layers` (the store) beside `<tmp>/canary/canary`, so a layer root
/// `<tmp>/layers/<staging>/rootfs` reaches the canary as `../../../canary`.
struct Fixture {
    dir: tempfile::TempDir,
    store: LayerStore,
    passwd: (Vec<u8>, u64),
    next_layout: std::cell::Cell<u32>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("canary")).unwrap();
        fs::write(dir.path().join("canary/canary"), CANARY).unwrap();
        let store = LayerStore::open(dir.path().join("layers")).unwrap();
        Fixture {
            dir,
            store,
            passwd: passwd_state(),
            next_layout: Default::default(),
        }
    }

    fn canary_dir(&self) -> PathBuf {
        self.dir.path().join("canary")
    }

    /// Writes `image` as an OCI layout and imports it.
    fn import_image(
        &self,
        image: &OciImage,
        limits: &UnpackLimits,
    ) -> Result<Vec<LayerId>, ImageError> {
        let n = self.next_layout.get();
        self.next_layout.set(n + 1);
        let layout = self.dir.path().join(format!("layout-{n}"));
        image.write_layout(&layout, "test").unwrap();
        let mut images = import_archive(&self.store, &layout, limits)?;
        assert_eq!(images.len(), 1);
        Ok(images.remove(0).image.layers)
    }

    /// Imports one layer; returns its directory.
    fn import(&self, tar: Vec<u8>) -> Result<PathBuf, ImageError> {
        self.import_with(tar, &limits())
    }

    fn import_with(&self, tar: Vec<u8>, limits: &UnpackLimits) -> Result<PathBuf, ImageError> {
        let image = OciImage::new().layer_from_tar(tar, LayerCompression::Gzip);
        let layers = self.import_image(&image, limits)?;
        Ok(self.store.layer_path(&layers[0]))
    }

    /// The canary dir holds exactly the canary, unchanged; host /etc/passwd is unchanged
    /// (content and link count); nothing appeared beside the store.
    fn assert_host_untouched(&self) {
        let names = list(&self.canary_dir());
        assert_eq!(names, vec!["canary".to_string()], "canary dir changed");
        assert_eq!(fs::read(self.canary_dir().join("canary")).unwrap(), CANARY);
        assert_eq!(
            fs::metadata(self.canary_dir().join("canary"))
                .unwrap()
                .nlink(),
            1
        );
        assert_eq!(passwd_state(), self.passwd, "host /etc/passwd changed");
        for name in list(self.dir.path()) {
            assert!(
                name == "canary" || name == "layers" || name.starts_with("layout-"),
                "{name} appeared beside the store"
            );
        }
    }

    /// The store holds no layer and no staging debris.
    fn assert_store_empty(&self) {
        assert_eq!(list(self.store.root()), Vec::<String>::new());
    }

    fn canary_touched(&self) -> bool {
        list(&self.canary_dir()) != vec!["canary".to_string()]
            || fs::read(self.canary_dir().join("canary")).ok().as_deref() != Some(CANARY)
            || fs::metadata(self.canary_dir().join("canary")).map_or(true, |m| m.nlink() != 1)
    }

    /// The positive control: a naive extractor into a layer dir at the same depth as the
    /// store's must reach the canary.
    fn assert_naive_extractor_escapes(&self, tar: &[u8]) {
        assert!(!self.canary_touched());
        let root = self.dir.path().join("layers/naive-layer/rootfs");
        fs::create_dir_all(&root).unwrap();
        naive_extract(tar, &root);
        assert!(
            self.canary_touched(),
            "the naive extractor did not escape: the check is blind"
        );
    }
}

fn passwd_state() -> (Vec<u8>, u64) {
    (
        fs::read("/etc/passwd").unwrap(),
        fs::metadata("/etc/passwd").unwrap().nlink(),
    )
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// What unpackers without confinement do: join names onto the root and use std::fs, which
/// follows symlinks and accepts `..` and absolute names.
fn naive_extract(tar: &[u8], root: &Path) {
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path_bytes().into_owned();
        let path = root.join(OsStr::from_bytes(&name));
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let _ = fs::create_dir_all(path.parent().unwrap());
        let file_name = path
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let _ = match entry.header().entry_type() {
            _ if file_name.starts_with(b".wh.") => {
                fs::remove_file(path.with_file_name(OsStr::from_bytes(&file_name[4..])))
            }
            tar::EntryType::Directory => fs::create_dir_all(&path),
            tar::EntryType::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&link.unwrap()), &path)
            }
            tar::EntryType::Link => {
                fs::hard_link(root.join(OsStr::from_bytes(&link.unwrap())), &path)
            }
            _ => fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .and_then(|mut file| io::copy(&mut entry, &mut file).map(drop)),
        };
    }
}

fn assert_refused(result: Result<PathBuf, ImageError>, reason: &str) {
    match result {
        Err(error @ ImageError::UnsafeEntry { .. }) => {
            assert!(error.to_string().contains(reason), "{error}");
        }
        other => panic!("expected the entry refused ({reason}), got {other:?}"),
    }
}

#[test]
fn dot_dot_names_are_refused() {
    let fx = Fixture::new();
    let tar = RawTar::new()
        .file("../../../canary/pwned", b"escaped", 0o644)
        .finish();
    assert_refused(fx.import(tar.clone()), "`..`");
    fx.assert_store_empty();
    fx.assert_host_untouched();
    fx.assert_naive_extractor_escapes(&tar);
}

#[test]
fn absolute_names_land_inside_the_layer() {
    let fx = Fixture::new();
    let target = fx.canary_dir().join("pwned");
    let tar = RawTar::new()
        .file(target.to_str().unwrap(), b"confined", 0o644)
        .finish();
    let layer = fx.import(tar.clone()).unwrap();
    let inside = layer.join(target.strip_prefix("/").unwrap());
    assert_eq!(fs::read(inside).unwrap(), b"confined");
    // (Not given to the naive extractor: it would write the host's /etc.)
    let layer = fx
        .import(
            RawTar::new()
                .file("/etc/x", b"also confined", 0o644)
                .finish(),
        )
        .unwrap();
    assert_eq!(fs::read(layer.join("etc/x")).unwrap(), b"also confined");
    fx.assert_host_untouched();
    fx.assert_naive_extractor_escapes(&tar);
}

#[test]
fn a_symlink_to_root_is_followed_only_inside_the_layer() {
    let fx = Fixture::new();
    let canary = fx.canary_dir();
    let tar = RawTar::new()
        .symlink("c", canary.to_str().unwrap())
        .file("c/pwned", b"escaped", 0o644)
        .finish();
    // `c` points at a directory the layer does not have: refused, not followed to the host.
    assert_refused(fx.import(tar.clone()), "not a directory");
    fx.assert_store_empty();
    fx.assert_host_untouched();
    fx.assert_naive_extractor_escapes(&tar);

    let fx = Fixture::new();
    let layer = fx
        .import(
            RawTar::new()
                .symlink("l", "/")
                .file("l/x", b"x", 0o644)
                .finish(),
        )
        .unwrap();
    assert_eq!(fs::read(layer.join("x")).unwrap(), b"x");
    assert_eq!(fs::read_link(layer.join("l")).unwrap(), Path::new("/"));
    fx.assert_host_untouched();
}

#[test]
fn a_relative_symlink_upwards_is_clamped_at_the_layer_root() {
    let fx = Fixture::new();
    let tar = RawTar::new()
        .symlink("l", "../../..")
        .file("l/etc/x", b"x", 0o644)
        .file("l/canary/pwned", b"confined", 0o644)
        .finish();
    let layer = fx.import(tar.clone()).unwrap();
    assert_eq!(fs::read(layer.join("etc/x")).unwrap(), b"x");
    assert_eq!(fs::read(layer.join("canary/pwned")).unwrap(), b"confined");
    fx.assert_host_untouched();
    fx.assert_naive_extractor_escapes(&tar);
}

#[test]
fn hard_links_must_name_a_regular_file_of_the_same_layer() {
    let fx = Fixture::new();
    // To the host's /etc/passwd: the layer has none, so refused (a naive extractor would add
    // a link to the host file; not tried here, it would touch the real /etc/passwd).
    assert_refused(
        fx.import(RawTar::new().hardlink("h", "/etc/passwd").finish()),
        "not a file of this layer",
    );
    // Upwards: refused by name.
    let tar = RawTar::new()
        .hardlink("h", "../../../canary/canary")
        .file("h", b"overwritten", 0o644)
        .finish();
    assert_refused(fx.import(tar.clone()), "`..`");
    // To a symlink that points out of the layer: not a regular file.
    assert_refused(
        fx.import(
            RawTar::new()
                .symlink("s", fx.canary_dir().join("canary").to_str().unwrap())
                .hardlink("h", "s")
                .finish(),
        ),
        "not a regular file",
    );
    fx.assert_store_empty();
    fx.assert_host_untouched();
    fx.assert_naive_extractor_escapes(&tar);

    // With the layer's own /etc/passwd, the link is made to that one.
    let fx = Fixture::new();
    let layer = fx
        .import(
            RawTar::new()
                .file("etc/passwd", b"root:x:0:0::/:/bin/sh\n", 0o644)
                .hardlink("h", "/etc/passwd")
                .finish(),
        )
        .unwrap();
    let (file, link) = (
        fs::metadata(layer.join("etc/passwd")).unwrap(),
        fs::metadata(layer.join("h")).unwrap(),
    );
    assert_eq!((file.ino(), file.nlink()), (link.ino(), 2));
    fx.assert_host_untouched();
}

#[test]
fn device_nodes_are_skipped_fifos_made_and_setid_bits_stripped() {
    let fx = Fixture::new();
    let layer = fx
        .import(
            RawTar::new()
                .dir("dev", 0o755)
                .device("dev/mem", false, 1, 1)
                .device("dev/sda", true, 8, 0)
                .fifo("run/fifo", 0o620)
                .file("usr/bin/su", b"#!/bin/sh\n", 0o4755)
                .file("usr/bin/wall", b"#!/bin/sh\n", 0o2755)
                .dir("tmp", 0o1777)
                .dir("shared", 0o2775)
                .finish(),
        )
        .unwrap();
    assert_eq!(list(&layer.join("dev")), Vec::<String>::new());
    let fifo = fs::symlink_metadata(layer.join("run/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o620);
    let mode = |p: &str| fs::symlink_metadata(layer.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("usr/bin/su"), 0o755);
    assert_eq!(mode("usr/bin/wall"), 0o755);
    assert_eq!(mode("tmp"), 0o1777, "the sticky bit stays");
    assert_eq!(mode("shared"), 0o775);
    for entry in walkdir::WalkDir::new(&layer) {
        let meta = entry.unwrap().metadata().unwrap();
        assert!(!meta.file_type().is_block_device() && !meta.file_type().is_char_device());
        assert_eq!(meta.mode() & 0o6000, 0, "a set-id file is on the host disk");
    }
    fx.assert_host_untouched();
}

#[test]
fn entry_count_is_bounded() {
    let fx = Fixture::new();
    let mut tar = RawTar::new();
    for i in 0..200 {
        tar = tar.file(&format!("f{i}"), b"", 0o644);
    }
    let small = UnpackLimits {
        max_entries: 100,
        ..limits()
    };
    match fx.import_with(tar.finish(), &small) {
        Err(ImageError::LimitExceeded(reason)) => assert!(reason.contains("entries"), "{reason}"),
        other => panic!("expected the entry limit, got {other:?}"),
    }
    // Implicitly created parents count too.
    let deep = RawTar::new().file(&format!("{}f", "d/".repeat(150)), b"", 0o644);
    assert!(matches!(
        fx.import_with(deep.finish(), &small),
        Err(ImageError::LimitExceeded(_))
    ));
    fx.assert_store_empty();
    fx.assert_host_untouched();
}

#[test]
fn a_huge_declared_or_sparse_file_fails_before_anything_is_written() {
    let fx = Fixture::new();
    let ten_gb = 10u64 << 30;
    for tar in [
        RawTar::new()
            .sparse_file("sparse", ten_gb, b"tail")
            .finish(),
        RawTar::new()
            .file_declaring_size("liar", ten_gb, b"")
            .finish(),
    ] {
        let started = Instant::now();
        match fx.import(tar) {
            Err(ImageError::LimitExceeded(reason)) => {
                assert!(reason.contains(&ten_gb.to_string()), "{reason}")
            }
            other => panic!("expected the size limit, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        fx.assert_store_empty();
    }
    fx.assert_host_untouched();
}

#[test]
fn a_gzip_ratio_bomb_stops_at_the_byte_budget() {
    let fx = Fixture::new();
    // 128 files of 1 MiB of zeros (128 MiB) in a ~130 KiB gzip stream, against an 8 MiB budget.
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for i in 0..128 {
        let mut header = tar::Header::new_ustar();
        header.set_path(format!("zero-{i}")).unwrap();
        header.set_size(zeros.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        gzip.write_all(header.as_bytes()).unwrap();
        gzip.write_all(&zeros).unwrap();
    }
    gzip.write_all(&[0u8; 1024]).unwrap();
    let blob = gzip.finish().unwrap();
    assert!(blob.len() < 1 << 20, "{}", blob.len());
    // The diff id is never reached: the budget stops it first.
    let image =
        OciImage::new().layer_from_blob(blob, LayerCompression::Gzip, &sha256_digest(b"bomb"));
    let budget = UnpackLimits {
        max_unpacked_bytes: 8 << 20,
        ..limits()
    };
    let started = Instant::now();
    match fx.import_image(&image, &budget) {
        Err(ImageError::LimitExceeded(reason)) => assert!(reason.contains("zero-8"), "{reason}"),
        other => panic!("expected the byte budget, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    fx.assert_store_empty();
    fx.assert_host_untouched();
}

#[test]
fn whiteout_tricks_are_refused_or_confined() {
    let fx = Fixture::new();
    for (name, reason) in [
        (".wh..", "whiteout names no file"),
        ("a/.wh...", "whiteout names no file"),
        ("a/.wh.", "whiteout names no file"),
        ("../.wh.canary", "`..`"),
        ("../../../canary/.wh.canary", "`..`"),
    ] {
        assert_refused(
            fx.import(RawTar::new().file(name, b"", 0o644).finish()),
            reason,
        );
    }
    // Through a symlink that points at the host canary dir: the parent resolves in-root, to a
    // directory the layer lacks.
    let tar = RawTar::new()
        .symlink("c", fx.canary_dir().to_str().unwrap())
        .file("c/.wh.canary", b"", 0o644)
        .finish();
    assert_refused(fx.import(tar.clone()), "not a directory");
    fx.assert_store_empty();
    fx.assert_host_untouched();
    fx.assert_naive_extractor_escapes(&tar);

    // Absolute whiteouts are confined and become overlay whiteouts.
    let fx = Fixture::new();
    let layer = fx
        .import(RawTar::new().file("/etc/.wh.passwd", b"", 0o644).finish())
        .unwrap();
    let whiteout = fs::symlink_metadata(layer.join("etc/passwd")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    fx.assert_host_untouched();
}

fn xattr_names(path: &Path) -> Vec<String> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr: {}", io::Error::last_os_error());
    buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

#[test]
fn xattrs_from_the_archive_are_ignored() {
    let fx = Fixture::new();
    let tar = RawTar::new()
        .pax("SCHILY.xattr.trusted.overlay.redirect", b"/etc")
        .dir("d", 0o755)
        .pax("SCHILY.xattr.trusted.overlay.opaque", b"y")
        .pax("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02")
        .file("f", b"data", 0o755)
        .pax("SCHILY.xattr.user.note", b"hi")
        .dir("e", 0o755)
        .finish();
    let layer = fx.import(tar).unwrap();
    for name in ["d", "f", "e"] {
        assert_eq!(
            xattr_names(&layer.join(name)),
            Vec::<String>::new(),
            "{name}"
        );
    }
    // Positive control: such an entry unpacked by the tar crate with xattrs on does carry
    // them, so the check above can see them.
    let control = RawTar::new()
        .pax("SCHILY.xattr.trusted.overlay.redirect", b"/etc")
        .file("f", b"data", 0o644)
        .finish();
    let scratch = fx.dir.path().join("xattr-control");
    let mut archive = tar::Archive::new(&control[..]);
    archive.set_unpack_xattrs(true);
    archive.unpack(&scratch).unwrap();
    assert!(xattr_names(&scratch.join("f")).contains(&"trusted.overlay.redirect".to_string()));
    fs::remove_dir_all(&scratch).unwrap();
    fx.assert_host_untouched();
}

#[test]
fn a_diff_id_mismatch_leaves_nothing_in_the_store() {
    let fx = Fixture::new();
    let tar = RawTar::new().file("a", b"a", 0o644).finish();
    for compression in [
        LayerCompression::None,
        LayerCompression::Gzip,
        LayerCompression::Zstd,
    ] {
        let image = OciImage::new().layer_from_blob(
            compression.compress(&tar),
            compression,
            &sha256_digest(b"something else"),
        );
        match fx.import_image(&image, &limits()) {
            Err(ImageError::DigestMismatch { .. }) => {}
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        fx.assert_store_empty();
    }
}

#[test]
fn a_layer_already_in_the_store_is_not_unpacked_again() {
    let fx = Fixture::new();
    let tar = RawTar::new().file("a", b"a", 0o644).finish();
    let first = fx
        .import_image(
            &OciImage::new().layer_from_tar(tar.clone(), LayerCompression::Zstd),
            &limits(),
        )
        .unwrap();
    // The same diff id over bytes that are not even gzip: accepted only because it is not read.
    let garbage = OciImage::new().layer_from_blob(
        b"not gzip".to_vec(),
        LayerCompression::Gzip,
        &sha256_digest(&tar),
    );
    let second = fx.import_image(&garbage, &limits()).unwrap();
    assert_eq!(first, second);
    assert_eq!(fx.store.list().unwrap(), first);
    // Control: with the layer gone, the same garbage is read and refused.
    fx.store.remove_unreferenced(&HashSet::new()).unwrap();
    assert!(fx.import_image(&garbage, &limits()).is_err());
    fx.assert_store_empty();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_opaque_dirs_and_owners_hold_inside_a_sandbox() {
    let fx = Fixture::new();
    let lower = RawTar::new()
        .file("data/a", b"a", 0o644)
        .file("data/b", b"b", 0o644)
        .file("data2/c", b"c", 0o644)
        .file_owned("owned", b"o", 0o4750, 1234, 2345)
        .file_owned("far", b"f", 0o644, 70000, 1 << 20)
        .finish();
    let upper = RawTar::new()
        .file("data/.wh.a", b"", 0o644)
        .file("data2/.wh..wh..opq", b"", 0o644)
        .file("data2/new", b"new", 0o644)
        .file(".wh.far", b"", 0o644)
        .finish();
    let image = OciImage::new()
        .layer_from_tar(lower, LayerCompression::Gzip)
        .layer_from_tar(upper, LayerCompression::Zstd);
    let layers = fx.import_image(&image, &limits()).unwrap();
    assert_eq!(layers.len(), 2);
    let lower_layer = fx.store.layer_path(&layers[1]);
    assert_eq!(
        fs::symlink_metadata(lower_layer.join("far")).unwrap().uid(),
        65534,
        "ids above the sandbox range become nobody"
    );

    let sandbox = TestSandbox::start(TestOptions {
        extra_layers: layers.iter().map(|id| fx.store.layer_path(id)).collect(),
        ..TestOptions::default()
    })
    .await;
    assert_eq!(sandbox.sh("ls /data").await, "b\n");
    assert_eq!(sandbox.sh("ls /data2").await, "new\n");
    assert_eq!(sandbox.sh("cat /data2/new").await, "new");
    assert_eq!(sandbox.exec("ls /far").await.exit_code, 1, "whited out");
    assert_eq!(
        sandbox.sh("stat -c %u:%g:%a /owned").await,
        "1234:2345:750\n"
    );
    assert_eq!(
        sandbox.sh("ls /bin/busybox").await,
        "/bin/busybox\n",
        "base layer visible"
    );
    fx.assert_host_untouched();

    // Positive control for the opaque check: with only the lower layer, c is visible.
    drop(sandbox);
    let sandbox = TestSandbox::start(TestOptions {
        extra_layers: vec![lower_layer],
        ..TestOptions::default()
    })
    .await;
    assert_eq!(
        sandbox.sh("ls /data /data2 | tr '\\n' ' '").await,
        "/data: a b  /data2: c "
    );
}

#[test]
fn long_names_through_pax_and_gnu_are_unpacked_and_bounded() {
    let fx = Fixture::new();
    let deep = format!("{}/file", "d".repeat(200));
    let mut gnu = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    gnu.append_data(&mut header, format!("{}/gnu", "g".repeat(150)), &b"gnu"[..])
        .unwrap();
    gnu.finish().unwrap();
    let layer = fx
        .import(RawTar::new().file(&deep, b"pax", 0o644).finish())
        .unwrap();
    assert_eq!(fs::read(layer.join(&deep)).unwrap(), b"pax");
    let layer = fx.import(gnu.into_inner().unwrap()).unwrap();
    assert_eq!(
        fs::read(layer.join(format!("{}/gnu", "g".repeat(150)))).unwrap(),
        b"gnu"
    );

    assert_refused(
        fx.import(RawTar::new().file(&"c".repeat(256), b"", 0o644).finish()),
        "255",
    );
    assert_refused(
        fx.import(RawTar::new().file(&"c/".repeat(2100), b"", 0o644).finish()),
        "4096",
    );
    // A PAX record of megabytes is refused before it is held in memory.
    let huge = RawTar::new()
        .pax("comment", &vec![b'x'; 2 << 20])
        .file("f", b"", 0o644)
        .finish();
    assert!(matches!(fx.import(huge), Err(ImageError::LimitExceeded(_))));
    fx.assert_host_untouched();
}

#[test]
fn modes_mtimes_and_replacements_follow_the_archive() {
    let fx = Fixture::new();
    let layer = fx
        .import(
            RawTar::new()
                .dir("d", 0o750)
                .file("d/f", b"first", 0o600)
                .file("d/f", b"second", 0o640)
                .dir("x", 0o755)
                .file("x/inner", b"", 0o644)
                .file("x", b"a file now", 0o644)
                .symlink("s", "d/f")
                .file("d2/f", b"", 0o644)
                .dir("d2", 0o700)
                .file("w/.wh.gone", b"", 0o644)
                .file("w/gone/kept", b"kept", 0o644)
                .finish(),
        )
        .unwrap();
    let meta = |p: &str| fs::symlink_metadata(layer.join(p)).unwrap();
    assert_eq!(fs::read(layer.join("d/f")).unwrap(), b"second");
    assert_eq!(meta("d/f").mode() & 0o777, 0o640);
    assert_eq!(meta("d").mode() & 0o777, 0o750);
    assert_eq!(
        meta("d").mtime(),
        1_700_000_000,
        "directory mtimes are restored last"
    );
    assert_eq!(meta("d/f").mtime(), 1_700_000_000);
    assert_eq!(meta("s").mtime(), 1_700_000_000);
    assert!(meta("x").is_file());
    assert_eq!(
        meta("d2").mode() & 0o777,
        0o700,
        "a later directory entry merges"
    );
    assert!(layer.join("d2/f").exists());
    assert_eq!(meta("").permissions().mode() & 0o777, 0o755);
    // A whiteout hides lower layers only: this layer's own later entries replace it.
    assert_eq!(fs::read(layer.join("w/gone/kept")).unwrap(), b"kept");
    fx.assert_host_untouched();
}
