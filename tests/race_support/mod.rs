//! Shared by the race stress tests (`race_stress.rs`, `race_stress_engine.rs`; the first is also built
//! by the ThreadSanitizer crate `tsan/`): the round count and a replayable interleaving generator.

use std::thread;

/// Rounds per test: `WICK_RACE_ROUNDS`, default 1,000.
pub fn rounds() -> usize {
    std::env::var("WICK_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// A small deterministic generator (xorshift64*), so a failing round can be replayed by its seed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; zero is fine).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Shifts the interleaving: spins, yields, or goes straight on.
    pub fn jitter(&mut self) {
        match self.below(4) {
            0 => {}
            1 => thread::yield_now(),
            _ => {
                for _ in 0..self.below(200) {
                    std::hint::spin_loop();
                }
            }
        }
    }
}
