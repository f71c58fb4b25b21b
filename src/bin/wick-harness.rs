//! `wick-harness`: a local RunPod platform on loopback that drives a real `wick` process.
//!
//! - `run-tests`: runs every payload in `handler-tests/` through the queue and checks each result.
//! - `load --jobs N --concurrency C`: throughput, p50/p99 latency, lost jobs (must be 0).
//! - `kill --trials N`: SIGKILL the worker at a random moment during generation, restart it on the
//!   same spool directory, N times; every job must still end (completed, or failed with a reason).
//! - `serve`: only the platform, for a worker started by hand.
//!
//! Fault flags (`--fail-done-pct`, `--drop-done-pct`, `--fail-stream-pct`, `--fail-take-pct`,
//! `--slow-ms`, `--duplicate-pct`, and for `load` `--sigterm-after-ms` / `--sigterm-random-ms`) apply to
//! the worker-facing routes. The worker inherits this process's environment (e.g. `MODEL_NAME`)
//! plus `--worker-env KEY=VALUE`. Exit 0 when every check passed and nothing was lost.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use tracing_subscriber::EnvFilter;
use wick::harness::{
    load_cases, run_kill, run_load, run_tests, Faults, KillOptions, KillReport, LoadOptions,
    LoadReport, Platform, PlatformConfig, RunTestsReport, SessionOptions, SigtermPlan,
    WorkerLaunch,
};

#[derive(Debug, Parser)]
#[command(
    name = "wick-harness",
    version,
    about = "Local RunPod platform that drives a real wick worker"
)]
struct Cli {
    #[command(subcommand)]
    command: HarnessCommand,
}

