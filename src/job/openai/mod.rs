//! OpenAI-compatible requests and responses: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//! Used by queue jobs (`openai_route` + `openai_input`, see [`super`]) and by the dev server's `/v1/*`
//! routes, which frame SSE themselves: one code path for both.
//!
//! - [`parse_chat_request`] / [`parse_completion_request`] validate a body (vLLM's extra sampling
//!   fields accepted, unsupported features rejected with a named field).
//! - [`run_chat`] / [`run_completion`] generate and always return the complete response object
//!   (`chat.completion` / `text_completion`); when the request streams, they also send each chunk
//!   object (`chat.completion.chunk` / `text_completion`) on `chunks` in order, ending with the usage
//!   chunk when `stream_options.include_usage` is set. No `[DONE]`: that is SSE framing.
//! - [`models_response`] is the `/v1/models` list; [`error_object`] is the OpenAI error body.
//!
//! Logprobs follow OpenAI: chat `{"content":[{"token","logprob","bytes","top_logprobs":[...]}]}`,
//! completions `{"tokens","token_logprobs","top_logprobs":[{token: logprob}],"text_offset"}`.

mod request;
mod shape;

pub use request::{
    parse_chat_request, parse_completion_request, ChatRequest, CompletionPrompt, CompletionRequest,
};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::request::invalid;
use self::shape::{Flavor, OaChoice, OaRun};
use super::input::{short_json, OpenAiRoute, PromptSource, RawSamplingParams};
use super::output::{
    check_summary, new_request_id, prepare_prompt, unix_now, ChatOptions, ItemSink,
};
use super::stream::{expand_n, BatchSize, Generation, SeqSpec, StreamBatching};
use super::validate::{fit_max_tokens, MaxTokensDefault, ResolvedSampling};
use super::JobContext;
use crate::engine::SeqEvent;
use crate::error::JobError;

/// Checks a request's `model` against the served names (the served name or the engine's model name).
///
/// # Errors
/// [`JobError::NotFound`], as vLLM answers 404 for an unknown model.
pub fn check_model(ctx: &JobContext, model: Option<&str>) -> Result<(), JobError> {
    match model {
        None => Ok(()),
        Some(name) if name == ctx.served_model_name || name == ctx.engine.info().model_name => {
            Ok(())
        }
        Some(name) => Err(JobError::NotFound(format!(
            "The model `{}` does not exist. This worker serves `{}`.",
            short_json(&Value::String(name.to_string())).trim_matches('"'),
            ctx.served_model_name
        ))),
    }
}

/// The `/v1/models` response.
pub fn models_response(ctx: &JobContext) -> Value {
    json!({
        "object": "list",
        "data": [{
            "id": ctx.served_model_name,
            "object": "model",
            "created": unix_now(),
            "owned_by": "wick",
            "root": ctx.engine.info().model_name,
            "parent": null,
            "max_model_len": ctx.limits.max_model_len,
            "permission": [],
        }],
    })
}

/// An OpenAI error body for a failed request: `{"error":{"message","type","param","code"}}`.
/// `type` follows OpenAI's names; `code` is the stable [`JobError::error_type`]; `param` is the field
/// a validation message names first (in backticks), if any. HTTP statuses are the server's business.
pub fn error_object(err: &JobError) -> Value {
    let kind = match err {
        JobError::Validation(_) | JobError::TooLong(_) | JobError::Template(_) => {
            "invalid_request_error"
        }
        JobError::NotFound(_) => "not_found_error",
        JobError::Overloaded(_) => "server_overloaded",
        JobError::Timeout(_) => "timeout",
        JobError::Cancelled => "cancelled",
        JobError::Tokenizer(_) | JobError::Engine(_) | JobError::ShuttingDown(_) => "server_error",
    };
    let message = err.to_string();
    let param = match err {
        JobError::Validation(m) => m
            .strip_prefix('`')
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| Value::String(name.to_string()))
            .unwrap_or(Value::Null),
        _ => Value::Null,
    };
    json!({"error": {"message": message, "type": kind, "param": param, "code": err.error_type()}})
}

async fn send_chunk(
    chunks: &mpsc::Sender<Value>,
    chunk: Value,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(JobError::Cancelled),
        sent = chunks.send(chunk) => sent.map_err(|_| JobError::Cancelled),
    }
}

