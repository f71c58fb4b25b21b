//! Model resolution and downloads: a local directory, a local `.gguf` file, a Hub repo id, or a preset
//! from `models.toml`, turned into [`ModelFiles`] on local disk.

use std::path::PathBuf;

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
