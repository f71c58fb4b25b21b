//! The queue worker: the take loop (permits from a semaphore of `MAX_CONCURRENCY`, batch take when
//! several slots are free, aborted on shutdown), one task per job (stream chunks in order, then the
//! final post, with a fallback error post when the result cannot be delivered), the job-stop loop,
//! the heartbeat, the grace-bounded drain on shutdown, the result-spool replay, the recovery of jobs
//! a killed predecessor left in the taken-job journal, and the runner watchdog (spec §4, §5, §7,
//! §9; faults Q1-Q8, Q13; checklist S14, S18, S21).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::backoff::{Jitter, RetryPolicy};
use super::client::{PlatformClient, QueueError, Timeouts};
use super::job_task::{journal_remove, report_failure, report_restarted, run_job_task, Start};
use super::journal::{self, Journal, Orphan};
use super::log_limit::{log_safe, LogLimiter};
use super::ping::Heartbeat;
use super::spool::{self, Spool, SpoolSettings};
use super::table::JobTable;
use super::urls::Endpoints;
use super::wire::{TakeBatch, TakenJob, WorkerIdentity};
use super::JobRunner;
use crate::config::{Config, RunpodEnv};
use crate::error::JobError;

/// Largest job-done body we try to post; larger results are replaced by a small error (the
/// platform answers 400 above its 20 MB `/runsync` limit).
pub const MAX_RESULT_BYTES: usize = 20 * 1024 * 1024;
/// Largest job-stream body (the platform's per-chunk limit is 1 MB).
pub const MAX_STREAM_CHUNK_BYTES: usize = 1024 * 1024;

/// Why the worker could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A required variable is missing.
    #[error("`{0}` is not set")]
    Missing(&'static str),
    /// A platform URL template is not an absolute http(s) URL.
    #[error("`{var}` is not a valid URL: {reason}")]
    InvalidUrl {
        /// The environment variable.
        var: &'static str,
        /// Why (the value is not repeated: it may carry secrets).
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] QueueError),
    /// The heartbeat thread could not start.
    #[error("heartbeat thread: {0}")]
    Heartbeat(std::io::Error),
}

/// Tunables of the worker loop; [`WorkerSettings::from_config`] gives production values.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSettings {
    /// Jobs in flight at once (`MAX_CONCURRENCY`).
    pub max_concurrency: usize,
    /// On shutdown, how long in-flight jobs may take before they are reported failed
    /// (`SHUTDOWN_GRACE_SECS`); the worker returns within this.
    pub shutdown_grace: Duration,
    /// Deadline of one job (`REQUEST_TIMEOUT_SECS`); past it the job fails with `timeout`.
    pub job_timeout: Duration,
    /// Request timeouts.
    pub timeouts: Timeouts,
    /// Retries of job-done posts.
    pub result_retry: RetryPolicy,
    /// Retries of job-stream posts.
    pub stream_retry: RetryPolicy,
    /// Waits after failed job-take / job-stop polls.
    pub poll_retry: RetryPolicy,
    /// Least pause after a 429 on job-take / job-stop (SDK: 5 s).
    pub too_many_requests_pause: Duration,
    /// Least time between two job-take polls that returned no job (guards against a platform
    /// that answers 204 at once).
    pub empty_poll_min_interval: Duration,
    /// On shutdown, how long a pending job-take may still deliver an answer already on its way
    /// (jobs in it are run and drained, not dropped) before the poll is aborted.
    pub take_abort_window: Duration,
    /// Pause after an empty job-stop answer (SDK: 1 s).
    pub stop_poll_pause: Duration,
    /// Largest job (input) in bytes; the take body cap is this times the batch size.
    pub max_job_bytes: usize,
    /// Streamed chunks buffered per job between the runner and the poster.
    pub chunk_buffer: usize,
    /// Where final results wait until acknowledged (`None`: no spool).
    pub spool: Option<SpoolSettings>,
    /// How often the watchdog asks the runner whether it is healthy ([`JobRunner::health`]).
    pub health_check_interval: Duration,
}

