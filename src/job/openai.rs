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

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::input::{field, short_json, OpenAiRoute, PromptSource, RawSamplingParams};
use super::output::{check_summary, new_request_id, prepare_prompt, unix_now, ChatOptions, ItemSink};
use super::stream::{expand_n, BatchSize, Generation, SeqSpec};
use super::validate::{check_json_limits, fit_max_tokens, JobLimits, MaxTokensDefault, ResolvedSampling};
use super::JobContext;
use crate::engine::{GeneratedToken, SeqEvent, SeqSummary, StopMatch};
use crate::error::JobError;

/// A validated `/v1/chat/completions` request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// `model`, if given (must name the served model).
    pub model: Option<String>,
    /// The conversation (checked and normalised when the prompt is built).
    pub messages: Value,
    /// Sampling fields (vLLM names; `max_completion_tokens` and `logprobs`/`top_logprobs` mapped).
    pub sampling: RawSamplingParams,
    /// Stream chunk objects.
    pub stream: bool,
    /// `stream_options.include_usage`: a final chunk with `usage` and no choices.
    pub include_usage: bool,
    /// `tools`, passed to the chat template (only with `tool_choice` `"none"`: calls are not parsed).
    pub tools: Option<Value>,
    /// vLLM's `add_generation_prompt` (default true).
    pub add_generation_prompt: bool,
    /// `chat_template_kwargs.enable_thinking` (the only template switch taken from a request).
    pub enable_thinking: Option<bool>,
}

/// One prompt of a `/v1/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub enum CompletionPrompt {
    /// Text, tokenized with special tokens.
    Text(String),
    /// Token ids, used as given.
    Ids(Vec<u32>),
}

/// A validated `/v1/completions` request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// `model`, if given (must name the served model).
    pub model: Option<String>,
    /// One or more prompts (`n` choices each).
    pub prompts: Vec<CompletionPrompt>,
    /// Sampling fields (vLLM names).
    pub sampling: RawSamplingParams,
    /// Stream chunk objects.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Prepend the prompt to the output text.
    pub echo: bool,
}

fn invalid(message: String) -> JobError {
    JobError::Validation(message)
}

fn as_object<'a>(body: &'a Value, what: &str) -> Result<&'a Map<String, Value>, JobError> {
    match body {
        Value::Object(map) => Ok(map),
        other => Err(invalid(format!("`{what}` must be a JSON object. Given: {}", short_json(other)))),
    }
}

/// Fields OpenAI or vLLM define that this worker does not implement (beyond the sampling ones).
fn reject_unsupported_openai(map: &Map<String, Value>) -> Result<(), JobError> {
    for name in ["functions", "function_call", "documents", "prediction", "audio", "suffix", "continue_final_message", "echo_prompt"] {
        if map.get(name).is_some_and(|v| !v.is_null() && v != &Value::Bool(false)) {
            return Err(invalid(format!("`{name}` is not supported by this worker")));
        }
    }
    if let Some(format) = map.get("response_format").filter(|v| !v.is_null()) {
        let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "text" {
            return Err(invalid(format!(
                "`response_format` {} is not supported by this worker (structured output is not implemented); use {{\"type\": \"text\"}}",
                short_json(format)
            )));
        }
    }
    Ok(())
}

fn include_usage(map: &Map<String, Value>) -> Result<bool, JobError> {
    match map.get("stream_options") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(options)) => Ok(field::<bool>(options, "include_usage", "a boolean")?.unwrap_or(false)),
        Some(other) => Err(invalid(format!("`stream_options` must be an object. Given: {}", short_json(other)))),
    }
}

fn model_field(map: &Map<String, Value>) -> Result<Option<String>, JobError> {
    field::<String>(map, "model", "a string")
}

