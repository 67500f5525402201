//! Commands: WebSocket, HTTP and SSE execution over one registry of command sessions.

mod buffer;
mod fd;
mod http_execute;
mod session;
mod spawn;
mod sse;
mod ws;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::routing::{get, post};
use axum::Router;
use cordon_api::agent::AgentConfig;
use cordon_api::error::kinds;
use cordon_api::exec::ExecuteRequest;
use cordon_api::ErrorBody;
use http_body_util::Full;

pub use session::{Attachment, Outcome, Session};

use crate::reaper::Reaper;
use crate::AppState;
use session::Lifecycle;
use spawn::{SpawnError, SpawnPlan};

/// How many expired ids we remember, to answer `SessionExpired` rather than `CommandNotFound`.
const MAX_TOMBSTONES: usize = 4096;
/// Largest `POST /execute*` body: commands of 70 KB and more are normal (spec §3.3.2).
const MAX_REQUEST_BODY: usize = 16 << 20;
/// Longest `command_id` accepted: it is an opaque client string we keep in memory.
const MAX_COMMAND_ID_BYTES: usize = 256;

/// Why a command could not be started or found. Each maps to a spec error type.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("command {0:?} not found")]
    CommandNotFound(String),
    #[error("command {0:?} finished and its session expired")]
    SessionExpired(String),
    #[error("too many commands: {0} are running")]
    TooManyCommands(usize),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

impl ExecError {
    /// The spec's error type for this error (`error_type` / `detail.error`).
    pub fn kind(&self) -> &'static str {
        match self {
            ExecError::InvalidRequest(_) | ExecError::Spawn(SpawnError::InvalidRunConfig(_)) => {
                kinds::INVALID_REQUEST
            }
            ExecError::CommandNotFound(_) => kinds::COMMAND_NOT_FOUND,
            ExecError::SessionExpired(_) => kinds::SESSION_EXPIRED,
            ExecError::TooManyCommands(_) | ExecError::Spawn(_) => kinds::COMMAND_ERROR,
        }
    }

    pub fn status(&self) -> http::StatusCode {
        match self {
            ExecError::CommandNotFound(_) | ExecError::SessionExpired(_) => {
                http::StatusCode::NOT_FOUND
            }
            ExecError::TooManyCommands(_) => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// A spec error response (`{"detail": {"error", "message"}}`).
pub fn error_response(
    status: http::StatusCode,
    kind: &str,
    message: impl Into<String>,
) -> axum::response::Response {
    let body = serde_json::to_vec(&ErrorBody::new(kind, message)).unwrap_or_default();
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::new(Full::from(body)))
        .unwrap_or_default()
}

impl axum::response::IntoResponse for ExecError {
    fn into_response(self) -> axum::response::Response {
        error_response(self.status(), self.kind(), self.to_string())
    }
}

struct Sessions {
    by_id: HashMap<String, Arc<Session>>,
    expired: HashSet<String>,
    expired_order: VecDeque<String>,
}

impl Sessions {
    /// Expires `session` if it is still the one registered under its id (it may have been
    /// expired early and its id reused since).
    fn expire_session(&mut self, session: &Arc<Session>) {
        let current = self.by_id.get(&session.id);
        if current.is_some_and(|current| Arc::ptr_eq(current, session)) {
            self.expire(&session.id);
        }
    }

    fn expire(&mut self, id: &str) {
        if self.by_id.remove(id).is_none() {
            return;
        }
        if self.expired.insert(id.to_string()) {
            self.expired_order.push_back(id.to_string());
        }
        while self.expired_order.len() > MAX_TOMBSTONES {
            if let Some(oldest) = self.expired_order.pop_front() {
                self.expired.remove(&oldest);
            }
        }
    }

    /// Makes room for one more session under a cap of `max` (`AgentConfig::max_commands`, at
    /// least 1), expiring the oldest finished ones as needed (more than one when the cap was
    /// lowered since).
    fn make_room(&mut self, max: u64) -> Result<(), ExecError> {
        let max = usize::try_from(max.max(1)).unwrap_or(usize::MAX);
        while self.by_id.len() >= max {
            let oldest_finished = self
                .by_id
                .values()
                .filter(|session| !session.is_running())
                .min_by_key(|session| session.finished_at())
                .map(|session| session.id.clone());
            match oldest_finished {
                Some(id) => self.expire(&id),
                None => return Err(ExecError::TooManyCommands(max)),
            }
        }
        Ok(())
    }
}

/// Every command session of this sandbox, keyed by `command_id`.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    reaper: Reaper,
    sessions: Mutex<Sessions>,
}

