//! Local models: a directory in Hugging Face layout, or one `.gguf` file. Also the parser of
//! `model.safetensors.index.json`, shared with the Hub path: shard names are validated as plain
//! relative paths and every resolved file must stay inside the model directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::cache::read_small;
use super::source::{truncate, validate_file_path};
use super::{HubError, ModelFiles, WeightFiles};

/// `model.safetensors.index.json`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file safetensors name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Largest index file read (real ones are well under 1 MB).
const MAX_INDEX_BYTES: u64 = 16 * 1024 * 1024;
/// Most shards accepted.
const MAX_SHARDS: usize = 4096;

/// Reads an index file and returns its shard names (sorted, unique, validated).
///
/// # Errors
/// [`HubError::BadIndex`] when unreadable or malformed; [`HubError::UnsafePath`] for a shard name that
/// is not a plain relative `.safetensors` path.
pub fn read_index(path: &Path) -> Result<Vec<String>, HubError> {
    let bad = |reason: String| HubError::BadIndex {
        path: path.to_path_buf(),
        reason,
    };
    let text = read_small(path, MAX_INDEX_BYTES).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards = BTreeSet::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| bad("a `weight_map` value is not a string".into()))?;
        validate_file_path(file)?;
        if !file.ends_with(".safetensors") {
            return Err(HubError::UnsafePath {
                file: truncate(file),
                reason: "shards must be `.safetensors` files".into(),
            });
        }
        shards.insert(file.to_string());
        if shards.len() > MAX_SHARDS {
            return Err(bad(format!("more than {MAX_SHARDS} shards")));
        }
    }
    if shards.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(shards.into_iter().collect())
}

/// A local `.gguf` file.
///
/// # Errors
/// [`HubError::LocalPath`] when it is not a readable regular file.
pub fn resolve_local_gguf(path: &Path) -> Result<ModelFiles, HubError> {
    let canonical = canonical_file(path)?;
    Ok(ModelFiles {
        config: None,
        weights: WeightFiles::Gguf(canonical),
        tokenizer_json: None,
        tokenizer_config: None,
        generation_config: None,
    })
}

/// A local directory: `config.json` and `tokenizer.json` required, `tokenizer_config.json` and
/// `generation_config.json` optional, weights through the index, else `model.safetensors`; a directory
/// with no `config.json` but exactly one `.gguf` file resolves to that file.
///
/// # Errors
/// [`HubError::LocalPath`] naming the missing piece; index errors as in [`read_index`].
pub fn resolve_local_dir(dir: &Path) -> Result<ModelFiles, HubError> {
    let root = std::fs::canonicalize(dir).map_err(|e| HubError::LocalPath {
        path: dir.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    })?;
    let lacks = |what: &str| HubError::LocalPath {
        path: root.clone(),
        reason: what.to_string(),
    };
    let optional = |name: &str| -> Result<Option<PathBuf>, HubError> {
        let path = root.join(name);
        if path.exists() {
            Ok(Some(contained(&root, &path)?))
        } else {
            Ok(None)
        }
    };

    let Some(config) = optional("config.json")? else {
        let ggufs = list_with_extension(&root, "gguf");
        return match ggufs.as_slice() {
            [one] => resolve_local_gguf(one),
            [] => Err(lacks("has no config.json (and no .gguf file); expected a Hugging Face model directory")),
            _ => Err(lacks("has no config.json and several .gguf files; set MODEL_NAME to the .gguf file itself")),
        };
    };
    let tokenizer_json = optional("tokenizer.json")?
        .ok_or_else(|| lacks("has no tokenizer.json; wick needs the fast (Rust) tokenizer file"))?;

    let weights = if let Some(index) = optional(INDEX_FILE)? {
        let shards = read_index(&index)?
            .iter()
            .map(|shard| {
                let path = root.join(shard);
                if !path.exists() {
                    return Err(lacks(&format!(
                        "misses shard `{shard}` listed in {INDEX_FILE}"
                    )));
                }
                contained(&root, &path)
            })
            .collect::<Result<Vec<_>, _>>()?;
        WeightFiles::Safetensors(shards)
    } else if let Some(single) = optional(SINGLE_FILE)? {
        WeightFiles::Safetensors(vec![single])
    } else {
        let pickles = !list_with_extension(&root, "bin").is_empty()
            || !list_with_extension(&root, "pt").is_empty();
        return Err(lacks(if pickles {
            "has only pickle weights (.bin/.pt), which wick never loads (they can run code); convert them to safetensors"
        } else {
            "has no model.safetensors and no model.safetensors.index.json"
        }));
    };

    Ok(ModelFiles {
        config: Some(config),
        weights,
        tokenizer_json: Some(tokenizer_json),
        tokenizer_config: optional("tokenizer_config.json")?,
        generation_config: optional("generation_config.json")?,
    })
}

