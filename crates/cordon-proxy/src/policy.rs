//! A sandbox's `proxy_config` compiled into what the proxy checks on every connection and
//! request: access-control patterns, and the rules that add credentials.
//!
//! Access control (spec §6.1 `access_control`):
//! - patterns are an exact name (`api.example.com`), a glob (`*.example.com`: any subdomain,
//!   not the apex), an IP in any spelling, a CIDR (`203.0.113.0/24`), or `~regex` (matched
//!   against the lower-case name or the IP text; anchor it yourself);
//! - a pattern may name a port (`host:port`, `[v6]:port`, `*.example.com:5432`), which then
//!   is the only port it matches. Without one, only the proxy's default ports (80 and 443
//!   unless the operator says otherwise) are reachable: naming a port is how a raw-TCP
//!   CONNECT (a database, SSH) is allowed;
//! - the deny list wins over the allow list; when an allow list is given, a target must match
//!   it (by name, or by every resolved IP for IP/CIDR patterns);
//! - none of this ever reaches an internal address: those are refused after resolving, unless
//!   the operator allows a CIDR.

use std::net::IpAddr;
use std::sync::Arc;

use cordon_api::proxy_config::{ProxyConfig, Rule};
use globset::{GlobBuilder, GlobMatcher};
use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use regex::{Regex, RegexBuilder};

use crate::address::{parse_host, Host};
use crate::aws::AwsSigner;
use crate::gcp::GcpCredentials;
use crate::inject::HeaderTemplate;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proxy_config: {0}")]
pub struct PolicyError(pub String);

impl PolicyError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        PolicyError(msg.into())
    }
}

/// Largest compiled regex (bytes of program), so a pattern cannot make compiling costly.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Target {
    Name(String),
    Glob(GlobMatcher),
    Regex(Regex),
    Ip(IpAddr),
    Cidr(IpNet),
}

#[derive(Debug, Clone)]
struct Pattern {
    target: Target,
    port: Option<u16>,
}

impl Pattern {
    fn parse(entry: &str) -> Result<Pattern, PolicyError> {
        let entry = entry.trim();
        let bad = |why: &str| PolicyError::new(format!("access_control pattern {entry:?}: {why}"));
        if let Some(re) = entry.strip_prefix('~') {
            let regex = RegexBuilder::new(re)
                .case_insensitive(true)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| bad(&format!("invalid regex: {e}")))?;
            return Ok(Pattern {
                target: Target::Regex(regex),
                port: None,
            });
        }
        let (host, port) = split_port(entry).map_err(|e| bad(&e))?;
        if host.contains('/') {
            let net: IpNet = host.parse().map_err(|_| bad("invalid CIDR"))?;
            return Ok(Pattern {
                target: Target::Cidr(net.trunc()),
                port,
            });
        }
        if host.contains(['*', '?', '[']) {
            let glob = host_glob(host).map_err(|e| bad(&e))?;
            return Ok(Pattern {
                target: Target::Glob(glob),
                port,
            });
        }
        let target = match parse_host(host) {
            Ok(Host::Ip(ip)) => Target::Ip(ip),
            Ok(Host::Name(n)) => Target::Name(n),
            Err(e) => return Err(bad(&e.to_string())),
        };
        Ok(Pattern { target, port })
    }

    /// Matches the name (or IP literal) the tool asked for.
    fn matches_host(&self, host: &Host, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.target, host) {
            (Target::Name(n), Host::Name(h)) => n == h,
            (Target::Glob(g), Host::Name(h)) => g.is_match(h),
            (Target::Regex(r), h) => r.is_match(&h.match_text()),
            (Target::Ip(ip), Host::Ip(h)) => ip == h,
            (Target::Cidr(net), Host::Ip(h)) => net.contains(h),
            _ => false,
        }
    }

    /// Matches a resolved IP (IP and CIDR patterns only).
    fn matches_ip(&self, ip: IpAddr, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match &self.target {
            Target::Ip(p) => *p == ip,
            Target::Cidr(net) => net.contains(&ip),
            _ => false,
        }
    }

    fn is_ip_pattern(&self) -> bool {
        matches!(self.target, Target::Ip(_) | Target::Cidr(_))
    }
}

