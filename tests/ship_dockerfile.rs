//! Static checks of `docker/Dockerfile` and `.dockerignore` (Docker cannot run on the CI machines):
//! the CUDA build stage compiles `--no-default-features --features cuda` for a given
//! `CUDA_COMPUTE_CAP`, the image runs on a CUDA runtime base as a non-root user with wick as PID 1
//! (exec-form entrypoint, so SIGTERM reaches it), no secret is ever an `ARG` or `ENV`, and every
//! path the Dockerfile copies from the repository exists. `scripts/check-dockerfile` runs this file.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One Dockerfile instruction, continuation lines joined and comments dropped.
#[derive(Debug, Clone)]
struct Instruction {
    /// Upper-cased keyword (`FROM`, `RUN`, ...).
    keyword: String,
    /// Everything after the keyword, trimmed.
    args: String,
    /// 1-based line where the instruction starts.
    line: usize,
}

/// A build stage: its base (an image or an earlier stage), optional name, and instructions.
#[derive(Debug, Clone)]
struct Stage {
    base: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

fn parse_instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        // Comment lines are dropped, also in the middle of a continued instruction (as Docker does);
        // `# syntax=` parser directives are comments for our purposes.
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (start, mut buffer) = current.take().unwrap_or((index + 1, String::new()));
        let continued = trimmed.ends_with('\\');
        buffer.push_str(trimmed.trim_end_matches('\\').trim_end());
        buffer.push(' ');
        if continued {
            current = Some((start, buffer));
        } else {
            let joined = buffer.trim().to_string();
            if joined.is_empty() {
                continue;
            }
            let (keyword, args) = joined
                .split_once(char::is_whitespace)
                .unwrap_or((&joined, ""));
            out.push(Instruction {
                keyword: keyword.to_ascii_uppercase(),
                args: args.trim().to_string(),
                line: start,
            });
        }
    }
    assert!(
        current.is_none(),
        "Dockerfile ends inside a continued instruction"
    );
    out
}

