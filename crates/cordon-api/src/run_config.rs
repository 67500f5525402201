//! `RunConfig` (spec §2.1.2): who runs a command, where, with which environment.
//!
//! Layers stack image/snapshot → sandbox → command: `user` and `work_dir` replace the lower
//! layer, `env_vars` merge key by key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunConfigError {
    #[error("work_dir must be an absolute path, got {0:?}")]
    RelativeWorkDir(String),
    #[error("user must be name, uid, name:group or uid:gid, got {0:?}")]
    BadUser(String),
    #[error("environment variable name {0:?} is empty or contains '=' or NUL")]
    BadEnvName(String),
    #[error("environment variable {0:?} has a value containing NUL")]
    BadEnvValue(String),
}

/// Most bytes a single run_config may carry in env vars; bounds what clients can make us store.
pub const MAX_ENV_BYTES: usize = 1 << 20;

impl RunConfig {
    /// `self` layered over `lower`: scalar fields replace, env vars merge key by key.
    pub fn over(&self, lower: &RunConfig) -> RunConfig {
        let env_vars = match (&lower.env_vars, &self.env_vars) {
            (None, None) => None,
            (lower_env, upper_env) => {
                let mut merged = lower_env.clone().unwrap_or_default();
                merged.extend(upper_env.clone().unwrap_or_default());
                Some(merged)
            }
        };
        RunConfig {
            user: self.user.clone().or_else(|| lower.user.clone()),
            work_dir: self.work_dir.clone().or_else(|| lower.work_dir.clone()),
            env_vars,
        }
    }

    /// Checks the shape of every field; says which one is wrong.
    pub fn validate(&self) -> Result<(), RunConfigError> {
        if let Some(dir) = &self.work_dir {
            if !dir.starts_with('/') || dir.contains('\0') {
                return Err(RunConfigError::RelativeWorkDir(dir.clone()));
            }
        }
        if let Some(user) = &self.user {
            if UserSpec::parse(user).is_none() {
                return Err(RunConfigError::BadUser(user.clone()));
            }
        }
        for (name, value) in self.env_vars.iter().flatten() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(RunConfigError::BadEnvName(name.clone()));
            }
            if value.contains('\0') {
                return Err(RunConfigError::BadEnvValue(name.clone()));
            }
        }
        Ok(())
    }
}

/// A parsed `user` field: each half is a name or a numeric id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec<'a> {
    pub user: IdOrName<'a>,
    pub group: Option<IdOrName<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdOrName<'a> {
    Id(u32),
    Name(&'a str),
}

impl<'a> IdOrName<'a> {
    fn parse(s: &'a str) -> Option<Self> {
        if s.is_empty() || s.len() > 256 {
            return None;
        }
        if let Ok(id) = s.parse::<u32>() {
            return Some(IdOrName::Id(id));
        }
        let valid = s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
        valid.then_some(IdOrName::Name(s))
    }
}

impl<'a> UserSpec<'a> {
    pub fn parse(s: &'a str) -> Option<Self> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        Some(UserSpec {
            user: IdOrName::parse(user)?,
            group: match group {
                Some(g) => Some(IdOrName::parse(g)?),
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn upper_layer_replaces_scalars_and_merges_env() {
        let lower = RunConfig {
            user: Some("root".into()),
            work_dir: Some("/home/user".into()),
            env_vars: env(&[("A", "1"), ("B", "2")]),
        };
        let upper = RunConfig {
            user: None,
            work_dir: Some("/tmp".into()),
            env_vars: env(&[("B", "3")]),
        };
        let merged = upper.over(&lower);
        assert_eq!(merged.user.as_deref(), Some("root"));
        assert_eq!(merged.work_dir.as_deref(), Some("/tmp"));
        assert_eq!(merged.env_vars, env(&[("A", "1"), ("B", "3")]));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let relative = RunConfig {
            work_dir: Some("tmp".into()),
            ..Default::default()
        };
        assert_eq!(
            relative.validate(),
            Err(RunConfigError::RelativeWorkDir("tmp".into()))
        );
        let bad_user = RunConfig {
            user: Some("a b".into()),
            ..Default::default()
        };
        assert!(matches!(
            bad_user.validate(),
            Err(RunConfigError::BadUser(_))
        ));
        let bad_env = RunConfig {
            env_vars: env(&[("A=B", "1")]),
            ..Default::default()
        };
        assert!(matches!(
            bad_env.validate(),
            Err(RunConfigError::BadEnvName(_))
        ));
        for ok in ["root", "1000", "user:staff", "1000:1000"] {
            let cfg = RunConfig {
                user: Some(ok.into()),
                ..Default::default()
            };
            assert_eq!(cfg.validate(), Ok(()), "{ok}");
        }
    }
}
