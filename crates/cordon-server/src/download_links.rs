//! Download links (spec §5.3): `POST {base}/boxes/{name}/download-url` mints a link
//! `{public}/dl/{token}` that serves one file of one sandbox to anyone holding it, with GET,
//! HEAD and Range, pinned headers and `Content-Security-Policy: sandbox`.
//!
//! The token is a JWT signed HS256 with a server secret (`$DATA/download-links.key`, 0600),
//! not with the rotating Ed25519 keys: only Cordon ever verifies it, and a link that never
//! expires must survive every key rotation. Deleting the secret revokes every link.

use std::path::Path;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::control::json_object;
use crate::error::{ApiError, FieldError};
use crate::validate::Fields;
use crate::{App, Workspace};

/// The audience of every download token, so no other token of ours passes for one.
const AUDIENCE: &str = "cordon-download";
const SECRET_BYTES: usize = 32;
/// Longest path a link may pin (PATH_MAX).
const MAX_PATH_BYTES: usize = 4096;
const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Longest link lifetime: ten years; omit `expires_in_seconds` for one that never expires.
const MAX_EXPIRES_IN: u64 = 10 * 366 * 86_400;
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Request headers passed on to the agent's `/download`; everything else stays here.
const FORWARDED_REQUEST_HEADERS: &[header::HeaderName] = &[
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
];
/// Response headers taken from the agent; the rest are pinned by the link or dropped.
const FORWARDED_RESPONSE_HEADERS: &[header::HeaderName] = &[
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::ACCEPT_RANGES,
    header::ETAG,
    header::LAST_MODIFIED,
];

#[derive(Debug, thiserror::Error)]
#[error("download link secret {path}: {source}")]
pub struct SecretError {
    path: std::path::PathBuf,
    source: std::io::Error,
}

/// The HMAC secret download tokens are signed with.
pub struct LinkSecret(Vec<u8>);

impl LinkSecret {
    /// Reads the secret file, creating it (0600) with fresh random bytes when absent.
    pub fn load_or_create(path: &Path) -> Result<LinkSecret, SecretError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let error = |source| SecretError {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read(path) {
            Ok(secret) if secret.len() == SECRET_BYTES => return Ok(LinkSecret(secret)),
            Ok(_) => {
                let bad = std::io::Error::new(std::io::ErrorKind::InvalidData, "not 32 bytes");
                return Err(error(bad));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(error(e)),
        }
        let mut secret = vec![0u8; SECRET_BYTES];
        getrandom::fill(&mut secret).map_err(|e| error(std::io::Error::other(e.to_string())))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(error)?;
        file.write_all(&secret).map_err(error)?;
        file.sync_all().map_err(error)?;
        Ok(LinkSecret(secret))
    }
}

/// What a link is pinned to.
#[derive(Debug, Serialize, Deserialize)]
struct LinkClaims {
    aud: String,
    /// Sandbox id.
    sub: String,
    path: String,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    jti: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disposition: Option<Disposition>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Disposition {
    Attachment,
    Inline,
}

/// A validated mint request.
struct MintRequest {
    path: String,
    expires_in: Option<u64>,
    content_type: Option<String>,
    disposition: Option<Disposition>,
}

fn parse_mint(body: &[u8]) -> Result<MintRequest, ApiError> {
    let object = json_object(body)?;
    let mut f = Fields::new(&object);
    let path = f.string("path");
    let expires_in = f.uint("expires_in_seconds", MAX_EXPIRES_IN);
    let content_type = f.string("content_type");
    let disposition = f.string("content_disposition");
    let mut fail = |field: &str, msg: &str| f.errors.push(FieldError::value(field, msg));
    match &path {
        None => fail("path", "Field required"),
        Some(p) if !p.starts_with('/') => fail("path", "Value error, must be an absolute path"),
        Some(p) if p.len() > MAX_PATH_BYTES || p.contains('\0') => {
            fail("path", "Value error, not a valid path")
        }
        Some(_) => {}
    }
    if expires_in == Some(0) {
        fail("expires_in_seconds", "Value error, must be at least 1");
    }
    if content_type
        .as_deref()
        .is_some_and(|t| !valid_content_type(t))
    {
        fail("content_type", "Value error, not a valid media type");
    }
    let disposition = match disposition.as_deref() {
        None => None,
        Some("attachment") => Some(Disposition::Attachment),
        Some("inline") => Some(Disposition::Inline),
        Some(_) => {
            fail(
                "content_disposition",
                "Input should be 'attachment' or 'inline'",
            );
            None
        }
    };
    if !f.errors.is_empty() {
        return Err(ApiError::Validation(f.errors));
    }
    Ok(MintRequest {
        path: path.unwrap_or_default(),
        expires_in,
        content_type,
        disposition,
    })
}

/// `type/subtype[; params]` in visible ASCII, usable as a header value.
fn valid_content_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    value.len() <= MAX_CONTENT_TYPE_BYTES
        && value.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
        && essence
            .split_once('/')
            .is_some_and(|(t, s)| token(t) && token(s))
}

/// `POST {base}/boxes/{name}/download-url`.
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
    let now = crate::model::now_secs();
    let claims = LinkClaims {
        aud: AUDIENCE.into(),
        sub: record.id,
        path: request.path,
        iat: now,
        exp: request.expires_in.map(|s| now + s),
        jti: uuid::Uuid::new_v4().to_string(),
        content_type: request.content_type,
        disposition: request.disposition,
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&app.download_secret.0),
    )
    .map_err(|e| ApiError::Internal(format!("signing a download link: {e}")))?;
    let url = format!("{}/dl/{token}", app.public_base(&headers));
    Ok(Json(json!({
        "download_url": url,
        "token": token,
        "expires_at": claims.exp.map(crate::service_urls::expires_at),
    }))
    .into_response())
}

