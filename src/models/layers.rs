//! Building blocks shared by every architecture: projections (dense or quantized), rotary embeddings
//! with per-token positions, the per-forward [`BatchPlan`], and attention over the engine's slot
//! [`KvCache`].
//!
//! Shapes: all tokens of a forward pass are concatenated, so activations are `(tokens, hidden)`; every
//! linear layer runs once over all of them. Attention is the only per-sequence part: decode batches
//! (every sequence one new token) run as one batched matmul over the gathered slots, prefill chunks
//! run one sequence at a time.
//!
//! Parts forked from candle-transformers 0.11.1 (`models/llama.rs`, `models/quantized_llama.rs`,
//! MIT/Apache-2.0): the rotary frequency tables (including the Llama 3 scaling) and the GQA attention
//! math. Changed: positions per token instead of one offset, an external slot cache instead of
//! `Tensor::cat` caches, GQA by grouping query heads instead of repeating K/V, masks per sequence.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::Activation;

use crate::engine::kv_cache::KvCache;
use crate::models::config::{ModelConfig, RopeScaling};
use crate::models::cpu_attention;
use crate::models::cpu_elementwise;
use crate::models::cpu_matmul::{self, PackedMatrix, PanelKernel};
use crate::models::cpu_matmul_q8::PackedQ8;
use crate::models::{ForwardBatch, SeqChunk};

/// Loads the token embedding and the output projection of a Hugging Face checkpoint: `lm_head`, or the
/// embedding matrix itself when `tie_word_embeddings`. `vb` is the checkpoint root (`model.*` inside).
pub(crate) fn embedding_and_head(
    cfg: &ModelConfig,
    vb: &candle_nn::VarBuilder,
) -> Result<(Embed, Proj)> {
    let embed_weight = vb
        .pp("model")
        .pp("embed_tokens")
        .get((cfg.vocab_size, cfg.hidden_size), "weight")?; // (vocab, hidden)
    if !cfg.tie_word_embeddings {
        let lm_head = Proj::dense(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"))?;
        let embed = candle_nn::Embedding::new(embed_weight, cfg.hidden_size);
        return Ok((Embed::Table(embed), lm_head));
    }
    // Tied: one packed copy serves both the lookup and the output projection.
    if let Some(packed) = PackedMatrix::pack(&embed_weight)? {
        let packed = Arc::new(packed);
        let lm_head = Proj::Packed {
            weight: Arc::clone(&packed),
            bias: None,
        };
        return Ok((Embed::Packed(packed), lm_head));
    }
    let lm_head = Proj::Dense(candle_nn::Linear::new(embed_weight.clone(), None));
    let embed = candle_nn::Embedding::new(embed_weight, cfg.hidden_size);
    Ok((Embed::Table(embed), lm_head))
}

/// The token embedding: candle's table, or rows read from the packed tied output projection.
#[derive(Debug, Clone)]
pub(crate) enum Embed {
    /// `(vocab, hidden)` table.
    Table(candle_nn::Embedding),
    /// The tied `lm_head`, packed (see [`PackedMatrix::embed`]).
    Packed(Arc<PackedMatrix>),
}

impl Embed {
    /// `(tokens,)` u32 ids -> `(tokens, hidden)`.
    pub(crate) fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Table(table) => table.forward(ids),
            Self::Packed(packed) => packed.embed(ids),
        }
    }
}

/// The logits of each sequence's last new token: gathers those rows of `xs` `(tokens, hidden)`, applies
/// the final norm and the output projection, and returns `(n_seqs, vocab)` in f32.
pub(crate) fn last_token_logits(
    xs: &Tensor,
    plan: &BatchPlan,
    norm: &RmsNorm,
    lm_head: &Proj,
) -> Result<Tensor> {
    // `.contiguous()` before the projection: the gathered rows feed a matmul (and QMatMul needs it).
    let last = xs.index_select(&plan.last_token_index, 0)?.contiguous()?; // (n_seqs, hidden)
    lm_head.forward(&norm.forward(&last)?)?.to_dtype(DType::F32)
}

/// Up to this many rows, dense CPU projections on candle's path compute `(W x^T)^T` (see
/// [`Proj::forward`]).
const SMALL_BATCH_ROWS: usize = 128;

/// A linear projection `y = x W^T (+ b)`: dense weights or a GGUF quantized matrix.
#[derive(Debug, Clone)]
pub(crate) enum Proj {
    /// Dense weights in the compute dtype (candle's matmul).
    Dense(candle_nn::Linear),
    /// Dense f32 weights packed for wick's AVX-512 CPU kernel (see [`crate::models::cpu_matmul`]).
    Packed {
        /// The packed `(out, in)` matrix.
        weight: Arc<PackedMatrix>,
        /// Optional `(out,)` bias.
        bias: Option<Tensor>,
    },
    /// Q8_0 weights packed for wick's AVX-512 VNNI CPU kernel (see
    /// [`crate::models::cpu_matmul_q8`]); input and output f32.
    PackedQ8 {
        /// The packed `(out, in)` matrix.
        weight: Arc<PackedQ8>,
        /// Optional `(out,)` bias, f32.
        bias: Option<Tensor>,
    },
    /// Quantized weights; input and output f32.
    Quantized {
        /// The quantized `(out, in + in_padding)` matrix.
        weight: QMatMul,
        /// Optional `(out,)` bias, f32.
        bias: Option<Tensor>,
        /// Zero columns appended to the weight rows (so candle's repacked CPU kernels apply); the
        /// input gets as many zero columns.
        in_padding: usize,
    },
}

