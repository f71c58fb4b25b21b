//! The taken-job journal (fault Q6): every job this worker takes is written to disk before any work
//! on it starts and deleted once its final body was delivered or handed to the result spool. A
//! worker killed mid-job (SIGKILL, OOM killer, node eviction) therefore leaves the job's entry
//! behind, and the next worker started on the same directory and endpoint finds it before taking new
//! jobs: the worker runs it again from the journaled input, or reports it failed
//! (`worker_restarted`) when output may already have been streamed, when it is too old, or when it
//! was already run again once (it may be what kills the worker). That decision is `worker`'s; this
//! file owns the files and who may resolve which entry.
//!
//! Layout, in the spool directory (0700): one entry per job, `<sha256(job id) hex>.taken`, holding
//! `{"version":1,"job_id":..,"endpoint":..,"input":..,"taken_at_ms":..,"runs":..,"owner":..}`
//! (0600, written under a unique temp name and renamed into place, so a killed writer never leaves
//! a half entry; not fsync'd: the journal is for the death of the process, see [`Journal::record`]); an
//! empty `<sha256(job id) hex>.streamed` marker, created before the job's first stream post; and
//! one `.owner-<token>.lock` per live worker process, `flock`ed for the process's life. An entry
//! whose owner's lock can be taken belongs to a dead process: taking that lock is what makes one
//! worker (and only one) the resolver of those entries, so live workers sharing the directory never
//! touch each other's jobs, and two restarts never resolve one entry twice.
//!
//! Entries hold job inputs: they are bounded in count, bytes and size per entry, never logged,
//! deleted as soon as their job is resolved, and deleted unread by anyone past
//! [`HARD_MAX_AGE`] (the platform's job TTL) once their owner is dead.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::warn;

use super::backoff::Jitter;
use super::log_limit::log_safe;
use super::spool::{
    file_name, hex, io_error, prepare_private_dir, remove_path, write_then_rename, SpoolError,
};
use crate::hub::cache::{FileLock, LockError};

/// Default most entries the journal holds (jobs in flight, plus entries of dead workers).
pub const DEFAULT_MAX_ENTRIES: usize = 1000;
/// Default most bytes the journal holds.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Largest entry file written or read (a job input of the largest allowed request, re-encoded,
/// plus the envelope).
pub const MAX_ENTRY_BYTES: u64 = 48 * 1024 * 1024;
/// Default for [`JournalSettings::resume_max_age`].
pub const DEFAULT_RESUME_MAX_AGE: Duration = Duration::from_secs(300);
/// Entries older than this (the platform's default job TTL: the platform has dropped the job) are
/// deleted without a report once their owner is dead, whatever endpoint they belong to.
pub const HARD_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Most runs of one job across restarts: a job whose second run was killed too is reported, not
/// run a third time (it may be the job that kills the worker).
pub const MAX_RUNS: u32 = 2;
/// Version of the entry format.
const FORMAT_VERSION: u32 = 1;
const ENTRY_SUFFIX: &str = ".taken";
const STREAMED_SUFFIX: &str = ".streamed";
/// Prefix of entry files being written (`.taken-tmp-<owner>-<n>-<name>`).
const TEMP_PREFIX: &str = ".taken-tmp-";
const OWNER_PREFIX: &str = ".owner-";
const OWNER_SUFFIX: &str = ".lock";

/// Bounds and the re-run age limit of the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSettings {
    /// Most entries; a job taken past it runs without an entry (logged).
    pub max_entries: usize,
    /// Most bytes (entry files together).
    pub max_bytes: u64,
    /// A dead worker's job is run again only when taken at most this long ago (and within the
    /// job deadline); older ones are reported failed. Zero: never run again.
    pub resume_max_age: Duration,
}

impl Default for JournalSettings {
    fn default() -> Self {
        JournalSettings {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            resume_max_age: DEFAULT_RESUME_MAX_AGE,
        }
    }
}

