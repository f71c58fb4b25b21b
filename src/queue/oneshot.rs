//! Local one-shot mode (spec §12.1, improved): `--test-input '<json>'` or `--test-input <file>`, else
//! `./test_input.json`, runs one job without any network and yields exactly the body that would be
//! posted to job-done (streamed chunks are consumed as they come; the runner's final output is the
//! aggregate). The caller prints it as one JSON line and exits 0, or 1 when the body has `error`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wire::{self, WorkerIdentity};
use super::{JobRunner, JobSpec};

/// The file read when no `--test-input` is given and no queue is configured.
pub const TEST_INPUT_FILE: &str = "test_input.json";
/// Job id of a local test job (as the SDK).
pub const LOCAL_TEST_ID: &str = "local_test";
/// Largest test input accepted, in bytes.
pub const MAX_TEST_INPUT_BYTES: u64 = 64 * 1024 * 1024;

/// Why the test input could not be loaded.
#[derive(Debug, Error)]
pub enum TestInputError {
    /// Neither `--test-input` nor `./test_input.json`.
    #[error("test_input.json not found, exiting.")]
    NotFound,
    /// The file could not be read.
    #[error("cannot read test input {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_TEST_INPUT_BYTES`].
    #[error("test input {path} is larger than {MAX_TEST_INPUT_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not JSON.
    #[error("test input is not valid JSON: {0}")]
    Json(String),
    /// A JSON object without `input`.
    #[error("test input must be a JSON object with an `input` field")]
    NoInput,
}

/// Where a one-shot job comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestInputSource {
    /// `--test-input` holding JSON text (it starts with `{` after whitespace).
    Inline(String),
    /// `--test-input` naming a file, or `./test_input.json`.
    File(PathBuf),
}

impl TestInputSource {
    /// From the `--test-input` value: JSON text when it starts with `{`, else a path.
    pub fn from_arg(arg: &str) -> Self {
        if arg.trim_start().starts_with('{') {
            TestInputSource::Inline(arg.to_owned())
        } else {
            TestInputSource::File(PathBuf::from(arg))
        }
    }

    /// `test_input.json` in `dir`, when it exists.
    pub fn default_file(dir: &Path) -> Option<Self> {
        let path = dir.join(TEST_INPUT_FILE);
        path.is_file().then_some(TestInputSource::File(path))
    }

    /// Reads and parses the job: `{"input": ..., "id"?: "..."}`; `id` defaults to `local_test`.
    ///
    /// # Errors
    /// [`TestInputError`] when the file is missing, too large, not JSON, or has no `input`.
    pub fn load(&self) -> Result<JobSpec, TestInputError> {
        let text = match self {
            TestInputSource::Inline(text) => text.clone(),
            TestInputSource::File(path) => {
                let read_error = |source| TestInputError::Read {
                    path: path.clone(),
                    source,
                };
                let size = std::fs::metadata(path).map_err(read_error)?.len();
                if size > MAX_TEST_INPUT_BYTES {
                    return Err(TestInputError::TooLarge { path: path.clone() });
                }
                std::fs::read_to_string(path).map_err(|source| TestInputError::Read {
                    path: path.clone(),
                    source,
                })?
            }
        };
        parse_test_job(&text)
    }
}

/// Parses a test job's JSON text.
///
/// # Errors
/// [`TestInputError::Json`] or [`TestInputError::NoInput`].
pub fn parse_test_job(text: &str) -> Result<JobSpec, TestInputError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| TestInputError::Json(e.to_string()))?;
    let Value::Object(mut fields) = value else {
        return Err(TestInputError::NoInput);
    };
    let input = fields.remove("input").ok_or(TestInputError::NoInput)?;
    let id = match fields.remove("id") {
        Some(Value::String(id)) if !id.is_empty() => id,
        _ => LOCAL_TEST_ID.to_owned(),
    };
    Ok(JobSpec { id, input })
}

/// Runs one job and returns the job-done body it would post (result or error report).
pub async fn run_one<R: JobRunner>(
    runner: &R,
    job: JobSpec,
    identity: &WorkerIdentity,
    cancel: CancellationToken,
) -> Value {
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Value>(64);
    let run = runner.run(job, chunk_tx, cancel);
    // Chunks are drained so the runner never blocks; the final output already aggregates them.
    let drain = async {
        let mut chunks = 0usize;
        while chunk_rx.recv().await.is_some() {
            chunks += 1;
        }
        chunks
    };
    let (result, chunks) = tokio::join!(run, drain);
    tracing::debug!(chunks, "one-shot job finished");
    match result {
        Ok(output) => wire::result_body(output),
        Err(error) => wire::error_body(
            error.error_type(),
            &error.to_string(),
            error.is_retryable(),
            identity,
        ),
    }
}

/// Whether a one-shot body means success (exit 0).
pub fn succeeded(body: &Value) -> bool {
    !wire::is_error_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_json_and_paths_are_told_apart() {
        assert!(matches!(
            TestInputSource::from_arg(" {\"input\":{}}"),
            TestInputSource::Inline(_)
        ));
        assert!(matches!(
            TestInputSource::from_arg("job.json"),
            TestInputSource::File(_)
        ));
    }

    #[test]
    fn test_job_needs_input_and_defaults_id() {
        let job = parse_test_job(r#"{"input": {"prompt": "hi"}}"#).unwrap();
        assert_eq!(job.id, LOCAL_TEST_ID);
        assert_eq!(
            parse_test_job(r#"{"id": "x", "input": 1}"#).unwrap().id,
            "x"
        );
        assert!(matches!(
            parse_test_job(r#"{"prompt": "hi"}"#),
            Err(TestInputError::NoInput)
        ));
        assert!(matches!(
            parse_test_job("nope"),
            Err(TestInputError::Json(_))
        ));
    }

    #[test]
    fn file_source_reads_test_input_json() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TestInputSource::default_file(dir.path()), None);
        std::fs::write(dir.path().join(TEST_INPUT_FILE), r#"{"input": {"a": 1}}"#).unwrap();
        let source = TestInputSource::default_file(dir.path()).unwrap();
        assert_eq!(source.load().unwrap().input, serde_json::json!({"a": 1}));
    }
}
