//! What `MODEL_NAME` names, parsed and validated before anything touches the disk or the network:
//! a preset from `models.toml`, a local directory, a local `.gguf` file, a Hub repo id (safetensors),
//! or a Hub repo id with one GGUF file selected as `org/name:file.gguf`.
//!
//! Every name that ends up in a path is checked here: repo ids against the Hub's own rules, revisions
//! against a conservative character set, and file names (from `models.toml`, `MODEL_NAME` or a
//! downloaded `model.safetensors.index.json`) as plain relative paths without `..`, absolute parts,
//! backslashes or NUL bytes.

use std::path::{Component, Path, PathBuf};

use super::presets::{Preset, Presets, WeightFormat};
use super::HubError;

/// Longest repo id the Hub accepts (`org/name`, each part at most 96 characters).
const MAX_REPO_PART: usize = 96;
/// Longest revision (branch, tag or commit) accepted.
const MAX_REVISION_LEN: usize = 255;
/// Longest repo-relative file path accepted.
const MAX_FILE_PATH_LEN: usize = 1024;
/// Longest single path component accepted.
const MAX_FILE_COMPONENT_LEN: usize = 255;

/// The weights to fetch from a Hub repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubWeights {
    /// `model.safetensors.index.json` when present (sharded), else `model.safetensors`; plus
    /// `config.json`, `tokenizer.json` and the optional `tokenizer_config.json` / `generation_config.json`.
    Safetensors,
    /// Exactly one GGUF file (weights, tokenizer and chat template in one).
    Gguf {
        /// Repo-relative path of the file.
        file: String,
    },
}

/// A model on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `org/name` (or a bare legacy `name`).
    pub repo_id: String,
    /// Branch, tag or 40-hex commit.
    pub revision: String,
    /// Which files.
    pub weights: HubWeights,
    /// A sha256 the weights file must have (from a preset pin); checked on top of the Hub's own hash.
    pub pinned_sha256: Option<String>,
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory in Hugging Face layout (`config.json`, `tokenizer.json`, safetensors).
    LocalDir(PathBuf),
    /// A single local `.gguf` file.
    LocalGguf(PathBuf),
    /// A Hub repo, possibly through a preset.
    Hub(HubModel),
}

/// The outcome of parsing `MODEL_NAME` / `MODEL_REVISION`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    /// Where the files come from.
    pub source: ModelSource,
    /// The preset, when `MODEL_NAME` named one (or was unset).
    pub preset: Option<Preset>,
}

/// Parses `MODEL_NAME` (None: the default preset) and `MODEL_REVISION` (None: the preset's pin, else `main`).
///
/// Order: a preset name, then an existing local path (or one that is clearly a path: absolute, `./`,
/// `../`, `~`), then `org/name:file.gguf`, then a Hub repo id.
///
/// # Errors
/// [`HubError::InvalidModelName`] / [`HubError::InvalidRevision`] / [`HubError::UnsafePath`] naming what
/// is wrong; [`HubError::LocalPath`] for a path that does not exist.
pub fn parse_model_request(
    model_name: Option<&str>,
    revision: Option<&str>,
    presets: &Presets,
) -> Result<ModelRequest, HubError> {
    let name = model_name.map(str::trim).filter(|n| !n.is_empty());
    let name = name.unwrap_or(presets.default_name());
    if let Some(revision) = revision {
        validate_revision(revision)?;
    }

    if let Some(preset) = presets.get(name) {
        let revision = revision.unwrap_or(&preset.revision).to_string();
        validate_revision(&revision)?;
        let weights = match preset.format {
            WeightFormat::Safetensors => HubWeights::Safetensors,
            WeightFormat::Gguf => HubWeights::Gguf {
                file: preset.file.clone().ok_or_else(|| HubError::Presets {
                    source_name: presets.source_name().to_string(),
                    reason: format!("preset `{}` has format gguf but no `file`", preset.name),
                })?,
            },
        };
        // A pin is only meaningful at the pinned revision: another revision may carry other bytes.
        let pinned_sha256 = if revision == preset.revision {
            preset.sha256.clone()
        } else {
            None
        };
        return Ok(ModelRequest {
            source: ModelSource::Hub(HubModel {
                repo_id: preset.repo.clone(),
                revision,
                weights,
                pinned_sha256,
            }),
            preset: Some(preset.clone()),
        });
    }

    if let Some(path) = as_local_path(name) {
        let meta = std::fs::metadata(&path).map_err(|e| HubError::LocalPath {
            path: path.clone(),
            reason: format!("cannot read it ({e}); MODEL_NAME must be a preset (see `wick models`), a Hub repo id or an existing path"),
        })?;
        let source = if meta.is_dir() {
            ModelSource::LocalDir(path)
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            ModelSource::LocalGguf(path)
        } else {
            return Err(HubError::LocalPath {
                path,
                reason: "a local model must be a directory (Hugging Face layout) or a `.gguf` file"
                    .into(),
            });
        };
        return Ok(ModelRequest {
            source,
            preset: None,
        });
    }

    let revision = revision.unwrap_or("main").to_string();
    let (repo_id, weights) = match name.split_once(':') {
        Some((repo, file)) => {
            validate_file_path(file)?;
            if !file.to_ascii_lowercase().ends_with(".gguf") {
                return Err(HubError::InvalidModelName {
                    name: name.to_string(),
                    reason: "`org/name:file` selects a GGUF file; the file must end in `.gguf`"
                        .into(),
                });
            }
            (
                repo,
                HubWeights::Gguf {
                    file: file.to_string(),
                },
            )
        }
        None => (name, HubWeights::Safetensors),
    };
    validate_repo_id(repo_id).map_err(|reason| HubError::InvalidModelName {
        name: name.to_string(),
        reason: format!("{reason}; expected a preset (see `wick models`), a local path, `org/name` or `org/name:file.gguf`"),
    })?;
    Ok(ModelRequest {
        source: ModelSource::Hub(HubModel {
            repo_id: repo_id.to_string(),
            revision,
            weights,
            pinned_sha256: None,
        }),
        preset: None,
    })
}

