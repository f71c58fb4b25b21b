//! The result spool (faults Q2, Q5, Q6): a job's final job-done body is written to disk before its
//! first post and deleted once the platform acknowledged it (2xx) or no longer knows the job
//! (404/410). A result whose delivery failed therefore survives the process: it is replayed when
//! the worker starts (before any job is taken) and once more during the shutdown drain.
//!
//! Layout: one file per job, `<sha256(job id) hex>.json`, holding
//! `{"version":1,"job_id":..,"is_stream":..,"body":"<the exact job-done text>"}`. The directory is
//! 0700 and every file 0600; a file is written under a unique `.tmp-*` name, fsync'd, renamed into
//! place and the directory fsync'd, so a crash leaves either the old state or the complete entry.
//! The spool is bounded in entries and bytes; past either bound a result is still posted, just not
//! spooled (and that is logged). Owned here: the files. Not here: the posts (`client`) and when to
//! spool (`job_task`, `worker`).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::{info, warn};

use super::backoff::RetryPolicy;
use super::client::{PlatformClient, PostOutcome};
use super::log_limit::log_safe;
use super::worker::MAX_RESULT_BYTES;

/// Default most entries the spool holds.
pub const DEFAULT_MAX_ENTRIES: usize = 1000;
/// Default most bytes the spool holds.
pub const DEFAULT_MAX_BYTES: u64 = 512 * 1024 * 1024;
/// Version of the entry format.
const FORMAT_VERSION: u32 = 1;
/// Largest spool file we read: a maximal result, JSON-escaped (at most 6 bytes per byte for
/// `\u00XX`), plus the envelope.
const MAX_ENTRY_FILE_BYTES: u64 = 6 * MAX_RESULT_BYTES as u64 + 64 * 1024;
/// Prefix of files being written (never read as entries; stale ones are removed at open).
const TEMP_PREFIX: &str = ".tmp-";

/// Where and how much to spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolSettings {
    /// The spool directory (created 0700 when missing).
    pub dir: PathBuf,
    /// Most entries kept; results past it are posted without a spool file.
    pub max_entries: usize,
    /// Most bytes kept (entry files together).
    pub max_bytes: u64,
    /// The taken-job journal kept in the same directory (`None`: no journal; a job in flight when
    /// the process is killed is then lost to the worker).
    pub journal: Option<super::journal::JournalSettings>,
}

impl SpoolSettings {
    /// Default bounds in `dir`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        SpoolSettings {
            dir: dir.into(),
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            journal: Some(super::journal::JournalSettings::default()),
        }
    }

    /// From the worker configuration: `WICK_SPOOL_DIR`, else `wick-spool` in the temp directory.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let dir = config
            .spool_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("wick-spool"));
        SpoolSettings {
            journal: Some(super::journal::JournalSettings {
                resume_max_age: std::time::Duration::from_secs(config.resume_max_age_secs),
                ..super::journal::JournalSettings::default()
            }),
            ..SpoolSettings::in_dir(dir)
        }
    }
}

/// A spool operation that failed.
#[derive(Debug, Error)]
pub enum SpoolError {
    /// A file-system call failed.
    #[error("spool {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The spool is at its entry or byte bound.
    #[error(
        "spool is full ({entries} entries, {bytes} bytes; bounds {max_entries} / {max_bytes})"
    )]
    Full {
        /// Entries now.
        entries: usize,
        /// Bytes now.
        bytes: u64,
        /// Entry bound.
        max_entries: usize,
        /// Byte bound.
        max_bytes: u64,
    },
    /// An entry file that is not a valid entry.
    #[error("corrupt spool entry {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// One spooled final result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpooledResult {
    /// The platform's job id (the job-done URL is built from it).
    pub job_id: String,
    /// The `isStream` flag of the job-done post.
    pub is_stream: bool,
    /// The exact job-done body text.
    pub body: String,
    /// [`endpoint_digest`] of the job-done URL template it is for: a replay posts only the
    /// entries of its own endpoint (several workers on one host may share a spool directory).
    pub endpoint: String,
}

/// SHA-256 (hex) of a job-done URL template, as stored in [`SpooledResult::endpoint`] (the URL
/// itself never reaches the disk).
pub fn endpoint_digest(done_template: &str) -> String {
    hex(&Sha256::digest(done_template.as_bytes()))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Serialize, Deserialize)]
