//! The fake platform's state: the job store (queue, statuses, outputs, stream chunks), every
//! worker-facing request recorded, heartbeats, pending job-stop ids and the fault plan. Routes live
//! in `routes`; this file is the in-process API tests and the harness commands use.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::queue::backoff::Jitter;

/// Faults the platform injects into the worker-facing routes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Share (percent) of job-done posts answered 500 without being applied.
    pub fail_done_pct: f64,
    /// Share of job-done posts applied but whose answer is cut off (the worker sees a broken
    /// connection and must retry; the retry must be identical).
    pub drop_done_pct: f64,
    /// Share of job-stream posts answered 500 without being applied.
    pub fail_stream_pct: f64,
    /// Share of job-take polls answered 500.
    pub fail_take_pct: f64,
    /// Delay added to every job-done, job-stream and ping answer.
    pub slow: Duration,
    /// Share of handed-out jobs delivered a second time right away.
    pub duplicate_pct: f64,
    /// Statuses to answer the next job-take polls with, in order (then normal behaviour).
    pub take_script: Vec<u16>,
    /// Raw JSON bodies to answer the next job-take polls with (200), in order, before the queue:
    /// malformed jobs, garbage, batches the worker did not ask for.
    pub take_bodies: Vec<String>,
    /// Statuses to answer the next job-done posts with, in order, without applying them; `0`
    /// applies the post and cuts its answer off.
    pub done_script: Vec<u16>,
    /// Statuses to answer the next job-stream posts with, in order, without applying them.
    pub stream_script: Vec<u16>,
    /// Seed for the fault dice (0: random).
    pub seed: u64,
}

/// Platform settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformConfig {
    /// Endpoint id in the `/v2/{endpoint}/...` paths.
    pub endpoint_id: String,
    /// How long job-take and job-stop hold a poll open when there is nothing to hand out.
    pub poll_hold: Duration,
    /// Faults to inject.
    pub faults: Faults,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            endpoint_id: "wick-harness".into(),
            poll_hold: Duration::from_secs(2),
            faults: Faults::default(),
        }
    }
}

/// Job status as the public API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for a worker.
    InQueue,
    /// Handed to a worker.
    InProgress,
    /// Finished with an output.
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancelled through the public API.
    Cancelled,
}

impl JobStatus {
    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Everything the platform knows about one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// The job's input.
    pub input: Value,
    /// Current status.
    pub status: JobStatus,
    /// Output of a completed job (the job-done body's `output`).
    pub output: Option<Value>,
    /// Error string of a failed job.
    pub error: Option<String>,
    /// `stopPod` seen on the final post.
    pub stop_pod: bool,
    /// Every streamed chunk's `output`, in arrival order.
    pub stream: Vec<Value>,
    /// How many chunks `/stream` has already returned.
    pub stream_cursor: usize,
    /// Times the job was handed out (2 = delivered twice).
    pub deliveries: u32,
    /// Job-done posts applied (a second identical one is a retry after a lost answer).
    pub done_posts: u32,
    /// Job-done posts whose body differed from the first accepted one (a double result).
    pub conflicting_results: u32,
    /// The first accepted job-done body.
    pub final_body: Option<Value>,
    /// `isStream` of the first accepted job-done post.
    pub final_is_stream: Option<bool>,
    /// When it was submitted.
    pub submitted_at: Instant,
    /// When it was first handed out.
    pub taken_at: Option<Instant>,
    /// When its result arrived.
    pub finished_at: Option<Instant>,
}

/// Which worker-facing route a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// `GET job-take/{worker}`.
    JobTake,
    /// `GET job-take-batch/{worker}`.
    JobTakeBatch,
    /// `GET job-stop/{worker}`.
    JobStop,
    /// `POST job-done/{worker}/{job}`.
    JobDone,
    /// `POST job-stream/{worker}/{job}`.
    JobStream,
    /// `GET ping/{worker}`.
    Ping,
}

/// One worker-facing request as received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// Route.
    pub route: Route,
    /// Path (with the worker and job ids as sent).
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// Headers (lower-case names) as received.
    pub headers: BTreeMap<String, String>,
    /// Body text.
    pub body: String,
    /// Status answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

impl RecordedRequest {
    /// A query parameter (raw, not decoded).
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query.split('&').find_map(|pair| {
            pair.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }
}

/// Mutable platform state, behind one mutex (never held across `.await`).
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) jobs: BTreeMap<String, JobRecord>,
    pub(crate) queue: VecDeque<String>,
    pub(crate) pending_stops: Vec<String>,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) faults: Faults,
    pub(crate) dice: Jitter,
    next_id: u64,
}