/// `Some(path)` when `name` is meant as a local path: it exists, or it is written like a path.
fn as_local_path(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    let looks_like_path = path.is_absolute()
        || name.starts_with("./")
        || name.starts_with("../")
        || name.starts_with('~')
        || name == "."
        || name == "..";
    if looks_like_path || path.exists() {
        Some(path.to_path_buf())
    } else {
        None
    }
}

/// Checks a Hub repo id: `name` or `org/name`, ASCII letters, digits, `.`, `_`, `-`; no `..` or `--`;
/// parts start and end with a letter or digit; at most 96 characters each.
///
/// # Errors
/// What rule the id breaks.
pub fn validate_repo_id(repo_id: &str) -> Result<(), String> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() > 2 {
        return Err(format!("`{}` has more than one `/`", truncate(repo_id)));
    }
    for part in &parts {
        if part.is_empty() || part.len() > MAX_REPO_PART {
            return Err(format!(
                "each part of a repo id must have 1 to {MAX_REPO_PART} characters, got `{}`",
                truncate(repo_id)
            ));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "`{}` may only contain letters, digits, `.`, `_`, `-` and one `/`",
                truncate(repo_id)
            ));
        }
        let first = part.as_bytes()[0];
        let last = part.as_bytes()[part.len() - 1];
        if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
            return Err(format!(
                "each part of `{}` must start and end with a letter or digit",
                truncate(repo_id)
            ));
        }
        if part.contains("..") || part.contains("--") {
            return Err(format!(
                "`{}` must not contain `..` or `--`",
                truncate(repo_id)
            ));
        }
    }
    Ok(())
}

/// Checks a revision: a branch, tag or commit; ASCII letters, digits, `.`, `_`, `-`, `/`; no `..`, no
/// empty path segment, at most 255 characters.
///
/// # Errors
/// [`HubError::InvalidRevision`].
pub fn validate_revision(revision: &str) -> Result<(), HubError> {
    let bad = |reason: &str| {
        Err(HubError::InvalidRevision {
            revision: truncate(revision),
            reason: reason.to_string(),
        })
    };
    if revision.is_empty() || revision.len() > MAX_REVISION_LEN {
        return bad("must have 1 to 255 characters");
    }
    if !revision
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    {
        return bad("may only contain letters, digits, `.`, `_`, `-` and `/`");
    }
    if revision
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg.contains(".."))
    {
        return bad("must not contain `..` or empty path segments");
    }
    Ok(())
}

/// Checks a repo-relative file path (from `models.toml`, `MODEL_NAME` or an index file): relative,
/// `/`-separated normal components only, no backslash, NUL or control characters.
///
/// # Errors
/// [`HubError::UnsafePath`].
pub fn validate_file_path(file: &str) -> Result<(), HubError> {
    let bad = |reason: &str| {
        Err(HubError::UnsafePath {
            file: truncate(file),
            reason: reason.to_string(),
        })
    };
    if file.is_empty() || file.len() > MAX_FILE_PATH_LEN {
        return bad("must have 1 to 1024 characters");
    }
    if file.chars().any(|c| c.is_control() || c == '\\') {
        return bad("must not contain control characters or backslashes");
    }
    if file.starts_with('/') {
        return bad("must be relative to the model directory, not absolute");
    }
    for segment in file.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return bad("must not contain `..`, `.` or empty path segments");
        }
        if segment.len() > MAX_FILE_COMPONENT_LEN {
            return bad("has a path segment longer than 255 bytes");
        }
    }
    // Belt and braces: the std parser must agree that every component is a plain name.
    if !Path::new(file)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return bad("must only contain plain path segments");
    }
    Ok(())
}

