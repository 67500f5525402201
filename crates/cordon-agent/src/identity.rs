//! Who a command or file operation runs as: a `run_config.user` resolved against the
//! sandbox's own `/etc/passwd` and `/etc/group` (the agent is static, so no NSS).
//!
//! Follows Docker's `USER` rules: a numeric uid need not exist in `/etc/passwd` (its gid is
//! then the uid and its home `/`), and naming a group explicitly replaces every supplementary
//! group with that one group.

use std::io::Read;
use std::path::{Path, PathBuf};

use cordon_api::run_config::{IdOrName, UserSpec};

/// A resolved run user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, from `/etc/group`.
    pub groups: Vec<u32>,
    /// Home directory from `/etc/passwd`, or `/` when unknown.
    pub home: String,
    /// Login name when known (for `USER`/`LOGNAME`).
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("user {0:?} not found in /etc/passwd")]
    UnknownUser(String),
    #[error("group {0:?} not found in /etc/group")]
    UnknownGroup(String),
    #[error("invalid user spec {0:?}")]
    Invalid(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_DB_BYTES} bytes")]
    TooLarge { path: PathBuf },
}

/// Most bytes read from `/etc/passwd` or `/etc/group`: they are sandbox-controlled.
const MAX_DB_BYTES: u64 = 4 << 20;

/// Home of a user `/etc/passwd` does not know.
const UNKNOWN_HOME: &str = "/";

/// Resolves `user` (`name`, `uid`, `name:group`, `uid:gid`; `None` = root).
pub fn resolve(user: Option<&str>) -> Result<Identity, IdentityError> {
    resolve_in(Path::new("/"), user)
}

/// [`resolve`] against `<root>/etc/passwd` and `<root>/etc/group` (tests use a tempdir).
pub fn resolve_in(root: &Path, user: Option<&str>) -> Result<Identity, IdentityError> {
    let spec = match user {
        None => UserSpec {
            user: IdOrName::Id(0),
            group: None,
        },
        Some(text) => UserSpec::parse(text).ok_or_else(|| IdentityError::Invalid(text.into()))?,
    };
    let passwd = read_db(&root.join("etc/passwd"))?;
    let entry = find_passwd_entry(&passwd, spec.user);
    let (uid, name, primary_gid, home) = match (spec.user, entry) {
        (_, Some(entry)) => (
            entry.uid,
            Some(entry.name.to_string()),
            entry.gid,
            entry.home.to_string(),
        ),
        (IdOrName::Id(uid), None) => (uid, None, uid, UNKNOWN_HOME.to_string()),
        (IdOrName::Name(name), None) => return Err(IdentityError::UnknownUser(name.into())),
    };

    let group_db = read_db(&root.join("etc/group"))?;
    let (gid, groups) = match spec.group {
        // Docker semantics: an explicit group is the only group.
        Some(group) => {
            let gid = group_id(&group_db, group)?;
            (gid, vec![gid])
        }
        None => (
            primary_gid,
            supplementary_groups(&group_db, primary_gid, name.as_deref()),
        ),
    };
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
        name,
    })
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// Reads a small account database; a missing file reads as empty so numeric ids still work.
fn read_db(path: &Path) -> Result<String, IdentityError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(source) => {
            return Err(IdentityError::Read {
                path: path.into(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_DB_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| IdentityError::Read {
            path: path.into(),
            source,
        })?;
    if bytes.len() as u64 > MAX_DB_BYTES {
        return Err(IdentityError::TooLarge { path: path.into() });
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The colon-separated fields of each meaningful line (skips comments and NIS `+`/`-` lines).
fn records(db: &str) -> impl Iterator<Item = Vec<&str>> {
    db.lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && !line.starts_with(['#', '+', '-']))
        .map(|line| line.split(':').collect())
}

fn parse_passwd_line<'a>(fields: &[&'a str]) -> Option<PasswdEntry<'a>> {
    if fields.len() < 7 {
        return None;
    }
    Some(PasswdEntry {
        name: fields[0],
        uid: fields[2].parse().ok()?,
        gid: fields[3].parse().ok()?,
        home: fields[5],
    })
}

fn find_passwd_entry<'a>(passwd: &'a str, user: IdOrName<'_>) -> Option<PasswdEntry<'a>> {
    records(passwd).find_map(|fields| {
        let entry = parse_passwd_line(&fields)?;
        let matches = match user {
            IdOrName::Id(uid) => entry.uid == uid,
            IdOrName::Name(name) => entry.name == name,
        };
        matches.then_some(entry)
    })
}

/// `name:password:gid:member,member,...`
fn group_id(group_db: &str, group: IdOrName<'_>) -> Result<u32, IdentityError> {
    match group {
        // Like Docker, a numeric gid need not exist in /etc/group.
        IdOrName::Id(gid) => Ok(gid),
        IdOrName::Name(name) => records(group_db)
            .find_map(|fields| match fields.as_slice() {
                [group_name, _, gid, ..] if *group_name == name => gid.parse().ok(),
                _ => None,
            })
            .ok_or_else(|| IdentityError::UnknownGroup(name.into())),
    }
}

