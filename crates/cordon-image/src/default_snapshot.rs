//! The default snapshot (`system/default:latest`): what a sandbox created without a snapshot
//! boots. Built from Debian 12 "bookworm" packages with `debootstrap --variant=minbase`, from
//! the mirror the host's own apt uses, into a layer in the cache dir (see the crate docs).
//!
//! # Contents
//!
//! What the LangSmith clients and deepagents run inside a sandbox (spec §9.5): `bash` and
//! `/bin/sh` (dash), `python3` and `python`, coreutils, GNU grep, findutils (`find -printf`),
//! gawk, tar, git, curl with ca-certificates, ripgrep, procps and less; `/home/user` owned by
//! `user` (uid/gid 1000), `/tmp` mode 1777, no apt lists or package caches, no services.
//! BuildKit and Docker (for client-side Dockerfile builds, spec §2.4) are not included: a
//! Docker daemon cannot run in an unprivileged sandbox, so that optional feature fails cleanly
//! at its build step, as the spec allows.
//!
//! # Who commands run as: `user` (uid 1000), not root
//!
//! The snapshot's `run_config` makes commands, uploads and downloads run as `user` with
//! `work_dir` `/home/user`, because:
//! - LangSmith's clients treat run-as-root as the *old* behaviour, reachable explicitly with
//!   `run_config {"user": "0"}` (spec §2.3.1), and assume `/home/user` as the base of relative
//!   paths (§9.5).
//! - langchain-tests expects reading a `chmod 000` file to fail, and file operations are done
//!   as the run user so that permissions hold (§3.5); root would read it anyway.
//! - deepagents needs only `python3`, the shell tools and write access to `/home/user` and
//!   `/tmp`, all of which `user` has.
//!
//! What needs root, such as `apt-get install`, works by asking for it: `run_config {"user":
//! "root"}` (or `"0"`) on the sandbox or on one command. There is no `sudo`: layers are
//! mounted `nosuid` and sandboxes run with `no_new_privs`, so set-uid programs cannot work.
//!
//! `HOME` is deliberately not in the snapshot's environment: the agent sets it from the run
//! user's `/etc/passwd` entry, so a command run as root gets `/root` rather than writing root-
//! owned dotfiles into `/home/user`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use cordon_api::RunConfig;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::apt_sources::{host_mirror, FALLBACK_MIRROR};
use crate::cache::{prepare_cached, CacheEntry, PreparedSnapshot};
use crate::error::{ImageError, IoContext};
use crate::mounts::unmount_below;
use crate::process::{find_program, isolated, run_streamed, BUILD_PATH};

/// The snapshot's registry-style name and tag.
pub const NAME: &str = "system/default:latest";
/// The Debian release, pinned so a rebuild gets the same release (point updates aside).
pub const SUITE: &str = "bookworm";
/// The run user and its home (spec §9.5).
pub const USER: &str = "user";
pub const USER_ID: u32 = 1000;
pub const HOME: &str = "/home/user";
/// Where the default snapshot's builds live inside the cache dir.
const STORE_DIR: &str = "default-snapshot";
/// Hostname written to `/etc/hostname` and `/etc/hosts`: the runtime's default hostname.
const HOSTNAME: &str = "sandbox";
/// The snapshot's PATH: Debian's (and Docker's) default.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Build time as far as tools that honour `SOURCE_DATE_EPOCH` are concerned (shadow's
/// password-change days, for one): bookworm's release day, so that two builds on different
/// days produce the same files.
const SOURCE_DATE_EPOCH: &str = "1686355200";
/// Bump whenever the steps after debootstrap ([`customize`]) change, to rebuild.
const CUSTOMIZE_VERSION: u32 = 3;

/// Packages on top of minbase (which already has bash, dash, coreutils, findutils, grep,
/// gzip, sed, tar, diffutils, util-linux). Kept sorted; a test checks.
const PACKAGES: &[&str] = &[
    "bash",
    "ca-certificates",
    "coreutils",
    "curl",
    "findutils",
    "gawk",
    "git",
    "grep",
    "less",
    "procps",
    "python-is-python3",
    "python3",
    "ripgrep",
    "tar",
];

