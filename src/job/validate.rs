//! Validation: limits on the raw input (bytes, depth, messages, stop strings), and vLLM's ranges for
//! sampling parameters, resolved into the engine's [`SamplingParams`]. Every failure is a
//! [`JobError::Validation`] whose message names the field, the limit and the value, TGI style:
//! "`top_p` must be > 0.0 and <= 1.0. Given: 1.5". Nothing reaches the engine before this passes.

use serde_json::Value;

use super::input::{short_json, RawSamplingParams};
use crate::config::Config;
use crate::engine::SamplingParams;
use crate::error::JobError;

/// Input limits for one job. Built from the [`Config`] and the engine's context length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLimits {
    /// Largest serialized input, in bytes.
    pub max_payload_bytes: usize,
    /// Deepest nesting of arrays/objects in the input.
    pub max_json_depth: usize,
    /// Most chat messages.
    pub max_messages: usize,
    /// Largest prompt text (raw prompt, or all message contents together), in bytes; checked before
    /// tokenizing so a tokenizer never sees an unbounded string.
    pub max_prompt_bytes: usize,
    /// Most stop strings.
    pub max_stop_sequences: usize,
    /// Longest stop string, in bytes.
    pub max_stop_bytes: usize,
    /// Most `stop_token_ids`.
    pub max_stop_token_ids: usize,
    /// Largest `n` (and, for completions, `n` x prompts).
    pub max_n: usize,
    /// Largest `logprobs` / `top_logprobs`.
    pub max_logprobs: usize,
    /// Context length: prompt + generated tokens per sequence.
    pub max_model_len: usize,
}

/// Default nesting limit for inputs (messages with content parts and tool schemas need ~10).
pub const MAX_JSON_DEPTH: usize = 64;
/// Default message count limit.
pub const MAX_MESSAGES: usize = 1024;
/// Default stop string count limit.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Default stop string length limit, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Default `n` limit.
pub const MAX_N: usize = 16;
/// Default `stop_token_ids` count limit.
pub const MAX_STOP_TOKEN_IDS: usize = 64;

impl JobLimits {
    /// Limits from the worker configuration; `max_model_len` is the engine's.
    pub fn from_config(config: &Config, max_model_len: usize) -> JobLimits {
        // ~16 bytes per token is generous for any tokenizer and language, and still bounds the
        // tokenizer's input (reliability-security 1b).
        let max_prompt_bytes = max_model_len
            .saturating_mul(16)
            .max(64 * 1024)
            .min(config.max_request_bytes.max(1));
        JobLimits {
            max_payload_bytes: config.max_request_bytes,
            max_json_depth: MAX_JSON_DEPTH,
            max_messages: MAX_MESSAGES,
            max_prompt_bytes,
            max_stop_sequences: MAX_STOP_SEQUENCES,
            max_stop_bytes: MAX_STOP_BYTES,
            max_stop_token_ids: MAX_STOP_TOKEN_IDS,
            max_n: MAX_N,
            max_logprobs: config.max_logprobs,
            max_model_len,
        }
    }

    /// Defaults with a 2048-token context, for tests.
    pub fn for_test() -> JobLimits {
        JobLimits::from_config(&Config::for_test(), 2048)
    }
}

/// Counts the bytes `value` serializes to, without allocating the text.
fn serialized_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing to a counter cannot fail; a failure would only undercount, never panic.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Deepest nesting of arrays/objects (a scalar is depth 0), walked iteratively (no recursion on
/// attacker-controlled depth). Stops early once `limit` is exceeded.
fn json_depth(value: &Value, limit: usize) -> usize {
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        if deepest > limit {
            return deepest;
        }
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, depth + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, depth + 1))),
            _ => {}
        }
    }
    deepest
}

