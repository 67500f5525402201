//! `POST /execute` (spec §3.2): run to completion and answer once.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cordon_api::error::kinds;
use cordon_api::exec::{ExecuteRequest, HttpExecuteRequest, HttpExecuteResponse};
use http::StatusCode;

use super::{error_response, Outcome, Session};
use crate::AppState;

/// Exit code reported for a command killed by its timeout, as coreutils `timeout` does.
const TIMEOUT_EXIT_CODE: i64 = 124;

pub async fn execute(State(state): State<AppState>, body: Bytes) -> Response {
    let request: HttpExecuteRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                kinds::INVALID_REQUEST,
                format!("invalid request: {error}"),
            )
        }
    };
    let timeout = request.timeout;
    let exec = as_session_request(request);
    if let Err(message) = exec.command_layer() {
        return error_response(StatusCode::BAD_REQUEST, kinds::INVALID_REQUEST, message);
    }
    let session = match state.commands.execute(&exec, &state.config.get()) {
        Ok(session) => session,
        Err(error) => return error.into_response(),
    };
    let _abandoned = KillOnDrop(&session);
    let outcome = session.finished().await;
    let [stdout, mut stderr] = session.buffered_text();
    let exit_code = match outcome {
        Outcome::Exited(code) => code,
        Outcome::TimedOut => {
            stderr.push_str(&format!(
                "\ncommand timed out after {timeout} seconds and was killed\n"
            ));
            TIMEOUT_EXIT_CODE
        }
    };
    Json(HttpExecuteResponse {
        stdout,
        stderr,
        exit_code,
    })
    .into_response()
}

/// The same command as a session nobody attaches to: stdin closed, no PTY, not kept after it
/// finished, never idle-killed (the HTTP request is the client).
fn as_session_request(request: HttpExecuteRequest) -> ExecuteRequest {
    let mut exec = ExecuteRequest::new(request.command);
    exec.timeout_seconds = request.timeout.max(0);
    exec.shell = request.shell;
    exec.env = request.env;
    exec.cwd = request.cwd;
    exec.run_config = request.run_config;
    exec.idle_timeout_seconds = -1;
    exec.ttl_seconds = 0;
    exec.close_stdin = true;
    exec
}

/// Kills the command if the client gives up on the request before it finished.
struct KillOnDrop<'a>(&'a Session);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.kill();
    }
}
