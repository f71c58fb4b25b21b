//! Engine benchmark (`cargo bench --bench engine`, harness = false).
//!
//! Measures decode tokens/s at 1, 8 and 32 concurrent requests and time to first token for
//! (a) an f32 safetensors llama with SmolLM2-135M's shape and random weights, written to a temp file
//! at bench time, and (b) the SmolLM2-135M-Instruct Q4_1 GGUF when `models/` holds it (re-quantized to
//! Q8_0 at load, wick's CPU default, and as stored). Every figure sits next to the memory-bandwidth
//! bound of the machine: bytes read per decode step (weights + KV cache) over a read bandwidth measured
//! the same way each run (a multi-threaded sum over a 1 GiB buffer, with the engine's thread count).
#![allow(clippy::unwrap_used)] // A benchmark binary: failing loudly is what we want.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use wick::engine::{
    spawn, EngineConfig, EngineHandle, GenerateRequest, SamplingParams, SeqEvent, SeqSummary,
};
use wick::hub::{ModelFiles, WeightFiles};
use wick::models::cpu_matmul::{packed_kernels_apply, set_cpu_matmul, CpuMatmul};
use wick::models::cpu_matmul_q8::packed_q8_applies;
use wick::models::{load_with, GgufOptions};
use wick::tokenizer::Tokenizer;

const CONCURRENCY: [usize; 3] = [1, 8, 32];
const PROMPT_LEN: usize = 32;
const MAX_TOKENS: usize = 48;
const MAX_MODEL_LEN: usize = 256;
const GGUF_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// SmolLM2-135M's shape.
const HIDDEN: usize = 576;
const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const MLP: usize = 1536;
const VOCAB: usize = 49152;
const HEAD_DIM: usize = HIDDEN / HEADS;

fn main() -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    println!("threads: {threads} (RAYON_NUM_THREADS / CANDLE_NUM_THREADS)");
    let probe = BandwidthProbe::new(threads);
    println!(
        "memory read bandwidth at start: {:.2} GB/s (1 GiB buffer, {threads} threads, best of 3; re-measured before every row)",
        probe.measure() / 1e9
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let dir = tempfile::tempdir()?;
    let (files, weight_bytes) = write_random_llama(dir.path())?;
    let kv_bytes_per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4;
    let mut rows = Vec::new();
    // The same f32 checkpoint through candle's matmul (`gemm`) and through wick's packed AVX-512
    // kernels (what `WICK_CPU_MATMUL=auto`, the default, uses where the CPU has AVX-512F).
    for (label, choice) in [
        (
            "f32 safetensors (random, 135M), candle matmul",
            CpuMatmul::Candle,
        ),
        (
            "f32 safetensors (random, 135M), wick packed kernels",
            CpuMatmul::Auto,
        ),
    ] {
        if !selected(label) {
            continue;
        }
        set_cpu_matmul(choice);
        if choice == CpuMatmul::Auto && !packed_kernels_apply(&Device::Cpu, DType::F32) {
            println!("{label}: skipped (this CPU has no AVX-512F)");
            continue;
        }
        let model = wick::models::load(&files, &Device::Cpu, DType::F32)?;
        let engine = start_engine(
            model,
            Arc::new(word_level_tokenizer()?),
            "f32-random-smollm2-shape",
        )?;
        for c in schedule(&CONCURRENCY) {
            rows.push(run_level(
                &rt,
                &engine,
                label,
                c,
                weight_bytes,
                kv_bytes_per_token,
                &probe,
            )?);
        }
        drop(engine);
    }
    set_cpu_matmul(CpuMatmul::Auto);

    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(GGUF_PATH);
    if gguf.exists() {
        let files = ModelFiles {
            config: None,
            weights: WeightFiles::Gguf(gguf.clone()),
            tokenizer_json: None,
            tokenizer_config: None,
            generation_config: None,
        };
        let tokenizer = Arc::new(wick::engine::loader::load_tokenizer(&files, None)?);
        let as_stored = GgufOptions {
            requantize: None,
            pad_rows: false,
        };
        let packed_q8 = packed_q8_applies(&Device::Cpu);
        for (label, choice, options, levels) in [
            (
                "GGUF Q4_1 -> Q8_0 at load, wick packed VNNI kernels",
                CpuMatmul::Auto,
                GgufOptions::for_device(&Device::Cpu),
                &CONCURRENCY[..],
            ),
            (
                "GGUF Q4_1 -> Q8_0 (rows padded) at load, candle kernels",
                CpuMatmul::Candle,
                GgufOptions::for_device(&Device::Cpu),
                &CONCURRENCY[..],
            ),
            (
                "GGUF Q4_1 as stored",
                CpuMatmul::Candle,
                as_stored,
                &CONCURRENCY[..2],
            ),
        ] {
            if !selected(label) {
                continue;
            }
            if choice == CpuMatmul::Auto && !packed_q8 {
                println!("{label}: skipped (this CPU has no AVX-512 VNNI)");
                continue;
            }
            set_cpu_matmul(choice);
            let started = Instant::now();
            let model = load_with(&files, &Device::Cpu, DType::F32, &options)?;
            println!("{label}: loaded in {:.2?}", started.elapsed());
            let packed = choice == CpuMatmul::Auto;
            set_cpu_matmul(CpuMatmul::Auto);
            let bytes = gguf_weight_bytes(&gguf, &options, packed)?;
            let engine = start_engine(model, Arc::clone(&tokenizer), label)?;
            for c in schedule(levels) {
                rows.push(run_level(
                    &rt,
                    &engine,
                    label,
                    c,
                    bytes,
                    kv_bytes_per_token,
                    &probe,
                )?);
            }
        }
    } else {
        println!(
            "{GGUF_PATH} not found: GGUF rows skipped (see tests/fixtures/README.md to get it)"
        );
    }

    println!();
    println!("| model | concurrent | TTFT mean | decode ms/step | decode tok/s (aggregate) | bytes read/step | bandwidth | bandwidth bound tok/s | % of bound | CPU share |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} ms | {:.1} | {:.1} | {:.0} MB | {:.1} GB/s | {:.1} | {:.0}% | {:.2} |",
            r.label,
            r.concurrency,
            r.ttft.as_secs_f64() * 1e3,
            r.step.as_secs_f64() * 1e3,
            r.tokens_per_s,
            r.bytes_per_step as f64 / 1e6,
            r.bandwidth / 1e9,
            r.bound_tokens_per_s,
            100.0 * r.tokens_per_s / r.bound_tokens_per_s,
            r.cpu_share
        );
    }
    for label in rows
        .iter()
        .map(|r| r.label)
        .collect::<std::collections::BTreeSet<_>>()
    {
        // Round k of each level ran back to back (see `schedule`): one ratio per round, from
        // measurements a few seconds apart, then the median and the range.
        let rates = |c: usize| -> Vec<f64> {
            rows.iter()
                .filter(|r| r.label == label && r.concurrency == c)
                .map(|r| r.tokens_per_s)
                .collect()
        };
        let mut ratios: Vec<f64> = rates(32)
            .iter()
            .zip(rates(1))
            .map(|(many, one)| many / one)
            .collect();
        ratios.sort_by(f64::total_cmp);
        if let (Some(median), Some(low), Some(high)) =
            (ratios.get(ratios.len() / 2), ratios.first(), ratios.last())
        {
            println!(
                "{label}: aggregate at 32 concurrent = {median:.1}x batch 1 (median of {} round(s), range {low:.1}x to {high:.1}x)",
                ratios.len()
            );
        }
    }
    Ok(())
}

