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
