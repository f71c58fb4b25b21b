//! Bounded retry schedules: exponential backoff with jitter. Every retry loop in `queue` takes a
//! [`RetryPolicy`] (attempt count and total time are both bounded) and draws its waits from
//! [`RetryPolicy::delay`].

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How often and how patiently to retry one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included (>= 1).
    pub max_attempts: u32,
    /// Wait ceiling before the second attempt; doubles each retry.
    pub base: Duration,
    /// Largest single wait.
    pub cap: Duration,
    /// Total time budget across attempts and waits; no new attempt starts after it.
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// Result posts (job-done): 0.5 s doubling to 30 s, 8 attempts, within 5 minutes.
    pub const RESULT: RetryPolicy = RetryPolicy {
        max_attempts: 8,
        base: Duration::from_millis(500),
        cap: Duration::from_secs(30),
        max_elapsed: Duration::from_secs(300),
    };
    /// Stream chunk posts: retried briefly, then skipped (the final result carries every chunk).
    pub const STREAM: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(250),
        cap: Duration::from_secs(2),
        max_elapsed: Duration::from_secs(10),
    };
    /// Job-take and job-stop errors: never a busy loop (>= 1 s), up to 30 s between polls.
    pub const POLL: RetryPolicy = RetryPolicy {
        max_attempts: u32::MAX,
        base: Duration::from_secs(1),
        cap: Duration::from_secs(30),
        max_elapsed: Duration::MAX,
    };
    /// Heartbeat: 3 attempts, 1 s then 2 s (the SDK's urllib3 `Retry(total=3, backoff_factor=1)`).
    pub const PING: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_secs(1),
        cap: Duration::from_secs(4),
        max_elapsed: Duration::from_secs(60),
    };

    /// The wait after failed attempt number `attempt` (1-based): "equal jitter", uniform in
    /// `[d/2, d]` with `d = min(cap, base * 2^(attempt-1))`, so waits never collapse to zero and
    /// many workers never retry in lockstep.
    pub fn delay(&self, attempt: u32, jitter: &mut Jitter) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let ceiling = self.base.saturating_mul(1u32 << exponent).min(self.cap);
        let half = ceiling / 2;
        half + half.mul_f64(jitter.unit())
    }
}

/// A small xorshift generator for jitter, seeded from the process's random hash keys.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    /// A generator seeded from `RandomState` (different per process and per call).
    pub fn new() -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(0x9e37_79b9_7f4a_7c15);
        Jitter(hasher.finish() | 1)
    }

    /// A generator with a fixed seed (tests, reproducible fault plans).
    pub fn from_seed(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    /// The next value, uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `percent / 100`.
    pub fn chance(&mut self, percent: f64) -> bool {
        percent > 0.0 && self.unit() * 100.0 < percent
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_and_stay_under_the_cap() {
        let policy = RetryPolicy::RESULT;
        let mut jitter = Jitter::from_seed(7);
        for attempt in 1..=20 {
            let ceiling = policy
                .base
                .saturating_mul(1 << (attempt - 1).min(30))
                .min(policy.cap);
            let d = policy.delay(attempt, &mut jitter);
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "attempt {attempt}: {d:?} vs {ceiling:?}"
            );
        }
        assert!(policy.delay(1, &mut jitter) <= Duration::from_millis(500));
        assert!(policy.delay(12, &mut jitter) >= Duration::from_secs(15));
    }

    #[test]
    fn poll_policy_never_waits_less_than_half_a_second() {
        let mut jitter = Jitter::from_seed(3);
        for attempt in 1..100 {
            assert!(RetryPolicy::POLL.delay(attempt, &mut jitter) >= Duration::from_millis(500));
        }
    }

    #[test]
    fn jitter_spreads_values() {
        let mut jitter = Jitter::from_seed(11);
        let values: Vec<f64> = (0..1000).map(|_| jitter.unit()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let low = values.iter().filter(|v| **v < 0.5).count();
        assert!((400..600).contains(&low), "{low}");
        assert!(!Jitter::from_seed(1).chance(0.0));
        assert!(Jitter::from_seed(1).chance(100.0));
    }
}
