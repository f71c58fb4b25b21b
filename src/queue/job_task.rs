//! One job's life in the worker: journal it, run it (stream chunks posted in order while it runs,
//! the journal told before the first one), stop it (job-stop, deadline, shutdown grace), then
//! deliver its final body, with a small error report in place of a result that cannot be
//! delivered, and drop its journal entry (faults Q2, Q3, Q5, Q6, Q7, Q14).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::client::{log_undelivered, PostOutcome};
use super::log_limit::log_safe;
use super::spool::{SpoolError, SpooledResult};
use super::wire::{self, TakenJob};
use super::worker::{Counters, Shared, MAX_RESULT_BYTES, MAX_STREAM_CHUNK_BYTES};
use super::{JobRunner, JobSpec};
use crate::error::JobError;

/// `error_type` of a job a killed worker left unfinished and its successor did not run again.
pub(super) const WORKER_RESTARTED: &str = "worker_restarted";

/// How a job task starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    /// Just taken: journaled before anything else, then run with the full job deadline.
    Taken,
    /// A killed worker's job claimed from the journal (its entry already names this process):
    /// run again within what is left of its deadline.
    Resumed {
        /// Deadline left for this run.
        time_left: Duration,
    },
}

/// How a job's run ended.
enum Ending {
    Finished(Result<Value, JobError>),
    Stopped,
    GraceExpired,
    TimedOut,
    RunnerFailed,
}

/// Runs one job: chunks to job-stream in order, then the final body to job-done.
pub(super) async fn run_job_task<R: JobRunner>(
    shared: Arc<Shared<R>>,
    job: TakenJob,
    permit: Option<OwnedSemaphorePermit>,
    cancel: CancellationToken,
    semaphore: Arc<Semaphore>,
    start: Start,
) {
    let id = job.id.clone();
    // Before any work: a kill from here on leaves the job to the next worker on this directory.
    let (journaled, deadline) = match start {
        Start::Taken => (
            journal_record(&shared, &job).await,
            shared.settings.job_timeout,
        ),
        Start::Resumed { time_left } => (shared.journal.is_some(), time_left),
    };
    // A job beyond the slots we asked for (the platform sent more) waits for a free slot.
    let _permit = match permit {
        Some(permit) => Some(permit),
        None => tokio::select! {
            permit = semaphore.acquire_owned() => permit.ok(),
            () = shared.grace_expired.cancelled() => None,
            () = shared.runner_failed.cancelled() => None,
        },
    };
    let started = Instant::now();
    info!("Started.");
    let ending = if shared.runner_failed.is_cancelled() {
        Ending::RunnerFailed
    } else if shared.grace_expired.is_cancelled() {
        Ending::GraceExpired
    } else {
        execute(&shared, job, &cancel, deadline, journaled).await
    };
    // Whatever ended the run, make sure generation stops.
    cancel.cancel();
    let result = match ending {
        Ending::Finished(Err(JobError::Cancelled)) | Ending::Stopped
            if shared.table.was_stopped(&id) =>
        {
            Counters::bump(&shared.counters.stopped);
            info!("stopped by the job-stop channel; no result posted");
            journal_remove(&shared, &id).await;
            shared.table.remove(&id);
            return;
        }
        Ending::Finished(result) => result,
        Ending::Stopped => Err(JobError::Cancelled),
        Ending::GraceExpired => {
            Counters::bump(&shared.counters.shutdown_failed);
            Err(JobError::ShuttingDown(
                "the worker is shutting down and the job did not finish within the grace period"
                    .into(),
            ))
        }
        Ending::TimedOut => Err(JobError::Timeout(format!(
            "the job ran past its deadline of {} s",
            shared.settings.job_timeout.as_secs()
        ))),
        Ending::RunnerFailed => Err(JobError::Engine(format!(
            "the worker's engine failed and the worker is being replaced: {}",
            shared
                .runner_failure
                .get()
                .map_or("unhealthy", String::as_str)
        ))),
    };
    let body = match result {
        Ok(output) => wire::result_body(output),
        Err(error) => {
            info!(error_type = error.error_type(), "job failed");
            wire::error_body(
                error.error_type(),
                &error.to_string(),
                error.is_retryable(),
                &shared.identity,
            )
        }
    };
    deliver_final(&shared, &id, body).await;
    journal_remove(&shared, &id).await;
    shared.table.remove(&id);
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Finished."
    );
}

