//! `models.toml`: named presets (repo, pinned revision, architecture, dtype, files, sha256, chat template
//! override, default context length). The file in the repository root is compiled in as the built-in
//! default; `--models-toml` / `WICK_MODELS_TOML` or a `models.toml` in the working directory replaces it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::source::{is_sha256_hex, validate_file_path, validate_repo_id, validate_revision};
use super::HubError;
use crate::config::Config;

/// The built-in presets (the repository's `models.toml`).
pub const BUILTIN_MODELS_TOML: &str = include_str!("../../models.toml");

/// Largest `models.toml` read from disk.
const MAX_MODELS_TOML_BYTES: u64 = 1024 * 1024;

/// Default preset name when `models.toml` names none.
const FALLBACK_DEFAULT: &str = "smollm2-135m-instruct";

/// How a preset's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// safetensors (one file or shards through `model.safetensors.index.json`).
    Safetensors,
    /// One GGUF file.
    Gguf,
}

impl WeightFormat {
    fn as_str(self) -> &'static str {
        match self {
            WeightFormat::Safetensors => "safetensors",
            WeightFormat::Gguf => "gguf",
        }
    }
}

/// One preset.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// The key in `models.toml` (filled in after parsing).
    #[serde(skip)]
    pub name: String,
    /// Hub repo id.
    pub repo: String,
    /// Branch, tag or (preferably) a 40-hex commit.
    pub revision: String,
    /// Model family as wick names it (`llama`, `qwen2`, `mistral`, `phi3`, `gemma2`).
    pub architecture: String,
    /// The checkpoint's own dtype, used for `DTYPE=auto` on GPU (CPU always computes in f32).
    pub dtype: String,
    /// Weight format.
    pub format: WeightFormat,
    /// The GGUF file (required for `gguf`; ignored for safetensors, which follow the index).
    #[serde(default)]
    pub file: Option<String>,
    /// sha256 of `file`, checked on top of the Hub's own hash (only at the pinned revision).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Size of `file` in bytes, for `wick models`.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// A chat template replacing the model's own (applied when `CUSTOM_CHAT_TEMPLATE` is unset).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Default `MAX_MODEL_LEN` (applied when unset).
    #[serde(default)]
    pub max_model_len: Option<usize>,
    /// One line for `wick models`.
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsToml {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    presets: BTreeMap<String, Preset>,
}

/// A parsed, validated `models.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Presets {
    source_name: String,
    default: String,
    presets: BTreeMap<String, Preset>,
}

impl Presets {
    /// The built-in presets.
    ///
    /// # Errors
    /// Only if the compiled-in file is broken (a unit test keeps it valid).
    pub fn builtin() -> Result<Self, HubError> {
        Self::parse(BUILTIN_MODELS_TOML, "built-in models.toml")
    }

    /// Presets for a configuration: `--models-toml` when set, else `./models.toml` when present, else built in.
    ///
    /// # Errors
    /// [`HubError::Presets`] when the chosen file cannot be read or is invalid.
    pub fn for_config(config: &Config) -> Result<Self, HubError> {
        if let Some(path) = &config.models_toml {
            return Self::load(path);
        }
        let local = Path::new("models.toml");
        if local.is_file() {
            return Self::load(local);
        }
        Self::builtin()
    }