impl WorkerSettings {
    /// Production settings from the worker configuration.
    pub fn from_config(config: &Config) -> Self {
        WorkerSettings {
            max_concurrency: config.max_concurrency,
            shutdown_grace: Duration::from_secs(config.shutdown_grace_secs),
            job_timeout: Duration::from_secs(config.request_timeout_secs),
            timeouts: Timeouts::default(),
            result_retry: RetryPolicy::RESULT,
            stream_retry: RetryPolicy::STREAM,
            poll_retry: RetryPolicy::POLL,
            too_many_requests_pause: Duration::from_secs(5),
            empty_poll_min_interval: Duration::from_millis(250),
            take_abort_window: Duration::from_millis(100),
            stop_poll_pause: Duration::from_secs(1),
            max_job_bytes: config.max_request_bytes,
            chunk_buffer: 64,
            spool: Some(SpoolSettings::from_config(config)),
            health_check_interval: Duration::from_secs(1),
        }
    }
}

/// What a worker run did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Jobs received from job-take (duplicates included).
    pub taken: u64,
    /// Final results delivered with an output.
    pub completed: u64,
    /// Final results delivered with an error (including shutdown and fallback reports).
    pub failed: u64,
    /// Jobs cancelled by the job-stop channel (no result posted, as the SDK).
    pub stopped: u64,
    /// Deliveries of an id already in flight, not run twice.
    pub duplicates: u64,
    /// Jobs without `id` or `input`, or unparsable take answers.
    pub malformed: u64,
    /// Jobs reported failed because the shutdown grace ran out.
    pub shutdown_failed: u64,
    /// Results whose delivery failed even after the fallback error post (each one logged).
    pub undelivered: u64,
    /// Spooled results of an earlier run (or of this one, at shutdown) delivered by a replay.
    pub replayed: u64,
    /// Jobs a killed earlier worker left in the journal, run again by this one.
    pub resumed: u64,
    /// Jobs a killed earlier worker left in the journal, reported failed (`worker_restarted`)
    /// instead of run again (streamed output, too old, or already run again once).
    pub restart_reported: u64,
    /// Set when the worker stopped because the runner became unhealthy (dead or wedged engine):
    /// the process should exit non-zero so the platform replaces the worker.
    pub runner_failure: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) taken: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) stopped: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) malformed: AtomicU64,
    pub(super) shutdown_failed: AtomicU64,
    pub(super) undelivered: AtomicU64,
    pub(super) replayed: AtomicU64,
    pub(super) resumed: AtomicU64,
    pub(super) restart_reported: AtomicU64,
}

impl Counters {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self, runner_failure: Option<String>) -> WorkerReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerReport {
            taken: get(&self.taken),
            completed: get(&self.completed),
            failed: get(&self.failed),
            stopped: get(&self.stopped),
            duplicates: get(&self.duplicates),
            malformed: get(&self.malformed),
            shutdown_failed: get(&self.shutdown_failed),
            undelivered: get(&self.undelivered),
            replayed: get(&self.replayed),
            resumed: get(&self.resumed),
            restart_reported: get(&self.restart_reported),
            runner_failure,
        }
    }
}

/// Everything a job task needs, shared by all of them.
pub(super) struct Shared<R> {
    pub(super) runner: Arc<R>,
    pub(super) client: PlatformClient,
    pub(super) table: Arc<JobTable>,
    pub(super) settings: WorkerSettings,
    pub(super) identity: WorkerIdentity,
    pub(super) counters: Counters,
    /// Fired when the shutdown grace runs out: unfinished jobs are reported failed.
    pub(super) grace_expired: CancellationToken,
    /// Fired when the runner became unhealthy: unfinished jobs are reported failed at once with
    /// [`Shared::runner_failure`].
    pub(super) runner_failed: CancellationToken,
    /// Why the runner is unhealthy (set before `runner_failed` fires).
    pub(super) runner_failure: std::sync::OnceLock<String>,
    /// [`spool::endpoint_digest`] of the job-done template: this worker's spool entries.
    pub(super) spool_endpoint: String,
    /// Rate limit of repeated warnings (S18).
    pub(super) log_limit: LogLimiter,
    /// Whether a job-stream URL is configured.
    pub(super) streams: bool,
    /// Final results until acknowledged (`None` when disabled or it could not be opened).
    pub(super) spool: Option<Spool>,
    /// Taken jobs until resolved (`None` when disabled or it could not be opened).
    pub(super) journal: Option<Journal>,
}

