//! Conditional and ranged download decisions (spec §3.5.2, RFC 9110 §13–14), kept free of
//! I/O so every case is unit-tested.

use std::os::unix::fs::MetadataExt;

use axum::http::header::{IF_NONE_MATCH, IF_RANGE, RANGE};
use axum::http::HeaderMap;

/// What to send for a download request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// 304: the client's copy is current.
    NotModified,
    /// 200 with the whole file.
    Full,
    /// 206 with bytes `first..=last`.
    Partial { first: u64, last: u64 },
    /// 416: the range starts at or past the end.
    Unsatisfiable,
}

/// A strong validator: any change of identity, size or nanosecond mtime changes it.
pub fn etag(metadata: &std::fs::Metadata) -> String {
    format!(
        "\"{:x}-{:x}-{:x}-{:x}.{:x}\"",
        metadata.dev(),
        metadata.ino(),
        metadata.size(),
        metadata.mtime(),
        metadata.mtime_nsec()
    )
}

/// Decides the response from the request headers, the file's current ETag and size.
/// `ranges_allowed` is false for HEAD, where Range has no defined meaning and is ignored.
pub fn plan(headers: &HeaderMap, current_etag: &str, size: u64, ranges_allowed: bool) -> Plan {
    if let Some(if_none_match) = header_text(headers, IF_NONE_MATCH) {
        if any_tag_matches_weakly(if_none_match, current_etag) {
            return Plan::NotModified;
        }
    }
    if !ranges_allowed {
        return Plan::Full;
    }
    let Some(range) = header_text(headers, RANGE) else {
        return Plan::Full;
    };
    if let Some(if_range) = header_text(headers, IF_RANGE) {
        // Only a strong ETag can validate a range; a date or weak tag means "send it all".
        if if_range.trim() != current_etag || current_etag.starts_with("W/") {
            return Plan::Full;
        }
    }
    match parse_byte_range(range) {
        Some(spec) => spec.resolve(size),
        // A Range we do not understand (or several ranges) is ignored, as RFC 9110 allows.
        None => Plan::Full,
    }
}

fn header_text(headers: &HeaderMap, name: axum::http::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// `If-None-Match` uses the weak comparison: `W/"x"` matches `"x"`.
fn any_tag_matches_weakly(list: &str, current: &str) -> bool {
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_string();
    let current = opaque(current);
    list.split(',')
        .any(|tag| tag.trim() == "*" || opaque(tag) == current)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeSpec {
    /// `a-b` or `a-` (`last` = None).
    FromTo { first: u64, last: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

impl RangeSpec {
    fn resolve(self, size: u64) -> Plan {
        match self {
            RangeSpec::FromTo { first, .. } if first >= size => Plan::Unsatisfiable,
            RangeSpec::FromTo { first, last } => {
                let last = last.map_or(size - 1, |last| last.min(size - 1));
                Plan::Partial { first, last }
            }
            RangeSpec::Suffix(0) => Plan::Unsatisfiable,
            RangeSpec::Suffix(_) if size == 0 => Plan::Unsatisfiable,
            RangeSpec::Suffix(length) => Plan::Partial {
                first: size - length.min(size),
                last: size - 1,
            },
        }
    }
}

/// One `bytes=` range; anything else (other units, several ranges, `b < a`) is `None`.
fn parse_byte_range(header: &str) -> Option<RangeSpec> {
    let (unit, set) = header.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return None;
    }
    let (first, last) = set.trim().split_once('-')?;
    let number = |text: &str| -> Option<u64> {
        let text = text.trim();
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok())?
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, true) => None,
        (true, false) => Some(RangeSpec::Suffix(number(last)?)),
        (false, true) => Some(RangeSpec::FromTo {
            first: number(first)?,
            last: None,
        }),
        (false, false) => {
            let (first, last) = (number(first)?, number(last)?);
            (last >= first).then_some(RangeSpec::FromTo {
                first,
                last: Some(last),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: &str = "\"1-2-3-4.5\"";

    fn plan_for(pairs: &[(&'static str, &str)], size: u64) -> Plan {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        plan(&headers, TAG, size, true)
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(
            plan_for(&[("range", "bytes=2-5")], 10),
            Plan::Partial { first: 2, last: 5 }
        );
        assert_eq!(
            plan_for(&[("range", "bytes=2-")], 10),
            Plan::Partial { first: 2, last: 9 }
        );
        assert_eq!(
            plan_for(&[("range", "bytes=-3")], 10),
            Plan::Partial { first: 7, last: 9 }
        );
        assert_eq!(
            plan_for(&[("range", "bytes=-30")], 10),
            Plan::Partial { first: 0, last: 9 }
        );
        assert_eq!(
            plan_for(&[("range", "bytes=8-100")], 10),
            Plan::Partial { first: 8, last: 9 }
        );
        assert_eq!(
            plan_for(&[("range", "Bytes = 0-0")], 10),
            Plan::Partial { first: 0, last: 0 }
        );
    }

    #[test]
    fn unsatisfiable_ranges() {
        assert_eq!(plan_for(&[("range", "bytes=10-")], 10), Plan::Unsatisfiable);
        assert_eq!(
            plan_for(&[("range", "bytes=10-20")], 10),
            Plan::Unsatisfiable
        );
        assert_eq!(plan_for(&[("range", "bytes=-0")], 10), Plan::Unsatisfiable);
        assert_eq!(plan_for(&[("range", "bytes=0-")], 0), Plan::Unsatisfiable);
        assert_eq!(plan_for(&[("range", "bytes=-5")], 0), Plan::Unsatisfiable);
    }

    #[test]
    fn ranges_we_ignore() {
        for ignored in [
            "bytes=5-2",
            "bytes=0-1,4-5",
            "items=0-1",
            "bytes=-",
            "bytes=a-b",
            "bytes=+1-2",
        ] {
            assert_eq!(plan_for(&[("range", ignored)], 10), Plan::Full, "{ignored}");
        }
        assert_eq!(plan(&HeaderMap::new(), TAG, 10, true), Plan::Full);
    }

    #[test]
    fn if_range_needs_the_current_strong_tag() {
        let matching = plan_for(&[("range", "bytes=1-2"), ("if-range", TAG)], 10);
        assert_eq!(matching, Plan::Partial { first: 1, last: 2 });
        let stale = plan_for(&[("range", "bytes=1-2"), ("if-range", "\"old\"")], 10);
        assert_eq!(stale, Plan::Full);
        let weak = plan_for(
            &[("range", "bytes=1-2"), ("if-range", &format!("W/{TAG}"))],
            10,
        );
        assert_eq!(weak, Plan::Full);
        let date = plan_for(
            &[
                ("range", "bytes=1-2"),
                ("if-range", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            10,
        );
        assert_eq!(date, Plan::Full);
    }

    #[test]
    fn if_none_match() {
        assert_eq!(plan_for(&[("if-none-match", TAG)], 10), Plan::NotModified);
        assert_eq!(
            plan_for(&[("if-none-match", &format!("\"x\", W/{TAG}"))], 10),
            Plan::NotModified
        );
        assert_eq!(plan_for(&[("if-none-match", "*")], 10), Plan::NotModified);
        assert_eq!(
            plan_for(&[("if-none-match", "\"x\""), ("range", "bytes=0-0")], 10),
            Plan::Partial { first: 0, last: 0 }
        );
    }

    #[test]
    fn head_ignores_range() {
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, "bytes=0-1".parse().unwrap());
        assert_eq!(plan(&headers, TAG, 10, false), Plan::Full);
    }
}
