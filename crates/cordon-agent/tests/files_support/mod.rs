//! Test support for the file routes: the real static `cordon-agent` running as PID 1 of a real
//! namespace sandbox (booted by `cordon_testkit`), reached over the real channel with real HTTP
//! requests.
//!
//! Every fixture is made inside the sandbox and every on-disk check is made inside it, through
//! the agent's `POST /execute` (`/bin/sh -c`, busybox) run as the sandbox's root whatever run
//! user the test has configured. Each test works in its own directory, [`Agent::dir`].
//!
//! Needs what `cordon_testkit` needs: root, `/bin/busybox`, the static agent (`make agent`) and
//! `target/debug/cordon-nsinit` (`cargo build -p cordon-runtime`).

#![allow(dead_code)] // each test binary uses a different part of it

use std::sync::atomic::{AtomicU32, Ordering};

use base64::Engine;
use bytes::Bytes;
use cordon_api::agent::AgentConfig;
use cordon_api::exec::HttpExecuteResponse;
use cordon_api::{ErrorBody, RunConfig};
use cordon_channel::AgentClient;
use cordon_testkit::{TestOptions, TestSandbox};
use futures::{Stream, StreamExt};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

/// A sandbox running the agent (destroyed on drop) and this test's scratch directory in it.
pub struct Agent {
    pub sandbox: TestSandbox,
    pub client: AgentClient,
    /// Absolute path, inside the sandbox, of a fresh directory (mode 0700, owned by root) that
    /// only this test uses.
    pub dir: String,
}

/// A response with its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {:?}", self.body))
    }

    /// The spec error body's `detail.error` and `detail.message`.
    pub fn error(&self) -> (String, String) {
        let body: ErrorBody = serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not a spec error body ({error}): {:?}", self.body));
        (body.detail.error, body.detail.message)
    }
}

pub const BOUNDARY: &str = "cordon-test-boundary-7MA4YWxkTrZu0gW";

/// What the Python and JS clients send: one part, field and filename `file`.
pub fn multipart_head() -> String {
    format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
}

pub fn multipart_tail() -> String {
    format!("\r\n--{BOUNDARY}--\r\n")
}

