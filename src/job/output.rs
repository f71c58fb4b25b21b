//! Native (worker-vllm) job execution and output shaping, plus the pieces every route shares:
//! prompt preparation (chat template, tokenization off the async runtime), request ids, and the
//! item sink that streams yielded items in order.
//!
//! Native item shape (see the [`super`] docs for when items are yielded):
//! `{"choices":[{"tokens":[...], "finish_reason"?: "stop"|"length", "logprobs"?: [...]}, ...],
//!   "usage":{"input":N,"output":M}}`.
//! `logprobs`, present when `sampling_params.logprobs` is set, has one entry per generated token:
//! `{"token": text, "token_id": id, "logprob": lp, "top_logprobs": [{"token", "token_id", "logprob"}]}`
//! (the chosen token first, then the `logprobs` most likely, best first).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::input::{NativeInput, PromptSource};
use super::stream::{expand_n, BatchSize, Generation, StreamBatching};
use super::validate::{self, fit_max_tokens, MaxTokensDefault};
use super::JobContext;
use crate::engine::{FinishReason, GeneratedToken, SeqEvent, SeqSummary, TokenLogprob};
use crate::error::JobError;
use crate::tokenizer::TokenizerError;

/// Where yielded items go: sent on the job's chunk channel in order, and kept for the final
/// aggregated output.
pub(crate) struct ItemSink<'a> {
    pub(crate) chunks: &'a mpsc::Sender<Value>,
    pub(crate) items: &'a mut Vec<Value>,
}

impl ItemSink<'_> {
    /// Yields one item.
    ///
    /// # Errors
    /// [`JobError::Cancelled`] when `cancel` fires or the receiver is gone.
    pub(crate) async fn emit(
        &mut self,
        item: Value,
        cancel: &CancellationToken,
    ) -> Result<(), JobError> {
        self.items.push(item.clone());
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(JobError::Cancelled),
            sent = self.chunks.send(item) => sent.map_err(|_| JobError::Cancelled),
        }
    }
}

/// A fresh id with `prefix` (e.g. `chatcmpl-3f9c...`): 32 hex digits from the clock, a process
/// counter and the std hasher's random keys (unique, not guessable; not a secret).
pub fn new_request_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let state = std::collections::hash_map::RandomState::new();
    let mut hasher = state.build_hasher();
    hasher.write_u64(nanos);
    hasher.write_u64(count);
    let high = hasher.finish();
    hasher.write_u64(high);
    format!("{prefix}{high:016x}{:016x}", hasher.finish())
}

/// Seconds since the epoch, for OpenAI's `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a chat prompt is rendered with besides the messages.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChatOptions {
    pub(crate) add_generation_prompt: bool,
    pub(crate) tools: Option<Value>,
    pub(crate) enable_thinking: Option<bool>,
}

/// Turns a prompt source into token ids: raw text is size-checked and encoded with special tokens;
/// messages are checked, rendered with the model's template and encoded without added special
/// tokens. Rendering and tokenizing run on the blocking pool. `truncate` keeps the last N tokens.
///
/// # Errors
/// [`JobError::Validation`] (limits, no chat template), [`JobError::Template`],
/// [`JobError::Tokenizer`].
pub(crate) async fn prepare_prompt(
    ctx: &JobContext,
    source: &PromptSource,
    options: ChatOptions,
    truncate: Option<usize>,
) -> Result<Vec<u32>, JobError> {
    let tokenizer = Arc::clone(ctx.engine.tokenizer());
    let job = match source {
        PromptSource::Text(text) => {
            validate::check_prompt_text("prompt", text, &ctx.limits)?;
            let text = text.clone();
            tokio::task::spawn_blocking(move || {
                tokenizer.encode(&text, true).map_err(tokenizer_error)
            })
        }
        PromptSource::Chat(messages) => {
            let messages = validate::normalize_messages(messages, &ctx.limits)?;
            tokio::task::spawn_blocking(move || {
                let template = tokenizer
                    .chat_template
                    .as_ref()
                    .ok_or_else(|| tokenizer_error(TokenizerError::NoChatTemplate))?;
                let rendered = template
                    .render_with(&crate::tokenizer::chat_template::RenderContext {
                        messages: &messages,
                        add_generation_prompt: options.add_generation_prompt,
                        bos_token: tokenizer.bos_token.as_deref(),
                        eos_token: tokenizer.eos_token.as_deref(),
                        tools: options.tools.as_ref(),
                        enable_thinking: options.enable_thinking,
                    })
                    .map_err(tokenizer_error)?;
                tokenizer.encode(&rendered, false).map_err(tokenizer_error)
            })
        }
    };
    let mut ids = job
        .await
        .map_err(|e| JobError::Tokenizer(format!("tokenizer task failed: {e}")))??;
    if let Some(keep) = truncate {
        if ids.len() > keep {
            ids.drain(..ids.len() - keep);
        }
    }
    Ok(ids)
}

