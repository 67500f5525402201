//! Service URLs (spec §5.1–5.2, token mode): minting signed tokens for one port of one
//! sandbox, and serving that port over HTTP and WebSocket to whoever holds one.
//!
//! A service is reached path-based at `{public}/svc/{sandbox id}/{port}/…`, or, with a
//! service domain, host-based at `{port}--{sandbox id}.{domain}`. A request authenticates with
//! the `X-Langsmith-Sandbox-Service-Token` header or the `cordon_service_token` cookie, which
//! `browser_url` (token in the query) and `embed_url` (token in the fragment, posted by a small
//! page) set. Tokens are EdDSA JWTs of [`SigningKeys`](crate::signing_keys::SigningKeys) whose
//! audience is the service's host label `{port}--{id}` (path-based) or its full host
//! `{port}--{id}.{domain}` (host-based: what `SandboxTokenVerifier` expects as audience).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hyper_util::rt::TokioIo;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::control::json_object;
use crate::error::{ApiError, FieldError};
use crate::forwarding::{strip_hop_by_hop, wants_upgrade};
use crate::model::now_secs;
use crate::port_forward::PortError;
use crate::signing_keys::{TokenError, MAX_TOKEN_LIFETIME};
use crate::validate::Fields;
use crate::{dataplane, App, Workspace};

/// The request header the official clients send the token in (spec §5.1).
pub const TOKEN_HEADER: &str = "x-langsmith-sandbox-service-token";
/// The cookie `browser_url` and `embed_url` set.
pub const COOKIE_NAME: &str = "cordon_service_token";
/// The query parameter of `browser_url`.
pub const TOKEN_PARAM: &str = "cordon_service_token";
/// Cordon's own pages inside every service (the embed flow); the app never sees these paths.
const EMBED_PAGE: &str = ".cordon/embed";
const EMBED_SESSION: &str = ".cordon/session";
/// Headers describing the caller's identity that only Cordon may set (spec §5.1).
const IDENTITY_HEADER_PREFIX: &str = "x-langsmith-user-";
const DEFAULT_EXPIRES_IN: u64 = 600;
const MAX_EMBED_ORIGINS: usize = 5;
const MAX_ORIGIN_BYTES: usize = 255;
/// How long the proxied app has to answer the request line and headers.
const APP_HEADERS_WITHIN: Duration = Duration::from_secs(300);
/// Inbound headers dropped before the app sees the request: our credentials, and forwarding
/// headers only Cordon may set.
const NEVER_FORWARDED: &[&str] = &[
    TOKEN_HEADER,
    "x-api-key",
    "host",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-prefix",
];

/// How service URLs are served (`--service-domain`) and signing keys rotate
/// (`--signing-key-rotation`).
#[derive(Debug, Clone)]
pub struct ServiceLinksConfig {
    /// `host[:port]` under which `{port}--{sandbox id}.{domain}` names each service; path-based
    /// URLs under `{public}/svc/` when absent.
    pub service_domain: Option<String>,
    /// Age at which a new signing key takes over.
    pub key_rotation: Duration,
}

impl Default for ServiceLinksConfig {
    fn default() -> Self {
        ServiceLinksConfig {
            service_domain: None,
            key_rotation: crate::signing_keys::DEFAULT_ROTATION,
        }
    }
}

/// A valid `--service-domain`: DNS name characters, an optional port, lower-cased.
pub fn check_service_domain(domain: &str) -> Option<String> {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let (host, port) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain.as_str(), None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 200
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    (host_ok && port_ok).then_some(domain)
}

/// `YYYY-MM-DDTHH:MM:SSZ`, which every client parses (spec §5.1).
pub fn expires_at(unix_secs: u64) -> String {
    let full = crate::model::iso8601(unix_secs * 1000);
    format!("{}Z", &full[..19])
}

/// What a service token says.
#[derive(Debug, Serialize, Deserialize)]
struct ServiceClaims {
    iss: String,
    aud: String,
    /// The sandbox id.
    sub: String,
    iat: u64,
    exp: u64,
    jti: String,
    port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    embed_origins: Vec<String>,
}

