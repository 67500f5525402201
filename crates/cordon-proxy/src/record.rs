//! Egress records: one [`EgressEvent`] per attempt (a CONNECT, a plain-HTTP request, or one
//! request inside an intercepted TLS connection), handed to the server's [`EgressRecorder`].
//! Records name injected headers, never their values.

use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Denied,
}

/// How the bytes went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// CONNECT spliced byte for byte (TLS end to end between the tool and the upstream).
    Tunnel,
    /// A request inside a CONNECT whose TLS the proxy terminated to add credentials.
    Intercepted,
    /// An absolute-form `http://` request.
    PlainHttp,
}

/// A header a rule added (its name only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedHeader {
    pub rule: String,
    pub header: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EgressEvent {
    pub sandbox_id: String,
    /// When the attempt started, as RFC 3339 UTC.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub mode: EgressMode,
    /// `CONNECT` for tunnels; the request method otherwise.
    pub method: String,
    /// The host as the tool named it (lower-cased; an IP literal normalised).
    pub host: String,
    pub port: u16,
    /// The IP connected to (absent when refused before resolving or connecting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    /// Path and query, for intercepted and plain-HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The status the tool got (the proxy's own 403/502 on refusal; 200 for an established
    /// tunnel; the upstream's for forwarded requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Bytes from the tool to the upstream (request body, or tunnel bytes).
    pub bytes_up: u64,
    /// Bytes from the upstream to the tool.
    pub bytes_down: u64,
    pub decision: Decision,
    /// Why it was denied (or failed), in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub injected: Vec<InjectedHeader>,
}

/// Where events go; implemented by the server (store them) and by tests. Called on the
/// proxy's tasks: must not block (queue the event and return).
pub trait EgressRecorder: Send + Sync {
    fn record(&self, event: EgressEvent);
}

/// Discards events.
impl EgressRecorder for () {
    fn record(&self, _event: EgressEvent) {}
}

/// Collects events in memory (tests, benchmarks).
impl EgressRecorder for std::sync::Mutex<Vec<EgressEvent>> {
    fn record(&self, event: EgressEvent) {
        if let Ok(mut v) = self.lock() {
            v.push(event);
        }
    }
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let text = OffsetDateTime::from(*t)
            .format(&Rfc3339)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        let t = OffsetDateTime::parse(&text, &Rfc3339).map_err(serde::de::Error::custom)?;
        Ok(t.into())
    }
}
