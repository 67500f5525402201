//! `proxy_config` (spec §6.1): egress rules, access control and the credentials the egress
//! proxy adds on the way out.
//!
//! Clients forward these objects as-is, so unknown keys are kept (`extra`) and returned, except
//! on secret value objects, where only the known keys survive redaction. Secrets never leave
//! the server: [`ProxyConfig::redacted`] replaces every opaque value (and every AWS/GCP/Azure
//! secret field) with `is_set: true`, and [`ProxyConfig::merged_update`] carries a stored
//! opaque value over when an update omits it (spec §2.2.4).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Most rules one config may hold.
pub const MAX_RULES: usize = 256;
/// Most entries in one list (hosts, paths, headers, allow/deny patterns, env vars).
pub const MAX_LIST: usize = 256;
/// Longest single string (a pattern, a header name, a rule name).
pub const MAX_STRING: usize = 1024;
/// Longest secret value (a service-account JSON key is a few KiB).
pub const MAX_SECRET: usize = 64 * 1024;
/// Most bytes the whole config may take as JSON.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyConfig {
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_control: Option<AccessControl>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub callbacks: Vec<Callback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Deprecated and ignored (old clients still send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<Vec<String>>,
    /// Template-era form: `{header name: value}` injected for every host. Plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject_headers: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccessControl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_list: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_list: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Callback {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub match_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_request: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_headers: Vec<Header>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    /// `None` for header injection; `aws`, `gcp`, `azure`, `attribution`, `relay`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub rule_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<Header>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp: Option<GcpAuth>,
    /// Kept as JSON: Azure is not enforced by Cordon (the policy refuses it), but its secret
    /// fields (`account_key`, `sas_token`) are still redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Rule {
    /// Helpers default `enabled` to true; so do we.
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(true)
    }
}

/// How a header or secret value is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    /// Stored and returned as is.
    Plaintext,
    /// Write-only: never returned (`is_set` instead).
    Opaque,
    /// `{NAME}` references to workspace secrets, resolved when a request goes out.
    WorkspaceSecret,
}

/// A header to inject: `{"name", "type", "value"?, "is_set"?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    #[serde(default)]
    pub name: String,
    #[serde(flatten)]
    pub secret: SecretValue,
}

/// A value object: `{"type", "value"?, "is_set"?}`. A bare JSON string is read as an opaque
/// value (the safe reading: it is never echoed back). A missing `type` also means opaque.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecretValue {
    #[serde(rename = "type")]
    pub kind: SecretKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_set: Option<bool>,
}

impl SecretValue {
    pub fn plaintext(value: impl Into<String>) -> Self {
        SecretValue {
            kind: SecretKind::Plaintext,
            value: Some(value.into()),
            is_set: None,
        }
    }
    pub fn opaque(value: impl Into<String>) -> Self {
        SecretValue {
            kind: SecretKind::Opaque,
            value: Some(value.into()),
            is_set: None,
        }
    }
    pub fn workspace_secret(value: impl Into<String>) -> Self {
        SecretValue {
            kind: SecretKind::WorkspaceSecret,
            value: Some(value.into()),
            is_set: None,
        }
    }

    /// What a response shows: opaque values become `is_set: true` without the value.
    fn redacted(&self) -> SecretValue {
        match self.kind {
            SecretKind::Opaque => SecretValue {
                kind: SecretKind::Opaque,
                value: None,
                is_set: Some(self.value.is_some() || self.is_set == Some(true)),
            },
            _ => SecretValue {
                kind: self.kind,
                value: self.value.clone(),
                is_set: None,
            },
        }
    }

    /// Redaction for credential fields (AWS/GCP): whatever the kind, never shown.
    fn redacted_always(&self) -> SecretValue {
        SecretValue {
            kind: self.kind,
            value: if self.kind == SecretKind::WorkspaceSecret {
                self.value.clone()
            } else {
                None
            },
            is_set: Some(self.value.is_some() || self.is_set == Some(true)),
        }
    }

