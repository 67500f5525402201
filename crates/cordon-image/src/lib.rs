//! Snapshot images for Cordon: root filesystem layers that sandboxes boot from.
//!
//! Today this crate builds the **default snapshot** (`system/default:latest`, the snapshot a
//! sandbox created without one boots) from Debian packages with `debootstrap`; see
//! [`default_snapshot`]. OCI image pulls will live here too.
//!
//! A prepared snapshot is a directory in the cache dir (`/var/cache/cordon` by default):
//!
//! ```text
//! <cache>/default-snapshot/<recipe hash>/
//!     rootfs/           the read-only layer (SandboxSpec.layers), owned by host ids 0..65536,
//!                       which the runtime idmaps into each sandbox's range
//!     run_config.json   the snapshot's RunConfig defaults (user, work_dir, env_vars)
//!     snapshot.json     id (content digest), recipe, size
//!     complete          the recipe hash, written last: its presence means "finished"
//! ```
//!
//! The cache is kept apart from the server's data dir so that a fresh data dir starts in
//! seconds: the minutes-long build happens once per host (`cordon prepare`).

pub mod default_snapshot;

mod apt_sources;
mod cache;
mod digest;
mod error;
mod mounts;
mod process;

pub use cache::PreparedSnapshot;
pub use error::ImageError;
