//! The per-job error aggregate. Every layer has its own `thiserror` enum; a job that fails ends with
//! exactly one [`JobError`], whose [`JobError::error_type`] is a stable snake_case string used on the
//! wire (RunPod error payloads, OpenAI error objects) and in metrics.

use thiserror::Error;

/// Why a job failed. Wire strings come from [`JobError::error_type`], never from scattered literals.
#[derive(Debug, Error)]
pub enum JobError {
    /// The input broke a documented rule (field, limit and value in the message).
    #[error("{0}")]
    Validation(String),
    /// The request can never be served by this model (e.g. prompt longer than the context).
    #[error("{0}")]
    TooLong(String),
    /// The worker is at capacity; retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The job was cancelled (job-stop, client disconnect).
    #[error("job cancelled")]
    Cancelled,
    /// The job ran past its deadline.
    #[error("{0}")]
    Timeout(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// Tokenization or detokenization failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The engine failed while generating (a model error, a dead engine thread).
    #[error("engine: {0}")]
    Engine(String),
    /// The worker is shutting down and the job could not finish within the grace period.
    #[error("{0}")]
    ShuttingDown(String),
    /// The requested route or resource does not exist (e.g. unknown `openai_route`).
    #[error("{0}")]
    NotFound(String),
}

impl JobError {
    /// Stable snake_case name of the error kind, as sent in `error_type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            JobError::Validation(_) => "validation",
            JobError::TooLong(_) => "validation",
            JobError::Overloaded(_) => "overloaded",
            JobError::Cancelled => "cancelled",
            JobError::Timeout(_) => "timeout",
            JobError::Template(_) => "template_error",
            JobError::Tokenizer(_) => "tokenizer_error",
            JobError::Engine(_) => "generation",
            JobError::ShuttingDown(_) => "shutting_down",
            JobError::NotFound(_) => "not_found",
        }
    }

    /// Whether the platform may usefully retry the same job elsewhere.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            JobError::Overloaded(_) | JobError::ShuttingDown(_) | JobError::Engine(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_are_stable_wire_strings() {
        assert_eq!(JobError::Validation("x".into()).error_type(), "validation");
        assert_eq!(JobError::TooLong("x".into()).error_type(), "validation");
        assert_eq!(JobError::Overloaded("x".into()).error_type(), "overloaded");
        assert_eq!(JobError::Cancelled.error_type(), "cancelled");
        assert_eq!(JobError::Engine("x".into()).error_type(), "generation");
        assert!(JobError::Overloaded("x".into()).is_retryable());
        assert!(!JobError::Validation("x".into()).is_retryable());
    }
}
