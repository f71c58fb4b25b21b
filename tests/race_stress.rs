//! Race stress for the shared state (fault S7 in `docs/ROBUSTNESS.md`): random interleavings of
//! submit / start / stream / cancel / purge / finish / status on the job store, duplicate takes and
//! job-stops on the in-flight table, and admit / run-slot / drop on the admission gate, from several
//! std threads and a multi-thread tokio runtime.
//! After every round the invariants are checked: a cancelled job never reports another end, every
//! job ends in exactly one terminal state, no job or streamed item is lost, and the counts add up.
//!
//! Rounds per test: 1,000 by default (a few seconds in a debug build); `WICK_RACE_ROUNDS` sets
//! another number (`scripts/robustness tsan` runs 10,000 under ThreadSanitizer, building these
//! modules through the `tsan/` crate, which is why this file uses nothing else of wick).
#![allow(clippy::unwrap_used)]

mod race_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use race_support::{rounds, Rng};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wick::error::JobError;
use wick::queue::table::JobTable;
use wick::server::admission::Admission;
use wick::server::store::{JobStatus, JobStore};

/// Hang guard for a wait that must end (never reached when the code is right).
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// What each actor did in one store round.
#[derive(Debug, Default)]
struct StoreRound {
    started: Option<bool>,
    items_pushed: usize,
    finish: Option<JobStatus>,
    intended: Option<JobStatus>,
    cancel: Option<JobStatus>,
    purged: usize,
    observed: Vec<JobStatus>,
    items_seen: usize,
}

/// The statuses one observer saw must move forward only: IN_QUEUE, then IN_PROGRESS, then one
/// final status that never changes.
fn assert_monotonic(round: usize, seen: &[JobStatus]) {
    let rank = |s: JobStatus| match s {
        JobStatus::InQueue => 0,
        JobStatus::InProgress => 1,
        _ => 2,
    };
    for pair in seen.windows(2) {
        assert!(
            rank(pair[0]) <= rank(pair[1]),
            "round {round}: status went back {:?} -> {:?} in {seen:?}",
            pair[0],
            pair[1]
        );
        if pair[0].is_final() {
            assert_eq!(
                pair[0], pair[1],
                "round {round}: final status changed: {seen:?}"
            );
        }
    }
}

