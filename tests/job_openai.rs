//! OpenAI routes end to end on the tiny-llama fixture, both as queue jobs (`openai_route` +
//! `openai_input`, worker-vllm's shapes) and through the public functions the dev server calls.
#![allow(clippy::unwrap_used)]

mod job_support;

use job_support::{case, context, expect_err, run, MODEL};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wick::job::openai;

/// Parses the `data:` lines of worker-vllm's raw SSE items back into chunk objects; checks that the
/// stream ends with `[DONE]`.
fn sse_chunks(items: &[Value]) -> Vec<Value> {
    let text: String = items.iter().map(|i| i.as_str().unwrap()).collect();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split("\n\n")
        .filter(|event| !event.is_empty() && *event != "data: [DONE]")
        .map(|event| serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap())
        .collect()
}

/// Collects chunk objects from a direct `run_chat`/`run_completion` call.
async fn collect(receiver: &mut mpsc::Receiver<Value>) -> Vec<Value> {
    let mut chunks = Vec::new();
    while let Ok(chunk) = receiver.try_recv() {
        chunks.push(chunk);
    }
    chunks
}

#[tokio::test]
async fn chat_completion_job_returns_the_openai_object() {
    let chat = case("chat");
    let input = json!({"openai_route": "/v1/chat/completions", "openai_input": {
        "model": MODEL, "messages": chat.messages, "temperature": 0, "max_tokens": 32}});
    let (result, chunks) = run(input).await;
    let output = result.unwrap();
    assert_eq!(output, Value::Array(chunks));
    let response = &output[0];
    assert_eq!(response["object"], "chat.completion");
    assert!(response["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(response["model"], MODEL);
    assert_eq!(
        response["choices"][0]["message"],
        json!({"role": "assistant", "content": chat.text})
    );
    assert_eq!(response["choices"][0]["finish_reason"], "length");
    assert_eq!(response["choices"][0]["logprobs"], Value::Null);
    assert_eq!(
        response["usage"],
        json!({"prompt_tokens": chat.prompt_ids.len(), "completion_tokens": 32, "total_tokens": chat.prompt_ids.len() + 32})
    );
}

#[tokio::test]
async fn chat_stream_job_yields_batched_sse_lines_ending_in_done() {
    let chat = case("chat");
    let input = json!({"openai_route": "/v1/chat/completions", "openai_input": {
        "messages": chat.messages, "temperature": 0, "max_tokens": 32, "stream": true,
        "stream_options": {"include_usage": true}}});
    let (result, items) = run(input).await;
    assert_eq!(result.unwrap(), Value::Array(items.clone()));
    // A role chunk, a delta per token whose text is ready (a token that ends inside a UTF-8
    // character waits for the next), a finish chunk, a usage chunk and [DONE], batched 1, 3, 9, rest.
    let lines: Vec<usize> = items
        .iter()
        .map(|i| i.as_str().unwrap().matches("data: ").count())
        .collect();
    let chunks = sse_chunks(&items);
    assert_eq!(lines[..3], [1, 3, 9]);
    assert_eq!(lines.len(), 4);
    assert_eq!(lines.iter().sum::<usize>(), chunks.len() + 1);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let id = chunks[0]["id"].clone();
    assert!(chunks.iter().all(|c| c["id"] == id));
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, chat.text);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 32);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
}

