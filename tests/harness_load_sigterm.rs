//! `wick-harness load` with a SIGTERM during the run (F8 in docs/ROBUSTNESS.md): clients that
//! finished before the SIGTERM must not be awaited a second time (that panicked with
//! "JoinHandle polled after completion"). Real `wick` binary against the harness platform on loopback.
#![allow(clippy::unwrap_used)]

mod worker_support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use wick::harness::{run_load, LoadOptions, PlatformConfig, SessionOptions, SigtermPlan};
use worker_support::tiny_llama_worker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_sigterm_after_some_clients_finished_reports_instead_of_panicking() {
    let options = SessionOptions {
        platform: PlatformConfig {
            poll_hold: Duration::from_millis(500),
            ..PlatformConfig::default()
        },
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        worker: Some(tiny_llama_worker(&[], None, 200, 1)),
        startup_timeout: Duration::from_secs(60),
    };
    // One job, four clients: three clients find no job left and finish at once; the one job is far
    // too long for the SIGTERM to come after it.
    let load = LoadOptions {
        jobs: 1,
        concurrency: 4,
        input: json!({"prompt": "Hello", "sampling_params": {"n": 16, "max_tokens": 2000, "ignore_eos": true}}),
        job_timeout: Duration::from_secs(60),
        sigterm: Some(SigtermPlan::After(Duration::from_millis(300))),
    };
    let report = run_load(&options, &load).await.unwrap();
    assert_eq!(report.jobs.sent, 1, "{report:?}");
    assert_eq!(report.jobs.lost, 0, "{report:?}");
}