/// Shared between routes and the in-process API.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: PlatformConfig,
    pub(crate) state: Mutex<State>,
    /// Woken when a job is queued.
    pub(crate) job_queued: Notify,
    /// Woken when a job-stop id is pending.
    pub(crate) stop_queued: Notify,
    /// Woken on every job status change.
    pub(crate) job_changed: Notify,
    pub(crate) started_at: Instant,
}

/// Counts over the whole run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlatformStats {
    /// Jobs submitted.
    pub submitted: usize,
    /// Jobs still queued.
    pub in_queue: usize,
    /// Jobs handed out and not finished.
    pub in_progress: usize,
    /// Jobs completed.
    pub completed: usize,
    /// Jobs failed.
    pub failed: usize,
    /// Jobs cancelled.
    pub cancelled: usize,
    /// Handed-out jobs delivered more than once.
    pub delivered_twice: usize,
    /// Jobs with more than one applied job-done post (retries after a lost answer included).
    pub repeated_done_posts: usize,
    /// Jobs whose later result differed from the first (must be 0).
    pub conflicting_results: usize,
    /// Worker-facing requests received.
    pub requests: usize,
    /// Heartbeats received.
    pub pings: usize,
}

/// A handle to the fake platform (cheap to clone).
#[derive(Debug, Clone)]
pub struct Platform {
    pub(crate) inner: Arc<Inner>,
}

/// A platform serving on a loopback port.
#[derive(Debug)]
pub struct RunningPlatform {
    /// The platform.
    pub platform: Platform,
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningPlatform {
    /// `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The RunPod variables pointing a worker at this platform.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        self.platform.worker_env(&self.base_url())
    }

    /// Stops serving.
    pub async fn stop(self) {
        self.shutdown.cancel();
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "platform server ended with an error"),
            Err(error) => tracing::warn!(%error, "platform server task failed"),
        }
    }
}