/// Parses and validates a chat completions body.
///
/// # Errors
/// [`JobError::Validation`] naming the field.
pub fn parse_chat_request(body: &Value, limits: &JobLimits) -> Result<ChatRequest, JobError> {
    check_json_limits(body, limits)?;
    let map = as_object(body, "openai_input")?;
    reject_unsupported_openai(map)?;
    if field::<bool>(map, "echo", "a boolean")?.unwrap_or(false) {
        return Err(invalid("`echo` is not supported on /v1/chat/completions by this worker".into()));
    }
    let messages = map
        .get("messages")
        .filter(|v| !v.is_null())
        .cloned()
        .ok_or_else(|| invalid("`messages` is required".into()))?;
    // Chat's `logprobs` is a boolean with `top_logprobs`; the rest uses vLLM's names.
    let mut sampling_map = map.clone();
    sampling_map.remove("logprobs");
    let mut sampling = RawSamplingParams::from_map(&sampling_map)?;
    let logprobs = field::<bool>(map, "logprobs", "a boolean")?.unwrap_or(false);
    let top_logprobs = field::<i64>(map, "top_logprobs", "an integer")?;
    sampling.logprobs = match (logprobs, top_logprobs) {
        (false, Some(t)) if t > 0 => {
            return Err(invalid("`top_logprobs` requires `logprobs` to be true".into()));
        }
        (false, _) => None,
        (true, t) => Some(t.unwrap_or(0)),
    };
    if let Some(max) = field::<i64>(map, "max_completion_tokens", "an integer")? {
        sampling.max_tokens = Some(max);
    }
    let tools = match map.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) if tools.is_empty() => None,
        Some(tools @ Value::Array(_)) => {
            let choice = map.get("tool_choice").cloned().unwrap_or(Value::Null);
            if choice != Value::String("none".into()) {
                return Err(invalid(format!(
                    "`tool_choice` {} is not supported: this worker does not parse tool calls; set `tool_choice` to \"none\" or leave out `tools`",
                    if choice.is_null() { "\"auto\" (the default with `tools`)".to_string() } else { short_json(&choice) }
                )));
            }
            Some(tools.clone())
        }
        Some(other) => return Err(invalid(format!("`tools` must be a list. Given: {}", short_json(other)))),
    };
    let enable_thinking = match map.get("chat_template_kwargs") {
        None | Some(Value::Null) => None,
        Some(Value::Object(kwargs)) => {
            if let Some(key) = kwargs.keys().find(|k| k.as_str() != "enable_thinking") {
                return Err(invalid(format!(
                    "`chat_template_kwargs.{key}` is not accepted; only `enable_thinking` may be set by a request"
                )));
            }
            field::<bool>(kwargs, "enable_thinking", "a boolean")?
        }
        Some(other) => {
            return Err(invalid(format!("`chat_template_kwargs` must be an object. Given: {}", short_json(other))))
        }
    };
    Ok(ChatRequest {
        model: model_field(map)?,
        messages,
        sampling,
        stream: field::<bool>(map, "stream", "a boolean")?.unwrap_or(false),
        include_usage: include_usage(map)?,
        tools,
        add_generation_prompt: field::<bool>(map, "add_generation_prompt", "a boolean")?.unwrap_or(true),
        enable_thinking,
    })
}

