//! Entry points shared by the libFuzzer targets (`fuzz/fuzz_targets/*.rs`) and the CI corpus replay
//! (`tests/robustness_corpus.rs`, which includes this file with `#[path]`), so both drive exactly the
//! same library calls the worker makes. Each function takes raw bytes as they would arrive (a
//! job-take body, an HTTP body, a file from a model repo), returns what the worker concluded, and
//! asserts the invariants the next layer relies on: a panic anywhere (including these asserts) is a
//! finding.
//!
//! | function             | drives                                                                                     |
//! |----------------------|--------------------------------------------------------------------------------------------|
//! | `job_input`          | `queue::wire::parse_take_body` → `job::JobInput::parse` → sampling `resolve` + prompt checks |
//! | `openai_request`     | JSON body → `job::openai::parse_chat_request` / `parse_completion_request` → `resolve`       |
//! | `chat_template`      | `ChatTemplate::new` (hostile template) + `render_with` (hostile messages, fuel on)           |
//! | `gguf_header`        | a `.gguf` file → `engine::load_tokenizer` + `models::load_with` (candle's GGUF reader)       |
//! | `safetensors_header` | `model.safetensors` next to a fixture `config.json` → `models::load_with`                    |
//! | `config_json`        | `config.json` text → `models::ModelConfig::from_json_str`; `tokenizer_config.json` template pick |

use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Device};
use serde_json::Value;
use wick::engine::loader::load_tokenizer;
use wick::error::JobError;
use wick::hub::{ModelFiles, WeightFiles};
use wick::job::openai::{parse_chat_request, parse_completion_request};
use wick::job::validate::{check_prompt_text, normalize_messages, ResolvedSampling};
use wick::job::{JobInput, JobLimits, OpenAiRoute};
use wick::models::{load_with, GgufOptions, ModelConfig};
use wick::tokenizer::chat_template::{ChatTemplate, RenderContext};

/// Vocabulary size assumed by validation (SmolLM2's; any value works, the checks are relative to it).
pub const VOCAB_SIZE: usize = 49_152;

/// The chat templates of the five fixture models (real templates: the mutator starts from them).
const FIXTURE_TOKENIZER_CONFIGS: [&str; 5] = [
    include_str!("../tests/fixtures/tiny-llama/tokenizer_config.json"),
    include_str!("../tests/fixtures/tiny-mistral/tokenizer_config.json"),
    include_str!("../tests/fixtures/tiny-qwen2/tokenizer_config.json"),
    include_str!("../tests/fixtures/tiny-phi3/tokenizer_config.json"),
    include_str!("../tests/fixtures/tiny-gemma2/tokenizer_config.json"),
];

/// The fixture `config.json` files, placed next to fuzzed safetensors files.
const FIXTURE_CONFIGS: [&str; 5] = [
    include_str!("../tests/fixtures/tiny-llama/config.json"),
    include_str!("../tests/fixtures/tiny-mistral/config.json"),
    include_str!("../tests/fixtures/tiny-qwen2/config.json"),
    include_str!("../tests/fixtures/tiny-phi3/config.json"),
    include_str!("../tests/fixtures/tiny-gemma2/config.json"),
];

/// Largest prompt a chat template may render (the template module's documented cap).
pub const MAX_RENDERED_BYTES: usize = 16 * 1024 * 1024;

/// What the worker concluded about one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted (and every invariant held).
    Accepted,
    /// Refused with an error; the string is the stable `error_type` or error kind.
    Rejected(String),
    /// Not something this entry point handles at all (e.g. not UTF-8 where text is required).
    Ignored,
}

/// Stable wire names of job errors: a rejection must use one of these.
pub const KNOWN_ERROR_TYPES: [&str; 9] = [
    "validation",
    "overloaded",
    "cancelled",
    "timeout",
    "template_error",
    "tokenizer_error",
    "generation",
    "shutting_down",
    "not_found",
];

fn rejected(err: &JobError) -> Outcome {
    let kind = err.error_type();
    assert!(
        KNOWN_ERROR_TYPES.contains(&kind),
        "unknown error_type {kind}"
    );
    // Messages quote user values; they must stay bounded (short_json truncates).
    assert!(
        err.to_string().len() <= 64 * 1024,
        "error message of {} bytes",
        err.to_string().len()
    );
    Outcome::Rejected(kind.to_string())
}