#[test]
fn store_cancel_finish_interleavings_end_each_job_in_exactly_one_terminal_state() {
    let rounds = rounds();
    // Retention and cap large enough that no job of this test is evicted.
    let store = Arc::new(JobStore::new(Duration::from_secs(3600), rounds + 1));
    // main + runner + canceller + purger + observer
    let start = Arc::new(Barrier::new(5));
    let end = Arc::new(Barrier::new(5));
    let round_log: Arc<Mutex<StoreRound>> = Arc::default();
    let tokens: Arc<Mutex<Option<CancellationToken>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    let spawn_actor = |role: u64, body: fn(usize, &mut Rng, &JobStore, &Mutex<StoreRound>)| {
        let (store, start, end, log, stop) = (
            Arc::clone(&store),
            Arc::clone(&start),
            Arc::clone(&end),
            Arc::clone(&round_log),
            Arc::clone(&stop),
        );
        thread::spawn(move || {
            let mut round = 0;
            loop {
                start.wait();
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let mut rng = Rng::new(((round as u64) << 3) | role);
                rng.jitter();
                body(round, &mut rng, &store, &log);
                end.wait();
                round += 1;
            }
        })
    };

    // The runner: start, stream a few items, end with a random result.
    let runner = spawn_actor(1, |round, rng, store, log| {
        let id = format!("job-{round}");
        let started = store.mark_started(&id);
        let mut pushed = 0;
        if started {
            for i in 0..rng.below(4) {
                rng.jitter();
                store.push_item(&id, json!(i));
                pushed += 1;
            }
        }
        rng.jitter();
        let (result, intended) = match rng.below(3) {
            0 => (Ok(json!({"round": round})), JobStatus::Completed),
            1 => (Err(JobError::Engine("boom".into())), JobStatus::Failed),
            _ => (
                Err(JobError::Timeout("deadline".into())),
                JobStatus::TimedOut,
            ),
        };
        // A job that never started still gets a finish (the run path always reports one).
        let finish = store.finish(&id, result);
        let mut log = log.lock().unwrap();
        log.started = Some(started);
        log.items_pushed = pushed;
        log.finish = finish;
        log.intended = Some(intended);
    });
    let canceller = spawn_actor(2, |round, rng, store, log| {
        rng.jitter();
        let cancel = store.cancel(&format!("job-{round}"));
        log.lock().unwrap().cancel = cancel;
    });
    let purger = spawn_actor(3, |_round, rng, store, log| {
        rng.jitter();
        let purged = if rng.below(2) == 0 {
            store.purge_queued()
        } else {
            0
        };
        log.lock().unwrap().purged = purged;
    });
    let observer = spawn_actor(4, |round, rng, store, log| {
        let id = format!("job-{round}");
        let mut observed = Vec::new();
        let mut items = 0;
        for _ in 0..6 {
            rng.jitter();
            observed.push(store.status(&id).unwrap());
            if let Some((status, body)) = store.take_stream(&id) {
                items += body["stream"].as_array().unwrap().len();
                observed.push(status);
            }
            // `counts` walks every stored job: sample it, or the test grows quadratically.
            if round % 64 == 0 {
                let counts = store.counts();
                assert!(
                    counts.in_queue + counts.in_progress <= 1,
                    "round {round}: {counts:?}"
                );
            }
        }
        let mut log = log.lock().unwrap();
        log.observed = observed;
        log.items_seen = items;
    });

    let mut expected_completed = 0;
    let mut expected_failed = 0;
    let mut expected_cancelled = 0;
    for round in 0..rounds {
        let id = format!("job-{round}");
        let token = CancellationToken::new();
        store.insert(&id, json!({"round": round}), None, token.clone());
        *tokens.lock().unwrap() = Some(token.clone());
        *round_log.lock().unwrap() = StoreRound::default();
        start.wait();
        end.wait();

        let log = std::mem::take(&mut *round_log.lock().unwrap());
        let final_status = store.status(&id).unwrap();
        assert!(
            final_status.is_final(),
            "round {round}: ended {final_status:?}"
        );
        assert_monotonic(round, &log.observed);
        if let Some(last) = log.observed.last() {
            if last.is_final() {
                assert_eq!(*last, final_status, "round {round}");
            }
        }
        // Exactly one terminal transition: the cancel, the purge, or the finish.
        let cancel_won =
            log.cancel == Some(JobStatus::Cancelled) && final_status == JobStatus::Cancelled;
        let finish_won = log.finish == log.intended;
        let winners =
            usize::from(cancel_won && log.purged == 0) + log.purged + usize::from(finish_won);
        assert_eq!(winners, 1, "round {round}: {log:?}, final {final_status:?}");
        // Whoever answered afterwards saw the winner's status.
        assert_eq!(log.finish, Some(final_status), "round {round}: {log:?}");
        assert_eq!(log.cancel, Some(final_status), "round {round}: {log:?}");
        if final_status == JobStatus::Cancelled {
            assert!(
                token.is_cancelled(),
                "round {round}: cancelled job's token not fired"
            );
            expected_cancelled += 1;
        } else {
            assert_eq!(Some(final_status), log.intended, "round {round}: {log:?}");
            assert!(
                !token.is_cancelled(),
                "round {round}: {final_status:?} job's token fired"
            );
            if final_status == JobStatus::Completed {
                expected_completed += 1;
            } else {
                expected_failed += 1;
            }
        }
        // A job cancelled before it started never runs; a job the purge took was still queued.
        if log.started == Some(false) {
            assert_eq!(final_status, JobStatus::Cancelled, "round {round}: {log:?}");
        }
        if log.purged == 1 {
            assert_eq!(
                log.started,
                Some(false),
                "round {round}: purge took a running job"
            );
        }
        // No streamed item lost or duplicated.
        let (_, rest) = store.take_stream(&id).unwrap();
        let left = rest["stream"].as_array().unwrap().len();
        assert_eq!(
            log.items_seen + left,
            log.items_pushed,
            "round {round}: {log:?}"
        );
        // A cancel after the end changes nothing.
        assert_eq!(store.cancel(&id), Some(final_status));
        assert_eq!(store.finish(&id, Ok(json!("late"))), Some(final_status));
    }
    stop.store(true, Ordering::Release);
    start.wait();
    for actor in [runner, canceller, purger, observer] {
        actor.join().unwrap();
    }

    // No job lost, and the counts add up.
    assert_eq!(store.len(), rounds);
    let counts = store.counts();
    assert_eq!((counts.in_queue, counts.in_progress), (0, 0));
    assert_eq!(counts.completed, expected_completed);
    assert_eq!(counts.failed, expected_failed);
    assert_eq!(
        expected_completed + expected_failed + expected_cancelled,
        rounds
    );
}

