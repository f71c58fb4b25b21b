//! Harness sessions: start the fake platform, start a real `wick` process against it (or serve an
//! external worker), then run the handler test cases or a load test (with optional SIGTERM) and
//! report jobs sent, completed, failed with reasons, and lost.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::cases::{self, NamedCase};
use super::platform::{JobStatus, Platform, PlatformConfig, PlatformStats, Route, RunningPlatform};
use crate::queue::backoff::Jitter;

/// Worker id the harness gives the worker it starts.
pub const HARNESS_POD_ID: &str = "harness-worker";
/// Platform key the harness gives the worker (a fixed test value, not a secret).
pub const HARNESS_API_KEY: &str = "harness-test-key";

/// How to start the `wick` worker process.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerLaunch {
    /// Path of the `wick` binary.
    pub wick: PathBuf,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Extra environment (e.g. `MODEL_NAME`).
    pub env: Vec<(String, String)>,
    /// Where the worker's stderr goes, appended (inherited when `None`).
    pub log: Option<PathBuf>,
    /// `RUNPOD_PING_INTERVAL` in ms.
    pub ping_interval_ms: u64,
    /// `SHUTDOWN_GRACE_SECS`.
    pub grace_secs: u64,
}

/// A running worker process (killed when dropped).
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    /// Starts `wick` with the platform's RunPod variables.
    ///
    /// # Errors
    /// When the binary cannot be started or the log file cannot be created.
    pub fn spawn(
        launch: &WorkerLaunch,
        platform_env: &[(String, String)],
    ) -> std::io::Result<Self> {
        let mut command = Command::new(&launch.wick);
        command
            .args(&launch.args)
            .envs(platform_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUNPOD_POD_ID", HARNESS_POD_ID)
            .env("RUNPOD_POD_HOSTNAME", "harness-host")
            .env("RUNPOD_AI_API_KEY", HARNESS_API_KEY)
            .env("RUNPOD_PING_INTERVAL", launch.ping_interval_ms.to_string())
            .env("SHUTDOWN_GRACE_SECS", launch.grace_secs.to_string())
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        match &launch.log {
            Some(path) => {
                // Appended: a kill run starts many workers on one log.
                command.stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                );
            }
            None => {
                command.stderr(Stdio::inherit());
            }
        }
        Ok(WorkerProcess {
            child: command.spawn()?,
        })
    }

    /// Sends SIGTERM.
    ///
    /// # Errors
    /// When the process is gone or the signal cannot be sent.
    pub fn sigterm(&self) -> std::io::Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| std::io::Error::other("worker already exited"))?;
        let pid =
            libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped); no memory involved.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Sends SIGKILL (the process gets no chance to clean up: an OOM kill or a node eviction).
    ///
    /// # Errors
    /// When the process is gone or the signal cannot be sent.
    pub fn sigkill(&mut self) -> std::io::Result<()> {
        self.child.start_kill()
    }

    /// Waits for the process to exit; kills it after `timeout`. `None` when it had to be killed.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(error)) => {
                warn!(%error, "waiting for the worker failed");
                None
            }
            Err(_elapsed) => {
                warn!("worker did not exit in time; killing it");
                if let Err(error) = self.child.kill().await {
                    warn!(%error, "killing the worker failed");
                }
                None
            }
        }
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.exit_status().is_some()
    }

    /// The exit status, if the process has exited (without waiting).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// Why a harness session could not run.
#[derive(Debug, Error)]
pub enum HarnessError {
    /// Binding the platform, starting or signalling the worker.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The worker exited before it polled for a job (a startup failure; see its log).
    #[error("the worker exited during startup (exit code {0:?}); see its log")]
    WorkerExited(Option<i32>),
    /// The worker never polled for a job.
    #[error("the worker did not poll for jobs within {0:?}")]
    WorkerNotReady(Duration),
}

/// Jobs sent and how they ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct JobSummary {
    /// Jobs submitted.
    pub sent: usize,
    /// Completed.
    pub completed: usize,
    /// Failed.
    pub failed: usize,
    /// Failures by `error_type`.
    pub failed_reasons: BTreeMap<String, usize>,
    /// Taken by the worker but never given a final result (must be 0).
    pub lost: usize,
    /// Still queued at the end (never taken; another worker would take them).
    pub not_taken: usize,
    /// Cancelled through the API.
    pub cancelled: usize,
}

/// Summarises the platform's jobs.
pub fn summarize(platform: &Platform) -> JobSummary {
    let mut summary = JobSummary::default();
    for job in platform.jobs() {
        summary.sent += 1;
        match job.status {
            JobStatus::Completed => summary.completed += 1,
            JobStatus::Failed => {
                summary.failed += 1;
                let reason = job
                    .error
                    .as_deref()
                    .and_then(cases::error_type_of)
                    .unwrap_or_else(|| "unknown".into());
                *summary.failed_reasons.entry(reason).or_default() += 1;
            }
            JobStatus::Cancelled => summary.cancelled += 1,
            JobStatus::InQueue => summary.not_taken += 1,
            JobStatus::InProgress => summary.lost += 1,
        }
    }
    summary
}

