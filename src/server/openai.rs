//! OpenAI-compatible handlers: `/v1/chat/completions` and `/v1/completions` (JSON, or SSE with
//! `stream: true`) and `/v1/models`. Bodies go to [`crate::job::run_job`] as an `openai_route` job,
//! so parsing, validation and response shaping are the queue's; this file only frames the result.
//!
//! SSE: headers are held until the first item or the end, so a request that fails before generating
//! keeps its HTTP status; afterwards each chunk object is one `data: {json}\n\n` event, an error is a
//! `data: {"error": {...}}` event, and the stream always ends with `data: [DONE]\n\n`. Dropping the
//! response body (client gone) cancels the job, which frees its engine sequences within one step.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::DropGuard;

use super::errors::{ApiError, Flavor};
use super::exec::{execute, ItemSink, JobRun};
use super::runpod::json_object;
use super::AppState;
use crate::error::JobError;

const FLAVOR: Flavor = Flavor::OpenAi;

/// Items buffered between the job and a slow SSE reader (backpressure beyond this).
const SSE_BUFFER: usize = 64;

/// `POST /v1/chat/completions`.
pub(super) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, "/v1/chat/completions", "chatcmpl-", body).await
}

/// `POST /v1/completions`.
pub(super) async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, "/v1/completions", "cmpl-", body).await
}

/// `GET /v1/models`: the model list object, from the same job code path.
pub(super) async fn models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let (items_tx, _items_rx) = mpsc::channel(4);
    let cancel = state.shutdown.child_token();
    let job = crate::job::run_job(
        &state.openai_ctx,
        json!({ "openai_route": "/v1/models" }),
        items_tx,
        cancel,
    );
    let result = tokio::time::timeout(state.settings.request_timeout, job)
        .await
        .unwrap_or_else(|_| Err(JobError::Timeout("listing models timed out".into())));
    match result {
        Ok(items) => single_item(items),
        Err(err) => Err(ApiError::from_job_error(&err, FLAVOR)),
    }
}

/// The one response object of a non-streaming OpenAI job.
fn single_item(items: Value) -> Result<Response, ApiError> {
    match items {
        Value::Array(mut items) if items.len() == 1 => Ok(Json(items.remove(0)).into_response()),
        other => {
            let shape = match &other {
                Value::Array(items) => format!("{} items", items.len()),
                _ => "not a list".to_string(),
            };
            tracing::error!(%shape, "an OpenAI job returned an unexpected output shape");
            Err(ApiError::from_job_error(
                &JobError::Engine(format!("unexpected output shape: {shape}")),
                FLAVOR,
            ))
        }
    }
}

async fn generate(
    state: Arc<AppState>,
    route: &'static str,
    id_prefix: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_object(body, FLAVOR)?;
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let permit = state
        .admission
        .try_admit()
        .ok_or_else(|| ApiError::overloaded(FLAVOR))?;
    let cancel = state.shutdown.child_token();
    let admitted_at = Instant::now();
    let run = JobRun {
        id: state.ids.next(id_prefix),
        api: "openai",
        input: json!({ "openai_route": route, "openai_input": Value::Object(body) }),
        permit,
        cancel: cancel.clone(),
        admitted_at,
        deadline: admitted_at + state.settings.request_timeout,
        execution_timeout: None,
    };
    if !stream {
        // If the client goes away, this future is dropped and so is the job (and its sequences).
        let result = execute(&state, &state.openai_ctx, run, ItemSink::Discard, || true).await;
        return match result {
            Ok(items) => single_item(items),
            Err(err) => Err(ApiError::from_job_error(&err, FLAVOR)),
        };
    }

    let (items_tx, mut items_rx) = mpsc::channel(SSE_BUFFER);
    let task_state = Arc::clone(&state);
    let job = state.tasks.spawn(async move {
        execute(
            &task_state,
            &task_state.openai_ctx,
            run,
            ItemSink::Channel(items_tx),
            || true,
        )
        .await
    });
    // From here on, dropping this guard (handler future or response body dropped) cancels the job.
    let guard = cancel.drop_guard();
    let stream = match items_rx.recv().await {
        Some(first) => SseStream {
            pending: Some(first),
            items: items_rx,
            job: Some(job),
            _guard: guard,
        },
        None => {
            // The job ended without yielding: answer an error with its real status.
            let result = join(job).await;
            if let Err(err) = result {
                return Err(ApiError::from_job_error(&err, FLAVOR));
            }
            SseStream {
                pending: None,
                items: items_rx,
                job: None,
                _guard: guard,
            }
        }
    };
    Ok(sse_response(stream))
}

async fn join(job: JoinHandle<Result<Value, JobError>>) -> Result<Value, JobError> {
    job.await.unwrap_or_else(|err| {
        tracing::error!(cause = %err, "the request task panicked or was aborted");
        Err(JobError::Engine("the request task failed".into()))
    })
}

/// State of one SSE response body.
struct SseStream {
    /// The first item, read before the headers were sent.
    pending: Option<Value>,
    items: mpsc::Receiver<Value>,
    /// The job, awaited for its error once the items end; `None` once done.
    job: Option<JoinHandle<Result<Value, JobError>>>,
    /// Cancels the job when the body is dropped.
    _guard: DropGuard,
}

fn sse_response(stream: SseStream) -> Response {
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let mut frame = String::new();
        if let Some(item) = s.pending.take() {
            frame_item(&item, &mut frame);
            return Some((Ok::<Bytes, Infallible>(Bytes::from(frame)), s));
        }
        if let Some(item) = s.items.recv().await {
            frame_item(&item, &mut frame);
            return Some((Ok(Bytes::from(frame)), s));
        }
        let job = s.job.take()?;
        if let Err(err) = join(job).await {
            let error = ApiError::from_job_error(&err, FLAVOR);
            frame_event(&error.body(), &mut frame);
        }
        frame.push_str("data: [DONE]\n\n");
        Some((Ok(Bytes::from(frame)), s))
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// One `data:` event (JSON is single-line: serde escapes newlines inside strings).
fn frame_event(value: &Value, out: &mut String) {
    out.push_str("data: ");
    out.push_str(&value.to_string());
    out.push_str("\n\n");
}

/// Frames one yielded item: a list of chunk objects, one chunk object, or pre-framed SSE text (whose
/// `[DONE]` is dropped: the stream ends with exactly one, written here).
fn frame_item(item: &Value, out: &mut String) {
    match item {
        Value::Array(chunks) => chunks.iter().for_each(|chunk| frame_event(chunk, out)),
        Value::String(raw) => {
            for event in raw
                .split("\n\n")
                .map(str::trim)
                .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            {
                out.push_str(event);
                out.push_str("\n\n");
            }
        }
        other => frame_event(other, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_chunk_lists_as_one_event_each() {
        let mut out = String::new();
        frame_item(&json!([{"a": "x\ny"}, {"b": 2}]), &mut out);
        assert_eq!(out, "data: {\"a\":\"x\\ny\"}\n\ndata: {\"b\":2}\n\n");
    }

    #[test]
    fn drops_done_from_preframed_text() {
        let mut out = String::new();
        frame_item(&json!("data: {\"a\":1}\n\ndata: [DONE]\n\n"), &mut out);
        assert_eq!(out, "data: {\"a\":1}\n\n");
    }
}
