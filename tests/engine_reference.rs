//! Every reference case of the five fixtures through the engine (greedy, f32, CPU): alone, all five
//! in one batch, and with arrivals staggered across steps. Output ids must equal the transformers
//! reference up to the first near-tie step, and wick's batched output must equal its own unbatched
//! output token for token.
#![allow(clippy::unwrap_used)]

mod engine_support;

use engine_support::{
    collect, generate, reference_cases, reference_request, wait_idle, Case, Output, TestEngine,
    FAMILIES,
};
use wick::engine::{FinishReason, SeqEvent};

fn check_against_reference(family: &str, case: &Case, out: &Output) {
    let n = case.reliable_len;
    assert_eq!(
        out.token_ids[..n.min(out.token_ids.len())],
        case.output_ids[..n],
        "{family}/{}: output ids differ from the reference within the reliable prefix of {n}",
        case.name
    );
    if n == case.output_ids.len() {
        assert_eq!(out.token_ids, case.output_ids, "{family}/{}", case.name);
        assert_eq!(
            out.text(),
            case.text,
            "{family}/{}: streamed text",
            case.name
        );
    }
    assert_eq!(out.summary.completion_tokens, out.token_ids.len());
    assert_eq!(out.summary.prompt_tokens, case.prompt_ids.len());
    assert!(matches!(
        out.summary.finish_reason,
        FinishReason::Length | FinishReason::Stop
    ));
}

async fn run_alone(family: &str, cases: &[Case]) -> Vec<Output> {
    let engine = TestEngine::default().start(family);
    let mut outputs = Vec::new();
    for case in cases {
        outputs.push(generate(&engine, reference_request(case)).await);
    }
    wait_idle(&engine).await;
    outputs
}

#[tokio::test]
async fn reference_cases_match_alone_batched_and_staggered() {
    for family in FAMILIES {
        let cases = reference_cases(family);
        let alone = run_alone(family, &cases).await;
        for (case, out) in cases.iter().zip(&alone) {
            check_against_reference(family, case, out);
        }

        // All five submitted together: one batch.
        let engine = TestEngine::default().start(family);
        let receivers: Vec<_> = cases
            .iter()
            .map(|c| engine.submit(reference_request(c)).unwrap())
            .collect();
        for ((case, rx), solo) in cases.iter().zip(receivers).zip(&alone) {
            let out = collect(rx).await;
            check_against_reference(family, case, &out);
            assert_eq!(
                out.token_ids, solo.token_ids,
                "{family}/{}: batched != unbatched",
                case.name
            );
            assert_eq!(out.text(), solo.text(), "{family}/{}", case.name);
        }

        // Staggered: two first, the rest after they produced a few tokens each; a small prefill
        // budget so prompts are chunked across steps while the others decode.
        let engine = TestEngine {
            max_num_batched_tokens: 16,
            ..TestEngine::default()
        }
        .start(family);
        let mut early: Vec<_> = cases[..2]
            .iter()
            .map(|c| engine.submit(reference_request(c)).unwrap())
            .collect();
        let mut early_deltas: Vec<Vec<SeqEvent>> = vec![Vec::new(), Vec::new()];
        for (rx, seen) in early.iter_mut().zip(early_deltas.iter_mut()) {
            for _ in 0..3 {
                seen.push(rx.recv().await.unwrap());
            }
        }
        let late: Vec<_> = cases[2..]
            .iter()
            .map(|c| engine.submit(reference_request(c)).unwrap())
            .collect();
        let mut outputs = Vec::new();
        for (rx, seen) in early.into_iter().zip(early_deltas) {
            let mut out = collect(rx).await;
            let mut ids: Vec<u32> = seen
                .iter()
                .flat_map(|e| match e {
                    SeqEvent::Delta { token_ids, .. } => token_ids.clone(),
                    SeqEvent::Finished(_) => Vec::new(),
                })
                .collect();
            let mut deltas: Vec<String> = seen
                .iter()
                .filter_map(|e| match e {
                    SeqEvent::Delta { text, .. } => Some(text.clone()),
                    SeqEvent::Finished(_) => None,
                })
                .collect();
            ids.extend(out.token_ids);
            deltas.extend(out.deltas);
            out.token_ids = ids;
            out.deltas = deltas;
            outputs.push(out);
        }
        for rx in late {
            outputs.push(collect(rx).await);
        }
        for ((case, out), solo) in cases.iter().zip(&outputs).zip(&alone) {
            check_against_reference(family, case, out);
            assert_eq!(
                out.token_ids, solo.token_ids,
                "{family}/{}: staggered != unbatched",
                case.name
            );
            assert_eq!(out.text(), solo.text(), "{family}/{}", case.name);
        }
        wait_idle(&engine).await;
        let stats = engine.stats();
        assert_eq!(stats.kv_tokens_used, 0);
        assert!(stats.generated_tokens_total >= 5 * 32 - 5);
    }
}