/// Options common to every session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionOptions {
    /// Platform settings (faults included).
    pub platform: PlatformConfig,
    /// Where the platform listens (`127.0.0.1:0` for any free port).
    pub bind: SocketAddr,
    /// The worker to start; `None` serves an external worker.
    pub worker: Option<WorkerLaunch>,
    /// How long the worker may take to start (first job-take).
    pub startup_timeout: Duration,
}

/// A platform plus (maybe) the worker process.
struct Session {
    running: RunningPlatform,
    worker: Option<WorkerProcess>,
    grace: Duration,
}

impl Session {
    async fn start(options: &SessionOptions) -> Result<Session, HarnessError> {
        let running = Platform::serve(options.platform.clone(), options.bind).await?;
        let worker = match &options.worker {
            Some(launch) => Some(WorkerProcess::spawn(launch, &running.worker_env())?),
            None => {
                println!("# serving an external worker; export these and start it:");
                for (key, value) in running.worker_env() {
                    println!("export {key}='{value}'");
                }
                None
            }
        };
        let grace = Duration::from_secs(options.worker.as_ref().map_or(30, |w| w.grace_secs));
        let session = Session {
            running,
            worker,
            grace,
        };
        let mut session = session;
        let deadline = Instant::now() + options.startup_timeout;
        loop {
            let polled = session
                .running
                .platform
                .requests()
                .iter()
                .any(|r| matches!(r.route, Route::JobTake | Route::JobTakeBatch));
            if polled {
                break;
            }
            if let Some(worker) = session.worker.as_mut() {
                if let Some(status) = worker.exit_status() {
                    return Err(HarnessError::WorkerExited(status.code()));
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::WorkerNotReady(options.startup_timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(session)
    }

    /// SIGTERMs the worker (if we started it) and returns its exit code.
    async fn finish(mut self) -> Option<i32> {
        let code = match self.worker.as_mut() {
            Some(worker) => {
                if let Err(error) = worker.sigterm() {
                    warn!(%error, "could not signal the worker");
                }
                worker
                    .wait_exit(self.grace + Duration::from_secs(10))
                    .await
                    .and_then(|s| s.code())
            }
            None => None,
        };
        self.running.stop().await;
        code
    }
}

/// One handler case's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseOutcome {
    /// File stem.
    pub name: String,
    /// The case's description.
    pub description: String,
    /// Whether every check passed.
    pub passed: bool,
    /// What failed.
    pub problems: Vec<String>,
}

/// The result of `run-tests`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunTestsReport {
    /// Per case.
    pub cases: Vec<CaseOutcome>,
    /// Jobs.
    pub jobs: JobSummary,
    /// Platform counters.
    pub platform: PlatformStats,
    /// The worker's exit code after SIGTERM (None: external or killed).
    pub worker_exit: Option<i32>,
}

impl RunTestsReport {
    /// Whether every case passed, nothing was lost, and a started worker exited 0.
    pub fn passed(&self, started_worker: bool) -> bool {
        self.cases.iter().all(|c| c.passed)
            && self.jobs.lost == 0
            && self.platform.conflicting_results == 0
            && (!started_worker || self.worker_exit == Some(0))
    }
}

/// Runs every case against the worker: all submitted at once (so they batch), each checked.
///
/// # Errors
/// When the platform or the worker cannot start.
pub async fn run_tests(
    options: &SessionOptions,
    cases: &[NamedCase],
    timeout: Duration,
) -> Result<RunTestsReport, HarnessError> {
    let session = Session::start(options).await?;
    let platform = session.running.platform.clone();
    let ids: Vec<String> = cases
        .iter()
        .map(|c| platform.submit(c.case.input.clone()))
        .collect();
    let deadline = Instant::now() + timeout;
    let stream_faults = options.platform.faults.fail_stream_pct > 0.0
        || !options.platform.faults.stream_script.is_empty();
    let mut outcomes = Vec::new();
    for (case, id) in cases.iter().zip(&ids) {
        let job = platform
            .wait_terminal(id, deadline.saturating_duration_since(Instant::now()))
            .await;
        let problems = cases::check(&case.case, job.as_ref(), !stream_faults);
        info!(case = %case.name, passed = problems.is_empty(), "case checked");
        outcomes.push(CaseOutcome {
            name: case.name.clone(),
            description: case.case.description.clone(),
            passed: problems.is_empty(),
            problems,
        });
    }
    let jobs = summarize(&platform);
    let stats = platform.stats();
    let worker_exit = session.finish().await;
    Ok(RunTestsReport {
        cases: outcomes,
        jobs,
        platform: stats,
        worker_exit,
    })
}

/// When to SIGTERM the worker during a load run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SigtermPlan {
    /// After this long.
    After(Duration),
    /// At a uniformly random moment up to this long.
    Random(Duration),
}

/// Load test settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Jobs to send.
    pub jobs: usize,
    /// Jobs outstanding at once.
    pub concurrency: usize,
    /// Each job's input.
    pub input: Value,
    /// Longest wait for one job's result.
    pub job_timeout: Duration,
    /// Optional SIGTERM during the run.
    pub sigterm: Option<SigtermPlan>,
}

