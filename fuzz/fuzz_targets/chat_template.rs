//! libFuzzer target `chat_template`: see `entry::chat_template` for what it drives and what it checks.
#![no_main]

#[path = "../entry.rs"]
#[allow(dead_code)]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Finding F10 (docs/ROBUSTNESS.md): a template containing `{%}` panics in
    // `strip_generation_tags`. Reported and replayed by `open_findings_are_fixed`; skipped here so
    // fuzzing goes past it. Remove this line once F10 is fixed.
    if data.windows(3).any(|w| w == b"{%}") {
        return;
    }
    entry::chat_template(data);
});
