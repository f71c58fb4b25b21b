//! wick's packed AVX-512 projections against candle's matmul on the five tiny fixtures: the same
//! checkpoint loaded both ways gives the same logits (within f32 rounding of a different summation
//! order) for the prompt and for decode steps over the reference's own output, and the packed path
//! is really taken on CPUs that have AVX-512F. Its own process: the matmul choice is process-wide.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use serde_json::Value;
use wick::engine::kv_cache::KvCache;
use wick::models::cpu_matmul::{packed_kernels_apply, set_cpu_matmul, CpuMatmul};
use wick::models::{CausalLm, ForwardBatch, SeqChunk};

/// The matmul choice is process-wide: the tests of this file take turns.
static CHOICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Two implementations of the same f32 math must agree within this (absolute, on logits; the check
/// against transformers in models_reference.rs allows 1e-4).
const TOL: f32 = 5e-5;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Logits of every step of the first reference case: the prompt, then each reference output token.
fn run(model: &dyn CausalLm, case: &Value) -> Vec<Vec<f32>> {
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = ids(&case["prompt_ids"]);
    let output = ids(&case["output_ids"]);
    let mut cache = KvCache::new(model.info(), 1, 256, &Device::Cpu).unwrap();
    let mut steps = Vec::new();
    let mut pos = 0;
    for chunk in std::iter::once(prompt.as_slice()).chain(output.chunks(1)) {
        let seqs = [SeqChunk {
            slot: 0,
            start_pos: pos,
            len: chunk.len(),
        }];
        let batch = ForwardBatch {
            token_ids: chunk,
            seqs: &seqs,
        };
        let logits = model.forward(&batch, &mut cache).unwrap();
        steps.push(logits.to_vec2::<f32>().unwrap().remove(0));
        pos += chunk.len();
    }
    steps
}

#[test]
fn packed_kernels_and_candle_matmul_give_the_same_logits_on_every_fixture() {
    let _turn = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    let packed_here = packed_kernels_apply(&Device::Cpu, DType::F32);
    if !packed_here {
        eprintln!("this CPU has no AVX-512F: both loads below use candle's matmul");
    }
    for name in [
        "tiny-llama",
        "tiny-mistral",
        "tiny-qwen2",
        "tiny-phi3",
        "tiny-gemma2",
    ] {
        let dir = fixture_dir(name);
        let files = wick::hub::local::resolve_local_dir(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join("reference_generations.json")).unwrap();
        let reference: Value = serde_json::from_str(&text).unwrap();
        let case = &reference["cases"][0];

        set_cpu_matmul(CpuMatmul::Candle);
        assert!(!packed_kernels_apply(&Device::Cpu, DType::F32));
        let candle_model = wick::models::load(&files, &Device::Cpu, DType::F32).unwrap();
        set_cpu_matmul(CpuMatmul::Auto);
        assert_eq!(packed_kernels_apply(&Device::Cpu, DType::F32), packed_here);
        let packed_model = wick::models::load(&files, &Device::Cpu, DType::F32).unwrap();

        let want = run(candle_model.as_ref(), case);
        let got = run(packed_model.as_ref(), case);
        assert_eq!(got.len(), want.len());
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= TOL, "{name} step {step}: max |diff| {diff}");
        }
    }
}

#[test]
fn a_decode_step_gives_bit_identical_logits_alone_and_in_a_batch() {
    let _turn = CHOICE.lock().unwrap_or_else(|e| e.into_inner());
    set_cpu_matmul(CpuMatmul::Auto);
    if !packed_kernels_apply(&Device::Cpu, DType::F32) {
        eprintln!("skipped: no AVX-512F, candle's matmul promises no batch invariance");
        return;
    }
    for name in ["tiny-llama", "tiny-gemma2"] {
        let files = wick::hub::local::resolve_local_dir(&fixture_dir(name)).unwrap();
        let model = wick::models::load(&files, &Device::Cpu, DType::F32).unwrap();
        let prompts: [&[u32]; 3] = [&[1, 5, 9, 12], &[3, 4], &[7, 8, 9, 10, 11, 12, 13]];
        let mut cache = KvCache::new(model.info(), 3, 64, &Device::Cpu).unwrap();
        for (slot, prompt) in prompts.iter().enumerate() {
            let seqs = [SeqChunk {
                slot,
                start_pos: 0,
                len: prompt.len(),
            }];
            let batch = ForwardBatch {
                token_ids: prompt,
                seqs: &seqs,
            };
            model.forward(&batch, &mut cache).unwrap();
        }
        // Slot 1's next token alone, then all three (slots out of order) in one step: the cache row
        // written by the first pass is simply rewritten with the same values by the second.
        let step = |slots: &[usize], cache: &mut KvCache| -> Vec<Vec<f32>> {
            let seqs: Vec<SeqChunk> = slots
                .iter()
                .map(|&slot| SeqChunk {
                    slot,
                    start_pos: prompts[slot].len(),
                    len: 1,
                })
                .collect();
            let tokens: Vec<u32> = slots.iter().map(|&s| 20 + s as u32).collect();
            let batch = ForwardBatch {
                token_ids: &tokens,
                seqs: &seqs,
            };
            model
                .forward(&batch, cache)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let alone = step(&[1], &mut cache).remove(0);
        let batched = step(&[2, 1, 0], &mut cache).remove(1);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&alone),
            bits(&batched),
            "{name}: slot 1 alone vs in a batch of 3"
        );
    }
}
