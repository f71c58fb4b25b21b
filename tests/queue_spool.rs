//! The result spool (faults Q2, Q5, Q6) against the harness's fake platform over loopback, with the
//! in-process worker and the echo runner: an undelivered result survives the worker and a restarted
//! worker delivers it; acknowledged and 404 results leave no file; corrupt files never stop startup.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{fast_settings, runpod_env, start_platform, EchoRunner};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wick::harness::{Faults, JobStatus, Platform, Route, RunningPlatform};
use wick::queue::spool::{self, Spool, SpoolSettings, SpooledResult};
use wick::queue::{WorkerReport, WorkerSettings};

/// A worker running against a platform that outlives it.
struct Worker {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<WorkerReport>,
}

fn start_worker(platform: &RunningPlatform, spool_dir: &Path) -> Worker {
    let settings = WorkerSettings {
        spool: Some(SpoolSettings::in_dir(spool_dir)),
        ..fast_settings()
    };
    let env = runpod_env(platform);
    let shutdown = CancellationToken::new();
    let worker_shutdown = shutdown.clone();
    let task = tokio::spawn(async move {
        wick::queue::run_worker(
            &env,
            Arc::new(EchoRunner::default()),
            settings,
            worker_shutdown,
        )
        .await
        .unwrap()
    });
    Worker { shutdown, task }
}

impl Worker {
    async fn stop(self) -> WorkerReport {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap()
    }
}

