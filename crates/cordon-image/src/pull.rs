//! Pulling images from OCI registries (the distribution protocol, spoken here over `reqwest`;
//! `oci-client` gives the reference and manifest types): anonymous, token and basic auth;
//! plain HTTP only for registries the operator marks insecure; manifest lists resolved to
//! linux/amd64; every layer unpacked safely into the [`LayerStore`], shared with other images
//! that have it.
//!
//! The registry is chosen by the tenant, so it is treated as hostile: every body it sends is
//! read against a bound (manifests 4 MiB, token answers 1 MiB, error bodies cut at 64 KiB,
//! blobs to their declared size), and every connection the pull makes (registry, token realm,
//! redirects) goes to public addresses only, checked on the resolved address actually used
//! (`cordon_proxy::classify_ip`), unless the operator named the registry:
//! `--insecure-registry` (plain HTTP, any address) or `--internal-registry` (HTTPS, any
//! address). Only the named registry's own host is exempt, never its realm or redirects
//! elsewhere.

use std::error::Error as StdError;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use cordon_api::RunConfig;
use oci_client::client::linux_amd64_resolver;
use oci_client::errors::{OciEnvelope, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::Reference;
use sha2::{Digest, Sha256};
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
    /// `host[:port]` of HTTPS registries allowed on internal addresses (loopback, private,
    /// link-local...: `--internal-registry`). Insecure registries are allowed there too; any
    /// other registry, token realm or redirect target must resolve to public addresses.
    pub internal_registries: Vec<String>,
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
/// Largest manifest or index read (Docker's own limit is 4 MiB as well).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest token-endpoint answer read (real ones are a few KiB).
const MAX_TOKEN_BYTES: u64 = 1 << 20;
/// Most of an error answer's body read for its message; the rest is never read.
const MAX_ERROR_BODY_BYTES: u64 = 64 << 10;
/// Redirects followed for one request (blob downloads are commonly sent to a CDN).
const MAX_REDIRECTS: usize = 5;
/// Parameters parsed from one `WWW-Authenticate` challenge.
const MAX_CHALLENGE_PARAMS: usize = 16;
/// The manifest types a pull accepts (Docker schema 1 is not among them).
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
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

/// How the pull authenticates: learned from the registry's first challenge (a 401 with
/// `WWW-Authenticate`), then sent with every later request of the pull.
enum Authorization {
    Basic(RegistryCredentials),
    Bearer(String),
}

/// One image in one registry, and a client configured to reach it.
///
/// The distribution protocol is spoken here rather than through `oci-client`'s `Client`,
/// which reads manifests, token answers and error bodies whole into memory: a registry is
/// chosen by the tenant, so every body it sends is read against a bound, and every address
/// it (or its token realm, or a redirect) leads to passes [`AddressGuard`].
struct Remote {
    http: reqwest::Client,
    reference: Reference,
    credentials: Option<RegistryCredentials>,
    /// `host[:port]` as references name it (`index.docker.io` for Docker Hub).
    registry: String,
    /// `https://host[:port]`, or `http://…` for a registry marked insecure.
    base: String,
    guard: AddressGuard,
    /// `None` until a challenge was answered.
    authorization: Mutex<Option<Arc<Authorization>>>,
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
        let insecure = config.insecure_registries.contains(&registry);
        let base = format!("{}://{registry}", if insecure { "http" } else { "https" });
        let host = reqwest::Url::parse(&base)
            .ok()
            .and_then(|url| url.host_str().map(bare_host))
            .ok_or_else(|| ImageError::InvalidReference {
                reference: reference.to_string(),
                reason: format!("{registry:?} is not a registry host"),
            })?;
        let trusted = insecure || config.internal_registries.contains(&registry);
        let guard = AddressGuard {
            trusted_host: trusted.then_some(host),
            plain_http_allowed: insecure,
        };
        Ok(Remote {
            http: registry_client(config, &registry, &guard)?,
            credentials: credentials.cloned(),
            reference: parsed,
            registry,
            base,
            guard,
            authorization: Mutex::new(None),
        })
    }

    /// The image manifest to run: the reference's own, or its linux/amd64 entry when it names
    /// an index (manifest list). Returns it with its digest.
    async fn linux_amd64_manifest(&self) -> Result<(OciImageManifest, String), ImageError> {
        let (manifest, digest) = self.manifest(&self.reference).await?;
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
        match self.manifest(&by_digest).await? {
            (OciManifest::Image(manifest), _) => Ok((manifest, platform_digest)),
            (OciManifest::ImageIndex(_), _) => Err(ImageError::InvalidImage(format!(
                "index of {}: its linux/amd64 entry {platform_digest} is another index",
                self.reference
            ))),
        }
    }

    /// One manifest or index (at most [`MAX_MANIFEST_BYTES`]), checked against the digest
    /// the reference names; returned with its digest.
    async fn manifest(&self, reference: &Reference) -> Result<(OciManifest, String), ImageError> {
        let tag_or_digest = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = format!(
            "{}/v2/{}/manifests/{tag_or_digest}",
            self.base,
            reference.repository()
        );
        let response = self.get(&url, Some(MANIFEST_ACCEPT)).await?;
        if !response.status().is_success() {
            return Err(self.error_response(response).await);
        }
        let body = self
            .read_bounded(response, MAX_MANIFEST_BYTES, "manifest")
            .await?;
        let digest = format!("sha256:{}", hex_encode(&Sha256::digest(&body)));
        if let Some(expected) = reference.digest() {
            if expected != digest {
                return Err(ImageError::DigestMismatch {
                    what: format!(
                        "manifest of {} from registry {}",
                        reference.whole(),
                        self.registry
                    ),
                    expected: expected.to_string(),
                    actual: digest,
                });
            }
        }
        Ok((self.parse_manifest(reference, &body)?, digest))
    }

    fn parse_manifest(
        &self,
        reference: &Reference,
        body: &[u8],
    ) -> Result<OciManifest, ImageError> {
        #[derive(serde::Deserialize)]
        struct Versioned {
            #[serde(rename = "schemaVersion")]
            schema_version: u32,
        }
        let invalid = |why: String| {
            ImageError::InvalidImage(format!("manifest of {}: {why}", reference.whole()))
        };
        let versioned: Versioned =
            serde_json::from_slice(body).map_err(|e| invalid(truncated(&e.to_string())))?;
        if versioned.schema_version != 2 {
            return Err(invalid(format!(
                "schema version {} (only version 2 manifests are supported)",
                versioned.schema_version
            )));
        }
        serde_json::from_slice(body).map_err(|e| invalid(truncated(&e.to_string())))
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
    /// does not match its (sha256) digest.
    async fn stream_blob(
        &self,
        descriptor: &OciDescriptor,
        size: u64,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<(), ImageError> {
        let digest = &descriptor.digest;
        if !is_sha256_digest(digest) {
            return Err(ImageError::InvalidImage(format!(
                "manifest of {}: blob digest {digest:?} is not a sha256 digest (the only \
                 algorithm supported)",
                self.reference
            )));
        }
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            self.base,
            self.reference.repository()
        );
        let mut response = self.get(&url, None).await?;
        if !response.status().is_success() {
            return Err(self.error_response(response).await);
        }
        if let Some(declared) = response.content_length() {
            if declared != size {
                let more_or_fewer = if declared > size { "more" } else { "fewer" };
                return Err(self.size_mismatch(descriptor, more_or_fewer));
            }
        }
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.classify_transport(&e))?
        {
            received = received.saturating_add(chunk.len() as u64);
            if received > size {
                return Err(self.size_mismatch(descriptor, "more"));
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .context(|| format!("write blob {digest}"))?;
        }
        if received != size {
            return Err(self.size_mismatch(descriptor, "fewer"));
        }
        let actual = format!("sha256:{}", hex_encode(&hasher.finalize()));
        if &actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {digest} from registry {}", self.registry),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// A GET with the pull's authorization. A 401 is a challenge: it is answered (basic
    /// credentials, or a bearer token from the realm) and the request sent once more. A
    /// bearer token is fetched again when a later request is refused (tokens expire, often
    /// within minutes, and a pull can take longer); refused basic credentials are final.
    async fn get(&self, url: &str, accept: Option<&str>) -> Result<reqwest::Response, ImageError> {
        let response = self.send(url, accept).await?;
        let may_answer = !matches!(
            self.current_auth().as_deref(),
            Some(Authorization::Basic(_))
        );
        if response.status() != reqwest::StatusCode::UNAUTHORIZED || !may_answer {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .map(Challenge::parse);
        // Its body is never read: dropping the response closes the connection.
        drop(response);
        let Some(challenge) = challenge else {
            return Err(self.protocol_error(
                "it answered 401 without a WWW-Authenticate challenge".to_string(),
            ));
        };
        let authorization = self.answer(&challenge).await?;
        *self.authorization.lock().expect("authorization lock") = Some(Arc::new(authorization));
        self.send(url, accept).await
    }

    fn current_auth(&self) -> Option<Arc<Authorization>> {
        self.authorization
            .lock()
            .expect("authorization lock")
            .clone()
    }

    async fn send(&self, url: &str, accept: Option<&str>) -> Result<reqwest::Response, ImageError> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| self.protocol_error(format!("bad URL {url:?}: {e}")))?;
        self.guard
            .check_url(&url)
            .map_err(|refused| self.refused(refused))?;
        let mut request = self.http.get(url);
        if let Some(accept) = accept {
            request = request.header(reqwest::header::ACCEPT, accept);
        }
        request = match self.current_auth().as_deref() {
            Some(Authorization::Basic(c)) => request.basic_auth(&c.username, Some(&c.password)),
            Some(Authorization::Bearer(token)) => request.bearer_auth(token),
            None => request,
        };
        request
            .send()
            .await
            .map_err(|e| self.classify_transport(&e))
    }

    /// What the registry's challenge asks for: basic credentials (when the pull has some)
    /// or a bearer token.
    async fn answer(&self, challenge: &Challenge) -> Result<Authorization, ImageError> {
        match challenge.scheme.to_ascii_lowercase().as_str() {
            "basic" => self
                .credentials
                .clone()
                .map(Authorization::Basic)
                .ok_or_else(|| self.unauthorized()),
            "bearer" => self.fetch_token(challenge).await.map(Authorization::Bearer),
            other => Err(self.protocol_error(format!(
                "unsupported authentication scheme {:?}",
                truncated(other)
            ))),
        }
    }

    /// A pull token from the challenge's realm (with the credentials, if any), its answer
    /// read to at most [`MAX_TOKEN_BYTES`].
    async fn fetch_token(&self, challenge: &Challenge) -> Result<String, ImageError> {
        let realm = challenge
            .param("realm")
            .ok_or_else(|| self.protocol_error("a Bearer challenge without a realm".into()))?;
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| self.protocol_error(format!("token realm {:?}: {e}", truncated(realm))))?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                query.append_pair("service", service);
            }
            let scope = format!("repository:{}:pull", self.reference.repository());
            query.append_pair("scope", &scope);
        }
        self.guard
            .check_url(&url)
            .map_err(|refused| self.refused(refused))?;
        let mut request = self.http.get(url);
        if let Some(c) = &self.credentials {
            request = request.basic_auth(&c.username, Some(&c.password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.classify_transport(&e))?;
        match response.status() {
            status if status.is_success() => {}
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                return Err(self.unauthorized())
            }
            _ => return Err(self.error_response(response).await),
        }
        let body = self
            .read_bounded(response, MAX_TOKEN_BYTES, "token answer")
            .await?;
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            self.protocol_error(format!("token answer: {}", truncated(&e.to_string())))
        })?;
        answer
            .token
            .or(answer.access_token)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| self.protocol_error("a token answer without a token".into()))
    }

    /// A whole body of at most `limit` bytes; a longer one (declared or sent) is refused
    /// without reading past the limit.
    async fn read_bounded(
        &self,
        mut response: reqwest::Response,
        limit: u64,
        what: &str,
    ) -> Result<Vec<u8>, ImageError> {
        let too_large = || self.protocol_error(format!("its {what} exceeds {limit} bytes"));
        if response.content_length().is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.classify_transport(&e))?
        {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The error a non-success answer stands for, from its status and the first
    /// [`MAX_ERROR_BODY_BYTES`] of its body (an OCI error envelope, or text).
    async fn error_response(&self, mut response: reqwest::Response) -> ImageError {
        let status = response.status();
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            let room = MAX_ERROR_BODY_BYTES as usize - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() as u64 >= MAX_ERROR_BODY_BYTES {
                break;
            }
        }
        if let Ok(envelope) = serde_json::from_slice::<OciEnvelope>(&body) {
            if !envelope.errors.is_empty() {
                return self.classify_envelope(envelope);
            }
        }
        let text = truncated(&String::from_utf8_lossy(&body));
        match status.as_u16() {
            401 | 403 => self.unauthorized(),
            404 => ImageError::ImageNotFound {
                registry: self.registry.clone(),
                reference: self.reference.whole(),
                detail: text,
            },
            code => self.protocol_error(format!("HTTP {code}: {text}")),
        }
    }

    fn unauthorized(&self) -> ImageError {
        ImageError::RegistryUnauthorized {
            registry: self.registry.clone(),
            reference: self.reference.whole(),
        }
    }

    fn protocol_error(&self, detail: String) -> ImageError {
        ImageError::RegistryProtocol {
            registry: self.registry.clone(),
            detail,
        }
    }

    fn refused(&self, refused: AddressRefused) -> ImageError {
        ImageError::RegistryUnreachable {
            registry: self.registry.clone(),
            detail: refused.to_string(),
        }
    }

    fn size_mismatch(&self, descriptor: &OciDescriptor, more_or_fewer: &str) -> ImageError {
        self.protocol_error(format!(
            "it sent {more_or_fewer} bytes of blob {} than the {} its manifest declares",
            descriptor.digest, descriptor.size
        ))
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

    /// Connection-level failures: an address the guard refused, TLS (and its special case,
    /// a plain-HTTP registry reached over HTTPS), timeouts, refused connections.
    fn classify_transport(&self, error: &(dyn StdError + 'static)) -> ImageError {
        let registry = self.registry.clone();
        if let Some(refused) = error_chain(error).find_map(|e| e.downcast_ref::<AddressRefused>()) {
            return ImageError::RegistryUnreachable {
                registry,
                detail: refused.to_string(),
            };
        }
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
}

/// A `WWW-Authenticate` challenge: `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses the scheme and its `key=value` / `key="quoted, value"` parameters; anything
    /// malformed ends the parameters (a missing realm is reported by the caller).
    fn parse(header: &str) -> Challenge {
        let header = header.trim();
        let (scheme, mut rest) = header.split_once(' ').unwrap_or((header, ""));
        let mut params = Vec::new();
        while params.len() < MAX_CHALLENGE_PARAMS {
            rest = rest.trim_start_matches([' ', ',']);
            let Some((key, after)) = rest.split_once('=') else {
                break;
            };
            let (value, after) = match after.strip_prefix('"') {
                Some(quoted) => match quoted.split_once('"') {
                    Some((value, after)) => (value, after),
                    None => break,
                },
                None => after.split_once(',').unwrap_or((after, "")),
            };
            params.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
            rest = after;
        }
        Challenge {
            scheme: scheme.to_string(),
            params,
        }
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Where a pull may connect: the registry's own host anywhere when the operator named it
/// (`--insecure-registry`, `--internal-registry`); every other host (an untrusted registry,
/// a token realm, a redirect target) only to public addresses, checked on the addresses
/// actually connected to (the resolver below), so DNS rebinding gains nothing.
#[derive(Debug, Clone)]
struct AddressGuard {
    /// Host of a registry the operator named, lowercase, without brackets or port.
    trusted_host: Option<String>,
    /// Plain-HTTP URLs (the registry, its realm, redirects) only for insecure registries.
    plain_http_allowed: bool,
}

/// Why the guard refused a URL or an address.
#[derive(Debug, thiserror::Error)]
enum AddressRefused {
    #[error(
        "refused to connect: {host} is {ip}, a {class} address; a registry on an internal \
         address must be named by the operator (cordon serve --internal-registry HOST:PORT, \
         or --insecure-registry for plain HTTP)"
    )]
    Internal {
        host: String,
        ip: IpAddr,
        class: &'static str,
    },
    #[error("refused {0}: only https URLs are followed for a registry not marked insecure")]
    Scheme(String),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
}

impl AddressGuard {
    /// The URL's scheme, and its host when that is an IP literal (which never reaches the
    /// resolver).
    fn check_url(&self, url: &reqwest::Url) -> Result<(), AddressRefused> {
        match url.scheme() {
            "https" => {}
            "http" if self.plain_http_allowed => {}
            _ => {
                let without_query = url.as_str().split(['?', '#']).next().unwrap_or_default();
                return Err(AddressRefused::Scheme(truncated(without_query)));
            }
        }
        let host = url.host_str().map(bare_host).unwrap_or_default();
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.check_ip(&host, ip)?;
        }
        Ok(())
    }

    fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), AddressRefused> {
        if self.trusted_host.as_deref() == Some(host) {
            return Ok(());
        }
        match cordon_proxy::classify_ip(ip) {
            Some(class) => Err(AddressRefused::Internal {
                host: host.to_string(),
                ip,
                class,
            }),
            None => Ok(()),
        }
    }
}

