//! `cordon serve`: the LangSmith-compatible control plane (sandboxes, snapshots, lifecycle,
//! the SQLite store) and the data-plane router that forwards `/dp/{id}/...` to each sandbox's
//! agent. See ARCHITECTURE.md and the wire contract in `shared/spec/langsmith-sandbox-api.md`.

mod control;
mod dataplane;
mod download_links;
mod egress;
mod error;
mod forwarding;
mod lifecycle;
mod model;
mod paging;
mod pools;
mod port_forward;
mod registries;
mod sandboxes;
mod secret_sealing;
mod service_urls;
mod signing_keys;
mod snapshots;
mod splice;
mod store;
mod templates;
mod tunnel;
mod validate;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use cordon_image::{LayerStore, PreparedSnapshot};
use cordon_runtime::Runtime;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cordon_image::RegistryConfig;
pub use egress::EgressSettings;
pub use error::ApiError;
pub use pools::PoolsConfig;
pub use secret_sealing::SealingError;
pub use service_urls::ServiceLinksConfig;
pub use snapshots::SnapshotLimits;
pub use store::StoreError;

/// Errors that keep the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no API key configured (--api-key or CORDON_API_KEYS)")]
    NoApiKeys,
    #[error("invalid --public-url {0:?}: expected http(s)://host[:port][/prefix]")]
    PublicUrl(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sealing(#[from] SealingError),
    #[error("layer store: {0}")]
    Layers(#[from] cordon_image::ImageError),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    SigningKeys(#[from] signing_keys::KeyError),
    #[error(transparent)]
    DownloadLinks(#[from] download_links::SecretError),
    #[error("invalid --service-domain {0:?}: expected host[:port]")]
    ServiceDomain(String),
    #[error("reconciling with the runtime: {0}")]
    Reconcile(ApiError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("egress proxy: {0}")]
    Egress(String),
}

/// Everything `cordon serve` is configured with.
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Holds `cordon.db`; the runtime's state (`sandboxes/`) lives beside it.
    pub data_dir: PathBuf,
    pub api_keys: Vec<String>,
    /// Base of every `dataplane_url`; else taken from each request's Host header.
    pub public_url: Option<String>,
    /// The default snapshot, already prepared.
    pub snapshot: PreparedSnapshot,
    /// How often the lifecycle task checks the TTLs.
    pub lifecycle_tick: Duration,
    /// Most sandboxes one workspace may hold (any status); creates beyond it get 429.
    pub max_sandboxes_per_workspace: usize,
    /// How registries are reached (`--insecure-registry`, `--registry-ca`).
    pub registry: RegistryConfig,
    /// Bounds on snapshot builds and imports.
    pub snapshot_limits: SnapshotLimits,
    /// Service URLs and signing keys (`--service-domain`, `--signing-key-rotation`).
    pub service_links: ServiceLinksConfig,
    /// Warm pools: pass tick, demand window, scale-down cool-down, host budget.
    pub pools: PoolsConfig,
    /// The backend of a create that names no `runtime` (`--default-runtime`).
    pub default_runtime: cordon_runtime::Backend,
    /// The egress proxy (`--allow-egress-cidr`, `--egress-ca`, `--egress-resolver`, …).
    pub egress: EgressSettings,
}

/// A workspace: one per API key, named by a hash of the key so the key is never stored.
#[derive(Debug, Clone)]
pub struct Workspace(pub String);

/// Shared state of every handler.
pub struct App {
    store: Arc<store::Store>,
    sandboxes: Arc<sandboxes::Sandboxes>,
    snapshots: Arc<snapshots::Snapshots>,
    pools: Arc<pools::Pools>,
    /// SHA-256 of each key → its workspace.
    workspaces: HashMap<[u8; 32], Workspace>,
    public_url: Option<String>,
    max_sandboxes_per_workspace: usize,
    shutdown: Shutdown,
    /// Signs service-URL tokens; published at `/.well-known/jwks.json`.
    signing_keys: signing_keys::SigningKeys,
    download_secret: download_links::LinkSecret,
    /// `--service-domain`, validated and lower-cased.
    service_domain: Option<String>,
    /// The tunnels open to each sandbox (bounded per sandbox).
    tunnels: tunnel::TunnelSlots,
}

/// What a graceful shutdown has to reach: the spliced WebSockets, which outlive their HTTP
/// connections and so are not drained by the HTTP server.
struct Shutdown {
    /// Fired when the server begins shutting down.
    going_away: CancellationToken,
    upgrades: TaskTracker,
}

impl App {
    /// `--public-url`, else `http://<Host>`; never with a trailing slash (spec §3.1).
    fn public_base(&self, headers: &HeaderMap) -> String {
        if let Some(url) = &self.public_url {
            return url.clone();
        }
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| valid_host(h))
            .unwrap_or("localhost");
        format!("http://{host}")
    }
}

/// A Host header safe to echo into URLs: host[:port] characters only.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Checks `X-Api-Key` (header names are case-insensitive) and attaches the workspace.
async fn authenticate(State(app): State<Arc<App>>, mut request: Request, next: Next) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let workspace = request
        .headers()
        .get("x-api-key")
        .and_then(|k| k.to_str().ok())
        .and_then(|k| app.workspaces.get(&hash_key(k.trim())))
        .cloned();
    match workspace {
        Some(workspace) => {
            request.extensions_mut().insert(workspace);
            let (method, path) = (request.method().clone(), request.uri().path().to_string());
            let response = next.run(request).await;
            tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
            response
        }
        None => {
            let error = ApiError::Unauthorized("missing or invalid X-Api-Key".into());
            error::reject_after_reading_body(request, error).await
        }
    }
}

