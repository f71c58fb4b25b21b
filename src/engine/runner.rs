//! The engine thread's loop and state ([`EngineState`]): intake from the inbox, reaping cancelled
//! sequences, scheduling, one batched decode pass plus one chunked prefill pass per step, sampling
//! and event emission. Runs on its own OS thread and never touches the async runtime except for a
//! timed wait on the inbox when idle.
//!
//! Owned here: the step loop, model errors, shutdown. Not here: the scheduling policy
//! (`scheduler`), per-sequence maths (`sequence`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, error::TryRecvError};

use super::kv_cache::KvCache;
use super::request::{FinishReason, SeqEvent, SeqSummary};
use super::scheduler::{Rejection, Scheduled, Scheduler, SchedulerConfig, SeqId};
use super::sequence::{Sequence, TokenOutcome};
use super::{EngineCommand, EngineStats};
use crate::models::{CausalLm, ForwardBatch, SeqChunk};
use crate::tokenizer::Tokenizer;

/// From this many sampling sequences on, a step samples them in parallel.
const PARALLEL_MIN_SEQS: usize = 4;

thread_local! {
    /// The logits row a thread samples from (one vocabulary of f32 per sampling thread).
    static SAMPLING_ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How long the idle loop waits on the inbox before looking again (it never busy-spins).
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// What the loop does after a command.
#[derive(Debug, PartialEq, Eq)]
enum Control {
    Continue,
    Shutdown,
}

/// Everything the engine thread owns.
pub(crate) struct EngineState {
    pub(crate) model: Box<dyn CausalLm>,
    pub(crate) cache: KvCache,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) scheduler: Scheduler,
    pub(crate) scheduler_config: SchedulerConfig,
    pub(crate) sequences: HashMap<SeqId, Sequence>,
    pub(crate) next_id: SeqId,
    pub(crate) stats: Arc<EngineStats>,
    pub(crate) inbox: mpsc::Receiver<EngineCommand>,
    /// Stop tokens: the tokenizer's EOS ids plus the model config's.
    pub(crate) eos_token_ids: Vec<u32>,
    /// Set when a forward pass panicked: the device state cannot be trusted (a sticky CUDA error
    /// is not recoverable in-process), so the loop stops and every sequence fails with this.
    pub(crate) fatal: Option<String>,
}