#[test]
fn waiters_on_the_store_notifier_see_every_end_on_a_multi_thread_runtime() {
    let rounds = rounds();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(JobStore::new(Duration::from_secs(3600), rounds + 1));
    let ends: Arc<Mutex<BTreeMap<&'static str, usize>>> = Arc::default();
    rt.block_on(async {
        // Batches of concurrent jobs, each with a runner, a canceller and a `/runsync`-style waiter.
        const BATCH: usize = 20;
        let mut round = 0;
        while round < rounds {
            let mut tasks = Vec::new();
            for r in round..(round + BATCH).min(rounds) {
                let id = format!("job-{r}");
                let token = CancellationToken::new();
                store.insert(&id, json!({}), None, token.clone());
                let mut rng = Rng::new(r as u64);
                let cancel_first = rng.below(3) == 0;
                let cancel_at_all = rng.below(2) == 0;
                let (s, i) = (Arc::clone(&store), id.clone());
                tasks.push(tokio::spawn(async move {
                    if !s.mark_started(&i) {
                        // Cancelled before it started: the run path ends it as cancelled.
                        assert!(token.is_cancelled());
                        s.finish(&i, Err(JobError::Cancelled));
                        return;
                    }
                    s.push_item(&i, json!("t"));
                    tokio::task::yield_now().await;
                    let result = if token.is_cancelled() {
                        Err(JobError::Cancelled)
                    } else {
                        Ok(json!("done"))
                    };
                    s.finish(&i, result);
                }));
                if cancel_at_all {
                    let (s, i) = (Arc::clone(&store), id.clone());
                    tasks.push(tokio::spawn(async move {
                        if !cancel_first {
                            tokio::task::yield_now().await;
                        }
                        s.cancel(&i);
                    }));
                }
                let (s, i, ends) = (Arc::clone(&store), id, Arc::clone(&ends));
                tasks.push(tokio::spawn(async move {
                    let notify = s.notifier(&i).unwrap();
                    let status = loop {
                        // Register interest before looking, so an end between the two is not missed.
                        let notified = notify.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        let status = s.status(&i).unwrap();
                        if status.is_final() {
                            break status;
                        }
                        tokio::time::timeout(WAIT_LIMIT, notified)
                            .await
                            .expect("a waiter missed the job's end");
                    };
                    *ends
                        .lock()
                        .unwrap()
                        .entry(status.outcome_label())
                        .or_default() += 1;
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            round += BATCH;
        }
    });
    let ends = ends.lock().unwrap();
    let completed = ends.get("completed").copied().unwrap_or(0);
    let cancelled = ends.get("cancelled").copied().unwrap_or(0);
    assert_eq!(
        completed + cancelled,
        rounds,
        "every waiter saw one end: {ends:?}"
    );
    let counts = store.counts();
    assert_eq!(counts.completed, completed);
    assert_eq!(
        (counts.in_queue, counts.in_progress, counts.failed),
        (0, 0, 0)
    );
    assert_eq!(store.len(), rounds);
}

#[test]
fn duplicate_takes_and_job_stops_on_the_table_race_safely() {
    let rounds = rounds();
    let table = Arc::new(JobTable::new());
    let start = Arc::new(Barrier::new(4));
    let end = Arc::new(Barrier::new(4));
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(AtomicUsize::new(0));
    let stopped_hits = Arc::new(AtomicUsize::new(0));
    let mut actors = Vec::new();
    // Two takers (a duplicate delivery) and a job-stop poller, all on the same id per round.
    for role in 0..3u64 {
        let (table, start, end, stop) = (
            Arc::clone(&table),
            Arc::clone(&start),
            Arc::clone(&end),
            Arc::clone(&stop),
        );
        let (taken, stopped_hits) = (Arc::clone(&taken), Arc::clone(&stopped_hits));
        actors.push(thread::spawn(move || {
            let mut round = 0usize;
            loop {
                start.wait();
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let id = format!("job-{round}");
                let mut rng = Rng::new(((round as u64) << 2) | role);
                rng.jitter();
                if role < 2 {
                    if let Some(token) = table.try_insert(&id) {
                        taken.fetch_add(1, Ordering::AcqRel);
                        rng.jitter();
                        assert!(table.ids().contains(&id));
                        rng.jitter();
                        // The job ends: a stopped job posts no result, and its token has fired.
                        if table.was_stopped(&id) {
                            assert!(
                                token.is_cancelled(),
                                "round {round}: stopped but not cancelled"
                            );
                        }
                        table.remove(&id);
                    }
                } else {
                    for _ in 0..3 {
                        if table.stop(&id) {
                            stopped_hits.fetch_add(1, Ordering::AcqRel);
                            break;
                        }
                        rng.jitter();
                    }
                    let _ = table.oldest_age_secs();
                }
                end.wait();
                round += 1;
            }
        }));
    }
    let mut taken_before = 0;
    for round in 0..rounds {
        start.wait();
        end.wait();
        let now = taken.load(Ordering::Acquire);
        // Both takers saw the id free only if the first had already removed it; at least one took it.
        assert!(
            (1..=2).contains(&(now - taken_before)),
            "round {round}: {} takes",
            now - taken_before
        );
        taken_before = now;
        assert!(
            table.is_empty(),
            "round {round}: {:?} left in flight",
            table.ids()
        );
    }
    stop.store(true, Ordering::Release);
    start.wait();
    for actor in actors {
        actor.join().unwrap();
    }
    assert!(stopped_hits.load(Ordering::Acquire) <= rounds);
    assert_eq!(table.len(), 0);
}

#[test]
fn admission_slots_never_exceed_their_bounds_under_random_admit_and_drop() {
    let rounds = rounds();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    const RUN_SLOTS: usize = 2;
    const MAX_WAITING: usize = 3;
    let gate = Admission::new(RUN_SLOTS, MAX_WAITING);
    let admitted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for r in 0..rounds {
            let (gate, admitted, refused) = (
                Arc::clone(&gate),
                Arc::clone(&admitted),
                Arc::clone(&refused),
            );
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(r as u64);
                let Some(permit) = gate.try_admit() else {
                    refused.fetch_add(1, Ordering::AcqRel);
                    return;
                };
                admitted.fetch_add(1, Ordering::AcqRel);
                assert!(gate.queue_depth() <= gate.capacity());
                if rng.below(4) == 0 {
                    // A client that gave up while waiting (its reply channel dropped).
                    return;
                }
                let slot = tokio::time::timeout(WAIT_LIMIT, permit.run_slot())
                    .await
                    .expect("run slot never freed");
                assert!(gate.running() <= RUN_SLOTS, "running {}", gate.running());
                if rng.below(2) == 0 {
                    tokio::task::yield_now().await;
                }
                drop(slot);
            }));
            if r % 16 == 15 {
                tokio::task::yield_now().await;
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    assert_eq!(
        admitted.load(Ordering::Acquire) + refused.load(Ordering::Acquire),
        rounds
    );
    assert!(admitted.load(Ordering::Acquire) >= 1);
    assert_eq!((gate.queue_depth(), gate.running()), (0, 0));
}