/// A journal operation that failed.
#[derive(Debug, Error)]
pub enum JournalError {
    /// A file-system call failed (the spool's directory helpers report these).
    #[error(transparent)]
    Io(#[from] SpoolError),
    /// An owner lock could not be taken or checked.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The journal is at its entry or byte bound.
    #[error(
        "journal is full ({entries} entries, {bytes} bytes; bounds {max_entries} / {max_bytes})"
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
    /// One entry would be larger than [`MAX_ENTRY_BYTES`].
    #[error("job input too large to journal ({bytes} bytes; limit {MAX_ENTRY_BYTES})")]
    TooLarge {
        /// Encoded entry size.
        bytes: u64,
    },
    /// An entry file that is not a valid entry (truncated, garbled, renamed).
    #[error("corrupt journal entry {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry written by a newer wick (left alone).
    #[error("journal entry {path} has unknown format version {version}")]
    UnknownVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
}

/// One taken job as journaled. `Debug` leaves the input out (it is user data).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct TakenEntry {
    /// The platform's job id.
    pub job_id: String,
    /// [`super::spool::endpoint_digest`] of the job-done template: only a worker of the same
    /// endpoint resolves the entry.
    pub endpoint: String,
    /// The job's input, as taken.
    pub input: Value,
    /// When the job was first taken (Unix milliseconds; wall clock, as it crosses processes).
    pub taken_at_ms: u64,
    /// Runs started so far (1 when taken; each resume adds one).
    pub runs: u32,
    /// Owner token of the process running it (its `.owner-<token>.lock`).
    pub owner: String,
}

impl fmt::Debug for TakenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TakenEntry")
            .field("job_id", &self.job_id)
            .field("endpoint", &self.endpoint)
            .field("input", &"<redacted>")
            .field("taken_at_ms", &self.taken_at_ms)
            .field("runs", &self.runs)
            .field("owner", &self.owner)
            .finish()
    }
}

impl TakenEntry {
    /// How long ago the job was first taken (zero when the clock went backwards).
    pub fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.taken_at_ms))
    }
}

#[derive(Serialize, Deserialize)]
struct EntryFile {
    version: u32,
    #[serde(flatten)]
    entry: TakenEntry,
}

/// The current time in Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A dead worker's job, claimed by this process (its entry now names this owner and counts this
/// run).
#[derive(Debug, Clone, PartialEq)]
pub struct Orphan {
    /// The entry as rewritten by the claim (`runs` includes the run about to start).
    pub entry: TakenEntry,
    /// Whether a stream post of it may have gone out.
    pub streamed: bool,
}

/// What a recovery pass found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// Entries of dead workers of this endpoint, now this process's to resolve.
    pub claimed: Vec<Orphan>,
    /// Entries held by live workers (their own jobs in flight), left alone.
    pub live: u64,
    /// Entries of dead workers of other endpoints, left for a worker of theirs.
    pub foreign: u64,
    /// Entries of dead workers past [`HARD_MAX_AGE`], deleted.
    pub expired: u64,
    /// Unreadable, truncated or garbled entries, deleted (each logged).
    pub corrupt: u64,
    /// Entries of an unknown format version, left alone (logged).
    pub unknown: u64,
}

/// The journal of one worker process. Cheap to clone; the owner lock is released when the last
/// clone is dropped (or the process dies).
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    settings: Arc<JournalSettings>,
    owner: Arc<str>,
    _owner_lock: Arc<FileLock>,
    temp_counter: Arc<AtomicU64>,
}

