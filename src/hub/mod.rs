//! Model resolution and downloads: a local directory, a local `.gguf` file, a Hub repo id, or a preset
//! from `models.toml`, turned into [`ModelFiles`] on local disk.
//!
//! # Layout
//! - [`source`]: what `MODEL_NAME` / `MODEL_REVISION` name; validation of repo ids, revisions, file names.
//! - [`presets`]: `models.toml` (built in, or from disk) and the `wick models` table.
//! - [`local`]: local directories and `.gguf` files; the `model.safetensors.index.json` parser.
//! - [`download`]: the Hub path: wick's own HEADs and resumable ranged GETs into the Python-compatible
//!   cache, with per-blob locks, sha256 verification, retries, a stall watchdog, progress logs and a disk
//!   check on top. wick speaks the Hub's HTTP itself (reqwest) rather than through the `hf-hub` crate,
//!   whose Xet client added 89 crates to build on Linux and 7 MB to the binary, for a protocol a worker
//!   that reads plain `resolve` URLs never uses.
//! - [`cache`]: cache layout, atomic writes, `flock` locks, `.verified` markers, stale partial cleanup.
//! - [`verify`], [`disk`], [`progress`]: hashing, free space, progress lines.
//!
//! # Where files go
//! The cache directory is, in order: `HF_HUB_CACHE` (or `HUGGINGFACE_HUB_CACHE`), `$HF_HOME/hub`,
//! `$BASE_PATH/huggingface-cache/hub` (BASE_PATH defaults to `/runpod-volume` when that directory exists,
//! as in worker-vllm, so a network volume keeps weights across cold starts), `$XDG_CACHE_HOME/huggingface/hub`,
//! `~/.cache/huggingface/hub`. The layout is the one Python's `huggingface_hub` and the `hf-hub` crate use,
//! both ways: either can fill a cache wick reads, and read one wick filled.

pub mod cache;
pub mod disk;
pub mod download;
pub mod local;
pub mod presets;
pub mod progress;
pub mod source;
pub mod verify;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::{Config, HubEnv, Secret};
pub use disk::FreeSpace;
pub use presets::{list_presets, Preset, Presets};
pub use source::{parse_model_request, HubModel, HubWeights, ModelRequest, ModelSource};

/// Where the weights are and in which format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// One or more safetensors files (several when sharded via `model.safetensors.index.json`).
    Safetensors(Vec<PathBuf>),
    /// One GGUF file carrying weights, tokenizer and chat template.
    Gguf(PathBuf),
}

/// Every local file a model needs, resolved and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// `config.json` (absent for GGUF).
    pub config: Option<PathBuf>,
    /// The weights.
    pub weights: WeightFiles,
    /// `tokenizer.json` (absent for GGUF, whose metadata carries the tokenizer).
    pub tokenizer_json: Option<PathBuf>,
    /// `tokenizer_config.json` (chat template, bos/eos tokens).
    pub tokenizer_config: Option<PathBuf>,
    /// `generation_config.json` (extra EOS ids, default sampling).
    pub generation_config: Option<PathBuf>,
}

