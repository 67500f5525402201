//! The Ed25519 keys that sign service-URL tokens, their rotation, and the JWKS that publishes
//! their public halves (spec §7.1).
//!
//! Keys live in `$DATA/signing-keys.json` (0600), each with a `kid` (its RFC 7638 thumbprint).
//! The newest key signs; once it is older than the rotation age, the next signature makes a new
//! one. A retired key's public half stays in the JWKS until every token it signed has expired
//! for every verifier (the longest token lifetime plus leeway), then the key is forgotten.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::model::now_secs;

/// The longest lifetime of a token these keys sign (spec §5.1: `expires_in_seconds` ≤ 86400).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);
/// Clock skew verifiers allow (the official verifier: 30 s), doubled for margin.
const VERIFIER_LEEWAY: Duration = Duration::from_secs(60);
/// The default age at which a new key takes over signing.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(86_400);
/// Longest token accepted for verification; real ones are a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("signing keys {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing keys {path}: not a key file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no randomness for a new signing key: {0}")]
    Random(String),
    #[error("signing a token: {0}")]
    Sign(String),
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token too long")]
    TooLong,
    #[error("token names no key of this server")]
    UnknownKey,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// One key as stored: the private seed, when it was made and when it stopped signing.
#[derive(Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    created_at: u64,
    retired_at: Option<u64>,
    /// The 32-byte Ed25519 seed, base64url.
    seed: String,
}

/// A loaded key.
struct Key {
    stored: StoredKey,
    signing: SigningKey,
}

impl Key {
    fn generate(now: u64) -> Result<Key, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        let signing = SigningKey::from_bytes(&seed);
        let stored = StoredKey {
            kid: thumbprint(&signing),
            created_at: now,
            retired_at: None,
            seed: URL_SAFE_NO_PAD.encode(seed),
        };
        Ok(Key { stored, signing })
    }

    fn load(stored: StoredKey) -> Result<Key, String> {
        let seed: [u8; 32] = URL_SAFE_NO_PAD
            .decode(&stored.seed)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or("a seed is not 32 base64url bytes")?;
        let signing = SigningKey::from_bytes(&seed);
        if thumbprint(&signing) != stored.kid {
            return Err(format!("key {} does not match its kid", stored.kid));
        }
        Ok(Key { stored, signing })
    }

    fn public_x(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.signing.verifying_key().as_bytes())
    }

    fn jwk(&self) -> Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.public_x(),
            "kid": self.stored.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }

    /// After this, no token it signed is accepted by any verifier.
    fn forgettable_after(&self) -> Option<u64> {
        self.stored
            .retired_at
            .map(|t| t + MAX_TOKEN_LIFETIME.as_secs() + VERIFIER_LEEWAY.as_secs())
    }
}