/// True for a 40-character lowercase hex string (a git commit or a non-LFS blob id).
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// True for a 64-character lowercase hex string (a sha256, the etag of an LFS file).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A user-supplied string cut to 128 characters for error messages.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 128;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_hub_rules() {
        for ok in [
            "gpt2",
            "org/name",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "a/b",
            "meta-llama/Llama-3.1-8B-Instruct",
        ] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/", "a/", "/a", "a/b/c", "../x", "a/..", "a/b..c", "a--b/c", "a/b c", "a/b\0",
            "-a/b", "a/b.", "a/%2e%2e",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_repo_id(&format!("a/{}", "x".repeat(97))).is_err());
    }

    #[test]
    fn revisions_reject_traversal_and_odd_characters() {
        for ok in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            validate_revision(ok).unwrap();
        }
        for bad in [
            "",
            "..",
            "../main",
            "a//b",
            "/main",
            "main/",
            "ma in",
            "main\0",
            "a/./b",
            "x".repeat(256).as_str(),
        ] {
            assert!(validate_revision(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_paths_must_stay_inside_the_model() {
        for ok in [
            "model.safetensors",
            "sub/model-00001-of-00002.safetensors",
            "a.gguf",
        ] {
            validate_file_path(ok).unwrap();
        }
        for bad in [
            "",
            "../model.safetensors",
            "sub/../../x",
            "/etc/passwd",
            "a\\..\\b",
            "a/./b",
            "a//b",
            "nul\0.safetensors",
            "line\nbreak",
            ".",
            "..",
        ] {
            assert!(
                matches!(validate_file_path(bad), Err(HubError::UnsafePath { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn hex_checks_are_exact() {
        assert!(is_commit_hash(&"a".repeat(40)));
        assert!(!is_commit_hash(&"A".repeat(40)));
        assert!(!is_commit_hash(&"a".repeat(64)));
        assert!(is_sha256_hex(&"0".repeat(64)));
        assert!(!is_sha256_hex("../../etc/passwd"));
    }

    #[test]
    fn model_names_parse_to_sources() {
        let presets = Presets::builtin().unwrap();
        // Unset: the default preset.
        let req = parse_model_request(None, None, &presets).unwrap();
        assert_eq!(
            req.preset.as_ref().map(|p| p.name.as_str()),
            Some(presets.default_name())
        );
        // A repo id.
        let req = parse_model_request(Some("org/some-model"), Some("v2"), &presets).unwrap();
        assert_eq!(
            req.source,
            ModelSource::Hub(HubModel {
                repo_id: "org/some-model".into(),
                revision: "v2".into(),
                weights: HubWeights::Safetensors,
                pinned_sha256: None
            })
        );
        // A GGUF selection.
        let req = parse_model_request(Some("org/m-GGUF:m.Q4_K_M.gguf"), None, &presets).unwrap();
        assert!(
            matches!(req.source, ModelSource::Hub(HubModel { weights: HubWeights::Gguf { ref file }, .. }) if file == "m.Q4_K_M.gguf")
        );
        // Traversal in the selected file, odd ids, non-gguf selection.
        assert!(matches!(
            parse_model_request(Some("org/m:../x.gguf"), None, &presets),
            Err(HubError::UnsafePath { .. })
        ));
        assert!(matches!(
            parse_model_request(Some("org/m:weights.bin"), None, &presets),
            Err(HubError::InvalidModelName { .. })
        ));
        assert!(matches!(
            parse_model_request(Some("a/b/c/d"), None, &presets),
            Err(HubError::InvalidModelName { .. })
        ));
        assert!(matches!(
            parse_model_request(Some("org/m"), Some("../x"), &presets),
            Err(HubError::InvalidRevision { .. })
        ));
        // A path that does not exist is an error, not a repo id.
        assert!(matches!(
            parse_model_request(Some("/nonexistent/model/dir"), None, &presets),
            Err(HubError::LocalPath { .. })
        ));
        // A local directory.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
        let req = parse_model_request(Some(dir), None, &presets).unwrap();
        assert_eq!(req.source, ModelSource::LocalDir(PathBuf::from(dir)));
    }

    #[test]
    fn preset_pin_applies_only_at_its_revision() {
        let presets = Presets::builtin().unwrap();
        let gguf = presets
            .iter()
            .find(|p| p.sha256.is_some())
            .expect("a preset with a sha256 pin");
        let req = parse_model_request(Some(&gguf.name), None, &presets).unwrap();
        assert!(matches!(
            req.source,
            ModelSource::Hub(HubModel {
                pinned_sha256: Some(_),
                ..
            })
        ));
        let req =
            parse_model_request(Some(&gguf.name), Some("some-other-branch"), &presets).unwrap();
        assert!(matches!(
            req.source,
            ModelSource::Hub(HubModel {
                pinned_sha256: None,
                ..
            })
        ));
    }
}
