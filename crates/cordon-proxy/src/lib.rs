//! Cordon's egress proxy. Sandboxes have loopback only; every connection a tool makes to
//! `HTTP_PROXY` reaches [`EgressProxy::serve`] as one byte stream. The proxy speaks the HTTP/1.1
//! proxy protocol (CONNECT and absolute-form requests), decides with the sandbox's compiled
//! [`EgressPolicy`] whether the target may be reached, resolves the name once, refuses
//! internal addresses (unless an operator CIDR allows them), connects to exactly the checked
//! IP, and either splices bytes (no rule matches the host) or terminates TLS with a leaf
//! minted under Cordon's CA to add credentials (headers, SigV4, GCP tokens). Every attempt is
//! reported to an [`EgressRecorder`].
//!
//! Redirects are passed to the tool, never followed: the next request is checked afresh.
//! WebSocket upgrades pass (with the handshake's credentials). Not supported: HTTP/2 toward
//! the tool or upstream on intercepted connections (ALPN offers http/1.1), plain (non-TLS)
//! bytes inside a CONNECT to an intercepted host, AWS assumed roles, GCP workload identity,
//! Azure, callbacks, rewrite and relay rules (refused by [`EgressPolicy::compile`]).

mod address;
mod aws;
mod certs;
mod connect;
mod gcp;
mod http;
mod inject;
mod intercept;
mod policy;
mod proxy;
mod record;
mod resolve;

pub use address::{classify_ip, parse_host, Host, HostError};
pub use certs::CertificateAuthority;
pub use inject::SecretResolver;
pub use policy::{EgressPolicy, PolicyError};
pub use proxy::{EgressProxy, Limits, ProxyError, ProxySettings, ResolverSettings, SandboxEgress};
pub use record::{Decision, EgressEvent, EgressMode, EgressRecorder, InjectedHeader};