impl Proj {
    /// Loads a dense projection `prefix.weight` (and `prefix.bias` when `bias`) of shape `(out, in)`.
    pub(crate) fn dense(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        let linear = if bias {
            candle_nn::linear(in_dim, out_dim, vb)?
        } else {
            candle_nn::linear_no_bias(in_dim, out_dim, vb)?
        };
        match PackedMatrix::pack(linear.weight())? {
            Some(packed) => Ok(Self::Packed {
                weight: Arc::new(packed),
                bias: linear.bias().cloned(),
            }),
            None => Ok(Self::Dense(linear)),
        }
    }

    /// `(tokens, in)` -> `(tokens, out)` plus `residual` `(tokens, out)`: for packed weights without
    /// a bias in the same pass (each output gets its residual as it is stored, the same value as
    /// adding afterwards), else one add after.
    pub(crate) fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed { weight, bias: None } => {
                cpu_matmul::matmul_t_residual(weight.as_ref(), xs, residual)
            }
            Self::PackedQ8 { weight, bias: None } => {
                cpu_matmul::matmul_t_residual(weight.as_ref(), xs, residual)
            }
            _ => self.forward(xs)? + residual,
        }
    }

    /// `(tokens, in)` -> `(tokens, out)`.
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(linear) => {
                let rows = xs.dim(0)?;
                if xs.rank() == 2 && xs.device().is_cpu() && (2..=SMALL_BATCH_ROWS).contains(&rows)
                {
                    // gemm on CPU is several times faster for a few rows as `W x^T` than as
                    // `x W^T` (measured: 1.1x to 4x for 2 to 128 rows, 576..5632-wide weights, 1 and 2 threads).
                    let ys = linear.weight().matmul(&xs.t()?)?.t()?.contiguous()?;
                    match linear.bias() {
                        Some(b) => ys.broadcast_add(b),
                        None => Ok(ys),
                    }
                } else {
                    linear.forward(xs)
                }
            }
            Self::Packed { weight, bias } => with_bias(weight.matmul_t(xs)?, bias.as_ref()),
            Self::PackedQ8 { weight, bias } => with_bias(weight.matmul_t(xs)?, bias.as_ref()),
            Self::Quantized {
                weight,
                bias,
                in_padding,
            } => {
                let ys = if *in_padding > 0 {
                    weight.forward(&xs.pad_with_zeros(D::Minus1, 0, *in_padding)?)?
                } else {
                    weight.forward(xs)?
                };
                match bias {
                    Some(b) => ys.broadcast_add(b),
                    None => Ok(ys),
                }
            }
        }
    }
}

/// Projections of the same input (q/k/v, gate/up): one matmul over the stacked weights when they are
/// packed (fewer kernel calls and thread hand-offs per layer), else one per part.
#[derive(Debug, Clone)]
pub(crate) enum Stacked {
    /// One projection whose output columns are the parts' outputs side by side.
    Fused {
        /// The stacked projection.
        proj: Proj,
        /// Output width of each part.
        widths: Vec<usize>,
    },
    /// The parts as they are.
    Separate(Vec<Proj>),
}

impl Stacked {
    /// Stacks `parts` when all are packed the same way (f32 or Q8_0) with the same input width and
    /// all or none have a bias.
    pub(crate) fn new(parts: Vec<Proj>) -> Result<Self> {
        let mut widths = Vec::with_capacity(parts.len());
        let mut dense = Vec::new();
        let mut q8 = Vec::new();
        let mut biases = Vec::new();
        for part in &parts {
            match part {
                Proj::Packed { weight, bias } => {
                    widths.push(weight.dims().0);
                    dense.push(weight.as_ref());
                    biases.push(bias.clone());
                }
                Proj::PackedQ8 { weight, bias } => {
                    widths.push(weight.dims().0);
                    q8.push(weight.as_ref());
                    biases.push(bias.clone());
                }
                Proj::Dense(_) | Proj::Quantized { .. } => return Ok(Self::Separate(parts)),
            }
        }
        let bias = if biases.iter().all(Option::is_none) {
            None
        } else if let Some(all) = biases.into_iter().collect::<Option<Vec<Tensor>>>() {
            Some(Tensor::cat(&all, 0)?)
        } else {
            return Ok(Self::Separate(parts));
        };
        let proj = if dense.len() == parts.len() {
            PackedMatrix::stack(&dense).map(|weight| Proj::Packed {
                weight: Arc::new(weight),
                bias,
            })
        } else if q8.len() == parts.len() {
            PackedQ8::stack(&q8).map(|weight| Proj::PackedQ8 {
                weight: Arc::new(weight),
                bias,
            })
        } else {
            None
        };
        Ok(match proj {
            Some(proj) => Self::Fused { proj, widths },
            None => Self::Separate(parts),
        })
    }

    /// `(tokens, in)` -> each part's `(tokens, out_i)` (column views of one output when fused).
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Fused { proj, widths } => Self::split(&proj.forward(xs)?, widths),
            Self::Separate(parts) => parts.iter().map(|p| p.forward(xs)).collect(),
        }
    }

    /// A fused output `(tokens, sum of widths)` as column views, one per part.
    pub(crate) fn split(ys: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
        let mut start = 0;
        widths
            .iter()
            .map(|&w| {
                let part = ys.narrow(D::Minus1, start, w);
                start += w;
                part
            })
            .collect()
    }
}

/// `act(gate) * up` over a gate/up projection's output `(tokens, 2 * width)`, gate in the first
/// `width` columns; returns `(tokens, width)`. SiLU on an AVX-512 CPU in f32 runs as one fused pass
/// ([`cpu_elementwise::silu_mul_stacked`]); anything else takes candle's ops.
pub(crate) fn gated_activation(gate_up: &Tensor, width: usize, act: Activation) -> Result<Tensor> {
    if matches!(act, Activation::Silu) {
        if let Some(hidden) = cpu_elementwise::silu_mul_stacked(gate_up, width)? {
            return Ok(hidden);
        }
    }
    let gate = gate_up.narrow(D::Minus1, 0, width)?;
    let up = gate_up.narrow(D::Minus1, width, width)?;
    act.forward(&gate)? * up
}

