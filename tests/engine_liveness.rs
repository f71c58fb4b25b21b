//! Engine liveness (S14, S21, Q13) with a real fixture model wrapped in a fault injector: a forward
//! pass that panics or stalls. The engine's health turns, the dev server's `/health` answers 503,
//! and the queue worker fails its in-flight jobs with the reason, stops taking jobs and reports
//! itself unhealthy, without hanging.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use common::{fast_settings, runpod_env, start_platform};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wick::config::Config;
use wick::engine::kv_cache::KvCache;
use wick::engine::{
    EngineConfig, EngineHandle, EngineHealth, GenerateRequest, SamplingParams, SeqEvent,
};
use wick::harness::{Faults, JobStatus, Route};
use wick::hub::ModelFiles;
use wick::job::JobContext;
use wick::models::{CausalLm, ForwardBatch, ModelInfo};

/// What the injector does on its chosen forward call.
enum Fault {
    /// Panics inside the forward pass.
    Panic,
    /// Blocks until the gate opens (at most a minute).
    Stall(Arc<Gate>),
    /// Returns this error, as candle's CUDA backend does when an allocation fails.
    Error(&'static str),
}

/// A latch the stalled forward pass waits on.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let guard = self.open.lock().unwrap();
        let _guard = self
            .opened
            .wait_timeout_while(guard, Duration::from_secs(60), |open| !*open)
            .unwrap();
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// A real model whose `fault_on`-th forward call (1-based) misbehaves.
struct FaultInjector {
    inner: Box<dyn CausalLm>,
    calls: AtomicUsize,
    fault_on: usize,
    fault: Fault,
}

impl CausalLm for FaultInjector {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn forward(
        &self,
        batch: &ForwardBatch<'_>,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call == self.fault_on {
            match &self.fault {
                Fault::Panic => panic!("injected fault in forward call {call}"),
                Fault::Stall(gate) => gate.wait(),
                Fault::Error(message) => return Err(candle_core::Error::Msg((*message).into())),
            }
        }
        self.inner.forward(batch, cache)
    }
}

fn fixture_files() -> ModelFiles {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    // The same resolution `MODEL_NAME=<dir>` gets.
    wick::hub::local::resolve_local_dir(&dir).expect("fixture directory resolves")
}

fn faulty_engine(fault: Fault, fault_on: usize) -> EngineHandle {
    let files = fixture_files();
    let model = wick::models::load(&files, &Device::Cpu, DType::F32).unwrap();
    let tokenizer = wick::engine::loader::load_tokenizer(&files, None).unwrap();
    let model = FaultInjector {
        inner: model,
        calls: AtomicUsize::new(0),
        fault_on,
        fault,
    };
    wick::engine::spawn(
        Box::new(model),
        Arc::new(tokenizer),
        EngineConfig::for_cpu("tiny-llama", 128, 4),
    )
    .unwrap()
}

fn request(engine: &EngineHandle) -> GenerateRequest {
    GenerateRequest {
        request_id: "r".into(),
        prompt_ids: engine.tokenizer().encode("Hello there", true).unwrap(),
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(4)
        },
    }
}

/// Collects a sequence's events until its final summary (at most a minute).
async fn finish(events: &mut wick::engine::SeqEvents) -> wick::engine::SeqSummary {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Some(SeqEvent::Finished(summary)) => return Some(summary),
                Some(SeqEvent::Delta { .. }) => {}
                None => return None,
            }
        }
    })
    .await
    .unwrap()
    .expect("every sequence gets a final event")
}

