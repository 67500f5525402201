//! The on-disk state of each sandbox: `$STATE/sandboxes/<id>/` (host-only, 0700).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, RuntimeError};
use crate::plan::{LaunchResult, WritableLayer};
use crate::SandboxSpec;

const SPEC: &str = "spec.json";
const STATE: &str = "state.json";
const SOCKET: &str = "agent.sock";
pub(crate) const AGENT_LOG: &str = "agent.log";

/// `state.json`: what must survive a restart of the host process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    /// First host uid/gid of the sandbox's range (kept for its whole life).
    pub id_base: u32,
    /// The init's host pid and start time while the sandbox runs.
    pub running: Option<LaunchResult>,
    pub failed: Option<String>,
    /// Has ever been started (Stopped rather than Created once it is not running).
    pub started: bool,
}

/// One sandbox's directory, with an `O_PATH` fd to it so socket paths stay short
/// (`/proc/self/fd/N/agent.sock` fits `sun_path` whatever the state dir is).
pub(crate) struct SandboxDir {
    path: PathBuf,
    fd: OwnedFd,
}

pub(crate) fn create_private_dir(path: &Path) -> Result<(), RuntimeError> {
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RuntimeError::io(format!("create {}", path.display()), e)),
    }
}

fn open_path_fd(path: &Path) -> Result<OwnedFd, RuntimeError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .context(|| format!("open {}", path.display()))?;
    Ok(file.into())
}

impl SandboxDir {
    /// Creates the directory of a new sandbox; fails if it exists.
    pub(crate) fn create(sandboxes: &Path, id: &str) -> Result<SandboxDir, RuntimeError> {
        let path = sandboxes.join(id);
        match DirBuilder::new().mode(0o700).create(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(id.to_string()))
            }
            other => other.context(|| format!("create {}", path.display()))?,
        }
        Ok(SandboxDir {
            fd: open_path_fd(&path)?,
            path,
        })
    }

    pub(crate) fn open(path: PathBuf) -> Result<SandboxDir, RuntimeError> {
        Ok(SandboxDir {
            fd: open_path_fd(&path)?,
            path,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn short_path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), RuntimeError> {
        let tmp = self.path.join(format!(".{name}.tmp"));
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| RuntimeError::State {
            path: tmp.clone(),
            source,
        })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .context(|| format!("write {}", tmp.display()))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .context(|| format!("write {}", tmp.display()))?;
        // rename is atomic: a crash leaves the old or the new state, never half of one.
        fs::rename(&tmp, self.path.join(name)).context(|| format!("rename {}", tmp.display()))
    }

    pub(crate) fn save_spec(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        self.write_json(SPEC, spec)
    }

    pub(crate) fn save_record(&self, record: &Record) -> Result<(), RuntimeError> {
        self.write_json(STATE, record)
    }

    fn load<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T, RuntimeError> {
        let path = self.path.join(name);
        let bytes = fs::read(&path).context(|| format!("read {}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|source| RuntimeError::State { path, source })
    }

    /// Binds a fresh listening socket for the agent channel (0600, host root only).
    pub(crate) fn bind_socket(&self) -> Result<std::os::unix::net::UnixListener, RuntimeError> {
        self.remove_socket();
        let path = self.short_path(SOCKET);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .context(|| format!("bind {}", self.path.join(SOCKET).display()))?;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .context(|| "chmod agent.sock".into())?;
        Ok(listener)
    }

    pub(crate) async fn connect_socket(&self) -> Result<tokio::net::UnixStream, RuntimeError> {
        let path = self.short_path(SOCKET);
        tokio::net::UnixStream::connect(&path)
            .await
            .context(|| format!("connect {}", self.path.join(SOCKET).display()))
    }

    pub(crate) fn remove_socket(&self) {
        let _ = fs::remove_file(self.path.join(SOCKET));
    }

    /// The last line(s) of the agent's log, for error messages (bounded).
    pub(crate) fn agent_log_tail(&self) -> Option<String> {
        let mut file = File::open(self.path.join(AGENT_LOG)).ok()?;
        let len = file.metadata().ok()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(2048))).ok()?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).ok()?;
        let text = String::from_utf8_lossy(&tail);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let last = lines[lines.len().saturating_sub(3)..].join(" | ");
        (!last.is_empty()).then_some(last)
    }

    /// Removes the directory and everything in it. `remove_dir_all` never follows symlinks,
    /// so a sandbox-made symlink in the writable layer cannot redirect it.
    pub(crate) fn remove_all(&self) {
        if let Err(error) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "removing sandbox directory");
        }
    }
}

