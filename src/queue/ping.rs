//! The heartbeat: `GET <ping URL>?job_id=<in-flight ids>&runpod_version=...` every
//! `RUNPOD_PING_INTERVAL`, on its own OS thread with its own single-threaded tokio runtime and HTTP
//! client, so neither generation nor the job loop can starve it (spec §8, fault Q4).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::backoff::{Jitter, RetryPolicy};
use super::client::{build_http, is_retryable_status};
use super::table::JobTable;
use super::urls::{encode_component, with_query, Endpoints};
use crate::config::{RunpodEnv, Secret};

/// Shortest heartbeat period we honour (the SDK turns values under 1000 ms into a zero-second busy
/// loop; we keep millisecond precision but never spin).
pub const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);

/// A running heartbeat thread; [`Heartbeat::stop`] ends it.
#[derive(Debug)]
pub struct Heartbeat {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts the heartbeat thread. The first ping goes out at once.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(
        endpoints: Endpoints,
        api_key: Option<Secret>,
        interval: Duration,
        jobs: Arc<JobTable>,
    ) -> std::io::Result<Heartbeat> {
        let stop = CancellationToken::new();
        let thread_stop = stop.clone();
        let interval = interval.max(MIN_PING_INTERVAL);
        let thread = std::thread::Builder::new()
            .name("wick-heartbeat".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        warn!(%error, "heartbeat runtime could not start; no pings will be sent");
                        return;
                    }
                };
                runtime.block_on(ping_loop(endpoints, api_key, interval, jobs, thread_stop));
            })?;
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the heartbeat and waits for its thread (it wakes from its sleep at once; an in-flight
    /// ping is abandoned).
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("heartbeat thread panicked");
            }
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn ping_loop(
    endpoints: Endpoints,
    api_key: Option<Secret>,
    interval: Duration,
    jobs: Arc<JobTable>,
    stop: CancellationToken,
) {
    // Per-request timeout: twice the interval, as the SDK.
    let http = match build_http(api_key.as_ref(), interval.saturating_mul(2)) {
        Ok(http) => http,
        Err(error) => {
            warn!(%error, "heartbeat client could not be built; no pings will be sent");
            return;
        }
    };
    let mut jitter = Jitter::new();
    loop {
        let ids = jobs.ids();
        if let Some(url) = endpoints.ping_url(&ids, super::RUNPOD_SDK_VERSION) {
            tokio::select! {
                () = send_ping(&http, &url, interval.saturating_mul(2), &mut jitter) => {}
                () = stop.cancelled() => return,
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One ping with up to 3 attempts for transport errors, 408, 429 and 5xx; failures are logged and
/// the loop goes on.
async fn send_ping(http: &reqwest::Client, url: &str, timeout: Duration, jitter: &mut Jitter) {
    let policy = RetryPolicy::PING;
    for attempt in 1..=policy.max_attempts {
        let result = http.get(url).timeout(timeout).send().await;
        let error = match result {
            Ok(response) if response.status().is_success() => {
                debug!("ping sent");
                return;
            }
            Ok(response) if !is_retryable_status(response.status()) => {
                warn!(status = response.status().as_u16(), "ping refused");
                return;
            }
            Ok(response) => format!("status {}", response.status().as_u16()),
            Err(error) => {
                if error.is_timeout() {
                    "timeout".to_string()
                } else {
                    "transport error".to_string()
                }
            }
        };
        if attempt == policy.max_attempts {
            warn!(attempts = attempt, %error, "ping failed");
            return;
        }
        tokio::time::sleep(policy.delay(attempt, jitter)).await;
    }
}

/// Longest `reason` sent in a fitness-failure report (as the SDK).
const MAX_REASON_CHARS: usize = 256;

/// Reports a startup failure to the platform, as the SDK's fitness checks do (spec §8): one
/// `GET <ping URL>?status=unhealthy&check=<name>&reason=<≤256 chars>&runpod_version=...` with a 2 s
/// timeout. Sent only when the ping URL is set; returns whether the platform acknowledged it.
pub async fn report_unhealthy(env: &RunpodEnv, check: &str, reason: &str) -> bool {
    let Some(template) = env.ping_url.as_deref() else {
        return false;
    };
    let worker_id = env.pod_id.as_deref().unwrap_or("unknown");
    let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
    let mut url = template.replace("$RUNPOD_POD_ID", worker_id);
    url = with_query(&url, "status", "unhealthy");
    url = with_query(&url, "check", &encode_component(check));
    url = with_query(&url, "reason", &encode_component(&reason));
    url = with_query(
        &url,
        "runpod_version",
        &encode_component(super::RUNPOD_SDK_VERSION),
    );
    let timeout = Duration::from_secs(2);
    let Ok(http) = build_http(env.api_key.as_ref(), timeout) else {
        return false;
    };
    match http.get(&url).timeout(timeout).send().await {
        Ok(response) => response.status().is_success(),
        Err(error) => {
            warn!(
                timeout = error.is_timeout(),
                "unhealthy report could not be sent"
            );
            false
        }
    }
}