/// RFC 7638 JWK thumbprint of the public key.
fn thumbprint(key: &SigningKey) -> String {
    let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// The server's signing keys, newest last.
pub struct SigningKeys {
    path: PathBuf,
    rotate_after: Duration,
    keys: Mutex<Vec<Key>>,
}

impl SigningKeys {
    /// Loads `path`, creating it with one fresh key when absent.
    pub fn load_or_create(path: &Path, rotate_after: Duration) -> Result<SigningKeys, KeyError> {
        let keys = match std::fs::read(path) {
            Ok(bytes) => parse_key_file(path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(KeyError::File {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let this = SigningKeys {
            path: path.to_path_buf(),
            rotate_after,
            keys: Mutex::new(keys),
        };
        this.with_current_keys(|_| Ok(()))?;
        Ok(this)
    }

    /// Signs `claims` (EdDSA, `kid` in the header) with the active key.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, KeyError> {
        self.with_current_keys(|keys| {
            let active = keys.last().expect("with_current_keys leaves an active key");
            let der = active
                .signing
                .to_pkcs8_der()
                .map_err(|e| KeyError::Sign(e.to_string()))?;
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(active.stored.kid.clone());
            jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(der.as_bytes()))
                .map_err(|e| KeyError::Sign(e.to_string()))
        })
    }

    /// Decodes a token signed by one of the keys still kept, checked as `validation` says
    /// (its algorithms are forced to EdDSA).
    pub fn verify<T: DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<T, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong);
        }
        let kid = jsonwebtoken::decode_header(token)?
            .kid
            .ok_or(TokenError::UnknownKey)?;
        let public = {
            let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let now = now_secs();
            keys.iter()
                .filter(|k| k.forgettable_after().is_none_or(|t| now <= t))
                .find(|k| k.stored.kid == kid)
                .map(|k| *k.signing.verifying_key().as_bytes())
                .ok_or(TokenError::UnknownKey)?
        };
        let mut validation = validation.clone();
        validation.algorithms = vec![Algorithm::EdDSA];
        let data =
            jsonwebtoken::decode::<T>(token, &DecodingKey::from_ed_der(&public), &validation)?;
        Ok(data.claims)
    }

    /// `{"keys": [...]}`: the public half of every key whose tokens may still be valid.
    pub fn jwks(&self) -> Result<Value, KeyError> {
        self.with_current_keys(|keys| {
            let keys: Vec<Value> = keys.iter().rev().map(Key::jwk).collect();
            Ok(json!({ "keys": keys }))
        })
    }

    /// Runs `f` on the keys after rotating (when the active key is due) and forgetting keys
    /// whose tokens have all expired; persists any change first.
    fn with_current_keys<R>(
        &self,
        f: impl FnOnce(&[Key]) -> Result<R, KeyError>,
    ) -> Result<R, KeyError> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_secs();
        let before = keys.len();
        keys.retain(|k| k.forgettable_after().is_none_or(|t| now <= t));
        let mut changed = keys.len() != before;
        let due = keys
            .last()
            .is_none_or(|k| now >= k.stored.created_at + self.rotate_after.as_secs());
        if due {
            let fresh = Key::generate(now)?;
            if let Some(old) = keys.last_mut() {
                old.stored.retired_at = Some(now);
            }
            tracing::info!(kid = %fresh.stored.kid, "new signing key");
            keys.push(fresh);
            changed = true;
        }
        if changed {
            if let Err(error) = write_key_file(&self.path, &keys) {
                // Unsaved, the new key's tokens would die with this process: undo it.
                if due {
                    keys.pop();
                    if let Some(old) = keys.last_mut() {
                        old.stored.retired_at = None;
                    }
                }
                if keys.is_empty() {
                    return Err(error);
                }
                tracing::warn!(%error, "could not save the signing keys; keeping the old ones");
            }
        }
        f(&keys)
    }
}

/// `GET /.well-known/jwks.json` (no credential; spec §7.1).
pub async fn jwks(
    axum::extract::State(app): axum::extract::State<std::sync::Arc<crate::App>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match app.signing_keys.jwks() {
        // Verifiers cache for 300 s and refetch on an unknown kid (spec §7.1), so a key that
        // just took over is found despite caching.
        Ok(jwks) => (
            [(http::header::CACHE_CONTROL, "public, max-age=300")],
            axum::Json(jwks),
        )
            .into_response(),
        Err(error) => crate::ApiError::Internal(error.to_string()).into_response(),
    }
}

fn parse_key_file(path: &Path, bytes: &[u8]) -> Result<Vec<Key>, KeyError> {
    let corrupt = |reason: String| KeyError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let stored: Vec<StoredKey> =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut keys: Vec<Key> = stored
        .into_iter()
        .map(Key::load)
        .collect::<Result<_, _>>()
        .map_err(corrupt)?;
    keys.sort_by_key(|k| k.stored.created_at);
    Ok(keys)
}

