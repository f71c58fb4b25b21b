//! The dev API server over loopback with a real engine on the tiny Llama fixture: the OpenAI routes
//! (objects, SSE framing, error statuses, disconnect-cancels) and what guards every route (auth on
//! each route of `ROUTES`, body limit, 429, CORS, host check, metrics, shutdown, engine health).
//! The RunPod routes are in `server_runpod.rs`.
#![allow(clippy::unwrap_used)]

mod server_support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use server_support::*;
use wick::server::{Route, ROUTES};

/// A path of `ROUTES` with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{endpoint_id}", "ep")
        .replace("{id}", "no-such-job")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completion_answer_openai_objects() {
    let server = TestServer::start(Options::default()).await;
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat("hello", json!({"max_tokens": 8, "seed": 7})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny-llama");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["choices"][0]["message"]["content"].is_string());
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() <= 8);

    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "The fox", "max_tokens": 5, "temperature": 0, "n": 2, "logprobs": 2, "stop": ["zzz"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(
        choices[0]["text"], choices[1]["text"],
        "greedy choices agree"
    );
    assert!(choices[0]["logprobs"]["top_logprobs"].is_array(), "{body}");

    for path in ["/v1/models", "/v2/ep/openai/v1/models"] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "list");
        assert_eq!(body["data"][0]["id"], "tiny-llama");
    }
    let (status, body) = server
        .post(
            "/v2/ep/openai/v1/chat/completions",
            &chat("hello", json!({"max_tokens": 2})),
        )
        .await;
    assert_eq!(
        (status, &body["object"]),
        (200, &json!("chat.completion")),
        "{body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_is_sse_ending_with_done_and_matches_the_json_answer() {
    let server = TestServer::start(Options::default()).await;
    let request = |stream: bool| {
        chat(
            "hello",
            json!({"max_tokens": 12, "temperature": 0, "stream": stream, "stream_options": {"include_usage": true}}),
        )
    };
    let (_, plain) = server.post("/v1/chat/completions", &request(false)).await;
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&request(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let body = response.text().await.unwrap();
    let payloads = sse_payloads(&body);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    assert_eq!(payloads.iter().filter(|p| *p == "[DONE]").count(), 1);
    let chunks: Vec<Value> = payloads[..payloads.len() - 1]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{body}"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|choice| choice["delta"]["content"].as_str())
        })
        .collect();
    assert_eq!(
        text,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let usage = chunks
        .iter()
        .find(|c| !c["usage"].is_null())
        .expect("a usage chunk with include_usage");
    assert_eq!(usage["usage"], plain["usage"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_openai_objects_with_their_status() {
    let server = TestServer::start(Options {
        max_model_len: 64,
        ..Options::default()
    })
    .await;
    let cases = [
        ("not json", Value::Null, 400),
        ("array body", json!([1, 2]), 400),
        (
            "bad temperature",
            chat("hi", json!({"temperature": -1})),
            422,
        ),
        ("n too large", chat("hi", json!({"n": 1000})), 422),
        ("unknown model", chat("hi", json!({"model": "gpt-9"})), 404),
        // As vLLM's OpenAI server: a prompt longer than the context is a 400, not a 422.
        (
            "prompt too long",
            json!({"prompt": "hello ".repeat(200), "max_tokens": 4}),
            400,
        ),
    ];
    for (what, body, expected) in cases {
        let path = if body.get("prompt").is_some() {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        let request = server
            .client
            .post(server.url(path))
            .header("content-type", "application/json");
        let request = if body.is_null() {
            request.body("{not json")
        } else {
            request.json(&body)
        };
        let (status, body) = read(request.send().await.unwrap()).await;
        assert_eq!(status, expected, "{what}: {body}");
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        assert!(
            error["type"].is_string() && error["code"].is_string(),
            "{what}: {body}"
        );
    }
    // Validation failures on a streaming request keep their status (headers wait for the first item).
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat("hi", json!({"stream": true, "top_p": 7})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = server.get("/v1/nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (status, _) = server.get("/run").await;
    assert_eq!(status, 405);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413_before_parsing() {
    let server = TestServer::start(Options {
        body_limit: 1024,
        ..Options::default()
    })
    .await;
    // Not JSON at all: a parser would say 400, so 413 proves the limit applies first.
    let oversized = "x".repeat(4096);
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/run",
        "/v2/ep/runsync",
    ] {
        let response = server
            .client
            .post(server.url(path))
            .body(oversized.clone())
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_eq!(status, 413, "{path}: {body}");
        assert!(
            body["error"].is_object() || body["error"].is_string(),
            "{path}: {body}"
        );
    }
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"wick_http_requests_total{route="/run",status="413"}"#
        ),
        1.0,
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_admission_answers_429_with_retry_after() {
    let server = TestServer::start(Options {
        max_num_seqs: 1,
        max_waiting: 0,
        ..Options::default()
    })
    .await;
    // Hold the only place: running (1 slot) + waiting (0).
    let held = server.state.admission().try_admit().unwrap();
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat("hi", json!({"max_tokens": 2})),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let response = server
        .client
        .post(server.url("/v2/ep/run"))
        .json(&json!({"input": {"prompt": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, "wick_requests_rejected_overloaded_total"),
        2.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "wick_queue_depth"), 1.0, "{metrics}");
    drop(held);
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat("hi", json!({"max_tokens": 2})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_generation() {
    let server = TestServer::start(Options::default()).await;
    let max_tokens = 1900;
    let body =
        json!({"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream();
    let first = events.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    drop(events);
    server.wait_engine_idle().await;
    let generated = server.engine.stats().generated_tokens_total;
    assert!(
        generated < max_tokens as u64,
        "the sequence ran to the end ({generated} tokens) instead of being cancelled"
    );
    wait_until("the request releases its run slot", || {
        server.state.admission().queue_depth() == 0
    })
    .await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, r#"wick_jobs_finished_total{outcome="cancelled"}"#),
        1.0,
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_but_health_needs_the_bearer_key() {
    let server = TestServer::start(Options {
        api_key: Some("sesame"),
        ..Options::default()
    })
    .await;
    for spec in ROUTES {
        let url = server.url(&concrete(spec.path));
        let request = |auth: Option<&str>| {
            let builder = match spec.method {
                "GET" => server.client.get(&url),
                _ => server.client.post(&url).json(&json!({})),
            };
            match auth {
                Some(value) => builder.header("authorization", value),
                None => builder,
            }
        };
        for wrong in [
            None,
            Some("Bearer nope"),
            Some("Bearer sesame2"),
            Some("Basic sesame"),
        ] {
            let status = request(wrong).send().await.unwrap().status().as_u16();
            if spec.route == Route::Health {
                assert_eq!(status, 200, "{spec:?} is public");
            } else {
                assert_eq!(status, 401, "{spec:?} with {wrong:?}");
            }
        }
        let status = request(Some("Bearer sesame"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_ne!(status, 401, "{spec:?} with the right key");
        assert_ne!(status, 405, "{spec:?} answers its method");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_only_for_configured_origins_and_foreign_hosts_are_refused() {
    let plain = TestServer::start(Options::default()).await;
    let response = plain
        .client
        .get(plain.url("/health"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    // DNS rebinding: a loopback server without a key answers only loopback host names.
    let response = plain
        .client
        .get(plain.url("/v1/models"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    plain.stop().await;

    let server = TestServer::start(Options {
        cors_origins: vec!["https://app.example".into()],
        ..Options::default()
    })
    .await;
    let response = server
        .client
        .get(server.url("/health"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let response = server
        .client
        .get(server.url("/health"))
        .header("origin", "https://other.example")
        .send()
        .await
        .unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_latencies() {
    let server = TestServer::start(Options::default()).await;
    let before = server.metrics().await;
    assert_eq!(
        metric(&before, "wick_generation_tokens_total"),
        0.0,
        "{before}"
    );
    let body = chat(
        "hello",
        json!({"max_tokens": 6, "ignore_eos": true, "stream": true}),
    );
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    sse_payloads(&response.text().await.unwrap());
    let (status, _) = server
        .post(
            "/v1/chat/completions",
            &chat("hello", json!({"max_tokens": 3})),
        )
        .await;
    assert_eq!(status, 200);
    server.wait_engine_idle().await;
    let after = server.metrics().await;
    assert_eq!(
        metric(
            &after,
            r#"wick_http_requests_total{route="/v1/chat/completions",status="200"}"#
        ),
        2.0,
        "{after}"
    );
    assert!(
        metric(&after, "wick_generation_tokens_total") >= 7.0,
        "{after}"
    );
    assert!(metric(&after, "wick_prompt_tokens_total") > 0.0, "{after}");
    assert_eq!(
        metric(&after, "wick_e2e_request_latency_seconds_count"),
        2.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "wick_time_to_first_token_seconds_count"),
        1.0,
        "{after}"
    );
    assert!(
        metric(&after, "wick_inter_token_latency_seconds_count") >= 4.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, r#"wick_jobs_finished_total{outcome="completed"}"#),
        2.0,
        "{after}"
    );
    assert!(
        after.contains("# TYPE wick_kv_cache_usage_ratio gauge"),
        "{after}"
    );
    assert!(after.contains("wick_num_sequences_running 0"), "{after}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_and_the_server() {
    let server = TestServer::start(Options::default()).await;
    let body = json!({"prompt": "hello", "max_tokens": 1900, "ignore_eos": true, "stream": true});
    let response = server
        .client
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream();
    events.next().await.unwrap().unwrap();
    server.shutdown.cancel();
    let mut rest = Vec::new();
    while let Some(chunk) = events.next().await {
        match chunk {
            Ok(bytes) => rest.extend_from_slice(&bytes),
            Err(_) => break,
        }
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(
        rest.ends_with("data: [DONE]\n\n"),
        "the stream ends cleanly: {rest:?}"
    );
    assert!(
        rest.contains(r#""code":"shutting_down""#),
        "an error event says why: {rest:?}"
    );
    server.wait_engine_idle().await;
    assert!(server.engine.stats().generated_tokens_total < 1900);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_stopped_engine() {
    let server = TestServer::start(Options::default()).await;
    server.engine.shutdown().await;
    wait_until("the engine stops", || !server.engine.is_running()).await;
    let (status, body) = server.get("/health").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["workers"]["unhealthy"], 1, "{body}");
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            &chat("hi", json!({"max_tokens": 2})),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("engine is not running"),
        "internals stay in the logs: {body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_client_disconnect_cancels_too() {
    let server = TestServer::start(Options::default()).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let max_tokens = 1900;
    let body = json!({"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": true});
    let sent = impatient
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up before the answer");
    wait_until("the request reached the engine", || {
        server.engine.stats().prompt_tokens_total > 0
    })
    .await;
    server.wait_engine_idle().await;
    let generated = server.engine.stats().generated_tokens_total;
    assert!(generated < max_tokens as u64, "ran to the end: {generated}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, r#"wick_jobs_finished_total{outcome="cancelled"}"#),
        1.0,
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_public_listener_without_a_key() {
    let server = TestServer::start(Options::default()).await;
    let config = wick::config::Config {
        served_model_name: Some("tiny-llama".into()),
        ..wick::config::Config::for_test()
    };
    let ctx = std::sync::Arc::new(wick::job::JobContext::new(server.engine.clone(), &config));
    let public = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let settings = wick::server::ServerSettings::for_test();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = wick::server::run(ctx, settings, public, shutdown)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("API key"), "{err}");
    server.stop().await;
}
