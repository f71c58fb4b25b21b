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
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Activation, Embedding};

use crate::models::config::{
    check_limit, ModelError, RopeScaling, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN_SIZE, MAX_LAYERS,
    MAX_POSITION_EMBEDDINGS,
};
use crate::models::cpu_matmul_q8::{packed_q8_applies, PackedQ8};
use crate::models::layers::{AttnSpec, Embed, GateUp, Proj, RmsNorm, Rotary, Stacked};
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
        // wick's packed Q8_0 kernels need no row padding (that is for candle's repacked kernels).
        let packed_q8 = packed_q8_applies(self.device);
        let options = GgufOptions {
            pad_rows: self.options.pad_rows && !packed_q8,
            ..self.options.clone()
        };
        let (qt, in_padding) = prepare_weight(self.qtensor(name)?, &options, self.device)?;
        let bias = match bias {
            Some(b) if self.has(b) => Some(self.dense(b)?),
            _ => None,
        };
        if packed_q8 && in_padding == 0 {
            if let Some(packed) = PackedQ8::pack(&qt)? {
                return Ok(Proj::PackedQ8 {
                    weight: Arc::new(packed),
                    bias,
                });
            }
        }
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

/// Reads the metadata of a GGUF file (tokenizer, chat template, hyper-parameters) and checks the
/// header before anything is trusted: the metadata's `general.alignment` is walked by
/// [`check_gguf_alignment`] before candle reads the file (candle divides by it), and every tensor
/// is checked by [`check_gguf_tensors`] (non-zero dimensions, element and byte counts without
/// overflow, data inside the file) before any tensor is read. The one entry point for GGUF
/// headers: the model loader and the tokenizer loader both come here.
///
/// # Errors
/// I/O or a malformed file ([`ModelError::Gguf`] naming what is wrong).
pub fn read_content(path: &Path) -> Result<gguf_file::Content, ModelError> {
    let io_err = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let file_size = file.metadata().map_err(io_err)?.len();
    check_gguf_alignment(&mut std::io::BufReader::new(&mut file), file_size)?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    // The header was walked above; a panic left in candle's reader becomes an error, not a dead
    // worker (safety net only).
    let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(&mut std::io::BufReader::new(&mut file))
    }))
    .map_err(|_| ModelError::Gguf("the GGUF reader panicked on this header".to_string()))??;
    check_gguf_tensors(&content, file_size)?;
    Ok(content)
}

/// Deepest nesting of GGUF metadata arrays walked by [`check_gguf_alignment`].
const GGUF_MAX_VALUE_DEPTH: usize = 8;
/// Most metadata entries (and tensors) a GGUF header may declare.
const GGUF_MAX_ENTRIES: u64 = 1 << 24;

/// Walks the GGUF header's metadata (without keeping it) and checks `general.alignment`: it must
/// be a power of two (so non-zero) when present. candle 0.11.1 divides by it unchecked (F2).
///
/// # Errors
/// [`ModelError::Gguf`] for a bad magic/version, counts or lengths past the file's end, or a bad
/// alignment.
pub fn check_gguf_alignment<R: Read>(reader: &mut R, file_size: u64) -> Result<(), ModelError> {
    let mut walker = GgufWalker {
        reader,
        position: 0,
        file_size,
        wide_lengths: true,
    };
    let magic = walker.u32()?;
    if magic != 0x4655_4747 {
        return Err(ModelError::Gguf(format!("bad magic {magic:#010x}")));
    }
    walker.wide_lengths = match walker.u32()? {
        1 => false,
        2 | 3 => true,
        other => {
            return Err(ModelError::Gguf(format!(
                "unsupported GGUF version {other}"
            )))
        }
    };
    let _tensor_count = walker.length()?;
    let kv_count = walker.length()?;
    if kv_count > GGUF_MAX_ENTRIES {
        return Err(ModelError::Gguf(format!(
            "{kv_count} metadata entries, more than {GGUF_MAX_ENTRIES}"
        )));
    }
    for _ in 0..kv_count {
        let key = walker.string()?;
        let value_type = walker.u32()?;
        if key == b"general.alignment" {
            let alignment = match value_type {
                0 | 1 => u64::from(walker.bytes::<1>()?[0]),
                2 | 3 => u64::from(u16::from_le_bytes(walker.bytes::<2>()?)),
                4 | 5 => u64::from(walker.u32()?),
                other => {
                    walker.skip_value(other, 0)?;
                    continue; // candle ignores other types and uses its default
                }
            };
            // Signed types: candle ignores negative values (the sign bit makes them huge here,
            // so they are refused too; no real file has one).
            if !alignment.is_power_of_two() {
                return Err(ModelError::Gguf(format!(
                    "`general.alignment` is {alignment}; it must be a power of two"
                )));
            }
        } else {
            walker.skip_value(value_type, 0)?;
        }
    }
    Ok(())
}

