//! Sealing secrets at rest (registry passwords; later workspace secrets): XChaCha20-Poly1305
//! under a 32-byte key kept in `<data_dir>/secret.key` (0600, created at first start).
//!
//! A sealed value is `base64(nonce ‖ ciphertext)`. Each value is bound to a context (the
//! owning record's kind and id) as associated data, so a sealed value copied into another
//! row does not open there.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    #[error("secret key {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret key {0} must hold exactly {KEY_BYTES} bytes")]
    KeyLength(PathBuf),
    #[error("secret key {0} is readable by others than its owner (expected mode 0600)")]
    KeyMode(PathBuf),
    #[error("a sealed secret is damaged or was sealed under another key")]
    Unseal,
}

/// The key that seals and opens secrets.
pub struct SealingKey {
    cipher: XChaCha20Poly1305,
}

impl SealingKey {
    /// Reads the key file, creating it with fresh random bytes (mode 0600) when absent.
    pub fn load_or_create(path: &Path) -> Result<SealingKey, SealingError> {
        let key_file = |source| SealingError::KeyFile {
            path: path.to_path_buf(),
            source,
        };
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        match created {
            Ok(mut file) => {
                let key = XChaCha20Poly1305::generate_key(&mut OsRng);
                file.write_all(&key).map_err(key_file)?;
                file.sync_all().map_err(key_file)?;
                tracing::info!(path = %path.display(), "created the secret sealing key");
                Ok(SealingKey {
                    cipher: XChaCha20Poly1305::new(&key),
                })
            }
            Err(error) if error.kind() == ErrorKind::AlreadyExists => Self::load(path),
            Err(error) => Err(key_file(error)),
        }
    }

    fn load(path: &Path) -> Result<SealingKey, SealingError> {
        let key_file = |source| SealingError::KeyFile {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(key_file)?;
        let mode = file.metadata().map_err(key_file)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SealingError::KeyMode(path.to_path_buf()));
        }
        let mut key = Vec::with_capacity(KEY_BYTES + 1);
        Read::by_ref(&mut file)
            .take(KEY_BYTES as u64 + 1)
            .read_to_end(&mut key)
            .map_err(key_file)?;
        if key.len() != KEY_BYTES {
            return Err(SealingError::KeyLength(path.to_path_buf()));
        }
        let cipher = XChaCha20Poly1305::new_from_slice(&key)
            .map_err(|_| SealingError::KeyLength(path.to_path_buf()))?;
        Ok(SealingKey { cipher })
    }

    /// Seals `secret` for `context` (e.g. `registry:<id>`).
    pub fn seal(&self, secret: &[u8], context: &str) -> String {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let payload = Payload {
            msg: secret,
            aad: context.as_bytes(),
        };
        // Encryption with a valid key and nonce cannot fail for in-memory sizes.
        let ciphertext = self
            .cipher
            .encrypt(&nonce, payload)
            .expect("XChaCha20-Poly1305 encryption");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        BASE64.encode(sealed)
    }

    /// Opens a value sealed for the same `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, SealingError> {
        let bytes = BASE64.decode(sealed).map_err(|_| SealingError::Unseal)?;
        if bytes.len() < NONCE_BYTES {
            return Err(SealingError::Unseal);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        let payload = Payload {
            msg: ciphertext,
            aad: context.as_bytes(),
        };
        self.cipher
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| SealingError::Unseal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_only_in_its_context() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let key = SealingKey::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = key.seal(b"hunter2", "registry:a");
        assert!(!sealed.contains("hunter2"));
        assert_ne!(sealed, key.seal(b"hunter2", "registry:a"), "fresh nonces");
        assert_eq!(key.open(&sealed, "registry:a").unwrap(), b"hunter2");
        // Positive control of the context binding: the same value fails elsewhere.
        assert!(matches!(
            key.open(&sealed, "registry:b"),
            Err(SealingError::Unseal)
        ));

        let reloaded = SealingKey::load_or_create(&path).unwrap();
        assert_eq!(reloaded.open(&sealed, "registry:a").unwrap(), b"hunter2");

        let other_dir = tempfile::tempdir().unwrap();
        let other = SealingKey::load_or_create(&other_dir.path().join("secret.key")).unwrap();
        assert!(other.open(&sealed, "registry:a").is_err());
        assert!(key.open("not base64 !", "registry:a").is_err());
        assert!(key.open("AAAA", "registry:a").is_err());
    }

    #[test]
    fn refuses_a_damaged_or_exposed_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            SealingKey::load_or_create(&path),
            Err(SealingError::KeyLength(_))
        ));
        std::fs::write(&path, [7u8; KEY_BYTES]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SealingKey::load_or_create(&path),
            Err(SealingError::KeyMode(_))
        ));
    }
}
