//! Chat templates: Hugging Face Jinja templates (from `tokenizer_config.json`, GGUF metadata or
//! `CUSTOM_CHAT_TEMPLATE`) rendered with minijinja the way transformers renders them.
//!
//! Owned here: choosing the template source, compiling it once, and rendering `messages` into a prompt
//! string with transformers' environment: `trim_blocks` + `lstrip_blocks`, Python string/dict methods
//! (minijinja-contrib pycompat), `raise_exception`, `strftime_now`, and a `tojson` that matches
//! Python's `json.dumps` (`", "`/`": "` separators, no HTML escaping, non-ASCII kept, `indent`).
//!
//! Safety: a template is only ever taken from the model files or the operator's configuration, never
//! from a request. It still runs with a fuel budget (bounds instructions and allocations), a recursion
//! limit and a cap on the rendered size, so a hostile template in a model repo cannot hang or exhaust
//! the worker. No loader is registered, so `include`/`import`/`extends` cannot read anything.
//! minijinja is the patched copy in `vendor/minijinja` (`WICK_PATCHES.md`): there fuel also covers
//! list growth (`+`, `*`, `sum`, `chain`) and every walk over a value (printing, comparing,
//! serializing), which upstream 3.1.0 charged only after the fact (finding F1). The filters and
//! methods defined here (`tojson`, `str.join`, `list.count`) charge fuel per item themselves.

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::TokenizerError;

/// Fuel for one render: minijinja charges about one unit per instruction and per 64 bytes allocated,
/// so this bounds a render to roughly a million steps and tens of MiB. Real templates with hundreds of
/// messages and tool schemas use a few tens of thousands.
const RENDER_FUEL: u64 = 1_000_000;

/// Nesting limit for template recursion (macros, nested loops). minijinja's own default is 500.
const RECURSION_LIMIT: usize = 100;

/// Largest rendered prompt, in bytes.
const MAX_RENDERED_BYTES: usize = 16 * 1024 * 1024;

/// Largest `indent` the `tojson` filter accepts (Python accepts any; we bound the output).
const MAX_TOJSON_INDENT: usize = 64;

/// Deepest nesting `tojson` writes (request JSON is at most 64 deep).
const MAX_TOJSON_DEPTH: usize = 128;

/// Longest template error message kept (a template can put anything in `raise_exception`).
const MAX_ERROR_MESSAGE_BYTES: usize = 2048;

/// Name of the one template registered in a [`ChatTemplate`]'s environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Picks the chat template source from a parsed `tokenizer_config.json`: `chat_template` as a string,
/// or, when it is a list of `{name, template}` entries, the one named `default` (else the first).
/// Returns `None` when the config has no usable template.
pub fn select_source(tokenizer_config: &serde_json::Value) -> Option<String> {
    match tokenizer_config.get("chat_template")? {
        serde_json::Value::String(source) if !source.trim().is_empty() => Some(source.clone()),
        serde_json::Value::Array(entries) => {
            let template_of = |entry: &serde_json::Value| {
                entry
                    .get("template")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            };
            entries
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(template_of)
                .or_else(|| entries.iter().find_map(template_of))
        }
        _ => None,
    }
}

/// Largest template file read from disk (`chat_template.jinja` / `chat_template.json`).
const MAX_TEMPLATE_FILE_BYTES: u64 = 1024 * 1024;

/// Finds a model's chat template the way transformers does: a `chat_template.jinja` file in the model
/// directory wins, then `chat_template.json` (its `chat_template` entry), then `tokenizer_config.json`
/// ([`select_source`]). Newer Hub repos keep the template only in `chat_template.jinja`.
///
/// # Errors
/// [`TokenizerError::Load`] when a template file exists but cannot be read, is larger than 1 MiB or
/// (for `chat_template.json`) is not JSON.
pub fn find_source(
    model_dir: Option<&std::path::Path>,
    tokenizer_config: Option<&serde_json::Value>,
) -> Result<Option<String>, TokenizerError> {
    if let Some(dir) = model_dir {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = read_template_file(&jinja)?;
            if !source.trim().is_empty() {
                return Ok(Some(source));
            }
        }
        let json = dir.join("chat_template.json");
        if json.is_file() {
            let text = read_template_file(&json)?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| TokenizerError::Load(format!("chat_template.json: {e}")))?;
            if let Some(source) = select_source(&value) {
                return Ok(Some(source));
            }
        }
    }
    Ok(tokenizer_config.and_then(select_source))
}

