//! Secrets canary (reliability-security S11, issue 7 "Secrets"): the real `wick` binary is started
//! with a canary Hugging Face token and RunPod key in its environment, in situations that log and
//! fail. Its stdout, stderr and `/proc/<pid>/cmdline` (read while it runs) must not contain the
//! canary, and neither may the `Debug` output of the structs that hold secrets.
//!
//! The tests that use a loopback peer also check that the peer *received* the secret, so a run in
//! which the secret was never read cannot pass by accident.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Fake values that look like nothing real (they do not match a real token's shape).
const HF_CANARY: &str = "hf_CANARY_not_a_token";
const RUNPOD_CANARY: &str = "rpa_CANARY_not_a_key";
/// What must never be seen: the distinctive part of both canaries.
const NEEDLE: &str = "CANARY";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A port on loopback with nothing listening (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// What one run of `wick` left behind.
struct Run {
    stdout: String,
    stderr: String,
    /// `/proc/<pid>/cmdline` as read while the process was alive (NUL separators kept).
    cmdline: Vec<u8>,
    /// Exit code; `None` if it had to be stopped by a signal.
    exit_code: Option<i32>,
}

impl Run {
    fn all_output(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}\n--- cmdline ---\n{}",
            self.stdout,
            self.stderr,
            String::from_utf8_lossy(&self.cmdline)
        )
    }

    fn assert_no_canary(&self) {
        let text = self.all_output();
        assert!(
            !text.contains(NEEDLE),
            "a canary secret leaked into output or argv:\n{text}"
        );
    }
}

/// Reads a pipe to the end on its own thread, appending to `sink` as bytes arrive (so a test can
/// watch the output while the process runs).
fn collect(
    mut pipe: impl Read + Send + 'static,
    sink: Arc<Mutex<Vec<u8>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

fn text(sink: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&sink.lock().unwrap()).into_owned()
}

/// Starts `wick` with `args` and exactly `envs` (plus PATH/HOME-free defaults), a clean working
/// directory, canaries in the environment, and debug logging. `stop_when` is polled with the stderr
/// seen so far: when it returns true the process gets SIGTERM (it is a long-running worker). `limit`
/// bounds the whole run: past it the process is killed (a bound, not a speed assertion).
fn run_wick(
    args: &[&str],
    envs: &[(&str, String)],
    workdir: &Path,
    stop_when: &dyn Fn(&str) -> bool,
    limit: Duration,
) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wick"));
    cmd.args(args)
        .env_clear()
        .env("HF_TOKEN", HF_CANARY)
        .env("HUGGING_FACE_HUB_TOKEN", HF_CANARY)
        .env("RUNPOD_AI_API_KEY", RUNPOD_CANARY)
        .env("RUST_LOG", "debug")
        .env("RUNPOD_LOG_LEVEL", "DEBUG")
        .env("RUST_BACKTRACE", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .env("WARMUP", "false")
        .env("HF_HOME", workdir.join("hf-home"))
        .env("BASE_PATH", workdir.join("base"))
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child: Child = cmd.spawn().unwrap();
    let pid = child.id();
    let out_sink = Arc::new(Mutex::new(Vec::new()));
    let err_sink = Arc::new(Mutex::new(Vec::new()));
    let stdout = collect(child.stdout.take().unwrap(), Arc::clone(&out_sink));
    let stderr = collect(child.stderr.take().unwrap(), Arc::clone(&err_sink));
    // Read argv from the kernel while the process is alive.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let started = Instant::now();
    let mut signalled = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if !signalled && stop_when(&text(&err_sink)) {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            signalled = true;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        thread::sleep(Duration::from_millis(50));
    };
    stdout.join().unwrap();
    stderr.join().unwrap();
    Run {
        stdout: text(&out_sink),
        stderr: text(&err_sink),
        cmdline,
        exit_code: status.code(),
    }
}

/// A loopback HTTP peer that records each request's head and answers every request with `status`
/// and `body`. Enough HTTP/1.1 for reqwest: it reads the head and any Content-Length body, answers
/// with `Connection: close`.
struct Peer {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    fn start(status: &'static str, body: &'static str) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let seen = Arc::clone(&seen);
                thread::spawn(move || serve_one(stream, status, body, &seen));
            }
        });
        Peer { port, heads }
    }

    fn requests(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn saw(&self, needle: &str) -> bool {
        self.requests().iter().any(|h| h.contains(needle))
    }
}

