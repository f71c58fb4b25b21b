//! GGUF loading for the llama family (`general.architecture` = `llama`, which also covers
//! Mistral-style files) and `qwen2`: quantized projections ([`QMatMul`]) plugged into the same
//! [`Llama`] graph, so GGUF models share the batched attention and the engine's KV cache.
//!
//! Forked from candle-transformers 0.11.1 `src/models/quantized_llama.rs` and `quantized_qwen2.rs`
//! (MIT OR Apache-2.0, Copyright the candle authors): the metadata keys, tensor names and the
//! interleaved rotary layout of llama GGUF files (llama.cpp permutes q/k weights, so `rope_i` applies;
//! qwen2 files keep the halves layout). What changed: the model is the shared [`Llama`] struct; the
//! output projection falls back to the tied embedding; Llama 3 `rope_freqs` are honoured; tensors in
//! formats without a fast CPU kernel can be re-quantized at load ([`GgufOptions::requantize`]).

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Activation, Embedding, RmsNorm};

use crate::models::config::{ModelError, RopeScaling};
use crate::models::layers::{AttnSpec, Proj, Rotary};
use crate::models::llama::{DecoderLayer, Llama, Mlp, SelfAttn};
use crate::models::ModelInfo;

/// Options of the GGUF loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufOptions {
    /// Re-quantize Q4_0 / Q4_1 / Q5_0 / Q5_1 weights to this format at load. candle has no fast CPU
    /// kernel for those formats; Q8_0 and Q4K have repacked int8 kernels. A tensor whose row length
    /// is not a multiple of the target block size keeps its format.
    pub requantize: Option<GgmlDType>,
    /// Pad the rows of quantized Q8_0/Q4K/Q6K weights (after any re-quantization) with zeros to a
    /// multiple of 256: candle's repacked x86 kernels need it and are 2-5x faster than the generic
    /// path (SmolLM2's 576-wide rows, for one). Costs the padding in memory.
    pub pad_rows: bool,
}

impl GgufOptions {
    /// On CPU: re-quantize to Q8_0 and pad rows (several times faster decode for Q4_0/Q4_1 files
    /// there). On GPUs: the file's formats as they are.
    pub fn for_device(device: &Device) -> Self {
        Self {
            requantize: device.is_cpu().then_some(GgmlDType::Q8_0),
            pad_rows: device.is_cpu(),
        }
    }
}

/// The GGUF families wick runs.
const SUPPORTED_GGUF: &str = "llama, qwen2 (GGUF `general.architecture`)";

/// Formats without a fast CPU matmul in candle 0.11.
fn is_slow_on_cpu(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    )
}

/// Row length the repacked x86 kernels need a multiple of (`QK_K`).
const REPACK_ROW_MULTIPLE: usize = 256;

/// Formats with repacked x86 kernels in candle 0.11.
fn has_repacked_kernel(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K)
}

/// Applies [`GgufOptions`] to one weight; returns it and the number of zero columns appended.
fn prepare_weight(
    qt: QTensor,
    options: &GgufOptions,
    device: &Device,
) -> Result<(QTensor, usize), ModelError> {
    let row = qt.shape().dims().last().copied().unwrap_or(0);
    let target = match options.requantize {
        Some(target) if is_slow_on_cpu(qt.dtype()) => target,
        _ => qt.dtype(),
    };
    let padding =
        if options.pad_rows && has_repacked_kernel(target) && row % REPACK_ROW_MULTIPLE != 0 {
            row.div_ceil(REPACK_ROW_MULTIPLE) * REPACK_ROW_MULTIPLE - row
        } else {
            0
        };
    if (target == qt.dtype() && padding == 0) || (row + padding) % target.block_size() != 0 {
        return Ok((qt, 0));
    }
    // Quantization runs on the CPU; `quantize_onto` places the result on the model's device.
    let dense = qt.dequantize(&Device::Cpu)?;
    let dense = if padding > 0 {
        dense.pad_with_zeros(candle_core::D::Minus1, 0, padding)?
    } else {
        dense
    };
    Ok((QTensor::quantize_onto(&dense, target, device)?, padding))
}