fn read_template_file(path: &std::path::Path) -> Result<String, TokenizerError> {
    use std::io::Read;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file =
        std::fs::File::open(path).map_err(|e| TokenizerError::Load(format!("{name}: {e}")))?;
    let mut text = String::new();
    file.take(MAX_TEMPLATE_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| TokenizerError::Load(format!("{name}: {e}")))?;
    if text.len() as u64 > MAX_TEMPLATE_FILE_BYTES {
        return Err(TokenizerError::Load(format!(
            "{name} is larger than {MAX_TEMPLATE_FILE_BYTES} bytes"
        )));
    }
    Ok(text)
}

/// A compiled chat template. Compile once per model; rendering is `&self` and thread-safe.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_bytes", &self.source().len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles a template source.
    ///
    /// # Errors
    /// [`TokenizerError::Template`] when the source does not parse.
    pub fn new(source: String) -> Result<ChatTemplate, TokenizerError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(unknown_method);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        // Prompts are not HTML: never escape.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let source = strip_generation_tags(&source);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(template_error)?;
        Ok(ChatTemplate { env, source })
    }

    /// The (preprocessed) template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a JSON array of `{role, content, ...}`) into a prompt string, as
    /// transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    /// `bos_token`/`eos_token` are left undefined when `None` (as transformers does for missing special
    /// tokens); `tools` is passed only when given.
    ///
    /// # Errors
    /// [`TokenizerError::Template`] when the template raises (`raise_exception`), fails, runs out of
    /// fuel, or renders more than 16 MiB.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, TokenizerError> {
        self.render_with(&RenderContext {
            messages,
            add_generation_prompt,
            bos_token,
            eos_token,
            tools,
            enable_thinking: None,
        })
    }

    /// [`ChatTemplate::render`] with every supported context variable.
    ///
    /// # Errors
    /// As [`ChatTemplate::render`].
    pub fn render_with(&self, ctx: &RenderContext<'_>) -> Result<String, TokenizerError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let mut vars: Vec<(&str, Value)> = vec![
            ("messages", Value::from(Serde(ctx.messages))),
            (
                "add_generation_prompt",
                Value::from(ctx.add_generation_prompt),
            ),
        ];
        if let Some(bos) = ctx.bos_token {
            vars.push(("bos_token", Value::from(bos)));
        }
        if let Some(eos) = ctx.eos_token {
            vars.push(("eos_token", Value::from(eos)));
        }
        if let Some(tools) = ctx.tools {
            vars.push(("tools", Value::from(Serde(tools))));
        }
        if let Some(enable_thinking) = ctx.enable_thinking {
            vars.push(("enable_thinking", Value::from(enable_thinking)));
        }
        let context: Value = vars
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        let rendered = template.render(context).map_err(template_error)?;
        if rendered.len() > MAX_RENDERED_BYTES {
            return Err(TokenizerError::Template(format!(
                "rendered prompt is {} bytes, more than the {MAX_RENDERED_BYTES}-byte limit",
                rendered.len()
            )));
        }
        Ok(rendered)
    }
}

/// Everything a chat template can see. Built by the caller; nothing here comes from a request except
/// `messages`, `tools` and the allow-listed `enable_thinking` switch.
#[derive(Debug, Clone, Copy)]
pub struct RenderContext<'a> {
    /// The conversation: a JSON array of `{role, content, ...}` objects.
    pub messages: &'a serde_json::Value,
    /// Append the assistant turn header.
    pub add_generation_prompt: bool,
    /// BOS token text (undefined in the template when `None`).
    pub bos_token: Option<&'a str>,
    /// EOS token text (undefined in the template when `None`).
    pub eos_token: Option<&'a str>,
    /// OpenAI `tools` list (undefined in the template when `None`).
    pub tools: Option<&'a serde_json::Value>,
    /// Qwen3-style thinking switch (undefined in the template when `None`).
    pub enable_thinking: Option<bool>,
}

impl crate::tokenizer::Tokenizer {
    /// Renders `messages` with this model's chat template and its BOS/EOS token text.
    ///
    /// # Errors
    /// [`TokenizerError::NoChatTemplate`] when the model has none; [`TokenizerError::Template`] when
    /// rendering fails.
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        template.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
            None,
        )
    }
}

