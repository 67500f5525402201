//! AWS rules: requests to AWS hosts are signed with SigV4 (the `aws-sigv4` crate) using the
//! rule's static credentials. The sandbox holds dummy credentials, so whatever signature it
//! sent is stripped first. Role-based forms would need STS with Cordon's own identity and are
//! refused when the config is compiled.

use std::borrow::Cow;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use cordon_api::proxy_config::AwsAuth;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::inject::{SecretResolver, ValueTemplate};
use crate::policy::PolicyError;

#[derive(Debug)]
pub(crate) struct AwsSigner {
    access_key_id: ValueTemplate,
    secret_access_key: ValueTemplate,
    session_token: Option<ValueTemplate>,
    region: Option<String>,
    service: Option<String>,
}

/// How the payload enters the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Payload {
    /// A value for `x-amz-content-sha256` known without reading the body.
    Precomputed(String),
    /// The body must be read (bounded) and hashed.
    NeedBody,
}

/// Headers the sandbox may have signed with its dummy credentials; replaced by ours.
const STRIPPED: [&str; 4] = [
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

impl AwsSigner {
    pub(crate) fn compile(rule: &str, aws: &AwsAuth) -> Result<AwsSigner, PolicyError> {
        if aws.role_arn.as_deref().is_some_and(|r| !r.is_empty()) || aws.session_tags.is_some() {
            return Err(PolicyError::new(format!(
                "rule {rule:?}: aws role_arn (assumed roles) is not supported by Cordon; give static access_key_id and secret_access_key"
            )));
        }
        let field = |name: &str, v: &Option<cordon_api::proxy_config::SecretValue>| {
            let v = v.as_ref().ok_or_else(|| {
                PolicyError::new(format!("rule {rule:?}: aws.{name} is required"))
            })?;
            ValueTemplate::compile(&format!("rule {rule:?}: aws.{name}"), v)
        };
        Ok(AwsSigner {
            access_key_id: field("access_key_id", &aws.access_key_id)?,
            secret_access_key: field("secret_access_key", &aws.secret_access_key)?,
            session_token: match &aws.session_token {
                Some(_) => Some(field("session_token", &aws.session_token)?),
                None => None,
            },
            region: aws.region.clone(),
            service: aws.service.clone(),
        })
    }

    /// The signing service and region for `host`.
    pub(crate) fn scope(&self, host: &str) -> (String, String) {
        let (service, region) = service_region(host);
        (
            self.service.clone().unwrap_or(service),
            self.region.clone().unwrap_or(region),
        )
    }

    /// Decides how the body is covered: a hash the tool already sent (its value is not
    /// secret), unsigned for S3, or the real body hash otherwise.
    pub(crate) fn payload(&self, host: &str, headers: &HeaderMap) -> Result<Payload, String> {
        if let Some(v) = headers.get("x-amz-content-sha256") {
            let v = v
                .to_str()
                .map_err(|_| "x-amz-content-sha256 is not text".to_string())?;
            let is_hash = v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
            if is_hash || v == "UNSIGNED-PAYLOAD" || v == "STREAMING-UNSIGNED-PAYLOAD-TRAILER" {
                let v = if is_hash {
                    v.to_ascii_lowercase()
                } else {
                    v.to_string()
                };
                return Ok(Payload::Precomputed(v));
            }
            return Err(format!(
                "x-amz-content-sha256 {v:?} (chunk-signed payloads) cannot be re-signed by the proxy; use unsigned payloads"
            ));
        }
        if self.scope(host).0 == "s3" {
            return Ok(Payload::Precomputed("UNSIGNED-PAYLOAD".into()));
        }
        Ok(Payload::NeedBody)
    }

    /// Signs a request (`uri` absolute, `https://host/path?query`) in place: strips the
    /// tool's signature headers, adds `x-amz-date`, `authorization` (and the security token
    /// and payload hash where needed). Returns the names of the headers set.
    pub(crate) async fn sign(
        &self,
        target: SignTarget<'_>,
        headers: &mut HeaderMap,
        payload: SignPayload<'_>,
        secrets: &dyn SecretResolver,
        now: SystemTime,
    ) -> Result<Vec<String>, String> {
        let SignTarget { method, uri, host } = target;
        for h in STRIPPED {
            headers.remove(h);
        }
        let key = self
            .access_key_id
            .render(secrets)
            .await
            .map_err(|e| e.to_string())?;
        let secret = self
            .secret_access_key
            .render(secrets)
            .await
            .map_err(|e| e.to_string())?;
        let token = match &self.session_token {
            Some(t) => Some(t.render(secrets).await.map_err(|e| e.to_string())?),
            None => None,
        };
        let (service, region) = self.scope(host);
        let identity = Credentials::new(key, secret, token, None, "cordon-proxy-rule").into();
        let mut settings = SigningSettings::default();
        if service == "s3" {
            // S3 signs the path as sent and wants the payload hash header.
            settings.percent_encoding_mode = PercentEncodingMode::Single;
            settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        }
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&region)
            .name(&service)
            .time(now)
            .settings(settings)
            .build()
            .map_err(|e| format!("aws signing parameters: {e}"))?
            .into();
        let signed: Vec<(String, String)> = headers
            .iter()
            .filter(|(n, _)| is_signed_header(n))
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let body = match payload {
            SignPayload::Precomputed(v) => SignableBody::Precomputed(v.to_string()),
            SignPayload::Bytes(b) => SignableBody::Bytes(b),
        };
        let request = SignableRequest::new(
            method,
            Cow::Borrowed(uri),
            signed.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            body,
        )
        .map_err(|e| format!("aws signing: {e}"))?;
        let (instructions, _signature) = sign(request, &params)
            .map_err(|e| format!("aws signing: {e}"))?
            .into_parts();
        let (new_headers, _params) = instructions.into_parts();
        let mut names = Vec::new();
        for h in new_headers {
            let name = HeaderName::from_static(h.name());
            let mut value = HeaderValue::from_str(h.value())
                .map_err(|_| "aws signing produced a bad header".to_string())?;
            value.set_sensitive(h.sensitive() || name == http::header::AUTHORIZATION);
            names.push(name.to_string());
            headers.insert(name, value);
        }
        Ok(names)
    }
}

