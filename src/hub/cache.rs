//! The on-disk cache, in the layout Python's `huggingface_hub` and `hf-hub` share:
//! `{cache}/models--{org}--{name}/{blobs/{etag}, snapshots/{commit}/{file} -> ../../blobs/{etag},
//! refs/{revision}, .no_exist/{commit}/{file}}` and `{cache}/.locks/models--{org}--{name}/{etag}.lock`.
//!
//! On top of that layout wick keeps, per blob: a `{etag}.verified` marker (what was hashed, so a warm
//! start does not hash again) and a `{etag}.wick.lock` lock file (one writer per blob across processes
//! and hosts sharing a volume). Writes of small files go to a unique 0600 temp file, then `rename`;
//! blobs are written through `{etag}.incomplete` (0600, never followed if it is a link), which a later
//! attempt or a later process resumes ([`open_partial`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::source::{is_commit_hash, is_sha256_hex};

/// How often a waiting lock is retried.
const LOCK_POLL: Duration = Duration::from_millis(200);

/// Paths of one repo inside the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    cache_dir: PathBuf,
    folder_name: String,
}

impl RepoCache {
    /// The cache of model repo `repo_id` (already validated) under `cache_dir`.
    pub fn new(cache_dir: &Path, repo_id: &str) -> Self {
        RepoCache {
            cache_dir: cache_dir.to_path_buf(),
            folder_name: format!("models--{}", repo_id.replace('/', "--")),
        }
    }

    /// `{cache}/models--org--name`.
    pub fn repo_dir(&self) -> PathBuf {
        self.cache_dir.join(&self.folder_name)
    }

    /// `blobs/`.
    pub fn blobs_dir(&self) -> PathBuf {
        self.repo_dir().join("blobs")
    }

    /// `blobs/{etag}`.
    pub fn blob(&self, etag: &str) -> PathBuf {
        self.blobs_dir().join(etag)
    }

