//! `wick-harness kill`: SIGKILL the worker at random moments during generation, N times, each time
//! starting a fresh worker on the same spool directory (so it finds the taken-job journal its killed
//! predecessor left), then let a last worker finish everything and report every job's end: completed
//! (first run or run again after the kill), failed with its reason (`worker_restarted` for jobs
//! reported instead of run again), or lost (still in progress at the end: must be 0).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

use super::cases;
use super::platform::{JobStatus, Platform, PlatformConfig, PlatformStats, Route};
use super::session::{summarize, HarnessError, JobSummary, WorkerLaunch, WorkerProcess};
use crate::queue::backoff::Jitter;

/// Settings of a kill run.
#[derive(Debug, Clone, PartialEq)]
pub struct KillOptions {
    /// Platform settings (faults included).
    pub platform: PlatformConfig,
    /// Where the platform listens (`127.0.0.1:0` for any free port).
    pub bind: SocketAddr,
    /// The worker to start (again and again). `WICK_SPOOL_DIR` in its environment is kept;
    /// otherwise a fresh directory under the system temp directory is used and removed after.
    pub worker: WorkerLaunch,
    /// Kills. In four of five trials the restarted worker first resolves the jobs its predecessor
    /// left before the trial's jobs are sent; in every fifth the next kill may hit those re-runs.
    pub trials: usize,
    /// Jobs submitted at the start of each trial.
    pub jobs_per_trial: usize,
    /// Job inputs, used in turn.
    pub inputs: Vec<Value>,
    /// The kill comes at a uniformly random moment up to this long after the trial's generation
    /// started (all its jobs taken and, when one streams, its first chunk arrived).
    pub kill_within: Duration,
    /// How long a started worker may take to take the trial's jobs.
    pub startup_timeout: Duration,
    /// How long the last worker gets to finish every job.
    pub finish_timeout: Duration,
    /// Seed of the kill moments (0: random).
    pub seed: u64,
}

/// How the jobs in flight at the kills ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AfterKill {
    /// Jobs in progress on the platform when their worker was killed (a job killed twice counts
    /// once).
    pub in_flight: usize,
    /// Of those, completed by a later worker (run again from the journal).
    pub completed: usize,
    /// Of those, reported failed, by `error_type`.
    pub failed: BTreeMap<String, usize>,
    /// Of those, reported failed, by error message (digits shown as `N`).
    pub failed_messages: BTreeMap<String, usize>,
    /// Of those, never given a final result (must be 0).
    pub lost: usize,
}

/// The result of a kill run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KillReport {
    /// Trials run.
    pub trials: usize,
    /// Kills that found at least one job in progress.
    pub kills_mid_generation: usize,
    /// Every job sent and how it ended.
    pub jobs: JobSummary,
    /// The jobs in flight at a kill and how they ended.
    pub after_kill: AfterKill,
    /// Platform counters (conflicting results must be 0).
    pub platform: PlatformStats,
    /// Milliseconds from a restart to every job the killed worker held being resolved (completed
    /// by a run again, or reported), in the trials that wait for it: median.
    pub resolved_p50_ms: u64,
    /// Largest of those.
    pub resolved_max_ms: u64,
    /// Exit code of the last worker after SIGTERM.
    pub final_worker_exit: Option<i32>,
    /// Wall time of the whole run.
    pub wall_secs: f64,
}

impl KillReport {
    /// Whether nothing was lost, no job got two different results, and the last worker exited 0.
    pub fn passed(&self) -> bool {
        self.jobs.lost == 0
            && self.after_kill.lost == 0
            && self.jobs.not_taken == 0
            && self.platform.conflicting_results == 0
            && self.final_worker_exit == Some(0)
    }
}

