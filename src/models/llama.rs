//! The Llama decoder (Hugging Face `LlamaForCausalLM`), which also runs `MistralForCausalLM` (same
//! weights and names, plus a sliding window) and `Qwen2ForCausalLM` (plus q/k/v biases), and the GGUF
//! llama/qwen2 models (same graph, quantized projections, see [`crate::models::gguf`]).
//!
//! Forked from candle-transformers 0.11.1 `src/models/llama.rs`, `mistral.rs` and `qwen2.rs`
//! (MIT OR Apache-2.0, Copyright the candle authors). What changed: the forward pass takes a
//! [`ForwardBatch`] of sequences with per-token positions and reads/writes the engine-owned
//! [`KvCache`] through `layers::attend`; all tokens of all sequences share each linear
//! layer; `lm_head` runs only on each sequence's last token; one struct serves the three families.
//! Reference: transformers `models/llama/modeling_llama.py` (Touvron et al., 2023).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::kv_cache::KvCache;
use crate::models::config::ModelConfig;
use crate::models::layers::{
    attend, decode_self_attention, embedding_and_head, last_token_logits, rms_norm, AttnSpec,
    BatchPlan, Embed, GateUp, Proj, RmsNorm, Rotary, RotaryForPass, Stacked,
};
use crate::models::{CausalLm, ForwardBatch, ModelInfo};

/// Self-attention of one layer: `model.layers.N.self_attn.*`.
#[derive(Debug, Clone)]
pub(crate) struct SelfAttn {
    /// `q_proj`, `k_proj`, `v_proj`.
    pub(crate) qkv: Stacked,
    pub(crate) o_proj: Proj,
    pub(crate) spec: AttnSpec,
}

impl SelfAttn {
    pub(crate) fn new(cfg: &ModelConfig, window: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let (h, kv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        Ok(Self {
            qkv: Stacked::new(vec![
                Proj::dense(cfg.hidden_size, h * hd, cfg.qkv_bias, vb.pp("q_proj"))?,
                Proj::dense(cfg.hidden_size, kv * hd, cfg.qkv_bias, vb.pp("k_proj"))?,
                Proj::dense(cfg.hidden_size, kv * hd, cfg.qkv_bias, vb.pp("v_proj"))?,
            ])?,
            o_proj: Proj::dense(h * hd, cfg.hidden_size, cfg.o_bias, vb.pp("o_proj"))?,
            spec: AttnSpec {
                num_heads: h,
                num_kv_heads: kv,
                head_dim: hd,
                scale: 1.0 / (hd as f64).sqrt(),
                softcap: None,
                sliding_window: window,
            },
        })
    }

    /// `(tokens, hidden)` -> `attention(xs)` (`+ residual` when given, added in the output
    /// projection), `(tokens, hidden)`.
    #[allow(clippy::too_many_arguments)] // the pass's shared state, one borrow each
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        rot: &RotaryForPass,
        plan: &BatchPlan,
        layer: usize,
        cache: &mut KvCache,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let tokens = plan.total_tokens;
        let s = &self.spec;
        let parts = match &self.qkv {
            Stacked::Fused { proj, widths } => {
                let qkv = proj.forward(xs)?;
                // Decode steps on the CPU: straight from the fused output into the cache.
                if let Some(y) = decode_self_attention(&qkv, rotary, rot, plan, layer, s, cache)? {
                    return output_projection(&self.o_proj, &y, residual);
                }
                Stacked::split(&qkv, widths)?
            }
            Stacked::Separate(_) => self.qkv.forward(xs)?,
        };
        let [q, k, v]: [Tensor; 3] = parts
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q/k/v projection gave no 3 parts".into()))?;
        let q = q.reshape((tokens, s.num_heads, s.head_dim))?;
        let k = k.reshape((tokens, s.num_kv_heads, s.head_dim))?;
        let v = v.reshape((tokens, s.num_kv_heads, s.head_dim))?;
        let q = rotary.apply(&q, rot)?;
        let k = rotary.apply(&k, rot)?;
        let y = attend(plan, layer, &q, &k, &v, s, cache)?;
        output_projection(&self.o_proj, &y, residual)
    }
}

