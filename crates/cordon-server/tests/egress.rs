//! Egress end to end: a real server with its egress proxy (`--allow-egress-cidr 127.0.0.0/8`,
//! `--egress-ca`, `--egress-resolver`, `--egress-any-port`), a test DNS server and a recording
//! HTTPS upstream on loopback, and a sandbox on the default snapshot whose curl goes out
//! through the agent's relay. Secrets (a workspace secret and an opaque value) arrive upstream
//! and are found nowhere in the sandbox or in any API response; internal addresses and
//! denied hosts are refused and recorded; PATCH replaces rules and keeps opaque values;
//! secrets and sealed configs survive a SIGKILL of the server.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{
    Server, EGRESS_ANY_PORT_ENV, EGRESS_CAS_ENV, EGRESS_CIDRS_ENV, EGRESS_RESOLVER_ENV, KEY,
};
use cordon_testkit::dns::TestDns;
use cordon_testkit::https_upstream::HttpsUpstream;
use cordon_testkit::TestStateDir;
use serde_json::{json, Value};

#[test]
#[ignore = "the server process of the other tests"]
fn serve_child() {
    common::serve_child_main();
}

const WS_SECRET: &str = "wsSecretValue-7f3a91";
const OPAQUE_SECRET: &str = "opaqueSecretValue-2b8c44";
/// grep patterns that match the secrets without containing them (the command line of the
/// search itself is readable in /proc).
const WS_PATTERN: &str = "wsSecretValu[e]-7f3a91";
const OPAQUE_PATTERN: &str = "opaqueSecretValu[e]-2b8c44";

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Every API answer the test saw, searched for the secrets at the end.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn keep(&mut self, value: &Value) -> Value {
        self.0.push(value.to_string());
        value.clone()
    }

    fn assert_clean(&self) {
        for answer in &self.0 {
            assert!(
                !answer.contains(WS_SECRET) && !answer.contains(OPAQUE_SECRET),
                "an API answer shows a secret: {answer}"
            );
        }
    }
}

struct Run {
    stdout: String,
    stderr: String,
}

