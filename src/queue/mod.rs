//! The RunPod worker protocol: job-take (long poll, batch take), job-done, job-stream, the heartbeat
//! and the job-stop channel, plus the local one-shot mode. Spec: `runpod-protocol.md` (runpod-python
//! 1.12.0), with its improvements over the SDK: bounded retries with jitter on every call, results never
//! silently lost, per-job ordering, per-request headers, a heartbeat on its own thread, aborted long
//! polls and a grace-bounded drain on shutdown.
//!
//! Owned here: the wire protocol and the job lifecycle around a [`JobRunner`]. Not here: what a job
//! means (`job` validates the input and shapes the output), generation (`engine`), signals and
//! environment (`bin/wick.rs`, `config`).
//!
//! # Layout
//! - [`urls`]: URL templates and placeholder substitution.
//! - [`wire`]: bodies as they travel (take/stop answers in, done/stream bodies out).
//! - [`client`]: HTTP requests with headers, timeouts, capped reads and retries.
//! - [`backoff`]: retry policies and jitter.
//! - [`table`]: the in-flight job table (duplicates, `job_in_progress`, ping ids, job-stop).
//! - `ping`: the heartbeat thread.
//! - `worker`: the take loop, the job-stop loop and the shutdown drain ([`run_worker`]).
//! - `job_task`: one job's run, stream posts and final delivery.
//! - [`log_limit`]: rate-limited warnings, outside strings cut and escaped for logs.
//! - [`spool`]: final results on disk until acknowledged, replayed at start and shutdown.
//! - [`journal`]: taken jobs on disk until resolved, so a restart after a kill runs or reports them.
//! - [`oneshot`]: `--test-input` / `test_input.json`.

pub mod backoff;
pub mod client;
mod job_task;
pub mod journal;
pub mod log_limit;
pub mod oneshot;
mod ping;
pub mod spool;
pub mod table;
pub mod urls;
pub mod wire;
mod worker;

use std::future::Future;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::JobError;

pub use client::{PostOutcome, QueueError, Timeouts};
pub use ping::report_unhealthy;
pub use spool::SpoolSettings;
pub use wire::WorkerIdentity;
pub use worker::{check_urls, run_worker, StartError, WorkerReport, WorkerSettings};

/// The runpod-python release whose protocol this worker speaks; sent as `runpod_version`.
pub const RUNPOD_SDK_VERSION: &str = "1.12.0";

/// One job as the runner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// The platform's job id (for logs; never interpreted).
    pub id: String,
    /// The job's `input` object, unvalidated.
    pub input: Value,
}

/// What runs a job: the seam between the protocol and the model. The production runner wraps
/// `job::run_job` over the engine; protocol tests use a simple echo runner.
///
/// Contract: send streamed chunks in order on `chunks` (each becomes one job-stream post
/// `{"output": chunk}`), then return the final output, which becomes the job-done body (shaped as
/// in spec §5.2) or an error report. When `cancel` fires, stop soon; the worker also drops the
/// future. Every chunk sender must be dropped when the future completes.
pub trait JobRunner: Send + Sync + 'static {
    /// Runs one job to its final output.
    fn run(
        &self,
        job: JobSpec,
        chunks: mpsc::Sender<Value>,
        cancel: CancellationToken,
    ) -> impl Future<Output = Result<Value, JobError>> + Send;

    /// Whether the runner can still finish jobs; `Err(reason)` when it cannot (a dead or wedged
    /// engine). Polled by the worker's watchdog; must be cheap and never block. The default is
    /// always healthy.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The production runner: a job through `job::run_job` on the shared engine.
impl JobRunner for crate::job::JobContext {
    async fn run(
        &self,
        job: JobSpec,
        chunks: mpsc::Sender<Value>,
        cancel: CancellationToken,
    ) -> Result<Value, JobError> {
        crate::job::run_job(self, job.input, chunks, cancel).await
    }

    fn health(&self) -> Result<(), String> {
        match self.engine.health().reason() {
            None => Ok(()),
            Some(reason) => Err(reason),
        }
    }
}