/// RMS norm over the last dimension (`x / sqrt(mean(x^2) + eps) * weight`): one fused pass per row
/// on an AVX-512 CPU in f32 ([`cpu_elementwise::rms_norm`]), candle's op elsewhere.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    candle: candle_nn::RmsNorm,
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// A norm with this `(dim,)` weight.
    pub(crate) fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            candle: candle_nn::RmsNorm::new(weight.clone(), eps),
            weight,
            eps: eps as f32,
        }
    }

    /// `(..., dim)` -> `(..., dim)`.
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match cpu_elementwise::rms_norm(xs, &self.weight, self.eps)? {
            Some(ys) => Ok(ys),
            None => self.candle.forward(xs),
        }
    }
}

/// Loads `prefix.weight` `(size,)` as an [`RmsNorm`] (as `candle_nn::rms_norm` does).
pub(crate) fn rms_norm(size: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<RmsNorm> {
    let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
    Ok(RmsNorm::new(weight, eps))
}

/// The gate and up projections of a gated MLP with its activation: `act(gate(x)) * up(x)`.
#[derive(Debug, Clone)]
pub(crate) enum GateUp {
    /// SiLU over gate and up packed the same way without biases, in whole panels: their panels
    /// interleaved into one matrix, and one matmul writes `silu(gate) * up` as it stores each tile
    /// ([`Epilogue::SiluGate`]): no `(tokens, 2 * intermediate)` intermediate, no extra pass.
    FusedSilu(GateUpWeight),
    /// Otherwise: the projections (stacked when packed) and the activation after them.
    Separate {
        /// `gate`, `up`.
        parts: Stacked,
        act: Activation,
    },
}

/// A packed gate/up matrix with interleaved panels (only ever multiplied with
/// [`Epilogue::SiluGate`]: its rows are not in checkpoint order).
#[derive(Debug, Clone)]
pub(crate) enum GateUpWeight {
    /// f32 ([`PackedMatrix::interleave_gate_up`]).
    F32(Arc<PackedMatrix>),
    /// Q8_0 ([`PackedQ8::interleave_gate_up`]).
    Q8(Arc<PackedQ8>),
}

impl GateUp {
    /// `gate` and `up`, `(intermediate, hidden)` each, with activation `act`.
    pub(crate) fn new(gate: Proj, up: Proj, act: Activation) -> Result<Self> {
        if matches!(act, Activation::Silu) {
            let fused = match (&gate, &up) {
                (
                    Proj::Packed {
                        weight: g,
                        bias: None,
                    },
                    Proj::Packed {
                        weight: u,
                        bias: None,
                    },
                ) => PackedMatrix::interleave_gate_up(g, u).map(|w| GateUpWeight::F32(Arc::new(w))),
                (
                    Proj::PackedQ8 {
                        weight: g,
                        bias: None,
                    },
                    Proj::PackedQ8 {
                        weight: u,
                        bias: None,
                    },
                ) => PackedQ8::interleave_gate_up(g, u).map(|w| GateUpWeight::Q8(Arc::new(w))),
                _ => None,
            };
            if let Some(weight) = fused {
                return Ok(Self::FusedSilu(weight));
            }
        }
        Ok(Self::Separate {
            parts: Stacked::new(vec![gate, up])?,
            act,
        })
    }

    /// `(tokens, hidden)` -> `(tokens, intermediate)`.
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::FusedSilu(GateUpWeight::F32(weight)) => {
                cpu_matmul::matmul_t_silu_gate(weight.as_ref(), xs)
            }
            Self::FusedSilu(GateUpWeight::Q8(weight)) => {
                cpu_matmul::matmul_t_silu_gate(weight.as_ref(), xs)
            }
            Self::Separate { parts, act } => {
                if let Stacked::Fused { proj, widths } = parts {
                    if let [gate_width, up_width] = widths[..] {
                        if gate_width == up_width {
                            return gated_activation(&proj.forward(xs)?, gate_width, *act);
                        }
                    }
                }
                let [gate, up]: [Tensor; 2] = parts.forward(xs)?.try_into().map_err(|_| {
                    candle_core::Error::Msg("gate/up projection gave no 2 parts".into())
                })?;
                act.forward(&gate)? * up
            }
        }
    }
}

/// `ys + bias` (broadcast over rows) when there is a bias.
fn with_bias(ys: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => ys.broadcast_add(b),
        None => Ok(ys),
    }
}

/// `tanh(x / cap) * cap` (Gemma2 logit soft-capping).
pub(crate) fn softcap(xs: &Tensor, cap: f64) -> Result<Tensor> {
    (xs / cap)?.tanh()? * cap
}

/// Precomputed rotary tables, `(max_pos, rotary_dim / 2)` each, in the compute dtype.
#[derive(Debug, Clone)]
pub(crate) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    /// Phi-3 longrope: the tables used by a sequence once it is past `original` positions.
    long: Option<(Tensor, Tensor, usize)>,
    /// Rotated dimensions of each head (the rest pass through).
    rotary_dim: usize,
    /// GGUF llama layouts rotate interleaved pairs (`rope_i`); Hugging Face layouts rotate halves.
    interleaved: bool,
}

/// The rotary tables selected for the tokens of one forward pass: `(tokens, 1, rotary_dim / 2)`.
#[derive(Debug, Clone)]
pub(crate) struct RotaryForPass {
    cos: Tensor,
    sin: Tensor,
    /// The same tables as host f32 `(tokens * rotary_dim / 2)` each, for the CPU decode path
    /// ([`decode_self_attention`]); read once per pass, not once per layer. `None` off the CPU or
    /// in another dtype.
    host: Option<(Vec<f32>, Vec<f32>)>,
}