/// Runs the sequences of an OpenAI request; `prefixes[i]` is echoed text for choice `i`.
async fn drive(
    ctx: &JobContext,
    run: &OaRun<'_>,
    specs: Vec<SeqSpec>,
    prefixes: Vec<String>,
    stream: bool,
    chunks: &mpsc::Sender<Value>,
    cancel: &CancellationToken,
) -> Result<Value, JobError> {
    tracing::debug!(request_id = %run.id, prompt_tokens = run.prompt_tokens, sequences = specs.len(), stream, "openai request validated");
    let mut generation = Generation::start(&ctx.engine, &run.id, specs, ctx.request_timeout)?;
    let mut choices: Vec<OaChoice> = prefixes
        .into_iter()
        .map(|prefix| OaChoice {
            offset: prefix.len(),
            text: prefix,
            ..OaChoice::default()
        })
        .collect();
    if stream {
        for (index, choice) in choices.iter().enumerate() {
            match run.flavor {
                Flavor::Chat => send_chunk(chunks, run.role_chunk(index), cancel).await?,
                Flavor::Completion if !choice.text.is_empty() => {
                    send_chunk(chunks, run.delta_chunk(index, &choice.text, &[], 0), cancel).await?
                }
                Flavor::Completion => {}
            }
        }
    }
    while let Some((index, event)) = generation.next(cancel).await? {
        let choice = &mut choices[index];
        match event {
            SeqEvent::Delta {
                text,
                token_ids,
                logprobs,
            } => {
                choice.generated += token_ids.len();
                if stream && (!text.is_empty() || (run.with_logprobs && !logprobs.is_empty())) {
                    let chunk = run.delta_chunk(index, &text, &logprobs, choice.offset);
                    send_chunk(chunks, chunk, cancel).await?;
                }
                choice.offset += logprobs.iter().map(|t| t.chosen.token.len()).sum::<usize>();
                choice.text.push_str(&text);
                if run.with_logprobs {
                    choice.tokens.extend(logprobs);
                }
            }
            SeqEvent::Finished(summary) => {
                check_summary(&summary)?;
                choice.generated = choice.generated.max(summary.completion_tokens);
                if stream {
                    send_chunk(chunks, run.finish_chunk(index, &summary), cancel).await?;
                }
                choice.summary = Some(summary);
            }
        }
    }
    if stream && run.include_usage {
        let completion_tokens = choices.iter().map(|c| c.generated).sum();
        send_chunk(chunks, run.usage_chunk(completion_tokens), cancel).await?;
    }
    Ok(run.response(&choices))
}

/// The request's sampling fields with the model's defaults filled in, validated.
fn resolve_sampling(
    ctx: &JobContext,
    sampling: &RawSamplingParams,
) -> Result<ResolvedSampling, JobError> {
    ctx.openai_defaults
        .fill(sampling)
        .resolve(&ctx.limits, ctx.engine.info().vocab_size)
}

/// vLLM's `max_tokens` rule on the OpenAI routes: the request's value (or the route default) must
/// fit the context, and the model's `max_new_tokens` caps it.
fn openai_max_tokens(
    ctx: &JobContext,
    requested: Option<i64>,
    default: MaxTokensDefault,
    prompt_tokens: usize,
    min_tokens: usize,
) -> Result<usize, JobError> {
    let max_tokens = fit_max_tokens(
        requested,
        default,
        prompt_tokens,
        min_tokens,
        ctx.limits.max_model_len,
    )?;
    Ok(match ctx.openai_defaults.max_new_tokens {
        Some(cap) => max_tokens.min(cap.max(min_tokens).max(1)),
        None => max_tokens,
    })
}

/// Runs a chat completion. Returns the `chat.completion` object; when `req.stream`, also sends every
/// `chat.completion.chunk` on `chunks` (a role chunk per choice, content deltas, a finish chunk per
/// choice, then the usage chunk if asked).
///
/// # Errors
/// As [`super::run_job`].
pub async fn run_chat(
    ctx: &JobContext,
    req: ChatRequest,
    chunks: &mpsc::Sender<Value>,
    cancel: &CancellationToken,
) -> Result<Value, JobError> {
    check_model(ctx, req.model.as_deref())?;
    let resolved = resolve_sampling(ctx, &req.sampling)?;
    let options = ChatOptions {
        add_generation_prompt: req.add_generation_prompt,
        tools: req.tools.clone(),
        enable_thinking: req.enable_thinking,
    };
    let prompt_ids = prepare_prompt(
        ctx,
        &PromptSource::Chat(req.messages.clone()),
        options,
        resolved.truncate_prompt_tokens,
    )
    .await?;
    let mut params = resolved.params;
    params.max_tokens = openai_max_tokens(
        ctx,
        req.sampling.max_tokens,
        MaxTokensDefault::RemainingContext,
        prompt_ids.len(),
        params.min_tokens,
    )?;
    let run = OaRun {
        flavor: Flavor::Chat,
        id: new_request_id("chatcmpl-"),
        created: unix_now(),
        model: &ctx.served_model_name,
        include_usage: req.include_usage,
        with_logprobs: params.logprobs.is_some(),
        prompt_tokens: prompt_ids.len(),
    };
    let specs = expand_n(&prompt_ids, &params, resolved.n);
    drive(
        ctx,
        &run,
        specs,
        vec![String::new(); resolved.n],
        req.stream,
        chunks,
        cancel,
    )
    .await
}