    /// `blobs/{etag}.incomplete`: where `hf-hub` (and Python) write a blob before renaming it.
    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.blobs_dir().join(format!("{etag}.incomplete"))
    }

    /// `blobs/{etag}.verified`: wick's record that the blob was hashed and matched.
    pub fn marker(&self, etag: &str) -> PathBuf {
        self.blobs_dir().join(format!("{etag}.verified"))
    }

    /// `snapshots/{commit}/{file}`.
    pub fn snapshot(&self, commit: &str, file: &str) -> PathBuf {
        self.repo_dir().join("snapshots").join(commit).join(file)
    }

    /// `.no_exist/{commit}/{file}`: the Python-compatible "this file does not exist at that commit" marker.
    pub fn no_exist(&self, commit: &str, file: &str) -> PathBuf {
        self.repo_dir().join(".no_exist").join(commit).join(file)
    }

    /// `refs/{revision}`.
    pub fn ref_file(&self, revision: &str) -> PathBuf {
        self.repo_dir().join("refs").join(revision)
    }

    /// `{cache}/.locks/models--org--name/`.
    pub fn locks_dir(&self) -> PathBuf {
        self.cache_dir.join(".locks").join(&self.folder_name)
    }

    /// wick's per-blob lock.
    pub fn wick_lock(&self, etag: &str) -> PathBuf {
        self.locks_dir().join(format!("{etag}.wick.lock"))
    }

    /// The lock `hf-hub` and Python hold while they write `{etag}.incomplete`.
    pub fn hf_lock(&self, etag: &str) -> PathBuf {
        self.locks_dir().join(format!("{etag}.lock"))
    }

    /// The commit `refs/{revision}` points at, when it holds a valid commit hash.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let text = read_small(&self.ref_file(revision), 256).ok()?;
        let commit = text.trim().to_string();
        is_commit_hash(&commit).then_some(commit)
    }

    /// Points `refs/{revision}` at `commit` (atomic replace).
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_ref(&self, revision: &str, commit: &str) -> std::io::Result<()> {
        write_atomic(&self.ref_file(revision), commit.as_bytes())
    }

    /// The etag a snapshot entry points at (the blob's file name), when it is a symlink to an existing
    /// blob of this repo whose name is a valid etag.
    pub fn snapshot_etag(&self, commit: &str, file: &str) -> Option<String> {
        let link = self.snapshot(commit, file);
        let target = std::fs::read_link(&link).ok()?;
        let etag = target.file_name()?.to_str()?.to_string();
        if !(is_sha256_hex(&etag) || is_commit_hash(&etag)) {
            return None;
        }
        let blob = self.blob(&etag);
        let meta = std::fs::symlink_metadata(&blob).ok()?;
        // The link must resolve to exactly this repo's blob, which must be a regular file.
        let resolved = link.parent()?.join(&target);
        let same = std::fs::canonicalize(&resolved).ok()? == std::fs::canonicalize(&blob).ok()?;
        (meta.is_file() && same).then_some(etag)
    }

    /// Points `snapshots/{commit}/{file}` at `blobs/{etag}` with a relative symlink, as `hf-hub` and
    /// Python do (`../../blobs/{etag}`, one more `../` per folder in `file`); atomic replace.
    ///
    /// # Errors
    /// I/O errors (the temp link is removed).
    pub fn link_snapshot(&self, commit: &str, file: &str, etag: &str) -> std::io::Result<()> {
        let link = self.snapshot(commit, file);
        let dir = link
            .parent()
            .ok_or_else(|| std::io::Error::other("snapshot path has no parent directory"))?;
        std::fs::create_dir_all(dir)?;
        let depth = file.split('/').count() + 1;
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let name = link.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = dir.join(format!(
            ".{name}.tmp-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        let result =
            std::os::unix::fs::symlink(&target, &tmp).and_then(|()| std::fs::rename(&tmp, &link));
        if result.is_err() {
            if let Err(e) = std::fs::remove_file(&tmp) {
                tracing::debug!(path = %tmp.display(), error = %e, "could not remove temp link");
            }
        }
        result
    }

    /// Whether a cache-only lookup (Python's `local_files_only`) may call `file` absent at `commit`: a
    /// `.no_exist` marker is there and the snapshot entry is not (an entry that exists, usable or not,
    /// leaves the answer unknown, as in Python and hf-hub).
    pub fn offline_absent(&self, commit: &str, file: &str) -> bool {
        !self.snapshot(commit, file).exists() && self.no_exist(commit, file).exists()
    }

    /// Records that `file` does not exist at `commit` (Python-compatible empty marker).
    ///
    /// # Errors
    /// I/O errors.
    pub fn mark_no_exist(&self, commit: &str, file: &str) -> std::io::Result<()> {
        let path = self.no_exist(commit, file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_atomic(&path, b"")
    }
}

/// Reads a small file, refusing one larger than `max` bytes.
///
/// # Errors
/// I/O errors, or `InvalidData` when the file is too large.
pub fn read_small(path: &Path, max: u64) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    if meta.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} is {} bytes, over the {max}-byte limit",
                path.display(),
                meta.len()
            ),
        ));
    }
    std::fs::read_to_string(path)
}

/// Writes `bytes` to `path` atomically: a unique temp file created with `O_EXCL`, mode 0600 and
/// `O_NOFOLLOW` in the same directory, fsynced, given the mode a normal file would get (0666 less the
/// umask), then renamed over `path`. Readers see the old content or the new, never a part.
///
/// # Errors
/// I/O errors (the temp file is removed).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        random_u64()
    ));
    let result = (|| {
        let mut file = create_private(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        file.set_permissions(std::fs::Permissions::from_mode(default_file_mode()))?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the temp file is ours and useless now; a leftover is swept later anyway.
        if let Err(e) = std::fs::remove_file(&tmp) {
            tracing::debug!(path = %tmp.display(), error = %e, "could not remove temp file");
        }
    }
    result
}

/// Creates a new file with mode 0600, failing if anything exists at `path` (no symlink following).
///
/// # Errors
/// I/O errors, `AlreadyExists`.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Opens `{etag}.incomplete` for writing: an existing one is resumed (its length is returned) when
/// `resume` is set and it is wick's own (a regular file, not a link, owned by this user, mode 0600);
/// anything else there is removed and a new empty 0600 file created. The caller holds the blob's locks.
///
/// # Errors
/// I/O errors.
pub fn open_partial(path: &Path, resume: bool) -> std::io::Result<(File, u64)> {
    if resume {
        let existing = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path);
        match existing {
            Ok(file) => {
                let meta = file.metadata()?;
                // SAFETY: geteuid has no preconditions and cannot fail.
                let uid = unsafe { libc::geteuid() };
                if meta.is_file() && meta.uid() == uid && meta.mode() & 0o777 == 0o600 {
                    return Ok((file, meta.len()));
                }
                tracing::info!(path = %path.display(), "partial download is not wick's own; starting it over");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // ELOOP: a symlink where the partial should be; removed below, never followed.
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "partial download cannot be resumed")
            }
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok((create_private(path)?, 0))
}

/// The mode a plain `File::create` gives in this process: 0666 less the umask (read from
/// `/proc/self/status`, so the umask is never changed, even for a moment). Falls back to 0644.
pub fn default_file_mode() -> u32 {
    static MODE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        let umask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            });
        0o666 & !umask.unwrap_or(0o022)
    })
}

