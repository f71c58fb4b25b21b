//! The taken-job journal (fault Q6) against the harness's fake platform over loopback: a worker
//! SIGKILLed mid-generation (the real `wick` binary on the tiny fixture model) leaves its jobs to the
//! next worker on the same spool directory, which runs the non-streaming one again and reports the
//! streaming one; with the in-process worker and the echo runner, entries a dead worker left are
//! resolved once (never twice), too-old / streamed / twice-killed jobs are reported, corrupt files
//! never stop startup, a job cancelled meanwhile stays cancelled, and a live worker's entries are
//! never touched by another worker sharing the directory.
#![allow(clippy::unwrap_used)]

mod common;
mod worker_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{fast_settings, runpod_env, start_platform, EchoRunner};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wick::harness::{
    Faults, JobStatus, Platform, PlatformConfig, Route, RunningPlatform, WorkerLaunch,
    WorkerProcess,
};
use wick::queue::journal::{self, Journal, JournalSettings};
use wick::queue::spool::{self, SpoolSettings};
use wick::queue::{WorkerReport, WorkerSettings};
use worker_support::tiny_llama_worker;

/// An in-process worker on `dir` against a platform that outlives it.
struct Worker {
    runner: Arc<EchoRunner>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<WorkerReport>,
}

fn start_worker(platform: &RunningPlatform, dir: &Path) -> Worker {
    let settings = WorkerSettings {
        spool: Some(SpoolSettings::in_dir(dir)),
        ..fast_settings()
    };
    let env = runpod_env(platform);
    let runner = Arc::new(EchoRunner::default());
    let shutdown = CancellationToken::new();
    let (worker_runner, worker_shutdown) = (runner.clone(), shutdown.clone());
    let task = tokio::spawn(async move {
        wick::queue::run_worker(&env, worker_runner, settings, worker_shutdown)
            .await
            .unwrap()
    });
    Worker {
        runner,
        shutdown,
        task,
    }
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

fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// One job a "dead worker" left in the journal.
struct Left {
    id: &'static str,
    input: Value,
    streamed: bool,
    age: Duration,
    runs: u32,
}

/// Writes the entries as a worker of `platform`'s endpoint would, then lets that worker "die"
/// (its owner lock is released, exactly what the kernel does for a killed process). The platform
/// records each job as handed out.
fn dead_worker_left(dir: &Path, platform: &RunningPlatform, left: &[Left]) {
    let done = runpod_env(platform).post_output_url.unwrap();
    let endpoint = spool::endpoint_digest(&done);
    let journal = Journal::open(dir, JournalSettings::default()).unwrap();
    for job in left {
        platform.platform.expect_job(job.id);
        let mut entry = journal.entry_for(job.id, &endpoint, job.input.clone());
        entry.taken_at_ms -= job.age.as_millis() as u64;
        entry.runs = job.runs;
        journal.record(&entry).unwrap();
        if job.streamed {
            journal.mark_streamed(job.id).unwrap();
        }
    }
    drop(journal);
}

fn error_of(platform: &Platform, id: &str) -> Value {
    let job = platform.job(id).unwrap();
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    serde_json::from_str(job.error.as_deref().unwrap()).unwrap()
}

#[tokio::test]
async fn a_killed_workers_jobs_are_run_again_or_reported_once_and_corrupt_files_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let platform = start_platform(Faults::default()).await;
    let input = json!({"chunks": 2, "text": "again"});
    dead_worker_left(
        &dir,
        &platform,
        &[
            Left {
                id: "fresh",
                input: input.clone(),
                streamed: false,
                age: Duration::from_secs(2),
                runs: 1,
            },
            Left {
                id: "streamed",
                input: input.clone(),
                streamed: true,
                age: Duration::from_secs(2),
                runs: 1,
            },
            Left {
                id: "old",
                input: input.clone(),
                streamed: false,
                age: Duration::from_secs(600),
                runs: 1,
            },
            Left {
                id: "killed-twice",
                input: input.clone(),
                streamed: false,
                age: Duration::from_secs(2),
                runs: journal::MAX_RUNS,
            },
        ],
    );
    // A truncated entry and garbage under an entry name: logged and deleted, never a crash.
    std::fs::write(
        dir.join(format!("{}.taken", "ab".repeat(32))),
        b"{\"version\":1,\"jo",
    )
    .unwrap();
    std::fs::write(dir.join(format!("{}.taken", "cd".repeat(32))), [0xff, 0, 7]).unwrap();
    let new = platform.platform.submit(json!({"text": "new"}));

    let worker = start_worker(&platform, &dir);
    for id in ["fresh", "streamed", "old", "killed-twice", new.as_str()] {
        let job = platform
            .platform
            .wait_terminal(id, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(job.status.is_terminal(), "{job:?}");
    }
    let fresh = platform.platform.job("fresh").unwrap();
    assert_eq!(fresh.status, JobStatus::Completed, "{fresh:?}");
    assert_eq!(
        fresh.output,
        Some(json!([{"i":0,"text":"again"},{"i":1,"text":"again"}])),
        "run again from the journaled input"
    );
    assert_eq!(worker.runner.runs_of("fresh"), 1);
    for (id, because) in [
        ("streamed", "already been streamed"),
        ("old", "taken 600 s ago"),
        ("killed-twice", "killed during this job 2 times"),
    ] {
        let error = error_of(&platform.platform, id);
        assert_eq!(error["error_type"], "worker_restarted", "{id}: {error}");
        assert_eq!(error["retryable"], true);
        let message = error["error_message"].as_str().unwrap();
        assert!(message.contains(because), "{id}: {message}");
        assert_eq!(worker.runner.runs_of(id), 0, "{id} was not run again");
    }
    assert_eq!(
        platform.platform.job(&new).unwrap().status,
        JobStatus::Completed
    );
    let report = worker.stop().await;
    assert_eq!(
        (report.resumed, report.restart_reported),
        (1, 3),
        "{report:?}"
    );
    assert!(files_ending(&dir, ".taken").is_empty());
    assert!(files_ending(&dir, ".streamed").is_empty());
    let done_posts = platform.platform.requests_to(Route::JobDone).len();

    // A second restart on the same directory finds nothing left to resolve: no job twice.
    let again = start_worker(&platform, &dir);
    let report = again.stop().await;
    assert_eq!(
        (report.resumed, report.restart_reported),
        (0, 0),
        "{report:?}"
    );
    assert_eq!(
        platform.platform.requests_to(Route::JobDone).len(),
        done_posts
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing left behind"
    );
    platform.stop().await;
}

#[tokio::test]
async fn a_job_cancelled_while_its_worker_was_dead_stays_cancelled_and_leaves_no_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = start_platform(Faults::default()).await;
    dead_worker_left(
        tmp.path(),
        &platform,
        &[Left {
            id: "cancelled",
            input: json!({"chunks": 20, "delay_ms": 20}),
            streamed: false,
            age: Duration::ZERO,
            runs: 1,
        }],
    );
    platform.platform.cancel("cancelled");
    let worker = start_worker(&platform, tmp.path());
    // Either the job-stop channel stops the run again, or its result is posted and ignored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !files_ending(tmp.path(), ".taken").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "entry never resolved"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = worker.stop().await;
    assert_eq!(report.resumed, 1, "{report:?}");
    let job = platform.platform.job("cancelled").unwrap();
    assert_eq!(job.status, JobStatus::Cancelled, "{job:?}");
    assert!(job.output.is_none());
    platform.stop().await;
}