/// Formats a minijinja error with its cause chain (e.g. the `raise_exception` message), cut to
/// [`MAX_ERROR_MESSAGE_BYTES`]: the message can quote any value the template made.
fn template_error(err: Error) -> TokenizerError {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if message.len() > MAX_ERROR_MESSAGE_BYTES {
        let total = message.len();
        let mut cut = MAX_ERROR_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(&format!("... ({total} bytes in all)"));
    }
    TokenizerError::Template(message)
}

/// Python methods on values (`s.strip()`, `d.items()`, ...) through minijinja-contrib's pycompat,
/// except `str.join` and `list.count`, which are done here with fuel: pycompat's `join` charges the
/// separators but not the items, so `''.join([big] * n)` grew without bound before the result was
/// charged, and its `count` visits every item for free (a loop of `l.count(x)` over a long list ran
/// for hours).
fn unknown_method(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    match (method, value.kind()) {
        ("join", ValueKind::String) => {
            return py_str_join(state, value.as_str().unwrap_or_default(), args)
        }
        ("count", ValueKind::Seq) => return py_list_count(state, value, args),
        _ => {}
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `list.count(x)`: one fuel per item compared.
fn py_list_count(state: &minijinja::State, list: &Value, args: &[Value]) -> Result<Value, Error> {
    let (what,): (&Value,) = minijinja::value::from_args(args)?;
    let mut count = 0u64;
    for item in list.try_iter()? {
        state.consume_fuel(1)?;
        if item == *what {
            count += 1;
        }
    }
    Ok(Value::from(count))
}

/// `separator.join(items)`: one fuel per item, refused once the result would pass
/// [`MAX_RENDERED_BYTES`] (it could not be part of a prompt anyway).
fn py_str_join(state: &minijinja::State, separator: &str, args: &[Value]) -> Result<Value, Error> {
    let (items,): (&Value,) = minijinja::value::from_args(args)?;
    let mut out = String::new();
    for (index, item) in items.try_iter()?.enumerate() {
        state.consume_fuel(1)?;
        let text = match item.as_str() {
            Some(text) => std::borrow::Cow::Borrowed(text),
            None => std::borrow::Cow::Owned(item.to_string()),
        };
        let separator = if index > 0 { separator } else { "" };
        if out.len() + separator.len() + text.len() > MAX_RENDERED_BYTES {
            return Err(too_large("str.join"));
        }
        out.push_str(separator);
        out.push_str(&text);
    }
    Ok(Value::from(out))
}

fn too_large(what: &str) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("{what}: result larger than the {MAX_RENDERED_BYTES}-byte prompt limit"),
    )
}

/// Removes the `{% generation %}` / `{% endgeneration %}` markers some templates carry for
/// transformers' assistant-mask feature; they produce no output.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        // The closing `%}` is searched after the opening `{%`, so `{%}` (overlapping markers) is
        // not a tag and is left for minijinja to reject.
        let body_start = start + 2;
        let Some(body_len) = rest[body_start..].find("%}") else {
            break;
        };
        let tag_end = body_start + body_len + 2;
        let inner = rest[body_start..body_start + body_len]
            .trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[start..tag_end]);
        }
        rest = &rest[tag_end..];
    }
    out.push_str(rest);
    out
}

