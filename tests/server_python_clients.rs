//! The official `openai` (and `runpod`, when it installs) Python clients, unchanged, against the dev
//! server on loopback. The clients live in a venv cached under the target directory, so reruns are
//! fast. Skipped, with a message, only where `python3` is missing or pip cannot reach its registry.
#![allow(clippy::unwrap_used)]

mod server_support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use server_support::*;
use tokio::process::Command;

/// Longest pip may take for one package.
const PIP_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest the client script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// pip output that means the registry cannot be reached (offline CI), not a broken install.
const OFFLINE_SIGNS: &[&str] = &[
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Could not fetch URL",
    "No matching distribution found",
    "ProxyError",
    "ConnectTimeoutError",
    "Read timed out",
];

/// `<target>/py-clients-venv`, found from this test binary's path (`<target>/<profile>/deps/<bin>`).
fn venv_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binaries live in <target>/<profile>/deps");
    target.join("py-clients-venv")
}

async fn run(command: &mut Command, limit: Duration) -> Output {
    command.kill_on_drop(true);
    tokio::time::timeout(limit, command.output())
        .await
        .expect("command within its time limit")
        .unwrap()
}

enum Install {
    Ready,
    Offline(String),
    Failed(String),
}

/// Installs `package` into the venv unless a marker says it is there.
async fn pip_install(venv: &Path, package: &str) -> Install {
    let marker = venv.join(format!(".installed-{package}"));
    if marker.exists() {
        return Install::Ready;
    }
    let output = run(
        Command::new(venv.join("bin/python")).args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
            package,
        ]),
        PIP_TIMEOUT,
    )
    .await;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        std::fs::write(&marker, b"").unwrap();
        Install::Ready
    } else if OFFLINE_SIGNS.iter().any(|sign| log.contains(sign)) {
        Install::Offline(log)
    } else {
        Install::Failed(log)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_clients_drive_the_server() {
    let python = "python3";
    let probe = Command::new(python)
        .arg("--version")
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(30), probe).await {
        Ok(Ok(output)) if output.status.success() => {}
        _ => {
            eprintln!("SKIPPED official_python_clients_drive_the_server: python3 is not available");
            return;
        }
    }
    let venv = venv_dir();
    if !venv.join("bin/python").exists() {
        let output = run(
            Command::new(python).args(["-m", "venv"]).arg(&venv),
            PIP_TIMEOUT,
        )
        .await;
        if !output.status.success() {
            // python3 without the venv module counts as python missing for this test.
            eprintln!(
                "SKIPPED official_python_clients_drive_the_server: `python3 -m venv` failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            return;
        }
    }
    match pip_install(&venv, "openai").await {
        Install::Ready => {}
        Install::Offline(log) => {
            eprintln!("SKIPPED official_python_clients_drive_the_server: pip cannot reach its registry:\n{log}");
            return;
        }
        Install::Failed(log) => panic!("pip install openai failed:\n{log}"),
    }
    match pip_install(&venv, "runpod").await {
        Install::Ready => {}
        Install::Offline(log) | Install::Failed(log) => {
            eprintln!("runpod client not installed; its part of the test is skipped:\n{log}");
        }
    }

    let key = "python-client-key";
    let server = TestServer::start(Options {
        api_key: Some(key),
        ..Options::default()
    })
    .await;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client/check_clients.py");
    let output = run(
        Command::new(venv.join("bin/python"))
            .arg(&script)
            .env("TEST_BASE_URL", &server.base)
            .env("TEST_API_KEY", key)
            .env("TEST_MODEL", "tiny-llama")
            .env("RUNPOD_ENDPOINT_BASE_URL", format!("{}/v2", server.base))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost"),
        SCRIPT_TIMEOUT,
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "the client script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("openai client: OK"), "{stdout}");
    server.stop().await;
}