/// `host:port`, `[v6]:port`, `[v6]`, a bare IPv6 address or CIDR, or a host without port.
fn split_port(entry: &str) -> Result<(&str, Option<u16>), String> {
    let parse_port = |p: &str| -> Result<Option<u16>, String> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("invalid port {p:?}")),
            Ok(p) => Ok(Some(p)),
        }
    };
    if let Some(rest) = entry.strip_prefix('[') {
        let close = rest.find(']').ok_or("unclosed '['")?;
        let after = &rest[close + 1..];
        let host = &entry[..close + 2];
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, parse_port(p)?)),
            None if after.is_empty() => Ok((host, None)),
            None => Err("junk after ']'".into()),
        };
    }
    match entry.matches(':').count() {
        0 => Ok((entry, None)),
        1 => {
            let (h, p) = entry.split_once(':').unwrap_or((entry, ""));
            Ok((h, parse_port(p)?))
        }
        _ => Ok((entry, None)), // IPv6 address or CIDR
    }
}

fn host_glob(pattern: &str) -> Result<GlobMatcher, String> {
    let lower = pattern.to_ascii_lowercase();
    let lower = lower.strip_suffix('.').unwrap_or(&lower);
    GlobBuilder::new(lower)
        .case_insensitive(true)
        .literal_separator(false)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("invalid glob: {e}"))
}

/// Which hosts a rule applies to (`match_hosts`): exact names, globs, IPs.
#[derive(Debug, Clone)]
enum HostMatch {
    Exact(Host),
    Glob(GlobMatcher),
}

impl HostMatch {
    fn parse(rule: &str, s: &str) -> Result<HostMatch, PolicyError> {
        let bad =
            |why: String| PolicyError::new(format!("rule {rule:?}: match_hosts {s:?}: {why}"));
        if s.contains(['*', '?', '[']) && !s.starts_with('[') {
            return host_glob(s).map(HostMatch::Glob).map_err(bad);
        }
        parse_host(s)
            .map(HostMatch::Exact)
            .map_err(|e| bad(e.to_string()))
    }

    fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (HostMatch::Exact(h), host) => h == host,
            (HostMatch::Glob(g), Host::Name(n)) => g.is_match(n),
            (HostMatch::Glob(_), Host::Ip(_)) => false,
        }
    }
}

/// `match_paths` entries: exact, `/prefix/*` (one more segment), `/prefix/**` (anything
/// below), `*/suffix` (ends with), `*` (everything).
#[derive(Debug, Clone)]
enum PathMatch {
    Any,
    Suffix(String),
    /// The glob, and for `/prefix/**` the prefix itself (`/prefix`), which it also covers.
    Glob(GlobMatcher, Option<String>),
    Exact(String),
}

impl PathMatch {
    fn parse(rule: &str, s: &str) -> Result<PathMatch, PolicyError> {
        if s == "*" || s == "/**" {
            return Ok(PathMatch::Any);
        }
        if let Some(suffix) = s.strip_prefix('*') {
            if suffix.starts_with('/') && !suffix.contains(['*', '?', '[']) {
                return Ok(PathMatch::Suffix(suffix.to_string()));
            }
        }
        if !s.starts_with('/') {
            return Err(PolicyError::new(format!(
                "rule {rule:?}: match_paths {s:?} must start with '/' or be '*' or '*/suffix'"
            )));
        }
        if s.contains(['*', '?', '[']) {
            return GlobBuilder::new(s)
                .literal_separator(true)
                .build()
                .map(|g| {
                    PathMatch::Glob(
                        g.compile_matcher(),
                        s.strip_suffix("/**").map(str::to_string),
                    )
                })
                .map_err(|e| PolicyError::new(format!("rule {rule:?}: match_paths {s:?}: {e}")));
        }
        Ok(PathMatch::Exact(s.to_string()))
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Suffix(s) => path.ends_with(s.as_str()),
            PathMatch::Glob(g, base) => {
                g.is_match(path)
                    || base
                        .as_deref()
                        .is_some_and(|b| path == b || path.strip_prefix(b) == Some("/"))
            }
            PathMatch::Exact(e) => e == path,
        }
    }
}

/// What a matching rule does to a request.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    Headers(Vec<HeaderTemplate>),
    Aws(Arc<AwsSigner>),
    Gcp(Arc<GcpCredentials>),
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub name: String,
    hosts: Vec<HostMatch>,
    paths: Vec<PathMatch>,
    match_headers: Vec<(HeaderName, String)>,
    pub action: Action,
}

