//! Incremental detokenization: turns generated token ids into text deltas that never split a UTF-8
//! character. It decodes a short sliding window of ids (prefix-offset decoding, as vLLM and TGI do) so
//! tokenizers whose decoders depend on neighbouring tokens (byte-level BPE, SentencePiece `▁`) give
//! the same text as decoding the whole output at once.
//!
//! Owned here: the per-sequence decode state. Not here: stop strings (see `stop`).

use crate::tokenizer::{Tokenizer, TokenizerError};

/// Most tokens held back waiting for the rest of a UTF-8 character (one character is at most four
/// bytes, so at most four byte tokens); past this the text is emitted as decoded (with U+FFFD),
/// which keeps each step's decode window small even when a model emits stray bytes.
const MAX_HELD_TOKENS: usize = 8;

/// Per-sequence incremental decoder.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    /// Every generated id so far.
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// End of the text already emitted (ids `prefix_offset..read_offset` decode to emitted text).
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// A decoder for one sequence's output.
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            skip_special_tokens,
            ..IncrementalDecoder::default()
        }
    }

    /// Adds one token; returns the new text that is complete (possibly empty).
    ///
    /// # Errors
    /// [`TokenizerError::Codec`] when the tokenizer cannot decode.
    pub fn push(&mut self, tokenizer: &Tokenizer, token_id: u32) -> Result<String, TokenizerError> {
        self.ids.push(token_id);
        self.step(tokenizer, false)
    }

    /// Emits whatever is still held back (an incomplete UTF-8 tail decodes to U+FFFD here, as in the
    /// full decode). Call once when the sequence ends.
    ///
    /// # Errors
    /// [`TokenizerError::Codec`] when the tokenizer cannot decode.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        self.step(tokenizer, true)
    }

    fn step(&mut self, tokenizer: &Tokenizer, flush: bool) -> Result<String, TokenizerError> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full_text =
            tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        let incomplete =
            full_text.ends_with('\u{FFFD}') && self.ids.len() - self.read_offset < MAX_HELD_TOKENS;
        if !flush && (full_text.len() <= prefix_text.len() || incomplete) {
            // Nothing new yet, or the tail is an incomplete UTF-8 character: wait for more ids.
            return Ok(String::new());
        }
        let new_text = match full_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            // The window's text changed its start (rare decoder clean-ups): emit the byte-length
            // difference at the nearest char boundary, as vLLM does.
            None => {
                let mut cut = prefix_text.len().min(full_text.len());
                while !full_text.is_char_boundary(cut) {
                    cut += 1;
                }
                full_text[cut..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new_text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{ModelFiles, WeightFiles};

    fn fixture_tokenizer(name: &str) -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let files = ModelFiles {
            config: Some(dir.join("config.json")),
            weights: WeightFiles::Safetensors(vec![dir.join("model.safetensors")]),
            tokenizer_json: Some(dir.join("tokenizer.json")),
            tokenizer_config: Some(dir.join("tokenizer_config.json")),
            generation_config: Some(dir.join("generation_config.json")),
        };
        Tokenizer::from_files(&files, None).unwrap()
    }

    #[test]
    fn streaming_multibyte_text_never_emits_replacement_chars_and_matches_full_decode() {
        for family in [
            "tiny-llama",
            "tiny-mistral",
            "tiny-qwen2",
            "tiny-phi3",
            "tiny-gemma2",
        ] {
            let tok = fixture_tokenizer(family);
            let text = "Grüße, 世界! Ça va? 🦀 naïve café — ok";
            let ids = tok.encode(text, false).unwrap();
            let mut dec = IncrementalDecoder::new(true);
            let mut streamed = String::new();
            for &id in &ids {
                let delta = dec.push(&tok, id).unwrap();
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "{family}: delta {delta:?} splits a character"
                );
                streamed.push_str(&delta);
            }
            streamed.push_str(&dec.flush(&tok).unwrap());
            assert_eq!(streamed, tok.decode(&ids, true).unwrap(), "{family}");
        }
    }

    #[test]
    fn stray_bytes_are_released_after_a_bounded_wait() {
        let tok = fixture_tokenizer("tiny-llama");
        // A continuation byte alone never completes a character.
        let stray = tok
            .inner
            .token_to_id("\u{80}")
            .or_else(|| tok.inner.token_to_id("Ā"))
            .unwrap();
        let mut dec = IncrementalDecoder::new(true);
        let mut streamed = String::new();
        for _ in 0..MAX_HELD_TOKENS + 1 {
            streamed.push_str(&dec.push(&tok, stray).unwrap());
        }
        assert!(!streamed.is_empty(), "held back forever");
        streamed.push_str(&dec.flush(&tok).unwrap());
        assert_eq!(
            streamed,
            tok.decode(&[stray; MAX_HELD_TOKENS + 1], true).unwrap()
        );
    }

    #[test]
    fn special_tokens_are_skipped_or_kept_as_asked() {
        let tok = fixture_tokenizer("tiny-llama");
        let mut ids = tok.encode("Hello there", false).unwrap();
        ids.push(2004); // <|eot_id|>
        for skip in [true, false] {
            let mut dec = IncrementalDecoder::new(skip);
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&dec.push(&tok, id).unwrap());
            }
            streamed.push_str(&dec.flush(&tok).unwrap());
            assert_eq!(streamed, tok.decode(&ids, skip).unwrap());
            assert_eq!(streamed.contains("<|eot_id|>"), !skip);
        }
    }
}
