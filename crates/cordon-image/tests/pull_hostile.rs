//! Pulls from a hostile registry: a small HTTP server in this file that streams endless
//! manifest, token and error bodies, declares absurd sizes, and points token realms and
//! redirects at internal addresses. The pull must stop at its bounds (no unbounded read into
//! memory) and never connect where the operator did not allow it (SSRF), with positive
//! controls showing the same server is reached when allowed.
//!
//! Needs nothing but loopback networking.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cordon_image::{pull_image, ImageError, LayerStore, RegistryConfig, UnpackLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A bounded pull fails in well under this; an unbounded read would run into it.
const PULL_TIMEOUT: Duration = Duration::from_secs(30);
/// What the hostile server may have pushed before the client hung up: the 4 MiB manifest
/// bound plus loopback socket buffers, far below "endless".
const MAX_STREAMED: u64 = 48 << 20;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// One answer of the hostile server.
#[derive(Clone)]
enum Reply {
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The head, then filler bytes until the client hangs up.
    Endless {
        status: u16,
        headers: Vec<(String, String)>,
    },
}

impl Reply {
    fn full(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        Reply::Full {
            status,
            headers: owned(headers),
            body: body.to_vec(),
        }
    }

    fn endless(status: u16, headers: &[(&str, &str)]) -> Reply {
        Reply::Endless {
            status,
            headers: owned(headers),
        }
    }
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

type Route = Box<dyn Fn(&str, &str) -> Reply + Send + Sync>;

/// A one-request-per-connection HTTP/1.1 server on loopback whose answers come from `route`
/// (path, raw request head). Counts connections and the bytes of endless bodies it wrote.
struct Hostile {
    port: u16,
    connections: Arc<AtomicUsize>,
    streamed: Arc<AtomicU64>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Hostile {
    async fn start(route: impl Fn(&str, &str) -> Reply + Send + Sync + 'static) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hostile = Hostile {
            port,
            connections: Arc::default(),
            streamed: Arc::default(),
            heads: Arc::default(),
        };
        let route: Arc<Route> = Arc::new(Box::new(route));
        let (connections, streamed, heads) = (
            hostile.connections.clone(),
            hostile.streamed.clone(),
            hostile.heads.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (route, streamed, heads) = (route.clone(), streamed.clone(), heads.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &route, &streamed, &heads).await;
                });
            }
        });
        hostile
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    route: &Route,
    streamed: &AtomicU64,
    heads: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
        if stream.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
        if head == [0x16] {
            // A TLS ClientHello: answer like a plain-HTTP server does.
            stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                .await?;
            return Ok(());
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    heads.lock().unwrap().push(head.clone());
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let (status, headers, body) = match route(&path, &head) {
        Reply::Full {
            status,
            headers,
            body,
        } => (status, headers, Some(body)),
        Reply::Endless { status, headers } => (status, headers, None),
    };
    let mut out = format!("HTTP/1.1 {status} Hostile\r\nConnection: close\r\n");
    for (name, value) in &headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = &body {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes()).await?;
    match body {
        Some(body) => stream.write_all(&body).await?,
        None => {
            let filler = vec![b' '; 64 << 10];
            loop {
                stream.write_all(&filler).await?;
                streamed.fetch_add(filler.len() as u64, Ordering::SeqCst);
            }
        }
    }
    stream.shutdown().await
}

fn limits() -> UnpackLimits {
    UnpackLimits {
        max_unpacked_bytes: 1 << 30,
        max_entries: 100_000,
        max_compressed_bytes: 1 << 30,
    }
}

/// Plain HTTP to `registry`, which the operator thereby allows on loopback.
fn insecure(registry: &str) -> RegistryConfig {
    RegistryConfig {
        insecure_registries: vec![registry.to_string()],
        ..RegistryConfig::default()
    }
}

