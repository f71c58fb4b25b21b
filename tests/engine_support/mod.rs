//! Shared helpers of the engine integration tests: build an engine from a fixture directory, read
//! the reference generations, and collect a request's events.
#![allow(dead_code)] // Each test crate uses a different subset of these helpers.

use std::path::PathBuf;
use std::time::Duration;

use wick::config::Config;
use wick::engine::{
    load_engine, EngineHandle, GenerateRequest, GeneratedToken, SamplingParams, SeqEvent,
    SeqEvents, SeqSummary,
};
use wick::hub::ModelFiles;

/// The five tiny fixture models.
pub const FAMILIES: [&str; 5] = [
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-phi3",
    "tiny-gemma2",
];

/// Longest any test waits for one request to finish (a bound, not a speed assertion).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(120);

/// Directory of a fixture model.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The resolved files of a fixture model.
pub fn fixture_files(name: &str) -> ModelFiles {
    let dir = fixture_dir(name);
    // The same resolution `MODEL_NAME=<dir>` gets.
    wick::hub::local::resolve_local_dir(&dir).expect("fixture directory resolves")
}

/// Engine settings for tests.
#[derive(Debug, Clone)]
pub struct TestEngine {
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub max_num_batched_tokens: usize,
}

impl Default for TestEngine {
    fn default() -> Self {
        TestEngine {
            max_num_seqs: 8,
            max_model_len: 512,
            max_num_batched_tokens: 64,
        }
    }
}

impl TestEngine {
    /// Starts an f32 CPU engine on fixture `name`.
    pub fn start(&self, name: &str) -> EngineHandle {
        let config = Config {
            device: "cpu".into(),
            dtype: "f32".into(),
            max_num_seqs: self.max_num_seqs,
            max_model_len: Some(self.max_model_len),
            max_num_batched_tokens: self.max_num_batched_tokens,
            ..Config::for_test()
        };
        load_engine(&fixture_files(name), &config).expect("fixture engine starts")
    }
}

/// One reference case of `reference_generations.json`.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub text: String,
    /// Index of the first step whose recorded margin is below 1e-3 (the output may legitimately
    /// differ from there on); `output_ids.len()` when there is none.
    pub reliable_len: usize,
}

/// The reference cases of a fixture.
pub fn reference_cases(name: &str) -> Vec<Case> {
    let raw = std::fs::read(fixture_dir(name).join("reference_generations.json")).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let output_ids = ids(&c["output_ids"]);
            let reliable_len = c["steps"]
                .as_array()
                .unwrap()
                .iter()
                .position(|s| s["margin"].as_f64().unwrap() < 1e-3)
                .unwrap_or(output_ids.len());
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                prompt_ids: ids(&c["prompt_ids"]),
                output_ids,
                text: c["text"].as_str().unwrap().to_string(),
                reliable_len,
            }
        })
        .collect()
}

/// A request with `params`.
pub fn request(id: &str, prompt_ids: &[u32], params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        request_id: id.to_string(),
        prompt_ids: prompt_ids.to_vec(),
        params,
    }
}

/// The reference settings: greedy, 32 new tokens, stop at EOS.
pub fn reference_request(case: &Case) -> GenerateRequest {
    request(&case.name, &case.prompt_ids, SamplingParams::greedy(32))
}

/// Everything one request produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub token_ids: Vec<u32>,
    pub deltas: Vec<String>,
    pub logprobs: Vec<GeneratedToken>,
    pub summary: SeqSummary,
}

impl Output {
    /// The streamed text.
    pub fn text(&self) -> String {
        self.deltas.concat()
    }
}

/// Reads events until `Finished`, within [`REQUEST_DEADLINE`].
pub async fn collect(mut events: SeqEvents) -> Output {
    let mut token_ids = Vec::new();
    let mut deltas = Vec::new();
    let mut logprobs = Vec::new();
    let summary = tokio::time::timeout(REQUEST_DEADLINE, async {
        loop {
            match events
                .recv()
                .await
                .expect("a Finished event before the channel closes")
            {
                SeqEvent::Delta {
                    text,
                    token_ids: ids,
                    logprobs: lps,
                } => {
                    token_ids.extend(ids);
                    deltas.push(text);
                    logprobs.extend(lps);
                }
                SeqEvent::Finished(summary) => return summary,
            }
        }
    })
    .await
    .expect("request finished within the deadline");
    Output {
        token_ids,
        deltas,
        logprobs,
        summary,
    }
}

/// Submits and collects one request.
pub async fn generate(engine: &EngineHandle, request: GenerateRequest) -> Output {
    collect(engine.submit(request).expect("submit accepted")).await
}

/// Waits (bounded) until no sequence is waiting or running.
pub async fn wait_idle(engine: &EngineHandle) {
    let idle = async {
        loop {
            let s = engine.stats();
            if s.running == 0 && s.waiting == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(REQUEST_DEADLINE, idle)
        .await
        .expect("engine went idle");
}