struct Row {
    label: &'static str,
    concurrency: usize,
    ttft: Duration,
    step: Duration,
    tokens_per_s: f64,
    bytes_per_step: usize,
    bandwidth: f64,
    bound_tokens_per_s: f64,
    /// CPU seconds used per wall second while the level ran (below the thread count = contention).
    cpu_share: f64,
}

fn start_engine(
    model: Box<dyn wick::models::CausalLm>,
    tokenizer: Arc<Tokenizer>,
    name: &str,
) -> Result<EngineHandle> {
    let config = EngineConfig {
        max_num_batched_tokens: 32 * PROMPT_LEN,
        ..EngineConfig::for_cpu(name, MAX_MODEL_LEN, 32)
    };
    Ok(spawn(model, tokenizer, config)?)
}

/// `concurrency` requests at once, all admitted and prefilled in one step, then decoded in lockstep:
/// the mean time per output token is the decode step time.
fn run_level(
    rt: &tokio::runtime::Runtime,
    engine: &EngineHandle,
    label: &'static str,
    concurrency: usize,
    weight_bytes: usize,
    kv_bytes_per_token: usize,
    probe: &BandwidthProbe,
) -> Result<Row> {
    // Warm-up: first-touch of weights and cache pages.
    rt.block_on(generate_all(engine, 1, 4, 999))?;
    let bandwidth = probe.measure();
    let (wall_before, cpu_before) = (Instant::now(), process_cpu_time());
    let summaries = rt.block_on(generate_all(engine, concurrency, MAX_TOKENS, 0))?;
    let cpu_share =
        (process_cpu_time() - cpu_before).as_secs_f64() / wall_before.elapsed().as_secs_f64();
    let mean = |f: &dyn Fn(&SeqSummary) -> Duration| {
        summaries.iter().map(f).sum::<Duration>() / summaries.len() as u32
    };
    let ttft = mean(&|s| s.time_to_first_token.unwrap_or_default());
    let step = mean(&|s| s.time_per_output_token.unwrap_or_default());
    let tokens_per_s = concurrency as f64 / step.as_secs_f64();
    // Mean context over the decode phase, per sequence.
    let mean_ctx = PROMPT_LEN + MAX_TOKENS / 2;
    let bytes_per_step = weight_bytes + concurrency * mean_ctx * kv_bytes_per_token;
    let bound_tokens_per_s = concurrency as f64 * bandwidth / bytes_per_step as f64;
    println!(
        "{label} x{concurrency}: TTFT {:.0} ms, {:.1} ms/step, {tokens_per_s:.1} tok/s (bound {bound_tokens_per_s:.1} at {:.1} GB/s), CPU share {cpu_share:.2}",
        ttft.as_secs_f64() * 1e3,
        step.as_secs_f64() * 1e3,
        bandwidth / 1e9
    );
    Ok(Row {
        label,
        concurrency,
        ttft,
        step,
        tokens_per_s,
        bytes_per_step,
        bandwidth,
        bound_tokens_per_s,
        cpu_share,
    })
}

