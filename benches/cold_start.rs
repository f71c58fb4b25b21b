//! Cold-start benchmark (`cargo bench --bench cold_start`, harness = false).
//!
//! Measures process start → model loaded → ready (warm-up done) → one job answered, by spawning the
//! release `wick` binary with `--test-input handler-tests/chat_capital_of_france.json`, for
//! (a) the SmolLM2-135M-Instruct Q4_1 GGUF in `models/` and (b) the same model as an f32 safetensors
//! directory in the Hugging Face layout, built here from the GGUF: every tensor dequantized to f32,
//! renamed to the HF llama names, q/k rows put back from llama.cpp's interleaved rotary order into the
//! HF halves order; `config.json`, `tokenizer.json`, `tokenizer_config.json` (chat template, bos/eos)
//! and `generation_config.json` from the GGUF metadata. Both must answer "Paris".
//!
//! Times come from wick's own log lines (`model files resolved`, `model loaded`, `warm-up done`,
//! RFC 3339 UTC timestamps) against the wall clock read just before the spawn. Rows are taken with a
//! warm page cache (files just written or read) and, when `/proc/sys/vm/drop_caches` is writable
//! (root), with a cold one (sync + drop before each run; that also evicts the `wick` binary itself).
//!
//! Env: `WICK_BIN` (default `$CARGO_TARGET_DIR/release/wick`, else `target/release/wick`),
//! `COLD_START_RUNS` (default 3).
#![allow(clippy::unwrap_used)] // A benchmark binary: failing loudly is what we want.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::{Device, Tensor};

const GGUF_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const TEST_INPUT: &str = "handler-tests/chat_capital_of_france.json";

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gguf = root.join(GGUF_PATH);
    if !gguf.exists() {
        println!("cold_start: skipped, {GGUF_PATH} is not present");
        return Ok(());
    }
    let wick_bin = std::env::var_os("WICK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"))
                .join("release")
                .join("wick")
        });
    if !wick_bin.exists() {
        bail!(
            "{} not found: run `cargo build --release --bin wick` or set WICK_BIN",
            wick_bin.display()
        );
    }
    let runs: usize = std::env::var("COLD_START_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);

    let dir = tempfile::tempdir()?;
    let hf_dir = dir.path().join("SmolLM2-135M-Instruct-f32");
    let started = Instant::now();
    let (params, bytes) = write_hf_dir_from_gguf(&gguf, &hf_dir)?;
    println!(
        "f32 safetensors directory written from the GGUF in {:.1} s: {:.1} M parameters, model.safetensors {:.1} MB",
        started.elapsed().as_secs_f64(),
        params as f64 / 1e6,
        bytes as f64 / 1e6
    );
    println!(
        "GGUF: {:.1} MB",
        std::fs::metadata(&gguf)?.len() as f64 / 1e6
    );
    println!("wick: {}", wick_bin.display());

    let can_drop = drop_page_cache().is_ok();
    if !can_drop {
        println!("cold page cache: not measured, /proc/sys/vm/drop_caches is not writable here");
    }
    let models = [
        ("GGUF Q4_1", gguf.clone()),
        ("f32 safetensors", hf_dir.clone()),
    ];
    println!(
        "| model | page cache | run | start → files resolved | start → model loaded | start → ready (warm-up done) | start → job answered, process exited |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (label, path) in &models {
        let mut caches = vec![false];
        if can_drop {
            caches.push(true);
        }
        for cold in caches {
            // One untimed run first on the warm path, so the page cache holds binary and weights.
            if !cold {
                run_wick(&wick_bin, root, path)?;
            }
            let mut rows = Vec::new();
            for run in 1..=runs {
                if cold {
                    drop_page_cache().context("drop_caches")?;
                }
                let t = run_wick(&wick_bin, root, path)?;
                println!(
                    "| {label} | {} | {run} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
                    if cold { "cold (dropped)" } else { "warm" },
                    t.resolved_ms,
                    t.loaded_ms,
                    t.ready_ms,
                    t.total_ms
                );
                rows.push(t);
            }
            let median = |f: fn(&Timings) -> f64| {
                let mut v: Vec<f64> = rows.iter().map(f).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            println!(
                "| {label} | {} | median | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
                if cold { "cold (dropped)" } else { "warm" },
                median(|t| t.resolved_ms),
                median(|t| t.loaded_ms),
                median(|t| t.ready_ms),
                median(|t| t.total_ms)
            );
        }
    }
    Ok(())
}

/// Milliseconds from the spawn to each log line, and to the process exit.
struct Timings {
    resolved_ms: f64,
    loaded_ms: f64,
    ready_ms: f64,
    total_ms: f64,
}

/// Spawns wick once on `model` with the France chat; checks the answer names Paris.
fn run_wick(wick_bin: &Path, root: &Path, model: &Path) -> Result<Timings> {
    let wall_start = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i128;
    let started = Instant::now();
    let output = Command::new(wick_bin)
        .current_dir(root)
        .arg("--test-input")
        .arg(TEST_INPUT)
        .env("MODEL_NAME", model)
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()?;
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() || !stdout.contains("Paris") {
        bail!(
            "wick on {} failed ({}): stdout {stdout}\nstderr {stderr}",
            model.display(),
            output.status
        );
    }
    let at = |needle: &str| -> Result<f64> {
        let line = stderr
            .lines()
            .find(|l| l.contains(needle))
            .ok_or_else(|| anyhow!("no `{needle}` line in wick's log:\n{stderr}"))?;
        let stamp = line.split_whitespace().next().unwrap_or_default();
        Ok((parse_rfc3339_micros(stamp)? - wall_start) as f64 / 1e3)
    };
    Ok(Timings {
        resolved_ms: at("model files resolved")?,
        loaded_ms: at("model loaded")?,
        ready_ms: at("warm-up done")?,
        total_ms,
    })
}

/// `2026-11-27T12:37:29.817036Z` → microseconds since the Unix epoch.
fn parse_rfc3339_micros(stamp: &str) -> Result<i128> {
    let bad = || anyhow!("unexpected timestamp `{stamp}`");
    let stamp = stamp.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = stamp.split_once('T').ok_or_else(bad)?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = match (d.next(), d.next(), d.next()) {
        (Some(Ok(y)), Some(Ok(m)), Some(Ok(day))) => (y, m, day),
        _ => return Err(bad()),
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (hh, mm, ss) = match (t.next(), t.next(), t.next()) {
        (Some(Ok(hh)), Some(Ok(mm)), Some(Ok(ss))) => (hh, mm, ss),
        _ => return Err(bad()),
    };
    let frac_digits: String = frac.chars().take(6).collect();
    let micros_frac =
        frac_digits.parse::<i64>().map_err(|_| bad())? * 10i64.pow(6 - frac_digits.len() as u32);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Ok(i128::from(secs) * 1_000_000 + i128::from(micros_frac))
}

/// `sync`, then drops the page cache, dentries and inodes (needs root).
fn drop_page_cache() -> Result<()> {
    // SAFETY: `sync(2)` takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    Ok(())
}

fn meta<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| anyhow!("GGUF metadata `{key}` is missing"))
}

