//! Every knob of the worker: a `clap` flag with an environment variable for each, validated by
//! [`Config::validate`] before anything starts. Secrets (`HF_TOKEN`, `WICK_API_KEY`,
//! `RUNPOD_AI_API_KEY`) are read from the environment only, never from argv, and are wrapped in
//! [`Secret`], whose `Debug` and `Display` print nothing of the value.
//!
//! This is the only library module that reads environment variables.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use thiserror::Error;

/// A secret string. `Debug`/`Display` never print the value; use [`Secret::expose`] at the point of use.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The raw value, for the one place that sends it (an HTTP header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Reads a secret from the environment; empty values count as unset.
pub fn secret_from_env(name: &str) -> Option<Secret> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| Secret(v.trim().to_string()))
}

/// Reads a plain (non-secret) environment variable; empty values count as unset.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Command line of the `wick` binary.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "wick",
    version,
    about = "Serverless LLM worker (RunPod protocol, candle engine)"
)]
pub struct Cli {
    /// Optional subcommand; without one wick runs as a worker (queue, one-shot or dev server).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Worker settings.
    #[command(flatten)]
    pub config: Config,
}

/// Subcommands of `wick`.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// List the presets in models.toml.
    Models,
    /// Download the configured model into the cache and exit (for baking into an image).
    Download,
}

