//! The HTTP side of the protocol: every request the worker makes to the platform, with the SDK's
//! headers (raw `Authorization`, per-request `X-Request-ID`, the form content type on JSON bodies),
//! a timeout on every request, capped body reads, and bounded retries with jittered backoff for
//! transport errors, 408, 429 and 5xx. This file and `server` are the only places that know HTTP
//! status codes.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use reqwest::StatusCode;
use thiserror::Error;
use tracing::{debug, warn};

use super::backoff::{Jitter, RetryPolicy};
use super::log_limit::log_safe;
use super::urls::Endpoints;
use super::wire::{self, TakeBatch};
use crate::config::Secret;

/// Longest job-done / job-stream answer body we read (the platform answers with a few bytes).
const MAX_POST_ANSWER_BYTES: usize = 64 * 1024;
/// Longest job-stop answer body we read.
const MAX_STOP_ANSWER_BYTES: usize = 1024 * 1024;

/// A job-take or job-stop poll that did not yield an answer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QueueError {
    /// Connect, send or read failed, or the request timed out.
    #[error("transport: {0}")]
    Transport(String),
    /// The platform asked us to slow down (429).
    #[error("too many requests (429)")]
    TooManyRequests,
    /// Any other non-success status.
    #[error("unexpected status {0}")]
    Status(u16),
    /// The answer was larger than we accept.
    #[error("answer larger than {limit} bytes")]
    TooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("http client: {0}")]
    Client(String),
}

/// How a post (job-done, job-stream) ended after its retries.
#[derive(Debug, Clone, PartialEq)]
pub enum PostOutcome {
    /// Acknowledged with a 2xx.
    Delivered {
        /// Attempts it took.
        attempts: u32,
    },
    /// The platform no longer knows the job (404, 410): stop retrying.
    Gone {
        /// The status it answered.
        status: u16,
    },
    /// Refused with a status retrying cannot fix (other 4xx, e.g. 400 for an oversize body).
    Rejected {
        /// The status it answered.
        status: u16,
    },
    /// Retries exhausted on transport errors, 408, 429 or 5xx.
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
}

/// Per-request timeouts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// Client-side cap on the job-take and job-stop long polls (SDK: 90 s).
    pub poll: Duration,
    /// One job-done / job-stream attempt.
    pub post: Duration,
    /// TCP connect.
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            poll: Duration::from_secs(90),
            post: Duration::from_secs(30),
            connect: Duration::from_secs(10),
        }
    }
}

/// The worker's HTTP client for job-take, job-stop, job-done and job-stream.
#[derive(Debug, Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    endpoints: Endpoints,
    timeouts: Timeouts,
}

/// The `User-Agent` the worker sends.
pub fn user_agent() -> String {
    format!(
        "wick/{} ({} {}) Language/Rust RunPod-Protocol/{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        super::RUNPOD_SDK_VERSION
    )
}

/// Builds a client with the SDK's default headers (raw `Authorization`, our `User-Agent`).
///
/// # Errors
/// [`QueueError::Client`] when the TLS backend cannot be set up or the key is not a valid header.
pub fn build_http(
    api_key: Option<&Secret>,
    connect_timeout: Duration,
) -> Result<reqwest::Client, QueueError> {
    let mut headers = HeaderMap::new();
    if let Some(key) = api_key {
        let mut value = HeaderValue::from_str(key.expose()).map_err(|_| {
            QueueError::Client("RUNPOD_AI_API_KEY is not a valid header value".into())
        })?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    let agent =
        HeaderValue::from_str(&user_agent()).map_err(|e| QueueError::Client(e.to_string()))?;
    headers.insert(USER_AGENT, agent);
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| QueueError::Client(e.to_string()))
}

impl PlatformClient {
    /// A client for these endpoints.
    ///
    /// # Errors
    /// See [`build_http`].
    pub fn new(
        endpoints: Endpoints,
        api_key: Option<&Secret>,
        timeouts: Timeouts,
    ) -> Result<Self, QueueError> {
        Ok(PlatformClient {
            http: build_http(api_key, timeouts.connect)?,
            endpoints,
            timeouts,
        })
    }

    /// The endpoints this client talks to.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// One job-take long poll for up to `free_slots` jobs. 204 and 400 (FlashBoot) mean no job;
    /// the body is read up to `max_body` bytes.
    ///
    /// # Errors
    /// [`QueueError`] for transport failures, 429, other statuses, and oversize answers.
    pub async fn take(
        &self,
        free_slots: usize,
        job_in_progress: bool,
        max_body: usize,
    ) -> Result<TakeBatch, QueueError> {
        let url = self.endpoints.take_url(free_slots, job_in_progress);
        let response = self
            .http
            .get(&url)
            .timeout(self.timeouts.poll)
            .send()
            .await
            .map_err(|e| QueueError::Transport(describe(&e)))?;
        match response.status() {
            StatusCode::NO_CONTENT | StatusCode::BAD_REQUEST => Ok(TakeBatch::default()),
            StatusCode::TOO_MANY_REQUESTS => Err(QueueError::TooManyRequests),
            status if status.is_success() => {
                let body = read_capped(response, max_body).await?;
                Ok(wire::parse_take_body(&body))
            }
            status => Err(QueueError::Status(status.as_u16())),
        }
    }

