//! GCP rules: an OAuth access token minted from the rule's service-account key (an RS256 JWT
//! assertion posted to the key's `token_uri`), cached until shortly before it expires, sent
//! as `Authorization: Bearer`. Workload identity federation is not supported.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cordon_api::proxy_config::GcpAuth;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::address::parse_host;
use crate::inject::{SecretResolver, ValueTemplate};
use crate::policy::PolicyError;
use crate::proxy::EgressProxy;

const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Tokens are dropped this long before they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// Most tokens kept; most bytes read from a token endpoint.
const MAX_CACHED: usize = 1024;
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct GcpCredentials {
    key_json: ValueTemplate,
    scopes: Vec<String>,
}

impl GcpCredentials {
    pub(crate) fn compile(rule: &str, gcp: &GcpAuth) -> Result<GcpCredentials, PolicyError> {
        if gcp.workload_identity_provider.is_some() {
            return Err(PolicyError::new(format!(
                "rule {rule:?}: gcp workload identity is not supported by Cordon; give service_account_json"
            )));
        }
        let key = gcp.service_account_json.as_ref().ok_or_else(|| {
            PolicyError::new(format!(
                "rule {rule:?}: gcp.service_account_json is required"
            ))
        })?;
        let key_json =
            ValueTemplate::compile(&format!("rule {rule:?}: gcp.service_account_json"), key)?;
        // A literal key is checked now; a workspace-secret one when it is used.
        if key.kind != cordon_api::proxy_config::SecretKind::WorkspaceSecret {
            if let Some(text) = &key.value {
                ServiceAccountKey::parse(text).map_err(|e| {
                    PolicyError::new(format!("rule {rule:?}: gcp.service_account_json: {e}"))
                })?;
            }
        }
        let scopes = match &gcp.scopes {
            Some(s) if !s.is_empty() => s.clone(),
            _ => vec![DEFAULT_SCOPE.to_string()],
        };
        Ok(GcpCredentials { key_json, scopes })
    }
}

#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default = "default_token_uri")]
    token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

impl ServiceAccountKey {
    fn parse(text: &str) -> Result<ServiceAccountKey, String> {
        let key: ServiceAccountKey =
            serde_json::from_str(text).map_err(|e| format!("not a service-account key: {e}"))?;
        let uri: Uri = key
            .token_uri
            .parse()
            .map_err(|_| "token_uri is not a URL".to_string())?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err("token_uri must be an https:// URL".into());
        }
        jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.as_bytes())
            .map_err(|e| format!("private_key is not an RSA PEM key: {e}"))?;
        Ok(key)
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: String,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The OAuth `error` code of a failed token answer (`invalid_grant`), and nothing else of
/// the body: it goes to the sandbox, and an endpoint could echo the assertion back.
fn oauth_error(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct OAuthError {
        error: String,
    }
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(e)
            if e.error.len() <= 64
                && e.error
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            format!(" ({})", e.error)
        }
        _ => String::new(),
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Access tokens by (key, scopes) digest: a token is only ever reused for the exact key
/// that minted it.
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl TokenCache {
    fn get(&self, id: &[u8; 32]) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(id)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    fn put(&self, id: [u8; 32], token: String, until: Instant) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.len() >= MAX_CACHED {
            let now = Instant::now();
            tokens.retain(|_, (_, u)| *u > now);
            if tokens.len() >= MAX_CACHED {
                tokens.clear();
            }
        }
        tokens.insert(id, (token, until));
    }
}

impl EgressProxy {
    /// A valid access token for `creds`, from the cache or freshly minted.
    pub(crate) async fn gcp_token(
        &self,
        creds: &GcpCredentials,
        secrets: &dyn SecretResolver,
    ) -> Result<String, String> {
        let text = creds
            .key_json
            .render(secrets)
            .await
            .map_err(|e| e.to_string())?;
        let mut hasher = Sha256::new();
        hasher.update(text.as_bytes());
        hasher.update([0]);
        hasher.update(creds.scopes.join(" ").as_bytes());
        let id: [u8; 32] = hasher.finalize().into();
        if let Some(token) = self.gcp_tokens.get(&id) {
            return Ok(token);
        }
        let key = ServiceAccountKey::parse(&text)?;
        let (token, lifetime) = self.fetch_gcp_token(&key, &creds.scopes).await?;
        let until = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
        self.gcp_tokens.put(id, token.clone(), until);
        Ok(token)
    }

    async fn fetch_gcp_token(
        &self,
        key: &ServiceAccountKey,
        scopes: &[String],
    ) -> Result<(String, Duration), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            iss: &key.client_email,
            scope: scopes.join(" "),
            aud: &key.token_uri,
            iat: now,
            exp: now + 3600,
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = key.private_key_id.clone();
        let signing_key = jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.as_bytes())
            .map_err(|e| e.to_string())?;
        let assertion = jsonwebtoken::encode(&header, &claims, &signing_key)
            .map_err(|e| format!("signing the assertion: {e}"))?;
        let form = format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}");

        let uri: Uri = key
            .token_uri
            .parse()
            .map_err(|_| "token_uri is not a URL".to_string())?;
        let host =
            parse_host(uri.host().unwrap_or_default()).map_err(|e| format!("token_uri: {e}"))?;
        let port = uri.port_u16().unwrap_or(443);
        // The token endpoint comes from the key: it gets the same address checks as any egress.
        let (tcp, _ip) = self
            .connect_checked(None, &host, port)
            .await
            .map_err(|r| format!("token endpoint: {}", r.reason))?;
        let tls = self
            .tls_connect(&host, tcp)
            .await
            .map_err(|r| format!("token endpoint: {}", r.reason))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("token endpoint: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let authority = if port == 443 {
            host.to_string()
        } else {
            format!("{host}:{port}")
        };
        let req = Request::post(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(http::header::HOST, authority)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| e.to_string())?;
        let call = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("token endpoint: {e}"))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("token endpoint answer: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "token endpoint answered {status}{}",
                    oauth_error(&body)
                ));
            }
            let parsed: TokenResponse =
                serde_json::from_slice(&body).map_err(|e| format!("token endpoint answer: {e}"))?;
            Ok((
                parsed.access_token,
                Duration::from_secs(parsed.expires_in.unwrap_or(3600).min(24 * 3600)),
            ))
        };
        tokio::time::timeout(self.limits.connect_timeout * 2, call)
            .await
            .map_err(|_| "token endpoint timed out".to_string())?
    }
}