/// Replaces the key file atomically, 0600 from the start.
fn write_key_file(path: &Path, keys: &[Key]) -> Result<(), KeyError> {
    let io = |source| KeyError::File {
        path: path.to_path_buf(),
        source,
    };
    let stored: Vec<&StoredKey> = keys.iter().map(|k| &k.stored).collect();
    let json = serde_json::to_vec_pretty(&stored).map_err(|e| io(e.into()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    // tempfile creates its files 0600.
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut file, &json).map_err(io)?;
    file.as_file().sync_all().map_err(io)?;
    file.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Claims {
        sub: String,
        aud: String,
        exp: u64,
    }

    fn claims() -> Claims {
        Claims {
            sub: "s".into(),
            aud: "a".into(),
            exp: now_secs() + 600,
        }
    }

    fn validation() -> Validation {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&["a"]);
        v
    }

    #[test]
    fn signs_verifies_and_persists_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let keys = SigningKeys::load_or_create(&path, DEFAULT_ROTATION).unwrap();
        let token = keys.sign(&claims()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            keys.verify::<Claims>(&token, &validation()).unwrap(),
            claims()
        );
        // A restarted server verifies what the old one signed.
        let again = SigningKeys::load_or_create(&path, DEFAULT_ROTATION).unwrap();
        assert!(again.verify::<Claims>(&token, &validation()).is_ok());
        let jwks = again.jwks().unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn refuses_tampering_other_keys_and_wrong_audiences() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SigningKeys::load_or_create(&dir.path().join("k"), DEFAULT_ROTATION).unwrap();
        let other = SigningKeys::load_or_create(&dir.path().join("o"), DEFAULT_ROTATION).unwrap();
        let token = keys.sign(&claims()).unwrap();
        assert!(matches!(
            keys.verify::<Claims>(&other.sign(&claims()).unwrap(), &validation()),
            Err(TokenError::UnknownKey)
        ));
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let forged = Claims {
            aud: "a".into(),
            sub: "other".into(),
            exp: now_secs() + 600,
        };
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert!(keys
            .verify::<Claims>(&parts.join("."), &validation())
            .is_err());
        let mut elsewhere = Validation::new(Algorithm::EdDSA);
        elsewhere.set_audience(&["b"]);
        assert!(keys.verify::<Claims>(&token, &elsewhere).is_err());
        assert!(matches!(
            keys.verify::<Claims>(&"x".repeat(MAX_TOKEN_BYTES + 1), &validation()),
            Err(TokenError::TooLong)
        ));
        for junk in ["", "a.b.c", "..", "eyJ.eyJ.x"] {
            assert!(keys.verify::<Claims>(junk, &validation()).is_err());
        }
    }

    #[test]
    fn rotation_keeps_old_public_keys_until_their_tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let keys = SigningKeys::load_or_create(&path, Duration::ZERO).unwrap();
        let first = keys.sign(&claims()).unwrap();
        let second = keys.sign(&claims()).unwrap();
        let kid = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();
        assert_ne!(kid(&first), kid(&second));
        assert!(keys.verify::<Claims>(&first, &validation()).is_ok());
        let jwks = keys.jwks().unwrap();
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert!(kids.contains(&kid(&first).as_str()));

        // Retired long enough ago: forgotten, and its tokens with it.
        {
            let mut stored = keys.keys.lock().unwrap();
            let limit = MAX_TOKEN_LIFETIME.as_secs() + VERIFIER_LEEWAY.as_secs();
            for key in stored.iter_mut().filter(|k| k.stored.retired_at.is_some()) {
                key.stored.retired_at = Some(now_secs() - limit - 1);
            }
        }
        assert!(matches!(
            keys.verify::<Claims>(&first, &validation()),
            Err(TokenError::UnknownKey)
        ));
        let jwks = keys.jwks().unwrap();
        assert!(!jwks.to_string().contains(&kid(&first)));
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, b"{nope").unwrap();
        assert!(matches!(
            SigningKeys::load_or_create(&path, DEFAULT_ROTATION),
            Err(KeyError::Corrupt { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"{nope");
    }
}