struct EntryFile {
    version: u32,
    #[serde(flatten)]
    result: SpooledResult,
}

/// The spool directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    settings: Arc<SpoolSettings>,
    temp_counter: Arc<AtomicU64>,
}

impl Spool {
    /// Opens (creating it 0700 when missing) the spool directory, tightens its mode to 0700 and
    /// removes temp files a crash left behind.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the directory cannot be created or set up.
    pub fn open(settings: SpoolSettings) -> Result<Spool, SpoolError> {
        prepare_private_dir(&settings.dir)?;
        let spool = Spool {
            settings: Arc::new(settings),
            temp_counter: Arc::new(AtomicU64::new(0)),
        };
        for stale in spool.list(TEMP_PREFIX, "")? {
            if let Err(error) = fs::remove_file(&stale) {
                warn!(path = %stale.display(), %error, "stale spool temp file could not be removed");
            }
        }
        Ok(spool)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.settings.dir
    }

    /// The entry file of a job.
    pub fn path_for(&self, job_id: &str) -> PathBuf {
        let name = hex(&Sha256::digest(job_id.as_bytes()));
        self.settings.dir.join(format!("{name}.json"))
    }

    /// Entry files now in the spool, in name order (temp files excluded).
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the directory cannot be read.
    pub fn entries(&self) -> Result<Vec<PathBuf>, SpoolError> {
        let mut entries = self.list("", ".json")?;
        entries.retain(|path| !file_name(path).starts_with(TEMP_PREFIX));
        Ok(entries)
    }

    /// Entry count and total bytes.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the directory cannot be read.
    pub fn usage(&self) -> Result<(usize, u64), SpoolError> {
        Ok(count_and_bytes(&self.entries()?))
    }

    /// Writes (or replaces) a job's entry durably: unique temp file (0600), fsync, rename, fsync
    /// of the directory.
    ///
    /// # Errors
    /// [`SpoolError::Full`] past the bounds (nothing written), [`SpoolError::Io`] otherwise.
    pub fn store(&self, result: &SpooledResult) -> Result<PathBuf, SpoolError> {
        let text = serde_json::to_vec(&EntryFile {
            version: FORMAT_VERSION,
            result: result.clone(),
        })
        .map_err(|e| SpoolError::Corrupt {
            path: self.path_for(&result.job_id),
            reason: e.to_string(),
        })?;
        let target = self.path_for(&result.job_id);
        let (entries, bytes) = self.usage()?;
        let replacing = fs::metadata(&target).map(|m| m.len()).ok();
        let entries_after = entries + usize::from(replacing.is_none());
        let bytes_after = bytes - replacing.unwrap_or(0) + text.len() as u64;
        if entries_after > self.settings.max_entries || bytes_after > self.settings.max_bytes {
            return Err(SpoolError::Full {
                entries,
                bytes,
                max_entries: self.settings.max_entries,
                max_bytes: self.settings.max_bytes,
            });
        }
        let temp = self.settings.dir.join(format!(
            "{TEMP_PREFIX}{}-{}-{}",
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed),
            file_name(&target)
        ));
        // A leftover temp file is also removed at the next open.
        write_then_rename(&temp, &target, &text, true)?;
        sync_dir(&self.settings.dir)?;
        Ok(target)
    }

    /// Deletes a job's entry; a missing entry is fine.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the file exists but cannot be removed.
    pub fn remove(&self, job_id: &str) -> Result<(), SpoolError> {
        remove_path(&self.path_for(job_id))
    }

    /// Reads one entry file, checking its size, format and that its name matches its job id.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when it cannot be read, [`SpoolError::Corrupt`] when it is not a valid
    /// entry.
    pub fn load(&self, path: &Path) -> Result<SpooledResult, SpoolError> {
        let corrupt = |reason: String| SpoolError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).map_err(io_error("open", path))?;
        let mut text = Vec::new();
        file.take(MAX_ENTRY_FILE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io_error("read", path))?;
        if text.len() as u64 > MAX_ENTRY_FILE_BYTES {
            return Err(corrupt(format!("larger than {MAX_ENTRY_FILE_BYTES} bytes")));
        }
        let entry: EntryFile =
            serde_json::from_slice(&text).map_err(|e| corrupt(format!("not an entry: {e}")))?;
        if entry.version != FORMAT_VERSION {
            return Err(corrupt(format!("unknown version {}", entry.version)));
        }
        if self.path_for(&entry.result.job_id) != path {
            return Err(corrupt("file name does not match its job id".into()));
        }
        match serde_json::from_str::<serde_json::Value>(&entry.result.body) {
            Ok(serde_json::Value::Object(_)) => Ok(entry.result),
            _ => Err(corrupt("body is not a JSON object".into())),
        }
    }

    /// Files in the directory whose names start with `prefix` and end with `suffix`.
    fn list(&self, prefix: &str, suffix: &str) -> Result<Vec<PathBuf>, SpoolError> {
        let dir = &self.settings.dir;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
            let entry = entry.map_err(io_error("list", dir))?;
            let path = entry.path();
            let name = file_name(&path);
            if name.starts_with(prefix) && name.ends_with(suffix) {
                found.push(path);
            }
        }
        found.sort();
        Ok(found)
    }
}

