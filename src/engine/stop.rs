//! Stop conditions of one sequence, with vLLM's semantics: EOS ids (unless `ignore_eos`) and
//! `stop_token_ids` end with `stop`; none of them (nor stop strings) count before `min_tokens`
//! (their logits are set to `-inf` until then); `max_tokens` and a full context end with `length`.
//! Stop strings are matched on the decoded text, and text that could still become a stop string is
//! held back, so a stop string is never half-streamed.
//!
//! Owned here: the decisions and the text hold-back. Not here: decoding ids (see `detok`).

use super::request::{FinishReason, SamplingParams, StopMatch};

/// Why and on what a sequence stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct StopOutcome {
    /// `stop` or `length`.
    pub reason: FinishReason,
    /// The token or string that matched (none for `length`).
    pub stop_match: Option<StopMatch>,
}

/// Text released by [`StopChecker::push_text`] and whether a stop string matched.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextStep {
    /// Text safe to stream now.
    pub text: String,
    /// The stop string that matched, if any (the sequence must end).
    pub matched: Option<String>,
}

/// Per-sequence stop state.
#[derive(Debug, Clone)]
pub struct StopChecker {
    /// EOS ids (unless `ignore_eos`) plus `stop_token_ids`.
    stop_token_ids: Vec<u32>,
    stop_strings: Vec<String>,
    include_stop_str_in_output: bool,
    min_tokens: usize,
    max_tokens: usize,
    max_model_len: usize,
    /// Decoded text not yet streamed (a possible start of a stop string).
    held: String,
}