    /// One job-stop long poll: the ids of jobs to cancel (empty on 204 or any other shape).
    ///
    /// # Errors
    /// [`QueueError`] for transport failures, 429 and other statuses; `Ok(vec![])` when the
    /// stop channel is not available (no `/job-take/` in the template).
    pub async fn poll_stop(&self) -> Result<Vec<String>, QueueError> {
        let Some(url) = self.endpoints.stop_url() else {
            return Ok(Vec::new());
        };
        let response = self
            .http
            .get(&url)
            .timeout(self.timeouts.poll)
            .send()
            .await
            .map_err(|e| QueueError::Transport(describe(&e)))?;
        match response.status() {
            StatusCode::NO_CONTENT => Ok(Vec::new()),
            StatusCode::TOO_MANY_REQUESTS => Err(QueueError::TooManyRequests),
            status if status.is_success() => {
                let body = read_capped(response, MAX_STOP_ANSWER_BYTES).await?;
                Ok(wire::parse_stop_body(&body))
            }
            status => Err(QueueError::Status(status.as_u16())),
        }
    }

    /// Posts a final result to job-done (`isStream` as given), retrying per `policy`.
    pub async fn post_done(
        &self,
        job_id: &str,
        body: &str,
        is_stream: bool,
        policy: RetryPolicy,
    ) -> PostOutcome {
        let url = self.endpoints.done_url(job_id, is_stream);
        self.post_with_retry(&url, job_id, body, policy).await
    }

    /// Posts one streamed chunk body to job-stream, retrying per `policy`.
    pub async fn post_stream(&self, job_id: &str, body: &str, policy: RetryPolicy) -> PostOutcome {
        let url = self.endpoints.stream_url(job_id);
        self.post_with_retry(&url, job_id, body, policy).await
    }

    async fn post_with_retry(
        &self,
        url: &str,
        job_id: &str,
        body: &str,
        policy: RetryPolicy,
    ) -> PostOutcome {
        let started = Instant::now();
        let mut jitter = Jitter::new();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let last_error = match self.post_once(url, job_id, body).await {
                Ok(status) if status.is_success() => {
                    return PostOutcome::Delivered { attempts: attempt }
                }
                Ok(status) if status == StatusCode::NOT_FOUND || status == StatusCode::GONE => {
                    return PostOutcome::Gone {
                        status: status.as_u16(),
                    }
                }
                Ok(status) if is_retryable_status(status) => format!("status {}", status.as_u16()),
                Ok(status) => {
                    return PostOutcome::Rejected {
                        status: status.as_u16(),
                    }
                }
                Err(error) => error,
            };
            let wait = policy.delay(attempt, &mut jitter);
            if attempt >= policy.max_attempts || started.elapsed() + wait > policy.max_elapsed {
                return PostOutcome::Exhausted {
                    attempts: attempt,
                    last_error,
                };
            }
            debug!(job_id = %log_safe(job_id), attempt, error = %last_error, wait_ms = wait.as_millis() as u64, "post failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// One POST with the SDK's headers. The answer body is read (capped) so a connection that
    /// breaks mid-answer counts as a failure and the post is retried.
    async fn post_once(&self, url: &str, job_id: &str, body: &str) -> Result<StatusCode, String> {
        let response = self
            .http
            .post(url)
            .timeout(self.timeouts.post)
            // The SDK sends JSON text under the form content type plus a bogus `charset` header;
            // the platform parses the body as JSON. Replicated exactly (spec §3).
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("charset", "utf-8")
            .header("X-Request-ID", sanitize_header(job_id))
            .body(body.to_owned())
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = response.status();
        read_capped(response, MAX_POST_ANSWER_BYTES)
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    }
}

/// Statuses worth retrying: 408, 429 and every 5xx.
pub fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// Reads a response body, failing once it exceeds `limit` bytes.
async fn read_capped(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, QueueError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(QueueError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| QueueError::Transport(describe(&e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(QueueError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A job id made safe for a header value (control characters replaced).
fn sanitize_header(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_control() || !c.is_ascii() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// A one-line description of a reqwest error without the URL (URLs may carry query secrets).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else {
        "request"
    };
    let mut text = match error.url() {
        Some(url) => format!(
            "{kind}: {}",
            error.to_string().replace(url.as_str(), "<url>")
        ),
        None => format!("{kind}: {error}"),
    };
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Logs a final post outcome that did not deliver.
pub(crate) fn log_undelivered(job_id: &str, what: &str, outcome: &PostOutcome) {
    match outcome {
        PostOutcome::Delivered { .. } => {}
        PostOutcome::Gone { status } => {
            warn!(job_id = %log_safe(job_id), status, "{what}: platform no longer knows the job")
        }
        PostOutcome::Rejected { status } => {
            warn!(job_id = %log_safe(job_id), status, "{what}: refused by the platform")
        }
        PostOutcome::Exhausted {
            attempts,
            last_error,
        } => {
            warn!(job_id = %log_safe(job_id), attempts, error = %last_error, "{what}: retries exhausted")
        }
    }
}