/// One service: a port of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Service {
    id: String,
    port: u16,
}

impl Service {
    /// `{port}--{id}`: the host label of host-based URLs and the audience of path-based ones.
    fn label(&self) -> String {
        format!("{}--{}", self.port, self.id)
    }

    fn audiences(&self, domain: Option<&str>) -> Vec<String> {
        let mut audiences = vec![self.label()];
        audiences.extend(domain.map(|d| format!("{}.{d}", self.label())));
        audiences
    }
}

/// A validated mint request.
struct MintRequest {
    port: u16,
    expires_in: u64,
    embed_origins: Vec<String>,
}

fn parse_mint(body: &[u8]) -> Result<MintRequest, ApiError> {
    let object = json_object(body)?;
    let mut f = Fields::new(&object);
    let port = f.uint("port", 65_535);
    let expires_in = f.uint("expires_in_seconds", MAX_TOKEN_LIFETIME.as_secs());
    let access = f.string("access");
    let origins = object.get("embed_origins").filter(|v| !v.is_null());
    let mut fail = |field: &str, msg: &str| f.errors.push(FieldError::value(field, msg));
    match (object.get("port"), port) {
        (None | Some(Value::Null), _) => fail("port", "Field required"),
        (_, Some(0)) => fail("port", "Value error, must be from 1 to 65535"),
        _ => {}
    }
    if expires_in == Some(0) {
        fail("expires_in_seconds", "Value error, must be from 1 to 86400");
    }
    let embed_origins = match origins.map(parse_origins) {
        None => Vec::new(),
        Some(Ok(origins)) => origins,
        Some(Err(msg)) => {
            fail("embed_origins", &msg);
            Vec::new()
        }
    };
    if !f.errors.is_empty() {
        return Err(ApiError::Validation(f.errors));
    }
    if access.as_deref().is_some_and(|a| a != "off") {
        return Err(ApiError::Invalid(
            "LangSmith-login service URLs (access) are not supported; omit access for a token URL"
                .into(),
        ));
    }
    Ok(MintRequest {
        port: port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0),
        expires_in: expires_in.unwrap_or(DEFAULT_EXPIRES_IN),
        embed_origins,
    })
}

/// At most five origins, each `https://host[:port]` (`http` only for loopback), normalised.
fn parse_origins(value: &Value) -> Result<Vec<String>, String> {
    let list = value
        .as_array()
        .ok_or("Input should be a valid list of origins")?;
    if list.len() > MAX_EMBED_ORIGINS {
        return Err(format!("Value error, at most {MAX_EMBED_ORIGINS} origins"));
    }
    let mut origins = Vec::new();
    for item in list {
        let origin = item
            .as_str()
            .and_then(normalise_origin)
            .ok_or_else(|| format!("Value error, not an https://host[:port] origin: {item}"))?;
        if !origins.contains(&origin) {
            origins.push(origin);
        }
    }
    Ok(origins)
}

fn normalise_origin(origin: &str) -> Option<String> {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if origin.len() > MAX_ORIGIN_BYTES {
        return None;
    }
    let (scheme, authority) = origin.split_once("://")?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            (host, Some(port))
        }
        _ => (authority, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    let loopback = matches!(host, "localhost" | "127.0.0.1" | "[::1]");
    let scheme_ok = scheme == "https" || (scheme == "http" && loopback);
    (host_ok && port_ok && scheme_ok).then_some(origin)
}