/// Checks size and nesting before any typed parsing.
///
/// # Errors
/// [`JobError::Validation`].
pub fn check_json_limits(value: &Value, limits: &JobLimits) -> Result<(), JobError> {
    let depth = json_depth(value, limits.max_json_depth);
    if depth > limits.max_json_depth {
        return Err(JobError::Validation(format!(
            "`input` must be nested at most {} levels deep. Given: more than {}",
            limits.max_json_depth, limits.max_json_depth
        )));
    }
    let bytes = serialized_len(value);
    if bytes > limits.max_payload_bytes {
        return Err(JobError::Validation(format!(
            "`input` must be at most {} bytes. Given: {bytes} bytes",
            limits.max_payload_bytes
        )));
    }
    Ok(())
}

/// Checks a raw prompt's size.
///
/// # Errors
/// [`JobError::Validation`] when empty or over [`JobLimits::max_prompt_bytes`].
pub fn check_prompt_text(field: &str, text: &str, limits: &JobLimits) -> Result<(), JobError> {
    if text.is_empty() {
        return Err(JobError::Validation(format!("`{field}` cannot be empty")));
    }
    if text.len() > limits.max_prompt_bytes {
        return Err(JobError::Validation(format!(
            "`{field}` must be at most {} bytes. Given: {} bytes",
            limits.max_prompt_bytes,
            text.len()
        )));
    }
    Ok(())
}

/// Checks chat messages and normalises them for templates: each must be an object with a string
/// `role`; `content` is a string, `null`, or a list of `{"type":"text","text":...}` parts, which are
/// joined with `\n` into one string (what vLLM does for string-content templates). Other part types
/// (images, audio) are rejected: this worker serves text models.
///
/// # Errors
/// [`JobError::Validation`] naming the message index.
pub fn normalize_messages(messages: &Value, limits: &JobLimits) -> Result<Value, JobError> {
    let Value::Array(list) = messages else {
        return Err(JobError::Validation(format!(
            "`messages` must be a list of messages. Given: {}",
            short_json(messages)
        )));
    };
    if list.is_empty() {
        return Err(JobError::Validation("`messages` cannot be empty".into()));
    }
    if list.len() > limits.max_messages {
        return Err(JobError::Validation(format!(
            "`messages` must have at most {} messages. Given: {}",
            limits.max_messages,
            list.len()
        )));
    }
    let mut total_bytes = 0usize;
    let mut out = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let Value::Object(map) = message else {
            return Err(JobError::Validation(format!(
                "`messages[{i}]` must be an object with `role` and `content`. Given: {}",
                short_json(message)
            )));
        };
        match map.get("role") {
            Some(Value::String(role)) if !role.is_empty() => {}
            other => {
                return Err(JobError::Validation(format!(
                    "`messages[{i}].role` must be a non-empty string. Given: {}",
                    other.map(short_json).unwrap_or_else(|| "nothing".into())
                )))
            }
        }
        let mut normalized = map.clone();
        match map.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(text)) => texts.push(text),
                        (Some(kind), _) if kind != "text" => {
                            return Err(JobError::Validation(format!(
                                "`messages[{i}].content[{j}]`: content type \"{kind}\" is not supported; only text parts are"
                            )))
                        }
                        _ => {
                            return Err(JobError::Validation(format!(
                                "`messages[{i}].content[{j}]` must be {{\"type\": \"text\", \"text\": ...}}. Given: {}",
                                short_json(part)
                            )))
                        }
                    }
                }
                normalized.insert("content".into(), Value::String(texts.join("\n")));
            }
            Some(other) => {
                return Err(JobError::Validation(format!(
                    "`messages[{i}].content` must be a string or a list of text parts. Given: {}",
                    short_json(other)
                )))
            }
        }
        total_bytes += serialized_len(&Value::Object(normalized.clone()));
        if total_bytes > limits.max_prompt_bytes {
            return Err(JobError::Validation(format!(
                "`messages` must be at most {} bytes in total. Given: more than that at `messages[{i}]`",
                limits.max_prompt_bytes
            )));
        }
        out.push(Value::Object(normalized));
    }
    Ok(Value::Array(out))
}

