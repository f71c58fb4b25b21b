//! SIGTERM drain of the real `wick` binary against the harness platform on loopback: taking stops at
//! once, a job that can finish within the grace period completes, one that cannot is reported
//! failed (`shutting_down`, retryable), and the process exits 0.
#![allow(clippy::unwrap_used)]

mod worker_support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use wick::harness::{JobStatus, Platform, PlatformConfig, Route, WorkerProcess};
use worker_support::tiny_llama_worker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_jobs_reports_the_rest_and_exits_zero() {
    let config = PlatformConfig {
        poll_hold: Duration::from_millis(500),
        ..PlatformConfig::default()
    };
    let running = Platform::serve(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let platform = running.platform.clone();
    let log_dir = tempfile::tempdir().unwrap();
    let log_path = log_dir.path().join("wick.log");
    let launch = tiny_llama_worker(&[], Some(log_path.clone()), 200, 4);
    // A short job (finishes during the drain at the latest) and one far too long for the grace.
    let short = platform.submit(
        json!({"prompt": "Hello", "sampling_params": {"max_tokens": 100, "ignore_eos": true}}),
    );
    let long = platform
        .submit(json!({"prompt": "Hello", "sampling_params": {"n": 16, "max_tokens": 2000, "ignore_eos": true}}));
    let mut worker = WorkerProcess::spawn(&launch, &running.worker_env()).unwrap();
    // Both jobs are in the worker's hands once a heartbeat lists them.
    let (short_id, long_id) = (short.clone(), long.clone());
    let both_running = platform
        .wait_request(Duration::from_secs(60), move |r| {
            r.route == Route::Ping
                && r.query_param("job_id")
                    .is_some_and(|ids| ids.contains(&short_id) && ids.contains(&long_id))
        })
        .await;
    assert!(
        both_running && !worker.has_exited(),
        "worker did not start both jobs"
    );
    worker.sigterm().unwrap();
    // Once the worker says it stopped taking jobs (it is still draining), a new job stays queued.
    let mut stopped_taking = false;
    for _ in 0..3000 {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("no longer taking jobs") {
            stopped_taking = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        stopped_taking,
        "worker never logged that it stopped taking jobs"
    );
    let late = platform.submit(json!({"prompt": "Hello"}));
    let status = worker
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("worker exits on its own");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "worker log:\n{log}");

    assert_eq!(
        platform.job(&short).unwrap().status,
        JobStatus::Completed,
        "worker log:\n{log}"
    );
    let long = platform.job(&long).unwrap();
    assert_eq!(long.status, JobStatus::Failed);
    let report: Value = serde_json::from_str(long.error.as_deref().unwrap()).unwrap();
    assert_eq!(report["error_type"], "shutting_down");
    assert_eq!(report["retryable"], true);
    assert_eq!(report["worker_id"], "harness-worker");
    assert_eq!(platform.job(&late).unwrap().deliveries, 0);
    assert!(platform
        .jobs()
        .iter()
        .all(|j| j.deliveries <= 1 && j.done_posts <= 1));
    running.stop().await;
}
