//! `cordon snapshot import`: uploads an OCI layout tar or `docker save` archive to a running
//! `cordon serve` (`POST {base}/snapshots/import`) and waits for the snapshot to be built.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use futures::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How often the build's status is asked for.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Longest a single control-plane answer may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct ImportArgs {
    /// The archive: an OCI image layout as a tar, or the output of `docker save`.
    file: PathBuf,
    /// The snapshot's name, optionally with a tag (`NAME[:TAG]`, tag default `latest`).
    #[arg(long)]
    name: String,
    /// The snapshot's disk capacity (default: the server's, 8 GiB).
    #[arg(long)]
    fs_capacity_bytes: Option<u64>,
    /// The server's API root, or its `.../v2/sandboxes` base. Plain HTTP only.
    #[arg(long, default_value = "http://127.0.0.1:8080/api")]
    endpoint: String,
    /// The API key (selects the workspace).
    #[arg(long, env = "CORDON_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Longest to wait for the build, in seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
}

/// Uploads, polls, and prints the snapshot id once it is ready.
pub async fn import(args: ImportArgs) -> Result<()> {
    let base = control_plane_base(&args.endpoint)?;
    let file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("opening {}", args.file.display()))?;
    let size = file.metadata().await?.len();
    let mut query = format!("name={}", percent_encode(&args.name));
    if let Some(capacity) = args.fs_capacity_bytes {
        query.push_str(&format!("&fs_capacity_bytes={capacity}"));
    }
    let url = format!("{base}/snapshots/import?{query}");
    let frames = tokio_util::io::ReaderStream::new(file).map_ok(Frame::data);
    let body = StreamBody::new(frames).boxed();
    eprintln!("uploading {} ({size} bytes)", args.file.display());
    let snapshot = request(&url, "POST", &args.api_key, Some((body, size))).await?;
    let id = snapshot["id"]
        .as_str()
        .context("the server's answer has no snapshot id")?
        .to_string();
    eprintln!("building snapshot {id}");
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    loop {
        let snapshot = request(
            &format!("{base}/snapshots/{id}"),
            "GET",
            &args.api_key,
            None,
        )
        .await?;
        match snapshot["status"].as_str() {
            Some("ready") => {
                println!("{id}");
                return Ok(());
            }
            Some("failed") => bail!(
                "snapshot {id} failed: {}",
                snapshot["status_message"]
                    .as_str()
                    .unwrap_or("no reason given")
            ),
            _ if Instant::now() >= deadline => {
                bail!("snapshot {id} still building after {} s", args.timeout_secs)
            }
            _ => tokio::time::sleep(POLL_EVERY).await,
        }
    }
}

/// `{endpoint}/v2/sandboxes` for an endpoint ending in `/api`, the endpoint itself when it
/// already ends in `/v2/sandboxes`, else `{endpoint}/api/v2/sandboxes`.
fn control_plane_base(endpoint: &str) -> Result<String> {
    let endpoint = endpoint.trim_end_matches('/');
    if !endpoint.starts_with("http://") {
        bail!("--endpoint must be an http:// URL, got {endpoint:?}");
    }
    Ok(if endpoint.ends_with("/v2/sandboxes") {
        endpoint.to_string()
    } else if endpoint.ends_with("/api") {
        format!("{endpoint}/v2/sandboxes")
    } else {
        format!("{endpoint}/api/v2/sandboxes")
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(value: &str) -> String {
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

type RequestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// One request on a fresh HTTP/1.1 connection; the JSON answer, or the server's error.
async fn request(
    url: &str,
    method: &str,
    api_key: &str,
    body: Option<(RequestBody, u64)>,
) -> Result<Value> {
    let uri: http::Uri = url.parse().with_context(|| format!("URL {url}"))?;
    let authority = uri.authority().context("URL without a host")?.to_string();
    let address = if uri.port().is_some() {
        authority.clone()
    } else {
        format!("{authority}:80")
    };
    let stream = tokio::net::TcpStream::connect(&address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header("x-api-key", api_key);
    let body = match body {
        Some((body, length)) => {
            builder = builder
                .header(http::header::CONTENT_TYPE, "application/octet-stream")
                .header(http::header::CONTENT_LENGTH, length);
            body
        }
        None => Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    };
    let response = sender.send_request(builder.body(body)?).await?;
    let status = response.status();
    let bytes = tokio::time::timeout(ANSWER_WITHIN, response.into_body().collect())
        .await
        .context("the server did not answer in time")??
        .to_bytes();
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        let message = json["detail"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        bail!("{method} {url}: {status}: {message}");
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_and_encoding() {
        assert_eq!(
            control_plane_base("http://h:1/api/").unwrap(),
            "http://h:1/api/v2/sandboxes"
        );
        assert_eq!(
            control_plane_base("http://h:1/v2/sandboxes").unwrap(),
            "http://h:1/v2/sandboxes"
        );
        assert_eq!(
            control_plane_base("http://h:1").unwrap(),
            "http://h:1/api/v2/sandboxes"
        );
        assert!(control_plane_base("https://h").is_err());
        assert_eq!(percent_encode("team/tools:v1"), "team%2Ftools%3Av1");
    }
}