/// Checks every platform URL template that is set (`RUNPOD_WEBHOOK_GET_JOB`, `_POST_OUTPUT`,
/// `_POST_STREAM`, `_PING`); the binary calls this before loading the model.
///
/// # Errors
/// [`StartError::InvalidUrl`] naming the first malformed variable.
pub fn check_urls(env: &RunpodEnv) -> Result<(), StartError> {
    for (var, template) in [
        ("RUNPOD_WEBHOOK_GET_JOB", &env.get_job_url),
        ("RUNPOD_WEBHOOK_POST_OUTPUT", &env.post_output_url),
        ("RUNPOD_WEBHOOK_POST_STREAM", &env.post_stream_url),
        ("RUNPOD_WEBHOOK_PING", &env.ping_url),
    ] {
        if let Some(template) = template {
            crate::queue::urls::check_template(template)
                .map_err(|reason| StartError::InvalidUrl { var, reason })?;
        }
    }
    Ok(())
}

/// Runs the queue worker until `shutdown` fires, then drains: no new job is taken, in-flight jobs
/// get until `shutdown_grace` minus a margin, the rest are reported failed (`shutting_down`,
/// retryable), the result spool gets one more flush, and the call returns. Spooled results of an
/// earlier run are replayed before the first job is taken. When the runner turns unhealthy
/// ([`JobRunner::health`]: a dead or wedged engine) the worker stops the same way at once, fails
/// its in-flight jobs (retryable), tells the platform, and returns with
/// [`WorkerReport::runner_failure`] set.
///
/// # Errors
/// [`StartError`] when the environment lacks a required URL or the HTTP client cannot be built;
/// nothing has been taken then.
pub async fn run_worker<R: JobRunner>(
    env: &RunpodEnv,
    runner: Arc<R>,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) -> Result<WorkerReport, StartError> {
    let take = env
        .get_job_url
        .as_deref()
        .ok_or(StartError::Missing("RUNPOD_WEBHOOK_GET_JOB"))?;
    let done = env
        .post_output_url
        .as_deref()
        .ok_or(StartError::Missing("RUNPOD_WEBHOOK_POST_OUTPUT"))?;
    let stream = env.post_stream_url.as_deref();
    check_urls(env)?;
    if stream.is_none() {
        warn!("RUNPOD_WEBHOOK_POST_STREAM is not set: chunks are not streamed (final results still carry them)");
    }
    // The SDK substitutes a random uuid when the pod id is unset.
    let url_worker_id = env.pod_id.clone().unwrap_or_else(random_worker_id);
    let endpoints = Endpoints::new(
        take,
        done,
        stream.unwrap_or(""),
        env.ping_url.as_deref(),
        &url_worker_id,
    );
    let client = PlatformClient::new(endpoints.clone(), env.api_key.as_ref(), settings.timeouts)?;
    let table = Arc::new(JobTable::new());
    let identity = WorkerIdentity {
        worker_id: env.pod_id.clone().unwrap_or_else(|| "unknown".into()),
        hostname: env.pod_hostname.clone().unwrap_or_else(|| "unknown".into()),
    };

    let heartbeat = if endpoints.has_ping() && env.api_key.is_some() && env.pod_id.is_some() {
        let interval = Duration::from_millis(env.ping_interval_ms);
        Some(
            Heartbeat::start(endpoints, env.api_key.clone(), interval, table.clone())
                .map_err(StartError::Heartbeat)?,
        )
    } else {
        info!(
            "heartbeat disabled (needs RUNPOD_WEBHOOK_PING, RUNPOD_AI_API_KEY and RUNPOD_POD_ID)"
        );
        None
    };

    let spool = match settings.spool.clone() {
        None => None,
        Some(spool_settings) => open_store(
            "result spool",
            "undelivered results will not survive a restart",
            move || Spool::open(spool_settings),
        )
        .await
        .inspect(|spool| info!(dir = %spool.dir().display(), "result spool ready")),
    };
    let journal = match (
        &spool,
        settings.spool.as_ref().and_then(|s| s.journal.clone()),
    ) {
        (Some(spool), Some(journal_settings)) => {
            let dir = spool.dir().to_owned();
            open_store(
                "taken-job journal",
                "a job in flight when the worker is killed is lost to it",
                move || Journal::open(dir, journal_settings),
            )
            .await
        }
        _ => None,
    };
    let shared = Arc::new(Shared {
        runner,
        client,
        table,
        settings,
        identity,
        counters: Counters::default(),
        grace_expired: CancellationToken::new(),
        runner_failed: CancellationToken::new(),
        runner_failure: std::sync::OnceLock::new(),
        log_limit: LogLimiter::default(),
        spool_endpoint: spool::endpoint_digest(done),
        streams: stream.is_some(),
        spool,
        journal,
    });
    let semaphore = Arc::new(Semaphore::new(shared.settings.max_concurrency));
    let tracker = TaskTracker::new();
    let stop_loop_done = CancellationToken::new();
    let stop_loop = tokio::spawn(stop_loop(shared.clone(), stop_loop_done.clone()));
    // Taking stops on shutdown or when the watchdog finds the runner unhealthy.
    let stop_taking = shutdown.child_token();
    let watchdog = tokio::spawn(watchdog(
        shared.clone(),
        stop_taking.clone(),
        stop_loop_done.clone(),
    ));

    // Jobs a killed predecessor left are claimed first (before the replay may deliver, and so
    // delete, a result that makes an entry moot), then the undelivered results of an earlier run
    // go out, then the claimed jobs are run again or reported: all before any new job is taken.
    let orphans = recover_journal(&shared).await;
    tokio::select! {
        biased;
        () = stop_taking.cancelled() => {}
        () = replay_spool(&shared, shared.settings.result_retry) => {}
    }
    resolve_orphans(&shared, orphans, &semaphore, &tracker);
    info!(
        max_concurrency = shared.settings.max_concurrency,
        "worker started; taking jobs"
    );
    take_loop(&shared, &semaphore, &tracker, &stop_taking).await;

    let drain_started = Instant::now();
    drain(&shared, &tracker).await;
    flush_spool(&shared, drain_started).await;
    stop_loop_done.cancel();
    if stop_loop.await.is_err() {
        warn!("job-stop loop panicked");
    }
    if watchdog.await.is_err() {
        warn!("watchdog panicked");
    }
    if let Some(journal) = shared.journal.clone() {
        if tokio::task::spawn_blocking(move || journal.close())
            .await
            .is_err()
        {
            warn!("journal close task failed");
        }
    }
    let runner_failure = shared.runner_failure.get().cloned();
    if let Some(reason) = &runner_failure {
        // Tell the platform, as the SDK's fitness checks do; the caller exits non-zero.
        let acknowledged = super::ping::report_unhealthy(env, "engine", reason).await;
        error!(%reason, acknowledged, "worker stopped: the engine is unhealthy");
    }
    if let Some(heartbeat) = heartbeat {
        // Joining the thread is quick (it wakes on the stop signal) but blocking.
        if tokio::task::spawn_blocking(move || heartbeat.stop())
            .await
            .is_err()
        {
            warn!("heartbeat shutdown task failed");
        }
    }
    let report = shared.counters.report(runner_failure);
    info!(?report, "worker stopped");
    Ok(report)
}

