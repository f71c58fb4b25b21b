//! Running a job's sequences on the engine and reading their events back, plus worker-vllm's stream
//! chunking.
//!
//! [`Generation`] submits one engine request per sequence (`n` > 1, or several completion prompts),
//! merges their [`SeqEvent`] streams, and enforces the job's deadline and cancellation: when the token
//! fires or the deadline passes, the receivers are dropped, which frees the engine slots within one
//! step. [`BatchSize`] is worker-vllm's growing chunk size (1 → 3 → 9 → 27 → 50 tokens).

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{
    EngineError, EngineHandle, GenerateRequest, SamplingParams, SeqEvent, SeqEvents,
};
use crate::error::JobError;

/// Stream chunking settings (worker-vllm `DEFAULT_BATCH_SIZE`, `DEFAULT_MIN_BATCH_SIZE`,
/// `DEFAULT_BATCH_SIZE_GROWTH_FACTOR`, overridable per job).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamBatching {
    /// Largest chunk, in tokens.
    pub max_batch_size: usize,
    /// First chunk, in tokens.
    pub min_batch_size: usize,
    /// Each chunk is this many times the previous one, up to `max_batch_size`.
    pub growth_factor: f64,
}

impl Default for StreamBatching {
    fn default() -> Self {
        StreamBatching {
            max_batch_size: 50,
            min_batch_size: 1,
            growth_factor: 3.0,
        }
    }
}

impl StreamBatching {
    /// The configured defaults.
    pub fn from_config(config: &Config) -> StreamBatching {
        StreamBatching {
            max_batch_size: config.default_batch_size.max(1),
            min_batch_size: config.default_min_batch_size.max(1),
            growth_factor: config.default_batch_size_growth_factor.max(1.0),
        }
    }

    /// These settings with a job's overrides applied.
    pub fn with_overrides(
        self,
        max: Option<usize>,
        min: Option<usize>,
        growth: Option<f64>,
    ) -> StreamBatching {
        StreamBatching {
            max_batch_size: max.unwrap_or(self.max_batch_size),
            min_batch_size: min.unwrap_or(self.min_batch_size),
            growth_factor: growth.unwrap_or(self.growth_factor),
        }
    }
}

/// worker-vllm's `BatchSize`: dynamic when `growth > 1`, `min >= 1` and `max > min` (then chunks
/// start at `min` and grow by `growth` up to `max`); otherwise every chunk is `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSize {
    settings: StreamBatching,
    dynamic: bool,
    current: f64,
}

impl BatchSize {
    /// Starts a new sequence of chunk sizes.
    pub fn new(settings: StreamBatching) -> BatchSize {
        let dynamic = settings.growth_factor > 1.0
            && settings.min_batch_size >= 1
            && settings.max_batch_size > settings.min_batch_size;
        let current = if dynamic {
            settings.min_batch_size
        } else {
            settings.max_batch_size
        } as f64;
        BatchSize {
            settings,
            dynamic,
            current,
        }
    }

    /// Whether a chunk holding `count` tokens is full.
    pub fn is_full(&self, count: usize) -> bool {
        count as f64 >= self.current
    }

    /// Moves to the next chunk size (after a chunk was emitted).
    pub fn advance(&mut self) {
        if self.dynamic {
            self.current = (self.current * self.settings.growth_factor)
                .min(self.settings.max_batch_size as f64);
        }
    }
}

/// One sequence to run: its prompt and its parameters.
#[derive(Debug, Clone)]
pub struct SeqSpec {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Validated parameters.
    pub params: SamplingParams,
}

/// Expands `n` copies of one prompt into sequence specs; when seeded, sequence `i` gets `seed + i`
/// so the choices differ but the job stays reproducible.
pub fn expand_n(prompt_ids: &[u32], params: &SamplingParams, n: usize) -> Vec<SeqSpec> {
    (0..n)
        .map(|i| {
            let mut params = params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            SeqSpec {
                prompt_ids: prompt_ids.to_vec(),
                params,
            }
        })
        .collect()
}

/// Maps an engine refusal onto a job error.
pub fn engine_error(err: EngineError) -> JobError {
    match err {
        EngineError::Overloaded { .. } => JobError::Overloaded(err.to_string()),
        EngineError::PromptTooLong {
            prompt_tokens,
            max_model_len,
        } => JobError::TooLong(format!(
            "`prompt` must have less than {max_model_len} tokens. Given: {prompt_tokens}"
        )),
        EngineError::Stopped | EngineError::Model(_) => JobError::Engine(err.to_string()),
    }
}

/// A job's running sequences. Dropping it cancels every sequence still running.
#[derive(Debug)]
pub struct Generation {
    receivers: Vec<Option<SeqEvents>>,
    /// Round-robin start, so one busy sequence cannot starve the others' events.
    next_poll: usize,
    deadline: Instant,
    timeout: Duration,
}

