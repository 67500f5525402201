//! Cordon's egress CA (persistent, created on first use) and the leaf certificates minted
//! under it for intercepted hosts (cached with a bound).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::address::Host;
use crate::proxy::ProxyError;

/// How long a minted leaf is valid, and how long it is reused.
const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
const LEAF_REUSE: Duration = Duration::from_secs(24 * 3600);

pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Reads the CA from `cert`/`key` (PEM), or creates both when neither exists (the key
    /// 0600, never overwritten).
    pub fn load_or_create(cert: &Path, key: &Path) -> Result<CertificateAuthority, ProxyError> {
        let ca_err = |path: &Path, message: String| ProxyError::Ca {
            path: path.to_path_buf(),
            message,
        };
        match (cert.exists(), key.exists()) {
            (true, true) => {
                let cert_pem =
                    std::fs::read_to_string(cert).map_err(|e| ca_err(cert, e.to_string()))?;
                let key_pem =
                    std::fs::read_to_string(key).map_err(|e| ca_err(key, e.to_string()))?;
                let key_pair =
                    KeyPair::from_pem(&key_pem).map_err(|e| ca_err(key, e.to_string()))?;
                Self::from_pem(cert_pem, key_pair).map_err(|m| ca_err(cert, m))
            }
            (false, false) => {
                let (cert_pem, key_pair) = Self::generate().map_err(|m| ca_err(cert, m))?;
                write_new(key, &key_pair.serialize_pem(), 0o600)
                    .map_err(|e| ca_err(key, e.to_string()))?;
                write_new(cert, &cert_pem, 0o644).map_err(|e| ca_err(cert, e.to_string()))?;
                Self::from_pem(cert_pem, key_pair).map_err(|m| ca_err(cert, m))
            }
            (true, false) => Err(ca_err(
                key,
                "the certificate exists but its key is missing".into(),
            )),
            (false, true) => Err(ca_err(
                cert,
                "the key exists but its certificate is missing".into(),
            )),
        }
    }

    fn generate() -> Result<(String, KeyPair), String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Cordon egress proxy CA");
        dn.push(DnType::OrganizationName, "Cordon");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok((cert.pem(), key))
    }

    fn from_pem(cert_pem: String, key: KeyPair) -> Result<CertificateAuthority, String> {
        use rustls_pki_types::pem::PemObject;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| e.to_string())?;
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS server config presenting a fresh leaf for `host`, chained to this CA.
    fn mint(&self, host: &Host) -> Result<Arc<rustls::ServerConfig>, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.match_text());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match host {
            Host::Name(n) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            Host::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after =
            now + time::Duration::try_from(LEAF_VALIDITY).map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| e.to_string())?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Creates `path` with `mode`; never replaces an existing file.
fn write_new(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Minted leaves by host, at most `capacity` of them.
pub(crate) struct LeafCache {
    capacity: usize,
    entries: Mutex<HashMap<Host, (Arc<rustls::ServerConfig>, Instant)>>,
}

impl LeafCache {
    pub(crate) fn new(capacity: usize) -> LeafCache {
        LeafCache {
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn get(
        &self,
        ca: &CertificateAuthority,
        host: &Host,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((config, made)) = entries.get(host) {
                if made.elapsed() < LEAF_REUSE {
                    return Ok(config.clone());
                }
            }
        }
        let config = ca.mint(host)?;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            entries.retain(|_, (_, made)| made.elapsed() < LEAF_REUSE);
            if entries.len() >= self.capacity {
                // Evict the oldest: the bound matters more than the hit rate.
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, (_, made))| *made)
                    .map(|(h, _)| h.clone())
                {
                    entries.remove(&oldest);
                }
            }
        }
        entries.insert(host.clone(), (config.clone(), Instant::now()));
        Ok(config)
    }
}