/// Maps tokenizer/template failures onto job errors.
pub(crate) fn tokenizer_error(err: TokenizerError) -> JobError {
    match err {
        TokenizerError::NoChatTemplate => JobError::Validation(err.to_string()),
        TokenizerError::Template(m) => JobError::Template(m),
        TokenizerError::Load(_) | TokenizerError::Codec(_) => JobError::Tokenizer(err.to_string()),
    }
}

/// One token's logprob entry in the native shape.
fn native_logprob(token: &GeneratedToken) -> Value {
    let entry =
        |t: &TokenLogprob| json!({"token": t.token, "token_id": t.token_id, "logprob": t.logprob});
    let mut value = entry(&token.chosen);
    if let Value::Object(map) = &mut value {
        map.insert(
            "top_logprobs".into(),
            Value::Array(token.top.iter().map(entry).collect()),
        );
    }
    value
}

/// Fails the job for a sequence that ended in error or was cancelled by the engine.
pub(crate) fn check_summary(summary: &SeqSummary) -> Result<(), JobError> {
    match summary.finish_reason {
        FinishReason::Stop | FinishReason::Length => Ok(()),
        FinishReason::Cancelled => Err(JobError::Cancelled),
        FinishReason::Error => Err(JobError::Engine(
            summary
                .error
                .clone()
                .unwrap_or_else(|| "the sequence failed".into()),
        )),
    }
}

/// Per-choice state while a native job runs.
#[derive(Debug, Default)]
struct NativeChoice {
    /// Text deltas since the last emitted item (stream) or the whole text (non-stream, one entry).
    tokens: Vec<String>,
    logprobs: Vec<Value>,
    finish_reason: Option<FinishReason>,
    generated: usize,
}

impl NativeChoice {
    fn take_json(&mut self, with_logprobs: bool) -> Value {
        let mut map = Map::new();
        map.insert("tokens".into(), json!(std::mem::take(&mut self.tokens)));
        if let Some(reason) = self.finish_reason.take() {
            map.insert("finish_reason".into(), json!(reason.to_string()));
        }
        if with_logprobs {
            map.insert(
                "logprobs".into(),
                Value::Array(std::mem::take(&mut self.logprobs)),
            );
        }
        Value::Object(map)
    }
}

fn native_item(choices: &mut [NativeChoice], prompt_tokens: usize, with_logprobs: bool) -> Value {
    let output: usize = choices.iter().map(|c| c.generated).sum();
    let choices: Vec<Value> = choices
        .iter_mut()
        .map(|c| c.take_json(with_logprobs))
        .collect();
    json!({"choices": choices, "usage": {"input": prompt_tokens, "output": output}})
}

/// Turns a native job's sequence events into worker-vllm items (pure state machine: no engine, no
/// channels). Streaming, an item is ready whenever the current batch is full; otherwise one item
/// holds everything at the end.
#[derive(Debug)]
struct NativeShaper {
    choices: Vec<NativeChoice>,
    stream: bool,
    with_logprobs: bool,
    prompt_tokens: usize,
    batch_size: BatchSize,
    /// Tokens (over all choices) in the current batch.
    batch_count: usize,
    /// A choice finished since the last item.
    pending_finish: bool,
}

impl NativeShaper {
    fn new(
        n: usize,
        stream: bool,
        with_logprobs: bool,
        prompt_tokens: usize,
        batching: StreamBatching,
    ) -> Self {
        let mut choices: Vec<NativeChoice> = (0..n).map(|_| NativeChoice::default()).collect();
        if !stream {
            // One entry per choice that accumulates the whole text.
            choices
                .iter_mut()
                .for_each(|c| c.tokens.push(String::new()));
        }
        NativeShaper {
            choices,
            stream,
            with_logprobs,
            prompt_tokens,
            batch_size: BatchSize::new(batching),
            batch_count: 0,
            pending_finish: false,
        }
    }