impl Generation {
    /// Submits every sequence (all or nothing: if one is refused, the ones already submitted are
    /// dropped, which cancels them).
    ///
    /// # Errors
    /// [`JobError::Overloaded`], [`JobError::Validation`] (prompt too long), [`JobError::Engine`].
    pub fn start(
        engine: &EngineHandle,
        request_id: &str,
        specs: Vec<SeqSpec>,
        timeout: Duration,
    ) -> Result<Generation, JobError> {
        let many = specs.len() > 1;
        let mut receivers = Vec::with_capacity(specs.len());
        for (i, spec) in specs.into_iter().enumerate() {
            let request = GenerateRequest {
                request_id: if many {
                    format!("{request_id}-{i}")
                } else {
                    request_id.to_string()
                },
                prompt_ids: spec.prompt_ids,
                params: spec.params,
            };
            receivers.push(Some(engine.submit(request).map_err(engine_error)?));
        }
        Ok(Generation {
            receivers,
            next_poll: 0,
            deadline: Instant::now() + timeout,
            timeout,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.receivers.len()
    }

    /// Whether there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.receivers.is_empty()
    }

    /// Cancels every sequence still running (drops the receivers).
    pub fn cancel(&mut self) {
        self.receivers.iter_mut().for_each(|r| *r = None);
    }

    /// The next event of any sequence, with its index; `None` once every sequence has finished.
    ///
    /// # Errors
    /// [`JobError::Cancelled`] when `cancel` fires, [`JobError::Timeout`] past the deadline,
    /// [`JobError::Engine`] when a sequence's channel closes without a `Finished` event. In every
    /// case the remaining sequences are cancelled.
    pub async fn next(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<(usize, SeqEvent)>, JobError> {
        if self.receivers.iter().all(Option::is_none) {
            return Ok(None);
        }
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(JobError::Cancelled),
            _ = tokio::time::sleep_until(self.deadline) => Err(JobError::Timeout(format!(
                "the job ran longer than its {}-second deadline",
                self.timeout.as_secs()
            ))),
            event = poll_fn(|cx| self.poll_any(cx)) => event,
        };
        if outcome.is_err() {
            self.cancel();
        }
        outcome.map(Some)
    }

    fn poll_any(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<(usize, SeqEvent), JobError>> {
        let count = self.receivers.len();
        for offset in 0..count {
            let index = (self.next_poll + offset) % count;
            let Some(receiver) = self.receivers[index].as_mut() else {
                continue;
            };
            match receiver.poll_recv(cx) {
                Poll::Ready(Some(event)) => {
                    if matches!(event, SeqEvent::Finished(_)) {
                        self.receivers[index] = None;
                    }
                    self.next_poll = (index + 1) % count;
                    return Poll::Ready(Ok((index, event)));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(JobError::Engine(
                        "the engine stopped before the sequence finished".into(),
                    )))
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(settings: StreamBatching, chunks: usize) -> Vec<f64> {
        let mut b = BatchSize::new(settings);
        (0..chunks)
            .map(|_| {
                let c = b.current;
                b.advance();
                c
            })
            .collect()
    }

    #[test]
    fn default_batches_grow_one_three_nine_to_fifty() {
        assert_eq!(
            sizes(StreamBatching::default(), 6),
            vec![1.0, 3.0, 9.0, 27.0, 50.0, 50.0]
        );
    }

    #[test]
    fn batching_is_fixed_when_not_dynamic() {
        let fixed = StreamBatching {
            max_batch_size: 4,
            min_batch_size: 4,
            growth_factor: 3.0,
        };
        assert_eq!(sizes(fixed, 3), vec![4.0, 4.0, 4.0]);
        let no_growth = StreamBatching {
            max_batch_size: 8,
            min_batch_size: 1,
            growth_factor: 1.0,
        };
        assert_eq!(sizes(no_growth, 2), vec![8.0, 8.0]);
        let b = BatchSize::new(StreamBatching::default());
        assert!(!b.is_full(0));
        assert!(b.is_full(1));
    }

    #[test]
    fn expand_n_offsets_seeds() {
        let params = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        let specs = expand_n(&[1, 2], &params, 3);
        let seeds: Vec<_> = specs.iter().map(|s| s.params.seed).collect();
        assert_eq!(seeds, vec![Some(7), Some(8), Some(9)]);
        let unseeded = expand_n(&[1], &SamplingParams::default(), 2);
        assert!(unseeded.iter().all(|s| s.params.seed.is_none()));
    }

    #[test]
    fn engine_errors_map_to_job_errors() {
        assert_eq!(
            engine_error(EngineError::Overloaded { capacity: 4 }).error_type(),
            "overloaded"
        );
        let too_long = engine_error(EngineError::PromptTooLong {
            prompt_tokens: 9,
            max_model_len: 8,
        });
        assert_eq!(too_long.error_type(), "validation");
        assert_eq!(
            too_long.to_string(),
            "`prompt` must have less than 8 tokens. Given: 9"
        );
        assert_eq!(
            engine_error(EngineError::Stopped).error_type(),
            "generation"
        );
    }
}