/// Parses and validates a completions body. `prompt` may be a string, a list of strings, a list of
/// token ids, or a list of token-id lists.
///
/// # Errors
/// [`JobError::Validation`] naming the field.
pub fn parse_completion_request(body: &Value, limits: &JobLimits) -> Result<CompletionRequest, JobError> {
    check_json_limits(body, limits)?;
    let map = as_object(body, "openai_input")?;
    reject_unsupported_openai(map)?;
    let sampling = RawSamplingParams::from_map(map)?;
    let bad_prompt = |v: &Value| {
        invalid(format!(
            "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id lists. Given: {}",
            short_json(v)
        ))
    };
    let token_ids = |items: &[Value]| -> Option<Vec<u32>> {
        items.iter().map(|t| t.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
    };
    let prompts = match map.get("prompt") {
        None | Some(Value::Null) => return Err(invalid("`prompt` is required".into())),
        Some(Value::String(text)) => vec![CompletionPrompt::Text(text.clone())],
        Some(list @ Value::Array(items)) if items.is_empty() => return Err(bad_prompt(list)),
        Some(list @ Value::Array(items)) => {
            if items.iter().all(Value::is_number) {
                vec![CompletionPrompt::Ids(token_ids(items).ok_or_else(|| bad_prompt(list))?)]
            } else {
                items
                    .iter()
                    .map(|item| match item {
                        Value::String(text) => Ok(CompletionPrompt::Text(text.clone())),
                        Value::Array(ids) if !ids.is_empty() => token_ids(ids).map(CompletionPrompt::Ids).ok_or_else(|| bad_prompt(item)),
                        other => Err(bad_prompt(other)),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        }
        Some(other) => return Err(bad_prompt(other)),
    };
    let n = sampling.n.unwrap_or(1).max(1) as usize;
    if prompts.len().saturating_mul(n) > limits.max_n {
        return Err(invalid(format!(
            "`prompt` count x `n` must be <= {}. Given: {} prompts x {n}",
            limits.max_n,
            prompts.len()
        )));
    }
    Ok(CompletionRequest {
        model: model_field(map)?,
        prompts,
        sampling,
        stream: field::<bool>(map, "stream", "a boolean")?.unwrap_or(false),
        include_usage: include_usage(map)?,
        echo: field::<bool>(map, "echo", "a boolean")?.unwrap_or(false),
    })
}

/// Checks a request's `model` against the served names (the served name or the engine's model name).
///
/// # Errors
/// [`JobError::NotFound`], as vLLM answers 404 for an unknown model.
pub fn check_model(ctx: &JobContext, model: Option<&str>) -> Result<(), JobError> {
    match model {
        None => Ok(()),
        Some(name) if name == ctx.served_model_name || name == ctx.engine.info().model_name => Ok(()),
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
        JobError::Validation(_) | JobError::TooLong(_) | JobError::Template(_) => "invalid_request_error",
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

/// vLLM clamps `-inf` log-probabilities to -9999.
fn finite_logprob(lp: f32) -> f64 {
    if lp.is_finite() {
        f64::from(lp)
    } else {
        -9999.0
    }
}

/// Chat logprob entries (`logprobs.content`) for some tokens.
fn chat_logprobs(tokens: &[GeneratedToken]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": finite_logprob(logprob), "bytes": token.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut value = entry(&t.chosen.token, t.chosen.logprob);
            if let Value::Object(map) = &mut value {
                map.insert("top_logprobs".into(), t.top.iter().map(|top| entry(&top.token, top.logprob)).collect());
            }
            value
        })
        .collect();
    json!({"content": content})
}

/// Completions logprobs for some tokens; `offset` is the text offset of the first token.
fn completion_logprobs(tokens: &[GeneratedToken], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut top_logprobs = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.chosen.token.len();
        let mut top = Map::new();
        for candidate in &t.top {
            top.insert(candidate.token.clone(), json!(finite_logprob(candidate.logprob)));
        }
        top_logprobs.push(Value::Object(top));
    }
    json!({
        "tokens": tokens.iter().map(|t| t.chosen.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| finite_logprob(t.chosen.logprob)).collect::<Vec<_>>(),
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

fn stop_reason_json(summary: &SeqSummary) -> Value {
    match &summary.stop_match {
        Some(StopMatch::Text(s)) => json!(s),
        Some(StopMatch::Token(id)) => json!(id),
        None => Value::Null,
    }
}

/// Which OpenAI object family a run produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Completion,
}

/// Per-choice state of an OpenAI run.
#[derive(Debug, Default)]
struct OaChoice {
    text: String,
    tokens: Vec<GeneratedToken>,
    summary: Option<SeqSummary>,
    generated: usize,
    /// Text offset of the next token (completions logprobs).
    offset: usize,
}

/// Everything a run needs to shape chunks and the final object.
struct OaRun<'a> {
    flavor: Flavor,
    id: String,
    created: u64,
    model: &'a str,
    include_usage: bool,
    with_logprobs: bool,
    prompt_tokens: usize,
}

impl OaRun<'_> {
    fn chunk(&self, choice: Value) -> Value {
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        let mut chunk = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            if let Value::Object(map) = &mut chunk {
                map.insert("usage".into(), Value::Null);
            }
        }
        chunk
    }

    fn delta_chunk(&self, index: usize, text: &str, tokens: &[GeneratedToken], offset: usize) -> Value {
        let logprobs = if self.with_logprobs {
            match self.flavor {
                Flavor::Chat => chat_logprobs(tokens),
                Flavor::Completion => completion_logprobs(tokens, offset),
            }
        } else {
            Value::Null
        };
        match self.flavor {
            Flavor::Chat => self.chunk(json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})),
            Flavor::Completion => self.chunk(json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null})),
        }
    }

    fn role_chunk(&self, index: usize) -> Value {
        self.chunk(json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
    }

    fn finish_chunk(&self, index: usize, summary: &SeqSummary) -> Value {
        let reason = summary.finish_reason.to_string();
        match self.flavor {
            Flavor::Chat => self.chunk(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason_json(summary)})),
            Flavor::Completion => self.chunk(json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason_json(summary)})),
        }
    }

    fn usage_chunk(&self, completion_tokens: usize) -> Value {
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [],
            "usage": usage_json(self.prompt_tokens, completion_tokens)})
    }

    fn response(&self, choices: &[OaChoice]) -> Value {
        let completion_tokens: usize = choices.iter().map(|c| c.generated).sum();
        let shaped: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let finish = c.summary.as_ref().map(|s| s.finish_reason.to_string());
                let stop_reason = c.summary.as_ref().map(stop_reason_json).unwrap_or(Value::Null);
                match self.flavor {
                    Flavor::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": if self.with_logprobs { chat_logprobs(&c.tokens) } else { Value::Null },
                        "finish_reason": finish,
                        "stop_reason": stop_reason,
                    }),
                    Flavor::Completion => {
                        let echo_len = c.text.len() - c.tokens.iter().map(|t| t.chosen.token.len()).sum::<usize>().min(c.text.len());
                        json!({
                            "index": index,
                            "text": c.text,
                            "logprobs": if self.with_logprobs { completion_logprobs(&c.tokens, echo_len) } else { Value::Null },
                            "finish_reason": finish,
                            "stop_reason": stop_reason,
                        })
                    }
                }
            })
            .collect();
        let object = match self.flavor {
            Flavor::Chat => "chat.completion",
            Flavor::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": shaped,
            "usage": usage_json(self.prompt_tokens, completion_tokens)})
    }
}

