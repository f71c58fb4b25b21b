//! A local RunPod platform on loopback that drives a real `wick` process: the public API (`run`,
//! `runsync`, `status`, `stream`, `cancel`, `health`, `purge-queue`) and the worker-facing job-take
//! (+batch), job-stop, job-done, job-stream and ping routes, recording every request and injecting
//! faults (failed or cut-off posts, slow answers, duplicate deliveries, scripted statuses). Sessions
//! run the handler test cases or a load test against a started or external worker.
//!
//! Owned here: the fake platform and the harness procedures. Not here: the worker itself (`queue`).
//!
//! # Layout
//! - [`platform`]: job store, recorded requests, fault plan, in-process API.
//! - `routes`: the HTTP routes.
//! - [`cases`]: `handler-tests/*.json` loading and checking.
//! - [`session`]: worker process control, `run-tests`, `load`, reports.
//! - [`kill`]: `kill`, SIGKILL mid-generation and restart, N times (fault Q6).

pub mod cases;
pub mod kill;
pub mod platform;
mod routes;
pub mod session;

pub use cases::{load_cases, HandlerCase, NamedCase};
pub use kill::{run_kill, AfterKill, KillOptions, KillReport};
pub use platform::{
    Faults, JobRecord, JobStatus, Platform, PlatformConfig, RecordedRequest, Route, RunningPlatform,
};
pub use session::{
    run_load, run_tests, HarnessError, LoadOptions, LoadReport, RunTestsReport, SessionOptions,
    SigtermPlan, WorkerLaunch, WorkerProcess,
};