/// The limits a default worker applies (10 MiB payload, 2048-token context).
pub fn limits() -> JobLimits {
    JobLimits::for_test()
}

/// Invariants the engine relies on ("the engine trusts these values to be in range").
fn check_resolved(resolved: &ResolvedSampling, limits: &JobLimits) {
    let p = &resolved.params;
    assert!(
        resolved.n >= 1 && resolved.n <= limits.max_n,
        "n = {}",
        resolved.n
    );
    assert!(
        p.temperature.is_finite() && p.temperature >= 0.0,
        "temperature {}",
        p.temperature
    );
    assert!(p.top_p > 0.0 && p.top_p <= 1.0, "top_p {}", p.top_p);
    assert!(p.top_k <= VOCAB_SIZE, "top_k {}", p.top_k);
    assert!((0.0..=1.0).contains(&p.min_p), "min_p {}", p.min_p);
    assert!(
        p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0,
        "repetition_penalty {}",
        p.repetition_penalty
    );
    assert!(
        (-2.0..=2.0).contains(&p.presence_penalty),
        "presence_penalty {}",
        p.presence_penalty
    );
    assert!(
        (-2.0..=2.0).contains(&p.frequency_penalty),
        "frequency_penalty {}",
        p.frequency_penalty
    );
    assert!(
        p.stop.len() <= limits.max_stop_sequences,
        "{} stop strings",
        p.stop.len()
    );
    assert!(p
        .stop
        .iter()
        .all(|s| !s.is_empty() && s.len() <= limits.max_stop_bytes));
    assert!(p.stop_token_ids.len() <= limits.max_stop_token_ids);
    assert!(
        p.stop_token_ids
            .iter()
            .all(|&id| (id as usize) < VOCAB_SIZE),
        "stop id out of vocab"
    );
    assert!(
        p.logprobs.is_none_or(|l| l <= limits.max_logprobs),
        "logprobs {:?}",
        p.logprobs
    );
    assert!(
        p.min_tokens < limits.max_model_len,
        "min_tokens {}",
        p.min_tokens
    );
    if let Some(t) = resolved.truncate_prompt_tokens {
        assert!(
            t >= 1 && t < limits.max_model_len,
            "truncate_prompt_tokens {t}"
        );
    }
}

fn check_messages(messages: &Value, limits: &JobLimits) -> Result<Value, JobError> {
    let normalized = normalize_messages(messages, limits)?;
    let list = normalized
        .as_array()
        .expect("normalize_messages returns a list");
    assert!(!list.is_empty() && list.len() <= limits.max_messages);
    Ok(normalized)
}

fn openai_body(route: OpenAiRoute, body: &Value, limits: &JobLimits) -> Outcome {
    let result = match route {
        OpenAiRoute::ChatCompletions => parse_chat_request(body, limits).and_then(|req| {
            check_messages(&req.messages, limits)?;
            req.sampling.resolve(limits, VOCAB_SIZE)
        }),
        OpenAiRoute::Completions => parse_completion_request(body, limits).and_then(|req| {
            assert!(!req.prompts.is_empty());
            req.sampling.resolve(limits, VOCAB_SIZE)
        }),
        OpenAiRoute::Models => return Outcome::Accepted,
    };
    match result {
        Ok(resolved) => {
            check_resolved(&resolved, limits);
            Outcome::Accepted
        }
        Err(err) => rejected(&err),
    }
}

/// One job `input` as `job::run_job` validates it before anything reaches the engine.
pub fn validate_job_input(input: Value, limits: &JobLimits) -> Outcome {
    match JobInput::parse(input, limits) {
        Err(err) => rejected(&err),
        Ok(JobInput::OpenAi { route, body }) => openai_body(route, &body, limits),
        Ok(JobInput::Native(native)) => {
            let prompt = match &native.prompt {
                wick::job::input::PromptSource::Text(text) => {
                    check_prompt_text("prompt", text, limits)
                }
                wick::job::input::PromptSource::Chat(messages) => {
                    check_messages(messages, limits).map(|_| ())
                }
            };
            match prompt.and_then(|()| native.sampling.resolve(limits, VOCAB_SIZE)) {
                Ok(resolved) => {
                    check_resolved(&resolved, limits);
                    Outcome::Accepted
                }
                Err(err) => rejected(&err),
            }
        }
    }
}

