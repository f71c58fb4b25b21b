//! The fake platform's HTTP routes (axum): the worker-facing job-take (+batch), job-stop, job-done,
//! job-stream and ping, with fault injection and recording; and the public API `/v2/{endpoint}/`
//! `run`, `runsync`, `status/{id}`, `stream/{id}` (GET and POST), `cancel/{id}`, `health`,
//! `purge-queue` (spec §14).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::platform::{JobStatus, Platform, RecordedRequest, Route};

/// Largest body the platform accepts (results up to the 20 MB `/runsync` limit, with room).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Default `/runsync` wait, as the platform (90 s).
const DEFAULT_RUNSYNC_WAIT_MS: u64 = 90_000;

/// All routes of the fake platform.
pub(crate) fn router(platform: Platform) -> Router {
    Router::new()
        .route("/v2/{endpoint}/job-take/{worker}", get(job_take))
        .route(
            "/v2/{endpoint}/job-take-batch/{worker}",
            get(job_take_batch),
        )
        .route("/v2/{endpoint}/job-stop/{worker}", get(job_stop))
        .route("/v2/{endpoint}/job-done/{worker}/{job}", post(job_done))
        .route("/v2/{endpoint}/job-stream/{worker}/{job}", post(job_stream))
        .route("/v2/{endpoint}/ping/{worker}", get(ping))
        .route("/v2/{endpoint}/run", post(run))
        .route("/v2/{endpoint}/runsync", post(runsync))
        .route("/v2/{endpoint}/status/{id}", get(status).post(status))
        .route("/v2/{endpoint}/stream/{id}", get(stream).post(stream))
        .route("/v2/{endpoint}/cancel/{id}", post(cancel))
        .route("/v2/{endpoint}/health", get(health))
        .route("/v2/{endpoint}/purge-queue", post(purge_queue))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(platform)
}

fn record(
    platform: &Platform,
    route: Route,
    uri: &Uri,
    headers: &HeaderMap,
    body: &str,
    status: u16,
) {
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    platform.lock().requests.push(RecordedRequest {
        route,
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        headers,
        body: body.to_owned(),
        status,
        at: Instant::now(),
    });
}

fn status_only(status: u16) -> Response {
    StatusCode::from_u16(status)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}

/// A 200 answer whose body breaks off: the worker sees a failed request although the platform
/// applied it.
fn cut_off_response() -> Response {
    let parts = [
        Ok(Bytes::from_static(b"{")),
        Err(std::io::Error::other("answer dropped by fault injection")),
    ];
    (
        StatusCode::OK,
        Body::from_stream(futures_util::stream::iter(parts)),
    )
        .into_response()
}

async fn job_take(State(platform): State<Platform>, uri: Uri, headers: HeaderMap) -> Response {
    take(platform, Route::JobTake, uri, headers, 1).await
}

async fn job_take_batch(
    State(platform): State<Platform>,
    Query(query): Query<BTreeMap<String, String>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let batch_size = query
        .get("batch_size")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 1024);
    take(platform, Route::JobTakeBatch, uri, headers, batch_size).await
}