/// `POST {base}/boxes/{name}/service-url`.
pub async fn mint(
    State(app): State<Arc<App>>,
    Extension(workspace): Extension<Workspace>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = parse_mint(&body)?;
    let record = app
        .sandboxes
        .store
        .find(&workspace.0, &name)?
        .ok_or_else(|| ApiError::NotFound(format!("Sandbox '{name}' not found")))?;
    let service = Service {
        id: record.id,
        port: request.port,
    };
    let public = app.public_base(&headers);
    let domain = app.service_domain.as_deref();
    let base = service_base_url(&public, domain, &service);
    let now = now_secs();
    let claims = ServiceClaims {
        iss: public,
        aud: service.audiences(domain).pop().unwrap_or_default(),
        sub: service.id.clone(),
        iat: now,
        exp: now + request.expires_in,
        jti: uuid::Uuid::new_v4().to_string(),
        port: service.port,
        embed_origins: request.embed_origins,
    };
    let token = app
        .signing_keys
        .sign(&claims)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut answer = json!({
        "browser_url": format!("{base}?{TOKEN_PARAM}={token}"),
        "service_url": base,
        "token": token,
        "expires_at": expires_at(claims.exp),
        "embed_url": format!("{base}{EMBED_PAGE}#token={token}"),
    });
    if !claims.embed_origins.is_empty() {
        answer["embed_origins"] = json!(claims.embed_origins);
    }
    Ok(Json(answer).into_response())
}

/// The service's root URL, with a trailing slash.
fn service_base_url(public: &str, domain: Option<&str>, service: &Service) -> String {
    match domain {
        Some(domain) => {
            let scheme = if public.starts_with("https://") {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}.{domain}/", service.label())
        }
        None => format!("{public}/svc/{}/{}/", service.id, service.port),
    }
}

/// Where a service request came in: the service, its path prefix as the browser sees it,
/// and the rest of the path (with query) as the app sees it.
struct Routed {
    service: Service,
    /// `/…/svc/{id}/{port}` path-based (with `--public-url`'s path), empty host-based.
    prefix: String,
    target: String,
    https: bool,
}

/// Any method on `/svc/{*rest}`: a path-based service request.
pub async fn serve_by_path(State(app): State<Arc<App>>, request: Request) -> Response {
    let public = app.public_base(request.headers());
    let public_path = public
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
        .unwrap_or_default();
    let uri = request.uri().clone();
    let Some((service, rest)) = split_service_path(uri.path()) else {
        return ApiError::NotFound("not found".into()).into_response();
    };
    let prefix = format!("{public_path}/svc/{}/{}", service.id, service.port);
    if rest.is_empty() {
        // `/svc/{id}/{port}`: relative links of the app need the trailing slash.
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        return redirect(&format!("{prefix}/{query}"), None);
    }
    let target = match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let routed = Routed {
        service,
        prefix,
        target,
        https: public.starts_with("https://"),
    };
    serve(app, routed, request).await
}

/// `{id}/{port}` and the rest of the path (empty, or starting with `/`).
fn split_service_path(path: &str) -> Option<(Service, &str)> {
    let rest = path.strip_prefix("/svc/")?;
    let (id, rest) = rest.split_once('/')?;
    let (port, rest) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let service = Service {
        id: valid_id(id)?.to_string(),
        port: port.parse().ok().filter(|p| *p > 0)?,
    };
    Some((service, rest))
}

/// Sandbox ids are UUIDs; anything else names no sandbox.
fn valid_id(id: &str) -> Option<&str> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-');
    ok.then_some(id)
}

/// Outermost middleware: with a service domain, a request whose Host is
/// `{port}--{id}.{domain}` is a service request, whatever its path.
pub async fn route_by_host(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let service = app.service_domain.as_deref().and_then(|domain| {
        let host = request.headers().get(header::HOST)?.to_str().ok()?;
        service_of_host(host, domain)
    });
    let Some(service) = service else {
        return next.run(request).await;
    };
    let target = request
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let routed = Routed {
        service,
        prefix: String::new(),
        target,
        https: app.public_base(request.headers()).starts_with("https://"),
    };
    serve(app, routed, request).await
}

/// The service a Host header names under `domain` (`host[:port]`; without a port in
/// `domain`, the Host's port is not compared).
fn service_of_host(host: &str, domain: &str) -> Option<Service> {
    let host = host.to_ascii_lowercase();
    let split_port = |s: &str| match s.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h.to_string(), Some(p.to_string()))
        }
        _ => (s.to_string(), None),
    };
    let (host_name, host_port) = split_port(&host);
    let (domain_name, domain_port) = split_port(domain);
    if domain_port.is_some() && domain_port != host_port {
        return None;
    }
    let label = host_name.strip_suffix(&format!(".{domain_name}"))?;
    let (port, id) = label.split_once("--")?;
    Some(Service {
        id: valid_id(id)?.to_string(),
        port: port.parse().ok().filter(|p| *p > 0)?,
    })
}