/// A job-take answer body (one job object or a batch array) as the queue worker parses it, then
/// each job's `input` through validation. Returns one outcome per job (malformed jobs that carry an
/// id count as rejections, as the worker fails them).
pub fn job_input(data: &[u8]) -> Vec<Outcome> {
    let limits = limits();
    if data.len() > limits.max_payload_bytes {
        // The queue client reads at most the payload cap; larger bodies never reach the parser.
        return vec![Outcome::Rejected("payload_too_large".into())];
    }
    let batch = wick::queue::wire::parse_take_body(data);
    let mut outcomes: Vec<Outcome> = batch
        .malformed
        .iter()
        .map(|m| {
            assert!(
                m.reason.len() <= 64 * 1024,
                "malformed reason of {} bytes",
                m.reason.len()
            );
            Outcome::Rejected("malformed_job".into())
        })
        .collect();
    for job in batch.jobs {
        assert!(!job.id.is_empty(), "a job without an id was accepted");
        outcomes.push(validate_job_input(job.input, &limits));
    }
    outcomes
}

/// An OpenAI HTTP body as the dev server parses it, validated for both completion routes.
pub fn openai_request(data: &[u8]) -> Vec<Outcome> {
    let limits = limits();
    if data.len() > limits.max_payload_bytes {
        return vec![Outcome::Rejected("payload_too_large".into())];
    }
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return vec![Outcome::Rejected("invalid_json".into())];
    };
    vec![
        openai_body(OpenAiRoute::ChatCompletions, &body, &limits),
        openai_body(OpenAiRoute::Completions, &body, &limits),
    ]
}

/// The template source for a chat-template input: `0`..`4` pick a fixture model's real template.
fn template_source(spec: &str) -> Option<String> {
    match spec.trim() {
        d @ ("0" | "1" | "2" | "3" | "4") => {
            let index: usize = d.parse().expect("a digit");
            let config: Value = serde_json::from_str(FIXTURE_TOKENIZER_CONFIGS[index])
                .expect("fixture tokenizer_config.json is JSON");
            wick::tokenizer::chat_template::select_source(&config)
        }
        _ => Some(spec.to_string()),
    }
}

/// A chat template and a conversation, `TEMPLATE \0 MESSAGES_JSON` (a template of `0`-`4` is a
/// fixture model's real one; without a NUL the input is the template and the conversation is fixed).
/// Compiles the template as a model's would be, then renders it with fuel on.
pub fn chat_template(data: &[u8]) -> Outcome {
    let (template_bytes, messages_bytes) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Ok(spec) = std::str::from_utf8(template_bytes) else {
        return Outcome::Ignored;
    };
    let Some(source) = template_source(spec) else {
        return Outcome::Ignored;
    };
    let limits = limits();
    let messages = match messages_bytes.map(serde_json::from_slice::<Value>) {
        None | Some(Err(_)) => serde_json::json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "{{ 7*7 }} {% raw %}x{% endraw %}"},
            {"role": "assistant", "content": "49"},
            {"role": "user", "content": "again"}
        ]),
        Some(Ok(value)) => match normalize_messages(&value, &limits) {
            Ok(normalized) => normalized,
            Err(err) => return rejected(&err),
        },
    };
    let template = match ChatTemplate::new(source) {
        Ok(t) => t,
        Err(err) => return Outcome::Rejected(format!("compile: {}", short(&err.to_string()))),
    };
    let tools =
        serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let ctx = RenderContext {
        messages: &messages,
        add_generation_prompt: true,
        bos_token: Some("<s>"),
        eos_token: Some("</s>"),
        tools: Some(&tools),
        enable_thinking: Some(false),
    };
    match template.render_with(&ctx) {
        Ok(text) => {
            assert!(
                text.len() <= MAX_RENDERED_BYTES,
                "rendered {} bytes",
                text.len()
            );
            Outcome::Accepted
        }
        Err(err) => Outcome::Rejected(format!("render: {}", short(&err.to_string()))),
    }
}

fn short(text: &str) -> String {
    text.chars().take(80).collect()
}

/// A scratch directory for file-based entry points (one per process; inputs overwrite each other).
fn scratch_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
        .path()
        .to_path_buf()
}

