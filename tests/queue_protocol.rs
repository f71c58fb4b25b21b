//! The RunPod protocol rules, each against the harness's fake platform over loopback, with the
//! in-process worker and a simple echo runner (no model).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{fast_settings, World, API_KEY, POD_ID};
use serde_json::{json, Value};
use wick::harness::{Faults, JobStatus, Route};

fn error_report(error: &str) -> Value {
    serde_json::from_str(error).unwrap()
}

#[tokio::test]
async fn urls_headers_and_bodies_follow_the_sdk() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let id = world
        .platform()
        .submit(json!({"chunks": 3, "text": "héllo"}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(
        job.output,
        Some(json!([{"i":0,"text":"héllo"},{"i":1,"text":"héllo"},{"i":2,"text":"héllo"}]))
    );

    let takes = world.platform().requests_to(Route::JobTakeBatch);
    let take = takes.first().expect("a batch take (4 free slots)");
    assert_eq!(
        take.path,
        format!("/v2/wick-harness/job-take-batch/{POD_ID}")
    );
    assert_eq!(take.query, "gpu=HARNESS&batch_size=4&job_in_progress=0");
    assert_eq!(
        take.headers.get("authorization").map(String::as_str),
        Some(API_KEY),
        "raw key, no Bearer"
    );
    assert!(take.headers.get("user-agent").unwrap().starts_with("wick/"));
    assert!(
        !take.headers.contains_key("x-request-id"),
        "X-Request-ID is per post, never on job-take"
    );

    let done = world.platform().requests_to(Route::JobDone);
    assert_eq!(done.len(), 1);
    let done = &done[0];
    assert_eq!(
        done.path,
        format!("/v2/wick-harness/job-done/{POD_ID}/{id}")
    );
    assert_eq!(done.query, "gpu=HARNESS&isStream=true");
    assert_eq!(done.headers["authorization"], API_KEY);
    assert_eq!(done.headers["x-request-id"], id);
    assert_eq!(
        done.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(done.headers["charset"], "utf-8");
    assert!(
        done.body.contains("héllo"),
        "non-ASCII is not escaped: {}",
        done.body
    );
    assert_eq!(
        serde_json::from_str::<Value>(&done.body).unwrap(),
        json!({"output": job.output.clone().unwrap()})
    );

    let streams = world.platform().requests_to(Route::JobStream);
    assert_eq!(streams.len(), 3);
    for (k, post) in streams.iter().enumerate() {
        assert_eq!(
            post.path,
            format!("/v2/wick-harness/job-stream/{POD_ID}/{id}")
        );
        assert_eq!(post.query, "gpu=HARNESS&isStream=false");
        assert_eq!(post.headers["x-request-id"], id);
        assert_eq!(
            serde_json::from_str::<Value>(&post.body).unwrap(),
            json!({"output": {"i": k, "text": "héllo"}})
        );
    }
    let report = world.stop().await;
    assert_eq!((report.taken, report.completed, report.failed), (1, 1, 0));
}

#[tokio::test]
async fn single_take_with_in_progress_flag_while_a_job_runs() {
    let settings = wick::queue::WorkerSettings {
        max_concurrency: 2,
        ..fast_settings()
    };
    let world = World::start(settings, Faults::default()).await;
    let id = world
        .platform()
        .submit(json!({"chunks": 4, "delay_ms": 100}));
    // With one of two slots busy the worker asks for one job, flagging the running one.
    let seen = world
        .platform()
        .wait_request(Duration::from_secs(10), |r| {
            r.route == Route::JobTake && r.query.ends_with("job_in_progress=1")
        })
        .await;
    assert!(seen, "no single job-take with job_in_progress=1");
    let take = world
        .platform()
        .requests_to(Route::JobTake)
        .into_iter()
        .next()
        .unwrap();
    assert_eq!(take.path, format!("/v2/wick-harness/job-take/{POD_ID}"));
    assert_eq!(take.query_param("batch_size"), None);
    world.finish(&id).await;
    world.stop().await;
}

#[tokio::test]
async fn batch_take_hands_out_several_jobs_in_one_answer() {
    let platform = common::start_platform(Faults::default()).await;
    let ids: Vec<String> = (0..3)
        .map(|k| platform.platform.submit(json!({"chunks": 1, "text": k})))
        .collect();
    let world = World::start_on(platform, fast_settings());
    for id in &ids {
        assert_eq!(world.finish(id).await.status, JobStatus::Completed);
    }
    let answered: Vec<_> = world
        .platform()
        .requests_to(Route::JobTakeBatch)
        .into_iter()
        .filter(|r| r.status == 200)
        .collect();
    assert_eq!(answered.len(), 1, "all three jobs came in one batch answer");
    assert_eq!(answered[0].query_param("batch_size"), Some("4"));
    assert!(world.platform().jobs().iter().all(|j| j.deliveries == 1));
    let report = world.stop().await;
    assert_eq!(report.completed, 3);
}

#[tokio::test]
async fn take_5xx_and_429_are_retried_then_jobs_flow() {
    let faults = Faults {
        take_script: vec![500, 503, 429, 502],
        ..Faults::default()
    };
    let world = World::start(fast_settings(), faults).await;
    let id = world.platform().submit(json!({"chunks": 1}));
    assert_eq!(world.finish(&id).await.status, JobStatus::Completed);
    let takes: Vec<u16> = world
        .platform()
        .requests()
        .iter()
        .filter(|r| matches!(r.route, Route::JobTake | Route::JobTakeBatch))
        .map(|r| r.status)
        .collect();
    assert_eq!(&takes[..4], &[500, 503, 429, 502]);
    world.stop().await;
}

#[tokio::test]
async fn done_5xx_and_429_are_retried_with_the_same_body() {
    let faults = Faults {
        done_script: vec![500, 429, 503],
        ..Faults::default()
    };
    let world = World::start(fast_settings(), faults).await;
    let id = world.platform().submit(json!({"chunks": 2}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Completed);
    let done = world.platform().requests_to(Route::JobDone);
    assert_eq!(
        done.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![500, 429, 503, 200]
    );
    assert!(
        done.iter().all(|r| r.body == done[0].body),
        "retries carry the identical body"
    );
    world.stop().await;
}

#[tokio::test]
async fn refused_result_is_replaced_by_a_small_error_report() {
    let faults = Faults {
        done_script: vec![400],
        ..Faults::default()
    };
    let world = World::start(fast_settings(), faults).await;
    let id = world.platform().submit(json!({"chunks": 1}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Failed);
    let report = error_report(job.error.as_deref().unwrap());
    assert_eq!(report["error_type"], "result_delivery");
    assert!(report["error_message"].as_str().unwrap().contains("400"));
    assert_eq!(report["retryable"], true);
    let worker = world.stop().await;
    assert_eq!(
        (worker.completed, worker.failed, worker.undelivered),
        (0, 1, 0)
    );
}

#[tokio::test]
async fn exhausted_result_retries_end_in_a_small_error_report() {
    // fast_settings allows 4 attempts: all four fail, then the fallback report goes through.
    let faults = Faults {
        done_script: vec![500, 500, 500, 500],
        ..Faults::default()
    };
    let world = World::start(fast_settings(), faults).await;
    let id = world.platform().submit(json!({"chunks": 1}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Failed);
    let report = error_report(job.error.as_deref().unwrap());
    assert_eq!(report["error_type"], "result_delivery");
    assert!(report["error_message"]
        .as_str()
        .unwrap()
        .contains("failed 4 times"));
    world.stop().await;
}

#[tokio::test]
async fn lost_done_answer_is_retried_and_the_platform_sees_one_result() {
    // 0 = the platform applies the post but the answer is cut off.
    let faults = Faults {
        done_script: vec![0],
        ..Faults::default()
    };
    let world = World::start(fast_settings(), faults).await;
    let id = world.platform().submit(json!({"chunks": 2}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Completed);
    let mut job = world.platform().job(&id).unwrap();
    for _ in 0..500 {
        if job.done_posts >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        job = world.platform().job(&id).unwrap();
    }
    assert_eq!(job.done_posts, 2, "the retry repeats the post");
    assert_eq!(job.conflicting_results, 0, "with the identical body");
    world.stop().await;
}

#[tokio::test]
async fn stream_chunks_are_posted_in_order_before_the_final_result() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let id = world.platform().submit(json!({"chunks": 20}));
    let job = world.finish(&id).await;
    let requests = world.platform().requests();
    let for_job: Vec<_> = requests
        .iter()
        .filter(|r| r.path.ends_with(&format!("/{id}")))
        .collect();
    assert_eq!(for_job.len(), 21);
    for (k, post) in for_job[..20].iter().enumerate() {
        assert_eq!(post.route, Route::JobStream);
        assert_eq!(
            serde_json::from_str::<Value>(&post.body).unwrap()["output"]["i"],
            k
        );
    }
    assert_eq!(for_job[20].route, Route::JobDone);
    assert_eq!(job.stream, job.output.unwrap().as_array().unwrap().clone());
    world.stop().await;
}

#[tokio::test]
async fn failed_stream_posts_never_lose_output() {
    // Every chunk's posts fail (2 attempts each): chunks are skipped, the final result has them all.
    let faults = Faults {
        stream_script: vec![500; 10],
        ..Faults::default()
    };
    let world = World::start(fast_settings(), faults).await;
    let id = world.platform().submit(json!({"chunks": 5}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.output.unwrap().as_array().unwrap().len(), 5);
    assert!(job.stream.is_empty());
    world.stop().await;
}

#[tokio::test]
async fn runner_errors_become_json_error_reports_with_identity() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let id = world
        .platform()
        .submit(json!({"fail": "`n` must be <= 8. Given: 9"}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Failed);
    let report = error_report(job.error.as_deref().unwrap());
    assert_eq!(report["error_type"], "validation");
    assert_eq!(report["error_message"], "`n` must be <= 8. Given: 9");
    assert_eq!(report["worker_id"], POD_ID);
    assert_eq!(report["hostname"], "test-host");
    assert_eq!(report["retryable"], false);
    world.stop().await;
}

#[tokio::test]
async fn non_string_errors_in_outputs_are_json_encoded() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let id = world
        .platform()
        .submit(json!({"output": {"error": ["prompt is a required input."]}}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(
        job.error.as_deref(),
        Some(r#"["prompt is a required input."]"#)
    );
    let id = world
        .platform()
        .submit(json!({"output": {"answer": 42, "refresh_worker": true}}));
    let job = world.finish(&id).await;
    assert_eq!(job.output, Some(json!({"answer": 42})));
    assert!(job.stop_pod);
    world.stop().await;
}

#[tokio::test]
async fn job_stop_cancels_the_named_job_and_posts_nothing() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let long = world
        .platform()
        .submit(json!({"chunks": 200, "delay_ms": 20}));
    let other = world
        .platform()
        .submit(json!({"chunks": 3, "delay_ms": 20}));
    assert!(
        world
            .platform()
            .wait_request(Duration::from_secs(10), |r| r.route == Route::JobStream)
            .await
    );
    world.platform().cancel(&long);
    assert!(
        world
            .platform()
            .wait_request(Duration::from_secs(10), |r| r.route == Route::JobStop
                && r.status == 200)
            .await
    );
    assert_eq!(world.finish(&other).await.status, JobStatus::Completed);
    // The worker drops the job's generation and forgets it: a later heartbeat no longer lists it.
    let stop_answered = world
        .platform()
        .requests_to(Route::JobStop)
        .iter()
        .find(|r| r.status == 200)
        .unwrap()
        .at;
    let long_in_ping = format!("job_id={long}");
    assert!(
        world
            .platform()
            .wait_request(Duration::from_secs(10), |r| r.route == Route::Ping
                && r.at > stop_answered
                && !r.query.contains(&long_in_ping))
            .await
    );
    let job = world.platform().job(&long).unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.done_posts, 0);
    assert!(job.stream.len() < 200, "generation stopped early");
    let report = world.stop().await;
    assert_eq!(report.stopped, 1);
    assert_eq!(report.completed, 1);
}

#[tokio::test]
async fn duplicate_delivery_of_an_in_flight_job_runs_once() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let id = world
        .platform()
        .submit(json!({"chunks": 20, "delay_ms": 50}));
    assert!(
        world
            .platform()
            .wait_request(Duration::from_secs(10), |r| r.route == Route::JobStream)
            .await
    );
    world.platform().redeliver(&id);
    let job = world.finish(&id).await;
    assert_eq!(job.deliveries, 2);
    assert_eq!(job.done_posts, 1);
    assert_eq!(world.runner.runs_of(&id), 1);
    let report = world.stop().await;
    assert_eq!(report.duplicates, 1);
}

#[tokio::test]
async fn duplicates_in_one_batch_run_once() {
    let faults = Faults {
        duplicate_pct: 100.0,
        seed: 9,
        ..Faults::default()
    };
    let world = World::start(fast_settings(), faults).await;
    let id = world
        .platform()
        .submit(json!({"chunks": 2, "delay_ms": 20}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.deliveries, 2);
    assert_eq!(world.runner.runs_of(&id), 1);
    world.stop().await;
}

#[tokio::test]
async fn job_past_its_deadline_fails_with_timeout() {
    let settings = wick::queue::WorkerSettings {
        job_timeout: Duration::from_millis(200),
        ..fast_settings()
    };
    let world = World::start(settings, Faults::default()).await;
    let id = world
        .platform()
        .submit(json!({"chunks": 100, "delay_ms": 50}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(
        error_report(job.error.as_deref().unwrap())["error_type"],
        "timeout"
    );
    world.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_jobs_and_takes_no_more() {
    let world = World::start(fast_settings(), Faults::default()).await;
    let running = world
        .platform()
        .submit(json!({"chunks": 5, "delay_ms": 60}));
    assert!(
        world
            .platform()
            .wait_request(Duration::from_secs(10), |r| r.route == Route::JobStream)
            .await
    );
    let platform = world.platform().clone();
    world.shutdown.cancel();
    // Give the take loop ample time to see the signal (its abort window is 50 ms); a job queued
    // afterwards is never taken.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = platform.submit(json!({"chunks": 1}));
    let report = world.stop().await;
    assert_eq!(platform.job(&running).unwrap().status, JobStatus::Completed);
    assert_eq!(platform.job(&late).unwrap().deliveries, 0);
    assert_eq!(report.taken, 1);
    assert_eq!(report.completed, 1);
    assert_eq!(report.shutdown_failed, 0);
}

#[tokio::test]
async fn shutdown_grace_expiry_reports_unfinished_jobs_failed_and_retryable() {
    let settings = wick::queue::WorkerSettings {
        shutdown_grace: Duration::from_secs(1),
        ..fast_settings()
    };
    let world = World::start(settings, Faults::default()).await;
    let id = world
        .platform()
        .submit(json!({"chunks": 1000, "delay_ms": 50}));
    assert!(
        world
            .platform()
            .wait_request(Duration::from_secs(10), |r| r.route == Route::JobStream)
            .await
    );
    let platform = world.platform().clone();
    let report = world.stop().await;
    let job = platform.job(&id).unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    let error = error_report(job.error.as_deref().unwrap());
    assert_eq!(error["error_type"], "shutting_down");
    assert_eq!(error["retryable"], true);
    assert_eq!(report.shutdown_failed, 1);
}

#[tokio::test]
async fn malformed_take_answers_never_stop_the_loop_and_jobs_with_ids_fail() {
    let faults = Faults {
        take_bodies: vec![
            "<html>bad gateway</html>".into(),
            r#"{"id": "no-input-1"}"#.into(),
            r#"[{"id": "ok-1", "input": {"chunks": 1}}, 7, {"input": {}}]"#.into(),
            "{}".into(),
        ],
        ..Faults::default()
    };
    let platform = common::start_platform(faults).await;
    platform.platform.expect_job("no-input-1");
    platform.platform.expect_job("ok-1");
    let world = World::start_on(platform, fast_settings());
    let bad = world.finish("no-input-1").await;
    assert_eq!(bad.status, JobStatus::Failed);
    let report = error_report(bad.error.as_deref().unwrap());
    assert_eq!(report["error_type"], "validation");
    assert_eq!(
        report["error_message"],
        "Job has missing field(s): id or input."
    );
    assert_eq!(world.finish("ok-1").await.status, JobStatus::Completed);
    // The loop goes on: a normal job after the garbage still runs.
    let id = world.platform().submit(json!({"chunks": 1}));
    assert_eq!(world.finish(&id).await.status, JobStatus::Completed);
    let report = world.stop().await;
    // HTML, a job without input, a number, a job without id, and `{}`.
    assert_eq!(report.malformed, 5);
    assert_eq!(report.completed, 2);
}