#[tokio::test]
async fn out_of_memory_in_a_step_fails_that_steps_sequences_and_the_engine_serves_on() {
    // Q12 (GPU OOM in a step), CPU stand-in: the error candle's CUDA backend returns when an
    // allocation fails, injected into the decode pass of two sequences.
    let oom = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\") (injected)";
    let engine = faulty_engine(Fault::Error(oom), 2);
    let mut first = engine.submit(request(&engine)).unwrap();
    let mut second = engine.submit(request(&engine)).unwrap();
    // Every sequence ends; those in the failing pass end with the error (at least one was in it).
    let mut failed = 0;
    for events in [&mut first, &mut second] {
        if let Some(error) = finish(events).await.error {
            assert!(error.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{error}");
            failed += 1;
        }
    }
    assert!(failed >= 1, "the injected OOM failed no sequence");
    // Not fatal: the engine stays healthy, its slots were freed, and the next request completes.
    assert!(
        engine.health().is_healthy(),
        "engine after an OOM step: {:?}",
        engine.health()
    );
    let mut next = engine.submit(request(&engine)).unwrap();
    let summary = finish(&mut next).await;
    assert!(summary.error.is_none(), "{:?}", summary.error);
    assert_eq!(summary.completion_tokens, 4);
}

#[tokio::test]
async fn panic_in_forward_fails_the_sequences_marks_the_engine_failed_and_health_503() {
    let engine = faulty_engine(Fault::Panic, 2);
    let ctx = JobContext::new(engine.clone(), &Config::for_test());
    let settings = wick::server::ServerSettings::from_config(&Config::for_test(), None).unwrap();
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let health_url = format!("http://{}/health", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(wick::server::run(
        Arc::new(ctx),
        settings,
        listener,
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    let before = http.get(&health_url).send().await.unwrap();
    assert_eq!(before.status().as_u16(), 200);

    // Two sequences: the first pass (prefill) works, the second (decode) panics.
    let mut first = engine.submit(request(&engine)).unwrap();
    let mut second = engine.submit(request(&engine)).unwrap();
    for events in [&mut first, &mut second] {
        let error = finish(events).await.error.expect("the sequence failed");
        assert!(error.contains("injected fault"), "{error}");
    }
    match engine.health() {
        EngineHealth::Failed(reason) => assert!(reason.contains("panic"), "{reason}"),
        other => panic!("engine should be failed, is {other:?}"),
    }
    let after = http.get(&health_url).send().await.unwrap();
    assert_eq!(after.status().as_u16(), 503);
    let body: Value = after.json().await.unwrap();
    assert_eq!(body["workers"]["unhealthy"], 1);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn stalled_step_fails_the_queue_jobs_stops_taking_and_reports_unhealthy() {
    let gate = Arc::new(Gate::default());
    let engine = faulty_engine(Fault::Stall(gate.clone()), 1);
    engine.set_step_budget(Duration::from_secs(2));
    let platform = start_platform(Faults::default()).await;
    let id = platform
        .platform
        .submit(json!({"prompt": "Hello there", "sampling_params": {"max_tokens": 4}}));
    let env = runpod_env(&platform);
    let runner = Arc::new(JobContext::new(engine.clone(), &Config::for_test()));
    let shutdown = CancellationToken::new();
    let worker_shutdown = shutdown.clone();
    let worker = tokio::spawn(async move {
        wick::queue::run_worker(&env, runner, fast_settings(), worker_shutdown).await
    });
    // The worker stops on its own (no shutdown signal): the engine is wedged.
    let report = tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker stops by itself when the engine wedges")
        .unwrap()
        .unwrap();
    let failure = report
        .runner_failure
        .clone()
        .expect("the worker names the failure");
    assert!(failure.contains("budget"), "{failure}");
    assert_eq!(report.failed, 1, "{report:?}");

    let job = platform.platform.job(&id).unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    let error: Value = serde_json::from_str(job.error.as_deref().unwrap()).unwrap();
    assert_eq!(error["error_type"], "generation");
    assert!(
        error["error_message"].as_str().unwrap().contains("budget"),
        "{error}"
    );
    assert!(!engine.health().is_healthy());
    let pings = platform.platform.requests_to(Route::Ping);
    assert!(
        pings
            .iter()
            .any(|p| p.query_param("status") == Some("unhealthy")),
        "the platform is told the worker is unhealthy"
    );

    // Once the stalled step returns the engine stays failed (sticky).
    gate.release();
    assert!(!engine.health().is_healthy());
    platform.stop().await;
}

#[tokio::test]
async fn panic_in_forward_fails_the_queue_job_and_the_worker_stops_unhealthy() {
    let engine = faulty_engine(Fault::Panic, 2);
    let platform = start_platform(Faults::default()).await;
    let id = platform.platform.submit(
        json!({"prompt": "Hello there", "sampling_params": {"max_tokens": 4, "ignore_eos": true}}),
    );
    let env = runpod_env(&platform);
    let runner = Arc::new(JobContext::new(engine.clone(), &Config::for_test()));
    let worker = tokio::spawn(async move {
        wick::queue::run_worker(&env, runner, fast_settings(), CancellationToken::new()).await
    });
    let report = tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker stops by itself when the engine fails")
        .unwrap()
        .unwrap();
    let failure = report.runner_failure.clone().expect("the failure is named");
    assert!(failure.contains("panic"), "{failure}");

    let job = platform.platform.job(&id).unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    let error: Value = serde_json::from_str(job.error.as_deref().unwrap()).unwrap();
    assert_eq!(error["error_type"], "generation");
    assert_eq!(error["retryable"], true);
    assert!(
        error["error_message"]
            .as_str()
            .unwrap()
            .contains("injected fault"),
        "{error}"
    );
    platform.stop().await;
}