impl Journal {
    /// Opens the journal in `dir` (created 0700 when missing; symlinks refused), takes this
    /// process's owner lock, and removes temp files dead writers left behind.
    ///
    /// # Errors
    /// [`JournalError`] when the directory or the owner lock cannot be set up.
    pub fn open(
        dir: impl Into<PathBuf>,
        settings: JournalSettings,
    ) -> Result<Journal, JournalError> {
        let dir = dir.into();
        prepare_private_dir(&dir)?;
        let owner = owner_token();
        let lock_path = owner_lock_path(&dir, &owner);
        let Some(lock) = FileLock::try_acquire(&lock_path)? else {
            return Err(JournalError::Io(SpoolError::Io {
                what: "lock",
                path: lock_path,
                source: std::io::Error::other("a fresh owner lock is held by another process"),
            }));
        };
        let journal = Journal {
            dir,
            settings: Arc::new(settings),
            owner: owner.into(),
            _owner_lock: Arc::new(lock),
            temp_counter: Arc::new(AtomicU64::new(0)),
        };
        journal.sweep_temp_files()?;
        Ok(journal)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings.
    pub fn settings(&self) -> &JournalSettings {
        &self.settings
    }

    /// This process's owner token.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The entry file of a job.
    pub fn path_for(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{}{ENTRY_SUFFIX}", job_hash(job_id)))
    }

    /// The "streamed" marker of a job.
    pub fn streamed_path_for(&self, job_id: &str) -> PathBuf {
        self.dir
            .join(format!("{}{STREAMED_SUFFIX}", job_hash(job_id)))
    }

    /// A new entry for a job this process has just taken.
    pub fn entry_for(&self, job_id: &str, endpoint: &str, input: Value) -> TakenEntry {
        TakenEntry {
            job_id: job_id.to_owned(),
            endpoint: endpoint.to_owned(),
            input,
            taken_at_ms: now_ms(),
            runs: 1,
            owner: self.owner.to_string(),
        }
    }

    /// Entry files now in the journal, in name order.
    ///
    /// # Errors
    /// [`JournalError::Io`] when the directory cannot be read.
    pub fn entries(&self) -> Result<Vec<PathBuf>, JournalError> {
        let mut found = self.list(|name| !name.starts_with('.') && name.ends_with(ENTRY_SUFFIX))?;
        found.sort();
        Ok(found)
    }

    /// Entry count and total bytes.
    ///
    /// # Errors
    /// [`JournalError::Io`] when the directory cannot be read.
    pub fn usage(&self) -> Result<(usize, u64), JournalError> {
        Ok(crate::queue::spool::count_and_bytes(&self.entries()?))
    }

    /// Writes (or replaces) an entry atomically: unique temp file (0600), then rename (no fsync:
    /// durable against the death of the process, not against a power loss).
    ///
    /// # Errors
    /// [`JournalError::Full`] / [`JournalError::TooLarge`] past the bounds (nothing written),
    /// [`JournalError::Io`] otherwise.
    pub fn record(&self, entry: &TakenEntry) -> Result<PathBuf, JournalError> {
        let target = self.path_for(&entry.job_id);
        let text = serde_json::to_vec(&EntryFile {
            version: FORMAT_VERSION,
            entry: entry.clone(),
        })
        .map_err(|e| JournalError::Corrupt {
            path: target.clone(),
            reason: e.to_string(),
        })?;
        let size = text.len() as u64;
        if size > MAX_ENTRY_BYTES {
            return Err(JournalError::TooLarge { bytes: size });
        }
        let (entries, bytes) = self.usage()?;
        let replacing = fs::metadata(&target).map(|m| m.len()).ok();
        let entries_after = entries + usize::from(replacing.is_none());
        let bytes_after = bytes.saturating_sub(replacing.unwrap_or(0)) + size;
        if entries_after > self.settings.max_entries || bytes_after > self.settings.max_bytes {
            return Err(JournalError::Full {
                entries,
                bytes,
                max_entries: self.settings.max_entries,
                max_bytes: self.settings.max_bytes,
            });
        }
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{}-{}-{}",
            self.owner,
            self.temp_counter.fetch_add(1, Ordering::Relaxed),
            file_name(&target)
        ));
        // No fsync: the journal guards against the death of the process (SIGKILL, the OOM
        // killer), which the page cache survives; an fsync would cost every job start several
        // milliseconds, and widen the moment in which a kill loses a job just taken. After a
        // power loss a half-written entry reads as corrupt and is deleted (the container disk
        // seldom survives that anyway; the platform's timeout and `/retry` cover it).
        write_then_rename(&temp, &target, &text, false)?;
        Ok(target)
    }

    /// Records that a stream post of the job is about to go out: from now on a restart reports
    /// the job instead of running it again. Call before the first stream post.
    ///
    /// # Errors
    /// [`JournalError::Io`] when the marker cannot be written.
    pub fn mark_streamed(&self, job_id: &str) -> Result<(), JournalError> {
        let path = self.streamed_path_for(job_id);
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_error("create", &path))?;
        Ok(())
    }

    /// Whether a job's "streamed" marker exists.
    pub fn was_streamed(&self, job_id: &str) -> bool {
        fs::symlink_metadata(self.streamed_path_for(job_id)).is_ok()
    }

    /// Deletes a job's entry, then its marker (in that order: an entry is never left without the
    /// marker it had). Missing files are fine.
    ///
    /// # Errors
    /// [`JournalError::Io`] when a file exists but cannot be removed.
    pub fn remove(&self, job_id: &str) -> Result<(), JournalError> {
        remove_path(&self.path_for(job_id))?;
        remove_path(&self.streamed_path_for(job_id))?;
        Ok(())
    }

    /// Reads one entry file, checking its size, format and that its name matches its job id.
    ///
    /// # Errors
    /// [`JournalError::Io`] when it cannot be read, [`JournalError::Corrupt`] when it is not a
    /// valid entry, [`JournalError::UnknownVersion`] for a newer format.
    pub fn load(&self, path: &Path) -> Result<TakenEntry, JournalError> {
        let corrupt = |reason: String| JournalError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_error("open", path))?;
        let mut text = Vec::new();
        file.take(MAX_ENTRY_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io_error("read", path))?;
        if text.len() as u64 > MAX_ENTRY_BYTES {
            return Err(corrupt(format!("larger than {MAX_ENTRY_BYTES} bytes")));
        }
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        // serde's message may quote a value from the file (job input): only its class and place.
        let not_an_entry = |e: serde_json::Error| {
            corrupt(format!(
                "not an entry ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        };
        let version: Version = serde_json::from_slice(&text).map_err(not_an_entry)?;
        if version.version != FORMAT_VERSION {
            return Err(JournalError::UnknownVersion {
                path: path.to_owned(),
                version: version.version,
            });
        }
        let file: EntryFile = serde_json::from_slice(&text).map_err(not_an_entry)?;
        if self.path_for(&file.entry.job_id) != path {
            return Err(corrupt("file name does not match its job id".into()));
        }
        if !valid_owner(&file.entry.owner) {
            return Err(corrupt("invalid owner token".into()));
        }
        Ok(file.entry)
    }

    /// The recovery pass at start: finds entries whose owner process is dead, claims those of
    /// `endpoint` (rewritten with this owner and one more run), deletes corrupt ones and those past
    /// [`HARD_MAX_AGE`], and leaves everything else alone. Blocking; run it on the blocking pool.
    ///
    /// # Errors
    /// [`JournalError::Io`] when the directory cannot be listed (single entries that fail are
    /// logged and skipped).
    pub fn recover(&self, endpoint: &str) -> Result<Recovery, JournalError> {
        let mut recovery = Recovery::default();
        let mut by_owner: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for path in self.entries()? {
            match self.load(&path) {
                Ok(entry) => by_owner.entry(entry.owner).or_default().push(path),
                Err(error) => self.drop_unreadable(&path, &error, &mut recovery),
            }
        }
        let now = now_ms();
        for (owner, paths) in &by_owner {
            if owner.as_str() == &*self.owner {
                recovery.live += paths.len() as u64;
                continue;
            }
            let lock_path = owner_lock_path(&self.dir, owner);
            let Some(lock) = FileLock::try_acquire(&lock_path)? else {
                recovery.live += paths.len() as u64;
                continue;
            };
            for path in paths {
                // Read again under the lock: another restart may have claimed or resolved it
                // between the listing and the lock.
                let entry = match self.load(path) {
                    Ok(entry) => entry,
                    Err(JournalError::Io(SpoolError::Io { source, .. }))
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        continue;
                    }
                    Err(error) => {
                        self.drop_unreadable(path, &error, &mut recovery);
                        continue;
                    }
                };
                if entry.owner != *owner {
                    recovery.live += 1;
                    continue;
                }
                if entry.age(now) > HARD_MAX_AGE {
                    warn!(job_id = %log_safe(&entry.job_id), age_secs = entry.age(now).as_secs(),
                        "journal entry of a dead worker is past the job TTL: deleted unreported");
                    if let Err(error) = self.remove(&entry.job_id) {
                        warn!(%error, "expired journal entry could not be removed");
                    }
                    recovery.expired += 1;
                    continue;
                }
                if entry.endpoint != endpoint {
                    recovery.foreign += 1;
                    continue;
                }
                let streamed = self.was_streamed(&entry.job_id);
                let claimed = TakenEntry {
                    runs: entry.runs.saturating_add(1),
                    owner: self.owner.to_string(),
                    ..entry
                };
                match self.record(&claimed) {
                    Ok(_path) => recovery.claimed.push(Orphan {
                        entry: claimed,
                        streamed,
                    }),
                    Err(error) => {
                        warn!(job_id = %log_safe(&claimed.job_id), %error,
                            "journal entry of a dead worker could not be claimed; left for a later start");
                    }
                }
            }
            // The dead owner's lock file is no longer needed (a missing one reads as dead too).
            if let Err(error) = remove_path(&lock_path) {
                warn!(%error, "dead worker's journal lock file could not be removed");
            }
            drop(lock);
        }
        self.sweep_owner_files(&by_owner);
        Ok(recovery)
    }

    /// Deletes this process's owner lock file (at a clean exit); entries it still holds read as
    /// a dead owner's at the next start.
    pub fn close(&self) {
        if let Err(error) = remove_path(&owner_lock_path(&self.dir, &self.owner)) {
            warn!(%error, "journal owner lock file could not be removed");
        }
    }

    fn drop_unreadable(&self, path: &Path, error: &JournalError, recovery: &mut Recovery) {
        match error {
            JournalError::UnknownVersion { .. } => {
                warn!(%error, "journal entry of an unknown format: left alone");
                recovery.unknown += 1;
            }
            JournalError::Io(SpoolError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            _ => {
                warn!(%error, "journal entry unreadable: deleting it");
                recovery.corrupt += 1;
                if let Err(error) = remove_path(path) {
                    warn!(%error, "unreadable journal entry could not be removed");
                }
                // Its marker goes with it (the name is the same hash).
                if let Some(stem) = file_name(path).strip_suffix(ENTRY_SUFFIX) {
                    let marker = self.dir.join(format!("{stem}{STREAMED_SUFFIX}"));
                    if let Err(error) = remove_path(&marker) {
                        warn!(%error, "journal marker could not be removed");
                    }
                }
            }
        }
    }

    /// Removes temp files whose writer is dead (never a live process's file being written).
    fn sweep_temp_files(&self) -> Result<(), JournalError> {
        for temp in self.list(|name| name.starts_with(TEMP_PREFIX))? {
            let name = file_name(&temp);
            let owner = name[TEMP_PREFIX.len()..].split('-').next().unwrap_or("");
            if owner == &*self.owner || !valid_owner(owner) {
                continue;
            }
            let Some(_lock) = FileLock::try_acquire(&owner_lock_path(&self.dir, owner))? else {
                continue;
            };
            if let Err(error) = remove_path(&temp) {
                warn!(%error, "stale journal temp file could not be removed");
            }
        }
        Ok(())
    }

    /// Removes lock files of dead owners no entry names, and markers without an entry older than a
    /// minute (a live worker deletes a marker right after its entry).
    fn sweep_owner_files(&self, owners: &BTreeMap<String, Vec<PathBuf>>) {
        let Ok(locks) =
            self.list(|name| name.starts_with(OWNER_PREFIX) && name.ends_with(OWNER_SUFFIX))
        else {
            return;
        };
        for path in locks {
            let name = file_name(&path);
            let owner = &name[OWNER_PREFIX.len()..name.len() - OWNER_SUFFIX.len()];
            if owner == &*self.owner || owners.contains_key(owner) || !valid_owner(owner) {
                continue;
            }
            if let Ok(Some(_lock)) = FileLock::try_acquire(&path) {
                if let Err(error) = remove_path(&path) {
                    warn!(%error, "dead worker's journal lock file could not be removed");
                }
            }
        }
        let Ok(markers) =
            self.list(|name| !name.starts_with('.') && name.ends_with(STREAMED_SUFFIX))
        else {
            return;
        };
        for marker in markers {
            let stem = &file_name(&marker)[..file_name(&marker).len() - STREAMED_SUFFIX.len()];
            let entry_exists =
                fs::symlink_metadata(self.dir.join(format!("{stem}{ENTRY_SUFFIX}"))).is_ok();
            let old = fs::symlink_metadata(&marker)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60));
            if !entry_exists && old {
                if let Err(error) = remove_path(&marker) {
                    warn!(%error, "orphan journal marker could not be removed");
                }
            }
        }
    }

    /// Files in the directory whose names pass `keep`.
    fn list(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>, JournalError> {
        let dir = &self.dir;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
            let path = entry.map_err(io_error("list", dir))?.path();
            if keep(file_name(&path)) {
                found.push(path);
            }
        }
        Ok(found)
    }
}