/// The model's own sampling defaults from `generation_config.json`, which vLLM's OpenAI server applies
/// to every field a request leaves out (`--generation-config auto`): `temperature`, `top_p`, `top_k`,
/// `min_p`, `repetition_penalty`, and `max_new_tokens` as a cap on `max_tokens`. worker-vllm's native
/// path does not use them, so only the OpenAI routes do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelSamplingDefaults {
    /// `temperature`.
    pub temperature: Option<f64>,
    /// `top_p`.
    pub top_p: Option<f64>,
    /// `top_k`.
    pub top_k: Option<i64>,
    /// `min_p`.
    pub min_p: Option<f64>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f64>,
    /// `max_new_tokens`: the most tokens any request generates.
    pub max_new_tokens: Option<usize>,
}

impl ModelSamplingDefaults {
    /// Reads the fields vLLM reads from a parsed `generation_config.json`; others are ignored.
    pub fn from_generation_config(config: &Value) -> ModelSamplingDefaults {
        let float = |key: &str| config.get(key).and_then(Value::as_f64);
        ModelSamplingDefaults {
            temperature: float("temperature"),
            top_p: float("top_p"),
            top_k: config.get("top_k").and_then(Value::as_i64),
            min_p: float("min_p"),
            repetition_penalty: float("repetition_penalty"),
            max_new_tokens: config
                .get("max_new_tokens")
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0),
        }
    }

    /// `raw` with every sampling field it leaves out taken from these defaults.
    pub fn fill(&self, raw: &RawSamplingParams) -> RawSamplingParams {
        RawSamplingParams {
            temperature: raw.temperature.or(self.temperature),
            top_p: raw.top_p.or(self.top_p),
            top_k: raw.top_k.or(self.top_k),
            min_p: raw.min_p.or(self.min_p),
            repetition_penalty: raw.repetition_penalty.or(self.repetition_penalty),
            ..raw.clone()
        }
    }
}

/// How `max_tokens` is filled in when the request leaves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensDefault {
    /// A fixed number (native jobs: 100, as worker-vllm injects; OpenAI completions: 16), clamped to
    /// what is left of the context.
    Fixed(usize),
    /// Whatever is left of the context (OpenAI chat, as vLLM does).
    RemainingContext,
}

/// Sampling parameters after validation, plus the number of sequences to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSampling {
    /// The engine's parameters for sequence 0 (sequence `i` uses `seed + i` when seeded).
    pub params: SamplingParams,
    /// Sequences to generate.
    pub n: usize,
    /// Keep only the last N prompt tokens (applied before the length checks).
    pub truncate_prompt_tokens: Option<usize>,
}

fn validation(message: String) -> JobError {
    JobError::Validation(message)
}

/// Checks a float range `lo <op> x <op> hi` and returns it as `f32`.
fn in_range(
    name: &str,
    value: f64,
    lo: f64,
    lo_inclusive: bool,
    hi: f64,
    hi_inclusive: bool,
) -> Result<f32, JobError> {
    let lo_ok = if lo_inclusive {
        value >= lo
    } else {
        value > lo
    };
    let hi_ok = if hi_inclusive {
        value <= hi
    } else {
        value < hi
    };
    if lo_ok && hi_ok && value.is_finite() {
        Ok(value as f32)
    } else {
        Err(validation(format!(
            "`{name}` must be {} {lo:?} and {} {hi:?}. Given: {value}",
            if lo_inclusive { ">=" } else { ">" },
            if hi_inclusive { "<=" } else { "<" },
        )))
    }
}