fn freq_table(
    inv_freq: &[f32],
    max_pos: usize,
    scale: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv = Tensor::from_slice(inv_freq, (1, half), device)?;
    let t = Tensor::arange(0u32, max_pos as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_pos, 1))?;
    let freqs = t.matmul(&inv)?;
    let cos = (freqs.cos()? * scale)?.to_dtype(dtype)?;
    let sin = (freqs.sin()? * scale)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

impl Rotary {
    /// Builds tables for `max_pos` positions from the config's theta and scaling.
    pub(crate) fn new(
        cfg: &ModelConfig,
        max_pos: usize,
        interleaved: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rotary_dim = cfg.rotary_dim();
        Self::with_params(
            cfg.rope_theta,
            &cfg.rope_scaling,
            rotary_dim,
            max_pos,
            interleaved,
            dtype,
            device,
        )
    }

    /// Builds tables from explicit parameters (GGUF has no `config.json`).
    pub(crate) fn with_params(
        theta: f64,
        scaling: &RopeScaling,
        rotary_dim: usize,
        max_pos: usize,
        interleaved: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            bail!("rotary dimension must be even and positive, got {rotary_dim}")
        }
        let base: Vec<f64> = (0..rotary_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f64 / rotary_dim as f64))
            .collect();
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let (cos, sin, long) = match scaling {
            RopeScaling::Default => {
                let (c, s) = freq_table(&to_f32(base), max_pos, 1.0, dtype, device)?;
                (c, s, None)
            }
            RopeScaling::Linear { factor } => {
                let (c, s) = freq_table(
                    &to_f32(base.iter().map(|f| f / factor).collect()),
                    max_pos,
                    1.0,
                    dtype,
                    device,
                )?;
                (c, s, None)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let original = *original_max_position_embeddings as f64;
                let low_freq_wavelen = original / low_freq_factor;
                let high_freq_wavelen = original / high_freq_factor;
                let scaled = base
                    .iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect();
                let (c, s) = freq_table(&to_f32(scaled), max_pos, 1.0, dtype, device)?;
                (c, s, None)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let apply = |factors: &[f64]| -> Vec<f64> {
                    base.iter().zip(factors).map(|(f, e)| f / e).collect()
                };
                let (c, s) = freq_table(
                    &to_f32(apply(short_factor)),
                    max_pos,
                    *attention_factor,
                    dtype,
                    device,
                )?;
                // Equal factors (e.g. GGUF `rope_freqs`) need no second table.
                let long = if long_factor == short_factor {
                    None
                } else {
                    let (lc, ls) = freq_table(
                        &to_f32(apply(long_factor)),
                        max_pos,
                        *attention_factor,
                        dtype,
                        device,
                    )?;
                    Some((lc, ls, *original_max_position_embeddings))
                };
                (c, s, long)
            }
        };
        Ok(Self {
            cos,
            sin,
            long,
            rotary_dim,
            interleaved,
        })
    }

    /// Number of positions the tables cover.
    pub(crate) fn max_positions(&self) -> Result<usize> {
        self.cos.dim(0)
    }

    /// Selects the rows for every token of the pass. With longrope, a sequence whose chunk ends past
    /// the original context uses the long factors for the whole chunk (as transformers does for the
    /// sequence length it sees).
    pub(crate) fn for_pass(&self, plan: &BatchPlan) -> Result<RotaryForPass> {
        let half = self.rotary_dim / 2;
        let (cos, sin) = match &self.long {
            Some((long_cos, long_sin, original)) => {
                let mut cos_parts = Vec::with_capacity(plan.seqs.len());
                let mut sin_parts = Vec::with_capacity(plan.seqs.len());
                for (i, seq) in plan.seqs.iter().enumerate() {
                    let (c, s) = if seq.start_pos + seq.len > *original {
                        (long_cos, long_sin)
                    } else {
                        (&self.cos, &self.sin)
                    };
                    let pos = plan.positions.narrow(0, plan.offsets[i], seq.len)?;
                    cos_parts.push(c.index_select(&pos, 0)?);
                    sin_parts.push(s.index_select(&pos, 0)?);
                }
                (Tensor::cat(&cos_parts, 0)?, Tensor::cat(&sin_parts, 0)?)
            }
            None => (
                self.cos.index_select(&plan.positions, 0)?,
                self.sin.index_select(&plan.positions, 0)?,
            ),
        };
        let tokens = plan.total_tokens;
        let host = if plan.all_decode && cos.device().is_cpu() && cos.dtype() == DType::F32 {
            Some((cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?))
        } else {
            None
        };
        Ok(RotaryForPass {
            cos: cos.reshape((tokens, 1, half))?,
            sin: sin.reshape((tokens, 1, half))?,
            host,
        })
    }

    /// Rotates the first `rotary_dim` values of each `head_dim`-wide head of one token in place,
    /// with that token's `cos` and `sin` rows (`rotary_dim / 2` each); the rest pass through. The
    /// arithmetic of candle's `rope` / `rope_i` CPU ops (one multiply each, then one add), so the
    /// values are the same as [`Rotary::apply`]'s.
    fn rotate_heads(&self, heads: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = self.rotary_dim / 2;
        let (cos, sin) = (&cos[..half], &sin[..half]);
        for head in heads.chunks_exact_mut(head_dim) {
            let x = &mut head[..self.rotary_dim];
            if self.interleaved {
                for (pair, (c, s)) in x.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            } else {
                let (first, second) = x.split_at_mut(half);
                for ((a, b), (c, s)) in first.iter_mut().zip(second).zip(cos.iter().zip(sin)) {
                    let (x1, x2) = (*a, *b);
                    *a = x1 * c - x2 * s;
                    *b = x1 * s + x2 * c;
                }
            }
        }
    }

    /// Rotates `(tokens, heads, head_dim)` by each token's position.
    pub(crate) fn apply(&self, xs: &Tensor, pass: &RotaryForPass) -> Result<Tensor> {
        let (tokens, heads, head_dim) = xs.dims3()?;
        // rope takes (b, h, t, d) with cos (b, t, d/2): each token is its own "batch" row here.
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let x = x.reshape((tokens, heads, 1, self.rotary_dim))?;
            let y = if self.interleaved {
                candle_nn::rotary_emb::rope_i(&x, &pass.cos, &pass.sin)?
            } else {
                candle_nn::rotary_emb::rope(&x, &pass.cos, &pass.sin)?
            };
            y.reshape((tokens, heads, self.rotary_dim))
        };
        if self.rotary_dim == head_dim {
            rotate(&xs.contiguous()?)
        } else {
            let rot = xs.narrow(D::Minus1, 0, self.rotary_dim)?.contiguous()?;
            let pass_through = xs.narrow(D::Minus1, self.rotary_dim, head_dim - self.rotary_dim)?;
            Tensor::cat(&[rotate(&rot)?, pass_through], D::Minus1)
        }
    }
}