struct Reader<'a> {
    content: &'a gguf_file::Content,
    file: File,
    device: &'a Device,
    options: &'a GgufOptions,
}

impl Reader<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        if !self.has(name) {
            return Err(ModelError::Gguf(format!("tensor `{name}` is missing")));
        }
        Ok(self.content.tensor(&mut self.file, name, self.device)?)
    }

    /// A dense f32 tensor (norm weights, biases, embeddings).
    fn dense(&mut self, name: &str) -> Result<Tensor, ModelError> {
        let qt = self.qtensor(name)?;
        Ok(qt.dequantize(self.device)?.to_dtype(DType::F32)?)
    }

    fn proj(&mut self, name: &str, bias: Option<&str>) -> Result<Proj, ModelError> {
        let (qt, in_padding) = prepare_weight(self.qtensor(name)?, self.options, self.device)?;
        let bias = match bias {
            Some(b) if self.has(b) => Some(self.dense(b)?),
            _ => None,
        };
        Ok(Proj::Quantized {
            weight: QMatMul::from_qtensor(qt)?,
            bias,
            in_padding,
        })
    }

    fn norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm::new(self.dense(name)?, eps))
    }

    fn meta(&self, key: &str) -> Result<&gguf_file::Value, ModelError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Gguf(format!("metadata `{key}` is missing")))
    }

    fn meta_usize(&self, key: &str) -> Result<usize, ModelError> {
        let value = self.meta(key)?;
        let n = value
            .to_u64()
            .map_err(|e| ModelError::Gguf(format!("metadata `{key}`: {e}")))?;
        Ok(n as usize)
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        let value = self.content.metadata.get(key)?;
        value
            .to_f32()
            .map(f64::from)
            .or_else(|_| value.to_f64())
            .ok()
    }

    fn meta_u32(&self, key: &str) -> Option<u32> {
        let value = self.content.metadata.get(key)?;
        value.to_u64().ok().and_then(|v| u32::try_from(v).ok())
    }
}

/// Reads the metadata of a GGUF file (tokenizer, chat template, hyper-parameters).
///
/// # Errors
/// I/O or a malformed file.
pub fn read_content(path: &Path) -> Result<gguf_file::Content, ModelError> {
    let mut file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(gguf_file::Content::read(&mut file)?)
}

