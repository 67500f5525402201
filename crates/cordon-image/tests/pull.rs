//! Pulls from real registries: Debian's `docker-registry` on loopback (one open over plain
//! HTTP, one behind TLS from a test CA with htpasswd auth), images pushed with real `skopeo`
//! (see `cordon_testkit::registry`). Then a sandbox boots the pulled layers.
//!
//! Needs root, docker-registry, skopeo, htpasswd, busybox-static and the static agent.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cordon_image::{
    pull_image, Image, ImageError, LayerId, LayerStore, RegistryConfig, RegistryCredentials,
    UnpackLimits,
};
use cordon_testkit::registry::{busybox_image, TestRegistries};
use cordon_testkit::{TestOptions, TestSandbox};

/// Bounds a whole pull, as the server does.
const PULL_TIMEOUT: Duration = Duration::from_secs(120);

fn generous_limits() -> UnpackLimits {
    UnpackLimits {
        max_unpacked_bytes: 1 << 30,
        max_entries: 100_000,
        max_compressed_bytes: 1 << 30,
    }
}

/// Trusts the auth registry's CA and speaks plain HTTP to the open one; both live on
/// loopback, which the operator must allow (`--internal-registry`).
fn registry_config(registries: &TestRegistries) -> RegistryConfig {
    RegistryConfig {
        insecure_registries: vec![registries.open.address().to_string()],
        extra_root_pems: vec![registries.auth.ca_pem().expect("CA").as_bytes().to_vec()],
        internal_registries: vec![
            registries.open.address().to_string(),
            registries.auth.address().to_string(),
        ],
    }
}

fn test_credentials(registries: &TestRegistries) -> RegistryCredentials {
    let (username, password) = registries.auth.credentials().expect("credentials");
    RegistryCredentials {
        username: username.to_string(),
        password: password.to_string(),
    }
}

/// A layer store in a temporary directory (the directory is what tests inspect).
struct TestStore {
    dir: tempfile::TempDir,
    store: LayerStore,
}

impl TestStore {
    fn new() -> TestStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LayerStore::open(dir.path().join("layers")).expect("open layer store");
        TestStore { dir, store }
    }

    /// Every name in the store root (layers, staging, downloads, markers).
    fn entries(&self) -> BTreeSet<String> {
        fs::read_dir(self.store.root())
            .expect("read store")
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn downloads_left(&self) -> Vec<String> {
        self.entries()
            .into_iter()
            .filter(|name| name.starts_with(".staging-"))
            .collect()
    }
}

async fn pull(
    store: &TestStore,
    reference: &str,
    config: &RegistryConfig,
    credentials: Option<&RegistryCredentials>,
    limits: &UnpackLimits,
) -> Result<Image, ImageError> {
    tokio::time::timeout(
        PULL_TIMEOUT,
        pull_image(&store.store, reference, config, credentials, limits),
    )
    .await
    .unwrap_or_else(|_| panic!("pulling {reference} took longer than {PULL_TIMEOUT:?}"))
}

fn start_registries() -> TestRegistries {
    TestRegistries::start().expect("start the test registries")
}

/// A sandbox whose layers are the image's (top first, the last one the base).
async fn boot(store: &TestStore, image: &Image) -> TestSandbox {
    let mut layers: Vec<PathBuf> = image
        .layers
        .iter()
        .map(|id| store.store.layer_path(id))
        .collect();
    let base = layers.pop().expect("a layer");
    TestSandbox::start(TestOptions {
        extra_layers: layers,
        base_layer: Some(base),
        run_config: image.run_config.clone(),
        ..TestOptions::default()
    })
    .await
}