/// Runs a text completion. Returns the `text_completion` object; when `req.stream`, also sends every
/// chunk on `chunks` (echoed prompt first if `echo`, text deltas, a finish chunk per choice, then the
/// usage chunk if asked). Choice `index` is `prompt_index * n + i`.
///
/// # Errors
/// As [`super::run_job`].
pub async fn run_completion(
    ctx: &JobContext,
    req: CompletionRequest,
    chunks: &mpsc::Sender<Value>,
    cancel: &CancellationToken,
) -> Result<Value, JobError> {
    check_model(ctx, req.model.as_deref())?;
    let resolved = resolve_sampling(ctx, &req.sampling)?;
    if req.echo && resolved.params.logprobs.is_some() {
        return Err(invalid(
            "`echo` together with `logprobs` is not supported (prompt logprobs are not computed)"
                .into(),
        ));
    }
    let vocab_size = ctx.engine.info().vocab_size;
    let mut specs = Vec::new();
    let mut prefixes = Vec::new();
    let mut prompt_tokens = 0;
    let mut with_logprobs = false;
    for prompt in &req.prompts {
        let (ids, text) = match prompt {
            CompletionPrompt::Text(text) => {
                let source = PromptSource::Text(text.clone());
                (
                    prepare_prompt(
                        ctx,
                        &source,
                        ChatOptions::default(),
                        resolved.truncate_prompt_tokens,
                    )
                    .await?,
                    text.clone(),
                )
            }
            CompletionPrompt::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                    return Err(invalid(format!("`prompt` token ids must be < {vocab_size} (the vocabulary size). Given: {bad}")));
                }
                let mut ids = ids.clone();
                if let Some(keep) = resolved.truncate_prompt_tokens {
                    ids.drain(..ids.len().saturating_sub(keep));
                }
                let text = if req.echo {
                    ctx.engine
                        .tokenizer()
                        .decode(&ids, false)
                        .map_err(super::output::tokenizer_error)?
                } else {
                    String::new()
                };
                (ids, text)
            }
        };
        let mut params = resolved.params.clone();
        params.max_tokens = openai_max_tokens(
            ctx,
            req.sampling.max_tokens,
            MaxTokensDefault::Fixed(16),
            ids.len(),
            params.min_tokens,
        )?;
        with_logprobs = params.logprobs.is_some();
        prompt_tokens += ids.len();
        specs.extend(expand_n(&ids, &params, resolved.n));
        prefixes.extend(std::iter::repeat_n(
            if req.echo { text } else { String::new() },
            resolved.n,
        ));
    }
    let run = OaRun {
        flavor: Flavor::Completion,
        id: new_request_id("cmpl-"),
        created: unix_now(),
        model: &ctx.served_model_name,
        include_usage: req.include_usage,
        with_logprobs,
        prompt_tokens,
    };
    drive(ctx, &run, specs, prefixes, req.stream, chunks, cancel).await
}

/// Frames one chunk as an SSE event line (`data: {json}\n\n`).
pub fn sse_event(chunk: &Value) -> String {
    format!("data: {chunk}\n\n")
}

/// The SSE end-of-stream line.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// worker-vllm's batching of an OpenAI stream inside a job: chunk objects grouped 1, 3, 9, ... per
/// yielded item, each item either one string of SSE lines (raw output, ending with `[DONE]`) or a
/// list of chunk objects.
#[derive(Debug)]
struct JobStreamBatcher {
    raw: bool,
    batch_size: BatchSize,
    /// SSE lines (raw) or chunk objects waiting for the batch to fill.
    pending: Vec<Value>,
}

impl JobStreamBatcher {
    fn new(raw: bool, batching: StreamBatching) -> Self {
        JobStreamBatcher {
            raw,
            batch_size: BatchSize::new(batching),
            pending: Vec::new(),
        }
    }