async fn serve(app: Arc<App>, routed: Routed, request: Request) -> Response {
    let path = routed.target.split('?').next().unwrap_or("/");
    let own_page = path.strip_prefix('/').filter(|p| p.starts_with(".cordon/"));
    let result = match own_page {
        Some(EMBED_PAGE) if request.method() == Method::GET => Ok(embed_page(&routed)),
        Some(EMBED_SESSION) if request.method() == Method::POST => {
            start_embed_session(&app, &routed, request).await
        }
        Some(_) => Err(ApiError::NotFound("not found".into())),
        None => match query_token(&routed.target) {
            Some((token, rest)) => start_browser_session(&app, &routed, &token, &rest),
            None => proxy(app, routed, request).await,
        },
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Checks a token for `service`: our signature, not expired, this sandbox and port.
fn verify(app: &App, service: &Service, token: &str) -> Result<ServiceClaims, ApiError> {
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&service.audiences(app.service_domain.as_deref()));
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    // We issued it with our own clock.
    validation.leeway = 0;
    let claims: ServiceClaims = app
        .signing_keys
        .verify(token, &validation)
        .map_err(|error| match error {
            TokenError::Invalid(e) if matches!(e.kind(), ErrorKind::InvalidAudience) => {
                ApiError::Forbidden("this token is for another service".into())
            }
            TokenError::Invalid(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                ApiError::Unauthorized("the service token has expired".into())
            }
            _ => ApiError::Unauthorized("invalid service token".into()),
        })?;
    if claims.sub != service.id || claims.port != service.port {
        return Err(ApiError::Forbidden(
            "this token is for another service".into(),
        ));
    }
    Ok(claims)
}

/// The token of `browser_url`'s query, and the target without it.
fn query_token(target: &str) -> Option<(String, String)> {
    let (path, query) = target.split_once('?')?;
    let mut token = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((TOKEN_PARAM, value)) => {
                token = Some(value.to_string());
                false
            }
            _ => true,
        })
        .collect();
    let rest = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    Some((token?, rest))
}

/// `browser_url`: a valid token becomes a cookie, and the browser goes on without it in the URL.
fn start_browser_session(
    app: &App,
    routed: &Routed,
    token: &str,
    rest: &str,
) -> Result<Response, ApiError> {
    let claims = verify(app, &routed.service, token)?;
    let cookie = session_cookie(routed, token, &claims, false);
    Ok(redirect(
        &browser_location(&routed.prefix, rest),
        Some(cookie),
    ))
}

/// Where `browser_url` sends the browser on: always a path of this origin. With host-based
/// routing the prefix is empty, and a target such as `//evil.com` or `/\evil.com` would
/// otherwise be a network-path reference to another host; its leading run of slashes and
/// backslashes collapses to one `/`.
fn browser_location(prefix: &str, rest: &str) -> String {
    let location = format!("{prefix}{rest}");
    let path = location.trim_start_matches(['/', '\\']);
    format!("/{path}")
}

fn redirect(location: &str, cookie: Option<HeaderValue>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, location);
    }
    if let Some(cookie) = cookie {
        headers.insert(header::SET_COOKIE, cookie);
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// HttpOnly, scoped to the service's path, living as long as the token. Framed (embed)
/// sessions need `SameSite=None`, which browsers take only with `Secure`.
fn session_cookie(
    routed: &Routed,
    token: &str,
    claims: &ServiceClaims,
    framed: bool,
) -> HeaderValue {
    let max_age = claims.exp.saturating_sub(now_secs());
    let same_site = if framed {
        "None; Secure"
    } else if routed.https {
        "Lax; Secure"
    } else {
        "Lax"
    };
    let path = format!("{}/", routed.prefix);
    let cookie = format!(
        "{COOKIE_NAME}={token}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite={same_site}"
    );
    HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static(""))
}