fn spool_files(dir: &Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits (bounded) until the platform has recorded at least `count` job-done posts.
async fn wait_done_posts(platform: &Platform, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while platform.requests_to(Route::JobDone).len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} job-done posts arrived",
            platform.requests_to(Route::JobDone).len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn undelivered_result_stays_spooled_and_a_restarted_worker_delivers_it() {
    let tmp = tempfile::tempdir().unwrap();
    let spool_dir = tmp.path().join("spool");
    // 4 result attempts + 4 fallback attempts (fast_settings: 4 each) + 1 flush at shutdown.
    let platform = start_platform(Faults {
        done_script: vec![500; 9],
        ..Faults::default()
    })
    .await;
    let id = platform
        .platform
        .submit(json!({"chunks": 2, "text": "kept"}));

    let first = start_worker(&platform, &spool_dir);
    wait_done_posts(&platform.platform, 8).await;
    let report = first.stop().await;
    assert_eq!(report.undelivered, 1, "{report:?}");
    assert_eq!(report.replayed, 0, "{report:?}");
    let posts = platform.platform.requests_to(Route::JobDone);
    assert_eq!(posts.len(), 9, "the shutdown flush tried once more");
    assert_eq!(
        platform.platform.job(&id).unwrap().status,
        JobStatus::InProgress
    );

    let files = spool_files(&spool_dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(&spool_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);

    let second = start_worker(&platform, &spool_dir);
    let job = platform
        .platform
        .wait_terminal(&id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(
        job.output,
        Some(json!([{"i":0,"text":"kept"},{"i":1,"text":"kept"}]))
    );
    let report = second.stop().await;
    assert_eq!(report.replayed, 1, "{report:?}");
    assert!(spool_files(&spool_dir).is_empty());
    let posts = platform.platform.requests_to(Route::JobDone);
    let (original, replayed) = (&posts[0], posts.last().unwrap());
    assert_eq!(
        replayed.body, original.body,
        "the replay posts the same body"
    );
    assert_eq!(replayed.path, original.path);
    assert_eq!(replayed.query, "gpu=HARNESS&isStream=true");
    platform.stop().await;
}

#[tokio::test]
async fn acknowledged_result_leaves_no_spool_file() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = start_platform(Faults {
        // One failed attempt first: the result is spooled across a retry, then removed.
        done_script: vec![503],
        ..Faults::default()
    })
    .await;
    let worker = start_worker(&platform, tmp.path());
    let id = platform.platform.submit(json!({"text": "ok"}));
    let job = platform
        .platform
        .wait_terminal(&id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    let report = worker.stop().await;
    assert_eq!(report.completed, 1, "{report:?}");
    assert_eq!(platform.platform.requests_to(Route::JobDone).len(), 2);
    assert!(spool_files(tmp.path()).is_empty());
    platform.stop().await;
}

#[tokio::test]
async fn gone_result_is_not_retried_and_its_file_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    // The platform answers 404 for a job it does not know.
    let platform = start_platform(Faults::default()).await;
    let done_template = runpod_env(&platform).post_output_url.unwrap();
    // A result spooled by an earlier run for a job the platform has forgotten (TTL, cancelled),
    // and one spooled by a worker of another endpoint sharing the directory.
    let spool = Spool::open(SpoolSettings::in_dir(tmp.path())).unwrap();
    spool
        .store(&SpooledResult {
            job_id: "forgotten-job".into(),
            is_stream: true,
            body: json!({"output": "late"}).to_string(),
            endpoint: spool::endpoint_digest(&done_template),
        })
        .unwrap();
    let foreign = spool
        .store(&SpooledResult {
            job_id: "other-endpoint-job".into(),
            is_stream: true,
            body: json!({"output": "theirs"}).to_string(),
            endpoint: spool::endpoint_digest("http://elsewhere/job-done/$ID"),
        })
        .unwrap();

    let worker = start_worker(&platform, tmp.path());
    wait_done_posts(&platform.platform, 1).await;
    let id = platform.platform.submit(json!({"text": "gone"}));
    let job = platform
        .platform
        .wait_terminal(&id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    let report = worker.stop().await;
    let posts = platform.platform.requests_to(Route::JobDone);
    let forgotten: Vec<_> = posts
        .iter()
        .filter(|p| p.path.ends_with("/forgotten-job"))
        .collect();
    assert_eq!(forgotten.len(), 1, "a 404 is never retried");
    assert_eq!(forgotten[0].status, 404);
    assert!(
        !posts
            .iter()
            .any(|p| p.path.ends_with("/other-endpoint-job")),
        "another endpoint's entry is never posted here"
    );
    assert_eq!(report.replayed, 0, "{report:?}");
    assert_eq!(
        spool_files(tmp.path()),
        vec![foreign],
        "only the foreign entry is left"
    );
    platform.stop().await;
}

#[tokio::test]
async fn live_result_answered_404_is_not_retried_and_leaves_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = start_platform(Faults {
        done_script: vec![404],
        ..Faults::default()
    })
    .await;
    let worker = start_worker(&platform, tmp.path());
    let id = platform.platform.submit(json!({"text": "gone"}));
    wait_done_posts(&platform.platform, 1).await;
    let report = worker.stop().await;
    assert_eq!(report.undelivered, 1, "{report:?}");
    let posts = platform.platform.requests_to(Route::JobDone);
    assert_eq!(posts.len(), 1, "no retry and no fallback after a 404");
    assert!(posts[0].path.ends_with(&id));
    assert!(spool_files(tmp.path()).is_empty());
    platform.stop().await;
}

#[tokio::test]
async fn corrupt_spool_file_is_removed_and_jobs_still_run() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolSettings::in_dir(tmp.path())).unwrap();
    let garbled = spool.path_for("some-job");
    std::fs::write(&garbled, b"{\"version\":1,\"job_id\":").unwrap();
    let foreign = spool.path_for("other-job");
    std::fs::write(&foreign, b"\xff\xfe not even utf-8").unwrap();

    let platform = start_platform(Faults::default()).await;
    let worker = start_worker(&platform, tmp.path());
    let id = platform.platform.submit(json!({"text": "after"}));
    let job = platform
        .platform
        .wait_terminal(&id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    let report = worker.stop().await;
    assert_eq!(report.completed, 1, "{report:?}");
    assert!(spool_files(tmp.path()).is_empty());
    let posts: Vec<Value> = platform
        .platform
        .requests_to(Route::JobDone)
        .iter()
        .map(|p| serde_json::from_str(&p.body).unwrap())
        .collect();
    assert_eq!(
        posts.len(),
        1,
        "corrupt entries are never posted: {posts:?}"
    );
    platform.stop().await;
}
