//! The Hub path: a model repo at a revision, turned into verified files in the Python-compatible cache.
//!
//! Division of labour:
//! - **metadata** (which commit a revision is, each file's etag and size, whether it exists) comes from
//!   wick's own `HEAD /{repo}/resolve/{revision}/{file}` requests, sent as Python's `huggingface_hub`
//!   (and the `hf-hub` crate) send them (no redirects followed except relative ones, so an LFS file's
//!   `X-Linked-Etag` — its sha256 — is read from the Hub's own answer). wick validates every etag and
//!   commit as hex before it names a path, classifies errors (`X-Error-Code`), and keeps its own
//!   timeouts and retries;
//! - **transfers** are wick's own `GET /{repo}/resolve/{commit}/{file}`, always at a 40-hex commit so
//!   every file comes from one commit, into the cache layout `hf-hub` and Python share (blob
//!   `blobs/{etag}` written through `blobs/{etag}.incomplete`, relative snapshot symlink). Redirects
//!   (the Hub sends LFS and Xet-stored files to a CDN or its Xet bridge, which serve plain HTTP with
//!   ranges) are followed by hand, at most 10, and the token goes only to requests whose origin
//!   (scheme, host and port) is `HF_ENDPOINT`'s: never to the CDN. With `HF_HUB_OFFLINE` nothing is
//!   sent: files come from snapshot links, refs and Python's `.no_exist` markers alone;
//! - **resume**: a broken transfer of an LFS blob (one whose sha256 is known) goes on from the bytes
//!   already in its `.incomplete` file with `Range: bytes=<len>-` (plus `If-Range` with the validator the
//!   same server sent earlier in this process). A `206` whose `Content-Range` starts where the file
//!   ends is appended; a `200` (server ignored the range, or `If-Range` did not match) or a `416`
//!   starts the file over. A killed process leaves its partial for the next one, which resumes it.
//!   Whatever the bytes went through, the whole file is hashed before the rename; a mismatch deletes
//!   the partial and fetches from byte 0 (bounded by the attempts). Small non-LFS files (no sha256 to
//!   check them against) always start over;
//! - **on top**: `flock` locks per blob across processes (wick's own and the one `hf-hub` and Python
//!   take, so no two writers share a partial; a second worker waits, then finds the blob done), a 0600
//!   partial file, sha256 verification of every LFS blob against its etag before use with a
//!   `.verified` marker so warm starts do not hash again, replacement of corrupt or truncated blobs,
//!   bounded retries with backoff and jitter, a stall watchdog, a size guard, a free-space check before
//!   the first byte, progress lines every few seconds, and cleanup of stale partial files.
//!
//! Retry bound: `max_attempts` counts consecutive attempts that did not move the file forward; an
//! attempt that leaves the partial at least [`MIN_PROGRESS`] bytes past the furthest it ever reached
//! starts that count again (so a 100 GB file on a link that drops every few GB still finishes), which
//! bounds the attempts per file by `max_attempts × (size / MIN_PROGRESS + 1)`.
//!
//! A warm start at a branch costs one HEAD (to learn the branch's commit); at a pinned commit, none.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::{
    HeaderMap, CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_RANGE, LOCATION, RANGE, RETRY_AFTER,
};
use reqwest::{StatusCode, Url};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::cache::{
    default_file_mode, marker_is_valid, open_partial, random_u64, sweep_stale_partials,
    write_marker, FileLock, RepoCache,
};
use super::disk::required_with_margin;
use super::local::{read_index, INDEX_FILE, SINGLE_FILE};
use super::progress::Transfer;
use super::source::{is_commit_hash, is_sha256_hex, HubModel, HubWeights};
use super::verify::{check_blob, Expected};
use super::{human_bytes, HubError, HubOptions, ModelFiles, WeightFiles};

/// Relative redirects followed by a HEAD (the Hub uses them for renamed repos), and redirects of any
/// kind followed by a transfer.
const MAX_RELATIVE_REDIRECTS: usize = 10;
/// Bytes past its furthest point an attempt must leave a partial file at for its failure not to count
/// against `max_attempts` (see the module docs).
pub const MIN_PROGRESS: u64 = 256 * 1024;
/// Longest `ETag` kept as an `If-Range` validator.
const MAX_VALIDATOR_LEN: usize = 256;
/// Files probed with HEAD at once.
const MAX_PARALLEL_HEADS: usize = 8;
/// Longest single retry delay.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The files that come with safetensors weights; `true` = required.
/// Newer repos keep the chat template only in `chat_template.jinja` / `chat_template.json`, which the
/// tokenizer loader finds next to `tokenizer.json` in the snapshot directory.
const SAFETENSORS_COMPANIONS: [(&str, bool); 6] = [
    ("config.json", true),
    ("tokenizer.json", true),
    ("tokenizer_config.json", false),
    ("generation_config.json", false),
    ("chat_template.jinja", false),
    ("chat_template.json", false),
];

/// Resolves a Hub model to local files (see the module docs).
///
/// # Errors
/// [`HubError`] saying what to fix.
pub async fn fetch(model: &HubModel, opts: &HubOptions) -> Result<ModelFiles, HubError> {
    let endpoint = parse_endpoint(&opts.endpoint)?;
    std::fs::create_dir_all(&opts.cache_dir).map_err(|source| HubError::Io {
        what: "creating cache directory",
        path: opts.cache_dir.clone(),
        source,
    })?;
    let cache = RepoCache::new(&opts.cache_dir, &model.repo_id);
    let fetcher = Fetcher::new(model, opts, cache, endpoint)?;
    let files = fetcher.run().await?;
    fetcher.check_contained(&files)?;
    if !opts.offline {
        // Every blob of this model is complete now: what is left, unlocked and old, nobody resumes.
        sweep_stale_partials(&fetcher.cache, opts.stale_partial_age, &|_| false);
    }
    Ok(files)
}

