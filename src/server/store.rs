//! The RunPod job store: every job submitted through `/run`, `/runsync` or `/retry`, its status,
//! streamed items not yet polled, and its result. Bounded: unfinished jobs are bounded by admission,
//! finished ones expire after the retention window and the oldest are evicted beyond
//! `max_finished`.
//!
//! One `std::sync::Mutex` guards the map; it is only held for short, non-async sections.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::JobError;

/// Streamed items kept per job until polled; beyond this the oldest are dropped (with a log line).
/// A job yields at most one item per generated token, so this only bites on a never-polled huge job.
const MAX_PENDING_ITEMS: usize = 65_536;

/// Worker id reported in job bodies.
pub const WORKER_ID: &str = "wick-local";

/// A RunPod job status, with the wire spelling from serde.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Admitted, waiting for a run slot.
    InQueue,
    /// Running on the engine.
    InProgress,
    /// Finished with an output.
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancelled through `/cancel` or `/purge-queue`.
    Cancelled,
    /// Ran past its deadline.
    TimedOut,
}

impl JobStatus {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        match self {
            JobStatus::InQueue | JobStatus::InProgress => false,
            JobStatus::Completed
            | JobStatus::Failed
            | JobStatus::Cancelled
            | JobStatus::TimedOut => true,
        }
    }

    /// Outcome label for metrics.
    pub fn outcome_label(self) -> &'static str {
        match self {
            JobStatus::InQueue => "in_queue",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::TimedOut => "timed_out",
        }
    }

    /// The final status of a job that ended with `result`.
    pub fn of_result(result: &Result<Value, JobError>) -> JobStatus {
        match result {
            Ok(_) => JobStatus::Completed,
            Err(JobError::Cancelled) => JobStatus::Cancelled,
            Err(JobError::Timeout(_)) => JobStatus::TimedOut,
            Err(_) => JobStatus::Failed,
        }
    }
}

/// One stored job.
#[derive(Debug)]
struct JobRecord {
    status: JobStatus,
    /// Kept for `/retry`.
    input: Value,
    /// `policy.executionTimeout`, kept for `/retry`.
    execution_timeout: Option<Duration>,
    created: Instant,
    started: Option<Instant>,
    finished: Option<Instant>,
    output: Option<Value>,
    error: Option<String>,
    /// Streamed items not yet returned by `/stream`.
    pending: VecDeque<Value>,
    cancel: CancellationToken,
    /// Woken on every change (new item, start, end), for `/runsync` and `/stream` waits.
    changed: Arc<Notify>,
    retries: u32,
}

/// What `/retry` needs to start a job again.
#[derive(Debug)]
pub struct RetryTicket {
    /// The original input.
    pub input: Value,
    /// The original execution timeout.
    pub execution_timeout: Option<Duration>,
    /// The cancel token the job now runs under.
    pub cancel: CancellationToken,
}

/// Counts for `/health`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Stored jobs in IN_QUEUE.
    pub in_queue: usize,
    /// Stored jobs in IN_PROGRESS.
    pub in_progress: usize,
    /// Stored jobs in COMPLETED.
    pub completed: usize,
    /// Stored jobs in FAILED or TIMED_OUT.
    pub failed: usize,
    /// Stored jobs that were retried at least once.
    pub retried: usize,
}

#[derive(Debug, Default)]
struct StoreInner {
    jobs: HashMap<String, JobRecord>,
    /// Finished jobs in finish order, for expiry and eviction (entries may be stale after a retry).
    finished_order: VecDeque<(Instant, String)>,
}

/// The bounded job store.
#[derive(Debug)]
pub struct JobStore {
    inner: Mutex<StoreInner>,
    retention: Duration,
    max_finished: usize,
}