async fn take(
    platform: Platform,
    route: Route,
    uri: Uri,
    headers: HeaderMap,
    batch_size: usize,
) -> Response {
    let raw = {
        let mut state = platform.lock();
        (!state.faults.take_bodies.is_empty()).then(|| state.faults.take_bodies.remove(0))
    };
    if let Some(body) = raw {
        record(&platform, route, &uri, &headers, "", 200);
        return (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
    }
    let scripted = {
        let mut state = platform.lock();
        if !state.faults.take_script.is_empty() {
            Some(state.faults.take_script.remove(0))
        } else {
            let pct = state.faults.fail_take_pct;
            state.dice.chance(pct).then_some(500)
        }
    };
    if let Some(status) = scripted {
        record(&platform, route, &uri, &headers, "", status);
        return status_only(status);
    }
    let deadline = tokio::time::Instant::now() + platform.inner.config.poll_hold;
    loop {
        let queued = platform.inner.job_queued.notified();
        let jobs = hand_out(&platform, batch_size);
        if !jobs.is_empty() {
            record(&platform, route, &uri, &headers, "", 200);
            platform.inner.job_changed.notify_waiters();
            let body = if route == Route::JobTake && jobs.len() == 1 {
                jobs.into_iter().next().unwrap_or(Value::Null)
            } else {
                Value::Array(jobs)
            };
            return Json(body).into_response();
        }
        if tokio::time::timeout_at(deadline, queued).await.is_err() {
            record(&platform, route, &uri, &headers, "", 204);
            return StatusCode::NO_CONTENT.into_response();
        }
    }
}

/// Pops up to `n` queued jobs, marks them in progress, and maybe queues a duplicate delivery.
fn hand_out(platform: &Platform, n: usize) -> Vec<Value> {
    let mut state = platform.lock();
    let mut out = Vec::new();
    while out.len() < n {
        let Some(id) = state.queue.pop_front() else {
            break;
        };
        let duplicate_pct = state.faults.duplicate_pct;
        let duplicate = state.dice.chance(duplicate_pct);
        let Some(job) = state.jobs.get_mut(&id) else {
            continue;
        };
        if job.status.is_terminal() {
            continue;
        }
        job.deliveries += 1;
        if job.status == JobStatus::InQueue {
            job.status = JobStatus::InProgress;
            job.taken_at = Some(Instant::now());
        }
        let first_delivery = job.deliveries == 1;
        out.push(json!({"id": id, "input": job.input}));
        if first_delivery && duplicate {
            state.queue.push_front(id);
        }
    }
    out
}

async fn job_stop(State(platform): State<Platform>, uri: Uri, headers: HeaderMap) -> Response {
    let deadline = tokio::time::Instant::now() + platform.inner.config.poll_hold;
    loop {
        let queued = platform.inner.stop_queued.notified();
        let ids: Vec<String> = platform.lock().pending_stops.drain(..).collect();
        if !ids.is_empty() {
            record(&platform, Route::JobStop, &uri, &headers, "", 200);
            return Json(json!({ "jobsToStop": ids })).into_response();
        }
        if tokio::time::timeout_at(deadline, queued).await.is_err() {
            record(&platform, Route::JobStop, &uri, &headers, "", 204);
            return StatusCode::NO_CONTENT.into_response();
        }
    }
}

/// What the fault plan does to one post.
enum PostFault {
    Status(u16),
    CutOff,
}

async fn job_done(
    State(platform): State<Platform>,
    Path((_endpoint, _worker, job_id)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let fault = {
        let mut state = platform.lock();
        let (fail, drop) = (state.faults.fail_done_pct, state.faults.drop_done_pct);
        if !state.faults.done_script.is_empty() {
            match state.faults.done_script.remove(0) {
                0 => Some(PostFault::CutOff),
                status => Some(PostFault::Status(status)),
            }
        } else if state.dice.chance(fail) {
            Some(PostFault::Status(500))
        } else if state.dice.chance(drop) {
            Some(PostFault::CutOff)
        } else {
            None
        }
    };
    slow(&platform).await;
    if let Some(PostFault::Status(status)) = fault {
        record(&platform, Route::JobDone, &uri, &headers, &text, status);
        return status_only(status);
    }
    let is_stream = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "isStream=true"));
    let status = apply_done(&platform, &job_id, &text, is_stream);
    record(&platform, Route::JobDone, &uri, &headers, &text, status);
    if status == 200 && matches!(fault, Some(PostFault::CutOff)) {
        return cut_off_response();
    }
    status_only(status)
}

/// Applies a job-done body: the first one decides the job's status; later ones are counted, and
/// a differing one is a conflicting (double) result.
fn apply_done(platform: &Platform, job_id: &str, text: &str, is_stream: bool) -> u16 {
    let Ok(Value::Object(body)) = serde_json::from_str::<Value>(text) else {
        return 400;
    };
    {
        let mut state = platform.lock();
        let Some(job) = state.jobs.get_mut(job_id) else {
            return 404;
        };
        job.done_posts += 1;
        let body = Value::Object(body);
        if job.status == JobStatus::Cancelled {
            return 200;
        }
        if let Some(first) = &job.final_body {
            if *first != body {
                job.conflicting_results += 1;
            }
            return 200;
        }
        let error = body
            .get("error")
            .and_then(Value::as_str)
            .filter(|e| !e.is_empty())
            .map(str::to_owned);
        job.status = if error.is_some() {
            JobStatus::Failed
        } else {
            JobStatus::Completed
        };
        job.error = error;
        job.output = body.get("output").cloned();
        job.stop_pod = body
            .get("stopPod")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        job.final_is_stream = Some(is_stream);
        job.final_body = Some(body);
        job.finished_at = Some(Instant::now());
    }
    platform.inner.job_changed.notify_waiters();
    200
}

async fn job_stream(
    State(platform): State<Platform>,
    Path((_endpoint, _worker, job_id)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let fault = {
        let mut state = platform.lock();
        let fail = state.faults.fail_stream_pct;
        if !state.faults.stream_script.is_empty() {
            Some(state.faults.stream_script.remove(0))
        } else {
            state.dice.chance(fail).then_some(500)
        }
    };
    slow(&platform).await;
    if let Some(status) = fault {
        record(&platform, Route::JobStream, &uri, &headers, &text, status);
        return status_only(status);
    }
    let status = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(mut body)) => {
            let mut state = platform.lock();
            match state.jobs.get_mut(&job_id) {
                Some(job) => {
                    job.stream
                        .push(body.remove("output").unwrap_or(Value::Null));
                    200
                }
                None => 404,
            }
        }
        _ => 400,
    };
    record(&platform, Route::JobStream, &uri, &headers, &text, status);
    platform.inner.job_changed.notify_waiters();
    status_only(status)
}

