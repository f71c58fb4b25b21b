//! One-shot mode of the real `wick` binary on the tiny-llama fixture: the job-done body as one JSON
//! line on stdout, logs on stderr, exit 0 on success and 1 on error; `test_input.json` in the
//! working directory; clear startup failures.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// Runs `wick` with no RunPod queue configured and a tiny model.
fn wick(args: &[&str], cwd: Option<&std::path::Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wick"));
    command
        .args(args)
        .env("MODEL_NAME", tiny_llama())
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .env("WARMUP", "false")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env_remove("RUNPOD_ENDPOINT_ID");
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    command.output().unwrap()
}

fn stdout_json(output: &Output) -> Value {
    let text = String::from_utf8(output.stdout.clone()).unwrap();
    assert_eq!(
        text.lines().count(),
        1,
        "exactly one line on stdout: {text:?}"
    );
    serde_json::from_str(text.trim_end()).unwrap()
}

#[test]
fn one_shot_prints_the_job_done_body_and_exits_zero() {
    let input = r#"{"input": {"prompt": "Hello", "stream": true, "sampling_params": {"max_tokens": 5, "ignore_eos": true}}}"#;
    let output = wick(&["--test-input", input], None);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let body = stdout_json(&output);
    // Streamed items aggregated into the output list: 1 + 3 + 1 tokens.
    let items = body["output"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[2]["usage"]["output"], 5);
    assert_eq!(items[2]["choices"][0]["finish_reason"], "length");
    assert!(body.get("error").is_none());
    assert!(!output.stderr.is_empty(), "logs go to stderr");
}

#[test]
fn one_shot_failure_prints_the_error_report_and_exits_one() {
    let output = wick(
        &[
            "--test-input",
            r#"{"input": {"prompt": "Hi", "sampling_params": {"n": 99}}}"#,
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(1));
    let body = stdout_json(&output);
    let report: Value = serde_json::from_str(body["error"].as_str().unwrap()).unwrap();
    assert_eq!(report["error_type"], "validation");
    assert!(report["error_message"].as_str().unwrap().contains("`n`"));
    assert_eq!(report["worker_id"], "unknown");
}

#[test]
fn test_input_json_in_the_working_directory_is_used() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("test_input.json"),
        r#"{"input": {"messages": [{"role": "user", "content": "Hi"}], "sampling_params": {"max_tokens": 3}}}"#,
    )
    .unwrap();
    let output = wick(&[], Some(dir.path()));
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout_json(&output)["output"][0]["choices"].is_array());
    // A path given to --test-input works the same.
    let file = dir.path().join("test_input.json");
    let output = wick(&["--test-input", file.to_str().unwrap()], None);
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn startup_failures_exit_nonzero_with_a_message_and_no_stdout() {
    let empty = tempfile::tempdir().unwrap();
    // No queue, no --test-input, no test_input.json.
    let output = wick(&[], Some(empty.path()));
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("test_input.json"));
    // Test input without `input`.
    let output = wick(&["--test-input", r#"{"prompt": "Hi"}"#], None);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("`input`"));
    // A model that does not exist fails before any job runs.
    let output = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["--test-input", r#"{"input": {"prompt": "Hi"}}"#])
        .env("MODEL_NAME", empty.path().join("no-such-model"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .output()
        .unwrap();
    assert_ne!(output.status.code(), Some(0));
    assert!(output.stdout.is_empty());
}
