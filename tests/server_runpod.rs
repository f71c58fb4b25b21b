//! The dev server's RunPod routes over loopback with a real engine on the tiny Llama fixture: `/run`,
//! `/runsync`, `/status`, `/stream`, `/cancel`, `/retry`, `/purge-queue`, `/health`, job statuses,
//! deadlines and retention.
#![allow(clippy::unwrap_used)]

mod server_support;

use std::time::Duration;

use serde_json::{json, Value};
use server_support::*;

async fn wait_for_status(server: &TestServer, id: &str, expected: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT_BOUND;
    loop {
        let (_, body) = server.get(&format!("/status/{id}")).await;
        if body["status"] == expected {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never reached {expected}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runpod_run_streams_items_then_completes() {
    let server = TestServer::start(Options::default()).await;
    let input = json!({"input": {"prompt": "hello", "stream": true, "sampling_params": {"max_tokens": 20, "ignore_eos": true}}});
    let (status, body) = server.post("/v2/ep/run", &input).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "IN_QUEUE");
    let id = body["id"].as_str().unwrap().to_string();
    let mut items = Vec::new();
    let final_status = loop {
        let (status, body) = server.get(&format!("/v2/ep/stream/{id}")).await;
        assert_eq!(status, 200, "{body}");
        let stream = body["stream"]
            .as_array()
            .expect("`stream` is always present");
        items.extend(stream.iter().map(|item| item["output"].clone()));
        let job_status = body["status"].as_str().unwrap().to_string();
        if job_status == "COMPLETED" && stream.is_empty() {
            break job_status;
        }
        assert!(
            ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].contains(&job_status.as_str()),
            "{body}"
        );
    };
    assert_eq!(final_status, "COMPLETED");
    assert!(
        items.len() > 1,
        "stream: true yields several items: {items:?}"
    );
    let tokens: usize = items
        .iter()
        .map(|i| i["choices"][0]["tokens"].as_array().unwrap().len())
        .sum();
    assert!(tokens > 1);
    let (status, body) = server.get(&format!("/status/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "COMPLETED");
    assert_eq!(
        body["output"].as_array().unwrap(),
        &items,
        "output aggregates the streamed items"
    );
    assert!(
        body["delayTime"].is_u64() && body["executionTime"].is_u64(),
        "{body}"
    );
    // POST works on status too, and the bare route sees the same job.
    let (status, again) = server.post(&format!("/status/{id}"), &json!({})).await;
    assert_eq!((status, &again["output"]), (200, &body["output"]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runsync_answers_output_or_the_queue_status_after_wait() {
    let server = TestServer::start(Options {
        max_num_seqs: 1,
        ..Options::default()
    })
    .await;
    let input = json!({"input": {"prompt": "hello", "sampling_params": {"max_tokens": 4}}});
    let (status, body) = server.post("/runsync", &input).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "COMPLETED", "{body}");
    assert!(
        body["output"][0]["choices"][0]["tokens"].is_array(),
        "{body}"
    );

    let (status, body) = server
        .post(
            "/runsync",
            &json!({"input": {"prompt": "hello", "sampling_params": {"temperature": -3}}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "FAILED", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("temperature"),
        "{body}"
    );

    // With the only run slot taken, the job stays queued past `wait` (clamped up to 1 s).
    let held = server.state.admission().try_admit().unwrap();
    let slot = held.run_slot().await;
    let (status, body) = server.post("/v2/ep/runsync?wait=10", &input).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "IN_QUEUE", "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    drop(slot);
    drop(held);
    wait_for_status(&server, &id, "COMPLETED").await;

    let (status, _) = server.post("/runsync?wait=soon", &input).await;
    assert_eq!(status, 400);
    for bad in [
        json!({}),
        json!({"input": "text"}),
        json!({"input": {}, "policy": {"executionTimeout": -1}}),
    ] {
        let (status, body) = server.post("/run", &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_purge_retry_and_health_follow_the_job_states() {
    let server = TestServer::start(Options {
        max_num_seqs: 1,
        ..Options::default()
    })
    .await;
    let held = server.state.admission().try_admit().unwrap();
    let slot = held.run_slot().await;
    let input = json!({"input": {"prompt": "hello", "sampling_params": {"max_tokens": 3}}});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, body) = server.post("/v2/ep/run", &input).await;
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let (_, health) = server.get("/v2/ep/health").await;
    assert_eq!(health["jobs"]["inQueue"], 3, "{health}");
    assert_eq!(health["workers"]["running"], 1, "{health}");

    let (status, body) = server
        .post(&format!("/v2/ep/cancel/{}", ids[0]), &json!(null))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("CANCELLED")),
        "{body}"
    );
    let (status, body) = server.post("/v2/ep/purge-queue", &json!(null)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"removed": 2, "status": "completed"}));
    for id in &ids {
        assert_eq!(
            server.get(&format!("/status/{id}")).await.1["status"],
            "CANCELLED"
        );
    }
    let (status, _) = server.post("/cancel/unknown-id", &json!(null)).await;
    assert_eq!(status, 404);
    let (status, body) = server
        .post(&format!("/retry/{}", ids[0]), &json!(null))
        .await;
    assert_eq!(status, 400, "only FAILED/TIMED_OUT retry: {body}");
    drop(slot);
    drop(held);

    // A job that fails can be retried under the same id (and fails the same way).
    let (_, body) = server.post("/run", &json!({"input": {"prompt": ""}})).await;
    let failed = body["id"].as_str().unwrap().to_string();
    wait_for_status(&server, &failed, "FAILED").await;
    let (status, body) = server
        .post(&format!("/v2/ep/retry/{failed}"), &json!(null))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("IN_QUEUE")),
        "{body}"
    );
    let body = wait_for_status(&server, &failed, "FAILED").await;
    assert_eq!(body["retries"], 1, "{body}");
    let (_, health) = server.get("/health").await;
    assert_eq!(health["jobs"]["retried"], 1, "{health}");
    assert_eq!(
        health["workers"],
        json!({"idle": 1, "running": 0, "unhealthy": 0}),
        "{health}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_frees_its_sequence() {
    let server = TestServer::start(Options::default()).await;
    let max_tokens = 1900;
    let input = json!({"input": {"prompt": "hello", "stream": true, "sampling_params": {"max_tokens": max_tokens, "ignore_eos": true}}});
    let (_, body) = server.post("/run", &input).await;
    let id = body["id"].as_str().unwrap().to_string();
    // The first streamed item proves it is generating.
    loop {
        let (_, body) = server.get(&format!("/stream/{id}")).await;
        if !body["stream"].as_array().unwrap().is_empty() {
            break;
        }
        assert_eq!(
            body["status"].as_str().map(|s| s.starts_with("IN_")),
            Some(true),
            "{body}"
        );
    }
    let (_, body) = server.post(&format!("/cancel/{id}"), &json!(null)).await;
    assert_eq!(body["status"], "CANCELLED", "{body}");
    server.wait_engine_idle().await;
    assert!(server.engine.stats().generated_tokens_total < max_tokens as u64);
    let body = wait_for_status(&server, &id, "CANCELLED").await;
    assert!(body.get("output").is_none(), "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_evicted_after_retention() {
    let server = TestServer::start(Options {
        retention: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let (_, body) = server
        .post(
            "/run",
            &json!({"input": {"prompt": "hi", "sampling_params": {"max_tokens": 2}}}),
        )
        .await;
    let id = body["id"].as_str().unwrap().to_string();
    wait_for_status(&server, &id, "COMPLETED").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = server.get(&format!("/status/{id}")).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = server.get(&format!("/stream/{id}")).await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_deadline_time_out() {
    let server = TestServer::start(Options {
        max_num_seqs: 1,
        request_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    // With the only run slot held, both requests wait in the queue until their deadline passes.
    let held = server.state.admission().try_admit().unwrap();
    let slot = held.run_slot().await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat("hi", json!({"max_tokens": 2})),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    let (_, body) = server
        .post(
            "/run",
            &json!({"input": {"prompt": "hi", "sampling_params": {"max_tokens": 2}}}),
        )
        .await;
    let id = body["id"].as_str().unwrap().to_string();
    let body = wait_for_status(&server, &id, "TIMED_OUT").await;
    assert!(
        body["error"].as_str().unwrap().contains("deadline"),
        "{body}"
    );
    drop(slot);
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_policy_cuts_a_job_short() {
    // The request deadline (5 min) is far away; only `policy.executionTimeout` (ms) can stop it.
    let server = TestServer::start(Options::default()).await;
    // `policy.executionTimeout` (ms) bounds execution alone: a long generation is cut short.
    let long = json!({
        "input": {"prompt": "hello", "sampling_params": {"max_tokens": 1900, "ignore_eos": true}},
        "policy": {"executionTimeout": 1},
    });
    let (_, body) = server.post("/run", &long).await;
    let id = body["id"].as_str().unwrap().to_string();
    wait_for_status(&server, &id, "TIMED_OUT").await;
    server.wait_engine_idle().await;
    assert!(server.engine.stats().generated_tokens_total < 1900);
    server.stop().await;
}