/// CPU time (user + system) the whole process used so far.
fn process_cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer is always allowed.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

async fn generate_all(
    engine: &EngineHandle,
    n: usize,
    max_tokens: usize,
    salt: u32,
) -> Result<Vec<SeqSummary>> {
    let mut receivers = Vec::new();
    for i in 0..n as u32 {
        // Distinct prompts of ordinary token ids.
        let prompt_ids: Vec<u32> = (0..PROMPT_LEN as u32)
            .map(|j| 1000 + (i * 131 + j * 17 + salt) % 20000)
            .collect();
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        };
        receivers.push(engine.submit(GenerateRequest {
            request_id: format!("bench-{i}"),
            prompt_ids,
            params,
        })?);
    }
    let mut summaries = Vec::new();
    for mut rx in receivers {
        let summary = tokio::time::timeout(Duration::from_secs(600), async {
            while let Some(event) = rx.recv().await {
                if let SeqEvent::Finished(s) = event {
                    return Some(s);
                }
            }
            None
        })
        .await
        .context("request timed out")?
        .context("engine stopped")?;
        anyhow::ensure!(
            summary.error.is_none(),
            "generation failed: {:?}",
            summary.error
        );
        anyhow::ensure!(
            summary.completion_tokens == max_tokens,
            "short generation: {summary:?}"
        );
        summaries.push(summary);
    }
    Ok(summaries)
}

/// Read bandwidth: threads each sum their share of a 1 GiB buffer (allocated once); best of 3 passes.
struct BandwidthProbe {
    buffer: Vec<u64>,
    threads: usize,
}

