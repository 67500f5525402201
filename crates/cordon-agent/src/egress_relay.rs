//! The egress relay: the sandbox's only way out. It listens on
//! `127.0.0.1:`[`EGRESS_RELAY_PORT`] inside the sandbox's own network namespace (commands get
//! it as `HTTP_PROXY`) and carries each accepted TCP connection, byte for byte, over a new
//! reverse stream to the host, whose egress proxy decides what may leave. The relay does no
//! parsing of its own: the proxy speaks HTTP with the client through it.
//!
//! The streams go over the channel session the host marked with
//! [`EGRESS_SESSION_PATH`](cordon_api::agent::EGRESS_SESSION_PATH) (the newest one): other
//! sessions (the runtime's readiness probe, a CLI) refuse reverse streams.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cordon_api::tunnel::EGRESS_RELAY_PORT;
use cordon_channel::HostOpener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Relay connections carried at once; more wait in the listen backlog. The host bounds its
/// side too (`cordon_channel::MAX_INBOUND_STREAMS`).
const MAX_RELAYED: usize = cordon_channel::MAX_INBOUND_STREAMS;
/// Copy buffer per direction.
const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Which host session carries relay streams. Cheap to clone.
#[derive(Clone, Default)]
pub struct EgressSession {
    current: Arc<Mutex<Option<HostOpener>>>,
}

impl EgressSession {
    /// Makes `opener`'s session the one new relay connections go over.
    pub fn attach(&self, opener: HostOpener) {
        *self.lock() = Some(opener);
    }

    fn opener(&self) -> Option<HostOpener> {
        self.lock().clone().filter(|opener| !opener.is_closed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HostOpener>> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Starts the relay once per process (later calls do nothing). Binding happens now, in the
/// agent's network namespace; a failure is logged and retried at the next call.
pub async fn ensure_started(session: &EgressSession) {
    static STARTED: OnceLock<()> = OnceLock::new();
    static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _starting = STARTING.lock().await;
    if STARTED.get().is_some() {
        return;
    }
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, EGRESS_RELAY_PORT));
    match TcpListener::bind(address).await {
        Ok(listener) => {
            let _ = STARTED.set(());
            tracing::info!(%address, "egress relay listening");
            tokio::spawn(run(listener, session.clone()));
        }
        Err(error) => tracing::warn!(%address, %error, "egress relay cannot listen"),
    }
}

/// Accepts connections until the process ends.
pub async fn run(listener: TcpListener, session: EgressSession) {
    let slots = Arc::new(Semaphore::new(MAX_RELAYED));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((tcp, _)) => {
                let session = session.clone();
                tokio::spawn(async move {
                    relay(tcp, &session).await;
                    drop(slot);
                });
            }
            Err(error) => {
                // Out of fds or similar: back off and keep the relay up.
                tracing::warn!(%error, "egress relay accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Carries one connection to the host. Without a host session to carry it, the connection is
/// closed at once (the client sees an empty reply rather than a hang).
async fn relay(mut tcp: TcpStream, session: &EgressSession) {
    let Some(opener) = session.opener() else {
        tracing::debug!("egress relay: no host session; connection closed");
        return;
    };
    let mut stream = match opener.open_stream().await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(%error, "egress relay: cannot open a host stream");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let copied = tokio::io::copy_bidirectional_with_sizes(
        &mut tcp,
        &mut stream,
        COPY_BUFFER_BYTES,
        COPY_BUFFER_BYTES,
    )
    .await;
    if let Err(error) = copied {
        tracing::debug!(%error, "egress relay connection ended");
    }
}