/// The page `embed_url` opens: it posts the fragment's token for a cookie, then goes to the
/// fragment's `redirect` (a path of the service).
fn embed_page(routed: &Routed) -> Response {
    let base = serde_json::to_string(&format!("{}/", routed.prefix)).unwrap_or_default();
    let html = format!(
        r#"<!doctype html><meta charset="utf-8"><title>Opening…</title><body><script>
(async () => {{
  const base = {base};
  const params = new URLSearchParams(location.hash.slice(1));
  let to = params.get("redirect") || "/";
  if (!to.startsWith("/") || to.startsWith("//")) to = "/";
  history.replaceState(null, "", location.pathname);
  const r = await fetch(base + "{EMBED_SESSION}", {{ method: "POST", body: params.get("token") || "", credentials: "same-origin" }});
  if (r.ok) location.replace(base + to.slice(1));
  else document.body.textContent = "This link is invalid or has expired.";
}})();
</script></body>"#
    );
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; connect-src 'self'",
        ),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// `POST {service}/.cordon/session` with the token as the body: the embed page's cookie.
async fn start_embed_session(
    app: &App,
    routed: &Routed,
    request: Request,
) -> Result<Response, ApiError> {
    let body = axum::body::to_bytes(request.into_body(), crate::signing_keys::MAX_TOKEN_BYTES)
        .await
        .map_err(|_| ApiError::TooLarge("token too long".into()))?;
    let token = std::str::from_utf8(&body)
        .map_err(|_| ApiError::Unauthorized("invalid service token".into()))?
        .trim();
    let claims = verify(app, &routed.service, token)?;
    let cookie = session_cookie(routed, token, &claims, true);
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, cookie)],
        [(header::CACHE_CONTROL, "no-store")],
    )
        .into_response())
}

/// The request's token: the header, else our cookie.
fn request_token(headers: &HeaderMap) -> Option<String> {
    if let Some(token) = headers.get(TOKEN_HEADER) {
        return token.to_str().ok().map(|t| t.trim().to_string());
    }
    cookies(headers)
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.to_string())
}

fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
}

/// Authenticates the request and passes it to the app on the sandbox's port.
async fn proxy(app: Arc<App>, routed: Routed, mut request: Request) -> Result<Response, ApiError> {
    let token = request_token(request.headers())
        .ok_or_else(|| ApiError::Unauthorized("missing service token".into()))?;
    let claims = verify(&app, &routed.service, &token)?;
    let Service { id, port } = routed.service.clone();
    let stream = crate::port_forward::connect(&app, &id, port)
        .await
        .map_err(|error| match error {
            PortError::NotAllowed(_) => ApiError::Forbidden(error.to_string()),
            PortError::Refused { .. } => ApiError::AgentUnreachable(error.to_string()),
            PortError::Unavailable(error) => error,
        })?;
    app.sandboxes.touch(&id);
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ApiError::AgentUnreachable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "service connection ended");
        }
    });
    let client_upgrade = wants_upgrade(request.headers())
        .then(|| {
            request
                .extensions_mut()
                .remove::<hyper::upgrade::OnUpgrade>()
        })
        .flatten();
    let upstream = upstream_request(request, &routed, client_upgrade.is_some())?;
    let mut response = tokio::time::timeout(APP_HEADERS_WITHIN, sender.send_request(upstream))
        .await
        .map_err(|_| ApiError::AgentUnreachable(format!("port {port} did not answer")))?
        .map_err(|e| ApiError::AgentUnreachable(format!("port {port}: {e}")))?;
    let frame_ancestors = frame_ancestors(&claims.embed_origins);
    match client_upgrade {
        Some(client_side) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let app_side = hyper::upgrade::on(&mut response);
            dataplane::splice_upgraded(app, id, client_side, app_side);
            let (parts, _) = response.into_parts();
            Ok(Response::from_parts(parts, Body::empty()))
        }
        _ => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            parts
                .headers
                .append(header::CONTENT_SECURITY_POLICY, frame_ancestors);
            Ok(Response::from_parts(parts, Body::new(body)))
        }
    }
}