async fn send_chunk(chunks: &mpsc::Sender<Value>, chunk: Value, cancel: &CancellationToken) -> Result<(), JobError> {
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
    let mut generation = Generation::start(&ctx.engine, &run.id, specs, ctx.request_timeout)?;
    let mut choices: Vec<OaChoice> = prefixes
        .into_iter()
        .map(|prefix| OaChoice { offset: prefix.len(), text: prefix, ..OaChoice::default() })
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
            SeqEvent::Delta { text, token_ids, logprobs } => {
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

fn resolve_sampling(ctx: &JobContext, sampling: &RawSamplingParams) -> Result<ResolvedSampling, JobError> {
    sampling.resolve(&ctx.limits, ctx.engine.info().vocab_size)
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
    let prompt_ids =
        prepare_prompt(ctx, &PromptSource::Chat(req.messages.clone()), options, resolved.truncate_prompt_tokens).await?;
    let mut params = resolved.params;
    params.max_tokens = fit_max_tokens(
        req.sampling.max_tokens,
        MaxTokensDefault::RemainingContext,
        prompt_ids.len(),
        params.min_tokens,
        ctx.limits.max_model_len,
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
    drive(ctx, &run, specs, vec![String::new(); resolved.n], req.stream, chunks, cancel).await
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
        return Err(invalid("`echo` together with `logprobs` is not supported (prompt logprobs are not computed)".into()));
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
                (prepare_prompt(ctx, &source, ChatOptions::default(), resolved.truncate_prompt_tokens).await?, text.clone())
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
                    ctx.engine.tokenizer().decode(&ids, false).map_err(super::output::tokenizer_error)?
                } else {
                    String::new()
                };
                (ids, text)
            }
        };
        let mut params = resolved.params.clone();
        params.max_tokens = fit_max_tokens(
            req.sampling.max_tokens,
            MaxTokensDefault::Fixed(16),
            ids.len(),
            params.min_tokens,
            ctx.limits.max_model_len,
        )?;
        with_logprobs = params.logprobs.is_some();
        prompt_tokens += ids.len();
        specs.extend(expand_n(&ids, &params, resolved.n));
        prefixes.extend(std::iter::repeat_n(if req.echo { text } else { String::new() }, resolved.n));
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
        OpenAiRoute::Completions => Parsed::Completion(parse_completion_request(&body, &ctx.limits)?),
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
    let raw = ctx.raw_openai_output;
    let batching = ctx.stream_defaults;
    let consumer_sink = &mut *sink;
    let consumer = async move {
        let mut batch_size = BatchSize::new(batching);
        let mut lines: Vec<Value> = Vec::new();
        let flush = |lines: &mut Vec<Value>| -> Value {
            let taken = std::mem::take(lines);
            if raw {
                Value::String(taken.iter().map(|l| l.as_str().unwrap_or_default()).collect())
            } else {
                Value::Array(taken)
            }
        };
        while let Some(chunk) = receiver.recv().await {
            lines.push(if raw { Value::String(sse_event(&chunk)) } else { chunk });
            if batch_size.is_full(lines.len()) {
                let item = flush(&mut lines);
                consumer_sink.emit(item, cancel).await?;
                batch_size.advance();
            }
        }
        Ok::<Vec<Value>, JobError>(lines)
    };
    let (produced, consumed) = tokio::join!(producer, consumer);
    let mut rest = consumed?;
    produced?;
    if raw {
        rest.push(Value::String(SSE_DONE.to_string()));
        let text: String = rest.iter().map(|l| l.as_str().unwrap_or_default()).collect();
        sink.emit(Value::String(text), cancel).await
    } else if !rest.is_empty() {
        sink.emit(Value::Array(rest), cancel).await
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TokenLogprob;

    fn limits() -> JobLimits {
        JobLimits::for_test()
    }

    #[test]
    fn chat_request_maps_openai_fields() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
            "logprobs": true, "top_logprobs": 3, "stream": true, "stream_options": {"include_usage": true},
            "top_k": 4, "chat_template_kwargs": {"enable_thinking": false}, "user": "ignored"});
        let req = parse_chat_request(&body, &limits()).unwrap();
        assert_eq!(req.sampling.max_tokens, Some(5));
        assert_eq!(req.sampling.logprobs, Some(3));
        assert_eq!(req.sampling.top_k, Some(4));
        assert!(req.stream && req.include_usage);
        assert_eq!(req.enable_thinking, Some(false));
        assert_eq!(req.model.as_deref(), Some("m"));
    }

    #[test]
    fn chat_request_rejects_unsupported_features_by_name() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]}), "`tool_choice`"),
            (json!({"messages": msgs, "response_format": {"type": "json_object"}}), "`response_format`"),
            (json!({"messages": msgs, "top_logprobs": 2}), "`top_logprobs`"),
            (json!({"messages": msgs, "chat_template_kwargs": {"tokenize": true}}), "`chat_template_kwargs.tokenize`"),
            (json!({"messages": msgs, "chat_template": "{{ 1 }}"}), "`chat_template`"),
            (json!({"messages": msgs, "logit_bias": {"1": 5}}), "`logit_bias`"),
            (json!({"messages": msgs, "n": 99}), "`n`"),
            (json!({}), "`messages`"),
        ];
        for (body, needle) in cases {
            let req = parse_chat_request(&body, &limits());
            let err = match req {
                Ok(r) => r.sampling.resolve(&limits(), 100).unwrap_err(),
                Err(e) => e,
            };
            assert_eq!(err.error_type(), "validation");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        let ok = parse_chat_request(&json!({"messages": msgs, "tools": [{"type": "function"}], "tool_choice": "none"}), &limits());
        assert!(ok.unwrap().tools.is_some());
    }

    #[test]
    fn completion_prompts_take_every_openai_shape() {
        let p = |v: Value| parse_completion_request(&json!({"prompt": v}), &limits()).map(|r| r.prompts);
        assert_eq!(p(json!("a")).unwrap(), vec![CompletionPrompt::Text("a".into())]);
        assert_eq!(p(json!([1, 2])).unwrap(), vec![CompletionPrompt::Ids(vec![1, 2])]);
        assert_eq!(p(json!(["a", [3]])).unwrap(), vec![CompletionPrompt::Text("a".into()), CompletionPrompt::Ids(vec![3])]);
        assert!(p(json!([])).is_err());
        assert!(p(json!([-1])).is_err());
        assert!(p(json!({"a": 1})).is_err());
        let err = parse_completion_request(&json!({"prompt": ["a", "b"], "n": 9}), &limits()).unwrap_err();
        assert_eq!(err.to_string(), "`prompt` count x `n` must be <= 16. Given: 2 prompts x 9");
        let err = parse_completion_request(&json!({"prompt": "a", "suffix": "z"}), &limits()).unwrap_err();
        assert!(err.to_string().contains("`suffix`"));
    }

    #[test]
    fn error_object_has_openai_fields() {
        let e = error_object(&JobError::Validation("`top_p` must be > 0.0 and <= 1.0. Given: 1.5".into()));
        assert_eq!(
            e,
            json!({"error": {"message": "`top_p` must be > 0.0 and <= 1.0. Given: 1.5", "type": "invalid_request_error", "param": "top_p", "code": "validation"}})
        );
        let e = error_object(&JobError::NotFound("no".into()));
        assert_eq!(e["error"]["type"], "not_found_error");
        assert_eq!(e["error"]["param"], Value::Null);
    }

    #[test]
    fn logprob_shapes_follow_openai() {
        let t = |id: u32, s: &str, lp: f32| TokenLogprob { token_id: id, token: s.into(), logprob: lp };
        let tokens = vec![
            GeneratedToken { chosen: t(1, "Hi", -0.25), top: vec![t(1, "Hi", -0.25), t(2, "Yo", -2.0)] },
            GeneratedToken { chosen: t(3, "!", f32::NEG_INFINITY), top: vec![] },
        ];
        assert_eq!(
            chat_logprobs(&tokens),
            json!({"content": [
                {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
                    {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}, {"token": "Yo", "logprob": -2.0, "bytes": [89, 111]}]},
                {"token": "!", "logprob": -9999.0, "bytes": [33], "top_logprobs": []}]})
        );
        assert_eq!(
            completion_logprobs(&tokens, 5),
            json!({"tokens": ["Hi", "!"], "token_logprobs": [-0.25, -9999.0],
                "top_logprobs": [{"Hi": -0.25, "Yo": -2.0}, {}], "text_offset": [5, 7]})
        );
    }

    #[test]
    fn sse_framing() {
        assert_eq!(sse_event(&json!({"a": 1})), "data: {\"a\":1}\n\n");
        assert_eq!(SSE_DONE, "data: [DONE]\n\n");
    }
}