impl EngineState {
    /// Runs until shutdown, or until every handle is dropped and no work is left.
    pub(crate) fn run(mut self) {
        let timer = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(cause = %e, "engine thread cannot build its timer; stopping");
                return;
            }
        };
        let mut inbox_open = true;
        loop {
            self.stats.beat();
            if self.fatal.is_some() {
                break;
            }
            if self.scheduler.is_idle() {
                if !inbox_open {
                    break;
                }
                let inbox = &mut self.inbox;
                // The timeout's timer must be created inside the runtime.
                let received =
                    timer.block_on(async { tokio::time::timeout(IDLE_WAIT, inbox.recv()).await });
                match received {
                    Err(_elapsed) => continue,
                    Ok(None) => break,
                    Ok(Some(command)) => {
                        if self.handle(command) == Control::Shutdown {
                            break;
                        }
                    }
                }
            }
            // Between steps: take everything that arrived, without blocking.
            let mut shutdown = false;
            while inbox_open {
                match self.inbox.try_recv() {
                    Ok(command) => {
                        if self.handle(command) == Control::Shutdown {
                            shutdown = true;
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => inbox_open = false,
                }
            }
            if shutdown {
                break;
            }
            self.reap_cancelled();
            self.step();
        }
        self.shut_down();
    }

    /// Queues a new request or acts on a command.
    fn handle(&mut self, command: EngineCommand) -> Control {
        match command {
            EngineCommand::Shutdown => Control::Shutdown,
            EngineCommand::Generate {
                request,
                reply,
                submitted_at,
            } => {
                let id = self.next_id;
                self.next_id += 1;
                let max_model_len = self.scheduler_config.max_model_len;
                let seq = Sequence::new(
                    id,
                    request,
                    reply,
                    submitted_at,
                    &self.eos_token_ids,
                    max_model_len,
                );
                match self.scheduler.enqueue(id, seq.prompt_len) {
                    Ok(()) => {
                        {
                            let _entered = seq.span.enter();
                            tracing::debug!(prompt_tokens = seq.prompt_len, "sequence queued");
                        }
                        self.sequences.insert(id, seq);
                    }
                    Err(rejection) => {
                        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                        let message = match rejection {
                            Rejection::PromptTooLong { prompt_tokens, max_model_len } => format!(
                                "`inputs` must have less than {max_model_len} tokens. Given: {prompt_tokens}"
                            ),
                            Rejection::EmptyPrompt => "the prompt is empty".to_string(),
                        };
                        seq.finish(FinishReason::Error, None, Some(message));
                    }
                }
                Control::Continue
            }
        }
    }

    /// Drops sequences whose receiver is gone and frees their slots at once.
    fn reap_cancelled(&mut self) {
        let cancelled: Vec<SeqId> = self
            .sequences
            .values()
            .filter(|s| s.is_cancelled())
            .map(|s| s.id)
            .collect();
        for id in cancelled {
            self.release(id, FinishReason::Cancelled, None, None);
        }
    }

    /// Removes a sequence from the scheduler and the map; sends its summary unless cancelled.
    fn release(
        &mut self,
        id: SeqId,
        reason: FinishReason,
        stop_match: Option<super::request::StopMatch>,
        error: Option<String>,
    ) {
        let held_slot = self.scheduler.remove(id).is_some();
        if let Some(seq) = self.sequences.remove(&id) {
            if !held_slot && !seq.is_admitted() {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            if reason == FinishReason::Cancelled {
                let _entered = seq.span.enter();
                tracing::debug!(completion_tokens = seq.generated(), "sequence cancelled");
            } else {
                seq.finish(reason, stop_match, error);
            }
        }
        self.update_gauges();
    }

    /// One engine step: admit, decode pass, prefill pass.
    fn step(&mut self) {
        let plan = self.scheduler.schedule();
        if plan.is_empty() {
            return;
        }
        self.stats.set_busy(true);
        let now = Instant::now();
        for (id, _slot) in &plan.admitted {
            if let Some(seq) = self.sequences.get_mut(id) {
                seq.mark_admitted(now);
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let prompt_tokens: usize = plan.prefill.iter().map(|s| s.chunk.len).sum();
        self.stats
            .prompt_tokens_total
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        if !plan.decode.is_empty() {
            self.run_pass(&plan.decode);
        }
        if !plan.prefill.is_empty() && self.fatal.is_none() {
            self.run_pass(&plan.prefill);
        }
        self.stats.set_busy(false);
        self.stats.steps_total.fetch_add(1, Ordering::Relaxed);
        self.update_gauges();
    }

    /// One forward pass over `items`, then one token for each item that samples.
    fn run_pass(&mut self, items: &[Scheduled]) {
        let mut token_ids = Vec::with_capacity(items.iter().map(|s| s.chunk.len).sum());
        let mut chunks: Vec<SeqChunk> = Vec::with_capacity(items.len());
        for item in items {
            let seq = self
                .sequences
                .get(&item.id)
                .expect("scheduled sequence is in the map: this is a bug");
            let c = item.chunk;
            token_ids.extend_from_slice(&seq.tokens[c.start_pos..c.start_pos + c.len]);
            chunks.push(c);
        }
        let batch = ForwardBatch {
            token_ids: &token_ids,
            seqs: &chunks,
        };
        // A panic in model code must not take the engine thread (and every stream) down with it.
        let (model, cache) = (&self.model, &mut self.cache);
        let logits = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // On a worker of the compute pool: the kernels' parallel regions then start inside the
            // pool (work-stealing) instead of handing the engine thread off and back per matmul.
            rayon::join(|| model.forward(&batch, cache), || ()).0
        }))
        .unwrap_or_else(|panic| {
            let reason = format!(
                "panic in the forward pass: {}",
                super::panic_message(&*panic)
            );
            // Fatal: the loop stops after this pass and `shut_down` fails every sequence.
            self.stats.mark_failed(reason.clone());
            self.fatal = Some(reason.clone());
            Err(candle_core::Error::Msg(reason))
        });
        // (n_seqs, vocab) f32.
        let sampled = logits.and_then(|logits| {
            let (rows, vocab) = logits.dims2()?;
            if rows != items.len() {
                return Ok(Err(format!(
                    "model returned {rows} logit rows for {} sequences",
                    items.len()
                )));
            }
            with_host_values(&logits, |values| Ok(self.sample_all(items, values, vocab)))
        });
        let outcomes = match sampled {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(message)) => {
                self.fail_all(items, &message);
                return;
            }
            Err(e) => {
                self.fail_all(items, &format!("model error: {e}"));
                return;
            }
        };
        for (index, outcome) in outcomes {
            let id = items[index].id;
            self.stats
                .generated_tokens_total
                .fetch_add(1, Ordering::Relaxed);
            match outcome {
                TokenOutcome::Continue => {}
                TokenOutcome::Finished(stop) => {
                    self.release(id, stop.reason, stop.stop_match, None)
                }
                TokenOutcome::Cancelled => self.release(id, FinishReason::Cancelled, None, None),
                TokenOutcome::Failed(message) => {
                    self.release(id, FinishReason::Error, None, Some(message))
                }
            }
        }
    }

    /// Samples, appends and streams one token for every item that samples (`logits` is
    /// `(items, vocab)`), the sequences in parallel on the compute pool (each sequence's sampler,
    /// detokenizer and stop state are its own, so the result is the same as one after another).
    /// Returns `(index in items, outcome)` in item order.
    fn sample_all(
        &mut self,
        items: &[Scheduled],
        logits: &[f32],
        vocab: usize,
    ) -> Vec<(usize, TokenOutcome)> {
        let index_of: HashMap<SeqId, usize> = items
            .iter()
            .enumerate()
            .filter(|(_, item)| item.samples)
            .map(|(index, item)| (item.id, index))
            .collect();
        let mut work: Vec<(usize, &mut Sequence)> = self
            .sequences
            .iter_mut()
            .filter_map(|(id, seq)| index_of.get(id).map(|&index| (index, seq)))
            .collect();
        work.sort_unstable_by_key(|(index, _)| *index);
        let tokenizer = self.tokenizer.as_ref();
        let sample = |(index, seq): (usize, &mut Sequence)| {
            // The sampler edits its row (penalties, suppressed stop tokens): a private copy, in a
            // buffer each thread keeps (a fresh vocabulary-sized allocation per row and step is
            // mapped and faulted in page by page).
            let outcome = SAMPLING_ROW.with_borrow_mut(|row| {
                row.clear();
                row.extend_from_slice(&logits[index * vocab..(index + 1) * vocab]);
                seq.take_token(row, tokenizer)
            });
            (index, outcome)
        };
        if work.len() < PARALLEL_MIN_SEQS || rayon::current_num_threads() <= 1 {
            return work.into_iter().map(sample).collect();
        }
        use rayon::prelude::*;
        work.into_par_iter().map(sample).collect()
    }

    /// A failed pass fails every sequence in it; the loop goes on.
    fn fail_all(&mut self, items: &[Scheduled], message: &str) {
        tracing::error!(
            sequences = items.len(),
            cause = message,
            "forward pass failed"
        );
        for item in items {
            self.release(
                item.id,
                FinishReason::Error,
                None,
                Some(message.to_string()),
            );
        }
    }

    /// Fails every queued and running sequence, and every request still in the inbox.
    fn shut_down(&mut self) {
        let message = match &self.fatal {
            Some(reason) => format!("engine failed: {reason}"),
            None => "engine shutting down".to_string(),
        };
        let message = message.as_str();
        for id in self.scheduler.all_ids() {
            self.release(id, FinishReason::Error, None, Some(message.to_string()));
        }
        self.inbox.close();
        while let Ok(command) = self.inbox.try_recv() {
            if let EngineCommand::Generate {
                request,
                reply,
                submitted_at,
            } = command
            {
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                let summary = SeqSummary {
                    finish_reason: FinishReason::Error,
                    stop_match: None,
                    prompt_tokens: request.prompt_ids.len(),
                    completion_tokens: 0,
                    time_to_first_token: None,
                    time_per_output_token: None,
                    queue_time: submitted_at.elapsed(),
                    error: Some(message.to_string()),
                };
                // The caller may be gone already; nothing else to do then.
                let _ = reply.try_send(SeqEvent::Finished(summary));
            }
        }
        self.update_gauges();
        match &self.fatal {
            Some(reason) => tracing::error!(%reason, "engine stopped after a fatal error"),
            None => tracing::info!("engine stopped"),
        }
    }

    fn update_gauges(&self) {
        self.stats
            .running
            .store(self.scheduler.num_running(), Ordering::Relaxed);
        self.stats
            .kv_tokens_used
            .store(self.scheduler.kv_tokens_used(), Ordering::Relaxed);
    }
}

/// Runs `f` over a tensor's values as f32 on the host, flattened: read in place from a contiguous
/// f32 CPU tensor (no copy of the `(rows, vocab)` logits), else copied once.
fn with_host_values<R>(
    tensor: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    {
        let (storage, layout) = tensor.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&all[start..end]));
        }
    }
    let copy = tensor
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(f(&copy))
}
