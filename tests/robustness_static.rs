//! Source gates for checklist items that are properties of the code rather than of a run
//! (reliability-security S3, S10, S11, 1d): they read `src/` and fail when a forbidden construct
//! appears, so a regression is caught in review rather than in production.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its path relative to the crate root.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    files.sort();
    assert!(files.len() > 10, "src/ not found");
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// Lines of code (comments dropped) that contain `needle`, as `file:line: text`.
fn hits(needle: &str, allowed: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (file, text) in sources() {
        if allowed.iter().any(|a| file.starts_with(a)) {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(needle) {
                found.push(format!("{file}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn no_shell_is_ever_spawned() {
    // S10: subprocesses (if any) take an argv vector, never a shell command line.
    for needle in [
        "\"sh\"",
        "\"bash\"",
        "\"/bin/sh\"",
        "\"-c\"",
        "sh -c",
        "bash -c",
    ] {
        let found = hits(needle, &[]);
        assert!(
            found.is_empty(),
            "shell use ({needle}):\n{}",
            found.join("\n")
        );
    }
}

#[test]
fn security_checks_are_never_debug_only() {
    // 1d (CVE-2026-41523 analogue): a check inside `debug_assert!` vanishes in release builds.
    let found = hits("debug_assert", &[]);
    assert!(
        found.is_empty(),
        "debug_assert in src/:\n{}",
        found.join("\n")
    );
}

#[test]
fn json_recursion_limit_is_never_disabled() {
    // S3: serde_json's 128-level recursion limit guards every parse of untrusted JSON.
    let found = hits("disable_recursion_limit", &[]);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn environment_is_read_only_by_the_binaries_and_config() {
    // S11: secrets and settings enter through one audited place.
    let found = hits("env::var", &["src/bin/", "src/config.rs"]);
    assert!(
        found.is_empty(),
        "environment read outside src/bin and src/config.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn secrets_are_exposed_only_where_they_are_sent() {
    // S11: `Secret::expose` is the raw value; each call site must be an HTTP header or a compare.
    // The allow-list names the files that send or compare a secret; a new call site elsewhere must
    // be reviewed and added here on purpose.
    let allowed = [
        "src/config.rs",
        "src/queue/client.rs",
        "src/queue/ping.rs",
        "src/hub/download.rs",
        "src/server/routes.rs",
        "src/server/settings.rs",
        "src/server/mod.rs", // digest of the key for the constant-time compare
    ];
    let found = hits(".expose()", &allowed);
    assert!(
        found.is_empty(),
        "Secret::expose outside the sending sites:\n{}",
        found.join("\n")
    );
}

#[test]
fn unsafe_code_stays_in_the_reviewed_places() {
    // 1h: no unsafe sharing of model or buffers; the few unsafe calls are system calls and mmap.
    let allowed = [
        "src/models/mod.rs", // mmap of read-only weight files
        // AVX-512 kernels: pointers into the packed weights and into disjoint output columns
        // (bounds and disjointness tested in its unit tests, including ragged shapes and threads).
        "src/models/cpu_matmul.rs",
        "src/models/cpu_matmul_q8.rs", // the same for the packed Q8_0 (VNNI) kernels
        // Its AVX-512 attention kernel after checking the CPU has AVX-512F: pointers into the
        // sequence's own cache rows (bounds checked per call; tested against an f64 reference).
        "src/models/cpu_attention.rs",
        // AVX-512 exp, SiLU-times-up and RMS norm with masked loads and stores inside each slice
        // (tails tested at widths that are not multiples of 16).
        "src/models/cpu_elementwise.rs",
        "src/hub/disk.rs",  // statvfs
        "src/hub/cache.rs", // flock
        "src/harness/",     // kill(2) of the worker under test
        "src/device.rs",    // cudarc driver probe
        "src/bin/wick.rs",  // signal handling
    ];
    let found = hits("unsafe {", &allowed);
    assert!(
        found.is_empty(),
        "unsafe outside the reviewed places:\n{}",
        found.join("\n")
    );
}