/// Only Cordon's own pages and the token's embed origins may frame the service. An extra CSP
/// header can only narrow what the app's own policy allows.
fn frame_ancestors(origins: &[String]) -> HeaderValue {
    let mut policy = String::from("frame-ancestors 'self'");
    for origin in origins {
        policy.push(' ');
        policy.push_str(origin);
    }
    HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("frame-ancestors 'self'"))
}

/// The request as the app sees it: its own path, `Host: localhost:{port}` (what development
/// servers accept), `X-Forwarded-*` describing the real request, and none of the caller's
/// credentials or identity headers.
fn upstream_request(
    request: Request,
    routed: &Routed,
    upgrade: bool,
) -> Result<http::Request<Body>, ApiError> {
    let (parts, body) = request.into_parts();
    let mut headers = parts.headers;
    let original_host = headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut headers, upgrade);
    for name in NEVER_FORWARDED {
        headers.remove(*name);
    }
    let identity: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with(IDENTITY_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in identity {
        headers.remove(name);
    }
    remove_our_cookie(&mut headers);
    let port = routed.service.port;
    let host = HeaderValue::from_str(&format!("localhost:{port}"))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    headers.insert(header::HOST, host);
    if let Some(original) = original_host {
        headers.insert("x-forwarded-host", original);
    }
    let proto = if routed.https { "https" } else { "http" };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if !routed.prefix.is_empty() {
        if let Ok(prefix) = HeaderValue::from_str(&routed.prefix) {
            headers.insert("x-forwarded-prefix", prefix);
        }
    }
    let mut upstream = http::Request::builder()
        .method(parts.method)
        .uri(routed.target.as_str())
        .version(http::Version::HTTP_11)
        .body(body)
        .map_err(|_| ApiError::Invalid("not a valid request target".into()))?;
    *upstream.headers_mut() = headers;
    Ok(upstream)
}