/// Loads a llama- or qwen2-family GGUF file. Activations are f32.
///
/// # Errors
/// Unsupported architecture, missing metadata or tensors, I/O.
pub fn load_gguf(path: &Path, device: &Device, options: &GgufOptions) -> Result<Llama, ModelError> {
    let content = read_content(path)?;
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut r = Reader {
        content: &content,
        file,
        device,
        options,
    };
    let arch = r
        .meta("general.architecture")?
        .to_string()
        .map_err(|e| ModelError::Gguf(format!("`general.architecture`: {e}")))?
        .clone();
    // llama.cpp permutes llama q/k weights for interleaved rotary; qwen2 keeps the HF halves layout.
    let (interleaved, qkv_bias) = match arch.as_str() {
        "llama" => (true, false),
        "qwen2" => (false, true),
        other => {
            return Err(ModelError::UnsupportedArchitecture {
                found: other.to_string(),
                supported: SUPPORTED_GGUF,
            })
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let num_heads = r.meta_usize(&key("attention.head_count"))?;
    let num_kv_heads = r
        .meta_usize(&key("attention.head_count_kv"))
        .unwrap_or(num_heads);
    let num_layers = r.meta_usize(&key("block_count"))?;
    let hidden = r.meta_usize(&key("embedding_length"))?;
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(ModelError::Gguf(format!(
            "head counts {num_heads} / {num_kv_heads} are not a valid GQA layout"
        )));
    }
    let head_dim = r
        .meta_usize(&key("attention.key_length"))
        .unwrap_or(hidden / num_heads);
    let rotary_dim = r
        .meta_usize(&key("rope.dimension_count"))
        .unwrap_or(head_dim);
    let eps = r
        .meta_f64(&key("attention.layer_norm_rms_epsilon"))
        .unwrap_or(1e-6);
    let theta = r.meta_f64(&key("rope.freq_base")).unwrap_or(10_000.0);
    let context = r.meta_usize(&key("context_length")).unwrap_or(4096);

    // Llama 3.1 files carry the frequency factors of the llama3 rope scaling as a tensor.
    let scaling = if r.has("rope_freqs.weight") {
        let factors: Vec<f64> = r
            .dense("rope_freqs.weight")?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        RopeScaling::LongRope {
            short_factor: factors.clone(),
            long_factor: factors,
            original_max_position_embeddings: context,
            attention_factor: 1.0,
        }
    } else {
        RopeScaling::Default
    };
    let rotary = Rotary::with_params(
        theta,
        &scaling,
        rotary_dim,
        context,
        interleaved,
        DType::F32,
        device,
    )?;

    let embed = r.dense("token_embd.weight")?; // (vocab, hidden)
    let (vocab_size, embed_hidden) = embed.dims2()?;
    if embed_hidden != hidden {
        return Err(ModelError::Gguf(format!(
            "token_embd has width {embed_hidden}, metadata says {hidden}"
        )));
    }
    let lm_head = if r.has("output.weight") {
        r.proj("output.weight", None)?
    } else {
        r.proj("token_embd.weight", None)?
    };
    let norm = r.norm("output_norm.weight", eps)?;
    let mut layers = Vec::with_capacity(num_layers);
    for i in 0..num_layers {
        let p = format!("blk.{i}");
        let bias = |name: &str| qkv_bias.then(|| format!("{p}.{name}.bias"));
        let q_bias = bias("attn_q");
        let k_bias = bias("attn_k");
        let v_bias = bias("attn_v");
        let self_attn = SelfAttn {
            q_proj: r.proj(&format!("{p}.attn_q.weight"), q_bias.as_deref())?,
            k_proj: r.proj(&format!("{p}.attn_k.weight"), k_bias.as_deref())?,
            v_proj: r.proj(&format!("{p}.attn_v.weight"), v_bias.as_deref())?,
            o_proj: r.proj(&format!("{p}.attn_output.weight"), None)?,
            spec: AttnSpec {
                num_heads,
                num_kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f64).sqrt(),
                softcap: None,
                sliding_window: None,
            },
        };
        let mlp = Mlp {
            gate_proj: r.proj(&format!("{p}.ffn_gate.weight"), None)?,
            up_proj: r.proj(&format!("{p}.ffn_up.weight"), None)?,
            down_proj: r.proj(&format!("{p}.ffn_down.weight"), None)?,
            act: Activation::Silu,
        };
        layers.push(DecoderLayer {
            self_attn,
            mlp,
            input_layernorm: r.norm(&format!("{p}.attn_norm.weight"), eps)?,
            post_attention_layernorm: r.norm(&format!("{p}.ffn_norm.weight"), eps)?,
        });
    }
    let eos_token_ids = r
        .meta_u32("tokenizer.ggml.eos_token_id")
        .into_iter()
        .collect();
    let info = ModelInfo {
        architecture: arch.clone(),
        vocab_size,
        num_layers,
        num_kv_heads,
        head_dim,
        max_position_embeddings: context,
        eos_token_ids,
        bos_token_id: r.meta_u32("tokenizer.ggml.bos_token_id"),
        dtype: DType::F32,
    };
    Ok(Llama {
        embed_tokens: Embedding::new(embed, hidden),
        layers,
        norm,
        lm_head,
        rotary,
        info,
        device: device.clone(),
    })
}
