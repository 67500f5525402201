use std::path::PathBuf;

/// Why an image could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("building images needs root (debootstrap installs packages as root)")]
    NotRoot,
    #[error("{0} is not installed (apt-get install {0})")]
    MissingTool(&'static str),
    #[error("`{command}` failed ({status}); its last output:\n{tail}")]
    CommandFailed {
        command: String,
        status: String,
        tail: String,
    },
    #[error("mounts remain under {path}: {mounts:?}; refusing to delete it")]
    MountsRemain { path: PathBuf, mounts: Vec<PathBuf> },
    #[error("snapshot metadata {path}: {source}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A layer entry that would escape the layer or is otherwise refused (SECURITY.md row 8).
    #[error("layer entry {entry:?} refused: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    /// An image or archive went past one of its bounds (`UnpackLimits`).
    #[error("image too large: {0}")]
    LimitExceeded(String),
    /// Content whose digest is not the one it is named by.
    #[error("{what}: digest mismatch (expected {expected}, got {actual})")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A malformed or unsupported image, manifest, config or archive.
    #[error("invalid image: {0}")]
    InvalidImage(String),

    // --- Pulling from registries (pull.rs). Each message is shown to users as a snapshot's
    // `status_message`, so it says what went wrong and, where there is one, what to do.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error(
        "registry {registry} refused access to {reference}: wrong or missing credentials, or \
         the repository does not exist"
    )]
    RegistryUnauthorized { registry: String, reference: String },
    #[error("image {reference} not found in registry {registry}: {detail}")]
    ImageNotFound {
        registry: String,
        reference: String,
        detail: String,
    },
    #[error("image {reference} has no linux/amd64 variant (it has: {available})")]
    NoLinuxAmd64 {
        reference: String,
        available: String,
    },
    #[error(
        "registry {registry} answered over plain HTTP; it can only be used when the operator \
         marks it insecure (cordon serve --insecure-registry {registry})"
    )]
    RegistryPlainHttp { registry: String },
    #[error("TLS with registry {registry} failed: {detail}")]
    RegistryTls { registry: String, detail: String },
    #[error("cannot reach registry {registry}: {detail}")]
    RegistryUnreachable { registry: String, detail: String },
    #[error("registry {registry}: {detail}")]
    RegistryProtocol { registry: String, detail: String },
    #[error("layer {digest} has media type {media_type}, which Cordon cannot unpack{why}")]
    UnsupportedLayer {
        digest: String,
        media_type: String,
        why: &'static str,
    },
    // --- end of pull.rs errors.
}

/// Attaches what was being done to an I/O error.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::Io {
            what: what(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, ImageError> {
        self.map_err(|errno| ImageError::Io {
            what: what(),
            source: errno.into(),
        })
    }
}
