//! Pulling images from OCI registries (the distribution protocol, through `oci-client`):
//! anonymous, token and basic auth; plain HTTP only for registries the operator marks
//! insecure; manifest lists resolved to linux/amd64; every layer unpacked safely into the
//! [`LayerStore`], shared with other images that have it.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use cordon_api::RunConfig;
use futures::StreamExt;
use oci_client::client::{
    linux_amd64_resolver, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::{DigestError, OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::error::IoContext;
use crate::image_config;
use crate::unpack::{unpack_layer, Budget, Compression};
use crate::{ImageError, LayerId, LayerStore};

/// How the server reaches registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// `host:port` of registries spoken to over plain HTTP (`--insecure-registry`).
    pub insecure_registries: Vec<String>,
    /// PEM certificates trusted for registries besides the system roots (`--registry-ca`).
    pub extra_root_pems: Vec<Vec<u8>>,
}

/// Basic-auth credentials for a private registry (also used to obtain a bearer token).
#[derive(Clone)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Bounds on what one image may cost the host (SECURITY.md row 8).
#[derive(Debug, Clone)]
pub struct UnpackLimits {
    /// Sum of the unpacked sizes of all layers (sparse files count at their full size).
    pub max_unpacked_bytes: u64,
    /// Entries over all layers.
    pub max_entries: u64,
    /// Compressed bytes downloaded or read over all layers.
    pub max_compressed_bytes: u64,
}

/// An image unpacked into the layer store.
#[derive(Debug, Clone)]
pub struct Image {
    /// Digest of the manifest that was pulled (`sha256:<hex>`).
    pub manifest_digest: String,
    /// Its layers, top first (like `SandboxSpec.layers`).
    pub layers: Vec<LayerId>,
    /// From the image config: `Env` → `env_vars`, `WorkingDir` → `work_dir`, `User` → `user`.
    pub run_config: RunConfig,
    /// Sum of the layers' unpacked sizes.
    pub size_bytes: u64,
}

/// Reading a config blob larger than this is refused (real ones are kilobytes).
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Images with more layers are refused (Docker itself stops at 127).
const MAX_LAYERS: usize = 128;
/// Time to open a connection (TCP and TLS) to a registry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence while reading a response; the whole pull is bounded by the caller.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Downloads go into `<store root>/.staging-<pid>-<random>/blob`: inside the store, so a
/// crash leaves debris only there, named like the store's own staging dirs so that the next
/// [`LayerStore::open`] removes what a dead process left.
const DOWNLOAD_PREFIX: &str = ".staging-";

const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

/// Pulls `reference` (e.g. `127.0.0.1:5000/tools/busybox:1`, `python:3.12-slim`) into `store`.
///
/// Layers the store already has are not downloaded again. Every network operation has
/// connect and read timeouts; the caller bounds the whole pull (e.g. `tokio::time::timeout`).
pub async fn pull_image(
    store: &LayerStore,
    reference: &str,
    registry: &RegistryConfig,
    credentials: Option<&RegistryCredentials>,
    limits: &UnpackLimits,
) -> Result<Image, ImageError> {
    let remote = Remote::new(reference, registry, credentials)?;
    let (manifest, manifest_digest) = remote.linux_amd64_manifest().await?;
    let config = image_config::parse(&remote.config_blob(&manifest.config).await?)?;
    let layers = plan_layers(&remote, &manifest, &config.diff_ids, limits)?;

    let mut budget = Budget {
        unpacked_bytes: limits.max_unpacked_bytes,
        entries: limits.max_entries,
    };
    let mut unpacked = Vec::with_capacity(layers.len());
    let mut size_bytes = 0u64;
    for layer in &layers {
        let (id, size) = remote.fetch_layer(store, layer, &mut budget).await?;
        size_bytes = size_bytes.saturating_add(size);
        unpacked.push(id);
    }
    unpacked.reverse();
    info!(reference = %remote.reference, %manifest_digest, layers = unpacked.len(), size_bytes, "image pulled");
    Ok(Image {
        manifest_digest,
        layers: unpacked,
        run_config: config.run_config,
        size_bytes,
    })
}

/// One layer to fetch, checked against the manifest and the config before any download.
struct LayerPlan<'a> {
    descriptor: &'a OciDescriptor,
    compression: Compression,
    diff_id: &'a str,
    id: LayerId,
}