    /// Takes one event of choice `index`; returns an item when a stream batch is full.
    ///
    /// # Errors
    /// The sequence failed or was cancelled by the engine ([`check_summary`]).
    fn on_event(&mut self, index: usize, event: SeqEvent) -> Result<Option<Value>, JobError> {
        let choice = &mut self.choices[index];
        match event {
            SeqEvent::Delta {
                text,
                token_ids,
                logprobs,
            } => {
                choice.generated += token_ids.len();
                if self.with_logprobs {
                    choice.logprobs.extend(logprobs.iter().map(native_logprob));
                }
                if self.stream {
                    choice.tokens.push(text);
                    self.batch_count += token_ids.len().max(1);
                } else if let Some(whole) = choice.tokens.first_mut() {
                    whole.push_str(&text);
                }
            }
            SeqEvent::Finished(summary) => {
                check_summary(&summary)?;
                choice.generated = choice.generated.max(summary.completion_tokens);
                choice.finish_reason = Some(summary.finish_reason);
                self.pending_finish = true;
            }
        }
        if self.stream && self.batch_size.is_full(self.batch_count) {
            self.batch_count = 0;
            self.pending_finish = false;
            self.batch_size.advance();
            return Ok(Some(native_item(
                &mut self.choices,
                self.prompt_tokens,
                self.with_logprobs,
            )));
        }
        Ok(None)
    }

    /// The last item, once every sequence finished (none when a stream has nothing left to say).
    fn finish(mut self) -> Option<Value> {
        (!self.stream || self.batch_count > 0 || self.pending_finish)
            .then(|| native_item(&mut self.choices, self.prompt_tokens, self.with_logprobs))
    }
}

