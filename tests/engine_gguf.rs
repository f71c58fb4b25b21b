//! Opt-in: the real SmolLM2-135M-Instruct Q4_1 GGUF through the whole engine (tokenizer from the
//! GGUF metadata, re-quantized weights, greedy decode). Skipped, with a message, when
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` is absent (see tests/fixtures/README.md to get it).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use wick::config::Config;
use wick::engine::{load_engine, FinishReason, GenerateRequest, SamplingParams, SeqEvent};
use wick::hub::{ModelFiles, WeightFiles};

#[tokio::test]
async fn smollm2_gguf_answers_the_capital_of_france() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipped: {} not found", path.display());
        return;
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
        ..Config::for_test()
    };
    let engine = load_engine(&files, &config).unwrap();
    let tokenizer = engine.tokenizer();
    assert!(
        !tokenizer.eos_token_ids.is_empty(),
        "EOS from the GGUF metadata"
    );
    // SmolLM2's ChatML layout, written out so this test does not depend on the template renderer.
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let prompt_ids = tokenizer.encode(prompt, false).unwrap();
    let request = GenerateRequest {
        request_id: "france".into(),
        prompt_ids,
        params: SamplingParams::greedy(24),
    };
    let mut events = engine.submit(request).unwrap();
    let mut text = String::new();
    let summary = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            match events.recv().await.unwrap() {
                SeqEvent::Delta { text: t, .. } => text.push_str(&t),
                SeqEvent::Finished(s) => return s,
            }
        }
    })
    .await
    .unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(
        summary.finish_reason,
        FinishReason::Stop,
        "ends at <|im_end|>: {text:?}"
    );
}