/// Drops our cookie from `Cookie`, keeping the app's own cookies.
fn remove_our_cookie(headers: &mut HeaderMap) {
    let kept: Vec<String> = cookies(headers)
        .filter(|(name, _)| *name != COOKIE_NAME)
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0b6f3c52-8a4e-4c1e-9d2a-7f0e1b2c3d4e";

    #[test]
    fn browser_locations_stay_on_this_origin() {
        for (prefix, rest, location) in [
            ("", "/", "/"),
            ("", "/a/b?x=1", "/a/b?x=1"),
            ("", "//evil.com", "/evil.com"),
            ("", "/\\evil.com", "/evil.com"),
            ("", "\\/\\evil.com/x", "/evil.com/x"),
            ("", "", "/"),
            ("/svc/x/80", "//evil.com", "/svc/x/80//evil.com"),
            ("/svc/x/80", "/", "/svc/x/80/"),
        ] {
            assert_eq!(browser_location(prefix, rest), location, "{prefix}{rest}");
        }
    }

    #[test]
    fn parses_mint_requests() {
        let parse = |v: Value| parse_mint(v.to_string().as_bytes());
        let ok = parse(json!({"port": 8080})).unwrap();
        assert_eq!((ok.port, ok.expires_in), (8080, DEFAULT_EXPIRES_IN));
        let ok = parse(json!({"port": 1, "expires_in_seconds": 86400,
            "embed_origins": ["https://A.example.com/", "http://localhost:3000"]}))
        .unwrap();
        assert_eq!(
            ok.embed_origins,
            ["https://a.example.com", "http://localhost:3000"]
        );
        for bad in [
            json!({}),
            json!({"port": 0}),
            json!({"port": 65536}),
            json!({"port": "80"}),
            json!({"port": 80, "expires_in_seconds": 0}),
            json!({"port": 80, "expires_in_seconds": 86401}),
            json!({"port": 80, "embed_origins": ["http://example.com"]}),
            json!({"port": 80, "embed_origins": ["https://a.com/path"]}),
            json!({"port": 80, "embed_origins": "https://a.com"}),
            json!({"port": 80, "embed_origins": ["https://a.com", "https://b.com",
                "https://c.com", "https://d.com", "https://e.com", "https://f.com"]}),
        ] {
            assert!(
                matches!(parse(bad.clone()), Err(ApiError::Validation(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(json!({"port": 80, "access": "workspace"})),
            Err(ApiError::Invalid(_))
        ));
    }

    #[test]
    fn routes_paths_and_hosts() {
        let path = format!("/svc/{ID}/8080/a/b");
        let (service, rest) = split_service_path(&path).unwrap();
        assert_eq!(
            (service.id.as_str(), service.port, rest),
            (ID, 8080, "/a/b")
        );
        let path = format!("/svc/{ID}/8080");
        assert_eq!(split_service_path(&path).unwrap().1, "");
        for bad in [
            "/svc/x",
            "/svc/ID/80/",
            "/svc/a/0/",
            "/svc/a/99999/",
            "/svc/a%2F/1/",
        ] {
            assert!(split_service_path(bad).is_none(), "{bad}");
        }
        let service = service_of_host(&format!("8080--{ID}.svc.example.com"), "svc.example.com");
        assert_eq!(service.unwrap().port, 8080);
        let host = format!("8080--{ID}.svc.localhost:9000");
        assert!(service_of_host(&host, "svc.localhost:9000").is_some());
        assert!(service_of_host(&host, "svc.localhost:9001").is_none());
        assert!(service_of_host(&host, "svc.localhost").is_some());
        assert!(service_of_host("svc.example.com", "svc.example.com").is_none());
        assert!(service_of_host(&format!("8080--{ID}.evil.com"), "svc.example.com").is_none());
        assert!(
            service_of_host(&format!("x.8080--{ID}.svc.example.com"), "svc.example.com").is_none()
        );
        assert_eq!(
            check_service_domain("Svc.Example.com:8443").unwrap(),
            "svc.example.com:8443"
        );
        assert!(check_service_domain("a/b").is_none());
        assert!(check_service_domain("a:0").is_none());
    }

    #[test]
    fn takes_the_token_out_of_the_query() {
        let (token, rest) = query_token(&format!("/a?x=1&{TOKEN_PARAM}=t.k.n&y=2")).unwrap();
        assert_eq!((token.as_str(), rest.as_str()), ("t.k.n", "/a?x=1&y=2"));
        let (_, rest) = query_token(&format!("/?{TOKEN_PARAM}=t")).unwrap();
        assert_eq!(rest, "/");
        assert!(query_token("/a?x=1").is_none());
    }

    #[test]
    fn strips_credentials_and_identity_headers() {
        let mut request = Request::new(Body::empty());
        let headers = request.headers_mut();
        for (name, value) in [
            ("host", "cordon.example.com"),
            (TOKEN_HEADER, "t"),
            ("x-api-key", "k"),
            ("X-Langsmith-User-Id", "spoofed"),
            ("x-langsmith-user-email", "spoofed"),
            ("x-forwarded-for", "1.2.3.4"),
            ("cookie", "a=1; cordon_service_token=t; b=2"),
            ("connection", "close, x-private"),
            ("x-private", "p"),
            ("x-app", "kept"),
        ] {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        let routed = Routed {
            service: Service {
                id: ID.into(),
                port: 8080,
            },
            prefix: format!("/svc/{ID}/8080"),
            target: "/x?y".into(),
            https: false,
        };
        let upstream = upstream_request(request, &routed, false).unwrap();
        let h = upstream.headers();
        assert_eq!(h["host"], "localhost:8080");
        assert_eq!(h["x-forwarded-host"], "cordon.example.com");
        assert_eq!(h["cookie"], "a=1; b=2");
        assert_eq!(h["x-app"], "kept");
        for gone in [
            TOKEN_HEADER,
            "x-api-key",
            "x-langsmith-user-id",
            "x-langsmith-user-email",
            "x-forwarded-for",
            "connection",
            "x-private",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(upstream.uri(), "/x?y");
    }

    #[test]
    fn formats_expiry_for_every_client() {
        assert_eq!(expires_at(0), "1970-01-01T00:00:00Z");
        assert_eq!(expires_at(1_767_323_045), "2026-01-02T03:04:05Z");
    }
}