/// Control-plane bodies read whole before routing; larger ones (an archive import) stream.
const READ_FIRST_MAX_BYTES: u64 = 1 << 20;

/// Reads a small request body to its end before the handler runs. A handler that answers
/// without reading the body (stop and start ignore their `{}`) would otherwise leave bytes
/// unread when the client sends the body in a second write, and hyper then closes the
/// keep-alive connection after the response: a pooled client's next request on it fails with
/// "Server disconnected without sending a response".
async fn read_small_body_first(request: Request, next: Next) -> Response {
    let small = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| length <= READ_FIRST_MAX_BYTES);
    if !small {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, READ_FIRST_MAX_BYTES as usize).await {
        Ok(bytes) => next.run(Request::from_parts(parts, bytes.into())).await,
        Err(error) => {
            ApiError::Invalid(format!("reading the request body: {error}")).into_response()
        }
    }
}

/// The control-plane routes, mounted under every base prefix (spec §1.1).
fn api_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/boxes", post(control::create).get(control::list))
        .route(
            "/boxes/{name}",
            get(control::get)
                .patch(control::update)
                .delete(control::delete),
        )
        .route("/boxes/{name}/status", get(control::status))
        .route("/boxes/{name}/start", post(control::start))
        .route("/boxes/{name}/stop", post(control::stop))
        .route("/boxes/{name}/snapshot", post(snapshots::routes::capture))
        .route("/boxes/{name}/service-url", post(service_urls::mint))
        .route("/boxes/{name}/download-url", post(download_links::mint))
        .route("/boxes/{name}/egress", get(egress::list_events))
        .route("/secrets", get(egress::list_secrets))
        .route(
            "/secrets/{name}",
            axum::routing::put(egress::put_secret).delete(egress::delete_secret),
        )
        .route(
            "/snapshots",
            get(snapshots::routes::list).post(snapshots::routes::create),
        )
        .route("/snapshots/import", post(snapshots::routes::import))
        .route(
            "/snapshots/{reference}",
            get(snapshots::routes::get).delete(snapshots::routes::delete),
        )
        .route(
            "/snapshots-by-name/{name}",
            get(snapshots::routes::tags_by_name),
        )
        .route(
            "/registries",
            get(registries::list).post(registries::create),
        )
        .route(
            "/registries/{name}",
            get(registries::get)
                .patch(registries::update)
                .delete(registries::delete),
        )
        .route("/templates", get(templates::list).post(templates::create))
        .route(
            "/templates/{name}",
            get(templates::get)
                .patch(templates::update)
                .delete(templates::delete),
        )
        .route(
            "/pools",
            get(pools::routes::list).post(pools::routes::create),
        )
        .route(
            "/pools/{name}",
            get(pools::routes::get)
                .patch(pools::routes::update)
                .delete(pools::routes::delete),
        )
        .layer(axum::middleware::from_fn(read_small_body_first))
}

