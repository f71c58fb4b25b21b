//! One sequence as the engine thread sees it: its tokens, sampler, stop state, incremental decoder,
//! reply channel and timings. It turns one logits row into one token, one `Delta` event and, at the
//! end, one `Finished` summary.
//!
//! Owned here: per-sequence state and event emission. Not here: slots and positions (`scheduler`).

use std::time::Instant;

use tokio::sync::mpsc::{self, error::TrySendError};

use super::detok::IncrementalDecoder;
use super::request::{
    FinishReason, GenerateRequest, GeneratedToken, SeqEvent, SeqSummary, StopMatch, TokenLogprob,
};
use super::sampler::{Sampled, Sampler};
use super::scheduler::SeqId;
use super::stop::{StopChecker, StopOutcome};
use crate::tokenizer::Tokenizer;

/// What happened to a sequence after it took a token.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenOutcome {
    /// Keep generating.
    Continue,
    /// It ended (stop or length); send the summary and free the slot.
    Finished(StopOutcome),
    /// Its receiver is gone; free the slot without a summary.
    Cancelled,
    /// Detokenizing failed; fail the sequence with this message.
    Failed(String),
}

/// The chosen token's and the top tokens' log-probabilities, with their text.
fn logprob_details(sampled: &Sampled, tokenizer: &Tokenizer) -> GeneratedToken {
    let entry = |id: u32, logprob: f32| TokenLogprob {
        token_id: id,
        token: tokenizer.decode(&[id], false).unwrap_or_default(),
        logprob,
    };
    GeneratedToken {
        chosen: entry(
            sampled.token_id,
            sampled.logprob.unwrap_or(f32::NEG_INFINITY),
        ),
        top: sampled.top.iter().map(|&(id, lp)| entry(id, lp)).collect(),
    }
}

