//! Shared by the tests that drive the real `wick` binary as a worker process
//! (`queue_journal.rs`, `queue_sigterm.rs`, `queue_startup.rs`, `harness_load_sigterm.rs`): how to
//! launch it on the tiny llama fixture.

use std::path::PathBuf;

use wick::harness::WorkerLaunch;

/// `wick` on `tests/fixtures/tiny-llama`, offline, one compute thread, plus `extra_env`; stderr to
/// `log` (inherited when `None`).
pub fn tiny_llama_worker(
    extra_env: &[(&str, String)],
    log: Option<PathBuf>,
    ping_interval_ms: u64,
    grace_secs: u64,
) -> WorkerLaunch {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let mut env: Vec<(String, String)> = vec![
        ("MODEL_NAME".into(), model.display().to_string()),
        ("RAYON_NUM_THREADS".into(), "1".into()),
        ("CANDLE_NUM_THREADS".into(), "1".into()),
        ("HF_HUB_OFFLINE".into(), "1".into()),
    ];
    env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    WorkerLaunch {
        wick: PathBuf::from(env!("CARGO_BIN_EXE_wick")),
        args: Vec::new(),
        env,
        log,
        ping_interval_ms,
        grace_secs,
    }
}