/// Worker configuration. Every field has a flag and an environment variable.
#[derive(Debug, Clone, Parser)]
pub struct Config {
    /// Model: a Hub repo id, a local directory, a local `.gguf` file, or a preset name from models.toml.
    /// Default: the SmolLM2-135M-Instruct preset.
    #[arg(long = "model", env = "MODEL_NAME")]
    pub model_name: Option<String>,
    /// Branch, tag or commit of the Hub repo.
    #[arg(long, env = "MODEL_REVISION")]
    pub model_revision: Option<String>,
    /// Root for the model cache (default `/runpod-volume` when it exists, as worker-vllm).
    #[arg(long, env = "BASE_PATH")]
    pub base_path: Option<PathBuf>,
    /// Path of models.toml (default: next to the binary's working directory, else built in).
    #[arg(long, env = "WICK_MODELS_TOML")]
    pub models_toml: Option<PathBuf>,
    /// Compute dtype: auto (f32 on CPU, bf16 on CUDA), f32, f16, bf16.
    #[arg(long, env = "DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Device: auto (CUDA when built with it and a GPU is present), cpu, cuda, cuda:N.
    #[arg(long, env = "DEVICE", default_value = "auto")]
    pub device: String,
    /// Longest context (prompt + output) per sequence; default min(model limit, 4096 on CPU / model limit on GPU).
    #[arg(long, env = "MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Sequences decoded together (KV-cache slots).
    #[arg(long, env = "MAX_NUM_SEQS", default_value_t = 32)]
    pub max_num_seqs: usize,
    /// Prompt tokens processed per engine step (chunked prefill budget).
    #[arg(long, env = "MAX_NUM_BATCHED_TOKENS", default_value_t = 256)]
    pub max_num_batched_tokens: usize,
    /// Share of free GPU memory the weights plus KV cache may use.
    #[arg(long, env = "GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// A Jinja chat template that replaces the model's own (never taken from a request).
    #[arg(long, env = "CUSTOM_CHAT_TEMPLATE")]
    pub custom_chat_template: Option<String>,
    /// Model name reported by /v1/models and in OpenAI responses (default: MODEL_NAME).
    #[arg(long, env = "SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Largest `logprobs` / `top_logprobs` a request may ask for.
    #[arg(long, env = "MAX_LOGPROBS", default_value_t = 20)]
    pub max_logprobs: usize,
    /// Run one short generation before taking the first job.
    #[arg(long, env = "WARMUP", default_value_t = true, action = clap::ArgAction::Set)]
    pub warmup: bool,
    /// Stream chunking: largest number of tokens per streamed chunk (worker-vllm DEFAULT_BATCH_SIZE).
    #[arg(long, env = "DEFAULT_BATCH_SIZE", default_value_t = 50)]
    pub default_batch_size: usize,
    /// Stream chunking: first chunk size (worker-vllm DEFAULT_MIN_BATCH_SIZE).
    #[arg(long, env = "DEFAULT_MIN_BATCH_SIZE", default_value_t = 1)]
    pub default_min_batch_size: usize,
    /// Stream chunking: growth factor between chunks (worker-vllm DEFAULT_BATCH_SIZE_GROWTH_FACTOR).
    #[arg(long, env = "DEFAULT_BATCH_SIZE_GROWTH_FACTOR", default_value_t = 3.0)]
    pub default_batch_size_growth_factor: f64,
    /// Jobs in flight at once (worker-vllm MAX_CONCURRENCY).
    #[arg(long, env = "MAX_CONCURRENCY", default_value_t = 30)]
    pub max_concurrency: usize,
    /// On SIGTERM, seconds in-flight jobs get to finish before they are reported failed.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// Directory where the queue worker keeps final results until the platform acknowledged them
    /// (replayed on the next start). Default: `wick-spool` under the system temp directory (the
    /// container disk: `BASE_PATH` is often a network volume shared by several workers).
    #[arg(long, env = "WICK_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// A job a killed worker left unfinished (found in the taken-job journal in the spool
    /// directory at the next start) is run again when it was taken at most this many seconds ago
    /// (and within `REQUEST_TIMEOUT_SECS`) and nothing of it was streamed yet; otherwise it is
    /// reported failed (`worker_restarted`). 0: never run again, always report.
    #[arg(long, env = "WICK_RESUME_MAX_AGE_SECS", default_value_t = 300)]
    pub resume_max_age_secs: u64,
    /// Longest one engine step may run before the engine counts as wedged (health fails, the
    /// queue worker stops taking jobs, fails the in-flight ones and exits non-zero).
    #[arg(long, env = "ENGINE_STEP_TIMEOUT_SECS", default_value_t = 120)]
    pub engine_step_timeout_secs: u64,
    /// Dense f32 matmuls on CPU: `auto` uses wick's packed AVX-512 kernels where the CPU has
    /// AVX-512F (candle's matmul otherwise); `candle` always uses candle's.
    #[arg(long, env = "WICK_CPU_MATMUL", default_value = "auto")]
    pub cpu_matmul: String,
    /// Run one job locally: a JSON string or a path to a JSON file; prints the result and exits.
    #[arg(long)]
    pub test_input: Option<String>,
    /// Start the local dev API server (RunPod and OpenAI routes).
    #[arg(long)]
    pub serve_api: bool,
    /// Dev server bind address. Non-loopback addresses need an API key.
    #[arg(long, env = "WICK_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Dev server port.
    #[arg(long, env = "WICK_PORT", default_value_t = 8000)]
    pub port: u16,
    /// File holding the dev server API key (the key itself is never taken from argv; or set WICK_API_KEY).
    #[arg(long, env = "WICK_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Allowed CORS origins for the dev server (comma separated). None by default; `*` is refused.
    #[arg(long, env = "WICK_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Largest request body the dev server and job inputs accept, in bytes.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Per-request deadline in seconds (dev server and queue jobs).
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 600)]
    pub request_timeout_secs: u64,
    /// Requests waiting for the engine beyond the running ones before the dev server answers 429.
    #[arg(long, env = "MAX_WAITING_REQUESTS", default_value_t = 256)]
    pub max_waiting_requests: usize,
    /// Hugging Face Hub settings from the `HF_*` environment variables (no flags; see [`HubEnv`]).
    #[arg(skip = HubEnv::from_env())]
    pub hub_env: HubEnv,
    /// OpenAI streams through a queue job as strings of SSE lines (worker-vllm's default); 0/false
    /// yields lists of chunk objects instead.
    #[arg(long, env = "RAW_OPENAI_OUTPUT", default_value = "true", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub raw_openai_output: bool,
    /// worker-vllm's name for the model name in OpenAI responses; wins over SERVED_MODEL_NAME there.
    #[arg(long, env = "OPENAI_SERVED_MODEL_NAME_OVERRIDE")]
    pub openai_served_model_name_override: Option<String>,
}

/// Hugging Face Hub settings, read from the environment under the names Python's `huggingface_hub`
/// uses, so a cache and endpoint shared with Python tools behave the same. `HF_TOKEN` is not here: it
/// is a [`Secret`] (see [`secret_from_env`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubEnv {
    /// `HF_ENDPOINT`: the Hub base URL (default `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// `HF_HUB_CACHE` (or the legacy `HUGGINGFACE_HUB_CACHE`): the cache directory itself.
    pub hub_cache: Option<PathBuf>,
    /// `HF_HOME`: the cache is `$HF_HOME/hub`.
    pub hf_home: Option<PathBuf>,
    /// `XDG_CACHE_HOME`: the cache is `$XDG_CACHE_HOME/huggingface/hub` when nothing above is set.
    pub xdg_cache_home: Option<PathBuf>,
    /// `HOME`: the last fallback, `~/.cache/huggingface/hub`.
    pub home: Option<PathBuf>,
    /// `HF_HUB_OFFLINE` (`1`, `true`, `yes`, `on`): resolve from the cache only, never the network.
    pub offline: bool,
}