/// Splits into global `ARG`s (before the first `FROM`) and stages.
fn parse_stages(text: &str) -> (Vec<Instruction>, Vec<Stage>) {
    let mut globals = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in parse_instructions(text) {
        if instruction.keyword == "FROM" {
            let words: Vec<&str> = instruction
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                other => panic!("line {}: cannot read FROM {other:?}", instruction.line),
            };
            stages.push(Stage {
                base: words[0].to_string(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(instruction);
        } else {
            assert_eq!(
                instruction.keyword, "ARG",
                "line {}: only ARG may precede the first FROM",
                instruction.line
            );
            globals.push(instruction);
        }
    }
    (globals, stages)
}

struct Dockerfile {
    globals: Vec<Instruction>,
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn load() -> Self {
        let path = repo_root().join("docker/Dockerfile");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (globals, stages) = parse_stages(&text);
        assert!(!stages.is_empty(), "no FROM in docker/Dockerfile");
        Dockerfile { globals, stages }
    }

    fn stage_named(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name.as_deref() == Some(name))
    }

    /// Global ARG defaults, to resolve `${CUDA_VERSION}`-style image references.
    fn global_defaults(&self) -> HashMap<String, String> {
        self.globals
            .iter()
            .filter_map(|i| {
                i.args
                    .split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect()
    }

    /// The image a stage finally builds on, following `FROM <earlier stage>` links, with global
    /// ARG defaults substituted.
    fn root_image(&self, stage: &Stage) -> String {
        let mut base = stage.base.clone();
        let mut hops = 0;
        while let Some(parent) = self.stage_named(&base) {
            base = parent.base.clone();
            hops += 1;
            assert!(hops < 32, "FROM cycle");
        }
        let mut image = base;
        for (key, value) in self.global_defaults() {
            image = image
                .replace(&format!("${{{key}}}"), &value)
                .replace(&format!("${key}"), &value);
        }
        image
    }

    /// The chain of stages from the root-most ancestor down to `stage`.
    fn lineage<'a>(&'a self, stage: &'a Stage) -> Vec<&'a Stage> {
        let mut chain = vec![stage];
        let mut base = &stage.base;
        while let Some(parent) = self.stage_named(base) {
            chain.push(parent);
            base = &parent.base;
            assert!(chain.len() < 32, "FROM cycle");
        }
        chain.reverse();
        chain
    }

    /// Stages that define or inherit an ENTRYPOINT, plus the last stage (the default target).
    fn runnable_stages(&self) -> Vec<&Stage> {
        let last = self.stages.last().unwrap();
        self.stages
            .iter()
            .filter(|s| {
                std::ptr::eq(*s, last)
                    || self
                        .lineage(s)
                        .iter()
                        .any(|st| st.instructions.iter().any(|i| i.keyword == "ENTRYPOINT"))
            })
            .collect()
    }
}

fn all_instructions(dockerfile: &Dockerfile) -> impl Iterator<Item = &Instruction> {
    dockerfile
        .globals
        .iter()
        .chain(dockerfile.stages.iter().flat_map(|s| s.instructions.iter()))
}

#[test]
fn build_stage_compiles_the_cuda_feature_in_a_cuda_devel_image() {
    let dockerfile = Dockerfile::load();
    let build_stages: Vec<&Stage> = dockerfile
        .stages
        .iter()
        .filter(|s| {
            s.instructions
                .iter()
                .any(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        })
        .collect();
    assert_eq!(
        build_stages.len(),
        1,
        "exactly one stage runs `cargo build`"
    );
    let stage = build_stages[0];
    let image = dockerfile.root_image(stage);
    assert!(
        image.starts_with("nvidia/cuda:") && image.contains("-devel"),
        "build stage base is {image}, not a CUDA devel image"
    );

    let cap_arg = stage
        .instructions
        .iter()
        .find(|i| i.keyword == "ARG" && i.args.starts_with("CUDA_COMPUTE_CAP"))
        .expect("the build stage declares ARG CUDA_COMPUTE_CAP (no GPU during docker build)");
    let default_cap = cap_arg
        .args
        .split_once('=')
        .map(|(_, v)| v.trim())
        .unwrap_or("");
    assert!(
        default_cap
            .parse::<u32>()
            .is_ok_and(|c| (50..=130).contains(&c)),
        "CUDA_COMPUTE_CAP default {default_cap:?}"
    );

    let build = stage
        .instructions
        .iter()
        .find(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .unwrap();
    for needed in [
        "--release",
        "--locked",
        "--no-default-features",
        "--features cuda",
        "CUDA_COMPUTE_CAP",
    ] {
        assert!(
            build.args.contains(needed),
            "line {}: cargo build lacks `{needed}`: {}",
            build.line,
            build.args
        );
    }
}

#[test]
fn runnable_stages_use_a_cuda_runtime_image() {
    let dockerfile = Dockerfile::load();
    for stage in dockerfile.runnable_stages() {
        let image = dockerfile.root_image(stage);
        assert!(
            image.starts_with("nvidia/cuda:") && image.contains("-runtime"),
            "stage {:?} runs on {image}, not a CUDA runtime image",
            stage.name
        );
        let copies_wick = dockerfile.lineage(stage).iter().any(|st| {
            st.instructions.iter().any(|i| {
                i.keyword == "COPY"
                    && i.args.contains("--from=")
                    && i.args.ends_with("/usr/local/bin/wick")
            })
        });
        assert!(
            copies_wick,
            "stage {:?} does not copy the built wick to /usr/local/bin/wick",
            stage.name
        );
    }
}

#[test]
fn entrypoint_is_exec_form_so_wick_is_pid_1_and_gets_sigterm() {
    let dockerfile = Dockerfile::load();
    let last = dockerfile.stages.last().unwrap();
    let last_has_entrypoint = dockerfile
        .lineage(last)
        .iter()
        .any(|st| st.instructions.iter().any(|i| i.keyword == "ENTRYPOINT"));
    assert!(
        last_has_entrypoint,
        "the default (last) stage has no ENTRYPOINT"
    );

    for instruction in all_instructions(&dockerfile) {
        match instruction.keyword.as_str() {
            "ENTRYPOINT" => {
                let argv: Vec<String> =
                    serde_json::from_str(&instruction.args).unwrap_or_else(|_| {
                        panic!(
                            "line {}: ENTRYPOINT is shell form (wick would not be PID 1): {}",
                            instruction.line, instruction.args
                        )
                    });
                assert_eq!(
                    argv.first().map(String::as_str),
                    Some("/usr/local/bin/wick"),
                    "line {}",
                    instruction.line
                );
                assert!(
                    !argv
                        .iter()
                        .any(|a| a == "sh" || a == "/bin/sh" || a == "bash" || a == "-c"),
                    "line {}: ENTRYPOINT goes through a shell",
                    instruction.line
                );
            }
            "CMD" => {
                assert!(
                    serde_json::from_str::<Vec<String>>(&instruction.args).is_ok(),
                    "line {}: CMD must be exec form",
                    instruction.line
                );
            }
            "STOPSIGNAL" => assert_eq!(instruction.args, "SIGTERM", "line {}", instruction.line),
            _ => {}
        }
    }
}

#[test]
fn runnable_stages_switch_to_a_non_root_user_before_the_entrypoint() {
    let dockerfile = Dockerfile::load();
    for stage in dockerfile.runnable_stages() {
        let mut user: Option<String> = None;
        let mut saw_entrypoint = false;
        for st in dockerfile.lineage(stage) {
            for instruction in &st.instructions {
                match instruction.keyword.as_str() {
                    "USER" => {
                        assert!(
                            !saw_entrypoint,
                            "line {}: USER after the ENTRYPOINT; set it before",
                            instruction.line
                        );
                        user = Some(instruction.args.clone());
                    }
                    "ENTRYPOINT" => {
                        let current = user.as_deref().unwrap_or("root");
                        let name = current.split(':').next().unwrap_or(current);
                        assert!(
                            name != "root" && name != "0",
                            "line {}: ENTRYPOINT of stage {:?} runs as {current}",
                            instruction.line,
                            stage.name
                        );
                        saw_entrypoint = true;
                    }
                    _ => {}
                }
            }
        }
        let last_user = user.unwrap_or_else(|| "root".into());
        assert!(
            !matches!(last_user.split(':').next(), Some("root") | Some("0")),
            "stage {:?} ends as user {last_user}",
            stage.name
        );
    }
}

#[test]
fn no_secret_is_ever_an_arg_or_env() {
    let dockerfile = Dockerfile::load();
    let secret_words = [
        "TOKEN",
        "SECRET",
        "PASSWORD",
        "PASSWD",
        "API_KEY",
        "APIKEY",
        "CREDENTIAL",
    ];
    for instruction in all_instructions(&dockerfile) {
        if instruction.keyword == "ARG" || instruction.keyword == "ENV" {
            let upper = instruction.args.to_ascii_uppercase();
            for word in secret_words {
                assert!(
                    !upper.contains(word),
                    "line {}: {} mentions {word}: {}",
                    instruction.line,
                    instruction.keyword,
                    instruction.args
                );
            }
        }
        if instruction.args.contains("HF_TOKEN") {
            assert_eq!(
                instruction.keyword, "RUN",
                "line {}: HF_TOKEN outside a RUN",
                instruction.line
            );
            assert!(
                instruction.args.contains("--mount=type=secret"),
                "line {}: a RUN that uses HF_TOKEN must take it from a BuildKit secret mount",
                instruction.line
            );
        }
        if instruction.args.contains("/run/secrets") {
            assert!(
                instruction.keyword == "RUN" && instruction.args.contains("--mount=type=secret"),
                "line {}: /run/secrets used outside a RUN with a secret mount",
                instruction.line
            );
        }
    }
}

#[test]
fn baked_model_is_downloaded_with_wick_download_and_the_token_as_a_build_secret() {
    let dockerfile = Dockerfile::load();
    let download = all_instructions(&dockerfile)
        .find(|i| i.keyword == "RUN" && i.args.contains("wick download"))
        .expect("a RUN that bakes a model with `wick download`");
    assert!(
        download.args.contains("--mount=type=secret,id=hf_token"),
        "line {}",
        download.line
    );
    assert!(
        download.args.contains("required=false"),
        "line {}: baking a public model must not need the secret",
        download.line
    );
}

#[test]
fn copied_paths_exist_and_stage_references_resolve() {
    let dockerfile = Dockerfile::load();
    let root = repo_root();
    for (index, stage) in dockerfile.stages.iter().enumerate() {
        for instruction in stage
            .instructions
            .iter()
            .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
        {
            assert_eq!(
                instruction.keyword, "COPY",
                "line {}: use COPY, not ADD",
                instruction.line
            );
            let words: Vec<&str> = instruction.args.split_whitespace().collect();
            let from = words.iter().find_map(|w| w.strip_prefix("--from="));
            let paths: Vec<&str> = words
                .iter()
                .copied()
                .filter(|w| !w.starts_with("--"))
                .collect();
            assert!(
                paths.len() >= 2,
                "line {}: COPY needs a source and a destination",
                instruction.line
            );
            let sources = &paths[..paths.len() - 1];
            match from {
                Some(name) => {
                    let earlier = dockerfile.stages[..index]
                        .iter()
                        .any(|s| s.name.as_deref() == Some(name));
                    assert!(
                        earlier,
                        "line {}: COPY --from={name} is not an earlier stage",
                        instruction.line
                    );
                }
                None => {
                    for source in sources {
                        assert!(
                            root.join(source).exists(),
                            "line {}: COPY source {source} is not in the repository",
                            instruction.line
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dockerignore_keeps_build_outputs_models_and_git_out_of_the_context() {
    let text = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["target", "models", ".git"] {
        assert!(patterns.contains(&needed), ".dockerignore lacks `{needed}`");
    }
    // The build needs the crate: nothing may exclude the manifest, the lock file or the sources.
    for kept in ["Cargo.toml", "Cargo.lock", "src", "*", "**"] {
        assert!(!patterns.contains(&kept), ".dockerignore excludes `{kept}`");
    }
    assert!(
        Path::new(&repo_root().join("Cargo.lock")).exists(),
        "Cargo.lock must be committed for --locked builds"
    );
}

#[test]
fn parser_joins_continuations_and_drops_comments() {
    let text = "ARG A=1\nFROM img:${A} AS one\n# note\nRUN a \\\n  # inner comment\n  b\nFROM one\nENTRYPOINT [\"/x\"]\n";
    let (globals, stages) = parse_stages(text);
    assert_eq!(globals.len(), 1);
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].name.as_deref(), Some("one"));
    assert_eq!(stages[0].instructions[0].args, "a b");
    assert_eq!(stages[0].instructions[0].line, 4);
    assert_eq!(stages[1].base, "one");
}

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether a simple `.dockerignore` pattern (as used in ours: a root-relative name, `*.ext` at the
/// root, or `**/*.ext` anywhere) excludes `relative`.
fn dockerignore_excludes(pattern: &str, relative: &str) -> bool {
    if let Some(ext) = pattern.strip_prefix("**/*") {
        return relative.ends_with(ext);
    }
    if let Some(ext) = pattern.strip_prefix('*') {
        return !relative.contains('/') && relative.ends_with(ext);
    }
    relative == pattern || relative.starts_with(&format!("{pattern}/"))
}

#[test]
fn files_the_build_includes_are_in_the_docker_context() {
    let root = repo_root();
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut files = Vec::new();
    rust_sources(&root.join("src"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = &text[at + macro_name.len()..];
                let Some(end) = rest.find('"') else { continue };
                let included = file.parent().unwrap().join(&rest[..end]);
                let resolved = included
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("{}: {} ({e})", file.display(), included.display()));
                let relative = resolved
                    .strip_prefix(root.canonicalize().unwrap())
                    .unwrap_or_else(|_| {
                        panic!("{} includes a file outside the repository", file.display())
                    })
                    .to_string_lossy()
                    .to_string();
                for pattern in &patterns {
                    assert!(
                        !dockerignore_excludes(pattern, &relative),
                        "{} includes {relative}, which .dockerignore pattern `{pattern}` keeps out of the image build",
                        file.display()
                    );
                }
            }
        }
    }
    // The pattern matcher itself (so the loop above cannot pass vacuously on a broken matcher).
    assert!(dockerignore_excludes("models", "models/x.gguf"));
    assert!(!dockerignore_excludes("models", "models.toml"));
    assert!(
        dockerignore_excludes("*.gguf", "a.gguf")
            && !dockerignore_excludes("*.gguf", "tests/a.gguf")
    );
}
