//! Real OCI registries for tests: Debian's `docker-registry` (distribution v2) on a free
//! loopback port with its storage in a temporary directory, in two kinds:
//!
//! - [`TestRegistry::open`]: plain HTTP, anonymous pulls and pushes (a registry a Cordon
//!   operator must mark insecure);
//! - [`TestRegistry::tls_with_auth`]: HTTPS with a server certificate for `127.0.0.1` signed by
//!   a fresh test CA, and htpasswd basic auth.
//!
//! Images get in with real `skopeo copy` from an OCI layout ([`TestRegistry::push`], e.g. one
//! written by [`crate::oci_layout`]). The registry is killed and its directory removed on drop;
//! it is also killed (`PR_SET_PDEATHSIG`) when the thread that started it exits, so a test that
//! dies without unwinding leaks no process. Start it from the thread that keeps it (not from a
//! short-lived helper thread).
//!
//! Needs `docker-registry`, `skopeo` and `htpasswd` (apache2-utils).

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// How long a registry may take to answer `/v2/` after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts at a free port (another process may take the one we picked before the registry
/// binds it).
const START_ATTEMPTS: usize = 5;
/// A bound on one `skopeo copy` of a test image.
const PUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// The user and password of [`TestRegistry::tls_with_auth`] registries.
pub const TEST_USERNAME: &str = "cordon";
pub const TEST_PASSWORD: &str = "test-password-1";

/// A running `docker-registry`.
pub struct TestRegistry {
    address: String,
    child: Child,
    tls: Option<TlsFiles>,
    credentials: Option<(String, String)>,
    dir: Option<tempfile::TempDir>,
}

/// The test CA and where skopeo finds it.
struct TlsFiles {
    ca_pem: String,
    /// `<cert dir>/ca.crt`: the CA alone, as `skopeo --dest-cert-dir` wants its directory.
    ca_path: PathBuf,
}

impl TestRegistry {
    /// A plain-HTTP registry without auth.
    pub fn open() -> io::Result<TestRegistry> {
        TestRegistry::start(false)
    }

    /// An HTTPS registry (certificate for `127.0.0.1` from a fresh test CA) with basic auth
    /// for [`TEST_USERNAME`] / [`TEST_PASSWORD`].
    pub fn tls_with_auth() -> io::Result<TestRegistry> {
        TestRegistry::start(true)
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `127.0.0.1:<port>/<name_tag>`, the reference a client pulls.
    pub fn reference(&self, name_tag: &str) -> String {
        format!("{}/{name_tag}", self.address)
    }

    /// The test CA's certificate (PEM), for TLS registries.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|tls| tls.ca_pem.as_str())
    }

    /// A file holding [`TestRegistry::ca_pem`] (alone in its directory).
    pub fn ca_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.ca_path.as_path())
    }

    /// `(username, password)` for registries with auth.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// Where the registry stores the blob `digest` (`sha256:<hex>`), e.g. to corrupt it.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(hex))
            .join(hex)
            .join("data")
    }

    /// Copies `layout_ref` of the OCI layout at `layout` to `name_tag` (e.g. `tools/busybox:1`)
    /// in this registry with `skopeo copy` (every platform of an index); returns the reference.
    pub fn push(&self, layout: &Path, layout_ref: &str, name_tag: &str) -> io::Result<String> {
        let reference = self.reference(name_tag);
        let mut command = Command::new("skopeo");
        command.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--multi-arch",
            "all",
        ]);
        match (&self.tls, self.credentials()) {
            (Some(tls), credentials) => {
                let cert_dir = tls.ca_path.parent().expect("cert dir");
                command.arg("--dest-cert-dir").arg(cert_dir);
                if let Some((user, password)) = credentials {
                    command.arg(format!("--dest-creds={user}:{password}"));
                }
            }
            (None, _) => {
                command.arg("--dest-tls-verify=false");
            }
        }
        command
            .arg(format!("oci:{}:{layout_ref}", layout.display()))
            .arg(format!("docker://{reference}"))
            .env("HOME", self.dir())
            .stdin(Stdio::null());
        run_bounded(command, PUSH_TIMEOUT).map(|_| reference)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("registry dir").path()
    }

    fn start(tls_with_auth: bool) -> io::Result<TestRegistry> {
        if !Path::new(REGISTRY_BIN).is_file() {
            return Err(io::Error::other(format!(
                "{REGISTRY_BIN} is missing: apt-get install docker-registry"
            )));
        }
        let dir = tempfile::Builder::new()
            .prefix("cordon-registry-")
            .tempdir()?;
        let tls = if tls_with_auth {
            Some(write_tls_files(dir.path())?)
        } else {
            None
        };
        let credentials = if tls_with_auth {
            write_htpasswd(&dir.path().join("htpasswd"), TEST_USERNAME, TEST_PASSWORD)?;
            Some((TEST_USERNAME.to_string(), TEST_PASSWORD.to_string()))
        } else {
            None
        };
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let address = format!("127.0.0.1:{}", free_port()?);
            write_config(dir.path(), &address, tls_with_auth)?;
            let mut child = spawn_registry(dir.path())?;
            match wait_until_ready(&address, &mut child, tls.as_ref()) {
                Ok(()) => {
                    return Ok(TestRegistry {
                        address,
                        child,
                        tls,
                        credentials,
                        dir: Some(dir),
                    })
                }
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log =
                        fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
                    last_error = Some(io::Error::other(format!("{error}; registry log:\n{log}")));
                }
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("registry did not start")))
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.dir.take() {
            if let Err(error) = dir.close() {
                eprintln!("removing the test registry's directory: {error}");
            }
        }
    }
}

