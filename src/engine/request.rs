//! What crosses the engine boundary: a validated generation request in, a stream of [`SeqEvent`]s out.
//! These types are the only contract between the async side (`job`, `queue`, `server`) and the engine
//! thread.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

/// Validated per-sequence sampling parameters, with vLLM's names and defaults.
/// Built by `job` validation; the engine trusts these values to be in range.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables (vLLM's -1 is normalised to 0 by validation).
    pub top_k: usize,
    /// In [0, 1]; 0 disables.
    pub min_p: f32,
    /// > 0; 1 disables. Applies to prompt and output tokens (vLLM semantics).
    pub repetition_penalty: f32,
    /// In [-2, 2]; applies to output tokens only.
    pub presence_penalty: f32,
    /// In [-2, 2]; applies to output tokens only.
    pub frequency_penalty: f32,
    /// Same seed and same prompt give the same output, whatever else is in the batch.
    pub seed: Option<u64>,
    /// Stop strings; the text never streams a partial stop string.
    pub stop: Vec<String>,
    /// Extra token ids that stop generation (in addition to EOS unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep the matched stop string in the output text.
    pub include_stop_str_in_output: bool,
    /// Do not stop at EOS tokens.
    pub ignore_eos: bool,
    /// Maximum number of generated tokens.
    pub max_tokens: usize,
    /// EOS and stop tokens are suppressed until this many tokens were generated.
    pub min_tokens: usize,
    /// Number of top log-probabilities to return per generated token (`None`: no logprobs; `Some(0)`:
    /// only the chosen token's). At most 20.
    pub logprobs: Option<usize>,
    /// Drop special tokens from the output text.
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            ignore_eos: false,
            max_tokens: 16,
            min_tokens: 0,
            logprobs: None,
            skip_special_tokens: true,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with `max_tokens`, everything else at defaults. Handy in tests and warm-up.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..SamplingParams::default()
        }
    }
}

/// One generation request: a tokenized prompt and its sampling parameters. One request = one sequence
/// (`n > 1` is expanded by the `job` layer into several requests).
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Id for logs and spans (the job id, or the OpenAI request id, plus `-{index}` for `n > 1`).
    pub request_id: String,
    /// The prompt as token ids (chat template already applied).
    pub prompt_ids: Vec<u32>,
    /// Validated sampling parameters.
    pub params: SamplingParams,
}

/// Log-probability of one token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// Token id.
    pub token_id: u32,
    /// Decoded text of this token alone.
    pub token: String,
    /// Natural log-probability under the model's distribution (after temperature, before top-k/p).
    pub logprob: f32,
}

/// One generated token's details, for logprobs output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GeneratedToken {
    /// The sampled token.
    pub chosen: TokenLogprob,
    /// The `logprobs` most likely tokens at this step, best first (empty when not requested).
    pub top: Vec<TokenLogprob>,
}

/// Why a sequence ended. `Display`/serde give the wire string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The reply channel closed (client gone, job-stop).
    Cancelled,
    /// The engine failed on this sequence.
    Error,
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        })
    }
}

/// What matched when a sequence stopped with [`FinishReason::Stop`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StopMatch {
    /// A stop token id (EOS or `stop_token_ids`).
    Token(u32),
    /// A stop string.
    Text(String),
}

/// Summary sent once when a sequence ends.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqSummary {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// What matched, when it stopped on a stop token or string.
    pub stop_match: Option<StopMatch>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (including a final EOS that is not shown as text).
    pub completion_tokens: usize,
    /// From submission to the first generated token.
    pub time_to_first_token: Option<Duration>,
    /// Mean time per generated token after the first.
    pub time_per_output_token: Option<Duration>,
    /// Time spent waiting for a KV slot before prefill started.
    pub queue_time: Duration,
    /// Error text when `finish_reason` is [`FinishReason::Error`].
    pub error: Option<String>,
}

/// An event on a request's reply channel. Zero or more `Delta`s, then exactly one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// New output: text that is safe to show (never half a UTF-8 character or half a stop string)
    /// and the token ids produced since the previous delta.
    Delta {
        /// Text delta (may be empty when tokens are held back).
        text: String,
        /// Token ids generated since the last delta.
        token_ids: Vec<u32>,
        /// Per-token logprob details when requested (same length as `token_ids`).
        logprobs: Vec<GeneratedToken>,
    },
    /// The sequence ended; no more events follow.
    Finished(SeqSummary),
}

/// Receiving end of a request's events. Dropping it cancels the sequence within one engine step.
pub type SeqEvents = mpsc::Receiver<SeqEvent>;
