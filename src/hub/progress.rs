//! Download progress: the transfer loop reports each file's bytes (resumed bytes included) into shared
//! counters; a ticker logs one line (bytes, MB/s, ETA) at a fixed interval, however often bytes arrive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Byte counters of one resolve (all files together).
#[derive(Debug)]
pub struct Transfer {
    label: String,
    started: Instant,
    total_bytes: AtomicU64,
    /// Per file: bytes done so far in its current attempt. `std::sync::Mutex`: held only for a map
    /// update inside a synchronous callback, never across an await.
    files: Mutex<HashMap<String, FileState>>,
}

#[derive(Debug, Clone, Copy)]
struct FileState {
    bytes: u64,
    last_activity: Instant,
}

impl Transfer {
    /// Counters for `label` (the repo id), expecting `total_bytes` (0 when unknown).
    pub fn new(label: &str, total_bytes: u64) -> Arc<Self> {
        Arc::new(Transfer {
            label: label.to_string(),
            started: Instant::now(),
            total_bytes: AtomicU64::new(total_bytes),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// Adds to the expected total (a new round of files).
    pub fn add_expected(&self, bytes: u64) {
        self.total_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Marks the start of an attempt on `file` that goes on from `offset` bytes already on disk (0 for
    /// a fresh start): its byte count is set to `offset` and its activity clock restarts.
    pub fn start_attempt(&self, file: &str, offset: u64) {
        self.update(file, |s| {
            s.bytes = offset;
        });
    }

    /// Records `bytes` more received for `file`.
    pub fn add_bytes(&self, file: &str, bytes: u64) {
        self.update(file, |s| s.bytes = s.bytes.saturating_add(bytes));
    }

    /// Seconds since `file` last moved a byte (or since its attempt started).
    pub fn idle_for(&self, file: &str) -> Duration {
        let files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        files
            .get(file)
            .map(|s| s.last_activity.elapsed())
            .unwrap_or(Duration::ZERO)
    }

    /// Bytes received for `file` in its current attempt.
    pub fn bytes_of(&self, file: &str) -> u64 {
        let files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        files.get(file).map(|s| s.bytes).unwrap_or(0)
    }

    /// Bytes done over all files.
    pub fn done_bytes(&self) -> u64 {
        let files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        files.values().map(|s| s.bytes).sum()
    }

    /// One log line's worth of status.
    pub fn summary(&self) -> String {
        format_progress(
            self.done_bytes(),
            self.total_bytes.load(Ordering::Relaxed),
            self.started.elapsed(),
        )
    }

    /// Logs the current status.
    pub fn log(&self) {
        let total = self.total_bytes.load(Ordering::Relaxed);
        let stage = if total > 0 && self.done_bytes() >= total {
            "verifying"
        } else {
            "downloading"
        };
        tracing::info!(model = %self.label, "{stage}: {}", self.summary());
    }

    fn update(&self, file: &str, f: impl FnOnce(&mut FileState)) {
        let mut files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = files.entry(file.to_string()).or_insert(FileState {
            bytes: 0,
            last_activity: Instant::now(),
        });
        f(state);
        state.last_activity = Instant::now();
    }
}

/// `"12.0 MB / 100.0 MB (12%), 3.4 MB/s, ETA 26 s"` (decimal megabytes, as download tools print).
pub fn format_progress(done: u64, total: u64, elapsed: Duration) -> String {
    const MB: f64 = 1_000_000.0;
    #[allow(clippy::cast_precision_loss)] // display only
    let (done_mb, total_mb) = (done as f64 / MB, total as f64 / MB);
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = done_mb / secs;
    let mut line = format!("{done_mb:.1} MB / {total_mb:.1} MB");
    if total > 0 {
        #[allow(clippy::cast_precision_loss)]
        let pct = (done as f64 / total as f64 * 100.0).min(100.0);
        line.push_str(&format!(" ({pct:.0}%)"));
    }
    line.push_str(&format!(", {rate:.1} MB/s"));
    if rate > 0.0 && total > done {
        let eta = (total_mb - done_mb) / rate;
        line.push_str(&format!(", ETA {}", format_duration(eta)));
    }
    line
}

fn format_duration(secs: f64) -> String {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // display only, secs >= 0
    let s = secs.round() as u64;
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_has_bytes_rate_and_eta() {
        let line = format_progress(25_000_000, 100_000_000, Duration::from_secs(5));
        assert_eq!(line, "25.0 MB / 100.0 MB (25%), 5.0 MB/s, ETA 15 s");
        assert_eq!(
            format_progress(0, 0, Duration::from_secs(1)),
            "0.0 MB / 0.0 MB, 0.0 MB/s"
        );
        assert!(
            format_progress(1_000_000, 10_000_000_000, Duration::from_secs(1))
                .ends_with("ETA 2 h 46 min")
        );
    }

    #[test]
    fn counters_accumulate_per_file_and_restart_from_the_resumed_offset() {
        let t = Transfer::new("org/m", 300);
        t.start_attempt("a", 0);
        t.add_bytes("a", 100);
        t.add_bytes("b", 50);
        assert_eq!(t.done_bytes(), 150);
        assert_eq!(t.bytes_of("a"), 100);
        // A broken attempt resumed from the 80 bytes on disk.
        t.start_attempt("a", 80);
        assert_eq!(t.done_bytes(), 130);
        assert!(t.idle_for("a") < Duration::from_secs(5));
    }
}