impl RawSamplingParams {
    /// Checks vLLM's ranges and this worker's limits (before the prompt is known: everything but
    /// `max_tokens`), filling vLLM's defaults.
    ///
    /// # Errors
    /// [`JobError::Validation`] naming the field, the limit and the value.
    pub fn resolve(
        &self,
        limits: &JobLimits,
        vocab_size: usize,
    ) -> Result<ResolvedSampling, JobError> {
        let n = match self.n {
            None => 1,
            Some(n) if n >= 1 && (n as u64) <= limits.max_n as u64 => n as usize,
            Some(n) => {
                return Err(validation(format!(
                    "`n` must be >= 1 and <= {}. Given: {n}",
                    limits.max_n
                )))
            }
        };
        if let Some(best_of) = self.best_of {
            if best_of != n as i64 && best_of != 1 || best_of < 1 {
                return Err(validation(format!(
                    "`best_of` != `n` is not supported (best-of sampling was removed in vLLM V1). Given: {best_of} with `n` = {n}"
                )));
            }
        }
        let temperature = match self.temperature {
            None => 1.0,
            Some(t) if (0.0..=100.0).contains(&t) => t as f32,
            Some(t) => {
                return Err(validation(format!(
                    "`temperature` must be >= 0.0 and <= 100.0. Given: {t}"
                )))
            }
        };
        // vLLM treats temperatures below 1e-5 as greedy.
        let temperature = if temperature < 1e-5 { 0.0 } else { temperature };
        let top_p = self
            .top_p
            .map(|p| in_range("top_p", p, 0.0, false, 1.0, true))
            .transpose()?
            .unwrap_or(1.0);
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k >= 1 => (k as u64).min(vocab_size.max(1) as u64) as usize,
            Some(k) => {
                return Err(validation(format!(
                    "`top_k` must be -1 (disable), 0 (disable) or at least 1. Given: {k}"
                )))
            }
        };
        let min_p = self
            .min_p
            .map(|p| in_range("min_p", p, 0.0, true, 1.0, true))
            .transpose()?
            .unwrap_or(0.0);
        let repetition_penalty = match self.repetition_penalty {
            None => 1.0,
            Some(r) if r.is_finite() && r > 0.0 && r <= 100.0 => r as f32,
            Some(r) => {
                return Err(validation(format!(
                    "`repetition_penalty` must be > 0.0 and <= 100.0. Given: {r}"
                )))
            }
        };
        let presence_penalty = self
            .presence_penalty
            .map(|p| in_range("presence_penalty", p, -2.0, true, 2.0, true))
            .transpose()?
            .unwrap_or(0.0);
        let frequency_penalty = self
            .frequency_penalty
            .map(|p| in_range("frequency_penalty", p, -2.0, true, 2.0, true))
            .transpose()?
            .unwrap_or(0.0);
        let stop = self.stop.clone().unwrap_or_default();
        if stop.len() > limits.max_stop_sequences {
            return Err(validation(format!(
                "`stop` supports up to {} stop sequences. Given: {}",
                limits.max_stop_sequences,
                stop.len()
            )));
        }
        for s in &stop {
            if s.is_empty() {
                return Err(validation("`stop` strings cannot be empty".into()));
            }
            if s.len() > limits.max_stop_bytes {
                return Err(validation(format!(
                    "`stop` strings must be at most {} bytes. Given: {} bytes",
                    limits.max_stop_bytes,
                    s.len()
                )));
            }
        }
        let stop_token_ids = self.stop_token_ids.clone().unwrap_or_default();
        if stop_token_ids.len() > limits.max_stop_token_ids {
            return Err(validation(format!(
                "`stop_token_ids` supports up to {} ids. Given: {}",
                limits.max_stop_token_ids,
                stop_token_ids.len()
            )));
        }
        let stop_token_ids = stop_token_ids
            .into_iter()
            .map(|id| {
                if id >= 0 && (id as u64) < vocab_size as u64 {
                    Ok(id as u32)
                } else {
                    Err(validation(format!(
                        "`stop_token_ids` must be >= 0 and < {vocab_size} (the vocabulary size). Given: {id}"
                    )))
                }
            })
            .collect::<Result<Vec<u32>, JobError>>()?;
        let logprobs = match self.logprobs {
            None => None,
            // vLLM: -1 means "the whole vocabulary", which max_logprobs forbids anyway.
            Some(l) if l >= 0 && (l as u64) <= limits.max_logprobs as u64 => Some(l as usize),
            Some(l) => {
                return Err(validation(format!(
                    "`logprobs` must be >= 0 and <= {}. Given: {l}",
                    limits.max_logprobs
                )))
            }
        };
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(m) if m >= 0 && (m as u64) < limits.max_model_len as u64 => m as usize,
            Some(m) => {
                return Err(validation(format!(
                    "`min_tokens` must be >= 0 and < {}. Given: {m}",
                    limits.max_model_len
                )))
            }
        };
        if let Some(max) = self.max_tokens {
            if max < 1 {
                return Err(validation(format!(
                    "`max_tokens` must be at least 1. Given: {max}"
                )));
            }
            if min_tokens as i64 > max {
                return Err(validation(format!(
                    "`min_tokens` must be <= `max_tokens`. Given: {min_tokens} `min_tokens` and {max} `max_tokens`"
                )));
            }
        }
        let truncate_prompt_tokens = match self.truncate_prompt_tokens {
            None => None,
            Some(t) if t >= 1 && (t as u64) < limits.max_model_len as u64 => Some(t as usize),
            Some(t) => {
                return Err(validation(format!(
                    "`truncate_prompt_tokens` must be >= 1 and < {}. Given: {t}",
                    limits.max_model_len
                )))
            }
        };
        let params = SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed: self.seed.map(|s| s as u64),
            stop,
            stop_token_ids,
            include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            // Filled by `fit_max_tokens` once the prompt length is known.
            max_tokens: 0,
            min_tokens,
            logprobs,
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
        };
        Ok(ResolvedSampling {
            params,
            n,
            truncate_prompt_tokens,
        })
    }
}

