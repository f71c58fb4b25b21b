//! The KV cache, owned by the engine and lent to the model for each forward pass.
//!
//! A slot cache: per layer one K and one V tensor of shape `(num_slots, kv_heads, max_ctx, head_dim)`.
//! A sequence holds one slot for its life; its tokens live at positions `0..len` of that slot.

use candle_core::Tensor;

/// Per-layer K and V tensors, each `(num_slots, kv_heads, max_ctx, head_dim)`.
#[derive(Debug)]
pub struct KvCache {
    /// One `(k, v)` pair per decoder layer.
    pub layers: Vec<(Tensor, Tensor)>,
}
