//! Golden test: every fixture's `chat` case renders byte-identical to transformers' rendering, both
//! from `tokenizer_config.json` directly and through the loaded tokenizer.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use serde_json::Value;
use wick::hub::{ModelFiles, WeightFiles};
use wick::tokenizer::chat_template::{select_source, ChatTemplate};
use wick::tokenizer::Tokenizer;

const FAMILIES: [&str; 5] = [
    "tiny-llama",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-phi3",
    "tiny-gemma2",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The `chat` case: (messages, rendered prompt).
fn chat_case(name: &str) -> (Value, String) {
    let reference = read_json(fixture(name).join("reference_generations.json"));
    let cases = reference["cases"].as_array().unwrap();
    let chat = cases.iter().find(|c| c["name"] == "chat").unwrap();
    (
        chat["messages"].clone(),
        chat["prompt"].as_str().unwrap().to_string(),
    )
}

/// A special token's text: a plain string or an AddedToken object `{"content": ...}`.
fn token_text(value: &Value) -> Option<&str> {
    value
        .as_str()
        .or_else(|| value.get("content").and_then(Value::as_str))
}

#[test]
fn every_fixture_chat_case_renders_byte_identical_from_tokenizer_config() {
    for name in FAMILIES {
        let config = read_json(fixture(name).join("tokenizer_config.json"));
        let source = select_source(&config).unwrap();
        let template = ChatTemplate::new(source).unwrap();
        let (messages, expected) = chat_case(name);
        let rendered = template
            .render(
                &messages,
                true,
                token_text(&config["bos_token"]),
                token_text(&config["eos_token"]),
                None,
            )
            .unwrap();
        assert_eq!(rendered, expected, "{name}");
    }
}

#[test]
fn every_fixture_chat_case_renders_through_the_loaded_tokenizer() {
    for name in FAMILIES {
        let dir = fixture(name);
        let files = ModelFiles {
            config: Some(dir.join("config.json")),
            weights: WeightFiles::Safetensors(vec![dir.join("model.safetensors")]),
            tokenizer_json: Some(dir.join("tokenizer.json")),
            tokenizer_config: Some(dir.join("tokenizer_config.json")),
            generation_config: Some(dir.join("generation_config.json")),
        };
        let tokenizer = Tokenizer::from_files(&files, None).unwrap();
        let (messages, expected) = chat_case(name);
        assert_eq!(
            tokenizer.apply_chat_template(&messages, true).unwrap(),
            expected,
            "{name}"
        );
    }
}

#[test]
fn template_errors_surface_the_templates_own_message() {
    // Mistral's template refuses a conversation that does not alternate user/assistant.
    let config = read_json(fixture("tiny-mistral").join("tokenizer_config.json"));
    let template = ChatTemplate::new(select_source(&config).unwrap()).unwrap();
    let messages =
        serde_json::json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    let err = template
        .render(&messages, true, Some("<s>"), Some("</s>"), None)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Conversation roles must alternate"),
        "{err}"
    );
}

#[test]
fn qwen_template_renders_tools_with_python_json() {
    let config = read_json(fixture("tiny-qwen2").join("tokenizer_config.json"));
    let template = ChatTemplate::new(select_source(&config).unwrap()).unwrap();
    let messages = serde_json::json!([{"role": "user", "content": "weather?"}]);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let rendered = template
        .render(&messages, true, None, Some("<|im_end|>"), Some(&tools))
        .unwrap();
    // json.dumps(tool) with Python's separators, keys in the given order.
    assert!(
        rendered.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n</tools>"),
        "{rendered}"
    );
    assert!(
        rendered.ends_with("<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n"),
        "{rendered}"
    );
}

#[test]
fn the_largest_allowed_conversation_renders_within_the_fuel_budget() {
    // 1024 messages (the job limit) through the most complex fixture template.
    let config = read_json(fixture("tiny-qwen2").join("tokenizer_config.json"));
    let template = ChatTemplate::new(select_source(&config).unwrap()).unwrap();
    let messages: Vec<Value> = (0..wick::job::validate::MAX_MESSAGES)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            serde_json::json!({"role": role, "content": format!("message number {i} with a few words of text")})
        })
        .collect();
    let rendered = template
        .render(
            &Value::Array(messages),
            true,
            None,
            Some("<|im_end|>"),
            None,
        )
        .unwrap();
    assert!(rendered.contains("message number 1023"));
}

#[test]
fn a_chat_template_jinja_file_next_to_the_tokenizer_wins() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(file), dir.path().join(file)).unwrap();
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "J:{{ messages[0].content }}",
    )
    .unwrap();
    let files = ModelFiles {
        config: None,
        weights: WeightFiles::Safetensors(Vec::new()),
        tokenizer_json: Some(dir.path().join("tokenizer.json")),
        tokenizer_config: Some(dir.path().join("tokenizer_config.json")),
        generation_config: None,
    };
    let tokenizer = Tokenizer::from_files(&files, None).unwrap();
    let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
    assert_eq!(
        tokenizer.apply_chat_template(&messages, true).unwrap(),
        "J:hi"
    );
    // CUSTOM_CHAT_TEMPLATE still overrides everything.
    let custom = Tokenizer::from_files(&files, Some("C:{{ messages[0].content }}")).unwrap();
    assert_eq!(custom.apply_chat_template(&messages, true).unwrap(), "C:hi");
}
