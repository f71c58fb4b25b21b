//! Engine behaviour on a tiny fixture (f32, CPU): seeded sampling, cancellation, queueing when the
//! cache is full, over-long prompts, stop strings, multi-byte streaming, logprobs, max_tokens,
//! min_tokens and shutdown.
#![allow(clippy::unwrap_used)]

mod engine_support;

use engine_support::{
    collect, generate, reference_cases, request, wait_idle, TestEngine, REQUEST_DEADLINE,
};
use wick::engine::{EngineError, FinishReason, SamplingParams, SeqEvent, StopMatch};

const FAMILY: &str = "tiny-llama";

fn seeded() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: Some(42),
        max_tokens: 24,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

#[tokio::test]
async fn seeded_sampling_is_reproducible_whatever_the_batch_mates() {
    let cases = reference_cases(FAMILY);
    let engine = TestEngine::default().start(FAMILY);
    let alone = generate(&engine, request("seeded", &cases[1].prompt_ids, seeded())).await;
    assert_eq!(alone.token_ids.len(), 24);

    // Same request among different mates (other prompts, other seeds, greedy), arriving mid-stream.
    let mut mates = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let params = SamplingParams {
            seed: Some(1000 + i as u64),
            temperature: 1.0,
            ..seeded()
        };
        mates.push(
            engine
                .submit(request("mate", &case.prompt_ids, params))
                .unwrap(),
        );
    }
    mates.push(
        engine
            .submit(request(
                "greedy-mate",
                &cases[0].prompt_ids,
                SamplingParams::greedy(30),
            ))
            .unwrap(),
    );
    let target = engine
        .submit(request("seeded", &cases[1].prompt_ids, seeded()))
        .unwrap();
    let together = collect(target).await;
    for rx in mates {
        collect(rx).await;
    }
    assert_eq!(together.token_ids, alone.token_ids);
    assert_eq!(together.text(), alone.text());

    // A different seed gives a different sample (24 tokens at temperature 0.8: a collision is
    // astronomically unlikely).
    let other = generate(
        &engine,
        request(
            "other",
            &cases[1].prompt_ids,
            SamplingParams {
                seed: Some(7),
                ..seeded()
            },
        ),
    )
    .await;
    assert_ne!(other.token_ids, alone.token_ids);
}

#[tokio::test]
async fn dropped_receiver_frees_its_slot_for_the_next_request() {
    let cases = reference_cases(FAMILY);
    let engine = TestEngine {
        max_num_seqs: 1,
        ..TestEngine::default()
    }
    .start(FAMILY);
    let long = SamplingParams {
        max_tokens: 400,
        ignore_eos: true,
        ..SamplingParams::greedy(400)
    };
    let mut first = engine
        .submit(request("cancelled", &cases[0].prompt_ids, long))
        .unwrap();
    assert!(matches!(first.recv().await, Some(SeqEvent::Delta { .. })));
    drop(first);
    // With one slot, this can only finish once the cancelled sequence's slot is free again.
    let second = generate(
        &engine,
        request("next", &cases[1].prompt_ids, SamplingParams::greedy(5)),
    )
    .await;
    assert_eq!(second.summary.finish_reason, FinishReason::Length);
    assert_eq!(second.token_ids.len(), 5);
    wait_idle(&engine).await;
    assert!(
        engine.stats().generated_tokens_total < 400,
        "the cancelled sequence kept generating"
    );
}

#[tokio::test]
async fn full_cache_queues_requests_instead_of_failing() {
    let cases = reference_cases(FAMILY);
    let engine = TestEngine {
        max_num_seqs: 2,
        ..TestEngine::default()
    }
    .start(FAMILY);
    let receivers: Vec<_> = cases
        .iter()
        .map(|c| {
            engine
                .submit(request(&c.name, &c.prompt_ids, SamplingParams::greedy(8)))
                .unwrap()
        })
        .collect();
    for (case, rx) in cases.iter().zip(receivers) {
        let out = collect(rx).await;
        assert_eq!(out.summary.error, None);
        assert_eq!(out.token_ids, case.output_ids[..8], "{}", case.name);
    }
    wait_idle(&engine).await;
    let stats = engine.stats();
    assert_eq!(stats.running, 0);
    assert_eq!(stats.kv_tokens_used, 0);
    assert_eq!(stats.kv_tokens_total, 2 * 512);
    let prompt_tokens: usize = cases.iter().map(|c| c.prompt_ids.len()).sum();
    assert_eq!(stats.prompt_tokens_total, prompt_tokens as u64);
    assert_eq!(stats.generated_tokens_total, 5 * 8);
    assert!(stats.steps_total >= 8);
}