/// Runs the kill trials and the final drain.
///
/// # Errors
/// When the platform cannot start or a worker cannot be started, or exits on its own before it
/// took its jobs (a startup failure: see its log).
pub async fn run_kill(options: &KillOptions) -> Result<KillReport, HarnessError> {
    let started = Instant::now();
    let running = Platform::serve(options.platform.clone(), options.bind).await?;
    let platform = running.platform.clone();
    let env = running.worker_env();
    let (launch, temp_dir) = with_spool_dir(&options.worker);
    let mut dice = if options.seed == 0 {
        Jitter::new()
    } else {
        Jitter::from_seed(options.seed)
    };
    let inputs = if options.inputs.is_empty() {
        vec![Value::Null]
    } else {
        options.inputs.clone()
    };
    let streaming: Vec<bool> = inputs
        .iter()
        .map(|i| i.get("stream").and_then(Value::as_bool).unwrap_or(false))
        .collect();
    let mut killed_in_flight: BTreeSet<String> = BTreeSet::new();
    let mut kills_mid_generation = 0;
    let mut resolutions = Vec::new();
    let mut next_input = 0usize;
    let result = async {
        for trial in 0..options.trials {
            let spawned = Instant::now();
            let mut worker = WorkerProcess::spawn(&launch, &env)?;
            // Mostly the restarted worker first resolves what its predecessor left, so the kill
            // hits fresh jobs; every fifth trial it may still be running them again.
            let pending = killed_in_flight
                .iter()
                .any(|id| platform.job(id).is_some_and(|j| !j.status.is_terminal()));
            if trial % 5 != 4 && pending {
                // A job still unresolved by then is lost (counted at the end).
                let deadline = Instant::now() + options.finish_timeout.min(Duration::from_secs(20));
                while killed_in_flight
                    .iter()
                    .any(|id| platform.job(id).is_some_and(|j| !j.status.is_terminal()))
                {
                    if let Some(status) = worker.exit_status() {
                        return Err(HarnessError::WorkerExited(status.code()));
                    }
                    if Instant::now() >= deadline {
                        warn!(
                            "the restarted worker did not resolve its predecessor's jobs in time"
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                resolutions.push(spawned.elapsed());
            }
            let mut ids = Vec::new();
            let mut any_stream = false;
            for _ in 0..options.jobs_per_trial {
                let k = next_input % inputs.len();
                next_input += 1;
                any_stream |= streaming[k];
                ids.push((platform.submit(inputs[k].clone()), streaming[k]));
            }
            let deadline = Instant::now() + options.startup_timeout;
            loop {
                let jobs: Vec<_> = ids
                    .iter()
                    .filter_map(|(id, s)| platform.job(id).map(|j| (j, *s)))
                    .collect();
                // Generation has started once every job of the trial was taken and, when one
                // streams, its first chunk arrived (or everything already ended).
                let taken = jobs.iter().all(|(j, _)| j.status != JobStatus::InQueue);
                let generating = taken
                    && (!any_stream
                        || jobs.iter().any(|(j, s)| *s && !j.stream.is_empty())
                        || jobs.iter().all(|(j, _)| j.status.is_terminal()));
                if generating {
                    break;
                }
                if let Some(status) = worker.exit_status() {
                    return Err(HarnessError::WorkerExited(status.code()));
                }
                if Instant::now() >= deadline {
                    return Err(HarnessError::WorkerNotReady(options.startup_timeout));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(options.kill_within.mul_f64(dice.unit())).await;
            let in_flight: Vec<String> = platform
                .jobs()
                .into_iter()
                .filter(|j| j.status == JobStatus::InProgress)
                .map(|j| j.id)
                .collect();
            worker.sigkill()?;
            if worker.wait_exit(Duration::from_secs(30)).await.is_none() {
                warn!("killed worker did not exit");
            }
            kills_mid_generation += usize::from(!in_flight.is_empty());
            info!(trial, in_flight = in_flight.len(), "worker killed");
            killed_in_flight.extend(in_flight);
        }
        // The last worker resolves what the last kill left and finishes everything. It is
        // signalled only once it polls (before that, SIGTERM would find no handler installed).
        let takes_before = take_polls(&platform);
        let mut worker = WorkerProcess::spawn(&launch, &env)?;
        let deadline = Instant::now() + options.startup_timeout;
        while take_polls(&platform) == takes_before {
            if let Some(status) = worker.exit_status() {
                return Err(HarnessError::WorkerExited(status.code()));
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::WorkerNotReady(options.startup_timeout));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let deadline = Instant::now() + options.finish_timeout;
        while platform.jobs().iter().any(|j| !j.status.is_terminal()) && Instant::now() < deadline {
            if worker.has_exited() {
                warn!("the last worker exited before finishing the jobs");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Err(error) = worker.sigterm() {
            warn!(%error, "could not signal the last worker");
        }
        Ok(worker
            .wait_exit(Duration::from_secs(60))
            .await
            .and_then(|s| s.code()))
    }
    .await;
    let final_worker_exit = match result {
        Ok(code) => code,
        Err(error) => {
            running.stop().await;
            remove_temp_dir(temp_dir);
            return Err(error);
        }
    };
    let mut after_kill = AfterKill {
        in_flight: killed_in_flight.len(),
        ..AfterKill::default()
    };
    for id in &killed_in_flight {
        match platform.job(id) {
            Some(job) if job.status == JobStatus::Completed => after_kill.completed += 1,
            Some(job) if job.status == JobStatus::Failed => {
                let reason = job
                    .error
                    .as_deref()
                    .and_then(cases::error_type_of)
                    .unwrap_or_else(|| "unknown".into());
                *after_kill.failed.entry(reason).or_default() += 1;
                let message = job
                    .error
                    .as_deref()
                    .and_then(|e| serde_json::from_str::<Value>(e).ok())
                    .and_then(|e| {
                        e.get("error_message")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    })
                    .unwrap_or_default();
                let message: String = message
                    .chars()
                    .map(|c| if c.is_ascii_digit() { 'N' } else { c })
                    .collect();
                let message = message
                    .replace("NN", "N")
                    .replace("NN", "N")
                    .replace("NN", "N");
                *after_kill.failed_messages.entry(message).or_default() += 1;
            }
            Some(job) if job.status == JobStatus::Cancelled => {}
            _ => after_kill.lost += 1,
        }
    }
    resolutions.sort();
    let report = KillReport {
        trials: options.trials,
        kills_mid_generation,
        jobs: summarize(&platform),
        after_kill,
        platform: platform.stats(),
        resolved_p50_ms: resolutions
            .get(resolutions.len() / 2)
            .map_or(0, |d| d.as_millis() as u64),
        resolved_max_ms: resolutions.last().map_or(0, |d| d.as_millis() as u64),
        final_worker_exit,
        wall_secs: started.elapsed().as_secs_f64(),
    };
    running.stop().await;
    remove_temp_dir(temp_dir);
    Ok(report)
}

/// Job-take polls so far (single and batch).
fn take_polls(platform: &Platform) -> usize {
    platform.requests_to(Route::JobTake).len() + platform.requests_to(Route::JobTakeBatch).len()
}

/// The launch with `WICK_SPOOL_DIR` set: the caller's, or a fresh temp directory (returned for
/// removal).
fn with_spool_dir(launch: &WorkerLaunch) -> (WorkerLaunch, Option<PathBuf>) {
    if launch.env.iter().any(|(k, _)| k == "WICK_SPOOL_DIR") {
        return (launch.clone(), None);
    }
    let mut dice = Jitter::new();
    let dir = std::env::temp_dir().join(format!(
        "wick-harness-kill-{}-{:08x}",
        std::process::id(),
        (dice.unit() * f64::from(u32::MAX)) as u32
    ));
    let mut launch = launch.clone();
    launch
        .env
        .push(("WICK_SPOOL_DIR".into(), dir.display().to_string()));
    (launch, Some(dir))
}

fn remove_temp_dir(dir: Option<PathBuf>) {
    if let Some(dir) = dir {
        if let Err(error) = std::fs::remove_dir_all(&dir) {
            if error.kind() != std::io::ErrorKind::NotFound {
                warn!(%error, dir = %dir.display(), "kill run's spool directory could not be removed");
            }
        }
    }
}
