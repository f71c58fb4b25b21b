//! libFuzzer target `job_input`: see `entry::job_input` for what it drives and what it checks.
#![no_main]

#[path = "../entry.rs"]
#[allow(dead_code)]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    entry::job_input(data);
});
