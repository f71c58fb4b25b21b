//! Log flood protection (S18): repeated warnings of one class (a failing job-take, a dead stream
//! endpoint, a platform sending garbage) are rate-limited with a count of what was suppressed, and
//! strings from outside (job ids) are truncated and escaped before they reach a log line.
//!
//! Owned here: the limiter and the escaping. Never limited: lines about a result that was not
//! delivered (each one matters).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest outside string written to a log line, in bytes (before escaping).
pub const MAX_LOGGED_BYTES: usize = 256;

/// Per-class rate limit: at most `max_per_window` lines per `window`; the first line after a
/// window in which lines were suppressed carries their count.
#[derive(Debug)]
pub struct LogLimiter {
    max_per_window: u32,
    window: Duration,
    classes: Mutex<HashMap<&'static str, ClassState>>,
}

#[derive(Debug)]
struct ClassState {
    window_start: Instant,
    emitted: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter letting `max_per_window` lines of each class through per `window`.
    pub fn new(max_per_window: u32, window: Duration) -> Self {
        LogLimiter {
            max_per_window,
            window,
            classes: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line of `class` may be logged now: `Some(n)` with the lines of that class
    /// suppressed since the last one logged, `None` to skip it (it is counted). Classes are static
    /// strings, so the table is bounded by the code.
    pub fn allow(&self, class: &'static str) -> Option<u64> {
        self.allow_at(class, Instant::now())
    }

    fn allow_at(&self, class: &'static str, now: Instant) -> Option<u64> {
        let mut classes = self
            .classes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = classes.entry(class).or_insert(ClassState {
            window_start: now,
            emitted: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(state.window_start) >= self.window {
            state.window_start = now;
            state.emitted = 0;
        }
        if state.emitted < self.max_per_window {
            state.emitted += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

impl Default for LogLimiter {
    /// 10 lines per second per class.
    fn default() -> Self {
        LogLimiter::new(10, Duration::from_secs(1))
    }
}

/// An outside string made safe for a log line: cut to [`MAX_LOGGED_BYTES`] on a character
/// boundary (with `…` when cut) and with control characters escaped, so it can neither flood a
/// line nor forge one.
pub fn log_safe(text: &str) -> String {
    let mut end = text.len().min(MAX_LOGGED_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut safe: String = text[..end]
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if end < text.len() {
        safe.push('…');
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_limit_are_suppressed_and_counted() {
        let limiter = LogLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limiter.allow_at("take", t0), Some(0));
        assert_eq!(limiter.allow_at("take", t0), Some(0));
        assert_eq!(limiter.allow_at("take", t0), None);
        assert_eq!(limiter.allow_at("take", t0), None);
        // Another class has its own budget.
        assert_eq!(limiter.allow_at("stop", t0), Some(0));
        // The next window reports what was suppressed, once.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.allow_at("take", t1), Some(2));
        assert_eq!(limiter.allow_at("take", t1), Some(0));
    }

    #[test]
    fn outside_strings_are_cut_and_escaped() {
        assert_eq!(log_safe("job-1"), "job-1");
        assert_eq!(log_safe("a\nFAKE LINE\u{1b}[2J"), "a\\nFAKE LINE\\u{1b}[2J");
        let long = "é".repeat(400);
        let safe = log_safe(&long);
        assert!(safe.ends_with('…'));
        assert_eq!(safe.chars().count(), MAX_LOGGED_BYTES / 2 + 1);
    }
}
