//! Importing images without a registry: OCI layouts (directory and tar) written by the test
//! builder, `docker save` archives written by real skopeo, multi-arch resolution, corrupted
//! blobs, and a sandbox booted from an imported image.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use cordon_image::{import_archive, ArchivedImage, ImageError, LayerStore, UnpackLimits};
use cordon_testkit::oci_layout::{
    busybox_image, tar_dir, LayerCompression, OciImage, RawTar, WrittenImage,
};
use cordon_testkit::{TestOptions, TestSandbox};

fn limits() -> UnpackLimits {
    UnpackLimits {
        max_unpacked_bytes: 1 << 30,
        max_entries: 100_000,
        max_compressed_bytes: 1 << 30,
    }
}

/// The busybox image plus a small zstd layer on top.
fn test_image() -> OciImage {
    busybox_image().layer_from_tar(
        RawTar::new()
            .file("etc/motd", b"imported\n", 0o644)
            .finish(),
        LayerCompression::Zstd,
    )
}

fn import(store: &LayerStore, path: &Path) -> Result<ArchivedImage, ImageError> {
    let mut images = import_archive(store, path, &limits())?;
    assert_eq!(images.len(), 1);
    Ok(images.remove(0))
}

fn write_tar_of(dir: &Path, file: &Path) {
    fs::write(file, tar_dir(dir).unwrap()).unwrap();
}

fn assert_is_test_image(imported: &ArchivedImage, written: &WrittenImage, store: &LayerStore) {
    let image = &imported.image;
    assert_eq!(image.layers.len(), 2);
    let env = image.run_config.env_vars.as_ref().unwrap();
    assert_eq!(env["GREETING"], "hello from the image");
    assert_eq!(image.run_config.work_dir.as_deref(), Some("/workspace"));
    assert_eq!(image.run_config.user.as_deref(), Some("root"));
    // Top first; named by diff id.
    let expected: Vec<String> = written
        .diff_ids
        .iter()
        .rev()
        .map(|d| d.replace("sha256:", "sha256-"))
        .collect();
    assert_eq!(
        image.layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(
        fs::read(store.layer_path(&image.layers[0]).join("etc/motd")).unwrap(),
        b"imported\n"
    );
    assert!(store
        .layer_path(&image.layers[1])
        .join("bin/busybox")
        .is_file());
    assert!(image.size_bytes > 500_000, "{}", image.size_bytes);
}

#[test]
fn an_oci_layout_directory_and_its_tar_import_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = test_image().write_layout(&layout, "busybox:1").unwrap();

    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let from_dir = import(&store, &layout).unwrap();
    assert_eq!(from_dir.reference.as_deref(), Some("busybox:1"));
    assert_eq!(from_dir.image.manifest_digest, written.manifest_digest);
    assert_is_test_image(&from_dir, &written, &store);

    let tar = dir.path().join("layout.tar");
    write_tar_of(&layout, &tar);
    let fresh = LayerStore::open(dir.path().join("layers-2")).unwrap();
    let from_tar = import(&fresh, &tar).unwrap();
    assert_eq!(from_tar.reference.as_deref(), Some("busybox:1"));
    assert_eq!(from_tar.image.manifest_digest, written.manifest_digest);
    assert_is_test_image(&from_tar, &written, &fresh);
}

#[test]
fn a_docker_archive_written_by_skopeo_imports() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    // Docker archives cannot carry zstd layers: the small layer is gzip here.
    let image = busybox_image().layer_from_tar(
        RawTar::new()
            .file("etc/motd", b"imported\n", 0o644)
            .finish(),
        LayerCompression::Gzip,
    );
    let written = image.write_layout(&layout, "busybox:1").unwrap();
    let archive = dir.path().join("docker.tar");
    let output = Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:busybox:1", layout.display()))
        .arg(format!(
            "docker-archive:{}:cordon.test/busybox:1",
            archive.display()
        ))
        .output()
        .expect("skopeo is installed (apt-get install skopeo)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let imported = import(&store, &archive).unwrap();
    assert_eq!(imported.reference.as_deref(), Some("cordon.test/busybox:1"));
    assert_is_test_image(&imported, &written, &store);
    assert_eq!(imported.image.manifest_digest, written.config_digest);
}