#[tokio::test]
async fn warm_up_runs_one_short_generation() {
    let engine = TestEngine::default().start(FAMILY);
    wick::engine::warm_up(&engine).await.unwrap();
    wait_idle(&engine).await;
    assert_eq!(engine.stats().generated_tokens_total, 2);
    assert_eq!(engine.info().max_num_seqs, 8);
    assert_eq!(engine.info().device, "cpu");
}

#[tokio::test]
async fn over_long_prompt_gets_a_clear_error() {
    let engine = TestEngine {
        max_model_len: 32,
        ..TestEngine::default()
    }
    .start(FAMILY);
    let prompt: Vec<u32> = (0..32).map(|i| 100 + i).collect();
    let err = engine
        .submit(request("long", &prompt, SamplingParams::greedy(4)))
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::PromptTooLong {
            prompt_tokens: 32,
            max_model_len: 32
        }
    );
    assert_eq!(
        err.to_string(),
        "`inputs` must have less than 32 tokens. Given: 32"
    );
    // One token shorter fits, and stops with `length` when the context is full.
    let out = generate(
        &engine,
        request(
            "fits",
            &prompt[..30],
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(100)
            },
        ),
    )
    .await;
    assert_eq!(out.summary.finish_reason, FinishReason::Length);
    assert_eq!(out.token_ids.len(), 2);
}

#[tokio::test]
async fn stop_strings_are_never_half_streamed_and_can_be_included() {
    let cases = reference_cases(FAMILY);
    let engine = TestEngine::default().start(FAMILY);
    let plain = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(32)
    };
    let full = generate(
        &engine,
        request("full", &cases[1].prompt_ids, plain.clone()),
    )
    .await
    .text();
    // A stop string from the middle of the greedy text, spanning several characters.
    let chars: Vec<char> = full.chars().collect();
    let start = (chars.len() / 2..chars.len() - 4)
        .find(|&i| chars[i..i + 4].iter().all(|c| *c != '\u{FFFD}') && !chars[i].is_whitespace())
        .expect("the greedy text has four real characters in its second half");
    let stop: String = chars[start..start + 4].iter().collect();
    let pos = full.find(&stop).unwrap();

    for include in [false, true] {
        let params = SamplingParams {
            stop: vec![stop.clone()],
            include_stop_str_in_output: include,
            ..plain.clone()
        };
        let out = generate(&engine, request("stop", &cases[1].prompt_ids, params)).await;
        let expected = if include {
            &full[..pos + stop.len()]
        } else {
            &full[..pos]
        };
        assert_eq!(out.text(), expected, "include_stop_str_in_output={include}");
        assert_eq!(out.summary.finish_reason, FinishReason::Stop);
        assert_eq!(out.summary.stop_match, Some(StopMatch::Text(stop.clone())));
        assert!(out.token_ids.len() < 32);
    }
}

#[tokio::test]
async fn multibyte_text_streams_without_replacement_characters() {
    let cases = reference_cases(FAMILY);
    let unicode = cases.iter().find(|c| c.name == "unicode").unwrap();
    let engine = TestEngine::default().start(FAMILY);
    let out = generate(
        &engine,
        request("unicode", &unicode.prompt_ids, SamplingParams::greedy(32)),
    )
    .await;
    let full = engine.tokenizer().decode(&out.token_ids, true).unwrap();
    assert_eq!(out.text(), full);
    // A delta never ends inside a character: any U+FFFD streamed is one the full decode has too,
    // at the same place.
    let mut streamed = String::new();
    for delta in &out.deltas {
        streamed.push_str(delta);
        assert!(
            full.starts_with(&streamed),
            "delta {delta:?} is not a prefix of the final text"
        );
    }
    // The prompt itself (real multi-byte text) round-trips through the engine's tokenizer.
    let prompt_text = engine
        .tokenizer()
        .decode(&unicode.prompt_ids, true)
        .unwrap();
    assert!(!prompt_text.contains('\u{FFFD}'));
}

