//! Tolerant `config.json` parsing for the supported decoder architectures, and [`ModelError`].
//!
//! Hugging Face configs drift between transformers versions (`rope_theta` vs `rope_parameters`,
//! `torch_dtype` vs `dtype`, one or many `eos_token_id`, ...). This module reads the raw JSON leniently
//! and resolves it into one [`ModelConfig`] that every architecture file builds from. `auto_map` and any
//! remote code are ignored on purpose: only the architectures listed in [`Architecture`] run.

use std::path::{Path, PathBuf};

use candle_nn::Activation;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

/// Why a model could not be loaded.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A model file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or has a field of the wrong type.
    #[error("invalid `{path}`: {source}")]
    ConfigJson {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A safetensors model came without `config.json`.
    #[error("safetensors weights need a `config.json` next to them")]
    MissingConfig,
    /// `architectures` (or the GGUF `general.architecture`) names a model wick does not implement.
    #[error("unsupported architecture `{found}`; supported: {supported}")]
    UnsupportedArchitecture {
        /// What the config asked for.
        found: String,
        /// The list wick supports, for the message.
        supported: &'static str,
    },
    /// A required field is missing or a value is out of range.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// A `rope_scaling` / `rope_parameters.rope_type` wick does not implement.
    #[error("unsupported rope scaling `{0}`; supported: default, linear, llama3, longrope")]
    UnsupportedRopeScaling(String),
    /// A GGUF file is missing metadata or tensors wick needs.
    #[error("invalid GGUF file: {0}")]
    Gguf(String),
    /// A requested compute dtype is not known.
    #[error("unknown dtype `{0}`; expected auto, f32, f16 or bf16")]
    UnknownDtype(String),
    /// candle failed while loading weights or building the model.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The architectures wick implements (the `architectures[0]` of `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (also SmolLM, TinyLlama, Llama 2/3).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5).
    Qwen2,
    /// `Phi3ForCausalLM` (Phi-3, Phi-3.5-mini, Phi-4-mini).
    Phi3,
    /// `Gemma2ForCausalLM`.
    Gemma2,
}

/// The supported `architectures` values, for error messages.
pub const SUPPORTED_ARCHITECTURES: &str =
    "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM";

impl Architecture {
    /// Maps an `architectures` entry to an implementation.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedArchitecture`] naming the supported ones.
    pub fn from_hf_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "LlamaForCausalLM" => Ok(Self::Llama),
            "MistralForCausalLM" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            "Phi3ForCausalLM" => Ok(Self::Phi3),
            "Gemma2ForCausalLM" => Ok(Self::Gemma2),
            other => Err(ModelError::UnsupportedArchitecture {
                found: other.to_string(),
                supported: SUPPORTED_ARCHITECTURES,
            }),
        }
    }

    /// The Hugging Face class name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
            Self::Gemma2 => "Gemma2ForCausalLM",
        }
    }
}

/// How rotary frequencies are adjusted for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Positions divided by `factor` (frequencies divided by `factor`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max / high_freq_factor` are unchanged.
        high_freq_factor: f64,
        /// Context length of the pretrained model.
        original_max_position_embeddings: usize,
    },
    /// Phi-3 "longrope" (su): per-frequency factors, short below the original context, long above.
    LongRope {
        /// Per-frequency divisors used while a sequence is within the original context.
        short_factor: Vec<f64>,
        /// Per-frequency divisors used once a sequence exceeds it.
        long_factor: Vec<f64>,
        /// Context length of the pretrained model.
        original_max_position_embeddings: usize,
        /// Multiplier of cos/sin.
        attention_factor: f64,
    },
}

/// A resolved model configuration, the same for every architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which implementation runs it.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Size of one head (`head_dim` or `hidden / heads`).
    pub head_dim: usize,
    /// Rows of the embedding and of the output logits.
    pub vocab_size: usize,
    /// The longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency adjustment.
    pub rope_scaling: RopeScaling,
    /// Fraction of each head that is rotated (Phi-3 family; 1.0 elsewhere).
    pub partial_rotary_factor: f64,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The MLP activation.
    pub hidden_act: Activation,
    /// Bias on the q/k/v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Per layer: the sliding window size, or `None` for full attention.
    pub layer_windows: Vec<Option<usize>>,
    /// Gemma2: attention logits are `tanh(x / cap) * cap`.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma2: output logits are `tanh(x / cap) * cap`.
    pub final_logit_softcapping: Option<f64>,
    /// Gemma2: attention scale is `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// EOS ids from `config.json`.
    pub eos_token_ids: Vec<u32>,
    /// BOS id from `config.json`.
    pub bos_token_id: Option<u32>,
    /// `torch_dtype` / `dtype` as written (informative; the compute dtype is chosen per device).
    pub torch_dtype: Option<String>,
}

