//! `GET /_cordon/connect/{port}` (host-only): a TCP connection to a port on the sandbox's
//! loopback, handed to the host as the upgraded channel stream. The server builds tunnels and
//! service URLs on it; the wire contract is `cordon_api::tunnel::connect_path`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use axum::extract::{Path, Request};
use axum::response::{IntoResponse, Response};
use cordon_api::error::kinds as error_kinds;
use cordon_api::tunnel::{self, kinds, CONNECT_UPGRADE};
use http::{header, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::exec::error_response;

/// A loopback connect either succeeds or is refused at once; only a full accept backlog makes
/// it wait, and then the host should hear about it rather than hang.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// Copy buffer per direction: large enough that bulk transfers are not syscall-bound.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

pub async fn connect(Path(port): Path<String>, mut request: Request) -> Response {
    let Ok(port) = port.parse::<u16>() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            error_kinds::INVALID_REQUEST,
            format!("invalid port {port:?}"),
        );
    };
    let upgrade = request.extensions_mut().remove::<OnUpgrade>();
    let (Some(upgrade), true) = (upgrade, asks_for_tcp(&request)) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            error_kinds::INVALID_REQUEST,
            format!("connect needs `Connection: upgrade` and `Upgrade: {CONNECT_UPGRADE}`"),
        );
    };
    if !tunnel::port_allowed(port) {
        return error_response(
            StatusCode::FORBIDDEN,
            kinds::PORT_NOT_ALLOWED,
            format!("port {port} is not allowed"),
        );
    }
    let tcp = match dial_loopback(port).await {
        Ok(tcp) => tcp,
        Err(DialError::TimedOut) => {
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                kinds::CONNECT_TIMEOUT,
                format!("port {port}: no answer within {CONNECT_WITHIN:?}"),
            )
        }
        Err(DialError::Failed(error)) => {
            return error_response(
                StatusCode::BAD_GATEWAY,
                kinds::CONNECTION_REFUSED,
                format!("port {port}: {error}"),
            )
        }
    };
    tokio::spawn(relay(upgrade, tcp, port));
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, "upgrade"),
            (header::UPGRADE, CONNECT_UPGRADE),
        ],
    )
        .into_response()
}

fn asks_for_tcp(request: &Request) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        request
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, CONNECT_UPGRADE)
}

enum DialError {
    TimedOut,
    Failed(io::Error),
}

/// `127.0.0.1:port`, else `[::1]:port` (a service bound to IPv6 loopback only).
async fn dial_loopback(port: u16) -> Result<TcpStream, DialError> {
    let dial = async {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => Ok(tcp),
            Err(v4) => TcpStream::connect((Ipv6Addr::LOCALHOST, port))
                .await
                .map_err(|_| v4),
        }
    };
    let tcp = tokio::time::timeout(CONNECT_WITHIN, dial)
        .await
        .map_err(|_| DialError::TimedOut)?
        .map_err(DialError::Failed)?;
    // Tunnelled protocols are often request/response (databases, Redis): no Nagle delay.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Copies both ways until both directions ended; a half-close travels on as a half-close.
async fn relay(upgrade: OnUpgrade, mut tcp: TcpStream, port: u16) {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%error, port, "connect: the host went away before the upgrade");
            return;
        }
    };
    let mut host = TokioIo::new(upgraded);
    let copied = tokio::io::copy_bidirectional_with_sizes(
        &mut host,
        &mut tcp,
        COPY_BUFFER_BYTES,
        COPY_BUFFER_BYTES,
    )
    .await;
    match copied {
        Ok((up, down)) => tracing::debug!(port, up, down, "connect: connection ended"),
        Err(error) => tracing::debug!(port, %error, "connect: connection failed"),
    }
}
