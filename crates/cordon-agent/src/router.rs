//! The agent's one HTTP router, served on every channel stream.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use cordon_api::agent::{AgentConfig, AgentHealth};
use cordon_api::error::kinds;
use http::StatusCode;

use crate::config::ConfigStore;
use crate::exec::error_response;

/// State shared by every route.
#[derive(Clone)]
pub struct AppState {
    pub config: ConfigStore,
    pub commands: crate::exec::Registry,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/_cordon/config", put(put_config))
        .route("/_cordon/health", get(health))
        .route("/_cordon/connect/{port}", get(crate::connect::connect))
        .merge(crate::exec::routes())
        .merge(crate::files::routes())
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
    state.config.set(config);
    StatusCode::NO_CONTENT.into_response()
}

async fn health(State(state): State<AppState>) -> Json<AgentHealth> {
    Json(AgentHealth {
        version: env!("CARGO_PKG_VERSION").to_string(),
        commands_running: state.commands.running(),
    })
}
