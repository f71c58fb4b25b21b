//! wick: a serverless LLM worker.
//!
//! One binary pulls jobs from a RunPod-style queue, loads Hugging Face weights, runs continuous-batched
//! generation on candle, and streams tokens back through the platform's callback API.
//!
//! # Layout
//! - [`config`]: every knob (flag and environment variable), validated before anything starts.
//! - [`error`]: [`error::JobError`], the one per-job error with a stable `error_type()`.
//! - [`hub`]: model resolution and downloads (local dir, `.gguf`, Hub repo, `models.toml` preset).
//! - [`models`]: one file per architecture, forked from candle-transformers, with per-token positions
//!   and an engine-owned KV cache.
//! - [`tokenizer`]: tokenizer loading, incremental detokenization, chat templates.
//! - [`engine`]: the generation engine on its own OS thread: scheduler, KV cache, sampler, sequences.
//! - [`job`]: job input schema, validation, output shaping (native worker-vllm and OpenAI shapes).
//! - [`queue`]: the RunPod worker protocol (job-take, job-done, job-stream, ping, job-stop).
//! - [`server`]: the local dev API (RunPod routes and OpenAI routes).
//! - [`harness`]: a local RunPod platform on loopback that drives a real `wick` process.
//! - [`device`]: compute device choice and run-time GPU detection.
#![cfg_attr(test, allow(clippy::unwrap_used))]

#[cfg(all(feature = "cuda", feature = "probe"))]
compile_error!("features `cuda` and `probe` conflict (cudarc loading modes): build with --no-default-features --features cuda");

pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod harness;
pub mod hub;
pub mod job;
pub mod models;
pub mod queue;
pub mod server;
pub mod tokenizer;