/// Starts a task per taken job (duplicates of in-flight ids are skipped) and reports malformed
/// jobs that carry an id as failed. Unused permits are released.
fn dispatch<R: JobRunner>(
    shared: &Arc<Shared<R>>,
    batch: TakeBatch,
    mut permits: Vec<OwnedSemaphorePermit>,
    semaphore: &Arc<Semaphore>,
    tracker: &TaskTracker,
) {
    for malformed in batch.malformed {
        Counters::bump(&shared.counters.malformed);
        match malformed.id {
            Some(id) => {
                if let Some(suppressed) = shared.log_limit.allow("malformed job") {
                    warn!(job_id = %log_safe(&id), reason = %malformed.reason, suppressed,
                        "malformed job: reporting it failed");
                }
                let error = JobError::Validation(malformed.reason);
                tracker.spawn(report_failure(shared.clone(), id, error));
            }
            None => {
                if let Some(suppressed) = shared.log_limit.allow("malformed take answer") {
                    warn!(reason = %malformed.reason, suppressed, "job-take answer without a usable job");
                }
            }
        }
    }
    for job in batch.jobs {
        Counters::bump(&shared.counters.taken);
        let Some(cancel) = shared.table.try_insert(&job.id) else {
            Counters::bump(&shared.counters.duplicates);
            if let Some(suppressed) = shared.log_limit.allow("duplicate delivery") {
                warn!(job_id = %log_safe(&job.id), suppressed,
                    "job already in flight: duplicate delivery not run twice");
            }
            continue;
        };
        // A job beyond the slots asked for (the platform sent more) waits for one in its task.
        let permit = permits.pop();
        let span = info_span!("job", job_id = %log_safe(&job.id));
        tracker.spawn(
            run_job_task(
                shared.clone(),
                job,
                permit,
                cancel,
                semaphore.clone(),
                Start::Taken,
            )
            .instrument(span),
        );
    }
}