#[tokio::test]
async fn logprobs_have_one_entry_per_token_with_sorted_top_tokens() {
    let cases = reference_cases(FAMILY);
    let engine = TestEngine::default().start(FAMILY);
    let params = SamplingParams {
        logprobs: Some(5),
        ..SamplingParams::greedy(6)
    };
    let out = generate(&engine, request("lp", &cases[0].prompt_ids, params)).await;
    assert_eq!(out.logprobs.len(), out.token_ids.len());
    for (lp, &id) in out.logprobs.iter().zip(&out.token_ids) {
        assert_eq!(lp.chosen.token_id, id);
        assert_eq!(lp.top.len(), 5);
        assert!(lp.chosen.logprob <= 0.0);
        assert_eq!(lp.top[0].token_id, id, "greedy picks the most likely token");
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    }
    let none = generate(
        &engine,
        request("no-lp", &cases[0].prompt_ids, SamplingParams::greedy(3)),
    )
    .await;
    assert!(none.logprobs.is_empty());
}

#[tokio::test]
async fn max_tokens_ends_with_length_and_min_tokens_suppresses_stop_tokens() {
    let cases = reference_cases(FAMILY);
    let engine = TestEngine::default().start(FAMILY);
    let out = generate(
        &engine,
        request("len", &cases[0].prompt_ids, SamplingParams::greedy(3)),
    )
    .await;
    assert_eq!(out.summary.finish_reason, FinishReason::Length);
    assert_eq!(out.summary.completion_tokens, 3);
    assert!(out.summary.time_to_first_token.is_some());
    assert!(out.summary.time_per_output_token.is_some());

    // Make the greedy first token a stop token: it stops at once, unless min_tokens holds it off.
    let first = cases[0].output_ids[0];
    let stopping = SamplingParams {
        stop_token_ids: vec![first],
        ..SamplingParams::greedy(10)
    };
    let out = generate(
        &engine,
        request("stop-token", &cases[0].prompt_ids, stopping.clone()),
    )
    .await;
    assert_eq!(out.token_ids, vec![first]);
    assert_eq!(out.summary.stop_match, Some(StopMatch::Token(first)));
    assert_eq!(out.text(), "", "a stop token's text is not streamed");

    let held_off = SamplingParams {
        min_tokens: 4,
        ..stopping
    };
    let out = generate(
        &engine,
        request("min-tokens", &cases[0].prompt_ids, held_off),
    )
    .await;
    assert!(out.token_ids.len() >= 4);
    assert!(!out.token_ids[..4].contains(&first));
}

#[tokio::test]
async fn shutdown_fails_running_sequences_and_stops_the_engine() {
    let cases = reference_cases(FAMILY);
    let engine = TestEngine::default().start(FAMILY);
    let long = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(400)
    };
    let mut rx = engine
        .submit(request("running", &cases[0].prompt_ids, long))
        .unwrap();
    assert!(matches!(rx.recv().await, Some(SeqEvent::Delta { .. })));
    engine.shutdown().await;
    let out = collect(rx).await;
    assert_eq!(out.summary.finish_reason, FinishReason::Error);
    assert_eq!(out.summary.error.as_deref(), Some("engine shutting down"));
    let stopped = async {
        while engine.is_running() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(REQUEST_DEADLINE, stopped)
        .await
        .unwrap();
    let err = engine
        .submit(request(
            "late",
            &cases[0].prompt_ids,
            SamplingParams::greedy(2),
        ))
        .unwrap_err();
    assert_eq!(err, EngineError::Stopped);
}

#[tokio::test]
async fn cancelling_a_waiting_request_removes_it_from_the_queue() {
    let cases = reference_cases(FAMILY);
    let engine = TestEngine {
        max_num_seqs: 1,
        ..TestEngine::default()
    }
    .start(FAMILY);
    let long = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(300)
    };
    let mut running = engine
        .submit(request("running", &cases[0].prompt_ids, long.clone()))
        .unwrap();
    assert!(matches!(running.recv().await, Some(SeqEvent::Delta { .. })));
    let waiting = engine
        .submit(request("waiting", &cases[1].prompt_ids, long))
        .unwrap();
    drop(waiting);
    drop(running);
    let next = generate(
        &engine,
        request("next", &cases[2].prompt_ids, SamplingParams::greedy(3)),
    )
    .await;
    assert_eq!(next.token_ids.len(), 3);
    wait_idle(&engine).await;
    let stats = engine.stats();
    assert_eq!((stats.waiting, stats.running), (0, 0));
    assert!(
        stats.generated_tokens_total < 300,
        "a cancelled sequence ran to the end"
    );
}