/// Gated MLP: `down(act(gate(x)) * up(x))`, `model.layers.N.mlp.*`.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    /// `gate_proj`, `up_proj` and the activation.
    pub(crate) gate_up: GateUp,
    pub(crate) down_proj: Proj,
}

impl Mlp {
    pub(crate) fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up: GateUp::new(
                Proj::dense(h, i, cfg.mlp_bias, vb.pp("gate_proj"))?,
                Proj::dense(h, i, cfg.mlp_bias, vb.pp("up_proj"))?,
                cfg.hidden_act,
            )?,
            down_proj: Proj::dense(i, h, cfg.mlp_bias, vb.pp("down_proj"))?,
        })
    }

    /// `(tokens, hidden)` -> `mlp(xs)` (`+ residual` when given, added in the down projection),
    /// `(tokens, hidden)`.
    pub(crate) fn forward(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        output_projection(&self.down_proj, &self.gate_up.forward(xs)?, residual)
    }
}

/// `proj(xs)`, plus `residual` in the same pass when there is one.
fn output_projection(proj: &Proj, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    match residual {
        Some(residual) => proj.forward_residual(xs, residual),
        None => proj.forward(xs),
    }
}

/// One decoder layer: `model.layers.N`.
#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    pub(crate) self_attn: SelfAttn,
    pub(crate) mlp: Mlp,
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let window = cfg.layer_windows.get(layer).copied().flatten();
        Ok(Self {
            self_attn: SelfAttn::new(cfg, window, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        rot: &RotaryForPass,
        plan: &BatchPlan,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        // Each residual add happens inside the projection before it (`forward_residual`).
        let h = self.input_layernorm.forward(xs)?;
        let xs = self
            .self_attn
            .forward(&h, rotary, rot, plan, layer, cache, Some(xs))?;
        let h = self.post_attention_layernorm.forward(&xs)?;
        self.mlp.forward(&h, Some(&xs))
    }
}

/// A Llama-family causal LM over an external KV cache.
#[derive(Debug, Clone)]
pub struct Llama {
    pub(crate) embed_tokens: Embed,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Proj,
    pub(crate) rotary: Rotary,
    pub(crate) info: ModelInfo,
    pub(crate) device: Device,
}

impl Llama {
    /// Builds the model from safetensors weights named as in the Hugging Face checkpoint.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let vb_m = vb.pp("model");
        let (embed_tokens, lm_head) = embedding_and_head(cfg, &vb)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, vb_m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?,
            lm_head,
            rotary: Rotary::new(cfg, cfg.max_position_embeddings, false, dtype, &device)?,
            info: model_info(cfg, dtype),
            device,
        })
    }
}

/// The [`ModelInfo`] of a config at a compute dtype.
pub(crate) fn model_info(cfg: &ModelConfig, dtype: DType) -> ModelInfo {
    ModelInfo {
        architecture: cfg.architecture.hf_name().to_string(),
        vocab_size: cfg.vocab_size,
        num_layers: cfg.num_hidden_layers,
        num_kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        max_position_embeddings: cfg.max_position_embeddings,
        eos_token_ids: cfg.eos_token_ids.clone(),
        bos_token_id: cfg.bos_token_id,
        dtype,
    }
}

impl CausalLm for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut KvCache) -> Result<Tensor> {
        let plan = BatchPlan::new(batch, cache, self.rotary.max_positions()?, &self.device)?;
        let rot = self.rotary.for_pass(&plan)?;
        let mut xs = self.embed_tokens.forward(&plan.token_ids)?; // (tokens, hidden)
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &self.rotary, &rot, &plan, i, cache)?;
        }
        last_token_logits(&xs, &plan, &self.norm, &self.lm_head)
    }
}