#[tokio::test]
async fn completion_job_matches_the_reference_and_streams() {
    let hello = case("hello");
    let body = json!({"prompt": hello.prompt, "temperature": 0, "max_tokens": 32});
    let (result, _) = run(json!({"openai_route": "/v1/completions", "openai_input": body})).await;
    let response = &result.unwrap()[0];
    assert_eq!(response["object"], "text_completion");
    assert!(response["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(response["choices"][0]["text"], hello.text);
    assert_eq!(response["usage"]["prompt_tokens"], hello.prompt_ids.len());

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (result, items) =
        run(json!({"openai_route": "/v1/completions", "openai_input": streamed})).await;
    result.unwrap();
    let chunks = sse_chunks(&items);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, hello.text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn completion_max_tokens_defaults_to_16() {
    let (result, _) = run(json!({"openai_route": "/v1/completions", "openai_input": {"prompt": "Hello", "ignore_eos": true}})).await;
    assert_eq!(result.unwrap()[0]["usage"]["completion_tokens"], 16);
}

#[tokio::test]
async fn models_job_lists_the_served_model() {
    let (result, _) = run(json!({"openai_route": "/v1/models"})).await;
    let output = result.unwrap();
    assert_eq!(output[0]["object"], "list");
    assert_eq!(output[0]["data"][0]["id"], MODEL);
    assert_eq!(output[0]["data"][0]["object"], "model");
}

#[tokio::test]
async fn unknown_route_and_model_are_not_found_and_bad_input_is_validation() {
    let err = expect_err(
        run(json!({"openai_route": "/v1/embeddings", "openai_input": {}}))
            .await
            .0,
    );
    assert_eq!(err.error_type(), "not_found");
    let err = expect_err(
        run(json!({"openai_route": "/v1/chat/completions", "openai_input": {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}})).await.0,
    );
    assert_eq!(err.error_type(), "not_found");
    assert!(err.to_string().contains("gpt-4"), "{err}");
    let err = expect_err(run(json!({"openai_route": "/v1/chat/completions", "openai_input": {"messages": [{"role": "user", "content": "hi"}], "top_p": 2}})).await.0);
    assert_eq!(
        err.to_string(),
        "`top_p` must be > 0.0 and <= 1.0. Given: 2"
    );
    let err = expect_err(run(json!({"openai_route": "/v1/chat/completions"})).await.0);
    assert_eq!(err.error_type(), "validation");
    assert_eq!(
        openai::error_object(&err)["error"]["type"],
        "invalid_request_error"
    );
}

#[tokio::test]
async fn run_chat_streams_chunk_objects_with_logprobs_and_n() {
    let ctx = context();
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 4,
        "n": 2, "logprobs": true, "top_logprobs": 2, "stream": true, "ignore_eos": true});
    let request = openai::parse_chat_request(&body, &ctx.limits).unwrap();
    let (sender, mut receiver) = mpsc::channel(64);
    let response = openai::run_chat(ctx, request, &sender, &CancellationToken::new())
        .await
        .unwrap();
    let chunks = collect(&mut receiver).await;
    // Per choice: a role chunk, 4 deltas, a finish chunk.
    assert_eq!(chunks.len(), 12);
    for index in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .collect();
        assert_eq!(mine.len(), 6);
        let deltas: Vec<&Value> = mine
            .iter()
            .filter(|c| c["choices"][0]["logprobs"].is_object())
            .copied()
            .collect();
        assert_eq!(deltas.len(), 4);
        for delta in deltas {
            let content = delta["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap();
            assert_eq!(content.len(), 1);
            assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
            assert_eq!(content[0]["token"], content[0]["top_logprobs"][0]["token"]);
        }
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(response["choices"][index]["message"]["content"], text);
        assert_eq!(
            response["choices"][index]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
    }
    assert_eq!(response["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn run_completion_handles_token_prompts_echo_and_logprobs() {
    let ctx = context();
    let hello = case("hello");
    let (sender, _receiver) = mpsc::channel(64);
    let body = json!({"prompt": [hello.prompt_ids.clone(), hello.prompt], "max_tokens": 3, "temperature": 0, "logprobs": 1});
    let request = openai::parse_completion_request(&body, &ctx.limits).unwrap();
    let response = openai::run_completion(ctx, request, &sender, &CancellationToken::new())
        .await
        .unwrap();
    let choices = response["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    // Token ids and the text that encodes to them give the same greedy output.
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert!(hello.text.starts_with(choices[0]["text"].as_str().unwrap()));
    let logprobs = &choices[0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(logprobs["text_offset"][0], 0);
    assert_eq!(
        response["usage"]["prompt_tokens"],
        2 * hello.prompt_ids.len()
    );

    let body = json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0, "echo": true});
    let request = openai::parse_completion_request(&body, &ctx.limits).unwrap();
    let response = openai::run_completion(ctx, request, &sender, &CancellationToken::new())
        .await
        .unwrap();
    assert!(response["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Hello"));
}

#[tokio::test]
async fn raw_openai_output_off_yields_lists_of_chunk_objects() {
    let mut ctx = context().clone();
    ctx.raw_openai_output = false;
    let input = json!({"openai_route": "/v1/completions", "openai_input": {"prompt": "Hello", "max_tokens": 3, "stream": true}});
    let (result, items) = job_support::run_with(&ctx, input, CancellationToken::new()).await;
    result.unwrap();
    let chunks: Vec<&Value> = items.iter().flat_map(|i| i.as_array().unwrap()).collect();
    // Text deltas then the finish chunk; no [DONE] in this mode.
    assert!(chunks.len() >= 2);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn openai_served_model_name_override_names_the_model_and_the_engine_name_is_accepted() {
    let config = wick::config::Config {
        served_model_name: Some(MODEL.into()),
        openai_served_model_name_override: Some("my-org/renamed".into()),
        ..wick::config::Config::for_test()
    };
    let ctx = wick::job::JobContext::new(context().engine.clone(), &config);
    let (models, _) = job_support::run_with(
        &ctx,
        json!({"openai_route": "/v1/models"}),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(models.unwrap()[0]["data"][0]["id"], "my-org/renamed");
    // The engine's own name (SERVED_MODEL_NAME here) still works in requests.
    let input = json!({"openai_route": "/v1/completions", "openai_input": {"model": MODEL, "prompt": "Hi", "max_tokens": 1}});
    let (result, _) = job_support::run_with(&ctx, input, CancellationToken::new()).await;
    assert_eq!(result.unwrap()[0]["model"], "my-org/renamed");
}

#[tokio::test]
async fn generation_config_defaults_apply_to_openai_routes_only() {
    let dir = tempfile::tempdir().unwrap();
    let generation_config = dir.path().join("generation_config.json");
    std::fs::write(
        &generation_config,
        r#"{"temperature": 0.0, "max_new_tokens": 3}"#,
    )
    .unwrap();
    let files = wick::hub::ModelFiles {
        config: None,
        weights: wick::hub::WeightFiles::Safetensors(Vec::new()),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: Some(generation_config),
    };
    let ctx = context().clone().with_model_files(&files);
    assert_eq!(ctx.openai_defaults.max_new_tokens, Some(3));
    let hello = case("hello");
    // No temperature in the request: the model's 0.0 applies (greedy = the reference), and
    // max_new_tokens caps even an explicit max_tokens.
    let input = json!({"openai_route": "/v1/completions", "openai_input": {"prompt": hello.prompt, "max_tokens": 10}});
    let (result, _) = job_support::run_with(&ctx, input, CancellationToken::new()).await;
    let response = &result.unwrap()[0];
    assert_eq!(response["usage"]["completion_tokens"], 3);
    let text = response["choices"][0]["text"].as_str().unwrap();
    assert!(hello.text.starts_with(text), "{text:?}");
    // The native route keeps vLLM's SamplingParams defaults (worker-vllm does not read the file).
    let input =
        json!({"prompt": "Hello", "sampling_params": {"max_tokens": 10, "ignore_eos": true}});
    let (result, _) = job_support::run_with(&ctx, input, CancellationToken::new()).await;
    assert_eq!(result.unwrap()[0]["usage"]["output"], 10);
}