impl CompiledRule {
    fn compile(rule: &Rule) -> Result<Option<CompiledRule>, PolicyError> {
        let name = &rule.name;
        let unsupported = |what: &str| {
            Err(PolicyError::new(format!(
                "rule {name:?}: {what} is not supported by Cordon"
            )))
        };
        if rule.rewrite.is_some() {
            return unsupported("rewrite");
        }
        if rule.relay_id.is_some() {
            return unsupported("relay_id");
        }
        let action = match rule.rule_type.as_deref() {
            None | Some("") | Some("headers") | Some("attribution") => {
                let headers = rule
                    .headers
                    .iter()
                    .map(|h| HeaderTemplate::compile(name, h))
                    .collect::<Result<Vec<_>, _>>()?;
                Action::Headers(headers)
            }
            Some("aws") => {
                let Some(aws) = &rule.aws else {
                    return Err(PolicyError::new(format!(
                        "rule {name:?}: type aws needs an aws block"
                    )));
                };
                Action::Aws(Arc::new(AwsSigner::compile(name, aws)?))
            }
            Some("gcp") => {
                let Some(gcp) = &rule.gcp else {
                    return Err(PolicyError::new(format!(
                        "rule {name:?}: type gcp needs a gcp block"
                    )));
                };
                Action::Gcp(Arc::new(GcpCredentials::compile(name, gcp)?))
            }
            Some("azure") => return unsupported("type azure"),
            Some("relay") => return unsupported("type relay"),
            Some(other) => {
                return Err(PolicyError::new(format!(
                    "rule {name:?}: unknown type {other:?}"
                )))
            }
        };
        if !rule.is_enabled() {
            return Ok(None);
        }
        let default_hosts: &[&str] = match &action {
            Action::Aws(_) => &["*.amazonaws.com", "amazonaws.com"],
            Action::Gcp(_) => &["*.googleapis.com"],
            Action::Headers(_) => &[],
        };
        let hosts = if rule.match_hosts.is_empty() {
            default_hosts
                .iter()
                .map(|h| HostMatch::parse(name, h))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            rule.match_hosts
                .iter()
                .map(|h| HostMatch::parse(name, h))
                .collect::<Result<Vec<_>, _>>()?
        };
        if hosts.is_empty() {
            if rule.rule_type.as_deref() == Some("attribution") || rule.headers.is_empty() {
                return Ok(None); // Nothing to do anywhere: env_vars only.
            }
            return Err(PolicyError::new(format!(
                "rule {name:?}: match_hosts is required"
            )));
        }
        let paths = rule
            .match_paths
            .iter()
            .map(|p| PathMatch::parse(name, p))
            .collect::<Result<_, _>>()?;
        let match_headers = rule
            .match_headers
            .iter()
            .map(|mh| {
                let (n, v) = mh.split_once(':').unwrap_or((mh, ""));
                let header = HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes())
                    .map_err(|_| {
                        PolicyError::new(format!("rule {name:?}: match_headers {mh:?}: bad name"))
                    })?;
                Ok((header, v.trim().to_string()))
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Some(CompiledRule {
            name: name.clone(),
            hosts,
            paths,
            match_headers,
            action,
        }))
    }

    fn matches_host(&self, host: &Host) -> bool {
        self.hosts.iter().any(|h| h.matches(host))
    }

    fn matches_request(&self, host: &Host, path: &str, headers: &HeaderMap) -> bool {
        self.matches_host(host)
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
            && self.match_headers.iter().all(|(name, want)| {
                headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| v.trim() == want))
            })
    }
}

/// A sandbox's compiled egress policy. Cheap to share (`Arc`), immutable.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: Option<Vec<Pattern>>,
    deny: Vec<Pattern>,
    rules: Vec<CompiledRule>,
}

