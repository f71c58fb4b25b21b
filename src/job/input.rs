//! The job `input` schema as it arrives (raw), parsed field by field so every type error names its
//! field. Two shapes, as worker-vllm accepts them:
//! - native: `prompt` or `messages`, `sampling_params` (vLLM names), `stream`, `apply_chat_template`,
//!   `max_batch_size`, `min_batch_size`, `batch_size_growth_factor`;
//! - OpenAI: `openai_route` (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) + `openai_input`.
//!
//! Range checks and defaults live in [`super::validate`]; nothing here touches the engine.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::validate::{self, JobLimits};
use crate::error::JobError;

/// A parsed job input.
#[derive(Debug, Clone)]
pub enum JobInput {
    /// worker-vllm's native input (boxed: it is much larger than the OpenAI variant).
    Native(Box<NativeInput>),
    /// An OpenAI request carried through the queue.
    OpenAi {
        /// Which route.
        route: OpenAiRoute,
        /// `openai_input` (the request body); `Value::Null` when absent.
        body: Value,
    },
}

/// The OpenAI routes a job (or the dev server) can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAiRoute {
    /// `/v1/chat/completions`
    ChatCompletions,
    /// `/v1/completions`
    Completions,
    /// `/v1/models`
    Models,
}

impl OpenAiRoute {
    /// Parses a route path (`/v1/chat/completions`, with or without a leading `/openai` or trailing `/`).
    ///
    /// # Errors
    /// [`JobError::NotFound`] naming the route.
    pub fn parse(path: &str) -> Result<OpenAiRoute, JobError> {
        let trimmed = path.trim().trim_end_matches('/');
        let trimmed = trimmed.strip_prefix("/openai").unwrap_or(trimmed);
        match trimmed {
            "/v1/chat/completions" => Ok(OpenAiRoute::ChatCompletions),
            "/v1/completions" => Ok(OpenAiRoute::Completions),
            "/v1/models" => Ok(OpenAiRoute::Models),
            _ => Err(JobError::NotFound(format!(
                "`openai_route` {} is not supported; use /v1/chat/completions, /v1/completions or /v1/models",
                short_json(&Value::String(path.to_string()))
            ))),
        }
    }
}

/// Where the prompt text comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSource {
    /// A raw prompt, tokenized with special tokens (BOS) added.
    Text(String),
    /// Chat messages (a JSON array), rendered with the model's chat template and tokenized without
    /// adding special tokens (the template carries them).
    Chat(Value),
}

/// worker-vllm's native input, parsed but not yet range-checked against the model.
#[derive(Debug, Clone)]
pub struct NativeInput {
    /// The prompt or the conversation.
    pub prompt: PromptSource,
    /// Sampling parameters with vLLM names.
    pub sampling: RawSamplingParams,
    /// Stream batches as they are produced (otherwise one item with the whole text).
    pub stream: bool,
    /// Per-job override of the largest stream batch (tokens).
    pub max_batch_size: Option<usize>,
    /// Per-job override of the first stream batch (tokens).
    pub min_batch_size: Option<usize>,
    /// Per-job override of the batch growth factor.
    pub batch_size_growth_factor: Option<f64>,
}

/// `stop` as vLLM and OpenAI take it: one string or a list.
pub type StopStrings = Vec<String>;

/// Sampling fields as sent (vLLM names; OpenAI routes map theirs onto these). `None` = not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawSamplingParams {
    /// Sequences to generate.
    pub n: Option<i64>,
    /// vLLM's best-of (removed in vLLM V1); only `None` or equal to `n` is accepted.
    pub best_of: Option<i64>,
    /// See [`crate::engine::SamplingParams::temperature`].
    pub temperature: Option<f64>,
    /// See [`crate::engine::SamplingParams::top_p`].
    pub top_p: Option<f64>,
    /// -1 or 0 disable.
    pub top_k: Option<i64>,
    /// See [`crate::engine::SamplingParams::min_p`].
    pub min_p: Option<f64>,
    /// See [`crate::engine::SamplingParams::repetition_penalty`].
    pub repetition_penalty: Option<f64>,
    /// See [`crate::engine::SamplingParams::presence_penalty`].
    pub presence_penalty: Option<f64>,
    /// See [`crate::engine::SamplingParams::frequency_penalty`].
    pub frequency_penalty: Option<f64>,
    /// Any integer; negative values are reinterpreted as their two's-complement `u64`.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<StopStrings>,
    /// Extra stop token ids.
    pub stop_token_ids: Option<Vec<i64>>,
    /// Keep the stop string in the output.
    pub include_stop_str_in_output: Option<bool>,
    /// Do not stop at EOS.
    pub ignore_eos: Option<bool>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Fewest tokens to generate before EOS/stop may end the sequence.
    pub min_tokens: Option<i64>,
    /// Top log-probabilities per token (0 = only the chosen token's).
    pub logprobs: Option<i64>,
    /// Drop special tokens from the text.
    pub skip_special_tokens: Option<bool>,
    /// Keep only the last N prompt tokens.
    pub truncate_prompt_tokens: Option<i64>,
}