/// Checks the prompt length against the context and fills `max_tokens`: an explicit value must fit
/// (`prompt + max_tokens <= max_model_len`); a default is clamped to what is left.
///
/// # Errors
/// [`JobError::Validation`] when the prompt leaves no room or an explicit `max_tokens` does not fit.
pub fn fit_max_tokens(
    requested: Option<i64>,
    default: MaxTokensDefault,
    prompt_tokens: usize,
    min_tokens: usize,
    max_model_len: usize,
) -> Result<usize, JobError> {
    if prompt_tokens == 0 {
        return Err(validation(
            "`prompt` cannot be empty (it encodes to no tokens)".into(),
        ));
    }
    if prompt_tokens >= max_model_len {
        // Its own kind (error_type still `validation`) so HTTP answers 400, as vLLM does.
        return Err(JobError::TooLong(format!(
            "`prompt` must have less than {max_model_len} tokens. Given: {prompt_tokens}"
        )));
    }
    let remaining = max_model_len - prompt_tokens;
    let max_tokens = match (requested, default) {
        (Some(max), _) => {
            let max = max.max(1) as u64;
            if max > remaining as u64 {
                return Err(validation(format!(
                    "`prompt` tokens + `max_tokens` must be <= {max_model_len}. Given: {prompt_tokens} `prompt` tokens and {max} `max_tokens`"
                )));
            }
            max as usize
        }
        (None, MaxTokensDefault::Fixed(n)) => n.min(remaining),
        (None, MaxTokensDefault::RemainingContext) => remaining,
    };
    if min_tokens > max_tokens {
        return Err(validation(format!(
            "`min_tokens` must be <= `max_tokens`. Given: {min_tokens} `min_tokens` and {max_tokens} `max_tokens`"
        )));
    }
    Ok(max_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resolve(params: Value) -> Result<ResolvedSampling, JobError> {
        let Value::Object(map) = params else { panic!() };
        RawSamplingParams::from_map(&map)?.resolve(&JobLimits::for_test(), 1000)
    }

    fn message(result: Result<ResolvedSampling, JobError>) -> String {
        match result {
            Err(JobError::Validation(m)) => m,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_vllm() {
        let r = resolve(json!({})).unwrap();
        assert_eq!(r.n, 1);
        assert_eq!(
            r.params,
            SamplingParams {
                max_tokens: 0,
                ..SamplingParams::default()
            }
        );
    }

    #[test]
    fn maps_vllm_values_onto_engine_params() {
        let r = resolve(
            json!({"temperature": 0.000001, "top_k": -1, "seed": -1, "n": 3, "best_of": 3,
            "stop": ["a", "b"], "stop_token_ids": [5], "logprobs": 2, "min_tokens": 2}),
        )
        .unwrap();
        assert_eq!(r.params.temperature, 0.0);
        assert_eq!(r.params.top_k, 0);
        assert_eq!(r.params.seed, Some(u64::MAX));
        assert_eq!(r.n, 3);
        assert_eq!(r.params.stop, vec!["a", "b"]);
        assert_eq!(r.params.stop_token_ids, vec![5]);
        assert_eq!(r.params.logprobs, Some(2));
        assert_eq!(r.params.min_tokens, 2);
        assert_eq!(resolve(json!({"top_k": 5000})).unwrap().params.top_k, 1000);
    }

    #[test]
    fn range_errors_name_field_limit_and_value() {
        assert_eq!(
            message(resolve(json!({"top_p": 1.5}))),
            "`top_p` must be > 0.0 and <= 1.0. Given: 1.5"
        );
        assert_eq!(
            message(resolve(json!({"top_p": 0}))),
            "`top_p` must be > 0.0 and <= 1.0. Given: 0"
        );
        assert_eq!(
            message(resolve(json!({"temperature": -1}))),
            "`temperature` must be >= 0.0 and <= 100.0. Given: -1"
        );
        assert_eq!(
            message(resolve(json!({"top_k": -2}))),
            "`top_k` must be -1 (disable), 0 (disable) or at least 1. Given: -2"
        );
        assert_eq!(
            message(resolve(json!({"min_p": 2}))),
            "`min_p` must be >= 0.0 and <= 1.0. Given: 2"
        );
        assert_eq!(
            message(resolve(json!({"repetition_penalty": 0}))),
            "`repetition_penalty` must be > 0.0 and <= 100.0. Given: 0"
        );
        assert_eq!(
            message(resolve(json!({"presence_penalty": 3}))),
            "`presence_penalty` must be >= -2.0 and <= 2.0. Given: 3"
        );
        assert_eq!(
            message(resolve(json!({"frequency_penalty": -2.5}))),
            "`frequency_penalty` must be >= -2.0 and <= 2.0. Given: -2.5"
        );
        assert_eq!(
            message(resolve(json!({"n": 17}))),
            "`n` must be >= 1 and <= 16. Given: 17"
        );
        assert_eq!(
            message(resolve(json!({"n": 0}))),
            "`n` must be >= 1 and <= 16. Given: 0"
        );
        assert_eq!(
            message(resolve(json!({"logprobs": 21}))),
            "`logprobs` must be >= 0 and <= 20. Given: 21"
        );
        assert_eq!(
            message(resolve(json!({"max_tokens": 0}))),
            "`max_tokens` must be at least 1. Given: 0"
        );
        assert_eq!(
            message(resolve(json!({"stop_token_ids": [1000]}))),
            "`stop_token_ids` must be >= 0 and < 1000 (the vocabulary size). Given: 1000"
        );
        assert!(message(resolve(json!({"best_of": 4})))
            .starts_with("`best_of` != `n` is not supported"));
        assert!(message(resolve(json!({"min_tokens": 5, "max_tokens": 4})))
            .starts_with("`min_tokens` must be <= `max_tokens`"));
    }

    #[test]
    fn stop_strings_are_bounded() {
        let many: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        assert_eq!(
            message(resolve(json!({"stop": many}))),
            "`stop` supports up to 16 stop sequences. Given: 17"
        );
        let long = "x".repeat(257);
        assert_eq!(
            message(resolve(json!({"stop": long}))),
            "`stop` strings must be at most 256 bytes. Given: 257 bytes"
        );
        assert_eq!(
            message(resolve(json!({"stop": [""]}))),
            "`stop` strings cannot be empty"
        );
    }

    #[test]
    fn prompt_bytes_limit_follows_context_and_payload_limits() {
        let config = Config::for_test();
        assert_eq!(
            JobLimits::from_config(&config, 2048).max_prompt_bytes,
            64 * 1024
        );
        assert_eq!(
            JobLimits::from_config(&config, 131_072).max_prompt_bytes,
            2 * 1024 * 1024
        );
        let tiny = Config {
            max_request_bytes: 1000,
            ..Config::for_test()
        };
        assert_eq!(JobLimits::from_config(&tiny, 2048).max_prompt_bytes, 1000);
    }

    #[test]
    fn max_tokens_fits_the_context() {
        assert_eq!(
            fit_max_tokens(None, MaxTokensDefault::Fixed(100), 10, 0, 2048).unwrap(),
            100
        );
        assert_eq!(
            fit_max_tokens(None, MaxTokensDefault::Fixed(100), 2000, 0, 2048).unwrap(),
            48
        );
        assert_eq!(
            fit_max_tokens(None, MaxTokensDefault::RemainingContext, 48, 0, 2048).unwrap(),
            2000
        );
        let err =
            fit_max_tokens(Some(100), MaxTokensDefault::Fixed(16), 2000, 0, 2048).unwrap_err();
        assert_eq!(err.to_string(), "`prompt` tokens + `max_tokens` must be <= 2048. Given: 2000 `prompt` tokens and 100 `max_tokens`");
        let err = fit_max_tokens(None, MaxTokensDefault::Fixed(16), 2048, 0, 2048).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`prompt` must have less than 2048 tokens. Given: 2048"
        );
        assert_eq!(err.error_type(), "validation");
    }

    #[test]
    fn model_defaults_fill_only_missing_fields() {
        let defaults = ModelSamplingDefaults::from_generation_config(&json!({
            "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
            "max_new_tokens": 512, "do_sample": true, "eos_token_id": [1]}));
        assert_eq!(defaults.max_new_tokens, Some(512));
        let raw = RawSamplingParams {
            temperature: Some(0.0),
            ..RawSamplingParams::default()
        };
        let filled = defaults.fill(&raw);
        assert_eq!(filled.temperature, Some(0.0));
        assert_eq!(filled.top_p, Some(0.8));
        assert_eq!(filled.top_k, Some(20));
        assert_eq!(filled.repetition_penalty, Some(1.05));
        assert_eq!(filled.min_p, None);
        assert_eq!(
            ModelSamplingDefaults::from_generation_config(&json!({})),
            ModelSamplingDefaults::default()
        );
    }

    #[test]
    fn depth_and_size_are_checked_before_parsing() {
        let limits = JobLimits::for_test();
        let mut deep = json!("x");
        for _ in 0..70 {
            deep = json!([deep]);
        }
        let err = check_json_limits(&json!({"prompt": deep}), &limits).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("`input` must be nested at most 64 levels deep"),
            "{err}"
        );
        let small = JobLimits {
            max_payload_bytes: 10,
            ..limits.clone()
        };
        let err = check_json_limits(&json!({"prompt": "hello world"}), &small).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`input` must be at most 10 bytes. Given: 24 bytes"
        );
        check_json_limits(&json!({"prompt": "hello"}), &limits).unwrap();
    }

    #[test]
    fn messages_are_checked_and_text_parts_joined() {
        let limits = JobLimits::for_test();
        let out = normalize_messages(&json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]), &limits).unwrap();
        assert_eq!(out, json!([{"role": "user", "content": "a\nb"}]));
        let err = normalize_messages(&json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), &limits).unwrap_err();
        assert!(err.to_string().contains("image_url"), "{err}");
        assert_eq!(
            normalize_messages(&json!([]), &limits)
                .unwrap_err()
                .to_string(),
            "`messages` cannot be empty"
        );
        let err = normalize_messages(&json!([{"content": "x"}]), &limits).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`messages[0].role` must be a non-empty string. Given: nothing"
        );
        let few = JobLimits {
            max_messages: 1,
            ..limits.clone()
        };
        let err = normalize_messages(
            &json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
            &few,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`messages` must have at most 1 messages. Given: 2"
        );
        let tiny = JobLimits {
            max_prompt_bytes: 10,
            ..limits
        };
        assert!(normalize_messages(
            &json!([{"role": "user", "content": "a long message"}]),
            &tiny
        )
        .is_err());
    }
}
