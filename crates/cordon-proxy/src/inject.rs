//! Header values as rules give them: plaintext, opaque, or templates over workspace secrets
//! (`{NAME}`, also embedded: `Bearer {NAME}`) resolved when the request goes out.

use std::collections::HashMap;

use async_trait::async_trait;
use cordon_api::proxy_config::{Header, SecretKind, SecretValue};
use http::{HeaderName, HeaderValue};

use crate::policy::PolicyError;

/// Workspace secrets by name, looked up for every request that needs one (so a changed or
/// deleted secret applies at once).
#[async_trait]
pub trait SecretResolver: Send + Sync {
    async fn secret(&self, name: &str) -> Option<String>;
}

/// No workspace secrets.
#[async_trait]
impl SecretResolver for () {
    async fn secret(&self, _name: &str) -> Option<String> {
        None
    }
}

#[async_trait]
impl SecretResolver for HashMap<String, String> {
    async fn secret(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// One piece of a header value template.
#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Secret(String),
}

/// A value with `{NAME}` references to workspace secrets (or a fixed value).
#[derive(Debug, Clone)]
pub(crate) struct ValueTemplate {
    pieces: Vec<Piece>,
}

/// A header a rule sets, compiled.
#[derive(Debug, Clone)]
pub(crate) struct HeaderTemplate {
    pub name: HeaderName,
    pub value: ValueTemplate,
}

/// Why a value could not be produced for a request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InjectError {
    #[error("workspace secret {0:?} is not set")]
    MissingSecret(String),
    #[error("header {0} would carry a control character")]
    BadValue(String),
}

fn is_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Splits `Bearer {NAME}` into text and secret references. Braces that do not enclose a
/// secret name are kept as text.
fn parse_template(value: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rest = value;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}').map(|c| open + c) else {
            break;
        };
        let name = &rest[open + 1..close];
        if is_secret_name(name) {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            pieces.push(Piece::Secret(name.to_string()));
        } else {
            pieces.push(Piece::Text(rest[..=close].to_string()));
        }
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    pieces
}

impl ValueTemplate {
    /// `what` names the value in errors (`rule "x": header Authorization`).
    pub(crate) fn compile(what: &str, secret: &SecretValue) -> Result<ValueTemplate, PolicyError> {
        let Some(value) = &secret.value else {
            return Err(PolicyError::new(format!(
                "{what} has no value (an opaque value must be sent when its rule is created or \
                 its type or match_hosts change)"
            )));
        };
        let pieces = match secret.kind {
            SecretKind::WorkspaceSecret => {
                let pieces = parse_template(value);
                if !pieces.iter().any(|p| matches!(p, Piece::Secret(_))) {
                    return Err(PolicyError::new(format!(
                        "{what} is a workspace_secret but names no {{SECRET}}"
                    )));
                }
                pieces
            }
            SecretKind::Plaintext | SecretKind::Opaque => vec![Piece::Text(value.clone())],
        };
        Ok(ValueTemplate { pieces })
    }

    /// The value for one request.
    pub(crate) async fn render(&self, secrets: &dyn SecretResolver) -> Result<String, InjectError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Secret(name) => {
                    let value = secrets
                        .secret(name)
                        .await
                        .ok_or_else(|| InjectError::MissingSecret(name.clone()))?;
                    out.push_str(&value);
                }
            }
        }
        Ok(out)
    }
}

impl HeaderTemplate {
    pub(crate) fn compile(rule: &str, header: &Header) -> Result<HeaderTemplate, PolicyError> {
        let name = HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
            PolicyError::new(format!(
                "rule {rule:?}: {:?} is not a header name",
                header.name
            ))
        })?;
        let value = ValueTemplate::compile(
            &format!("rule {rule:?}: header {}", header.name),
            &header.secret,
        )?;
        Ok(HeaderTemplate { name, value })
    }

    pub(crate) async fn render(
        &self,
        secrets: &dyn SecretResolver,
    ) -> Result<HeaderValue, InjectError> {
        let out = self.value.render(secrets).await?;
        let mut v = HeaderValue::from_str(&out)
            .map_err(|_| InjectError::BadValue(self.name.to_string()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn templates_resolve_embedded_secrets_and_refuse_missing_ones() {
        let h = Header {
            name: "Authorization".into(),
            secret: SecretValue::workspace_secret("Bearer {KEY} {x y}"),
        };
        let t = HeaderTemplate::compile("r", &h).unwrap();
        let mut secrets = HashMap::new();
        secrets.insert("KEY".to_string(), "s3cr3t".to_string());
        assert_eq!(t.render(&secrets).await.unwrap(), "Bearer s3cr3t {x y}");
        let err = t.render(&()).await.unwrap_err();
        assert!(err.to_string().contains("KEY"), "{err}");
        secrets.insert("KEY".to_string(), "a\r\nb".to_string());
        assert!(t.render(&secrets).await.is_err());
    }
}
