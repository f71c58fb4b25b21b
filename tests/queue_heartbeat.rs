//! The heartbeat runs on its own thread: a job that blocks the worker's only runtime thread (a
//! CPU-bound handler) cannot starve it, and pings carry the in-flight job ids.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{fast_settings, runpod_env, start_platform, EchoRunner, API_KEY, POD_ID};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wick::harness::{Faults, JobStatus, Route};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_carry_job_ids_while_a_blocking_job_holds_the_worker_runtime() {
    let running = start_platform(Faults::default()).await;
    let env = runpod_env(&running);
    let shutdown = CancellationToken::new();
    let worker_shutdown = shutdown.clone();
    // The worker gets a single-threaded runtime of its own, which the job below blocks entirely.
    let worker = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(wick::queue::run_worker(
            &env,
            Arc::new(EchoRunner::default()),
            fast_settings(),
            worker_shutdown,
        ))
    });
    let id = running
        .platform
        .submit(json!({"block_ms": 1500, "chunks": 1}));
    let job = running
        .platform
        .wait_terminal(&id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);

    let taken = job.taken_at.unwrap();
    let finished = job.finished_at.unwrap();
    let pings = running.platform.requests_to(Route::Ping);
    // The platform records the hand-out before the worker has read it: a ping in that gap
    // rightly has no id yet. From the first ping that names the job until the job is done, every
    // ping must name it.
    let first_named = pings
        .iter()
        .find(|p| p.at > taken && p.query_param("job_id") == Some(id.as_str()))
        .expect("a ping names the running job")
        .at;
    let during: Vec<_> = pings
        .iter()
        .filter(|p| p.at >= first_named && p.at < finished)
        .collect();
    // 100 ms interval over a 1.5 s block: well over three pings even on a loaded machine.
    assert!(
        during.len() >= 3,
        "only {} pings during the blocking job",
        during.len()
    );
    for ping in &during {
        assert_eq!(
            ping.query_param("job_id"),
            Some(id.as_str()),
            "{}",
            ping.query
        );
        assert_eq!(ping.query_param("runpod_version"), Some("1.12.0"));
        assert_eq!(ping.path, format!("/v2/wick-harness/ping/{POD_ID}"));
        assert_eq!(ping.headers["authorization"], API_KEY);
    }
    // Once the job is done, pings carry no job id.
    let idle_ping = running
        .platform
        .wait_request(Duration::from_secs(5), |r| {
            r.route == Route::Ping && r.at > finished && r.query_param("job_id").is_none()
        })
        .await;
    assert!(idle_ping);

    shutdown.cancel();
    let report = tokio::task::spawn_blocking(move || worker.join().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.completed, 1);
    running.stop().await;
}