/// `eos_token_id`: an int, a list of ints, or null.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

/// The fields wick reads from `config.json`; everything is optional so that drift does not break
/// parsing, and the resolution step reports what is really missing.
#[derive(Debug, Clone, Default, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<u32>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

impl ModelConfig {
    /// Reads and resolves a `config.json` file.
    ///
    /// # Errors
    /// I/O, JSON, unsupported architecture or rope scaling, missing required fields.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConfig =
            serde_json::from_str(&text).map_err(|source| ModelError::ConfigJson {
                path: path.to_path_buf(),
                source,
            })?;
        raw.resolve()
    }

    /// Resolves a `config.json` given as text.
    ///
    /// # Errors
    /// As [`ModelConfig::from_file`].
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|source| ModelError::ConfigJson {
                path: PathBuf::from("config.json"),
                source,
            })?;
        raw.resolve()
    }

    /// Number of rotated dimensions of each head.
    pub fn rotary_dim(&self) -> usize {
        let dim = (self.head_dim as f64 * self.partial_rotary_factor).round() as usize;
        dim - dim % 2
    }
}

/// Largest `num_hidden_layers` / GGUF `block_count` accepted (the largest released models have
/// ~130 layers); a bigger count would size per-layer allocations before any weight is checked.
pub const MAX_LAYERS: usize = 1024;
/// Largest `hidden_size` / `head_dim × heads` width accepted.
pub const MAX_HIDDEN_SIZE: usize = 1 << 17;
/// Largest `intermediate_size` accepted.
pub const MAX_INTERMEDIATE_SIZE: usize = 1 << 20;
/// Largest attention head count (query or key/value) accepted.
pub const MAX_HEADS: usize = 1024;
/// Largest `head_dim` accepted.
pub const MAX_HEAD_DIM: usize = 1024;
/// Largest `vocab_size` accepted.
pub const MAX_VOCAB_SIZE: usize = 1 << 24;
/// Largest `max_position_embeddings` / GGUF `context_length` accepted: the rotary tables are sized
/// by it (f32 cos + sin: `positions × rotary_dim × 4` bytes, 512 MiB at this cap with 128-wide heads).
pub const MAX_POSITION_EMBEDDINGS: usize = 1 << 20;

/// Checks one size-like config value against its cap before anything is allocated from it.
///
/// # Errors
/// [`ModelError::InvalidConfig`] naming the field, the value and the limit.
pub fn check_limit(field: &str, value: usize, limit: usize) -> Result<usize, ModelError> {
    if value > limit {
        return Err(ModelError::InvalidConfig(format!(
            "`{field}` is {value}, more than the supported maximum {limit}"
        )));
    }
    Ok(value)
}

fn required(value: Option<usize>, name: &str) -> Result<usize, ModelError> {
    match value {
        Some(0) => Err(ModelError::InvalidConfig(format!(
            "`{name}` must be positive"
        ))),
        Some(v) => Ok(v),
        None => Err(ModelError::InvalidConfig(format!("`{name}` is missing"))),
    }
}

fn json_f64(obj: &Value, key: &str) -> Option<f64> {
    obj.get(key).and_then(Value::as_f64)
}

fn json_usize(obj: &Value, key: &str) -> Option<usize> {
    obj.get(key).and_then(Value::as_u64).map(|v| v as usize)
}

fn json_f64_list(obj: &Value, key: &str) -> Option<Vec<f64>> {
    obj.get(key)?
        .as_array()?
        .iter()
        .map(Value::as_f64)
        .collect()
}

