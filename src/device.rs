//! Compute device choice and run-time GPU detection.
//!
//! - Feature `probe` (the default, CPU builds): cudarc loads `libcuda` at run time. Its presence is
//!   checked first (`is_culib_present`), because cudarc panics instead of returning an error when the
//!   library is missing. A CPU build can so report a GPU it cannot use.
//! - Feature `cuda`: the same queries through candle's re-export of cudarc (linked at build time).
//! - Neither: no GPU.
//!
//! [`check_gpu_memory`] runs before a model is loaded: weights plus the KV-cache budget must fit in the
//! free memory of the GPU times `GPU_MEMORY_UTILIZATION`, or the worker refuses to start with a message
//! that says what to change.

use thiserror::Error;

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// Marketing name (e.g. `NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Free memory in bytes at the time of the query.
    pub free_bytes: u64,
}

/// Where the model will run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// CUDA GPU with this ordinal.
    Cuda(usize),
}

/// Outcome of the GPU memory check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuMemoryCheck {
    /// The model does not run on a GPU (CPU build or CPU device): nothing to check.
    NoGpu,
    /// It fits.
    Fits {
        /// The GPU checked.
        gpu: GpuInfo,
        /// Bytes the model needs (weights + KV cache).
        needed: u64,
        /// Bytes it may use (free × utilization).
        budget: u64,
    },
}

/// Device errors; each says what to change.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// `DEVICE` is malformed.
    #[error("invalid DEVICE `{0}`: expected auto, cpu, cuda or cuda:N")]
    InvalidSpec(String),
    /// A CUDA device was asked of a CPU-only build.
    #[error("DEVICE={0} needs a CUDA build of wick, and this one is CPU-only: use DEVICE=cpu, or build with `--no-default-features --features cuda`")]
    CudaNotCompiled(String),
    /// The GPU asked for is not there.
    #[error("DEVICE={spec}: {detail}")]
    NoSuchGpu {
        /// The device spec.
        spec: String,
        /// What the driver reported.
        detail: String,
    },
    /// The CUDA driver failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// The model does not fit in GPU memory.
    #[error("the model needs {} of GPU memory (weights {} + KV cache {}) but GPU {} ({}) allows {} ({} free x GPU_MEMORY_UTILIZATION {utilization}): lower MAX_MODEL_LEN or MAX_NUM_SEQS, choose a smaller or quantized model, or raise GPU_MEMORY_UTILIZATION",
        gib(*weights_bytes + *kv_bytes), gib(*weights_bytes), gib(*kv_bytes), gpu.ordinal, gpu.name, gib(*budget), gib(gpu.free_bytes))]
    InsufficientGpuMemory {
        /// The GPU checked.
        gpu: GpuInfo,
        /// Weight bytes.
        weights_bytes: u64,
        /// KV-cache bytes.
        kv_bytes: u64,
        /// Bytes allowed.
        budget: u64,
        /// `GPU_MEMORY_UTILIZATION`.
        utilization: f64,
    },
}

fn gib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // display only
    let g = bytes as f64 / (1u64 << 30) as f64;
    format!("{g:.2} GiB")
}

/// Parses `DEVICE` (`auto`, `cpu`, `cuda`, `cuda:N`); `auto` picks GPU 0 in CUDA builds when one is
/// present, else the CPU.
///
/// # Errors
/// [`DeviceError::InvalidSpec`], [`DeviceError::CudaNotCompiled`], [`DeviceError::NoSuchGpu`].
pub fn choose_device(spec: &str) -> Result<DeviceChoice, DeviceError> {
    let spec_lc = spec.trim().to_ascii_lowercase();
    let wanted = match spec_lc.as_str() {
        "auto" => None,
        "cpu" => return Ok(DeviceChoice::Cpu),
        "cuda" | "gpu" => Some(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Some(n),
            _ => return Err(DeviceError::InvalidSpec(spec.to_string())),
        },
    };
    if !cfg!(feature = "cuda") {
        return match wanted {
            None => {
                if let Ok(gpus) = gpu_info() {
                    if let Some(gpu) = gpus.first() {
                        tracing::warn!(gpu = %gpu.name, "a GPU is present but this build of wick is CPU-only; running on the CPU");
                    }
                }
                Ok(DeviceChoice::Cpu)
            }
            Some(_) => Err(DeviceError::CudaNotCompiled(spec.to_string())),
        };
    }
    let gpus = gpu_info()?;
    match wanted {
        None => Ok(if gpus.is_empty() {
            DeviceChoice::Cpu
        } else {
            DeviceChoice::Cuda(0)
        }),
        Some(n) if n < gpus.len() => Ok(DeviceChoice::Cuda(n)),
        Some(n) => Err(DeviceError::NoSuchGpu {
            spec: spec.to_string(),
            detail: format!("GPU {n} not found ({} present)", gpus.len()),
        }),
    }
}