/// Fields vLLM (or OpenAI) accepts that this worker does not implement: rejected with a clear
/// message rather than silently ignored, when set to a non-default value.
const UNSUPPORTED_FIELDS: &[(&str, &str)] = &[
    ("use_beam_search", "beam search is not supported"),
    ("prompt_logprobs", "prompt logprobs are not supported"),
    ("logit_bias", "`logit_bias` is not supported"),
    ("allowed_token_ids", "`allowed_token_ids` is not supported"),
    ("bad_words", "`bad_words` is not supported"),
    ("guided_json", "guided decoding is not supported"),
    ("guided_regex", "guided decoding is not supported"),
    ("guided_choice", "guided decoding is not supported"),
    ("guided_grammar", "guided decoding is not supported"),
    ("guided_decoding", "guided decoding is not supported"),
    (
        "guided_decoding_backend",
        "guided decoding is not supported",
    ),
    ("structured_outputs", "structured outputs are not supported"),
    ("grammar", "grammar is not supported"),
    ("logits_processors", "`logits_processors` are not supported"),
    (
        "chat_template",
        "`chat_template` is never taken from a request; the model's template is used",
    ),
    ("lora_request", "LoRA adapters are not supported"),
];

/// Python truthiness of a JSON value (`false`, `null`, `{}`, `[]`, `""` and `0` are false): whether an
/// unsupported field counts as "set", and (in `queue::wire`) whether the SDK would see an `error`.
pub(crate) fn python_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Rejects known-unsupported fields that are set.
///
/// # Errors
/// [`JobError::Validation`] naming the field.
pub(crate) fn reject_unsupported(map: &Map<String, Value>) -> Result<(), JobError> {
    for (field, why) in UNSUPPORTED_FIELDS {
        if map.get(*field).is_some_and(python_truthy) {
            return Err(JobError::Validation(format!(
                "`{field}`: {why} by this worker"
            )));
        }
    }
    Ok(())
}

/// A short, single-line rendering of a value for error messages (at most ~80 bytes).
pub(crate) fn short_json(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= 80 {
        return text;
    }
    let mut end = 77;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Reads an optional field; `null` counts as absent.
///
/// # Errors
/// [`JobError::Validation`]: "`{name}` must be {expected}. Given: {value}".
pub(crate) fn field<T: DeserializeOwned>(
    map: &Map<String, Value>,
    name: &str,
    expected: &str,
) -> Result<Option<T>, JobError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value::<T>(value.clone())
            .map(Some)
            .map_err(|_| {
                JobError::Validation(format!(
                    "`{name}` must be {expected}. Given: {}",
                    short_json(value)
                ))
            }),
    }
}

/// Reads `stop`: a string or a list of strings.
///
/// # Errors
/// [`JobError::Validation`] when it is neither.
pub(crate) fn stop_field(
    map: &Map<String, Value>,
    name: &str,
) -> Result<Option<StopStrings>, JobError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(_) => field::<Vec<String>>(map, name, "a string or a list of strings"),
    }
}

impl RawSamplingParams {
    /// Reads vLLM-named sampling fields from an object (`sampling_params`, or an OpenAI body, whose
    /// caller handles the fields that differ: `logprobs` on chat, `max_completion_tokens`).
    ///
    /// # Errors
    /// [`JobError::Validation`] for a wrongly typed field or a set unsupported one.
    pub fn from_map(map: &Map<String, Value>) -> Result<RawSamplingParams, JobError> {
        reject_unsupported(map)?;
        const INT: &str = "an integer";
        const NUM: &str = "a number";
        const BOOL: &str = "a boolean";
        Ok(RawSamplingParams {
            n: field(map, "n", INT)?,
            best_of: field(map, "best_of", INT)?,
            temperature: field(map, "temperature", NUM)?,
            top_p: field(map, "top_p", NUM)?,
            top_k: field(map, "top_k", INT)?,
            min_p: field(map, "min_p", NUM)?,
            repetition_penalty: field(map, "repetition_penalty", NUM)?,
            presence_penalty: field(map, "presence_penalty", NUM)?,
            frequency_penalty: field(map, "frequency_penalty", NUM)?,
            seed: field(map, "seed", INT)?,
            stop: stop_field(map, "stop")?,
            stop_token_ids: field(map, "stop_token_ids", "a list of integers")?,
            include_stop_str_in_output: field(map, "include_stop_str_in_output", BOOL)?,
            ignore_eos: field(map, "ignore_eos", BOOL)?,
            max_tokens: field(map, "max_tokens", INT)?,
            min_tokens: field(map, "min_tokens", INT)?,
            logprobs: field(map, "logprobs", INT)?,
            skip_special_tokens: field(map, "skip_special_tokens", BOOL)?,
            truncate_prompt_tokens: field(map, "truncate_prompt_tokens", INT)?,
        })
    }
}

