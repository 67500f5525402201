//! The parts of an OCI image config Cordon uses: the layers' diff ids and the run config.

use std::collections::BTreeMap;

use cordon_api::RunConfig;
use serde::Deserialize;
use tracing::warn;

use crate::ImageError;

/// What an image config says about running and assembling the image.
#[derive(Debug, Clone)]
pub(crate) struct ImageConfig {
    /// `rootfs.diff_ids`, bottom first as in the config.
    pub diff_ids: Vec<String>,
    /// `Env` → `env_vars`, `WorkingDir` → `work_dir`, `User` → `user` (empty ones omitted).
    pub run_config: RunConfig,
}

#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<RunSection>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RunSection {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// Parses an image config blob (checks os/architecture are linux/amd64).
pub(crate) fn parse(config: &[u8]) -> Result<ImageConfig, ImageError> {
    let blob: ConfigBlob = serde_json::from_slice(config)
        .map_err(|e| ImageError::InvalidImage(format!("image config: {e}")))?;
    if blob.os != "linux" || blob.architecture != "amd64" {
        return Err(ImageError::InvalidImage(format!(
            "the image is for {}/{}; Cordon runs linux/amd64 images",
            blob.os, blob.architecture
        )));
    }
    if blob.rootfs.kind != "layers" {
        return Err(ImageError::InvalidImage(format!(
            "image config rootfs type {:?} (expected \"layers\")",
            blob.rootfs.kind
        )));
    }
    let run = blob.config.unwrap_or(RunSection {
        env: None,
        working_dir: None,
        user: None,
    });
    let run_config = RunConfig {
        user: run.user.filter(|user| !user.is_empty()),
        work_dir: run.working_dir.filter(|dir| !dir.is_empty()),
        env_vars: env_vars(run.env.unwrap_or_default()),
    };
    run_config
        .validate()
        .map_err(|e| ImageError::InvalidImage(format!("image config: {e}")))?;
    Ok(ImageConfig {
        diff_ids: blob.rootfs.diff_ids,
        run_config,
    })
}

/// `K=V` entries; a later one wins, as in a shell. Entries without `=` name a variable to
/// inherit from an outer environment, which a sandbox has none of, so they are dropped.
fn env_vars(env: Vec<String>) -> Option<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for entry in env {
        match entry.split_once('=') {
            Some((name, value)) if !name.is_empty() => {
                vars.insert(name.to_string(), value.to_string());
            }
            _ => warn!(entry = %entry, "ignoring an image Env entry that is not NAME=VALUE"),
        }
    }
    (!vars.is_empty()).then_some(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_workdir_user_and_diff_ids_are_read() {
        let config = parse(
            br#"{"architecture":"amd64","os":"linux",
                "config":{"Env":["PATH=/usr/bin:/bin","A=x=y","A=last","LONELY"],
                          "WorkingDir":"/app","User":"1000:1000","Cmd":["sh"]},
                "rootfs":{"type":"layers","diff_ids":["sha256:aa","sha256:bb"]}}"#,
        )
        .unwrap();
        assert_eq!(config.diff_ids, vec!["sha256:aa", "sha256:bb"]);
        assert_eq!(config.run_config.work_dir.as_deref(), Some("/app"));
        assert_eq!(config.run_config.user.as_deref(), Some("1000:1000"));
        let env = config.run_config.env_vars.unwrap();
        assert_eq!(env["PATH"], "/usr/bin:/bin");
        assert_eq!(env["A"], "last");
        assert_eq!(env.len(), 2);
    }

    #[test]
    fn empty_fields_are_omitted() {
        let config = parse(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":[],"WorkingDir":"","User":""},
                "rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(config.run_config, RunConfig::default());
        let bare = parse(
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        );
        assert_eq!(bare.unwrap().run_config, RunConfig::default());
    }

    #[test]
    fn other_platforms_and_garbage_are_refused() {
        for bad in [
            &br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#[..],
            br#"{"architecture":"amd64","os":"windows","rootfs":{"type":"layers","diff_ids":[]}}"#,
            br#"{"architecture":"amd64","os":"linux"}"#,
            br#"{"architecture":"amd64","os":"linux","config":{"WorkingDir":"rel"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
            b"not json",
        ] {
            assert!(matches!(parse(bad), Err(ImageError::InvalidImage(_))), "{}", String::from_utf8_lossy(bad));
        }
    }
}
