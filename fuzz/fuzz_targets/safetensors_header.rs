//! libFuzzer target `safetensors_header`: see `entry::safetensors_header` for what it drives and what it checks.
#![no_main]

#[path = "../entry.rs"]
#[allow(dead_code)]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    entry::safetensors_header(data);
});
