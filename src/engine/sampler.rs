//! Per-sequence token sampling with vLLM's semantics and order: repetition penalty (prompt and
//! output tokens), presence/frequency penalties (output tokens), temperature (0 = greedy), top-k,
//! top-p, min-p, then a draw from the sequence's own seeded PRNG. Log-probabilities are the
//! log-softmax of the penalised, temperature-scaled logits.
//!
//! Owned here: the maths on one logits row (a `&mut [f32]` of length `vocab_size`) and the PRNG.
//! Not here: tensors (the engine hands over rows of one `to_vec2` per step), stop conditions.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use super::request::SamplingParams;

/// Largest number of top log-probabilities returned per token (vLLM's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// splitmix64: a tiny, fast, well-mixed PRNG. One per sequence, so a seed gives the same draws
/// whatever else shares the batch.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A generator seeded from a process-wide counter mixed with the clock (for unseeded requests).
    pub fn from_entropy() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0x5eed);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut mixer = SplitMix64::new(nanos ^ count.rotate_left(32));
        SplitMix64::new(mixer.next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)` (53 random bits).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The result of sampling one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token_id: u32,
    /// Its log-probability, when logprobs were requested.
    pub logprob: Option<f32>,
    /// The top `logprobs` tokens and their log-probabilities, best first (empty when not requested).
    pub top: Vec<(u32, f32)>,
}

/// Sampling state of one sequence: parameters, penalty bookkeeping and its PRNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    logprobs: Option<usize>,
    /// Distinct prompt tokens (only kept when the repetition penalty is active).
    prompt_tokens: HashSet<u32>,
    /// How often each output token was generated (for all three penalties).
    output_counts: HashMap<u32, u32>,
    rng: SplitMix64,
}

impl Sampler {
    /// Builds the sampler of one sequence.
    pub fn new(params: &SamplingParams, prompt_ids: &[u32]) -> Self {
        let prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt_ids.iter().copied().collect()
        } else {
            HashSet::new()
        };
        let rng = match params.seed {
            Some(seed) => SplitMix64::new(seed),
            None => SplitMix64::from_entropy(),
        };
        Sampler {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            logprobs: params.logprobs.map(|n| n.min(MAX_TOP_LOGPROBS)),
            prompt_tokens,
            output_counts: HashMap::new(),
            rng,
        }
    }

    /// Whether this sequence samples greedily (argmax).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Records a generated token for the penalties.
    pub fn observe(&mut self, token_id: u32) {
        if self.has_penalties() {
            *self.output_counts.entry(token_id).or_insert(0) += 1;
        }
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Applies the penalties in place (vLLM order: repetition, then frequency and presence).
    fn apply_penalties(&self, logits: &mut [f32]) {
        if self.repetition_penalty != 1.0 {
            let penalty = self.repetition_penalty;
            let seen = self.prompt_tokens.iter().chain(self.output_counts.keys());
            // A token in both prompt and output is penalised once.
            let mut done =
                HashSet::with_capacity(self.prompt_tokens.len() + self.output_counts.len());
            for &id in seen {
                if !done.insert(id) {
                    continue;
                }
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / penalty
                    } else {
                        *logit * penalty
                    };
                }
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (&id, &count) in &self.output_counts {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit -= self.frequency_penalty * count as f32 + self.presence_penalty;
                }
            }
        }
    }

    /// Samples one token from `logits` (one row, length `vocab_size`), modifying it in place.
    /// Logits the stop logic set to `-inf` (e.g. EOS before `min_tokens`) are never chosen.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.apply_penalties(logits);
        if self.is_greedy() {
            let token_id = argmax(logits);
            return self.with_logprobs(logits, token_id);
        }
        let inv_t = 1.0 / self.temperature;
        if inv_t != 1.0 {
            logits.iter_mut().for_each(|l| *l *= inv_t);
        }
        let token_id = self.draw(logits);
        self.with_logprobs(logits, token_id)
    }

    /// Draws from the filtered distribution of the temperature-scaled `logits`.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let filtering = self.top_k > 0 || self.top_p < 1.0 || self.min_p > 0.0;
        if !filtering {
            // Fast path: one pass for the normaliser, one partial pass for the draw.
            let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
            let mut target = self.rng.next_f64() * total;
            let mut last = 0u32;
            for (id, &l) in logits.iter().enumerate() {
                let p = ((l - max) as f64).exp();
                if p > 0.0 {
                    last = id as u32;
                    target -= p;
                    if target < 0.0 {
                        return id as u32;
                    }
                }
            }
            return last;
        }
        // Candidates sorted by logit, best first; top-k cuts before the sort.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(id, &l)| (id as u32, l))
            .collect();
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.top_k > 0 && self.top_k < candidates.len() {
            candidates.select_nth_unstable_by(self.top_k - 1, by_logit_desc);
            candidates.truncate(self.top_k);
        }
        candidates.sort_unstable_by(by_logit_desc);
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| ((l - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if self.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut cumulative = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if self.min_p > 0.0 {
            let threshold = probs[0] * self.min_p as f64;
            keep = probs[..keep]
                .iter()
                .take_while(|&&p| p >= threshold)
                .count()
                .max(1);
        }
        let kept = &probs[..keep];
        let mass: f64 = kept.iter().sum();
        let mut target = self.rng.next_f64() * mass;
        for (i, p) in kept.iter().enumerate() {
            target -= p;
            if target < 0.0 {
                return candidates[i].0;
            }
        }
        candidates[keep - 1].0
    }

    /// Adds log-probabilities of the chosen token and the top tokens when requested.
    fn with_logprobs(&self, logits: &[f32], token_id: u32) -> Sampled {
        let Some(n_top) = self.logprobs else {
            return Sampled {
                token_id,
                logprob: None,
                top: Vec::new(),
            };
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_total = (logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>())
        .ln() as f32
            + max;
        let logprob_of = |id: u32| {
            logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |l| l - log_total)
        };
        let mut top: Vec<(u32, f32)> = Vec::new();
        if n_top > 0 {
            let mut all: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
            let by_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            let n = n_top.min(all.len());
            if n < all.len() {
                all.select_nth_unstable_by(n - 1, by_desc);
                all.truncate(n);
            }
            all.sort_unstable_by(by_desc);
            top = all.into_iter().map(|(id, l)| (id, l - log_total)).collect();
        }
        Sampled {
            token_id,
            logprob: Some(logprob_of(token_id)),
            top,
        }
    }
}

/// Index of the largest value; the lowest index wins ties. NaN never wins; 0 when no value is
/// above negative infinity.
///
/// Two passes the compiler vectorizes (a vocabulary-wide scan is most of a greedy step's sampling
/// time): the maximum in 16 lanes, then the first block of 16 that holds it.
pub fn argmax(values: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut blocks = values.chunks_exact(LANES);
    for block in &mut blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            // `>` is false for NaN, so NaN never replaces a lane.
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let best = lanes
        .iter()
        .chain(blocks.remainder())
        .fold(
            f32::NEG_INFINITY,
            |best, &v| if v > best { v } else { best },
        );
    if best == f32::NEG_INFINITY {
        return 0;
    }
    // The first index equal to `best`: what a strict `>` scan from the left keeps (`-0.0 == 0.0`,
    // as there).
    let first_block = values
        .chunks(LANES)
        .position(|block| block.iter().fold(false, |hit, &v| hit | (v == best)))
        .unwrap_or(0);
    let start = first_block * LANES;
    values[start..]
        .iter()
        .position(|&v| v == best)
        .map_or(0, |offset| (start + offset) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    fn row() -> Vec<f32> {
        vec![0.5, 2.0, -1.0, 1.5, 0.0, 1.9]
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_index_on_ties() {
        let mut s = Sampler::new(&params(0.0), &[]);
        assert_eq!(s.sample(&mut row()).token_id, 1);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        // Every position, tie and sign of zero against the plain left-to-right scan.
        let scan = |values: &[f32]| {
            let (mut best, mut best_value) = (0usize, f32::NEG_INFINITY);
            for (i, &v) in values.iter().enumerate() {
                if v > best_value {
                    best = i;
                    best_value = v;
                }
            }
            best as u32
        };
        let mut state = 7u32;
        for len in [1usize, 15, 16, 17, 40, 1000] {
            for _ in 0..50 {
                let values: Vec<f32> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        match state % 11 {
                            0 => f32::NAN,
                            1 => -0.0,
                            2 => 0.0,
                            3 => f32::NEG_INFINITY,
                            _ => (state % 7) as f32 - 6.0,
                        }
                    })
                    .collect();
                assert_eq!(argmax(&values), scan(&values), "{values:?}");
            }
        }
    }

    #[test]
    fn top_k_one_equals_greedy_whatever_the_seed() {
        for seed in 0..50 {
            let p = SamplingParams {
                temperature: 1.3,
                top_k: 1,
                seed: Some(seed),
                ..SamplingParams::default()
            };
            let mut s = Sampler::new(&p, &[]);
            assert_eq!(s.sample(&mut row()).token_id, 1);
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let p = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p, &[1, 2]);
        s.observe(3);
        let mut logits = row();
        s.apply_penalties(&mut logits);
        assert_eq!(logits, vec![0.5, 1.0, -2.0, 0.75, 0.0, 1.9]);
        // 1 and 3 fell below 5, so greedy now picks 5.
        assert_eq!(s.sample(&mut row()).token_id, 5);
    }

    #[test]
    fn presence_and_frequency_penalties_use_output_counts_only() {
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p, &[0, 4]);
        s.observe(1);
        s.observe(1);
        s.observe(3);
        let mut logits = row();
        s.apply_penalties(&mut logits);
        // 1: 2.0 - 2*0.25 - 0.5 = 1.0; 3: 1.5 - 0.25 - 0.5 = 0.75; prompt tokens untouched.
        assert_eq!(logits, vec![0.5, 1.0, -1.0, 0.75, 0.0, 1.9]);
    }

    #[test]
    fn same_seed_gives_same_draws_and_different_seeds_differ() {
        let draws = |seed: u64| {
            let p = SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            };
            let mut s = Sampler::new(&p, &[]);
            (0..64)
                .map(|_| s.sample(&mut row()).token_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities roughly [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps ids 0 and 1.
        let logits = vec![3.0f32, 2.0, 1.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.7,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p, &[]);
        let mut seen = HashSet::new();
        for _ in 0..500 {
            seen.insert(s.sample(&mut logits.clone()).token_id);
        }
        assert_eq!(seen, HashSet::from([0, 1]));
    }

    #[test]
    fn min_p_drops_tokens_below_the_scaled_threshold() {
        let logits = vec![3.0f32, 2.9, 0.0, -1.0];
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: Some(3),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p, &[]);
        let mut seen = HashSet::new();
        for _ in 0..500 {
            seen.insert(s.sample(&mut logits.clone()).token_id);
        }
        assert_eq!(seen, HashSet::from([0, 1]));
    }

    #[test]
    fn suppressed_tokens_are_never_sampled() {
        let p = SamplingParams {
            temperature: 5.0,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p, &[]);
        for _ in 0..500 {
            let mut logits = row();
            logits[1] = f32::NEG_INFINITY;
            assert_ne!(s.sample(&mut logits).token_id, 1);
        }
    }

    #[test]
    fn logprobs_are_log_softmax_with_top_tokens_best_first() {
        let p = SamplingParams {
            temperature: 0.0,
            logprobs: Some(3),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p, &[]);
        let out = s.sample(&mut [0.0, 1.0, 2.0, 3.0]);
        let total: f32 = [0.0f32, 1.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        let expected = 3.0 - total.ln();
        assert_eq!(out.token_id, 3);
        assert!((out.logprob.unwrap() - expected).abs() < 1e-5);
        assert_eq!(
            out.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![3, 2, 1]
        );
        assert!((out.top[0].1 - expected).abs() < 1e-5);
        let mass: f32 = [0.0f32, 1.0, 2.0, 3.0]
            .iter()
            .map(|l| (l - total.ln()).exp())
            .sum();
        assert!((mass - 1.0).abs() < 1e-5);
    }

    #[test]
    fn no_logprobs_requested_returns_none() {
        let mut s = Sampler::new(&params(0.0), &[]);
        let out = s.sample(&mut row());
        assert_eq!(out.logprob, None);
        assert!(out.top.is_empty());
    }
}
