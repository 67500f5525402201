//! The data-plane router: `/dp/{id}/{*rest}` → the sandbox's agent (spec §3).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use hyper_util::rt::TokioIo;

use cordon_channel::AgentClient;

use crate::error::{reject_after_reading_body, ApiError};
use crate::forwarding::{strip_hop_by_hop, wants_upgrade};
use crate::{splice, App, Workspace};

/// Never forwarded to the agent besides the hop-by-hop headers: our credential, and the
/// client's Host (the agent is addressed as `agent`).
const NOT_FOR_THE_AGENT: [HeaderName; 2] = [header::HOST, HeaderName::from_static("x-api-key")];
/// Any method on `/dp/{id}/{*rest}`.
pub async fn forward(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    request: Request,
) -> Response {
    match forward_inner(app, workspace, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward_inner(
    app: Arc<App>,
    workspace: Workspace,
    mut request: Request,
) -> Result<Response, ApiError> {
    let (id, target, client) = match route(&app, &workspace, request.uri()).await {
        Ok(routed) => routed,
        Err(error) => return Ok(reject_after_reading_body(request, error).await),
    };
    let client_upgrade = wants_upgrade(request.headers())
        .then(|| {
            request
                .extensions_mut()
                .remove::<hyper::upgrade::OnUpgrade>()
        })
        .flatten();
    let upstream = upstream_request(request, &target, client_upgrade.is_some())?;
    let mut response = client
        .request(upstream)
        .await
        .map_err(|e| ApiError::AgentUnreachable(e.to_string()))?;
    match client_upgrade {
        Some(client_side) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let agent_side = hyper::upgrade::on(&mut response);
            splice_upgraded(app, id, client_side, agent_side);
            let (parts, _) = response.into_parts();
            Ok(Response::from_parts(parts, Body::empty()))
        }
        _ => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            Ok(Response::from_parts(parts, Body::new(body)))
        }
    }
}

/// The sandbox id and agent path a data-plane URI names, and that sandbox's ready agent.
async fn route(
    app: &Arc<App>,
    workspace: &Workspace,
    uri: &http::Uri,
) -> Result<(String, String, AgentClient), ApiError> {
    let (id, target) = split_target(uri)?;
    if is_control_path(&target) {
        return Err(ApiError::NotFound("not found".into()));
    }
    let client = ready_agent(app, Some(workspace), &id).await?;
    Ok((id, target, client))
}

/// The agent of the workspace's sandbox `id`, booting it first when it is not running
/// (spec §3.1: clients never check the status before using the data plane). `None` for the
/// workspace: any sandbox, for callers that authorized the request otherwise (`port_forward`).
pub(crate) async fn ready_agent(
    app: &App,
    workspace: Option<&Workspace>,
    id: &str,
) -> Result<AgentClient, ApiError> {
    let find = || -> Result<_, ApiError> {
        app.sandboxes
            .store
            .get_by_id(id)?
            .filter(|r| workspace.is_none_or(|w| r.workspace == w.0))
            .ok_or_else(|| ApiError::NotFound(format!("Sandbox '{id}' not found")))
    };
    let record = find()?;
    // A sandbox can die on its own (OOM, a crash of its init); boot it again rather than
    // answer from a dead channel.
    app.sandboxes.notice_if_dead(id).await;
    app.sandboxes.ensure_ready(&find()?).await?;
    app.sandboxes.touch(&record.id);
    match app.sandboxes.agent(id).await {
        Ok(client) => Ok(client),
        Err(_) => {
            // It may have died since the store last heard of it: boot it once more.
            app.sandboxes.notice_if_dead(id).await;
            app.sandboxes.ensure_ready(&find()?).await?;
            app.sandboxes.agent(id).await
        }
    }
}

/// The sandbox id and the agent path (with query) from the raw `/dp/{id}/{rest}` URI.
fn split_target(uri: &http::Uri) -> Result<(String, String), ApiError> {
    let not_found = || ApiError::NotFound("not found".into());
    let rest = uri.path().strip_prefix("/dp/").ok_or_else(not_found)?;
    let (id, path) = rest.split_once('/').ok_or_else(not_found)?;
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok((id.to_string(), format!("/{path}{query}")))
}

/// True for the agent's host-only routes, however the path is spelled.
fn is_control_path(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or_default();
    let decoded = percent_decode(path).to_ascii_lowercase();
    let trimmed = decoded.trim_start_matches('/');
    trimmed.starts_with(cordon_api::agent::CONTROL_PREFIX.trim_start_matches('/'))
        || trimmed.starts_with("_cordon")
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The client's request re-addressed to the agent, body streamed through.
fn upstream_request(
    request: Request,
    target: &str,
    upgrade: bool,
) -> Result<http::Request<Body>, ApiError> {
    let (parts, body) = request.into_parts();
    let mut builder = http::Request::builder()
        .method(parts.method)
        .uri(target)
        .header(header::HOST, "agent");
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, upgrade);
    for name in NOT_FOR_THE_AGENT {
        headers.remove(name);
    }
    if let Some(map) = builder.headers_mut() {
        map.extend(headers);
    }
    builder
        .body(body)
        .map_err(|e| ApiError::Invalid(e.to_string()))
}

/// Splices the client's upgraded connection with the sandbox side's (the agent's, or an app's
/// behind a service URL) until both end or the server shuts down (then the client gets a close
/// frame; see `splice`). The sandbox counts as active meanwhile.
pub(crate) fn splice_upgraded(
    app: Arc<App>,
    id: String,
    client_side: hyper::upgrade::OnUpgrade,
    agent_side: hyper::upgrade::OnUpgrade,
) {
    let going_away = app.shutdown.going_away.clone();
    let upgrades = app.shutdown.upgrades.clone();
    upgrades.spawn(async move {
        let (client, agent) = match tokio::try_join!(client_side, agent_side) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "upgrade failed");
                return;
            }
        };
        app.sandboxes.connection_opened(&id, true);
        splice::splice(TokioIo::new(client), TokioIo::new(agent), going_away).await;
        tracing::debug!(sandbox = %id, "upgraded connection ended");
        app.sandboxes.connection_opened(&id, false);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_paths_are_recognised_however_spelled() {
        for path in [
            "/_cordon/config",
            "/%5Fcordon/health",
            "/_CORDON/x",
            "//_cordon/config",
        ] {
            assert!(is_control_path(path), "{path}");
        }
        assert!(!is_control_path("/execute/ws"));
        assert!(!is_control_path("/download?path=/_cordon/x"));
    }

    #[test]
    fn splits_the_target() {
        let uri: http::Uri = "/dp/abc/download?path=%2Ftmp%2Fx".parse().unwrap();
        let (id, target) = split_target(&uri).unwrap();
        assert_eq!(id, "abc");
        assert_eq!(target, "/download?path=%2Ftmp%2Fx");
    }
}