impl RawConfig {
    fn resolve(self) -> Result<ModelConfig, ModelError> {
        let arch_name = self.architectures.first().ok_or_else(|| {
            ModelError::InvalidConfig(format!(
                "`architectures` is missing; supported: {SUPPORTED_ARCHITECTURES}"
            ))
        })?;
        let architecture = Architecture::from_hf_name(arch_name)?;
        let hidden_size = required(self.hidden_size, "hidden_size")?;
        let num_attention_heads = required(self.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::InvalidConfig(format!(
                "`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})"
            )));
        }
        let head_dim = match self.head_dim {
            Some(d) if d > 0 => d,
            _ => hidden_size / num_attention_heads,
        };
        let num_hidden_layers = required(self.num_hidden_layers, "num_hidden_layers")?;
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(4096);
        // Caps before anything is sized from these values (F3-F6 in docs/ROBUSTNESS.md).
        check_limit("num_hidden_layers", num_hidden_layers, MAX_LAYERS)?;
        check_limit("hidden_size", hidden_size, MAX_HIDDEN_SIZE)?;
        check_limit("num_attention_heads", num_attention_heads, MAX_HEADS)?;
        check_limit("num_key_value_heads", num_key_value_heads, MAX_HEADS)?;
        check_limit("head_dim", head_dim, MAX_HEAD_DIM)?;
        check_limit(
            "max_position_embeddings",
            max_position_embeddings,
            MAX_POSITION_EMBEDDINGS,
        )?;
        if let Some(original) = self.original_max_position_embeddings {
            check_limit(
                "original_max_position_embeddings",
                original,
                MAX_POSITION_EMBEDDINGS,
            )?;
        }

        // rope: `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x, also holds rope_theta).
        let rope_params = self.rope_parameters.as_ref();
        let rope_theta = self
            .rope_theta
            .or_else(|| rope_params.and_then(|p| json_f64(p, "rope_theta")))
            .unwrap_or(10_000.0);
        let partial_rotary_factor = self
            .partial_rotary_factor
            .or_else(|| rope_params.and_then(|p| json_f64(p, "partial_rotary_factor")))
            .unwrap_or(1.0);
        if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(ModelError::InvalidConfig(format!(
                "`partial_rotary_factor` must be in (0, 1], got {partial_rotary_factor}"
            )));
        }
        let scaling_obj = match (&self.rope_scaling, rope_params) {
            (Some(v), _) if v.is_object() => Some(v),
            (_, Some(p)) if p.is_object() => Some(p),
            _ => None,
        };
        let rotary_half = {
            let dim = (head_dim as f64 * partial_rotary_factor).round() as usize;
            (dim - dim % 2) / 2
        };
        let rope_scaling = resolve_rope_scaling(
            scaling_obj,
            self.original_max_position_embeddings,
            max_position_embeddings,
            rotary_half,
        )?;

        let activation_name = self
            .hidden_activation
            .clone()
            .or(self.hidden_act.clone())
            .unwrap_or_else(|| match architecture {
                Architecture::Gemma2 => "gelu_pytorch_tanh".to_string(),
                _ => "silu".to_string(),
            });
        let hidden_act: Activation = serde_json::from_value(Value::String(activation_name.clone()))
            .map_err(|_| {
                ModelError::InvalidConfig(format!("unsupported `hidden_act` {activation_name:?}"))
            })?;

        let layer_windows = resolve_windows(&self, architecture, num_hidden_layers)?;
        let attention_bias = self.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama | Architecture::Gemma2 => (attention_bias, attention_bias),
            Architecture::Mistral | Architecture::Phi3 => (false, false),
        };
        let eos_token_ids = match self.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => Vec::new(),
        };
        let tie_word_embeddings = self
            .tie_word_embeddings
            .unwrap_or(matches!(architecture, Architecture::Gemma2));

        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: check_limit(
                "intermediate_size",
                required(self.intermediate_size, "intermediate_size")?,
                MAX_INTERMEDIATE_SIZE,
            )?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: check_limit(
                "vocab_size",
                required(self.vocab_size, "vocab_size")?,
                MAX_VOCAB_SIZE,
            )?,
            max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            partial_rotary_factor,
            tie_word_embeddings,
            hidden_act,
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false) && matches!(architecture, Architecture::Llama),
            layer_windows,
            attn_logit_softcapping: self
                .attn_logit_softcapping
                .filter(|_| architecture == Architecture::Gemma2),
            final_logit_softcapping: self
                .final_logit_softcapping
                .filter(|_| architecture == Architecture::Gemma2),
            query_pre_attn_scalar: self
                .query_pre_attn_scalar
                .filter(|_| architecture == Architecture::Gemma2),
            eos_token_ids,
            bos_token_id: self.bos_token_id,
            torch_dtype: self.torch_dtype.or(self.dtype),
        })
    }
}

