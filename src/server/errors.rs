//! HTTP errors of the dev server: the one [`JobError`] → status mapping, and the two body shapes
//! (OpenAI error objects on `/v1/*`, `{"error": ...}` on the RunPod routes).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::JobError;

/// Seconds a client is told to wait after 429 or 503.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Non-standard "client closed request" status (nginx), used when the client itself went away.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Which API family answers: decides the error body shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
    /// `{"error": "message"}` (RunPod's public API).
    RunPod,
}

impl Flavor {
    /// The flavor of a request path: `/v1/...` and `.../openai/v1/...` are OpenAI, everything else
    /// RunPod.
    pub fn of_path(path: &str) -> Flavor {
        if path == "/v1" || path.starts_with("/v1/") || path.contains("/openai/v1/") {
            Flavor::OpenAi
        } else {
            Flavor::RunPod
        }
    }
}

/// An error answered to an HTTP client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`JobError::error_type()` for job errors).
    pub code: &'static str,
    /// Short, client-safe message (no internals).
    pub message: String,
    /// Body shape.
    pub flavor: Flavor,
    /// The job layer's OpenAI error object, when this error came from a job.
    job_object: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        flavor: Flavor,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            flavor,
            job_object: None,
        }
    }

    /// 400 for a body that is not a JSON object of the expected shape.
    pub fn bad_request(message: impl Into<String>, flavor: Flavor) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message, flavor)
    }

    /// 404 for an unknown job id or route.
    pub fn not_found(message: impl Into<String>, flavor: Flavor) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message, flavor)
    }

    /// 429 when admission is full.
    pub fn overloaded(flavor: Flavor) -> Self {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "the server is at capacity; retry later",
            flavor,
        )
    }

    /// 401 for a missing or wrong bearer token.
    pub fn unauthorized(flavor: Flavor) -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid `Authorization: Bearer <key>` header",
            flavor,
        )
    }

    /// The status and body for a failed job. Internal failures keep their details in the logs only.
    pub fn from_job_error(err: &JobError, flavor: Flavor) -> Self {
        let status = status_of(err);
        let message = if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            format!("{} failed; see the worker logs", err.error_type())
        } else {
            err.to_string()
        };
        let mut job_object = crate::job::openai::error_object(err);
        job_object["error"]["message"] = json!(message);
        ApiError {
            job_object: Some(job_object),
            ..ApiError::new(status, err.error_type(), message, flavor)
        }
    }

    /// OpenAI `type` for this status.
    fn openai_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The JSON body: for OpenAI routes the job layer's error object when the error came from a job.
    pub fn body(&self) -> serde_json::Value {
        match (self.flavor, &self.job_object) {
            (Flavor::OpenAi, Some(object)) => object.clone(),
            (Flavor::OpenAi, None) => json!({
                "error": {
                    "message": self.message,
                    "type": self.openai_type(),
                    "param": null,
                    "code": self.code,
                }
            }),
            (Flavor::RunPod, _) => json!({ "error": self.message, "code": self.code }),
        }
    }
}

/// The HTTP status of a failed job: one exhaustive match, so a new [`JobError`] variant needs a
/// decision here.
pub fn status_of(err: &JobError) -> StatusCode {
    match err {
        JobError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
        JobError::TooLong(_) => StatusCode::BAD_REQUEST,
        JobError::Template(_) => StatusCode::BAD_REQUEST,
        JobError::NotFound(_) => StatusCode::NOT_FOUND,
        JobError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
        JobError::ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
        JobError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        JobError::Cancelled => StatusCode::from_u16(CLIENT_CLOSED_REQUEST)
            .expect("499 is a valid status code: invariant"),
        JobError::Tokenizer(_) => StatusCode::INTERNAL_SERVER_ERROR,
        JobError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_errors_map_to_documented_statuses() {
        let cases = [
            (JobError::Validation("x".into()), 422),
            (JobError::TooLong("x".into()), 400),
            (JobError::Template("x".into()), 400),
            (JobError::NotFound("x".into()), 404),
            (JobError::Overloaded("x".into()), 429),
            (JobError::ShuttingDown("x".into()), 503),
            (JobError::Timeout("x".into()), 504),
            (JobError::Cancelled, 499),
            (JobError::Tokenizer("x".into()), 500),
            (JobError::Engine("x".into()), 500),
        ];
        for (err, status) in cases {
            assert_eq!(status_of(&err).as_u16(), status, "{err:?}");
        }
    }

    #[test]
    fn internal_errors_do_not_leak_details() {
        let err = JobError::Engine("cuda oom at /secret/path".into());
        let api = ApiError::from_job_error(&err, Flavor::OpenAi);
        assert!(!api.message.contains("/secret/path"));
        assert_eq!(api.body()["error"]["type"], "server_error");
        assert_eq!(api.body()["error"]["code"], "generation");
    }

    #[test]
    fn validation_errors_keep_their_message() {
        let err = JobError::Validation("`temperature` must be >= 0".into());
        let api = ApiError::from_job_error(&err, Flavor::OpenAi);
        assert_eq!(api.body()["error"]["message"], "`temperature` must be >= 0");
        assert_eq!(api.body()["error"]["type"], "invalid_request_error");
        assert_eq!(api.body()["error"]["param"], "temperature");
    }

    #[test]
    fn overload_carries_retry_after() {
        let response = ApiError::overloaded(Flavor::RunPod).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn flavor_follows_the_path() {
        assert_eq!(Flavor::of_path("/v1/chat/completions"), Flavor::OpenAi);
        assert_eq!(Flavor::of_path("/v2/abc/run"), Flavor::RunPod);
        assert_eq!(Flavor::of_path("/v1x"), Flavor::RunPod);
        assert_eq!(Flavor::of_path("/v2/ep/openai/v1/models"), Flavor::OpenAi);
    }
}