/// Creates `dir` (0700) when missing, refuses a symlink or non-directory, and tightens its mode to
/// 0700 (the chmod succeeds only for the directory's owner). Shared with the taken-job journal.
///
/// # Errors
/// [`SpoolError::Io`] when the directory cannot be created or set up.
pub(super) fn prepare_private_dir(dir: &Path) -> Result<(), SpoolError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("create", dir))?;
    // A symlink (e.g. planted in a shared temp directory) is refused; on a real directory the
    // chmod succeeds only for its owner, so results never land in someone else's directory.
    let meta = fs::symlink_metadata(dir).map_err(io_error("stat", dir))?;
    if !meta.file_type().is_dir() {
        return Err(SpoolError::Io {
            what: "open",
            path: dir.to_owned(),
            source: std::io::Error::other("not a directory (symlinks are refused)"),
        });
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error("chmod", dir))?;
    Ok(())
}

/// What a replay pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Entries delivered (2xx) and removed.
    pub delivered: u64,
    /// Entries the platform no longer knows (404/410), removed.
    pub gone: u64,
    /// Entries refused for good (other 4xx), removed.
    pub rejected: u64,
    /// Unreadable or corrupt entries, removed.
    pub corrupt: u64,
    /// Entries left for a later pass (delivery failed, or the pass stopped early).
    pub kept: u64,
    /// Entries of another endpoint, left alone.
    pub foreign: u64,
}

/// Posts every spooled result of `endpoint` (an [`endpoint_digest`]) not in `skip` (jobs still
/// in flight) to job-done with `policy`,
/// removing each one the platform acknowledged or no longer knows. Corrupt entries are logged and
/// removed. After a delivery whose retries ran out the pass stops (the platform is unreachable);
/// the rest stay for a later pass. Blocking file-system calls run on the blocking pool.
pub(super) async fn replay(
    spool: &Spool,
    client: &PlatformClient,
    policy: RetryPolicy,
    skip: &[String],
    endpoint: &str,
) -> ReplayReport {
    let mut report = ReplayReport::default();
    let listing = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || spool.entries()).await
    };
    let paths = match listing {
        Ok(Ok(paths)) => paths,
        Ok(Err(error)) => {
            warn!(%error, "spool could not be listed; nothing replayed");
            return report;
        }
        Err(error) => {
            warn!(%error, "spool listing task failed; nothing replayed");
            return report;
        }
    };
    let mut remaining = paths.len() as u64;
    for path in paths {
        remaining -= 1;
        let loaded = {
            let (spool, path) = (spool.clone(), path.clone());
            tokio::task::spawn_blocking(move || spool.load(&path)).await
        };
        let entry = match loaded {
            Ok(Ok(entry)) => entry,
            Ok(Err(error)) => {
                warn!(%error, "spool entry unreadable: removing it");
                report.corrupt += 1;
                remove_logged(&path).await;
                continue;
            }
            Err(error) => {
                warn!(%error, "spool read task failed; entry kept");
                report.kept += 1;
                continue;
            }
        };
        if skip.contains(&entry.job_id) {
            continue;
        }
        if entry.endpoint != endpoint {
            report.foreign += 1;
            continue;
        }
        let outcome = client
            .post_done(&entry.job_id, &entry.body, entry.is_stream, policy)
            .await;
        match outcome {
            PostOutcome::Delivered { attempts } => {
                info!(job_id = %log_safe(&entry.job_id), attempts, "spooled result delivered");
                report.delivered += 1;
            }
            PostOutcome::Gone { status } => {
                warn!(job_id = %log_safe(&entry.job_id), status, "spooled result dropped: the platform no longer knows the job");
                report.gone += 1;
            }
            PostOutcome::Rejected { status } => {
                warn!(job_id = %log_safe(&entry.job_id), status, "spooled result dropped: refused by the platform");
                report.rejected += 1;
            }
            PostOutcome::Exhausted {
                attempts,
                last_error,
            } => {
                report.kept += 1 + remaining;
                warn!(job_id = %log_safe(&entry.job_id), attempts, error = %last_error, kept = report.kept,
                    "spooled result still not delivered; kept for a later replay");
                return report;
            }
        }
        remove_logged(&path).await;
    }
    report
}

