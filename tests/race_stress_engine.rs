//! Race stress for the engine's health counters (fault S7 in `docs/ROBUSTNESS.md`): beats, step
//! starts and ends, failures and liveness checks from several threads at once; the first failure
//! reason must stick. Companion of `tests/race_stress.rs` (kept apart because the ThreadSanitizer
//! crate `tsan/` builds the model-free modules only). `WICK_RACE_ROUNDS` as there.
#![allow(clippy::unwrap_used)]

mod race_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use race_support::{rounds, Rng};
use wick::engine::EngineStats;

#[test]
fn engine_health_keeps_the_first_failure_under_concurrent_beats_and_checks() {
    let rounds = rounds();
    for round in 0..rounds.div_ceil(10) {
        let stats = Arc::new(EngineStats::default());
        let reasons: Vec<String> = (0..3)
            .map(|t| format!("failure {t} of round {round}"))
            .collect();
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let (stats, reasons) = (Arc::clone(&stats), reasons.clone());
                thread::spawn(move || {
                    let mut rng = Rng::new(((round as u64) << 2) | t);
                    let mut seen = None;
                    for _ in 0..10 {
                        rng.jitter();
                        match t {
                            0 => stats.beat(),
                            1 => stats.set_busy(rng.below(2) == 0),
                            _ => {
                                if rng.below(4) == 0 {
                                    stats.mark_failed(reasons[rng.below(3) as usize].clone());
                                }
                            }
                        }
                        // Once failed, the reported reason never changes.
                        if let Some(reason) = stats.check_liveness() {
                            if let Some(first) = &seen {
                                assert_eq!(&reason, first, "round {round}");
                            }
                            seen = Some(reason);
                        }
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        if let Some(reason) = stats.check_liveness() {
            assert!(reasons.contains(&reason), "round {round}: {reason}");
            assert!(stats.failed.load(Ordering::Acquire));
        }
    }
}