/// A port nobody listens on right now.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn write_config(dir: &Path, address: &str, tls_with_auth: bool) -> io::Result<()> {
    let mut config = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: {address}\n  secret: cordon-test-registry\n",
        storage = dir.join("storage").display(),
    );
    if tls_with_auth {
        config.push_str(&format!(
            "  tls:\n    certificate: {cert}\n    key: {key}\n\
             auth:\n  htpasswd:\n    realm: cordon-test\n    path: {htpasswd}\n",
            cert = dir.join("server.crt").display(),
            key = dir.join("server.key").display(),
            htpasswd = dir.join("htpasswd").display(),
        ));
    }
    fs::write(dir.join("config.yml"), config)
}

fn spawn_registry(dir: &Path) -> io::Result<Child> {
    let log = fs::File::create(dir.join("registry.log"))?;
    let mut command = Command::new(REGISTRY_BIN);
    command
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Polls `GET /v2/` until it gets an HTTP answer (200, or 401 behind auth).
fn wait_until_ready(address: &str, child: &mut Child, tls: Option<&TlsFiles>) -> io::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let tls_config = tls.map(|tls| client_tls_config(&tls.ca_pem)).transpose()?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!("registry exited: {status}")));
        }
        let answer = match &tls_config {
            Some(config) => get_v2_tls(address, config.clone()),
            None => get_v2_plain(address),
        };
        match answer {
            Ok(status_line) if status_line.starts_with("HTTP/1.") => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(other) => {
                return Err(io::Error::other(format!(
                    "unexpected answer from {address}: {other:?}"
                )))
            }
            Err(error) => {
                return Err(io::Error::other(format!(
                    "{address} did not answer within {READY_TIMEOUT:?}: {error}"
                )))
            }
        }
    }
}

fn get_v2_plain(address: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    get_v2(&mut stream, address)
}

fn get_v2_tls(address: &str, config: Arc<rustls::ClientConfig>) -> io::Result<String> {
    let tcp = TcpStream::connect(address)?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    let server_name = rustls::pki_types::ServerName::try_from("127.0.0.1")
        .map_err(io::Error::other)?
        .to_owned();
    let connection =
        rustls::ClientConnection::new(config, server_name).map_err(io::Error::other)?;
    get_v2(&mut rustls::StreamOwned::new(connection, tcp), address)
}

