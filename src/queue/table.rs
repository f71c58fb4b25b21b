//! The in-flight job table: which job ids this process is running, each with its cancellation
//! token. It feeds `job_in_progress`, the heartbeat's `job_id` list, duplicate detection and the
//! job-stop channel. Tracking is per process and in memory (spec §15.1: shared files broke the SDK).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// One job in flight.
#[derive(Debug)]
struct Entry {
    /// Cancels this job's generation (job-stop, shutdown deadline).
    cancel: CancellationToken,
    /// Set when the job-stop channel named this job (no result is posted then).
    stopped: bool,
    /// When it was taken.
    taken_at: Instant,
}

/// In-flight jobs by id. A `std::sync::Mutex` guards tiny sections, never held across `.await`.
#[derive(Debug, Default)]
pub struct JobTable {
    jobs: Mutex<BTreeMap<String, Entry>>,
}

impl JobTable {
    /// An empty table.
    pub fn new() -> Self {
        JobTable::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still consistent.
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a job; `None` when the id is already in flight (a duplicate delivery).
    pub fn try_insert(&self, id: &str) -> Option<CancellationToken> {
        let mut jobs = self.lock();
        if jobs.contains_key(id) {
            return None;
        }
        let cancel = CancellationToken::new();
        jobs.insert(
            id.to_owned(),
            Entry {
                cancel: cancel.clone(),
                stopped: false,
                taken_at: Instant::now(),
            },
        );
        Some(cancel)
    }

    /// Forgets a finished job.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Cancels a job named by the job-stop channel; false when it is not in flight.
    pub fn stop(&self, id: &str) -> bool {
        let mut jobs = self.lock();
        match jobs.get_mut(id) {
            Some(entry) => {
                entry.stopped = true;
                entry.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether the job-stop channel stopped this job.
    pub fn was_stopped(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|e| e.stopped)
    }

    /// Ids in flight, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Jobs in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no job is in flight.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Seconds the oldest job has been running (for logs).
    pub fn oldest_age_secs(&self) -> Option<u64> {
        self.lock()
            .values()
            .map(|e| e.taken_at.elapsed().as_secs())
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_id_is_refused_while_in_flight_and_accepted_after() {
        let table = JobTable::new();
        assert!(table.try_insert("a").is_some());
        assert!(table.try_insert("a").is_none());
        table.remove("a");
        assert!(table.try_insert("a").is_some());
    }

    #[test]
    fn stop_cancels_the_named_job_only() {
        let table = JobTable::new();
        let a = table.try_insert("a").unwrap();
        let b = table.try_insert("b").unwrap();
        assert!(table.stop("a"));
        assert!(!table.stop("zzz"));
        assert!(a.is_cancelled() && !b.is_cancelled());
        assert!(table.was_stopped("a") && !table.was_stopped("b"));
        assert_eq!(table.ids(), vec!["a", "b"]);
    }
}