    /// An opaque value omitted in an update keeps the stored one.
    fn carry_over(&mut self, stored: Option<&SecretValue>) {
        if self.kind == SecretKind::Opaque && self.value.is_none() {
            if let Some(stored) = stored.filter(|s| s.kind == SecretKind::Opaque) {
                self.value = stored.value.clone();
            }
        }
        if self.value.is_some() {
            self.is_set = None;
        }
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Object {
            #[serde(default, rename = "type")]
            kind: Option<SecretKind>,
            #[serde(default)]
            value: Option<String>,
            #[serde(default)]
            is_set: Option<bool>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Bare(String),
            Object(Object),
        }
        Ok(match Form::deserialize(de)? {
            Form::Bare(value) => SecretValue::opaque(value),
            Form::Object(o) => SecretValue {
                kind: o.kind.unwrap_or(SecretKind::Opaque),
                value: o.value,
                is_set: o.is_set,
            },
        })
    }
}

/// `aws`: the static form (`access_key_id` + `secret_access_key`) or the role form
/// (`role_arn`, which Cordon does not support).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AwsAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_tags: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_scope: Option<Value>,
    /// Cordon extension: signing region when the host does not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Cordon extension: signing service when the host does not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `gcp`: a service-account key (`service_account_json`) or workload identity (unsupported).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcpAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_json: Option<SecretValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity_provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_scope: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Keys of an `azure` block that hold secrets.
const AZURE_SECRET_KEYS: [&str; 2] = ["account_key", "sas_token"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proxy_config: {0}")]
pub struct ProxyConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ProxyConfigError> {
    Err(ProxyConfigError(msg.into()))
}

fn check_str(what: &str, s: &str) -> Result<(), ProxyConfigError> {
    if s.len() > MAX_STRING {
        return err(format!("{what} is longer than {MAX_STRING} bytes"));
    }
    if s.contains('\0') {
        return err(format!("{what} contains NUL"));
    }
    Ok(())
}

fn check_list(what: &str, list: &[String]) -> Result<(), ProxyConfigError> {
    if list.len() > MAX_LIST {
        return err(format!("{what} has more than {MAX_LIST} entries"));
    }
    for item in list {
        check_str(what, item)?;
        if item.trim().is_empty() {
            return err(format!("{what} has an empty entry"));
        }
    }
    Ok(())
}

fn check_secret(what: &str, v: &SecretValue) -> Result<(), ProxyConfigError> {
    if let Some(value) = &v.value {
        if value.len() > MAX_SECRET {
            return err(format!("{what} is longer than {MAX_SECRET} bytes"));
        }
        if value.contains(['\0', '\r', '\n']) && v.kind != SecretKind::Opaque {
            return err(format!("{what} contains a control character"));
        }
    }
    Ok(())
}

/// A header name is an HTTP token (RFC 9110 §5.6.2).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Header {
    fn validate(&self, what: &str) -> Result<(), ProxyConfigError> {
        check_str(what, &self.name)?;
        if !is_token(&self.name) {
            return err(format!(
                "{what}: {:?} is not a valid header name",
                self.name
            ));
        }
        if let Some(value) = &self.secret.value {
            // Header values go on the wire: no CR/LF/NUL whatever the kind.
            if value.contains(['\0', '\r', '\n']) {
                return err(format!("{what}: header value contains CR, LF or NUL"));
            }
        }
        check_secret(what, &self.secret)?;
        if self.secret.value.is_none() && self.secret.kind != SecretKind::Opaque {
            return err(format!(
                "{what}: a {:?} header needs a value",
                self.secret.kind
            ));
        }
        Ok(())
    }
}