impl StopChecker {
    /// Builds the checker of one sequence. `eos_token_ids` come from the tokenizer and model configs.
    pub fn new(params: &SamplingParams, eos_token_ids: &[u32], max_model_len: usize) -> Self {
        let mut stop_token_ids: Vec<u32> = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_token_ids.extend_from_slice(eos_token_ids);
        }
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        StopChecker {
            stop_token_ids,
            stop_strings: params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            include_stop_str_in_output: params.include_stop_str_in_output,
            min_tokens: params.min_tokens,
            max_tokens: params.max_tokens,
            max_model_len,
            held: String::new(),
        }
    }

    /// Before `min_tokens` were generated, makes every stop token impossible to sample.
    /// `logits` is one row of length `vocab_size`.
    pub fn suppress_stop_tokens(&self, logits: &mut [f32], generated: usize) {
        if generated < self.min_tokens {
            for &id in &self.stop_token_ids {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Whether `token_id`, the `generated`-th output token, ends the sequence as a stop token.
    pub fn token_stop(&self, token_id: u32, generated: usize) -> Option<StopMatch> {
        (generated >= self.min_tokens && self.stop_token_ids.binary_search(&token_id).is_ok())
            .then_some(StopMatch::Token(token_id))
    }

    /// Whether the stop token's own text belongs in the output.
    pub fn include_stop_str_in_output(&self) -> bool {
        self.include_stop_str_in_output
    }

    /// Whether the sequence must end for length: `max_tokens` generated, or `seq_len` (prompt plus
    /// output) filled the context.
    pub fn length_stop(&self, generated: usize, seq_len: usize) -> bool {
        generated >= self.max_tokens || seq_len >= self.max_model_len
    }

    /// Adds decoded text. Returns what may be streamed now: everything up to a matched stop string
    /// (plus the string itself with `include_stop_str_in_output`), or, without a match, everything but
    /// the longest tail that could still grow into a stop string. With `is_final` nothing is held back.
    /// Stop strings only count once `generated >= min_tokens`.
    pub fn push_text(&mut self, delta: &str, generated: usize, is_final: bool) -> TextStep {
        self.held.push_str(delta);
        if generated >= self.min_tokens && !self.stop_strings.is_empty() {
            // Earliest match wins; among matches at the same position, the longest.
            let mut best: Option<(usize, &String)> = None;
            for stop in &self.stop_strings {
                if let Some(pos) = self.held.find(stop.as_str()) {
                    let better = match best {
                        None => true,
                        Some((best_pos, best_stop)) => {
                            pos < best_pos || (pos == best_pos && stop.len() > best_stop.len())
                        }
                    };
                    if better {
                        best = Some((pos, stop));
                    }
                }
            }
            if let Some((pos, stop)) = best {
                let end = if self.include_stop_str_in_output {
                    pos + stop.len()
                } else {
                    pos
                };
                let text = self.held[..end].to_string();
                let matched = Some(stop.clone());
                self.held.clear();
                return TextStep { text, matched };
            }
        }
        let keep = if is_final { 0 } else { self.held_suffix_len() };
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        TextStep {
            text,
            matched: None,
        }
    }

    /// Length in bytes of the longest suffix of the held text that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stop_strings {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (longest + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start)
                    && stop.as_bytes().starts_with(&self.held.as_bytes()[start..])
                {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(stop: &[&str], include: bool) -> StopChecker {
        let params = SamplingParams {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            include_stop_str_in_output: include,
            max_tokens: 100,
            ..SamplingParams::default()
        };
        StopChecker::new(&params, &[2], 1000)
    }

    fn stream(c: &mut StopChecker, pieces: &[&str]) -> (Vec<String>, Option<String>) {
        let mut out = Vec::new();
        for p in pieces {
            let step = c.push_text(p, 10, false);
            out.push(step.text);
            if step.matched.is_some() {
                return (out, step.matched);
            }
        }
        (out, None)
    }

    #[test]
    fn stop_string_split_across_tokens_is_never_half_streamed() {
        let mut c = checker(&["END"], false);
        let (out, matched) = stream(&mut c, &["Hello E", "N", "D and more"]);
        assert_eq!(out, vec!["Hello ", "", ""]);
        assert_eq!(matched.as_deref(), Some("END"));
    }

    #[test]
    fn include_stop_str_in_output_keeps_the_match() {
        let mut c = checker(&["END"], true);
        let (out, matched) = stream(&mut c, &["Hello E", "ND tail"]);
        assert_eq!(out.concat(), "Hello END");
        assert_eq!(matched.as_deref(), Some("END"));
    }

    #[test]
    fn false_start_is_released_once_it_cannot_match() {
        let mut c = checker(&["END"], false);
        let (out, matched) = stream(&mut c, &["a E", "Nx", "y"]);
        assert_eq!(out, vec!["a ", "ENx", "y"]);
        assert_eq!(matched, None);
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let mut c = checker(&["world", "lo"], false);
        let (out, matched) = stream(&mut c, &["hello world"]);
        assert_eq!(out.concat(), "hel");
        assert_eq!(matched.as_deref(), Some("lo"));
    }

    #[test]
    fn final_push_releases_held_text() {
        let mut c = checker(&["END"], false);
        assert_eq!(c.push_text("abc EN", 10, false).text, "abc ");
        assert_eq!(c.push_text("", 10, true).text, "EN");
    }

    #[test]
    fn eos_and_stop_token_ids_stop_unless_ignored_or_before_min_tokens() {
        let params = SamplingParams {
            stop_token_ids: vec![7],
            min_tokens: 3,
            ..SamplingParams::default()
        };
        let c = StopChecker::new(&params, &[2, 5], 100);
        assert_eq!(c.token_stop(2, 3), Some(StopMatch::Token(2)));
        assert_eq!(c.token_stop(7, 3), Some(StopMatch::Token(7)));
        assert_eq!(c.token_stop(2, 2), None);
        assert_eq!(c.token_stop(9, 3), None);
        let mut logits = vec![0.0f32; 10];
        c.suppress_stop_tokens(&mut logits, 2);
        assert!(logits[2].is_infinite() && logits[5].is_infinite() && logits[7].is_infinite());
        assert_eq!(logits[0], 0.0);
        let mut logits = vec![0.0f32; 10];
        c.suppress_stop_tokens(&mut logits, 3);
        assert!(logits.iter().all(|l| *l == 0.0));

        let ignoring = StopChecker::new(
            &SamplingParams {
                ignore_eos: true,
                ..params
            },
            &[2, 5],
            100,
        );
        assert_eq!(ignoring.token_stop(2, 3), None);
        assert_eq!(ignoring.token_stop(7, 3), Some(StopMatch::Token(7)));
    }

    #[test]
    fn stop_strings_do_not_count_before_min_tokens() {
        let params = SamplingParams {
            stop: vec!["x".into()],
            min_tokens: 2,
            ..SamplingParams::default()
        };
        let mut c = StopChecker::new(&params, &[], 100);
        assert_eq!(c.push_text("ax", 1, false).matched, None);
        assert_eq!(c.push_text("bx", 2, false).matched.as_deref(), Some("x"));
    }

    #[test]
    fn length_stops_at_max_tokens_or_full_context() {
        let params = SamplingParams {
            max_tokens: 4,
            ..SamplingParams::default()
        };
        let c = StopChecker::new(&params, &[], 10);
        assert!(!c.length_stop(3, 9));
        assert!(c.length_stop(4, 5));
        assert!(c.length_stop(1, 10));
    }

    #[test]
    fn multibyte_hold_back_respects_char_boundaries() {
        let mut c = checker(&["é!"], false);
        let (out, matched) = stream(&mut c, &["caf", "é", "!"]);
        assert_eq!(out, vec!["caf", "", ""]);
        assert_eq!(matched.as_deref(), Some("é!"));
    }
}
