//! The generation engine. It owns the model and the KV cache on its own OS thread and runs a
//! synchronous step loop (intake, reap, admit/prefill, batched decode, sample, emit). The async side
//! reaches it only through [`EngineHandle`]: a bounded request channel, and one bounded reply channel
//! per request. Dropping the reply receiver cancels the sequence within one step.
//!
//! Owned here: scheduling, KV-cache slots, sampling, stop handling, incremental detokenization.
//! Not here: input validation and output shaping (`job`), HTTP (`queue`, `server`), downloads (`hub`).

pub mod detok;
pub mod kv_cache;
pub mod loader;
pub mod request;
mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stop;

pub use loader::{load_engine, warm_up};

pub use request::{
    FinishReason, GenerateRequest, GeneratedToken, SamplingParams, SeqEvent, SeqEvents, SeqSummary,
    StopMatch, TokenLogprob,
};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Device;

use thiserror::Error;
use tokio::sync::mpsc;

use crate::models::CausalLm;
use crate::tokenizer::Tokenizer;

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
    /// Liveness: the last time the engine loop went round ([`monotonic_ms`]); the idle loop
    /// updates it at least every idle wait.
    pub last_progress_ms: AtomicU64,
    /// Liveness: when the step now running started ([`monotonic_ms`]); 0 between steps.
    pub step_started_ms: AtomicU64,
    /// Longest one step may run before the engine counts as wedged, in ms (0: [`DEFAULT_STEP_BUDGET`]).
    pub step_budget_ms: AtomicU64,
    /// Set once the engine can no longer be trusted (its thread panicked, a forward pass panicked,
    /// or a step overran its budget). Sticky: such faults (e.g. CUDA errors) are not recoverable
    /// in-process.
    pub failed: AtomicBool,
    /// Why [`EngineStats::failed`] was set.
    pub failure: Mutex<Option<String>>,
}

/// Step budget when none is configured (`ENGINE_STEP_TIMEOUT_SECS`'s default).
pub const DEFAULT_STEP_BUDGET: Duration = Duration::from_secs(120);

/// Milliseconds on a process-wide monotonic clock, never 0 (0 means "not set" in [`EngineStats`]).
pub fn monotonic_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let elapsed = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(elapsed).unwrap_or(u64::MAX - 1) + 1
}

/// Whether the engine can take and finish work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineHealth {
    /// Running and making progress.
    Healthy,
    /// The engine thread has stopped (shutdown, or it died).
    Stopped,
    /// The engine failed for good (panic, wedged step); the reason says how.
    Failed(String),
}

impl EngineHealth {
    /// Whether the engine is [`EngineHealth::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, EngineHealth::Healthy)
    }

    /// Why the engine is not healthy (`None` when it is).
    pub fn reason(&self) -> Option<String> {
        match self {
            EngineHealth::Healthy => None,
            EngineHealth::Stopped => Some("the engine thread has stopped".to_string()),
            EngineHealth::Failed(reason) => Some(reason.clone()),
        }
    }
}

impl EngineStats {
    /// Records that the engine loop went round.
    pub fn beat(&self) {
        self.last_progress_ms
            .store(monotonic_ms(), Ordering::Relaxed);
    }

    /// Marks the start (`true`) or end (`false`) of a step, and beats.
    pub fn set_busy(&self, busy: bool) {
        let now = monotonic_ms();
        self.step_started_ms
            .store(if busy { now } else { 0 }, Ordering::Relaxed);
        self.last_progress_ms.store(now, Ordering::Relaxed);
    }