/// Runs the runner and the stream poster together until the job finishes, is stopped, times out
/// or the shutdown grace expires.
async fn execute<R: JobRunner>(
    shared: &Shared<R>,
    job: TakenJob,
    cancel: &CancellationToken,
    deadline: Duration,
    journaled: bool,
) -> Ending {
    let id = job.id.clone();
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Value>(shared.settings.chunk_buffer.max(1));
    let run = shared.runner.run(
        JobSpec {
            id: job.id,
            input: job.input,
        },
        chunk_tx,
        cancel.clone(),
    );
    let poster = async {
        let mut sequence = 0u64;
        let mut marked = !journaled;
        while let Some(chunk) = chunk_rx.recv().await {
            sequence += 1;
            if shared.streams {
                if !marked {
                    // Output is about to leave: a restart must not run the job again.
                    marked = true;
                    journal_mark_streamed(shared, &id).await;
                }
                post_chunk(shared, &id, sequence, chunk).await;
            }
        }
    };
    let work = async { tokio::join!(run, poster).0 };
    tokio::select! {
        biased;
        () = cancel.cancelled() => Ending::Stopped,
        () = shared.runner_failed.cancelled() => Ending::RunnerFailed,
        () = shared.grace_expired.cancelled() => Ending::GraceExpired,
        finished = tokio::time::timeout(deadline, work) => match finished {
            Ok(result) => Ending::Finished(result),
            Err(_elapsed) => Ending::TimedOut,
        },
    }
}

/// Posts one chunk; a chunk that cannot be delivered is logged and skipped (the final result
/// carries every chunk).
async fn post_chunk<R>(shared: &Shared<R>, id: &str, sequence: u64, chunk: Value) {
    let body = wire::stream_body(chunk).to_string();
    if body.len() > MAX_STREAM_CHUNK_BYTES {
        if let Some(suppressed) = shared.log_limit.allow("stream chunk too large") {
            warn!(
                sequence,
                bytes = body.len(),
                suppressed,
                "stream chunk over 1 MB not streamed (kept in the final result)"
            );
        }
        return;
    }
    let outcome = shared
        .client
        .post_stream(id, &body, shared.settings.stream_retry)
        .await;
    if !matches!(outcome, PostOutcome::Delivered { .. }) {
        // A dead stream endpoint fails every chunk of every job: limited.
        if let Some(suppressed) = shared.log_limit.allow("stream chunk undelivered") {
            log_undelivered(
                id,
                &format!("stream chunk {sequence} ({suppressed} similar lines suppressed)"),
                &outcome,
            );
        }
    }
}

/// Reports a job failed without running it (malformed job with an id).
pub(super) async fn report_failure<R>(shared: Arc<Shared<R>>, id: String, error: JobError) {
    let body = wire::error_body(
        error.error_type(),
        &error.to_string(),
        error.is_retryable(),
        &shared.identity,
    );
    deliver_final(&shared, &id, body).await;
}

/// Reports a job a killed worker left unfinished as failed (`worker_restarted`, retryable) without
/// running it, then drops its journal entry and its table slot.
pub(super) async fn report_restarted<R>(shared: Arc<Shared<R>>, id: String, message: String) {
    info!(error_type = WORKER_RESTARTED, %message, "job of a killed worker reported failed");
    let body = wire::error_body(WORKER_RESTARTED, &message, true, &shared.identity);
    deliver_final(&shared, &id, body).await;
    journal_remove(&shared, &id).await;
    shared.table.remove(&id);
}

/// Journals a just-taken job; false (logged) when there is no journal or the entry could not be
/// written (the job still runs, unprotected against a kill).
async fn journal_record<R>(shared: &Shared<R>, job: &TakenJob) -> bool {
    let Some(journal) = shared.journal.clone() else {
        return false;
    };
    let entry = journal.entry_for(&job.id, &shared.spool_endpoint, job.input.clone());
    match tokio::task::spawn_blocking(move || journal.record(&entry)).await {
        Ok(Ok(_path)) => true,
        Ok(Err(error)) => {
            if let Some(suppressed) = shared.log_limit.allow("journal record failed") {
                warn!(%error, suppressed, "job not journaled: a kill during it would leave it to the platform's timeout");
            }
            false
        }
        Err(error) => {
            warn!(%error, "journal task failed; job not journaled");
            false
        }
    }
}

/// Marks a journaled job as streamed. When the marker cannot be written the entry is dropped
/// instead: a job lost to a kill is better than one whose stream a restart would send twice.
async fn journal_mark_streamed<R>(shared: &Shared<R>, id: &str) {
    let Some(journal) = shared.journal.clone() else {
        return;
    };
    let owned = id.to_owned();
    let outcome = tokio::task::spawn_blocking(move || {
        journal.mark_streamed(&owned).or_else(|error| {
            warn!(%error, "journal marker not written: dropping the entry (the job is no longer protected against a kill)");
            journal.remove(&owned)
        })
    })
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            error!(job_id = %log_safe(id), %error, "journal entry of a streaming job could not be marked or removed");
        }
        Err(error) => {
            error!(job_id = %log_safe(id), %error, "journal marker task failed");
        }
    }
}

/// Deletes a job's journal entry (its result was delivered, spooled or given up on).
pub(super) async fn journal_remove<R>(shared: &Shared<R>, id: &str) {
    let Some(journal) = shared.journal.clone() else {
        return;
    };
    let owned = id.to_owned();
    match tokio::task::spawn_blocking(move || journal.remove(&owned)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            warn!(job_id = %log_safe(id), %error, "journal entry could not be removed")
        }
        Err(error) => warn!(job_id = %log_safe(id), %error, "journal removal task failed"),
    }
}