/// Canonical path of `path`, which must resolve (through any symlinks) to a regular file inside `root`.
fn contained(root: &Path, path: &Path) -> Result<PathBuf, HubError> {
    let canonical = canonical_file(path)?;
    if canonical.starts_with(root) {
        Ok(canonical)
    } else {
        Err(HubError::UnsafePath {
            file: path.display().to_string(),
            reason: format!(
                "resolves to {}, outside the model directory",
                canonical.display()
            ),
        })
    }
}

fn canonical_file(path: &Path) -> Result<PathBuf, HubError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| HubError::LocalPath {
        path: path.to_path_buf(),
        reason: format!("cannot read it: {e}"),
    })?;
    if !canonical.is_file() {
        return Err(HubError::LocalPath {
            path: path.to_path_buf(),
            reason: "is not a regular file".into(),
        });
    }
    Ok(canonical)
}

fn list_with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)))
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama"
        ))
    }

    #[test]
    fn fixture_directory_resolves_every_file() {
        let files = resolve_local_dir(&fixture()).unwrap();
        assert!(files.config.unwrap().ends_with("config.json"));
        assert!(files.tokenizer_json.unwrap().ends_with("tokenizer.json"));
        assert!(files
            .tokenizer_config
            .unwrap()
            .ends_with("tokenizer_config.json"));
        assert!(files
            .generation_config
            .unwrap()
            .ends_with("generation_config.json"));
        assert!(
            matches!(files.weights, WeightFiles::Safetensors(ref v) if v.len() == 1 && v[0].ends_with("model.safetensors"))
        );
    }

    fn copy_fixture(to: &Path) {
        for name in ["config.json", "tokenizer.json"] {
            std::fs::copy(fixture().join(name), to.join(name)).unwrap();
        }
    }

    #[test]
    fn index_with_traversal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        copy_fixture(dir.path());
        for evil in [
            "../outside.safetensors",
            "/etc/passwd.safetensors",
            "a/../../b.safetensors",
            "weights.bin",
        ] {
            let index = serde_json::json!({"weight_map": {"w": evil}});
            std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
            assert!(
                matches!(
                    resolve_local_dir(dir.path()),
                    Err(HubError::UnsafePath { .. })
                ),
                "{evil}"
            );
        }
    }

    #[test]
    fn symlinked_shard_leaving_the_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        copy_fixture(dir.path());
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret"),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        assert!(matches!(
            resolve_local_dir(dir.path()),
            Err(HubError::UnsafePath { .. })
        ));
    }

    #[test]
    fn sharded_directory_lists_shards_in_order() {
        let dir = tempfile::tempdir().unwrap();
        copy_fixture(dir.path());
        for shard in [
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
        ] {
            std::fs::write(dir.path().join(shard), b"x").unwrap();
        }
        let index = serde_json::json!({"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let files = resolve_local_dir(dir.path()).unwrap();
        let WeightFiles::Safetensors(shards) = files.weights else {
            panic!("safetensors")
        };
        assert_eq!(shards.len(), 2);
        assert!(shards[0].ends_with("model-00001-of-00002.safetensors"));
        assert!(files.tokenizer_config.is_none());
    }

    #[test]
    fn pickle_only_directory_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        copy_fixture(dir.path());
        std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
        let err = resolve_local_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("pickle"), "{err}");
    }

    #[test]
    fn directory_with_one_gguf_resolves_to_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.Q4.gguf"), b"GGUF").unwrap();
        let files = resolve_local_dir(dir.path()).unwrap();
        assert!(matches!(files.weights, WeightFiles::Gguf(ref p) if p.ends_with("m.Q4.gguf")));
    }
}