async fn pull(reference: &str, config: &RegistryConfig) -> (ImageError, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path().join("layers")).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(
        PULL_TIMEOUT,
        pull_image(&store, reference, config, None, &limits()),
    )
    .await
    .unwrap_or_else(|_| panic!("pulling {reference} was not cut off within {PULL_TIMEOUT:?}"));
    let error = result.expect_err("the hostile registry must fail the pull");
    eprintln!("{reference}: {error}");
    (error, started.elapsed())
}

fn is_protocol_error(error: &ImageError, needle: &str) -> bool {
    matches!(error, ImageError::RegistryProtocol { .. }) && error.to_string().contains(needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_manifest_token_and_error_bodies_are_cut_off() {
    // A manifest that never ends.
    let manifest =
        Hostile::start(|_, _| Reply::endless(200, &[("Content-Type", MANIFEST_TYPE)])).await;
    let (error, _) = pull(
        &format!("{}/evil/app:1", manifest.address()),
        &insecure(&manifest.address()),
    )
    .await;
    assert!(is_protocol_error(&error, "manifest exceeds"), "{error}");
    assert!(manifest.streamed.load(Ordering::SeqCst) < MAX_STREAMED);

    // A bearer challenge whose token endpoint never stops answering.
    let realm =
        Hostile::start(|_, _| Reply::endless(200, &[("Content-Type", "application/json")])).await;
    let challenge = format!(
        "Bearer realm=\"http://{}/token\",service=\"hostile\"",
        realm.address()
    );
    let registry =
        Hostile::start(move |_, _| Reply::full(401, &[("WWW-Authenticate", &challenge)], b""))
            .await;
    let (error, _) = pull(
        &format!("{}/evil/app:1", registry.address()),
        &insecure(&registry.address()),
    )
    .await;
    assert!(is_protocol_error(&error, "token answer exceeds"), "{error}");
    assert!(realm.connections() == 1 && realm.streamed.load(Ordering::SeqCst) < MAX_STREAMED);

    // An error answer with an endless body: the status is reported, the body cut.
    let failing =
        Hostile::start(|_, _| Reply::endless(500, &[("Content-Type", "text/plain")])).await;
    let (error, _) = pull(
        &format!("{}/evil/app:1", failing.address()),
        &insecure(&failing.address()),
    )
    .await;
    assert!(is_protocol_error(&error, "HTTP 500"), "{error}");
    assert!(failing.streamed.load(Ordering::SeqCst) < MAX_STREAMED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_oversized_manifest_is_refused_before_its_body() {
    let registry = Hostile::start(|_, _| {
        Reply::endless(
            200,
            &[
                ("Content-Type", MANIFEST_TYPE),
                ("Content-Length", "1099511627776"),
            ],
        )
    })
    .await;
    let (error, elapsed) = pull(
        &format!("{}/evil/app:1", registry.address()),
        &insecure(&registry.address()),
    )
    .await;
    assert!(is_protocol_error(&error, "manifest exceeds"), "{error}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_challenge_is_answered_with_a_pull_token() {
    // Positive control for the token flow: challenge, token for this repository, retry.
    let registry_port = Arc::new(Mutex::new(0u16));
    let port = registry_port.clone();
    let registry = Hostile::start(move |path, head| {
        let port = *port.lock().unwrap();
        if path.starts_with("/token") {
            return Reply::full(200, &[], br#"{"token": "t0k3n", "expires_in": 300}"#);
        }
        if head.to_ascii_lowercase().contains("authorization: bearer t0k3n") {
            let envelope = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no such tag"}]}"#;
            return Reply::full(404, &[("Content-Type", "application/json")], envelope.as_bytes());
        }
        let challenge = format!(
            "Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"hostile\",scope=\"repository:x:pull,push\""
        );
        Reply::full(401, &[("WWW-Authenticate", &challenge)], b"")
    })
    .await;
    *registry_port.lock().unwrap() = registry.port;
    let (error, _) = pull(
        &format!("{}/team/app:1", registry.address()),
        &insecure(&registry.address()),
    )
    .await;
    assert!(matches!(error, ImageError::ImageNotFound { .. }), "{error}");
    let heads = registry.heads();
    let token_request = heads
        .iter()
        .find(|head| head.contains("/token?"))
        .expect("a token request");
    assert!(
        token_request.contains("service=hostile")
            && token_request.contains("scope=repository%3Ateam%2Fapp%3Apull"),
        "{token_request}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_registries_are_reached_only_when_the_operator_names_them() {
    let registry = Hostile::start(|_, _| Reply::full(404, &[], b"nothing here")).await;
    let by_ip = format!("{}/app:1", registry.address());
    let by_name = format!("localhost:{}/app:1", registry.port);

    // Not named: refused before connecting, by IP literal and by a name resolving there.
    for reference in [&by_ip, &by_name] {
        let (error, _) = pull(reference, &RegistryConfig::default()).await;
        assert!(
            matches!(error, ImageError::RegistryUnreachable { .. })
                && error.to_string().contains("loopback"),
            "{error}"
        );
    }
    assert_eq!(
        registry.connections(),
        0,
        "an unnamed internal registry was contacted"
    );
    let (error, _) = pull(
        "169.254.169.254/latest/meta-data:1",
        &RegistryConfig::default(),
    )
    .await;
    assert!(error.to_string().contains("cloud metadata"), "{error}");

    // Positive control: named internal (HTTPS), the same server is contacted (and fails TLS).
    let internal = RegistryConfig {
        internal_registries: vec![format!("localhost:{}", registry.port)],
        ..RegistryConfig::default()
    };
    let (error, _) = pull(&by_name, &internal).await;
    assert!(
        matches!(error, ImageError::RegistryPlainHttp { .. }),
        "{error}"
    );
    assert_eq!(registry.connections(), 1);
}

/// A manifest whose config blob the registry redirects to `location`.
fn redirecting_registry(location: String) -> impl Fn(&str, &str) -> Reply + Send + Sync {
    let config_digest = format!("sha256:{}", "0".repeat(64));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": 2},
        "layers": []
    })
    .to_string();
    move |path, _| {
        if path.contains("/manifests/") {
            Reply::full(200, &[("Content-Type", MANIFEST_TYPE)], manifest.as_bytes())
        } else {
            Reply::full(307, &[("Location", &location)], b"")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_token_realms_to_internal_hosts_are_refused() {
    let target = Hostile::start(|_, _| Reply::full(404, &[], b"internal service")).await;

    // A named registry redirects a blob to another internal host: refused, never contacted.
    let elsewhere = format!("http://localhost:{}/secret", target.port);
    let registry = Hostile::start(redirecting_registry(elsewhere)).await;
    let (error, _) = pull(
        &format!("{}/app:1", registry.address()),
        &insecure(&registry.address()),
    )
    .await;
    assert!(
        matches!(error, ImageError::RegistryUnreachable { .. })
            && error.to_string().contains("loopback"),
        "{error}"
    );
    assert_eq!(target.connections(), 0, "the redirect target was contacted");

    // Positive control: a redirect to the named registry's own host is followed.
    let same_host = format!("http://127.0.0.1:{}/blob", target.port);
    let registry = Hostile::start(redirecting_registry(same_host)).await;
    let (error, _) = pull(
        &format!("{}/app:1", registry.address()),
        &insecure(&registry.address()),
    )
    .await;
    assert!(matches!(error, ImageError::ImageNotFound { .. }), "{error}");
    assert_eq!(target.connections(), 1);

    // A named registry whose token realm is the metadata service.
    let registry = Hostile::start(|_, _| {
        let challenge = "Bearer realm=\"http://169.254.169.254/latest/token\"";
        Reply::full(401, &[("WWW-Authenticate", challenge)], b"")
    })
    .await;
    let (error, _) = pull(
        &format!("{}/app:1", registry.address()),
        &insecure(&registry.address()),
    )
    .await;
    assert!(
        matches!(error, ImageError::RegistryUnreachable { .. })
            && error.to_string().contains("cloud metadata"),
        "{error}"
    );
}
