//! Native (worker-vllm) jobs end to end on the tiny-llama fixture: prompt and messages against the
//! transformers reference, stream chunk batching, n > 1, logprobs, cancellation and every
//! validation error.
#![allow(clippy::unwrap_used)]

mod job_support;

use std::time::Duration;

use job_support::{case, context, expect_err, run, MAX_MODEL_LEN};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wick::error::JobError;

fn tokens_of(item: &Value, choice: usize) -> Vec<String> {
    item["choices"][choice]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn native_prompt_greedy_output_matches_the_reference() {
    let hello = case("hello");
    let input =
        json!({"prompt": hello.prompt, "sampling_params": {"temperature": 0, "max_tokens": 32}});
    let (result, chunks) = run(input).await;
    let output = result.unwrap();
    // Non-stream: one yielded item, streamed once and aggregated in the final output.
    assert_eq!(output, Value::Array(chunks.clone()));
    assert_eq!(chunks.len(), 1);
    let item = &chunks[0];
    assert_eq!(tokens_of(item, 0), vec![hello.text.clone()]);
    assert_eq!(item["choices"][0]["finish_reason"], "length");
    assert_eq!(
        item["usage"],
        json!({"input": hello.prompt_ids.len(), "output": 32})
    );
}

#[tokio::test]
async fn native_max_tokens_defaults_to_100_clamped_to_the_context() {
    let hello = case("hello");
    let (result, _) = run(
        json!({"prompt": hello.prompt, "sampling_params": {"temperature": 0, "ignore_eos": true}}),
    )
    .await;
    let output = result.unwrap();
    assert_eq!(output[0]["usage"]["output"], 100);
    // A long prompt leaves less than 100 tokens: the default shrinks instead of failing.
    let tokenizer = context().engine.tokenizer();
    let long_prompt = (1..)
        .map(|n| "word ".repeat(n))
        .find(|p| tokenizer.encode(p, true).unwrap().len() >= MAX_MODEL_LEN - 60)
        .unwrap();
    let (result, _) = run(
        json!({"prompt": long_prompt, "sampling_params": {"temperature": 0, "ignore_eos": true}}),
    )
    .await;
    let output = result.unwrap();
    let input_tokens = output[0]["usage"]["input"].as_u64().unwrap() as usize;
    assert!(
        input_tokens + 100 > MAX_MODEL_LEN,
        "prompt must leave less than 100 tokens: {input_tokens}"
    );
    assert_eq!(
        output[0]["usage"]["output"].as_u64().unwrap() as usize,
        MAX_MODEL_LEN - input_tokens
    );
}

#[tokio::test]
async fn messages_are_rendered_with_the_chat_template() {
    let chat = case("chat");
    let input =
        json!({"messages": chat.messages, "sampling_params": {"temperature": 0, "max_tokens": 32}});
    let (result, _) = run(input).await;
    let output = result.unwrap();
    assert_eq!(tokens_of(&output[0], 0), vec![chat.text.clone()]);
    assert_eq!(output[0]["usage"]["input"], chat.prompt_ids.len());
}

#[tokio::test]
async fn apply_chat_template_wraps_the_prompt_as_a_user_turn() {
    let (plain, _) =
        run(json!({"prompt": "Hi", "sampling_params": {"temperature": 0, "max_tokens": 1}})).await;
    let (templated, _) = run(json!({"prompt": "Hi", "apply_chat_template": true, "sampling_params": {"temperature": 0, "max_tokens": 1}})).await;
    let plain_input = plain.unwrap()[0]["usage"]["input"].as_u64().unwrap();
    let templated_input = templated.unwrap()[0]["usage"]["input"].as_u64().unwrap();
    assert!(
        templated_input > plain_input + 5,
        "{templated_input} vs {plain_input}"
    );
}

#[tokio::test]
async fn stream_chunks_grow_one_three_nine_and_concatenate_to_the_reference() {
    let hello = case("hello");
    let input = json!({"prompt": hello.prompt, "stream": true, "sampling_params": {"temperature": 0, "max_tokens": 32}});
    let (result, chunks) = run(input).await;
    let output = result.unwrap();
    assert_eq!(output, Value::Array(chunks.clone()));
    let sizes: Vec<usize> = chunks.iter().map(|c| tokens_of(c, 0).len()).collect();
    assert_eq!(sizes, vec![1, 3, 9, 19]);
    let outputs: Vec<u64> = chunks
        .iter()
        .map(|c| c["usage"]["output"].as_u64().unwrap())
        .collect();
    assert_eq!(outputs, vec![1, 4, 13, 32]);
    assert!(chunks
        .iter()
        .all(|c| c["usage"]["input"] == hello.prompt_ids.len()));
    let text: String = chunks.iter().flat_map(|c| tokens_of(c, 0)).collect();
    assert_eq!(text, hello.text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(chunks[..3]
        .iter()
        .all(|c| c["choices"][0].get("finish_reason").is_none()));
}

#[tokio::test]
async fn per_job_batch_settings_override_the_defaults() {
    let input = json!({"prompt": "Hello", "stream": true, "max_batch_size": 4, "min_batch_size": 2, "batch_size_growth_factor": 2,
        "sampling_params": {"temperature": 0, "max_tokens": 12, "ignore_eos": true}});
    let (result, chunks) = run(input).await;
    result.unwrap();
    let sizes: Vec<usize> = chunks.iter().map(|c| tokens_of(c, 0).len()).collect();
    assert_eq!(sizes, vec![2, 4, 4, 2]);
}

#[tokio::test]
async fn n_two_returns_two_choices_and_seeded_runs_repeat() {
    let input = json!({"prompt": "Hello", "sampling_params": {"n": 2, "temperature": 1.0, "seed": 11, "max_tokens": 8, "ignore_eos": true}});
    let (first, _) = run(input.clone()).await;
    let (second, _) = run(input).await;
    let first = first.unwrap();
    assert_eq!(first, second.unwrap());
    let item = &first[0];
    assert_eq!(item["choices"].as_array().unwrap().len(), 2);
    assert_eq!(item["usage"]["output"], 16);
    // Seeds differ per choice (seed, seed + 1), so the samples differ.
    assert_ne!(tokens_of(item, 0), tokens_of(item, 1));
    for choice in 0..2 {
        assert_eq!(item["choices"][choice]["finish_reason"], "length");
    }
}

#[tokio::test]
async fn n_two_streams_both_choices_in_each_chunk() {
    let input = json!({"prompt": "Hello", "stream": true, "sampling_params": {"n": 2, "temperature": 0, "max_tokens": 6, "ignore_eos": true}});
    let (result, chunks) = run(input).await;
    result.unwrap();
    assert!(chunks
        .iter()
        .all(|c| c["choices"].as_array().unwrap().len() == 2));
    let total: usize = chunks
        .iter()
        .map(|c| tokens_of(c, 0).len() + tokens_of(c, 1).len())
        .sum();
    assert_eq!(total, 12);
    let text = |i| {
        chunks
            .iter()
            .flat_map(|c| tokens_of(c, i))
            .collect::<String>()
    };
    // Greedy: both choices are the same text.
    assert_eq!(text(0), text(1));
    assert_eq!(chunks.last().unwrap()["usage"]["output"], 12);
}

#[tokio::test]
async fn logprobs_come_per_token_with_the_requested_alternatives() {
    let hello = case("hello");
    let input = json!({"prompt": hello.prompt, "sampling_params": {"temperature": 0, "max_tokens": 5, "logprobs": 3}});
    let (result, _) = run(input).await;
    let output = result.unwrap();
    let logprobs = output[0]["choices"][0]["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), 5);
    for (step, entry) in logprobs.iter().enumerate() {
        assert_eq!(entry["token_id"], hello.output_ids[step]);
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token_id"], entry["token_id"]);
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }
}

#[tokio::test]
async fn stop_string_ends_with_finish_reason_stop() {
    let hello = case("hello");
    // The reference text starts with ".e Listious"; stop at "Listious".
    assert!(hello.text.starts_with(".e Listious"));
    let input = json!({"prompt": hello.prompt, "sampling_params": {"temperature": 0, "max_tokens": 32, "stop": ["Listious"]}});
    let (result, _) = run(input).await;
    let output = result.unwrap();
    assert_eq!(tokens_of(&output[0], 0), vec![".e ".to_string()]);
    assert_eq!(output[0]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn cancel_after_the_first_chunk_ends_the_job_as_cancelled() {
    let (sender, mut receiver) = tokio::sync::mpsc::channel(1);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let input = json!({"prompt": "Hello", "stream": true, "sampling_params": {"temperature": 0, "max_tokens": 200, "ignore_eos": true}});
    let job =
        tokio::spawn(async move { wick::job::run_job(context(), input, sender, cancel).await });
    let first = tokio::time::timeout(Duration::from_secs(60), receiver.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tokens_of(&first, 0).len(), 1);
    trigger.cancel();
    // Keep draining so the job is never blocked on a full channel.
    let drain = tokio::spawn(async move { while receiver.recv().await.is_some() {} });
    let result = tokio::time::timeout(Duration::from_secs(60), job)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(result, Err(JobError::Cancelled)), "{result:?}");
    drain.await.unwrap();
}

#[tokio::test]
async fn dropping_the_chunk_receiver_cancels_the_job() {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    drop(receiver);
    let input = json!({"prompt": "Hello", "stream": true, "sampling_params": {"max_tokens": 50}});
    let result = wick::job::run_job(context(), input, sender, CancellationToken::new()).await;
    assert!(matches!(result, Err(JobError::Cancelled)), "{result:?}");
}

#[tokio::test]
async fn every_validation_error_names_field_limit_and_value() {
    let too_long = "word ".repeat(400);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"prompt": "x", "sampling_params": {"top_p": 1.5}}),
            "`top_p` must be > 0.0 and <= 1.0. Given: 1.5",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"temperature": -0.5}}),
            "`temperature` must be >= 0.0 and <= 100.0. Given: -0.5",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"top_k": -3}}),
            "`top_k` must be -1 (disable), 0 (disable) or at least 1. Given: -3",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"min_p": 1.5}}),
            "`min_p` must be >= 0.0 and <= 1.0. Given: 1.5",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"repetition_penalty": 0}}),
            "`repetition_penalty` must be > 0.0 and <= 100.0. Given: 0",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"presence_penalty": 2.5}}),
            "`presence_penalty` must be >= -2.0 and <= 2.0. Given: 2.5",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"frequency_penalty": -3}}),
            "`frequency_penalty` must be >= -2.0 and <= 2.0. Given: -3",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"n": 17}}),
            "`n` must be >= 1 and <= 16. Given: 17",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"logprobs": 21}}),
            "`logprobs` must be >= 0 and <= 20. Given: 21",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"max_tokens": 0}}),
            "`max_tokens` must be at least 1. Given: 0",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"max_tokens": 1000}}),
            "`prompt` tokens + `max_tokens` must be <= 256. Given: ",
        ),
        (
            json!({"prompt": too_long}),
            "`prompt` must have less than 256 tokens. Given: ",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"stop": vec!["a"; 17]}}),
            "`stop` supports up to 16 stop sequences. Given: 17",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"stop": "y".repeat(300)}}),
            "`stop` strings must be at most 256 bytes. Given: 300 bytes",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"stop_token_ids": [999999]}}),
            "`stop_token_ids` must be >= 0 and < ",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"min_tokens": 10, "max_tokens": 5}}),
            "`min_tokens` must be <= `max_tokens`. Given: 10 `min_tokens` and 5 `max_tokens`",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"best_of": 3}}),
            "`best_of` != `n` is not supported",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"use_beam_search": true}}),
            "`use_beam_search`: beam search is not supported",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"guided_json": {"type": "object"}}}),
            "`guided_json`: guided decoding is not supported",
        ),
        (
            json!({"prompt": "x", "sampling_params": {"temperature": "warm"}}),
            "`temperature` must be a number. Given: \"warm\"",
        ),
        (
            json!({"prompt": "x", "sampling_params": [1]}),
            "`sampling_params` must be an object. Given: [1]",
        ),
        (json!({"prompt": ""}), "`prompt` cannot be empty"),
        (json!({"prompt": 5}), "`prompt` must be a string. Given: 5"),
        (json!({"stream": true}), "`input` must contain `prompt`"),
        (json!({"messages": []}), "`messages` cannot be empty"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            "`messages[0].content[0]`: content type \"image_url\" is not supported",
        ),
        (
            json!({"messages": [{"content": "hi"}]}),
            "`messages[0].role` must be a non-empty string",
        ),
        (
            json!({"prompt": "x", "max_batch_size": 0}),
            "`max_batch_size` must be >= 1 and <= 1000000. Given: 0",
        ),
        (json!("just a string"), "`input` must be a JSON object"),
    ];
    for (input, expected) in cases {
        let (result, chunks) = run(input.clone()).await;
        let err = expect_err(result);
        assert_eq!(err.error_type(), "validation", "{input}: {err}");
        assert!(
            err.to_string().starts_with(expected),
            "{input}\n got: {err}\nwant: {expected}"
        );
        assert!(
            chunks.is_empty(),
            "{input}: nothing is streamed before validation passes"
        );
    }
    let mut deep = json!("x");
    for _ in 0..80 {
        deep = json!([deep]);
    }
    let err = expect_err(run(json!({"prompt": "x", "extra": deep})).await.0);
    assert!(
        err.to_string()
            .starts_with("`input` must be nested at most 64 levels deep"),
        "{err}"
    );
}

#[tokio::test]
async fn a_job_past_its_deadline_fails_with_timeout() {
    let mut ctx = context().clone();
    // A zero deadline has passed before the first event can arrive.
    ctx.request_timeout = Duration::ZERO;
    let input = json!({"prompt": "Hello", "sampling_params": {"max_tokens": 50}});
    let (result, chunks) = job_support::run_with(&ctx, input, CancellationToken::new()).await;
    let err = expect_err(result);
    assert_eq!(err.error_type(), "timeout", "{err}");
    assert!(chunks.is_empty());
}
