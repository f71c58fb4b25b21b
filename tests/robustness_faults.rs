//! Queue fault Q8 (reliability-security §3c) end to end: the real `wick` worker polls a loopback
//! queue whose job-take answers are, in order, HTML, `{}`, truncated JSON, a 50 MB body, a job
//! without `input`, 204, 400, 429, 500, a good job, and a batch mixing a good job with garbage. The
//! worker must survive all of it, fail the job that has an id but no input (with a validation
//! error), complete the good jobs, and still exit 0 on SIGTERM.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest the whole scenario may take before the test gives up (a bound, not a speed assertion).
const SCENARIO_LIMIT: Duration = Duration::from_secs(180);

/// One scripted job-take answer.
struct Answer {
    status: &'static str,
    body: Vec<u8>,
}

fn answer(status: &'static str, body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        status,
        body: body.into(),
    }
}

/// What the fake queue saw.
#[derive(Default)]
struct Seen {
    takes: usize,
    /// (job id from the URL, body) of every job-done post.
    done: Vec<(String, Value)>,
}

struct Queue {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl Queue {
    fn start(script: Vec<Answer>) -> Queue {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let shared = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (seen, script) = (Arc::clone(&shared), Arc::clone(&script));
                thread::spawn(move || serve(stream, &seen, &script));
            }
        });
        Queue { port, seen }
    }

    fn done_for(&self, id: &str) -> Option<Value> {
        let seen = self.seen.lock().unwrap();
        seen.done
            .iter()
            .find(|(job, _)| job == id)
            .map(|(_, b)| b.clone())
    }
}

fn serve(stream: TcpStream, seen: &Mutex<Seen>, script: &Mutex<VecDeque<Answer>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; content_length.min(64 << 20)];
    let _ = reader.read_exact(&mut body);
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let reply = if path.contains("/job-take/") || path.contains("/job-take-batch/") {
        let next = {
            seen.lock().unwrap().takes += 1;
            script.lock().unwrap().pop_front()
        };
        match next {
            Some(a) => a,
            None => {
                // Script done: behave like an idle platform holding the poll.
                thread::sleep(Duration::from_millis(300));
                answer("204 No Content", "")
            }
        }
    } else if path.contains("/job-done/") {
        let id = path
            .split('?')
            .next()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        let parsed = serde_json::from_slice(&body).unwrap_or(Value::Null);
        seen.lock().unwrap().done.push((id, parsed));
        answer("200 OK", "{}")
    } else if path.contains("/job-stop/") {
        thread::sleep(Duration::from_millis(300));
        answer("200 OK", r#"{"jobsToStop":[]}"#)
    } else {
        answer("200 OK", "{}")
    };
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reply.body.len()
    );
    let _ = stream.write_all(&reply.body);
}

fn garbage_script() -> Vec<Answer> {
    let huge = {
        let mut body = br#"{"id":"huge","input":{"prompt":""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', 50 << 20));
        body.extend(br#""}}"#);
        body
    };
    vec![
        answer("200 OK", "<html><body>502 Bad Gateway</body></html>"),
        answer("200 OK", "{}"),
        answer("200 OK", r#"{"id":"trunc","input":{"prompt""#),
        answer("200 OK", huge),
        answer("200 OK", r#"{"id":"noinput"}"#),
        answer("204 No Content", ""),
        answer("400 Bad Request", "flashboot"),
        answer("429 Too Many Requests", "slow down"),
        answer("500 Internal Server Error", "<html>oops</html>"),
        answer(
            "200 OK",
            r#"{"id":"good","input":{"prompt":"hi","sampling_params":{"max_tokens":2}}}"#,
        ),
        answer(
            "200 OK",
            r#"[{"id":"batched","input":{"prompt":"x","sampling_params":{"max_tokens":2}}},7,{"input":{}},null]"#,
        ),
    ]
}

fn error_text(body: &Value) -> Option<String> {
    body.get("error").map(|e| e.to_string())
}

#[test]
fn garbage_from_the_queue_never_stops_the_worker_and_jobs_with_ids_get_results() {
    let queue = Queue::start(garbage_script());
    let base = format!("http://127.0.0.1:{}/v2/faults", queue.port);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["--model", model.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env("RUNPOD_WEBHOOK_GET_JOB", format!("{base}/job-take/$ID"))
        .env(
            "RUNPOD_WEBHOOK_POST_OUTPUT",
            format!("{base}/job-done/$RUNPOD_POD_ID/$ID"),
        )
        .env(
            "RUNPOD_WEBHOOK_POST_STREAM",
            format!("{base}/job-stream/$RUNPOD_POD_ID/$ID"),
        )
        .env("RUNPOD_WEBHOOK_PING", format!("{base}/ping/$RUNPOD_POD_ID"))
        .env("RUNPOD_AI_API_KEY", "test-key")
        .env("RUNPOD_POD_ID", "faults-worker")
        .env("RUNPOD_PING_INTERVAL", "500")
        .env("WARMUP", "false")
        .env("SHUTDOWN_GRACE_SECS", "5")
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = worker.stderr.take().unwrap();
    let logs = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    // Wait until the good jobs have results and the script is used up (plus a few idle polls).
    let started = Instant::now();
    let scripted = garbage_script().len();
    loop {
        let takes = queue.seen.lock().unwrap().takes;
        let finished = queue.done_for("good").is_some() && queue.done_for("batched").is_some();
        if (finished && takes > scripted + 2) || started.elapsed() > SCENARIO_LIMIT {
            break;
        }
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the worker exited while the queue misbehaved"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let still_running = worker.try_wait().unwrap().is_none();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            break worker.wait().unwrap();
        }
        thread::sleep(Duration::from_millis(50));
    };
    let logs = logs.join().unwrap();
    let context = || {
        let seen = queue.seen.lock().unwrap();
        format!(
            "takes {}, done posts {:?}\n--- worker log (tail) ---\n{}",
            seen.takes,
            seen.done.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            logs.lines().rev().take(40).collect::<Vec<_>>().join("\n")
        )
    };

    assert!(still_running, "worker died under garbage: {}", context());
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {}", context());
    let good = queue
        .done_for("good")
        .unwrap_or_else(|| panic!("no result for `good`: {}", context()));
    assert!(
        error_text(&good).is_none() && good.get("output").is_some(),
        "good job: {good}"
    );
    let batched = queue
        .done_for("batched")
        .unwrap_or_else(|| panic!("no result for `batched`: {}", context()));
    assert!(error_text(&batched).is_none(), "batched job: {batched}");
    // A job with an id but no input is failed with a reason, not dropped.
    let no_input = queue
        .done_for("noinput")
        .unwrap_or_else(|| panic!("the job without input got no result: {}", context()));
    let reason = error_text(&no_input).unwrap_or_default();
    assert!(reason.contains("validation"), "no-input job: {no_input}");
    // The 50 MB job is within the batch read cap (job bytes x free slots) but past the payload
    // limit: failed with a validation error, never run.
    let huge = queue
        .done_for("huge")
        .unwrap_or_else(|| panic!("the 50 MB job got no result: {}", context()));
    assert!(
        error_text(&huge).unwrap_or_default().contains("validation"),
        "50 MB job: {}",
        error_text(&huge).unwrap_or_default()
    );
}
