//! Field validation of create and update bodies; every failure names its field (spec §1.6).

use std::collections::BTreeMap;

use cordon_api::run_config::MAX_ENV_BYTES;
use cordon_api::RunConfig;
use serde_json::{Map, Value};

use crate::error::FieldError;

/// Largest TTL accepted: ten years, so that arithmetic on it can never overflow.
const MAX_TTL_SECONDS: u64 = 10 * 365 * 86_400;
const MAX_VCPUS: u64 = 256;
const MIN_MEM_BYTES: u64 = 16 << 20;
const MAX_MEM_BYTES: u64 = 1 << 40;
const MIN_FS_BYTES: u64 = 8 << 20;
const MAX_FS_BYTES: u64 = 1 << 40;
const MAX_LABELS: usize = 64;
const MAX_LABEL_BYTES: usize = 256;
/// Longest `timeout` a create may wait.
pub const MAX_CREATE_TIMEOUT: u64 = 3600;

/// Collects field errors while reading a JSON object.
pub struct Fields<'a> {
    object: &'a Map<String, Value>,
    pub errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    pub fn new(object: &'a Map<String, Value>) -> Self {
        Fields {
            object,
            errors: Vec::new(),
        }
    }

    fn present(&self, field: &str) -> Option<&'a Value> {
        self.object.get(field).filter(|v| !v.is_null())
    }

    fn fail(&mut self, field: &str, msg: impl Into<String>) {
        self.errors.push(FieldError::value(field, msg));
    }

    pub fn string(&mut self, field: &str) -> Option<String> {
        match self.present(field) {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.fail(field, "Input should be a valid string");
                None
            }
        }
    }

    /// `runtime` (Cordon extension): `namespace` or `microvm`.
    pub fn runtime(&mut self) -> Option<cordon_runtime::Backend> {
        let value = self.string("runtime")?;
        match value.parse() {
            Ok(backend) => Some(backend),
            Err(_) => {
                self.fail("runtime", "Input should be 'namespace' or 'microvm'");
                None
            }
        }
    }

    pub fn boolean(&mut self, field: &str) -> Option<bool> {
        match self.present(field) {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                self.fail(field, "Input should be a valid boolean");
                None
            }
        }
    }

    /// A non-negative integer no larger than `max`.
    pub fn uint(&mut self, field: &str, max: u64) -> Option<u64> {
        let value = self.present(field)?;
        match value.as_u64() {
            Some(n) if n <= max => Some(n),
            Some(_) => {
                self.fail(field, format!("Value error, must be at most {max}"));
                None
            }
            None => {
                self.fail(field, "Input should be a non-negative integer");
                None
            }
        }
    }

    /// Seconds as an integer, or a float rounded up (JS clients may send `30.5`).
    pub fn seconds(&mut self, field: &str, max: u64) -> Option<u64> {
        match self.present(field)?.as_f64() {
            Some(s) if s.is_finite() && (0.0..=max as f64).contains(&s) => Some(s.ceil() as u64),
            _ => {
                self.fail(field, format!("Input should be a number from 0 to {max}"));
                None
            }
        }
    }

    /// A TTL: 0 (disabled) or a positive multiple of 60 seconds.
    pub fn ttl(&mut self, field: &str) -> Option<u64> {
        let ttl = self.uint(field, MAX_TTL_SECONDS)?;
        if ttl % 60 != 0 {
            self.fail(
                field,
                "Value error, must be 0 (disabled) or a multiple of 60 seconds",
            );
            return None;
        }
        Some(ttl)
    }

    pub fn vcpus_as_millicores(&mut self) -> Option<u32> {
        if self.present("cpu_millicores").is_some() {
            let m = self.uint("cpu_millicores", MAX_VCPUS * 1000)?;
            return self.positive("cpu_millicores", m).map(|m| m as u32);
        }
        let vcpus = self.uint("vcpus", MAX_VCPUS)?;
        self.positive("vcpus", vcpus).map(|v| (v * 1000) as u32)
    }

    fn positive(&mut self, field: &str, n: u64) -> Option<u64> {
        if n == 0 {
            self.fail(field, "Value error, must be positive");
            return None;
        }
        Some(n)
    }

    pub fn mem_bytes(&mut self) -> Option<u64> {
        self.bytes_in("mem_bytes", MIN_MEM_BYTES, MAX_MEM_BYTES)
    }

    pub fn fs_capacity_bytes(&mut self) -> Option<u64> {
        self.bytes_in("fs_capacity_bytes", MIN_FS_BYTES, MAX_FS_BYTES)
    }

    fn bytes_in(&mut self, field: &str, min: u64, max: u64) -> Option<u64> {
        let n = self.uint(field, max)?;
        if n < min {
            self.fail(field, format!("Value error, must be at least {min} bytes"));
            return None;
        }
        Some(n)
    }

    pub fn run_config(&mut self) -> Option<RunConfig> {
        let value = self.present("run_config")?;
        let config: RunConfig = match serde_json::from_value(value.clone()) {
            Ok(config) => config,
            Err(error) => {
                self.fail("run_config", format!("Value error, {error}"));
                return None;
            }
        };
        if let Err(error) = config.validate() {
            self.fail("run_config", format!("Value error, {error}"));
            return None;
        }
        let env_bytes: usize = config
            .env_vars
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if env_bytes > MAX_ENV_BYTES {
            self.fail("run_config", "Value error, env_vars too large");
            return None;
        }
        Some(config)
    }

    pub fn labels(&mut self) -> Option<BTreeMap<String, String>> {
        let value = self.present("labels")?;
        let labels: BTreeMap<String, String> = match serde_json::from_value(value.clone()) {
            Ok(labels) => labels,
            Err(_) => {
                self.fail("labels", "Input should be an object of strings");
                return None;
            }
        };
        let too_big = labels
            .iter()
            .any(|(k, v)| k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES);
        if labels.len() > MAX_LABELS || too_big {
            self.fail("labels", "Value error, too many or too long labels");
            return None;
        }
        Some(labels)
    }

    /// A sandbox name: checked by [`valid_name`].
    pub fn name(&mut self) -> Option<String> {
        let name = self.string("name")?;
        if !valid_name(&name) {
            self.fail(
                "name",
                "Value error, name must be 1 to 63 lowercase letters, digits or '-', \
                 starting and ending with a letter or digit",
            );
            return None;
        }
        Some(name)
    }

    pub fn object(&mut self, field: &str) -> Option<Value> {
        match self.present(field) {
            None => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(_) => {
                self.fail(field, "Input should be a valid dictionary");
                None
            }
        }
    }
}

/// DNS-label-like: lowercase alphanumerics and `-`, 1 to 63 characters, alphanumeric at both
/// ends (names appear in URLs and hostnames).
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    !bytes.is_empty()
        && bytes.len() <= 63
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "sandbox-1234abcd", "0x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn ttls_must_be_multiples_of_60() {
        let body = serde_json::json!({"idle_ttl_seconds": 61, "delete_after_stop_seconds": 120});
        let mut fields = Fields::new(body.as_object().unwrap());
        assert_eq!(fields.ttl("idle_ttl_seconds"), None);
        assert_eq!(fields.ttl("delete_after_stop_seconds"), Some(120));
        assert_eq!(fields.errors.len(), 1);
        assert_eq!(fields.errors[0].loc, ["body", "idle_ttl_seconds"]);
    }
}