/// Claims the journal entries killed workers of this endpoint left behind ([`Journal::recover`]);
/// those whose final body is in the result spool are dropped (the replay delivers them).
async fn recover_journal<R>(shared: &Shared<R>) -> Vec<Orphan> {
    let Some(journal) = shared.journal.clone() else {
        return Vec::new();
    };
    let endpoint = shared.spool_endpoint.clone();
    let recovery = match tokio::task::spawn_blocking(move || journal.recover(&endpoint)).await {
        Ok(Ok(recovery)) => recovery,
        Ok(Err(error)) => {
            warn!(%error, "taken-job journal could not be read; jobs of a killed worker are not recovered");
            return Vec::new();
        }
        Err(error) => {
            warn!(%error, "taken-job journal task failed");
            return Vec::new();
        }
    };
    if recovery != journal::Recovery::default() {
        info!(
            claimed = recovery.claimed.len(),
            live = recovery.live,
            foreign = recovery.foreign,
            expired = recovery.expired,
            corrupt = recovery.corrupt,
            unknown = recovery.unknown,
            "taken-job journal: jobs of a killed worker found"
        );
    }
    let mut orphans = Vec::new();
    for orphan in recovery.claimed {
        let in_spool = shared
            .spool
            .as_ref()
            .is_some_and(|spool| spool.path_for(&orphan.entry.job_id).exists());
        if in_spool {
            info!(job_id = %log_safe(&orphan.entry.job_id),
                "job of a killed worker already has its final body in the spool: replayed, not run again");
            journal_remove(shared, &orphan.entry.job_id).await;
        } else {
            orphans.push(orphan);
        }
    }
    orphans
}

/// What to do with a killed worker's job.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resolution {
    /// Run it again with this much of its deadline left.
    Rerun(Duration),
    /// Report it failed (`worker_restarted`) with this message.
    Report(String),
}

/// Decides a killed worker's job: run it again only when nothing of it was streamed, it has not
/// been run again before, and it was taken within the resume limit and the job deadline.
fn resolve(
    orphan: &Orphan,
    settings: &WorkerSettings,
    resume_max_age: Duration,
    now_ms: u64,
) -> Resolution {
    let killed = "the worker was killed during this job and restarted";
    let age = orphan.entry.age(now_ms);
    let limit = resume_max_age.min(settings.job_timeout);
    if orphan.streamed {
        Resolution::Report(format!(
            "{killed}; the job was not run again because part of its output had already been streamed"
        ))
    } else if orphan.entry.runs > journal::MAX_RUNS {
        Resolution::Report(format!(
            "the worker was killed during this job {} times and restarted; the job was not run again (it may be what stops the worker)",
            orphan.entry.runs - 1
        ))
    } else if age > limit {
        Resolution::Report(format!(
            "{killed}; the job was not run again because it was taken {} s ago, past the {} s limit for running it again",
            age.as_secs(),
            limit.as_secs()
        ))
    } else {
        Resolution::Rerun(settings.job_timeout.saturating_sub(age))
    }
}

/// Starts a task per claimed job of a killed worker: run again (taking free slots first, the
/// rest waiting for one) or reported failed.
fn resolve_orphans<R: JobRunner>(
    shared: &Arc<Shared<R>>,
    orphans: Vec<Orphan>,
    semaphore: &Arc<Semaphore>,
    tracker: &TaskTracker,
) {
    let resume_max_age = shared
        .settings
        .spool
        .as_ref()
        .and_then(|s| s.journal.as_ref())
        .map_or(Duration::ZERO, |j| j.resume_max_age);
    let now = journal::now_ms();
    for orphan in orphans {
        let id = orphan.entry.job_id.clone();
        let Some(cancel) = shared.table.try_insert(&id) else {
            continue;
        };
        let span = info_span!("job", job_id = %log_safe(&id));
        match resolve(&orphan, &shared.settings, resume_max_age, now) {
            Resolution::Rerun(time_left) => {
                Counters::bump(&shared.counters.resumed);
                info!(parent: &span, runs = orphan.entry.runs, time_left_secs = time_left.as_secs(),
                    "running again a job a killed worker left unfinished");
                let permit = semaphore.clone().try_acquire_owned().ok();
                let job = TakenJob {
                    id,
                    input: orphan.entry.input,
                };
                tracker.spawn(
                    run_job_task(
                        shared.clone(),
                        job,
                        permit,
                        cancel,
                        semaphore.clone(),
                        Start::Resumed { time_left },
                    )
                    .instrument(span),
                );
            }
            Resolution::Report(message) => {
                Counters::bump(&shared.counters.restart_reported);
                tracker.spawn(report_restarted(shared.clone(), id, message).instrument(span));
            }
        }
    }
}