impl HubEnv {
    /// Reads the variables above from the process environment (empty values count as unset).
    pub fn from_env() -> Self {
        HubEnv {
            endpoint: env_var("HF_ENDPOINT"),
            hub_cache: env_var("HF_HUB_CACHE")
                .or_else(|| env_var("HUGGINGFACE_HUB_CACHE"))
                .map(PathBuf::from),
            hf_home: env_var("HF_HOME").map(PathBuf::from),
            xdg_cache_home: env_var("XDG_CACHE_HOME").map(PathBuf::from),
            home: env_var("HOME").map(PathBuf::from),
            offline: env_var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            }),
        }
    }
}

/// A configuration that cannot work; the message names the flag.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// A value is out of range or malformed.
    #[error("invalid `{flag}`: {reason}")]
    Invalid {
        /// The flag (and its environment variable).
        flag: &'static str,
        /// What is wrong and what is expected.
        reason: String,
    },
}

impl Config {
    /// Cross-field checks, run before anything starts.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |flag: &'static str, reason: String| Err(ConfigError::Invalid { flag, reason });
        if !matches!(self.dtype.as_str(), "auto" | "f32" | "f16" | "bf16") {
            return invalid(
                "--dtype/DTYPE",
                format!("must be auto, f32, f16 or bf16, got {:?}", self.dtype),
            );
        }
        if self.max_num_seqs == 0 || self.max_num_seqs > 1024 {
            return invalid(
                "--max-num-seqs/MAX_NUM_SEQS",
                format!("must be in 1..=1024, got {}", self.max_num_seqs),
            );
        }
        if self.max_num_batched_tokens == 0 {
            return invalid(
                "--max-num-batched-tokens/MAX_NUM_BATCHED_TOKENS",
                "must be > 0".into(),
            );
        }
        if let Some(len) = self.max_model_len {
            if len < 2 {
                return invalid(
                    "--max-model-len/MAX_MODEL_LEN",
                    format!("must be >= 2, got {len}"),
                );
            }
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return invalid(
                "--gpu-memory-utilization/GPU_MEMORY_UTILIZATION",
                format!("must be in (0, 1], got {}", self.gpu_memory_utilization),
            );
        }
        if self.max_logprobs > 20 {
            return invalid(
                "--max-logprobs/MAX_LOGPROBS",
                format!("must be <= 20, got {}", self.max_logprobs),
            );
        }
        if self.max_concurrency == 0 || self.max_concurrency > 4096 {
            return invalid(
                "--max-concurrency/MAX_CONCURRENCY",
                format!("must be in 1..=4096, got {}", self.max_concurrency),
            );
        }
        if self.default_batch_size == 0 || self.default_min_batch_size == 0 {
            return invalid(
                "--default-batch-size/DEFAULT_BATCH_SIZE",
                "batch sizes must be >= 1".into(),
            );
        }
        if self.default_batch_size_growth_factor < 1.0 {
            return invalid(
                "--default-batch-size-growth-factor/DEFAULT_BATCH_SIZE_GROWTH_FACTOR",
                format!(
                    "must be >= 1, got {}",
                    self.default_batch_size_growth_factor
                ),
            );
        }
        if self.cors_origins.iter().any(|o| o.trim() == "*") {
            return invalid(
                "--cors-origins/WICK_CORS_ORIGINS",
                "`*` is not allowed; list origins explicitly".into(),
            );
        }
        if !matches!(self.cpu_matmul.as_str(), "auto" | "candle") {
            return invalid(
                "--cpu-matmul/WICK_CPU_MATMUL",
                format!("`{}` is not one of auto, candle", self.cpu_matmul),
            );
        }
        if self.engine_step_timeout_secs == 0 {
            return invalid(
                "--engine-step-timeout-secs/ENGINE_STEP_TIMEOUT_SECS",
                "must be > 0".into(),
            );
        }
        if self.max_request_bytes == 0 {
            return invalid(
                "--max-request-bytes/MAX_REQUEST_BYTES",
                "must be > 0".into(),
            );
        }
        Ok(())
    }

    /// A configuration with every default, for tests and embedding (no argv, no environment).
    pub fn for_test() -> Self {
        Config::parse_from(["wick"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_and_display_hide_the_value() {
        let s = Secret::new("hf_canary_value");
        assert!(!format!("{s:?}").contains("canary"));
        assert!(!format!("{s}").contains("canary"));
        assert_eq!(s.expose(), "hf_canary_value");
    }

    #[test]
    fn rejects_cors_wildcard() {
        let cfg = Config {
            cors_origins: vec!["*".into()],
            ..Config::for_test()
        };
        assert!(
            matches!(cfg.validate(), Err(ConfigError::Invalid { flag, .. }) if flag.contains("cors"))
        );
    }

    #[test]
    fn cpu_matmul_is_auto_or_candle() {
        assert_eq!(Config::for_test().cpu_matmul, "auto");
        let candle = Config {
            cpu_matmul: "candle".into(),
            ..Config::for_test()
        };
        candle.validate().unwrap();
        let typo = Config {
            cpu_matmul: "mkl".into(),
            ..Config::for_test()
        };
        assert!(
            matches!(typo.validate(), Err(ConfigError::Invalid { flag, .. }) if flag.contains("cpu-matmul"))
        );
    }

    #[test]
    fn defaults_are_valid() {
        Config::for_test().validate().unwrap();
    }
}

/// The RunPod platform environment (runpod-python 1.12.0 names and defaults). Its presence decides the
/// mode: with [`RunpodEnv::get_job_url`] set, `wick` runs as a queue worker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunpodEnv {
    /// `RUNPOD_WEBHOOK_GET_JOB`: job-take URL template (`$ID` = worker id).
    pub get_job_url: Option<String>,
    /// `RUNPOD_WEBHOOK_POST_OUTPUT`: job-done URL template (`$ID` = job id, `$RUNPOD_POD_ID` = worker id).
    pub post_output_url: Option<String>,
    /// `RUNPOD_WEBHOOK_POST_STREAM` (fallback `RUNPOD_WEBHOOK_JOB_STREAM`): job-stream URL template.
    pub post_stream_url: Option<String>,
    /// `RUNPOD_WEBHOOK_PING`: heartbeat URL template (`$RUNPOD_POD_ID` = worker id).
    pub ping_url: Option<String>,
    /// `RUNPOD_PING_INTERVAL`: heartbeat period in milliseconds (default 10000).
    pub ping_interval_ms: u64,
    /// `RUNPOD_AI_API_KEY`: sent raw in `Authorization`.
    pub api_key: Option<Secret>,
    /// `RUNPOD_POD_ID`: the worker id (URLs, error reports).
    pub pod_id: Option<String>,
    /// `RUNPOD_POD_HOSTNAME`: `hostname` in error reports.
    pub pod_hostname: Option<String>,
    /// `RUNPOD_ENDPOINT_ID`: when set, logs are JSON lines.
    pub endpoint_id: Option<String>,
    /// `RUNPOD_LOG_LEVEL` (fallback `RUNPOD_DEBUG_LEVEL`).
    pub log_level: Option<String>,
}

/// Default heartbeat period of the RunPod SDK, in milliseconds.
pub const DEFAULT_PING_INTERVAL_MS: u64 = 10_000;

impl RunpodEnv {
    /// Reads the RunPod variables from the process environment. Empty values count as unset; an
    /// unparsable `RUNPOD_PING_INTERVAL` falls back to the default (and is reported by the caller via
    /// [`RunpodEnv::ping_interval_raw`]).
    pub fn from_env() -> Self {
        RunpodEnv {
            get_job_url: env_var("RUNPOD_WEBHOOK_GET_JOB"),
            post_output_url: env_var("RUNPOD_WEBHOOK_POST_OUTPUT"),
            post_stream_url: env_var("RUNPOD_WEBHOOK_POST_STREAM")
                .or_else(|| env_var("RUNPOD_WEBHOOK_JOB_STREAM")),
            ping_url: env_var("RUNPOD_WEBHOOK_PING").filter(|u| u != "PING_NOT_SET"),
            ping_interval_ms: Self::ping_interval_raw()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(DEFAULT_PING_INTERVAL_MS),
            api_key: secret_from_env("RUNPOD_AI_API_KEY"),
            pod_id: env_var("RUNPOD_POD_ID"),
            pod_hostname: env_var("RUNPOD_POD_HOSTNAME"),
            endpoint_id: env_var("RUNPOD_ENDPOINT_ID"),
            log_level: env_var("RUNPOD_LOG_LEVEL").or_else(|| env_var("RUNPOD_DEBUG_LEVEL")),
        }
    }

    /// The raw `RUNPOD_PING_INTERVAL` value, for a startup warning when it does not parse.
    pub fn ping_interval_raw() -> Option<String> {
        env_var("RUNPOD_PING_INTERVAL")
    }

    /// Whether a queue is configured (`RUNPOD_WEBHOOK_GET_JOB` set): production mode.
    pub fn queue_configured(&self) -> bool {
        self.get_job_url.is_some()
    }
}
