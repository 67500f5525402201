//! `POST /glob` (spec §3.5.3): entries under an absolute directory whose path relative to it
//! matches a glob. `*` alone lists the directory (`ls`).

use std::path::Path;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cordon_api::files::{GlobMatch, GlobRequest, GlobResponse};
use globset::GlobMatcher;
use walkdir::{DirEntry, WalkDir};

use super::error::{Access, FileError};
use super::timestamp::rfc3339;
use super::walk::{compile_glob, ensure_listable, result_limit, root_metadata, Budget};
use super::{absolute_root, as_run_user, json_body};
use crate::AppState;

pub async fn glob(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match run_glob(&state, body).await {
        Ok(response) => Json(response).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn run_glob(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<GlobResponse, FileError> {
    let request: GlobRequest = json_body(body)?;
    let root = absolute_root(&request.path)?;
    let pattern = relative_pattern(&request.pattern, &root)?;
    let matcher = compile_glob(&pattern)?;
    let search = GlobSearch {
        max_depth: max_depth(&pattern),
        matcher,
        limit: result_limit(request.limit),
    };
    as_run_user(state, move |_identity| {
        let metadata = root_metadata(&root, &request.path)?;
        if !metadata.is_dir() {
            return Err(FileError::NotADirectory {
                path: request.path,
                access: Access::Read,
            });
        }
        ensure_listable(&root, &request.path)?;
        Ok(search.run(&root, &mut Budget::new()))
    })
    .await
}

/// The pattern as matched against relative paths: `./x` is `x`, and an absolute pattern under
/// the root is made relative to it.
fn relative_pattern(pattern: &str, root: &Path) -> Result<String, FileError> {
    let mut pattern = pattern;
    while let Some(rest) = pattern.strip_prefix("./") {
        pattern = rest;
    }
    if pattern.starts_with('/') {
        let root_prefix = format!("{}/", root.to_string_lossy().trim_end_matches('/'));
        return pattern
            .strip_prefix(&root_prefix)
            .map(str::to_string)
            .ok_or_else(|| {
                FileError::InvalidRequest(format!("pattern {pattern:?} must be relative to path"))
            });
    }
    Ok(pattern.to_string())
}

/// Without `**` a pattern cannot match deeper than its number of segments, so the walk stops
/// there (`*` reads just one directory).
fn max_depth(pattern: &str) -> Option<usize> {
    (!pattern.contains("**")).then(|| pattern.split('/').count())
}

struct GlobSearch {
    matcher: GlobMatcher,
    max_depth: Option<usize>,
    limit: usize,
}

impl GlobSearch {
    /// Walks without following symlinks (no loops); the root itself is followed.
    fn run(&self, root: &Path, budget: &mut Budget) -> GlobResponse {
        let mut walk = WalkDir::new(root).follow_links(false).min_depth(1);
        if let Some(depth) = self.max_depth {
            walk = walk.max_depth(depth);
        }
        let mut matches = Vec::new();
        let mut truncated = false;
        // Unreadable directories are skipped, as `find` does (it reports, then goes on).
        for entry in walk.into_iter().filter_map(Result::ok) {
            if !budget.spend_one() {
                truncated = true;
                break;
            }
            let Ok(relative) = entry.path().strip_prefix(root) else {
                continue;
            };
            if !self.matcher.is_match(relative) {
                continue;
            }
            if matches.len() == self.limit {
                truncated = true;
                break;
            }
            matches.push(describe(&entry));
        }
        matches.sort_by(|a: &GlobMatch, b| a.path.cmp(&b.path));
        GlobResponse { matches, truncated }
    }
}

/// A match as the client sees it. A symlink is described by what it points to when it can be
/// (like `os.scandir().is_dir()` and `find -L`), else by the link itself.
fn describe(entry: &DirEntry) -> GlobMatch {
    let metadata =
        std::fs::metadata(entry.path()).or_else(|_| entry.metadata().map_err(std::io::Error::from));
    let (is_dir, size_bytes, modified) = match metadata {
        Ok(metadata) => (metadata.is_dir(), metadata.len(), metadata.modified().ok()),
        Err(_) => (false, 0, None),
    };
    GlobMatch {
        path: display_path(entry.path()),
        is_dir,
        size_bytes,
        modified_at: rfc3339(modified.unwrap_or(std::time::UNIX_EPOCH)),
    }
}

pub(super) fn display_path(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for dir in ["src/pkg", "docs"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        for file in [
            "a.py",
            "b.py",
            "c.txt",
            "src/main.py",
            "src/pkg/mod.py",
            "docs/x.md",
        ] {
            std::fs::write(root.path().join(file), "x").unwrap();
        }
        root
    }

    fn names(root: &Path, pattern: &str, limit: usize) -> (Vec<String>, bool) {
        let search = GlobSearch {
            matcher: compile_glob(pattern).unwrap(),
            max_depth: max_depth(pattern),
            limit,
        };
        let response = search.run(root, &mut Budget::new());
        let prefix = format!("{}/", root.display());
        let names = response
            .matches
            .iter()
            .map(|m| m.path.strip_prefix(&prefix).unwrap().to_string())
            .collect();
        (names, response.truncated)
    }

    #[test]
    fn star_lists_immediate_entries_including_directories() {
        let root = tree();
        assert_eq!(
            names(root.path(), "*", 100),
            (
                vec!["a.py", "b.py", "c.txt", "docs", "src"]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                false
            )
        );
    }

    #[test]
    fn double_star_reaches_every_depth() {
        let root = tree();
        let (found, _) = names(root.path(), "**/*.py", 100);
        assert_eq!(found, vec!["a.py", "b.py", "src/main.py", "src/pkg/mod.py"]);
    }

    #[test]
    fn limit_truncates() {
        let root = tree();
        let (found, truncated) = names(root.path(), "**", 2);
        assert_eq!(found.len(), 2);
        assert!(truncated);
    }

    #[test]
    fn exhausted_budget_truncates() {
        let root = tree();
        let search = GlobSearch {
            matcher: compile_glob("**").unwrap(),
            max_depth: None,
            limit: 100,
        };
        let response = search.run(root.path(), &mut Budget::with_entries(3));
        assert_eq!(response.matches.len(), 3);
        assert!(response.truncated);
    }

    #[test]
    fn pattern_normalisation() {
        let root = Path::new("/work");
        assert_eq!(relative_pattern("./*.py", root).unwrap(), "*.py");
        assert_eq!(
            relative_pattern("/work/src/*.py", root).unwrap(),
            "src/*.py"
        );
        assert!(relative_pattern("/etc/*", root).is_err());
        assert_eq!(max_depth("*"), Some(1));
        assert_eq!(max_depth("a/*/c"), Some(3));
        assert_eq!(max_depth("a/**"), None);
    }
}
