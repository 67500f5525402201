//! Glob and grep against the real agent in a real namespace sandbox, over the channel
//! (spec §3.5.3, §3.5.4). The trees searched are made inside the sandbox.

mod files_support;

use files_support::{quote, Agent};
use http::{Method, StatusCode};
use serde_json::{json, Value};

/// ```text
/// a.py  b.py  c.txt  ab.md  .hidden
/// src/main.py  src/util.py  src/pkg/mod.py
/// docs/guide.md
/// ```
async fn agent_with_tree() -> Agent {
    let agent = Agent::start().await;
    let root = agent.path("tree");
    let files: [(&str, &str); 9] = [
        ("a.py", "import os\n"),
        ("b.py", "x = 1\n"),
        ("c.txt", "hello\n"),
        ("ab.md", "# title\n"),
        (".hidden", "secret\n"),
        ("src/main.py", "def main():\n    print('hi')\n"),
        ("src/util.py", "def util():\n    pass\n"),
        ("src/pkg/mod.py", "VALUE = 3\n"),
        ("docs/guide.md", "read me\n"),
    ];
    let paths: Vec<String> = files
        .iter()
        .map(|(path, _)| format!("{root}/{path}"))
        .collect();
    let fixtures: Vec<(&str, &[u8])> = paths
        .iter()
        .zip(files)
        .map(|(path, (_, contents))| (path.as_str(), contents.as_bytes()))
        .collect();
    agent.write_files(&fixtures).await;
    // Exactly the tree above, nothing else.
    let listing = agent
        .sh(&format!("cd {} && find . | sort", quote(&root)))
        .await;
    assert_eq!(
        listing.lines().collect::<Vec<_>>(),
        [
            ".",
            "./.hidden",
            "./a.py",
            "./ab.md",
            "./b.py",
            "./c.txt",
            "./docs",
            "./docs/guide.md",
            "./src",
            "./src/main.py",
            "./src/pkg",
            "./src/pkg/mod.py",
            "./src/util.py",
        ]
    );
    agent
}

fn tree(agent: &Agent) -> String {
    agent.path("tree")
}

async fn glob(agent: &Agent, pattern: &str, limit: Option<u64>) -> Value {
    let mut request = json!({"pattern": pattern, "path": tree(agent)});
    if let Some(limit) = limit {
        request["limit"] = json!(limit);
    }
    let reply = agent.post_json("/glob", request).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply.json()
}

/// Match paths relative to the tree, sorted.
fn relative_paths(agent: &Agent, response: &Value) -> Vec<String> {
    let prefix = format!("{}/", tree(agent));
    let mut paths: Vec<String> = response["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["path"]
                .as_str()
                .unwrap()
                .strip_prefix(&prefix)
                .expect("absolute path")
                .to_string()
        })
        .collect();
    paths.sort();
    paths
}

#[tokio::test]
async fn glob_star_lists_a_directory_with_every_key() {
    let agent = agent_with_tree().await;
    let response = glob(&agent, "*", None).await;
    assert_eq!(
        relative_paths(&agent, &response),
        vec![".hidden", "a.py", "ab.md", "b.py", "c.txt", "docs", "src"]
    );
    assert_eq!(response["truncated"], json!(false));
    for entry in response["matches"].as_array().unwrap() {
        let keys: Vec<&str> = entry
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4, "{entry}");
        for key in ["path", "is_dir", "size_bytes", "modified_at"] {
            assert!(entry.get(key).is_some(), "{key} missing in {entry}");
        }
        let name = entry["path"].as_str().unwrap();
        let is_dir = name.ends_with("/docs") || name.ends_with("/src");
        assert_eq!(entry["is_dir"], json!(is_dir), "{name}");
        if name.ends_with("/a.py") {
            assert_eq!(entry["size_bytes"], json!(10));
        }
        let modified = entry["modified_at"].as_str().unwrap();
        assert!(
            modified.len() == 32 && modified.as_bytes()[10] == b'T' && modified.ends_with("+00:00"),
            "{modified}"
        );
    }
}

#[tokio::test]
async fn glob_wildcards() {
    let agent = agent_with_tree().await;
    let cases: [(&str, &[&str]); 6] = [
        (
            "**/*.py",
            &[
                "a.py",
                "b.py",
                "src/main.py",
                "src/pkg/mod.py",
                "src/util.py",
            ],
        ),
        ("*.py", &["a.py", "b.py"]),
        ("?.py", &["a.py", "b.py"]),
        ("[ab].*", &["a.py", "b.py"]),
        ("src/*", &["src/main.py", "src/pkg", "src/util.py"]),
        ("**/*.md", &["ab.md", "docs/guide.md"]),
    ];
    for (pattern, expected) in cases {
        let response = glob(&agent, pattern, None).await;
        assert_eq!(relative_paths(&agent, &response), expected, "{pattern}");
    }
}

