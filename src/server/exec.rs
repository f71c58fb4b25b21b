//! Running one admitted request or job through [`crate::job::run_job`], the one code path shared with
//! queue jobs: wait for a run slot (bounded by the deadline), run, forward every yielded item to a
//! sink, stop at the deadline or on cancel, and record timings (span fields and histograms).
//!
//! Cancel is by drop: when the cancel token fires or the deadline passes, the `run_job` future is
//! dropped, which drops its engine receivers, and the engine frees the sequences within one step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use super::admission::AdmissionPermit;
use super::store::{JobStatus, JobStore};
use super::AppState;
use crate::error::JobError;
use crate::job::{run_job_with_id, JobContext};

/// Items buffered between `run_job` and the sink.
const ITEM_CHANNEL_BOUND: usize = 64;

/// Where the yielded items go.
#[derive(Debug)]
pub enum ItemSink {
    /// Appended to a stored RunPod job (read by `/stream`).
    Store {
        /// The store.
        store: Arc<JobStore>,
        /// The job id.
        id: String,
    },
    /// Forwarded to an SSE response; a closed receiver cancels the job.
    Channel(mpsc::Sender<Value>),
    /// Dropped (non-streaming OpenAI requests: the result carries everything).
    Discard,
}

/// One admitted unit of work.
#[derive(Debug)]
pub struct JobRun {
    /// Job or request id (logs, spans, RunPod id).
    pub id: String,
    /// API family, for the span (`runpod` or `openai`).
    pub api: &'static str,
    /// The job input (`run_job`'s input shape).
    pub input: Value,
    /// The admission this run holds until it ends.
    pub permit: AdmissionPermit,
    /// Fires on `/cancel`, client disconnect or shutdown.
    pub cancel: CancellationToken,
    /// When the request was admitted.
    pub admitted_at: Instant,
    /// Absolute deadline (admission + request timeout).
    pub deadline: Instant,
    /// Narrower limit on execution alone (RunPod `policy.executionTimeout`).
    pub execution_timeout: Option<Duration>,
}

/// Timings of one run, for the span and metrics.
#[derive(Debug, Default)]
struct RunTimings {
    /// Whether the input asked for a stream (only then do items time tokens).
    streaming: bool,
    started: Option<Instant>,
    first_item: Option<Instant>,
    last_item: Option<Instant>,
    items: usize,
    /// Cumulative `usage.output` of the last native item (to count tokens per item).
    native_output_tokens: u64,
}

/// Runs `run` to its end: `on_start` is called once a run slot is held and may refuse (a job
/// cancelled while queued). Returns `run_job`'s result, or Cancelled / Timeout.
pub async fn execute(
    state: &AppState,
    ctx: &JobContext,
    run: JobRun,
    sink: ItemSink,
    on_start: impl FnOnce() -> bool,
) -> Result<Value, JobError> {
    let span = tracing::info_span!(
        "job",
        job_id = %run.id,
        api = run.api,
        queue_ms = field::Empty,
        ttft_ms = field::Empty,
        e2e_ms = field::Empty,
        items = field::Empty,
        outcome = field::Empty,
    );
    async move {
        let admitted_at = run.admitted_at;
        let mut timings = RunTimings::default();
        let mut dropped = DroppedRunRecorder { state, admitted_at, finished: false };
        let result = execute_inner(state, ctx, run, sink, on_start, &mut timings).await;
        dropped.finished = true;
        let now = Instant::now();
        let status = JobStatus::of_result(&result);
        record_timings(state, &timings, admitted_at, now);
        state.metrics.record_outcome(status.outcome_label());
        let span = tracing::Span::current();
        span.record("e2e_ms", millis(now.saturating_duration_since(admitted_at)));
        span.record("items", timings.items);
        span.record("outcome", status.outcome_label());
        match &result {
            Ok(_) => tracing::info!("job finished"),
            Err(err) => tracing::info!(error_type = err.error_type(), cause = %err, "job ended with an error"),
        }
        result
    }
    .instrument(span)
    .await
}

/// Counts a run whose future was dropped before it ended (a non-streaming client that went away:
/// hyper drops the handler, and with it the job and its engine sequences).
struct DroppedRunRecorder<'a> {
    state: &'a AppState,
    admitted_at: Instant,
    finished: bool,
}

impl Drop for DroppedRunRecorder<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let metrics = &self.state.metrics;
            metrics.e2e_latency.observe(self.admitted_at.elapsed());
            metrics.record_outcome(JobStatus::Cancelled.outcome_label());
            tracing::info!(
                "request dropped before it ended (client went away); generation cancelled"
            );
        }
    }
}

