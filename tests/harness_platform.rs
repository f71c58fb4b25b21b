//! The harness's public API (`/v2/{endpoint}/...`) over loopback, with the in-process worker and
//! the echo runner behind it.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{fast_settings, start_platform, World};
use serde_json::{json, Value};
use wick::harness::{Faults, JobStatus};

async fn post(url: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client.post(url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn run_status_and_stream_follow_the_public_api() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let base = format!("{}/v2/wick-harness", world.platform.base_url());
    let (status, queued) = post(
        &format!("{base}/run"),
        Some(json!({"input": {"chunks": 3, "delay_ms": 30}})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(queued["status"], "IN_QUEUE");
    let id = queued["id"].as_str().unwrap().to_owned();

    let mut streamed = Vec::new();
    let final_status = loop {
        let (_, polled) = get(&format!("{base}/stream/{id}")).await;
        streamed.extend(
            polled["stream"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["output"].clone()),
        );
        let state = polled["status"].as_str().unwrap().to_owned();
        if state == "COMPLETED" || state == "FAILED" {
            let (_, rest) = get(&format!("{base}/stream/{id}")).await;
            streamed.extend(
                rest["stream"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["output"].clone()),
            );
            break state;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(final_status, "COMPLETED");
    assert_eq!(
        streamed,
        vec![
            json!({"i":0,"text":"echo"}),
            json!({"i":1,"text":"echo"}),
            json!({"i":2,"text":"echo"})
        ]
    );

    let (_, done) = get(&format!("{base}/status/{id}")).await;
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["output"], Value::Array(streamed));
    assert!(done["delayTime"].is_u64() && done["executionTime"].is_u64());
    // POST is accepted on status too (the SDK's dev server uses POST).
    let (status, again) = post(&format!("{base}/status/{id}"), None).await;
    assert_eq!((status, again["status"].as_str()), (200, Some("COMPLETED")));
    world.stop().await;
}

#[tokio::test]
async fn runsync_returns_the_finished_job_and_errors_as_failed() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let base = format!("{}/v2/wick-harness", world.platform.base_url());
    let (status, body) = post(
        &format!("{base}/runsync"),
        Some(json!({"input": {"output": "hi"}})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "COMPLETED");
    assert_eq!(body["output"], "hi");
    let (_, body) = post(
        &format!("{base}/runsync"),
        Some(json!({"input": {"fail": "bad"}})),
    )
    .await;
    assert_eq!(body["status"], "FAILED");
    let report: Value = serde_json::from_str(body["error"].as_str().unwrap()).unwrap();
    assert_eq!(report["error_message"], "bad");
    let (status, _) = post(&format!("{base}/runsync"), Some(json!({"no_input": 1}))).await;
    assert_eq!(status, 400);
    world.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_job_through_job_stop() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let base = format!("{}/v2/wick-harness", world.platform.base_url());
    let (_, queued) = post(
        &format!("{base}/run"),
        Some(json!({"input": {"chunks": 500, "delay_ms": 20}})),
    )
    .await;
    let id = queued["id"].as_str().unwrap().to_owned();
    while world.platform().job(&id).unwrap().stream.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, cancelled) = post(&format!("{base}/cancel/{id}"), None).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("CANCELLED"))
    );
    let report = world.stop().await;
    assert_eq!(report.stopped, 1);
}

#[tokio::test]
async fn health_counts_jobs_and_purge_empties_the_queue() {
    // No worker: jobs stay queued.
    let running = start_platform(Faults::default()).await;
    let base = format!("{}/v2/wick-harness", running.base_url());
    for _ in 0..3 {
        post(&format!("{base}/run"), Some(json!({"input": {}}))).await;
    }
    let (status, health) = get(&format!("{base}/health")).await;
    assert_eq!(status, 200);
    assert_eq!(health["jobs"]["inQueue"], 3);
    assert_eq!(health["workers"], json!({"idle": 0, "running": 0}));
    let (_, purged) = post(&format!("{base}/purge-queue"), None).await;
    assert_eq!(purged, json!({"removed": 3, "status": "completed"}));
    let (_, health) = get(&format!("{base}/health")).await;
    assert_eq!(health["jobs"]["inQueue"], 0);
    let (status, _) = get(&format!("{base}/status/nope")).await;
    assert_eq!(status, 404);
    assert_eq!(running.platform.stats().in_queue, 0);
    assert!(running
        .platform
        .jobs()
        .iter()
        .all(|j| j.status != JobStatus::InQueue));
    running.stop().await;
}
