//! The agent's one HTTP router, served on every channel stream.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use cordon_api::agent::{AgentConfig, AgentHealth, EGRESS_SESSION_PATH};
use cordon_api::error::kinds;
use http::StatusCode;

use crate::config::ConfigStore;
use crate::exec::error_response;

/// State shared by every route.
#[derive(Clone)]
pub struct AppState {
    pub config: ConfigStore,
    pub commands: crate::exec::Registry,
    /// The microVM guest's disk and power controls; `None` in a namespace sandbox.
    pub vm: Option<std::sync::Arc<crate::vm_control::VmControl>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/_cordon/config", put(put_config))
        .route("/_cordon/health", get(health))
        .route(EGRESS_SESSION_PATH, put(attach_egress_session))
        .route("/_cordon/connect/{port}", get(crate::connect::connect))
        .merge(crate::exec::routes())
        .merge(crate::files::routes())
        .merge(crate::vm_control::routes())
        .with_state(state)
}

/// `PUT /_cordon/config`: replaces the sandbox-level settings for later commands.
async fn put_config(State(state): State<AppState>, body: Bytes) -> Response {
    let config: AgentConfig = match serde_json::from_slice(&body) {
        Ok(config) => config,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                kinds::INVALID_REQUEST,
                format!("invalid config: {error}"),
            )
        }
    };
    if let Err(error) = config.run_config.validate() {
        return error_response(
            StatusCode::BAD_REQUEST,
            kinds::INVALID_REQUEST,
            error.to_string(),
        );
    }
    if let Some(egress) = &config.egress {
        if let Err(error) = egress.validate() {
            return error_response(
                StatusCode::BAD_REQUEST,
                kinds::INVALID_REQUEST,
                error.to_string(),
            );
        }
        let ca_pem = egress.ca_pem.clone();
        let installed =
            tokio::task::spawn_blocking(move || crate::egress_env::install_trust(&ca_pem)).await;
        if let Ok(Err(error)) | Err(error) = installed.map_err(std::io::Error::other) {
            // The proxy environment still works for plain HTTP and spliced HTTPS.
            tracing::warn!(%error, "cannot install the egress CA in the trust store");
        }
        crate::egress_relay::ensure_started(&state.config.egress_session).await;
    }
    state.config.set(config);
    StatusCode::NO_CONTENT.into_response()
}

/// `PUT /_cordon/egress/session`: the egress relay's streams go over the session this request
/// came on. Only sessions served with an opener can carry them.
async fn attach_egress_session(
    State(state): State<AppState>,
    opener: Option<axum::Extension<cordon_channel::HostOpener>>,
) -> Response {
    let Some(axum::Extension(opener)) = opener else {
        return error_response(
            StatusCode::CONFLICT,
            kinds::INVALID_REQUEST,
            "this channel session cannot carry egress streams".to_string(),
        );
    };
    state.config.egress_session.attach(opener);
    StatusCode::NO_CONTENT.into_response()
}

async fn health(State(state): State<AppState>) -> Json<AgentHealth> {
    Json(AgentHealth {
        version: env!("CARGO_PKG_VERSION").to_string(),
        commands_running: state.commands.running(),
    })
}
