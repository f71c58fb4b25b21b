//! Content checks for downloaded and cached blobs: size, and sha256 for LFS files (whose Hub etag is
//! the sha256 of the content). Hashing runs on the blocking pool; one large file hashes at the speed
//! of `sha2` (SHA-NI where the CPU has it).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What a blob must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Exact size in bytes, when known (from the Hub's tree listing).
    pub size: Option<u64>,
    /// Lowercase hex sha256, when known (LFS etag, tree `lfs.oid`, or a preset pin).
    pub sha256: Option<String>,
}

/// Why a blob failed its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// Wrong size (a truncated or padded file).
    Size {
        /// What the Hub says.
        expected: u64,
        /// What is on disk.
        actual: u64,
    },
    /// Right size, wrong bytes.
    Sha256 {
        /// What the Hub says.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Size { expected, actual } => {
                write!(f, "size {actual} bytes, expected {expected}")
            }
            Mismatch::Sha256 { expected, actual } => {
                write!(f, "sha256 {actual}, expected {expected}")
            }
        }
    }
}

/// Hex sha256 of a file's content (blocking).
///
/// # Errors
/// I/O errors.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Checks `path` against `expected` on the blocking pool: size first (cheap), then the hash.
/// `Ok(Ok(sha))` carries the hash that was computed (None when none was expected).
///
/// # Errors
/// I/O errors reading the file.
pub async fn check_blob(
    path: PathBuf,
    expected: Expected,
) -> std::io::Result<Result<Option<String>, Mismatch>> {
    tokio::task::spawn_blocking(move || {
        let actual = std::fs::metadata(&path)?.len();
        if let Some(size) = expected.size {
            if size != actual {
                return Ok(Err(Mismatch::Size {
                    expected: size,
                    actual,
                }));
            }
        }
        let Some(want) = expected.sha256 else {
            return Ok(Ok(None));
        };
        let got = sha256_file(&path)?;
        if got == want {
            Ok(Ok(Some(got)))
        } else {
            Ok(Err(Mismatch::Sha256 {
                expected: want,
                actual: got,
            }))
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detects_truncation_and_same_size_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"hello world").unwrap();
        let sha = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9".to_string();
        let good = Expected {
            size: Some(11),
            sha256: Some(sha.clone()),
        };
        assert_eq!(
            check_blob(path.clone(), good.clone()).await.unwrap(),
            Ok(Some(sha.clone()))
        );

        std::fs::write(&path, b"hello").unwrap();
        assert_eq!(
            check_blob(path.clone(), good.clone()).await.unwrap(),
            Err(Mismatch::Size {
                expected: 11,
                actual: 5
            })
        );

        std::fs::write(&path, b"hello_world").unwrap();
        assert!(matches!(
            check_blob(path.clone(), good).await.unwrap(),
            Err(Mismatch::Sha256 { .. })
        ));

        // Size only (non-LFS files): no hash is computed.
        let size_only = Expected {
            size: Some(11),
            sha256: None,
        };
        assert_eq!(check_blob(path, size_only).await.unwrap(), Ok(None));
    }
}