fn parse_endpoint(endpoint: &str) -> Result<Url, HubError> {
    let invalid = |reason: &str| HubError::InvalidEndpoint {
        endpoint: endpoint
            .split('@')
            .next_back()
            .unwrap_or_default()
            .to_string(),
        reason: reason.to_string(),
    };
    let url = Url::parse(endpoint).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("must be an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not contain credentials (use HF_TOKEN)"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must not have a query or fragment"));
    }
    Ok(url)
}

/// What a HEAD said about a file.
#[derive(Debug, Clone)]
struct HeadMeta {
    etag: String,
    size: Option<u64>,
    commit: String,
}

/// Where a file stands before any transfer.
#[derive(Debug, Clone)]
enum Located {
    /// Linked in the snapshot; the blob's etag.
    Cached(String),
    /// Not cached; the Hub has it.
    Remote(HeadMeta),
    /// The Hub (or a `.no_exist` marker) says it does not exist at this commit.
    Absent,
    /// Offline and not cached: unknown.
    Unknown,
}

/// A file to make present and verified.
#[derive(Debug, Clone)]
struct PlannedFile {
    name: String,
    etag: String,
    expected: Expected,
}

/// One attempt's failure: retry it, or give up with this error.
#[derive(Debug)]
enum Attempt {
    Retry {
        error: HubError,
        after: Option<Duration>,
    },
    /// Failed, but moved the file at least [`MIN_PROGRESS`] past its furthest point: retried without
    /// counting against `max_attempts`.
    Progressed(HubError),
    Fail(HubError),
}

/// What the attempts on one blob share: how far its partial file ever got, and the validator the
/// server sent for it (for `If-Range`).
#[derive(Debug, Default)]
struct ResumeState {
    /// `std::sync::Mutex`: held for a field update only, never across an await.
    inner: std::sync::Mutex<ResumeInner>,
}

#[derive(Debug, Default)]
struct ResumeInner {
    high_water: Option<u64>,
    validator: Option<String>,
}