/// A bounded forward reader over a GGUF header: every length is checked against the file's size
/// before anything is skipped.
struct GgufWalker<'a, R> {
    reader: &'a mut R,
    position: u64,
    file_size: u64,
    /// Lengths are u64 (v2, v3) or u32 (v1).
    wide_lengths: bool,
}

impl<R: Read> GgufWalker<'_, R> {
    fn truncated() -> ModelError {
        ModelError::Gguf("the header runs past the end of the file".to_string())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ModelError> {
        let mut buf = [0u8; N];
        self.reader
            .read_exact(&mut buf)
            .map_err(|_| Self::truncated())?;
        self.position += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.bytes::<4>()?))
    }

    fn length(&mut self) -> Result<u64, ModelError> {
        if self.wide_lengths {
            Ok(u64::from_le_bytes(self.bytes::<8>()?))
        } else {
            Ok(u64::from(self.u32()?))
        }
    }

    fn remaining(&self) -> u64 {
        self.file_size.saturating_sub(self.position)
    }

    fn skip(&mut self, n: u64) -> Result<(), ModelError> {
        if n > self.remaining() {
            return Err(Self::truncated());
        }
        let copied = std::io::copy(&mut self.reader.take(n), &mut std::io::sink())
            .map_err(|e| ModelError::Gguf(format!("reading the header: {e}")))?;
        if copied != n {
            return Err(Self::truncated());
        }
        self.position += n;
        Ok(())
    }

    /// A string's bytes (keys are short; only keys are kept).
    fn string(&mut self) -> Result<Vec<u8>, ModelError> {
        let len = self.length()?;
        if len > self.remaining() || len > 1 << 20 {
            return Err(ModelError::Gguf(format!(
                "a metadata key of {len} bytes does not fit the file"
            )));
        }
        let mut key = Vec::new();
        self.reader
            .by_ref()
            .take(len)
            .read_to_end(&mut key)
            .map_err(|_| Self::truncated())?;
        if key.len() as u64 != len {
            return Err(Self::truncated());
        }
        self.position += len;
        Ok(key)
    }

    fn skip_value(&mut self, value_type: u32, depth: usize) -> Result<(), ModelError> {
        let fixed = |t: u32| match t {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        if let Some(size) = fixed(value_type) {
            return self.skip(size);
        }
        match value_type {
            8 => {
                let len = self.length()?;
                self.skip(len)
            }
            9 => {
                if depth >= GGUF_MAX_VALUE_DEPTH {
                    return Err(ModelError::Gguf(format!(
                        "metadata arrays nested deeper than {GGUF_MAX_VALUE_DEPTH}"
                    )));
                }
                let item_type = self.u32()?;
                let count = self.length()?;
                if let Some(size) = fixed(item_type) {
                    let bytes = count.checked_mul(size).ok_or_else(Self::truncated)?;
                    return self.skip(bytes);
                }
                // Strings and arrays take at least 4 bytes each: the count is bounded by the file.
                if count > self.remaining() / 4 {
                    return Err(Self::truncated());
                }
                for _ in 0..count {
                    self.skip_value(item_type, depth + 1)?;
                }
                Ok(())
            }
            other => Err(ModelError::Gguf(format!(
                "unknown metadata value type {other}"
            ))),
        }
    }
}