/// The request a signature is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignTarget<'a> {
    pub method: &'a str,
    /// Absolute: `https://host[:port]/path?query`.
    pub uri: &'a str,
    /// The host name, for the service and region.
    pub host: &'a str,
}

/// The body as the signature covers it.
pub(crate) enum SignPayload<'a> {
    Precomputed(&'a str),
    Bytes(&'a [u8]),
}

/// Headers covered by the signature: the ones AWS needs and no proxy will change.
fn is_signed_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    n == "host" || n == "content-type" || n == "content-md5" || n.starts_with("x-amz-")
}

fn is_region(label: &str) -> bool {
    // us-east-1, eu-central-2, us-gov-west-1, ap-southeast-3, cn-north-1
    let parts: Vec<&str> = label.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// Service and region from an AWS host name (`s3.us-west-2.amazonaws.com`,
/// `bucket.s3.amazonaws.com`, `s3-us-west-2.amazonaws.com`, `sts.amazonaws.com`,
/// `dynamodb.eu-west-1.amazonaws.com`); `us-east-1` when the host names no region and `s3`
/// when it names no service.
pub(crate) fn service_region(host: &str) -> (String, String) {
    let host = host.to_ascii_lowercase();
    let rest = host
        .strip_suffix(".amazonaws.com.cn")
        .or_else(|| host.strip_suffix(".amazonaws.com"))
        .unwrap_or("");
    let labels: Vec<&str> = rest.split('.').filter(|l| !l.is_empty()).collect();
    let mut region = None;
    let mut service = None;
    for (i, label) in labels.iter().enumerate() {
        if let Some(r) = label.strip_prefix("s3-").filter(|r| is_region(r)) {
            service = Some("s3".to_string());
            region = Some(r.to_string());
        } else if *label == "s3" || label.starts_with("s3-") {
            service = Some("s3".to_string());
        } else if is_region(label) {
            region = Some(label.to_string());
            if service.is_none() && i > 0 && labels[i - 1] != "dualstack" {
                service = Some(labels[i - 1].to_string());
            }
        }
    }
    if service.is_none() && region.is_none() {
        service = labels.last().map(|s| s.to_string());
    }
    (
        service.unwrap_or_else(|| "s3".into()),
        region.unwrap_or_else(|| "us-east-1".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cordon_api::proxy_config::SecretValue;

    #[test]
    fn service_and_region_from_hosts() {
        let cases = [
            ("s3.us-west-2.amazonaws.com", "s3", "us-west-2"),
            ("bucket.s3.amazonaws.com", "s3", "us-east-1"),
            (
                "bucket.s3.dualstack.eu-west-1.amazonaws.com",
                "s3",
                "eu-west-1",
            ),
            ("s3-us-west-2.amazonaws.com", "s3", "us-west-2"),
            ("sts.amazonaws.com", "sts", "us-east-1"),
            ("dynamodb.eu-west-1.amazonaws.com", "dynamodb", "eu-west-1"),
            (
                "abc.execute-api.us-east-2.amazonaws.com",
                "execute-api",
                "us-east-2",
            ),
            ("minio.test", "s3", "us-east-1"),
        ];
        for (host, s, r) in cases {
            assert_eq!(
                service_region(host),
                (s.to_string(), r.to_string()),
                "{host}"
            );
        }
    }

    /// The `get-vanilla` case of the AWS SigV4 test suite (docs.aws.amazon.com, "Signature
    /// Version 4 test suite"), computed by AWS independently of this code.
    #[tokio::test]
    async fn aws_test_suite_get_vanilla() {
        let signer = AwsSigner::compile(
            "r",
            &AwsAuth {
                access_key_id: Some(SecretValue::opaque("AKIDEXAMPLE")),
                secret_access_key: Some(SecretValue::opaque(
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                )),
                region: Some("us-east-1".into()),
                service: Some("service".into()),
                ..AwsAuth::default()
            },
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("host", "example.amazonaws.com".parse().unwrap());
        headers.insert("authorization", "AWS4-HMAC-SHA256 dummy".parse().unwrap());
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160); // 20150830T123600Z
        let e3b0 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        signer
            .sign(
                SignTarget {
                    method: "GET",
                    uri: "https://example.amazonaws.com/",
                    host: "example.amazonaws.com",
                },
                &mut headers,
                SignPayload::Precomputed(e3b0),
                &(),
                now,
            )
            .await
            .unwrap();
        assert_eq!(headers["x-amz-date"], "20150830T123600Z");
        assert_eq!(
            headers["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }
}