fn router(app: Arc<App>) -> Router {
    let api = api_routes();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest("/api/v2/sandboxes", api.clone())
        .nest("/v2/sandboxes", api.clone())
        .nest("/api/v1/v2/sandboxes", api)
        .route("/dp/{id}/tunnel", get(tunnel::open))
        .route("/dp/{id}/{*rest}", any(dataplane::forward))
        .fallback(control::fallback)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            authenticate,
        ))
        // Added after the API-key layer, so without it: each carries its own credential.
        .route("/.well-known/jwks.json", get(signing_keys::jwks))
        .route("/svc/{*rest}", any(service_urls::serve_by_path))
        .route("/dl/{token}", any(download_links::serve))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            service_urls::route_by_host,
        ))
        .with_state(app)
}

fn check_public_url(url: Option<String>) -> Result<Option<String>, ServerError> {
    let Some(url) = url else { return Ok(None) };
    let trimmed = url.trim_end_matches('/').to_string();
    let ok = (trimmed.starts_with("http://") || trimmed.starts_with("https://"))
        && !trimmed.contains(['?', '#'])
        && trimmed.parse::<http::Uri>().is_ok();
    if ok {
        Ok(Some(trimmed))
    } else {
        Err(ServerError::PublicUrl(url))
    }
}

/// How long a shutdown waits for HTTP requests in flight (a long `POST /execute`, an SSE
/// stream) before exiting anyway; their commands go on in the sandbox.
const DRAIN_REQUESTS_WITHIN: Duration = Duration::from_secs(5);
/// How long a shutdown waits for the WebSockets to take their close frames.
const CLOSE_WEBSOCKETS_WITHIN: Duration = Duration::from_secs(5);

/// Opens the store, re-adopts the runtime's sandboxes, starts the lifecycle task and serves
/// until SIGTERM or SIGINT (see [`serve_until`]).
pub async fn serve(config: ServerConfig, runtime: Arc<dyn Runtime>) -> Result<(), ServerError> {
    let signals = termination_signal().map_err(ServerError::Serve)?;
    serve_until(config, runtime, signals).await
}

/// Resolves on the first SIGTERM or SIGINT.
fn termination_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