/// Per-layer sliding windows, following each architecture's transformers implementation.
fn resolve_windows(
    raw: &RawConfig,
    architecture: Architecture,
    num_layers: usize,
) -> Result<Vec<Option<usize>>, ModelError> {
    let window = raw.sliding_window;
    if let Some(types) = &raw.layer_types {
        if types.len() != num_layers {
            return Err(ModelError::InvalidConfig(format!(
                "`layer_types` has {} entries for {num_layers} layers",
                types.len()
            )));
        }
        return types
            .iter()
            .map(|kind| match kind.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => match window {
                    Some(w) if w > 0 => Ok(Some(w)),
                    _ => Err(ModelError::InvalidConfig(
                        "`layer_types` has sliding_attention but `sliding_window` is not set"
                            .into(),
                    )),
                },
                other => Err(ModelError::InvalidConfig(format!(
                    "unsupported layer type {other:?} in `layer_types`"
                ))),
            })
            .collect();
    }
    let window = window.filter(|w| *w > 0);
    Ok((0..num_layers)
        .map(|layer| match architecture {
            Architecture::Llama => None,
            Architecture::Mistral | Architecture::Phi3 => window,
            Architecture::Qwen2 => {
                let from = raw.max_window_layers.unwrap_or(num_layers);
                window.filter(|_| raw.use_sliding_window.unwrap_or(false) && layer >= from)
            }
            // Gemma2 alternates: even layers slide, odd layers attend globally.
            Architecture::Gemma2 => window.filter(|_| layer % 2 == 0),
        })
        .collect())
}

