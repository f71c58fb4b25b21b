//! Model architectures, one file per family, forked from candle-transformers (MIT/Apache-2.0) so that
//! every forward pass takes per-token positions and writes/reads an engine-owned KV cache. This is
//! what lets sequences of different lengths share one batched forward pass.
//!
//! Owned here: `config.json` parsing, weight loading (safetensors, GGUF), the forward pass.
//! Not here: scheduling, sampling, tokenization.

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
pub trait CausalLm: Send {
    /// Shape facts and stop tokens.
    fn info(&self) -> &ModelInfo;

    /// Runs one forward pass over `batch`: writes the new tokens' K/V into `cache` and returns the
    /// logits of each sequence's last new token, shape `(batch.seqs.len(), vocab_size)`, f32.
    fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut KvCache)
        -> candle_core::Result<Tensor>;
}