/// Self-attention of a decode step (every sequence one new token) on the CPU in f32, straight from
/// the fused q/k/v projection output `qkv` `(tokens, (heads + 2 kv_heads) * head_dim)`: rotates q
/// and k, writes each sequence's k and v into its cache slot in one pass
/// ([`KvCache::write_rows`]), and attends in place ([`cpu_attention::decode_attention`]). Returns
/// `(tokens, heads * head_dim)`, or `None` where this path does not apply (not an all-decode pass,
/// not f32 on the CPU, another layout); the caller then takes [`attend`].
///
/// Same values as the general path (the rotation is candle's arithmetic, the cache write the same
/// [`KvCache::write_rows`]); it saves the q/k/v views, rotary ops and copies that path builds.
pub(crate) fn decode_self_attention(
    qkv: &Tensor,
    rotary: &Rotary,
    rot: &RotaryForPass,
    plan: &BatchPlan,
    layer: usize,
    spec: &AttnSpec,
    cache: &mut KvCache,
) -> Result<Option<Tensor>> {
    let Some((cos, sin)) = &rot.host else {
        return Ok(None);
    };
    if !plan.all_decode
        || !cpu_attention::applies(qkv.device(), qkv.dtype())
        || rotary.rotary_dim > spec.head_dim
    {
        return Ok(None);
    }
    let (heads, kv_heads, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
    let (q_width, kv_width) = (heads * hd, kv_heads * hd);
    let (tokens, width) = qkv.dims2()?;
    if width != q_width + 2 * kv_width || tokens != plan.seqs.len() {
        return Ok(None);
    }
    let half = rotary.rotary_dim / 2;
    // (tokens, half) each
    if cos.len() != tokens * half || sin.len() != cos.len() {
        return Ok(None);
    }
    let mut q = vec![0f32; tokens * q_width];
    let mut k = vec![0f32; tokens * kv_width];
    let mut v = vec![0f32; tokens * kv_width];
    {
        let (storage, layout) = qkv.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        for (t, row) in all[start..end].chunks_exact(width).enumerate() {
            let (q_row, kv_row) = row.split_at(q_width);
            let (k_row, v_row) = kv_row.split_at(kv_width);
            let (cos, sin) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            let q_out = &mut q[t * q_width..(t + 1) * q_width];
            q_out.copy_from_slice(q_row);
            rotary.rotate_heads(q_out, hd, cos, sin);
            let k_out = &mut k[t * kv_width..(t + 1) * kv_width];
            k_out.copy_from_slice(k_row);
            rotary.rotate_heads(k_out, hd, cos, sin);
            v[t * kv_width..(t + 1) * kv_width].copy_from_slice(v_row);
        }
    }
    cache.write_rows(layer, plan.seqs, &k, &v)?;
    let (k_cache, v_cache) = cache.layer(layer)?;
    cpu_attention::decode_attention_rows(&q, plan.seqs, k_cache, v_cache, spec).map(Some)
}

/// Identifies a mask within one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MaskKey {
    /// Index of the (first) sequence the mask is for.
    first_seq: usize,
    /// Sequences of a decode group; 0 for one prefill chunk.
    decode_seqs: usize,
    /// The layer's sliding window.
    window: Option<usize>,
}

/// Everything derived once per forward pass from the [`ForwardBatch`].
#[derive(Debug)]
pub(crate) struct BatchPlan<'a> {
    /// The sequences, in batch order.
    pub(crate) seqs: &'a [SeqChunk],
    /// Offset of each sequence's first token in the concatenated tokens.
    pub(crate) offsets: Vec<usize>,
    /// Sum of all chunk lengths.
    pub(crate) total_tokens: usize,
    /// `(tokens,)` u32 position of every token.
    pub(crate) positions: Tensor,
    /// `(tokens,)` u32 token ids.
    pub(crate) token_ids: Tensor,
    /// `(n_seqs,)` u32 index of each sequence's last token.
    pub(crate) last_token_index: Tensor,
    /// Every chunk is one token: the batched decode path applies.
    pub(crate) all_decode: bool,
    /// Masks already built in this pass, keyed by (sequence index or `usize::MAX` for the decode
    /// batch, window): layers with the same window reuse them.
    masks: RefCell<Vec<(MaskKey, Tensor)>>,
}

