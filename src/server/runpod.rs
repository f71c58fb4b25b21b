//! RunPod public API handlers (`/run`, `/runsync`, `/status`, `/stream`, `/cancel`, `/retry`,
//! `/health`, `/purge-queue`), with the bodies and statuses the official `runpod` Python client reads.
//! Jobs run in background tasks through [`super::exec::execute`] and live in the [`JobStore`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::admission::AdmissionPermit;
use super::errors::{ApiError, Flavor};
use super::exec::{execute, ItemSink, JobRun};
use super::store::{JobStatus, JobStore, WORKER_ID};
use super::AppState;

/// `/runsync` waits this long by default (RunPod: 90 s).
const RUNSYNC_DEFAULT_WAIT: Duration = Duration::from_secs(90);
/// Shortest and longest `?wait=` (RunPod: 1 s to 300 s).
const RUNSYNC_WAIT_RANGE_MS: (u64, u64) = (1_000, 300_000);
/// `/stream` holds a poll this long for a new item (the Python client's HTTP timeout is 10 s).
const STREAM_LONG_POLL: Duration = Duration::from_secs(2);
/// Longest job id echoed in messages.
const ID_ECHO_CHARS: usize = 64;

const FLAVOR: Flavor = Flavor::RunPod;

/// Reads a request body as a JSON object. Oversized bodies were already refused with 413.
pub(super) fn json_object(
    body: Result<Bytes, BytesRejection>,
    flavor: Flavor,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, rejection.body_text(), flavor)
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
            flavor,
        )),
        Err(err) => Err(ApiError::bad_request(
            format!("the request body is not valid JSON: {err}"),
            flavor,
        )),
    }
}

/// A `/run` or `/runsync` body: the job input and its execution timeout.
fn job_request(body: Result<Bytes, BytesRejection>) -> Result<(Value, Option<Duration>), ApiError> {
    let mut body = json_object(body, FLAVOR)?;
    let input = match body.remove("input") {
        Some(input @ Value::Object(_)) => input,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`input` must be a JSON object",
                FLAVOR,
            ))
        }
        None => {
            return Err(ApiError::bad_request(
                "the body needs an `input` object",
                FLAVOR,
            ))
        }
    };
    if body.contains_key("webhook") {
        // Calling user-supplied URLs from the worker is an SSRF vector; the dev server does not.
        tracing::warn!("`webhook` is ignored by the dev server");
    }
    if body.contains_key("s3Config") {
        tracing::warn!("`s3Config` is ignored by the dev server");
    }
    let execution_timeout = match body.get("policy").and_then(|p| p.get("executionTimeout")) {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(ms) if ms > 0 => Some(Duration::from_millis(ms)),
            _ => {
                return Err(ApiError::bad_request(
                    "`policy.executionTimeout` must be a positive integer (milliseconds)",
                    FLAVOR,
                ))
            }
        },
    };
    Ok((input, execution_timeout))
}

/// Admits, stores and starts a job; returns its id.
fn submit(
    state: &Arc<AppState>,
    id_prefix: &str,
    input: Value,
    execution_timeout: Option<Duration>,
) -> Result<String, ApiError> {
    let permit = state
        .admission
        .try_admit()
        .ok_or_else(|| ApiError::overloaded(FLAVOR))?;
    let id = state.ids.next(id_prefix);
    let cancel = state.shutdown.child_token();
    state
        .store
        .insert(&id, input.clone(), execution_timeout, cancel.clone());
    spawn_job(state, id.clone(), input, execution_timeout, cancel, permit);
    Ok(id)
}

/// Runs a stored job in the background; its end is written to the store.
fn spawn_job(
    state: &Arc<AppState>,
    id: String,
    input: Value,
    execution_timeout: Option<Duration>,
    cancel: CancellationToken,
    permit: AdmissionPermit,
) {
    let state = Arc::clone(state);
    let admitted_at = Instant::now();
    let run = JobRun {
        id: id.clone(),
        api: "runpod",
        input,
        permit,
        cancel,
        admitted_at,
        deadline: admitted_at + state.settings.request_timeout,
        execution_timeout,
    };
    state.tasks.clone().spawn(async move {
        let sink = ItemSink::Store {
            store: Arc::clone(&state.store),
            id: id.clone(),
        };
        let result = execute(&state, &state.runpod_ctx, run, sink, || {
            state.store.mark_started(&id)
        })
        .await;
        state.store.finish(&id, result);
    });
}

fn job_id(params: &HashMap<String, String>) -> Result<&str, ApiError> {
    params
        .get("id")
        .map(String::as_str)
        .ok_or_else(|| ApiError::bad_request("missing job id", FLAVOR))
}

fn unknown_job(id: &str) -> ApiError {
    let shown: String = id.chars().take(ID_ECHO_CHARS).collect();
    ApiError::not_found(
        format!("job {shown:?} not found (unknown, or evicted after the retention window)"),
        FLAVOR,
    )
}