fn write_file(name: &str, data: &[u8]) -> PathBuf {
    // Unique per thread so the replay test may run entry points in parallel.
    let dir =
        scratch_dir().join(format!("{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).expect("scratch file");
    file.write_all(data).expect("scratch write");
    path
}

/// A `.gguf` file as the worker loads one: the tokenizer (and chat template) from its metadata,
/// then the model on the CPU.
pub fn gguf_header(data: &[u8]) -> Outcome {
    let path = write_file("model.gguf", data);
    let files = ModelFiles {
        config: None,
        weights: WeightFiles::Gguf(path),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: None,
    };
    if let Err(err) = load_tokenizer(&files, None) {
        return Outcome::Rejected(format!("tokenizer: {}", short(&err.to_string())));
    }
    let device = Device::Cpu;
    match load_with(
        &files,
        &device,
        DType::F32,
        &GgufOptions::for_device(&device),
    ) {
        Ok(model) => {
            let info = model.info();
            assert!(info.vocab_size > 0 && info.num_layers > 0);
            Outcome::Accepted
        }
        Err(err) => Outcome::Rejected(format!("model: {}", short(&err.to_string()))),
    }
}

/// `config.json` of a micro llama (1 layer, hidden 8, vocab 16): `fuzz/make_seeds.py` writes valid
/// weights for it, so the mutator starts from files that load.
pub const MICRO_CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":8,
"intermediate_size":16,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,"num_hidden_layers":1,
"vocab_size":16,"rms_norm_eps":1e-5,"max_position_embeddings":64,"rope_theta":10000.0,
"tie_word_embeddings":false,"bos_token_id":14,"eos_token_id":15}"#;

/// Which `config.json` goes next to fuzzed weights: the header's `__metadata__.config` names a
/// fixture family (`llama`, `mistral`, `qwen2`, `phi3`, `gemma2`) or holds a whole `config.json` as a
/// string (so a hostile config can be paired with weights that load); anything else gets the micro
/// llama. (A harness-side peek; the worker's own parsing is what `load_with` does.)
fn config_for_weights(data: &[u8]) -> String {
    let chosen = data
        .get(..8)
        .and_then(|n| n.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .and_then(|n| data.get(8..8usize.checked_add(n)?))
        .and_then(|header| serde_json::from_slice::<Value>(header).ok())
        .and_then(|h| {
            h.get("__metadata__")?
                .get("config")?
                .as_str()
                .map(str::to_string)
        });
    match chosen.as_deref() {
        Some("llama") => FIXTURE_CONFIGS[0].to_string(),
        Some("mistral") => FIXTURE_CONFIGS[1].to_string(),
        Some("qwen2") => FIXTURE_CONFIGS[2].to_string(),
        Some("phi3") => FIXTURE_CONFIGS[3].to_string(),
        Some("gemma2") => FIXTURE_CONFIGS[4].to_string(),
        Some(inline) if inline.trim_start().starts_with('{') => inline.to_string(),
        _ => MICRO_CONFIG.to_string(),
    }
}

/// A `model.safetensors` file next to a `config.json` (see [`config_for_weights`]), loaded as the
/// worker loads safetensors weights (memory-mapped) on the CPU.
pub fn safetensors_header(data: &[u8]) -> Outcome {
    let weights = write_file("model.safetensors", data);
    let config = write_file("config.json", config_for_weights(data).as_bytes());
    let files = ModelFiles {
        config: Some(config),
        weights: WeightFiles::Safetensors(vec![weights]),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: None,
    };
    let device = Device::Cpu;
    match load_with(
        &files,
        &device,
        DType::F32,
        &GgufOptions::for_device(&device),
    ) {
        Ok(model) => {
            assert!(model.info().vocab_size > 0);
            Outcome::Accepted
        }
        Err(err) => Outcome::Rejected(format!("model: {}", short(&err.to_string()))),
    }
}

/// `config.json` text as the loader resolves it (architecture allow-list, rope settings, head sizes);
/// the same bytes are also read as a `tokenizer_config.json` for the chat-template choice.
pub fn config_json(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::Ignored;
    };
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        if let Some(source) = wick::tokenizer::chat_template::select_source(&value) {
            assert!(!source.trim().is_empty());
        }
    }
    match ModelConfig::from_json_str(text) {
        Ok(cfg) => {
            assert!(cfg.head_dim > 0, "head_dim 0 accepted");
            let _ = cfg.rotary_dim();
            Outcome::Accepted
        }
        Err(err) => Outcome::Rejected(format!("config: {}", short(&err.to_string()))),
    }
}