impl JobStore {
    /// A store keeping finished jobs for `retention`, at most `max_finished` of them.
    pub fn new(retention: Duration, max_finished: usize) -> Self {
        JobStore {
            inner: Mutex::new(StoreInner::default()),
            retention,
            max_finished: max_finished.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, StoreInner> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.evict(&mut inner, Instant::now());
        inner
    }

    /// Drops finished jobs past retention, then the oldest beyond `max_finished`.
    fn evict(&self, inner: &mut StoreInner, now: Instant) {
        while let Some((finished_at, id)) = inner.finished_order.front() {
            let finished_at = *finished_at;
            let still_finished = inner.jobs.get(id).and_then(|r| r.finished) == Some(finished_at);
            let expired = now.saturating_duration_since(finished_at) >= self.retention;
            let over = inner.finished_order.len() > self.max_finished;
            if still_finished && !expired && !over {
                break;
            }
            let Some((_, id)) = inner.finished_order.pop_front() else {
                break;
            };
            if still_finished {
                inner.jobs.remove(&id);
            }
        }
    }

    /// Stores a new job in IN_QUEUE.
    pub fn insert(
        &self,
        id: &str,
        input: Value,
        execution_timeout: Option<Duration>,
        cancel: CancellationToken,
    ) {
        let record = JobRecord {
            status: JobStatus::InQueue,
            input,
            execution_timeout,
            created: Instant::now(),
            started: None,
            finished: None,
            output: None,
            error: None,
            pending: VecDeque::new(),
            cancel,
            changed: Arc::new(Notify::new()),
            retries: 0,
        };
        self.lock().jobs.insert(id.to_string(), record);
    }

    /// Marks a job IN_PROGRESS (unless it was cancelled meanwhile). Returns whether it may run.
    pub fn mark_started(&self, id: &str) -> bool {
        let mut inner = self.lock();
        let Some(record) = inner.jobs.get_mut(id) else {
            return false;
        };
        if record.status != JobStatus::InQueue {
            return false;
        }
        record.status = JobStatus::InProgress;
        record.started = Some(Instant::now());
        record.changed.notify_waiters();
        true
    }

    /// Appends a streamed item.
    pub fn push_item(&self, id: &str, item: Value) {
        let mut inner = self.lock();
        let Some(record) = inner.jobs.get_mut(id) else {
            return;
        };
        if record.pending.len() >= MAX_PENDING_ITEMS {
            record.pending.pop_front();
            tracing::warn!(job_id = %id, "stream buffer full; dropped the oldest unpolled item");
        }
        record.pending.push_back(item);
        record.changed.notify_waiters();
    }

    /// Records how a job ended. A job already CANCELLED stays CANCELLED. Returns the final status.
    pub fn finish(&self, id: &str, result: Result<Value, JobError>) -> Option<JobStatus> {
        let mut inner = self.lock();
        let now = Instant::now();
        let record = inner.jobs.get_mut(id)?;
        if record.status.is_final() {
            return Some(record.status);
        }
        record.status = JobStatus::of_result(&result);
        match result {
            Ok(output) => record.output = Some(output),
            Err(err) => record.error = Some(err.to_string()),
        }
        record.finished = Some(now);
        record.changed.notify_waiters();
        let status = record.status;
        inner.finished_order.push_back((now, id.to_string()));
        Some(status)
    }

    /// Cancels a queued or running job. Returns its status afterwards, `None` for an unknown id.
    pub fn cancel(&self, id: &str) -> Option<JobStatus> {
        let mut inner = self.lock();
        let now = Instant::now();
        let record = inner.jobs.get_mut(id)?;
        if record.status.is_final() {
            return Some(record.status);
        }
        mark_cancelled(record, now);
        inner.finished_order.push_back((now, id.to_string()));
        Some(JobStatus::Cancelled)
    }

    /// Cancels every job still IN_QUEUE; returns how many. One critical section: a job that starts
    /// (or ends) concurrently is either purged while still queued or left alone, never cancelled
    /// after it began running (found by `tests/race_stress.rs`).
    pub fn purge_queued(&self) -> usize {
        let mut inner = self.lock();
        let now = Instant::now();
        let StoreInner {
            jobs,
            finished_order,
        } = &mut *inner;
        let mut purged = 0;
        for (id, record) in jobs.iter_mut() {
            if record.status == JobStatus::InQueue {
                mark_cancelled(record, now);
                finished_order.push_back((now, id.clone()));
                purged += 1;
            }
        }
        purged
    }

    /// Puts a FAILED or TIMED_OUT job back in the queue. `Ok(None)` for an unknown id, `Err(status)`
    /// when the job is in a status that cannot be retried.
    pub fn retry(
        &self,
        id: &str,
        cancel: CancellationToken,
    ) -> Result<Option<RetryTicket>, JobStatus> {
        let mut inner = self.lock();
        let Some(record) = inner.jobs.get_mut(id) else {
            return Ok(None);
        };
        if !matches!(record.status, JobStatus::Failed | JobStatus::TimedOut) {
            return Err(record.status);
        }
        record.status = JobStatus::InQueue;
        record.created = Instant::now();
        record.started = None;
        record.finished = None;
        record.output = None;
        record.error = None;
        record.pending.clear();
        record.cancel = cancel.clone();
        record.retries += 1;
        record.changed.notify_waiters();
        Ok(Some(RetryTicket {
            input: record.input.clone(),
            execution_timeout: record.execution_timeout,
            cancel,
        }))
    }

    /// The `/status` body, or `None` for an unknown (or evicted) id.
    pub fn status_body(&self, id: &str) -> Option<Value> {
        let inner = self.lock();
        let record = inner.jobs.get(id)?;
        Some(status_body(id, record))
    }

    /// The status alone.
    pub fn status(&self, id: &str) -> Option<JobStatus> {
        self.lock().jobs.get(id).map(|r| r.status)
    }

    /// The `/stream` body: the items produced since the previous call (drained), the status, and
    /// the error once FAILED. `None` for an unknown id.
    pub fn take_stream(&self, id: &str) -> Option<(JobStatus, Value)> {
        let mut inner = self.lock();
        let record = inner.jobs.get_mut(id)?;
        let items: Vec<Value> = record
            .pending
            .drain(..)
            .map(|item| json!({ "output": item }))
            .collect();
        let mut body = json!({ "id": id, "status": record.status, "stream": items });
        if let Some(error) = &record.error {
            body["error"] = json!(error);
        }
        Some((record.status, body))
    }

    /// Whether `/stream` has something new to say: an unpolled item or a final status.
    pub fn has_stream_news(&self, id: &str) -> bool {
        self.lock()
            .jobs
            .get(id)
            .is_none_or(|r| !r.pending.is_empty() || r.status.is_final())
    }

    /// The change notifier of a job, for waits.
    pub fn notifier(&self, id: &str) -> Option<Arc<Notify>> {
        self.lock().jobs.get(id).map(|r| Arc::clone(&r.changed))
    }

    /// Counts by status, for `/health`.
    pub fn counts(&self) -> JobCounts {
        let inner = self.lock();
        let mut counts = JobCounts::default();
        for record in inner.jobs.values() {
            match record.status {
                JobStatus::InQueue => counts.in_queue += 1,
                JobStatus::InProgress => counts.in_progress += 1,
                JobStatus::Completed => counts.completed += 1,
                JobStatus::Failed | JobStatus::TimedOut => counts.failed += 1,
                JobStatus::Cancelled => {}
            }
            if record.retries > 0 {
                counts.retried += 1;
            }
        }
        counts
    }

    /// Jobs held (any status).
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Whether no job is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ends a queued or running job as CANCELLED (the caller records it in `finished_order`).
fn mark_cancelled(record: &mut JobRecord, now: Instant) {
    record.status = JobStatus::Cancelled;
    record.finished = Some(now);
    record.cancel.cancel();
    record.changed.notify_waiters();
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `{"id","status","delayTime","executionTime","output"|"error","workerId"}` as the RunPod API.
fn status_body(id: &str, record: &JobRecord) -> Value {
    let now = Instant::now();
    let started = record.started.unwrap_or(now);
    let delay = started.saturating_duration_since(record.created);
    let execution = record
        .started
        .map(|s| record.finished.unwrap_or(now).saturating_duration_since(s));
    let mut body = json!({
        "id": id,
        "status": record.status,
        "delayTime": millis(delay),
        "executionTime": millis(execution.unwrap_or_default()),
        "workerId": WORKER_ID,
    });
    if let Some(output) = &record.output {
        body["output"] = output.clone();
    }
    if let Some(error) = &record.error {
        body["error"] = json!(error);
    }
    if record.retries > 0 {
        body["retries"] = json!(record.retries);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> JobStore {
        JobStore::new(Duration::from_secs(60), 2)
    }

    #[test]
    fn status_wire_strings_match_runpod() {
        assert_eq!(
            serde_json::to_value(JobStatus::InQueue).unwrap(),
            "IN_QUEUE"
        );
        assert_eq!(
            serde_json::to_value(JobStatus::InProgress).unwrap(),
            "IN_PROGRESS"
        );
        assert_eq!(
            serde_json::to_value(JobStatus::TimedOut).unwrap(),
            "TIMED_OUT"
        );
        assert_eq!(
            serde_json::to_value(JobStatus::Cancelled).unwrap(),
            "CANCELLED"
        );
    }

    #[test]
    fn job_moves_through_queue_progress_completed() {
        let s = store();
        s.insert("a", json!({"prompt": "x"}), None, CancellationToken::new());
        assert_eq!(s.status("a"), Some(JobStatus::InQueue));
        assert!(s.mark_started("a"));
        s.push_item("a", json!(1));
        s.push_item("a", json!(2));
        let (status, body) = s.take_stream("a").unwrap();
        assert_eq!(status, JobStatus::InProgress);
        assert_eq!(body["stream"], json!([{"output": 1}, {"output": 2}]));
        assert_eq!(s.take_stream("a").unwrap().1["stream"], json!([]));
        assert_eq!(s.finish("a", Ok(json!([1, 2]))), Some(JobStatus::Completed));
        let body = s.status_body("a").unwrap();
        assert_eq!(body["status"], "COMPLETED");
        assert_eq!(body["output"], json!([1, 2]));
        assert_eq!(body["workerId"], WORKER_ID);
    }

    #[test]
    fn cancel_wins_over_a_later_finish() {
        let s = store();
        let token = CancellationToken::new();
        s.insert("a", json!({}), None, token.clone());
        assert_eq!(s.cancel("a"), Some(JobStatus::Cancelled));
        assert!(token.is_cancelled());
        assert!(!s.mark_started("a"));
        assert_eq!(
            s.finish("a", Err(JobError::Cancelled)),
            Some(JobStatus::Cancelled)
        );
        assert_eq!(s.cancel("missing"), None);
    }

    #[test]
    fn failures_map_to_runpod_statuses() {
        let s = store();
        for (id, err, status) in [
            (
                "t",
                JobError::Timeout("deadline".into()),
                JobStatus::TimedOut,
            ),
            ("f", JobError::Validation("bad".into()), JobStatus::Failed),
        ] {
            s.insert(id, json!({}), None, CancellationToken::new());
            assert_eq!(s.finish(id, Err(err)), Some(status));
        }
        assert_eq!(s.status_body("f").unwrap()["error"], "bad");
    }

    #[test]
    fn finished_jobs_beyond_the_cap_are_evicted_oldest_first() {
        let s = store();
        for id in ["a", "b", "c"] {
            s.insert(id, json!({}), None, CancellationToken::new());
            s.finish(id, Ok(json!(id)));
        }
        assert!(s.status_body("a").is_none());
        assert!(s.status_body("b").is_some());
        assert!(s.status_body("c").is_some());
    }

    #[test]
    fn finished_jobs_expire_after_retention_but_running_ones_stay() {
        let s = JobStore::new(Duration::ZERO, 10);
        s.insert("done", json!({}), None, CancellationToken::new());
        s.insert("running", json!({}), None, CancellationToken::new());
        s.mark_started("running");
        s.finish("done", Ok(json!(null)));
        assert!(s.status_body("done").is_none());
        assert_eq!(s.status("running"), Some(JobStatus::InProgress));
    }

    #[test]
    fn retry_requeues_failed_jobs_only() {
        let s = store();
        s.insert(
            "a",
            json!({"prompt": "p"}),
            Some(Duration::from_secs(5)),
            CancellationToken::new(),
        );
        assert_eq!(
            s.retry("a", CancellationToken::new()).unwrap_err(),
            JobStatus::InQueue
        );
        s.finish("a", Err(JobError::Engine("boom".into())));
        let ticket = s.retry("a", CancellationToken::new()).unwrap().unwrap();
        assert_eq!(ticket.input, json!({"prompt": "p"}));
        assert_eq!(ticket.execution_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.status("a"), Some(JobStatus::InQueue));
        assert_eq!(s.counts().retried, 1);
        // The stale finish-order entry must not evict the re-queued job.
        assert!(s.status_body("a").is_some());
        assert!(s
            .retry("missing", CancellationToken::new())
            .unwrap()
            .is_none());
    }

    #[test]
    fn purge_cancels_only_queued_jobs() {
        let s = store();
        s.insert("q1", json!({}), None, CancellationToken::new());
        s.insert("q2", json!({}), None, CancellationToken::new());
        s.insert("r", json!({}), None, CancellationToken::new());
        s.mark_started("r");
        assert_eq!(s.purge_queued(), 2);
        assert_eq!(s.status("r"), Some(JobStatus::InProgress));
        let counts = s.counts();
        assert_eq!((counts.in_queue, counts.in_progress), (0, 1));
    }
}