fn resolve_rope_scaling(
    obj: Option<&Value>,
    original_max_top_level: Option<usize>,
    max_position_embeddings: usize,
    rotary_half: usize,
) -> Result<RopeScaling, ModelError> {
    let Some(obj) = obj else {
        return Ok(RopeScaling::Default);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = json_f64(obj, "factor");
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: factor.ok_or_else(|| {
                ModelError::InvalidConfig("linear rope scaling needs `factor`".into())
            })?,
        }),
        "llama3" => {
            let missing =
                |key: &str| ModelError::InvalidConfig(format!("llama3 rope scaling needs `{key}`"));
            Ok(RopeScaling::Llama3 {
                factor: factor.ok_or_else(|| missing("factor"))?,
                low_freq_factor: json_f64(obj, "low_freq_factor")
                    .ok_or_else(|| missing("low_freq_factor"))?,
                high_freq_factor: json_f64(obj, "high_freq_factor")
                    .ok_or_else(|| missing("high_freq_factor"))?,
                original_max_position_embeddings: json_usize(
                    obj,
                    "original_max_position_embeddings",
                )
                .ok_or_else(|| missing("original_max_position_embeddings"))?,
            })
        }
        "longrope" | "su" => {
            let short_factor = json_f64_list(obj, "short_factor").ok_or_else(|| {
                ModelError::InvalidConfig("longrope scaling needs `short_factor`".into())
            })?;
            let long_factor = json_f64_list(obj, "long_factor").ok_or_else(|| {
                ModelError::InvalidConfig("longrope scaling needs `long_factor`".into())
            })?;
            if short_factor.len() != rotary_half || long_factor.len() != rotary_half {
                return Err(ModelError::InvalidConfig(format!(
                    "longrope factors must have {rotary_half} entries, got {} and {}",
                    short_factor.len(),
                    long_factor.len()
                )));
            }
            let original = json_usize(obj, "original_max_position_embeddings")
                .or(original_max_top_level)
                .unwrap_or(max_position_embeddings);
            // As transformers: the scale is max/original unless given; attention factor from it.
            let scale = factor.unwrap_or(max_position_embeddings as f64 / original as f64);
            let attention_factor = json_f64(obj, "attention_factor").unwrap_or(if scale <= 1.0 {
                1.0
            } else {
                (1.0 + scale.ln() / (original as f64).ln()).sqrt()
            });
            Ok(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => Err(ModelError::UnsupportedRopeScaling(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Map<String, Value> {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn parse(m: serde_json::Map<String, Value>) -> Result<ModelConfig, ModelError> {
        ModelConfig::from_json_str(&Value::Object(m).to_string())
    }

    #[test]
    fn absurd_sizes_are_refused_naming_field_value_and_limit() {
        for (field, value) in [
            ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
            ("max_position_embeddings", serde_json::json!(u64::MAX)),
            ("hidden_size", serde_json::json!(1u64 << 40)),
            ("intermediate_size", serde_json::json!(1u64 << 40)),
            ("vocab_size", serde_json::json!(1u64 << 40)),
            ("num_attention_heads", serde_json::json!(1u64 << 20)),
        ] {
            let mut m = base();
            m.insert(field.into(), value.clone());
            if field == "num_attention_heads" {
                m.insert("num_key_value_heads".into(), value.clone());
            }
            match parse(m) {
                Err(ModelError::InvalidConfig(message)) => {
                    assert!(message.contains(field), "{message}");
                    assert!(message.contains(&value.to_string()), "{message}");
                    assert!(message.contains("maximum"), "{message}");
                }
                other => panic!("{field} = {value}: expected InvalidConfig, got {other:?}"),
            }
        }
        let mut m = base();
        m.insert(
            "max_position_embeddings".into(),
            serde_json::json!(MAX_POSITION_EMBEDDINGS),
        );
        assert!(parse(m).is_ok(), "the cap itself is accepted");
    }

    #[test]
    fn unknown_architecture_names_supported_ones() {
        let mut m = base();
        m.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
        m.insert("auto_map".into(), serde_json::json!({"AutoModel": "x.Y"}));
        let err = parse(m).unwrap_err().to_string();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
        assert!(err.contains("Qwen2ForCausalLM"), "{err}");
    }

    #[test]
    fn rope_theta_read_from_rope_parameters_and_eos_from_int() {
        let mut m = base();
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 5e5, "rope_type": "default"}),
        );
        m.insert("eos_token_id".into(), serde_json::json!(7));
        m.insert("dtype".into(), serde_json::json!("bfloat16"));
        let cfg = parse(m).unwrap();
        assert_eq!(cfg.rope_theta, 5e5);
        assert_eq!(cfg.eos_token_ids, vec![7]);
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(cfg.rope_scaling, RopeScaling::Default);
    }

    #[test]
    fn llama3_rope_scaling_is_parsed() {
        let mut m = base();
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        );
        m.insert("eos_token_id".into(), serde_json::json!([1, 2]));
        let cfg = parse(m).unwrap();
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(cfg.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn unsupported_rope_type_is_an_error() {
        let mut m = base();
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
        assert!(matches!(parse(m), Err(ModelError::UnsupportedRopeScaling(t)) if t == "yarn"));
    }

    #[test]
    fn gemma2_alternates_sliding_window_without_layer_types() {
        let mut m = base();
        m.insert(
            "architectures".into(),
            serde_json::json!(["Gemma2ForCausalLM"]),
        );
        m.insert("sliding_window".into(), serde_json::json!(16));
        let cfg = parse(m).unwrap();
        assert_eq!(cfg.layer_windows, vec![Some(16), None]);
        assert!(cfg.tie_word_embeddings);
    }

    #[test]
    fn qwen2_window_needs_use_sliding_window() {
        let mut m = base();
        m.insert(
            "architectures".into(),
            serde_json::json!(["Qwen2ForCausalLM"]),
        );
        m.insert("sliding_window".into(), serde_json::json!(16));
        m.insert("use_sliding_window".into(), serde_json::json!(false));
        let cfg = parse(m).unwrap();
        assert_eq!(cfg.layer_windows, vec![None, None]);
        assert!(cfg.qkv_bias && !cfg.o_bias);
    }

    #[test]
    fn longrope_needs_matching_factor_lengths() {
        let mut m = base();
        m.insert(
            "architectures".into(),
            serde_json::json!(["Phi3ForCausalLM"]),
        );
        m.insert("max_position_embeddings".into(), serde_json::json!(131072));
        m.insert(
            "original_max_position_embeddings".into(),
            serde_json::json!(4096),
        );
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "longrope", "short_factor": vec![1.0; 8], "long_factor": vec![2.0; 8]}),
        );
        let cfg = parse(m.clone()).unwrap();
        match cfg.rope_scaling {
            RopeScaling::LongRope {
                attention_factor,
                original_max_position_embeddings,
                ..
            } => {
                assert_eq!(original_max_position_embeddings, 4096);
                let expected = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
                assert!((attention_factor - expected).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
        );
        assert!(matches!(parse(m), Err(ModelError::InvalidConfig(_))));
    }
}