/// Waits until `done` holds for job `id` or `until` passes. The notifier is armed before each check,
/// so a change between the check and the wait is never missed.
async fn wait_for(
    store: &JobStore,
    id: &str,
    until: tokio::time::Instant,
    done: impl Fn(&JobStore) -> bool,
) {
    let Some(notify) = store.notifier(id) else {
        return;
    };
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done(store) {
            return;
        }
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(until) => return,
        }
    }
}

/// `POST /run`: `{"id", "status": "IN_QUEUE"}`.
pub(super) async fn run(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (input, execution_timeout) = job_request(body)?;
    let id = submit(&state, "", input, execution_timeout)?;
    Ok(Json(json!({ "id": id, "status": JobStatus::InQueue })).into_response())
}

/// `POST /runsync?wait=ms`: the finished job, or its current status when it outlives the wait.
pub(super) async fn run_sync(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let wait = match query.get("wait") {
        None => RUNSYNC_DEFAULT_WAIT,
        Some(raw) => {
            let ms: u64 = raw.trim().parse().map_err(|_| {
                ApiError::bad_request("`wait` must be an integer number of milliseconds", FLAVOR)
            })?;
            Duration::from_millis(ms.clamp(RUNSYNC_WAIT_RANGE_MS.0, RUNSYNC_WAIT_RANGE_MS.1))
        }
    };
    let (input, execution_timeout) = job_request(body)?;
    let id = submit(&state, "sync-", input, execution_timeout)?;
    let until = tokio::time::Instant::now() + wait;
    wait_for(&state.store, &id, until, |store| {
        store.status(&id).is_none_or(JobStatus::is_final)
    })
    .await;
    let body = state
        .store
        .status_body(&id)
        .ok_or_else(|| unknown_job(&id))?;
    Ok(Json(body).into_response())
}

/// `GET|POST /status/{id}`.
pub(super) async fn status(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = job_id(&params)?;
    let body = state.store.status_body(id).ok_or_else(|| unknown_job(id))?;
    Ok(Json(body).into_response())
}

/// `GET|POST /stream/{id}`: `{"id", "status", "stream": [{"output": item}, ...]}` with the items
/// produced since the previous poll (held up to a short long-poll while there is none yet).
pub(super) async fn stream(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = job_id(&params)?;
    let until = tokio::time::Instant::now() + STREAM_LONG_POLL;
    wait_for(&state.store, id, until, |store| store.has_stream_news(id)).await;
    let (_, body) = state.store.take_stream(id).ok_or_else(|| unknown_job(id))?;
    Ok(Json(body).into_response())
}

/// `POST /cancel/{id}`: `{"id", "status"}` (CANCELLED, or the final status it already had).
pub(super) async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = job_id(&params)?;
    let status = state.store.cancel(id).ok_or_else(|| unknown_job(id))?;
    Ok(Json(json!({ "id": id, "status": status })).into_response())
}

/// `POST /retry/{id}`: re-queues a FAILED or TIMED_OUT job under the same id.
pub(super) async fn retry(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = job_id(&params)?;
    let permit = state
        .admission
        .try_admit()
        .ok_or_else(|| ApiError::overloaded(FLAVOR))?;
    let ticket = match state.store.retry(id, state.shutdown.child_token()) {
        Ok(Some(ticket)) => ticket,
        Ok(None) => return Err(unknown_job(id)),
        Err(status) => {
            return Err(ApiError::bad_request(
                format!(
                    "only FAILED or TIMED_OUT jobs can be retried; this one is {}",
                    json!(status)
                ),
                FLAVOR,
            ))
        }
    };
    spawn_job(
        &state,
        id.to_string(),
        ticket.input,
        ticket.execution_timeout,
        ticket.cancel,
        permit,
    );
    Ok(Json(json!({ "id": id, "status": JobStatus::InQueue })).into_response())
}

/// `GET|POST /health`: job counts and the one worker's state; 503 when the engine has stopped,
/// failed (a panic) or is wedged (a step past `ENGINE_STEP_TIMEOUT_SECS`); the reason is logged
/// by the engine, never shown on this unauthenticated route.
pub(super) async fn health(State(state): State<Arc<AppState>>) -> Response {
    let counts = state.store.counts();
    let busy = state.admission.running() > 0;
    let engine_health = state.runpod_ctx.engine.health();
    let alive = engine_health.is_healthy();
    let body = json!({
        "jobs": {
            "completed": counts.completed,
            "failed": counts.failed,
            "inProgress": counts.in_progress,
            "inQueue": counts.in_queue,
            "retried": counts.retried,
        },
        "workers": {
            "idle": usize::from(alive && !busy),
            "running": usize::from(alive && busy),
            "unhealthy": usize::from(!alive),
        },
        "workerId": WORKER_ID,
    });
    let status = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `POST /purge-queue`: cancels every job still IN_QUEUE.
pub(super) async fn purge_queue(State(state): State<Arc<AppState>>) -> Response {
    let removed = state.store.purge_queued();
    Json(json!({ "removed": removed, "status": "completed" })).into_response()
}
