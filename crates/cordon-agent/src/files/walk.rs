//! What glob and grep share: the search root check, the budget that bounds a walk, and glob
//! pattern compilation.

use std::fs::Metadata;
use std::path::Path;
use std::time::{Duration, Instant};

use globset::{GlobBuilder, GlobMatcher};

use super::error::{Access, FileError};

/// Results returned when the client gives no limit, and the most it may ask for.
pub const DEFAULT_RESULT_LIMIT: u64 = 10_000;
pub const MAX_RESULT_LIMIT: u64 = 10_000;
/// Wall-clock time one glob or grep may spend walking.
pub const WALK_DEADLINE: Duration = Duration::from_secs(10);
/// Directory entries one glob or grep may visit.
pub const MAX_WALKED_ENTRIES: u64 = 1_000_000;
/// Longest glob pattern accepted (globset compiles it into an automaton).
const MAX_PATTERN_BYTES: usize = 4096;

/// The client's limit, clamped to what the server is willing to return.
pub fn result_limit(requested: Option<u64>) -> usize {
    requested
        .unwrap_or(DEFAULT_RESULT_LIMIT)
        .min(MAX_RESULT_LIMIT) as usize
}

/// Bounds a walk in time and entries. Running out means the answer is `truncated`.
pub struct Budget {
    deadline: Instant,
    entries_left: u64,
}

impl Budget {
    pub fn new() -> Budget {
        Budget {
            deadline: Instant::now() + WALK_DEADLINE,
            entries_left: MAX_WALKED_ENTRIES,
        }
    }

    #[cfg(test)]
    pub fn with_entries(entries_left: u64) -> Budget {
        Budget {
            entries_left,
            ..Budget::new()
        }
    }

    /// Accounts for one more visited entry; false once time or entries have run out.
    pub fn spend_one(&mut self) -> bool {
        if self.entries_left == 0 || Instant::now() >= self.deadline {
            return false;
        }
        self.entries_left -= 1;
        true
    }
}

/// Stats the root of a search (following a symlink, as `find -L`/`grep -r` do for roots).
pub fn root_metadata(root: &Path, client_path: &str) -> Result<Metadata, FileError> {
    std::fs::metadata(root).map_err(|error| FileError::from_io(client_path, Access::Read, error))
}

/// A root the run user cannot list is a 403, not an empty answer (unreadable directories
/// further down are skipped instead, as `find` and `grep -r` do).
pub fn ensure_listable(root: &Path, client_path: &str) -> Result<(), FileError> {
    std::fs::read_dir(root)
        .map(drop)
        .map_err(|error| FileError::from_io(client_path, Access::Read, error))
}

/// Compiles a glob where `*`, `?` and `[...]` stay within one path segment and `**` spans
/// any number of them.
pub fn compile_glob(pattern: &str) -> Result<GlobMatcher, FileError> {
    if pattern.is_empty() {
        return Err(FileError::InvalidRequest(
            "glob pattern must not be empty".into(),
        ));
    }
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(FileError::InvalidRequest(format!(
            "glob pattern is longer than {MAX_PATTERN_BYTES} bytes"
        )));
    }
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|glob| glob.compile_matcher())
        .map_err(|error| FileError::InvalidRequest(format!("invalid glob pattern: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_segments() {
        let py = compile_glob("**/*.py").unwrap();
        assert!(py.is_match("a.py") && py.is_match("x/y/a.py") && !py.is_match("a.pyc"));
        let star = compile_glob("*").unwrap();
        assert!(star.is_match("a") && star.is_match(".hidden") && !star.is_match("a/b"));
        let class = compile_glob("[ab]?.txt").unwrap();
        assert!(class.is_match("a1.txt") && class.is_match("bz.txt") && !class.is_match("c1.txt"));
        assert!(compile_glob("a[").is_err());
        assert!(compile_glob("").is_err());
    }

    #[test]
    fn budget_runs_out() {
        let mut budget = Budget::with_entries(2);
        assert!(budget.spend_one() && budget.spend_one());
        assert!(!budget.spend_one());
    }

    #[test]
    fn limits_are_clamped() {
        assert_eq!(result_limit(None), DEFAULT_RESULT_LIMIT as usize);
        assert_eq!(result_limit(Some(5)), 5);
        assert_eq!(result_limit(Some(u64::MAX)), MAX_RESULT_LIMIT as usize);
    }
}