    /// Marks the engine failed for good; the first reason wins.
    pub fn mark_failed(&self, reason: impl Into<String>) {
        let mut failure = self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if failure.is_none() {
            let reason = reason.into();
            tracing::error!(%reason, "engine marked failed");
            *failure = Some(reason);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// The step budget in force.
    pub fn step_budget(&self) -> Duration {
        match self.step_budget_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_STEP_BUDGET,
            ms => Duration::from_millis(ms),
        }
    }

    /// Checks liveness: a step running past the budget, or a loop silent for two budgets, marks
    /// the engine failed (sticky). Returns the failure, if any.
    pub fn check_liveness(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            let now = monotonic_ms();
            let budget = u64::try_from(self.step_budget().as_millis()).unwrap_or(u64::MAX);
            let started = self.step_started_ms.load(Ordering::Relaxed);
            let last = self.last_progress_ms.load(Ordering::Relaxed);
            if started != 0 && now.saturating_sub(started) > budget {
                self.mark_failed(format!(
                    "engine step running for {} ms, past its budget of {budget} ms (wedged device?)",
                    now - started
                ));
            } else if last != 0 && now.saturating_sub(last) > budget.saturating_mul(2) {
                self.mark_failed(format!(
                    "engine loop silent for {} ms, past two step budgets ({budget} ms each)",
                    now - last
                ));
            }
        }
        if self.failed.load(Ordering::Acquire) {
            let failure = self
                .failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            return Some(failure.clone().unwrap_or_else(|| "engine failed".into()));
        }
        None
    }
}

/// The message of a caught panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
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
// Reason: `Generate` is the common case; boxing it would cost an allocation per request.
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
        // Count it before the engine can see it, so the engine's decrement never comes first.
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let refused = match self.commands.try_send(command) {
            Ok(()) => return Ok(events),
            Err(mpsc::error::TrySendError::Full(_)) => EngineError::Overloaded {
                capacity: self.commands.max_capacity(),
            },
            Err(mpsc::error::TrySendError::Closed(_)) => EngineError::Stopped,
        };
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        Err(refused)
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

    /// Liveness for health checks and the queue watchdog: failed (panic, a step past its
    /// budget, a silent loop; sticky), stopped, or healthy. Cheap (a few atomics).
    pub fn health(&self) -> EngineHealth {
        if self.stats.failed.load(Ordering::Acquire) || self.is_running() {
            // A stopped thread is silent by design: the liveness check is for a running one.
            if let Some(reason) = self.stats.check_liveness() {
                return EngineHealth::Failed(reason);
            }
        }
        if self.is_running() {
            EngineHealth::Healthy
        } else {
            EngineHealth::Stopped
        }
    }

    /// Sets the step budget of [`EngineHandle::health`] (`ENGINE_STEP_TIMEOUT_SECS`) for every
    /// clone of this handle.
    pub fn set_step_budget(&self, budget: Duration) {
        let ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX).max(1);
        self.stats.step_budget_ms.store(ms, Ordering::Relaxed);
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

/// Engine sizing, fixed at start: the KV cache holds `max_num_seqs` slots of `max_model_len` positions.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// KV-cache slots: sequences running at once. Further requests wait for a free slot.
    pub max_num_seqs: usize,
    /// Longest prompt + output per sequence; a prompt of this length or more is rejected.
    pub max_model_len: usize,
    /// Prompt tokens prefilled per engine step (chunked prefill budget).
    pub max_num_batched_tokens: usize,
    /// Requests the inbox holds before `submit` answers [`EngineError::Overloaded`].
    pub inbox_capacity: usize,
    /// Name the model is served under.
    pub model_name: String,
    /// Device of the model and the KV cache.
    pub device: Device,
}

impl EngineConfig {
    /// Defaults for a CPU engine serving `model_name` (tests and embedding).
    pub fn for_cpu(
        model_name: impl Into<String>,
        max_model_len: usize,
        max_num_seqs: usize,
    ) -> Self {
        EngineConfig {
            max_num_seqs,
            max_model_len,
            max_num_batched_tokens: 256,
            inbox_capacity: 1024,
            model_name: model_name.into(),
            device: Device::Cpu,
        }
    }
}

