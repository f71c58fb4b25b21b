//! The local dev API server (`wick --serve-api`): RunPod's public API (`/run`, `/runsync`,
//! `/status`, `/stream`, `/cancel`, `/retry`, `/health`, `/purge-queue`, bare and under
//! `/v2/{endpoint_id}/`) and OpenAI's (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, JSON
//! and SSE; also under RunPod's passthrough prefix `/v2/{endpoint_id}/openai`), plus `/metrics`.
//!
//! Owned here: routing ([`routes::ROUTES`] is the single route table), auth, CORS, host checks, body
//! limit, admission (429), per-request deadlines, the RunPod job store, SSE framing, metrics, and the
//! only `JobError` → HTTP status mapping ([`errors::status_of`]).
//! Not here: input validation and output shaping — every request goes through
//! [`crate::job::run_job`], exactly as a queue job does. Binding the socket and reading the API key
//! happen in the binary.
//!
//! # Clients
//! - OpenAI SDKs: `base_url = "http://127.0.0.1:8000/v1"` (or `.../v2/<any id>/openai/v1`, the same
//!   path shape as a deployed endpoint), `api_key` = the server's key (anything when there is none).
//! - `runpod` SDK: `RUNPOD_ENDPOINT_BASE_URL=http://127.0.0.1:8000/v2`, then `runpod.Endpoint("<any
//!   id>")` runs, run_syncs, streams, cancels, purges and reads health.
//!
//! # Limits
//! Bodies over `body_limit` get 413 before parsing; more than `max_num_seqs + max_waiting` requests in
//! flight get 429 with `Retry-After`; every request has a deadline from admission (504 / TIMED_OUT);
//! finished RunPod jobs are kept for `retention`, at most `max_finished_jobs` of them.

pub mod admission;
pub mod errors;
pub mod exec;
pub mod metrics;
mod openai;
pub mod routes;
mod runpod;
pub mod settings;
pub mod store;

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use routes::{Route, RouteSpec, ROUTES};
pub use settings::ServerSettings;

use crate::job::JobContext;
use admission::Admission;
use metrics::Metrics;
use store::JobStore;

/// Why the server could not start or stopped.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The settings are unsafe or invalid (the message names the setting).
    #[error("dev server: {0}")]
    Config(String),
    /// Accepting or serving connections failed.
    #[error("dev server I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// Context for RunPod jobs: exactly the queue worker's (stream batching, output shapes).
    runpod_ctx: JobContext,
    /// Context for OpenAI routes: chunk objects (framed here as SSE), one item per engine delta.
    openai_ctx: JobContext,
    settings: ServerSettings,
    store: Arc<JobStore>,
    admission: Arc<Admission>,
    metrics: Metrics,
    /// Parent of every request's cancel token; fired on shutdown.
    shutdown: CancellationToken,
    /// Background RunPod jobs and SSE producers, awaited on shutdown.
    tasks: TaskTracker,
    ids: IdGenerator,
    /// SHA-256 of the API key, compared in constant time.
    api_key_digest: Option<[u8; 32]>,
}

impl AppState {
    fn new(ctx: &JobContext, settings: ServerSettings, shutdown: CancellationToken) -> Self {
        let mut openai_ctx = ctx.clone();
        // The server frames SSE itself from chunk objects, and streams every engine delta at once.
        openai_ctx.raw_openai_output = false;
        openai_ctx.stream_defaults = crate::job::StreamBatching {
            max_batch_size: 1,
            min_batch_size: 1,
            growth_factor: 1.0,
        };
        let run_slots = ctx.engine.info().max_num_seqs;
        AppState {
            runpod_ctx: ctx.clone(),
            openai_ctx,
            store: Arc::new(JobStore::new(
                settings.retention,
                settings.max_finished_jobs,
            )),
            admission: Admission::new(run_slots, settings.max_waiting),
            metrics: Metrics::default(),
            shutdown,
            tasks: TaskTracker::new(),
            ids: IdGenerator::default(),
            api_key_digest: settings
                .api_key
                .as_ref()
                .map(|k| routes::digest(k.expose())),
            settings,
        }
    }

    /// The admission gate (for tests and metrics).
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The metrics (for tests).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Unpredictable ids: SipHash (keyed from the OS at startup) of a counter, formatted like a UUID.
#[derive(Debug, Default)]
struct IdGenerator {
    keys: std::collections::hash_map::RandomState,
    counter: AtomicU64,
}

impl IdGenerator {
    fn next(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let a = self.keys.hash_one((n, 0u8));
        let b = self.keys.hash_one((n, 1u8));
        format!(
            "{prefix}{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }
}

/// The router with every route of [`ROUTES`] and the middleware stack, plus its shared state (for
/// tests that inspect admission or metrics). Request cancel tokens are children of `shutdown`.
///
/// # Errors
/// [`ServerError::Config`] when the settings fail [`ServerSettings::check`].
pub fn router(
    ctx: &JobContext,
    settings: ServerSettings,
    shutdown: CancellationToken,
) -> Result<(axum::Router, Arc<AppState>), ServerError> {
    settings.check()?;
    let state = Arc::new(AppState::new(ctx, settings, shutdown));
    Ok((routes::build(Arc::clone(&state)), state))
}

/// Serves the dev API on `listener` until `shutdown` fires, then cancels in-flight requests and waits
/// for their tasks.
///
/// # Errors
/// [`ServerError::Config`] when the listener is bound to a non-loopback address without an API key
/// (or the settings are otherwise invalid), [`ServerError::Io`] when serving fails.
pub async fn run(
    ctx: Arc<JobContext>,
    settings: ServerSettings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let (app, state) = router(&ctx, settings, shutdown.clone())?;
    serve(app, state, listener, shutdown).await
}

/// Serves a router made by [`router`] (with its state) on `listener` until `shutdown` fires, then
/// cancels in-flight requests and waits for their tasks.
///
/// # Errors
/// As [`run`].
pub async fn serve(
    app: axum::Router,
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && state.api_key_digest.is_none() {
        return Err(ServerError::Config(format!(
            "refusing to serve on {local} without an API key: set WICK_API_KEY or --api-key-file"
        )));
    }
    tracing::info!(
        addr = %local,
        auth = state.api_key_digest.is_some(),
        model = %state.runpod_ctx.served_model_name,
        "dev API server listening"
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    // Whatever ended serving, stop the request tasks too.
    shutdown.cancel();
    state.tasks.close();
    state.tasks.wait().await;
    tracing::info!("dev API server stopped");
    served.map_err(ServerError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_uuid_shaped() {
        let ids = IdGenerator::default();
        let a = ids.next("");
        let b = ids.next("sync-");
        assert_ne!(a, b.trim_start_matches("sync-"));
        assert_eq!(a.len(), 36, "{a}");
        assert_eq!(a.matches('-').count(), 4, "{a}");
        assert!(b.starts_with("sync-"));
    }
}
