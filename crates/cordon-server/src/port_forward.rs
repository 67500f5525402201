//! TCP connections to ports inside a sandbox, for tunnels (`tunnel`, spec §4) and service URLs
//! (spec §5).
//!
//! [`connect`] wakes a stopped sandbox the way the data plane does (`dataplane::ready_agent`),
//! opens one channel stream to the agent and asks it (`cordon_api::tunnel::connect_path`) to
//! dial `127.0.0.1:{port}` on the sandbox's loopback; the stream then carries the connection's
//! bytes. The allow rule is `cordon_api::tunnel::port_allowed`: every port but 0 and the ports
//! Cordon itself uses inside the sandbox.
//!
//! Callers authorize first: `connect` checks no workspace. Each open connection counts as
//! data-plane activity (the sandbox is not stopped for idleness while one is open) and against
//! [`MAX_CONNECTIONS_PER_SANDBOX`], which keeps port traffic from using up the agent channel's
//! streams that commands and files need.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use cordon_api::tunnel::{self, CONNECT_UPGRADE};
use http::{header, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::sandboxes::Sandboxes;
use crate::{dataplane, App};

/// Most port connections open at once into one sandbox (all tunnels and service URLs
/// together). The agent channel allows 512 streams; the rest stay for commands and files.
pub(crate) const MAX_CONNECTIONS_PER_SANDBOX: usize = 256;
/// How long the agent may take to answer a connect (it bounds its own dial at 5 s).
const AGENT_ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// Why no connection to the port was made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PortError {
    /// The port fails the allow rule (0, or a port Cordon uses inside the sandbox).
    #[error("port {0} is not allowed")]
    NotAllowed(u16),
    /// Nothing accepted a connection on the port (refused, or no answer in time).
    #[error("nothing accepted a connection on port {port}: {reason}")]
    Refused { port: u16, reason: String },
    /// The sandbox cannot take connections: not found, not ready, its agent unreachable, or
    /// too many connections open. The error says which, with its HTTP status.
    #[error(transparent)]
    Unavailable(#[from] ApiError),
}

/// An open TCP connection to a port inside a sandbox. Dropping it closes the connection.
pub(crate) struct PortConnection {
    io: TokioIo<Upgraded>,
    _lease: Lease,
}

/// Connects to `127.0.0.1:{port}` inside sandbox `sandbox_id`, waking the sandbox first if it
/// is stopped. The caller must have authorized access to the sandbox.
pub(crate) async fn connect(
    app: &App,
    sandbox_id: &str,
    port: u16,
) -> Result<PortConnection, PortError> {
    if !tunnel::port_allowed(port) {
        return Err(PortError::NotAllowed(port));
    }
    let slot = Slot::take(sandbox_id).ok_or_else(|| {
        ApiError::Quota(format!(
            "too many connections into sandbox '{sandbox_id}' (at most \
             {MAX_CONNECTIONS_PER_SANDBOX})"
        ))
    })?;
    let agent = dataplane::ready_agent(app, None, sandbox_id).await?;
    let request = http::Request::get(tunnel::connect_path(port))
        .header(header::HOST, "agent")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, CONNECT_UPGRADE)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let unreachable = |e: &dyn std::fmt::Display| ApiError::AgentUnreachable(e.to_string());
    let mut response = tokio::time::timeout(AGENT_ANSWER_WITHIN, agent.request(request))
        .await
        .map_err(|_| ApiError::AgentUnreachable("the agent did not answer the connect".into()))?
        .map_err(|e| unreachable(&e))?;
    match response.status() {
        StatusCode::SWITCHING_PROTOCOLS => {
            let upgraded = hyper::upgrade::on(&mut response)
                .await
                .map_err(|e| unreachable(&e))?;
            Ok(PortConnection {
                io: TokioIo::new(upgraded),
                _lease: Lease::open(app.sandboxes.clone(), slot),
            })
        }
        StatusCode::FORBIDDEN => Err(PortError::NotAllowed(port)),
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => Err(PortError::Refused {
            port,
            reason: agent_message(response).await,
        }),
        other => Err(ApiError::AgentUnreachable(format!(
            "the agent answered the connect with {other}: {}",
            agent_message(response).await
        ))
        .into()),
    }
}

/// The message of the agent's error body, bounded; the agent is inside the sandbox's trust
/// boundary, so its text is only ever logged or quoted, never interpreted.
async fn agent_message(response: http::Response<hyper::body::Incoming>) -> String {
    use http_body_util::BodyExt;
    const MAX_BYTES: usize = 4096;
    let body = http_body_util::Limited::new(response.into_body(), MAX_BYTES);
    let bytes = match tokio::time::timeout(Duration::from_secs(2), body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => return "no readable answer".into(),
    };
    serde_json::from_slice::<cordon_api::ErrorBody>(&bytes)
        .map(|body| body.detail.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

/// A connection's claim on its sandbox: an open connection in the sandbox's activity while it
/// lasts, and its [`Slot`].
struct Lease {
    sandboxes: Arc<Sandboxes>,
    slot: Slot,
}

impl Lease {
    fn open(sandboxes: Arc<Sandboxes>, slot: Slot) -> Lease {
        sandboxes.connection_opened(&slot.sandbox_id, true);
        Lease { sandboxes, slot }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.sandboxes
            .connection_opened(&self.slot.sandbox_id, false);
    }
}

/// One of a sandbox's [`MAX_CONNECTIONS_PER_SANDBOX`], held from before the connect until the
/// connection closes.
struct Slot {
    sandbox_id: String,
    permit: Option<OwnedSemaphorePermit>,
}

type Limits = Mutex<HashMap<String, Arc<Semaphore>>>;

/// Per-sandbox connection limits; an entry lives while a slot of its sandbox does.
fn lock_limits() -> std::sync::MutexGuard<'static, HashMap<String, Arc<Semaphore>>> {
    static LIMITS: OnceLock<Limits> = OnceLock::new();
    LIMITS
        .get_or_init(Limits::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Slot {
    fn take(sandbox_id: &str) -> Option<Slot> {
        let mut limits = lock_limits();
        let semaphore = limits
            .entry(sandbox_id.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_SANDBOX)))
            .clone();
        let permit = semaphore.try_acquire_owned().ok();
        let slot = Slot {
            sandbox_id: sandbox_id.to_string(),
            permit,
        };
        // A refused slot still cleans up the entry it may have made (on drop, after the lock).
        drop(limits);
        slot.permit.is_some().then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut limits = lock_limits();
        // Only the map holds the semaphore once no permit does (and `take`, which clones it,
        // runs under the same lock).
        if limits
            .get(&self.sandbox_id)
            .is_some_and(|semaphore| Arc::strong_count(semaphore) == 1)
        {
            limits.remove(&self.sandbox_id);
        }
    }
}

impl AsyncRead for PortConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PortConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Half-closes: the service inside reads EOF and may still answer.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
