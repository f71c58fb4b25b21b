//! Shared helpers of the job integration tests: one tiny-llama engine per test binary, a job runner
//! that drains the chunk channel like the queue does, and the fixture's reference cases.
#![allow(dead_code)] // Each test crate uses a different subset of these helpers.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wick::config::Config;
use wick::engine::load_engine;
use wick::error::JobError;
use wick::hub::{ModelFiles, WeightFiles};
use wick::job::{run_job, JobContext};

/// The fixture every job test runs on (all its reference cases are reliable to the last token).
pub const FIXTURE: &str = "tiny-llama";
/// Served model name in these tests.
pub const MODEL: &str = "tiny-llama-served";
/// Context length of the test engine.
pub const MAX_MODEL_LEN: usize = 256;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(FIXTURE)
}

/// The job context over a shared engine (started once per test binary; the engine runs on its own
/// thread, so every test's runtime can use it).
pub fn context() -> &'static JobContext {
    static CONTEXT: OnceLock<JobContext> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let dir = fixture_dir();
        let files = ModelFiles {
            config: Some(dir.join("config.json")),
            weights: WeightFiles::Safetensors(vec![dir.join("model.safetensors")]),
            tokenizer_json: Some(dir.join("tokenizer.json")),
            tokenizer_config: Some(dir.join("tokenizer_config.json")),
            generation_config: Some(dir.join("generation_config.json")),
        };
        let config = Config {
            device: "cpu".into(),
            dtype: "f32".into(),
            max_num_seqs: 8,
            max_model_len: Some(MAX_MODEL_LEN),
            max_num_batched_tokens: 128,
            served_model_name: Some(MODEL.into()),
            ..Config::for_test()
        };
        let engine = load_engine(&files, &config).expect("fixture engine starts");
        JobContext::new(engine, &config)
    })
}

/// Runs a job as the queue would: chunks drained concurrently. Returns the result and every chunk.
pub async fn run(input: Value) -> (Result<Value, JobError>, Vec<Value>) {
    run_with(context(), input, CancellationToken::new()).await
}

/// [`run`] with an explicit context and cancellation token.
pub async fn run_with(
    ctx: &JobContext,
    input: Value,
    cancel: CancellationToken,
) -> (Result<Value, JobError>, Vec<Value>) {
    let (sender, mut receiver) = mpsc::channel(4);
    let drain = tokio::spawn(async move {
        let mut chunks = Vec::new();
        while let Some(chunk) = receiver.recv().await {
            chunks.push(chunk);
        }
        chunks
    });
    let result = run_job(ctx, input, sender, cancel).await;
    (result, drain.await.expect("drain task"))
}

/// One reference case of the fixture.
#[derive(Debug, Clone)]
pub struct Case {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub text: String,
    pub messages: Value,
}

/// Reference case `name` (`hello`, `fox`, `unicode`, `long`, `chat`).
pub fn case(name: &str) -> Case {
    let path = fixture_dir().join("reference_generations.json");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(path).expect("reference file")).expect("json");
    let case = reference["cases"]
        .as_array()
        .and_then(|cases| cases.iter().find(|c| c["name"] == name))
        .expect("case exists")
        .clone();
    let ids = |v: &Value| {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|i| i.as_u64().expect("id") as u32)
            .collect()
    };
    Case {
        prompt: case["prompt"].as_str().expect("prompt").to_string(),
        prompt_ids: ids(&case["prompt_ids"]),
        output_ids: ids(&case["output_ids"]),
        text: case["text"].as_str().expect("text").to_string(),
        messages: case["messages"].clone(),
    }
}

/// The error of a failed job, or a panic naming what came back instead.
pub fn expect_err(result: Result<Value, JobError>) -> JobError {
    match result {
        Ok(v) => panic!("expected an error, got {v}"),
        Err(e) => e,
    }
}