/// An exclusive `flock` held while the guard lives.
pub(crate) struct FileLock(File);

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: the fd is owned by self.0 and valid until it is dropped after this.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

pub(crate) fn lock_file(path: &Path) -> Result<FileLock, RuntimeError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .context(|| format!("open {}", path.display()))?;
    // SAFETY: flock on a valid, owned fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(RuntimeError::io(
            format!("lock {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(FileLock(file))
}

/// Every sandbox in `sandboxes` with a readable spec and state, in no particular order.
pub(crate) fn scan(sandboxes: &Path) -> Vec<(SandboxDir, SandboxSpec, Record)> {
    let Ok(entries) = fs::read_dir(sandboxes) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if crate::validate_id(&name).is_err() {
            continue;
        }
        let loaded = SandboxDir::open(entry.path()).and_then(|dir| {
            let spec: SandboxSpec = dir.load(SPEC)?;
            let record: Record = dir.load(STATE)?;
            Ok((dir, spec, record))
        });
        match loaded {
            Ok((dir, spec, record)) if spec.id == name => found.push((dir, spec, record)),
            Ok(_) => {
                tracing::warn!(sandbox = %name, "spec id does not match its directory; skipped")
            }
            Err(error) => {
                tracing::warn!(sandbox = %name, %error, "unreadable sandbox state; skipped")
            }
        }
    }
    found
}

/// The host-wide registry of claimed uid/gid ranges: one file per range base, holding the
/// claiming sandbox's directory. Host-wide (not per state dir) so that sandboxes of different
/// runtimes never share ids. A claim whose sandbox directory is gone, or whose `state.json`
/// names another base, is stale and reclaimed.
pub(crate) struct IdRegistry(PathBuf);

impl IdRegistry {
    pub(crate) fn new(path: PathBuf) -> IdRegistry {
        IdRegistry(path)
    }

    /// Claims the lowest free range for the sandbox in `sandbox_dir` (which must exist).
    pub(crate) fn claim(&self, sandbox_dir: &Path) -> Result<u32, RuntimeError> {
        fs::create_dir_all(&self.0).context(|| format!("create {}", self.0.display()))?;
        let _lock = lock_file(&self.0.join(".lock"))?;
        let used = self.live_claims();
        let base = crate::ids::free_base(&used).ok_or(RuntimeError::NoIdRange)?;
        self.write_claim(base, sandbox_dir)?;
        Ok(base)
    }

    /// Re-registers an adopted sandbox's range; false when another live sandbox holds it.
    pub(crate) fn reclaim(&self, base: u32, sandbox_dir: &Path) -> Result<bool, RuntimeError> {
        fs::create_dir_all(&self.0).context(|| format!("create {}", self.0.display()))?;
        let _lock = lock_file(&self.0.join(".lock"))?;
        match fs::read_to_string(self.0.join(base.to_string())) {
            Ok(owner) if Path::new(&owner) == sandbox_dir => Ok(true),
            Ok(owner) if claim_is_live(base, Path::new(&owner)) => Ok(false),
            _ => self.write_claim(base, sandbox_dir).map(|()| true),
        }
    }

    pub(crate) fn release(&self, base: u32, sandbox_dir: &Path) {
        let _lock = lock_file(&self.0.join(".lock"));
        let claim = self.0.join(base.to_string());
        if fs::read_to_string(&claim).is_ok_and(|owner| Path::new(&owner) == sandbox_dir) {
            let _ = fs::remove_file(claim);
        }
    }