#[tokio::test]
async fn glob_limit_truncates() {
    let agent = agent_with_tree().await;
    let response = glob(&agent, "**/*", Some(3)).await;
    assert_eq!(response["matches"].as_array().unwrap().len(), 3);
    assert_eq!(response["truncated"], json!(true));
    let exact = glob(&agent, "*.py", Some(2)).await;
    assert_eq!(
        (
            exact["matches"].as_array().unwrap().len(),
            &exact["truncated"]
        ),
        (2, &json!(false))
    );
}

#[tokio::test]
async fn glob_errors() {
    let agent = agent_with_tree().await;
    let missing = agent
        .post_json("/glob", json!({"pattern": "*", "path": agent.path("nope")}))
        .await;
    assert_eq!(
        (missing.status, missing.error().0.as_str()),
        (StatusCode::NOT_FOUND, "FileNotFound")
    );
    let relative = agent
        .post_json("/glob", json!({"pattern": "*", "path": "tree"}))
        .await;
    assert_eq!(
        (relative.status, relative.error().0.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidRequest")
    );
    let bad_pattern = agent
        .post_json("/glob", json!({"pattern": "[", "path": tree(&agent)}))
        .await;
    assert_eq!(bad_pattern.status, StatusCode::BAD_REQUEST);
    let malformed = agent
        .send(
            Method::POST,
            "/glob",
            &[("content-type", "application/json")],
            "{\"pattern\":",
        )
        .await;
    assert_eq!(
        (malformed.status, malformed.error().0.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidRequest")
    );
    let missing_field = agent.post_json("/glob", json!({"pattern": "*"})).await;
    assert_eq!(
        (missing_field.status, missing_field.error().0.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidRequest")
    );
}

async fn grep(agent: &Agent, request: Value) -> Value {
    let reply = agent.post_json("/grep", request).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply.json()
}

/// `(relative path, line, text)` of each match, sorted.
fn grep_hits(agent: &Agent, response: &Value) -> Vec<(String, u64, String)> {
    let prefix = format!("{}/", tree(agent));
    let mut hits: Vec<_> = response["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["path"]
                    .as_str()
                    .unwrap()
                    .strip_prefix(&prefix)
                    .expect("absolute path")
                    .to_string(),
                m["line"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    hits.sort();
    hits
}

fn hit(path: &str, line: u64, text: &str) -> (String, u64, String) {
    (path.to_string(), line, text.to_string())
}

#[tokio::test]
async fn grep_is_literal_with_line_numbers() {
    let agent = agent_with_tree().await;
    agent
        .write_file(
            &agent.path("tree/regex.txt"),
            b"a+b(c)\naxb\n[x].*\nmore a+b(c) here\n",
        )
        .await;
    let response = grep(&agent, json!({"pattern": "a+b(c)", "path": tree(&agent)})).await;
    assert_eq!(
        grep_hits(&agent, &response),
        vec![
            hit("regex.txt", 1, "a+b(c)"),
            hit("regex.txt", 4, "more a+b(c) here")
        ]
    );
    assert_eq!(response["truncated"], json!(false));
    let brackets = grep(&agent, json!({"pattern": "[x].*", "path": tree(&agent)})).await;
    assert_eq!(
        grep_hits(&agent, &brackets),
        vec![hit("regex.txt", 3, "[x].*")]
    );
    let indented = grep(&agent, json!({"pattern": "print(", "path": tree(&agent)})).await;
    assert_eq!(
        grep_hits(&agent, &indented),
        vec![hit("src/main.py", 2, "    print('hi')")]
    );
}

#[tokio::test]
async fn grep_glob_matches_basenames_or_relative_paths() {
    let agent = agent_with_tree().await;
    let basename = grep(
        &agent,
        json!({"pattern": "def", "path": tree(&agent), "glob": "*.py"}),
    )
    .await;
    assert_eq!(
        grep_hits(&agent, &basename),
        vec![
            hit("src/main.py", 1, "def main():"),
            hit("src/util.py", 1, "def util():")
        ]
    );
    let path_glob = grep(
        &agent,
        json!({"pattern": "def", "path": tree(&agent), "glob": "src/m*.py"}),
    )
    .await;
    assert_eq!(
        grep_hits(&agent, &path_glob),
        vec![hit("src/main.py", 1, "def main():")]
    );
    let at_root_only = grep(
        &agent,
        json!({"pattern": "e", "path": tree(&agent), "glob": "*/*.md"}),
    )
    .await;
    assert_eq!(
        grep_hits(&agent, &at_root_only),
        vec![hit("docs/guide.md", 1, "read me")]
    );
    let excluded = grep(
        &agent,
        json!({"pattern": "def", "path": tree(&agent), "glob": "*.txt"}),
    )
    .await;
    assert!(grep_hits(&agent, &excluded).is_empty());
}

#[tokio::test]
async fn grep_skips_binary_and_git() {
    let agent = agent_with_tree().await;
    agent
        .write_files(&[
            (&agent.path("tree/blob.bin"), b"needle\0binary\n"),
            (&agent.path("tree/.git/HEAD"), b"needle\n"),
            (&agent.path("tree/notes.txt"), b"a needle here\n"),
        ])
        .await;
    assert_eq!(
        agent.read_file(&agent.path("tree/blob.bin")).await,
        b"needle\0binary\n"
    );
    let response = grep(&agent, json!({"pattern": "needle", "path": tree(&agent)})).await;
    assert_eq!(
        grep_hits(&agent, &response),
        vec![hit("notes.txt", 1, "a needle here")]
    );
}

#[tokio::test]
async fn grep_limit_truncates_and_errors_use_the_spec_body() {
    let agent = agent_with_tree().await;
    let many: String = (0..50).map(|i| format!("hit {i}\n")).collect();
    agent
        .write_file(&agent.path("tree/many.txt"), many.as_bytes())
        .await;
    let limited = grep(
        &agent,
        json!({"pattern": "hit", "path": tree(&agent), "limit": 10}),
    )
    .await;
    assert_eq!(limited["matches"].as_array().unwrap().len(), 10);
    assert_eq!(limited["truncated"], json!(true));
    let all = grep(&agent, json!({"pattern": "hit", "path": tree(&agent)})).await;
    assert_eq!(
        (all["matches"].as_array().unwrap().len(), &all["truncated"]),
        (50, &json!(false))
    );

    let missing = agent
        .post_json("/grep", json!({"pattern": "x", "path": agent.path("nope")}))
        .await;
    assert_eq!(
        (missing.status, missing.error().0.as_str()),
        (StatusCode::NOT_FOUND, "FileNotFound")
    );
    let relative = agent
        .post_json("/grep", json!({"pattern": "x", "path": "tree"}))
        .await;
    assert_eq!(
        (relative.status, relative.error().0.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidRequest")
    );
    let malformed = agent.send(Method::POST, "/grep", &[], "not json").await;
    assert_eq!(
        (malformed.status, malformed.error().0.as_str()),
        (StatusCode::BAD_REQUEST, "InvalidRequest")
    );
}

#[tokio::test]
async fn search_roots_the_run_user_cannot_list_are_forbidden() {
    // Root in the sandbox is root only inside its user namespace; the run user still has to
    // be refused what the modes refuse it.
    let agent = agent_with_tree().await;
    agent.chmod("755", &agent.dir).await;
    agent.chmod("700", &tree(&agent)).await;
    assert_eq!(agent.stat("%u %g %a", &tree(&agent)).await, "0 0 700");
    agent.set_run_user("65534:65534").await;

    let globbed = agent
        .post_json("/glob", json!({"pattern": "*", "path": tree(&agent)}))
        .await;
    assert_eq!(
        (globbed.status, globbed.error().0.as_str()),
        (StatusCode::FORBIDDEN, "PermissionDenied")
    );
    let grepped = agent
        .post_json("/grep", json!({"pattern": "x", "path": tree(&agent)}))
        .await;
    assert_eq!(
        (grepped.status, grepped.error().0.as_str()),
        (StatusCode::FORBIDDEN, "PermissionDenied")
    );

    // Inside a listable root, files the run user cannot read are skipped, not fatal.
    agent.chmod("755", &tree(&agent)).await;
    agent
        .write_files(&[
            (&agent.path("tree/open.txt"), b"needle\n"),
            (&agent.path("tree/closed.txt"), b"needle\n"),
        ])
        .await;
    agent.chmod("600", &agent.path("tree/closed.txt")).await;
    assert_eq!(
        agent.stat("%u %g %a", &agent.path("tree/closed.txt")).await,
        "0 0 600"
    );
    let partial = grep(&agent, json!({"pattern": "needle", "path": tree(&agent)})).await;
    assert_eq!(
        grep_hits(&agent, &partial),
        vec![hit("open.txt", 1, "needle")]
    );
}
