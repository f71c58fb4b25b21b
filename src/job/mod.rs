//! Jobs: the ONE code path from a job `input` (RunPod queue, `--test-input`, the dev server's RunPod
//! routes) or an OpenAI request body (dev server `/v1/*`) to generated output.
//!
//! Owned here: the input schema ([`input`]), validation with TGI-style messages ([`validate`]),
//! expanding `n` into engine requests and consuming their events ([`stream`]), and output shaping in
//! worker-vllm's native shape ([`output`]) and OpenAI's shapes ([`openai`]).
//! Not here: HTTP status codes and framing (`queue`, `server`), the engine itself (`engine`).
//!
//! # What a job produces (worker-vllm "classic" compatible)
//! worker-vllm's handler is an async generator and runs with `return_aggregate_stream: True`, so every
//! job is a sequence of *yielded items*: each item is posted to job-stream as `{"output": item}`, and
//! the final job-done body is `{"output": [item, ...]}` (all items, in order). [`run_job`] mirrors that:
//! it sends each item on `chunks` as soon as it is ready and returns the list of them all.
//!
//! Native input (`prompt` / `messages`):
//! - `stream: true`: items are `{"choices":[{"tokens":[text delta, ...]}, ...], "usage":{"input":N,
//!   "output":M}}` with one choice per `n`, batched 1 → 3 → 9 → 27 → 50 tokens per item
//!   (`min_batch_size`, `batch_size_growth_factor`, `max_batch_size`; defaults from the config). A
//!   choice gains `"finish_reason"` (`"stop"`/`"length"`) in the item where it ends (when the last
//!   token exactly filled a batch, a final item carries the finish reasons with empty `tokens`), and
//!   `"logprobs"` (see [`output`]) when `sampling_params.logprobs` is set. `usage` is cumulative;
//!   `usage.input` counts the prompt once whatever `n` is. A token that ends inside a multi-byte
//!   character contributes `""` and its text arrives with the next token.
//! - `stream: false`: one item with the whole text per choice: `{"choices":[{"tokens":["full text"],
//!   "finish_reason":"length"}], "usage":{...}}`.
//!
//! OpenAI input (`openai_route` + `openai_input`):
//! - `/v1/chat/completions`, `/v1/completions` without `stream`: one item, the OpenAI response object.
//! - with `stream: true`: items are strings of SSE lines (`"data: {chunk}\n\n"` ...), batched like the
//!   native stream, the last one ending with `"data: [DONE]\n\n"` (worker-vllm's default
//!   `RAW_OPENAI_OUTPUT=1`); with [`JobContext::raw_openai_output`] off, items are lists of chunk
//!   objects and `[DONE]` is dropped.
//! - `/v1/models`: one item, the model list object.
//! - Sampling defaults: vLLM's, plus (OpenAI routes only, as vLLM's OpenAI server) the model's
//!   `generation_config.json` values for fields the request leaves out, once the caller attaches them
//!   with [`JobContext::with_model_files`]. `max_tokens`: native 100 (worker-vllm injects it),
//!   completions 16, chat the rest of the context; a default never exceeds the context, an explicit
//!   value that does is a validation error.
//!
//! Errors end the job with a [`JobError`] (never an error object inside a COMPLETED output, unlike
//! worker-vllm); the caller formats it ([`JobError::error_type`] + message).

pub mod input;
pub mod openai;
pub mod output;
pub mod stream;
pub mod validate;

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::EngineHandle;
use crate::error::JobError;

pub use input::{JobInput, NativeInput, OpenAiRoute};
pub use stream::StreamBatching;
pub use validate::{JobLimits, ModelSamplingDefaults};

/// Everything a job needs besides its input. Cheap to clone (the engine handle is a channel sender).
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The running engine (and through it, the tokenizer and `max_model_len`).
    pub engine: EngineHandle,
    /// Input limits.
    pub limits: JobLimits,
    /// Model name reported in OpenAI responses and `/v1/models` (`OPENAI_SERVED_MODEL_NAME_OVERRIDE`,
    /// else `SERVED_MODEL_NAME`, else the engine's model name). Requests may name it or the engine's.
    pub served_model_name: String,
    /// Default stream chunking (per-job `max_batch_size` etc. override it).
    pub stream_defaults: StreamBatching,
    /// OpenAI streams through a queue job as strings of SSE lines (worker-vllm `RAW_OPENAI_OUTPUT=1`,
    /// its default) instead of lists of chunk objects.
    pub raw_openai_output: bool,
    /// Longest a job may run, from start to last token.
    pub request_timeout: Duration,
    /// The model's `generation_config.json` sampling defaults, applied on the OpenAI routes as vLLM
    /// does (none until [`JobContext::with_model_files`]).
    pub openai_defaults: ModelSamplingDefaults,
}