/// Pairs the manifest's layers with the config's diff ids (bottom first) and refuses, before
/// downloading anything, what could never be unpacked or would exceed the compressed budget.
fn plan_layers<'a>(
    remote: &Remote,
    manifest: &'a OciImageManifest,
    diff_ids: &'a [String],
    limits: &UnpackLimits,
) -> Result<Vec<LayerPlan<'a>>, ImageError> {
    let invalid = |reason: String| {
        ImageError::InvalidImage(format!("manifest of {}: {reason}", remote.reference))
    };
    if manifest.layers.len() != diff_ids.len() {
        return Err(invalid(format!(
            "the manifest lists {} layers but the config {} diff ids",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    if manifest.layers.len() > MAX_LAYERS {
        return Err(invalid(format!(
            "{} layers (at most {MAX_LAYERS} are supported)",
            manifest.layers.len()
        )));
    }
    let mut compressed_total = 0u64;
    let mut plans = Vec::with_capacity(diff_ids.len());
    for (descriptor, diff_id) in manifest.layers.iter().zip(diff_ids) {
        compressed_total = compressed_total.saturating_add(declared_size(remote, descriptor)?);
        plans.push(LayerPlan {
            descriptor,
            compression: layer_compression(descriptor)?,
            diff_id,
            id: LayerId::from_diff_id(diff_id)?,
        });
    }
    if compressed_total > limits.max_compressed_bytes {
        return Err(ImageError::LimitExceeded(format!(
            "its compressed layers have {compressed_total} bytes, more than the limit of {}",
            limits.max_compressed_bytes
        )));
    }
    Ok(plans)
}

/// The descriptor's size, which a registry must honour exactly.
fn declared_size(remote: &Remote, descriptor: &OciDescriptor) -> Result<u64, ImageError> {
    u64::try_from(descriptor.size).map_err(|_| {
        ImageError::InvalidImage(format!(
            "manifest of {}: blob {} has negative size {}",
            remote.reference, descriptor.digest, descriptor.size
        ))
    })
}

/// How a layer blob is compressed, from its media type; foreign and unknown types refused.
fn layer_compression(descriptor: &OciDescriptor) -> Result<Compression, ImageError> {
    let unsupported = |why| ImageError::UnsupportedLayer {
        digest: descriptor.digest.clone(),
        media_type: descriptor.media_type.clone(),
        why,
    };
    let media_type = descriptor.media_type.as_str();
    if media_type.contains("nondistributable")
        || media_type.contains("foreign")
        || descriptor
            .urls
            .as_ref()
            .is_some_and(|urls| !urls.is_empty())
    {
        return Err(unsupported(
            " (a foreign, non-distributable layer that is fetched from elsewhere than the \
             registry; those are not supported)",
        ));
    }
    match media_type {
        OCI_LAYER_TAR => Ok(Compression::None),
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Ok(Compression::Gzip),
        OCI_LAYER_ZSTD | DOCKER_LAYER_ZSTD => Ok(Compression::Zstd),
        _ => Err(unsupported(
            " (supported: OCI tar, tar+gzip, tar+zstd and Docker rootfs.diff.tar.gzip)",
        )),
    }
}

/// A downloaded blob, removed with its directory when dropped.
struct Download {
    dir: tempfile::TempDir,
    path: PathBuf,
}

/// One image in one registry, and a client configured to reach it.
struct Remote {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    /// `host[:port]` as the client resolves it (`index.docker.io` for Docker Hub).
    registry: String,
}

impl Remote {
    fn new(
        reference: &str,
        config: &RegistryConfig,
        credentials: Option<&RegistryCredentials>,
    ) -> Result<Remote, ImageError> {
        let parsed: Reference =
            reference
                .trim()
                .parse()
                .map_err(
                    |error: oci_client::ParseError| ImageError::InvalidReference {
                        reference: reference.to_string(),
                        reason: error.to_string(),
                    },
                )?;
        let registry = parsed.resolve_registry().to_string();
        Ok(Remote {
            client: registry_client(config, &registry)?,
            auth: match credentials {
                Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
                None => RegistryAuth::Anonymous,
            },
            reference: parsed,
            registry,
        })
    }

    /// The image manifest to run: the reference's own, or its linux/amd64 entry when it names
    /// an index (manifest list). Returns it with its digest.
    async fn linux_amd64_manifest(&self) -> Result<(OciImageManifest, String), ImageError> {
        let (manifest, digest) = self
            .client
            .pull_manifest(&self.reference, &self.auth)
            .await
            .map_err(|e| self.classify(e))?;
        let index = match manifest {
            OciManifest::Image(manifest) => return Ok((manifest, digest)),
            OciManifest::ImageIndex(index) => index,
        };
        let Some(platform_digest) = linux_amd64_resolver(&index.manifests) else {
            return Err(ImageError::NoLinuxAmd64 {
                reference: self.reference.whole(),
                available: describe_platforms(&index.manifests),
            });
        };
        let by_digest = self.reference.clone_with_digest(platform_digest.clone());
        match self
            .client
            .pull_manifest(&by_digest, &self.auth)
            .await
            .map_err(|e| self.classify(e))?
        {
            (OciManifest::Image(manifest), _) => Ok((manifest, platform_digest)),
            (OciManifest::ImageIndex(_), _) => Err(ImageError::InvalidImage(format!(
                "index of {}: its linux/amd64 entry {platform_digest} is another index",
                self.reference
            ))),
        }
    }

    /// The config blob, bounded and verified against its digest.
    async fn config_blob(&self, descriptor: &OciDescriptor) -> Result<Vec<u8>, ImageError> {
        let size = declared_size(self, descriptor)?;
        if size > MAX_CONFIG_BYTES {
            return Err(ImageError::LimitExceeded(format!(
                "its config has {size} bytes, more than the limit of {MAX_CONFIG_BYTES}"
            )));
        }
        let mut config = Vec::with_capacity(size as usize);
        self.stream_blob(descriptor, size, &mut config).await?;
        Ok(config)
    }

    /// The layer in the store: found there, or downloaded and unpacked.
    async fn fetch_layer(
        &self,
        store: &LayerStore,
        layer: &LayerPlan<'_>,
        budget: &mut Budget,
    ) -> Result<(LayerId, u64), ImageError> {
        if store.contains(&layer.id) {
            // Already on the host: it costs nothing new, so it is not charged to the budget.
            debug!(layer = %layer.id, "layer already in the store; not downloading it");
            return Ok((layer.id.clone(), store.layer_info(&layer.id)?.size_bytes));
        }
        let download = self.download_layer(store, layer.descriptor).await?;
        let mut blob = std::fs::File::open(&download.path)
            .context(|| format!("open {}", download.path.display()))?;
        let unpacked = run_blocking(|| {
            unpack_layer(
                store,
                &mut io::BufReader::new(&mut blob),
                layer.compression,
                layer.diff_id,
                budget,
            )
        });
        if let Err(error) = download.dir.close() {
            warn!(%error, "could not remove a downloaded layer blob");
        }
        unpacked
    }

    /// Downloads a layer blob into a private directory inside the store root.
    async fn download_layer(
        &self,
        store: &LayerStore,
        descriptor: &OciDescriptor,
    ) -> Result<Download, ImageError> {
        let size = declared_size(self, descriptor)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DOWNLOAD_PREFIX}{}-", std::process::id()))
            .tempdir_in(store.root())
            .context(|| format!("create a download dir in {}", store.root().display()))?;
        let path = dir.path().join("blob");
        let file =
            std::fs::File::create_new(&path).context(|| format!("create {}", path.display()))?;
        let mut out = tokio::io::BufWriter::new(tokio::fs::File::from_std(file));
        info!(digest = %descriptor.digest, size, "downloading layer");
        self.stream_blob(descriptor, size, &mut out).await?;
        out.flush()
            .await
            .context(|| format!("write {}", path.display()))?;
        Ok(Download { dir, path })
    }

    /// Streams a blob into `out`, refusing more or fewer bytes than `size` and content that
    /// does not match its digest.
    async fn stream_blob(
        &self,
        descriptor: &OciDescriptor,
        size: u64,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<(), ImageError> {
        self.client
            .store_auth_if_needed(&self.registry, &self.auth)
            .await;
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, descriptor)
            .await
            .map_err(|e| self.classify(e))?;
        let mut received = 0u64;
        // The client verifies the digest when the stream ends (its last item is the error).
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.classify_stream_error(&descriptor.digest, e))?;
            received = received.saturating_add(chunk.len() as u64);
            if received > size {
                return Err(self.size_mismatch(descriptor, "more"));
            }
            out.write_all(&chunk)
                .await
                .context(|| format!("write blob {}", descriptor.digest))?;
        }
        if received != size {
            return Err(self.size_mismatch(descriptor, "fewer"));
        }
        Ok(())
    }

    fn size_mismatch(&self, descriptor: &OciDescriptor, more_or_fewer: &str) -> ImageError {
        ImageError::RegistryProtocol {
            registry: self.registry.clone(),
            detail: format!(
                "it sent {more_or_fewer} bytes of blob {} than the {} its manifest declares",
                descriptor.digest, descriptor.size
            ),
        }
    }

    /// A user-facing error for what the client reported.
    fn classify(&self, error: OciDistributionError) -> ImageError {
        let registry = self.registry.clone();
        let reference = self.reference.whole();
        match error {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => ImageError::RegistryUnauthorized {
                registry,
                reference,
            },
            OciDistributionError::RegistryError { envelope, .. } => {
                self.classify_envelope(envelope)
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 | 403 => ImageError::RegistryUnauthorized {
                    registry,
                    reference,
                },
                404 => ImageError::ImageNotFound {
                    registry,
                    reference,
                    detail: truncated(&message),
                },
                _ => ImageError::RegistryProtocol {
                    registry,
                    detail: format!("HTTP {code}: {}", truncated(&message)),
                },
            },
            OciDistributionError::RequestError(error) => self.classify_transport(&error),
            OciDistributionError::DigestError(error) => {
                self.digest_error(&format!("manifest of {reference}"), &error)
            }
            OciDistributionError::IoError(error) => self.classify_transport(&error),
            other => ImageError::RegistryProtocol {
                registry,
                detail: truncated(&other.to_string()),
            },
        }
    }

    fn classify_envelope(&self, envelope: OciEnvelope) -> ImageError {
        let (registry, reference) = (self.registry.clone(), self.reference.whole());
        let detail = truncated(
            &envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        );
        let has = |code: OciErrorCode| envelope.errors.iter().any(|e| e.code == code);
        if has(OciErrorCode::Unauthorized) || has(OciErrorCode::Denied) {
            ImageError::RegistryUnauthorized {
                registry,
                reference,
            }
        } else if has(OciErrorCode::ManifestUnknown)
            || has(OciErrorCode::NameUnknown)
            || has(OciErrorCode::BlobUnknown)
        {
            ImageError::ImageNotFound {
                registry,
                reference,
                detail,
            }
        } else {
            ImageError::RegistryProtocol { registry, detail }
        }
    }

    /// Connection-level failures: TLS (and its special case, a plain-HTTP registry reached
    /// over HTTPS), timeouts, refused connections.
    fn classify_transport(&self, error: &(dyn StdError + 'static)) -> ImageError {
        let registry = self.registry.clone();
        if let Some(tls) = error_chain(error).find_map(|e| e.downcast_ref::<rustls::Error>()) {
            return match tls {
                // An HTTP answer read as TLS records.
                rustls::Error::InvalidMessage(_) => ImageError::RegistryPlainHttp { registry },
                rustls::Error::InvalidCertificate(_) => ImageError::RegistryTls {
                    registry,
                    detail: format!(
                        "{tls} (a registry with a certificate from a private CA needs that CA \
                         configured: cordon serve --registry-ca FILE)"
                    ),
                },
                other => ImageError::RegistryTls {
                    registry,
                    detail: other.to_string(),
                },
            };
        }
        ImageError::RegistryUnreachable {
            registry,
            detail: describe_chain(error),
        }
    }

    fn classify_stream_error(&self, digest: &str, error: io::Error) -> ImageError {
        let mismatch = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<DigestError>());
        match mismatch {
            Some(mismatch) => self.digest_error(&format!("blob {digest}"), mismatch),
            None => self.classify_transport(&error),
        }
    }

    fn digest_error(&self, what: &str, error: &DigestError) -> ImageError {
        match error {
            DigestError::VerificationError { expected, actual } => ImageError::DigestMismatch {
                what: format!("{what} from registry {}", self.registry),
                expected: expected.clone(),
                actual: actual.clone(),
            },
            other => ImageError::RegistryProtocol {
                registry: self.registry.clone(),
                detail: format!("{what}: {other}"),
            },
        }
    }
}

