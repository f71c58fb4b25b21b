//! The route table and the middleware stack. [`ROUTES`] is the single list the router is built from,
//! so tests can walk every route (auth, methods) and a new route cannot skip the checks.
//!
//! Middleware, outermost first: request metrics (route pattern × status) → `Host` check on loopback
//! binds (DNS rebinding) → CORS (only for configured origins) → body limit → per-route bearer auth
//! (every route but `/health`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;
use sha2::{Digest, Sha256};

use super::errors::{ApiError, Flavor};
use super::settings::is_loopback_host;
use super::{openai, runpod, AppState};

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// RunPod `/run`: queue a job.
    Run,
    /// RunPod `/runsync`: run and wait (`?wait=` ms).
    RunSync,
    /// RunPod `/status/{id}`.
    Status,
    /// RunPod `/stream/{id}`: items since the last poll.
    Stream,
    /// RunPod `/cancel/{id}`.
    Cancel,
    /// RunPod `/retry/{id}`: re-queue a FAILED or TIMED_OUT job.
    Retry,
    /// RunPod `/health` (the only route without auth).
    Health,
    /// RunPod `/purge-queue`.
    PurgeQueue,
    /// OpenAI `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI `/v1/completions`.
    Completions,
    /// OpenAI `/v1/models`.
    Models,
    /// Prometheus `/metrics`.
    Metrics,
}

impl Route {
    /// Whether the route needs the bearer token when a key is configured.
    pub fn needs_auth(self) -> bool {
        match self {
            Route::Health => false,
            Route::Run
            | Route::RunSync
            | Route::Status
            | Route::Stream
            | Route::Cancel
            | Route::Retry
            | Route::PurgeQueue
            | Route::ChatCompletions
            | Route::Completions
            | Route::Models
            | Route::Metrics => true,
        }
    }
}

/// One (method, path) the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    /// HTTP method (`GET` or `POST`).
    pub method: &'static str,
    /// axum path pattern (`{id}`, `{endpoint_id}` are parameters).
    pub path: &'static str,
    /// What it does.
    pub route: Route,
}

const fn spec(method: &'static str, path: &'static str, route: Route) -> RouteSpec {
    RouteSpec {
        method,
        path,
        route,
    }
}

/// Every route. RunPod routes exist bare and under `/v2/{endpoint_id}` (any endpoint id), with the
/// real API's methods; status, stream and health also accept POST, as the local SDK server does.
/// OpenAI routes exist bare and under RunPod's passthrough prefix `/v2/{endpoint_id}/openai`.
pub const ROUTES: &[RouteSpec] = &[
    spec("POST", "/run", Route::Run),
    spec("POST", "/v2/{endpoint_id}/run", Route::Run),
    spec("POST", "/runsync", Route::RunSync),
    spec("POST", "/v2/{endpoint_id}/runsync", Route::RunSync),
    spec("GET", "/status/{id}", Route::Status),
    spec("POST", "/status/{id}", Route::Status),
    spec("GET", "/v2/{endpoint_id}/status/{id}", Route::Status),
    spec("POST", "/v2/{endpoint_id}/status/{id}", Route::Status),
    spec("GET", "/stream/{id}", Route::Stream),
    spec("POST", "/stream/{id}", Route::Stream),
    spec("GET", "/v2/{endpoint_id}/stream/{id}", Route::Stream),
    spec("POST", "/v2/{endpoint_id}/stream/{id}", Route::Stream),
    spec("POST", "/cancel/{id}", Route::Cancel),
    spec("POST", "/v2/{endpoint_id}/cancel/{id}", Route::Cancel),
    spec("POST", "/retry/{id}", Route::Retry),
    spec("POST", "/v2/{endpoint_id}/retry/{id}", Route::Retry),
    spec("GET", "/health", Route::Health),
    spec("POST", "/health", Route::Health),
    spec("GET", "/v2/{endpoint_id}/health", Route::Health),
    spec("POST", "/v2/{endpoint_id}/health", Route::Health),
    spec("POST", "/purge-queue", Route::PurgeQueue),
    spec("POST", "/v2/{endpoint_id}/purge-queue", Route::PurgeQueue),
    spec("POST", "/v1/chat/completions", Route::ChatCompletions),
    spec("POST", "/v1/completions", Route::Completions),
    spec("GET", "/v1/models", Route::Models),
    // RunPod's OpenAI passthrough paths, so a client's base URL can be the same locally and deployed.
    spec(
        "POST",
        "/v2/{endpoint_id}/openai/v1/chat/completions",
        Route::ChatCompletions,
    ),
    spec(
        "POST",
        "/v2/{endpoint_id}/openai/v1/completions",
        Route::Completions,
    ),
    spec("GET", "/v2/{endpoint_id}/openai/v1/models", Route::Models),
    spec("GET", "/metrics", Route::Metrics),
];

fn method_filter(method: &str) -> MethodFilter {
    match method {
        "GET" => MethodFilter::GET,
        "POST" => MethodFilter::POST,
        other => panic!("ROUTES holds only GET and POST, found {other}: this is a bug"),
    }
}