#[derive(Debug, Subcommand)]
enum HarnessCommand {
    /// Run every handler test case and report pass/fail.
    RunTests {
        /// Directory of `*.json` cases.
        #[arg(long, default_value = "handler-tests")]
        dir: PathBuf,
        /// Deadline for all cases together, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Send N jobs at concurrency C and report throughput, latency and lost jobs.
    Load {
        /// Jobs to send.
        #[arg(long, default_value_t = 100)]
        jobs: usize,
        /// Jobs outstanding at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Job input (JSON).
        #[arg(
            long,
            default_value = r#"{"prompt": "Hello", "sampling_params": {"max_tokens": 16, "ignore_eos": true}}"#
        )]
        input: String,
        /// Longest wait for one job, in seconds.
        #[arg(long, default_value_t = 300)]
        job_timeout_secs: u64,
        /// Send SIGTERM to the worker after this many milliseconds.
        #[arg(long, conflicts_with = "sigterm_random_ms")]
        sigterm_after_ms: Option<u64>,
        /// Send SIGTERM at a random moment up to this many milliseconds.
        #[arg(long)]
        sigterm_random_ms: Option<u64>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// SIGKILL the worker at random moments during generation and restart it, N times; report how
    /// every job ended (none may be lost).
    Kill {
        /// Kills (each followed by a restart).
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Jobs submitted at the start of each trial.
        #[arg(long, default_value_t = 4)]
        jobs_per_trial: usize,
        /// Job input (JSON), repeatable: used in turn (default: one plain and one streaming job).
        #[arg(long = "input")]
        inputs: Vec<String>,
        /// Kill at a random moment up to this many ms after the trial's generation started.
        #[arg(long, default_value_t = 1000)]
        kill_within_ms: u64,
        /// How long the last worker gets to finish every job, in seconds.
        #[arg(long, default_value_t = 300)]
        finish_timeout_secs: u64,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Serve only the platform (print the worker environment) until Ctrl-C.
    Serve {
        /// Port (0: any free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// How long job-take and job-stop polls are held open, in ms.
        #[arg(long, default_value_t = 2000)]
        poll_hold_ms: u64,
    },
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// Path of the `wick` binary (default: next to this one).
    #[arg(long)]
    wick: Option<PathBuf>,
    /// Serve an already running worker instead of starting one (prints its environment).
    #[arg(long)]
    external: bool,
    /// Port (0: any free one; set it with --external).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Extra environment for the worker, KEY=VALUE (repeatable).
    #[arg(long = "worker-env", value_parser = parse_key_value)]
    worker_env: Vec<(String, String)>,
    /// Extra argument for the worker (repeatable).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    worker_args: Vec<String>,
    /// File for the worker's logs (default: inherited stderr).
    #[arg(long)]
    worker_log: Option<PathBuf>,
    /// The worker's `RUNPOD_PING_INTERVAL`, in ms.
    #[arg(long, default_value_t = 1000)]
    ping_interval_ms: u64,
    /// The worker's `SHUTDOWN_GRACE_SECS`.
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
    /// How long the worker may take to poll for its first job, in seconds (model load).
    #[arg(long, default_value_t = 300)]
    startup_timeout_secs: u64,
    /// How long job-take and job-stop polls are held open, in ms.
    #[arg(long, default_value_t = 2000)]
    poll_hold_ms: u64,
    /// Print the report as one JSON line at the end.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    faults: FaultArgs,
}

#[derive(Debug, Args)]
struct FaultArgs {
    /// Share (%) of job-done posts answered 500.
    #[arg(long, default_value_t = 0.0)]
    fail_done_pct: f64,
    /// Share (%) of job-done posts applied but whose answer is cut off.
    #[arg(long, default_value_t = 0.0)]
    drop_done_pct: f64,
    /// Share (%) of job-stream posts answered 500.
    #[arg(long, default_value_t = 0.0)]
    fail_stream_pct: f64,
    /// Share (%) of job-take polls answered 500.
    #[arg(long, default_value_t = 0.0)]
    fail_take_pct: f64,
    /// Delay added to every job-done, job-stream and ping answer, in ms.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// Share (%) of jobs delivered twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate_pct: f64,
    /// Seed for the fault dice (0: random).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("wick-harness: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wick-harness: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        HarnessCommand::RunTests {
            dir,
            timeout_secs,
            common,
        } => {
            let cases = load_cases(&dir)
                .with_context(|| format!("loading cases from {}", dir.display()))?;
            if cases.is_empty() {
                bail!("no *.json cases in {}", dir.display());
            }
            let options = session_options(&common)?;
            let report = run_tests(&options, &cases, Duration::from_secs(timeout_secs)).await?;
            print_run_tests(&report);
            if common.json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(report.passed(!common.external))
        }
        HarnessCommand::Load {
            jobs,
            concurrency,
            input,
            job_timeout_secs,
            sigterm_after_ms,
            sigterm_random_ms,
            common,
        } => {
            let input: Value = serde_json::from_str(&input).context("--input is not JSON")?;
            let sigterm = match (sigterm_after_ms, sigterm_random_ms) {
                (Some(ms), _) => Some(SigtermPlan::After(Duration::from_millis(ms))),
                (None, Some(ms)) => Some(SigtermPlan::Random(Duration::from_millis(ms))),
                (None, None) => None,
            };
            if sigterm.is_some() && common.external {
                bail!("SIGTERM faults need a worker started by the harness (not --external)");
            }
            let options = session_options(&common)?;
            let load = LoadOptions {
                jobs,
                concurrency,
                input,
                job_timeout: Duration::from_secs(job_timeout_secs),
                sigterm,
            };
            let report = run_load(&options, &load).await?;
            print_load(&report);
            if common.json {
                println!("{}", serde_json::to_string(&report)?);
            }
            let worker_ok = common.external || report.worker_exit == Some(0);
            Ok(report.jobs.lost == 0
                && report.platform.conflicting_results == 0
                && report.taken_after_sigterm == 0
                && worker_ok)
        }
        HarnessCommand::Kill {
            trials,
            jobs_per_trial,
            inputs,
            kill_within_ms,
            finish_timeout_secs,
            common,
        } => {
            if common.external {
                bail!("kill runs need workers started by the harness (not --external)");
            }
            let inputs = if inputs.is_empty() {
                vec![
                    r#"{"prompt": "Hello", "sampling_params": {"max_tokens": 256, "ignore_eos": true}}"#.to_owned(),
                    r#"{"prompt": "Hello", "stream": true, "sampling_params": {"max_tokens": 256, "ignore_eos": true}}"#.to_owned(),
                ]
            } else {
                inputs
            };
            let inputs = inputs
                .iter()
                .map(|i| serde_json::from_str(i).context("--input is not JSON"))
                .collect::<anyhow::Result<Vec<Value>>>()?;
            let session = session_options(&common)?;
            let worker = session
                .worker
                .context("kill runs need a worker started by the harness")?;
            let options = KillOptions {
                platform: session.platform,
                bind: session.bind,
                worker,
                trials,
                jobs_per_trial,
                inputs,
                kill_within: Duration::from_millis(kill_within_ms),
                startup_timeout: session.startup_timeout,
                finish_timeout: Duration::from_secs(finish_timeout_secs),
                seed: common.faults.seed,
            };
            let report = run_kill(&options).await?;
            print_kill(&report);
            if common.json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(report.passed())
        }
        HarnessCommand::Serve { port, poll_hold_ms } => {
            let config = PlatformConfig {
                poll_hold: Duration::from_millis(poll_hold_ms),
                ..PlatformConfig::default()
            };
            let running = Platform::serve(
                config,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            )
            .await?;
            println!(
                "# platform on {}; export these and start wick:",
                running.base_url()
            );
            for (key, value) in running.worker_env() {
                println!("export {key}='{value}'");
            }
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            running.stop().await;
            Ok(true)
        }
    }
}

