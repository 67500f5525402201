//! Snapshot images for Cordon: the read-only root filesystem layers that sandboxes boot from.
//!
//! - [`default_snapshot`] builds the **default snapshot** (`system/default:latest`, the snapshot
//!   a sandbox created without one boots) from Debian packages with `debootstrap`, once per host,
//!   into the cache dir (`/var/cache/cordon` by default).
//! - [`pull_image`] fetches an image from an OCI registry and [`import_archive`] reads one from
//!   an OCI layout or `docker save` archive; both unpack its layers safely (`unpack`: confined,
//!   fd-relative, bounded) into the [`LayerStore`], where layers are shared by every snapshot and
//!   sandbox that uses them.
//!
//! A prepared default snapshot is a directory in the cache dir:
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
//! seconds: the minutes-long build happens once per host (`cordon prepare`). The layer store
//! lives in the server's data dir (`<data>/layers/<id>/{rootfs/,layer.json}`), with the same
//! id convention: files keep the ids the sandbox sees.

pub mod default_snapshot;
pub mod guest;

mod archive;
mod image_config;
mod layer_store;
mod pull;
mod unpack;

mod apt_sources;
mod cache;
mod digest;
mod error;
mod mounts;
mod process;

pub use archive::{import_archive, ArchivedImage};
pub use cache::PreparedSnapshot;
pub use error::ImageError;
pub use layer_store::{LayerId, LayerInfo, LayerStore, PendingLayer};
pub use pull::{pull_image, Image, RegistryConfig, RegistryCredentials, UnpackLimits};
