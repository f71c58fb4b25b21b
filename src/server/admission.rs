//! Bounded admission. A request is admitted only while fewer than `run_slots + max_waiting` are in
//! flight (otherwise 429); an admitted request then waits for one of `run_slots` run permits before it
//! reaches the engine. Both are released by dropping the permits, so no path can leak a slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The admission gate shared by every route that generates.
#[derive(Debug)]
pub struct Admission {
    in_flight: AtomicUsize,
    running: AtomicUsize,
    capacity: usize,
    run_slots: Arc<Semaphore>,
}

/// Proof of admission; dropping it frees the place in the queue.
#[derive(Debug)]
pub struct AdmissionPermit {
    admission: Arc<Admission>,
}

/// Proof of a run slot; dropping it lets the next waiting request run.
#[derive(Debug)]
pub struct RunPermit {
    admission: Arc<Admission>,
    _slot: OwnedSemaphorePermit,
}

impl Admission {
    /// A gate with `run_slots` concurrent executions and room for `max_waiting` more.
    pub fn new(run_slots: usize, max_waiting: usize) -> Arc<Self> {
        let run_slots = run_slots.max(1);
        Arc::new(Admission {
            in_flight: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            capacity: run_slots.saturating_add(max_waiting),
            run_slots: Arc::new(Semaphore::new(run_slots)),
        })
    }

    /// Admits one request, or `None` when `running + waiting` is at capacity.
    pub fn try_admit(self: &Arc<Self>) -> Option<AdmissionPermit> {
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| AdmissionPermit {
            admission: Arc::clone(self),
        })
    }

    /// Admitted requests not yet finished (running + waiting).
    pub fn queue_depth(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Requests holding a run slot.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Admitted requests waiting for a run slot.
    pub fn waiting(&self) -> usize {
        self.queue_depth().saturating_sub(self.running())
    }

    /// Most requests admitted at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl AdmissionPermit {
    /// Waits for a run slot (the caller bounds this wait with the request deadline).
    pub async fn run_slot(&self) -> RunPermit {
        let slot = Arc::clone(&self.admission.run_slots)
            .acquire_owned()
            .await
            .expect("the run-slot semaphore is never closed: invariant");
        self.admission.running.fetch_add(1, Ordering::AcqRel);
        RunPermit {
            admission: Arc::clone(&self.admission),
            _slot: slot,
        }
    }
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for RunPermit {
    fn drop(&mut self) {
        self.admission.running.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_beyond_running_plus_waiting() {
        let gate = Admission::new(1, 1);
        let a = gate.try_admit().unwrap();
        let b = gate.try_admit().unwrap();
        assert!(gate.try_admit().is_none());
        let run_a = a.run_slot().await;
        assert_eq!(
            (gate.running(), gate.waiting(), gate.queue_depth()),
            (1, 1, 2)
        );
        drop(run_a);
        drop(a);
        assert_eq!(gate.queue_depth(), 1);
        let c = gate.try_admit().unwrap();
        let _run_b = b.run_slot().await;
        assert_eq!((gate.running(), gate.waiting()), (1, 1));
        drop(c);
        assert_eq!(gate.waiting(), 0);
    }

    #[tokio::test]
    async fn run_slot_waits_for_a_free_slot() {
        let gate = Admission::new(1, 4);
        let a = gate.try_admit().unwrap();
        let b = gate.try_admit().unwrap();
        let run_a = a.run_slot().await;
        let waiter = tokio::spawn(async move {
            let _slot = b.run_slot().await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(run_a);
        waiter.await.unwrap();
        drop(a);
        assert_eq!(gate.queue_depth(), 0);
        assert_eq!(gate.running(), 0);
    }
}
