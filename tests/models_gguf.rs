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
fn smollm2_gguf_answers_paris_with_and_without_requantization_and_padding() {
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
    let configs = [
        (None, false),
        (Some(GgmlDType::Q8_0), false),
        (Some(GgmlDType::Q8_0), true),
    ];
    for (requantize, pad_rows) in configs {
        let options = GgufOptions {
            requantize,
            pad_rows,
        };
        let model = wick::models::load_with(&files, &Device::Cpu, DType::F32, &options).unwrap();
        assert_eq!(model.info().architecture, "llama");
        assert_eq!(model.info().dtype, DType::F32);
        let (tokens, per_second) = generate(model.as_ref(), &prompt);
        let text = tokenizer.decode(&tokens, true).unwrap();
        println!("requantize {requantize:?}, pad_rows {pad_rows}: {per_second:.1} tokens/s decode (batch 1): {text:?}");
        assert!(
            text.contains("Paris"),
            "requantize {requantize:?}: {text:?}"
        );
    }
}

/// Writes a fixture's safetensors weights as a GGUF file with llama.cpp's names, permuting llama
/// q/k rows for interleaved rotary as llama.cpp's converter does; weights in `dtype`.
fn fixture_as_gguf(fixture: &str, arch: &str, dtype: GgmlDType, dir: &std::path::Path) -> PathBuf {
    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::Tensor;

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("config.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(root.join("model.safetensors"), &Device::Cpu).unwrap();
    let get = |name: &str| tensors[name].clone();
    let n = |key: &str| config[key].as_u64().unwrap() as usize;
    let (heads, kv_heads, layers, hidden) = (
        n("num_attention_heads"),
        n("num_key_value_heads"),
        n("num_hidden_layers"),
        n("hidden_size"),
    );
    let head_dim = hidden / heads;
    let permute = |w: Tensor, groups: usize| -> Tensor {
        if arch != "llama" {
            return w;
        }
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((groups, 2, rows / groups / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    };
    let mut out: Vec<(String, Tensor, bool)> = vec![
        (
            "token_embd.weight".into(),
            get("model.embed_tokens.weight"),
            true,
        ),
        ("output_norm.weight".into(), get("model.norm.weight"), false),
    ];
    if let Some(head) = tensors.get("lm_head.weight") {
        out.push(("output.weight".into(), head.clone(), true));
    }
    for i in 0..layers {
        let hf = |s: &str| get(&format!("model.layers.{i}.{s}"));
        let mut add = |name: &str, t: Tensor, quantize: bool| {
            out.push((format!("blk.{i}.{name}"), t, quantize))
        };
        add("attn_norm.weight", hf("input_layernorm.weight"), false);
        add(
            "ffn_norm.weight",
            hf("post_attention_layernorm.weight"),
            false,
        );
        add(
            "attn_q.weight",
            permute(hf("self_attn.q_proj.weight"), heads),
            true,
        );
        add(
            "attn_k.weight",
            permute(hf("self_attn.k_proj.weight"), kv_heads),
            true,
        );
        add("attn_v.weight", hf("self_attn.v_proj.weight"), true);
        add("attn_output.weight", hf("self_attn.o_proj.weight"), true);
        add("ffn_gate.weight", hf("mlp.gate_proj.weight"), true);
        add("ffn_up.weight", hf("mlp.up_proj.weight"), true);
        add("ffn_down.weight", hf("mlp.down_proj.weight"), true);
        if arch == "qwen2" {
            add("attn_q.bias", hf("self_attn.q_proj.bias"), false);
            add("attn_k.bias", hf("self_attn.k_proj.bias"), false);
            add("attn_v.bias", hf("self_attn.v_proj.bias"), false);
        }
    }
    let qtensors: Vec<(String, QTensor)> = out
        .into_iter()
        .map(|(name, t, quantize)| {
            let target = if quantize { dtype } else { GgmlDType::F32 };
            (name, QTensor::quantize(&t, target).unwrap())
        })
        .collect();
    let key = |k: &str| format!("{arch}.{k}");
    let eos = config["eos_token_id"].as_array().map_or_else(
        || config["eos_token_id"].as_u64().unwrap(),
        |ids| ids[0].as_u64().unwrap(),
    );
    let rope_theta = config["rope_theta"].as_f64().unwrap() as f32;
    let eps = config["rms_norm_eps"].as_f64().unwrap() as f32;
    let metadata = vec![
        (
            "general.architecture".to_string(),
            gguf_file::Value::String(arch.into()),
        ),
        (
            key("attention.head_count"),
            gguf_file::Value::U32(heads as u32),
        ),
        (
            key("attention.head_count_kv"),
            gguf_file::Value::U32(kv_heads as u32),
        ),
        (key("block_count"), gguf_file::Value::U32(layers as u32)),
        (
            key("embedding_length"),
            gguf_file::Value::U32(hidden as u32),
        ),
        (
            key("rope.dimension_count"),
            gguf_file::Value::U32(head_dim as u32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(eps),
        ),
        (key("rope.freq_base"), gguf_file::Value::F32(rope_theta)),
        (key("context_length"), gguf_file::Value::U32(512)),
        (
            "tokenizer.ggml.eos_token_id".to_string(),
            gguf_file::Value::U32(eos as u32),
        ),
    ];
    let path = dir.join(format!("{fixture}-{dtype:?}.gguf"));
    let mut file = std::fs::File::create(&path).unwrap();
    let metadata_refs: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata_refs, &tensor_refs).unwrap();
    path
}

/// Prefill of a reference prompt then 4 teacher-forced decode steps; all logits rows.
fn run_reference_case(model: &dyn CausalLm, fixture: &str) -> Vec<Vec<f32>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("reference_generations.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["cases"][1];
    let as_ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let (prompt, output) = (as_ids(&case["prompt_ids"]), as_ids(&case["output_ids"]));
    let mut cache = KvCache::new(model.info(), 2, 64, &Device::Cpu).unwrap();
    let seqs = [SeqChunk {
        slot: 1,
        start_pos: 0,
        len: prompt.len(),
    }];
    let mut rows = vec![model
        .forward(
            &ForwardBatch {
                token_ids: &prompt,
                seqs: &seqs,
            },
            &mut cache,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .remove(0)];
    for (i, token) in output.iter().take(4).enumerate() {
        let seqs = [SeqChunk {
            slot: 1,
            start_pos: prompt.len() + i,
            len: 1,
        }];
        let logits = model
            .forward(
                &ForwardBatch {
                    token_ids: &[*token],
                    seqs: &seqs,
                },
                &mut cache,
            )
            .unwrap();
        rows.push(logits.to_vec2::<f32>().unwrap().remove(0));
    }
    rows
}

fn max_row_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn gguf_files(path: PathBuf) -> ModelFiles {
    ModelFiles {
        config: None,
        weights: WeightFiles::Gguf(path),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: None,
    }
}

/// The fixture converted to an f32 GGUF (llama: permuted q/k and interleaved rotary; qwen2: biases
/// and the output tied to the embedding) gives the safetensors model's logits.
#[test]
fn f32_gguf_of_fixture_matches_safetensors_model() {
    let dir = tempfile::tempdir().unwrap();
    for (fixture, arch) in [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2")] {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        let st_files = ModelFiles {
            config: Some(root.join("config.json")),
            weights: WeightFiles::Safetensors(vec![root.join("model.safetensors")]),
            tokenizer_json: None,
            tokenizer_config: None,
            generation_config: None,
        };
        let dense = wick::models::load(&st_files, &Device::Cpu, DType::F32).unwrap();
        let path = fixture_as_gguf(fixture, arch, GgmlDType::F32, dir.path());
        let quantized = wick::models::load(&gguf_files(path), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(quantized.info().architecture, arch);
        assert_eq!(quantized.info().vocab_size, dense.info().vocab_size);
        let diff = max_row_diff(
            &run_reference_case(dense.as_ref(), fixture),
            &run_reference_case(quantized.as_ref(), fixture),
        );
        assert!(diff < 1e-4, "{fixture} as GGUF: logits differ by {diff}");
    }
}

/// A Q4_1 GGUF re-quantized to Q8_0 at load (rows as they are, or padded to 256 columns) computes
/// nearly what the Q4_1 weights compute: the change is small next to the Q4_1 error itself (random
/// tiny weights quantize badly, so the bound is relative to that error rather than absolute).
#[test]
fn requantized_q4_1_gguf_stays_close_to_q4_1() {
    let dir = tempfile::tempdir().unwrap();
    let load = |path: &PathBuf, requantize, pad_rows| {
        let options = GgufOptions {
            requantize,
            pad_rows,
        };
        wick::models::load_with(
            &gguf_files(path.clone()),
            &Device::Cpu,
            DType::F32,
            &options,
        )
        .unwrap()
    };
    let f32_path = fixture_as_gguf("tiny-llama", "llama", GgmlDType::F32, dir.path());
    let q4_path = fixture_as_gguf("tiny-llama", "llama", GgmlDType::Q4_1, dir.path());
    let exact = run_reference_case(load(&f32_path, None, true).as_ref(), "tiny-llama");
    let q4 = run_reference_case(load(&q4_path, None, false).as_ref(), "tiny-llama");
    let q4_error = max_row_diff(&exact, &q4);
    for pad_rows in [false, true] {
        let q8 = run_reference_case(
            load(&q4_path, Some(GgmlDType::Q8_0), pad_rows).as_ref(),
            "tiny-llama",
        );
        let change = max_row_diff(&q4, &q8);
        println!(
            "Q4_1 vs f32: {q4_error:.3e}; Q4_1 vs Q4_1->Q8_0 (pad_rows {pad_rows}): {change:.3e}"
        );
        assert!(change > 0.0, "re-quantization did not happen");
        assert!(change < 0.25 * q4_error, "re-quantization (pad_rows {pad_rows}) changed logits by {change} (Q4_1 error {q4_error})");
    }
}
