//! Gemma 2 (Hugging Face `Gemma2ForCausalLM`): pre- and post-norms around attention and MLP, `(1 + w)`
//! RMSNorm, embeddings scaled by `sqrt(hidden)`, attention and final logit soft-capping, alternating
//! sliding-window layers, `gelu_pytorch_tanh` MLP, attention scale `query_pre_attn_scalar^-0.5`.
//!
//! Forked from candle-transformers 0.11.1 `src/models/gemma2.rs` (MIT OR Apache-2.0, Copyright the
//! candle authors). What changed: per-token positions and the engine-owned [`KvCache`] through
//! `layers::attend` (which applies the soft-capping and the per-layer window),
//! batched sequences of any lengths, `lm_head` only on each sequence's last token, the attention and
//! MLP projections shared with [`crate::models::llama`].
//! Reference: transformers `models/gemma2/modeling_gemma2.py` (Gemma Team, 2024).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::kv_cache::KvCache;
use crate::models::config::ModelConfig;
use crate::models::layers::{
    embedding_and_head, last_token_logits, softcap, BatchPlan, Embed, Proj, RmsNorm, Rotary,
    RotaryForPass,
};
use crate::models::llama::{model_info, Mlp, SelfAttn};
use crate::models::{CausalLm, ForwardBatch, ModelInfo};

/// Gemma's RMSNorm scales by `1 + weight`; the checkpoint stores `weight`.
fn gemma_rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    let weight = vb.get(size, "weight")?;
    Ok(RmsNorm::new((weight + 1.0)?, eps))
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: SelfAttn,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &ModelConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let window = cfg.layer_windows.get(layer).copied().flatten();
        let mut self_attn = SelfAttn::new(cfg, window, vb.pp("self_attn"))?;
        let scalar = cfg.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f64);
        self_attn.spec.scale = 1.0 / scalar.sqrt();
        self_attn.spec.softcap = cfg.attn_logit_softcapping;
        let norm = |name: &str| gemma_rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            self_attn,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
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
        let h = self.input_layernorm.forward(xs)?;
        let h = self
            .self_attn
            .forward(&h, rotary, rot, plan, layer, cache, None)?;
        let xs = (self.post_attention_layernorm.forward(&h)? + xs)?;
        let h = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&xs)?, None)?;
        self.post_feedforward_layernorm.forward(&h)? + xs
    }
}

/// A Gemma 2 causal LM over an external KV cache.
#[derive(Debug, Clone)]
pub struct Gemma2 {
    embed_tokens: Embed,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    /// `sqrt(hidden_size)`, rounded to the compute dtype as transformers does.
    embed_scale: f64,
    final_logit_softcapping: Option<f64>,
    info: ModelInfo,
    device: Device,
}

impl Gemma2 {
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
        let embed_scale = Tensor::new(&[(cfg.hidden_size as f64).sqrt()], &device)?
            .to_dtype(dtype)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?[0];
        Ok(Self {
            embed_tokens,
            layers,
            norm: gemma_rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?,
            lm_head,
            rotary: Rotary::new(cfg, cfg.max_position_embeddings, false, dtype, &device)?,
            embed_scale,
            final_logit_softcapping: cfg.final_logit_softcapping,
            info: model_info(cfg, dtype),
            device,
        })
    }
}

impl CausalLm for Gemma2 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn forward(&self, batch: &ForwardBatch<'_>, cache: &mut KvCache) -> Result<Tensor> {
        let plan = BatchPlan::new(batch, cache, self.rotary.max_positions()?, &self.device)?;
        let rot = self.rotary.for_pass(&plan)?;
        let mut xs = (self.embed_tokens.forward(&plan.token_ids)? * self.embed_scale)?; // (tokens, hidden)
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &self.rotary, &rot, &plan, i, cache)?;
        }
        let logits = last_token_logits(&xs, &plan, &self.norm, &self.lm_head)?;
        match self.final_logit_softcapping {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }
}