/// A random 64-bit value from the std hasher's per-process OS seed (for temp names and jitter).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

/// An exclusive advisory lock (`flock`) on a lock file; released when dropped or when the process dies,
/// so a killed worker never leaves a stale lock. Works across processes, and between tasks of one
/// process (each holder opens its own file description).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Outcome of waiting for a lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another holder kept it past the timeout.
    #[error("timed out after {waited:?} waiting for lock {}", path.display())]
    Timeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The lock file could not be opened or locked.
    #[error("lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl FileLock {
    /// Tries once, without waiting. `Ok(None)` when someone else holds it.
    ///
    /// # Errors
    /// [`LockError::Io`].
    pub fn try_acquire(path: &Path) -> Result<Option<FileLock>, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        // Lock files are empty and shared with hf-hub and Python (other users of a shared cache may need
        // to open them), so they get the normal file mode; an existing one we may not write is opened
        // read-only, which is enough for flock.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(path)
                } else {
                    Err(e)
                }
            })
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own for the duration of the call; no memory is shared.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc == 0 {
            return Ok(Some(FileLock { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(io(err))
        }
    }

    /// Waits (polling, so the task stays cancellable) up to `timeout`; `on_wait` runs once if we have to wait.
    ///
    /// # Errors
    /// [`LockError::Timeout`], [`LockError::Io`].
    pub async fn acquire(
        path: &Path,
        timeout: Duration,
        on_wait: impl FnOnce(),
    ) -> Result<FileLock, LockError> {
        let start = Instant::now();
        let mut on_wait = Some(on_wait);
        loop {
            if let Some(lock) = Self::try_acquire(path)? {
                return Ok(lock);
            }
            if let Some(f) = on_wait.take() {
                f();
            }
            if start.elapsed() >= timeout {
                return Err(LockError::Timeout {
                    path: path.to_path_buf(),
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }
}

/// Removes partial downloads nobody will resume from `blobs/`: `*.incomplete` and wick temp files older
/// than `older_than` (the time since their last written byte), whose blob no live process holds a lock
/// on, and whose etag `keep` does not claim (a blob about to be fetched resumes its partial instead).
/// Returns how many were removed.
///
/// wick calls it after a successful resolve (every blob of the model is then complete, so what is left
/// belongs to another revision or was abandoned) and when the disk check comes up short; never before
/// a download, so a partial left by a killed worker is resumed however long ago it was written.
pub fn sweep_stale_partials(
    repo: &RepoCache,
    older_than: Duration,
    keep: &dyn Fn(&str) -> bool,
) -> usize {
    let Ok(entries) = std::fs::read_dir(repo.blobs_dir()) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let etag = if let Some(etag) = name.strip_suffix(".incomplete") {
            etag
        } else if name.starts_with('.') && name.contains(".tmp-") {
            // A temp file of `write_atomic` (`.{etag}.verified.tmp-...`).
            name.trim_start_matches('.').split('.').next().unwrap_or("")
        } else {
            continue;
        };
        if !(is_sha256_hex(etag) || is_commit_hash(etag)) || keep(etag) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or(Duration::ZERO);
        if age < older_than {
            continue;
        }
        // A live writer (wick, hf-hub or Python) holds one of these locks for the whole download.
        let Ok(Some(_ours)) = FileLock::try_acquire(&repo.wick_lock(etag)) else {
            continue;
        };
        let Ok(Some(_theirs)) = FileLock::try_acquire(&repo.hf_lock(etag)) else {
            continue;
        };
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                removed += 1;
                tracing::info!(file = %entry.path().display(), age_s = age.as_secs(), "removed a stale partial download");
            }
            Err(e) => {
                tracing::warn!(file = %entry.path().display(), error = %e, "could not remove a stale partial download")
            }
        }
    }
    removed
}

/// What a `.verified` marker records about the blob it vouches for. A blob replaced or rewritten since
/// (new inode, size or mtime) no longer matches, and is hashed again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifiedMarker {
    /// The hash the content was checked against (the etag for LFS files).
    pub sha256: Option<String>,
    /// Blob size in bytes.
    pub size: u64,
    /// Blob modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Blob inode number.
    pub ino: u64,
}

impl VerifiedMarker {
    /// The marker for a blob's current metadata.
    pub fn for_metadata(meta: &std::fs::Metadata, sha256: Option<String>) -> Self {
        VerifiedMarker {
            sha256,
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ino: meta.ino(),
        }
    }
}

/// True when `repo`'s marker for `etag` matches the blob as it is now.
pub fn marker_is_valid(repo: &RepoCache, etag: &str) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(repo.blob(etag)) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let Ok(text) = read_small(&repo.marker(etag), 4096) else {
        return false;
    };
    let Ok(marker) = serde_json::from_str::<VerifiedMarker>(&text) else {
        return false;
    };
    let expected_sha = is_sha256_hex(etag).then(|| etag.to_string());
    marker == VerifiedMarker::for_metadata(&meta, marker.sha256.clone())
        && (expected_sha.is_none() || marker.sha256 == expected_sha)
}

