//! libFuzzer target `openai_request`: see `entry::openai_request` for what it drives and what it checks.
#![no_main]

#[path = "../entry.rs"]
#[allow(dead_code)]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    entry::openai_request(data);
});