/// The primary gid plus every group listing `name` as a member, like `initgroups(3)`.
fn supplementary_groups(group_db: &str, primary_gid: u32, name: Option<&str>) -> Vec<u32> {
    let mut groups = vec![primary_gid];
    let Some(name) = name else {
        return groups;
    };
    for fields in records(group_db) {
        let [_, _, gid, members, ..] = fields.as_slice() else {
            continue;
        };
        let Ok(gid) = gid.parse::<u32>() else {
            continue;
        };
        if members.split(',').any(|member| member.trim() == name) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
# comment
root:x:0:0:root:/root:/bin/bash
+nisuser::::::
user:x:1000:1000:User,,,:/home/user:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
broken:x:notanumber:1:::
";
    const GROUP: &str = "\
root:x:0:
staff:x:50:user,other
docker:x:999:other, user
user:x:1000:
nogroup:x:65534:
";

    fn sandbox_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(root.path().join("etc/group"), GROUP).unwrap();
        root
    }

    fn resolve_here(root: &tempfile::TempDir, user: Option<&str>) -> Identity {
        resolve_in(root.path(), user).unwrap()
    }

    #[test]
    fn none_is_root_with_its_home() {
        let root = sandbox_root();
        let identity = resolve_here(&root, None);
        assert_eq!((identity.uid, identity.gid), (0, 0));
        assert_eq!(identity.home, "/root");
        assert_eq!(identity.name.as_deref(), Some("root"));
        assert_eq!(identity.groups, vec![0]);
    }

    #[test]
    fn name_gets_primary_and_member_groups() {
        let root = sandbox_root();
        let identity = resolve_here(&root, Some("user"));
        assert_eq!((identity.uid, identity.gid), (1000, 1000));
        assert_eq!(identity.home, "/home/user");
        assert_eq!(identity.groups, vec![1000, 50, 999]);
    }

    #[test]
    fn uid_in_passwd_is_the_same_as_its_name() {
        let root = sandbox_root();
        assert_eq!(
            resolve_here(&root, Some("1000")),
            resolve_here(&root, Some("user"))
        );
    }

    #[test]
    fn unknown_numeric_uid_defaults_gid_and_home() {
        let root = sandbox_root();
        let identity = resolve_here(&root, Some("4242"));
        assert_eq!((identity.uid, identity.gid), (4242, 4242));
        assert_eq!(identity.home, "/");
        assert_eq!(identity.name, None);
        assert_eq!(identity.groups, vec![4242]);
    }

    #[test]
    fn explicit_group_replaces_supplementary_groups() {
        let root = sandbox_root();
        let by_name = resolve_here(&root, Some("user:staff"));
        assert_eq!(
            (by_name.uid, by_name.gid, by_name.groups),
            (1000, 50, vec![50])
        );
        let by_id = resolve_here(&root, Some("4242:7"));
        assert_eq!((by_id.uid, by_id.gid, by_id.groups), (4242, 7, vec![7]));
        assert_eq!(resolve_here(&root, Some("nobody:1000")).gid, 1000);
    }

    #[test]
    fn unknown_names_and_bad_specs_are_errors() {
        let root = sandbox_root();
        assert!(matches!(
            resolve_in(root.path(), Some("ghost")),
            Err(IdentityError::UnknownUser(name)) if name == "ghost"
        ));
        assert!(matches!(
            resolve_in(root.path(), Some("user:ghosts")),
            Err(IdentityError::UnknownGroup(name)) if name == "ghosts"
        ));
        // NIS compat lines and lines with a bad uid are not users.
        assert!(resolve_in(root.path(), Some("nisuser")).is_err());
        assert!(resolve_in(root.path(), Some("broken")).is_err());
        assert!(matches!(
            resolve_in(root.path(), Some("a b")),
            Err(IdentityError::Invalid(_))
        ));
        assert!(matches!(
            resolve_in(root.path(), Some("")),
            Err(IdentityError::Invalid(_))
        ));
    }

    #[test]
    fn missing_databases_still_allow_numeric_ids() {
        let root = tempfile::tempdir().unwrap();
        let identity = resolve_in(root.path(), None).unwrap();
        assert_eq!(
            (identity.uid, identity.gid, identity.home.as_str()),
            (0, 0, "/")
        );
        assert!(matches!(
            resolve_in(root.path(), Some("root")),
            Err(IdentityError::UnknownUser(_))
        ));
    }

    #[test]
    fn oversized_database_is_refused() {
        let root = sandbox_root();
        let huge = "x".repeat(MAX_DB_BYTES as usize + 1);
        std::fs::write(root.path().join("etc/passwd"), huge).unwrap();
        assert!(matches!(
            resolve_in(root.path(), None),
            Err(IdentityError::TooLarge { .. })
        ));
    }
}