    fn take_item(&mut self) -> Value {
        let taken = std::mem::take(&mut self.pending);
        if self.raw {
            Value::String(taken.iter().filter_map(Value::as_str).collect())
        } else {
            Value::Array(taken)
        }
    }

    /// Adds one chunk; returns an item when the batch is full.
    fn push(&mut self, chunk: &Value) -> Option<Value> {
        self.pending.push(if self.raw {
            Value::String(sse_event(chunk))
        } else {
            chunk.clone()
        });
        if !self.batch_size.is_full(self.pending.len()) {
            return None;
        }
        self.batch_size.advance();
        Some(self.take_item())
    }

    /// The last item: what is left, plus `[DONE]` in raw mode.
    fn finish(mut self) -> Option<Value> {
        if self.raw {
            self.pending.push(Value::String(SSE_DONE.to_string()));
        }
        (!self.pending.is_empty()).then(|| self.take_item())
    }
}

/// Runs an OpenAI route inside a queue job and yields worker-vllm's items: the response object
/// (non-stream, `/v1/models`), or batches of SSE lines (stream; see [`super`]).
pub(crate) async fn run_route_as_job(
    ctx: &JobContext,
    route: OpenAiRoute,
    body: Value,
    sink: &mut ItemSink<'_>,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    enum Parsed {
        Chat(ChatRequest),
        Completion(CompletionRequest),
    }
    let parsed = match route {
        OpenAiRoute::Models => return sink.emit(models_response(ctx), cancel).await,
        OpenAiRoute::ChatCompletions => Parsed::Chat(parse_chat_request(&body, &ctx.limits)?),
        OpenAiRoute::Completions => {
            Parsed::Completion(parse_completion_request(&body, &ctx.limits)?)
        }
    };
    let stream = match &parsed {
        Parsed::Chat(r) => r.stream,
        Parsed::Completion(r) => r.stream,
    };
    let (sender, mut receiver) = mpsc::channel::<Value>(64);
    let producer = async move {
        match parsed {
            Parsed::Chat(r) => run_chat(ctx, r, &sender, cancel).await,
            Parsed::Completion(r) => run_completion(ctx, r, &sender, cancel).await,
        }
        // `sender` drops here, ending the consumer's loop.
    };
    if !stream {
        let response = producer.await?;
        return sink.emit(response, cancel).await;
    }
    let mut batcher = JobStreamBatcher::new(ctx.raw_openai_output, ctx.stream_defaults);
    let consumer_sink = &mut *sink;
    let consumer = async move {
        while let Some(chunk) = receiver.recv().await {
            if let Some(item) = batcher.push(&chunk) {
                consumer_sink.emit(item, cancel).await?;
            }
        }
        Ok::<JobStreamBatcher, JobError>(batcher)
    };
    let (produced, consumed) = tokio::join!(producer, consumer);
    let batcher = consumed?;
    produced?;
    match batcher.finish() {
        Some(item) => sink.emit(item, cancel).await,
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_object_has_openai_fields() {
        let e = error_object(&JobError::Validation(
            "`top_p` must be > 0.0 and <= 1.0. Given: 1.5".into(),
        ));
        assert_eq!(
            e,
            json!({"error": {"message": "`top_p` must be > 0.0 and <= 1.0. Given: 1.5", "type": "invalid_request_error", "param": "top_p", "code": "validation"}})
        );
        let e = error_object(&JobError::NotFound("no".into()));
        assert_eq!(e["error"]["type"], "not_found_error");
        assert_eq!(e["error"]["param"], Value::Null);
    }

    #[test]
    fn sse_framing() {
        assert_eq!(sse_event(&json!({"a": 1})), "data: {\"a\":1}\n\n");
        assert_eq!(SSE_DONE, "data: [DONE]\n\n");
    }

    #[test]
    fn job_stream_batcher_groups_sse_lines_and_ends_with_done() {
        let mut raw = JobStreamBatcher::new(true, StreamBatching::default());
        let items: Vec<Value> = (0..5).filter_map(|i| raw.push(&json!({"i": i}))).collect();
        assert_eq!(
            items,
            vec![
                json!("data: {\"i\":0}\n\n"),
                json!("data: {\"i\":1}\n\ndata: {\"i\":2}\n\ndata: {\"i\":3}\n\n")
            ]
        );
        assert_eq!(
            raw.finish(),
            Some(json!("data: {\"i\":4}\n\ndata: [DONE]\n\n"))
        );

        let mut objects = JobStreamBatcher::new(false, StreamBatching::default());
        assert_eq!(objects.push(&json!(1)), Some(json!([1])));
        assert_eq!(objects.finish(), None);
    }
}
