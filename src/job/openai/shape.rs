//! OpenAI response shaping: chunk objects (`chat.completion.chunk`, `text_completion`), final
//! response objects, usage, and logprobs in OpenAI's two formats.

use serde_json::{json, Map, Value};

use crate::engine::{GeneratedToken, SeqSummary, StopMatch};

/// vLLM clamps `-inf` log-probabilities to -9999.
fn finite_logprob(lp: f32) -> f64 {
    if lp.is_finite() {
        f64::from(lp)
    } else {
        -9999.0
    }
}

/// Chat logprob entries (`logprobs.content`) for some tokens.
fn chat_logprobs(tokens: &[GeneratedToken]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": finite_logprob(logprob), "bytes": token.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut value = entry(&t.chosen.token, t.chosen.logprob);
            if let Value::Object(map) = &mut value {
                map.insert(
                    "top_logprobs".into(),
                    t.top
                        .iter()
                        .map(|top| entry(&top.token, top.logprob))
                        .collect(),
                );
            }
            value
        })
        .collect();
    json!({"content": content})
}

/// Completions logprobs for some tokens; `offset` is the text offset of the first token.
fn completion_logprobs(tokens: &[GeneratedToken], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut top_logprobs = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.chosen.token.len();
        let mut top = Map::new();
        for candidate in &t.top {
            top.insert(
                candidate.token.clone(),
                json!(finite_logprob(candidate.logprob)),
            );
        }
        top_logprobs.push(Value::Object(top));
    }
    json!({
        "tokens": tokens.iter().map(|t| t.chosen.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| finite_logprob(t.chosen.logprob)).collect::<Vec<_>>(),
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

fn stop_reason_json(summary: &SeqSummary) -> Value {
    match &summary.stop_match {
        Some(StopMatch::Text(s)) => json!(s),
        Some(StopMatch::Token(id)) => json!(id),
        None => Value::Null,
    }
}

/// Which OpenAI object family a run produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavor {
    /// `chat.completion` / `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Completion,
}

/// Per-choice state of an OpenAI run.
#[derive(Debug, Default)]
pub(super) struct OaChoice {
    /// Text so far (echoed prompt included).
    pub(super) text: String,
    /// Per-token logprob details (kept only when logprobs were asked for).
    pub(super) tokens: Vec<GeneratedToken>,
    /// Set when the sequence finished.
    pub(super) summary: Option<SeqSummary>,
    /// Generated tokens so far.
    pub(super) generated: usize,
    /// Text offset of the next token (completions logprobs).
    pub(super) offset: usize,
}

/// Everything a run needs to shape chunks and the final object.
pub(super) struct OaRun<'a> {
    /// Chat or completion objects.
    pub(super) flavor: Flavor,
    /// Response id, shared by every chunk.
    pub(super) id: String,
    /// Unix seconds, shared by every chunk.
    pub(super) created: u64,
    /// Served model name.
    pub(super) model: &'a str,
    /// `stream_options.include_usage`: `"usage": null` on every chunk, then a usage chunk.
    pub(super) include_usage: bool,
    /// Shape `logprobs` (else `null`).
    pub(super) with_logprobs: bool,
    /// Prompt tokens over all prompts (counted once per prompt, not per `n`).
    pub(super) prompt_tokens: usize,
}

impl OaRun<'_> {
    pub(super) fn chunk(&self, choice: Value) -> Value {
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        let mut chunk = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]});
        if self.include_usage {
            if let Value::Object(map) = &mut chunk {
                map.insert("usage".into(), Value::Null);
            }
        }
        chunk
    }

    pub(super) fn delta_chunk(
        &self,
        index: usize,
        text: &str,
        tokens: &[GeneratedToken],
        offset: usize,
    ) -> Value {
        let logprobs = if self.with_logprobs {
            match self.flavor {
                Flavor::Chat => chat_logprobs(tokens),
                Flavor::Completion => completion_logprobs(tokens, offset),
            }
        } else {
            Value::Null
        };
        match self.flavor {
            Flavor::Chat => self.chunk(json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})),
            Flavor::Completion => self.chunk(json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null})),
        }
    }

    pub(super) fn role_chunk(&self, index: usize) -> Value {
        self.chunk(json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
    }

    pub(super) fn finish_chunk(&self, index: usize, summary: &SeqSummary) -> Value {
        let reason = summary.finish_reason.to_string();
        match self.flavor {
            Flavor::Chat => self.chunk(json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason_json(summary)})),
            Flavor::Completion => self.chunk(json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason_json(summary)})),
        }
    }

    pub(super) fn usage_chunk(&self, completion_tokens: usize) -> Value {
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [],
            "usage": usage_json(self.prompt_tokens, completion_tokens)})
    }

    pub(super) fn response(&self, choices: &[OaChoice]) -> Value {
        let completion_tokens: usize = choices.iter().map(|c| c.generated).sum();
        let shaped: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let finish = c.summary.as_ref().map(|s| s.finish_reason.to_string());
                let stop_reason = c.summary.as_ref().map(stop_reason_json).unwrap_or(Value::Null);
                match self.flavor {
                    Flavor::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": if self.with_logprobs { chat_logprobs(&c.tokens) } else { Value::Null },
                        "finish_reason": finish,
                        "stop_reason": stop_reason,
                    }),
                    Flavor::Completion => {
                        // `echo` with `logprobs` is refused, so offsets start at 0.
                        json!({
                            "index": index,
                            "text": c.text,
                            "logprobs": if self.with_logprobs { completion_logprobs(&c.tokens, 0) } else { Value::Null },
                            "finish_reason": finish,
                            "stop_reason": stop_reason,
                        })
                    }
                }
            })
            .collect();
        let object = match self.flavor {
            Flavor::Chat => "chat.completion",
            Flavor::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": shaped,
            "usage": usage_json(self.prompt_tokens, completion_tokens)})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TokenLogprob;

    #[test]
    fn logprob_shapes_follow_openai() {
        let t = |id: u32, s: &str, lp: f32| TokenLogprob {
            token_id: id,
            token: s.into(),
            logprob: lp,
        };
        let tokens = vec![
            GeneratedToken {
                chosen: t(1, "Hi", -0.25),
                top: vec![t(1, "Hi", -0.25), t(2, "Yo", -2.0)],
            },
            GeneratedToken {
                chosen: t(3, "!", f32::NEG_INFINITY),
                top: vec![],
            },
        ];
        assert_eq!(
            chat_logprobs(&tokens),
            json!({"content": [
                {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
                    {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}, {"token": "Yo", "logprob": -2.0, "bytes": [89, 111]}]},
                {"token": "!", "logprob": -9999.0, "bytes": [33], "top_logprobs": []}]})
        );
        assert_eq!(
            completion_logprobs(&tokens, 5),
            json!({"tokens": ["Hi", "!"], "token_logprobs": [-0.25, -9999.0],
                "top_logprobs": [{"Hi": -0.25, "Yo": -2.0}, {}], "text_offset": [5, 7]})
        );
    }
}
