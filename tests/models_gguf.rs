//! Opt-in check on a real pretrained model: the SmolLM2-135M-Instruct Q4_1 GGUF (not in the repo;
//! see `tests/fixtures/README.md` for how to get it offline). Looks for
//! `models/SmolLM2-135M-Instruct.Q4_1.gguf` under the repo root or the path in `WICK_SMOLLM2_GGUF`;
//! skips with a message when neither exists.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use wick::engine::kv_cache::KvCache;
use wick::hub::{ModelFiles, WeightFiles};
use wick::models::{gguf, CausalLm, ForwardBatch, GgufOptions, SeqChunk};

const PROMPT: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
const NEW_TOKENS: usize = 20;

fn smollm2_path() -> Option<PathBuf> {
    let path = match std::env::var_os("WICK_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    path.exists().then_some(path)
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

/// Greedy generation of `NEW_TOKENS` tokens in slot 0; returns the tokens and decode tokens/s.
fn generate(model: &dyn CausalLm, prompt: &[u32]) -> (Vec<u32>, f64) {
    let mut cache = KvCache::new(model.info(), 1, 256, &Device::Cpu).unwrap();
    let seqs = [SeqChunk {
        slot: 0,
        start_pos: 0,
        len: prompt.len(),
    }];
    let logits = model
        .forward(
            &ForwardBatch {
                token_ids: prompt,
                seqs: &seqs,
            },
            &mut cache,
        )
        .unwrap();
    let mut tokens = vec![argmax(&logits.to_vec2::<f32>().unwrap()[0])];
    let started = Instant::now();
    while tokens.len() < NEW_TOKENS {
        let last = [*tokens.last().unwrap()];
        let seqs = [SeqChunk {
            slot: 0,
            start_pos: prompt.len() + tokens.len() - 1,
            len: 1,
        }];
        let logits = model
            .forward(
                &ForwardBatch {
                    token_ids: &last,
                    seqs: &seqs,
                },
                &mut cache,
            )
            .unwrap();
        tokens.push(argmax(&logits.to_vec2::<f32>().unwrap()[0]));
    }
    let per_second = (NEW_TOKENS - 1) as f64 / started.elapsed().as_secs_f64();
    (tokens, per_second)
}

#[test]
fn smollm2_gguf_answers_paris_with_and_without_requantization() {
    let Some(path) = smollm2_path() else {
        println!("skipped: SmolLM2 GGUF not found (set WICK_SMOLLM2_GGUF or put it in models/)");
        return;
    };
    let content = gguf::read_content(&path).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_gguf(&content).unwrap();
    let prompt = tokenizer.encode(PROMPT, false).unwrap().get_ids().to_vec();
    let files = ModelFiles {
        config: None,
        weights: WeightFiles::Gguf(path.clone()),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: None,
    };
    for requantize in [None, Some(GgmlDType::Q8_0)] {
        let options = GgufOptions { requantize };
        let model = wick::models::load_with(&files, &Device::Cpu, DType::F32, &options).unwrap();
        assert_eq!(model.info().architecture, "llama");
        assert_eq!(model.info().dtype, DType::F32);
        let (tokens, per_second) = generate(model.as_ref(), &prompt);
        let text = tokenizer.decode(&tokens, true).unwrap();
        println!("requantize {requantize:?}: {per_second:.1} tokens/s decode (batch 1): {text:?}");
        assert!(
            text.contains("Paris"),
            "requantize {requantize:?}: {text:?}"
        );
    }
}