fn serve_one(stream: TcpStream, status: &str, body: &str, seen: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let mut sink = vec![0u8; content_length.min(1 << 20)];
    let _ = reader.read_exact(&mut sink);
    seen.lock().unwrap().push(head);
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

const VALID_JOB: &str =
    r#"{"input":{"prompt":"hello","sampling_params":{"max_tokens":2,"temperature":0}}}"#;

#[test]
fn bad_model_path_failure_does_not_leak_secrets() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-model-dir");
    let run = run_wick(
        &[
            "--model",
            missing.to_str().unwrap(),
            "--test-input",
            VALID_JOB,
        ],
        &[],
        dir.path(),
        &|_| false,
        Duration::from_secs(120),
    );
    run.assert_no_canary();
    assert_ne!(run.exit_code, Some(0), "{}", run.all_output());
}

#[test]
fn unreachable_hub_endpoint_failure_does_not_leak_secrets() {
    let dir = tempdir();
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let run = run_wick(
        &[
            "--model",
            "wick-test/no-such-repo",
            "--test-input",
            VALID_JOB,
        ],
        &[("HF_ENDPOINT", endpoint)],
        dir.path(),
        &|_| false,
        Duration::from_secs(240),
    );
    run.assert_no_canary();
    assert_ne!(run.exit_code, Some(0), "{}", run.all_output());
}

#[test]
fn hub_refusing_the_token_does_not_echo_it() {
    // A gated-repo style refusal: the hub got the token and says no. The error must not repeat it.
    let hub = Peer::start(
        "401 Unauthorized",
        r#"{"error":"Invalid credentials in Authorization header"}"#,
    );
    let dir = tempdir();
    let run = run_wick(
        &["--model", "wick-test/gated-repo", "--test-input", VALID_JOB],
        &[("HF_ENDPOINT", format!("http://127.0.0.1:{}", hub.port))],
        dir.path(),
        &|_| false,
        Duration::from_secs(240),
    );
    run.assert_no_canary();
    assert_ne!(run.exit_code, Some(0), "{}", run.all_output());
    assert!(
        hub.saw(HF_CANARY),
        "the hub never received the token, so this run proved nothing; requests: {:?}\n{}",
        hub.requests(),
        run.all_output()
    );
}

#[test]
fn malformed_runpod_url_failure_does_not_leak_secrets() {
    // F7: the worker refuses the bad URL at startup (exit code 1, naming the variable, not the
    // value), before loading the model.
    let dir = tempdir();
    let model = fixture("tiny-llama");
    let run = run_wick(
        &["--model", model.to_str().unwrap()],
        &[
            ("RUNPOD_WEBHOOK_GET_JOB", "::not a url::/$ID".to_string()),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                "::not a url::/$ID".to_string(),
            ),
            ("RUNPOD_POD_ID", "canary-test-worker".to_string()),
            ("RUNPOD_ENDPOINT_ID", "canary-endpoint".to_string()),
        ],
        dir.path(),
        &|stderr| stderr.matches("job-take failed").count() >= 2,
        Duration::from_secs(120),
    );
    run.assert_no_canary();
    assert!(
        run.exit_code.is_some_and(|c| c != 0)
            && run
                .stderr
                .contains("`RUNPOD_WEBHOOK_GET_JOB` is not a valid URL"),
        "the bad URL was not refused at startup:\n{}",
        run.all_output()
    );
    assert!(!run.stderr.contains("not a url"), "the value is not echoed");
}