/// Adds `route`'s handler for `filter` to `router`.
fn with_handler(
    router: MethodRouter<Arc<AppState>>,
    filter: MethodFilter,
    route: Route,
) -> MethodRouter<Arc<AppState>> {
    match route {
        Route::Run => router.on(filter, runpod::run),
        Route::RunSync => router.on(filter, runpod::run_sync),
        Route::Status => router.on(filter, runpod::status),
        Route::Stream => router.on(filter, runpod::stream),
        Route::Cancel => router.on(filter, runpod::cancel),
        Route::Retry => router.on(filter, runpod::retry),
        Route::Health => router.on(filter, runpod::health),
        Route::PurgeQueue => router.on(filter, runpod::purge_queue),
        Route::ChatCompletions => router.on(filter, openai::chat_completions),
        Route::Completions => router.on(filter, openai::completions),
        Route::Models => router.on(filter, openai::models),
        Route::Metrics => router.on(filter, metrics),
    }
}

/// Builds the router from [`ROUTES`] plus the middleware stack.
pub fn build(state: Arc<AppState>) -> Router {
    let mut by_path: BTreeMap<&'static str, (Route, MethodRouter<Arc<AppState>>)> = BTreeMap::new();
    for spec in ROUTES {
        let (route, methods) = by_path
            .remove(spec.path)
            .unwrap_or((spec.route, MethodRouter::new()));
        assert_eq!(
            route, spec.route,
            "one path, one route kind in ROUTES: this is a bug"
        );
        by_path.insert(
            spec.path,
            (
                route,
                with_handler(methods, method_filter(spec.method), spec.route),
            ),
        );
    }
    let mut router = Router::new();
    for (path, (route, methods)) in by_path {
        let methods = if route.needs_auth() {
            methods.route_layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                require_auth,
            ))
        } else {
            methods
        };
        router = router.route(path, methods);
    }
    let body_limit = state.settings.body_limit;
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), cors))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            check_host,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            record_request,
        ))
        .with_state(state)
}

async fn not_found(request: Request) -> ApiError {
    let flavor = Flavor::of_path(request.uri().path());
    ApiError::not_found("no such route", flavor)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let engine = state.runpod_ctx.engine.stats();
    let gauges = super::metrics::ServerGauges {
        queue_depth: state.admission.queue_depth(),
        waiting: state.admission.waiting(),
        running: state.admission.running(),
        stored_jobs: state.store.len(),
    };
    let body = state.metrics.render(
        &engine,
        &gauges,
        state.runpod_ctx.engine.health().is_healthy(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// SHA-256 of a key; keys are compared by digest so the comparison time does not depend on length.
pub fn digest(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// Constant-time equality of two digests.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The token of `Authorization: Bearer <key>` (or a bare `Authorization: <key>`, as RunPod's docs
/// also show).
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        Some(_) => return None,
        None if value.eq_ignore_ascii_case("bearer") => return None,
        None => value,
    };
    (!token.is_empty()).then_some(token)
}

async fn require_auth(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.api_key_digest else {
        return next.run(request).await;
    };
    let authorized = presented_token(request.headers())
        .is_some_and(|token| digests_equal(&digest(token), expected));
    if authorized {
        next.run(request).await
    } else {
        ApiError::unauthorized(Flavor::of_path(request.uri().path())).into_response()
    }
}

/// On a loopback bind, only loopback `Host` names are served: a web page cannot reach the server
/// through DNS rebinding.
async fn check_host(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if state.settings.host_is_loopback() && state.api_key_digest.is_none() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
        if !host.as_deref().is_some_and(host_header_is_loopback) {
            let flavor = Flavor::of_path(request.uri().path());
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_host",
                "this server answers only to loopback host names",
                flavor,
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Whether a `Host` header names a loopback host (any port).
fn host_header_is_loopback(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        }
    };
    is_loopback_host(name) || name.to_ascii_lowercase().ends_with(".localhost")
}

/// CORS for explicitly configured origins only: the matching origin is echoed (never `*`), and
/// preflight requests are answered here, before auth.
async fn cors(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let origins = &state.settings.cors_origins;
    let origin = request.headers().get(header::ORIGIN).cloned();
    let allowed = origin
        .as_ref()
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| {
            origins
                .iter()
                .any(|allowed| allowed == o.trim_end_matches('/'))
        });
    let Some(origin) = origin.filter(|_| allowed) else {
        return next.run(request).await;
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, x-request-id"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after"),
    );
    response
}

/// Counts every answered request by route pattern (bounded label set) and status.
async fn record_request(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    if status == StatusCode::TOO_MANY_REQUESTS.as_u16() {
        state
            .metrics
            .rejected_overloaded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    state.metrics.record_request(&route, status);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_bare_tokens_are_read() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(presented_token(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("abc"));
        assert_eq!(presented_token(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(presented_token(&headers), None);
    }

    #[test]
    fn digest_compare_is_exact() {
        assert!(digests_equal(&digest("k1"), &digest("k1")));
        assert!(!digests_equal(&digest("k1"), &digest("k2")));
        assert!(!digests_equal(&digest("k1"), &digest("k1 ")));
    }

    #[test]
    fn loopback_host_headers() {
        for host in [
            "127.0.0.1:8000",
            "localhost",
            "localhost:1",
            "[::1]:8000",
            "app.localhost:3000",
        ] {
            assert!(host_header_is_loopback(host), "{host}");
        }
        for host in [
            "evil.example:8000",
            "10.0.0.1",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(!host_header_is_loopback(host), "{host}");
        }
    }

    #[test]
    fn every_route_is_get_or_post_and_only_health_is_public() {
        for spec in ROUTES {
            assert!(matches!(spec.method, "GET" | "POST"), "{spec:?}");
            assert_eq!(
                spec.route.needs_auth(),
                spec.route != Route::Health,
                "{spec:?}"
            );
        }
    }
}