/// After the take loop ended: waits for in-flight jobs until the grace minus a margin, then has the
/// unfinished ones report failure, and gives those reports the margin.
async fn drain<R>(shared: &Shared<R>, tracker: &TaskTracker) {
    let in_flight = shared.table.len();
    info!(in_flight, "shutting down: no longer taking jobs");
    tracker.close();
    let grace = shared.settings.shutdown_grace;
    // Keep a margin to post the failure reports before the platform's kill.
    let margin = (grace / 5).min(Duration::from_secs(5));
    if tokio::time::timeout(grace - margin, tracker.wait())
        .await
        .is_ok()
    {
        return;
    }
    warn!(
        in_flight = shared.table.len(),
        "shutdown grace ran out: reporting unfinished jobs as failed"
    );
    shared.grace_expired.cancel();
    if tokio::time::timeout(margin, tracker.wait()).await.is_err() {
        error!(unreported = ?shared.table.ids(), "exiting with jobs whose failure report did not finish");
    }
}

/// Polls [`JobRunner::health`] until `done` fires. On the first failure: records the reason,
/// fails the in-flight jobs (`runner_failed`) and stops the take loop (`stop_taking`).
async fn watchdog<R: JobRunner>(
    shared: Arc<Shared<R>>,
    stop_taking: CancellationToken,
    done: CancellationToken,
) {
    let interval = shared
        .settings
        .health_check_interval
        .max(Duration::from_millis(1));
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if let Err(reason) = shared.runner.health() {
            error!(%reason, in_flight = shared.table.len(),
                "runner unhealthy: no more jobs taken, in-flight jobs reported failed");
            if shared.runner_failure.set(reason).is_err() {
                debug!("runner failure already recorded");
            }
            shared.runner_failed.cancel();
            stop_taking.cancel();
            return;
        }
    }
}

/// Posts the spooled results (not of jobs in flight) with `policy`; see [`spool::replay`].
async fn replay_spool<R>(shared: &Shared<R>, policy: RetryPolicy) {
    let Some(spool) = &shared.spool else {
        return;
    };
    let report = spool::replay(
        spool,
        &shared.client,
        policy,
        &shared.table.ids(),
        &shared.spool_endpoint,
    )
    .await;
    shared
        .counters
        .replayed
        .fetch_add(report.delivered, Ordering::Relaxed);
    if report != spool::ReplayReport::default() {
        info!(?report, "spool replayed");
    }
}

/// After the drain: one more single-attempt pass over the spool within what is left of the grace,
/// so results whose delivery failed get a last chance before exit (the rest stay for the next
/// start).
async fn flush_spool<R>(shared: &Shared<R>, drain_started: Instant) {
    if shared.spool.is_none() {
        return;
    }
    let left = shared
        .settings
        .shutdown_grace
        .saturating_sub(drain_started.elapsed());
    if left.is_zero() {
        warn!("no grace left to flush the result spool; it is replayed at the next start");
        return;
    }
    let once = RetryPolicy {
        max_attempts: 1,
        max_elapsed: left,
        ..shared.settings.result_retry
    };
    if tokio::time::timeout(left, replay_spool(shared, once))
        .await
        .is_err()
    {
        warn!("result spool flush ran out of grace; the rest is replayed at the next start");
    }
}