impl ModelFiles {
    /// Every path in this set, weights last.
    pub fn all_paths(&self) -> Vec<&Path> {
        let mut paths: Vec<&Path> = [
            &self.config,
            &self.tokenizer_json,
            &self.tokenizer_config,
            &self.generation_config,
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect();
        match &self.weights {
            WeightFiles::Safetensors(shards) => paths.extend(shards.iter().map(PathBuf::as_path)),
            WeightFiles::Gguf(path) => paths.push(path),
        }
        paths
    }

    /// Total size of the weight files in bytes (for the GPU memory check).
    ///
    /// # Errors
    /// I/O errors reading file metadata.
    pub fn weights_bytes(&self) -> std::io::Result<u64> {
        match &self.weights {
            WeightFiles::Safetensors(shards) => shards.iter().try_fold(0u64, |sum, p| {
                Ok(sum.saturating_add(std::fs::metadata(p)?.len()))
            }),
            WeightFiles::Gguf(path) => Ok(std::fs::metadata(path)?.len()),
        }
    }
}

/// Why a model could not be resolved. Each message says what to fix; none ever contains `HF_TOKEN`.
#[derive(Debug, Error)]
pub enum HubError {
    /// `MODEL_NAME` is not a preset, path or valid repo id.
    #[error("invalid MODEL_NAME `{name}`: {reason}")]
    InvalidModelName {
        /// The name as given (truncated).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// `MODEL_REVISION` is malformed.
    #[error("invalid MODEL_REVISION `{revision}`: {reason}")]
    InvalidRevision {
        /// The revision as given (truncated).
        revision: String,
        /// What is wrong.
        reason: String,
    },
    /// A file name (from `models.toml`, `MODEL_NAME` or an index file) could escape the model directory.
    #[error("refusing file name `{file}`: {reason}")]
    UnsafePath {
        /// The name (truncated).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A local model path is missing or incomplete.
    #[error("local model {}: {reason}", path.display())]
    LocalPath {
        /// The path.
        path: PathBuf,
        /// What is wrong or missing.
        reason: String,
    },
    /// `models.toml` is unreadable or invalid.
    #[error("{source_name}: {reason}")]
    Presets {
        /// The file (or "built-in models.toml").
        source_name: String,
        /// What is wrong, naming the preset and field.
        reason: String,
    },
    /// `model.safetensors.index.json` is unreadable or malformed.
    #[error("bad shard index {}: {reason}", path.display())]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The Hub has no such repo (or it is private and no valid token was sent).
    #[error("model repo `{repo}` was not found on {endpoint}: check MODEL_NAME (`org/name`, or a preset from `wick models`); a private repo also needs HF_TOKEN")]
    RepoNotFound {
        /// Repo id.
        repo: String,
        /// The Hub endpoint asked.
        endpoint: String,
    },
    /// The repo has no such branch, tag or commit.
    #[error("revision `{revision}` does not exist in `{repo}`: check MODEL_REVISION (a branch, tag or 40-hex commit)")]
    RevisionNotFound {
        /// Repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
    },
    /// A required file is not in the repo.
    #[error("`{file}` does not exist in `{repo}` at revision `{revision}`{hint}")]
    FileNotFound {
        /// Repo id.
        repo: String,
        /// Revision asked for.
        revision: String,
        /// The missing file.
        file: String,
        /// What to do about it (may be empty).
        hint: String,
    },
    /// The repo is gated or private and the request was not authorised.
    #[error("`{repo}` is gated or private and {}", if *token_given {
        "HF_TOKEN was rejected or has no access to it: accept the model's license on its Hub page with the account that owns the token, or use a token with read access"
    } else {
        "no HF_TOKEN is set: set HF_TOKEN to a read token of an account that accepted the model's license on its Hub page"
    })]
    Unauthorized {
        /// Repo id.
        repo: String,
        /// Whether a token was sent.
        token_given: bool,
    },
    /// The repo has no weights in a format wick loads.
    #[error("`{repo}` has no weights wick can load: {reason}")]
    NoWeights {
        /// Repo id.
        repo: String,
        /// What the repo has instead, and what to do.
        reason: String,
    },
    /// `HF_HUB_OFFLINE` is set and a needed file is not cached.
    #[error("`{file}` of `{repo}` (revision `{revision}`) is not in the cache at {} and HF_HUB_OFFLINE is set: run once with network access (or `wick download`) first, or unset HF_HUB_OFFLINE", cache_dir.display())]
    NotCached {
        /// Repo id.
        repo: String,
        /// Revision asked for.
        revision: String,
        /// The missing file (or `refs/<revision>`).
        file: String,
        /// The cache directory searched.
        cache_dir: PathBuf,
    },
    /// A file does not match the hash or size the Hub gave for it.
    #[error("`{file}` of `{repo}` is corrupt ({detail}){}", if *offline {
        "; HF_HUB_OFFLINE is set, so it cannot be downloaded again: unset HF_HUB_OFFLINE to replace it"
    } else {
        ""
    })]
    Corrupt {
        /// Repo id.
        repo: String,
        /// The file.
        file: String,
        /// Which check failed.
        detail: String,
        /// Whether we were offline (and so could not replace it).
        offline: bool,
    },
    /// A preset pins a sha256 the Hub does not serve.
    #[error("preset pins sha256 {pinned} for `{file}` of `{repo}`, but the Hub serves {served}: the file changed upstream; set MODEL_REVISION to the revision the pin was made for, or update the preset")]
    PinMismatch {
        /// Repo id.
        repo: String,
        /// The file.
        file: String,
        /// The preset's pin.
        pinned: String,
        /// What the Hub or cache has.
        served: String,
    },
    /// The cache's filesystem cannot hold the files.
    #[error("not enough disk space for `{repo}` in {}: {} needed ({} to download + margin), {} available; free space, or point BASE_PATH / HF_HUB_CACHE at a larger volume", path.display(), human_bytes(*needed), human_bytes(*download), human_bytes(*available))]
    DiskFull {
        /// Repo id.
        repo: String,
        /// The cache directory.
        path: PathBuf,
        /// Bytes still to download.
        download: u64,
        /// Bytes needed including the margin.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The disk filled up during a download (after the free-space check passed).
    #[error("the disk holding {} filled up while downloading `{repo}`: free space, or point BASE_PATH / HF_HUB_CACHE at a larger volume", path.display())]
    DiskFilled {
        /// Repo id.
        repo: String,
        /// The cache directory.
        path: PathBuf,
    },
    /// Network failures persisted through every retry.
    #[error("could not fetch `{file}` of `{repo}` from {endpoint} after {attempts} attempt(s): {detail}; check network access to the Hub (HF_ENDPOINT) or retry later")]
    Network {
        /// Repo id.
        repo: String,
        /// What was being fetched.
        file: String,
        /// The Hub endpoint.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        detail: String,
    },
    /// The Hub answered something unexpected (an unusual status, a malformed header).
    #[error("unexpected Hub response for `{file}` of `{repo}`: {detail}")]
    Protocol {
        /// Repo id.
        repo: String,
        /// What was being fetched.
        file: String,
        /// What was wrong.
        detail: String,
    },
    /// `HF_ENDPOINT` is not a usable URL.
    #[error("invalid HF_ENDPOINT `{endpoint}`: {reason}")]
    InvalidEndpoint {
        /// The value (credentials, if any, are not echoed).
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// Another process held a file lock for too long.
    #[error("{0}; another worker may be stuck downloading the same file")]
    Lock(#[from] cache::LockError),
    /// A filesystem operation failed.
    #[error("{} {}: {source}", what, path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// `1.5 GB`-style sizes (decimal units) for messages.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    #[allow(clippy::cast_precision_loss)] // display only
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Everything the Hub path needs, resolved from configuration (or built directly by tests).
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Hub base URL, without a trailing slash.
    pub endpoint: String,
    /// The cache directory (Python-compatible layout).
    pub cache_dir: PathBuf,
    /// Cache only, never the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Token for gated and private repos; sent only to `endpoint`.
    pub token: Option<Secret>,
    /// Source of the free-space figure for the disk check.
    pub free_space: FreeSpace,
    /// Files downloaded at once.
    pub max_parallel_downloads: usize,
    /// Attempts per file (first try included) for transient failures; an attempt that resumed a
    /// download and moved it forward does not count (see [`download`]).
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt (capped at 30 s), with full jitter.
    pub retry_base_delay: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest silence while reading a response body.
    pub read_timeout: Duration,
    /// Deadline of one metadata request (HEAD).
    pub request_timeout: Duration,
    /// A transfer that moves no byte for this long is abandoned and retried.
    pub stall_timeout: Duration,
    /// Longest wait for another process's lock on the same blob (it may be downloading it).
    pub lock_timeout: Duration,
    /// Partial files untouched for this long, with no live lock, are deleted after a successful resolve
    /// or when the disk is short (never the partial of a blob about to be fetched: that one is resumed).
    pub stale_partial_age: Duration,
    /// Interval between progress log lines.
    pub progress_interval: Duration,
}

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The network volume RunPod mounts (the default `BASE_PATH` when it exists).
pub const RUNPOD_VOLUME: &str = "/runpod-volume";

impl HubOptions {
    /// Defaults for `endpoint` and `cache_dir`: 4 parallel downloads, 5 attempts from 0.5 s, connect 10 s,
    /// read idle 60 s, metadata requests 30 s, stall 120 s, lock wait 60 min, partials stale after 60 min,
    /// progress every 5 s.
    pub fn new(endpoint: &str, cache_dir: &Path) -> Self {
        HubOptions {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache_dir: cache_dir.to_path_buf(),
            offline: false,
            token: None,
            free_space: FreeSpace::Filesystem,
            max_parallel_downloads: 4,
            max_attempts: 5,
            retry_base_delay: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(120),
            lock_timeout: Duration::from_secs(3600),
            stale_partial_age: Duration::from_secs(3600),
            progress_interval: Duration::from_secs(5),
        }
    }

    /// Options from the configuration (`HF_ENDPOINT`, cache variables, `BASE_PATH`, `HF_HUB_OFFLINE`).
    pub fn from_config(config: &Config, hf_token: Option<&Secret>) -> Self {
        let endpoint = config
            .hub_env
            .endpoint
            .as_deref()
            .unwrap_or(DEFAULT_ENDPOINT);
        let mut options = HubOptions::new(
            endpoint,
            &cache_dir_for(&config.hub_env, config.base_path.as_deref()),
        );
        options.offline = config.hub_env.offline;
        options.token = hf_token.cloned();
        options
    }
}

/// The cache directory for these settings (see the module docs for the order).
pub fn cache_dir_for(env: &HubEnv, base_path: Option<&Path>) -> PathBuf {
    if let Some(dir) = &env.hub_cache {
        return dir.clone();
    }
    if let Some(home) = &env.hf_home {
        return home.join("hub");
    }
    let runpod = Path::new(RUNPOD_VOLUME);
    let base = base_path
        .map(Path::to_path_buf)
        .or_else(|| runpod.is_dir().then(|| runpod.to_path_buf()));
    if let Some(base) = base {
        return base.join("huggingface-cache").join("hub");
    }
    if let Some(xdg) = &env.xdg_cache_home {
        return xdg.join("huggingface").join("hub");
    }
    env.home
        .as_deref()
        .unwrap_or(Path::new("."))
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

/// Parses `MODEL_NAME` / `MODEL_REVISION` against the configured presets.
///
/// # Errors
/// As [`parse_model_request`] and [`Presets::for_config`].
pub fn model_request(config: &Config) -> Result<ModelRequest, HubError> {
    let presets = Presets::for_config(config)?;
    parse_model_request(
        config.model_name.as_deref(),
        config.model_revision.as_deref(),
        &presets,
    )
}

/// Fills unset configuration values (chat template, max model length, GPU dtype) from the preset
/// `MODEL_NAME` names, if any; returns that preset.
///
/// # Errors
/// As [`model_request`].
pub fn apply_preset_defaults(config: &mut Config) -> Result<Option<Preset>, HubError> {
    let request = model_request(config)?;
    if let Some(preset) = &request.preset {
        preset.apply_defaults(config);
    }
    Ok(request.preset)
}

/// Resolves the configured model to local files, downloading from the Hub when needed.
///
/// # Errors
/// [`HubError`], each saying what to fix.
pub async fn resolve_model(
    config: &Config,
    hf_token: Option<&Secret>,
) -> Result<ModelFiles, HubError> {
    let request = model_request(config)?;
    resolve(&request, &HubOptions::from_config(config, hf_token)).await
}

/// `wick download`: resolves (downloading as needed) and logs where every file is. Same as
/// [`resolve_model`]; a separate name so the binary's intent is plain.
///
/// # Errors
/// As [`resolve_model`].
pub async fn download(config: &Config, hf_token: Option<&Secret>) -> Result<ModelFiles, HubError> {
    let files = resolve_model(config, hf_token).await?;
    for path in files.all_paths() {
        tracing::info!(path = %path.display(), "model file ready");
    }
    Ok(files)
}

/// Resolves a parsed request with explicit options (what [`resolve_model`] does after reading the config).
///
/// # Errors
/// [`HubError`].
pub async fn resolve(request: &ModelRequest, options: &HubOptions) -> Result<ModelFiles, HubError> {
    let started = Instant::now();
    let files = match &request.source {
        ModelSource::LocalDir(dir) => local::resolve_local_dir(dir)?,
        ModelSource::LocalGguf(path) => local::resolve_local_gguf(path)?,
        ModelSource::Hub(model) => download::fetch(model, options).await?,
    };
    tracing::info!(
        model = %describe(&request.source),
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "model files resolved"
    );
    Ok(files)
}

fn describe(source: &ModelSource) -> String {
    match source {
        ModelSource::LocalDir(p) | ModelSource::LocalGguf(p) => p.display().to_string(),
        ModelSource::Hub(m) => match &m.weights {
            HubWeights::Safetensors => format!("{}@{}", m.repo_id, m.revision),
            HubWeights::Gguf { file } => format!("{}:{}@{}", m.repo_id, file, m.revision),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_the_python_order() {
        let env = HubEnv {
            hub_cache: Some("/c".into()),
            hf_home: Some("/h".into()),
            xdg_cache_home: Some("/x".into()),
            home: Some("/home/u".into()),
            ..HubEnv::default()
        };
        assert_eq!(
            cache_dir_for(&env, Some(Path::new("/b"))),
            PathBuf::from("/c")
        );
        let env = HubEnv {
            hub_cache: None,
            ..env
        };
        assert_eq!(
            cache_dir_for(&env, Some(Path::new("/b"))),
            PathBuf::from("/h/hub")
        );
        let env = HubEnv {
            hf_home: None,
            ..env
        };
        assert_eq!(
            cache_dir_for(&env, Some(Path::new("/b"))),
            PathBuf::from("/b/huggingface-cache/hub")
        );
        if !Path::new(RUNPOD_VOLUME).exists() {
            assert_eq!(
                cache_dir_for(&env, None),
                PathBuf::from("/x/huggingface/hub")
            );
            let env = HubEnv {
                xdg_cache_home: None,
                ..env
            };
            assert_eq!(
                cache_dir_for(&env, None),
                PathBuf::from("/home/u/.cache/huggingface/hub")
            );
        }
    }

    #[test]
    fn options_carry_offline_endpoint_and_token_from_config() {
        let mut config = Config::for_test();
        config.hub_env = HubEnv {
            endpoint: Some("http://127.0.0.1:9/".into()),
            hub_cache: Some("/tmp/c".into()),
            offline: true,
            ..HubEnv::default()
        };
        let token = Secret::new("hf_canary");
        let options = HubOptions::from_config(&config, Some(&token));
        assert_eq!(options.endpoint, "http://127.0.0.1:9");
        assert_eq!(options.cache_dir, PathBuf::from("/tmp/c"));
        assert!(options.offline);
        assert!(!format!("{options:?}").contains("hf_canary"));
    }

    #[test]
    fn human_bytes_uses_decimal_units() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(98_362_432), "98.4 MB");
        assert_eq!(human_bytes(16_060_000_000), "16.1 GB");
    }

    #[test]
    fn error_messages_say_what_to_fix() {
        let e = HubError::Unauthorized {
            repo: "org/m".into(),
            token_given: false,
        };
        assert!(e.to_string().contains("set HF_TOKEN"));
        let e = HubError::DiskFull {
            repo: "org/m".into(),
            path: "/c".into(),
            download: 10,
            needed: 20,
            available: 5,
        };
        assert!(e.to_string().contains("not enough disk space"));
    }
}