impl EngineConfig {
    /// Rejects sizes the engine cannot run with.
    fn check(&self) -> Result<(), EngineError> {
        if self.max_num_seqs == 0
            || self.max_model_len < 2
            || self.max_num_batched_tokens == 0
            || self.inbox_capacity == 0
        {
            return Err(EngineError::Model(format!(
                "invalid engine config: max_num_seqs {}, max_model_len {}, max_num_batched_tokens {}, \
                 inbox_capacity {} (all must be > 0, max_model_len >= 2)",
                self.max_num_seqs, self.max_model_len, self.max_num_batched_tokens, self.inbox_capacity
            )));
        }
        Ok(())
    }
}

/// Describes a device for logs and [`EngineInfo`].
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Starts the engine thread (named `wick-engine`), which owns `model` and a KV cache of
/// `config.max_num_seqs` slots x `config.max_model_len` positions, allocated here once.
///
/// # Errors
/// [`EngineError::Model`] when the configuration is unusable, the cache cannot be allocated or the
/// thread cannot start.
pub fn spawn(
    model: Box<dyn CausalLm>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
) -> Result<EngineHandle, EngineError> {
    config.check()?;
    let model_info = model.info().clone();
    let cache = kv_cache::KvCache::new(
        &model_info,
        config.max_num_seqs,
        config.max_model_len,
        &config.device,
    )
    .map_err(|e| EngineError::Model(format!("cannot allocate the KV cache: {e}")))?;
    let stats = Arc::new(EngineStats::default());
    stats.beat();
    stats.kv_tokens_total.store(
        config.max_num_seqs * config.max_model_len,
        Ordering::Relaxed,
    );
    let info = Arc::new(EngineInfo {
        model_name: config.model_name.clone(),
        max_model_len: config.max_model_len,
        max_num_seqs: config.max_num_seqs,
        vocab_size: model_info.vocab_size,
        device: device_name(&config.device),
    });
    let mut eos_token_ids = tokenizer.eos_token_ids.clone();
    for id in &model_info.eos_token_ids {
        if !eos_token_ids.contains(id) {
            eos_token_ids.push(*id);
        }
    }
    let (commands, inbox) = mpsc::channel(config.inbox_capacity);
    let scheduler_config = scheduler::SchedulerConfig {
        max_num_seqs: config.max_num_seqs,
        max_model_len: config.max_model_len,
        max_num_batched_tokens: config.max_num_batched_tokens,
    };
    let state = runner::EngineState {
        model,
        cache,
        tokenizer: Arc::clone(&tokenizer),
        scheduler: scheduler::Scheduler::new(scheduler_config),
        scheduler_config,
        sequences: HashMap::new(),
        next_id: 0,
        stats: Arc::clone(&stats),
        inbox,
        eos_token_ids,
        fatal: None,
    };
    tracing::info!(
        model = %info.model_name,
        device = %info.device,
        max_num_seqs = info.max_num_seqs,
        max_model_len = info.max_model_len,
        "starting engine"
    );
    let thread_stats = Arc::clone(&stats);
    std::thread::Builder::new()
        .name("wick-engine".into())
        .spawn(move || {
            // The thread boundary: a panic anywhere in the loop marks the engine failed (health
            // turns, the queue worker fails its jobs and exits) instead of vanishing silently.
            // Unwinding drops the state, which closes every reply channel and the inbox.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.run()));
            if let Err(panic) = run {
                thread_stats.mark_failed(format!(
                    "engine thread panicked: {}",
                    panic_message(&*panic)
                ));
            }
        })
        .map_err(|e| EngineError::Model(format!("cannot start the engine thread: {e}")))?;
    Ok(EngineHandle::new(commands, info, stats, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_config_rejects_sizes_it_cannot_run_with() {
        assert!(EngineConfig::for_cpu("m", 64, 4).check().is_ok());
        assert!(EngineConfig::for_cpu("m", 1, 4).check().is_err());
        assert!(EngineConfig::for_cpu("m", 64, 0).check().is_err());
        let no_budget = EngineConfig {
            max_num_batched_tokens: 0,
            ..EngineConfig::for_cpu("m", 64, 4)
        };
        assert!(no_budget.check().is_err());
    }

    #[test]
    fn device_names_are_stable() {
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }
}