fn meta_usize(content: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = meta(content, key)?;
    Ok(v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))?)
}

fn meta_f64(content: &gguf_file::Content, key: &str) -> Result<f64> {
    Ok(f64::from(meta(content, key)?.to_f32()?))
}

/// The HF llama name of a GGUF tensor name.
fn hf_name(gguf_name: &str) -> Result<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Ok(name.to_string());
    }
    let rest = gguf_name
        .strip_prefix("blk.")
        .ok_or_else(|| anyhow!("unexpected GGUF tensor `{gguf_name}`"))?;
    let (layer, part) = rest
        .split_once('.')
        .ok_or_else(|| anyhow!("unexpected GGUF tensor `{gguf_name}`"))?;
    let hf_part = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => bail!("unexpected GGUF tensor `{gguf_name}`"),
    };
    Ok(format!("model.layers.{layer}.{hf_part}"))
}

/// Undoes llama.cpp's q/k permutation: GGUF rows are, per head, `(half_index, pair)` interleaved;
/// HF rows are `(pair, half_index)`, the two rotary halves one after the other.
/// `w`: (heads * head_dim, hidden) → same shape.
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, hidden) = w.dims2()?;
    let head_dim = out / heads;
    Ok(w.reshape((heads, head_dim / 2, 2, hidden))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, hidden))?)
}

/// Writes an HF-layout llama directory from a llama GGUF; returns (parameters, safetensors bytes).
fn write_hf_dir_from_gguf(gguf: &Path, dir: &Path) -> Result<(usize, u64)> {
    std::fs::create_dir_all(dir)?;
    let mut file = File::open(gguf)?;
    let content = gguf_file::Content::read(&mut file)?;
    let arch = meta(&content, "general.architecture")?.to_string()?.clone();
    if arch != "llama" {
        bail!("cold_start builds a llama directory; the GGUF is `{arch}`");
    }
    let key = |k: &str| format!("llama.{k}");
    let heads = meta_usize(&content, &key("attention.head_count"))?;
    let kv_heads = meta_usize(&content, &key("attention.head_count_kv")).unwrap_or(heads);
    let layers = meta_usize(&content, &key("block_count"))?;
    let hidden = meta_usize(&content, &key("embedding_length"))?;
    let intermediate = meta_usize(&content, &key("feed_forward_length"))?;
    let context = meta_usize(&content, &key("context_length"))?;
    let eps = meta_f64(&content, &key("attention.layer_norm_rms_epsilon"))?;
    let theta = meta_f64(&content, &key("rope.freq_base")).unwrap_or(10_000.0);
    let bos_id = meta_usize(&content, "tokenizer.ggml.bos_token_id")?;
    let eos_id = meta_usize(&content, "tokenizer.ggml.eos_token_id")?;

    let mut tensors = HashMap::new();
    let mut params = 0;
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut file, name, &Device::Cpu)?;
        let mut w = q.dequantize(&Device::Cpu)?; // f32, GGUF dims reversed = torch order
        if name.ends_with("attn_q.weight") {
            w = unpermute_rows(&w, heads)?;
        } else if name.ends_with("attn_k.weight") {
            w = unpermute_rows(&w, kv_heads)?;
        }
        params += w.elem_count();
        tensors.insert(hf_name(name)?, w);
    }
    let tied = !tensors.contains_key("lm_head.weight");
    let vocab = tensors
        .get("model.embed_tokens.weight")
        .ok_or_else(|| anyhow!("GGUF has no token_embd.weight"))?
        .dims2()?
        .0;
    let st_path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st_path)?;

    let tokenizer = tokenizers::Tokenizer::from_gguf(&content)?;
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("tokenizer.json: {e}"))?;
    let token_text = |id: usize| {
        tokenizer
            .id_to_token(id as u32)
            .ok_or_else(|| anyhow!("token id {id} is not in the vocabulary"))
    };
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": context,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let chat_template = meta(&content, "tokenizer.chat_template")?.to_string()?;
    let tokenizer_config = serde_json::json!({
        "bos_token": token_text(bos_id)?,
        "eos_token": token_text(eos_id)?,
        "chat_template": chat_template,
        "model_max_length": context,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tokenizer_config)?,
    )?;
    let generation_config = serde_json::json!({
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    });
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_vec_pretty(&generation_config)?,
    )?;
    Ok((params, std::fs::metadata(&st_path)?.len()))
}