/// The candle device for a choice.
///
/// # Errors
/// [`DeviceError::Driver`] when CUDA fails to initialise; [`DeviceError::CudaNotCompiled`] in CPU builds.
pub fn candle_device(choice: DeviceChoice) -> Result<candle_core::Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(candle_core::Device::Cpu),
        DeviceChoice::Cuda(n) if cfg!(feature = "cuda") => {
            candle_core::Device::new_cuda(n).map_err(|e| DeviceError::Driver(e.to_string()))
        }
        DeviceChoice::Cuda(n) => Err(DeviceError::CudaNotCompiled(format!("cuda:{n}"))),
    }
}

/// The GPUs the driver reports; empty when there is no driver, no GPU, or no CUDA support compiled in.
///
/// # Errors
/// [`DeviceError::Driver`] when the driver is present but a query fails.
pub fn gpu_info() -> Result<Vec<GpuInfo>, DeviceError> {
    probe::gpus()
}

/// Checks that `weights_bytes + kv_bytes` fit in GPU 0's free memory times `utilization`. CPU builds
/// (no `cuda` feature) return [`GpuMemoryCheck::NoGpu`]: the model runs on the CPU there.
///
/// # Errors
/// [`DeviceError::InsufficientGpuMemory`] naming the figures and what to change; driver errors.
pub fn check_gpu_memory(
    weights_bytes: u64,
    kv_bytes: u64,
    utilization: f64,
) -> Result<GpuMemoryCheck, DeviceError> {
    check_gpu_memory_on(0, weights_bytes, kv_bytes, utilization)
}

/// [`check_gpu_memory`] for GPU `ordinal`.
///
/// # Errors
/// As [`check_gpu_memory`].
pub fn check_gpu_memory_on(
    ordinal: usize,
    weights_bytes: u64,
    kv_bytes: u64,
    utilization: f64,
) -> Result<GpuMemoryCheck, DeviceError> {
    if !cfg!(feature = "cuda") {
        return Ok(GpuMemoryCheck::NoGpu);
    }
    let gpus = gpu_info()?;
    let Some(gpu) = gpus.into_iter().find(|g| g.ordinal == ordinal) else {
        return Ok(GpuMemoryCheck::NoGpu);
    };
    fit(gpu, weights_bytes, kv_bytes, utilization)
}

/// The memory rule itself: `weights + kv <= free * utilization`.
///
/// # Errors
/// [`DeviceError::InsufficientGpuMemory`].
pub fn fit(
    gpu: GpuInfo,
    weights_bytes: u64,
    kv_bytes: u64,
    utilization: f64,
) -> Result<GpuMemoryCheck, DeviceError> {
    let utilization = utilization.clamp(0.0, 1.0);
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )] // byte budget, >= 0
    let budget = (gpu.free_bytes as f64 * utilization) as u64;
    let needed = weights_bytes.saturating_add(kv_bytes);
    if needed > budget {
        return Err(DeviceError::InsufficientGpuMemory {
            gpu,
            weights_bytes,
            kv_bytes,
            budget,
            utilization,
        });
    }
    Ok(GpuMemoryCheck::Fits {
        gpu,
        needed,
        budget,
    })
}

#[cfg(any(feature = "probe", feature = "cuda"))]
mod probe {
    #[cfg(all(feature = "cuda", not(feature = "probe")))]
    use candle_core::cuda_backend::cudarc;