impl reqwest::dns::Resolve for AddressGuard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.clone();
        let host = bare_host(name.as_str());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            // One internal answer refuses the name: a mixed answer is a rebinding attempt.
            for addr in &addrs {
                guard.check_ip(&host, addr.ip())?;
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A URL host as the guard compares it: lowercase, IPv6 without brackets.
fn bare_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

fn is_sha256_digest(digest: &str) -> bool {
    digest
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A client that speaks HTTPS (verified against the system roots plus the configured ones)
/// to every registry but those marked insecure, with connect and read timeouts, resolving
/// and redirecting only through the guard. Proxy environment variables are ignored: a proxy
/// would resolve names itself, out of the guard's reach.
fn registry_client(
    config: &RegistryConfig,
    registry: &str,
    guard: &AddressGuard,
) -> Result<reqwest::Client, ImageError> {
    install_crypto_provider();
    let tls_error = |detail: String| ImageError::RegistryTls {
        registry: registry.to_string(),
        detail: format!("configuring the registry client: {detail}"),
    };
    let mut roots = Vec::with_capacity(config.extra_root_pems.len());
    for pem in &config.extra_root_pems {
        roots.extend(
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| tls_error(e.to_string()))?,
        );
    }
    let redirect_guard = guard.clone();
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(AddressRefused::TooManyRedirects);
        }
        match redirect_guard.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    });
    reqwest::Client::builder()
        .dns_resolver(Arc::new(guard.clone()))
        .redirect(redirects)
        .no_proxy()
        .tls_certs_merge(roots)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .user_agent(concat!("cordon/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| tls_error(describe_chain(&e)))
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
    fn challenges_are_parsed_with_quoted_commas() {
        let challenge = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(challenge.scheme, "Bearer");
        assert_eq!(challenge.param("realm"), Some("https://auth.example/token"));
        assert_eq!(challenge.param("service"), Some("registry.example"));
        assert_eq!(challenge.param("scope"), Some("repository:a/b:pull,push"));
        let basic = Challenge::parse(r#"Basic realm="Registry Realm""#);
        assert_eq!(basic.scheme, "Basic");
        assert_eq!(basic.param("realm"), Some("Registry Realm"));
        assert!(Challenge::parse(r#"Bearer realm="unterminated"#)
            .param("realm")
            .is_none());
    }

    #[test]
    fn the_guard_refuses_internal_literals_and_downgrades() {
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        let strict = AddressGuard {
            trusted_host: None,
            plain_http_allowed: false,
        };
        for internal in [
            "https://169.254.169.254/",
            "https://10.1.2.3/",
            "https://[::1]:5000/",
            "https://[::ffff:127.0.0.1]/",
        ] {
            assert!(
                matches!(
                    strict.check_url(&url(internal)),
                    Err(AddressRefused::Internal { .. })
                ),
                "{internal}"
            );
        }
        assert!(strict.check_url(&url("https://8.8.8.8/v2/")).is_ok());
        assert!(strict
            .check_url(&url("https://registry.example/v2/"))
            .is_ok());
        assert!(matches!(
            strict.check_url(&url("http://8.8.8.8/v2/?token=x")),
            Err(AddressRefused::Scheme(u)) if !u.contains("token")
        ));
        let trusted = AddressGuard {
            trusted_host: Some("::1".into()),
            plain_http_allowed: true,
        };
        assert!(trusted.check_url(&url("http://[::1]:5000/v2/")).is_ok());
        assert!(trusted
            .check_url(&url("http://127.0.0.1:5000/v2/"))
            .is_err());
    }

    #[test]
    fn long_registry_text_is_truncated() {
        assert_eq!(truncated("  short  "), "short");
        assert_eq!(truncated(&"é".repeat(1000)).chars().count(), 301);
    }
}