impl ProxyConfig {
    /// Shape checks with messages naming the field; bounds every count and length. The egress
    /// policy compiler (cordon-proxy) checks meaning (patterns, supported rule types).
    pub fn validate(&self) -> Result<(), ProxyConfigError> {
        let size = serde_json::to_vec(self)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_CONFIG_BYTES {
            return err(format!("is larger than {MAX_CONFIG_BYTES} bytes"));
        }
        if self.rules.len() > MAX_RULES {
            return err(format!("rules: more than {MAX_RULES} rules"));
        }
        if let Some(d) = &self.description {
            check_str("description", d)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if rule.name.trim().is_empty() {
                return err(format!("{at}.name is required"));
            }
            check_str(&format!("{at}.name"), &rule.name)?;
            if !names.insert(rule.name.as_str()) {
                return err(format!("{at}.name {:?} is used by two rules", rule.name));
            }
            rule.validate(&at)?;
        }
        if let Some(ac) = &self.access_control {
            check_list(
                "access_control.allow_list",
                ac.allow_list.as_deref().unwrap_or(&[]),
            )?;
            check_list(
                "access_control.deny_list",
                ac.deny_list.as_deref().unwrap_or(&[]),
            )?;
        }
        if self.callbacks.len() > MAX_LIST {
            return err(format!("callbacks: more than {MAX_LIST}"));
        }
        for (i, cb) in self.callbacks.iter().enumerate() {
            check_str(&format!("callbacks[{i}].url"), &cb.url)?;
            check_list(&format!("callbacks[{i}].match_hosts"), &cb.match_hosts)?;
            for (j, h) in cb.request_headers.iter().enumerate() {
                h.validate(&format!("callbacks[{i}].request_headers[{j}]"))?;
            }
        }
        if let Some(inject) = &self.inject_headers {
            if inject.len() > MAX_LIST {
                return err(format!("inject_headers: more than {MAX_LIST}"));
            }
            for (name, value) in inject {
                Header {
                    name: name.clone(),
                    secret: SecretValue::plaintext(value.clone()),
                }
                .validate("inject_headers")?;
            }
        }
        Ok(())
    }

    /// The config as API responses show it: no opaque or credential value.
    pub fn redacted(&self) -> ProxyConfig {
        let mut out = self.clone();
        for rule in &mut out.rules {
            rule.redact();
        }
        for cb in &mut out.callbacks {
            for h in &mut cb.request_headers {
                h.secret = h.secret.redacted();
            }
        }
        out
    }

    /// `update` (a PATCH body's proxy_config) replacing `self` (the stored one): the rule set
    /// is replaced; an opaque value the update omits keeps the stored value of the rule with
    /// the same name (headers matched by name, case-insensitively; AWS/GCP fields by key), as
    /// long as that rule still has the same type and `match_hosts`: a hidden value never
    /// follows a rule to new hosts, so a rule sent there must carry its values again.
    pub fn merged_update(&self, update: ProxyConfig) -> ProxyConfig {
        let mut out = update;
        for rule in &mut out.rules {
            let Some(stored) = self.rules.iter().find(|r| {
                r.name == rule.name
                    && r.rule_type == rule.rule_type
                    && r.match_hosts == rule.match_hosts
            }) else {
                continue;
            };
            for h in &mut rule.headers {
                let old = stored
                    .headers
                    .iter()
                    .find(|o| o.name.eq_ignore_ascii_case(&h.name));
                h.secret.carry_over(old.map(|o| &o.secret));
            }
            if let (Some(aws), Some(old)) = (&mut rule.aws, &stored.aws) {
                carry_field(&mut aws.access_key_id, &old.access_key_id);
                carry_field(&mut aws.secret_access_key, &old.secret_access_key);
                carry_field(&mut aws.session_token, &old.session_token);
            }
            if let (Some(gcp), Some(old)) = (&mut rule.gcp, &stored.gcp) {
                carry_field(&mut gcp.service_account_json, &old.service_account_json);
            }
            if let (Some(Value::Object(azure)), Some(Value::Object(old))) =
                (&mut rule.azure, &stored.azure)
            {
                for key in AZURE_SECRET_KEYS {
                    if let (Some(new), Some(old)) = (azure.get_mut(key), old.get(key)) {
                        if new.get("value").is_none()
                            && new.get("is_set") == Some(&Value::Bool(true))
                        {
                            *new = old.clone();
                        }
                    }
                }
            }
        }
        for (i, cb) in out.callbacks.iter_mut().enumerate() {
            let Some(old) = self.callbacks.get(i).filter(|o| o.url == cb.url) else {
                continue;
            };
            for h in &mut cb.request_headers {
                let stored = old
                    .request_headers
                    .iter()
                    .find(|o| o.name.eq_ignore_ascii_case(&h.name));
                h.secret.carry_over(stored.map(|o| &o.secret));
            }
        }
        out
    }

    /// Plaintext env vars of the enabled rules, for every command (dummy credentials).
    pub fn env_vars(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for rule in self.rules.iter().filter(|r| r.is_enabled()) {
            env.extend(rule.env_vars.clone());
        }
        env
    }
}