pub fn multipart_body(data: &[u8]) -> Vec<u8> {
    let mut body = multipart_head().into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(multipart_tail().as_bytes());
    body
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Quotes `value` as one `/bin/sh` word.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Numbers the per-test directories of this test binary.
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// Longest a fixture or inspection command may run inside the sandbox.
const SH_TIMEOUT_SECONDS: i64 = 120;

impl Agent {
    /// Boots a fresh sandbox and makes this test's directory in it.
    pub async fn start() -> Agent {
        let sandbox = TestSandbox::start(TestOptions::default()).await;
        let client = sandbox.client.clone();
        let dir = format!("/tmp/t-{}", NEXT_DIR.fetch_add(1, Ordering::Relaxed));
        let agent = Agent {
            sandbox,
            client,
            dir,
        };
        let uid_map = agent
            .sh(&format!(
                "mkdir -m 700 {} && cat /proc/self/uid_map",
                quote(&agent.dir)
            ))
            .await;
        // The agent really is in a sandbox: its root is some unprivileged host uid.
        let map: Vec<&str> = uid_map.split_whitespace().collect();
        assert!(
            map.len() == 3 && map[0] == "0" && map[1] != "0",
            "not in a sandbox user namespace: uid_map {uid_map:?}"
        );
        agent
    }

    /// A path inside this test's directory.
    pub fn path(&self, relative: &str) -> String {
        format!("{}/{relative}", self.dir)
    }

    /// Runs `command` with `/bin/sh -c` inside the sandbox as root (whatever run user the
    /// sandbox config names), through the agent's `POST /execute`.
    pub async fn exec(&self, command: &str) -> HttpExecuteResponse {
        cordon_testkit::try_exec_as(&self.client, command, Some("root"), SH_TIMEOUT_SECONDS)
            .await
            .unwrap_or_else(|error| panic!("`{command}`: {error}"))
    }

    /// Runs `command` inside the sandbox as root, asserts it exited 0 and returns its stdout.
    pub async fn sh(&self, command: &str) -> String {
        let output = self.exec(command).await;
        assert_eq!(output.exit_code, 0, "`{command}` failed: {output:?}");
        output.stdout
    }

    /// Writes each `(path, contents)` inside the sandbox as root (parents created, mode 0644
    /// under the default umask), in one command.
    pub async fn write_files(&self, files: &[(&str, &[u8])]) {
        let mut script = String::from("set -e");
        for (path, contents) in files {
            let encoded = base64::engine::general_purpose::STANDARD.encode(contents);
            let path = quote(path);
            script.push_str(&format!(
                "\nmkdir -p \"$(dirname {path})\"\nprintf '%s' '{encoded}' | base64 -d > {path}"
            ));
        }
        self.sh(&script).await;
    }

    pub async fn write_file(&self, path: &str, contents: &[u8]) {
        self.write_files(&[(path, contents)]).await;
    }

    /// The exact bytes of `path` inside the sandbox.
    pub async fn read_file(&self, path: &str) -> Vec<u8> {
        let encoded = self.sh(&format!("base64 {}", quote(path))).await;
        let encoded: String = encoded.split_whitespace().collect();
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64 from the sandbox")
    }

    /// Names in `dir` inside the sandbox (`ls -A`), sorted, to check that nothing extra, such
    /// as a temp file, was left.
    pub async fn entries(&self, dir: &str) -> Vec<String> {
        let listing = self.sh(&format!("ls -A {}", quote(dir))).await;
        let mut names: Vec<String> = listing.lines().map(str::to_string).collect();
        names.sort();
        names
    }

    /// Whether anything exists at `path` inside the sandbox.
    pub async fn exists(&self, path: &str) -> bool {
        let output = self.exec(&format!("test -e {}", quote(path))).await;
        match output.exit_code {
            0 => true,
            1 => false,
            _ => panic!("test -e {path}: {output:?}"),
        }
    }

    /// `stat -c FORMAT path` inside the sandbox, trimmed.
    pub async fn stat(&self, format: &str, path: &str) -> String {
        self.sh(&format!("stat -c {} {}", quote(format), quote(path)))
            .await
            .trim()
            .to_string()
    }

    /// `(uid, gid)` of `path` inside the sandbox.
    pub async fn owner(&self, path: &str) -> (u32, u32) {
        let owner = self.stat("%u %g", path).await;
        let (uid, gid) = owner.split_once(' ').expect("uid and gid");
        (uid.parse().unwrap(), gid.parse().unwrap())
    }

    /// `chmod MODE path` inside the sandbox.
    pub async fn chmod(&self, mode: &str, path: &str) {
        self.sh(&format!("chmod {mode} {}", quote(path))).await;
    }

    /// The SHA-256 of `path` inside the sandbox, by `sha256sum`, in lower-case hex.
    pub async fn sha256(&self, path: &str) -> String {
        let output = self.sh(&format!("sha256sum {}", quote(path))).await;
        output
            .split_whitespace()
            .next()
            .expect("sha256sum output")
            .to_string()
    }

    pub async fn put_config(&self, config: &AgentConfig) {
        let body = serde_json::to_vec(config).unwrap();
        let reply = self
            .send(
                Method::PUT,
                "/_cordon/config",
                &[("content-type", "application/json")],
                body,
            )
            .await;
        assert!(reply.status.is_success(), "PUT /_cordon/config: {reply:?}");
    }

    /// Makes `user` the sandbox's run user (as the server does with a sandbox's `run_config`).
    pub async fn set_run_user(&self, user: &str) {
        let run_config = RunConfig {
            user: Some(user.into()),
            ..Default::default()
        };
        self.put_config(&AgentConfig {
            run_config,
            ..Default::default()
        })
        .await;
    }

    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "agent");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .client
            .request(request.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn upload(&self, path: &str, data: &[u8]) -> Reply {
        let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
        let uri = format!("/upload?path={}", encode(path));
        self.send(
            Method::POST,
            &uri,
            &[("content-type", &content_type)],
            multipart_body(data),
        )
        .await
    }

    /// Uploads a streamed multipart body (chunked transfer encoding, no Content-Length).
    pub async fn upload_stream<S>(&self, path: &str, data: S) -> Reply
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        let head = futures::stream::once(async { Bytes::from(multipart_head()) });
        let tail = futures::stream::once(async { Bytes::from(multipart_tail()) });
        let frames = head
            .chain(data)
            .chain(tail)
            .map(|bytes| Ok::<_, std::convert::Infallible>(Frame::data(bytes)));
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/upload?path={}", encode(path)))
            .header("host", "agent")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(StreamBody::new(frames))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn download(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(
            Method::GET,
            &format!("/download?path={}", encode(path)),
            headers,
            Bytes::new(),
        )
        .await
    }

    pub async fn head(&self, path: &str) -> Reply {
        self.send(
            Method::HEAD,
            &format!("/download?path={}", encode(path)),
            &[],
            Bytes::new(),
        )
        .await
    }

    pub async fn post_json(&self, uri: &str, body: serde_json::Value) -> Reply {
        self.send(
            Method::POST,
            uri,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }
}