/// A client that speaks HTTPS (verified against the system roots plus the configured ones)
/// to every registry but those marked insecure, with connect and read timeouts.
fn registry_client(config: &RegistryConfig, registry: &str) -> Result<Client, ImageError> {
    install_crypto_provider();
    let mut roots = Vec::with_capacity(config.extra_root_pems.len());
    for pem in &config.extra_root_pems {
        roots.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data: pem.clone(),
        });
    }
    let client_config = ClientConfig {
        protocol: ClientProtocol::HttpsExcept(config.insecure_registries.clone()),
        extra_root_certificates: roots,
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        max_concurrent_download: 1,
        ..ClientConfig::default()
    };
    // `Client::new` would fall back to a default configuration on error, dropping our roots
    // and timeouts; building it fallibly keeps a bad CA a clear error.
    Client::try_from(client_config).map_err(|error| ImageError::RegistryTls {
        registry: registry.to_string(),
        detail: format!("configuring the registry client: {error}"),
    })
}

/// TLS needs a process-wide crypto provider; ours is `ring` unless one was installed already.
fn install_crypto_provider() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // An error means another provider is installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Runs blocking work (unpacking) without stalling a multi-threaded runtime's other tasks.
fn run_blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// The platforms an index offers, for the error that none is linux/amd64.
fn describe_platforms(entries: &[ImageIndexEntry]) -> String {
    let platforms: Vec<String> = entries
        .iter()
        .map(|entry| match &entry.platform {
            Some(p) => match &p.variant {
                Some(variant) => format!("{}/{}/{variant}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "unspecified".to_string(),
        })
        .collect();
    if platforms.is_empty() {
        "none".to_string()
    } else {
        platforms.join(", ")
    }
}

/// `error` and its sources, looking inside `io::Error`s (whose `source` skips the error they
/// wrap, e.g. a rustls error).
fn error_chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(
        Some(error),
        |&current: &&'a (dyn StdError + 'static)| match current
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => current.source(),
        },
    )
}