#[test]
fn an_archive_with_both_formats_is_read_through_its_oci_index() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = test_image().write_layout(&layout, "busybox:1").unwrap();
    // As Docker 25+ writes them; this manifest.json would fail if it were used.
    fs::write(
        layout.join("manifest.json"),
        br#"[{"Config":"missing.json","RepoTags":["wrong:1"],"Layers":["missing.tar"]}]"#,
    )
    .unwrap();
    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let imported = import(&store, &layout).unwrap();
    assert_eq!(imported.reference.as_deref(), Some("busybox:1"));
    assert_is_test_image(&imported, &written, &store);
}

#[test]
fn a_multi_arch_index_resolves_to_linux_amd64() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = test_image()
        .multi_arch(true)
        .write_layout(&layout, "multi")
        .unwrap();
    assert_ne!(written.top_digest, written.manifest_digest);
    let tar = dir.path().join("layout.tar");
    write_tar_of(&layout, &tar);
    for (n, path) in [&layout, &tar].into_iter().enumerate() {
        let store = LayerStore::open(dir.path().join(format!("layers-{n}"))).unwrap();
        let imported = import(&store, path).unwrap();
        assert_eq!(imported.image.manifest_digest, written.manifest_digest);
        assert_is_test_image(&imported, &written, &store);
        for layer in &imported.image.layers {
            assert!(
                !store.layer_path(layer).join("ARCH").exists(),
                "the arm64 layer was taken"
            );
        }
    }
}

#[test]
fn an_index_without_linux_amd64_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    test_image()
        .multi_arch(true)
        .write_layout(&layout, "multi")
        .unwrap();
    // Rewrite the nested index to list only the arm64 manifest.
    let index_json: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let nested_digest = index_json["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let nested_path = blob(&layout, &nested_digest);
    let mut nested: serde_json::Value =
        serde_json::from_slice(&fs::read(&nested_path).unwrap()).unwrap();
    nested["manifests"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["platform"]["architecture"] == "arm64");
    let bytes = serde_json::to_vec(&nested).unwrap();
    let digest = cordon_testkit::oci_layout::sha256_digest(&bytes);
    fs::write(blob(&layout, &digest), &bytes).unwrap();
    let mut index_json = index_json;
    index_json["manifests"][0]["digest"] = digest.into();
    index_json["manifests"][0]["size"] = bytes.len().into();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index_json).unwrap(),
    )
    .unwrap();

    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    match import(&store, &layout) {
        Err(ImageError::InvalidImage(reason)) => {
            assert!(
                reason.contains("no linux/amd64") && reason.contains("linux/arm64"),
                "{reason}"
            )
        }
        other => panic!("expected no linux/amd64, got {other:?}"),
    }
    assert!(store.list().unwrap().is_empty());
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

#[test]
fn corrupted_blobs_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    type DigestOf = fn(&WrittenImage) -> String;
    let cases: [(&str, DigestOf, usize); 3] = [
        ("config", |w| w.config_digest.clone(), 10),
        ("manifest", |w| w.manifest_digest.clone(), 10),
        ("gzip layer", |w| w.layer_digests[0].clone(), 100_000),
    ];
    for (n, (what, digest, at)) in cases.into_iter().enumerate() {
        let layout = dir.path().join(format!("layout-{n}"));
        let written = test_image().write_layout(&layout, "busybox:1").unwrap();
        flip_byte(&blob(&layout, &digest(&written)), at);
        let tar = dir.path().join(format!("layout-{n}.tar"));
        write_tar_of(&layout, &tar);
        for path in [&layout, &tar] {
            let store = LayerStore::open(dir.path().join(format!("layers-{n}"))).unwrap();
            let error = import(&store, path).expect_err(what);
            assert!(
                matches!(
                    error,
                    ImageError::DigestMismatch { .. } | ImageError::InvalidImage(_)
                ),
                "{what}: {error}"
            );
            assert!(store.list().unwrap().is_empty(), "{what}: a layer was kept");
            assert_eq!(
                fs::read_dir(store.root()).unwrap().count(),
                0,
                "{what}: debris"
            );
        }
    }
}

