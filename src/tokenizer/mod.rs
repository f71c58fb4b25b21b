//! Tokenizer loading (`tokenizer.json` or GGUF metadata), encode/decode, special-token ids, incremental
//! detokenization that never splits a UTF-8 character, and chat templates ([`chat_template`]).

pub mod chat_template;

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde_json::Value;
use thiserror::Error;

use crate::hub::ModelFiles;

/// Largest JSON config file read (tokenizer.json of big vocabularies is tens of MB).
const MAX_CONFIG_BYTES: u64 = 64 * 1024 * 1024;

/// Tokenizer and template errors.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// The tokenizer file could not be read or parsed.
    #[error("cannot load tokenizer: {0}")]
    Load(String),
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
    /// The chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// The model has no chat template and none was configured.
    #[error("this model has no chat template; send `prompt` instead of `messages`, or set CUSTOM_CHAT_TEMPLATE")]
    NoChatTemplate,
}

/// A model's tokenizer plus what generation needs from its config files.
pub struct Tokenizer {
    /// The Hugging Face tokenizer.
    pub inner: tokenizers::Tokenizer,
    /// Every id that ends generation (config.json, generation_config.json, tokenizer's eos token).
    pub eos_token_ids: Vec<u32>,
    /// BOS token text (for chat templates).
    pub bos_token: Option<String>,
    /// EOS token text (for chat templates).
    pub eos_token: Option<String>,
    /// The compiled chat template, if the model (or CUSTOM_CHAT_TEMPLATE) has one.
    pub chat_template: Option<chat_template::ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` plus the special tokens and chat template of a Hugging Face model
    /// directory. EOS ids are gathered from `generation_config.json`, `config.json` (an int or a list)
    /// and the tokenizer's `eos_token`, deduplicated. `custom_chat_template` replaces the model's own.
    ///
    /// # Errors
    /// [`TokenizerError::Load`] when a file is missing or malformed, [`TokenizerError::Template`]
    /// when the chat template does not compile.
    pub fn from_files(
        files: &ModelFiles,
        custom_chat_template: Option<&str>,
    ) -> Result<Tokenizer, TokenizerError> {
        let tokenizer_json = files
            .tokenizer_json
            .as_deref()
            .ok_or_else(|| TokenizerError::Load("the model has no tokenizer.json".into()))?;
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| TokenizerError::Load(format!("{}: {e}", file_name(tokenizer_json))))?;
        let tokenizer_config = read_optional_json(files.tokenizer_config.as_deref())?;
        let generation_config = read_optional_json(files.generation_config.as_deref())?;
        let model_config = read_optional_json(files.config.as_deref())?;

        let bos_token = tokenizer_config
            .as_ref()
            .and_then(|c| token_text(c.get("bos_token")));
        let eos_token = tokenizer_config
            .as_ref()
            .and_then(|c| token_text(c.get("eos_token")));
        let mut eos_token_ids = Vec::new();
        for config in [&generation_config, &model_config].into_iter().flatten() {
            eos_token_ids.extend(token_ids(config.get("eos_token_id")));
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_token_ids.push(id);
        }
        dedup_in_order(&mut eos_token_ids);

        let source = match custom_chat_template {
            Some(custom) => Some(custom.to_string()),
            None => {
                let model_dir = files
                    .tokenizer_config
                    .as_deref()
                    .or(Some(tokenizer_json))
                    .and_then(Path::parent);
                chat_template::find_source(model_dir, tokenizer_config.as_ref())?
            }
        };
        let chat_template = source.map(chat_template::ChatTemplate::new).transpose()?;
        Ok(Tokenizer {
            inner,
            eos_token_ids,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    /// Builds the tokenizer from GGUF metadata: vocabulary and merges, `tokenizer.chat_template`, and
    /// EOS from `tokenizer.ggml.eos_token_id` (plus `tokenizer.ggml.eot_token_id` when present).
    /// `custom_chat_template` replaces the model's own.
    ///
    /// # Errors
    /// [`TokenizerError::Load`] when the metadata lacks a tokenizer, [`TokenizerError::Template`]
    /// when the chat template does not compile.
    pub fn from_gguf(
        content: &gguf_file::Content,
        custom_chat_template: Option<&str>,
    ) -> Result<Tokenizer, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_gguf(content)
            .map_err(|e| TokenizerError::Load(format!("gguf tokenizer: {e}")))?;
        let meta_id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let mut eos_token_ids: Vec<u32> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
                .iter()
                .filter_map(|k| meta_id(k))
                .collect();
        dedup_in_order(&mut eos_token_ids);
        let text_of = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id));
        let bos_token = text_of(meta_id("tokenizer.ggml.bos_token_id"));
        let eos_token = text_of(meta_id("tokenizer.ggml.eos_token_id"));
        let source = match custom_chat_template {
            Some(custom) => Some(custom.to_string()),
            None => content
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
        };
        let chat_template = source.map(chat_template::ChatTemplate::new).transpose()?;
        Ok(Tokenizer {
            inner,
            eos_token_ids,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text. `add_special_tokens` adds BOS etc. as the tokenizer's post-processor says
    /// (true for raw prompts, false for rendered chat templates, which carry their own).
    ///
    /// # Errors
    /// [`TokenizerError::Codec`].
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Decodes ids to text.
    ///
    /// # Errors
    /// [`TokenizerError::Codec`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Codec(e.to_string()))
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Reads and parses a JSON file if the model has it, with a size limit.
fn read_optional_json(path: Option<&Path>) -> Result<Option<Value>, TokenizerError> {
    let Some(path) = path else { return Ok(None) };
    let load = |e: String| TokenizerError::Load(format!("{}: {e}", file_name(path)));
    let len = std::fs::metadata(path)
        .map_err(|e| load(e.to_string()))?
        .len();
    if len > MAX_CONFIG_BYTES {
        return Err(load(format!(
            "file is {len} bytes, more than the {MAX_CONFIG_BYTES} allowed"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| load(e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| load(e.to_string()))
}

/// A special token given as a string or as an AddedToken object `{"content": ..}`.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Token ids given as one integer or a list of integers.
fn token_ids(value: Option<&Value>) -> Vec<u32> {
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(as_id).collect(),
        Some(v) => as_id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

fn dedup_in_order(ids: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_files(name: &str) -> ModelFiles {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        // The same resolution `MODEL_NAME=<dir>` gets.
        crate::hub::local::resolve_local_dir(&dir).expect("fixture directory resolves")
    }

    #[test]
    fn eos_ids_merge_configs_and_tokenizer_eos_without_duplicates() {
        let tok = Tokenizer::from_files(&fixture_files("tiny-llama"), None).unwrap();
        // generation_config [2004, 2001], config.json the same, eos_token <|eot_id|> = 2004.
        assert_eq!(tok.eos_token_ids, vec![2004, 2001]);
        assert_eq!(tok.eos_token.as_deref(), Some("<|eot_id|>"));
        assert_eq!(tok.bos_token.as_deref(), Some("<|begin_of_text|>"));
        assert!(tok.chat_template.is_some());
        let mistral = Tokenizer::from_files(&fixture_files("tiny-mistral"), None).unwrap();
        assert_eq!(mistral.eos_token_ids, vec![2]);
    }

    #[test]
    fn fixture_prompts_encode_to_reference_ids() {
        for family in [
            "tiny-llama",
            "tiny-mistral",
            "tiny-qwen2",
            "tiny-phi3",
            "tiny-gemma2",
        ] {
            let files = fixture_files(family);
            let tok = Tokenizer::from_files(&files, None).unwrap();
            let dir = files
                .config
                .as_ref()
                .unwrap()
                .parent()
                .unwrap()
                .to_path_buf();
            let reference: Value = serde_json::from_slice(
                &std::fs::read(dir.join("reference_generations.json")).unwrap(),
            )
            .unwrap();
            for case in reference["cases"].as_array().unwrap() {
                let add_special = case["kind"].as_str() != Some("chat");
                let ids = tok
                    .encode(case["prompt"].as_str().unwrap(), add_special)
                    .unwrap();
                let expected: Vec<u32> = case["prompt_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(ids, expected, "{family}/{}", case["name"]);
            }
        }
    }

    #[test]
    fn special_tokens_may_be_strings_or_added_token_objects() {
        let object: Value = serde_json::json!({"eos_token": {"content": "</s>", "lstrip": false}, "bos_token": "<s>"});
        assert_eq!(token_text(object.get("eos_token")).as_deref(), Some("</s>"));
        assert_eq!(token_text(object.get("bos_token")).as_deref(), Some("<s>"));
        assert_eq!(token_text(object.get("pad_token")), None);
        assert_eq!(token_ids(Some(&serde_json::json!(7))), vec![7]);
        assert_eq!(token_ids(Some(&serde_json::json!([7, 8]))), vec![7, 8]);
        assert_eq!(token_ids(Some(&serde_json::json!(null))), Vec::<u32>::new());
    }

    #[test]
    fn missing_tokenizer_json_is_a_load_error() {
        let files = ModelFiles {
            tokenizer_json: None,
            ..fixture_files("tiny-llama")
        };
        assert!(matches!(
            Tokenizer::from_files(&files, None),
            Err(TokenizerError::Load(_))
        ));
    }
}