impl ResumeState {
    fn with<T>(&self, f: impl FnOnce(&mut ResumeInner) -> T) -> T {
        f(&mut self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl From<HubError> for Attempt {
    fn from(e: HubError) -> Self {
        Attempt::Fail(e)
    }
}

struct Fetcher<'a> {
    model: &'a HubModel,
    opts: &'a HubOptions,
    cache: RepoCache,
    endpoint: Url,
    /// For wick's HEAD requests: no redirects, per-request deadline.
    http: reqwest::Client,
    /// For transfers: no automatic redirects (followed by hand), read-idle timeout.
    transfer_http: reqwest::Client,
    transfer: Arc<Transfer>,
}

impl<'a> Fetcher<'a> {
    fn new(
        model: &'a HubModel,
        opts: &'a HubOptions,
        cache: RepoCache,
        endpoint: Url,
    ) -> Result<Self, HubError> {
        let user_agent = format!("wick/{}", env!("CARGO_PKG_VERSION"));
        let build_error = |e: reqwest::Error| HubError::Protocol {
            repo: model.repo_id.clone(),
            file: String::new(),
            detail: format!("cannot build the HTTP client: {e}"),
        };
        let http = reqwest::Client::builder()
            .user_agent(user_agent.clone())
            .connect_timeout(opts.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(build_error)?;
        let transfer_http = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(build_error)?;
        Ok(Fetcher {
            model,
            opts,
            cache,
            endpoint,
            http,
            transfer_http,
            transfer: Transfer::new(&model.repo_id, 0),
        })
    }

    async fn run(&self) -> Result<ModelFiles, HubError> {
        let probe_file = match &self.model.weights {
            HubWeights::Safetensors => "config.json",
            HubWeights::Gguf { file } => file.as_str(),
        };
        let (commit, probe) = self.resolve_commit(probe_file).await?;
        let known: HashMap<String, HeadMeta> = probe
            .into_iter()
            .map(|m| (probe_file.to_string(), m))
            .collect();

        let files = match &self.model.weights {
            HubWeights::Gguf { file } => {
                let planned = self.plan(&commit, &[(file.clone(), true)], &known).await?;
                let paths = self.ensure_all(&commit, &planned).await?;
                let path = paths
                    .into_iter()
                    .next()
                    .ok_or_else(|| self.not_found(file, ""))?;
                ModelFiles {
                    config: None,
                    weights: WeightFiles::Gguf(path),
                    tokenizer_json: None,
                    tokenizer_config: None,
                    generation_config: None,
                }
            }
            HubWeights::Safetensors => self.run_safetensors(&commit, &known).await?,
        };

        if !self.opts.offline && !is_commit_hash(&self.model.revision) {
            self.cache
                .write_ref(&self.model.revision, &commit)
                .map_err(|source| HubError::Io {
                    what: "writing ref",
                    path: self.cache.ref_file(&self.model.revision),
                    source,
                })?;
        }
        Ok(files)
    }

    async fn run_safetensors(
        &self,
        commit: &str,
        known: &HashMap<String, HeadMeta>,
    ) -> Result<ModelFiles, HubError> {
        let mut first_round: Vec<(String, bool)> = SAFETENSORS_COMPANIONS
            .iter()
            .map(|(name, required)| ((*name).to_string(), *required))
            .collect();
        first_round.push((INDEX_FILE.to_string(), false));
        let planned = self.plan(commit, &first_round, known).await?;
        let paths = self.ensure_all(commit, &planned).await?;
        let by_name: HashMap<&str, PathBuf> =
            planned.iter().map(|p| p.name.as_str()).zip(paths).collect();

        let planned_shards = match by_name.get(INDEX_FILE) {
            Some(index) => {
                let shards: Vec<(String, bool)> =
                    read_index(index)?.into_iter().map(|s| (s, true)).collect();
                self.plan(commit, &shards, known).await?
            }
            None => {
                let single = self
                    .plan(commit, &[(SINGLE_FILE.to_string(), false)], known)
                    .await?;
                if single.is_empty() {
                    return Err(self.no_weights(commit).await);
                }
                single
            }
        };
        let shard_paths = self.ensure_all(commit, &planned_shards).await?;

        let take = |name: &str| by_name.get(name).cloned();
        Ok(ModelFiles {
            config: take("config.json"),
            weights: WeightFiles::Safetensors(shard_paths),
            tokenizer_json: take("tokenizer.json"),
            tokenizer_config: take("tokenizer_config.json"),
            generation_config: take("generation_config.json"),
        })
    }

    /// Learns the commit of the requested revision: itself when it is a commit (no request), the cached
    /// ref when offline, else one HEAD of `probe_file` (whose metadata is returned for reuse).
    async fn resolve_commit(
        &self,
        probe_file: &str,
    ) -> Result<(String, Option<HeadMeta>), HubError> {
        let revision = &self.model.revision;
        if is_commit_hash(revision) {
            return Ok((revision.clone(), None));
        }
        if self.opts.offline {
            return match self.cache.read_ref(revision) {
                Some(commit) => Ok((commit, None)),
                None => Err(self.not_cached(&format!("refs/{revision}"))),
            };
        }
        let meta = self
            .with_retries(probe_file, |_| async {
                match self.head(revision, probe_file).await? {
                    Some(meta) => Ok(meta),
                    None => Err(Attempt::Fail(
                        self.not_found(probe_file, self.missing_hint(probe_file)),
                    )),
                }
            })
            .await?;
        Ok((meta.commit.clone(), Some(meta)))
    }

    /// Locates `files` and turns the present ones into plans; a required file that is absent fails.
    async fn plan(
        &self,
        commit: &str,
        files: &[(String, bool)],
        known: &HashMap<String, HeadMeta>,
    ) -> Result<Vec<PlannedFile>, HubError> {
        // Futures collected first: a closure inside the stream type would make the future !Send.
        let lookups: Vec<_> = files
            .iter()
            .map(|(name, _)| self.locate(commit, name, known.get(name)))
            .collect();
        let located: Vec<Located> = stream::iter(lookups)
            .buffered(MAX_PARALLEL_HEADS)
            .try_collect()
            .await?;
        let mut planned = Vec::new();
        for ((name, required), located) in files.iter().zip(located) {
            let (etag, mut expected) = match located {
                Located::Cached(etag) => {
                    let sha256 = is_sha256_hex(&etag).then(|| etag.clone());
                    (etag, Expected { size: None, sha256 })
                }
                Located::Remote(meta) => {
                    let sha256 = is_sha256_hex(&meta.etag).then(|| meta.etag.clone());
                    (
                        meta.etag,
                        Expected {
                            size: meta.size,
                            sha256,
                        },
                    )
                }
                Located::Absent if *required => {
                    return Err(self.not_found(name, self.missing_hint(name)))
                }
                Located::Unknown if *required => return Err(self.not_cached(name)),
                Located::Absent | Located::Unknown => continue,
            };
            if let Some(pin) = self.pin_for(name) {
                match &expected.sha256 {
                    Some(served) if served != pin => {
                        return Err(HubError::PinMismatch {
                            repo: self.model.repo_id.clone(),
                            file: name.clone(),
                            pinned: pin.to_string(),
                            served: served.clone(),
                        });
                    }
                    _ => expected.sha256 = Some(pin.to_string()),
                }
            }
            planned.push(PlannedFile {
                name: name.clone(),
                etag,
                expected,
            });
        }
        Ok(planned)
    }

    fn pin_for(&self, name: &str) -> Option<&str> {
        match &self.model.weights {
            HubWeights::Gguf { file } if file == name => self.model.pinned_sha256.as_deref(),
            _ => None,
        }
    }

    async fn locate(
        &self,
        commit: &str,
        file: &str,
        known: Option<&HeadMeta>,
    ) -> Result<Located, HubError> {
        if let Some(etag) = self.cache.snapshot_etag(commit, file) {
            return Ok(Located::Cached(etag));
        }
        if self.opts.offline {
            // Cache-only: the file is known absent only through a `.no_exist` marker (Python writes them).
            return Ok(if self.cache.offline_absent(commit, file) {
                Located::Absent
            } else {
                Located::Unknown
            });
        }
        if self.cache.no_exist(commit, file).exists() {
            return Ok(Located::Absent);
        }
        if let Some(meta) = known.filter(|m| m.commit == commit) {
            return Ok(Located::Remote(meta.clone()));
        }
        let head = self
            .with_retries(file, |_| async { self.head(commit, file).await })
            .await?;
        match head {
            Some(meta) => Ok(Located::Remote(meta)),
            None => {
                if let Err(e) = self.cache.mark_no_exist(commit, file) {
                    tracing::debug!(file, error = %e, "could not write .no_exist marker");
                }
                Ok(Located::Absent)
            }
        }
    }

    /// Makes every planned file present and verified (bounded parallelism), after the disk check.
    /// Paths come back in plan order.
    async fn ensure_all(
        &self,
        commit: &str,
        planned: &[PlannedFile],
    ) -> Result<Vec<PathBuf>, HubError> {
        let missing: Vec<&PlannedFile> = planned
            .iter()
            .filter(|p| !is_regular_file(&self.cache.blob(&p.etag)))
            .collect();
        let download_bytes: u64 = missing.iter().map(|p| p.expected.size.unwrap_or(0)).sum();
        // Bytes already in resumable partial files need no new room.
        let resumable_bytes: u64 = missing
            .iter()
            .filter(|p| p.expected.sha256.is_some())
            .filter_map(|p| {
                let len = std::fs::symlink_metadata(self.cache.incomplete(&p.etag))
                    .ok()
                    .filter(std::fs::Metadata::is_file)?
                    .len();
                p.expected.size.map(|size| len.min(size))
            })
            .sum();
        let downloading = download_bytes > 0 && !self.opts.offline;
        if downloading {
            let keep = |etag: &str| missing.iter().any(|p| p.etag == etag);
            self.check_disk(download_bytes.saturating_sub(resumable_bytes), &keep)?;
            self.transfer.add_expected(download_bytes);
            tracing::info!(
                model = %self.model.repo_id,
                commit,
                bytes = download_bytes,
                "downloading {} from {}",
                human_bytes(download_bytes),
                self.opts.endpoint
            );
        }
        let started = Instant::now();
        let jobs: Vec<_> = planned
            .iter()
            .map(|p| self.ensure_file(commit, p))
            .collect();
        let work = stream::iter(jobs)
            .buffered(self.opts.max_parallel_downloads.max(1))
            .try_collect::<Vec<PathBuf>>();
        tokio::pin!(work);
        let interval = self.opts.progress_interval.max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let paths = loop {
            tokio::select! {
                result = &mut work => break result?,
                _ = ticker.tick() => {
                    if downloading {
                        self.transfer.log();
                    }
                }
            }
        };
        if downloading {
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            #[allow(clippy::cast_precision_loss)] // display only
            let rate = download_bytes as f64 / 1e6 / secs;
            tracing::info!(model = %self.model.repo_id, "downloaded {} in {secs:.1} s ({rate:.1} MB/s)", human_bytes(download_bytes));
        }
        Ok(paths)
    }

    /// Refuses to start when the cache's disk cannot hold `download_bytes` more; when short, first
    /// removes this repo's stale partial files that no planned blob (`keep`) resumes, then looks again.
    fn check_disk(&self, download_bytes: u64, keep: &dyn Fn(&str) -> bool) -> Result<(), HubError> {
        let free_space = || {
            self.opts
                .free_space
                .available_bytes(&self.opts.cache_dir)
                .map_err(|source| HubError::Io {
                    what: "checking free space of",
                    path: self.opts.cache_dir.clone(),
                    source,
                })
        };
        let needed = required_with_margin(download_bytes);
        let mut available = free_space()?;
        if available < needed
            && sweep_stale_partials(&self.cache, self.opts.stale_partial_age, keep) > 0
        {
            available = free_space()?;
        }
        if available < needed {
            return Err(HubError::DiskFull {
                repo: self.model.repo_id.clone(),
                path: self.opts.cache_dir.clone(),
                download: download_bytes,
                needed,
                available,
            });
        }
        Ok(())
    }

    async fn ensure_file(&self, commit: &str, planned: &PlannedFile) -> Result<PathBuf, HubError> {
        // Warm path: linked, and verified earlier with the blob unchanged since: no hashing, no lock.
        if self.cache.snapshot_etag(commit, &planned.name).as_deref() == Some(planned.etag.as_str())
            && marker_is_valid(&self.cache, &planned.etag)
        {
            return Ok(self.cache.snapshot(commit, &planned.name));
        }
        let state = ResumeState::default();
        self.with_retries(&planned.name, |_| self.ensure_once(commit, planned, &state))
            .await
    }

    /// One attempt, holding the blob's lock: check what is cached (replacing a corrupt blob), download
    /// if needed (resuming a partial), verify, mark, link.
    async fn ensure_once(
        &self,
        commit: &str,
        planned: &PlannedFile,
        state: &ResumeState,
    ) -> Result<PathBuf, Attempt> {
        let name = planned.name.as_str();
        let _lock = FileLock::acquire(
            &self.cache.wick_lock(&planned.etag),
            self.opts.lock_timeout,
            || {
                tracing::info!(
                    file = name,
                    "waiting for another process that is fetching the same file"
                );
            },
        )
        .await
        .map_err(|e| Attempt::Fail(e.into()))?;
        let blob = self.cache.blob(&planned.etag);

        if is_regular_file(&blob) && !marker_is_valid(&self.cache, &planned.etag) {
            match self.check(&blob, planned).await? {
                Ok(sha) => write_marker(&self.cache, &planned.etag, sha),
                Err(mismatch) if self.opts.offline => {
                    return Err(Attempt::Fail(self.corrupt(name, &mismatch.to_string())));
                }
                Err(mismatch) => {
                    tracing::warn!(file = name, problem = %mismatch, "cached file is corrupt; downloading it again");
                    self.discard(commit, planned)?;
                }
            }
        }

        if !is_regular_file(&blob) {
            if self.opts.offline {
                return Err(Attempt::Fail(self.not_cached(name)));
            }
            // Also drops a dangling link.
            self.discard(commit, planned)?;
            // hf-hub and Python write the same `.incomplete` under this lock: one writer at a time.
            let _theirs = FileLock::acquire(
                &self.cache.hf_lock(&planned.etag),
                self.opts.lock_timeout,
                || {
                    tracing::info!(
                        file = name,
                        "waiting for another tool that is fetching the same file"
                    )
                },
            )
            .await
            .map_err(|e| Attempt::Fail(e.into()))?;
            self.download_blob(commit, planned, state).await?;
        }

        // The blob is present and verified; make sure this commit's snapshot links to it.
        if self.cache.snapshot_etag(commit, name).as_deref() != Some(planned.etag.as_str()) {
            if self.opts.offline {
                return Err(Attempt::Fail(self.not_cached(name)));
            }
            self.cache
                .link_snapshot(commit, name, &planned.etag)
                .map_err(|source| {
                    Attempt::Fail(HubError::Io {
                        what: "linking",
                        path: self.cache.snapshot(commit, name),
                        source,
                    })
                })?;
        }
        Ok(self.cache.snapshot(commit, name))
    }

    async fn check(
        &self,
        blob: &Path,
        planned: &PlannedFile,
    ) -> Result<Result<Option<String>, super::verify::Mismatch>, Attempt> {
        check_blob(blob.to_path_buf(), planned.expected.clone())
            .await
            .map_err(|source| {
                Attempt::Fail(HubError::Io {
                    what: "reading",
                    path: blob.to_path_buf(),
                    source,
                })
            })
    }

    /// Removes a bad blob, its marker and this commit's link to it.
    fn discard(&self, commit: &str, planned: &PlannedFile) -> Result<(), Attempt> {
        let link = self.cache.snapshot(commit, &planned.name);
        for path in [
            self.cache.blob(&planned.etag),
            self.cache.marker(&planned.etag),
            link,
        ] {
            remove_if_present(&path).map_err(|source| {
                Attempt::Fail(HubError::Io {
                    what: "removing",
                    path,
                    source,
                })
            })?;
        }
        Ok(())
    }

    /// Fills `{etag}.incomplete` (resuming what is there when the blob has a sha256 to check it
    /// against), verifies the whole file, and renames it to the blob. Holds both locks of the blob.
    /// A failed attempt keeps a resumable partial for the next one (or the next process); one whose
    /// bytes fail verification is deleted.
    async fn download_blob(
        &self,
        commit: &str,
        planned: &PlannedFile,
        state: &ResumeState,
    ) -> Result<(), Attempt> {
        let name = planned.name.as_str();
        let partial = self.cache.incomplete(&planned.etag);
        let io = |what, source: std::io::Error| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                Attempt::Fail(HubError::DiskFilled {
                    repo: self.model.repo_id.clone(),
                    path: self.opts.cache_dir.clone(),
                })
            } else {
                Attempt::Fail(HubError::Io {
                    what,
                    path: partial.clone(),
                    source,
                })
            }
        };
        std::fs::create_dir_all(self.cache.blobs_dir()).map_err(|e| io("creating", e))?;
        let resumable = planned.expected.sha256.is_some();
        // Not resumable: a broken attempt leaves nothing behind.
        let _guard = (!resumable).then(|| PartialGuard {
            path: partial.clone(),
        });
        let (file, mut offset) = open_partial(&partial, resumable).map_err(|e| io("opening", e))?;
        let mut file = tokio::fs::File::from_std(file);
        if planned.expected.size.is_some_and(|size| offset > size) {
            tracing::info!(
                file = name,
                "partial download is longer than the file; starting over"
            );
            file.set_len(0).await.map_err(|e| io("truncating", e))?;
            offset = 0;
        }
        let start = offset;
        let previous_high = state.with(|s| *s.high_water.get_or_insert(start));
        if offset > 0 {
            tracing::info!(
                file = name,
                offset,
                "resuming a partial download ({} already on disk)",
                human_bytes(offset)
            );
        }

        let result = if planned.expected.size == Some(offset) && offset > 0 {
            Ok(offset) // every byte already there: only the check is left
        } else {
            self.get_into(commit, planned, &mut file, offset, state)
                .await
        };
        // Whatever happened, what was written must reach the file (a full disk shows here too).
        file.flush().await.map_err(|e| io("writing", e))?;
        let end = file.metadata().await.map_err(|e| io("reading", e))?.len();
        // A failed attempt that moved the file past its furthest point is resumed without counting.
        let retry = |error: HubError, after: Option<Duration>| {
            let progressed = resumable && end >= previous_high.saturating_add(MIN_PROGRESS);
            state.with(|s| s.high_water = Some(previous_high.max(end)));
            if progressed {
                tracing::info!(
                    file = name,
                    kept = end,
                    "transfer broke; the partial file is kept and resumed"
                );
                Attempt::Progressed(error)
            } else {
                Attempt::Retry { error, after }
            }
        };
        let len = match result {
            Ok(len) => len,
            Err(Attempt::Retry { error, after }) => return Err(retry(error, after)),
            Err(other) => return Err(other),
        };
        if let Some(size) = planned.expected.size.filter(|size| len < *size) {
            // The body ended cleanly but short: resumed like a broken transfer.
            let error = self.network(name, 0, format!("the body ended at byte {len} of {size}"));
            return Err(retry(error, None));
        }
        file.sync_all().await.map_err(|e| io("syncing", e))?;
        drop(file);
        match self.check(&partial, planned).await? {
            Ok(sha) => {
                let blob = self.cache.blob(&planned.etag);
                std::fs::rename(&partial, &blob).map_err(|e| io("renaming", e))?;
                relax_mode(&blob);
                write_marker(&self.cache, &planned.etag, sha);
                if start > 0 {
                    tracing::info!(
                        file = name,
                        resumed_from = start,
                        "resumed download verified"
                    );
                }
                Ok(())
            }
            Err(mismatch) => {
                tracing::warn!(file = name, problem = %mismatch, resumed_from = start, "downloaded file does not match the Hub's hash; fetching it again from byte 0");
                remove_if_present(&partial).map_err(|e| io("removing", e))?;
                state.with(|s| {
                    s.high_water = Some(0);
                    s.validator = None;
                });
                Err(Attempt::Retry {
                    error: self.corrupt(name, &mismatch.to_string()),
                    after: None,
                })
            }
        }
    }

    /// One GET of `file` at `commit` into `file_out` from byte `offset`; returns the file's length
    /// after it. A `206` is appended after checking its `Content-Range`; a `200` (or a `416` to a range)
    /// starts the file over. Abandoned when no byte moves for `stall_timeout`, or when more than the
    /// announced size arrives (a server must not fill the disk).
    async fn get_into(
        &self,
        commit: &str,
        planned: &PlannedFile,
        out: &mut tokio::fs::File,
        mut offset: u64,
        state: &ResumeState,
    ) -> Result<u64, Attempt> {
        let name = planned.name.as_str();
        let io = |what, source: std::io::Error| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                Attempt::Fail(HubError::DiskFilled {
                    repo: self.model.repo_id.clone(),
                    path: self.opts.cache_dir.clone(),
                })
            } else {
                Attempt::Fail(HubError::Io {
                    what,
                    path: self.cache.incomplete(&planned.etag),
                    source,
                })
            }
        };
        self.transfer.start_attempt(name, offset);
        let mut response = None;
        // Twice at most: a 416 to a range is asked again without one.
        for _ in 0..2 {
            let validator = state.with(|s| s.validator.clone());
            let (got, redirected) = self
                .send_get(commit, name, offset, validator.as_deref())
                .await?;
            let status = got.status();
            if status == StatusCode::RANGE_NOT_SATISFIABLE && offset > 0 {
                tracing::info!(
                    file = name,
                    offset,
                    "the server refused the range; starting the file over"
                );
                offset = 0;
                state.with(|s| s.validator = None);
                continue;
            }
            if !redirected && planned.expected.sha256.is_none() {
                // A plain file answered directly: its ETag is the git blob id the HEAD gave.
                let etag = got
                    .headers()
                    .get(ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(|e| e.trim_start_matches("W/").trim_matches('"'));
                if status.is_success()
                    && etag.is_some_and(|e| is_commit_hash(e) && e != planned.etag)
                {
                    return Err(Attempt::Fail(
                        self.protocol(name, "the file's etag changed between two requests"),
                    ));
                }
            }
            response = Some(got);
            break;
        }
        let Some(mut response) = response else {
            return Err(Attempt::Retry {
                error: self.network(name, 0, "the server refused the range twice".into()),
                after: None,
            });
        };
        let status = response.status();
        match status {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                let fits = range.is_some_and(|(first, last, total)| {
                    first == offset
                        && last >= first
                        && total.is_none_or(|t| {
                            last < t && planned.expected.size.is_none_or(|s| s == t)
                        })
                });
                if !fits {
                    // Not the bytes asked for: nothing is appended; the next attempt starts over.
                    out.set_len(0).await.map_err(|e| io("truncating", e))?;
                    state.with(|s| s.validator = None);
                    return Err(Attempt::Retry {
                        error: self.protocol(
                            name,
                            "the server answered a range other than the one asked for",
                        ),
                        after: None,
                    });
                }
            }
            StatusCode::OK => {
                if offset > 0 {
                    tracing::info!(
                        file = name,
                        offset,
                        "the server sent the whole file instead of the rest; starting over"
                    );
                }
                offset = 0;
                out.set_len(0).await.map_err(|e| io("truncating", e))?;
                self.transfer.start_attempt(name, 0);
            }
            _ => return Err(self.get_failure(name, status, response.headers())),
        }
        // A strong validator from this server, for the next attempt's If-Range.
        let validator = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.starts_with('"') && v.len() <= MAX_VALIDATOR_LEN)
            .map(str::to_string);
        state.with(|s| s.validator = validator);

        out.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| io("seeking", e))?;
        let max = planned.expected.size;
        loop {
            let chunk = tokio::time::timeout(self.opts.stall_timeout, response.chunk()).await;
            let chunk = match chunk {
                Err(_) => {
                    return Err(Attempt::Retry {
                        error: self.network(
                            name,
                            0,
                            format!(
                                "no data received for {} s",
                                self.opts.stall_timeout.as_secs()
                            ),
                        ),
                        after: None,
                    })
                }
                Ok(Err(e)) => {
                    return Err(Attempt::Retry {
                        error: self.network(name, 0, error_chain(&e.without_url())),
                        after: None,
                    })
                }
                Ok(Ok(None)) => return Ok(offset),
                Ok(Ok(Some(chunk))) => chunk,
            };
            let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
            let received = offset.saturating_add(len);
            if let Some(max) = max.filter(|max| received > *max) {
                // The partial holds only bytes inside the announced size; the extra is never written.
                return Err(Attempt::Retry {
                    error: self.corrupt(
                        name,
                        &format!("received {received} bytes, more than the {max} announced"),
                    ),
                    after: None,
                });
            }
            out.write_all(&chunk).await.map_err(|e| io("writing", e))?;
            offset = received;
            self.transfer.add_bytes(name, len);
        }
    }

    /// Sends the transfer GET, following up to [`MAX_RELATIVE_REDIRECTS`] redirects by hand: the token
    /// only ever goes to `HF_ENDPOINT`'s origin, the range headers to every hop. Returns the final
    /// response and whether a redirect was followed.
    async fn send_get(
        &self,
        commit: &str,
        file: &str,
        offset: u64,
        validator: Option<&str>,
    ) -> Result<(reqwest::Response, bool), Attempt> {
        let mut url = self.resolve_url(commit, file)?;
        for hop in 0..=MAX_RELATIVE_REDIRECTS {
            let mut request = self.transfer_http.get(url.clone());
            if offset > 0 {
                request = request.header(RANGE, format!("bytes={offset}-"));
                if let Some(validator) = validator {
                    request = request.header(IF_RANGE, validator);
                }
            }
            if let Some(token) = self
                .opts
                .token
                .as_ref()
                .filter(|_| same_origin(&url, &self.endpoint))
            {
                request = request.bearer_auth(token.expose());
            }
            let response = tokio::time::timeout(self.opts.stall_timeout, request.send())
                .await
                .map_err(|_| Attempt::Retry {
                    error: self.network(
                        file,
                        0,
                        format!("no response within {} s", self.opts.stall_timeout.as_secs()),
                    ),
                    after: None,
                })?
                .map_err(|e| Attempt::Retry {
                    error: self.network(file, 0, error_chain(&e.without_url())),
                    after: None,
                })?;
            if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED
            {
                return Ok((response, hop > 0));
            }
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Attempt::Fail(self.protocol(file, "a redirect without a Location"))
                })?;
            let next = url
                .join(location)
                .map_err(|e| Attempt::Fail(self.protocol(file, &format!("bad redirect: {e}"))))?;
            if !matches!(next.scheme(), "http" | "https") {
                return Err(Attempt::Fail(
                    self.protocol(file, "a redirect to a scheme other than http or https"),
                ));
            }
            url = next;
        }
        Err(Attempt::Fail(self.protocol(file, "too many redirects")))
    }

    /// What a failed transfer GET status means.
    fn get_failure(&self, file: &str, status: StatusCode, headers: &HeaderMap) -> Attempt {
        let repo = self.model.repo_id.clone();
        match status.as_u16() {
            401 | 403 => Attempt::Fail(HubError::Unauthorized {
                repo,
                token_given: self.opts.token.is_some(),
            }),
            404 => Attempt::Fail(self.not_found(file, "")),
            408 | 429 | 500..=599 => Attempt::Retry {
                error: self.network(file, 0, format!("HTTP {status}")),
                after: headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER)),
            },
            _ => Attempt::Fail(self.protocol(file, &format!("HTTP {status}"))),
        }
    }

    /// wick's HEAD: `Ok(None)` when the file does not exist at `revision`.
    async fn head(&self, revision: &str, file: &str) -> Result<Option<HeadMeta>, Attempt> {
        let mut url = self.resolve_url(revision, file)?;
        for _ in 0..=MAX_RELATIVE_REDIRECTS {
            let mut request = self
                .http
                .head(url.clone())
                .timeout(self.opts.request_timeout);
            if let Some(token) = &self.opts.token {
                request = request.bearer_auth(token.expose());
            }
            let response = request.send().await.map_err(|e| Attempt::Retry {
                error: self.network(file, 0, error_chain(&e.without_url())),
                after: None,
            })?;
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok());
                if let Some(location) =
                    location.filter(|l| Url::parse(l).is_err() && !l.starts_with("//"))
                {
                    url = url.join(location).map_err(|e| {
                        Attempt::Fail(self.protocol(file, &format!("bad redirect: {e}")))
                    })?;
                    continue;
                }
            }
            return self.head_outcome(file, revision, status, response.headers());
        }
        Err(Attempt::Fail(self.protocol(file, "too many redirects")))
    }

    fn head_outcome(
        &self,
        file: &str,
        revision: &str,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Result<Option<HeadMeta>, Attempt> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let repo = self.model.repo_id.clone();
        match header("x-error-code") {
            Some("RepoNotFound") => {
                return Err(Attempt::Fail(HubError::RepoNotFound {
                    repo,
                    endpoint: self.opts.endpoint.clone(),
                }));
            }
            Some("RevisionNotFound") => {
                return Err(Attempt::Fail(HubError::RevisionNotFound {
                    repo,
                    revision: self.model.revision.clone(),
                }));
            }
            Some("GatedRepo") => {
                return Err(Attempt::Fail(HubError::Unauthorized {
                    repo,
                    token_given: self.opts.token.is_some(),
                }));
            }
            _ => {}
        }
        match status.as_u16() {
            401 | 403 => Err(Attempt::Fail(HubError::Unauthorized {
                repo,
                token_given: self.opts.token.is_some(),
            })),
            404 => Ok(None),
            408 | 429 | 500..=599 => {
                let after = header(RETRY_AFTER.as_str())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
                Err(Attempt::Retry {
                    error: self.network(file, 0, format!("HTTP {status}")),
                    after,
                })
            }
            _ if status.is_success() || status.is_redirection() => {
                let etag = header("x-linked-etag")
                    .or_else(|| header(ETAG.as_str()))
                    .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
                    .ok_or_else(|| Attempt::Fail(self.protocol(file, "no ETag header")))?;
                if !(is_sha256_hex(&etag) || is_commit_hash(&etag)) {
                    return Err(Attempt::Fail(
                        self.protocol(file, "the ETag is not a sha256 or git hash"),
                    ));
                }
                let commit = header("x-repo-commit")
                    .filter(|c| is_commit_hash(c))
                    .ok_or_else(|| {
                        Attempt::Fail(self.protocol(file, "no valid X-Repo-Commit header"))
                    })?
                    .to_string();
                if is_commit_hash(revision) && commit != revision {
                    return Err(Attempt::Fail(
                        self.protocol(file, "X-Repo-Commit differs from the commit asked for"),
                    ));
                }
                let size = header("x-linked-size")
                    .or_else(|| header(CONTENT_LENGTH.as_str()))
                    .and_then(|v| v.parse().ok());
                if header("x-xet-hash").is_some() {
                    tracing::debug!(
                        file,
                        "stored in Xet; fetched over plain HTTP through the Hub's redirect, as Python does without hf_xet"
                    );
                }
                Ok(Some(HeadMeta { etag, size, commit }))
            }
            _ => Err(Attempt::Fail(
                self.protocol(file, &format!("HTTP {status}")),
            )),
        }
    }

    /// `{endpoint}/{repo}/resolve/{revision}/{file}`, revision as one encoded segment, file per segment.
    fn resolve_url(&self, revision: &str, file: &str) -> Result<Url, Attempt> {
        let mut url = self.endpoint.clone();
        {
            let mut segments = url.path_segments_mut().map_err(|()| {
                Attempt::Fail(self.protocol(file, "HF_ENDPOINT cannot be a base URL"))
            })?;
            segments.pop_if_empty();
            segments.extend(self.model.repo_id.split('/'));
            segments.push("resolve");
            segments.push(revision);
            segments.extend(file.split('/'));
        }
        Ok(url)
    }

    /// Runs `attempt` until it succeeds, fails for good, or uses up `max_attempts`; between tries it
    /// sleeps `retry_base_delay * 2^n` (capped, equal jitter, at least any `Retry-After`).
    async fn with_retries<T, F, Fut>(&self, file: &str, mut attempt: F) -> Result<T, HubError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let max = self.opts.max_attempts.max(1);
        let mut n = 1;
        loop {
            match attempt(n).await {
                Ok(value) => return Ok(value),
                Err(Attempt::Fail(error)) => return Err(error),
                Err(Attempt::Progressed(error)) => {
                    // Moved forward: the count of attempts without progress starts again.
                    let delay = backoff(self.opts.retry_base_delay, 1, None);
                    tracing::warn!(file, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), error = %error, "transfer broke after progress; resuming");
                    tokio::time::sleep(delay).await;
                    n = 1;
                }
                Err(Attempt::Retry { error, after }) => {
                    if n >= max {
                        return Err(match error {
                            HubError::Network {
                                repo,
                                file,
                                endpoint,
                                detail,
                                ..
                            } => HubError::Network {
                                repo,
                                file,
                                endpoint,
                                attempts: n,
                                detail,
                            },
                            other => other,
                        });
                    }
                    let delay = backoff(self.opts.retry_base_delay, n, after);
                    tracing::warn!(file, attempt = n, max_attempts = max, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), error = %error, "fetch failed; retrying");
                    tokio::time::sleep(delay).await;
                    n += 1;
                }
            }
        }
    }

    /// Every returned path must resolve to a regular file inside this repo's cache folder.
    fn check_contained(&self, files: &ModelFiles) -> Result<(), HubError> {
        let root = std::fs::canonicalize(self.cache.repo_dir()).map_err(|source| HubError::Io {
            what: "reading",
            path: self.cache.repo_dir(),
            source,
        })?;
        for path in files.all_paths() {
            let resolved = std::fs::canonicalize(path).map_err(|source| HubError::Io {
                what: "reading",
                path: path.to_path_buf(),
                source,
            })?;
            if !resolved.starts_with(&root) || !resolved.is_file() {
                return Err(HubError::UnsafePath {
                    file: path.display().to_string(),
                    reason: format!(
                        "resolves to {}, outside the model's cache folder",
                        resolved.display()
                    ),
                });
            }
        }
        Ok(())
    }

    async fn no_weights(&self, commit: &str) -> HubError {
        let mut reason = format!("it has neither {SINGLE_FILE} nor {INDEX_FILE}");
        if let Ok(Some(_)) = self.head(commit, "pytorch_model.bin").await {
            reason = "it has only pickle .bin weights, which wick never loads (they can run code)"
                .to_string();
        }
        reason.push_str("; choose a repo with safetensors weights, or a GGUF file as MODEL_NAME=org/name:file.gguf");
        HubError::NoWeights {
            repo: self.model.repo_id.clone(),
            reason,
        }
    }

    fn missing_hint(&self, file: &str) -> &'static str {
        match file {
            "config.json" => "; wick loads safetensors repos with their config.json; for a GGUF repo name the file: MODEL_NAME=org/name:file.gguf",
            "tokenizer.json" => "; wick needs the fast tokenizer file tokenizer.json",
            f if f.ends_with(".gguf") => "; check the file name (case matters) on the repo's Files page",
            f if f.ends_with(".safetensors") => " (listed in model.safetensors.index.json)",
            _ => "",
        }
    }

    fn not_found(&self, file: &str, hint: &str) -> HubError {
        HubError::FileNotFound {
            repo: self.model.repo_id.clone(),
            revision: self.model.revision.clone(),
            file: file.to_string(),
            hint: hint.to_string(),
        }
    }

    fn not_cached(&self, file: &str) -> HubError {
        HubError::NotCached {
            repo: self.model.repo_id.clone(),
            revision: self.model.revision.clone(),
            file: file.to_string(),
            cache_dir: self.opts.cache_dir.clone(),
        }
    }

    fn corrupt(&self, file: &str, detail: &str) -> HubError {
        HubError::Corrupt {
            repo: self.model.repo_id.clone(),
            file: file.to_string(),
            detail: detail.to_string(),
            offline: self.opts.offline,
        }
    }

    fn network(&self, file: &str, attempts: u32, detail: String) -> HubError {
        HubError::Network {
            repo: self.model.repo_id.clone(),
            file: file.to_string(),
            endpoint: self.opts.endpoint.clone(),
            attempts,
            detail,
        }
    }

    fn protocol(&self, file: &str, detail: &str) -> HubError {
        HubError::Protocol {
            repo: self.model.repo_id.clone(),
            file: file.to_string(),
            detail: detail.to_string(),
        }
    }
}

