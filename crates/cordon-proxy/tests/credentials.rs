//! Cloud credentials added by the proxy: SigV4 checked by an independent implementation of
//! the algorithm (written here from the AWS documentation, sharing no code with the signer),
//! and the GCP service-account flow against a local token endpoint that verifies the JWT
//! assertion with the key's public half.

mod common;

use std::collections::BTreeMap;

use common::*;
use cordon_testkit::dns::TestDns;
use cordon_testkit::https_upstream::{HttpsUpstream, RecordedRequest, ScriptedResponse};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// Recomputes the SigV4 signature of a request as the upstream received it.
fn expected_signature(req: &RecordedRequest, secret: &str) -> (String, String) {
    let auth = req.header("authorization").expect("signed");
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 ").expect("sigv4");
    let fields: BTreeMap<&str, &str> = rest.split(", ").filter_map(|f| f.split_once('=')).collect();
    let scope = fields["Credential"].split_once('/').unwrap().1; // date/region/service/aws4_request
    let signed_headers = fields["SignedHeaders"];
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort();
    let canonical_query = pairs
        .iter()
        .map(|p| {
            if p.contains('=') {
                p.to_string()
            } else {
                format!("{p}=")
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    let canonical_headers: String = signed_headers
        .split(';')
        .map(|h| format!("{h}:{}\n", req.header(h).unwrap_or_default().trim()))
        .collect();
    let payload = match req.header("x-amz-content-sha256") {
        Some(v) => v.to_string(),
        None => hex::encode(Sha256::digest(&req.body)),
    };
    let canonical = format!(
        "{}\n{path}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload}",
        req.method
    );
    let amz_date = req.header("x-amz-date").unwrap();
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let parts: Vec<&str> = scope.split('/').collect();
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), parts[0]);
    let k_region = hmac(&k_date, parts[1]);
    let k_service = hmac(&k_region, parts[2]);
    let k_signing = hmac(&k_service, "aws4_request");
    (
        hex::encode(hmac(&k_signing, &string_to_sign)),
        fields["Signature"].to_string(),
    )
}

#[tokio::test]
async fn aws_requests_are_signed_with_the_rules_credentials() {
    let dns = TestDns::start().await;
    dns.set("s3.test", vec![v4("127.0.0.1")]);
    dns.set("api.test", vec![v4("127.0.0.1")]);
    let up = HttpsUpstream::start_with_names(&["s3.test", "api.test"]).await;
    let port = up.addr().port();
    let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    let proxy = start(
        &dns,
        Setup {
            config: json!({"rules": [{
                "name": "s3", "type": "aws", "match_hosts": ["s3.test"],
                "aws": {"access_key_id": {"type": "opaque", "value": "AKIDCORDONTEST"},
                        "secret_access_key": {"type": "opaque", "value": secret},
                        "region": "us-west-2", "service": "s3"}
            }, {
                "name": "api", "type": "aws", "match_hosts": ["api.test"],
                "aws": {"access_key_id": {"type": "opaque", "value": "AKIDCORDONTEST"},
                        "secret_access_key": {"type": "opaque", "value": secret},
                        "region": "eu-west-1", "service": "execute-api"}
            }]}),
            roots: vec![up.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    let dummy = [
        "-H", "Authorization: AWS4-HMAC-SHA256 Credential=DUMMY/20000101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
        "-H", "X-Amz-Date: 20000101T000000Z",
        "-H", "X-Amz-Security-Token: dummy-token",
        "-H", "x-amz-meta-color: blue",
    ];
    let mut args = dummy.to_vec();
    args.extend(["-X", "PUT", "--data-binary", "object body"]);
    let r = curl(
        &proxy,
        &proxy.ca,
        &format!("https://s3.test:{port}/bucket/key.txt?x-id=PutObject&a=b"),
        &args,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.stderr);
    let mut args = dummy.to_vec();
    args.extend([
        "-X",
        "POST",
        "--data-binary",
        "{\"hello\": 1}",
        "-H",
        "content-type: application/json",
    ]);
    let r = curl(
        &proxy,
        &proxy.ca,
        &format!("https://api.test:{port}/prod/items"),
        &args,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.stderr);

    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    for req in &reqs {
        let auth = req.header("authorization").unwrap();
        assert!(auth.contains("Credential=AKIDCORDONTEST/"), "{auth}");
        assert!(!auth.contains("DUMMY"));
        assert_eq!(
            req.header("x-amz-security-token"),
            None,
            "the sandbox's token is stripped"
        );
        assert_ne!(req.header("x-amz-date"), Some("20000101T000000Z"));
        assert_eq!(
            req.header("x-amz-meta-color"),
            Some("blue"),
            "other x-amz headers stay"
        );
        let (want, got) = expected_signature(req, secret);
        assert_eq!(
            want, got,
            "independent SigV4 computation for {} {}",
            req.method, req.path
        );
        // Negative control: the verifier rejects a signature made with another key.
        assert_ne!(expected_signature(req, "another-secret").0, got);
    }
    assert!(reqs[0]
        .header("authorization")
        .unwrap()
        .contains("/us-west-2/s3/aws4_request"));
    assert_eq!(
        reqs[0].header("x-amz-content-sha256"),
        Some("UNSIGNED-PAYLOAD")
    );
    assert!(reqs[1]
        .header("authorization")
        .unwrap()
        .contains("/eu-west-1/execute-api/aws4_request"));
    assert!(reqs[1]
        .header("authorization")
        .unwrap()
        .contains("content-type"));
    assert_eq!(reqs[1].body, b"{\"hello\": 1}");
}

#[tokio::test]
async fn aws_role_forms_are_refused_when_compiled() {
    let cfg = serde_json::from_value(json!({"rules": [{"name": "r", "type": "aws",
        "aws": {"role_arn": "arn:aws:iam::123456789012:role/x"}}]}))
    .unwrap();
    let err = cordon_proxy::EgressPolicy::compile(&cfg).unwrap_err();
    assert!(err.to_string().contains("not supported"), "{err}");
}

fn openssl(args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn gcp_tokens_are_minted_from_the_service_account_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("key.pem");
    let key_str = key_path.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key_str,
    ]);
    let private_pem = std::fs::read_to_string(&key_path).unwrap();
    let public_pem = openssl(&["pkey", "-in", key_str, "-pubout"]);

    let dns = TestDns::start().await;
    dns.set("oauth.test", vec![v4("127.0.0.1")]);
    dns.set("storage.test", vec![v4("127.0.0.1")]);
    let token_ep = HttpsUpstream::start_with_names(&["oauth.test"]).await;
    token_ep.script(
        "/token",
        ScriptedResponse::json(
            200,
            &json!({"access_token": "ya29.CORDON", "expires_in": 3600, "token_type": "Bearer"}),
        ),
    );
    let storage = HttpsUpstream::start_with_names(&["storage.test"]).await;
    let token_uri = format!("https://oauth.test:{}/token", token_ep.addr().port());
    let key_json = json!({
        "type": "service_account", "client_email": "sa@proj.iam.gserviceaccount.com",
        "private_key_id": "kid-1", "private_key": private_pem, "token_uri": token_uri,
    })
    .to_string();
    let proxy = start(
        &dns,
        Setup {
            config: json!({"rules": [{"name": "gcs", "type": "gcp", "match_hosts": ["storage.test"],
            "gcp": {"service_account_json": {"type": "opaque", "value": key_json},
                    "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]}}]}),
            roots: vec![token_ep.ca_pem_path(), storage.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    let url = format!("https://storage.test:{}/b/bucket/o", storage.addr().port());
    for _ in 0..2 {
        let r = curl(
            &proxy,
            &proxy.ca,
            &url,
            &["-H", "Authorization: Bearer dummy"],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.stderr);
    }
    let seen = storage.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer ya29.CORDON")));

    let calls = token_ep.requests();
    assert_eq!(calls.len(), 1, "the token is cached until it expires");
    let form = String::from_utf8(calls[0].body.clone()).unwrap();
    assert!(
        form.starts_with(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion="
        ),
        "{form}"
    );
    let assertion = form.rsplit_once("assertion=").unwrap().1;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[token_uri.as_str()]);
    let decoded = jsonwebtoken::decode::<serde_json::Value>(
        assertion,
        &jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes()).unwrap(),
        &validation,
    )
    .expect("the assertion verifies with the service account's public key");
    assert_eq!(decoded.header.kid.as_deref(), Some("kid-1"));
    assert_eq!(decoded.claims["iss"], "sa@proj.iam.gserviceaccount.com");
    assert_eq!(
        decoded.claims["scope"],
        "https://www.googleapis.com/auth/devstorage.read_only"
    );
    let evs = serde_json::to_string(&events(&proxy)).unwrap();
    assert!(!evs.contains("ya29.CORDON") && !evs.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn a_failed_token_exchange_refuses_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("key.pem");
    let key_str = key_path.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key_str,
    ]);
    let dns = TestDns::start().await;
    dns.set("oauth.test", vec![v4("127.0.0.1")]);
    dns.set("storage.test", vec![v4("127.0.0.1")]);
    let token_ep = HttpsUpstream::start_with_names(&["oauth.test"]).await;
    token_ep.script(
        "/token",
        ScriptedResponse::json(
            400,
            &json!({"error": "invalid_grant", "echo": "ECHOED-ASSERTION"}),
        ),
    );
    let storage = HttpsUpstream::start_with_names(&["storage.test"]).await;
    let key_json = json!({
        "client_email": "sa@proj.iam.gserviceaccount.com",
        "private_key": std::fs::read_to_string(&key_path).unwrap(),
        "token_uri": format!("https://oauth.test:{}/token", token_ep.addr().port()),
    })
    .to_string();
    let proxy = start(
        &dns,
        Setup {
            config: json!({"rules": [{"name": "gcs", "type": "gcp", "match_hosts": ["storage.test"],
                "gcp": {"service_account_json": {"type": "opaque", "value": key_json}}}]}),
            roots: vec![token_ep.ca_pem_path(), storage.ca_pem_path()],
            ..Setup::default()
        },
    )
    .await;
    let url = format!("https://storage.test:{}/b", storage.addr().port());
    let r = curl(&proxy, &proxy.ca, &url, &[]).await;
    assert_eq!(r.status, 502, "{}", r.stderr);
    assert!(r.body.contains("invalid_grant"), "{}", r.body);
    assert!(
        !r.body.contains("ECHOED"),
        "the endpoint's body is not relayed: {}",
        r.body
    );
    assert!(
        storage.requests().is_empty(),
        "never sent without its credentials"
    );
}