impl<'a> BatchPlan<'a> {
    /// Validates the batch against the cache and builds the index tensors.
    pub(crate) fn new(
        batch: &ForwardBatch<'a>,
        cache: &KvCache,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        if batch.seqs.is_empty() {
            bail!("forward pass with no sequences")
        }
        let mut offsets = Vec::with_capacity(batch.seqs.len());
        let mut positions = Vec::with_capacity(batch.token_ids.len());
        let mut last = Vec::with_capacity(batch.seqs.len());
        let mut slots_seen = vec![false; cache.num_slots()];
        let mut total = 0usize;
        for seq in batch.seqs {
            if seq.len == 0 {
                bail!("sequence in slot {} has an empty chunk", seq.slot)
            }
            if seq.slot >= cache.num_slots() {
                bail!(
                    "slot {} out of range ({} slots)",
                    seq.slot,
                    cache.num_slots()
                )
            }
            if std::mem::replace(&mut slots_seen[seq.slot], true) {
                bail!("slot {} appears twice in one forward pass", seq.slot)
            }
            let end = seq.start_pos + seq.len;
            if end > cache.max_ctx() || end > max_positions {
                bail!(
                    "positions {}..{end} of slot {} exceed the context ({} cache, {} rotary)",
                    seq.start_pos,
                    seq.slot,
                    cache.max_ctx(),
                    max_positions
                )
            }
            offsets.push(total);
            positions.extend((seq.start_pos..end).map(|p| p as u32));
            total += seq.len;
            last.push((total - 1) as u32);
        }
        if total != batch.token_ids.len() {
            bail!(
                "batch has {} token ids for chunks totalling {total}",
                batch.token_ids.len()
            )
        }
        Ok(Self {
            seqs: batch.seqs,
            offsets,
            total_tokens: total,
            positions: Tensor::from_vec(positions, total, device)?,
            token_ids: Tensor::from_slice(batch.token_ids, total, device)?,
            last_token_index: Tensor::from_vec(last, batch.seqs.len(), device)?,
            all_decode: batch.seqs.iter().all(|s| s.len == 1),
            masks: RefCell::new(Vec::new()),
        })
    }

    /// Returns the cached mask for `key`, building it with `build` the first time.
    fn mask(&self, key: MaskKey, build: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        if let Some((_, mask)) = self.masks.borrow().iter().find(|(k, _)| *k == key) {
            return Ok(mask.clone());
        }
        let mask = build()?;
        self.masks.borrow_mut().push((key, mask.clone()));
        Ok(mask)
    }
}

