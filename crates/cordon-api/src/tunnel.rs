//! TCP into the sandbox: the tunnel's per-stream handshake (spec §4.4) and the agent's
//! host-only connect route that the server uses for tunnels and service URLs.

/// First byte of every tunnel stream: the connect-header version this server speaks.
pub const PROTOCOL_VERSION: u8 = 0x01;

/// The one status byte the server answers a tunnel stream's connect header with (spec §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectStatus {
    Ok = 0x00,
    PortNotAllowed = 0x01,
    DialFailed = 0x02,
    UnsupportedVersion = 0x03,
}

impl ConnectStatus {
    pub fn byte(self) -> u8 {
        self as u8
    }
}

/// Ports inside the sandbox that belong to Cordon itself and are never dialled for a client.
///
/// The agent serves the host only over its inherited channel socket and binds no TCP port, so
/// today the only in-sandbox port Cordon claims is [`EGRESS_RELAY_PORT`], reserved before the
/// relay exists so that adding it can never expose it through a tunnel or a service URL.
pub const RESERVED_PORTS: &[u16] = &[EGRESS_RELAY_PORT];

/// Loopback port of the agent's egress relay to the host proxy (design BRIEF: "egress relay").
pub const EGRESS_RELAY_PORT: u16 = 15001;

/// The allow rule for tunnels and service URLs: every TCP port 1–65535 except port 0 (not a
/// port one can dial) and [`RESERVED_PORTS`].
pub fn port_allowed(port: u16) -> bool {
    port != 0 && !RESERVED_PORTS.contains(&port)
}

/// `GET /_cordon/connect/{port}` with `Connection: upgrade` and `Upgrade:` [`CONNECT_UPGRADE`]:
/// the agent dials `127.0.0.1:{port}` (then `[::1]:{port}`) inside the sandbox and answers
///
/// - `101 Switching Protocols`: connected; the stream is now the TCP connection's bytes;
/// - `403` ([`kinds::PORT_NOT_ALLOWED`]): the port fails [`port_allowed`];
/// - `502` ([`kinds::CONNECTION_REFUSED`]): nothing accepted the connection;
/// - `504` ([`kinds::CONNECT_TIMEOUT`]): no answer within the agent's connect timeout;
/// - `400`: the port is not a number in 0–65535 or the request is no upgrade.
pub fn connect_path(port: u16) -> String {
    format!("{}connect/{port}", crate::agent::CONTROL_PREFIX)
}

/// The `Upgrade` token of [`connect_path`].
pub const CONNECT_UPGRADE: &str = "cordon-tcp";

/// Error kinds of the connect route's answers (in the usual error body).
pub mod kinds {
    pub const PORT_NOT_ALLOWED: &str = "PortNotAllowed";
    pub const CONNECTION_REFUSED: &str = "ConnectionRefused";
    pub const CONNECT_TIMEOUT: &str = "ConnectTimeout";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rule() {
        assert!(!port_allowed(0));
        assert!(!port_allowed(EGRESS_RELAY_PORT));
        for port in [1, 22, 80, 5432, 6379, 15000, 15002, 65535] {
            assert!(port_allowed(port), "{port}");
        }
    }

    #[test]
    fn status_bytes_match_the_spec() {
        assert_eq!(ConnectStatus::Ok.byte(), 0);
        assert_eq!(ConnectStatus::PortNotAllowed.byte(), 1);
        assert_eq!(ConnectStatus::DialFailed.byte(), 2);
        assert_eq!(ConnectStatus::UnsupportedVersion.byte(), 3);
    }

    #[test]
    fn connect_path_is_host_only() {
        assert_eq!(connect_path(6379), "/_cordon/connect/6379");
        assert!(connect_path(1).starts_with(crate::agent::CONTROL_PREFIX));
    }
}
