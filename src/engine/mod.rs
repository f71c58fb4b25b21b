//! The generation engine. It owns the model and the KV cache on its own OS thread and runs a
//! synchronous step loop (intake, reap, admit/prefill, batched decode, sample, emit). The async side
//! reaches it only through [`EngineHandle`]: a bounded request channel, and one bounded reply channel
//! per request. Dropping the reply receiver cancels the sequence within one step.
//!
//! Owned here: scheduling, KV-cache slots, sampling, stop handling, incremental detokenization.
//! Not here: input validation and output shaping (`job`), HTTP (`queue`, `server`), downloads (`hub`).

pub mod kv_cache;
pub mod request;

pub use request::{
    FinishReason, GenerateRequest, GeneratedToken, SamplingParams, SeqEvent, SeqEvents, SeqSummary,
    StopMatch, TokenLogprob,
};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;

/// Why the engine refused or failed a request before it produced events.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    /// The request inbox is full; retry later.
    #[error("engine is at capacity ({capacity} requests waiting)")]
    Overloaded {
        /// Inbox capacity.
        capacity: usize,
    },
    /// The prompt (plus at least one generated token) can never fit in a sequence's context.
    #[error("`inputs` must have less than {max_model_len} tokens. Given: {prompt_tokens}")]
    PromptTooLong {
        /// Prompt length in tokens.
        prompt_tokens: usize,
        /// The context limit.
        max_model_len: usize,
    },
    /// The engine thread has stopped (shutdown or a fatal error).
    #[error("engine is not running")]
    Stopped,
    /// Loading or a model error.
    #[error("model: {0}")]
    Model(String),
}

/// Static facts about the running engine, shared with the async side.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineInfo {
    /// Name the model is served under.
    pub model_name: String,
    /// Longest prompt + output per sequence.
    pub max_model_len: usize,
    /// KV-cache slots (sequences decoded together).
    pub max_num_seqs: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Device description (e.g. "cpu", "cuda:0").
    pub device: String,
}

/// Live counters, updated by the engine thread, read by metrics and health.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests submitted but not yet holding a KV slot.
    pub waiting: AtomicUsize,
    /// Sequences holding a KV slot.
    pub running: AtomicUsize,
    /// KV-cache tokens in use (sum of running sequences' lengths).
    pub kv_tokens_used: AtomicUsize,
    /// KV-cache token capacity (slots x max_model_len).
    pub kv_tokens_total: AtomicUsize,
    /// Prompt tokens processed since start.
    pub prompt_tokens_total: AtomicU64,
    /// Tokens generated since start.
    pub generated_tokens_total: AtomicU64,
    /// Engine steps run since start.
    pub steps_total: AtomicU64,
}

/// A snapshot of [`EngineStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStatsSnapshot {
    /// See [`EngineStats::waiting`].
    pub waiting: usize,
    /// See [`EngineStats::running`].
    pub running: usize,
    /// See [`EngineStats::kv_tokens_used`].
    pub kv_tokens_used: usize,
    /// See [`EngineStats::kv_tokens_total`].
    pub kv_tokens_total: usize,
    /// See [`EngineStats::prompt_tokens_total`].
    pub prompt_tokens_total: u64,
    /// See [`EngineStats::generated_tokens_total`].
    pub generated_tokens_total: u64,
    /// See [`EngineStats::steps_total`].
    pub steps_total: u64,
}

impl EngineStats {
    /// Reads every counter (relaxed: values are for display).
    pub fn snapshot(&self) -> EngineStatsSnapshot {
        EngineStatsSnapshot {
            waiting: self.waiting.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            kv_tokens_used: self.kv_tokens_used.load(Ordering::Relaxed),
            kv_tokens_total: self.kv_tokens_total.load(Ordering::Relaxed),
            prompt_tokens_total: self.prompt_tokens_total.load(Ordering::Relaxed),
            generated_tokens_total: self.generated_tokens_total.load(Ordering::Relaxed),
            steps_total: self.steps_total.load(Ordering::Relaxed),
        }
    }
}

/// A message to the engine thread.
#[derive(Debug)]
// `Shutdown` is sent once per process; boxing every request to shrink it is not worth an allocation.
#[allow(clippy::large_enum_variant)]
pub enum EngineCommand {
    /// Generate: the request and the sender for its events.
    Generate {
        /// What to generate.
        request: GenerateRequest,
        /// Where its events go; closed = cancelled.
        reply: mpsc::Sender<SeqEvent>,
        /// When it was submitted (for queue time and TTFT).
        submitted_at: std::time::Instant,
    },
    /// Finish the running sequences' current step, fail the rest, and stop the thread.
    Shutdown,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<EngineCommand>,
    info: Arc<EngineInfo>,
    stats: Arc<EngineStats>,
    tokenizer: Arc<crate::tokenizer::Tokenizer>,
}

impl EngineHandle {
    /// Builds a handle from its parts (used by `spawn`).
    pub fn new(
        commands: mpsc::Sender<EngineCommand>,
        info: Arc<EngineInfo>,
        stats: Arc<EngineStats>,
        tokenizer: Arc<crate::tokenizer::Tokenizer>,
    ) -> Self {
        EngineHandle {
            commands,
            info,
            stats,
            tokenizer,
        }
    }

    /// Submits a request without waiting. The returned receiver yields [`SeqEvent`]s; dropping it
    /// cancels the sequence within one engine step.
    ///
    /// # Errors
    /// [`EngineError::PromptTooLong`] when the prompt can never fit, [`EngineError::Overloaded`] when
    /// the inbox is full, [`EngineError::Stopped`] when the engine thread is gone.
    pub fn submit(&self, request: GenerateRequest) -> Result<SeqEvents, EngineError> {
        let max_model_len = self.info.max_model_len;
        if request.prompt_ids.is_empty() || request.prompt_ids.len() >= max_model_len {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: request.prompt_ids.len(),
                max_model_len,
            });
        }
        // Bound: one event per generated token plus the final summary, so the engine's
        // `try_send` can never find the channel full while the receiver is alive.
        let capacity = request.params.max_tokens.clamp(1, max_model_len) + 2;
        let (reply, events) = mpsc::channel(capacity);
        let command = EngineCommand::Generate {
            request,
            reply,
            submitted_at: std::time::Instant::now(),
        };
        match self.commands.try_send(command) {
            Ok(()) => {
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                Ok(events)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(EngineError::Overloaded {
                capacity: self.commands.max_capacity(),
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(EngineError::Stopped),
        }
    }

    /// Asks the engine thread to stop after its current step.
    pub async fn shutdown(&self) {
        // A closed channel means the thread is already gone, which is what we asked for.
        let _ = self.commands.send(EngineCommand::Shutdown).await;
    }

    /// Whether the engine thread is still taking requests.
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Static facts about the engine.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Live counters.
    pub fn stats(&self) -> EngineStatsSnapshot {
        self.stats.snapshot()
    }

    /// The model's tokenizer (encode prompts, render chat templates).
    pub fn tokenizer(&self) -> &Arc<crate::tokenizer::Tokenizer> {
        &self.tokenizer
    }
}
