//! From resolved model files and the worker configuration to a running engine: device and dtype
//! choice, model and tokenizer loading, KV-cache sizing, and a warm-up generation.
//!
//! Owned here: the start-up decisions. Not here: downloads (`hub`), architectures (`models`).

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};

use super::{
    spawn, EngineConfig, EngineError, EngineHandle, GenerateRequest, SamplingParams, SeqEvent,
};
use crate::config::Config;
use crate::hub::{ModelFiles, WeightFiles};
use crate::models::cpu_matmul::{packed_kernels_apply, set_cpu_matmul, CpuMatmul};
use crate::tokenizer::Tokenizer;

/// Default context cap on CPU when `MAX_MODEL_LEN` is not set (the KV cache is preallocated).
const CPU_DEFAULT_MAX_MODEL_LEN: usize = 4096;

/// Longest a warm-up generation may take.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(300);

/// Requests the engine inbox holds (beyond running ones) before `submit` reports overload.
const INBOX_CAPACITY: usize = 1024;

/// Picks the device named by `DEVICE`: `auto` (CUDA 0 when built with CUDA and a GPU is present,
/// else CPU), `cpu`, `cuda` or `cuda:N`.
///
/// # Errors
/// [`EngineError::Model`] for an unknown name, or CUDA asked of a build without it.
pub fn select_device(name: &str) -> Result<Device, EngineError> {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "auto" => auto_device(),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda_device(ordinal),
            _ => Err(EngineError::Model(format!(
                "`DEVICE` must be auto, cpu, cuda or cuda:N, got {name:?}"
            ))),
        },
    }
}