/// Sends `GET /v2/` and returns the status line.
fn get_v2(stream: &mut impl ReadWrite, address: &str) -> io::Result<String> {
    stream.write_all(
        format!("GET /v2/ HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut head = [0u8; 64];
    let read = stream.read(&mut head)?;
    let text = String::from_utf8_lossy(&head[..read]);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A TLS client config trusting only the test CA (ring, like the code under test).
fn client_tls_config(ca_pem: &str) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A test CA and a server certificate for `127.0.0.1` (and `localhost`) signed by it:
/// `server.crt`/`server.key` for the registry, `certs/ca.crt` for clients.
fn write_tls_files(dir: &Path) -> io::Result<TlsFiles> {
    let generated = generate_certificates().map_err(io::Error::other)?;
    fs::write(dir.join("server.crt"), &generated.server_cert_pem)?;
    let key_path = dir.join("server.key");
    fs::write(&key_path, &generated.server_key_pem)?;
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
    let cert_dir = dir.join("certs");
    fs::create_dir(&cert_dir)?;
    let ca_path = cert_dir.join("ca.crt");
    fs::write(&ca_path, &generated.ca_pem)?;
    Ok(TlsFiles {
        ca_pem: generated.ca_pem,
        ca_path,
    })
}

struct GeneratedCertificates {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
}

fn generate_certificates() -> Result<GeneratedCertificates, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Cordon test registry CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let server_cert = server_params.signed_by(&server_key, &issuer)?;
    Ok(GeneratedCertificates {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
    })
}

/// An htpasswd file with one bcrypt entry, made by `htpasswd -nbB`.
fn write_htpasswd(path: &Path, user: &str, password: &str) -> io::Result<()> {
    let mut command = Command::new("htpasswd");
    command.args(["-nbB", user, password]).stdin(Stdio::null());
    let output = run_bounded(command, Duration::from_secs(30)).map_err(|error| {
        io::Error::other(format!("{error} (htpasswd comes with apache2-utils)"))
    })?;
    let line = output.lines().next().unwrap_or_default();
    if !line.starts_with(&format!("{user}:$2")) {
        return Err(io::Error::other(format!(
            "htpasswd printed no bcrypt line: {output:?}"
        )));
    }
    fs::write(path, format!("{line}\n"))
}

/// Runs `command` to completion within `limit`; its stdout, or an error with its output.
fn run_bounded(mut command: Command, limit: Duration) -> io::Result<String> {
    let program = format!("{:?}", command.get_program());
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| io::Error::other(format!("start {program}: {error}")))?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let readers = [
        stdout.map(read_all_in_thread),
        stderr.map(read_all_in_thread),
    ];
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!("{program} ran past {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let [stdout, stderr] =
        readers.map(|reader| reader.and_then(|r| r.join().ok()).unwrap_or_default());
    if !status.success() {
        return Err(io::Error::other(format!(
            "{program} failed ({status}): {stderr}{stdout}"
        )));
    }
    Ok(stdout)
}

fn read_all_in_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// What the standard busybox test image holds (see [`TestRegistries`]).
pub mod busybox_image {
    /// `GREETING` in the image config's `Env`.
    pub const GREETING: &str = "hello-from-image";
    /// `PATH` in the image config's `Env`.
    pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
    /// The config's `WorkingDir`, owned by [`USER`] and holding [`APP_FILE`].
    pub const WORKDIR: &str = "/srv/app";
    /// The config's `User`: uid 1000 (`user` in the rootfs's passwd, home `/home/user`,
    /// which the image makes writable for it).
    pub const USER: &str = "1000";
    /// A file in the work dir and its content.
    pub const APP_FILE: &str = "/srv/app/hello.txt";
    pub const APP_FILE_CONTENT: &str = "hello from /srv/app\n";
}

/// One open and one TLS+auth registry, with the standard test images pushed:
///
/// | key | where | what |
/// |---|---|---|
/// | `busybox` | open, `tools/busybox:1` | the busybox test rootfs (gzip) plus an app layer (gzip): `Env` `PATH`, `GREETING=hello-from-image`; `WorkingDir` `/srv/app` (holding `hello.txt`); `User` `1000` |
/// | `private_busybox` | auth, `private/busybox:1` | the same image |
/// | `multiarch` | open, `tools/busybox-multiarch:1` | an index: linux/arm64 (a lone `/ARCH` file) listed first, then the busybox image as linux/amd64 |
/// | `zstd` | open, `tools/busybox-zstd:1` | the busybox image with zstd layers (same diff ids) |
/// | `whiteout` | open, `tools/whiteout:1` | the rootfs; a layer with `/opt/doomed.txt` and `/opt/olddir/old.txt`; a top layer that whiteouts `doomed.txt`, makes `olddir` opaque and adds `/opt/olddir/new.txt` |
/// | `malicious` | open, `tools/malicious:1` | the rootfs plus a layer with a tar-slip entry `../escape` |
pub struct TestRegistries {
    pub open: TestRegistry,
    pub auth: TestRegistry,
    /// Key → pullable reference (`127.0.0.1:P/tools/busybox:1`).
    pub images: std::collections::BTreeMap<String, String>,
    /// Key → the digests of what was pushed.
    pub written: std::collections::BTreeMap<String, crate::oci_layout::WrittenImage>,
    _layout: tempfile::TempDir,
}

impl TestRegistries {
    /// Starts both registries and pushes every standard image.
    pub fn start() -> io::Result<TestRegistries> {
        let open = TestRegistry::open()?;
        let auth = TestRegistry::tls_with_auth()?;
        let layout = tempfile::Builder::new()
            .prefix("cordon-test-images-")
            .tempdir()?;
        let mut registries = TestRegistries {
            open,
            auth,
            images: Default::default(),
            written: Default::default(),
            _layout: layout,
        };
        for image in standard_images()? {
            registries.push(image)?;
        }
        Ok(registries)
    }

    /// The reference of the image with `key` (see the table above).
    pub fn image(&self, key: &str) -> &str {
        self.images
            .get(key)
            .unwrap_or_else(|| panic!("no test image {key:?}"))
    }

    /// What `cargo run -p cordon-testkit --example test-registries` prints.
    pub fn to_json(&self) -> serde_json::Value {
        let (username, password) = self.auth.credentials().expect("auth registry credentials");
        serde_json::json!({
            "open": self.open.address(),
            "auth": self.auth.address(),
            "ca_pem": self.auth.ca_path().expect("auth registry CA"),
            "username": username,
            "password": password,
            "images": self.images,
        })
    }

    fn push(&mut self, image: StandardImage) -> io::Result<()> {
        let layout = self._layout.path();
        let written = image.image.write_layout(layout, image.key)?;
        let registry = if image.private {
            &self.auth
        } else {
            &self.open
        };
        let reference = registry.push(layout, image.key, image.name_tag)?;
        self.images.insert(image.key.to_string(), reference);
        self.written.insert(image.key.to_string(), written);
        Ok(())
    }
}

struct StandardImage {
    key: &'static str,
    name_tag: &'static str,
    private: bool,
    image: crate::oci_layout::OciImage,
}

fn standard_images() -> io::Result<Vec<StandardImage>> {
    use crate::oci_layout::{LayerCompression, OciImage, RawTar};
    let rootfs = crate::test_rootfs();
    let app = app_layer_dir()?;
    let busybox = |compression| {
        OciImage::new()
            .layer_from_dir(&rootfs, compression)
            .layer_from_dir(app.path(), compression)
            .env("PATH", busybox_image::PATH)
            .env("GREETING", busybox_image::GREETING)
            .working_dir(busybox_image::WORKDIR)
            .user(busybox_image::USER)
    };
    let gzip = LayerCompression::Gzip;
    let doomed = RawTar::new()
        .dir("opt/", 0o755)
        .file("opt/doomed.txt", b"doomed\n", 0o644)
        .dir("opt/olddir/", 0o755)
        .file("opt/olddir/old.txt", b"old\n", 0o644)
        .finish();
    let whiteouts = RawTar::new()
        .dir("opt/", 0o755)
        .file("opt/.wh.doomed.txt", b"", 0o644)
        .dir("opt/olddir/", 0o755)
        .file("opt/olddir/.wh..wh..opq", b"", 0o644)
        .file("opt/olddir/new.txt", b"new\n", 0o644)
        .finish();
    let slip = RawTar::new()
        .file("../escape", b"escaped from the layer\n", 0o644)
        .finish();
    let base = || OciImage::new().layer_from_dir(&rootfs, gzip);
    Ok(vec![
        StandardImage {
            key: "busybox",
            name_tag: "tools/busybox:1",
            private: false,
            image: busybox(gzip),
        },
        StandardImage {
            key: "private_busybox",
            name_tag: "private/busybox:1",
            private: true,
            image: busybox(gzip),
        },
        StandardImage {
            key: "multiarch",
            name_tag: "tools/busybox-multiarch:1",
            private: false,
            image: busybox(gzip).multi_arch(true),
        },
        StandardImage {
            key: "zstd",
            name_tag: "tools/busybox-zstd:1",
            private: false,
            image: busybox(LayerCompression::Zstd),
        },
        StandardImage {
            key: "whiteout",
            name_tag: "tools/whiteout:1",
            private: false,
            image: base()
                .layer_from_tar(doomed, gzip)
                .layer_from_tar(whiteouts, gzip)
                .env("PATH", busybox_image::PATH),
        },
        StandardImage {
            key: "malicious",
            name_tag: "tools/malicious:1",
            private: false,
            image: base()
                .layer_from_tar(slip, gzip)
                .env("PATH", busybox_image::PATH),
        },
    ])
}

/// The busybox image's second layer: the work dir with its file, and a home for uid 1000,
/// both owned by that user so it can write there.
fn app_layer_dir() -> io::Result<tempfile::TempDir> {
    use std::os::unix::fs::chown;
    let dir = tempfile::Builder::new()
        .prefix("cordon-app-layer-")
        .tempdir()?;
    let root = dir.path();
    let uid = busybox_image::USER
        .parse::<u32>()
        .expect("numeric test user");
    let workdir = root.join(busybox_image::WORKDIR.trim_start_matches('/'));
    let home = root.join("home/user");
    fs::create_dir_all(&workdir)?;
    fs::create_dir_all(&home)?;
    let app_file = root.join(busybox_image::APP_FILE.trim_start_matches('/'));
    fs::write(&app_file, busybox_image::APP_FILE_CONTENT)?;
    for path in [root.join("srv"), root.join("home")] {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    }
    for path in [&workdir, &home] {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        chown(path, Some(uid), Some(uid))?;
    }
    fs::set_permissions(&app_file, fs::Permissions::from_mode(0o644))?;
    chown(&app_file, Some(uid), Some(uid))?;
    Ok(dir)
}