/// `raise_exception(message)`: fails the render with the template's own message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time formatted with C `strftime` directives
/// (`%d %b %Y` as Llama 3.1 uses, and the other common ones).
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(format_utc(&format, secs)))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Civil date from days since 1970-01-01 (proleptic Gregorian; H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats `secs` since the epoch (UTC) with `strftime` directives; unknown directives are kept as is.
fn format_utc(format: &str, secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let secs_of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
    );
    let weekday = WEEKDAYS[((days + 3).rem_euclid(7)) as usize]; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let day_of_year = days - days_from_civil_year_start(year) + 1;
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d` (no padding) is common in templates; Python on Linux supports it.
        let mut directive = chars.next();
        let unpadded = directive == Some('-');
        if unpadded {
            directive = chars.next();
        }
        let number = |value: u64, width: usize| {
            if unpadded {
                value.to_string()
            } else {
                format!("{value:0width$}")
            }
        };
        let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        match directive {
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('d') => out.push_str(&number(u64::from(day), 2)),
            Some('e') if unpadded => out.push_str(&day.to_string()),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('m') => out.push_str(&number(u64::from(month), 2)),
            Some('y') => out.push_str(&number(year.rem_euclid(100) as u64, 2)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('H') => out.push_str(&number(hour, 2)),
            Some('I') => out.push_str(&number(hour12, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&number(minute, 2)),
            Some('S') => out.push_str(&number(second, 2)),
            Some('j') => out.push_str(&number(day_of_year as u64, 3)),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days from 1970-01-01 to January 1st of `year`.
fn days_from_civil_year_start(year: i64) -> i64 {
    let y = year - 1;
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    // Days to March 1st of `year - 1` plus March..December of that year (306 days).
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + 306;
    era * 146_097 + doe - 719_468
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent)`.
/// Accepts (and honours) `indent`, `sort_keys`, `ensure_ascii` and `separators` keyword arguments.
fn tojson(state: &minijinja::State, value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: `indent` must be an integer",
                    )
                })?;
                Some(" ".repeat(n.clamp(0, MAX_TOJSON_INDENT as i64) as usize))
            }
            ValueKind::String => Some(
                v.as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(MAX_TOJSON_INDENT)
                    .collect(),
            ),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: `indent` must be an integer or a string",
                ))
            }
        },
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(seps) if seps.len() == 2 => (seps[0].clone(), seps[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: `separators` must be a pair",
            ))
        }
        // Python: with an indent, the item separator drops its trailing space.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = PyJsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    write_py_value(state, &value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Writes a template value as Python's `json.dumps` would, straight from the value (no JSON copy
/// of it first). Values can share structure (`[x, x]` doubled in a loop is small in memory but huge
/// when written), so every container item written costs fuel of the render, and the output is
/// refused past [`MAX_RENDERED_BYTES`] and nesting past [`MAX_TOJSON_DEPTH`], checked as it is
/// written.
fn write_py_value(
    state: &minijinja::State,
    value: &Value,
    style: &PyJsonStyle,
    level: usize,
    out: &mut String,
) -> Result<(), Error> {
    if out.len() > MAX_RENDERED_BYTES {
        return Err(too_large("tojson"));
    }
    if level > MAX_TOJSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: value nested more than {MAX_TOJSON_DEPTH} levels deep"),
        ));
    }
    match value.kind() {
        ValueKind::String => write_py_string(value.as_str().unwrap_or_default(), style, out),
        // As minijinja serializes them: plain objects as their string form.
        ValueKind::Plain => write_py_string(&value.to_string(), style, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let mut items = value.try_iter()?.peekable();
            if items.peek().is_none() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                write_newline_indent(style, level + 1, out);
                state.consume_fuel(1)?;
                write_py_value(state, &item, style, level + 1, out)?;
            }
            write_newline_indent(style, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            // A map entry costs two fuel: its key is looked up again and written (or copied out to
            // be sorted).
            let mut entries = Vec::new();
            let mut written = 0usize;
            for key in value.try_iter()? {
                state.consume_fuel(2)?;
                let item = value.get_item(&key)?;
                if style.sort_keys {
                    entries.push((py_json_key(&key)?, item));
                    continue;
                }
                let entry = PyEntry { level, written };
                match key.as_str() {
                    Some(text) => entry.write(state, text, &item, style, out)?,
                    None => entry.write(state, &py_json_key(&key)?, &item, style, out)?,
                }
                written += 1;
            }
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (key, item) in &entries {
                PyEntry { level, written }.write(state, key, item, style, out)?;
                written += 1;
            }
            if written == 0 {
                out.push_str("{}");
                return Ok(());
            }
            write_newline_indent(style, level, out);
            out.push('}');
        }
        // Scalars (and bytes) as serde_json writes them, which is what Python prints.
        _ => {
            let json = serde_json::to_value(value).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize value: {e}"),
                )
            })?;
            write_py_json(&json, style, level, out);
        }
    }
    Ok(())
}

/// A map key as JSON writes it: strings as they are, numbers and booleans as text (as Python does).
/// One `key: value` entry of a dict at `level`, after `written` entries (the first opens the dict).
struct PyEntry {
    level: usize,
    written: usize,
}

