//! Handler test cases (`handler-tests/*.json`): one job input and what its result must show.
//! Format (see `handler-tests/README.md`):
//! `{"description": "...", "input": {...}, "expect": {"status": "COMPLETED"|"FAILED",
//! "error_type"?: "...", "output_contains"?: ["..."]}}`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use super::platform::{JobRecord, JobStatus};

/// Largest case file read.
const MAX_CASE_BYTES: u64 = 1024 * 1024;

/// A case file that cannot be used.
#[derive(Debug, Error)]
pub enum CaseError {
    /// The directory or a file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file is not a valid case.
    #[error("{path}: {reason}")]
    Invalid {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The final status a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ExpectedStatus {
    /// The job completes with an output.
    Completed,
    /// The job fails with an error.
    Failed,
}

/// What a case's result must show.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// Final status.
    pub status: ExpectedStatus,
    /// `error_type` inside the error report (failed jobs).
    #[serde(default)]
    pub error_type: Option<String>,
    /// Strings that must occur in the compact JSON text of the output (completed jobs) or in the
    /// error string (failed jobs).
    #[serde(default)]
    pub output_contains: Vec<String>,
}

/// One handler test case.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerCase {
    /// What feature it exercises.
    pub description: String,
    /// The job's `input`.
    pub input: Value,
    /// What the result must show.
    pub expect: Expectation,
}

/// A case with its file name.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedCase {
    /// File stem (e.g. `prompt_basic`).
    pub name: String,
    /// The case.
    pub case: HandlerCase,
}

/// Loads every `*.json` case in `dir`, sorted by name.
///
/// # Errors
/// [`CaseError`] for an unreadable directory or an invalid file.
pub fn load_cases(dir: &Path) -> Result<Vec<NamedCase>, CaseError> {
    let read_error = |source| CaseError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_error)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    paths.iter().map(|path| load_case(path)).collect()
}

fn load_case(path: &Path) -> Result<NamedCase, CaseError> {
    let read_error = |source| CaseError::Read {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::metadata(path).map_err(read_error)?.len() > MAX_CASE_BYTES {
        return Err(CaseError::Invalid {
            path: path.to_path_buf(),
            reason: "larger than 1 MiB".into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| CaseError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let case: HandlerCase = serde_json::from_str(&text).map_err(|e| CaseError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(NamedCase { name, case })
}

/// The `error_type` inside a job's error string (a JSON report), if any.
pub fn error_type_of(error: &str) -> Option<String> {
    serde_json::from_str::<Value>(error)
        .ok()?
        .get("error_type")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Checks one job's final record against a case; returns what is wrong (empty: pass).
/// With `stream_must_match`, a completed job whose output is a list must have streamed exactly
/// that list (the aggregate equals the chunks).
pub fn check(case: &HandlerCase, job: Option<&JobRecord>, stream_must_match: bool) -> Vec<String> {
    let Some(job) = job.filter(|j| j.status.is_terminal()) else {
        return vec!["no result: the job never reached a final state (lost)".into()];
    };
    let mut problems = Vec::new();
    let expected = match case.expect.status {
        ExpectedStatus::Completed => JobStatus::Completed,
        ExpectedStatus::Failed => JobStatus::Failed,
    };
    if job.status != expected {
        problems.push(format!(
            "status {:?}, expected {:?} (error: {})",
            job.status,
            expected,
            job.error
                .as_deref()
                .map(|e| truncate(e, 300))
                .unwrap_or_default()
        ));
    }
    if let Some(expected_type) = &case.expect.error_type {
        let actual = job.error.as_deref().and_then(error_type_of);
        if actual.as_deref() != Some(expected_type.as_str()) {
            problems.push(format!("error_type {actual:?}, expected {expected_type:?}"));
        }
    }
    let haystack = match job.status {
        JobStatus::Failed => job.error.clone().unwrap_or_default(),
        _ => job
            .output
            .as_ref()
            .map(Value::to_string)
            .unwrap_or_default(),
    };
    for needle in &case.expect.output_contains {
        if !haystack.contains(needle.as_str()) {
            problems.push(format!(
                "result does not contain {needle:?}: {}",
                truncate(&haystack, 300)
            ));
        }
    }
    if stream_must_match && job.status == JobStatus::Completed {
        if let Some(Value::Array(aggregate)) = &job.output {
            if !job.stream.is_empty() && job.stream != *aggregate {
                problems.push(format!(
                    "streamed chunks ({}) differ from the aggregated output ({})",
                    job.stream.len(),
                    aggregate.len()
                ));
            }
        }
    }
    if job.final_is_stream == Some(false) {
        problems
            .push("final job-done post had isStream=false (expected true after streaming)".into());
    }
    problems
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
