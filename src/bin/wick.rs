//! `wick`: the worker binary.
//!
//! Startup, in order: logging (JSON lines when `RUNPOD_ENDPOINT_ID` is set, human otherwise; always
//! on stderr), flags and environment (validated), the `models` / `download` subcommands, the mode
//! (dev server, one-shot, or queue worker) and its inputs, model resolution (local or Hub), engine
//! load, warm-up, then the mode. Every startup failure prints one clear message and exits 1 before
//! any job is taken.
//!
//! Modes: `--serve-api` (local dev API); `--test-input <json|file>` (one job, result on stdout);
//! `RUNPOD_WEBHOOK_GET_JOB` set (queue worker until SIGTERM, then drain and exit 0); otherwise
//! `./test_input.json` when it exists (one job).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use wick::config::{secret_from_env, Cli, Command, Config, RunpodEnv, Secret};
use wick::engine::EngineHandle;
use wick::hub::ModelFiles;
use wick::job::JobContext;
use wick::queue::oneshot::{self, TestInputSource};
use wick::queue::{WorkerIdentity, WorkerSettings};

/// What this process will do once the model is loaded.
enum Mode {
    /// The local dev API server.
    ServeApi,
    /// One job, printed to stdout.
    OneShot(TestInputSource),
    /// The RunPod queue worker.
    Queue,
}

fn main() -> ExitCode {
    drop_empty_settings_env();
    let runpod = RunpodEnv::from_env();
    init_tracing(&runpod);
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wick")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let queue_mode = runpod.queue_configured()
        && cli.command.is_none()
        && !cli.config.serve_api
        && cli.config.test_input.is_none();
    match runtime.block_on(run(cli, runpod.clone())) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            if queue_mode {
                // Tell the platform this worker is unhealthy, as the SDK's fitness checks do.
                runtime.block_on(wick::queue::report_unhealthy(
                    &runpod,
                    "startup",
                    &format!("{e:#}"),
                ));
            }
            ExitCode::FAILURE
        }
    }
}

/// RunPod template forms leave unused fields empty: an empty setting means "unset" (its default), not
/// an invalid value that stops the worker at start.
fn drop_empty_settings_env() {
    use clap::CommandFactory;
    for arg in Cli::command().get_arguments() {
        if let Some(name) = arg.get_env() {
            if std::env::var_os(name).is_some_and(|value| value.is_empty()) {
                // Runs first in `main`, before any other thread exists or reads the environment.
                std::env::remove_var(name);
            }
        }
    }
}

/// Logs to stderr (stdout carries only the one-shot result): JSON lines under RunPod, human text
/// otherwise. Level from `RUST_LOG`, else `RUNPOD_LOG_LEVEL`, else `info`.
fn init_tracing(runpod: &RunpodEnv) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| runpod.log_level.as_deref().map(runpod_level_filter))
        .unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if runpod.endpoint_id.is_some() {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.with_target(false).init();
    }
}

/// Maps the SDK's level names (`DEBUG`, `INFO`, `WARN`, `ERROR`, `TRACE`, `NOTSET`) to a filter.
fn runpod_level_filter(level: &str) -> String {
    match level.trim().to_ascii_uppercase().as_str() {
        "TRACE" | "NOTSET" => "trace",
        "DEBUG" => "debug",
        "WARN" | "WARNING" => "warn",
        "ERROR" => "error",
        _ => "info",
    }
    .to_owned()
}

