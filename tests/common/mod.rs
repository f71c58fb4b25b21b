//! Shared helpers for the queue and harness tests: a simple echo [`JobRunner`] (no model), fast
//! worker settings, and a fake platform plus in-process worker on loopback.
// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wick::config::{RunpodEnv, Secret};
use wick::error::JobError;
use wick::harness::{Faults, JobRecord, Platform, PlatformConfig, RunningPlatform};
use wick::queue::backoff::RetryPolicy;
use wick::queue::{JobRunner, JobSpec, StartError, Timeouts, WorkerReport, WorkerSettings};

/// Worker id the tests give the in-process worker.
pub const POD_ID: &str = "w-test";
/// Platform key of the tests (raw `Authorization`).
pub const API_KEY: &str = "test-key-123";

/// A runner without a model. Input fields (all optional):
/// `chunks` (n streamed chunks `{"i": k, "text": text}`), `delay_ms` (before each chunk),
/// `text`, `block_ms` (blocks the runtime thread: a CPU-bound handler), `fail` (a validation error),
/// `output` (returned as is instead of the chunk list).
/// It returns the list of streamed chunks (the aggregate, like worker-vllm).
#[derive(Debug, Default)]
pub struct EchoRunner {
    /// Runs per job id.
    pub runs: Mutex<BTreeMap<String, u32>>,
}

impl EchoRunner {
    pub fn runs_of(&self, id: &str) -> u32 {
        self.runs.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

impl JobRunner for EchoRunner {
    async fn run(
        &self,
        job: JobSpec,
        chunks: mpsc::Sender<Value>,
        cancel: CancellationToken,
    ) -> Result<Value, JobError> {
        *self.runs.lock().unwrap().entry(job.id.clone()).or_default() += 1;
        let input = job.input;
        if let Some(ms) = input.get("block_ms").and_then(Value::as_u64) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if let Some(message) = input.get("fail").and_then(Value::as_str) {
            return Err(JobError::Validation(message.to_owned()));
        }
        if let Some(output) = input.get("output") {
            return Ok(output.clone());
        }
        let n = input.get("chunks").and_then(Value::as_u64).unwrap_or(1);
        let delay =
            Duration::from_millis(input.get("delay_ms").and_then(Value::as_u64).unwrap_or(0));
        let text = input.get("text").cloned().unwrap_or(json!("echo"));
        let mut aggregate = Vec::new();
        for i in 0..n {
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return Err(JobError::Cancelled),
                }
            }
            let chunk = json!({"i": i, "text": text});
            aggregate.push(chunk.clone());
            if chunks.send(chunk).await.is_err() {
                return Err(JobError::Cancelled);
            }
        }
        Ok(Value::Array(aggregate))
    }
}

/// Worker settings with millisecond retries, for tests.
pub fn fast_settings() -> WorkerSettings {
    let quick = |attempts| RetryPolicy {
        max_attempts: attempts,
        base: Duration::from_millis(5),
        cap: Duration::from_millis(20),
        max_elapsed: Duration::from_secs(10),
    };
    WorkerSettings {
        max_concurrency: 4,
        shutdown_grace: Duration::from_secs(5),
        job_timeout: Duration::from_secs(60),
        timeouts: Timeouts {
            poll: Duration::from_secs(10),
            post: Duration::from_secs(5),
            connect: Duration::from_secs(2),
        },
        result_retry: quick(4),
        stream_retry: quick(2),
        poll_retry: RetryPolicy {
            max_attempts: u32::MAX,
            ..quick(0)
        },
        too_many_requests_pause: Duration::from_millis(20),
        empty_poll_min_interval: Duration::from_millis(10),
        take_abort_window: Duration::from_millis(50),
        stop_poll_pause: Duration::from_millis(20),
        max_job_bytes: 1024 * 1024,
        chunk_buffer: 16,
        spool: None,
        health_check_interval: Duration::from_millis(20),
    }
}

/// A platform with a short poll hold and these faults, on a free loopback port.
pub async fn start_platform(faults: Faults) -> RunningPlatform {
    let config = PlatformConfig {
        poll_hold: Duration::from_millis(300),
        faults,
        ..PlatformConfig::default()
    };
    Platform::serve(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

/// The RunPod environment pointing at `platform`, with a 100 ms heartbeat.
pub fn runpod_env(platform: &RunningPlatform) -> RunpodEnv {
    let vars: BTreeMap<String, String> = platform.worker_env().into_iter().collect();
    RunpodEnv {
        get_job_url: vars.get("RUNPOD_WEBHOOK_GET_JOB").cloned(),
        post_output_url: vars.get("RUNPOD_WEBHOOK_POST_OUTPUT").cloned(),
        post_stream_url: vars.get("RUNPOD_WEBHOOK_POST_STREAM").cloned(),
        ping_url: vars.get("RUNPOD_WEBHOOK_PING").cloned(),
        ping_interval_ms: 100,
        api_key: Some(Secret::new(API_KEY)),
        pod_id: Some(POD_ID.into()),
        pod_hostname: Some("test-host".into()),
        endpoint_id: None,
        log_level: None,
    }
}

/// A fake platform and an in-process worker with the echo runner.
pub struct World {
    pub platform: RunningPlatform,
    pub runner: Arc<EchoRunner>,
    pub shutdown: CancellationToken,
    pub worker: tokio::task::JoinHandle<Result<WorkerReport, StartError>>,
}

impl World {
    pub async fn start(settings: WorkerSettings, faults: Faults) -> World {
        World::start_on(start_platform(faults).await, settings)
    }

    /// Starts the worker against an already running platform (jobs may be queued first).
    pub fn start_on(platform: RunningPlatform, settings: WorkerSettings) -> World {
        let runner = Arc::new(EchoRunner::default());
        let shutdown = CancellationToken::new();
        let env = runpod_env(&platform);
        let (worker_runner, worker_shutdown) = (runner.clone(), shutdown.clone());
        let worker = tokio::spawn(async move {
            wick::queue::run_worker(&env, worker_runner, settings, worker_shutdown).await
        });
        World {
            platform,
            runner,
            shutdown,
            worker,
        }
    }

    pub fn platform(&self) -> &Platform {
        &self.platform.platform
    }

    pub async fn finish(&self, id: &str) -> JobRecord {
        let job = self
            .platform()
            .wait_terminal(id, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(job.status.is_terminal(), "job {id} did not finish: {job:?}");
        job
    }

    /// Triggers shutdown and returns the worker's report.
    pub async fn stop(self) -> WorkerReport {
        self.shutdown.cancel();
        let report = tokio::time::timeout(Duration::from_secs(30), self.worker)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        self.platform.stop().await;
        report
    }
}