impl BandwidthProbe {
    fn new(threads: usize) -> Self {
        let len = (1usize << 30) / 8;
        let buffer = (0..len as u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        BandwidthProbe {
            buffer,
            threads: threads.max(1),
        }
    }

    /// Bytes per second.
    fn measure(&self) -> f64 {
        let chunk = self.buffer.len().div_ceil(self.threads);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            let total: u64 = std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .buffer
                    .chunks(chunk)
                    .map(|part| {
                        s.spawn(move || {
                            // Four streams read in lockstep (hardware prefetchers track several;
                            // the packed kernels read two weight panels at a time), eight
                            // independent lanes each so the sum is not latency-bound.
                            let quarter = part.len() / STREAMS / 8 * 8;
                            let streams: Vec<&[u64]> = (0..STREAMS)
                                .map(|i| &part[i * quarter..(i + 1) * quarter])
                                .collect();
                            let mut lanes = [[0u64; 8]; STREAMS];
                            for block in 0..quarter / 8 {
                                for (stream_lanes, stream) in lanes.iter_mut().zip(&streams) {
                                    let values = &stream[block * 8..block * 8 + 8];
                                    for (lane, v) in stream_lanes.iter_mut().zip(values) {
                                        *lane = lane.wrapping_add(*v);
                                    }
                                }
                            }
                            lanes.iter().flatten().fold(0u64, |a, b| a.wrapping_add(*b))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .fold(0u64, |a, b| a.wrapping_add(b))
            });
            std::hint::black_box(total);
            best = best.min(started.elapsed().as_secs_f64());
        }
        let read = self
            .buffer
            .chunks(chunk)
            .map(|part| part.len() / STREAMS / 8 * 8 * STREAMS)
            .sum::<usize>();
        (read * 8) as f64 / best
    }
}

/// `BENCH_ONLY=<text>` runs only the models whose label contains `<text>` (e.g. `packed`, `GGUF`).
fn selected(label: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| label.contains(only.as_str()))
}

/// The levels to run, in order: each round runs every selected level once, then the next round
/// starts (`1, 8, 32, 1, 8, 32, ...`), so the levels of one round see the same machine (a shared
/// VM's memory bandwidth and clock drift over minutes).
fn schedule(levels: &[usize]) -> Vec<usize> {
    let selected: Vec<usize> = levels
        .iter()
        .copied()
        .filter(|c| level_selected(*c))
        .collect();
    (0..rounds())
        .flat_map(|_| selected.iter().copied())
        .collect()
}

/// `BENCH_ROUNDS=<n>` runs every level `n` times (default 1), round by round (see `schedule`): one
/// table row each, and the 32-over-1 ratio per round.
fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// `BENCH_LEVELS=<n,n,...>` runs only those concurrency levels (e.g. `32` while profiling).
fn level_selected(concurrency: usize) -> bool {
    std::env::var("BENCH_LEVELS").map_or(true, |levels| {
        levels
            .split(',')
            .any(|level| level.trim().parse() == Ok(concurrency))
    })
}

/// Concurrent read streams per thread in the bandwidth probe.
const STREAMS: usize = 4;

/// Writes a SmolLM2-135M-shaped llama (tied embeddings) with random N(0, 0.02) f32 weights.
/// Returns the files and the bytes a decode step reads from the weights (every matrix once; the
/// tied embedding is read in full by the output projection).
fn write_random_llama(dir: &Path) -> Result<(ModelFiles, usize)> {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let started = Instant::now();
    let dev = Device::Cpu;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev);
    let ones = |n: usize| Tensor::ones(n, DType::F32, &dev);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("model.embed_tokens.weight".into(), rand(&[VOCAB, HIDDEN])?);
    tensors.insert("model.norm.weight".into(), ones(HIDDEN)?);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        tensors.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rand(&[HIDDEN, HIDDEN])?,
        );
        tensors.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rand(&[KV_HEADS * HEAD_DIM, HIDDEN])?,
        );
        tensors.insert(
            format!("{p}.self_attn.v_proj.weight"),
            rand(&[KV_HEADS * HEAD_DIM, HIDDEN])?,
        );
        tensors.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rand(&[HIDDEN, HIDDEN])?,
        );
        tensors.insert(format!("{p}.mlp.gate_proj.weight"), rand(&[MLP, HIDDEN])?);
        tensors.insert(format!("{p}.mlp.up_proj.weight"), rand(&[MLP, HIDDEN])?);
        tensors.insert(format!("{p}.mlp.down_proj.weight"), rand(&[HIDDEN, MLP])?);
        tensors.insert(format!("{p}.input_layernorm.weight"), ones(HIDDEN)?);
        tensors.insert(
            format!("{p}.post_attention_layernorm.weight"),
            ones(HIDDEN)?,
        );
    }
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;
    println!(
        "random f32 model: {:.1}M parameters, written in {:.2?}",
        params as f64 / 1e6,
        started.elapsed()
    );
    let files = ModelFiles {
        config: Some(dir.join("config.json")),
        weights: WeightFiles::Safetensors(vec![weights]),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: None,
    };
    Ok((files, params * 4))
}

/// A word-level tokenizer covering the model's whole vocabulary (the bench never needs real text).
fn word_level_tokenizer() -> Result<Tokenizer> {
    let vocab: HashMap<String, u32> = (0..VOCAB as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .map_err(|e| anyhow::anyhow!("word-level tokenizer: {e}"))?;
    Ok(Tokenizer {
        inner: tokenizers::Tokenizer::new(model),
        eos_token_ids: Vec::new(),
        bos_token: None,
        eos_token: None,
        chat_template: None,
    })
}

/// Bytes of the GGUF's matrices as the model holds them (re-quantized and row-padded as `options` say).
fn gguf_weight_bytes(path: &Path, options: &GgufOptions, packed_q8: bool) -> Result<usize> {
    const PAD: usize = 256;
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut bytes = 0;
    for info in content.tensor_infos.values() {
        let dims = info.shape.dims();
        if dims.len() < 2 {
            continue;
        }
        let row = dims[dims.len() - 1];
        let rows = info.shape.elem_count() / row;
        let slow = matches!(
            info.ggml_dtype,
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
        );
        let dtype = match options.requantize {
            Some(target) if slow && row % target.block_size() == 0 => target,
            _ => info.ggml_dtype,
        };
        if packed_q8 && dtype == GgmlDType::Q8_0 {
            // wick's packed layout: 16 rows x 32 columns = 512 quant bytes + 16 f32 scales.
            bytes += rows.div_ceil(16) * 16 * (row / 32) * (512 + 64) / 16;
            continue;
        }
        let repacked = matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K);
        let row = if options.pad_rows && repacked {
            row.div_ceil(PAD) * PAD
        } else {
            row
        };
        bytes += rows * row / dtype.block_size() * dtype.type_size();
    }
    Ok(bytes)
}