/// Every message in the chain once, outermost first.
fn describe_chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for message in error_chain(error).map(|e| e.to_string()) {
        if !parts.iter().any(|part| part.contains(&message)) {
            parts.push(message);
        }
    }
    truncated(&parts.join(": "))
}

/// Registry-provided text, cut to a length fit for a status message.
fn truncated(text: &str) -> String {
    const MAX_CHARS: usize = 300;
    let text = text.trim();
    match text.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(media_type: &str) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.to_string(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 10,
            ..OciDescriptor::default()
        }
    }

    #[test]
    fn layer_media_types_map_to_compressions() {
        for (media_type, compression) in [
            (OCI_LAYER_TAR, Compression::None),
            (OCI_LAYER_GZIP, Compression::Gzip),
            (OCI_LAYER_ZSTD, Compression::Zstd),
            (DOCKER_LAYER_GZIP, Compression::Gzip),
        ] {
            assert_eq!(
                layer_compression(&descriptor(media_type)).unwrap(),
                compression
            );
        }
    }

    #[test]
    fn foreign_and_unknown_layers_are_refused() {
        for media_type in [
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            "application/octet-stream",
        ] {
            let error = layer_compression(&descriptor(media_type)).unwrap_err();
            assert!(
                matches!(error, ImageError::UnsupportedLayer { .. }),
                "{media_type}: {error}"
            );
        }
        let mut with_urls = descriptor(OCI_LAYER_GZIP);
        with_urls.urls = Some(vec!["https://example.invalid/blob".into()]);
        assert!(layer_compression(&with_urls).is_err());
    }

    #[test]
    fn docker_hub_short_names_are_normalised() {
        let remote = Remote::new("python:3.12-slim", &RegistryConfig::default(), None).unwrap();
        assert_eq!(remote.registry, "index.docker.io");
        assert_eq!(remote.reference.repository(), "library/python");
        assert_eq!(remote.reference.tag(), Some("3.12-slim"));
        assert!(matches!(
            Remote::new("UPPER/Case:tag", &RegistryConfig::default(), None),
            Err(ImageError::InvalidReference { .. })
        ));
    }

    #[test]
    fn long_registry_text_is_truncated() {
        assert_eq!(truncated("  short  "), "short");
        assert_eq!(truncated(&"é".repeat(1000)).chars().count(), 301);
    }
}