async fn run(cli: Cli, runpod: RunpodEnv) -> anyhow::Result<ExitCode> {
    let mut config = cli.config;
    config.validate().context("invalid configuration")?;
    if matches!(cli.command, Some(Command::Models)) {
        print_presets(&config)?;
        return Ok(ExitCode::SUCCESS);
    }
    wick::hub::apply_preset_defaults(&mut config).context("model selection")?;
    config
        .validate()
        .context("invalid configuration (after preset defaults)")?;
    let hf_token = secret_from_env("HF_TOKEN");

    match cli.command {
        Some(Command::Models) | None => {}
        Some(Command::Download) => {
            let files = wick::hub::download(&config, hf_token.as_ref())
                .await
                .context("download failed")?;
            info!(files = files.all_paths().len(), "model is in the cache");
            return Ok(ExitCode::SUCCESS);
        }
    }

    let mode = select_mode(&config, &runpod)?;
    // Read the one-shot job before the (slow) model load, so a bad file fails at once.
    let one_shot_job = match &mode {
        Mode::OneShot(source) => Some(source.load().context("test input")?),
        _ => None,
    };
    // Refuse a dev-server setting that cannot work (e.g. a public bind without a key) before the
    // slow model load, not after it.
    let server_settings = match mode {
        Mode::ServeApi => Some(
            wick::server::ServerSettings::from_config(&config, server_api_key(&config)?)
                .context("dev server settings")?,
        ),
        _ => None,
    };
    if mode_is_queue(&mode)
        && RunpodEnv::ping_interval_raw().is_some_and(|v| v.trim().parse::<u64>().is_err())
    {
        warn!("RUNPOD_PING_INTERVAL is not a whole number of milliseconds; using 10000");
    }

    let (engine, files) = load_engine(&config, hf_token.as_ref()).await?;
    // The model's generation_config.json gives the OpenAI routes their default sampling settings.
    let ctx = JobContext::new(engine.clone(), &config).with_model_files(&files);
    let code = match mode {
        Mode::ServeApi => {
            let settings = server_settings.context("dev server settings were built above")?;
            serve_api(&config, ctx, settings).await?;
            ExitCode::SUCCESS
        }
        Mode::OneShot(_) => {
            let job = one_shot_job.context("one-shot job was loaded above")?;
            let identity = identity(&runpod);
            let cancel = CancellationToken::new();
            let body = oneshot::run_one(&ctx, job, &identity, cancel).await;
            // stdout carries exactly one JSON line: the job-done body.
            println!("{body}");
            if oneshot::succeeded(&body) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Mode::Queue => {
            let shutdown = CancellationToken::new();
            spawn_signal_listener(shutdown.clone())?;
            let settings = WorkerSettings::from_config(&config);
            let report = wick::queue::run_worker(&runpod, Arc::new(ctx), settings, shutdown)
                .await
                .context("queue worker could not start")?;
            if report.undelivered > 0 {
                warn!(
                    undelivered = report.undelivered,
                    "some results could not be delivered (each is logged above)"
                );
            }
            match report.runner_failure {
                // Non-zero so the platform replaces this worker (fault Q13).
                Some(reason) => {
                    error!(%reason, "exiting: the engine is unhealthy");
                    ExitCode::FAILURE
                }
                None => ExitCode::SUCCESS,
            }
        }
    };
    // A wedged engine thread may never read its inbox again: bound the wait.
    if tokio::time::timeout(Duration::from_secs(5), engine.shutdown())
        .await
        .is_err()
    {
        warn!("engine did not take the shutdown request within 5 s");
    }
    Ok(code)
}

fn mode_is_queue(mode: &Mode) -> bool {
    matches!(mode, Mode::Queue)
}

/// Picks the mode (the SDK's order, with `--test-input` before the queue).
fn select_mode(config: &Config, runpod: &RunpodEnv) -> anyhow::Result<Mode> {
    if config.serve_api {
        return Ok(Mode::ServeApi);
    }
    if let Some(arg) = &config.test_input {
        return Ok(Mode::OneShot(TestInputSource::from_arg(arg)));
    }
    if runpod.queue_configured() {
        if runpod.post_output_url.is_none() {
            bail!("RUNPOD_WEBHOOK_GET_JOB is set but RUNPOD_WEBHOOK_POST_OUTPUT is not: results could not be returned");
        }
        // Before the model is loaded: a malformed URL would fail every call.
        wick::queue::check_urls(runpod)?;
        return Ok(Mode::Queue);
    }
    let cwd = std::env::current_dir().context("current directory")?;
    match TestInputSource::default_file(&cwd) {
        Some(source) => Ok(Mode::OneShot(source)),
        None => bail!(
            "nothing to do: set RUNPOD_WEBHOOK_GET_JOB (queue worker), pass --test-input <json|file>, \
             put a test_input.json in the working directory, or pass --serve-api ({})",
            oneshot::TestInputError::NotFound
        ),
    }
}

/// Resolves the model, loads it and warms it up.
async fn load_engine(
    config: &Config,
    hf_token: Option<&Secret>,
) -> anyhow::Result<(EngineHandle, ModelFiles)> {
    let files = wick::hub::resolve_model(config, hf_token)
        .await
        .context("model files")?;
    // The KV cache is sized by the engine at load; the weights must fit before anything is loaded.
    let weights_bytes = files.weights_bytes().context("model files")?;
    if !config.device.trim().eq_ignore_ascii_case("cpu") {
        let check = wick::device::check_gpu_memory(weights_bytes, 0, config.gpu_memory_utilization)
            .context("GPU memory check")?;
        info!(?check, weights_bytes, "GPU memory check");
    }
    let load_config = config.clone();
    let load_files = files.clone();
    let engine =
        tokio::task::spawn_blocking(move || wick::engine::load_engine(&load_files, &load_config))
            .await
            .context("model loading task")?
            .context("model loading failed")?;
    engine.set_step_budget(Duration::from_secs(config.engine_step_timeout_secs));
    if config.warmup {
        wick::engine::warm_up(&engine)
            .await
            .context("warm-up generation failed")?;
        info!("warm-up done");
    }
    Ok((engine, files))
}

/// The dev server's key: `WICK_API_KEY`, else the first line of `--api-key-file`.
fn server_api_key(config: &Config) -> anyhow::Result<Option<Secret>> {
    if let Some(key) = secret_from_env("WICK_API_KEY") {
        return Ok(Some(key));
    }
    let Some(path) = &config.api_key_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
    let key = text.lines().next().unwrap_or_default().trim();
    if key.is_empty() {
        bail!("--api-key-file {} is empty", path.display());
    }
    Ok(Some(Secret::new(key)))
}

async fn serve_api(
    config: &Config,
    ctx: JobContext,
    settings: wick::server::ServerSettings,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    let shutdown = CancellationToken::new();
    spawn_signal_listener(shutdown.clone())?;
    wick::server::run(Arc::new(ctx), settings, listener, shutdown)
        .await
        .context("dev server")?;
    Ok(())
}

/// SIGTERM or SIGINT cancels `shutdown` (a second signal is ignored; the drain is bounded).
fn spawn_signal_listener(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

fn identity(runpod: &RunpodEnv) -> WorkerIdentity {
    WorkerIdentity {
        worker_id: runpod.pod_id.clone().unwrap_or_else(|| "unknown".into()),
        hostname: runpod
            .pod_hostname
            .clone()
            .unwrap_or_else(|| "unknown".into()),
    }
}

fn print_presets(config: &Config) -> anyhow::Result<()> {
    let table = wick::hub::list_presets(config).context("models.toml")?;
    print!("{table}");
    if !table.ends_with('\n') {
        println!();
    }
    Ok(())
}