/// Writes a final body to the spool (when there is one) before it is posted; a failure is
/// logged and the post goes on. Returns whether the entry was written.
async fn spool_store<R>(shared: &Shared<R>, id: &str, text: &str) -> bool {
    let Some(spool) = shared.spool.clone() else {
        return false;
    };
    let entry = SpooledResult {
        job_id: id.to_owned(),
        is_stream: true,
        body: text.to_owned(),
        endpoint: shared.spool_endpoint.clone(),
    };
    match tokio::task::spawn_blocking(move || spool.store(&entry)).await {
        Ok(Ok(_path)) => true,
        Ok(Err(error @ SpoolError::Full { .. })) => {
            warn!(job_id = %log_safe(id), %error, "result not spooled: the spool is over its bounds");
            false
        }
        Ok(Err(error)) => {
            warn!(job_id = %log_safe(id), %error, "result not spooled");
            false
        }
        Err(error) => {
            warn!(job_id = %log_safe(id), %error, "spool task failed; result not spooled");
            false
        }
    }
}

/// Deletes a job's spool entry (after an acknowledgement or a 404/410).
async fn spool_remove<R>(shared: &Shared<R>, id: &str) {
    if let Some(spool) = &shared.spool {
        super::spool::remove_logged(&spool.path_for(id)).await;
    }
}

/// Posts a final body (spooled first, the entry deleted once acknowledged); when it cannot be
/// delivered, posts a small error report instead, and logs the loss if even that fails, keeping
/// the spool entry for a replay. Never silent.
async fn deliver_final<R>(shared: &Shared<R>, id: &str, body: Value) {
    let failed = wire::is_error_body(&body);
    let text = body.to_string();
    let mut spooled = false;
    let outcome = if text.len() > MAX_RESULT_BYTES {
        PostOutcome::Rejected { status: 413 }
    } else {
        spooled = spool_store(shared, id, &text).await;
        if spooled {
            // The spool now carries the job to its end, across restarts too.
            journal_remove(shared, id).await;
        }
        shared
            .client
            .post_done(id, &text, true, shared.settings.result_retry)
            .await
    };
    let exhausted = matches!(outcome, PostOutcome::Exhausted { .. });
    let reason = match outcome {
        PostOutcome::Delivered { attempts } => {
            debug!(attempts, "result delivered");
            spool_remove(shared, id).await;
            Counters::bump(if failed {
                &shared.counters.failed
            } else {
                &shared.counters.completed
            });
            return;
        }
        PostOutcome::Gone { status } => {
            // The platform dropped the job (cancelled, TTL): nothing left to deliver to.
            warn!(
                job_id = %log_safe(id),
                status, "result not accepted: the platform no longer knows the job"
            );
            spool_remove(shared, id).await;
            Counters::bump(&shared.counters.undelivered);
            return;
        }
        PostOutcome::Rejected { status } if text.len() > MAX_RESULT_BYTES => {
            format!(
                "result of {} bytes exceeds the {MAX_RESULT_BYTES}-byte limit ({status})",
                text.len()
            )
        }
        PostOutcome::Rejected { status } => {
            format!("job-done refused the result with status {status}")
        }
        PostOutcome::Exhausted {
            attempts,
            last_error,
        } => {
            format!("job-done failed {attempts} times, last: {last_error}")
        }
    };
    warn!(job_id = %log_safe(id), %reason, "result not delivered: posting a small error report instead");
    let fallback = wire::error_body("result_delivery", &reason, true, &shared.identity).to_string();
    match shared
        .client
        .post_done(id, &fallback, true, shared.settings.result_retry)
        .await
    {
        PostOutcome::Delivered { .. } => {
            // The job has its terminal answer: replaying the result later would contradict it.
            spool_remove(shared, id).await;
            Counters::bump(&shared.counters.failed);
        }
        fallback_outcome @ PostOutcome::Gone { .. } => {
            spool_remove(shared, id).await;
            Counters::bump(&shared.counters.undelivered);
            log_undelivered(id, "fallback error report", &fallback_outcome);
        }
        outcome => {
            Counters::bump(&shared.counters.undelivered);
            log_undelivered(id, "fallback error report", &outcome);
            // Keep for a replay what has a chance there: the result itself when the platform was
            // unreachable, the error report when the platform refused the result.
            let kept = if exhausted {
                spooled
            } else {
                let stored = spool_store(shared, id, &fallback).await;
                if !stored {
                    // The refused result itself is no use in a replay.
                    spool_remove(shared, id).await;
                }
                stored
            };
            if kept {
                error!(job_id = %log_safe(id), %reason, "result not delivered yet: spooled, replayed at shutdown and at the next start");
            } else {
                error!(job_id = %log_safe(id), %reason, "RESULT LOST: neither the result nor the error report was delivered");
            }
        }
    }
}
