//! Loading paths and attention variants the reference fixtures do not reach: sharded safetensors,
//! bf16/f16 on disk, config errors, and sliding-window attention (the fixtures' windows are longer
//! than their prompts).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use wick::engine::kv_cache::KvCache;
use wick::hub::{ModelFiles, WeightFiles};
use wick::models::{CausalLm, ForwardBatch, ModelError, SeqChunk};

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn files(config: &Path, weights: Vec<PathBuf>) -> ModelFiles {
    ModelFiles {
        config: Some(config.to_path_buf()),
        weights: WeightFiles::Safetensors(weights),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: None,
    }
}

fn fixture_config(name: &str) -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(fixture_dir(name).join("config.json")).unwrap();
    match serde_json::from_str(&text).unwrap() {
        Value::Object(map) => map,
        other => panic!("config is not an object: {other}"),
    }
}

fn write_config(dir: &Path, config: &serde_json::Map<String, Value>) -> PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, Value::Object(config.clone()).to_string()).unwrap();
    path
}

fn prompt(name: &str, case: usize) -> Vec<u32> {
    let text =
        std::fs::read_to_string(fixture_dir(name).join("reference_generations.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    reference["cases"][case]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Logits of the last token after feeding `tokens` in `chunk`-sized pieces from position 0.
fn last_logits(model: &dyn CausalLm, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let mut cache = KvCache::new(model.info(), 1, 256, &Device::Cpu).unwrap();
    let mut row = Vec::new();
    for (i, piece) in tokens.chunks(chunk).enumerate() {
        let seqs = [SeqChunk {
            slot: 0,
            start_pos: i * chunk,
            len: piece.len(),
        }];
        let logits = model
            .forward(
                &ForwardBatch {
                    token_ids: piece,
                    seqs: &seqs,
                },
                &mut cache,
            )
            .unwrap();
        row = logits.to_vec2::<f32>().unwrap().remove(0);
    }
    row
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = fixture_dir("tiny-llama").join("model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let (mut first, mut second) = (HashMap::new(), HashMap::new());
    for (i, (name, tensor)) in tensors.into_iter().enumerate() {
        if i % 2 == 0 {
            first.insert(name, tensor)
        } else {
            second.insert(name, tensor)
        };
    }
    let shards = vec![
        dir.path().join("model-00001-of-00002.safetensors"),
        dir.path().join("model-00002-of-00002.safetensors"),
    ];
    candle_core::safetensors::save(&first, &shards[0]).unwrap();
    candle_core::safetensors::save(&second, &shards[1]).unwrap();
    let config = fixture_dir("tiny-llama").join("config.json");
    let sharded = wick::models::load(&files(&config, shards), &Device::Cpu, DType::F32).unwrap();
    let whole =
        wick::models::load(&files(&config, vec![single]), &Device::Cpu, DType::F32).unwrap();
    let tokens = prompt("tiny-llama", 1);
    assert_eq!(
        last_logits(sharded.as_ref(), &tokens, 64),
        last_logits(whole.as_ref(), &tokens, 64)
    );
}

#[test]
fn half_precision_weights_on_disk_compute_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let single = fixture_dir("tiny-qwen2").join("model.safetensors");
    let config = fixture_dir("tiny-qwen2").join("config.json");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let whole =
        wick::models::load(&files(&config, vec![single]), &Device::Cpu, DType::F32).unwrap();
    let tokens = prompt("tiny-qwen2", 1);
    let reference = last_logits(whole.as_ref(), &tokens, 64);
    for dtype in [DType::BF16, DType::F16] {
        let half: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
            .collect();
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        candle_core::safetensors::save(&half, &path).unwrap();
        let model =
            wick::models::load(&files(&config, vec![path]), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(model.info().dtype, DType::F32);
        let logits = last_logits(model.as_ref(), &tokens, 64);
        let diff = max_abs_diff(&logits, &reference);
        // Rounding the weights moves the logits a little, never wildly.
        assert!(
            diff > 0.0 && diff < 0.1,
            "{dtype:?} weights: logits differ by {diff}"
        );
    }
}

#[test]
fn unsupported_architecture_error_names_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fixture_config("tiny-llama");
    config.insert(
        "architectures".into(),
        serde_json::json!(["FalconForCausalLM"]),
    );
    config.insert(
        "auto_map".into(),
        serde_json::json!({"AutoModelForCausalLM": "modeling.Falcon"}),
    );
    let path = write_config(dir.path(), &config);
    let weights = vec![fixture_dir("tiny-llama").join("model.safetensors")];
    let err = wick::models::load(&files(&path, weights), &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("FalconForCausalLM") && message.contains("LlamaForCausalLM"),
        "{message}"
    );
}

#[test]
fn safetensors_without_config_is_an_error() {
    let mut model_files = files(
        Path::new("unused"),
        vec![fixture_dir("tiny-llama").join("model.safetensors")],
    );
    model_files.config = None;
    let err = wick::models::load(&model_files, &Device::Cpu, DType::F32)
        .err()
        .unwrap();
    assert!(matches!(err, ModelError::MissingConfig), "{err}");
}

#[test]
fn forward_rejects_positions_past_the_cache() {
    let config = fixture_dir("tiny-llama").join("config.json");
    let weights = vec![fixture_dir("tiny-llama").join("model.safetensors")];
    let model = wick::models::load(&files(&config, weights), &Device::Cpu, DType::F32).unwrap();
    let mut cache = KvCache::new(model.info(), 2, 8, &Device::Cpu).unwrap();
    let tokens = [1u32, 2, 3];
    let past_end = [SeqChunk {
        slot: 0,
        start_pos: 6,
        len: 3,
    }];
    assert!(model
        .forward(
            &ForwardBatch {
                token_ids: &tokens,
                seqs: &past_end
            },
            &mut cache
        )
        .is_err());
    let bad_slot = [SeqChunk {
        slot: 2,
        start_pos: 0,
        len: 3,
    }];
    assert!(model
        .forward(
            &ForwardBatch {
                token_ids: &tokens,
                seqs: &bad_slot
            },
            &mut cache
        )
        .is_err());
    let twice = [
        SeqChunk {
            slot: 0,
            start_pos: 0,
            len: 1,
        },
        SeqChunk {
            slot: 0,
            start_pos: 1,
            len: 2,
        },
    ];
    assert!(model
        .forward(
            &ForwardBatch {
                token_ids: &tokens,
                seqs: &twice
            },
            &mut cache
        )
        .is_err());
    let wrong_count = [SeqChunk {
        slot: 0,
        start_pos: 0,
        len: 2,
    }];
    assert!(model
        .forward(
            &ForwardBatch {
                token_ids: &tokens,
                seqs: &wrong_count
            },
            &mut cache
        )
        .is_err());
}

/// With one layer, attention limited to a window of `w` keys sees exactly what full attention sees
/// over the last `w` tokens (RoPE scores depend only on relative positions), so the last token's
/// logits must agree. Checked for prefill at once, chunked prefill and token-by-token decode, for
/// Mistral (every layer windowed) and Gemma2 (window on even layers, soft-capping).
#[test]
fn sliding_window_sees_only_the_last_window_tokens() {
    const WINDOW: usize = 5;
    for fixture in ["tiny-mistral", "tiny-gemma2"] {
        let dir = tempfile::tempdir().unwrap();
        let weights = vec![fixture_dir(fixture).join("model.safetensors")];
        let mut config = fixture_config(fixture);
        config.insert("num_hidden_layers".into(), serde_json::json!(1));
        config.insert("sliding_window".into(), serde_json::json!(WINDOW));
        if config.contains_key("layer_types") {
            config.insert(
                "layer_types".into(),
                serde_json::json!(["sliding_attention"]),
            );
        }
        let windowed = wick::models::load(
            &files(&write_config(dir.path(), &config), weights.clone()),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let full_dir = tempfile::tempdir().unwrap();
        config.remove("sliding_window");
        if config.contains_key("layer_types") {
            config.insert("layer_types".into(), serde_json::json!(["full_attention"]));
        }
        let full = wick::models::load(
            &files(&write_config(full_dir.path(), &config), weights),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();

        let tokens = prompt(fixture, 1);
        assert!(tokens.len() > 3 * WINDOW);
        let tail = &tokens[tokens.len() - WINDOW..];
        let expected = last_logits(full.as_ref(), tail, WINDOW);
        let unrestricted = last_logits(full.as_ref(), &tokens, tokens.len());
        assert!(
            max_abs_diff(&expected, &unrestricted) > 1e-3,
            "{fixture}: the window must matter"
        );
        for chunk in [tokens.len(), 3, 1] {
            let got = last_logits(windowed.as_ref(), &tokens, chunk);
            let diff = max_abs_diff(&got, &expected);
            assert!(
                diff < 1e-4,
                "{fixture}: window, chunks of {chunk}: logits differ by {diff}"
            );
        }
    }
}
