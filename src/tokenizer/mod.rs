//! Tokenizer loading (`tokenizer.json` or GGUF metadata), encode/decode, special-token ids, incremental
//! detokenization that never splits a UTF-8 character, and chat templates ([`chat_template`]).

pub mod chat_template;

use thiserror::Error;

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