    /// Reads and parses a `models.toml` file (at most 1 MiB).
    ///
    /// # Errors
    /// [`HubError::Presets`].
    pub fn load(path: &Path) -> Result<Self, HubError> {
        let name = path.display().to_string();
        let fail = |reason: String| HubError::Presets {
            source_name: name.clone(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        if meta.len() > MAX_MODELS_TOML_BYTES {
            return Err(fail(format!(
                "{} bytes is over the {MAX_MODELS_TOML_BYTES}-byte limit",
                meta.len()
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        Self::parse(&text, &name)
    }

    /// Parses and validates `models.toml` text.
    ///
    /// # Errors
    /// [`HubError::Presets`] naming the preset and field.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, HubError> {
        let fail = |reason: String| HubError::Presets {
            source_name: source_name.to_string(),
            reason,
        };
        let parsed: ModelsToml = toml::from_str(text).map_err(|e| fail(e.to_string()))?;
        let mut presets = BTreeMap::new();
        for (name, mut preset) in parsed.presets {
            preset.name = name.clone();
            validate_preset(&preset)
                .map_err(|reason| fail(format!("preset `{name}`: {reason}")))?;
            presets.insert(name, preset);
        }
        let default = parsed
            .default
            .unwrap_or_else(|| FALLBACK_DEFAULT.to_string());
        if !presets.contains_key(&default) {
            return Err(fail(format!("`default = \"{default}\"` names no preset")));
        }
        Ok(Presets {
            source_name: source_name.to_string(),
            default,
            presets,
        })
    }

    /// The preset used when `MODEL_NAME` is unset.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// Where these presets came from (a path or "built-in models.toml").
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// A preset by name (exact match).
    pub fn get(&self, name: &str) -> Option<&Preset> {
        self.presets.get(name)
    }

    /// All presets, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Preset> {
        self.presets.values()
    }

    /// A plain-text table for `wick models`.
    pub fn table(&self) -> String {
        let header = [
            "NAME", "FORMAT", "ARCH", "DTYPE", "MAX LEN", "REPO", "REVISION",
        ];
        let rows: Vec<[String; 7]> = self
            .iter()
            .map(|p| {
                let name = if p.name == self.default {
                    format!("{} (default)", p.name)
                } else {
                    p.name.clone()
                };
                let repo = match &p.file {
                    Some(file) if p.format == WeightFormat::Gguf => format!("{}:{}", p.repo, file),
                    _ => p.repo.clone(),
                };
                let revision = if p.revision.len() == 40 {
                    p.revision[..12].to_string()
                } else {
                    p.revision.clone()
                };
                [
                    name,
                    p.format.as_str().to_string(),
                    p.architecture.clone(),
                    p.dtype.clone(),
                    p.max_model_len
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "-".into()),
                    repo,
                    revision,
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut push_row = |cells: Vec<&str>| {
            let line: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        };
        push_row(header.to_vec());
        for row in &rows {
            push_row(row.iter().map(String::as_str).collect());
        }
        out.push_str(&format!(
            "\n{} presets from {}. Use MODEL_NAME=<name>, a Hub repo id (org/name, org/name:file.gguf) or a local path.\n",
            rows.len(),
            self.source_name
        ));
        out
    }
}

impl Preset {
    /// Fills configuration values the user left unset from this preset: `CUSTOM_CHAT_TEMPLATE` and
    /// `MAX_MODEL_LEN` always, `DTYPE=auto` only in CUDA builds (CPU computes in f32).
    pub fn apply_defaults(&self, config: &mut Config) {
        if config.custom_chat_template.is_none() {
            config.custom_chat_template.clone_from(&self.chat_template);
        }
        if config.max_model_len.is_none() {
            config.max_model_len = self.max_model_len;
        }
        if cfg!(feature = "cuda")
            && config.dtype == "auto"
            && self.format == WeightFormat::Safetensors
        {
            config.dtype.clone_from(&self.dtype);
        }
    }
}

fn validate_preset(p: &Preset) -> Result<(), String> {
    validate_repo_id(&p.repo).map_err(|e| format!("`repo`: {e}"))?;
    validate_revision(&p.revision).map_err(|e| format!("`revision`: {e}"))?;
    if !matches!(p.dtype.as_str(), "f32" | "f16" | "bf16") {
        return Err(format!(
            "`dtype` must be f32, f16 or bf16, got {:?}",
            p.dtype
        ));
    }
    if let Some(file) = &p.file {
        validate_file_path(file).map_err(|e| format!("`file`: {e}"))?;
    }
    match p.format {
        WeightFormat::Gguf => {
            let file = p.file.as_deref().ok_or("format gguf needs `file`")?;
            if !file.to_ascii_lowercase().ends_with(".gguf") {
                return Err("`file` must end in .gguf".into());
            }
        }
        WeightFormat::Safetensors => {
            if p.file.is_some() || p.sha256.is_some() {
                return Err(
                    "safetensors presets follow the repo's index; `file` and `sha256` are for gguf"
                        .into(),
                );
            }
        }
    }
    if let Some(sha) = &p.sha256 {
        if !is_sha256_hex(sha) {
            return Err("`sha256` must be 64 lowercase hex characters".into());
        }
    }
    if p.max_model_len.is_some_and(|l| l < 2) {
        return Err("`max_model_len` must be >= 2".into());
    }
    if p.chat_template
        .as_ref()
        .is_some_and(|t| t.trim().is_empty())
    {
        return Err("`chat_template` must not be empty".into());
    }
    Ok(())
}

/// The `wick models` output for a configuration.
///
/// # Errors
/// [`HubError::Presets`] when the configured `models.toml` is unreadable or invalid.
pub fn list_presets(config: &Config) -> Result<String, HubError> {
    Ok(Presets::for_config(config)?.table())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_presets_cover_the_required_models() {
        let presets = Presets::builtin().unwrap();
        for repo in [
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "Qwen/Qwen2.5-1.5B-Instruct",
            "Qwen/Qwen2.5-7B-Instruct",
            "meta-llama/Llama-3.1-8B-Instruct",
            "meta-llama/Llama-3.2-1B-Instruct",
            "meta-llama/Llama-3.2-3B-Instruct",
            "mistralai/Mistral-7B-Instruct-v0.3",
            "microsoft/Phi-3.5-mini-instruct",
            "google/gemma-2-2b-it",
        ] {
            assert!(
                presets
                    .iter()
                    .any(|p| p.repo == repo && p.format == WeightFormat::Safetensors),
                "{repo}"
            );
        }
        let gguf = presets
            .iter()
            .find(|p| p.format == WeightFormat::Gguf)
            .expect("a gguf preset");
        assert_eq!(
            gguf.sha256.as_deref(),
            Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
        );
        assert_eq!(gguf.size_bytes, Some(98_362_432));
        assert_eq!(
            presets.get(presets.default_name()).unwrap().repo,
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        );
    }

    #[test]
    fn table_lists_every_preset_and_marks_the_default() {
        let presets = Presets::builtin().unwrap();
        let table = presets.table();
        for p in presets.iter() {
            assert!(table.contains(&p.name), "{}", p.name);
        }
        assert!(table.contains("(default)"));
        assert!(table.starts_with("NAME"));
    }

    #[test]
    fn invalid_presets_are_rejected_with_the_field() {
        let base = r#"
            default = "m"
            [presets.m]
            repo = "org/m"
            revision = "main"
            architecture = "llama"
            dtype = "bf16"
            format = "gguf"
            file = "m.gguf"
        "#;
        Presets::parse(base, "t").unwrap();
        for (from, to, needle) in [
            ("file = \"m.gguf\"", "file = \"../m.gguf\"", "`file`"),
            ("repo = \"org/m\"", "repo = \"org/../m\"", "`repo`"),
            ("revision = \"main\"", "revision = \"../x\"", "`revision`"),
            ("dtype = \"bf16\"", "dtype = \"int3\"", "`dtype`"),
            ("default = \"m\"", "default = \"nope\"", "names no preset"),
            (
                "file = \"m.gguf\"",
                "file = \"m.gguf\"\nsha256 = \"xyz\"",
                "`sha256`",
            ),
            (
                "file = \"m.gguf\"",
                "file = \"m.gguf\"\nsurprise = 1",
                "unknown field",
            ),
        ] {
            let text = base.replace(from, to);
            let err = Presets::parse(&text, "t").unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn apply_defaults_fills_only_unset_values() {
        let presets = Presets::builtin().unwrap();
        let with_template = presets
            .iter()
            .find(|p| p.chat_template.is_some())
            .expect("a preset with a template override");
        let mut config = Config::for_test();
        config.custom_chat_template = None;
        config.max_model_len = None;
        with_template.apply_defaults(&mut config);
        assert_eq!(config.custom_chat_template, with_template.chat_template);
        assert_eq!(config.max_model_len, with_template.max_model_len);

        let mut config = Config::for_test();
        config.custom_chat_template = Some("{{ x }}".into());
        config.max_model_len = Some(77);
        with_template.apply_defaults(&mut config);
        assert_eq!(config.custom_chat_template.as_deref(), Some("{{ x }}"));
        assert_eq!(config.max_model_len, Some(77));
    }

    #[test]
    fn gemma_template_override_folds_the_system_prompt_into_the_first_turn() {
        let presets = Presets::builtin().unwrap();
        let gemma = presets.iter().find(|p| p.architecture == "gemma2").unwrap();
        let template = gemma.chat_template.as_deref().unwrap();
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("t", template).unwrap();
        let messages = serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}
        ]);
        let out = env
            .get_template("t")
            .unwrap()
            .render(minijinja::value::Serde(serde_json::json!({"messages": messages, "bos_token": "<bos>", "add_generation_prompt": true})))
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }
}