/// Takes jobs while slots are free, until `shutdown` fires (which also aborts a pending poll).
async fn take_loop<R: JobRunner>(
    shared: &Arc<Shared<R>>,
    semaphore: &Arc<Semaphore>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let settings = &shared.settings;
    let mut jitter = Jitter::new();
    let mut failures = 0u32;
    loop {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            permit = semaphore.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => return,
            },
        };
        let mut permits = vec![first];
        while let Ok(permit) = semaphore.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let in_progress = !shared.table.is_empty();
        let max_body = settings
            .max_job_bytes
            .saturating_mul(permits.len())
            .saturating_add(64 * 1024);
        let started = Instant::now();
        let take = shared.client.take(permits.len(), in_progress, max_body);
        tokio::pin!(take);
        let answer = tokio::select! {
            biased;
            answer = &mut take => answer,
            () = shutdown.cancelled() => {
                // The platform may already have assigned jobs to this poll: give its answer a
                // moment so they are run (and drained) rather than dropped, then abort it.
                match tokio::time::timeout(settings.take_abort_window, take).await {
                    Ok(answer) => answer,
                    Err(_elapsed) => return,
                }
            }
        };
        let pause = match answer {
            Ok(batch) => {
                failures = 0;
                let got_jobs = !batch.jobs.is_empty();
                dispatch(shared, batch, permits, semaphore, tracker);
                if got_jobs {
                    Duration::ZERO
                } else {
                    settings
                        .empty_poll_min_interval
                        .saturating_sub(started.elapsed())
                }
            }
            Err(QueueError::TooManyRequests) => {
                failures += 1;
                if let Some(suppressed) = shared.log_limit.allow("job-take 429") {
                    warn!(suppressed, "job-take: 429 too many requests; backing off");
                }
                settings
                    .too_many_requests_pause
                    .max(settings.poll_retry.delay(failures, &mut jitter))
            }
            Err(error) => {
                failures += 1;
                let wait = settings.poll_retry.delay(failures, &mut jitter);
                if let Some(suppressed) = shared.log_limit.allow("job-take failed") {
                    warn!(%error, failures, suppressed, wait_ms = wait.as_millis() as u64, "job-take failed");
                }
                wait
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Polls the job-stop channel and cancels the named jobs, until `done` fires.
async fn stop_loop<R: JobRunner>(shared: Arc<Shared<R>>, done: CancellationToken) {
    if shared.client.endpoints().stop_url().is_none() {
        warn!("job-take URL has no `/job-take/` segment: job-stop channel disabled");
        return;
    }
    let settings = &shared.settings;
    let mut jitter = Jitter::new();
    let mut failures = 0u32;
    loop {
        let answer = tokio::select! {
            () = done.cancelled() => return,
            answer = shared.client.poll_stop() => answer,
        };
        let pause = match answer {
            Ok(ids) => {
                failures = 0;
                for id in &ids {
                    if shared.table.stop(id) {
                        info!(job_id = %log_safe(id), "job-stop: cancelling job");
                    } else {
                        debug!(job_id = %log_safe(id), "job-stop for a job not in flight");
                    }
                }
                if ids.is_empty() {
                    settings.stop_poll_pause
                } else {
                    Duration::ZERO
                }
            }
            Err(QueueError::TooManyRequests) => {
                failures += 1;
                settings
                    .too_many_requests_pause
                    .max(settings.poll_retry.delay(failures, &mut jitter))
            }
            Err(error) => {
                failures += 1;
                let wait = settings.poll_retry.delay(failures, &mut jitter);
                // Polls back off to 30 s; a long outage logs at doubling failure counts.
                if failures == 1 || failures.is_power_of_two() {
                    warn!(%error, failures, "job-stop poll failed");
                }
                wait
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                () = done.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// A random hex id standing in for the worker id in URLs when `RUNPOD_POD_ID` is unset.
fn random_worker_id() -> String {
    let mut jitter = Jitter::new();
    (0..4)
        .map(|_| format!("{:08x}", (jitter.unit() * f64::from(u32::MAX)) as u32))
        .collect()
}

/// Opens an optional on-disk store (`what`) on the blocking pool. A failure is a warning that says
/// what the worker goes on `without`; it runs on with `None`.
async fn open_store<T, E>(
    what: &'static str,
    without: &'static str,
    open: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Option<T>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    match tokio::task::spawn_blocking(open).await {
        Ok(Ok(store)) => Some(store),
        Ok(Err(error)) => {
            warn!(%error, "{what} unavailable: {without}");
            None
        }
        Err(error) => {
            warn!(%error, "{what} could not be opened (task failed)");
            None
        }
    }
}