/// Per-layer attention parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnSpec {
    /// Query heads.
    pub(crate) num_heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (num_heads / num_kv_heads)`.
    pub(crate) num_kv_heads: usize,
    /// Size of one head.
    pub(crate) head_dim: usize,
    /// Multiplier of `q k^T`.
    pub(crate) scale: f64,
    /// Gemma2 attention-logit soft-capping.
    pub(crate) softcap: Option<f64>,
    /// Keys more than `window - 1` positions behind the query are masked.
    pub(crate) sliding_window: Option<usize>,
}

/// Additive mask `(rows, kv_len)`: row `r` is a query at `query_pos[r]` that may see key `j` when
/// `j <= query_pos[r]` and (with a window) `query_pos[r] - j < window`.
fn mask_rows(
    query_pos: &[usize],
    kv_len: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut mask = Vec::with_capacity(query_pos.len() * kv_len);
    for &q in query_pos {
        let lowest = match window {
            Some(w) => (q + 1).saturating_sub(w),
            None => 0,
        };
        mask.extend((0..kv_len).map(|j| {
            if j > q || j < lowest {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        }));
    }
    Tensor::from_vec(mask, (query_pos.len(), kv_len), device)?.to_dtype(dtype)
}

/// Scaled dot-product scores with optional soft-capping, masking and softmax; returns weights.
fn attention_weights(
    q: &Tensor,
    k: &Tensor,
    spec: &AttnSpec,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut scores = (q.matmul(&k.t()?)? * spec.scale)?;
    if let Some(cap) = spec.softcap {
        scores = softcap(&scores, cap)?;
    }
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    candle_nn::ops::softmax_last_dim(&scores)
}

/// Above this many runs of consecutive slots, a decode batch gathers its slots with one copy.
const MAX_DECODE_RUNS: usize = 4;

/// Attention of the one-token sequences `plan.seqs[group]`: `q` is `(all seqs, kv_heads, n_rep,
/// head_dim)`; returns `(group len, num_heads * head_dim)`. With `as_view`, the group's slots must be
/// consecutive and ascending and are read in place; otherwise they are gathered.
fn decode_group(
    plan: &BatchPlan,
    group: std::ops::Range<usize>,
    as_view: bool,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    spec: &AttnSpec,
) -> Result<Tensor> {
    let seqs = &plan.seqs[group.clone()];
    let batch = seqs.len();
    let kv_lens: Vec<usize> = seqs.iter().map(|s| s.start_pos + 1).collect();
    let max_len = kv_lens.iter().copied().max().unwrap_or(1);
    let (keys, values) = if as_view {
        let first = seqs[0].slot;
        (
            k_cache.narrow(0, first, batch)?.narrow(2, 0, max_len)?,
            v_cache.narrow(0, first, batch)?.narrow(2, 0, max_len)?,
        )
    } else {
        let gather = |cache: &Tensor| -> Result<Tensor> {
            let parts = seqs
                .iter()
                .map(|s| cache.narrow(0, s.slot, 1)?.narrow(2, 0, max_len))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };
        (gather(k_cache)?, gather(v_cache)?)
    }; // (batch, kv_heads, L, hd)
    let needs_mask =
        spec.sliding_window.is_some_and(|w| w < max_len) || kv_lens.iter().any(|&l| l != max_len);
    let mask = if needs_mask {
        let key = MaskKey {
            first_seq: group.start,
            decode_seqs: batch,
            window: spec.sliding_window,
        };
        Some(plan.mask(key, || {
            let query_pos: Vec<usize> = kv_lens.iter().map(|l| l - 1).collect();
            mask_rows(
                &query_pos,
                max_len,
                spec.sliding_window,
                q.dtype(),
                q.device(),
            )?
            .reshape((batch, 1, 1, max_len))
        })?)
    } else {
        None
    };
    // The query heads sharing a kv head form the rows: (batch, kv_heads, n_rep, hd).
    let q = q.narrow(0, group.start, batch)?;
    let weights = attention_weights(&q, &keys, spec, mask.as_ref())?; // (batch, kv_heads, n_rep, L)
    let out = weights.matmul(&values)?; // (batch, kv_heads, n_rep, hd)
    out.reshape((batch, spec.num_heads * spec.head_dim))
}

/// Writes the new K/V of every sequence into `cache` (layer `layer`) and attends.
///
/// `q` is `(tokens, num_heads, head_dim)`, `k` and `v` are `(tokens, num_kv_heads, head_dim)`, already
/// rotated. Returns `(tokens, num_heads * head_dim)`.
pub(crate) fn attend(
    plan: &BatchPlan,
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttnSpec,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let n_rep = spec.num_heads / spec.num_kv_heads;
    let (kvh, hd) = (spec.num_kv_heads, spec.head_dim);
    let device = q.device();
    let cpu_decode = plan.all_decode && cpu_attention::applies(device, q.dtype());
    if cpu_decode {
        // One token per sequence, on the host already: every row in one pass.
        // (tokens, kv_heads, head_dim) each
        let k_rows = k.flatten_all()?.to_vec1::<f32>()?;
        let v_rows = v.flatten_all()?.to_vec1::<f32>()?;
        cache.write_rows(layer, plan.seqs, &k_rows, &v_rows)?;
    } else {
        for (seq, &offset) in plan.seqs.iter().zip(&plan.offsets) {
            // (len, kv_heads, head_dim) -> (kv_heads, len, head_dim)
            let k_new = k
                .narrow(0, offset, seq.len)?
                .transpose(0, 1)?
                .contiguous()?;
            let v_new = v
                .narrow(0, offset, seq.len)?
                .transpose(0, 1)?
                .contiguous()?;
            cache.write(layer, seq.slot, seq.start_pos, &k_new, &v_new)?;
        }
    }
    let (k_cache, v_cache) = cache.layer(layer)?;

    if cpu_decode {
        return cpu_attention::decode_attention(q, plan.seqs, k_cache, v_cache, spec);
    }
    if plan.all_decode {
        // Runs of ascending consecutive slots are read as strided views of the cache without a
        // copy; many scattered slots are gathered (copied) into one batch instead.
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, seq) in plan.seqs.iter().enumerate() {
            match runs.last_mut() {
                Some(run) if plan.seqs[run.end - 1].slot + 1 == seq.slot => run.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
        let q = q.reshape((plan.seqs.len(), kvh, n_rep, hd))?;
        if runs.len() > MAX_DECODE_RUNS {
            return decode_group(plan, 0..plan.seqs.len(), false, &q, k_cache, v_cache, spec);
        }
        let outputs = runs
            .into_iter()
            .map(|run| decode_group(plan, run, true, &q, k_cache, v_cache, spec))
            .collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&outputs, 0);
    }

    let mut outputs = Vec::with_capacity(plan.seqs.len());
    for (index, (seq, &offset)) in plan.seqs.iter().zip(&plan.offsets).enumerate() {
        let len = seq.len;
        let kv_len = seq.start_pos + len;
        let keys = k_cache
            .narrow(0, seq.slot, 1)?
            .narrow(2, 0, kv_len)?
            .squeeze(0)?; // (kv_heads, L, hd)
        let values = v_cache
            .narrow(0, seq.slot, 1)?
            .narrow(2, 0, kv_len)?
            .squeeze(0)?;
        // (len, heads, hd) -> (kv_heads, n_rep, len, hd) -> (kv_heads, n_rep * len, hd)
        let q_seq = q
            .narrow(0, offset, len)?
            .reshape((len, kvh, n_rep, hd))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((kvh, n_rep * len, hd))?;
        let needs_mask = len > 1 || spec.sliding_window.is_some_and(|w| w < kv_len);
        let mask = if needs_mask {
            let key = MaskKey {
                first_seq: index,
                decode_seqs: 0,
                window: spec.sliding_window,
            };
            Some(plan.mask(key, || {
                let query_pos: Vec<usize> = (seq.start_pos..kv_len).collect();
                let m = mask_rows(&query_pos, kv_len, spec.sliding_window, q.dtype(), device)?;
                // (len, L) repeated for each of the n_rep head rows: (n_rep * len, L)
                m.unsqueeze(0)?
                    .repeat((n_rep, 1, 1))?
                    .reshape((n_rep * len, kv_len))
            })?)
        } else {
            None
        };
        let weights = attention_weights(&q_seq, &keys, spec, mask.as_ref())?; // (kv_heads, n_rep*len, L)
        let out = weights
            .matmul(&values)? // (kv_heads, n_rep * len, hd)
            .reshape((kvh, n_rep, len, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((len, spec.num_heads * hd))?;
        outputs.push(out);
    }
    Tensor::cat(&outputs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed_proj(rows: usize, cols: usize, seed: f64, bias: bool) -> Option<Proj> {
        let dev = &Device::Cpu;
        let w = Tensor::arange(0f32, (rows * cols) as f32, dev)
            .unwrap()
            .affine(1e-3, seed)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let weight = Arc::new(PackedMatrix::pack(&w).unwrap()?);
        let bias = bias.then(|| Tensor::ones(rows, DType::F32, dev).unwrap());
        Some(Proj::Packed { weight, bias })
    }

    /// The decode fast path's in-place rotation gives exactly the values of `Rotary::apply`, for
    /// both layouts and a partial rotary dimension.
    #[test]
    fn rotate_heads_matches_apply_bit_for_bit() {
        let (tokens, heads, hd) = (3, 4, 16);
        let positions = [0u32, 5, 17];
        let xs: Vec<f32> = (0..tokens * heads * hd)
            .map(|i| ((i * 7919) % 1999) as f32 / 999.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(xs.clone(), (tokens, heads, hd), &Device::Cpu).unwrap();
        for interleaved in [false, true] {
            for rotary_dim in [hd, hd / 2] {
                let rotary = Rotary::with_params(
                    10_000.0,
                    &RopeScaling::Default,
                    rotary_dim,
                    32,
                    interleaved,
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
                let pos = Tensor::new(&positions[..], &Device::Cpu).unwrap();
                let half = rotary_dim / 2;
                let pass = RotaryForPass {
                    cos: rotary
                        .cos
                        .index_select(&pos, 0)
                        .unwrap()
                        .reshape((tokens, 1, half))
                        .unwrap(),
                    sin: rotary
                        .sin
                        .index_select(&pos, 0)
                        .unwrap()
                        .reshape((tokens, 1, half))
                        .unwrap(),
                    host: None,
                };
                let want = rotary.apply(&x, &pass).unwrap().flatten_all().unwrap();
                let want = want.to_vec1::<f32>().unwrap();
                let cos = pass.cos.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let sin = pass.sin.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut got = xs.clone();
                for (t, row) in got.chunks_exact_mut(heads * hd).enumerate() {
                    let rows = t * half..(t + 1) * half;
                    rotary.rotate_heads(row, hd, &cos[rows.clone()], &sin[rows]);
                }
                assert_ne!(got, xs, "something was rotated");
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "interleaved {interleaved}, rotary_dim {rotary_dim}");
            }
        }
    }

    #[test]
    fn stacked_projections_give_exactly_the_separate_outputs() {
        let Some(q) = packed_proj(32, 24, 0.1, true) else {
            eprintln!("skipped: no AVX-512F, nothing is packed here");
            return;
        };
        let k = packed_proj(16, 24, 0.2, true).unwrap();
        let v = packed_proj(5, 24, 0.3, true).unwrap();
        let xs = Tensor::arange(0f32, 72.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 24))
            .unwrap()
            .cos()
            .unwrap();
        let separate: Vec<Vec<Vec<f32>>> = [&q, &k, &v]
            .iter()
            .map(|p| p.forward(&xs).unwrap().to_vec2().unwrap())
            .collect();
        let stacked = Stacked::new(vec![q.clone(), k.clone(), v.clone()]).unwrap();
        assert!(matches!(stacked, Stacked::Fused { .. }));
        let fused: Vec<Vec<Vec<f32>>> = stacked
            .forward(&xs)
            .unwrap()
            .iter()
            .map(|t| t.to_vec2().unwrap())
            .collect();
        assert_eq!(fused, separate);

        // A part that does not fill whole panels can only come last; mixed biases stay separate.
        let odd_first = Stacked::new(vec![v.clone(), q.clone()]).unwrap();
        assert!(matches!(odd_first, Stacked::Separate(_)));
        let no_bias = packed_proj(16, 24, 0.4, false).unwrap();
        let mixed = Stacked::new(vec![q, no_bias]).unwrap();
        assert!(matches!(mixed, Stacked::Separate(_)));
    }

    #[test]
    fn mask_rows_are_causal_and_windowed() {
        let m = mask_rows(&[1, 4], 5, None, DType::F32, &Device::Cpu).unwrap();
        let m = m.to_vec2::<f32>().unwrap();
        assert_eq!(
            m[0],
            [
                0.0,
                0.0,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY
            ]
        );
        assert_eq!(m[1], [0.0; 5]);
        let w = mask_rows(&[4], 5, Some(2), DType::F32, &Device::Cpu).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(w.to_vec2::<f32>().unwrap()[0], [inf, inf, inf, 0.0, 0.0]);
    }

    fn inv_freq(rotary: &Rotary) -> Vec<f32> {
        // Row 1 of the tables is (cos(f), sin(f)) for each frequency f.
        let cos = rotary.cos.get(1).unwrap().to_vec1::<f32>().unwrap();
        let sin = rotary.sin.get(1).unwrap().to_vec1::<f32>().unwrap();
        cos.iter().zip(&sin).map(|(c, s)| s.atan2(*c)).collect()
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let dev = &Device::Cpu;
        let plain = Rotary::with_params(
            500_000.0,
            &RopeScaling::Default,
            64,
            4,
            false,
            DType::F32,
            dev,
        )
        .unwrap();
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let scaled =
            Rotary::with_params(500_000.0, &scaling, 64, 4, false, DType::F32, dev).unwrap();
        let (plain, scaled) = (inv_freq(&plain), inv_freq(&scaled));
        // Wavelength 2*pi/f below 8192/4 = 2048: unchanged; above 8192: divided by 8.
        assert!((plain[0] - scaled[0]).abs() < 1e-6);
        let last = plain.len() - 1;
        assert!(2.0 * std::f32::consts::PI / plain[last] > 8192.0);
        assert!((plain[last] / 8.0 - scaled[last]).abs() < 1e-9);
    }

    #[test]
    fn longrope_divides_by_factors_and_scales_by_attention_factor() {
        let dev = &Device::Cpu;
        let scaling = RopeScaling::LongRope {
            short_factor: vec![1.0, 2.0],
            long_factor: vec![4.0, 4.0],
            original_max_position_embeddings: 2,
            attention_factor: 1.5,
        };
        let rotary = Rotary::with_params(10_000.0, &scaling, 4, 8, false, DType::F32, dev).unwrap();
        let cos0 = rotary.cos.get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(cos0, [1.5, 1.5]);
        let freqs: Vec<f32> = inv_freq(&rotary);
        assert!((freqs[0] - 1.0).abs() < 1e-6);
        assert!((freqs[1] - 0.01 / 2.0).abs() < 1e-6);
        assert!(rotary.long.is_some());
    }
}