#[test]
fn archive_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    test_image().write_layout(&layout, "busybox:1").unwrap();
    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let small = UnpackLimits {
        max_compressed_bytes: 1000,
        ..limits()
    };
    assert!(matches!(
        import_archive(&store, &layout, &small),
        Err(ImageError::LimitExceeded(_))
    ));
    let few = UnpackLimits {
        max_entries: 10,
        ..limits()
    };
    assert!(matches!(
        import_archive(&store, &layout, &few),
        Err(ImageError::LimitExceeded(_))
    ));
    assert!(store.list().unwrap().is_empty());

    // Neither format, and a compressed outer tar, get clear errors.
    let junk = dir.path().join("junk.tar");
    fs::write(&junk, RawTar::new().file("hello", b"hi", 0o644).finish()).unwrap();
    let error = import_archive(&store, &junk, &limits()).unwrap_err();
    assert!(
        error.to_string().contains("neither an OCI image layout"),
        "{error}"
    );
    let gz = dir.path().join("layout.tar.gz");
    fs::write(
        &gz,
        LayerCompression::Gzip.compress(&tar_dir(&layout).unwrap()),
    )
    .unwrap();
    let error = import_archive(&store, &gz, &limits()).unwrap_err();
    assert!(error.to_string().contains("decompress it first"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_boots_from_an_imported_image_with_its_run_config() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    test_image().write_layout(&layout, "busybox:1").unwrap();
    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let image = import(&store, &layout).unwrap().image;
    let mut layers: Vec<PathBuf> = image.layers.iter().map(|l| store.layer_path(l)).collect();
    let base = layers.pop().unwrap();
    let sandbox = TestSandbox::start(TestOptions {
        extra_layers: layers,
        base_layer: Some(base),
        run_config: image.run_config.clone(),
        ..TestOptions::default()
    })
    .await;
    let out = sandbox
        .sh("echo \"$GREETING\"; pwd; cat /etc/motd; id -u")
        .await;
    assert_eq!(out, "hello from the image\n/workspace\nimported\n0\n");
}

#[test]
fn a_docker_save_archive_with_compressed_layers_imports() {
    // Docker 25+ names blobs by digest and may keep them compressed: turn an OCI layout into
    // a manifest.json-only archive over the same (gzip and zstd) blobs.
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = test_image().write_layout(&layout, "busybox:1").unwrap();
    fs::remove_file(layout.join("index.json")).unwrap();
    fs::remove_file(layout.join("oci-layout")).unwrap();
    let manifest = serde_json::json!([{
        "Config": format!("blobs/sha256/{}", written.config_digest.trim_start_matches("sha256:")),
        "RepoTags": ["saved:2"],
        "Layers": written.layer_digests.iter()
            .map(|d| format!("blobs/sha256/{}", d.trim_start_matches("sha256:")))
            .collect::<Vec<_>>(),
    }]);
    fs::write(layout.join("manifest.json"), manifest.to_string()).unwrap();
    let tar = dir.path().join("saved.tar");
    write_tar_of(&layout, &tar);
    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let imported = import(&store, &tar).unwrap();
    assert_eq!(imported.reference.as_deref(), Some("saved:2"));
    assert_is_test_image(&imported, &written, &store);
}

#[test]
fn concurrent_imports_of_the_same_image_share_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let written = test_image().write_layout(&layout, "busybox:1").unwrap();
    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let results: Vec<ArchivedImage> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| import(&store, &layout).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for imported in &results {
        assert_is_test_image(imported, &written, &store);
    }
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(
        fs::read_dir(store.root()).unwrap().count(),
        2,
        "staging debris left"
    );
}

/// An OCI layout tar whose last member is `index.json` declaring `size` bytes.
fn layout_tar_with_index_size(size: u64) -> Vec<u8> {
    RawTar::new()
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)
        .file_declaring_size("index.json", size, b"{}")
        .finish()
}

#[test]
fn a_member_declaring_more_bytes_than_the_archive_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    // Sizes past 8 GiB are written base-256; u64::MAX - 1024 is the largest the tar crate
    // lets through without overflowing its own next-header offset.
    for size in [1 << 40, 1 << 62, u64::MAX - 1024, u64::MAX] {
        let path = dir.path().join("huge.tar");
        fs::write(&path, layout_tar_with_index_size(size)).unwrap();
        match import_archive(&store, &path, &limits()) {
            Err(ImageError::InvalidImage(reason)) => assert!(
                reason.contains("past the end") || reason.contains("overflow"),
                "{size}: {reason}"
            ),
            other => panic!("{size}: {other:?}"),
        }
    }
}

#[test]
fn a_fifo_in_a_layout_directory_is_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    test_image().write_layout(&layout, "busybox:1").unwrap();
    fs::remove_file(layout.join("index.json")).unwrap();
    let status = Command::new("mkfifo")
        .arg(layout.join("index.json"))
        .status()
        .unwrap();
    assert!(status.success());
    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(import_archive(&store, &layout, &limits()).map(|_| ()));
    });
    let result = finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the import hung on a FIFO");
    match result {
        Err(ImageError::InvalidImage(reason)) => {
            assert!(reason.contains("index.json"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}