    use super::{DeviceError, GpuInfo};
    use cudarc::driver::{result, CudaContext};

    /// `CUDA_ERROR_NO_DEVICE`: a driver without GPUs (e.g. a container without `--gpus`).
    const CUDA_ERROR_NO_DEVICE: u32 = 100;

    pub(super) fn gpus() -> Result<Vec<GpuInfo>, DeviceError> {
        // cudarc panics on a missing symbol of an old driver; treat that as "no usable GPU".
        match std::panic::catch_unwind(query) {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!("the CUDA driver could not be queried (too old?); treating this machine as having no GPU");
                Ok(Vec::new())
            }
        }
    }

    fn query() -> Result<Vec<GpuInfo>, DeviceError> {
        #[cfg(feature = "probe")]
        {
            // SAFETY: only tries to dlopen the driver library; no CUDA function is called.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Ok(Vec::new());
            }
        }
        if let Err(e) = result::init() {
            if e.0 as u32 == CUDA_ERROR_NO_DEVICE {
                return Ok(Vec::new());
            }
            return Err(DeviceError::Driver(format!("cuInit: {e:?}")));
        }
        let count = result::device::get_count()
            .map_err(|e| DeviceError::Driver(format!("device count: {e:?}")))?;
        let mut gpus = Vec::new();
        for ordinal in 0..usize::try_from(count).unwrap_or(0) {
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| DeviceError::Driver(format!("GPU {ordinal}: {e:?}")))?;
            let name = ctx
                .name()
                .map_err(|e| DeviceError::Driver(format!("GPU {ordinal} name: {e:?}")))?;
            let (free, total) = ctx
                .mem_get_info()
                .map_err(|e| DeviceError::Driver(format!("GPU {ordinal} memory: {e:?}")))?;
            gpus.push(GpuInfo {
                ordinal,
                name,
                total_bytes: total as u64,
                free_bytes: free as u64,
            });
        }
        Ok(gpus)
    }
}

#[cfg(not(any(feature = "probe", feature = "cuda")))]
mod probe {
    use super::{DeviceError, GpuInfo};

    pub(super) fn gpus() -> Result<Vec<GpuInfo>, DeviceError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(free_gib: u64) -> GpuInfo {
        GpuInfo {
            ordinal: 0,
            name: "Test GPU".into(),
            total_bytes: 80 << 30,
            free_bytes: free_gib << 30,
        }
    }

    #[test]
    fn fit_applies_utilization_to_free_memory() {
        assert!(matches!(
            fit(gpu(20), 10 << 30, 7 << 30, 0.9),
            Ok(GpuMemoryCheck::Fits { .. })
        ));
        let err = fit(gpu(20), 10 << 30, 9 << 30, 0.9).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("19.00 GiB") && msg.contains("18.00 GiB") && msg.contains("MAX_MODEL_LEN"),
            "{msg}"
        );
    }

    #[test]
    fn device_specs_parse() {
        assert_eq!(choose_device("cpu").unwrap(), DeviceChoice::Cpu);
        assert_eq!(choose_device("CPU").unwrap(), DeviceChoice::Cpu);
        assert!(matches!(
            choose_device("tpu"),
            Err(DeviceError::InvalidSpec(_))
        ));
        assert!(matches!(
            choose_device("cuda:x"),
            Err(DeviceError::InvalidSpec(_))
        ));
        if !cfg!(feature = "cuda") {
            assert!(matches!(
                choose_device("cuda:0"),
                Err(DeviceError::CudaNotCompiled(_))
            ));
            assert_eq!(choose_device("auto").unwrap(), DeviceChoice::Cpu);
            assert_eq!(
                check_gpu_memory(1 << 40, 1 << 40, 0.9).unwrap(),
                GpuMemoryCheck::NoGpu
            );
        }
    }

    #[test]
    fn gpu_probe_never_panics_and_reports_sane_figures() {
        // On a machine without a driver this is empty; with one, every GPU has free <= total.
        for g in gpu_info().unwrap() {
            assert!(g.free_bytes <= g.total_bytes && !g.name.is_empty(), "{g:?}");
        }
    }
}
