//! `POST /grep` (spec §3.5.4): lines containing a literal string, like `grep -rnF`.
//!
//! Binary files (a NUL in the first 8 KiB), `.git` directories, symlinks met while walking and
//! files over [`MAX_FILE_BYTES`] are skipped, as are files the run user cannot read.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cordon_api::files::{GrepMatch, GrepRequest, GrepResponse};
use globset::GlobMatcher;
use memchr::memmem;
use walkdir::WalkDir;

use super::error::FileError;
use super::glob::display_path;
use super::walk::{compile_glob, ensure_listable, result_limit, root_metadata, Budget};
use super::{absolute_root, as_run_user, json_body};
use crate::AppState;

/// Larger files are not searched: reading them would take too long and too much memory.
const MAX_FILE_BYTES: u64 = 16 << 20;
/// Where a NUL byte marks a file as binary (what GNU grep and ripgrep look at first).
const BINARY_SNIFF_BYTES: usize = 8 * 1024;
/// Longest `text` returned for one line; longer lines are cut.
const MAX_LINE_TEXT_BYTES: usize = 2000;
/// Longest search string accepted.
const MAX_PATTERN_BYTES: usize = 64 * 1024;

pub async fn grep(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match run_grep(&state, body).await {
        Ok(response) => Json(response).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn run_grep(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<GrepResponse, FileError> {
    let request: GrepRequest = json_body(body)?;
    let root = absolute_root(&request.path)?;
    if request.pattern.len() > MAX_PATTERN_BYTES {
        return Err(FileError::InvalidRequest(format!(
            "pattern is longer than {MAX_PATTERN_BYTES} bytes"
        )));
    }
    let filter = request.glob.as_deref().map(FileFilter::new).transpose()?;
    let limit = result_limit(request.limit);
    as_run_user(state, move |_identity| {
        let metadata = root_metadata(&root, &request.path)?;
        if metadata.is_dir() {
            ensure_listable(&root, &request.path)?;
        }
        let mut search = GrepSearch::new(&request.pattern, filter, limit);
        let mut budget = Budget::new();
        if metadata.is_dir() {
            search.walk(&root, &mut budget);
        } else {
            // A file root is searched on its own, like `grep -r PATTERN file`.
            search.search_file(&root, &root);
        }
        Ok(search.finish())
    })
    .await
}

/// The request's `glob`: without `/` or `**` it matches file names at any depth (`grep
/// --include`); otherwise it matches the path relative to the root.
struct FileFilter {
    matcher: GlobMatcher,
    whole_path: bool,
}

impl FileFilter {
    fn new(glob: &str) -> Result<FileFilter, FileError> {
        let whole_path = glob.contains('/') || glob.contains("**");
        let glob = glob.strip_prefix("./").unwrap_or(glob);
        Ok(FileFilter {
            matcher: compile_glob(glob)?,
            whole_path,
        })
    }

    fn accepts(&self, relative: &Path) -> bool {
        if self.whole_path {
            self.matcher.is_match(relative)
        } else {
            relative
                .file_name()
                .is_some_and(|name| self.matcher.is_match(name))
        }
    }
}

struct GrepSearch {
    finder: memmem::Finder<'static>,
    /// A line never contains `\n`, so such a pattern matches nothing.
    can_match: bool,
    filter: Option<FileFilter>,
    limit: usize,
    matches: Vec<GrepMatch>,
    truncated: bool,
    /// Reused between files so searching many files does not reallocate.
    contents: Vec<u8>,
}

impl GrepSearch {
    fn new(pattern: &str, filter: Option<FileFilter>, limit: usize) -> GrepSearch {
        GrepSearch {
            finder: memmem::Finder::new(pattern.as_bytes()).into_owned(),
            can_match: !pattern.contains('\n'),
            filter,
            limit,
            matches: Vec::new(),
            truncated: false,
            contents: Vec::new(),
        }
    }

    fn finish(self) -> GrepResponse {
        GrepResponse {
            matches: self.matches,
            truncated: self.truncated,
        }
    }

    fn done(&self) -> bool {
        self.truncated || !self.can_match
    }

    fn walk(&mut self, root: &Path, budget: &mut Budget) {
        let entries = WalkDir::new(root)
            .follow_links(false)
            .min_depth(1)
            .into_iter()
            .filter_entry(|entry| !(entry.file_type().is_dir() && entry.file_name() == ".git"))
            .filter_map(Result::ok);
        for entry in entries {
            if self.done() {
                return;
            }
            if !budget.spend_one() {
                self.truncated = true;
                return;
            }
            if entry.file_type().is_file() {
                self.search_file(entry.path(), root);
            }
        }
    }

    /// Searches one regular file if the filter takes it; unreadable files are skipped.
    fn search_file(&mut self, path: &Path, root: &Path) {
        if self.done() {
            return;
        }
        if let Some(filter) = &self.filter {
            let relative = path
                .strip_prefix(root)
                .ok()
                .filter(|p| !p.as_os_str().is_empty());
            if !filter.accepts(relative.unwrap_or(path)) {
                return;
            }
        }
        if !self.read_text_file(path) {
            return;
        }
        let display = display_path(path);
        let contents = std::mem::take(&mut self.contents);
        for_each_matching_line(&contents, &self.finder, |line, text| {
            if self.matches.len() == self.limit {
                self.truncated = true;
                return false;
            }
            self.matches.push(GrepMatch {
                path: display.clone(),
                line,
                text: line_text(text),
            });
            true
        });
        self.contents = contents;
    }

    /// Loads `path` into `self.contents`; false if it is too big, unreadable or binary.
    fn read_text_file(&mut self, path: &Path) -> bool {
        // O_NONBLOCK: a FIFO given as the root must not hang the search.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
        let Ok(file) = opened else {
            return false;
        };
        match file.metadata() {
            Ok(metadata) if metadata.is_file() && metadata.len() <= MAX_FILE_BYTES => {}
            _ => return false,
        }
        self.contents.clear();
        // The cap also holds if the file grew after the size check.
        if file
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut self.contents)
            .is_err()
            || self.contents.len() as u64 > MAX_FILE_BYTES
        {
            return false;
        }
        let sniffed = &self.contents[..self.contents.len().min(BINARY_SNIFF_BYTES)];
        memchr::memchr(0, sniffed).is_none()
    }
}

/// Calls `on_match(line_number, line)` (1-based, without the newline) for each line containing
/// the pattern, once per line, until it returns false.
fn for_each_matching_line(
    contents: &[u8],
    finder: &memmem::Finder<'_>,
    mut on_match: impl FnMut(u64, &[u8]) -> bool,
) {
    let mut line_start = 0;
    let mut line_number: u64 = 1;
    while line_start < contents.len() {
        let Some(offset) = finder.find(&contents[line_start..]) else {
            return;
        };
        let found = line_start + offset;
        // Move to the line holding the match, counting the lines skipped over.
        if let Some(last_newline) = memchr::memrchr(b'\n', &contents[line_start..found]) {
            line_number += memchr::memchr_iter(b'\n', &contents[line_start..found]).count() as u64;
            line_start += last_newline + 1;
        }
        let line_end =
            memchr::memchr(b'\n', &contents[found..]).map_or(contents.len(), |i| found + i);
        if !on_match(line_number, &contents[line_start..line_end]) {
            return;
        }
        line_start = line_end + 1;
        line_number += 1;
    }
}

/// The line as text: invalid UTF-8 replaced, cut to [`MAX_LINE_TEXT_BYTES`] on a character
/// boundary.
fn line_text(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX_LINE_TEXT_BYTES + 4)]);
    if text.len() <= MAX_LINE_TEXT_BYTES {
        return text.into_owned();
    }
    let mut cut = MAX_LINE_TEXT_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(contents: &str, pattern: &str) -> Vec<(u64, String)> {
        let finder = memmem::Finder::new(pattern.as_bytes());
        let mut found = Vec::new();
        for_each_matching_line(contents.as_bytes(), &finder, |line, text| {
            found.push((line, String::from_utf8_lossy(text).into_owned()));
            true
        });
        found
    }

    #[test]
    fn matching_lines_are_numbered_from_one_and_reported_once() {
        let text = "alpha\nbeta beta\n\ngamma beta\nlast beta";
        assert_eq!(
            lines(text, "beta"),
            vec![
                (2, "beta beta".into()),
                (4, "gamma beta".into()),
                (5, "last beta".into())
            ]
        );
        assert_eq!(lines(text, "alpha"), vec![(1, "alpha".into())]);
        assert_eq!(lines(text, "zeta"), vec![]);
        assert_eq!(lines("a.*b\naxb\n", "a.*b"), vec![(1, "a.*b".into())]);
    }

    #[test]
    fn empty_pattern_matches_every_line_but_not_past_the_end() {
        assert_eq!(lines("x\ny\n", ""), vec![(1, "x".into()), (2, "y".into())]);
        assert_eq!(lines("x\n\nz", "").len(), 3);
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_LINE_TEXT_BYTES);
        let text = line_text(long.as_bytes());
        assert!(text.len() <= MAX_LINE_TEXT_BYTES && text.chars().all(|c| c == 'é'));
        assert_eq!(line_text(b"ok\xff"), "ok\u{fffd}");
    }

    #[test]
    fn basename_and_path_filters() {
        let basename = FileFilter::new("*.py").unwrap();
        assert!(basename.accepts(Path::new("deep/dir/x.py")));
        assert!(!basename.accepts(Path::new("deep/x.txt")));
        let path = FileFilter::new("src/*.py").unwrap();
        assert!(path.accepts(Path::new("src/x.py")));
        assert!(!path.accepts(Path::new("other/src/x.py")));
        let any_depth = FileFilter::new("**/test_*.py").unwrap();
        assert!(
            any_depth.accepts(Path::new("a/b/test_x.py"))
                && any_depth.accepts(Path::new("test_y.py"))
        );
    }

    #[test]
    fn walk_skips_binary_git_and_stops_at_limit() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(".git")).unwrap();
        std::fs::write(root.path().join(".git/config"), "needle\n").unwrap();
        std::fs::write(root.path().join("bin"), b"needle\0\n").unwrap();
        std::fs::write(root.path().join("text"), "needle\nneedle\nneedle\n").unwrap();
        let mut search = GrepSearch::new("needle", None, 10);
        search.walk(root.path(), &mut Budget::new());
        let response = search.finish();
        assert_eq!(response.matches.len(), 3);
        assert!(response.matches.iter().all(|m| m.path.ends_with("/text")));
        assert!(!response.truncated);

        let mut limited = GrepSearch::new("needle", None, 2);
        limited.walk(root.path(), &mut Budget::new());
        let response = limited.finish();
        assert_eq!((response.matches.len(), response.truncated), (2, true));
    }
}