/// `POST {dp}/execute`.
async fn exec(dataplane_url: &str, command: &str, seen: &mut Seen) -> Run {
    let (status, body) = common::call(
        "POST",
        &format!("{dataplane_url}/execute"),
        Some(KEY),
        Some(json!({"command": command, "timeout": 60})),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    seen.keep(&body);
    Run {
        stdout: body["stdout"].as_str().unwrap_or_default().to_string(),
        stderr: body["stderr"].as_str().unwrap_or_default().to_string(),
    }
}

async fn start_server(
    dir: &std::path::Path,
    port: u16,
    dns: &TestDns,
    upstream: &HttpsUpstream,
) -> Server {
    Server::start_with(
        dir,
        port,
        &[
            (EGRESS_CIDRS_ENV, "127.0.0.0/8".into()),
            (EGRESS_CAS_ENV, upstream.ca_pem_path().display().to_string()),
            (EGRESS_RESOLVER_ENV, dns.addr().to_string()),
            (EGRESS_ANY_PORT_ENV, "1".into()),
        ],
    )
    .await
}

fn api_rule() -> Value {
    json!({
        "name": "api",
        "match_hosts": ["api.example.test"],
        "headers": [
            {"name": "authorization", "type": "workspace_secret", "value": "Bearer {API_TOKEN}"},
            {"name": "x-opaque", "type": "opaque", "value": OPAQUE_SECRET}
        ],
        "env_vars": {"API_KEY_HINT": "dummy-not-a-secret"}
    })
}

/// curl through the relay; `-w` prints the status (000 when the proxy refused the tunnel).
fn curl(url: &str) -> String {
    format!("curl -sS --max-time 20 -o /tmp/body -w '%{{http_code}}' '{url}'; echo \" rc=$?\"")
}

#[tokio::test]
async fn secrets_reach_the_upstream_and_never_the_sandbox() {
    let dns = TestDns::start().await;
    let upstream = HttpsUpstream::start_with_names(&[
        "api.example.test",
        "other.example.test",
        "denied.example.test",
    ])
    .await;
    let port = upstream.addr().port();
    for name in [
        "api.example.test",
        "other.example.test",
        "denied.example.test",
    ] {
        dns.set(name, vec![LOOPBACK]);
    }
    dns.set("private.example.test", vec!["10.0.0.1".parse().unwrap()]);
    let dir = TestStateDir::new();
    let server_port = Server::free_port();
    let mut server = start_server(dir.path(), server_port, &dns, &upstream).await;
    let mut seen = Seen::default();

    // A workspace secret: write-only.
    let (status, answer) = server
        .api(
            "PUT",
            "/secrets/API_TOKEN",
            Some(json!({"value": WS_SECRET})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    seen.keep(&answer);
    let (status, bad) = server
        .api("PUT", "/secrets/bad%20name", Some(json!({"value": "x"})))
        .await;
    assert_eq!(status, 400, "{bad}");

    let sandbox = server
        .create(json!({
            "name": "egress",
            "proxy_config": {
                "rules": [api_rule()],
                "access_control": {"deny_list": ["denied.example.test"]}
            }
        }))
        .await;
    seen.keep(&sandbox);
    assert_eq!(
        sandbox["proxy_config"]["rules"][0]["headers"][1]["is_set"], true,
        "{sandbox}"
    );
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();

    // The way out works, and the rule's headers arrive upstream.
    let run = exec(
        &dp,
        &curl(&format!("https://api.example.test:{port}/hello")),
        &mut seen,
    )
    .await;
    assert_eq!(run.stdout.trim(), "200 rc=0", "{}", run.stderr);
    let received = upstream.requests();
    let last = received.last().expect("the upstream got the request");
    assert_eq!(last.path, "/hello");
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {WS_SECRET}").as_str())
    );
    assert_eq!(last.header("x-opaque"), Some(OPAQUE_SECRET));

    // Commands see the proxy, the CA and the rule's dummy env, never the secrets.
    let env = exec(&dp, "env", &mut seen).await.stdout;
    assert!(env.contains("HTTPS_PROXY=http://127.0.0.1:15001"), "{env}");
    assert!(env.contains("API_KEY_HINT=dummy-not-a-secret"), "{env}");
    assert!(
        env.contains("SSL_CERT_FILE=/etc/cordon/ca-bundle.pem"),
        "{env}"
    );
    let search = format!(
        "env; for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\\0' '\\n' < $f 2>/dev/null; done; \
         echo FILES:; grep -rsl -e '{WS_PATTERN}' -e '{OPAQUE_PATTERN}' /etc /root /tmp /home /var /opt; true"
    );
    let found = exec(&dp, &search, &mut seen).await;
    assert!(
        found.stdout.contains("HTTPS_PROXY"),
        "the search ran: {}",
        found.stderr
    );
    for secret in [WS_SECRET, OPAQUE_SECRET] {
        assert!(
            !found.stdout.contains(secret),
            "the sandbox shows a secret: {}",
            found.stdout
        );
        assert!(!found.stderr.contains(secret));
    }
    let files = found.stdout.rsplit("FILES:").next().unwrap_or_default();
    assert_eq!(files.trim(), "", "files inside hold a secret");
    // Positive control: the same search finds a planted copy (written without the literal
    // in the command line).
    let planted =
        format!("printf 'wsSecretValu%s-7f3a91' e > /tmp/planted; {search}; rm /tmp/planted");
    let found = exec(&dp, &planted, &mut seen).await;
    let files = found.stdout.rsplit("FILES:").next().unwrap_or_default();
    assert_eq!(files.trim(), "/tmp/planted", "the search finds files");
    seen.0.pop(); // in case that answer shows the planted copy

    // Denied: metadata, a private range, a name resolving into one, an IP-literal spelling
    // of the metadata address, and a deny-listed host that would otherwise be reachable.
    for url in [
        "https://169.254.169.254/latest/meta-data/".to_string(),
        format!("https://10.0.0.1:{port}/"),
        format!("https://private.example.test:{port}/"),
        "http://0xa9fea9fe/latest/meta-data/".to_string(),
        format!("https://denied.example.test:{port}/"),
    ] {
        let run = exec(&dp, &curl(&url), &mut seen).await;
        assert!(
            !run.stdout.contains("200 rc=0"),
            "{url} went out: {}",
            run.stdout
        );
    }
    let before = upstream.requests().len();

    // PATCH: rules replaced, the omitted opaque value carried over, an allow list added; it
    // applies to the next connection.
    let (status, patched) = server
        .api(
            "PATCH",
            "/boxes/egress",
            Some(json!({"proxy_config": {
                "rules": [{
                    "name": "api",
                    "match_hosts": ["api.example.test"],
                    "headers": [
                        {"name": "authorization", "type": "workspace_secret", "value": "Bearer {API_TOKEN}"},
                        {"name": "x-opaque", "type": "opaque", "is_set": true}
                    ]
                }],
                "access_control": {"allow_list": ["api.example.test"]}
            }})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    seen.keep(&patched);
    let run = exec(
        &dp,
        &curl(&format!("https://api.example.test:{port}/after-patch")),
        &mut seen,
    )
    .await;
    assert_eq!(run.stdout.trim(), "200 rc=0", "{}", run.stderr);
    let last = upstream.requests().last().cloned().unwrap();
    assert_eq!(last.path, "/after-patch");
    assert_eq!(last.header("x-opaque"), Some(OPAQUE_SECRET));
    let run = exec(
        &dp,
        &curl(&format!("https://other.example.test:{port}/")),
        &mut seen,
    )
    .await;
    assert!(
        !run.stdout.contains("200 rc=0"),
        "not in the allow list: {}",
        run.stdout
    );
    assert_eq!(upstream.requests().len(), before + 1);
    let env = exec(&dp, "env", &mut seen).await.stdout;
    assert!(
        !env.contains("API_KEY_HINT"),
        "the replaced rule's env is gone: {env}"
    );

    // The records: allowed with the injected header names, denied with reasons.
    let events = wait_for_events(&server, "egress", 8, &mut seen).await;
    let denied_hosts: Vec<&str> = events
        .iter()
        .filter(|e| e["decision"] == "denied")
        .filter_map(|e| e["host"].as_str())
        .collect();
    for host in [
        "169.254.169.254",
        "10.0.0.1",
        "private.example.test",
        "denied.example.test",
        "other.example.test",
    ] {
        assert!(
            denied_hosts.contains(&host),
            "{host} not recorded as denied: {events:?}"
        );
    }
    let allowed = events
        .iter()
        .find(|e| e["decision"] == "allowed" && e["host"] == "api.example.test")
        .expect("an allowed record");
    assert!(
        allowed["injected"].to_string().contains("x-opaque"),
        "{allowed}"
    );

    // Secrets survive a SIGKILL of the server: the sealed config and the workspace secret.
    server.kill();
    server = start_server(dir.path(), server_port, &dns, &upstream).await;
    let run = exec(
        &dp,
        &curl(&format!("https://api.example.test:{port}/after-restart")),
        &mut seen,
    )
    .await;
    assert_eq!(run.stdout.trim(), "200 rc=0", "{}", run.stderr);
    let last = upstream.requests().last().cloned().unwrap();
    assert_eq!(last.path, "/after-restart");
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {WS_SECRET}").as_str())
    );
    assert_eq!(last.header("x-opaque"), Some(OPAQUE_SECRET));
    let (_, listed) = server.api("GET", "/secrets", None).await;
    seen.keep(&listed);
    assert_eq!(listed["secrets"][0]["name"], "API_TOKEN", "{listed}");
    let (_, got) = server.api("GET", "/boxes/egress", None).await;
    seen.keep(&got);
    let (_, list) = server.api("GET", "/boxes", None).await;
    seen.keep(&list);
    let (status, _) = server.api("DELETE", "/secrets/API_TOKEN", None).await;
    assert_eq!(status, 204);
    let (status, _) = server.api("DELETE", "/secrets/API_TOKEN", None).await;
    assert_eq!(status, 404);
    seen.assert_clean();
}

/// The sandbox's egress records once at least `want` are there (they are written in batches).
async fn wait_for_events(server: &Server, name: &str, want: usize, seen: &mut Seen) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, page) = server
            .api("GET", &format!("/boxes/{name}/egress?limit=1000"), None)
            .await;
        assert_eq!(status, 200, "{page}");
        seen.keep(&page);
        let events = page["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= want || std::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A `python3` fixture (tests/egress_files.py) serving a git repo and a pip index over HTTPS
/// with its own self-signed certificate; killed on drop.
struct FileServer {
    child: std::process::Child,
    port: u16,
    /// The fixture's CA.
    cert: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FileServer {
    fn start(name: &str) -> FileServer {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        // A CA and a leaf it signs (webpki refuses a self-signed leaf that is its own CA).
        let path = |file: &str| dir.path().join(file).display().to_string();
        let openssl = |args: &[&str]| {
            let made = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(made.status.success(), "{made:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=fixture CA",
            "-keyout",
            &path("ca.key"),
            "-out",
            &path("ca.pem"),
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &path("key.pem"),
            "-out",
            &path("leaf.csr"),
        ]);
        std::fs::write(
            path("ext.cnf"),
            format!("subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            &path("leaf.csr"),
            "-CA",
            &path("ca.pem"),
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-extfile",
            &path("ext.cnf"),
            "-out",
            &path("cert.pem"),
        ]);
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/egress_files.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg(dir.path().join("www"))
            .arg(&cert)
            .arg(&key)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the fixture's port");
        FileServer {
            child,
            port,
            cert: dir.path().join("ca.pem"),
            log: dir.path().join("requests.log"),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The host's own pip, zipped, so the sandbox (whose snapshot has python3 but no pip) can run
/// `python3 pip.zip/pip`.
fn host_pip_zip(dir: &std::path::Path) -> Vec<u8> {
    let zip = dir.join("pip.zip");
    let made = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys, shutil, pip; \
             shutil.make_archive(sys.argv[1][:-4], 'zip', os.path.dirname(os.path.dirname(pip.__file__)), 'pip')",
        ])
        .arg(&zip)
        .output()
        .expect("python3");
    assert!(made.status.success(), "{made:?}");
    std::fs::read(zip).unwrap()
}

async fn upload(dataplane_url: &str, path: &str, contents: &[u8]) {
    let (content_type, body) = common::multipart_file(contents);
    let (status, _, answer) = common::raw(
        "POST",
        &format!("{dataplane_url}/upload?path={path}"),
        &[
            ("x-api-key", KEY.to_string()),
            ("content-type", content_type),
        ],
        body,
    )
    .await
    .unwrap();
    assert!(status < 300, "upload: {status} {answer:?}");
}

/// git (dumb HTTP) and pip (a simple index) go out through the relay and the proxy, which
/// intercepts them for a rule (injecting a token) and trusts the fixture's CA (`--egress-ca`).
#[tokio::test]
async fn git_and_pip_work_through_the_proxy() {
    let files = FileServer::start("files.example.test");
    let dns = TestDns::start().await;
    dns.set("files.example.test", vec![LOOPBACK]);
    let dir = TestStateDir::new();
    let server = Server::start_with(
        dir.path(),
        Server::free_port(),
        &[
            (EGRESS_CIDRS_ENV, "127.0.0.0/8".into()),
            (EGRESS_CAS_ENV, files.cert.display().to_string()),
            (EGRESS_RESOLVER_ENV, dns.addr().to_string()),
            (EGRESS_ANY_PORT_ENV, "1".into()),
        ],
    )
    .await;
    let mut seen = Seen::default();
    let sandbox = server
        .create(json!({
            "name": "tools",
            "proxy_config": {"rules": [{
                "name": "files",
                "match_hosts": ["files.example.test"],
                "headers": [{"name": "x-files-token", "type": "opaque", "value": OPAQUE_SECRET}]
            }]}
        }))
        .await;
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    let base = format!("https://files.example.test:{}", files.port);

    let run = exec(
        &dp,
        &format!("git clone -q {base}/repo.git /tmp/repo && cat /tmp/repo/hello.txt"),
        &mut seen,
    )
    .await;
    assert_eq!(
        run.stdout, "hello from a dumb-http repo\n",
        "{}",
        run.stderr
    );

    let scratch = tempfile::tempdir().unwrap();
    upload(&dp, "%2Ftmp%2Fpip.zip", &host_pip_zip(scratch.path())).await;
    let run = exec(
        &dp,
        &format!(
            "python3 /tmp/pip.zip/pip install -q --disable-pip-version-check --no-cache-dir \
             --index-url {base}/simple/ --target /tmp/site cordon-demo && \
             PYTHONPATH=/tmp/site python3 -c 'import cordon_demo; print(cordon_demo.VALUE)'"
        ),
        &mut seen,
    )
    .await;
    assert_eq!(
        run.stdout, "installed through the egress proxy\n",
        "{}",
        run.stderr
    );
    let log = files.log();
    assert!(log.contains("GET /repo.git/info/refs"), "{log}");
    assert!(log.contains("GET /simple/cordon-demo/"), "{log}");
    assert!(
        log.contains(&format!("x-files-token: {OPAQUE_SECRET}")),
        "the rule's header arrived: {log}"
    );
    seen.assert_clean();
}

/// Recomputes the SigV4 signature of what the upstream received with botocore's signer (an
/// independent implementation) and returns `(received, recomputed)`.
fn botocore_signature(
    request: &cordon_testkit::https_upstream::RecordedRequest,
    url: &str,
    access_key: &str,
    secret_key: &str,
) -> (String, String) {
    let script = r#"
import json, sys
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
data = json.load(sys.stdin)
headers = dict(data["headers"])
authorization = headers["authorization"]
scope = authorization.split("Credential=")[1].split(",")[0].split("/")
signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
received = authorization.split("Signature=")[1].strip()
request = AWSRequest(method=data["method"], url=data["url"],
                     headers={name: headers[name] for name in signed}, data=b"")
auth = SigV4Auth(Credentials(data["access_key"], data["secret_key"]), scope[3], scope[2])
request.context["timestamp"] = headers["x-amz-date"]
canonical = auth.canonical_request(request)
print(json.dumps([received, auth.signature(auth.string_to_sign(request, canonical), request)]))
"#;
    let input = json!({
        "method": request.method,
        "url": url,
        "headers": request.headers,
        "access_key": access_key,
        "secret_key": secret_key,
    });
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        input.to_string().as_bytes(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "botocore: {out:?}");
    serde_json::from_slice(&out.stdout).expect("botocore's answer")
}

/// An aws rule signs requests to `*.amazonaws.com` with SigV4 in the proxy; botocore's signer,
/// given the same static keys, computes the same signature for what the upstream received,
/// and the sandbox never holds the secret key.
#[tokio::test]
async fn sigv4_signatures_verify_with_botocore() {
    let host = "s3.us-west-2.amazonaws.com";
    let upstream = HttpsUpstream::start_with_names(&[host]).await;
    let dns = TestDns::start().await;
    dns.set(host, vec![LOOPBACK]);
    let dir = TestStateDir::new();
    let server = start_server(dir.path(), Server::free_port(), &dns, &upstream).await;
    let mut seen = Seen::default();
    let access_key = "AKIDCORDONEXAMPLE";
    let sandbox = server
        .create(json!({
            "name": "aws",
            "proxy_config": {"rules": [{
                "name": "aws",
                "type": "aws",
                "aws": {
                    "access_key_id": {"type": "opaque", "value": access_key},
                    "secret_access_key": {"type": "opaque", "value": OPAQUE_SECRET}
                }
            }]}
        }))
        .await;
    seen.keep(&sandbox);
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    let url = format!(
        "https://{host}:{}/bucket/key.txt?x-id=GetObject",
        upstream.addr().port()
    );
    let run = exec(&dp, &curl(&url), &mut seen).await;
    assert_eq!(run.stdout.trim(), "200 rc=0", "{}", run.stderr);
    let received = upstream.requests().last().cloned().unwrap();
    assert!(
        received
            .header("authorization")
            .is_some_and(|a| a.starts_with(&format!("AWS4-HMAC-SHA256 Credential={access_key}/"))),
        "{received:?}"
    );
    let (signature, recomputed) = botocore_signature(&received, &url, access_key, OPAQUE_SECRET);
    assert_eq!(
        signature, recomputed,
        "botocore disagrees with the proxy's signature"
    );
    // Negative control: another secret key gives another signature.
    let (_, other) = botocore_signature(&received, &url, access_key, "not-the-secret");
    assert_ne!(signature, other);
    let env = exec(&dp, "env", &mut seen).await.stdout;
    assert!(!env.contains(OPAQUE_SECRET));
    seen.assert_clean();
}

/// A gcp rule: the proxy mints an OAuth token from a service-account key against a local
/// token endpoint (the key's `token_uri`) with a JWT-bearer assertion that the key's public
/// half verifies (`openssl dgst`), and sends it to `*.googleapis.com`; the sandbox never
/// holds the key or the token.
#[tokio::test]
async fn gcp_tokens_are_minted_from_a_service_account_key() {
    use base64::Engine as _;
    let (token_host, api_host) = ("oauth2.googleapis.com", "storage.googleapis.com");
    let upstream = HttpsUpstream::start_with_names(&[token_host, api_host]).await;
    let port = upstream.addr().port();
    let token_uri = format!("https://{token_host}:{port}/token");
    upstream.script(
        "/token",
        cordon_testkit::https_upstream::ScriptedResponse::json(
            200,
            &json!({"access_token": "ya29.minted-by-test", "expires_in": 3600, "token_type": "Bearer"}),
        ),
    );
    let dns = TestDns::start().await;
    dns.set(token_host, vec![LOOPBACK]);
    dns.set(api_host, vec![LOOPBACK]);
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("sa.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key_path)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{made:?}");
    let private_key = std::fs::read_to_string(&key_path).unwrap();
    let service_account = json!({
        "type": "service_account",
        "client_email": "cordon-test@example.iam.gserviceaccount.com",
        "private_key_id": "k1",
        "private_key": private_key,
        "token_uri": token_uri,
    })
    .to_string();
    let dir = TestStateDir::new();
    let server = start_server(dir.path(), Server::free_port(), &dns, &upstream).await;
    let mut seen = Seen::default();
    let sandbox = server
        .create(json!({
            "name": "gcp",
            "proxy_config": {"rules": [{
                "name": "gcp",
                "type": "gcp",
                "gcp": {
                    "service_account_json": {"type": "opaque", "value": service_account},
                    "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"]
                }
            }]}
        }))
        .await;
    seen.keep(&sandbox);
    assert!(!sandbox.to_string().contains("PRIVATE KEY"), "{sandbox}");
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    let run = exec(
        &dp,
        &curl(&format!("https://{api_host}:{port}/storage/v1/b")),
        &mut seen,
    )
    .await;
    assert_eq!(run.stdout.trim(), "200 rc=0", "{}", run.stderr);

    let requests = upstream.requests();
    let api = requests
        .iter()
        .find(|r| r.path == "/storage/v1/b")
        .expect("the API request");
    assert_eq!(
        api.header("authorization"),
        Some("Bearer ya29.minted-by-test")
    );
    let token = requests
        .iter()
        .find(|r| r.path == "/token")
        .expect("a token request");
    let form: std::collections::HashMap<String, String> =
        url_form(&String::from_utf8_lossy(&token.body));
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    let assertion = form.get("assertion").expect("an assertion");
    let parts: Vec<&str> = assertion.split('.').collect();
    assert_eq!(parts.len(), 3, "{assertion}");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(
        claims["iss"], "cordon-test@example.iam.gserviceaccount.com",
        "{claims}"
    );
    assert_eq!(claims["aud"], token_uri.as_str(), "{claims}");
    // The signature verifies with the key's public half.
    let public = keys.path().join("sa.pub");
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key_path)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(
        keys.path().join("signed"),
        format!("{}.{}", parts[0], parts[1]),
    )
    .unwrap();
    std::fs::write(keys.path().join("sig"), b64.decode(parts[2]).unwrap()).unwrap();
    let verified = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&public)
        .arg("-signature")
        .arg(keys.path().join("sig"))
        .arg(keys.path().join("signed"))
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");

    let found = exec(
        &dp,
        "env; echo FILES:; grep -rsl 'PRIVATE KE[Y]' /etc /root /tmp /home; true",
        &mut seen,
    )
    .await;
    assert!(!found.stdout.contains("ya29.minted-by-test"));
    let files = found.stdout.rsplit("FILES:").next().unwrap_or_default();
    assert_eq!(files.trim(), "", "the key is not in the sandbox");
    assert!(seen
        .0
        .iter()
        .all(|a| !a.contains("BEGIN PRIVATE KEY") && !a.contains("ya29.")));
}

/// `application/x-www-form-urlencoded` → map (enough for the token request).
fn url_form(body: &str) -> std::collections::HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server's database files hold `needle` anywhere.
fn db_holds(dir: &std::path::Path, needle: &str) -> bool {
    ["cordon.db", "cordon.db-wal"].iter().any(|file| {
        std::fs::read(dir.join(file))
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    })
}

/// A template's `proxy_config` is validated like a sandbox's (422), sealed at rest (the
/// database never holds its opaque value), shown redacted, keeps its opaque values when a
/// PATCH sends the redacted config back, and applies to the sandboxes made from it.
#[tokio::test]
async fn a_templates_proxy_config_applies_to_its_sandboxes() {
    // A plaintext header's value is shown (and stored in the redacted copy): the positive
    // control that the database search finds what is there.
    const PLAIN_MARKER: &str = "plainHeaderValue-93d1e0";
    let upstream = HttpsUpstream::start_with_names(&["api.example.test"]).await;
    let dns = TestDns::start().await;
    dns.set("api.example.test", vec![LOOPBACK]);
    let dir = TestStateDir::new();
    let server = start_server(dir.path(), Server::free_port(), &dns, &upstream).await;
    let mut seen = Seen::default();

    // Refused at save, as at sandbox create: a shape error and one only compiling finds.
    for (bad, why) in [
        (json!({"rules": [{"name": "x", "headers": 3}]}), "shape"),
        (
            json!({"rules": [{"name": "r", "type": "relay"}]}),
            "not supported",
        ),
        (
            json!({"rules": [], "access_control": {"deny_list": ["~(unclosed"]}}),
            "bad regex",
        ),
    ] {
        let (status, body) = server
            .api(
                "POST",
                "/templates",
                Some(json!({"name": "bad", "image": "system/default", "proxy_config": bad})),
            )
            .await;
        assert_eq!(status, 422, "{why}: {body}");
        assert_eq!(body["detail"][0]["loc"][1], "proxy_config", "{body}");
    }

    let (status, template) = server
        .api(
            "POST",
            "/templates",
            Some(json!({
                "name": "with-egress", "image": "system/default",
                "resources": {"cpu": "250m", "memory": "256Mi"},
                "proxy_config": {"rules": [{
                    "name": "api",
                    "match_hosts": ["api.example.test"],
                    "headers": [
                        {"name": "x-opaque", "type": "opaque", "value": OPAQUE_SECRET},
                        {"name": "x-plain", "type": "plaintext", "value": PLAIN_MARKER}
                    ]
                }]}
            })),
        )
        .await;
    assert_eq!(status, 200, "{template}");
    seen.keep(&template);
    let headers = &template["proxy_config"]["rules"][0]["headers"];
    assert_eq!(headers[0]["is_set"], true, "{template}");
    assert_eq!(headers[1]["value"], PLAIN_MARKER, "{template}");
    assert!(
        db_holds(dir.path(), PLAIN_MARKER),
        "the database search finds nothing"
    );
    assert!(
        !db_holds(dir.path(), OPAQUE_SECRET),
        "the database holds a template's opaque value in plaintext"
    );

    // The redacted config sent back (and a rename) keeps the opaque value.
    let (status, patched) = server
        .api(
            "PATCH",
            "/templates/with-egress",
            Some(json!({"proxy_config": template["proxy_config"]})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    seen.keep(&patched);
    assert_eq!(patched["proxy_config"], template["proxy_config"]);
    let (status, refused) = server
        .api(
            "PATCH",
            "/templates/with-egress",
            Some(json!({"proxy_config": {"rules": [{"name": "r", "type": "relay"}]}})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    let (_, listed) = server.api("GET", "/templates", None).await;
    seen.keep(&listed);
    assert_eq!(
        listed["templates"][0]["proxy_config"],
        template["proxy_config"]
    );
    assert!(!db_holds(dir.path(), OPAQUE_SECRET));

    let (status, sandbox) = server
        .api(
            "POST",
            "/boxes",
            Some(json!({"template_name": "with-egress", "name": "templated", "timeout": 60})),
        )
        .await;
    assert_eq!(status, 200, "{sandbox}");
    seen.keep(&sandbox);
    assert_eq!(
        sandbox["proxy_config"]["rules"][0]["headers"][0]["is_set"], true,
        "{sandbox}"
    );
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    let url = format!(
        "https://api.example.test:{}/templated",
        upstream.addr().port()
    );
    let run = exec(&dp, &curl(&url), &mut seen).await;
    assert_eq!(run.stdout.trim(), "200 rc=0", "{}", run.stderr);
    let last = upstream.requests().last().cloned().unwrap();
    assert_eq!(last.header("x-opaque"), Some(OPAQUE_SECRET));
    assert_eq!(last.header("x-plain"), Some(PLAIN_MARKER));
    assert!(!db_holds(dir.path(), OPAQUE_SECRET));

    // A template an older server stored with a plaintext proxy_config still loads (redacted),
    // still applies, and is sealed at its next save.
    let mut server = server;
    let port = server.port;
    server.terminate();
    let legacy_config = json!({"rules": [{
        "name": "api",
        "match_hosts": ["api.example.test"],
        "headers": [{"name": "x-opaque", "type": "opaque", "value": OPAQUE_SECRET}]
    }]});
    let mut record = template_record(dir.path(), "with-egress");
    let record_map = record.as_object_mut().unwrap();
    record_map.remove("sealed_proxy_config");
    record_map.insert("proxy_config".into(), legacy_config);
    set_template_record(dir.path(), "with-egress", &record);
    let server = start_server(dir.path(), port, &dns, &upstream).await;
    let (status, legacy) = server.api("GET", "/templates/with-egress", None).await;
    assert_eq!(status, 200, "{legacy}");
    seen.keep(&legacy);
    assert_eq!(
        legacy["proxy_config"]["rules"][0]["headers"][0]["is_set"], true,
        "{legacy}"
    );
    let (status, sandbox) = server
        .api(
            "POST",
            "/boxes",
            Some(json!({"template_name": "with-egress", "name": "from-legacy", "timeout": 60})),
        )
        .await;
    assert_eq!(status, 200, "{sandbox}");
    seen.keep(&sandbox);
    let dp = sandbox["dataplane_url"].as_str().unwrap().to_string();
    let run = exec(&dp, &curl(&format!("{url}-legacy")), &mut seen).await;
    assert_eq!(run.stdout.trim(), "200 rc=0", "{}", run.stderr);
    let last = upstream.requests().last().cloned().unwrap();
    assert_eq!(last.header("x-opaque"), Some(OPAQUE_SECRET));
    let (status, saved) = server
        .api(
            "PATCH",
            "/templates/with-egress",
            Some(json!({"idle_ttl_seconds": 300})),
        )
        .await;
    assert_eq!(status, 200, "{saved}");
    seen.keep(&saved);
    let record = template_record(dir.path(), "with-egress").to_string();
    assert!(
        !record.contains(OPAQUE_SECRET) && record.contains("sealed_proxy_config"),
        "{record}"
    );
    seen.assert_clean();
}

/// A template's stored record (JSON), read from the database.
fn template_record(dir: &std::path::Path, name: &str) -> Value {
    let db = rusqlite::Connection::open(dir.join("cordon.db")).unwrap();
    let text: String = db
        .query_row(
            "SELECT record FROM templates WHERE name = ?1",
            [name],
            |row| row.get(0),
        )
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn set_template_record(dir: &std::path::Path, name: &str, record: &Value) {
    let db = rusqlite::Connection::open(dir.join("cordon.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE templates SET record = ?2 WHERE name = ?1",
            [name, &record.to_string()],
        )
        .unwrap();
    assert_eq!(changed, 1);
}
