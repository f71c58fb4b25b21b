//! The forked architectures against the Hugging Face transformers references in
//! `tests/fixtures/tiny-*/reference_generations.json` (float32, eager attention), on CPU f32:
//! teacher-forced top-5 logits and greedy tokens, chunked prefill, batched decode across slots, and the
//! reference's own batched rows. Plus an opt-in check on the real SmolLM2 GGUF when it is present.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use serde_json::Value;
use wick::engine::kv_cache::KvCache;
use wick::hub::ModelFiles;
use wick::models::{CausalLm, ForwardBatch, SeqChunk};

/// Top-5 logits must match transformers within this.
const LOGIT_TOL: f32 = 1e-4;
/// Greedy tokens must match up to the first step whose recorded top-2 margin is below this.
const MARGIN_TOL: f64 = 1e-3;
/// Two runs of wick's own code (chunked vs whole, batched vs alone) must agree within this.
const SELF_TOL: f32 = 1e-5;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture_files(name: &str) -> ModelFiles {
    let dir = fixture_dir(name);
    // The same resolution `MODEL_NAME=<dir>` gets.
    wick::hub::local::resolve_local_dir(&dir).expect("fixture directory resolves")
}

fn load(name: &str) -> (Box<dyn CausalLm>, Value) {
    let model = wick::models::load(&fixture_files(name), &Device::Cpu, DType::F32).unwrap();
    let text =
        std::fs::read_to_string(fixture_dir(name).join("reference_generations.json")).unwrap();
    (model, serde_json::from_str(&text).unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn new_cache(model: &dyn CausalLm, slots: usize) -> KvCache {
    KvCache::new(model.info(), slots, 256, &Device::Cpu).unwrap()
}

/// One forward pass; returns one logits row per sequence.
fn forward(
    model: &dyn CausalLm,
    cache: &mut KvCache,
    parts: &[(SeqChunk, &[u32])],
) -> Vec<Vec<f32>> {
    let token_ids: Vec<u32> = parts.iter().flat_map(|(_, t)| t.iter().copied()).collect();
    let seqs: Vec<SeqChunk> = parts.iter().map(|(s, _)| *s).collect();
    let logits = model
        .forward(
            &ForwardBatch {
                token_ids: &token_ids,
                seqs: &seqs,
            },
            cache,
        )
        .unwrap();
    assert_eq!(logits.dims(), &[seqs.len(), model.info().vocab_size]);
    assert_eq!(logits.dtype(), DType::F32);
    logits.to_vec2::<f32>().unwrap()
}

fn prefill(model: &dyn CausalLm, cache: &mut KvCache, slot: usize, prompt: &[u32]) -> Vec<f32> {
    let chunk = SeqChunk {
        slot,
        start_pos: 0,
        len: prompt.len(),
    };
    forward(model, cache, &[(chunk, prompt)]).remove(0)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Index of the first step whose recorded margin is below `MARGIN_TOL` (greedy checks stop there).
fn reliable_steps(case: &Value) -> usize {
    let steps = case["steps"].as_array().unwrap();
    steps
        .iter()
        .position(|s| s["margin"].as_f64().unwrap() < MARGIN_TOL)
        .unwrap_or(steps.len())
}

/// Compares one step's logits with the reference's top-5; returns the largest difference.
fn check_step(fixture: &str, case: &str, step_index: usize, row: &[f32], step: &Value) -> f32 {
    let top_ids = ids(&step["top_ids"]);
    let top_logits: Vec<f32> = step["top_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let mut sorted: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut worst = 0f32;
    for k in 0..top_ids.len() {
        // The logit of the reference's k-th id, and the k-th largest logit of ours.
        let at_id = (row[top_ids[k] as usize] - top_logits[k]).abs();
        let at_rank = (sorted[k].1 - top_logits[k]).abs();
        worst = worst.max(at_id).max(at_rank);
        // Ids must agree where the reference's neighbours are clearly apart.
        let gap_above = if k == 0 {
            f32::INFINITY
        } else {
            top_logits[k - 1] - top_logits[k]
        };
        let gap_below = top_logits
            .get(k + 1)
            .map_or(f32::INFINITY, |next| top_logits[k] - next);
        if gap_above > 2.0 * LOGIT_TOL && gap_below > 2.0 * LOGIT_TOL {
            assert_eq!(
                sorted[k].0 as u32, top_ids[k],
                "{fixture}/{case} step {step_index}: rank {k} id"
            );
        }
    }
    assert!(
        worst <= LOGIT_TOL,
        "{fixture}/{case} step {step_index}: top-5 logits differ by {worst}"
    );
    worst
}

/// Every case: prefill the prompt, then teacher-force the reference output one token at a time.
fn check_reference(fixture: &str) {
    let (model, reference) = load(fixture);
    let mut worst = 0f32;
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let output = ids(&case["output_ids"]);
        let steps = case["steps"].as_array().unwrap();
        assert_eq!(steps.len(), output.len());
        let reliable = reliable_steps(case);
        let mut cache = new_cache(model.as_ref(), 2);
        // Slot 1, so that a slot offset bug cannot hide behind slot 0.
        let mut row = prefill(model.as_ref(), &mut cache, 1, &prompt);
        for (i, step) in steps.iter().enumerate() {
            worst = worst.max(check_step(fixture, name, i, &row, step));
            if i < reliable {
                assert_eq!(
                    argmax(&row),
                    output[i],
                    "{fixture}/{name} step {i}: greedy token"
                );
            }
            if i + 1 < output.len() {
                let chunk = SeqChunk {
                    slot: 1,
                    start_pos: prompt.len() + i,
                    len: 1,
                };
                row = forward(model.as_ref(), &mut cache, &[(chunk, &output[i..=i])]).remove(0);
            }
        }
    }
    println!("{fixture}: max |top-5 logit diff| vs transformers = {worst:.3e}");
}

/// Prefill in chunks of 3 tokens gives the same logits as prefill at once, and decoding continues
/// identically from either cache.
fn check_chunked_prefill(fixture: &str) {
    let (model, reference) = load(fixture);
    let case = &reference["cases"][3]; // `long`: 100+ tokens
    let prompt = ids(&case["prompt_ids"]);
    let output = ids(&case["output_ids"]);
    let mut cache = new_cache(model.as_ref(), 2);
    let whole = prefill(model.as_ref(), &mut cache, 0, &prompt);
    let mut chunked = Vec::new();
    for (c, piece) in prompt.chunks(3).enumerate() {
        let chunk = SeqChunk {
            slot: 1,
            start_pos: 3 * c,
            len: piece.len(),
        };
        chunked = forward(model.as_ref(), &mut cache, &[(chunk, piece)]).remove(0);
    }
    let diff = max_abs_diff(&whole, &chunked);
    assert!(
        diff <= SELF_TOL,
        "{fixture}: chunked prefill differs by {diff}"
    );
    for i in 0..4 {
        let next = &output[i..=i];
        let pos = prompt.len() + i;
        let rows = forward(
            model.as_ref(),
            &mut cache,
            &[
                (
                    SeqChunk {
                        slot: 0,
                        start_pos: pos,
                        len: 1,
                    },
                    next,
                ),
                (
                    SeqChunk {
                        slot: 1,
                        start_pos: pos,
                        len: 1,
                    },
                    next,
                ),
            ],
        );
        let diff = max_abs_diff(&rows[0], &rows[1]);
        assert!(
            diff <= SELF_TOL,
            "{fixture}: decode after chunked prefill differs by {diff}"
        );
    }
}

/// All five cases decoded in one batch, in scattered, consecutive and two-run slot layouts, give each
/// sequence the logits it gets alone; a mixed pass (one prefill chunk plus decodes) too.
fn check_batched_decode(fixture: &str) {
    let (model, reference) = load(fixture);
    let cases = reference["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let outputs: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["output_ids"])).collect();
    const STEPS: usize = 6;

    // Alone: each case in slot 0 of its own cache.
    let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
    for (prompt, output) in prompts.iter().zip(&outputs) {
        let mut cache = new_cache(model.as_ref(), 1);
        let mut rows = vec![prefill(model.as_ref(), &mut cache, 0, prompt)];
        for i in 0..STEPS {
            let chunk = SeqChunk {
                slot: 0,
                start_pos: prompt.len() + i,
                len: 1,
            };
            rows.push(forward(model.as_ref(), &mut cache, &[(chunk, &output[i..=i])]).remove(0));
        }
        alone.push(rows);
    }

    // Five runs of one slot (gathered into one batch), four runs (three single slots and a pair),
    // one run, two runs (runs are read in place).
    for slots in [
        [4usize, 2, 0, 5, 3],
        [3, 0, 5, 1, 2],
        [1, 2, 3, 4, 5],
        [0, 1, 2, 4, 5],
    ] {
        let mut cache = new_cache(model.as_ref(), 6);
        for (k, prompt) in prompts.iter().enumerate() {
            let row = prefill(model.as_ref(), &mut cache, slots[k], prompt);
            let diff = max_abs_diff(&row, &alone[k][0]);
            assert!(
                diff <= SELF_TOL,
                "{fixture}: prefill of case {k} in slot {} differs by {diff}",
                slots[k]
            );
        }
        for i in 0..STEPS {
            let parts: Vec<(SeqChunk, &[u32])> = (0..prompts.len())
                .map(|k| {
                    let chunk = SeqChunk {
                        slot: slots[k],
                        start_pos: prompts[k].len() + i,
                        len: 1,
                    };
                    (chunk, &outputs[k][i..=i])
                })
                .collect();
            let rows = forward(model.as_ref(), &mut cache, &parts);
            for (k, row) in rows.iter().enumerate() {
                let diff = max_abs_diff(row, &alone[k][i + 1]);
                assert!(diff <= SELF_TOL, "{fixture}: batched decode step {i} of case {k} (slots {slots:?}) differs by {diff}");
            }
        }
    }

    // A mixed pass: case 0 decodes while case 1 prefills its whole prompt.
    let mut cache = new_cache(model.as_ref(), 2);
    prefill(model.as_ref(), &mut cache, 1, &prompts[0]);
    let rows = forward(
        model.as_ref(),
        &mut cache,
        &[
            (
                SeqChunk {
                    slot: 1,
                    start_pos: prompts[0].len(),
                    len: 1,
                },
                &outputs[0][0..1],
            ),
            (
                SeqChunk {
                    slot: 0,
                    start_pos: 0,
                    len: prompts[1].len(),
                },
                &prompts[1],
            ),
        ],
    );
    assert!(
        max_abs_diff(&rows[0], &alone[0][1]) <= SELF_TOL,
        "{fixture}: mixed pass, decode row"
    );
    assert!(
        max_abs_diff(&rows[1], &alone[1][0]) <= SELF_TOL,
        "{fixture}: mixed pass, prefill row"
    );
}

/// The reference's `batched` rows (greedy, all five prompts together): wick generates all five in
/// one batch and must produce the same tokens up to each case's first near-tie or EOS.
fn check_batched_section(fixture: &str) {
    let (model, reference) = load(fixture);
    let cases = reference["cases"].as_array().unwrap();
    let batched = &reference["batched"];
    let eos = ids(&reference["generate"]["eos_token_id"]);
    let order: Vec<&str> = batched["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let expected: Vec<Vec<u32>> = batched["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let picked: Vec<&Value> = order
        .iter()
        .map(|name| {
            cases
                .iter()
                .find(|c| c["name"].as_str().unwrap() == *name)
                .unwrap()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = picked.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let reliable: Vec<usize> = picked.iter().map(|c| reliable_steps(c)).collect();
    let n = prompts.len();
    let mut cache = new_cache(model.as_ref(), n);
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut done = vec![false; n];
    for (k, prompt) in prompts.iter().enumerate() {
        generated[k].push(argmax(&prefill(model.as_ref(), &mut cache, k, prompt)));
    }
    let max_new = expected.iter().map(Vec::len).max().unwrap();
    for _ in 1..max_new {
        for k in 0..n {
            let last = *generated[k].last().unwrap();
            done[k] = done[k] || eos.contains(&last) || generated[k].len() >= expected[k].len();
        }
        let active: Vec<usize> = (0..n).filter(|&k| !done[k]).collect();
        if active.is_empty() {
            break;
        }
        let last_tokens: Vec<[u32; 1]> = active
            .iter()
            .map(|&k| [*generated[k].last().unwrap()])
            .collect();
        let parts: Vec<(SeqChunk, &[u32])> = active
            .iter()
            .zip(&last_tokens)
            .map(|(&k, t)| {
                let chunk = SeqChunk {
                    slot: k,
                    start_pos: prompts[k].len() + generated[k].len() - 1,
                    len: 1,
                };
                (chunk, &t[..])
            })
            .collect();
        let rows = forward(model.as_ref(), &mut cache, &parts);
        for (&k, row) in active.iter().zip(&rows) {
            generated[k].push(argmax(row));
        }
    }
    for k in 0..n {
        let upto = reliable[k].min(generated[k].len());
        assert_eq!(
            generated[k][..upto],
            expected[k][..upto],
            "{fixture}: batched row {} ({})",
            k,
            order[k]
        );
        assert!(upto > 0);
    }
}

macro_rules! fixture_tests {
    ($($module:ident => $fixture:literal),* $(,)?) => {$(
        mod $module {
            #[test]
            fn reproduces_reference_top5_logits_and_greedy_tokens() {
                super::check_reference($fixture);
            }

            #[test]
            fn chunked_prefill_matches_prefill_at_once() {
                super::check_chunked_prefill($fixture);
            }

            #[test]
            fn batched_decode_matches_each_sequence_alone() {
                super::check_batched_decode($fixture);
            }

            #[test]
            fn reproduces_reference_batched_rows() {
                super::check_batched_section($fixture);
            }
        }
    )*};
}

fixture_tests! {
    llama => "tiny-llama",
    mistral => "tiny-mistral",
    qwen2 => "tiny-qwen2",
    phi3 => "tiny-phi3",
    gemma2 => "tiny-gemma2",
}
