//! The one JSON object every probe prints, and the findings it is built from.

use serde::{Deserialize, Serialize};

/// What a probe concluded about its escape class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every check that could run found the weakness closed.
    Confined,
    /// At least one check found the weakness open.
    Exposed,
    /// No check could tell either way (e.g. the kernel lacks the ABI under test).
    Inconclusive,
}

/// `{"row": N, "probe": "...", "verdict": "...", "findings": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The row of SECURITY.md §3 this probe checks.
    pub row: u32,
    pub probe: String,
    pub verdict: Verdict,
    /// One line per check, prefixed `exposed:`, `confined:`, `inconclusive:` or `info:`.
    pub findings: Vec<String>,
}

impl Report {
    /// True when any finding line contains `needle` (for tests that check which sub-check
    /// fired, not just the overall verdict).
    pub fn mentions(&self, needle: &str) -> bool {
        self.findings.iter().any(|line| line.contains(needle))
    }

    /// The `exposed:` lines only.
    pub fn exposures(&self) -> Vec<&str> {
        self.findings
            .iter()
            .filter(|line| line.starts_with("exposed:"))
            .map(String::as_str)
            .collect()
    }
}

/// Findings collected by one probe run. The verdict is derived, never set by hand, so a probe
/// cannot report `confined` while one of its checks saw the weakness.
#[derive(Debug, Default)]
pub struct Findings {
    exposed: usize,
    confined: usize,
    lines: Vec<String>,
}

impl Findings {
    pub fn exposed(&mut self, message: impl AsRef<str>) {
        self.exposed += 1;
        self.push("exposed", message.as_ref());
    }

    pub fn confined(&mut self, message: impl AsRef<str>) {
        self.confined += 1;
        self.push("confined", message.as_ref());
    }

    pub fn inconclusive(&mut self, message: impl AsRef<str>) {
        self.push("inconclusive", message.as_ref());
    }

    /// Context that does not bear on the verdict (e.g. the seccomp mode).
    pub fn info(&mut self, message: impl AsRef<str>) {
        self.push("info", message.as_ref());
    }

    fn push(&mut self, kind: &str, message: &str) {
        self.lines.push(format!("{kind}: {message}"));
    }

    /// Exposed if any check saw the weakness; confined if at least one check ran and none
    /// did; inconclusive when nothing could be checked.
    pub fn verdict(&self) -> Verdict {
        if self.exposed > 0 {
            Verdict::Exposed
        } else if self.confined > 0 {
            Verdict::Confined
        } else {
            Verdict::Inconclusive
        }
    }

    pub fn into_report(self, row: u32, probe: &str) -> Report {
        Report {
            row,
            probe: probe.to_string(),
            verdict: self.verdict(),
            findings: self.lines,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_exposure_outweighs_any_number_of_confined_checks() {
        let mut findings = Findings::default();
        findings.confined("a");
        findings.confined("b");
        findings.exposed("c");
        assert_eq!(findings.verdict(), Verdict::Exposed);
    }

    #[test]
    fn inconclusive_checks_alone_give_inconclusive() {
        let mut findings = Findings::default();
        findings.inconclusive("x32 compiled out");
        findings.info("seccomp mode 2");
        assert_eq!(findings.verdict(), Verdict::Inconclusive);
        findings.confined("i386 killed");
        assert_eq!(findings.verdict(), Verdict::Confined);
    }

    #[test]
    fn report_serializes_to_the_documented_shape() {
        let mut findings = Findings::default();
        findings.exposed("io_uring_setup returned an fd");
        let report = findings.into_report(14, "io-uring");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "row": 14,
                "probe": "io-uring",
                "verdict": "exposed",
                "findings": ["exposed: io_uring_setup returned an fd"],
            })
        );
        assert!(report.mentions("io_uring_setup"));
        assert_eq!(report.exposures().len(), 1);
    }
}
