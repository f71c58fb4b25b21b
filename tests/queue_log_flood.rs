//! Log flood protection (S18): a platform flooding the worker with thousands of unusable jobs
//! yields a bounded number of warning lines carrying suppressed counts, the worker's counters stay
//! exact, and a hostile job id can neither bloat nor forge a log line.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::{fast_settings, World};
use serde_json::json;
use wick::harness::{Faults, JobStatus};

/// Captured log output.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

const POLLS: usize = 40;
const JOBS_PER_POLL: usize = 100;

#[tokio::test]
async fn malformed_job_flood_logs_a_bounded_number_of_lines_with_suppressed_counts() {
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let no_id_batch = serde_json::to_string(&vec![json!({"input": {}}); JOBS_PER_POLL]).unwrap();
    let mut take_bodies = vec![no_id_batch; POLLS];
    // One job with a 100 KB id holding a forged log line, and no input.
    let hostile_id = format!("job\nFORGED ERROR line{}", "y".repeat(100_000));
    take_bodies.push(json!([{ "id": hostile_id }]).to_string());

    let started = Instant::now();
    let world = World::start(
        fast_settings(),
        Faults {
            take_bodies,
            ..Faults::default()
        },
    )
    .await;
    // A normal job after the flood: once it is done, every flood answer has been handled.
    let id = world.platform().submit(json!({"text": "after the flood"}));
    let job = world.finish(&id).await;
    assert_eq!(job.status, JobStatus::Completed);
    let report = world.stop().await;
    let elapsed = started.elapsed();
    assert_eq!(
        report.malformed,
        (POLLS * JOBS_PER_POLL + 1) as u64,
        "every malformed job is counted: {report:?}"
    );

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let flood_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("job-take answer without a usable job"))
        .collect();
    let suppressed: u64 = flood_lines
        .iter()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    let windows = elapsed.as_secs() + 1;
    assert!(
        flood_lines.len() as u64 <= 10 * windows,
        "{} flood lines in {elapsed:?}",
        flood_lines.len()
    );
    assert!(
        flood_lines.len() as u64 + suppressed <= (POLLS * JOBS_PER_POLL) as u64,
        "suppressed counts never overstate: {} lines + {suppressed}",
        flood_lines.len()
    );
    assert!(
        text.len() < 256 * 1024,
        "log volume {} bytes for {} malformed jobs",
        text.len(),
        report.malformed
    );
    assert!(
        text.lines().all(|l| l.len() < 4096),
        "no log line carries the 100 KB id"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("FORGED")),
        "a newline in a job id cannot start a log line"
    );
    let hostile_line = text
        .lines()
        .find(|l| l.contains("malformed job: reporting it failed"))
        .expect("the malformed job with an id is logged");
    assert!(hostile_line.contains("\\nFORGED"), "{hostile_line}");
}
