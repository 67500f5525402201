//! Upload and download against the real agent in a real namespace sandbox, over the channel
//! (spec §3.5.1, §3.5.2). Fixtures are made, and on-disk state checked, inside the sandbox.

mod files_support;

use std::hash::Hasher;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use cordon_api::agent::AgentConfig;
use files_support::{quote, Agent};
use futures::StreamExt;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn text_and_binary_round_trip() {
    let agent = Agent::start().await;
    let text_path = agent.path("hello.txt");
    assert_eq!(
        agent.upload(&text_path, b"hello, world\n").await.status,
        StatusCode::OK
    );
    let text = agent.download(&text_path, &[]).await;
    assert_eq!(text.status, StatusCode::OK);
    assert_eq!(text.body.as_ref(), b"hello, world\n");
    assert_eq!(
        text.header("content-type"),
        Some("application/octet-stream")
    );

    let every_byte: Vec<u8> = (0..=255u8).cycle().take(256 * 40).collect();
    let binary_path = agent.path("every byte.bin");
    assert_eq!(
        agent.upload(&binary_path, &every_byte).await.status,
        StatusCode::OK
    );
    assert_eq!(agent.read_file(&binary_path).await, every_byte);
    let binary = agent.download(&binary_path, &[]).await;
    assert_eq!(binary.body.as_ref(), every_byte.as_slice());
    assert_eq!(binary.header("content-length"), Some("10240"));

    let empty_path = agent.path("empty");
    assert_eq!(agent.upload(&empty_path, b"").await.status, StatusCode::OK);
    let empty = agent.download(&empty_path, &[]).await;
    assert_eq!((empty.status, empty.body.len()), (StatusCode::OK, 0));
}

#[tokio::test]
async fn upload_creates_parents_and_overwrites_atomically() {
    let agent = Agent::start().await;
    let nested = agent.path("a/b/c/file.txt");
    assert_eq!(
        agent.upload(&nested, b"first version, longer").await.status,
        StatusCode::OK
    );
    assert_eq!(agent.read_file(&nested).await, b"first version, longer");
    assert_eq!(
        agent.upload(&nested, b"second").await.status,
        StatusCode::OK
    );
    assert_eq!(agent.download(&nested, &[]).await.body.as_ref(), b"second");
    // The temporary file was renamed into place: nothing else is left beside the target.
    assert_eq!(agent.entries(&agent.path("a/b/c")).await, vec!["file.txt"]);
}

/// A deterministic 1 MiB block, stamped with its index so reordered chunks would show.
fn chunk(index: u64, template: &[u8]) -> Bytes {
    let mut chunk = template.to_vec();
    chunk[..8].copy_from_slice(&index.to_le_bytes());
    Bytes::from(chunk)
}

fn template() -> Vec<u8> {
    let mut state: u32 = 0x2545_f491;
    (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

#[tokio::test]
async fn hundred_mebibytes_stream_both_ways() {
    const CHUNKS: u64 = 100;
    let agent = Agent::start().await;
    let path = agent.path("big.bin");
    let template = template();
    // The SHA-256 to compare with `sha256sum` inside, on a thread while the bytes travel.
    let template_for_sha256 = template.clone();
    let expected_sha256 = tokio::task::spawn_blocking(move || {
        let mut sha256 = Sha256::new();
        for index in 0..CHUNKS {
            sha256.update(chunk(index, &template_for_sha256));
        }
        format!("{:x}", sha256.finalize())
    });
    let mut expected = std::collections::hash_map::DefaultHasher::new();
    for index in 0..CHUNKS {
        expected.write(&chunk(index, &template));
    }
    let expected = expected.finish();

    let template_for_upload = template.clone();
    let data =
        futures::stream::iter(0..CHUNKS).map(move |index| chunk(index, &template_for_upload));
    let uploaded = agent.upload_stream(&path, data).await;
    assert_eq!(uploaded.status, StatusCode::OK, "{uploaded:?}");
    assert_eq!(
        agent.stat("%s", &path).await,
        (CHUNKS << 20).to_string(),
        "size on disk inside the sandbox"
    );
    assert_eq!(
        agent.sha256(&path).await,
        expected_sha256.await.unwrap(),
        "sha256sum inside the sandbox differs from the uploaded bytes'"
    );

    let request = http::Request::builder()
        .uri(format!("/download?path={}", files_support::encode(&path)))
        .header("host", "agent")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = agent.client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-length"],
        (CHUNKS << 20).to_string().as_str()
    );
    let mut body = response.into_body();
    let mut received = std::collections::hash_map::DefaultHasher::new();
    let mut length = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            length += data.len() as u64;
            received.write(&data);
        }
    }
    assert_eq!(length, CHUNKS << 20);
    assert_eq!(
        received.finish(),
        expected,
        "downloaded bytes differ from uploaded ones"
    );
}