/// Timestamps for the summary.
#[derive(Debug, Clone, Copy)]
struct Timings {
    submitted_at: Instant,
    admitted_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

/// A sequence owned by the engine thread.
#[derive(Debug)]
pub struct Sequence {
    /// Engine-wide id.
    pub id: SeqId,
    /// Caller's id, for logs.
    pub request_id: String,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Prompt length.
    pub prompt_len: usize,
    sampler: Sampler,
    stop: StopChecker,
    detok: IncrementalDecoder,
    wants_logprobs: bool,
    reply: mpsc::Sender<SeqEvent>,
    /// The sequence's tracing span (request id).
    pub span: tracing::Span,
    timings: Timings,
}

impl Sequence {
    /// Builds the engine state of a request. `eos_token_ids` come from the tokenizer.
    pub fn new(
        id: SeqId,
        request: GenerateRequest,
        reply: mpsc::Sender<SeqEvent>,
        submitted_at: Instant,
        eos_token_ids: &[u32],
        max_model_len: usize,
    ) -> Self {
        let span = tracing::info_span!("seq", request_id = %request.request_id, seq_id = id);
        let params = &request.params;
        Sequence {
            id,
            sampler: Sampler::new(params, &request.prompt_ids),
            stop: StopChecker::new(params, eos_token_ids, max_model_len),
            detok: IncrementalDecoder::new(params.skip_special_tokens),
            wants_logprobs: params.logprobs.is_some(),
            prompt_len: request.prompt_ids.len(),
            tokens: request.prompt_ids,
            request_id: request.request_id,
            reply,
            span,
            timings: Timings {
                submitted_at,
                admitted_at: None,
                first_token_at: None,
                last_token_at: None,
            },
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether the receiver was dropped (the client went away).
    pub fn is_cancelled(&self) -> bool {
        self.reply.is_closed()
    }

    /// Whether the sequence ever got a KV slot.
    pub fn is_admitted(&self) -> bool {
        self.timings.admitted_at.is_some()
    }

    /// Records that the sequence got its KV slot.
    pub fn mark_admitted(&mut self, at: Instant) {
        self.timings.admitted_at = Some(at);
    }

    /// Samples the next token from `logits` (this sequence's row, length `vocab_size`), appends
    /// it, and streams it.
    pub fn take_token(&mut self, logits: &mut [f32], tokenizer: &Tokenizer) -> TokenOutcome {
        let generated_before = self.generated();
        self.stop.suppress_stop_tokens(logits, generated_before);
        let sampled = self.sampler.sample(logits);
        let token_id = sampled.token_id;
        self.sampler.observe(token_id);
        self.tokens.push(token_id);
        let now = Instant::now();
        self.timings.first_token_at.get_or_insert(now);
        self.timings.last_token_at = Some(now);
        let generated = self.generated();

        let token_stop = self.stop.token_stop(token_id, generated);
        let length_stop = self.stop.length_stop(generated, self.tokens.len());
        let mut delta = String::new();
        let decoded = (|| {
            if token_stop.is_none() || self.stop.include_stop_str_in_output() {
                delta.push_str(&self.detok.push(tokenizer, token_id)?);
            }
            if token_stop.is_some() || length_stop {
                delta.push_str(&self.detok.flush(tokenizer)?);
            }
            Ok::<(), crate::tokenizer::TokenizerError>(())
        })();
        if let Err(e) = decoded {
            return TokenOutcome::Failed(e.to_string());
        }
        let text_step = self
            .stop
            .push_text(&delta, generated, token_stop.is_some() || length_stop);

        let logprobs = if self.wants_logprobs {
            vec![logprob_details(&sampled, tokenizer)]
        } else {
            Vec::new()
        };
        let event = SeqEvent::Delta {
            text: text_step.text,
            token_ids: vec![token_id],
            logprobs,
        };
        if !self.send(event) {
            return TokenOutcome::Cancelled;
        }
        if let Some(stop_match) = token_stop {
            return TokenOutcome::Finished(StopOutcome {
                reason: FinishReason::Stop,
                stop_match: Some(stop_match),
            });
        }
        if let Some(text) = text_step.matched {
            return TokenOutcome::Finished(StopOutcome {
                reason: FinishReason::Stop,
                stop_match: Some(StopMatch::Text(text)),
            });
        }
        if length_stop {
            return TokenOutcome::Finished(StopOutcome {
                reason: FinishReason::Length,
                stop_match: None,
            });
        }
        TokenOutcome::Continue
    }

    /// Sends the final summary (consumes the sequence). A closed receiver is ignored: the caller is gone.
    pub fn finish(
        self,
        reason: FinishReason,
        stop_match: Option<StopMatch>,
        error: Option<String>,
    ) {
        let t = self.timings;
        let completion_tokens = self.generated();
        let time_per_output_token = match (t.first_token_at, t.last_token_at) {
            (Some(first), Some(last)) if completion_tokens > 1 => {
                Some(last.duration_since(first) / (completion_tokens as u32 - 1))
            }
            _ => None,
        };
        let summary = SeqSummary {
            finish_reason: reason,
            stop_match,
            prompt_tokens: self.prompt_len,
            completion_tokens,
            time_to_first_token: t.first_token_at.map(|f| f.duration_since(t.submitted_at)),
            time_per_output_token,
            queue_time: t
                .admitted_at
                .unwrap_or_else(Instant::now)
                .duration_since(t.submitted_at),
            error,
        };
        {
            let _entered = self.span.enter();
            tracing::debug!(
                finish_reason = %reason,
                prompt_tokens = summary.prompt_tokens,
                completion_tokens,
                error = summary.error.as_deref().unwrap_or(""),
                "sequence finished"
            );
        }
        self.send(SeqEvent::Finished(summary));
    }

    /// `try_send`; the channel is sized for every event, so `Full` only happens if the receiver
    /// stopped reading, which is treated like a drop. Returns false when the receiver is gone.
    fn send(&self, event: SeqEvent) -> bool {
        match self.reply.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Closed(_)) => false,
            Err(TrySendError::Full(_)) => {
                let _entered = self.span.enter();
                tracing::warn!("reply channel full; cancelling the sequence");
                false
            }
        }
    }
}