/// Writes the marker for `etag` (atomically). Failure is logged, not fatal: a read-only cache still works,
/// it just hashes again next time.
pub fn write_marker(repo: &RepoCache, etag: &str, sha256: Option<String>) {
    let result = std::fs::symlink_metadata(repo.blob(etag)).and_then(|meta| {
        let marker = VerifiedMarker::for_metadata(&meta, sha256);
        let json = serde_json::to_vec(&marker).map_err(std::io::Error::other)?;
        write_atomic(&repo.marker(etag), &json)
    });
    if let Err(e) = result {
        tracing::warn!(etag, error = %e, "could not record blob verification; it will be hashed again next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_absence_needs_a_no_exist_marker_and_no_snapshot_entry() {
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(dir.path(), "org/name");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert!(!repo.offline_absent(commit, "sub/a.json"), "nothing known");
        repo.mark_no_exist(commit, "sub/a.json").unwrap();
        assert!(repo.offline_absent(commit, "sub/a.json"));
        assert!(
            !repo.offline_absent("f".repeat(40).as_str(), "sub/a.json"),
            "markers are per commit"
        );
        let entry = repo.snapshot(commit, "sub/a.json");
        std::fs::create_dir_all(entry.parent().unwrap()).unwrap();
        std::fs::write(&entry, b"{}").unwrap();
        assert!(
            !repo.offline_absent(commit, "sub/a.json"),
            "a snapshot entry, even one that is not a link to a blob, leaves it unknown"
        );
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ref");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ref")]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            default_file_mode()
        );
    }

    #[test]
    fn private_files_are_0600_and_never_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        drop(create_private(&path).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            create_private(&path).is_err(),
            "existing file must not be reused"
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        assert!(create_private(&link).is_err());
        assert!(!dir.path().join("target").exists());
    }

    #[tokio::test]
    async fn lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = FileLock::try_acquire(&path).unwrap().unwrap();
        assert!(FileLock::try_acquire(&path).unwrap().is_none());
        let err = FileLock::acquire(&path, Duration::from_millis(300), || {})
            .await
            .unwrap_err();
        assert!(matches!(err, LockError::Timeout { .. }));
        drop(first);
        FileLock::acquire(&path, Duration::from_secs(1), || {})
            .await
            .unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            default_file_mode(),
            "empty lock files shared with other tools get the normal mode"
        );
    }

    #[test]
    fn marker_tracks_the_blob_it_vouches_for() {
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(dir.path(), "org/m");
        let etag = "a".repeat(64);
        std::fs::create_dir_all(repo.blobs_dir()).unwrap();
        std::fs::write(repo.blob(&etag), b"content").unwrap();
        assert!(!marker_is_valid(&repo, &etag));
        write_marker(&repo, &etag, Some(etag.clone()));
        assert!(marker_is_valid(&repo, &etag));
        // Replaced by rename (new inode): no longer vouched for.
        std::fs::write(dir.path().join("new"), b"content").unwrap();
        std::fs::rename(dir.path().join("new"), repo.blob(&etag)).unwrap();
        assert!(!marker_is_valid(&repo, &etag));
        // A marker claiming another hash is ignored.
        write_marker(&repo, &etag, Some("b".repeat(64)));
        assert!(!marker_is_valid(&repo, &etag));
    }

    #[test]
    fn sweep_removes_old_unlocked_partials_only() {
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(dir.path(), "org/m");
        std::fs::create_dir_all(repo.blobs_dir()).unwrap();
        let (old, held, fresh) = ("1".repeat(64), "2".repeat(64), "3".repeat(64));
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for etag in [&old, &held] {
            let f = File::create(repo.incomplete(etag)).unwrap();
            f.set_modified(two_hours_ago).unwrap();
        }
        File::create(repo.incomplete(&fresh)).unwrap();
        std::fs::write(repo.blob(&old), b"a finished blob is never touched").unwrap();
        let _held_lock = FileLock::try_acquire(&repo.wick_lock(&held))
            .unwrap()
            .unwrap();
        let kept = "4".repeat(64);
        File::create(repo.incomplete(&kept))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let keep = |etag: &str| etag == kept;
        assert_eq!(
            sweep_stale_partials(&repo, Duration::from_secs(3600), &keep),
            1
        );
        assert!(!repo.incomplete(&old).exists());
        assert!(repo.incomplete(&held).exists());
        assert!(repo.incomplete(&fresh).exists());
        assert!(
            repo.incomplete(&kept).exists(),
            "a partial about to be resumed stays"
        );
        assert!(repo.blob(&old).exists());
    }

    #[test]
    fn partial_is_resumed_only_when_it_is_our_own_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.incomplete");
        let (mut file, len) = open_partial(&path, true).unwrap();
        assert_eq!(len, 0);
        file.write_all(b"12345").unwrap();
        drop(file);
        assert_eq!(open_partial(&path, true).unwrap().1, 5, "ours: resumed");
        assert_eq!(
            open_partial(&path, false).unwrap().1,
            0,
            "not resumable: emptied"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);

        std::fs::write(&path, b"12345").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            open_partial(&path, true).unwrap().1,
            0,
            "readable by others: replaced"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A link where the partial should be is removed, never followed.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep me").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert_eq!(open_partial(&path, true).unwrap().1, 0);
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn snapshot_links_are_relative_and_nested_files_reach_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(dir.path(), "org/m");
        let (commit, etag) = ("c".repeat(40), "a".repeat(64));
        std::fs::create_dir_all(repo.blobs_dir()).unwrap();
        std::fs::write(repo.blob(&etag), b"w").unwrap();
        for file in ["model.safetensors", "sub/dir/model.gguf"] {
            repo.link_snapshot(&commit, file, &etag).unwrap();
            let target = std::fs::read_link(repo.snapshot(&commit, file)).unwrap();
            assert!(target.is_relative(), "{target:?}");
            assert_eq!(repo.snapshot_etag(&commit, file), Some(etag.clone()));
            // Linking again replaces the link in place.
            repo.link_snapshot(&commit, file, &etag).unwrap();
        }
        let leftovers: Vec<_> = std::fs::read_dir(repo.snapshot(&commit, "x").parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn refs_hold_only_commit_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(dir.path(), "org/m");
        let commit = "c".repeat(40);
        repo.write_ref("main", &commit).unwrap();
        assert_eq!(repo.read_ref("main"), Some(commit));
        std::fs::write(repo.ref_file("main"), "../../etc").unwrap();
        assert_eq!(repo.read_ref("main"), None);
    }
}