/// Removes a partial file that cannot be resumed when its attempt fails (after success it has been
/// renamed away).
struct PartialGuard {
    path: PathBuf,
}

impl Drop for PartialGuard {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "removed partial download"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove partial download")
            }
        }
    }
}

/// An error and its sources, `: `-joined (reqwest's own message alone is often just "error sending request").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Removes `path`; a missing file is fine.
fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Same scheme, host and port (the default port of the scheme when none is written).
fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`) as `(first, last, total)`.
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?, total))
}

fn is_regular_file(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
}

/// A blob renamed from wick's 0600 partial file gets the mode a plain download would have had.
fn relax_mode(blob: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(blob) else {
        return;
    };
    if meta.permissions().mode() & 0o777 == 0o600 {
        if let Err(e) =
            std::fs::set_permissions(blob, std::fs::Permissions::from_mode(default_file_mode()))
        {
            tracing::debug!(blob = %blob.display(), error = %e, "could not set blob permissions");
        }
    }
}

/// `base * 2^(attempt-1)`, capped at 30 s, with equal jitter (a random point in the upper half), and
/// never less than `retry_after`.
fn backoff(base: Duration, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_RETRY_DELAY);
    let half = exp / 2;
    #[allow(clippy::cast_precision_loss)] // jitter needs no precision
    let jitter = half.mul_f64((random_u64() % 1_000_000) as f64 / 1_000_000.0);
    (half + jitter).max(retry_after.unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let base = Duration::from_millis(500);
        for attempt in 1..=10 {
            let d = backoff(base, attempt, None);
            let exp = base.saturating_mul(1 << (attempt - 1)).min(MAX_RETRY_DELAY);
            assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(base, 1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }

    #[test]
    fn content_range_parses_and_rejects_garbage() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, 199, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        for bad in [
            "",
            "bytes */200",
            "items 1-2/3",
            "bytes 1-/3",
            "bytes -1-2/3",
            "bytes 1-2",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn origins_differ_by_scheme_host_or_port() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(same_origin(
            &u("https://hub.example/a"),
            &u("https://hub.example:443/b")
        ));
        assert!(!same_origin(
            &u("http://127.0.0.1:80/"),
            &u("http://127.0.0.1:81/")
        ));
        assert!(!same_origin(
            &u("https://hub.example/"),
            &u("http://hub.example/")
        ));
        assert!(!same_origin(
            &u("https://hub.example/"),
            &u("https://cdn.hub.example/")
        ));
    }

    #[test]
    fn endpoint_must_be_plain_http() {
        assert!(parse_endpoint("https://huggingface.co").is_ok());
        assert!(parse_endpoint("http://127.0.0.1:8080/mirror").is_ok());
        for bad in [
            "ftp://x",
            "file:///etc",
            "not a url",
            "https://user:pw@host",
            "https://h/?q=1",
        ] {
            let err = parse_endpoint(bad).unwrap_err().to_string();
            assert!(!err.contains("pw@"), "{err}");
        }
    }
}