/// Checks every tensor of `content` before any is read: no zero dimension (candle would build a
/// slice from a dangling pointer, F12), element and byte counts computed without overflow (F11),
/// the element count a multiple of the format's block, and the data inside the file.
///
/// # Errors
/// [`ModelError::Gguf`] naming the first bad tensor.
pub fn check_gguf_tensors(content: &gguf_file::Content, file_size: u64) -> Result<(), ModelError> {
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let bad = |why: String| ModelError::Gguf(format!("tensor `{name}` {dims:?}: {why}"));
        if dims.contains(&0) {
            return Err(bad("has a zero dimension".to_string()));
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad("the element count overflows".to_string()))?;
        let block = info.ggml_dtype.block_size() as u64;
        if block == 0 || elems % block != 0 {
            return Err(bad(format!(
                "{elems} elements are not a multiple of the block size {block}"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(info.ggml_dtype.type_size() as u64)
            .ok_or_else(|| bad("the byte count overflows".to_string()))?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes));
        match end {
            Some(end) if end <= file_size && usize::try_from(elems).is_ok() => {}
            _ => {
                return Err(bad(format!(
                    "{bytes} bytes at offset {} do not fit the {file_size}-byte file",
                    info.offset
                )))
            }
        }
    }
    Ok(())
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
    // Caps before anything is sized from the metadata (F3, F4 in docs/ROBUSTNESS.md).
    check_limit(&key("block_count"), num_layers, MAX_LAYERS)?;
    check_limit(&key("embedding_length"), hidden, MAX_HIDDEN_SIZE)?;
    check_limit(&key("attention.head_count"), num_heads, MAX_HEADS)?;
    check_limit(&key("attention.head_count_kv"), num_kv_heads, MAX_HEADS)?;
    // Every layer needs its tensors: a block count past the tensors present is refused before
    // the layers are built.
    if !r.has(&format!(
        "blk.{}.attn_q.weight",
        num_layers.saturating_sub(1)
    )) {
        return Err(ModelError::Gguf(format!(
            "`{}` is {num_layers} but tensor `blk.{}.attn_q.weight` is missing",
            key("block_count"),
            num_layers.saturating_sub(1)
        )));
    }
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
    check_limit(&key("context_length"), context, MAX_POSITION_EMBEDDINGS)?;
    check_limit(&key("attention.key_length"), head_dim, MAX_HEAD_DIM)?;
    check_limit(&key("rope.dimension_count"), rotary_dim, MAX_HEAD_DIM)?;

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
            qkv: Stacked::new(vec![
                r.proj(&format!("{p}.attn_q.weight"), q_bias.as_deref())?,
                r.proj(&format!("{p}.attn_k.weight"), k_bias.as_deref())?,
                r.proj(&format!("{p}.attn_v.weight"), v_bias.as_deref())?,
            ])?,
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
            gate_up: GateUp::new(
                r.proj(&format!("{p}.ffn_gate.weight"), None)?,
                r.proj(&format!("{p}.ffn_up.weight"), None)?,
                Activation::Silu,
            )?,
            down_proj: r.proj(&format!("{p}.ffn_down.weight"), None)?,
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
        embed_tokens: Embed::Table(Embedding::new(embed, hidden)),
        layers,
        norm,
        lm_head,
        rotary,
        info,
        device: device.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: metadata `(key, u32 value)` entries, then tensor infos
    /// `(name, dims in GGUF order, ggml type, offset)`, then `data_bytes` zero bytes of data.
    fn gguf(
        kvs: &[(&str, u32)],
        tensors: &[(&str, &[u64], u32, u64)],
        data_bytes: usize,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        };
        out.extend(0x4655_4747u32.to_le_bytes());
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (key, value) in kvs {
            string(&mut out, key);
            out.extend(4u32.to_le_bytes());
            out.extend(value.to_le_bytes());
        }
        for (name, dims, dtype, offset) in tensors {
            string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(dtype.to_le_bytes());
            out.extend(offset.to_le_bytes());
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        out.extend(std::iter::repeat_n(0u8, data_bytes));
        out
    }

    fn read(bytes: &[u8]) -> Result<gguf_file::Content, ModelError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).expect("write");
        read_content(&path)
    }

    fn gguf_error(result: Result<gguf_file::Content, ModelError>) -> String {
        match result {
            Err(ModelError::Gguf(message)) => message,
            other => panic!("expected a GGUF error, got {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_header_with_an_f32_tensor_is_read() {
        let content = read(&gguf(
            &[("general.alignment", 32)],
            &[("w", &[4, 2], 0, 0)],
            32,
        ))
        .expect("valid file");
        assert_eq!(content.tensor_infos["w"].shape.dims(), &[2, 4]);
    }

    #[test]
    fn alignment_zero_or_not_a_power_of_two_is_refused_before_candle_divides() {
        for alignment in [0, 3, 48] {
            let message = gguf_error(read(&gguf(&[("general.alignment", alignment)], &[], 0)));
            assert!(message.contains("general.alignment"), "{message}");
        }
    }

    #[test]
    fn a_tensor_with_a_zero_dimension_is_refused() {
        let message = gguf_error(read(&gguf(&[], &[("w", &[0, 4], 0, 0)], 64)));
        assert!(message.contains("zero dimension"), "{message}");
    }

    #[test]
    fn tensor_dims_whose_product_overflows_are_refused() {
        let huge = 1u64 << 40;
        let message = gguf_error(read(&gguf(&[], &[("w", &[huge, huge], 0, 0)], 64)));
        assert!(message.contains("overflows"), "{message}");
    }

    #[test]
    fn tensor_data_past_the_end_of_the_file_is_refused() {
        let message = gguf_error(read(&gguf(&[], &[("w", &[4, 4], 0, 0)], 32)));
        assert!(message.contains("do not fit"), "{message}");
        let message = gguf_error(read(&gguf(&[], &[("w", &[4], 0, u64::MAX)], 32)));
        assert!(message.contains("do not fit"), "{message}");
    }

    #[test]
    fn truncated_metadata_is_an_error() {
        let mut bytes = gguf(&[("general.alignment", 32)], &[], 0);
        bytes.truncate(30);
        assert!(matches!(read(&bytes), Err(ModelError::Gguf(_))));
    }
}