impl PyEntry {
    fn write(
        &self,
        state: &minijinja::State,
        key: &str,
        item: &Value,
        style: &PyJsonStyle,
        out: &mut String,
    ) -> Result<(), Error> {
        if self.written == 0 {
            out.push('{');
        } else {
            out.push_str(&style.item_sep);
        }
        write_newline_indent(style, self.level + 1, out);
        write_py_string(key, style, out);
        out.push_str(&style.key_sep);
        write_py_value(state, item, style, self.level + 1, out)
    }
}

fn py_json_key(key: &Value) -> Result<String, Error> {
    if let Some(text) = key.as_str() {
        return Ok(text.to_string());
    }
    match serde_json::to_value(key) {
        Ok(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Ok(serde_json::Value::Bool(b)) => Ok(b.to_string()),
        Ok(serde_json::Value::Null) => Ok("null".to_string()),
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "tojson: keys must be str, int, float, bool or None, not {}",
                key.kind()
            ),
        )),
    }
}

/// How Python's `json.dumps` lays out its output.
struct PyJsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_newline_indent(style: &PyJsonStyle, level: usize, out: &mut String) {
    if let Some(indent) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn write_py_string(s: &str, style: &PyJsonStyle, out: &mut String) {
    let ensure_ascii = style.ensure_ascii;
    // serde_json escapes exactly what Python escapes with ensure_ascii=False: `"`, `\`, and control
    // characters (\b \f \n \r \t by name, the rest as \u00XX).
    let escaped = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    if !ensure_ascii {
        out.push_str(&escaped);
        return;
    }
    for c in escaped.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

fn write_py_json(value: &serde_json::Value, style: &PyJsonStyle, level: usize, out: &mut String) {
    match value {
        serde_json::Value::Null => out.push_str("null"),
        serde_json::Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        serde_json::Value::Number(n) => match n.as_f64() {
            // Python prints integral floats as `1.0`; serde_json keeps the float/int distinction too.
            Some(f) if n.is_f64() && f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => {
                out.push_str(&format!("{f:.1}"))
            }
            _ => out.push_str(&n.to_string()),
        },
        serde_json::Value::String(s) => write_py_string(s, style, out),
        serde_json::Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                write_newline_indent(style, level + 1, out);
                write_py_json(item, style, level + 1, out);
            }
            write_newline_indent(style, level, out);
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                write_newline_indent(style, level + 1, out);
                write_py_string(key, style, out);
                out.push_str(&style.key_sep);
                write_py_json(item, style, level + 1, out);
            }
            write_newline_indent(style, level, out);
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overlapping_block_markers_are_an_error_not_a_panic() {
        // `{%}`: the `%}` overlaps the `{%` (fuzzer finding F10).
        for source in ["{%}", "a{%}b", "{%}{% generation %}", "{%-}", "{%%}"] {
            assert!(
                matches!(
                    ChatTemplate::new(source.to_string()),
                    Err(TokenizerError::Template(_))
                ),
                "{source:?} must be refused"
            );
        }
        assert_eq!(strip_generation_tags("x{%}y"), "x{%}y");
        assert_eq!(
            strip_generation_tags("{% generation %}a{%- endgeneration -%}"),
            "a"
        );
    }

    fn render(source: &str, messages: serde_json::Value) -> Result<String, TokenizerError> {
        ChatTemplate::new(source.to_string())?.render(
            &messages,
            true,
            Some("<s>"),
            Some("</s>"),
            None,
        )
    }

    #[test]
    fn select_source_takes_string_or_default_entry() {
        assert_eq!(
            select_source(&json!({"chat_template": "x"})).as_deref(),
            Some("x")
        );
        let list = json!({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]});
        assert_eq!(select_source(&list).as_deref(), Some("d"));
        assert_eq!(
            select_source(&json!({"chat_template": [{"name": "rag", "template": "r"}]})).as_deref(),
            Some("r")
        );
        assert_eq!(select_source(&json!({"bos_token": "<s>"})), None);
        assert_eq!(select_source(&json!({"chat_template": ""})), None);
    }

