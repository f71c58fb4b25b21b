//! libFuzzer target `config_json`: see `entry::config_json` for what it drives and what it checks.
#![no_main]

#[path = "../entry.rs"]
#[allow(dead_code)]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    entry::config_json(data);
});
