//! `cordon serve`: the LangSmith-compatible control plane (sandboxes, snapshots, lifecycle,
//! the SQLite store) and the data-plane router that forwards `/dp/{id}/...` to each sandbox's
//! agent. See ARCHITECTURE.md and the wire contract in `shared/spec/langsmith-sandbox-api.md`.

mod control;
mod dataplane;
mod error;
mod lifecycle;
mod model;
mod sandboxes;
mod splice;
mod store;
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
use axum::response::Response;
use axum::routing::{any, get, post};
use axum::Router;
use cordon_image::PreparedSnapshot;
use cordon_runtime::Runtime;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::ApiError;
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
    #[error("reconciling with the runtime: {0}")]
    Reconcile(ApiError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
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
}

/// A workspace: one per API key, named by a hash of the key so the key is never stored.
#[derive(Debug, Clone)]
pub struct Workspace(pub String);

/// Shared state of every handler.
pub struct App {
    sandboxes: Arc<sandboxes::Sandboxes>,
    /// SHA-256 of each key → its workspace.
    workspaces: HashMap<[u8; 32], Workspace>,
    public_url: Option<String>,
    max_sandboxes_per_workspace: usize,
    shutdown: Shutdown,
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

    fn snapshot_name(&self) -> &str {
        self.sandboxes
            .snapshot
            .name
            .split_once(':')
            .map_or(self.sandboxes.snapshot.name.as_str(), |(name, _)| name)
    }

    fn snapshot_tag(&self) -> &str {
        self.sandboxes
            .snapshot
            .name
            .split_once(':')
            .map_or("latest", |(_, tag)| tag)
    }

    /// Resolves a snapshot reference: UUID, digest, `name` or `name:tag` (spec §2.3.2).
    fn find_snapshot(&self, reference: &str) -> Option<()> {
        let (name, tag) = reference.split_once(':').unwrap_or((reference, "latest"));
        let by_name = name == self.snapshot_name() && tag == self.snapshot_tag();
        let by_id = reference.eq_ignore_ascii_case(&self.sandboxes.snapshot_id)
            || reference == self.sandboxes.snapshot.id;
        (by_name || by_id).then_some(())
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
        .route(
            "/snapshots",
            get(control::list_snapshots).post(control::create_snapshot),
        )
        .route(
            "/snapshots/{reference}",
            get(control::get_snapshot).delete(control::delete_snapshot),
        )
}

fn router(app: Arc<App>) -> Router {
    let api = api_routes();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest("/api/v2/sandboxes", api.clone())
        .nest("/v2/sandboxes", api.clone())
        .nest("/api/v1/v2/sandboxes", api)
        .route("/dp/{id}/{*rest}", any(dataplane::forward))
        .fallback(control::fallback)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            authenticate,
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
    let store = store::Store::open(&config.data_dir.join("cordon.db"))?;
    let sandboxes = Arc::new(sandboxes::Sandboxes::new(store, runtime, config.snapshot));
    sandboxes
        .reconcile()
        .await
        .map_err(ServerError::Reconcile)?;
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
    let going_away = CancellationToken::new();
    let app = Arc::new(App {
        sandboxes,
        workspaces,
        public_url,
        max_sandboxes_per_workspace: config.max_sandboxes_per_workspace,
        shutdown: Shutdown {
            going_away: going_away.clone(),
            upgrades: TaskTracker::new(),
        },
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
    close_websockets(&app.shutdown).await;
    tracing::info!("cordon serve stopped; sandboxes keep running");
    served
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