#[cfg(feature = "cuda")]
fn auto_device() -> Result<Device, EngineError> {
    Device::cuda_if_available(0).map_err(|e| EngineError::Model(format!("cuda: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn auto_device() -> Result<Device, EngineError> {
    Ok(Device::Cpu)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, EngineError> {
    Device::new_cuda(ordinal).map_err(|e| EngineError::Model(format!("cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device, EngineError> {
    Err(EngineError::Model(format!(
        "`DEVICE` cuda:{ordinal} asked, but this wick was built without the `cuda` feature"
    )))
}

/// Picks the compute dtype named by `DTYPE`: `auto` is f32 on CPU (bf16 has no CPU matmul kernel)
/// and bf16 on CUDA.
///
/// # Errors
/// [`EngineError::Model`] for an unknown name.
pub fn select_dtype(name: &str, device: &Device) -> Result<DType, EngineError> {
    match name.trim().to_ascii_lowercase().as_str() {
        "auto" if device.is_cpu() => Ok(DType::F32),
        "auto" => Ok(DType::BF16),
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(EngineError::Model(format!(
            "`DTYPE` must be auto, f32, f16 or bf16, got {other:?}"
        ))),
    }
}

/// The context per sequence: the configured `MAX_MODEL_LEN`, never above the model's limit; by
/// default the model's limit (capped at 4096 on CPU, where the cache lives in RAM).
pub fn select_max_model_len(configured: Option<usize>, model_max: usize, device: &Device) -> usize {
    match configured {
        Some(len) => len.min(model_max),
        None if device.is_cpu() => model_max.min(CPU_DEFAULT_MAX_MODEL_LEN),
        None => model_max,
    }
}

/// Loads the tokenizer of `files`: `tokenizer.json` and friends, or the GGUF metadata.
///
/// # Errors
/// [`EngineError::Model`] with the tokenizer's message.
pub fn load_tokenizer(
    files: &ModelFiles,
    custom_chat_template: Option<&str>,
) -> Result<Tokenizer, EngineError> {
    let tokenizer = match (&files.weights, &files.tokenizer_json) {
        (WeightFiles::Gguf(path), None) => {
            let content = crate::models::gguf::read_content(path).map_err(|e| {
                EngineError::Model(format!("cannot read GGUF {}: {e}", path.display()))
            })?;
            Tokenizer::from_gguf(&content, custom_chat_template)
        }
        _ => Tokenizer::from_files(files, custom_chat_template),
    };
    tokenizer.map_err(|e| EngineError::Model(e.to_string()))
}

/// Loads model and tokenizer from `files` as `config` says and starts the engine.
///
/// # Errors
/// [`EngineError::Model`] when the device, dtype, model, tokenizer or cache cannot be set up.
pub fn load_engine(files: &ModelFiles, config: &Config) -> Result<EngineHandle, EngineError> {
    let device = select_device(&config.device)?;
    let dtype = select_dtype(&config.dtype, &device)?;
    let tokenizer = load_tokenizer(files, config.custom_chat_template.as_deref())?;
    set_cpu_matmul(if config.cpu_matmul == "candle" {
        CpuMatmul::Candle
    } else {
        CpuMatmul::Auto
    });
    // Dense (safetensors) weights only: GGUF keeps its quantized kernels.
    let packed_kernels = matches!(files.weights, WeightFiles::Safetensors(_))
        && packed_kernels_apply(&device, dtype);
    let model = crate::models::load(files, &device, dtype)
        .map_err(|e| EngineError::Model(e.to_string()))?;
    let model_max = model.info().max_position_embeddings;
    let max_model_len = select_max_model_len(config.max_model_len, model_max, &device);
    let model_name = config
        .served_model_name
        .clone()
        .or_else(|| config.model_name.clone())
        .unwrap_or_else(|| model.info().architecture.clone());
    tracing::info!(
        architecture = %model.info().architecture,
        dtype = ?dtype,
        packed_kernels,
        max_model_len,
        max_num_seqs = config.max_num_seqs,
        "model loaded"
    );
    let engine_config = EngineConfig {
        max_num_seqs: config.max_num_seqs,
        max_model_len,
        max_num_batched_tokens: config.max_num_batched_tokens,
        inbox_capacity: INBOX_CAPACITY,
        model_name,
        device,
    };
    spawn(model, Arc::new(tokenizer), engine_config)
}

/// Runs one short greedy generation so the first real request does not pay for first-touch costs.
///
/// # Errors
/// Whatever the engine reports for that generation, or [`EngineError::Model`] on timeout.
pub async fn warm_up(handle: &EngineHandle) -> Result<(), EngineError> {
    let mut prompt_ids = handle
        .tokenizer()
        .encode("Hello", true)
        .map_err(|e| EngineError::Model(e.to_string()))?;
    if prompt_ids.is_empty() {
        prompt_ids.push(0);
    }
    let request = GenerateRequest {
        request_id: "warm-up".into(),
        prompt_ids,
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(2)
        },
    };
    let mut events = handle.submit(request)?;
    let finished = tokio::time::timeout(WARM_UP_TIMEOUT, async {
        while let Some(event) = events.recv().await {
            if let SeqEvent::Finished(summary) = event {
                return Some(summary);
            }
        }
        None
    })
    .await
    .map_err(|_| {
        EngineError::Model(format!("warm-up did not finish within {WARM_UP_TIMEOUT:?}"))
    })?;
    match finished {
        Some(summary) if summary.error.is_none() => Ok(()),
        Some(summary) => Err(EngineError::Model(format!(
            "warm-up failed: {}",
            summary.error.unwrap_or_default()
        ))),
        None => Err(EngineError::Stopped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dtype_is_f32_on_cpu_and_names_are_checked() {
        assert_eq!(select_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(select_dtype("BF16", &Device::Cpu).unwrap(), DType::BF16);
        assert!(select_dtype("f8", &Device::Cpu).is_err());
    }

    #[test]
    fn device_names_are_parsed_and_cuda_needs_the_feature() {
        assert!(select_device("cpu").unwrap().is_cpu());
        assert!(select_device("gpu").is_err());
        if !cfg!(feature = "cuda") {
            assert!(select_device("auto").unwrap().is_cpu());
            assert!(
                matches!(select_device("cuda:1"), Err(EngineError::Model(m)) if m.contains("cuda"))
            );
        }
    }

    #[test]
    fn max_model_len_never_exceeds_the_model_limit() {
        assert_eq!(select_max_model_len(Some(100), 2048, &Device::Cpu), 100);
        assert_eq!(select_max_model_len(Some(9000), 2048, &Device::Cpu), 2048);
        assert_eq!(select_max_model_len(None, 8192, &Device::Cpu), 4096);
        assert_eq!(select_max_model_len(None, 2048, &Device::Cpu), 2048);
    }
}
