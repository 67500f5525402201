//! Service URLs, download links and the JWKS against real sandboxes over real HTTP: a web app
//! (`service_app.py`, Python stdlib) runs inside the sandbox; tokens are verified here
//! independently with the `jsonwebtoken` crate against the published JWKS.
//!
//! Needs root, the static agent (`make agent`) and the default snapshot (`cordon prepare`).

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use common::{raw, Server, KEY, KEY_ROTATION_ENV, SERVICE_DOMAIN_ENV};
use cordon_testkit::TestStateDir;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const APP: &str = include_str!("service_app.py");
const APP_PORT: u16 = 8000;
const TOKEN_HEADER: &str = "x-langsmith-sandbox-service-token";

/// Not a test: the server process of [`Server::start`] (does nothing when run directly).
#[test]
#[ignore]
fn serve_child() {
    common::serve_child_main();
}

/// One request to the server's port with an explicit `Host` (host-based routing).
async fn request_as_host(
    server: &Server,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> (u16, http::HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = sender
        .send_request(request.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, bytes)
}

/// Uploads `service_app.py` and starts it on [`APP_PORT`], detached from the command.
async fn start_app(dataplane_url: &str) {
    let (content_type, body) = common::multipart_file(APP.as_bytes());
    let headers = [
        ("x-api-key", KEY.to_string()),
        ("content-type", content_type),
    ];
    let upload = format!("{dataplane_url}/upload?path=/tmp/service_app.py");
    let (status, _, answer) = raw("POST", &upload, &headers, body).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let command = format!(
        "setsid -f python3 /tmp/service_app.py {APP_PORT} >/tmp/app.log 2>&1 </dev/null; \
         for i in $(seq 100); do python3 -c 'import socket; \
         socket.create_connection((\"127.0.0.1\", {APP_PORT}))' 2>/dev/null && exit 0; \
         sleep 0.1; done; cat /tmp/app.log; exit 1"
    );
    let (status, run) = common::call(
        "POST",
        &format!("{dataplane_url}/execute"),
        Some(KEY),
        Some(json!({"command": command})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["exit_code"], 0, "the app did not start: {run}");
}

async fn mint(server: &Server, name: &str, body: Value) -> Value {
    let (status, minted) = server
        .api("POST", &format!("/boxes/{name}/service-url"), Some(body))
        .await;
    assert_eq!(status, 200, "{minted}");
    minted
}

async fn jwks(server: &Server) -> Value {
    let (status, jwks) = server
        .call("GET", "/.well-known/jwks.json", None, None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{jwks}");
    jwks
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

/// Verifies `token` with the JWKS as any third party would.
fn verify_with_jwks(jwks: &Value, token: &str, audience: &str) -> Value {
    let set: JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let jwk = set
        .find(&kid_of(token))
        .expect("the token's kid is in the JWKS");
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    let key = DecodingKey::from_jwk(jwk).unwrap();
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap()
        .claims
}

/// GET `{service_url}{path}` with the token header.
async fn service_get(service_url: &str, path: &str, token: &str) -> (u16, http::HeaderMap, Bytes) {
    let headers = [(TOKEN_HEADER, token.to_string())];
    raw(
        "GET",
        &format!("{service_url}{path}"),
        &headers,
        Bytes::new(),
    )
    .await
    .unwrap()
}

/// A header the app reported, by case-insensitive name.
fn header_seen(seen: &Value, name: &str) -> Value {
    let headers = seen["headers"].as_object().unwrap();
    let found = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name));
    found.map_or(Value::Null, |(_, v)| v.clone())
}

fn error_kind(body: &Bytes) -> String {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    body["detail"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The token re-signed nowhere: its payload swapped, its signature kept.
fn forge(token: &str, change: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    change(&mut claims);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

#[tokio::test]
async fn service_urls_proxy_http_and_websockets_with_signed_tokens() {
    let dir = TestStateDir::new();
    let server = Server::start_with(
        dir.path(),
        Server::free_port(),
        &[(KEY_ROTATION_ENV, "4".into())],
    )
    .await;

    // JWKS: no credential, Ed25519 keys with kids.
    let first_jwks = jwks(&server).await;
    let keys = first_jwks["keys"].as_array().unwrap();
    assert!(!keys.is_empty());
    for key in keys {
        assert_eq!(key["kty"], "OKP");
        assert_eq!(key["crv"], "Ed25519");
        assert_eq!(key["alg"], "EdDSA");
        assert_eq!(key["use"], "sig");
        assert!(!key["kid"].as_str().unwrap().is_empty());
        let x = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();
        assert_eq!(x.len(), 32);
    }

    let sandbox = server.create(json!({"name": "svc"})).await;
    let id = sandbox["id"].as_str().unwrap().to_string();
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    start_app(&dp).await;

    let minted = mint(
        &server,
        "svc",
        json!({"port": APP_PORT, "expires_in_seconds": 120}),
    )
    .await;
    let service_url = minted["service_url"].as_str().unwrap().to_string();
    let token = minted["token"].as_str().unwrap().to_string();
    assert_eq!(service_url, server.url(&format!("/svc/{id}/{APP_PORT}/")));
    assert_eq!(
        minted["browser_url"],
        format!("{service_url}?cordon_service_token={token}")
    );
    assert_eq!(
        minted["embed_url"],
        format!("{service_url}.cordon/embed#token={token}")
    );
    let expires_at = minted["expires_at"].as_str().unwrap();
    assert_eq!(expires_at.len(), 20, "{expires_at}");
    assert!(expires_at.ends_with('Z') && expires_at.as_bytes()[10] == b'T');

    // The token verifies with the published keys alone, bound to this sandbox and port.
    let claims = verify_with_jwks(&jwks(&server).await, &token, &format!("{APP_PORT}--{id}"));
    assert_eq!(claims["sub"], id.as_str());
    assert_eq!(claims["iss"], server.url(""));
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        120
    );

    // HTTP through the token header; the app sees none of the caller's credentials.
    let spoofed = [
        (TOKEN_HEADER, token.clone()),
        ("x-langsmith-user-id", "spoofed".into()),
        ("X-Langsmith-User-Email", "spoofed@example.com".into()),
        ("x-api-key", KEY.into()),
        ("cookie", format!("app=1; cordon_service_token={token}")),
        // Positive control: the app does report the headers it gets.
        ("x-langsmith-other", "kept".into()),
    ];
    let url = format!("{service_url}headers?q=1");
    let (status, _, body) = raw("GET", &url, &spoofed, Bytes::new()).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["path"], "/headers?q=1");
    let seen_headers: Vec<String> = seen["headers"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    for gone in [
        "x-langsmith-user-id",
        "x-langsmith-user-email",
        "x-api-key",
        TOKEN_HEADER,
    ] {
        assert!(
            !seen_headers.iter().any(|h| h == gone),
            "{gone} reached the app: {seen}"
        );
    }
    assert_eq!(header_seen(&seen, "x-langsmith-other"), "kept");
    assert_eq!(header_seen(&seen, "cookie"), "app=1");
    assert_eq!(header_seen(&seen, "host"), format!("localhost:{APP_PORT}"));
    assert_eq!(
        header_seen(&seen, "x-forwarded-prefix"),
        format!("/svc/{id}/{APP_PORT}")
    );

    // Bodies both ways, any method.
    let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for method in ["POST", "PUT"] {
        let headers = [
            (TOKEN_HEADER, token.clone()),
            ("content-type", "application/x-test".into()),
        ];
        let (status, response_headers, body) = raw(
            method,
            &format!("{service_url}echo"),
            &headers,
            Bytes::from(payload.clone()),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(response_headers["content-type"], "application/x-test");
        assert!(body[..] == payload[..], "{method} body differs");
        let csp = response_headers["content-security-policy"]
            .to_str()
            .unwrap();
        assert_eq!(csp, "frame-ancestors 'self'");
    }

    // WebSocket echo through the header.
    let ws_url = format!("{}ws", service_url.replace("http://", "ws://"));
    let mut request = ws_url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert(TOKEN_HEADER, token.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::text("hello")
    );
    let blob: Vec<u8> = (0..100_000).map(|i| (i % 256) as u8).collect();
    socket.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::binary(blob));
    socket.close(None).await.unwrap();
    // …and refused without a token.
    let bare = ws_url.as_str().into_client_request().unwrap();
    assert!(tokio_tungstenite::connect_async(bare).await.is_err());

    // browser_url: the token becomes an HttpOnly cookie scoped to the service; the redirect
    // drops it from the URL.
    let browser_url = minted["browser_url"].as_str().unwrap();
    let (status, headers, _) = raw("GET", browser_url, &[], Bytes::new()).await.unwrap();
    assert_eq!(status, 303);
    assert_eq!(headers["location"], format!("/svc/{id}/{APP_PORT}/"));
    let cookie = headers["set-cookie"].to_str().unwrap();
    for attribute in [
        "HttpOnly",
        "SameSite=Lax",
        &format!("Path=/svc/{id}/{APP_PORT}/"),
    ] {
        assert!(cookie.contains(attribute), "{attribute} missing: {cookie}");
    }
    let pair = cookie.split(';').next().unwrap().to_string();
    let (status, _, page) = raw("GET", &service_url, &[("cookie", pair)], Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains("hello from the sandbox"));
    // A bad token in browser_url sets nothing.
    let (status, headers, _) = raw(
        "GET",
        &format!("{service_url}?cordon_service_token=x.y.z"),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    assert!(!headers.contains_key("set-cookie"));

    // Refusals: no token, a forged one, an expired one, another port's, another sandbox's,
    // one signed by a key the server never had. The same request with the real token passes.
    let (status, _, body) = raw("GET", &format!("{service_url}headers"), &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!((status, error_kind(&body).as_str()), (401, "Unauthorized"));
    let forged = forge(&token, |c| {
        c["exp"] = json!(c["exp"].as_u64().unwrap() + 3600)
    });
    let (status, _, body) = service_get(&service_url, "headers", &forged).await;
    assert_eq!((status, error_kind(&body).as_str()), (401, "Unauthorized"));
    let short = mint(
        &server,
        "svc",
        json!({"port": APP_PORT, "expires_in_seconds": 1}),
    )
    .await;
    let other_port = mint(&server, "svc", json!({"port": APP_PORT + 1})).await;
    server.create(json!({"name": "other"})).await;
    let other_sandbox = mint(&server, "other", json!({"port": APP_PORT})).await;
    for other in [&other_port, &other_sandbox] {
        let (status, _, body) =
            service_get(&service_url, "headers", other["token"].as_str().unwrap()).await;
        assert_eq!((status, error_kind(&body).as_str()), (403, "Forbidden"));
    }
    let stranger = {
        let key = ed25519_pkcs8(&[7u8; 32]);
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(kid_of(&token));
        let claims = verify_with_jwks(&jwks(&server).await, &token, &format!("{APP_PORT}--{id}"));
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(&key),
        )
        .unwrap()
    };
    let (status, _, _) = service_get(&service_url, "headers", &stranger).await;
    assert_eq!(status, 401);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _, body) =
        service_get(&service_url, "headers", short["token"].as_str().unwrap()).await;
    assert_eq!((status, error_kind(&body).as_str()), (401, "Unauthorized"));
    let (status, _, _) = service_get(&service_url, "headers", &token).await;
    assert_eq!(status, 200, "positive control");

    // Rotation: a new key signs after the rotation age; the old one stays published and valid.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rotated = mint(&server, "svc", json!({"port": APP_PORT})).await;
    let new_token = rotated["token"].as_str().unwrap();
    assert_ne!(kid_of(new_token), kid_of(&token));
    let published = jwks(&server).await;
    verify_with_jwks(&published, &token, &format!("{APP_PORT}--{id}"));
    verify_with_jwks(&published, new_token, &format!("{APP_PORT}--{id}"));
    for t in [new_token, token.as_str()] {
        assert_eq!(service_get(&service_url, "headers", t).await.0, 200);
    }

    // A stopped sandbox wakes up for a service request (its app is gone, so: 502).
    let (status, _) = server.api("POST", "/boxes/svc/stop", Some(json!({}))).await;
    assert!(status < 300);
    server.wait_status("svc", "stopped").await;
    let (status, _, body) = service_get(&service_url, "headers", &token).await;
    assert_eq!(
        (status, error_kind(&body).as_str()),
        (502, "ConnectionError")
    );
    let (_, status) = server.api("GET", "/boxes/svc/status", None).await;
    assert_eq!(status["status"], "ready");

    // Tokens outlive a server restart (the keys are on disk).
    drop(server);
    let server = Server::start(dir.path()).await;
    start_app(&server.url(&format!("/dp/{id}"))).await;
    let service_url = server.url(&format!("/svc/{id}/{APP_PORT}/"));
    assert_eq!(service_get(&service_url, "headers", &token).await.0, 200);
}

/// A PKCS#8 v1 Ed25519 private key (RFC 8410) from a seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

#[tokio::test]
async fn host_based_service_urls() {
    let dir = TestStateDir::new();
    let port = Server::free_port();
    let domain = format!("svc.test:{port}");
    let server =
        Server::start_with(dir.path(), port, &[(SERVICE_DOMAIN_ENV, domain.clone())]).await;
    let sandbox = server.create(json!({"name": "hosted"})).await;
    let id = sandbox["id"].as_str().unwrap().to_string();
    start_app(sandbox["dataplane_url"].as_str().unwrap()).await;

    let minted = mint(&server, "hosted", json!({"port": APP_PORT})).await;
    let host = format!("{APP_PORT}--{id}.{domain}");
    assert_eq!(minted["service_url"], format!("http://{host}/"));
    let token = minted["token"].as_str().unwrap();
    // The audience is the service host, as SandboxTokenVerifier expects.
    verify_with_jwks(&jwks(&server).await, token, &host);

    // Every path on the service host is the app's, the API's included.
    let headers = [(TOKEN_HEADER, token.to_string())];
    let (status, _, body) =
        request_as_host(&server, &host, "GET", "/headers", &headers, Bytes::new()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(header_seen(&seen, "x-forwarded-host"), host);
    let (status, _, body) = request_as_host(
        &server,
        &host,
        "GET",
        "/api/v2/sandboxes/boxes",
        &headers,
        Bytes::new(),
    )
    .await;
    assert_eq!((status, &body[..]), (404, &b"not found"[..]));
    let (status, _, _) =
        request_as_host(&server, &host, "GET", "/headers", &[], Bytes::new()).await;
    assert_eq!(status, 401);

    // browser_url on the service host: a host-only cookie for the whole host.
    let (status, headers, _) = request_as_host(
        &server,
        &host,
        "GET",
        &format!("/?cordon_service_token={token}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(headers["location"], "/");
    let cookie = headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("Path=/;") && !cookie.contains("Domain"),
        "{cookie}"
    );
    // With no prefix, a target naming another host still lands on this one.
    for (target, location) in [
        ("//evil.com", "/evil.com"),
        ("///evil.com/a", "/evil.com/a"),
        ("/\\evil.com", "/evil.com"),
        ("/%5C/evil.com", "/%5C/evil.com"),
    ] {
        let (status, headers, _) = request_as_host(
            &server,
            &host,
            "GET",
            &format!("{target}?cordon_service_token={token}"),
            &[],
            Bytes::new(),
        )
        .await;
        assert_eq!(status, 303, "{target}");
        assert_eq!(headers["location"], location, "{target}");
    }

    // The token of another host (another port) is refused here.
    let other = mint(&server, "hosted", json!({"port": APP_PORT + 1})).await;
    let headers = [(TOKEN_HEADER, other["token"].as_str().unwrap().to_string())];
    let (status, _, _) =
        request_as_host(&server, &host, "GET", "/headers", &headers, Bytes::new()).await;
    assert_eq!(status, 403);
    // Other hosts still reach the API.
    let (status, _) = server.api("GET", "/boxes", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn download_links_serve_one_file_with_ranges_and_pinned_headers() {
    let dir = TestStateDir::new();
    let server = Server::start(dir.path()).await;
    let sandbox = server.create(json!({"name": "files"})).await;
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    let contents = b"<script>alert(1)</script> 0123456789".repeat(300);
    let (content_type, body) = common::multipart_file(&contents);
    let headers = [
        ("x-api-key", KEY.to_string()),
        ("content-type", content_type),
    ];
    let upload = format!("{dp}/upload?path=/home/user/report%20one.html");
    let (status, _, _) = raw("POST", &upload, &headers, body).await.unwrap();
    assert_eq!(status, 200);

    let mint_link = |body: Value| {
        let server = &server;
        async move {
            server
                .api("POST", "/boxes/files/download-url", Some(body))
                .await
        }
    };
    let (status, link) = mint_link(json!({"path": "/home/user/report one.html",
        "expires_in_seconds": 600, "content_type": "text/plain; charset=utf-8",
        "content_disposition": "attachment"}))
    .await;
    assert_eq!(status, 200, "{link}");
    let url = link["download_url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&server.url("/dl/")), "{url}");
    assert_eq!(link["expires_at"].as_str().unwrap().len(), 20);

    // GET with no credential: the file, with the pinned headers and a sandboxing CSP.
    let (status, headers, body) = raw("GET", &url, &[], Bytes::new()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], &contents[..]);
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename=\"report_one.html\"; filename*=UTF-8''report%20one.html"
    );
    assert_eq!(headers["content-security-policy"], "sandbox");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["accept-ranges"], "bytes");
    // HEAD: the length, no body.
    let (status, headers, body) = raw("HEAD", &url, &[], Bytes::new()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-length"],
        contents.len().to_string().as_str()
    );
    assert!(body.is_empty());
    // Range.
    let range = [("range", "bytes=10-19".to_string())];
    let (status, headers, body) = raw("GET", &url, &range, Bytes::new()).await.unwrap();
    assert_eq!(status, 206);
    assert_eq!(&body[..], &contents[10..20]);
    assert_eq!(
        headers["content-range"],
        format!("bytes 10-19/{}", contents.len()).as_str()
    );
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    // Only GET and HEAD.
    let (status, _, _) = raw("POST", &url, &[], Bytes::new()).await.unwrap();
    assert_eq!(status, 405);

    // A link without expiry; tampered and expired links are refused.
    let (_, forever) = mint_link(json!({"path": "/home/user/report one.html"})).await;
    assert_eq!(forever["expires_at"], Value::Null);
    let forever_url = forever["download_url"].as_str().unwrap().to_string();
    let (status, headers, body) = raw("GET", &forever_url, &[], Bytes::new()).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], &contents[..]);
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert!(!headers.contains_key("content-disposition"));
    let token = forever["token"].as_str().unwrap();
    let repointed = forge(token, |c| c["path"] = json!("/etc/shadow"));
    let (status, _, body) = raw(
        "GET",
        &server.url(&format!("/dl/{repointed}")),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!((status, error_kind(&body).as_str()), (401, "Unauthorized"));
    let (_, short) =
        mint_link(json!({"path": "/home/user/report one.html", "expires_in_seconds": 1})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _, _) = raw(
        "GET",
        short["download_url"].as_str().unwrap(),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    // A missing file is the agent's 404, still sandboxed.
    let (_, missing) = mint_link(json!({"path": "/home/user/missing"})).await;
    let (status, headers, _) = raw(
        "GET",
        missing["download_url"].as_str().unwrap(),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    assert_eq!(headers["content-security-policy"], "sandbox");
    // Only the status and body of the agent's answer, under the link's own headers.
    for name in headers.keys() {
        assert!(
            [
                "cache-control",
                "content-length",
                "content-security-policy",
                "content-type",
                "date",
                "referrer-policy",
                "transfer-encoding",
                "x-content-type-options",
            ]
            .contains(&name.as_str()),
            "unexpected header {name}"
        );
    }

    // Bad requests change nothing.
    for bad in [
        json!({"path": "relative"}),
        json!({"path": "/x", "expires_in_seconds": 0}),
        json!({"path": "/x", "content_disposition": "evil"}),
    ] {
        let (status, _) = mint_link(bad).await;
        assert_eq!(status, 422);
    }
    let (status, _) = server
        .api(
            "POST",
            "/boxes/nope/download-url",
            Some(json!({"path": "/x"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = server
        .call(
            "POST",
            "/api/v2/sandboxes/boxes/files/download-url",
            None,
            Some(json!({"path": "/x"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 401);

    // A stopped sandbox wakes up; a never-expiring link outlives a server restart.
    let (status, _) = server
        .api("POST", "/boxes/files/stop", Some(json!({})))
        .await;
    assert!(status < 300);
    server.wait_status("files", "stopped").await;
    let started = Instant::now();
    let (status, _, body) = raw("GET", &forever_url, &[], Bytes::new()).await.unwrap();
    assert_eq!(status, 200, "after {:?}", started.elapsed());
    assert_eq!(&body[..], &contents[..]);
    drop(server);
    let server = Server::start(dir.path()).await;
    let path = forever_url.split_once("/dl/").unwrap().1;
    let (status, _, body) = raw(
        "GET",
        &server.url(&format!("/dl/{path}")),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], &contents[..]);
}