#[test]
fn failing_queue_does_not_leak_the_runpod_key() {
    // The queue answers every call 500 with a body that is not a job; the worker logs, backs off and
    // retries until SIGTERM. The key must reach the queue (Authorization) and nowhere else.
    let queue = Peer::start("500 Internal Server Error", "<html>upstream broke</html>");
    let dir = tempdir();
    let model = fixture("tiny-llama");
    let base = format!("http://127.0.0.1:{}", queue.port);
    let envs = [
        (
            "RUNPOD_WEBHOOK_GET_JOB",
            format!("{base}/v2/canary/job-take/$ID?gpu=cpu"),
        ),
        (
            "RUNPOD_WEBHOOK_POST_OUTPUT",
            format!("{base}/v2/canary/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu"),
        ),
        (
            "RUNPOD_WEBHOOK_POST_STREAM",
            format!("{base}/v2/canary/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu"),
        ),
        (
            "RUNPOD_WEBHOOK_PING",
            format!("{base}/v2/canary/ping/$RUNPOD_POD_ID?gpu=cpu"),
        ),
        ("RUNPOD_PING_INTERVAL", "200".to_string()),
        ("RUNPOD_POD_ID", "canary-test-worker".to_string()),
        ("SHUTDOWN_GRACE_SECS", "2".to_string()),
        // JSON log lines (spans and fields included), as under RunPod.
        ("RUNPOD_ENDPOINT_ID", "canary-endpoint".to_string()),
    ];
    // Stop once the worker has been refused a few times (it has logged its retries by then).
    let run = run_wick(
        &["--model", model.to_str().unwrap()],
        &envs,
        dir.path(),
        &|_| queue.requests().len() >= 3,
        Duration::from_secs(180),
    );
    run.assert_no_canary();
    assert!(
        queue.saw(RUNPOD_CANARY),
        "the queue never received the key, so this run proved nothing; requests: {:?}\n{}",
        queue.requests(),
        run.all_output()
    );
}

#[test]
fn invalid_test_input_failure_does_not_leak_secrets() {
    let dir = tempdir();
    let model = fixture("tiny-llama");
    // Invalid on several counts; the error names fields and values, never the environment.
    let job =
        r#"{"input":{"prompt":"hello","sampling_params":{"top_p":7,"max_tokens":-1,"n":1000000}}}"#;
    let run = run_wick(
        &["--model", model.to_str().unwrap(), "--test-input", job],
        &[],
        dir.path(),
        &|_| false,
        Duration::from_secs(120),
    );
    run.assert_no_canary();
    assert_eq!(run.exit_code, Some(1), "{}", run.all_output());
    assert!(
        run.stdout.contains("validation") || run.stderr.contains("validation"),
        "expected a validation error:\n{}",
        run.all_output()
    );
}

#[test]
fn debug_output_of_secret_holders_is_redacted() {
    use clap::Parser;
    use wick::config::{Cli, RunpodEnv, Secret};

    let secret = Secret::new(HF_CANARY);
    assert_eq!(secret.expose(), HF_CANARY, "the canary is really inside");
    let runpod = RunpodEnv {
        api_key: Some(Secret::new(RUNPOD_CANARY)),
        get_job_url: Some("http://127.0.0.1:1/job-take/$ID".into()),
        ..RunpodEnv::default()
    };
    let cli = Cli::parse_from(["wick", "--model", "tiny"]);
    let mut hub = wick::hub::HubOptions::new("http://127.0.0.1:1", std::path::Path::new("cache"));
    hub.token = Some(Secret::new(HF_CANARY));
    let hub_from_config = wick::hub::HubOptions::from_config(
        &wick::config::Config::for_test(),
        Some(&Secret::new(HF_CANARY)),
    );
    let server = wick::server::settings::ServerSettings::from_config(
        &wick::config::Config::for_test(),
        Some(Secret::new(RUNPOD_CANARY)),
    )
    .unwrap();
    let endpoints = wick::queue::urls::Endpoints::new(
        "http://127.0.0.1:1/job-take/$ID",
        "http://127.0.0.1:1/job-done/$ID",
        "http://127.0.0.1:1/job-stream/$ID",
        None,
        "worker",
    );
    let client = wick::queue::client::PlatformClient::new(
        endpoints,
        Some(&Secret::new(RUNPOD_CANARY)),
        wick::queue::Timeouts::default(),
    )
    .unwrap();
    let rendered = [
        format!("{hub:?}"),
        format!("{hub_from_config:?}"),
        format!("{server:?}"),
        format!("{client:?}"),
        format!("{secret:?}"),
        format!("{secret:#?}"),
        format!("{secret}"),
        format!("{runpod:?}"),
        format!("{runpod:#?}"),
        format!("{cli:?}"),
        format!("{:?}", Some(&secret)),
    ];
    for text in &rendered {
        assert!(
            !text.contains(NEEDLE),
            "Debug/Display leaked a secret: {text}"
        );
    }
    // The redacted form still says a secret is present (useful in logs).
    assert!(format!("{runpod:?}").contains("redacted"));
}