impl Registry {
    /// An empty registry. How many sessions it keeps is `AgentConfig::max_commands` at the
    /// time of each new command.
    pub fn new(reaper: Reaper) -> Self {
        let sessions = Sessions {
            by_id: HashMap::new(),
            expired: HashSet::new(),
            expired_order: VecDeque::new(),
        };
        Registry {
            inner: Arc::new(RegistryInner {
                reaper,
                sessions: Mutex::new(sessions),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Sessions> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commands whose session has not finished yet.
    pub fn running(&self) -> u64 {
        self.lock()
            .by_id
            .values()
            .filter(|session| session.is_running())
            .count() as u64
    }

    /// Get-or-create on `command_id` (spec §3.3.3): the existing command with that id, or a
    /// newly spawned one (under a generated id when the request has none). Callers attach.
    pub fn execute(
        &self,
        request: &ExecuteRequest,
        config: &AgentConfig,
    ) -> Result<Arc<Session>, ExecError> {
        let id = match &request.command_id {
            Some(id) if id.is_empty() || id.len() > MAX_COMMAND_ID_BYTES => {
                return Err(ExecError::InvalidRequest(format!(
                    "command_id must be 1 to {MAX_COMMAND_ID_BYTES} bytes"
                )))
            }
            Some(id) => id.clone(),
            None => uuid::Uuid::now_v7().simple().to_string(),
        };
        if let Some(existing) = self.lock().by_id.get(&id) {
            return Ok(existing.clone());
        }
        let command_layer = request
            .command_layer()
            .map_err(|e| ExecError::InvalidRequest(e.to_string()))?;
        let plan = SpawnPlan {
            shell: request.shell.clone(),
            command: request.command.clone(),
            run_config: command_layer.over(
                &config
                    .run_config
                    .over(&crate::egress_env::env_layer(config.egress.as_ref())),
            ),
            pty: request.pty,
            close_stdin: request.close_stdin,
        };
        let mut sessions = self.lock();
        // Another request with the same id may have spawned it while we were unlocked.
        if let Some(existing) = sessions.by_id.get(&id) {
            return Ok(existing.clone());
        }
        sessions.make_room(config.max_commands)?;
        let spawned = plan.spawn(&self.inner.reaper)?;
        let registry = self.clone();
        let on_expire = move |session: &Arc<Session>| registry.lock().expire_session(session);
        let limits = Lifecycle::from_request(request);
        let session = Session::start(
            id.clone(),
            spawned,
            request.pty,
            limits,
            config.output_buffer_bytes,
            on_expire,
        )
        .map_err(|source| SpawnError::Start {
            shell: request.shell.clone(),
            source,
        })?;
        tracing::info!(command_id = %id, pid = session.pid, "command started");
        sessions.expired.remove(&id);
        sessions.by_id.insert(id, session.clone());
        Ok(session)
    }

    /// Finds a session to reattach to (spec §3.3.4).
    pub fn find(&self, id: &str) -> Result<Arc<Session>, ExecError> {
        let sessions = self.lock();
        match sessions.by_id.get(id) {
            Some(session) => Ok(session.clone()),
            None if sessions.expired.contains(id) => Err(ExecError::SessionExpired(id.to_string())),
            None => Err(ExecError::CommandNotFound(id.to_string())),
        }
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/execute", post(http_execute::execute))
        .route("/execute/ws", get(ws::upgrade))
        .route("/execute/stream/start", post(sse::start))
        .route("/execute/stream/resume", post(sse::resume))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BODY))
}