fn job_hash(job_id: &str) -> String {
    hex(&Sha256::digest(job_id.as_bytes()))
}

fn owner_lock_path(dir: &Path, owner: &str) -> PathBuf {
    dir.join(format!("{OWNER_PREFIX}{owner}{OWNER_SUFFIX}"))
}

/// Owner tokens are lowercase hex (they become file names).
fn valid_owner(owner: &str) -> bool {
    !owner.is_empty() && owner.len() <= 64 && owner.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A fresh owner token: the pid and 64 random bits, hex.
fn owner_token() -> String {
    let mut jitter = Jitter::new();
    let random: String = (0..2)
        .map(|_| format!("{:08x}", (jitter.unit() * f64::from(u32::MAX)) as u32))
        .collect();
    format!("{:x}{random}", std::process::id())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ENDPOINT: &str = "endpoint-digest";

    fn open(dir: &Path) -> Journal {
        Journal::open(dir, JournalSettings::default()).unwrap()
    }

    #[test]
    fn entries_are_private_and_round_trip_without_logging_the_input() {
        let tmp = tempfile::tempdir().unwrap();
        let journal = open(tmp.path());
        let entry = journal.entry_for("job/1?x", ENDPOINT, serde_json::json!({"prompt": "secret"}));
        let path = journal.record(&entry).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(journal.load(&path).unwrap(), entry);
        assert!(!format!("{entry:?}").contains("secret"));
        journal.mark_streamed("job/1?x").unwrap();
        assert!(journal.was_streamed("job/1?x"));
        journal.remove("job/1?x").unwrap();
        journal.remove("job/1?x").unwrap();
        assert!(journal.entries().unwrap().is_empty());
        assert!(!journal.was_streamed("job/1?x"));
    }

    #[test]
    fn a_live_owners_entries_are_never_claimed_and_a_dead_ones_once() {
        let tmp = tempfile::tempdir().unwrap();
        let first = open(tmp.path());
        first
            .record(&first.entry_for("a", ENDPOINT, Value::Null))
            .unwrap();
        let second = open(tmp.path());
        let found = second.recover(ENDPOINT).unwrap();
        assert!(found.claimed.is_empty());
        assert_eq!(found.live, 1);
        drop(first);
        let found = second.recover(ENDPOINT).unwrap();
        assert_eq!(found.claimed.len(), 1);
        assert_eq!(found.claimed[0].entry.runs, 2);
        assert_eq!(found.claimed[0].entry.owner, second.owner());
        // The claim is durable: a third process sees the entry as the (live) second's.
        let third = open(tmp.path());
        let found = third.recover(ENDPOINT).unwrap();
        assert!(found.claimed.is_empty());
        assert_eq!(found.live, 1);
    }

    #[test]
    fn foreign_endpoints_are_left_and_expired_entries_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = open(tmp.path());
        dead.record(&dead.entry_for("other", "another-endpoint", Value::Null))
            .unwrap();
        let mut old = dead.entry_for("old", ENDPOINT, Value::Null);
        old.taken_at_ms = now_ms() - HARD_MAX_AGE.as_millis() as u64 - 1000;
        dead.record(&old).unwrap();
        drop(dead);
        let journal = open(tmp.path());
        let found = journal.recover(ENDPOINT).unwrap();
        assert_eq!((found.foreign, found.expired), (1, 1));
        assert!(found.claimed.is_empty());
        assert_eq!(journal.entries().unwrap().len(), 1);
    }

    #[test]
    fn corrupt_and_truncated_entries_are_deleted_and_unknown_versions_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let journal = open(tmp.path());
        fs::write(
            tmp.path().join(format!("{}.taken", job_hash("a"))),
            b"{\"version\":1,\"job_",
        )
        .unwrap();
        fs::write(tmp.path().join(format!("{}.taken", job_hash("b"))), b"").unwrap();
        fs::write(
            tmp.path().join(format!("{}.taken", job_hash("c"))),
            b"{\"version\":9}",
        )
        .unwrap();
        // A valid entry under the wrong name.
        let entry = journal.entry_for("d", ENDPOINT, Value::Null);
        let path = journal.record(&entry).unwrap();
        fs::rename(&path, tmp.path().join(format!("{}.taken", job_hash("e")))).unwrap();
        // An owner token that is no file name.
        let mut entry = journal.entry_for("f", ENDPOINT, Value::Null);
        entry.owner = "../../x".into();
        journal.record(&entry).unwrap();
        let found = journal.recover(ENDPOINT).unwrap();
        assert_eq!((found.corrupt, found.unknown), (4, 1));
        assert_eq!(journal.entries().unwrap().len(), 1);
    }

    #[test]
    fn the_journal_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let journal = Journal::open(
            tmp.path(),
            JournalSettings {
                max_entries: 1,
                ..JournalSettings::default()
            },
        )
        .unwrap();
        journal
            .record(&journal.entry_for("a", ENDPOINT, Value::Null))
            .unwrap();
        journal
            .record(&journal.entry_for("a", ENDPOINT, Value::Null))
            .unwrap();
        assert!(matches!(
            journal.record(&journal.entry_for("b", ENDPOINT, Value::Null)),
            Err(JournalError::Full { entries: 1, .. })
        ));
    }

    #[test]
    fn dead_writers_temp_files_and_lock_files_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = open(tmp.path());
        let token = dead.owner().to_owned();
        drop(dead);
        fs::write(
            tmp.path().join(format!("{TEMP_PREFIX}{token}-0-x.taken")),
            b"partial",
        )
        .unwrap();
        let journal = open(tmp.path());
        journal.recover(ENDPOINT).unwrap();
        let names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![format!(".owner-{}.lock", journal.owner())]);
        journal.close();
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