fn verify(secret: &LinkSecret, token: &str) -> Result<LinkClaims, ApiError> {
    let refused = || ApiError::Unauthorized("invalid or expired download link".into());
    if token.len() > MAX_TOKEN_BYTES {
        return Err(refused());
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[AUDIENCE]);
    // `exp` is checked when present; a link minted without one never expires.
    validation.required_spec_claims.clear();
    validation.required_spec_claims.insert("aud".into());
    validation.leeway = 0;
    jsonwebtoken::decode::<LinkClaims>(token, &DecodingKey::from_secret(&secret.0), &validation)
        .map(|data| data.claims)
        .map_err(|_| refused())
}

/// `GET|HEAD {public}/dl/{token}`: no credential but the token.
pub async fn serve(
    State(app): State<Arc<App>>,
    UrlPath(token): UrlPath<String>,
    request: Request,
) -> Response {
    let method = request.method().clone();
    if method != Method::GET && method != Method::HEAD {
        let mut response =
            ApiError::Invalid("download links serve GET and HEAD".into()).into_response();
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match serve_file(&app, &token, method, request.headers()).await {
        Ok(response) => response,
        Err(error) => with_link_headers(error.into_response()),
    }
}

async fn serve_file(
    app: &Arc<App>,
    token: &str,
    method: Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let claims = verify(&app.download_secret, token)?;
    // The token authorizes the request: any workspace's sandbox.
    let agent = crate::dataplane::ready_agent(app, None, &claims.sub).await?;
    let mut upstream = http::Request::builder()
        .method(method)
        .uri(format!("/download?path={}", query_encode(&claims.path)))
        .header(header::HOST, "agent");
    for name in FORWARDED_REQUEST_HEADERS {
        for value in headers.get_all(name) {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream
        .body(Body::empty())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let response = agent
        .request(upstream)
        .await
        .map_err(|e| ApiError::AgentUnreachable(e.to_string()))?;
    let (parts, body) = response.into_parts();
    if !(parts.status.is_success() || parts.status == StatusCode::NOT_MODIFIED) {
        return Ok(with_link_headers(agent_error(&parts, Body::new(body))));
    }
    let mut out = Response::builder().status(parts.status);
    for name in FORWARDED_RESPONSE_HEADERS {
        if let Some(value) = parts.headers.get(name) {
            out = out.header(name, value);
        }
    }
    let content_type = claims
        .content_type
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    out = out.header(header::CONTENT_TYPE, content_type);
    if let Some(disposition) = claims.disposition {
        out = out.header(
            header::CONTENT_DISPOSITION,
            content_disposition(disposition, &claims.path),
        );
    }
    let response = out
        .body(Body::new(body))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(with_link_headers(response))
}

/// The agent's refusal (a missing file, a directory…) as this origin's answer: its status and
/// body only. None of the sandbox's other headers (`Set-Cookie` among them) reach the server's
/// origin; the body is labelled JSON when the agent said so, plain text otherwise.
fn agent_error(parts: &http::response::Parts, body: Body) -> Response {
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    let content_type = if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = Response::new(body);
    *response.status_mut() = parts.status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(length) = parts.headers.get(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, length.clone());
    }
    response
}

/// Headers every link answer carries: whatever the file holds, it runs in no origin.
fn with_link_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The token is in the URL: keep it out of Referer headers and shared caches.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    response
}

/// `attachment; filename="x"; filename*=UTF-8''x` from the path's last component.
fn content_disposition(disposition: Disposition, path: &str) -> HeaderValue {
    let kind = match disposition {
        Disposition::Attachment => "attachment",
        Disposition::Inline => "inline",
    };
    let name = path.rsplit('/').next().unwrap_or_default();
    if name.is_empty() {
        return HeaderValue::from_static(if matches!(disposition, Disposition::Inline) {
            "inline"
        } else {
            "attachment"
        });
    }
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let value = format!(
        "{kind}; filename=\"{ascii}\"; filename*=UTF-8''{}",
        query_encode(name)
    );
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("attachment"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `/`.
fn query_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_errors_keep_only_status_and_body() {
        let upstream = http::Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::SET_COOKIE, "session=x; Path=/")
            .header(header::LOCATION, "https://evil.example/")
            .header("access-control-allow-origin", "*")
            .header(header::CONTENT_TYPE, "text/html")
            .header(header::CONTENT_LENGTH, "9")
            .body(())
            .unwrap();
        let (parts, ()) = upstream.into_parts();
        let response = with_link_headers(agent_error(&parts, Body::from("not found")));
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let mut names: Vec<&str> = response.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "cache-control",
                "content-length",
                "content-security-policy",
                "content-type",
                "referrer-policy",
                "x-content-type-options",
            ]
        );
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }

    fn mint_body(value: serde_json::Value) -> Result<MintRequest, ApiError> {
        parse_mint(value.to_string().as_bytes())
    }

    #[test]
    fn validates_the_mint_request() {
        let ok = mint_body(json!({"path": "/tmp/a b", "expires_in_seconds": 60,
            "content_type": "text/plain; charset=utf-8", "content_disposition": "inline"}))
        .unwrap();
        assert_eq!(ok.path, "/tmp/a b");
        assert_eq!(ok.expires_in, Some(60));
        for bad in [
            json!({}),
            json!({"path": "relative"}),
            json!({"path": "/x", "expires_in_seconds": 0}),
            json!({"path": "/x", "expires_in_seconds": -1}),
            json!({"path": "/x", "content_type": "text/html\r\nx: y"}),
            json!({"path": "/x", "content_type": "nonsense"}),
            json!({"path": "/x", "content_disposition": "evil"}),
            json!({"path": "/x\u{0}y"}),
        ] {
            assert!(
                matches!(mint_body(bad.clone()), Err(ApiError::Validation(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens_verify_only_with_the_secret_and_before_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let secret = LinkSecret::load_or_create(&dir.path().join("k")).unwrap();
        let again = LinkSecret::load_or_create(&dir.path().join("k")).unwrap();
        assert_eq!(secret.0, again.0);
        let other = LinkSecret::load_or_create(&dir.path().join("o")).unwrap();
        let sign = |secret: &LinkSecret, exp: Option<u64>| {
            let claims = LinkClaims {
                aud: AUDIENCE.into(),
                sub: "id".into(),
                path: "/p".into(),
                iat: 0,
                exp,
                jti: "j".into(),
                content_type: None,
                disposition: None,
            };
            let key = EncodingKey::from_secret(&secret.0);
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        let now = crate::model::now_secs();
        assert_eq!(verify(&secret, &sign(&secret, None)).unwrap().path, "/p");
        assert!(verify(&secret, &sign(&secret, Some(now + 60))).is_ok());
        assert!(verify(&secret, &sign(&secret, Some(now - 1))).is_err());
        assert!(verify(&secret, &sign(&other, None)).is_err());
    }

    #[test]
    fn encodes_paths_and_dispositions() {
        assert_eq!(query_encode("/tmp/a b&c=%"), "/tmp/a%20b%26c%3D%25");
        let value = content_disposition(Disposition::Attachment, "/x/r\"é.txt");
        assert_eq!(
            value.to_str().unwrap(),
            "attachment; filename=\"r__.txt\"; filename*=UTF-8''r%22%C3%A9.txt"
        );
    }
}
