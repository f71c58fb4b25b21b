//! Queue-mode startup failures of the real `wick` binary: a model that cannot load, or a bad
//! setting, ends the process with exit 1 before any job is taken, after one unhealthy report on the
//! ping URL.
#![allow(clippy::unwrap_used)]

mod worker_support;

use std::net::SocketAddr;
use std::time::Duration;

use wick::harness::{Platform, PlatformConfig, Route};

#[tokio::test]
async fn model_load_failure_reports_unhealthy_and_takes_no_job() {
    let running = Platform::serve(
        PlatformConfig::default(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .unwrap();
    // A directory without weights: resolution or loading fails.
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("config.json"), "{}").unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .envs(running.worker_env())
        .env("RUNPOD_POD_ID", "w-broken")
        .env("RUNPOD_AI_API_KEY", "k")
        .env("MODEL_NAME", empty.path())
        .env("HF_HUB_OFFLINE", "1")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(!output.stderr.is_empty());
    let requests = running.platform.requests();
    assert!(
        requests.iter().all(|r| r.route == Route::Ping),
        "no job-take before a healthy start"
    );
    let report = requests.first().expect("one unhealthy report");
    assert_eq!(report.path, "/v2/wick-harness/ping/w-broken");
    assert_eq!(report.query_param("status"), Some("unhealthy"));
    assert_eq!(report.query_param("check"), Some("startup"));
    assert!(report.query_param("reason").is_some_and(|r| !r.is_empty()));
    running.stop().await;
}

#[tokio::test]
async fn invalid_configuration_reports_unhealthy_and_exits_one() {
    let running = Platform::serve(
        PlatformConfig::default(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .envs(running.worker_env())
        .env("RUNPOD_POD_ID", "w-bad-config")
        .env("MAX_CONCURRENCY", "0")
        .env("HF_HUB_OFFLINE", "1")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("MAX_CONCURRENCY"));
    let requests = running.platform.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].query_param("status"), Some("unhealthy"));
    running.stop().await;
}

#[tokio::test]
async fn legacy_job_stream_variable_is_honoured_and_the_key_never_logged() {
    let running = Platform::serve(
        PlatformConfig::default(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .unwrap();
    // The SDK's local simulator spells it RUNPOD_WEBHOOK_JOB_STREAM.
    let env: Vec<(String, String)> = running
        .worker_env()
        .into_iter()
        .map(|(k, v)| {
            if k == "RUNPOD_WEBHOOK_POST_STREAM" {
                ("RUNPOD_WEBHOOK_JOB_STREAM".into(), v)
            } else {
                (k, v)
            }
        })
        .collect();
    let log_dir = tempfile::tempdir().unwrap();
    let launch = worker_support::tiny_llama_worker(
        &[
            // A canary key with full debug logs: it must never reach the log.
            ("RUNPOD_AI_API_KEY", "canary-key-7f3a9".into()),
            ("RUST_LOG", "debug".into()),
        ],
        Some(log_dir.path().join("wick.log")),
        1000,
        5,
    );
    let mut worker = wick::harness::WorkerProcess::spawn(&launch, &env).unwrap();
    let id = running.platform.submit(serde_json::json!({
        "prompt": "Hello", "stream": true, "sampling_params": {"max_tokens": 4, "ignore_eos": true}
    }));
    let job = running
        .platform
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.status, wick::harness::JobStatus::Completed);
    assert_eq!(
        job.stream.len(),
        3,
        "chunks of 1 and 3 tokens, then the finish"
    );
    let posted = running.platform.requests_to(Route::JobDone);
    assert_eq!(posted[0].headers["authorization"], "canary-key-7f3a9");
    worker.sigterm().unwrap();
    let status = worker.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(log_dir.path().join("wick.log")).unwrap();
    assert!(log.contains("DEBUG"), "debug logging was on");
    assert!(
        !log.contains("canary-key-7f3a9"),
        "the platform key leaked into the log"
    );
    running.stop().await;
}

/// RunPod template forms leave unused fields empty: an empty setting is its default, not an error.
#[tokio::test]
async fn empty_setting_variables_mean_defaults() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .env("MODEL_NAME", fixture)
        .env("MAX_NUM_SEQS", "")
        .env("MAX_MODEL_LEN", "")
        .env("DTYPE", "")
        .env("HF_HUB_OFFLINE", "1")
        .arg("--test-input")
        .arg(r#"{"input":{"prompt":"hello","sampling_params":{"max_tokens":2}}}"#)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["output"][0]["usage"]["output"], 2);
}

/// A dev server that may not start (public bind, no key) is refused before the model is loaded: the
/// model is a Hub repo that is not cached while offline, so any model work would fail with a different
/// message.
#[tokio::test]
async fn public_bind_without_key_is_refused_before_model_load() {
    let empty_cache = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .env("MODEL_NAME", "wick-test/not-cached")
        .env("HF_HUB_CACHE", empty_cache.path())
        .env_remove("WICK_API_KEY")
        .env("HF_HUB_OFFLINE", "1")
        .args(["--serve-api", "--host", "0.0.0.0", "--port", "0"])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("without an API key"), "stderr: {stderr}");
    assert!(!stderr.contains("model files"), "stderr: {stderr}");
}