/// Runs a native job (`prompt` / `messages`) and yields its items.
pub(crate) async fn run_native(
    ctx: &JobContext,
    request_id: &str,
    input: NativeInput,
    sink: &mut ItemSink<'_>,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    let resolved = input
        .sampling
        .resolve(&ctx.limits, ctx.engine.info().vocab_size)?;
    let options = ChatOptions {
        add_generation_prompt: true,
        ..ChatOptions::default()
    };
    let prompt_ids =
        prepare_prompt(ctx, &input.prompt, options, resolved.truncate_prompt_tokens).await?;
    let mut params = resolved.params;
    params.max_tokens = fit_max_tokens(
        input.sampling.max_tokens,
        MaxTokensDefault::Fixed(100),
        prompt_ids.len(),
        params.min_tokens,
        ctx.limits.max_model_len,
    )?;
    tracing::debug!(
        prompt_tokens = prompt_ids.len(),
        n = resolved.n,
        max_tokens = params.max_tokens,
        stream = input.stream,
        "native job validated"
    );
    let batching = ctx.stream_defaults.with_overrides(
        input.max_batch_size,
        input.min_batch_size,
        input.batch_size_growth_factor,
    );
    let mut shaper = NativeShaper::new(
        resolved.n,
        input.stream,
        params.logprobs.is_some(),
        prompt_ids.len(),
        batching,
    );
    let specs = expand_n(&prompt_ids, &params, resolved.n);
    let mut generation = Generation::start(&ctx.engine, request_id, specs, ctx.request_timeout)?;
    while let Some((index, event)) = generation.next(cancel).await? {
        if let Some(item) = shaper.on_event(index, event)? {
            sink.emit(item, cancel).await?;
        }
    }
    if let Some(item) = shaper.finish() {
        sink.emit(item, cancel).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_and_prefixed() {
        let a = new_request_id("chatcmpl-");
        let b = new_request_id("chatcmpl-");
        assert!(a.starts_with("chatcmpl-") && a.len() == "chatcmpl-".len() + 32);
        assert_ne!(a, b);
    }

    #[test]
    fn native_item_carries_usage_finish_reason_and_resets() {
        let mut choices = vec![
            NativeChoice {
                tokens: vec!["a".into(), "b".into()],
                generated: 2,
                finish_reason: Some(FinishReason::Length),
                ..Default::default()
            },
            NativeChoice {
                tokens: vec!["c".into()],
                generated: 1,
                ..Default::default()
            },
        ];
        let item = native_item(&mut choices, 5, false);
        assert_eq!(
            item,
            json!({"choices": [{"tokens": ["a", "b"], "finish_reason": "length"}, {"tokens": ["c"]}], "usage": {"input": 5, "output": 3}})
        );
        assert!(choices
            .iter()
            .all(|c| c.tokens.is_empty() && c.finish_reason.is_none()));
    }

    #[test]
    fn native_logprob_lists_chosen_and_top() {
        let t = |id, lp| TokenLogprob {
            token_id: id,
            token: format!("t{id}"),
            logprob: lp,
        };
        let entry = native_logprob(&GeneratedToken {
            chosen: t(3, -0.5),
            top: vec![t(3, -0.5), t(4, -1.0)],
        });
        assert_eq!(
            entry,
            json!({"token": "t3", "token_id": 3, "logprob": -0.5, "top_logprobs": [
                {"token": "t3", "token_id": 3, "logprob": -0.5}, {"token": "t4", "token_id": 4, "logprob": -1.0}]})
        );
    }

    fn delta(text: &str) -> SeqEvent {
        SeqEvent::Delta {
            text: text.into(),
            token_ids: vec![1],
            logprobs: Vec::new(),
        }
    }

    fn finished(reason: FinishReason, completion_tokens: usize) -> SeqEvent {
        SeqEvent::Finished(SeqSummary {
            finish_reason: reason,
            stop_match: None,
            prompt_tokens: 3,
            completion_tokens,
            time_to_first_token: None,
            time_per_output_token: None,
            queue_time: std::time::Duration::ZERO,
            error: None,
        })
    }

    #[test]
    fn shaper_streams_growing_batches_and_a_final_finish_item() {
        let mut shaper = NativeShaper::new(1, true, false, 3, StreamBatching::default());
        let mut items = Vec::new();
        for i in 0..4 {
            items.extend(shaper.on_event(0, delta(&i.to_string())).unwrap());
        }
        // Batches of 1 and 3 filled exactly; the finish comes after, in its own item.
        items.extend(shaper.on_event(0, finished(FinishReason::Stop, 4)).unwrap());
        items.extend(shaper.finish());
        assert_eq!(
            items,
            vec![
                json!({"choices": [{"tokens": ["0"]}], "usage": {"input": 3, "output": 1}}),
                json!({"choices": [{"tokens": ["1", "2", "3"]}], "usage": {"input": 3, "output": 4}}),
                json!({"choices": [{"tokens": [], "finish_reason": "stop"}], "usage": {"input": 3, "output": 4}}),
            ]
        );
    }

    #[test]
    fn shaper_without_stream_yields_one_item_with_the_whole_text() {
        let mut shaper = NativeShaper::new(2, false, false, 3, StreamBatching::default());
        for (index, text) in [(0, "a"), (1, "x"), (0, "b")] {
            assert_eq!(shaper.on_event(index, delta(text)).unwrap(), None);
        }
        shaper
            .on_event(0, finished(FinishReason::Length, 2))
            .unwrap();
        shaper.on_event(1, finished(FinishReason::Stop, 1)).unwrap();
        assert_eq!(
            shaper.finish(),
            Some(
                json!({"choices": [{"tokens": ["ab"], "finish_reason": "length"}, {"tokens": ["x"], "finish_reason": "stop"}],
                "usage": {"input": 3, "output": 3}})
            )
        );
    }

    #[test]
    fn shaper_fails_the_job_when_a_sequence_fails() {
        let mut shaper = NativeShaper::new(1, true, false, 3, StreamBatching::default());
        let failed = SeqEvent::Finished(SeqSummary {
            error: Some("boom".into()),
            ..match finished(FinishReason::Error, 0) {
                SeqEvent::Finished(s) => s,
                SeqEvent::Delta { .. } => unreachable!(),
            }
        });
        let err = shaper.on_event(0, failed).unwrap_err();
        assert_eq!(err.error_type(), "generation");
        assert!(err.to_string().contains("boom"));
    }
}