async fn ping(State(platform): State<Platform>, uri: Uri, headers: HeaderMap) -> Response {
    record(&platform, Route::Ping, &uri, &headers, "", 200);
    slow(&platform).await;
    StatusCode::OK.into_response()
}

async fn slow(platform: &Platform) {
    let delay = platform.lock().faults.slow;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

// ---- public API ----

fn api_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The job input from a `/run` body: `{"input": ...}`.
fn parse_run_body(body: &[u8]) -> Result<Value, &'static str> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut fields)) => fields
            .remove("input")
            .ok_or("body must have an `input` field"),
        _ => Err("body must be a JSON object"),
    }
}

async fn run(State(platform): State<Platform>, body: Bytes) -> Response {
    match parse_run_body(&body) {
        Ok(input) => {
            let id = platform.submit(input);
            Json(json!({"id": id, "status": "IN_QUEUE"})).into_response()
        }
        Err(message) => api_error(StatusCode::BAD_REQUEST, message),
    }
}

async fn runsync(
    State(platform): State<Platform>,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let input = match parse_run_body(&body) {
        Ok(input) => input,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, message),
    };
    let wait_ms = query
        .get("wait")
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(DEFAULT_RUNSYNC_WAIT_MS)
        .clamp(1_000, 300_000);
    let id = platform.submit(input);
    platform
        .wait_terminal(&id, Duration::from_millis(wait_ms))
        .await;
    status_body(&platform, &id)
}

fn status_body(platform: &Platform, id: &str) -> Response {
    let Some(job) = platform.job(id) else {
        return api_error(StatusCode::NOT_FOUND, "job not found");
    };
    let mut body = Map::new();
    body.insert("id".into(), json!(job.id));
    body.insert("status".into(), json!(job.status));
    if let Some(taken) = job.taken_at {
        body.insert(
            "delayTime".into(),
            json!(taken.duration_since(job.submitted_at).as_millis() as u64),
        );
        if let Some(finished) = job.finished_at {
            body.insert(
                "executionTime".into(),
                json!(finished.duration_since(taken).as_millis() as u64),
            );
        }
    }
    if let Some(output) = &job.output {
        body.insert("output".into(), output.clone());
    }
    if let Some(error) = &job.error {
        body.insert("error".into(), json!(error));
    }
    Json(Value::Object(body)).into_response()
}

async fn status(
    State(platform): State<Platform>,
    Path((_endpoint, id)): Path<(String, String)>,
) -> Response {
    status_body(&platform, &id)
}

async fn stream(
    State(platform): State<Platform>,
    Path((_endpoint, id)): Path<(String, String)>,
) -> Response {
    let mut state = platform.lock();
    let Some(job) = state.jobs.get_mut(&id) else {
        return api_error(StatusCode::NOT_FOUND, "job not found");
    };
    let fresh: Vec<Value> = job.stream[job.stream_cursor..]
        .iter()
        .map(|v| json!({ "output": v }))
        .collect();
    job.stream_cursor = job.stream.len();
    Json(json!({"id": id, "status": job.status, "stream": fresh})).into_response()
}

async fn cancel(
    State(platform): State<Platform>,
    Path((_endpoint, id)): Path<(String, String)>,
) -> Response {
    match platform.cancel(&id) {
        Some(_) => {
            Json(json!({"id": id, "status": platform.job(&id).map(|j| j.status)})).into_response()
        }
        None => api_error(StatusCode::NOT_FOUND, "job not found"),
    }
}

async fn health(State(platform): State<Platform>) -> Response {
    let stats = platform.stats();
    let recent_worker = {
        let state = platform.lock();
        state
            .requests
            .last()
            .is_some_and(|r| r.at.elapsed() < Duration::from_secs(30))
    };
    let running = usize::from(recent_worker && stats.in_progress > 0);
    let idle = usize::from(recent_worker && stats.in_progress == 0);
    Json(json!({
        "jobs": {
            "completed": stats.completed,
            "failed": stats.failed,
            "inProgress": stats.in_progress,
            "inQueue": stats.in_queue,
            "retried": 0,
        },
        "workers": {"idle": idle, "running": running},
    }))
    .into_response()
}

async fn purge_queue(State(platform): State<Platform>) -> Response {
    let removed = platform.purge_queue();
    Json(json!({"removed": removed, "status": "completed"})).into_response()
}
