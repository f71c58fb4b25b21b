//! `wick-harness` end to end: it starts the real `wick` binary on the tiny-llama fixture against its
//! loopback platform, runs every payload in `handler-tests/`, and a load run under injected faults
//! loses nothing.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn harness(args: &[&str]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Command::new(env!("CARGO_BIN_EXE_wick-harness"))
        .args(args)
        .args(["--wick", env!("CARGO_BIN_EXE_wick")])
        .current_dir(&root)
        .env("MODEL_NAME", root.join("tests/fixtures/tiny-llama"))
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .env("WARMUP", "false")
        .output()
        .unwrap()
}

/// The JSON report: the last stdout line.
fn report(output: &Output) -> Value {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn every_handler_test_passes_through_the_queue() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let output = harness(&[
        "run-tests",
        "--dir",
        "handler-tests",
        "--json",
        "--grace-secs",
        "5",
        "--poll-hold-ms",
        "500",
        "--worker-log",
        log.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = report(&output);
    let cases = report["cases"].as_array().unwrap();
    let files = std::fs::read_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("handler-tests"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count();
    assert_eq!(cases.len(), files);
    assert!(cases.iter().all(|c| c["passed"] == true), "{stdout}");
    assert_eq!(report["jobs"]["lost"], 0);
    assert_eq!(report["worker_exit"], 0);
}

#[test]
fn load_under_faults_loses_no_job() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let output = harness(&[
        "load",
        "--jobs",
        "24",
        "--concurrency",
        "6",
        "--input",
        r#"{"prompt": "Hello", "stream": true, "sampling_params": {"max_tokens": 12, "ignore_eos": true}}"#,
        "--fail-done-pct",
        "20",
        "--drop-done-pct",
        "10",
        "--fail-stream-pct",
        "30",
        "--duplicate-pct",
        "10",
        "--seed",
        "42",
        "--poll-hold-ms",
        "500",
        "--json",
        "--worker-log",
        log.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = report(&output);
    assert_eq!(report["jobs"]["sent"], 24);
    assert_eq!(report["jobs"]["completed"], 24, "{stdout}");
    assert_eq!(report["jobs"]["lost"], 0);
    assert_eq!(report["platform"]["conflicting_results"], 0);
    assert_eq!(report["worker_exit"], 0);
}
