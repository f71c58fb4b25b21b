//! libFuzzer target `chat_template`: see `entry::chat_template` for what it drives and what it checks.
#![no_main]

#[path = "../entry.rs"]
#[allow(dead_code)]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    entry::chat_template(data);
});