/// The result of a load run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// Jobs.
    pub jobs: JobSummary,
    /// Wall time from the first submission to the last result.
    pub wall_secs: f64,
    /// Final results per second.
    pub throughput_jobs_per_sec: f64,
    /// Median submission-to-result latency.
    pub latency_p50_ms: u64,
    /// 99th percentile latency.
    pub latency_p99_ms: u64,
    /// Platform counters (duplicates, repeated posts, conflicting results).
    pub platform: PlatformStats,
    /// Longest gap between two heartbeats.
    pub max_ping_gap_ms: Option<u64>,
    /// When SIGTERM was sent (ms after the start), if it was.
    pub sigterm_at_ms: Option<u64>,
    /// Jobs handed out after SIGTERM (must be 0).
    pub taken_after_sigterm: usize,
    /// The worker's exit code (None: external or killed).
    pub worker_exit: Option<i32>,
}

/// Runs `jobs` jobs at `concurrency`, optionally with a SIGTERM, and reports.
///
/// # Errors
/// When the platform or the worker cannot start.
pub async fn run_load(
    options: &SessionOptions,
    load: &LoadOptions,
) -> Result<LoadReport, HarnessError> {
    let mut session = Session::start(options).await?;
    let platform = session.running.platform.clone();
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop_clients = CancellationToken::new();
    // A JoinSet: each client's result is taken exactly once, whether it finished before the
    // SIGTERM or after (awaiting a `JoinHandle` a second time panics).
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..load.concurrency.max(1) {
        let (platform, next, latencies, stop) = (
            platform.clone(),
            next.clone(),
            latencies.clone(),
            stop_clients.clone(),
        );
        let (input, total, job_timeout) = (load.input.clone(), load.jobs, load.job_timeout);
        clients.spawn(async move {
            while !stop.is_cancelled() && next.fetch_add(1, Ordering::Relaxed) < total {
                let sent = Instant::now();
                let id = platform.submit(input.clone());
                let job = tokio::select! {
                    job = platform.wait_terminal(&id, job_timeout) => job,
                    () = stop.cancelled() => None,
                };
                if job.is_some_and(|j| j.status.is_terminal()) {
                    let ms = sent.elapsed().as_millis() as u64;
                    latencies.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                }
            }
        });
    }
    let mut sigterm_at = None;
    if let Some(plan) = load.sigterm {
        let delay = match plan {
            SigtermPlan::After(delay) => delay,
            SigtermPlan::Random(max) => max.mul_f64(Jitter::new().unit()),
        };
        let all_done = async {
            while let Some(joined) = clients.join_next().await {
                if let Err(error) = joined {
                    warn!(%error, "load client task failed");
                }
            }
        };
        if tokio::time::timeout(delay, all_done).await.is_err() {
            if let Some(worker) = session.worker.as_ref() {
                info!(
                    after_ms = delay.as_millis() as u64,
                    "sending SIGTERM to the worker"
                );
                worker.sigterm()?;
                sigterm_at = Some(Instant::now());
            }
            // No new jobs after SIGTERM; wait for the worker to drain and exit.
            stop_clients.cancel();
            if let Some(worker) = session.worker.as_mut() {
                let exited = worker
                    .wait_exit(session.grace + Duration::from_secs(10))
                    .await;
                info!(?exited, "worker exited after SIGTERM");
            }
        }
    }
    while let Some(joined) = clients.join_next().await {
        if let Err(error) = joined {
            warn!(%error, "load client task failed");
        }
    }
    let wall = started.elapsed();
    let mut latencies = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    latencies.sort_unstable();
    let percentile = |p: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let rank = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1]
    };
    let taken_after_sigterm = sigterm_at.map_or(0, |at| {
        platform
            .jobs()
            .iter()
            .filter(|j| j.taken_at.is_some_and(|t| t > at))
            .count()
    });
    let jobs = summarize(&platform);
    let stats = platform.stats();
    let max_ping_gap_ms = platform.max_ping_gap().map(|d| d.as_millis() as u64);
    let worker_exit = session.finish().await;
    let finished = jobs.completed + jobs.failed;
    Ok(LoadReport {
        throughput_jobs_per_sec: if wall.as_secs_f64() > 0.0 {
            finished as f64 / wall.as_secs_f64()
        } else {
            0.0
        },
        wall_secs: wall.as_secs_f64(),
        latency_p50_ms: percentile(0.50),
        latency_p99_ms: percentile(0.99),
        jobs,
        platform: stats,
        max_ping_gap_ms,
        sigterm_at_ms: sigterm_at.map(|at| at.duration_since(started).as_millis() as u64),
        taken_after_sigterm,
        worker_exit,
    })
}