    #[test]
    fn find_source_prefers_jinja_then_json_then_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"chat_template": "from-config"});
        assert_eq!(
            find_source(Some(dir.path()), Some(&config))
                .unwrap()
                .as_deref(),
            Some("from-config")
        );
        assert_eq!(find_source(None, None).unwrap(), None);
        std::fs::write(
            dir.path().join("chat_template.json"),
            r#"{"chat_template": "from-json"}"#,
        )
        .unwrap();
        assert_eq!(
            find_source(Some(dir.path()), Some(&config))
                .unwrap()
                .as_deref(),
            Some("from-json")
        );
        std::fs::write(dir.path().join("chat_template.jinja"), "from-jinja").unwrap();
        assert_eq!(
            find_source(Some(dir.path()), Some(&config))
                .unwrap()
                .as_deref(),
            Some("from-jinja")
        );
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "x".repeat(2 * 1024 * 1024),
        )
        .unwrap();
        assert!(matches!(
            find_source(Some(dir.path()), None),
            Err(TokenizerError::Load(_))
        ));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ 'a<b&c\"é' | tojson }}|{{ 1.0 | tojson }}";
        let out = render(src, json!([{"b": [1, 2.5, true, null], "a": "x"}])).unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.5, true, null], \"a\": \"x\"}|{\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"a\": \"x\"\n}|\"a<b&c\\\"é\"|1.0"
        );
        let out = render(
            "{{ messages[0] | tojson(ensure_ascii=true, sort_keys=true) }}",
            json!([{"b": "é", "a": 1}]),
        )
        .unwrap();
        assert_eq!(out, "{\"a\": 1, \"b\": \"\\u00e9\"}");
    }

    #[test]
    fn values_print_as_python_jinja2_prints_them() {
        let src = "{{ none }}|{{ true }}|{{ messages[0].x }}|{{ [1, 'a', none] }}|{{ 1.0 }}";
        let out = render(src, json!([{"x": null}])).unwrap();
        assert_eq!(out, "None|True|None|[1, 'a', None]|1.0");
    }

    #[test]
    fn raise_exception_surfaces_the_template_message() {
        let err = render("{{ raise_exception('roles must alternate') }}", json!([])).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn trim_and_lstrip_blocks_match_transformers() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n    {% endif %}\n{% endfor %}";
        let out = render(src, json!([{"role": "user", "content": " hi "}])).unwrap();
        assert_eq!(out, "[hi]\n");
    }

    #[test]
    fn infinite_loops_run_out_of_fuel() {
        let src = "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}";
        let err = render(src, json!([])).unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)));
    }

    /// A `/proc/self/status` memory field (`VmRSS:`, `VmHWM:`) in KiB.
    fn proc_status_kib(name: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn doubling_a_list_is_refused_for_fuel_before_memory_grows() {
        // F1: `s.v + s.v` 64 times is 2^64 items. minijinja 3.1 built it lazily and materialized it
        // without charging fuel; the patched copy ensures fuel for the result length first.
        let src = "{% set s = namespace(v=[1]) %}{% for i in range(64) %}{% set s.v = s.v + s.v %}{% endfor %}{{ s.v | length }}";
        let before = proc_status_kib("VmRSS:");
        // Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS; without it, compare
        // the RSS after the render.
        let peak_field = if std::fs::write("/proc/self/clear_refs", "5").is_ok() {
            "VmHWM:"
        } else {
            "VmRSS:"
        };
        let err = render(src, json!([])).unwrap_err();
        let grown_mib = proc_status_kib(peak_field).saturating_sub(before) / 1024;
        assert!(
            matches!(&err, TokenizerError::Template(m) if m.contains("fuel")),
            "{err}"
        );
        // A process-wide figure (other tests run alongside); unpatched, this grew until the
        // allocator failed.
        assert!(grown_mib < 200, "resident memory grew by {grown_mib} MiB");
    }

    #[test]
    fn shared_structure_is_refused_when_walked() {
        // `[x, x]` doubled 64 times is small in memory and 2^64 leaves when printed, compared or
        // serialized.
        let dag = "{% set s = namespace(v=[1], w=[1]) %}{% for i in range(64) %}{% set s.v = [s.v, s.v] %}{% set s.w = [s.w, s.w] %}{% endfor %}";
        for (tail, needle) in [
            ("{{ s.v }}", "fuel"),
            ("{{ s.v ~ '' }}", "fuel"),
            ("{{ s.v == s.w }}", "fuel"),
            ("{{ s.v | tojson(indent=64) }}", "prompt limit"),
            ("{{ ''.join(s.v) }}", "fuel"),
        ] {
            let err = render(&format!("{dag}{tail}"), json!([])).unwrap_err();
            assert!(err.to_string().contains(needle), "{tail}: {err}");
        }
    }

    #[test]
    fn values_nested_deeper_than_any_stack_are_dropped_and_refused_when_walked() {
        // 100,000 nested lists: dropping, printing or serializing them used to recurse once per
        // level and overflow the stack (this test thread has the default 2 MiB).
        let build = "{% set s = namespace(v=[1]) %}{% for i in range(100000) %}{% set s.v = [s.v] %}{% endfor %}";
        assert_eq!(
            render(&format!("{build}{{{{ s.v | length }}}}"), json!([])).unwrap(),
            "1"
        );
        for tail in ["{{ s.v }}", "{{ s.v | tojson }}", "{{ s.v == [s.v] }}"] {
            assert!(
                render(&format!("{build}{tail}"), json!([])).is_err(),
                "{tail}"
            );
        }
    }

    #[test]
    fn python_join_count_and_tojson_keep_their_results_and_bound_them() {
        assert_eq!(
            render(
                "{{ ', '.join(['a', 'b', 1]) }}|{{ {1: 2, 'x': [true, none, 1.5]} | tojson }}",
                json!([])
            )
            .unwrap(),
            "a, b, 1|{\"1\": 2, \"x\": [true, null, 1.5]}"
        );
        assert_eq!(
            render("{{ [1, 2, 1, [1]].count(1) }}", json!([])).unwrap(),
            "2"
        );
        // Python: json.dumps(..., separators=(';', '=')) and (sort_keys=True, indent=1).
        assert_eq!(
            render(
                "{{ {'a': 1, 'b': [1, 2]} | tojson(separators=[';', '=']) }}|{{ {'b': 1, 'a': {}} | tojson(sort_keys=true, indent=1) }}|{{ {} | tojson }}",
                json!([])
            )
            .unwrap(),
            "{\"a\"=1;\"b\"=[1;2]}|{\n \"a\": {},\n \"b\": 1\n}|{}"
        );
        let err = render(
            "{% set l = [0] * 100000 %}{% for i in range(100000) %}{{ l.count(1) }}{% endfor %}",
            json!([]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
        let err = render("{{ ''.join([('x' * 100000)] * 1000) }}", json!([])).unwrap_err();
        assert!(err.to_string().contains("prompt limit"), "{err}");
    }

    #[test]
    fn template_error_messages_are_cut() {
        let err = render("{{ raise_exception('x' * 100000) }}", json!([])).unwrap_err();
        let message = err.to_string();
        assert!(
            message.len() < MAX_ERROR_MESSAGE_BYTES + 200,
            "{} bytes",
            message.len()
        );
        assert!(message.contains("bytes in all"), "{message}");
    }

    #[test]
    fn deep_recursion_is_refused() {
        let src = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        assert!(render(src, json!([])).is_err());
    }

    #[test]
    fn no_loader_means_include_fails() {
        assert!(render("{% include '/etc/passwd' %}", json!([])).is_err());
    }

    #[test]
    fn generation_tags_are_stripped() {
        let out = render(
            "{% generation %}{{ messages[0].content }}{%- endgeneration -%}",
            json!([{"content": "a"}]),
        )
        .unwrap();
        assert_eq!(out, "a");
    }

    #[test]
    fn undefined_bos_token_renders_empty() {
        let t =
            ChatTemplate::new("[{{ bos_token }}]{% if bos_token is defined %}x{% endif %}".into())
                .unwrap();
        assert_eq!(t.render(&json!([]), false, None, None, None).unwrap(), "[]");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-23 12:34:56 UTC, a Tuesday, day 205 of a leap year.
        let secs = 1_721_738_096;
        assert_eq!(format_utc("%d %b %Y", secs), "23 Jul 2024");
        assert_eq!(
            format_utc("%A %B %e %H:%M:%S %j %y %% %q", secs),
            "Tuesday July 23 12:34:56 205 24 % %q"
        );
        assert_eq!(format_utc("%F %T", 0), "1970-01-01 00:00:00");
        // 2024-03-05 04:07:09 UTC.
        assert_eq!(
            format_utc("%-d %-m %-H:%-M:%-S %-j %e|%-e", 1_709_611_629),
            "5 3 4:7:9 65  5|5"
        );
        assert!(render("{{ strftime_now('%Y') }}", json!([]))
            .unwrap()
            .starts_with("20"));
    }
}