/// As [`serve`], until `shutdown` resolves: then it stops accepting, closes every attached
/// data-plane WebSocket with 1001 (clients reattach to their commands), gives requests in
/// flight a few seconds and returns. Sandboxes and their commands keep running; the next
/// server re-adopts them.
pub async fn serve_until(
    config: ServerConfig,
    runtime: Arc<dyn Runtime>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if config.api_keys.is_empty() {
        return Err(ServerError::NoApiKeys);
    }
    let public_url = check_public_url(config.public_url)?;
    let links = config.service_links;
    let service_domain = match links.service_domain {
        Some(domain) => Some(
            service_urls::check_service_domain(&domain)
                .ok_or(ServerError::ServiceDomain(domain))?,
        ),
        None => None,
    };
    let signing_keys = signing_keys::SigningKeys::load_or_create(
        &config.data_dir.join("signing-keys.json"),
        links.key_rotation,
    )?;
    let download_secret =
        download_links::LinkSecret::load_or_create(&config.data_dir.join("download-links.key"))?;
    let store = Arc::new(store::Store::open(&config.data_dir.join("cordon.db"))?);
    let layers = Arc::new(LayerStore::open(config.data_dir.join("layers"))?);
    let reclaim_wanted = Arc::new(tokio::sync::Notify::new());
    let mut sandboxes = sandboxes::Sandboxes::new(
        store.clone(),
        runtime,
        config.snapshot,
        layers.clone(),
        reclaim_wanted.clone(),
    );
    sandboxes.default_runtime = config.default_runtime;
    if config.egress.enabled {
        let egress = egress::Egress::start(&config.egress, &config.data_dir, store.clone())
            .map_err(ServerError::Egress)?;
        sandboxes.egress = Some(egress);
    }
    let sandboxes = Arc::new(sandboxes);
    sandboxes
        .reconcile()
        .await
        .map_err(ServerError::Reconcile)?;
    let snapshots = Arc::new(snapshots::Snapshots::new(snapshots::SnapshotsConfig {
        store: store.clone(),
        layers,
        sandboxes: sandboxes.clone(),
        sealing: secret_sealing::SealingKey::load_or_create(&config.data_dir.join("secret.key"))?,
        limits: config.snapshot_limits,
        registry: config.registry,
        imports_dir: private_dir(&config.data_dir.join("imports"))?,
        reclaim_wanted,
    }));
    snapshots
        .resume_builds()
        .await
        .map_err(ServerError::Reconcile)?;
    let reclaimer = tokio::spawn(snapshots.clone().reclaim_unused_layers_forever());
    let workspaces = config
        .api_keys
        .iter()
        .map(|key| {
            let hash = hash_key(key);
            let name: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
            (hash, Workspace(name))
        })
        .collect();
    let lifecycle = tokio::spawn(lifecycle::run(sandboxes.clone(), config.lifecycle_tick));
    let pools = Arc::new(pools::Pools::new(
        store.clone(),
        sandboxes.clone(),
        snapshots.clone(),
        config.pools,
        config.max_sandboxes_per_workspace,
    ));
    let pool_task = tokio::spawn(pools.clone().run());
    let going_away = CancellationToken::new();
    let app = Arc::new(App {
        store,
        sandboxes,
        snapshots,
        pools,
        workspaces,
        public_url,
        max_sandboxes_per_workspace: config.max_sandboxes_per_workspace,
        shutdown: Shutdown {
            going_away: going_away.clone(),
            upgrades: TaskTracker::new(),
        },
        signing_keys,
        download_secret,
        service_domain,
        tunnels: tunnel::TunnelSlots::default(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!(%addr, "cordon serve listening");
    tokio::spawn({
        let going_away = going_away.clone();
        async move {
            shutdown.await;
            going_away.cancel();
        }
    });
    let served = serve_http(listener, router(app.clone()), going_away).await;
    lifecycle.abort();
    pool_task.abort();
    reclaimer.abort();
    close_websockets(&app.shutdown).await;
    tracing::info!("cordon serve stopped; sandboxes keep running");
    served
}

/// Creates (0700) a host-only directory under the data dir.
fn private_dir(path: &std::path::Path) -> Result<PathBuf, ServerError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ServerError::DataDir {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(path.to_path_buf())
}

/// Serves HTTP until `going_away`, then drains requests in flight for a bounded time.
async fn serve_http(
    listener: tokio::net::TcpListener,
    router: Router,
    going_away: CancellationToken,
) -> Result<(), ServerError> {
    let serving = axum::serve(listener, router)
        .with_graceful_shutdown(going_away.clone().cancelled_owned())
        .into_future();
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => return served.map_err(ServerError::Serve),
        () = going_away.cancelled() => {}
    }
    match tokio::time::timeout(DRAIN_REQUESTS_WITHIN, serving).await {
        Ok(served) => served.map_err(ServerError::Serve),
        Err(_) => {
            tracing::warn!("requests still in flight; exiting without them");
            Ok(())
        }
    }
}

/// Waits (bounded) for every spliced WebSocket, told by `going_away`, to close.
async fn close_websockets(shutdown: &Shutdown) {
    shutdown.upgrades.close();
    if tokio::time::timeout(CLOSE_WEBSOCKETS_WITHIN, shutdown.upgrades.wait())
        .await
        .is_err()
    {
        tracing::warn!("WebSockets still open; exiting without them");
    }
}