fn session_options(common: &CommonArgs) -> anyhow::Result<SessionOptions> {
    let f = &common.faults;
    let faults = Faults {
        fail_done_pct: f.fail_done_pct,
        drop_done_pct: f.drop_done_pct,
        fail_stream_pct: f.fail_stream_pct,
        fail_take_pct: f.fail_take_pct,
        slow: Duration::from_millis(f.slow_ms),
        duplicate_pct: f.duplicate_pct,
        seed: f.seed,
        ..Faults::default()
    };
    let platform = PlatformConfig {
        poll_hold: Duration::from_millis(common.poll_hold_ms),
        faults,
        ..PlatformConfig::default()
    };
    let worker = if common.external {
        None
    } else {
        let wick = match &common.wick {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("locating this binary")?
                .with_file_name(format!("wick{}", std::env::consts::EXE_SUFFIX)),
        };
        if !wick.is_file() {
            bail!("wick binary not found at {} (use --wick)", wick.display());
        }
        Some(WorkerLaunch {
            wick,
            args: common.worker_args.clone(),
            env: common.worker_env.clone(),
            log: common.worker_log.clone(),
            ping_interval_ms: common.ping_interval_ms,
            grace_secs: common.grace_secs,
        })
    };
    Ok(SessionOptions {
        platform,
        bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), common.port),
        worker,
        startup_timeout: Duration::from_secs(common.startup_timeout_secs),
    })
}

fn print_run_tests(report: &RunTestsReport) {
    for case in &report.cases {
        let verdict = if case.passed { "PASS" } else { "FAIL" };
        println!("{verdict}  {}  ({})", case.name, case.description);
        for problem in &case.problems {
            println!("      - {problem}");
        }
    }
    let passed = report.cases.iter().filter(|c| c.passed).count();
    println!("cases: {passed}/{} passed", report.cases.len());
    print_jobs(&report.jobs, report.platform.conflicting_results);
    println!(
        "worker exit after SIGTERM: {}",
        exit_text(report.worker_exit)
    );
}

fn print_load(report: &LoadReport) {
    print_jobs(&report.jobs, report.platform.conflicting_results);
    println!(
        "throughput: {:.2} jobs/s over {:.1} s; latency p50 {} ms, p99 {} ms",
        report.throughput_jobs_per_sec,
        report.wall_secs,
        report.latency_p50_ms,
        report.latency_p99_ms
    );
    println!(
        "platform: {} delivered twice, {} repeated result posts, {} heartbeats (max gap {})",
        report.platform.delivered_twice,
        report.platform.repeated_done_posts,
        report.platform.pings,
        report
            .max_ping_gap_ms
            .map_or("-".to_owned(), |ms| format!("{ms} ms"))
    );
    if let Some(at) = report.sigterm_at_ms {
        println!(
            "SIGTERM at {at} ms; jobs taken after it: {}",
            report.taken_after_sigterm
        );
    }
    println!("worker exit: {}", exit_text(report.worker_exit));
}

fn print_kill(report: &KillReport) {
    let a = &report.after_kill;
    let failed: Vec<String> = a.failed.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "kills: {} trials, {} with jobs in progress; a killed worker's jobs resolved after a restart in p50 {} ms, max {} ms",
        report.trials, report.kills_mid_generation, report.resolved_p50_ms, report.resolved_max_ms
    );
    println!(
        "jobs in progress at a kill: {}: completed after a restart {}, failed {} ({}), lost {}",
        a.in_flight,
        a.completed,
        a.failed.values().sum::<usize>(),
        if failed.is_empty() {
            "-".to_owned()
        } else {
            failed.join(", ")
        },
        a.lost
    );
    for (message, count) in &a.failed_messages {
        println!("  {count} failed with: {message}");
    }
    print_jobs(&report.jobs, report.platform.conflicting_results);
    println!(
        "platform: {} repeated result posts; last worker exit: {}; {:.1} s",
        report.platform.repeated_done_posts,
        exit_text(report.final_worker_exit),
        report.wall_secs
    );
}

fn print_jobs(jobs: &wick::harness::session::JobSummary, conflicting: usize) {
    println!(
        "jobs: sent {}, completed {}, failed {}, lost {}, not taken {}, cancelled {}, conflicting results {}",
        jobs.sent, jobs.completed, jobs.failed, jobs.lost, jobs.not_taken, jobs.cancelled, conflicting
    );
    for (reason, count) in &jobs.failed_reasons {
        println!("  failed with {reason}: {count}");
    }
}

fn exit_text(code: Option<i32>) -> String {
    code.map_or("n/a (external or killed)".to_owned(), |c| c.to_string())
}
