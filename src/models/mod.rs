//! Model architectures, one file per family, forked from candle-transformers (MIT/Apache-2.0) so that
//! every forward pass takes per-token positions and writes/reads an engine-owned KV cache. This is
//! what lets sequences of different lengths share one batched forward pass.
//!
//! Owned here: `config.json` parsing, weight loading (safetensors, GGUF), the forward pass.
//! Not here: scheduling, sampling, tokenization.
//!
//! # Layout
//! - [`config`]: tolerant `config.json` parsing into [`ModelConfig`]; [`ModelError`].
//! - `layers`: projections, rotary tables with per-token positions, attention over the slot cache
//!   (batched decode, per-sequence prefill, GQA, sliding window, soft-capping).
//! - [`llama`]: Llama, Mistral and Qwen2 (one graph), also used by GGUF models.
//! - [`phi3`], [`gemma2`]: the other two families.
//! - [`gguf`]: GGUF llama/qwen2 loading with optional CPU re-quantization and row padding.
//! - [`load`] / [`load_with`]: pick the implementation from [`crate::hub::ModelFiles`].

use candle_core::{DType, Tensor};

use crate::engine::kv_cache::KvCache;

/// Facts about a loaded model that the engine needs (cache sizing, stop tokens, limits).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The `architectures[0]` value (or the GGUF `general.architecture`).
    pub architecture: String,
    /// Rows of the output logits.
    pub vocab_size: usize,
    /// Decoder layers (one K and one V cache tensor each).
    pub num_layers: usize,
    /// Key/value heads per layer.
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// The longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// EOS ids from `config.json` (one or many); the tokenizer and `generation_config.json` add more.
    pub eos_token_ids: Vec<u32>,
    /// BOS id if the config names one.
    pub bos_token_id: Option<u32>,
    /// Compute dtype of activations and the KV cache.
    pub dtype: DType,
}

/// One sequence's part of a forward pass: `len` new tokens at positions `start_pos..start_pos + len`
/// of KV slot `slot`. Attention of those tokens covers positions `0..start_pos + len` of that slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqChunk {
    /// KV-cache slot owned by the sequence.
    pub slot: usize,
    /// Position of the first new token (= tokens already in the cache for this slot).
    pub start_pos: usize,
    /// Number of new tokens (1 for decode; a prompt chunk for prefill).
    pub len: usize,
}

/// The input of one forward pass: the new tokens of every sequence concatenated in `seqs` order.
#[derive(Debug, Clone, Copy)]
pub struct ForwardBatch<'a> {
    /// All new token ids, `sum(seqs[i].len)` of them.
    pub token_ids: &'a [u32],
    /// The sequences in this pass.
    pub seqs: &'a [SeqChunk],
}

/// A causal language model over an external KV cache.
pub trait CausalLm: Send + Sync {
    /// Shape facts and stop tokens.
    fn info(&self) -> &ModelInfo;

    /// Runs one forward pass over `batch`: writes the new tokens' K/V into `cache` and returns the
    /// logits of each sequence's last new token, shape `(batch.seqs.len(), vocab_size)`, f32.
    fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut KvCache)
        -> candle_core::Result<Tensor>;
}

pub mod config;
pub(crate) mod cpu_attention;
pub(crate) mod cpu_elementwise;
pub mod cpu_matmul;
pub mod cpu_matmul_q8;
pub mod gemma2;
pub mod gguf;
pub(crate) mod layers;
pub mod llama;
pub mod phi3;

pub use config::{Architecture, ModelConfig, ModelError, RopeScaling};
pub use gguf::GgufOptions;

use candle_core::Device;

use crate::hub::{ModelFiles, WeightFiles};

/// Chooses the compute dtype: `requested` (`f32`, `f16`, `bf16`), or for `auto`/`None` f32 on CPU
/// (candle has no fast bf16 CPU matmul) and bf16 on CUDA.
///
/// # Errors
/// [`ModelError::UnknownDtype`] for any other string.
pub fn dtype_for(device: &Device, requested: Option<&str>) -> Result<DType, ModelError> {
    match requested.map(str::to_ascii_lowercase).as_deref() {
        None | Some("auto") => Ok(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        }),
        Some("f32" | "float32") => Ok(DType::F32),
        Some("f16" | "float16") => Ok(DType::F16),
        Some("bf16" | "bfloat16") => Ok(DType::BF16),
        Some(other) => Err(ModelError::UnknownDtype(other.to_string())),
    }
}

/// Loads a model with default options (see [`load_with`]).
///
/// # Errors
/// As [`load_with`].
pub fn load(
    files: &ModelFiles,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn CausalLm>, ModelError> {
    load_with(files, device, dtype, &GgufOptions::for_device(device))
}

/// Loads a model: safetensors (single or sharded, memory-mapped, converted to `dtype`) with the
/// architecture from `config.json`, or a GGUF file (llama and qwen2 families; computes in f32 whatever
/// `dtype` says, since quantized matmuls take f32 activations).
///
/// # Errors
/// Missing config, unsupported architecture, unreadable or mis-shaped weights.
pub fn load_with(
    files: &ModelFiles,
    device: &Device,
    dtype: DType,
    gguf_options: &GgufOptions,
) -> Result<Box<dyn CausalLm>, ModelError> {
    match &files.weights {
        WeightFiles::Gguf(path) => Ok(Box::new(gguf::load_gguf(path, device, gguf_options)?)),
        WeightFiles::Safetensors(paths) => {
            let config_path = files.config.as_ref().ok_or(ModelError::MissingConfig)?;
            let cfg = ModelConfig::from_file(config_path)?;
            if paths.is_empty() {
                return Err(ModelError::InvalidConfig(
                    "no safetensors files given".into(),
                ));
            }
            // SAFETY: the files are memory-mapped read-only; wick never writes them, and the hub
            // layer hands over complete, verified files.
            let vb =
                unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(paths, dtype, device)? };
            let model: Box<dyn CausalLm> = match cfg.architecture {
                Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => {
                    Box::new(llama::Llama::new(&cfg, vb)?)
                }
                Architecture::Phi3 => Box::new(phi3::Phi3::new(&cfg, vb)?),
                Architecture::Gemma2 => Box::new(gemma2::Gemma2::new(&cfg, vb)?),
            };
            Ok(model)
        }
    }
}
