//! Opt-in: a chat job and an OpenAI chat request on the real SmolLM2-135M-Instruct GGUF, whose chat
//! template comes from the GGUF metadata and is rendered by our minijinja environment. Skipped, with
//! a message, when `models/SmolLM2-135M-Instruct.Q4_1.gguf` is absent (tests/fixtures/README.md says
//! how to get it).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wick::config::Config;
use wick::engine::load_engine;
use wick::hub::{ModelFiles, WeightFiles};
use wick::job::{openai, run_job, JobContext};

fn smollm2() -> Option<JobContext> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipped: {} not found", path.display());
        return None;
    }
    let files = ModelFiles {
        config: None,
        weights: WeightFiles::Gguf(path),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: None,
    };
    let config = Config {
        device: "cpu".into(),
        max_num_seqs: 2,
        max_model_len: Some(256),
        served_model_name: Some("smollm2".into()),
        ..Config::for_test()
    };
    let engine = load_engine(&files, &config).unwrap();
    Some(JobContext::new(engine, &config))
}

#[tokio::test]
async fn smollm2_answers_a_chat_job_and_an_openai_request() {
    let Some(ctx) = smollm2() else { return };
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);

    let (sender, mut receiver) = mpsc::channel(16);
    let drain = tokio::spawn(async move { while receiver.recv().await.is_some() {} });
    let input =
        json!({"messages": messages, "sampling_params": {"temperature": 0, "max_tokens": 24}});
    let output = run_job(&ctx, input, sender, CancellationToken::new())
        .await
        .unwrap();
    drain.await.unwrap();
    let text = output[0]["choices"][0]["tokens"][0].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(output[0]["choices"][0]["finish_reason"], "stop", "{output}");

    let body =
        json!({"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 24});
    let request = openai::parse_chat_request(&body, &ctx.limits).unwrap();
    let (sender, _receiver) = mpsc::channel(1);
    let response = openai::run_chat(&ctx, request, &sender, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(response["choices"][0]["message"]["content"], text);
}
