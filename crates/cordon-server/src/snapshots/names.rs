//! Snapshot names, tags, references (spec §2.1.3, §2.3.2) and image references.

use oci_spec::distribution::Reference;

/// Longest snapshot name (spec §2.1.3).
const MAX_NAME_LEN: usize = 255;
/// Longest tag (the distribution spec's bound).
const MAX_TAG_LEN: usize = 128;
/// Longest image reference accepted.
const MAX_IMAGE_REF_LEN: usize = 1024;
/// The namespace of the system snapshots, which nobody may publish into.
pub const SYSTEM_NAMESPACE: &str = "system/";
pub const DEFAULT_TAG: &str = "latest";

/// Registry-style: lowercase components of `[a-z0-9]` runs joined by one of `.`, `_`, `__`
/// or dashes, separated by `/`, at most 255 characters.
pub fn valid_snapshot_name(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN && !name.is_empty() && name.split('/').all(valid_component)
}

fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let separator = |b: &u8| matches!(b, b'.' | b'_' | b'-');
    if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        return false;
    }
    let mut run = Vec::new();
    for b in bytes {
        if separator(b) {
            run.push(*b);
            continue;
        }
        if !alnum(b) {
            return false;
        }
        let run_ok = match run.as_slice() {
            [] | [b'.'] | [b'_'] | [b'_', b'_'] => true,
            dashes => dashes.iter().all(|d| *d == b'-'),
        };
        if !run_ok {
            return false;
        }
        run.clear();
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    bytes.len() <= MAX_TAG_LEN
        && bytes.first().is_some_and(word)
        && bytes.iter().all(|b| word(b) || matches!(b, b'.' | b'-'))
}

pub fn is_system_name(name: &str) -> bool {
    name.starts_with(SYSTEM_NAMESPACE)
}

/// A snapshot reference split into `name` and its tag; `None` tag for a bare name.
pub fn split_reference(reference: &str) -> (&str, Option<&str>) {
    match reference.split_once(':') {
        Some((name, tag)) => (name, Some(tag)),
        None => (reference, None),
    }
}

/// True for the canonical hyphenated UUID form (snapshot ids).
pub fn looks_like_uuid(reference: &str) -> bool {
    reference.len() == 36 && uuid::Uuid::try_parse(reference).is_ok()
}

/// A parsed, valid image reference (`python:3.12-slim`, `host:5000/a/b@sha256:…`).
#[derive(Debug, Clone)]
pub struct ImageReference(Reference);

impl ImageReference {
    pub fn parse(reference: &str) -> Result<ImageReference, String> {
        if reference.len() > MAX_IMAGE_REF_LEN {
            return Err(format!(
                "image reference longer than {MAX_IMAGE_REF_LEN} characters"
            ));
        }
        reference
            .parse::<Reference>()
            .map(ImageReference)
            .map_err(|e| format!("{reference:?} is not a valid image reference: {e}"))
    }

    /// The image's own tag, else `latest`.
    pub fn tag(&self) -> &str {
        self.0.tag().unwrap_or(DEFAULT_TAG)
    }

    /// The registry it lives on, as [`registry_host`] normalises it.
    pub fn host(&self) -> String {
        registry_host(self.0.registry()).unwrap_or_default()
    }
}

/// The `host[:port]` a registry URL (`https://host:5000/path`, `host:5000`) names, lowercased,
/// with Docker Hub's aliases folded into `docker.io`; `None` when it names none.
pub fn registry_host(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let host = rest.split('/').next()?.to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !valid {
        return None;
    }
    Some(match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names() {
        for ok in [
            "a",
            "team/python",
            "a.b/c_d/e__f/g--h",
            "x1/2y",
            &"a".repeat(255),
        ] {
            assert!(valid_snapshot_name(ok), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a/",
            "/a",
            "a//b",
            "a:b",
            "-a",
            "a-",
            "a..b",
            "a.-b",
            "a___b",
            "a b",
            "é",
            &"a".repeat(256),
        ] {
            assert!(!valid_snapshot_name(bad), "{bad}");
        }
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.2-rc_3", "_x", "A"] {
            assert!(valid_tag(ok), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(!valid_tag(bad), "{bad}");
        }
    }

    #[test]
    fn image_references() {
        let python = ImageReference::parse("python:3.12-slim").unwrap();
        assert_eq!(
            (python.tag(), python.host().as_str()),
            ("3.12-slim", "docker.io")
        );
        let local = ImageReference::parse("127.0.0.1:5000/tools/busybox").unwrap();
        assert_eq!(
            (local.tag(), local.host().as_str()),
            ("latest", "127.0.0.1:5000")
        );
        assert!(ImageReference::parse("Not An Image").is_err());
        assert!(ImageReference::parse("").is_err());
        assert_eq!(
            registry_host("https://Registry.example:5000/v2/").as_deref(),
            Some("registry.example:5000")
        );
        assert_eq!(
            registry_host("index.docker.io").as_deref(),
            Some("docker.io")
        );
        assert_eq!(registry_host("https://"), None);
        assert_eq!(registry_host("a b"), None);
    }
}