/// A credential field omitted (or sent back redacted) in an update keeps the stored value.
fn carry_field(new: &mut Option<SecretValue>, old: &Option<SecretValue>) {
    match new {
        Some(v) if v.value.is_none() => {
            if let Some(old) = old.as_ref().filter(|o| o.kind == v.kind) {
                v.value = old.value.clone();
                v.is_set = None;
            }
        }
        Some(_) => {}
        None => {}
    }
}

impl Rule {
    fn validate(&self, at: &str) -> Result<(), ProxyConfigError> {
        if let Some(t) = &self.rule_type {
            check_str(&format!("{at}.type"), t)?;
        }
        if let Some(d) = &self.description {
            check_str(&format!("{at}.description"), d)?;
        }
        check_list(&format!("{at}.match_hosts"), &self.match_hosts)?;
        check_list(&format!("{at}.match_paths"), &self.match_paths)?;
        check_list(&format!("{at}.match_headers"), &self.match_headers)?;
        for (i, mh) in self.match_headers.iter().enumerate() {
            match mh.split_once(':') {
                Some((name, _)) if is_token(name.trim()) => {}
                _ => {
                    return err(format!(
                        "{at}.match_headers[{i}] must be \"name: value\", got {mh:?}"
                    ))
                }
            }
        }
        if self.headers.len() > MAX_LIST {
            return err(format!("{at}.headers has more than {MAX_LIST} entries"));
        }
        for (i, h) in self.headers.iter().enumerate() {
            h.validate(&format!("{at}.headers[{i}]"))?;
        }
        if self.env_vars.len() > MAX_LIST {
            return err(format!("{at}.env_vars has more than {MAX_LIST} entries"));
        }
        for (k, v) in &self.env_vars {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return err(format!("{at}.env_vars: bad variable {k:?}"));
            }
            check_str(&format!("{at}.env_vars"), k)?;
            if v.len() > MAX_SECRET {
                return err(format!("{at}.env_vars[{k:?}] is too long"));
            }
        }
        if let Some(aws) = &self.aws {
            for (name, v) in [
                ("access_key_id", &aws.access_key_id),
                ("secret_access_key", &aws.secret_access_key),
                ("session_token", &aws.session_token),
            ] {
                if let Some(v) = v {
                    check_secret(&format!("{at}.aws.{name}"), v)?;
                }
            }
        }
        if let Some(gcp) = &self.gcp {
            if let Some(v) = &gcp.service_account_json {
                check_secret(&format!("{at}.gcp.service_account_json"), v)?;
            }
            if let Some(scopes) = &gcp.scopes {
                check_list(&format!("{at}.gcp.scopes"), scopes)?;
            }
        }
        Ok(())
    }

    fn redact(&mut self) {
        for h in &mut self.headers {
            h.secret = h.secret.redacted();
        }
        if let Some(aws) = &mut self.aws {
            let fields = [
                &mut aws.access_key_id,
                &mut aws.secret_access_key,
                &mut aws.session_token,
            ];
            for v in fields.into_iter().flatten() {
                *v = v.redacted_always();
            }
        }
        if let Some(gcp) = &mut self.gcp {
            if let Some(v) = &mut gcp.service_account_json {
                *v = v.redacted_always();
            }
        }
        if let Some(Value::Object(azure)) = &mut self.azure {
            for key in AZURE_SECRET_KEYS {
                if let Some(v) = azure.get_mut(key) {
                    let set = !v.is_null();
                    let kind = v
                        .get("type")
                        .cloned()
                        .unwrap_or(Value::String("opaque".into()));
                    *v = serde_json::json!({"type": kind, "is_set": set});
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> ProxyConfig {
        serde_json::from_value(json!({
            "rules": [{
                "name": "openai",
                "match_hosts": ["api.openai.com"],
                "headers": [
                    {"name": "Authorization", "type": "opaque", "value": "Bearer sk-secret"},
                    {"name": "X-Org", "type": "plaintext", "value": "org-1"},
                    {"name": "X-Ws", "type": "workspace_secret", "value": "Bearer {OPENAI}"}
                ],
                "env_vars": {"OPENAI_API_KEY": "dummy"},
                "future_key": {"kept": true}
            }, {
                "name": "s3", "type": "aws", "match_hosts": ["*.amazonaws.com"],
                "aws": {"access_key_id": {"type": "opaque", "value": "AKIDEXAMPLE"},
                        "secret_access_key": {"type": "opaque", "value": "wJalr"}}
            }],
            "access_control": {"allow_list": ["*.openai.com", "~^api\\d+\\.x\\.com$"]},
            "no_proxy": ["localhost"],
            "unknown_top": 1
        }))
        .unwrap()
    }

    #[test]
    fn round_trips_unknown_keys_and_validates() {
        let cfg = sample();
        cfg.validate().unwrap();
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back["unknown_top"], 1);
        assert_eq!(back["rules"][0]["future_key"]["kept"], true);
        assert_eq!(cfg.env_vars()["OPENAI_API_KEY"], "dummy");
    }

    #[test]
    fn redaction_hides_opaque_and_credentials() {
        let red = serde_json::to_string(&sample().redacted()).unwrap();
        assert!(!red.contains("sk-secret"), "{red}");
        assert!(
            !red.contains("AKIDEXAMPLE") && !red.contains("wJalr"),
            "{red}"
        );
        assert!(red.contains("org-1"), "plaintext stays: {red}");
        let v: Value = serde_json::from_str(&red).unwrap();
        assert_eq!(v["rules"][0]["headers"][0]["is_set"], true);
        assert_eq!(v["rules"][1]["aws"]["access_key_id"]["is_set"], true);
    }

    #[test]
    fn update_carries_omitted_opaque_values_over() {
        let stored = sample();
        let update = stored.redacted();
        let merged = stored.merged_update(update);
        assert_eq!(
            merged.rules[0].headers[0].secret.value.as_deref(),
            Some("Bearer sk-secret")
        );
        assert_eq!(
            merged.rules[1]
                .aws
                .as_ref()
                .unwrap()
                .secret_access_key
                .as_ref()
                .unwrap()
                .value
                .as_deref(),
            Some("wJalr")
        );
        // A rule renamed in the update does not inherit anything.
        let mut renamed = stored.redacted();
        renamed.rules[0].name = "other".into();
        let merged = stored.merged_update(renamed);
        assert_eq!(merged.rules[0].headers[0].secret.value, None);
        // Nor does a rule pointed at other hosts: the hidden value stays behind.
        let mut moved = stored.redacted();
        moved.rules[0].match_hosts = vec!["attacker.example".into()];
        let merged = stored.merged_update(moved);
        assert_eq!(merged.rules[0].headers[0].secret.value, None);
        // Replacing the rule set drops rules the update does not name.
        let merged = stored.merged_update(ProxyConfig::default());
        assert!(merged.rules.is_empty());
    }

    #[test]
    fn bad_input_is_refused_with_a_clear_message() {
        let bad = |v: Value| {
            serde_json::from_value::<ProxyConfig>(v)
                .unwrap()
                .validate()
                .unwrap_err()
                .0
        };
        assert!(bad(json!({"rules": [{"name": ""}]})).contains("name is required"));
        assert!(bad(json!({"rules": [{"name": "a"}, {"name": "a"}]})).contains("two rules"));
        assert!(bad(json!({"rules": [{"name": "a", "headers": [{"name": "X\r\nY", "type": "plaintext", "value": "v"}]}]}))
            .contains("header name"));
        assert!(bad(json!({"rules": [{"name": "a", "headers": [{"name": "X", "type": "plaintext", "value": "v\r\nInjected: 1"}]}]}))
            .contains("CR, LF"));
        assert!(
            bad(json!({"rules": [{"name": "a", "match_headers": ["novalue"]}]}))
                .contains("match_headers")
        );
        let many: Vec<Value> = (0..300).map(|i| json!({"name": format!("r{i}")})).collect();
        assert!(bad(json!({"rules": many})).contains("more than"));
    }

    #[test]
    fn bare_string_secret_is_opaque() {
        let v: SecretValue = serde_json::from_value(json!("s3cr3t")).unwrap();
        assert_eq!(v.kind, SecretKind::Opaque);
        let h: Header = serde_json::from_value(json!({"name": "A", "value": "x"})).unwrap();
        assert_eq!(h.secret.kind, SecretKind::Opaque);
    }
}
