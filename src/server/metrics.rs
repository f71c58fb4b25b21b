//! Prometheus metrics of the dev server, rendered by hand in the text exposition format (0.0.4):
//! requests by route and status, admission queue depth, engine gauges and token counters (read from
//! [`EngineStatsSnapshot`]), and per-request latency histograms recorded by the request executor.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::EngineStatsSnapshot;

/// Latency buckets in seconds for time-to-first-token and end-to-end latency.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Buckets in seconds for the gap between two generated tokens.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
];

/// A fixed-bucket histogram. Sums are kept in microseconds so they fit an atomic integer.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket (non-cumulative) counts; the last slot is `+Inf`.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records `n` observations of `value`.
    pub fn observe_n(&self, value: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let seconds = value.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(n, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros
            .fetch_add(micros.saturating_mul(n), Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        self.observe_n(value, 1);
    }

    /// Number of observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Gauges owned by the server (admission and job store), sampled when `/metrics` is rendered.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerGauges {
    /// Requests admitted and not finished (running + waiting).
    pub queue_depth: usize,
    /// Admitted requests waiting for a run slot.
    pub waiting: usize,
    /// Admitted requests holding a run slot.
    pub running: usize,
    /// RunPod jobs kept in the store (any status).
    pub stored_jobs: usize,
}

/// Every metric the server records.
#[derive(Debug)]
pub struct Metrics {
    /// `(route, status)` → count. Routes are the router's matched patterns, so the label set is bounded.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Jobs that ended, by outcome (`completed`, `failed`, `cancelled`, `timed_out`).
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests refused with 429.
    pub rejected_overloaded: AtomicU64,
    /// From admission to the first streamed output.
    pub time_to_first_token: Histogram,
    /// Between consecutive generated tokens of one request.
    pub inter_token_latency: Histogram,
    /// From admission to the end of the request.
    pub e2e_latency: Histogram,
    /// From admission to the start of execution (waiting for a run slot).
    pub queue_time: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            outcomes: Mutex::new(BTreeMap::new()),
            rejected_overloaded: AtomicU64::new(0),
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(INTER_TOKEN_BUCKETS),
            e2e_latency: Histogram::new(LATENCY_BUCKETS),
            queue_time: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl Metrics {
    /// Counts one answered request.
    pub fn record_request(&self, route: &str, status: u16) {
        // The lock guards a tiny map update and is never held across an await.
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *requests.entry((route.to_string(), status)).or_insert(0) += 1;
    }

    /// Counts one finished job by outcome.
    pub fn record_outcome(&self, outcome: &'static str) {
        let mut outcomes = self
            .outcomes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *outcomes.entry(outcome).or_insert(0) += 1;
    }

    /// Requests answered so far on `route` with `status`.
    pub fn requests_with(&self, route: &str, status: u16) -> u64 {
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        requests
            .get(&(route.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(
        &self,
        engine: &EngineStatsSnapshot,
        server: &ServerGauges,
        engine_alive: bool,
    ) -> String {
        let mut out = String::with_capacity(8 * 1024);
        out.push_str("# HELP wick_http_requests_total HTTP requests answered, by route pattern and status.\n");
        out.push_str("# TYPE wick_http_requests_total counter\n");
        {
            let requests = self
                .requests
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for ((route, status), count) in requests.iter() {
                let _ = writeln!(
                    out,
                    "wick_http_requests_total{{route=\"{}\",status=\"{status}\"}} {count}",
                    escape_label(route)
                );
            }
        }
        out.push_str("# HELP wick_jobs_finished_total Requests and jobs that ended, by outcome.\n");
        out.push_str("# TYPE wick_jobs_finished_total counter\n");
        {
            let outcomes = self
                .outcomes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (outcome, count) in outcomes.iter() {
                let _ = writeln!(
                    out,
                    "wick_jobs_finished_total{{outcome=\"{outcome}\"}} {count}"
                );
            }
        }
        counter(
            &mut out,
            "wick_requests_rejected_overloaded_total",
            "Requests refused with 429 because admission was full.",
            self.rejected_overloaded.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "wick_queue_depth",
            "Admitted requests not finished (running + waiting).",
            server.queue_depth as f64,
        );
        gauge(
            &mut out,
            "wick_requests_waiting",
            "Admitted requests waiting for a run slot.",
            server.waiting as f64,
        );
        gauge(
            &mut out,
            "wick_requests_running",
            "Admitted requests holding a run slot.",
            server.running as f64,
        );
        gauge(
            &mut out,
            "wick_stored_jobs",
            "RunPod jobs kept for /status (any status).",
            server.stored_jobs as f64,
        );
        gauge(
            &mut out,
            "wick_engine_alive",
            "1 while the engine thread takes requests.",
            f64::from(u8::from(engine_alive)),
        );
        gauge(
            &mut out,
            "wick_num_sequences_running",
            "Sequences holding a KV-cache slot.",
            engine.running as f64,
        );
        gauge(
            &mut out,
            "wick_num_sequences_waiting",
            "Sequences submitted to the engine, not yet running.",
            engine.waiting as f64,
        );
        gauge(
            &mut out,
            "wick_kv_cache_tokens_used",
            "KV-cache tokens in use.",
            engine.kv_tokens_used as f64,
        );
        gauge(
            &mut out,
            "wick_kv_cache_tokens_total",
            "KV-cache token capacity.",
            engine.kv_tokens_total as f64,
        );
        let usage = if engine.kv_tokens_total == 0 {
            0.0
        } else {
            engine.kv_tokens_used as f64 / engine.kv_tokens_total as f64
        };
        gauge(
            &mut out,
            "wick_kv_cache_usage_ratio",
            "KV-cache use, 0 to 1.",
            usage,
        );
        counter(
            &mut out,
            "wick_prompt_tokens_total",
            "Prompt tokens processed.",
            engine.prompt_tokens_total,
        );
        counter(
            &mut out,
            "wick_generation_tokens_total",
            "Tokens generated.",
            engine.generated_tokens_total,
        );
        counter(
            &mut out,
            "wick_engine_steps_total",
            "Engine steps run.",
            engine.steps_total,
        );
        self.time_to_first_token.render(
            &mut out,
            "wick_time_to_first_token_seconds",
            "From admission to the first generated output of a request.",
        );
        self.inter_token_latency.render(
            &mut out,
            "wick_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
        );
        self.e2e_latency.render(
            &mut out,
            "wick_e2e_request_latency_seconds",
            "From admission to the end of a request.",
        );
        self.queue_time.render(
            &mut out,
            "wick_request_queue_time_seconds",
            "From admission to the start of execution.",
        );
        out
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// Escapes a label value (backslash, quote, newline) as the exposition format requires.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe_n(Duration::from_millis(500), 2);
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
        assert!(out.contains("x_sum 6.05\n"), "{out}");
    }

    #[test]
    fn renders_requests_by_route_and_status() {
        let m = Metrics::default();
        m.record_request("/v1/models", 200);
        m.record_request("/v1/models", 200);
        m.record_request("/run", 429);
        let text = m.render(
            &EngineStatsSnapshot::default(),
            &ServerGauges::default(),
            true,
        );
        assert!(
            text.contains("wick_http_requests_total{route=\"/v1/models\",status=\"200\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("wick_http_requests_total{route=\"/run\",status=\"429\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("wick_kv_cache_usage_ratio 0\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