#[tokio::test]
async fn head_reports_size_etag_and_last_modified() {
    let agent = Agent::start().await;
    let path = agent.path("stat.txt");
    agent.upload(&path, &[7u8; 12345]).await;
    let head = agent.head(&path).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some("12345"),
        "HEAD must carry the real size"
    );
    assert!(head.body.is_empty());
    let etag = head.header("etag").unwrap().to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong ETag: {etag}"
    );
    let modified = httpdate::parse_http_date(head.header("last-modified").unwrap()).unwrap();
    let mtime: u64 = agent.stat("%Y", &path).await.parse().unwrap();
    let on_disk = UNIX_EPOCH + Duration::from_secs(mtime);
    let skew = on_disk.duration_since(modified).unwrap_or_default();
    assert!(skew.as_secs() < 1, "Last-Modified matches the file's mtime");

    let get = agent.download(&path, &[]).await;
    assert_eq!(
        get.header("etag"),
        Some(etag.as_str()),
        "GET and HEAD agree on the ETag"
    );

    agent.upload(&path, b"changed").await;
    let after = agent.head(&path).await;
    assert_eq!(after.header("content-length"), Some("7"));
    assert_ne!(
        after.header("etag"),
        Some(etag.as_str()),
        "a new version has a new ETag"
    );

    let missing = agent.head(&agent.path("nope")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn byte_ranges() {
    let agent = Agent::start().await;
    let path = agent.path("digits");
    agent.upload(&path, b"0123456789").await;

    let cases = [
        ("bytes=2-5", "2345", "bytes 2-5/10"),
        ("bytes=7-", "789", "bytes 7-9/10"),
        ("bytes=-3", "789", "bytes 7-9/10"),
        ("bytes=8-100", "89", "bytes 8-9/10"),
        ("bytes=0-0", "0", "bytes 0-0/10"),
    ];
    for (range, body, content_range) in cases {
        let reply = agent.download(&path, &[("range", range)]).await;
        assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(reply.body.as_ref(), body.as_bytes(), "{range}");
        assert_eq!(
            reply.header("content-range"),
            Some(content_range),
            "{range}"
        );
        assert_eq!(
            reply.header("content-length"),
            Some(body.len().to_string().as_str()),
            "{range}"
        );
    }

    for range in ["bytes=10-", "bytes=10-12"] {
        let reply = agent.download(&path, &[("range", range)]).await;
        assert_eq!(reply.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(reply.header("content-range"), Some("bytes */10"), "{range}");
    }
}

#[tokio::test]
async fn conditional_requests() {
    let agent = Agent::start().await;
    let path = agent.path("versioned");
    agent.upload(&path, b"abcdefghij").await;
    let etag = agent.head(&path).await.header("etag").unwrap().to_string();

    let same = agent
        .download(&path, &[("range", "bytes=1-2"), ("if-range", &etag)])
        .await;
    assert_eq!(
        (same.status, same.body.as_ref()),
        (StatusCode::PARTIAL_CONTENT, b"bc".as_slice())
    );

    let stale = agent
        .download(&path, &[("range", "bytes=1-2"), ("if-range", "\"stale\"")])
        .await;
    assert_eq!(
        (stale.status, stale.body.as_ref()),
        (StatusCode::OK, b"abcdefghij".as_slice())
    );
    assert_eq!(stale.header("content-range"), None);

    let cached = agent.download(&path, &[("if-none-match", &etag)]).await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert_eq!(cached.header("etag"), Some(etag.as_str()));
    assert!(cached.header("last-modified").is_some());
    assert!(cached.body.is_empty());

    let changed = agent
        .download(&path, &[("if-none-match", "\"other\"")])
        .await;
    assert_eq!(changed.status, StatusCode::OK);
}

#[tokio::test]
async fn missing_file_and_directory_errors() {
    let agent = Agent::start().await;
    let missing_path = agent.path("does/not/exist");
    let missing = agent.download(&missing_path, &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error().0, "FileNotFound");

    let directory = agent.dir.clone();
    let reply = agent.download(&directory, &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.error(),
        (
            "ReadError".to_string(),
            format!("{directory}: is a directory")
        )
    );

    let upload_onto_directory = agent.upload(&directory, b"x").await;
    assert_eq!(upload_onto_directory.status, StatusCode::BAD_REQUEST);
    assert_eq!(upload_onto_directory.error().0, "WriteError");
}

#[tokio::test]
async fn run_user_permissions_are_enforced() {
    // Root in the sandbox is root only inside its user namespace; the run user still has to
    // be refused what the files' modes refuse it.
    let agent = Agent::start().await;
    let shared = agent.path("shared");
    let secret = agent.path("shared/secret");
    let public = agent.path("shared/public");
    let root_only_dir = agent.path("locked");
    agent
        .write_files(&[(&secret, b"root only"), (&public, b"anyone")])
        .await;
    // The test directory is 0700 root: open it up so only the files' own modes decide.
    agent
        .sh(&format!(
            "set -e; chmod 755 {dir}; chmod 777 {shared}; chmod 000 {secret}; chmod 644 {public}; \
             mkdir {locked}; chmod 755 {locked}",
            dir = quote(&agent.dir),
            shared = quote(&shared),
            secret = quote(&secret),
            public = quote(&public),
            locked = quote(&root_only_dir),
        ))
        .await;
    assert_eq!(agent.stat("%u %g %a", &secret).await, "0 0 0");
    assert_eq!(agent.stat("%u %g %a", &root_only_dir).await, "0 0 755");

    // As root (the default run user) the agent reads anything.
    let as_root = agent.download(&secret, &[]).await;
    assert_eq!(as_root.status, StatusCode::OK);
    assert_eq!(as_root.body.as_ref(), b"root only");

    agent.set_run_user("65534").await;

    let denied = agent.download(&secret, &[]).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.error().0, "PermissionDenied");
    assert_eq!(agent.download(&public, &[]).await.body.as_ref(), b"anyone");

    let created = agent.path("shared/new/by-nobody.txt");
    assert_eq!(agent.upload(&created, b"mine").await.status, StatusCode::OK);
    assert_eq!(
        agent.owner(&created).await,
        (65534, 65534),
        "files are created as the run user"
    );
    assert_eq!(agent.read_file(&created).await, b"mine");
    let (parent_uid, _) = agent.owner(&agent.path("shared/new")).await;
    assert_eq!(parent_uid, 65534, "parents are created as the run user");

    let refused = agent.upload(&format!("{root_only_dir}/x"), b"no").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.error().0, "PermissionDenied");
    assert!(agent.entries(&root_only_dir).await.is_empty());
    assert_eq!(
        agent.read_file(&secret).await,
        b"root only",
        "the secret is untouched"
    );

    // The same on the overlay root (snapshot layers plus the writable layer, not the /tmp
    // tmpfs), as the image's `user` (uid 1000) in its home directory.
    agent.set_run_user("user").await;
    assert_eq!(
        agent.download(&secret, &[]).await.status,
        StatusCode::FORBIDDEN
    );
    let home = format!("/home/user/{}", agent.dir.rsplit('/').next().unwrap());
    let owned = format!("{home}/sub/by-user.txt");
    assert_eq!(agent.upload(&owned, b"user's").await.status, StatusCode::OK);
    assert_eq!(agent.owner(&owned).await, (1000, 1000));
    assert_eq!(agent.owner(&format!("{home}/sub")).await, (1000, 1000));
    assert_eq!(agent.download(&owned, &[]).await.body.as_ref(), b"user's");
    assert_eq!(agent.stat("%u %g %a", "/root").await, "0 0 700");
    let in_root_home = agent.upload("/root/by-user.txt", b"no").await;
    assert_eq!(
        (in_root_home.status, in_root_home.error().0.as_str()),
        (StatusCode::FORBIDDEN, "PermissionDenied")
    );
    assert!(!agent.exists("/root/by-user.txt").await);
}