/// Removes an entry file on the blocking pool, logging a failure.
pub(super) async fn remove_logged(path: &Path) {
    let owned = path.to_owned();
    match tokio::task::spawn_blocking(move || remove_path(&owned)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "spool entry could not be removed"),
        Err(error) => warn!(%error, "spool removal task failed"),
    }
}

pub(super) fn remove_path(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SpoolError::Io {
            what: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync", dir))
}

pub(super) fn io_error(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> SpoolError {
    let path = path.to_owned();
    move |source| SpoolError::Io { what, path, source }
}

pub(super) fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// Writes `text` to the new private (0600) file `temp`, fsynced when `durable`, and renames it to
/// `target`; when the write fails, `temp` is removed (with a log line if even that fails).
pub(super) fn write_then_rename(
    temp: &Path,
    target: &Path,
    text: &[u8],
    durable: bool,
) -> Result<(), SpoolError> {
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(temp)?;
        file.write_all(text)?;
        if durable {
            file.sync_all()?;
        }
        Ok(())
    })();
    if let Err(source) = written {
        if let Err(error) = remove_path(temp) {
            warn!(%error, path = %temp.display(), "temp file could not be removed");
        }
        return Err(SpoolError::Io {
            what: "write",
            path: temp.to_owned(),
            source,
        });
    }
    fs::rename(temp, target).map_err(io_error("rename", target))
}

/// How many `files` there are and their total size (files that vanished meanwhile count 0 bytes).
pub(crate) fn count_and_bytes(files: &[PathBuf]) -> (usize, u64) {
    let bytes = files
        .iter()
        .filter_map(|path| fs::metadata(path).ok())
        .map(|meta| meta.len())
        .sum();
    (files.len(), bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn result(id: &str) -> SpooledResult {
        SpooledResult {
            job_id: id.into(),
            is_stream: true,
            body: r#"{"output":"x"}"#.into(),
            endpoint: endpoint_digest("http://platform/job-done/$ID"),
        }
    }

    #[test]
    fn store_is_private_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolSettings::in_dir(tmp.path().join("s"))).unwrap();
        let mode = fs::metadata(spool.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let path = spool.store(&result("job/1?x")).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(spool.load(&path).unwrap(), result("job/1?x"));
        assert_eq!(spool.entries().unwrap(), vec![path]);
        spool.remove("job/1?x").unwrap();
        spool.remove("job/1?x").unwrap();
        assert!(spool.entries().unwrap().is_empty());
    }

    #[test]
    fn full_spool_refuses_new_entries_but_replaces_existing() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolSettings {
            max_entries: 1,
            ..SpoolSettings::in_dir(tmp.path())
        })
        .unwrap();
        spool.store(&result("a")).unwrap();
        spool.store(&result("a")).unwrap();
        assert!(matches!(
            spool.store(&result("b")),
            Err(SpoolError::Full { entries: 1, .. })
        ));
    }

    #[test]
    fn renamed_or_garbled_entries_are_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolSettings::in_dir(tmp.path())).unwrap();
        let path = spool.store(&result("a")).unwrap();
        let moved = spool.path_for("b");
        fs::rename(&path, &moved).unwrap();
        assert!(matches!(
            spool.load(&moved),
            Err(SpoolError::Corrupt { .. })
        ));
        fs::write(&moved, b"{not json").unwrap();
        assert!(matches!(
            spool.load(&moved),
            Err(SpoolError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_symlinked_spool_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(Spool::open(SpoolSettings::in_dir(&link)).is_err());
    }

    #[test]
    fn open_removes_stale_temp_files() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(".tmp-1-2-x.json"), b"partial").unwrap();
        let spool = Spool::open(SpoolSettings::in_dir(tmp.path())).unwrap();
        assert!(spool.entries().unwrap().is_empty());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
