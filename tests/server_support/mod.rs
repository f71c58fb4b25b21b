//! Shared helpers of the dev-server tests: a real engine on a tiny fixture model, the real server on
//! `127.0.0.1:0`, and a few HTTP helpers.
#![allow(dead_code)] // Each test crate uses a different subset of these helpers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wick::config::{Config, Secret};
use wick::engine::{load_engine, EngineHandle};
use wick::hub::ModelFiles;
use wick::job::JobContext;
use wick::server::{AppState, ServerError, ServerSettings};

/// Longest any test waits for something to happen (a bound, not a speed assertion).
pub const WAIT_BOUND: Duration = Duration::from_secs(120);

/// Fixture model used by the server tests.
pub const FIXTURE: &str = "tiny-llama";

/// The resolved files of a fixture model.
pub fn fixture_files(name: &str) -> ModelFiles {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    // The same resolution `MODEL_NAME=<dir>` gets.
    wick::hub::local::resolve_local_dir(&dir).expect("fixture directory resolves")
}

/// What a test server looks like.
#[derive(Debug, Clone)]
pub struct Options {
    pub api_key: Option<&'static str>,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    pub max_waiting: usize,
    pub body_limit: usize,
    pub request_timeout: Duration,
    pub retention: Duration,
    pub cors_origins: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            api_key: None,
            max_num_seqs: 4,
            max_model_len: 2048,
            max_waiting: 16,
            body_limit: 1024 * 1024,
            request_timeout: Duration::from_secs(300),
            retention: Duration::from_secs(600),
            cors_origins: Vec::new(),
        }
    }
}

/// A running server with its engine.
pub struct TestServer {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port`
    pub base: String,
    pub engine: EngineHandle,
    pub shutdown: CancellationToken,
    /// The server's shared state (admission gate, for tests that hold the run slot).
    pub state: Arc<AppState>,
    pub client: reqwest::Client,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// Starts an f32 CPU engine on the fixture and the server on `127.0.0.1:0`.
    pub async fn start(options: Options) -> TestServer {
        let config = Config {
            device: "cpu".into(),
            dtype: "f32".into(),
            max_num_seqs: options.max_num_seqs,
            max_model_len: Some(options.max_model_len),
            max_num_batched_tokens: 64,
            served_model_name: Some("tiny-llama".into()),
            warmup: false,
            ..Config::for_test()
        };
        let engine = load_engine(&fixture_files(FIXTURE), &config).expect("fixture engine starts");
        let ctx = Arc::new(JobContext::new(engine.clone(), &config));
        let settings = ServerSettings {
            api_key: options.api_key.map(Secret::new),
            body_limit: options.body_limit,
            request_timeout: options.request_timeout,
            max_waiting: options.max_waiting,
            retention: options.retention,
            cors_origins: options.cors_origins.clone(),
            ..ServerSettings::for_test()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let (app, state) = wick::server::router(&ctx, settings, shutdown.clone()).unwrap();
        let task = tokio::spawn(wick::server::serve(
            app,
            Arc::clone(&state),
            listener,
            shutdown.clone(),
        ));
        TestServer {
            addr,
            base: format!("http://{addr}"),
            engine,
            shutdown,
            state,
            client: reqwest::Client::builder()
                .timeout(WAIT_BOUND)
                .build()
                .unwrap(),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns status and body (JSON, or a string for non-JSON bodies).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        read(response).await
    }

    /// GETs; returns status and body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        read(response).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits (bounded) until the engine runs no sequence.
    pub async fn wait_engine_idle(&self) {
        wait_until("engine running count drops to 0", || {
            self.engine.stats().running == 0
        })
        .await;
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT_BOUND, task)
                .await
                .expect("server stops")
                .unwrap()
                .unwrap();
        }
        self.engine.shutdown().await;
    }
}

/// A chat completion body for the fixture model with `extra` fields merged in.
pub fn chat(content: &str, extra: Value) -> Value {
    let mut body =
        serde_json::json!({"model": FIXTURE, "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().expect("extra fields are an object") {
        body[k] = v.clone();
    }
    body
}

/// Status and body of a response.
pub async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// Polls `condition` every 10 ms until it holds; panics after [`WAIT_BOUND`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT_BOUND;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A metric's value in Prometheus text (`name{labels}` exactly as rendered), 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Splits an SSE body into its `data:` payloads, checking the framing on the way.
pub fn sse_payloads(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body must end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let payload = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"));
            assert!(!payload.contains('\n'), "one line per event: {event:?}");
            payload.to_string()
        })
        .collect()
}