/// Everything the build depends on; its hash is the cache key, so changing any of it (or
/// [`CUSTOMIZE_VERSION`], or the run_config) builds a new layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub suite: String,
    pub variant: String,
    pub arch: String,
    pub packages: Vec<String>,
}

impl Recipe {
    /// The default snapshot's recipe for this host's architecture.
    pub fn default_snapshot() -> Recipe {
        Recipe {
            suite: SUITE.to_string(),
            variant: "minbase".to_string(),
            arch: debian_arch().to_string(),
            packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// A short hex hash of the recipe and `run_config`; package order does not matter.
    pub fn key(&self, run_config: &RunConfig) -> String {
        let mut packages = self.packages.clone();
        packages.sort();
        packages.dedup();
        let mut hasher = Sha256::new();
        for line in [
            format!("customize={CUSTOMIZE_VERSION}"),
            format!("suite={}", self.suite),
            format!("variant={}", self.variant),
            format!("arch={}", self.arch),
            format!("packages={}", packages.join(",")),
            format!(
                "run_config={}",
                serde_json::to_string(run_config).unwrap_or_default()
            ),
        ] {
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        format!("{:x}", hasher.finalize())[..16].to_string()
    }
}

/// The snapshot's defaults for commands (spec §2.1.2; see the module docs for why `user`).
pub fn run_config() -> RunConfig {
    RunConfig {
        user: Some(USER.to_string()),
        work_dir: Some(HOME.to_string()),
        env_vars: Some(BTreeMap::from([
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("PATH".to_string(), PATH.to_string()),
        ])),
    }
}

/// The default snapshot in `cache_dir`, built first when there is none for the current
/// recipe (minutes: needs root, `debootstrap` and the Debian mirror); otherwise returns in
/// milliseconds. `progress` gets one line per step, and debootstrap's own output.
///
/// Blocking: from async code, call it on a blocking thread (`spawn_blocking`). Concurrent
/// calls, in this process or others, wait for one build rather than each building.
pub fn prepare(
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PreparedSnapshot, ImageError> {
    let recipe = Recipe::default_snapshot();
    let run_config = run_config();
    let key = recipe.key(&run_config);
    let store = cache_dir.join(STORE_DIR);
    let entry = CacheEntry {
        store: &store,
        key: &key,
        name: NAME,
        run_config: &run_config,
    };
    let package_cache = store.join(".debs");
    let mut build = |layer: &Path, progress: &mut dyn FnMut(&str)| {
        build(&recipe, layer, &package_cache, progress)
    };
    prepare_cached(&entry, &mut build, progress)
}

/// debootstrap into `layer`, then [`customize`] it.
fn build(
    recipe: &Recipe,
    layer: &Path,
    package_cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NotRoot);
    }
    let debootstrap = find_program("debootstrap").ok_or(ImageError::MissingTool("debootstrap"))?;
    let mirror = host_mirror(&recipe.suite);
    let (uri, keyring) = match &mirror {
        Some(mirror) => (mirror.uri.as_str(), mirror.keyring.as_deref()),
        None => (FALLBACK_MIRROR, None),
    };
    let announce = format!(
        "building the default snapshot: debootstrap {} from {uri} (takes minutes)",
        recipe.suite
    );
    info!("{announce}");
    progress(&announce);
    fs::create_dir_all(package_cache).context(|| format!("create {}", package_cache.display()))?;
    let mut command = isolated(&debootstrap)?;
    command
        .arg(format!("--variant={}", recipe.variant))
        .arg(format!("--arch={}", recipe.arch))
        .arg("--components=main")
        .arg(format!("--include={}", recipe.packages.join(",")))
        .arg(format!("--cache-dir={}", package_cache.display()));
    if let Some(keyring) = keyring {
        command.arg(format!("--keyring={}", keyring.display()));
    }
    command.arg(&recipe.suite).arg(layer).arg(uri);
    run_streamed(with_build_env(command), progress)?;
    progress("customizing the root filesystem");
    customize(layer, progress)
}

/// The steps after debootstrap. Bump [`CUSTOMIZE_VERSION`] when changing them.
fn customize(layer: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    // Everything below deletes inside the tree: make sure none of it is a host mount.
    unmount_below(layer)?;
    add_run_user(layer, progress)?;
    write_network_files(layer)?;
    for tmp in ["tmp", "var/tmp"] {
        empty_dir(&layer.join(tmp))?;
        set_mode(&layer.join(tmp), 0o1777)?;
    }
    remove_caches_and_logs(layer)?;
    slim_documentation(layer)?;
    // The runtime mounts its own minimal /dev; debootstrap's device nodes are just clutter.
    empty_dir(&layer.join("dev"))
}

/// `user` (uid/gid 1000) with a bash login and `/home/user` from `/etc/skel`.
fn add_run_user(layer: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), ImageError> {
    let chroot = find_program("chroot").ok_or(ImageError::MissingTool("coreutils"))?;
    let mut command = isolated(&chroot)?;
    command.arg(layer).args([
        "useradd",
        "--uid",
        &USER_ID.to_string(),
        "--user-group",
        "--create-home",
        "--shell",
        "/bin/bash",
        USER,
    ]);
    run_streamed(with_build_env(command), progress)?;
    set_mode(&layer.join(HOME.trim_start_matches('/')), 0o755)
}

/// Loopback only: `localhost` and the hostname resolve locally; there is no nameserver in the
/// sandbox (outbound HTTP goes through the proxy, which resolves names), so `resolv.conf`
/// names none and glibc fails lookups at once instead of waiting on the host's resolvers,
/// which debootstrap copied in and which a sandbox must not learn about anyway.
fn write_network_files(layer: &Path) -> Result<(), ImageError> {
    let etc = layer.join("etc");
    replace_file(&etc.join("hostname"), &format!("{HOSTNAME}\n"))?;
    replace_file(
        &etc.join("hosts"),
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
        ),
    )?;
    replace_file(
        &etc.join("resolv.conf"),
        "# Cordon sandboxes have loopback only; outbound HTTP(S) goes through HTTP_PROXY,\n\
         # which resolves names. No nameserver here on purpose.\n",
    )
}

/// Package indexes and caches (tens of MiB, stale by the time anyone runs `apt-get`, which
/// needs `apt-get update` anyway), the build's logs, and per-build caches.
fn remove_caches_and_logs(layer: &Path) -> Result<(), ImageError> {
    for dir in ["var/lib/apt/lists", "var/cache/apt", "var/log"] {
        remove_files_below(&layer.join(dir))?;
    }
    // ldconfig's cache of inode numbers and times: differs on every build, rebuilt on demand.
    let aux_cache = layer.join("var/cache/ldconfig/aux-cache");
    if fs::symlink_metadata(&aux_cache).is_ok() {
        fs::remove_file(&aux_cache).context(|| format!("remove {}", aux_cache.display()))?;
    }
    for pattern_dir in ["var/cache/debconf", "var/lib/dpkg"] {
        let dir = layer.join(pattern_dir);
        for entry in fs::read_dir(&dir).context(|| format!("list {}", dir.display()))? {
            let path = entry.context(|| format!("list {}", dir.display()))?.path();
            if path.to_string_lossy().ends_with("-old") {
                fs::remove_file(&path).context(|| format!("remove {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// dpkg rules that keep documentation, manuals and translations out of the image, as Debian's
/// own "slim" images do: about a quarter of its size, and nothing an agent's tools read.
/// Installed into the image so that packages added later in a sandbox are slim too.
const DPKG_SLIM_RULES: &str = "\
# Cordon's default snapshot leaves out documentation and translations (like debian:slim).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
";

/// Applies [`DPKG_SLIM_RULES`] to what is already installed, and installs them.
fn slim_documentation(layer: &Path) -> Result<(), ImageError> {
    for dir in [
        "usr/share/doc",
        "usr/share/groff",
        "usr/share/info",
        "usr/share/linda",
        "usr/share/lintian/overrides",
        "usr/share/locale",
        "usr/share/man",
    ] {
        let keep_copyright = dir == "usr/share/doc";
        remove_files_below_except(&layer.join(dir), |path| {
            keep_copyright && path.file_name().is_some_and(|name| name == "copyright")
        })?;
    }
    replace_file(
        &layer.join("etc/dpkg/dpkg.cfg.d/cordon-slim"),
        DPKG_SLIM_RULES,
    )
}

/// Removes every non-directory below `dir`, keeping the directories (apt expects them).
fn remove_files_below(dir: &Path) -> Result<(), ImageError> {
    remove_files_below_except(dir, |_| false)
}

/// Removes every non-directory below `dir` (missing is fine) that `keep` does not want.
fn remove_files_below_except(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<(), ImageError> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(dir).follow_links(false).min_depth(1) {
        let entry = entry.map_err(|e| ImageError::Io {
            what: format!("walk {}", dir.display()),
            source: e.into(),
        })?;
        if !entry.file_type().is_dir() && !keep(entry.path()) {
            fs::remove_file(entry.path())
                .context(|| format!("remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Deletes everything inside `dir`, keeping `dir` itself.
fn empty_dir(dir: &Path) -> Result<(), ImageError> {
    for entry in fs::read_dir(dir).context(|| format!("list {}", dir.display()))? {
        let entry = entry.context(|| format!("list {}", dir.display()))?;
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        removed.context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

/// Writes `content` at `path`, replacing a symlink there rather than following it.
fn replace_file(path: &Path, content: &str) -> Result<(), ImageError> {
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path).context(|| format!("remove {}", path.display()))?;
    }
    fs::write(path, content).context(|| format!("write {}", path.display()))?;
    set_mode(path, 0o644)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .context(|| format!("chmod {mode:o} {}", path.display()))
}

/// A clean environment for debootstrap and the chroot steps: the host's locale, home and
/// the like must not leak into maintainer scripts; only proxy settings carry over, since the
/// host may need them to reach its mirror.
fn with_build_env(mut command: Command) -> Command {
    let proxies: Vec<_> = std::env::vars_os()
        .filter(|(name, _)| {
            let name = name.to_string_lossy().to_ascii_lowercase();
            matches!(name.as_str(), "http_proxy" | "https_proxy" | "no_proxy")
        })
        .collect();
    command
        .env_clear()
        .envs(proxies)
        .env("PATH", BUILD_PATH)
        .env("LANG", "C.UTF-8")
        .env("HOME", "/root")
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
        .env("DEBIAN_FRONTEND", "noninteractive");
    command
}

/// Debian's name for this machine's architecture.
fn debian_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "arm" => "armhf",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_is_sorted_and_has_what_the_clients_need() {
        let mut sorted = PACKAGES.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(PACKAGES, sorted.as_slice());
        for needed in [
            "bash",
            "python3",
            "python-is-python3",
            "gawk",
            "ripgrep",
            "git",
        ] {
            assert!(PACKAGES.contains(&needed), "{needed} missing");
        }
    }

    #[test]
    fn recipe_key_changes_with_the_package_list_but_not_its_order() {
        let recipe = Recipe::default_snapshot();
        let key = recipe.key(&run_config());
        assert_eq!(key.len(), 16);

        let mut reordered = recipe.clone();
        reordered.packages.reverse();
        assert_eq!(reordered.key(&run_config()), key);

        let mut more = recipe.clone();
        more.packages.push("jq".into());
        assert_ne!(more.key(&run_config()), key);

        let mut other_suite = recipe.clone();
        other_suite.suite = "trixie".into();
        assert_ne!(other_suite.key(&run_config()), key);

        let root = RunConfig {
            user: Some("root".into()),
            ..run_config()
        };
        assert_ne!(recipe.key(&root), key);
    }

    #[test]
    fn run_config_is_a_valid_lowest_layer() {
        let config = run_config();
        config.validate().unwrap();
        assert_eq!(config.user.as_deref(), Some(USER));
        assert_eq!(config.work_dir.as_deref(), Some(HOME));
    }
}
