//! List paging (spec §2.1.5): `limit`/`offset` of the hand-written clients and
//! `page_size`/`cursor` of the generated one, answered in both envelopes.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::error::ApiError;

/// Where a page starts and how many items it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub start: usize,
    pub size: usize,
}

impl PageRequest {
    /// Reads `limit`/`page_size` (1 to `max`, default `default`) and `offset`/`cursor`; any
    /// other value is a 400 naming the parameter.
    pub fn from_query(
        query: &HashMap<String, String>,
        default: usize,
        max: usize,
    ) -> Result<PageRequest, ApiError> {
        let size = |key: &str| -> Result<Option<usize>, ApiError> {
            let Some(value) = query.get(key) else {
                return Ok(None);
            };
            match value.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::Invalid(format!(
                    "{key} must be an integer from 1 to {max}, got {value:?}"
                ))),
            }
        };
        let start = |key: &str| -> Result<Option<usize>, ApiError> {
            let Some(value) = query.get(key) else {
                return Ok(None);
            };
            value.parse::<usize>().map(Some).map_err(|_| {
                ApiError::Invalid(format!(
                    "{key} must be a non-negative integer, got {value:?}"
                ))
            })
        };
        let size = size("page_size")?.or(size("limit")?).unwrap_or(default);
        let start = start("cursor")?.or(start("offset")?).unwrap_or(0);
        Ok(PageRequest { start, size })
    }
}

/// One page of `items` in both list envelopes (spec §2.1.5).
pub fn page(items: Vec<Value>, start: usize, size: usize, legacy_key: &str) -> Value {
    let total = items.len();
    let page: Vec<Value> = items.into_iter().skip(start).take(size).collect();
    let next = start.saturating_add(page.len());
    let (next_cursor, offset) = if next < total {
        (Value::String(next.to_string()), next)
    } else {
        (Value::Null, 0)
    };
    json!({ "items": page, legacy_key: page, "next_cursor": next_cursor, "offset": offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_both_styles_and_refuses_out_of_range() {
        let ok = |pairs| PageRequest::from_query(&query(pairs), 50, 500).unwrap();
        assert_eq!(ok(&[]), PageRequest { start: 0, size: 50 });
        assert_eq!(
            ok(&[("limit", "500"), ("offset", "3")]),
            PageRequest {
                start: 3,
                size: 500
            }
        );
        assert_eq!(
            ok(&[("page_size", "2"), ("cursor", "4"), ("limit", "9")]),
            PageRequest { start: 4, size: 2 }
        );
        for bad in [
            [("limit", "0")],
            [("limit", "501")],
            [("limit", "x")],
            [("offset", "-1")],
            [("cursor", "abc")],
        ] {
            assert!(
                PageRequest::from_query(&query(&bad), 50, 500).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pages_carry_both_envelopes() {
        let items: Vec<Value> = (0..5).map(|i| json!(i)).collect();
        let first = page(items.clone(), 0, 2, "snapshots");
        assert_eq!(first["items"], json!([0, 1]));
        assert_eq!(first["snapshots"], json!([0, 1]));
        assert_eq!(first["next_cursor"], "2");
        assert_eq!(first["offset"], 2);
        let last = page(items, 4, 2, "snapshots");
        assert_eq!(last["items"], json!([4]));
        assert_eq!(last["next_cursor"], Value::Null);
        assert_eq!(last["offset"], 0);
    }
}