impl EgressPolicy {
    /// Checks and compiles a config: patterns parse, rule types are supported, header rules
    /// have hosts, credentials are complete. The error names the offending rule or pattern.
    pub fn compile(config: &ProxyConfig) -> Result<EgressPolicy, PolicyError> {
        config.validate().map_err(|e| PolicyError::new(e.0))?;
        if !config.callbacks.is_empty() {
            return Err(PolicyError::new("callbacks are not supported by Cordon"));
        }
        let ac = config.access_control.as_ref();
        let allow = match ac.and_then(|a| a.allow_list.as_ref()) {
            Some(list) if !list.is_empty() => Some(
                list.iter()
                    .map(|p| Pattern::parse(p))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            _ => None,
        };
        let deny = ac
            .and_then(|a| a.deny_list.as_ref())
            .map(|list| {
                list.iter()
                    .map(|p| Pattern::parse(p))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let mut rules = Vec::new();
        for rule in &config.rules {
            if let Some(compiled) = CompiledRule::compile(rule)? {
                rules.push(compiled);
            }
        }
        if let Some(inject) = config.inject_headers.as_ref().filter(|h| !h.is_empty()) {
            // The template-era form: these headers went to every host.
            let legacy = Rule {
                name: "inject_headers".into(),
                match_hosts: vec!["*".into()],
                headers: inject
                    .iter()
                    .map(|(n, v)| cordon_api::proxy_config::Header {
                        name: n.clone(),
                        secret: cordon_api::proxy_config::SecretValue::plaintext(v.clone()),
                    })
                    .collect(),
                ..Rule::default()
            };
            rules.extend(CompiledRule::compile(&legacy)?);
        }
        Ok(EgressPolicy { allow, deny, rules })
    }

    /// The check made before resolving: the deny list by name, and the allow list when no
    /// IP pattern could still admit the target. `Err` says why.
    pub(crate) fn check_host(
        &self,
        host: &Host,
        port: u16,
        default_ports: &[u16],
    ) -> Result<(), String> {
        if let Some(p) = self.deny.iter().find(|p| p.matches_host(host, port)) {
            return Err(format!(
                "{host}:{port} is in the deny list ({})",
                describe(p)
            ));
        }
        let named_port = |patterns: &[Pattern]| {
            patterns
                .iter()
                .any(|p| p.port == Some(port) && p.matches_host(host, port))
        };
        if let Some(allow) = &self.allow {
            let by_name = allow.iter().any(|p| p.matches_host(host, port));
            if !by_name && !allow.iter().any(Pattern::is_ip_pattern) {
                return Err(format!("{host}:{port} is not in the allow list"));
            }
            if by_name && (port_is_default(port, default_ports) || named_port(allow)) {
                return Ok(());
            }
        }
        if self.allow.is_none() && !port_is_default(port, default_ports) {
            return Err(format!(
                "port {port} is not open by default; an access_control allow_list entry naming it (host:{port}) opens it"
            ));
        }
        Ok(())
    }

    /// The check made on the resolved addresses (after [`check_host`](Self::check_host)).
    pub(crate) fn check_ips(
        &self,
        host: &Host,
        ips: &[IpAddr],
        port: u16,
        default_ports: &[u16],
    ) -> Result<(), String> {
        for ip in ips {
            if let Some(p) = self.deny.iter().find(|p| p.matches_ip(*ip, port)) {
                return Err(format!(
                    "{host} resolves to {ip}, in the deny list ({})",
                    describe(p)
                ));
            }
        }
        let Some(allow) = &self.allow else {
            return Ok(());
        };
        let by_name = allow.iter().any(|p| p.matches_host(host, port));
        let by_ip = !ips.is_empty()
            && ips
                .iter()
                .all(|ip| allow.iter().any(|p| p.matches_ip(*ip, port)));
        if !by_name && !by_ip {
            return Err(format!("{host}:{port} is not in the allow list"));
        }
        let port_named = allow.iter().any(|p| {
            p.port == Some(port)
                && (p.matches_host(host, port) || ips.iter().any(|ip| p.matches_ip(*ip, port)))
        });
        if !port_is_default(port, default_ports) && !port_named {
            return Err(format!(
                "port {port} is not open by default; an access_control allow_list entry naming it (host:{port}) opens it"
            ));
        }
        Ok(())
    }

    /// Whether TLS to this host is terminated (some enabled rule names the host).
    pub(crate) fn intercepts(&self, host: &Host) -> bool {
        self.rules.iter().any(|r| r.matches_host(host))
    }

    /// The rules that apply to one request, in config order.
    pub(crate) fn matching_rules<'a>(
        &'a self,
        host: &'a Host,
        path: &'a str,
        headers: &'a HeaderMap,
    ) -> impl Iterator<Item = &'a CompiledRule> + 'a {
        self.rules
            .iter()
            .filter(move |r| r.matches_request(host, path, headers))
    }
}

fn port_is_default(port: u16, default_ports: &[u16]) -> bool {
    default_ports.is_empty() || default_ports.contains(&port)
}

fn describe(p: &Pattern) -> String {
    let t = match &p.target {
        Target::Name(n) => n.clone(),
        Target::Glob(g) => g.glob().glob().to_string(),
        Target::Regex(r) => format!("~{}", r.as_str()),
        Target::Ip(ip) => ip.to_string(),
        Target::Cidr(n) => n.to_string(),
    };
    match p.port {
        Some(port) => format!("{t}:{port}"),
        None => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(v: serde_json::Value) -> EgressPolicy {
        EgressPolicy::compile(&serde_json::from_value(v).unwrap()).unwrap()
    }
    fn host(s: &str) -> Host {
        parse_host(s).unwrap()
    }
    const PORTS: &[u16] = &[80, 443];

    #[test]
    fn allow_and_deny_lists() {
        let p = policy(json!({"rules": [], "access_control": {
            "allow_list": ["api.example.com", "*.github.com", "~^pkg\\d+\\.test$", "203.0.113.0/24", "db.example.com:5432"],
            "deny_list": ["evil.github.com", "203.0.113.66"]}}));
        assert!(p.check_host(&host("api.example.com"), 443, PORTS).is_ok());
        assert!(p.check_host(&host("API.example.com."), 443, PORTS).is_ok());
        assert!(p.check_host(&host("raw.github.com"), 443, PORTS).is_ok());
        assert!(
            p.check_host(&host("github.com"), 443, PORTS).is_ok(),
            "may still pass by IP"
        );
        assert!(p
            .check_ips(
                &host("github.com"),
                &["1.1.1.1".parse().unwrap()],
                443,
                PORTS
            )
            .is_err());
        assert!(p
            .check_host(&host("evil.github.com"), 443, PORTS)
            .unwrap_err()
            .contains("deny"));
        assert!(p.check_host(&host("pkg12.test"), 443, PORTS).is_ok());
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        assert!(p.check_ips(&host("x.test"), &[ip], 443, PORTS).is_ok());
        // The IPv4-mapped spelling of a denied address is the same address.
        assert!(p
            .check_host(&host("[::ffff:203.0.113.66]"), 443, PORTS)
            .unwrap_err()
            .contains("deny"));
        let bad: IpAddr = "203.0.113.66".parse().unwrap();
        assert!(p
            .check_ips(&host("x.test"), &[ip, bad], 443, PORTS)
            .unwrap_err()
            .contains("deny"));
        // Ports: only the default ones, unless an entry names the port.
        assert!(p
            .check_ips(&host("api.example.com"), &[ip], 22, PORTS)
            .is_err());
        assert!(p.check_host(&host("db.example.com"), 5432, PORTS).is_ok());
        let db: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(p
            .check_ips(&host("db.example.com"), &[db], 5432, PORTS)
            .is_ok());
        assert!(p
            .check_ips(&host("db.example.com"), &[db], 443, PORTS)
            .is_err());
    }

    #[test]
    fn no_lists_means_default_ports_only() {
        let p = EgressPolicy::default();
        assert!(p.check_host(&host("example.com"), 443, PORTS).is_ok());
        assert!(p.check_host(&host("example.com"), 25, PORTS).is_err());
        assert!(p.check_host(&host("example.com"), 25, &[]).is_ok());
    }

    #[test]
    fn rules_match_hosts_paths_and_headers() {
        let p = policy(json!({"rules": [{
            "name": "r", "match_hosts": ["*.example.com"], "match_paths": ["/v1/**", "*/token", "/exact"],
            "match_headers": ["x-tenant: a"],
            "headers": [{"name": "Authorization", "type": "plaintext", "value": "Bearer x"}]}]}));
        let mut h = HeaderMap::new();
        h.insert("x-tenant", "a".parse().unwrap());
        let api = host("api.example.com");
        assert!(p.intercepts(&api));
        assert!(!p.intercepts(&host("example.com")));
        for path in ["/v1/a/b", "/v1", "/oauth/token", "/exact"] {
            assert_eq!(p.matching_rules(&api, path, &h).count(), 1, "{path}");
        }
        for path in ["/v2/a", "/exact/no", "/tokens"] {
            assert_eq!(p.matching_rules(&api, path, &h).count(), 0, "{path}");
        }
        assert_eq!(
            p.matching_rules(&api, "/v1/a", &HeaderMap::new()).count(),
            0
        );
    }

    #[test]
    fn unsupported_and_broken_configs_are_refused() {
        let err = |v: serde_json::Value| {
            EgressPolicy::compile(&serde_json::from_value(v).unwrap())
                .unwrap_err()
                .0
        };
        assert!(err(json!({"rules": [{"name": "a", "type": "aws", "aws": {"role_arn": "arn:aws:iam::1:role/x"}}]}))
            .contains("not supported"));
        assert!(err(
            json!({"rules": [{"name": "a", "type": "azure", "azure": {"tenant_id": "t"}}]})
        )
        .contains("not supported"));
        assert!(err(json!({"rules": [{"name": "a", "type": "gcp", "gcp": {"workload_identity_provider": "p"}}]}))
            .contains("not supported"));
        assert!(err(json!({"access_control": {"allow_list": ["~("]}})).contains("regex"));
        assert!(err(json!({"access_control": {"allow_list": ["10.0.0.0/33"]}})).contains("CIDR"));
        assert!(err(json!({"rules": [{"name": "a", "headers": [{"name": "A", "type": "plaintext", "value": "v"}]}]}))
            .contains("match_hosts"));
    }
}
