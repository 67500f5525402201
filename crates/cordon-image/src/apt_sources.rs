//! The Debian mirror to bootstrap from, taken from the host's own apt configuration: a host
//! that can install its packages can reach that mirror (it may be the only one it can reach,
//! e.g. a local or proxied mirror), so we never hard-code one unless apt names none.

use std::fs;
use std::path::{Path, PathBuf};

/// Used only when the host's apt configuration names no mirror for the suite.
pub(crate) const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";

/// Where apt reads its sources, in apt's own order.
const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// One binary (`deb`) source for a suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mirror {
    pub uri: String,
    /// `signed-by`, when it names a keyring file (debootstrap's `--keyring`).
    pub keyring: Option<PathBuf>,
}

/// The first `deb` source on this host that serves `suite`.
pub(crate) fn host_mirror(suite: &str) -> Option<Mirror> {
    source_files()
        .iter()
        .filter_map(|path| Some((path, fs::read_to_string(path).ok()?)))
        .find_map(|(path, text)| {
            if path.extension().is_some_and(|ext| ext == "sources") {
                mirror_in_deb822(&text, suite)
            } else {
                mirror_in_one_line(&text, suite)
            }
        })
}

/// `sources.list`, then `sources.list.d/*.list` and `*.sources` sorted by name (others, such
/// as `*.disabled`, are ignored by apt and so by us).
fn source_files() -> Vec<PathBuf> {
    let mut parts: Vec<PathBuf> = fs::read_dir(SOURCES_DIR)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| {
                    path.extension()
                        .is_some_and(|ext| ext == "list" || ext == "sources")
                })
                .collect()
        })
        .unwrap_or_default();
    parts.sort();
    let mut files = vec![PathBuf::from(SOURCES_LIST)];
    files.extend(parts);
    files
}

/// One-line style: `deb [options] URI suite component...`.
fn mirror_in_one_line(text: &str, suite: &str) -> Option<Mirror> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let (options, rest) = match rest.strip_prefix('[') {
            Some(bracketed) => bracketed.split_once(']')?,
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == suite).then(|| Mirror {
            uri: uri.to_string(),
            keyring: options
                .split_whitespace()
                .find_map(|option| option.strip_prefix("signed-by="))
                .and_then(keyring_file),
        })
    })
}

/// deb822 style: stanzas of `Field: value` separated by blank lines.
fn mirror_in_deb822(text: &str, suite: &str) -> Option<Mirror> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| deb822_field(stanza, name);
        let enabled = field("Enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
        let binary = field("Types")?.split_whitespace().any(|t| t == "deb");
        let serves = field("Suites")?.split_whitespace().any(|s| s == suite);
        if !(enabled && binary && serves) {
            return None;
        }
        Some(Mirror {
            uri: field("URIs")?.split_whitespace().next()?.to_string(),
            keyring: field("Signed-By").as_deref().and_then(keyring_file),
        })
    })
}

/// The value of `name` in a deb822 stanza (case-insensitive), comments skipped. Multi-line
/// values (an inline `Signed-By` key) keep only their first line, which is all we use.
fn deb822_field(stanza: &str, name: &str) -> Option<String> {
    stanza
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
}

/// A `signed-by` value naming an existing keyring file (it may also be a fingerprint or an
/// inline key, which debootstrap cannot take).
fn keyring_file(value: &str) -> Option<PathBuf> {
    let path = Path::new(value.trim());
    (path.is_absolute() && path.is_file()).then(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_stanza_for_the_suite_is_found() {
        let text = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://security.example/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_in_deb822(text, "bookworm").map(|m| m.uri),
            Some("http://mirror.example/debian".to_string())
        );
        assert_eq!(mirror_in_deb822(text, "trixie"), None);
    }

    #[test]
    fn disabled_and_source_only_stanzas_are_skipped() {
        let text = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n\
                    Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n\
                    Types: deb deb-src\nURIs: http://on.example/debian\nSuites: bookworm\n";
        assert_eq!(
            mirror_in_deb822(text, "bookworm").map(|m| m.uri),
            Some("http://on.example/debian".to_string())
        );
    }

    #[test]
    fn one_line_sources_with_options_are_parsed() {
        let text = "# deb http://commented.example/debian bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/nonexistent.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_in_one_line(text, "bookworm"),
            Some(Mirror {
                uri: "http://m.example/debian".to_string(),
                keyring: None,
            })
        );
    }
}
