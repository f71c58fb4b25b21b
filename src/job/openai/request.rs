//! OpenAI request bodies: `/v1/chat/completions` and `/v1/completions`, parsed and validated into
//! [`ChatRequest`] / [`CompletionRequest`]. vLLM's extra sampling fields are accepted; features this
//! worker does not implement are rejected with the field named.

use serde_json::{Map, Value};

use crate::error::JobError;
use crate::job::input::{field, short_json, RawSamplingParams};
use crate::job::validate::{check_json_limits, JobLimits};

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

pub(super) fn invalid(message: String) -> JobError {
    JobError::Validation(message)
}

fn as_object<'a>(body: &'a Value, what: &str) -> Result<&'a Map<String, Value>, JobError> {
    match body {
        Value::Object(map) => Ok(map),
        other => Err(invalid(format!(
            "`{what}` must be a JSON object. Given: {}",
            short_json(other)
        ))),
    }
}

/// Fields OpenAI or vLLM define that this worker does not implement (beyond the sampling ones).
fn reject_unsupported_openai(map: &Map<String, Value>) -> Result<(), JobError> {
    for name in [
        "functions",
        "function_call",
        "documents",
        "prediction",
        "audio",
        "suffix",
        "continue_final_message",
        "echo_prompt",
        "prompt_embeds",
    ] {
        if map
            .get(name)
            .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
        {
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
        Some(Value::Object(options)) => {
            Ok(field::<bool>(options, "include_usage", "a boolean")?.unwrap_or(false))
        }
        Some(other) => Err(invalid(format!(
            "`stream_options` must be an object. Given: {}",
            short_json(other)
        ))),
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
        return Err(invalid(
            "`echo` is not supported on /v1/chat/completions by this worker".into(),
        ));
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
    if let Some(t) = top_logprobs {
        if t < 0 || t as u64 > limits.max_logprobs as u64 {
            return Err(invalid(format!(
                "`top_logprobs` must be >= 0 and <= {}. Given: {t}",
                limits.max_logprobs
            )));
        }
    }
    sampling.logprobs = match (logprobs, top_logprobs) {
        (false, Some(t)) if t > 0 => {
            return Err(invalid(
                "`top_logprobs` requires `logprobs` to be true".into(),
            ));
        }
        (false, _) => None,
        (true, t) => Some(t.unwrap_or(0)),
    };
    if let Some(max) = field::<i64>(map, "max_completion_tokens", "an integer")? {
        if max < 1 {
            return Err(invalid(format!(
                "`max_completion_tokens` must be at least 1. Given: {max}"
            )));
        }
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
        Some(other) => {
            return Err(invalid(format!(
                "`tools` must be a list. Given: {}",
                short_json(other)
            )))
        }
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
            return Err(invalid(format!(
                "`chat_template_kwargs` must be an object. Given: {}",
                short_json(other)
            )))
        }
    };
    Ok(ChatRequest {
        model: model_field(map)?,
        messages,
        sampling,
        stream: field::<bool>(map, "stream", "a boolean")?.unwrap_or(false),
        include_usage: include_usage(map)?,
        tools,
        add_generation_prompt: field::<bool>(map, "add_generation_prompt", "a boolean")?
            .unwrap_or(true),
        enable_thinking,
    })
}

/// Parses and validates a completions body. `prompt` may be a string, a list of strings, a list of
/// token ids, or a list of token-id lists.
///
/// # Errors
/// [`JobError::Validation`] naming the field.
pub fn parse_completion_request(
    body: &Value,
    limits: &JobLimits,
) -> Result<CompletionRequest, JobError> {
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
        items
            .iter()
            .map(|t| t.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect()
    };
    let prompts = match map.get("prompt") {
        None | Some(Value::Null) => return Err(invalid("`prompt` is required".into())),
        Some(Value::String(text)) => vec![CompletionPrompt::Text(text.clone())],
        Some(list @ Value::Array(items)) if items.is_empty() => return Err(bad_prompt(list)),
        Some(list @ Value::Array(items)) => {
            if items.iter().all(Value::is_number) {
                vec![CompletionPrompt::Ids(
                    token_ids(items).ok_or_else(|| bad_prompt(list))?,
                )]
            } else {
                items
                    .iter()
                    .map(|item| match item {
                        Value::String(text) => Ok(CompletionPrompt::Text(text.clone())),
                        Value::Array(ids) if !ids.is_empty() => token_ids(ids)
                            .map(CompletionPrompt::Ids)
                            .ok_or_else(|| bad_prompt(item)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            (
                json!({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]}),
                "`tool_choice`",
            ),
            (
                json!({"messages": msgs, "response_format": {"type": "json_object"}}),
                "`response_format`",
            ),
            (
                json!({"messages": msgs, "top_logprobs": 2}),
                "`top_logprobs` requires",
            ),
            (
                json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
                "`top_logprobs` must be >= 0 and <= 20. Given: 21",
            ),
            (
                json!({"messages": msgs, "chat_template_kwargs": {"tokenize": true}}),
                "`chat_template_kwargs.tokenize`",
            ),
            (
                json!({"messages": msgs, "chat_template": "{{ 1 }}"}),
                "`chat_template`",
            ),
            (
                json!({"messages": msgs, "logit_bias": {"1": 5}}),
                "`logit_bias`",
            ),
            (json!({"messages": msgs, "n": 99}), "`n`"),
            (
                json!({"messages": msgs, "prompt_embeds": "AAAA"}),
                "`prompt_embeds`",
            ),
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
        let ok = parse_chat_request(
            &json!({"messages": msgs, "tools": [{"type": "function"}], "tool_choice": "none"}),
            &limits(),
        );
        assert!(ok.unwrap().tools.is_some());
    }

    #[test]
    fn completion_prompts_take_every_openai_shape() {
        let p = |v: Value| {
            parse_completion_request(&json!({"prompt": v}), &limits()).map(|r| r.prompts)
        };
        assert_eq!(
            p(json!("a")).unwrap(),
            vec![CompletionPrompt::Text("a".into())]
        );
        assert_eq!(
            p(json!([1, 2])).unwrap(),
            vec![CompletionPrompt::Ids(vec![1, 2])]
        );
        assert_eq!(
            p(json!(["a", [3]])).unwrap(),
            vec![
                CompletionPrompt::Text("a".into()),
                CompletionPrompt::Ids(vec![3])
            ]
        );
        assert!(p(json!([])).is_err());
        assert!(p(json!([-1])).is_err());
        assert!(p(json!({"a": 1})).is_err());
        let err = parse_completion_request(&json!({"prompt": ["a", "b"], "n": 9}), &limits())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`prompt` count x `n` must be <= 16. Given: 2 prompts x 9"
        );
        let err = parse_completion_request(&json!({"prompt": "a", "suffix": "z"}), &limits())
            .unwrap_err();
        assert!(err.to_string().contains("`suffix`"));
    }
}