async fn execute_inner(
    state: &AppState,
    ctx: &JobContext,
    run: JobRun,
    sink: ItemSink,
    on_start: impl FnOnce() -> bool,
    timings: &mut RunTimings,
) -> Result<Value, JobError> {
    let JobRun {
        id,
        input,
        permit,
        cancel,
        admitted_at,
        deadline,
        execution_timeout,
        ..
    } = run;
    timings.streaming = is_streaming(&input);
    let deadline = tokio::time::Instant::from_std(deadline);
    let _slot = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(cancelled(state)),
        () = sleep_until(deadline) => {
            return Err(JobError::Timeout("the request waited for a free slot past its deadline".into()))
        }
        slot = permit.run_slot() => slot,
    };
    if !on_start() {
        return Err(cancelled(state));
    }
    let started = Instant::now();
    timings.started = Some(started);
    tracing::Span::current().record(
        "queue_ms",
        millis(started.saturating_duration_since(admitted_at)),
    );
    let run_deadline = match execution_timeout {
        Some(limit) => deadline.min(tokio::time::Instant::from_std(started) + limit),
        None => deadline,
    };

    let (items_tx, mut items_rx) = mpsc::channel(ITEM_CHANNEL_BOUND);
    let job_cancel = cancel.child_token();
    let job = run_job_with_id(ctx, &id, input, items_tx, job_cancel.clone());
    tokio::pin!(job);
    let mut result: Option<Result<Value, JobError>> = None;
    let mut items_open = true;
    // Drain items until the job returned and its sender is gone; the job future is dropped on
    // cancel or deadline, which cancels its engine sequences.
    while result.is_none() || items_open {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(cancelled(state)),
            () = sleep_until(run_deadline) => {
                job_cancel.cancel();
                return Err(JobError::Timeout(format!(
                    "the request ran past its deadline of {} s",
                    run_deadline.saturating_duration_since(tokio::time::Instant::from_std(admitted_at)).as_secs()
                )));
            }
            item = items_rx.recv(), if items_open => match item {
                Some(item) => {
                    note_item(state, timings, &item);
                    forward(&sink, item, run_deadline).await?;
                }
                None => items_open = false,
            },
            finished = &mut job, if result.is_none() => result = Some(finished),
        }
    }
    result.unwrap_or_else(|| Err(cancelled(state)))
}

/// The error of a cancelled run: shutting down when the server is stopping, else cancelled (by
/// `/cancel` or a client that went away).
fn cancelled(state: &AppState) -> JobError {
    if state.shutdown.is_cancelled() {
        JobError::ShuttingDown("the server is shutting down".into())
    } else {
        JobError::Cancelled
    }
}

/// Sends one item to the sink. A gone SSE client cancels the job.
async fn forward(
    sink: &ItemSink,
    item: Value,
    deadline: tokio::time::Instant,
) -> Result<(), JobError> {
    match sink {
        ItemSink::Store { store, id } => {
            store.push_item(id, item);
            Ok(())
        }
        ItemSink::Channel(sender) => {
            match tokio::time::timeout_at(deadline, sender.send(item)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(JobError::Cancelled),
                Err(_) => Err(JobError::Timeout(
                    "the client did not read the stream before the deadline".into(),
                )),
            }
        }
        ItemSink::Discard => Ok(()),
    }
}

/// Updates timings for one yielded item and records the inter-token gaps it closes (the gap since
/// the previous item, split evenly over the item's tokens).
fn note_item(state: &AppState, timings: &mut RunTimings, item: &Value) {
    let now = Instant::now();
    timings.items += 1;
    if !timings.streaming {
        return;
    }
    if timings.first_item.is_none() {
        timings.first_item = Some(now);
    }
    let tokens = tokens_in_item(item, timings.native_output_tokens);
    if let Some(output) = item
        .get("usage")
        .and_then(|u| u.get("output"))
        .and_then(Value::as_u64)
    {
        timings.native_output_tokens = output;
    }
    if tokens == 0 {
        return;
    }
    if let Some(last) = timings.last_item {
        let gap = now.saturating_duration_since(last);
        let per_token = gap / u32::try_from(tokens).unwrap_or(u32::MAX);
        state
            .metrics
            .inter_token_latency
            .observe_n(per_token, tokens);
    }
    timings.last_item = Some(now);
}

/// Whether a job input streams (native `stream`, or `stream` in an OpenAI body). A non-streaming
/// job yields one item at the end, which says nothing about token timing.
fn is_streaming(input: &Value) -> bool {
    let flag = |v: Option<&Value>| v.and_then(Value::as_bool).unwrap_or(false);
    flag(input.get("stream"))
        || flag(
            input
                .get("openai_input")
                .and_then(|body| body.get("stream")),
        )
}

/// Tokens an item carries: the `usage.output` growth for native items, else one per OpenAI chunk.
fn tokens_in_item(item: &Value, previous_output: u64) -> u64 {
    if let Some(output) = item
        .get("usage")
        .and_then(|u| u.get("output"))
        .and_then(Value::as_u64)
    {
        return output.saturating_sub(previous_output);
    }
    match item {
        Value::Array(chunks) => chunks.len() as u64,
        Value::String(text) => text.matches("data: {").count() as u64,
        _ => 1,
    }
}

/// Observes the histograms for a finished run.
fn record_timings(state: &AppState, timings: &RunTimings, admitted_at: Instant, now: Instant) {
    let metrics = &state.metrics;
    metrics
        .e2e_latency
        .observe(now.saturating_duration_since(admitted_at));
    if let Some(started) = timings.started {
        metrics
            .queue_time
            .observe(started.saturating_duration_since(admitted_at));
    }
    if let Some(first) = timings.first_item {
        let ttft = first.saturating_duration_since(admitted_at);
        metrics.time_to_first_token.observe(ttft);
        tracing::Span::current().record("ttft_ms", millis(ttft));
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn streaming_is_read_from_native_and_openai_inputs() {
        assert!(is_streaming(&json!({"prompt": "x", "stream": true})));
        assert!(is_streaming(
            &json!({"openai_route": "/v1/completions", "openai_input": {"stream": true}})
        ));
        assert!(!is_streaming(&json!({"prompt": "x"})));
        assert!(!is_streaming(&json!({"openai_input": {"stream": "yes"}})));
    }

    #[test]
    fn counts_tokens_per_item_shape() {
        assert_eq!(
            tokens_in_item(
                &json!({"choices": [], "usage": {"input": 3, "output": 9}}),
                3
            ),
            6
        );
        assert_eq!(
            tokens_in_item(&json!([{"choices": []}, {"choices": []}]), 0),
            2
        );
        assert_eq!(
            tokens_in_item(
                &json!("data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n"),
                0
            ),
            2
        );
    }
}