fn diff_id_layers(registries: &TestRegistries, key: &str) -> Vec<LayerId> {
    let mut ids: Vec<LayerId> = registries.written[key]
        .diff_ids
        .iter()
        .map(|diff_id| LayerId(diff_id.replace("sha256:", "sha256-")))
        .collect();
    ids.reverse();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_image_from_the_open_registry_boots_with_its_run_config() {
    let registries = start_registries();
    let store = TestStore::new();
    let image = pull(
        &store,
        registries.image("busybox"),
        &registry_config(&registries),
        None,
        &generous_limits(),
    )
    .await
    .expect("pull busybox");

    assert_eq!(
        image.manifest_digest,
        registries.written["busybox"].manifest_digest
    );
    assert_eq!(image.layers, diff_id_layers(&registries, "busybox"));
    assert!(image.size_bytes > 500_000, "size {}", image.size_bytes);
    let env = image.run_config.env_vars.clone().unwrap_or_default();
    assert_eq!(
        env.get("GREETING").map(String::as_str),
        Some(busybox_image::GREETING)
    );
    assert_eq!(
        env.get("PATH").map(String::as_str),
        Some(busybox_image::PATH)
    );
    assert_eq!(
        image.run_config.work_dir.as_deref(),
        Some(busybox_image::WORKDIR)
    );
    assert_eq!(image.run_config.user.as_deref(), Some(busybox_image::USER));
    assert!(store.downloads_left().is_empty(), "{:?}", store.entries());

    let sandbox = boot(&store, &image).await;
    let out = sandbox
        .sh("echo \"$GREETING\"; pwd; id -u; cat hello.txt; busybox --help | head -n 1")
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], busybox_image::GREETING, "{out}");
    assert_eq!(lines[1], busybox_image::WORKDIR, "{out}");
    assert_eq!(lines[2], busybox_image::USER, "{out}");
    assert_eq!(
        format!("{}\n", lines[3]),
        busybox_image::APP_FILE_CONTENT,
        "{out}"
    );
    assert!(lines[4].starts_with("BusyBox"), "{out}");
    // The image's user can write its work dir and its home.
    sandbox
        .sh("echo x > /srv/app/new && echo y > /home/user/new && cat /srv/app/new /home/user/new")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_layers_and_multi_arch_indexes_are_pulled() {
    let registries = start_registries();
    let config = registry_config(&registries);

    let zstd_store = TestStore::new();
    let zstd = pull(
        &zstd_store,
        registries.image("zstd"),
        &config,
        None,
        &generous_limits(),
    )
    .await
    .expect("pull the zstd image");
    // Same tars as the gzip image, so the same diff ids and layers.
    assert_eq!(zstd.layers, diff_id_layers(&registries, "busybox"));
    let top = zstd_store.store.layer_path(&zstd.layers[0]);
    assert_eq!(
        fs::read_to_string(top.join("srv/app/hello.txt")).unwrap(),
        busybox_image::APP_FILE_CONTENT
    );
    let base = zstd_store.store.layer_path(&zstd.layers[1]);
    assert!(base.join("bin/busybox").is_file());

    let index_store = TestStore::new();
    let amd64 = pull(
        &index_store,
        registries.image("multiarch"),
        &config,
        None,
        &generous_limits(),
    )
    .await
    .expect("pull the multi-arch image");
    assert_eq!(
        amd64.manifest_digest, registries.written["multiarch"].manifest_digest,
        "the linux/amd64 entry's manifest"
    );
    assert_ne!(
        amd64.manifest_digest,
        registries.written["multiarch"].top_digest
    );
    assert_eq!(amd64.layers, diff_id_layers(&registries, "busybox"));
    for layer in &amd64.layers {
        assert!(
            !index_store.store.layer_path(layer).join("ARCH").exists(),
            "arm64 layer pulled"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_layers_are_downloaded_once_and_whiteouts_apply() {
    let registries = start_registries();
    let config = registry_config(&registries);
    let store = TestStore::new();
    let busybox = pull(
        &store,
        registries.image("busybox"),
        &config,
        None,
        &generous_limits(),
    )
    .await
    .expect("pull busybox");

    // The whiteout image's base layer is busybox's. Corrupt that blob in the registry: a
    // second pull that downloaded it again would fail its digest check.
    let shared_blob = &registries.written["busybox"].layer_digests[0];
    assert_eq!(
        &registries.written["whiteout"].layer_digests[0],
        shared_blob
    );
    corrupt(&registries.open.blob_path(shared_blob));

    let whiteout = pull(
        &store,
        registries.image("whiteout"),
        &config,
        None,
        &generous_limits(),
    )
    .await
    .expect("pull the whiteout image over the shared base");
    assert_eq!(whiteout.layers.last(), busybox.layers.last());
    let expected: BTreeSet<String> = busybox
        .layers
        .iter()
        .chain(&whiteout.layers)
        .map(|id| id.0.clone())
        .collect();
    let layer_dirs: BTreeSet<String> = store
        .entries()
        .into_iter()
        .filter(|name| name.starts_with("sha256-"))
        .collect();
    assert_eq!(layer_dirs, expected, "one copy of each layer");

    // Positive control: the corruption is caught when the blob really is downloaded.
    let fresh = TestStore::new();
    let error = pull(
        &fresh,
        registries.image("busybox"),
        &config,
        None,
        &generous_limits(),
    )
    .await
    .expect_err("corrupted blob");
    eprintln!("refused: {error}");
    assert!(
        matches!(error, ImageError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(shared_blob.as_str()), "{error}");
    assert!(fresh.downloads_left().is_empty(), "{:?}", fresh.entries());
    assert!(!fresh.store.contains(&busybox.layers[1]));

    let sandbox = boot(&store, &whiteout).await;
    assert_eq!(
        sandbox.sh("ls -A /opt; ls -A /opt/olddir").await,
        "olddir\nnew.txt\n"
    );
}

/// Overwrites a file's bytes, keeping its length.
fn corrupt(path: &Path) {
    let mut bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registry_needs_its_ca_and_the_right_credentials() {
    let registries = start_registries();
    let config = registry_config(&registries);
    let private = registries.image("private_busybox");
    let credentials = test_credentials(&registries);

    let store = TestStore::new();
    let image = pull(
        &store,
        private,
        &config,
        Some(&credentials),
        &generous_limits(),
    )
    .await
    .expect("pull with credentials");
    assert_eq!(image.layers, diff_id_layers(&registries, "busybox"));
    assert_eq!(image.run_config.user.as_deref(), Some(busybox_image::USER));

    let empty = TestStore::new();
    let before = empty.entries();
    let wrong = RegistryCredentials {
        username: credentials.username.clone(),
        password: "not-the-password".into(),
    };
    let error = pull(&empty, private, &config, Some(&wrong), &generous_limits())
        .await
        .expect_err("wrong password");
    eprintln!("refused: {error}");
    assert!(
        matches!(error, ImageError::RegistryUnauthorized { .. }),
        "{error}"
    );

    let error = pull(&empty, private, &config, None, &generous_limits())
        .await
        .expect_err("no credentials");
    eprintln!("refused: {error}");
    assert!(
        matches!(error, ImageError::RegistryUnauthorized { .. }),
        "{error}"
    );

    let without_ca = RegistryConfig {
        extra_root_pems: Vec::new(),
        ..config.clone()
    };
    let error = pull(
        &empty,
        private,
        &without_ca,
        Some(&credentials),
        &generous_limits(),
    )
    .await
    .expect_err("untrusted certificate");
    eprintln!("refused: {error}");
    assert!(matches!(error, ImageError::RegistryTls { .. }), "{error}");
    assert_eq!(empty.entries(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_only_for_registries_marked_insecure() {
    let registries = start_registries();
    let store = TestStore::new();
    let before = store.entries();
    let not_insecure = RegistryConfig {
        insecure_registries: Vec::new(),
        ..registry_config(&registries)
    };
    let error = pull(
        &store,
        registries.image("busybox"),
        &not_insecure,
        None,
        &generous_limits(),
    )
    .await
    .expect_err("plain HTTP without --insecure-registry");
    eprintln!("refused: {error}");
    assert!(
        matches!(error, ImageError::RegistryPlainHttp { .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "--insecure-registry {}",
            registries.open.address()
        )),
        "{message}"
    );
    assert_eq!(store.entries(), before);

    // Named neither insecure nor internal: its loopback address is refused (SSRF guard).
    let unnamed = RegistryConfig {
        insecure_registries: Vec::new(),
        internal_registries: Vec::new(),
        ..registry_config(&registries)
    };
    let error = pull(
        &store,
        registries.image("busybox"),
        &unnamed,
        None,
        &generous_limits(),
    )
    .await
    .expect_err("a loopback registry the operator did not name");
    eprintln!("refused: {error}");
    assert!(
        matches!(error, ImageError::RegistryUnreachable { .. })
            && error.to_string().contains("loopback")
            && error.to_string().contains("--internal-registry"),
        "{error}"
    );
    assert_eq!(store.entries(), before);

    let config = registry_config(&registries);
    for missing in ["tools/busybox:no-such-tag", "tools/no-such-image:1"] {
        let error = pull(
            &store,
            &registries.open.reference(missing),
            &config,
            None,
            &generous_limits(),
        )
        .await
        .expect_err("unknown image");
        eprintln!("refused: {error}");
        assert!(
            matches!(error, ImageError::ImageNotFound { .. }),
            "{missing}: {error}"
        );
    }

    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let error = pull(
        &store,
        &format!("{closed_port}/tools/busybox:1"),
        &RegistryConfig {
            insecure_registries: vec![closed_port.clone()],
            ..RegistryConfig::default()
        },
        None,
        &generous_limits(),
    )
    .await
    .expect_err("nothing listens there");
    eprintln!("refused: {error}");
    assert!(
        matches!(error, ImageError::RegistryUnreachable { .. }),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_refuse_an_image_and_leave_nothing_behind() {
    let registries = start_registries();
    let config = registry_config(&registries);
    let reference = registries.image("busybox");
    let compressed: u64 = registries.written["busybox"]
        .layer_digests
        .iter()
        .map(|digest| {
            fs::metadata(registries.open.blob_path(digest))
                .unwrap()
                .len()
        })
        .sum();

    let store = TestStore::new();
    let before = store.entries();
    let too_small = [
        UnpackLimits {
            max_compressed_bytes: compressed - 1,
            ..generous_limits()
        },
        UnpackLimits {
            max_unpacked_bytes: 64 << 10,
            ..generous_limits()
        },
        UnpackLimits {
            max_entries: 10,
            ..generous_limits()
        },
    ];
    for limits in &too_small {
        let error = pull(&store, reference, &config, None, limits)
            .await
            .expect_err("over a limit");
        eprintln!("{limits:?}: {error}");
        assert_eq!(
            store.entries(),
            before,
            "{limits:?} left something in the store"
        );
    }
    let error = pull(&store, reference, &config, None, &too_small[0])
        .await
        .unwrap_err();
    assert!(matches!(error, ImageError::LimitExceeded(_)), "{error}");

    // Positive control: exactly the image's compressed size is allowed.
    let exact = UnpackLimits {
        max_compressed_bytes: compressed,
        ..generous_limits()
    };
    pull(&store, reference, &config, None, &exact)
        .await
        .expect("within the limits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_slip_layer_is_refused_and_the_host_is_untouched() {
    let registries = start_registries();
    let store = TestStore::new();
    // Canaries where `../escape` could land: beside the store and inside its root.
    let canaries = [
        store.dir.path().join("escape"),
        store.store.root().join("escape"),
    ];
    for canary in &canaries {
        fs::write(canary, b"canary\n").unwrap();
    }

    let error = pull(
        &store,
        registries.image("malicious"),
        &registry_config(&registries),
        None,
        &generous_limits(),
    )
    .await
    .expect_err("tar-slip layer");
    eprintln!("refused: {error}");

    for canary in &canaries {
        assert_eq!(
            fs::read(canary).unwrap(),
            b"canary\n",
            "{}",
            canary.display()
        );
    }
    let planted: BTreeSet<PathBuf> = canaries.iter().cloned().collect();
    assert_eq!(files_named_escape(store.dir.path()), planted);
    let malicious_top = diff_id_layers(&registries, "malicious")[0].clone();
    assert!(!store.store.contains(&malicious_top));
    assert!(store.downloads_left().is_empty(), "{:?}", store.entries());

    // Positive control: the check above sees a file a naive unpack would have written.
    let naive_layer = store.dir.path().join("naive/layer");
    fs::create_dir_all(&naive_layer).unwrap();
    fs::write(naive_layer.join("../escape"), b"escaped\n").unwrap();
    assert_eq!(
        files_named_escape(store.dir.path()).len(),
        canaries.len() + 1
    );
}

/// Every file named `escape` below `root`.
fn files_named_escape(root: &Path) -> BTreeSet<PathBuf> {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name() == "escape")
        .map(|entry| entry.into_path())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_without_linux_amd64_is_refused_with_what_it_offers() {
    let registries = start_registries();
    let layout = tempfile::tempdir().unwrap();
    arm64_only_layout(layout.path(), "arm64-only");
    let reference = registries
        .open
        .push(layout.path(), "arm64-only", "tools/arm64-only:1")
        .expect("push the arm64-only index");
    let store = TestStore::new();
    let before = store.entries();

    let error = pull(
        &store,
        &reference,
        &registry_config(&registries),
        None,
        &generous_limits(),
    )
    .await
    .expect_err("no linux/amd64 entry");
    eprintln!("refused: {error}");
    assert!(matches!(error, ImageError::NoLinuxAmd64 { .. }), "{error}");
    assert!(error.to_string().contains("linux/arm64"), "{error}");
    assert_eq!(store.entries(), before);
}

/// An OCI layout whose `reference` is an index listing only a linux/arm64 image: the
/// testkit's multi-arch index with its amd64 entry removed.
fn arm64_only_layout(dir: &Path, reference: &str) {
    use cordon_testkit::oci_layout::{sha256_digest, OciImage, INDEX_MEDIA_TYPE};
    let written = OciImage::new()
        .multi_arch(true)
        .write_layout(dir, reference)
        .unwrap();
    let blob = |digest: &str| dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(&written.top_digest)).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .retain(|entry| entry["platform"]["architecture"] != "amd64");
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = sha256_digest(&bytes);
    fs::write(blob(&digest), &bytes).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": INDEX_MEDIA_TYPE,
            "digest": digest,
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": reference},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}