    fn write_claim(&self, base: u32, sandbox_dir: &Path) -> Result<(), RuntimeError> {
        let claim = self.0.join(base.to_string());
        fs::write(&claim, sandbox_dir.as_os_str().as_encoded_bytes())
            .context(|| format!("write {}", claim.display()))
    }

    /// Bases of every live claim; stale ones are removed on the way.
    fn live_claims(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(&self.0) else {
            return Vec::new();
        };
        let mut used = Vec::new();
        for entry in entries.flatten() {
            let Some(base) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            match fs::read_to_string(entry.path()) {
                Ok(owner) if claim_is_live(base, Path::new(&owner)) => used.push(base),
                _ => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        used
    }
}

fn claim_is_live(base: u32, sandbox_dir: &Path) -> bool {
    if !sandbox_dir.is_dir() {
        return false;
    }
    // No state.json yet: the claimant is between its claim and its first save.
    match fs::read(sandbox_dir.join(STATE)) {
        Ok(bytes) => serde_json::from_slice::<Record>(&bytes).is_ok_and(|r| r.id_base == base),
        Err(_) => true,
    }
}

/// Makes the writable layer: `rw/{upper,work}`, or a sparse ext4 image holding them.
pub(crate) async fn prepare_writable_layer(
    layer: &WritableLayer,
    disk_bytes: Option<u64>,
) -> Result<(), RuntimeError> {
    match layer {
        WritableLayer::Directory(rw) => {
            for dir in [rw.clone(), rw.join("upper"), rw.join("work")] {
                DirBuilder::new()
                    .mode(0o755)
                    .create(&dir)
                    .context(|| format!("create {}", dir.display()))?;
            }
            Ok(())
        }
        WritableLayer::Ext4Image(image) => {
            make_ext4_image(image, disk_bytes.unwrap_or(1 << 30)).await
        }
    }
}

async fn make_ext4_image(image: &Path, bytes: u64) -> Result<(), RuntimeError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .context(|| format!("create {}", image.display()))?;
    file.set_len(bytes)
        .context(|| format!("size {}", image.display()))?;
    drop(file);
    // mkfs -d populates the image from a directory, so it is never mounted on the host.
    let seed = tempfile::Builder::new()
        .prefix("cordon-ext4-")
        .tempdir()
        .context(|| "ext4 seed dir".into())?;
    for dir in ["upper", "work"] {
        DirBuilder::new()
            .mode(0o755)
            .create(seed.path().join(dir))
            .context(|| "ext4 seed dir".into())?;
    }
    run_mkfs_ext4(
        tokio::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-E", "root_owner=0:0", "-d"])
            .arg(seed.path())
            .arg(image),
        || format!("mkfs.ext4 {}", image.display()),
    )
    .await
}

/// Runs a prepared `mkfs.ext4` command; `invocation` names it in the error when it fails.
pub(crate) async fn run_mkfs_ext4(
    mkfs: &mut tokio::process::Command,
    invocation: impl FnOnce() -> String,
) -> Result<(), RuntimeError> {
    let output = mkfs
        .output()
        .await
        .context(|| "run mkfs.ext4 (install e2fsprogs)".into())?;
    if !output.status.success() {
        return Err(RuntimeError::io(
            format!(
                "{}: {}",
                invocation(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            std::io::Error::other("mkfs.ext4 failed"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_claims_are_unique_and_stale_ones_are_reclaimed() {
        let root = tempfile::tempdir().unwrap();
        let registry = IdRegistry::new(root.path().join("ids"));
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let first = registry.claim(&a).unwrap();
        let second = registry.claim(&b).unwrap();
        assert_ne!(first, second);
        // A claimant whose directory vanished without releasing holds nothing.
        fs::remove_dir(&a).unwrap();
        fs::create_dir(root.path().join("c")).unwrap();
        assert_eq!(registry.claim(&root.path().join("c")).unwrap(), first);
        registry.release(second, &b);
        assert!(registry.reclaim(second, &b).unwrap());
        assert!(!registry.reclaim(second, &root.path().join("c")).unwrap());
    }
}
