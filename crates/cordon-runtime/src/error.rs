use std::path::PathBuf;

/// Errors of a [`crate::Runtime`].
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid sandbox id {0:?}: expected 1 to 64 of [a-z0-9-]")]
    InvalidId(String),
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    #[error("sandbox {0} not found")]
    NotFound(String),
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    #[error("sandbox {id} is {state}, cannot {action}")]
    WrongState {
        id: String,
        state: String,
        action: &'static str,
    },
    #[error("no free uid/gid range left for a new sandbox")]
    NoIdRange,
    #[error("sandbox {id} failed to boot: {message}")]
    Boot { id: String, message: String },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("capture of sandbox {id}: {source}")]
    Capture {
        id: String,
        source: crate::CaptureError,
    },
    #[error("agent channel: {0}")]
    Channel(#[from] cordon_channel::ChannelError),
    #[error("{0}")]
    Unsupported(String),
}

impl RuntimeError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds a context string to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, RuntimeError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, RuntimeError> {
        self.map_err(|source| RuntimeError::io(context(), source))
    }
}