#[tokio::test]
async fn a_live_workers_entries_are_left_alone_by_another_worker_on_the_same_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let platform = start_platform(Faults::default()).await;
    let first = start_worker(&platform, tmp.path());
    let id = platform
        .platform
        .submit(json!({"chunks": 30, "delay_ms": 30, "text": "slow"}));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while files_ending(tmp.path(), ".taken").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never journaled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = start_worker(&platform, tmp.path());
    let job = platform
        .platform
        .wait_terminal(&id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!(job.done_posts, 1, "one result, from the worker running it");
    let report = second.stop().await;
    assert_eq!(
        (report.resumed, report.restart_reported),
        (0, 0),
        "{report:?}"
    );
    let report = first.stop().await;
    assert_eq!(report.completed, 1, "{report:?}");
    assert!(files_ending(tmp.path(), ".taken").is_empty());
    platform.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_generation_then_a_restart_completes_the_plain_job_and_reports_the_streamed_one(
) {
    let config = PlatformConfig {
        poll_hold: Duration::from_millis(300),
        ..PlatformConfig::default()
    };
    let running = Platform::serve(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let platform = running.platform.clone();
    let tmp = tempfile::tempdir().unwrap();
    let spool_dir = tmp.path().join("spool");
    let launch = tiny_llama_worker(
        &[
            ("WARMUP", "false".into()),
            ("WICK_SPOOL_DIR", spool_dir.display().to_string()),
        ],
        Some(tmp.path().join("first.log")),
        200,
        5,
    );
    // Long enough to be mid-generation at the kill (about 1 ms a token on this model).
    let plain = platform.submit(
        json!({"prompt": "Hello", "sampling_params": {"max_tokens": 1500, "ignore_eos": true}}),
    );
    let streamed = platform.submit(json!({"prompt": "Hello", "stream": true,
        "sampling_params": {"max_tokens": 1500, "ignore_eos": true}}));
    let mut first = WorkerProcess::spawn(&launch, &running.worker_env()).unwrap();
    // Both journaled, and the streaming one has streamed: that is mid-generation.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let journaled = files_ending(&spool_dir, ".taken").len();
        let chunks = platform.job(&streamed).unwrap().stream.len();
        if journaled == 2 && chunks > 0 {
            break;
        }
        let log = std::fs::read_to_string(tmp.path().join("first.log")).unwrap_or_default();
        assert!(
            tokio::time::Instant::now() < deadline && !first.has_exited(),
            "jobs never in flight ({journaled} journaled, {chunks} chunks); worker log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.sigkill().unwrap();
    let killed = first.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert_eq!(killed.code(), None, "killed by a signal");
    assert_eq!(platform.job(&plain).unwrap().status, JobStatus::InProgress);
    assert_eq!(
        platform.job(&streamed).unwrap().status,
        JobStatus::InProgress
    );

    let mut second = WorkerProcess::spawn(
        &WorkerLaunch {
            log: Some(tmp.path().join("second.log")),
            ..launch.clone()
        },
        &running.worker_env(),
    )
    .unwrap();
    let plain_job = platform
        .wait_terminal(&plain, Duration::from_secs(120))
        .await
        .unwrap();
    let streamed_job = platform
        .wait_terminal(&streamed, Duration::from_secs(60))
        .await
        .unwrap();
    let log = std::fs::read_to_string(tmp.path().join("second.log")).unwrap_or_default();
    assert_eq!(
        plain_job.status,
        JobStatus::Completed,
        "{plain_job:?}\n{log}"
    );
    let output = serde_json::to_string(&plain_job.output).unwrap();
    assert!(
        output.contains(r#""output":1500"#),
        "a complete run: {output}"
    );
    assert_eq!(streamed_job.status, JobStatus::Failed, "{streamed_job:?}");
    let error = error_of(&platform, &streamed);
    assert_eq!(error["error_type"], "worker_restarted", "{error}");
    assert!(!log.contains("Hello"), "job input never logged");

    second.sigterm().unwrap();
    let status = second.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    let left: Vec<_> = std::fs::read_dir(&spool_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "journal and locks cleaned up: {left:?}");
    running.stop().await;
}