impl JobContext {
    /// Builds a context from the worker configuration and a running engine.
    pub fn new(engine: EngineHandle, config: &Config) -> JobContext {
        let max_model_len = engine.info().max_model_len;
        let served_model_name = config
            .openai_served_model_name_override
            .clone()
            .or_else(|| config.served_model_name.clone())
            .unwrap_or_else(|| engine.info().model_name.clone());
        JobContext {
            limits: JobLimits::from_config(config, max_model_len),
            served_model_name,
            stream_defaults: StreamBatching::from_config(config),
            raw_openai_output: config.raw_openai_output,
            request_timeout: Duration::from_secs(config.request_timeout_secs.max(1)),
            openai_defaults: ModelSamplingDefaults::default(),
            engine,
        }
    }
}

impl JobContext {
    /// Takes the model's sampling defaults from its `generation_config.json` (when it has one) for
    /// the OpenAI routes, as vLLM's OpenAI server does. A missing or unreadable file means no
    /// defaults (logged), never a failure: the file is optional.
    pub fn with_model_files(mut self, files: &crate::hub::ModelFiles) -> JobContext {
        let Some(path) = files.generation_config.as_deref() else {
            return self;
        };
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string()));
        match parsed {
            Ok(config) => {
                self.openai_defaults = ModelSamplingDefaults::from_generation_config(&config)
            }
            Err(error) => tracing::warn!(%error, "generation_config.json ignored: cannot read it"),
        }
        self
    }
}

/// Runs one job input to completion: validates it, generates, sends every yielded item on `chunks`
/// in order (bounded; the caller drains it and posts each to job-stream), and returns the final job
/// output: the list of all yielded items (`return_aggregate_stream`). See the module docs for shapes.
///
/// When `cancel` fires, the engine sequences are dropped (freeing their slots within one step) and
/// the job ends with [`JobError::Cancelled`]; if the `chunks` receiver is dropped the job is cancelled
/// the same way.
///
/// # Errors
/// [`JobError::Validation`] for bad input (nothing reaches the engine), [`JobError::Overloaded`] when
/// the engine inbox is full, [`JobError::NotFound`] for an unknown `openai_route` or model,
/// [`JobError::Timeout`], [`JobError::Cancelled`], [`JobError::Engine`], [`JobError::Template`].
pub async fn run_job(
    ctx: &JobContext,
    input: Value,
    chunks: mpsc::Sender<Value>,
    cancel: CancellationToken,
) -> Result<Value, JobError> {
    run_job_with_id(ctx, &output::new_request_id("job-"), input, chunks, cancel).await
}

/// [`run_job`] with the caller's id (e.g. the RunPod job id) on the engine requests of a native job,
/// so engine logs and spans name the job (`{id}`, or `{id}-{i}` for `n` > 1). OpenAI routes use
/// their response id (`chatcmpl-...`, `cmpl-...`) instead.
///
/// # Errors
/// As [`run_job`].
pub async fn run_job_with_id(
    ctx: &JobContext,
    request_id: &str,
    input: Value,
    chunks: mpsc::Sender<Value>,
    cancel: CancellationToken,
) -> Result<Value, JobError> {
    let job_input = JobInput::parse(input, &ctx.limits)?;
    let mut items = Vec::new();
    let mut sink = output::ItemSink {
        chunks: &chunks,
        items: &mut items,
    };
    match job_input {
        JobInput::Native(native) => {
            output::run_native(ctx, request_id, *native, &mut sink, &cancel).await?
        }
        JobInput::OpenAi { route, body } => {
            openai::run_route_as_job(ctx, route, body, &mut sink, &cancel).await?
        }
    }
    Ok(Value::Array(items))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::config::Config;

    #[test]
    fn raw_openai_output_accepts_worker_vllm_values() {
        assert!(Config::for_test().raw_openai_output);
        for (value, expected) in [("0", false), ("1", true), ("false", false), ("true", true)] {
            let config = Config::try_parse_from(["wick", "--raw-openai-output", value]).unwrap();
            assert_eq!(config.raw_openai_output, expected, "{value}");
        }
    }
}