#[tokio::test]
async fn bad_requests_get_spec_errors_and_change_nothing() {
    let agent = Agent::start().await;
    for (method, uri) in [
        (Method::GET, "/download"),
        (Method::POST, "/upload"),
        (Method::GET, "/download?file=x"),
    ] {
        let reply = agent.send(method.clone(), uri, &[], Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{method} {uri}");
        assert_eq!(reply.error().0, "InvalidRequest", "{method} {uri}");
    }

    let target = agent.path("untouched/file");
    let uri = format!("/upload?path={}", files_support::encode(&target));
    let not_multipart = agent
        .send(
            Method::POST,
            &uri,
            &[("content-type", "text/plain")],
            "data",
        )
        .await;
    assert_eq!(
        (not_multipart.status, not_multipart.error().0.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidRequest")
    );

    let wrong_field = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\ndata\r\n--{b}--\r\n",
        b = files_support::BOUNDARY
    );
    let content_type = format!("multipart/form-data; boundary={}", files_support::BOUNDARY);
    let no_file = agent
        .send(
            Method::POST,
            &uri,
            &[("content-type", &content_type)],
            wrong_field,
        )
        .await;
    assert_eq!(
        (no_file.status, no_file.error().0.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidRequest")
    );
    assert!(
        !agent.exists(&agent.path("untouched")).await,
        "a refused upload creates no directories"
    );
}

#[tokio::test]
async fn oversized_upload_is_refused_and_changes_nothing() {
    let agent = Agent::start().await;
    agent
        .put_config(&AgentConfig {
            upload_max_bytes: Some(1000),
            ..Default::default()
        })
        .await;
    let existing = agent.path("keep.txt");
    agent.write_file(&existing, b"old").await;

    // Declared too large by Content-Length: refused before any byte is read.
    let declared = agent.upload(&existing, &vec![1u8; 100_000]).await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(declared.error().0, "PayloadTooLarge");

    // Streamed without a length: refused once the cap is crossed, mid-body.
    let chunks = futures::stream::iter((0..4).map(|_| Bytes::from(vec![2u8; 600])));
    let streamed = agent
        .upload_stream(&agent.path("new/dir/file"), chunks)
        .await;
    assert_eq!(streamed.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(streamed.error().0, "PayloadTooLarge");

    let overwrite = futures::stream::iter((0..4).map(|_| Bytes::from(vec![3u8; 600])));
    assert_eq!(
        agent.upload_stream(&existing, overwrite).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    assert_eq!(agent.read_file(&existing).await, b"old");
    assert_eq!(
        agent.entries(&agent.dir).await,
        vec!["keep.txt"],
        "no temp files or directories left"
    );

    // At the cap exactly is fine.
    assert_eq!(
        agent.upload(&existing, &[4u8; 1000]).await.status,
        StatusCode::OK
    );
}
