//! Phi-3 (Hugging Face `Phi3ForCausalLM`: Phi-3, Phi-3.5-mini, Phi-4-mini): a Llama-like decoder with
//! fused `qkv_proj` and `gate_up_proj` weights, optional partial rotary and longrope scaling.
//!
//! Forked from candle-transformers 0.11.1 `src/models/phi3.rs` (MIT OR Apache-2.0, Copyright the
//! candle authors). What changed: per-token positions and the engine-owned [`KvCache`] through
//! `layers::attend`, batched sequences of any lengths, `lm_head` only on each
//! sequence's last token, partial rotary and per-sequence longrope selection.
//! Reference: transformers `models/phi3/modeling_phi3.py` (Abdin et al., 2024).

use candle_core::{Device, Result, Tensor, D};
use candle_nn::{Activation, VarBuilder};

use crate::engine::kv_cache::KvCache;
use crate::models::config::ModelConfig;
use crate::models::layers::{
    attend, embedding_and_head, gated_activation, last_token_logits, rms_norm, AttnSpec, BatchPlan,
    Embed, Proj, RmsNorm, Rotary, RotaryForPass,
};
use crate::models::llama::model_info;
use crate::models::{CausalLm, ForwardBatch, ModelInfo};

/// `model.layers.N.self_attn.*`: fused `qkv_proj` then `o_proj`.
#[derive(Debug, Clone)]
struct SelfAttn {
    qkv_proj: Proj,
    o_proj: Proj,
    spec: AttnSpec,
}

impl SelfAttn {
    fn new(cfg: &ModelConfig, window: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let (h, kv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        Ok(Self {
            qkv_proj: Proj::dense(cfg.hidden_size, (h + 2 * kv) * hd, false, vb.pp("qkv_proj"))?,
            o_proj: Proj::dense(h * hd, cfg.hidden_size, false, vb.pp("o_proj"))?,
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

    /// `(tokens, hidden)` -> `(tokens, hidden)`.
    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        rot: &RotaryForPass,
        plan: &BatchPlan,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let tokens = plan.total_tokens;
        let s = &self.spec;
        let qkv = self.qkv_proj.forward(xs)?; // (tokens, (h + 2 kv) * hd)
        let q_width = s.num_heads * s.head_dim;
        let kv_width = s.num_kv_heads * s.head_dim;
        let q = qkv
            .narrow(D::Minus1, 0, q_width)?
            .reshape((tokens, s.num_heads, s.head_dim))?;
        let k = qkv.narrow(D::Minus1, q_width, kv_width)?.reshape((
            tokens,
            s.num_kv_heads,
            s.head_dim,
        ))?;
        let v = qkv
            .narrow(D::Minus1, q_width + kv_width, kv_width)?
            .reshape((tokens, s.num_kv_heads, s.head_dim))?;
        let q = rotary.apply(&q, rot)?;
        let k = rotary.apply(&k, rot)?;
        let y = attend(plan, layer, &q, &k, &v, s, cache)?;
        self.o_proj.forward(&y)
    }
}

/// `model.layers.N.mlp.*`: `down(act(gate) * up)` with `[gate; up] = gate_up_proj(x)`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_up_proj: Proj,
    down_proj: Proj,
    act: Activation,
    intermediate_size: usize,
}

impl Mlp {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up_proj: Proj::dense(h, 2 * i, false, vb.pp("gate_up_proj"))?,
            down_proj: Proj::dense(i, h, false, vb.pp("down_proj"))?,
            act: cfg.hidden_act,
            intermediate_size: i,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(xs)?;
        let hidden = gated_activation(&gate_up, self.intermediate_size, self.act)?;
        self.down_proj.forward(&hidden)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: SelfAttn,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
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
        let h = self.input_layernorm.forward(xs)?;
        let h = self
            .self_attn
            .forward(&h, rotary, rot, plan, layer, cache)?;
        let xs = (h + xs)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        h + xs
    }
}

/// A Phi-3 causal LM over an external KV cache.
#[derive(Debug, Clone)]
pub struct Phi3 {
    embed_tokens: Embed,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    info: ModelInfo,
    device: Device,
}

impl Phi3 {
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

impl CausalLm for Phi3 {
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