impl JobInput {
    /// Parses a job `input` object after checking its size and nesting depth.
    ///
    /// # Errors
    /// [`JobError::Validation`] for a malformed input or one over the limits; [`JobError::NotFound`]
    /// for an unknown `openai_route`.
    pub fn parse(input: Value, limits: &JobLimits) -> Result<JobInput, JobError> {
        validate::check_json_limits(&input, limits)?;
        let Value::Object(mut map) = input else {
            return Err(JobError::Validation(format!(
                "`input` must be a JSON object. Given: {}",
                short_json(&input)
            )));
        };
        if let Some(route) = map.get("openai_route").filter(|v| !v.is_null()) {
            let route = match route {
                Value::String(path) => OpenAiRoute::parse(path)?,
                other => {
                    return Err(JobError::Validation(format!(
                        "`openai_route` must be a string. Given: {}",
                        short_json(other)
                    )))
                }
            };
            let body = map.remove("openai_input").unwrap_or(Value::Null);
            return Ok(JobInput::OpenAi { route, body });
        }
        NativeInput::from_map(&map).map(|native| JobInput::Native(Box::new(native)))
    }
}

impl NativeInput {
    /// Parses worker-vllm's native fields.
    ///
    /// # Errors
    /// [`JobError::Validation`].
    pub fn from_map(map: &Map<String, Value>) -> Result<NativeInput, JobError> {
        // Tensors are never taken from a job (vLLM's prompt-embeds memory corruption class).
        if map.get("prompt_embeds").is_some_and(python_truthy) {
            return Err(JobError::Validation(
                "`prompt_embeds` is not supported by this worker; send `prompt` or `messages`"
                    .into(),
            ));
        }
        let apply_chat_template: bool =
            field(map, "apply_chat_template", "a boolean")?.unwrap_or(false);
        let prompt = match (
            map.get("messages").filter(|v| !v.is_null()),
            map.get("prompt").filter(|v| !v.is_null()),
        ) {
            // worker-vllm takes `messages` first when both are present.
            (Some(messages), _) => PromptSource::Chat(messages.clone()),
            (None, Some(Value::String(text))) if apply_chat_template => {
                PromptSource::Chat(serde_json::json!([{"role": "user", "content": text}]))
            }
            (None, Some(Value::String(text))) => PromptSource::Text(text.clone()),
            (None, Some(Value::Array(messages))) => {
                PromptSource::Chat(Value::Array(messages.clone()))
            }
            (None, Some(other)) => {
                return Err(JobError::Validation(format!(
                    "`prompt` must be a string. Given: {}",
                    short_json(other)
                )))
            }
            (None, None) => return Err(JobError::Validation(
                "`input` must contain `prompt` (a string) or `messages` (a list of chat messages)"
                    .into(),
            )),
        };
        let sampling = match map.get("sampling_params") {
            None | Some(Value::Null) => RawSamplingParams::default(),
            Some(Value::Object(params)) => RawSamplingParams::from_map(params)?,
            Some(other) => {
                return Err(JobError::Validation(format!(
                    "`sampling_params` must be an object. Given: {}",
                    short_json(other)
                )))
            }
        };
        let positive_int = |name: &str| -> Result<Option<usize>, JobError> {
            match field::<i64>(map, name, "an integer")? {
                None => Ok(None),
                Some(v) if (1..=1_000_000).contains(&v) => Ok(Some(v as usize)),
                Some(v) => Err(JobError::Validation(format!(
                    "`{name}` must be >= 1 and <= 1000000. Given: {v}"
                ))),
            }
        };
        let batch_size_growth_factor =
            match field::<f64>(map, "batch_size_growth_factor", "a number")? {
                None => None,
                Some(f) if (1.0..=1000.0).contains(&f) => Some(f),
                Some(f) => {
                    return Err(JobError::Validation(format!(
                        "`batch_size_growth_factor` must be >= 1 and <= 1000. Given: {f}"
                    )))
                }
            };
        Ok(NativeInput {
            prompt,
            sampling,
            stream: field(map, "stream", "a boolean")?.unwrap_or(false),
            max_batch_size: positive_int("max_batch_size")?,
            min_batch_size: positive_int("min_batch_size")?,
            batch_size_growth_factor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> JobLimits {
        JobLimits::for_test()
    }

    #[test]
    fn parses_native_prompt_with_sampling_params() {
        let input = json!({"prompt": "hi", "stream": true, "max_batch_size": 5,
            "sampling_params": {"temperature": 0, "max_tokens": 7, "stop": "x", "unknown_knob": 3}});
        let JobInput::Native(native) = JobInput::parse(input, &limits()).unwrap() else {
            panic!()
        };
        assert_eq!(native.prompt, PromptSource::Text("hi".into()));
        assert!(native.stream);
        assert_eq!(native.max_batch_size, Some(5));
        assert_eq!(native.sampling.temperature, Some(0.0));
        assert_eq!(native.sampling.max_tokens, Some(7));
        assert_eq!(native.sampling.stop, Some(vec!["x".to_string()]));
    }

    #[test]
    fn apply_chat_template_wraps_prompt_as_user_message() {
        let input = json!({"prompt": "hi", "apply_chat_template": true});
        let JobInput::Native(native) = JobInput::parse(input, &limits()).unwrap() else {
            panic!()
        };
        assert_eq!(
            native.prompt,
            PromptSource::Chat(json!([{"role": "user", "content": "hi"}]))
        );
    }

    #[test]
    fn type_errors_name_the_field_and_value() {
        let err = JobInput::parse(
            json!({"prompt": "x", "sampling_params": {"temperature": "hot"}}),
            &limits(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`temperature` must be a number. Given: \"hot\""
        );
        assert_eq!(err.error_type(), "validation");
    }

    #[test]
    fn rejects_missing_prompt_and_non_object_input() {
        assert!(matches!(
            JobInput::parse(json!({"stream": true}), &limits()),
            Err(JobError::Validation(_))
        ));
        assert!(matches!(
            JobInput::parse(json!("hello"), &limits()),
            Err(JobError::Validation(_))
        ));
    }

    #[test]
    fn prompt_embeds_are_refused_by_name() {
        let err = JobInput::parse(json!({"prompt": "x", "prompt_embeds": "AAAA"}), &limits())
            .unwrap_err();
        assert!(matches!(err, JobError::Validation(_)));
        assert!(err.to_string().contains("`prompt_embeds`"), "{err}");
    }

    #[test]
    fn rejects_known_unsupported_fields_but_ignores_defaults() {
        let err = JobInput::parse(
            json!({"prompt": "x", "sampling_params": {"use_beam_search": true}}),
            &limits(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("use_beam_search"), "{err}");
        let ok = JobInput::parse(
            json!({"prompt": "x", "sampling_params": {"use_beam_search": false, "logit_bias": {}}}),
            &limits(),
        );
        assert!(ok.is_ok());
        let err = JobInput::parse(
            json!({"prompt": "x", "sampling_params": {"guided_json": {"type": "object"}}}),
            &limits(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("guided"), "{err}");
    }

    #[test]
    fn openai_route_is_parsed_and_unknown_routes_are_not_found() {
        let input =
            json!({"openai_route": "/v1/chat/completions", "openai_input": {"messages": []}});
        assert!(matches!(
            JobInput::parse(input, &limits()).unwrap(),
            JobInput::OpenAi {
                route: OpenAiRoute::ChatCompletions,
                ..
            }
        ));
        let err =
            JobInput::parse(json!({"openai_route": "/v1/embeddings"}), &limits()).unwrap_err();
        assert_eq!(err.error_type(), "not_found");
        assert_eq!(
            OpenAiRoute::parse("/openai/v1/models/").unwrap(),
            OpenAiRoute::Models
        );
    }

    #[test]
    fn rejects_out_of_range_batch_sizes() {
        let err =
            JobInput::parse(json!({"prompt": "x", "max_batch_size": 0}), &limits()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`max_batch_size` must be >= 1 and <= 1000000. Given: 0"
        );
        let err = JobInput::parse(
            json!({"prompt": "x", "batch_size_growth_factor": 0.5}),
            &limits(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("`batch_size_growth_factor`"));
    }
}