impl Platform {
    /// A platform with this configuration (not yet serving).
    pub fn new(config: PlatformConfig) -> Self {
        let seed = if config.faults.seed == 0 {
            None
        } else {
            Some(config.faults.seed)
        };
        let state = State {
            jobs: BTreeMap::new(),
            queue: VecDeque::new(),
            pending_stops: Vec::new(),
            requests: Vec::new(),
            faults: config.faults.clone(),
            dice: seed.map_or_else(Jitter::new, Jitter::from_seed),
            next_id: 0,
        };
        Platform {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                job_queued: Notify::new(),
                stop_queued: Notify::new(),
                job_changed: Notify::new(),
                started_at: Instant::now(),
            }),
        }
    }

    /// Serves the platform on `addr` (use `127.0.0.1:0` for a free port).
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn serve(
        config: PlatformConfig,
        addr: SocketAddr,
    ) -> std::io::Result<RunningPlatform> {
        let platform = Platform::new(config);
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let app = super::routes::router(platform.clone());
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
        Ok(RunningPlatform {
            platform,
            addr,
            shutdown,
            server,
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Updates are single statements on plain collections: a poisoned lock is still consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The RunPod variables pointing a worker at `base` (`http://host:port`).
    pub fn worker_env(&self, base: &str) -> Vec<(String, String)> {
        let ep = &self.inner.config.endpoint_id;
        vec![
            (
                "RUNPOD_WEBHOOK_GET_JOB".into(),
                format!("{base}/v2/{ep}/job-take/$ID?gpu=HARNESS"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT".into(),
                format!("{base}/v2/{ep}/job-done/$RUNPOD_POD_ID/$ID?gpu=HARNESS"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_STREAM".into(),
                format!("{base}/v2/{ep}/job-stream/$RUNPOD_POD_ID/$ID?gpu=HARNESS"),
            ),
            (
                "RUNPOD_WEBHOOK_PING".into(),
                format!("{base}/v2/{ep}/ping/$RUNPOD_POD_ID?gpu=HARNESS"),
            ),
        ]
    }

    /// Queues a job and returns its id.
    pub fn submit(&self, input: Value) -> String {
        let id = {
            let mut state = self.lock();
            state.next_id += 1;
            let salt = (state.dice.unit() * f64::from(u32::MAX)) as u32;
            format!("job-{:06}-{salt:08x}", state.next_id)
        };
        self.submit_with_id(&id, input);
        id
    }

    /// Queues a job under a chosen id (replacing a finished job of that id, as `/retry` does).
    pub fn submit_with_id(&self, id: &str, input: Value) {
        {
            let mut state = self.lock();
            state.jobs.insert(
                id.to_owned(),
                JobRecord {
                    id: id.to_owned(),
                    input,
                    status: JobStatus::InQueue,
                    output: None,
                    error: None,
                    stop_pod: false,
                    stream: Vec::new(),
                    stream_cursor: 0,
                    deliveries: 0,
                    done_posts: 0,
                    conflicting_results: 0,
                    final_body: None,
                    final_is_stream: None,
                    submitted_at: Instant::now(),
                    taken_at: None,
                    finished_at: None,
                },
            );
            state.queue.push_back(id.to_owned());
        }
        self.inner.job_queued.notify_waiters();
        self.inner.job_changed.notify_waiters();
    }

    /// Records a job as handed out without queueing it (for jobs delivered through
    /// [`Faults::take_bodies`]), so its result can be received.
    pub fn expect_job(&self, id: &str) {
        self.submit_with_id(id, Value::Null);
        let mut state = self.lock();
        state.queue.retain(|queued| queued != id);
        if let Some(job) = state.jobs.get_mut(id) {
            job.status = JobStatus::InProgress;
            job.deliveries = 1;
            job.taken_at = Some(Instant::now());
        }
    }

    /// Queues a job id again without resetting its record: a duplicate delivery of the same job.
    pub fn redeliver(&self, id: &str) {
        self.lock().queue.push_front(id.to_owned());
        self.inner.job_queued.notify_waiters();
    }

    /// A snapshot of one job.
    pub fn job(&self, id: &str) -> Option<JobRecord> {
        self.lock().jobs.get(id).cloned()
    }

    /// Snapshots of every job.
    pub fn jobs(&self) -> Vec<JobRecord> {
        self.lock().jobs.values().cloned().collect()
    }

    /// Waits until the job has ended, or `timeout` passes; returns its last snapshot.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Option<JobRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.inner.job_changed.notified();
            let job = self.job(id)?;
            if job.status.is_terminal() {
                return Some(job);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.job(id);
            }
        }
    }

    /// Waits until a worker request matching `predicate` has been recorded, or `timeout` passes.
    pub async fn wait_request(
        &self,
        timeout: Duration,
        predicate: impl Fn(&RecordedRequest) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.lock().requests.iter().any(&predicate) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Cancels a job: a queued one leaves the queue, a running one is named on the job-stop channel.
    pub fn cancel(&self, id: &str) -> Option<JobStatus> {
        let previous = {
            let mut state = self.lock();
            let job = state.jobs.get_mut(id)?;
            let previous = job.status;
            if !previous.is_terminal() {
                job.status = JobStatus::Cancelled;
                job.finished_at = Some(Instant::now());
            }
            match previous {
                JobStatus::InQueue => state.queue.retain(|queued| queued != id),
                JobStatus::InProgress => state.pending_stops.push(id.to_owned()),
                _ => {}
            }
            previous
        };
        self.inner.stop_queued.notify_waiters();
        self.inner.job_changed.notify_waiters();
        Some(previous)
    }

    /// Removes every queued job; returns how many.
    pub fn purge_queue(&self) -> usize {
        let mut state = self.lock();
        let removed: Vec<String> = state.queue.drain(..).collect();
        for id in &removed {
            state.jobs.remove(id);
        }
        removed.len()
    }

    /// Every worker-facing request so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Worker-facing requests of one route.
    pub fn requests_to(&self, route: Route) -> Vec<RecordedRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.route == route)
            .cloned()
            .collect()
    }

    /// Replaces the fault plan (scripts included).
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Seconds since the platform started (for reports).
    pub fn uptime(&self) -> Duration {
        self.inner.started_at.elapsed()
    }

    /// Counts over the run.
    pub fn stats(&self) -> PlatformStats {
        let state = self.lock();
        let mut stats = PlatformStats {
            submitted: state.jobs.len(),
            ..PlatformStats::default()
        };
        for job in state.jobs.values() {
            match job.status {
                JobStatus::InQueue => stats.in_queue += 1,
                JobStatus::InProgress => stats.in_progress += 1,
                JobStatus::Completed => stats.completed += 1,
                JobStatus::Failed => stats.failed += 1,
                JobStatus::Cancelled => stats.cancelled += 1,
            }
            stats.delivered_twice += usize::from(job.deliveries > 1);
            stats.repeated_done_posts += usize::from(job.done_posts > 1);
            stats.conflicting_results += usize::from(job.conflicting_results > 0);
        }
        stats.requests = state.requests.len();
        stats.pings = state
            .requests
            .iter()
            .filter(|r| r.route == Route::Ping)
            .count();
        stats
    }

    /// The longest gap between two heartbeats (and from the first job-take to the first ping).
    pub fn max_ping_gap(&self) -> Option<Duration> {
        let state = self.lock();
        let times: Vec<Instant> = state
            .requests
            .iter()
            .filter(|r| r.route == Route::Ping)
            .map(|r| r.at)
            .collect();
        times.windows(2).map(|w| w[1].duration_since(w[0])).max()
    }
}
