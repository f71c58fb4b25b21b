#![allow(clippy::unwrap_used)]
//! wick's Hub path against a mock Hugging Face Hub: a real axum server on 127.0.0.1:0 in this process,
//! serving `tests/fixtures/tiny-llama` (and variants built here) with the routes and headers `hf-hub`
//! 1.0 and Python use: HEAD/GET `/{repo}/resolve/{rev}/{file}` (ETag, X-Repo-Commit, Content-Length;
//! LFS files answer 302 to a CDN route with X-Linked-Etag = sha256 and X-Linked-Size), 304 on a
//! matching If-None-Match, `/api/models/{repo}/revision/{rev}`, `/api/models/{repo}/tree/{rev}`,
//! 404 with X-Error-Code (+ X-Repo-Commit for a missing file), 401 for a gated repo without the
//! token, and never an X-Xet-Hash header. The CDN route honours `Range: bytes=N-` (206 +
//! Content-Range, 416 past the end) and `If-Range` (a validator other than its current ETag gets the
//! whole file), unless told to ignore ranges; it may live on a second server (another port), and it
//! counts every body byte it sends. Every request is recorded; faults (a connection dropped mid-body or
//! at a given file offset, corrupted bytes, a paused body) fire in the order a test arms them, one per
//! CDN response.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use sha2::{Digest, Sha256};
use wick::hub::{
    parse_model_request, resolve, FreeSpace, HubError, HubModel, HubOptions, HubWeights,
    ModelFiles, ModelRequest, ModelSource, Presets, WeightFiles,
};

const COMMIT: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
const TOKEN: &str = "hf_mock_canary_token_5f2a";

// ---------------------------------------------------------------- mock hub

#[derive(Clone)]
struct MockFile {
    bytes: Bytes,
    lfs: bool,
    /// sha256 for LFS files; a 40-hex stand-in for the git blob id otherwise.
    etag: String,
}

#[derive(Clone, Default)]
struct MockRepo {
    files: BTreeMap<String, MockFile>,
    gated: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// Send half the body, then drop the connection.
    DropMidBody,
    /// Flip one byte of the body.
    Corrupt,
    /// Send half the body, wait, then the rest.
    Pause(Duration),
    /// Drop the connection once the file's byte `at` is reached (nothing sent when the response
    /// starts past it); `new_etag`: the CDN's ETag changes right after (the object was replaced).
    CutAt { at: u64, new_etag: bool },
    /// Send up to the file's byte `at`, then nothing more (the connection stays open).
    StallAt(u64),
    /// Answer a ranged request 416 Range Not Satisfiable (as a CDN that lost the object's length might).
    Refuse416,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    method: Method,
    path: String,
}

/// A request with the headers resumption and credentials are about, and which server got it.
#[derive(Debug, Clone)]
struct Seen {
    server: &'static str,
    path: String,
    authorization: Option<String>,
}

/// One CDN GET: what it asked for and what it got.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CdnReply {
    range: Option<String>,
    if_range: Option<String>,
    status: u16,
    etag: String,
}

impl CdnReply {
    /// N of the `Range: bytes=N-` asked for.
    fn range_start(&self) -> Option<u64> {
        let range = self.range.as_deref()?;
        Some(
            range
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .unwrap(),
        )
    }
}

#[derive(Default)]
struct Hub {
    base: String,
    /// Where LFS files are redirected (`base` unless a second server was started).
    cdn_base: Mutex<String>,
    repos: Mutex<HashMap<String, MockRepo>>,
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    log: Mutex<Vec<Request>>,
    seen: Mutex<Vec<Seen>>,
    cdn_log: Mutex<Vec<CdnReply>>,
    /// Body bytes the CDN route has handed to the connection.
    served: AtomicU64,
    /// Per sha: how often the CDN object was replaced (its ETag changes each time).
    generation: Mutex<HashMap<String, u32>>,
    ignore_range: AtomicBool,
    /// Cuts drop the connection at once, losing what the server had not yet written to the socket
    /// (otherwise a cut waits briefly so every byte sent arrives).
    hard_cuts: AtomicBool,
}

impl Hub {
    fn add_repo(&self, id: &str, repo: MockRepo) {
        self.repos.lock().unwrap().insert(id.to_string(), repo);
    }
    fn arm(&self, sha: &str, fault: Fault) {
        self.faults
            .lock()
            .unwrap()
            .entry(sha.to_string())
            .or_default()
            .push_back(fault);
    }
    fn cdn_replies(&self) -> Vec<CdnReply> {
        self.cdn_log.lock().unwrap().clone()
    }
    fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
    /// Forgets the CDN's log and byte count.
    fn reset_cdn_counts(&self) {
        self.cdn_log.lock().unwrap().clear();
        self.served.store(0, Ordering::SeqCst);
    }
    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
    fn gets(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::GET)
            .map(|r| r.path)
            .collect()
    }
    fn count_gets(&self, path_suffix: &str) -> usize {
        self.gets()
            .iter()
            .filter(|p| p.ends_with(path_suffix))
            .count()
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mock_file(bytes: impl Into<Bytes>, lfs: bool) -> MockFile {
    let bytes = bytes.into();
    let etag = if lfs {
        sha256_hex(&bytes)
    } else {
        let mut blob = format!("blob {}\0", bytes.len()).into_bytes();
        blob.extend_from_slice(&bytes);
        sha256_hex(&blob)[..40].to_string()
    };
    MockFile { bytes, lfs, etag }
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-llama"
    ))
}

/// The tiny-llama fixture as a repo (plus files wick must never fetch).
fn tiny_llama_repo() -> MockRepo {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let lfs = name.ends_with(".safetensors");
        files.insert(name, mock_file(std::fs::read(&path).unwrap(), lfs));
    }
    files.insert(
        "pytorch_model.bin".into(),
        mock_file(&b"pickle: never fetch me"[..], true),
    );
    files.insert("README.md".into(), mock_file(&b"# tiny"[..], false));
    MockRepo {
        files,
        gated: false,
    }
}

/// Which server a request reached, and the shared state.
#[derive(Clone)]
struct App {
    hub: Arc<Hub>,
    server: &'static str,
}

fn serve(listener: tokio::net::TcpListener, hub: &Arc<Hub>, server: &'static str) {
    let app = axum::Router::new().fallback(handle).with_state(App {
        hub: Arc::clone(hub),
        server,
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

async fn start_hub() -> Arc<Hub> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hub = Arc::new(Hub {
        cdn_base: Mutex::new(base.clone()),
        base,
        ..Hub::default()
    });
    hub.add_repo("org/tiny-llama", tiny_llama_repo());
    serve(listener, &hub, "hub");
    hub
}

/// A second server on another port of the same host, which the hub's LFS redirects now point at.
async fn start_cdn(hub: &Arc<Hub>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    *hub.cdn_base.lock().unwrap() = base.clone();
    serve(listener, hub, "cdn");
    base
}

fn respond(status: StatusCode, headers: &[(&str, String)], body: Body) -> Response {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    builder.body(body).unwrap()
}

async fn handle(
    State(App { hub, server }): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    hub.log.lock().unwrap().push(Request {
        method: method.clone(),
        path: path.clone(),
    });
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    hub.seen.lock().unwrap().push(Seen {
        server,
        path: path.clone(),
        authorization: auth.clone(),
    });
    match parts.as_slice() {
        ["cdn", sha] => cdn(&hub, sha, &headers),
        ["api", "models", org, name, "revision", rev] => {
            api_revision(&hub, &format!("{org}/{name}"), rev, auth.as_deref())
        }
        ["api", "models", org, name, "tree", rev] => {
            api_tree(&hub, &format!("{org}/{name}"), rev, auth.as_deref())
        }
        [org, name, "resolve", rev, file @ ..] if !file.is_empty() => {
            let rev = rev.replace("%2F", "/");
            let inm = headers
                .get("if-none-match")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim_matches('"').to_string());
            resolve_route(
                &hub,
                &method,
                &format!("{org}/{name}"),
                &rev,
                &file.join("/"),
                auth.as_deref(),
                inm,
            )
        }
        _ => respond(StatusCode::NOT_FOUND, &[], Body::empty()),
    }
}

/// Access checks shared by every repo route: missing repo, gated without token, unknown revision.
fn check_repo(
    hub: &Hub,
    repo_id: &str,
    rev: &str,
    auth: Option<&str>,
) -> Result<MockRepo, Box<Response>> {
    let reject = |status, code: &str| {
        Box::new(respond(
            status,
            &[("x-error-code", code.to_string())],
            Body::empty(),
        ))
    };
    let repo = hub.repos.lock().unwrap().get(repo_id).cloned();
    let Some(repo) = repo else {
        return Err(reject(StatusCode::NOT_FOUND, "RepoNotFound"));
    };
    if repo.gated && auth != Some(&format!("Bearer {TOKEN}")) {
        return Err(reject(StatusCode::UNAUTHORIZED, "GatedRepo"));
    }
    if rev != "main" && rev != COMMIT {
        return Err(reject(StatusCode::NOT_FOUND, "RevisionNotFound"));
    }
    Ok(repo)
}

fn resolve_route(
    hub: &Hub,
    method: &Method,
    repo_id: &str,
    rev: &str,
    file: &str,
    auth: Option<&str>,
    if_none_match: Option<String>,
) -> Response {
    let repo = match check_repo(hub, repo_id, rev, auth) {
        Ok(repo) => repo,
        Err(response) => return *response,
    };
    let Some(f) = repo.files.get(file) else {
        return respond(
            StatusCode::NOT_FOUND,
            &[
                ("x-error-code", "EntryNotFound".into()),
                ("x-repo-commit", COMMIT.into()),
            ],
            Body::empty(),
        );
    };
    let mut headers = vec![("x-repo-commit", COMMIT.to_string())];
    if if_none_match.as_deref() == Some(f.etag.as_str()) {
        headers.push(("etag", format!("\"{}\"", f.etag)));
        return respond(StatusCode::NOT_MODIFIED, &headers, Body::empty());
    }
    if f.lfs {
        // Like the Hub: the pointer's own ETag, the content's sha256 and size as X-Linked-*, and a
        // redirect to the CDN (absolute, so a client that follows only relative redirects — wick,
        // Python, hf-hub — takes this response as the metadata).
        headers.extend([
            (
                "etag",
                "\"0123456789abcdef0123456789abcdef01234567\"".to_string(),
            ),
            ("x-linked-etag", format!("\"{}\"", f.etag)),
            ("x-linked-size", f.bytes.len().to_string()),
            (
                "location",
                format!("{}/cdn/{}", hub.cdn_base.lock().unwrap(), f.etag),
            ),
        ]);
        return respond(StatusCode::FOUND, &headers, Body::empty());
    }
    headers.push(("etag", format!("\"{}\"", f.etag)));
    headers.push(("content-length", f.bytes.len().to_string()));
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(f.bytes.clone())
    };
    respond(StatusCode::OK, &headers, body)
}

/// A piece of a CDN body: bytes, bytes after a pause, or a dropped connection.
enum Piece {
    Data(Bytes),
    After(Duration, Bytes),
    Drop { hard: bool },
    Stall,
}

fn cdn(hub: &Arc<Hub>, sha: &str, headers: &HeaderMap) -> Response {
    let file = hub
        .repos
        .lock()
        .unwrap()
        .values()
        .flat_map(|r| r.files.values().cloned())
        .find(|f| f.etag == sha);
    let Some(file) = file else {
        return respond(StatusCode::NOT_FOUND, &[], Body::empty());
    };
    let len = file.bytes.len();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (range, if_range) = (header("range"), header("if-range"));
    let generation = hub
        .generation
        .lock()
        .unwrap()
        .get(sha)
        .copied()
        .unwrap_or(0);
    let etag = if generation == 0 {
        format!("\"{sha}\"")
    } else {
        format!("\"{sha}-{generation}\"")
    };
    let mut reply = CdnReply {
        range: range.clone(),
        if_range: if_range.clone(),
        status: 200,
        etag: etag.clone(),
    };
    // Like S3/CloudFront: a range is honoured when If-Range is absent or matches the current ETag.
    let wanted = range
        .as_deref()
        .filter(|_| !hub.ignore_range.load(Ordering::SeqCst))
        .filter(|_| if_range.is_none() || if_range.as_deref() == Some(etag.as_str()))
        .map(|r| {
            r.strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
                .expect("wick asks for open-ended byte ranges only")
        });
    let refuse = wanted.is_some() && {
        let mut faults = hub.faults.lock().unwrap();
        let queue = faults.entry(sha.to_string()).or_default();
        let front = queue.front() == Some(&Fault::Refuse416);
        if front {
            queue.pop_front();
        }
        front
    };
    if refuse || wanted.is_some_and(|first| first >= len) {
        reply.status = 416;
        hub.cdn_log.lock().unwrap().push(reply);
        return respond(
            StatusCode::RANGE_NOT_SATISFIABLE,
            &[("content-range", format!("bytes */{len}"))],
            Body::empty(),
        );
    }
    let start = wanted.unwrap_or(0);
    let mut headers = vec![
        ("content-length", (len - start).to_string()),
        ("etag", etag),
    ];
    let status = if wanted.is_some() {
        headers.push(("content-range", format!("bytes {start}-{}/{len}", len - 1)));
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    reply.status = status.as_u16();
    hub.cdn_log.lock().unwrap().push(reply);

    let fault = hub
        .faults
        .lock()
        .unwrap()
        .get_mut(sha)
        .and_then(VecDeque::pop_front);
    let mut body = file.bytes.slice(start..);
    let mut pause = None;
    let mut cut = None;
    let mut stall = false;
    match fault {
        None => {}
        Some(Fault::Corrupt) => {
            let mut bytes = body.to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            body = Bytes::from(bytes);
        }
        Some(Fault::DropMidBody) => cut = Some(body.len() / 2),
        Some(Fault::Refuse416) => unreachable!("answered before the body"),
        Some(Fault::StallAt(at)) => {
            cut = Some(
                usize::try_from(at)
                    .unwrap()
                    .saturating_sub(start)
                    .min(body.len()),
            );
            stall = true;
        }
        Some(Fault::Pause(d)) => pause = Some((body.len() / 2, d)),
        Some(Fault::CutAt { at, new_etag }) => {
            cut = Some(
                usize::try_from(at)
                    .unwrap()
                    .saturating_sub(start)
                    .min(body.len()),
            );
            if new_etag {
                *hub.generation
                    .lock()
                    .unwrap()
                    .entry(sha.to_string())
                    .or_default() += 1;
            }
        }
    }
    // 64 KiB pieces, so a cut or a pause lands inside the body, and every byte handed over is counted.
    let end = cut.unwrap_or(body.len());
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < end {
        let next = (at + 64 * 1024).min(end);
        let next = match pause {
            Some((p, _)) if at < p && next > p => p,
            _ => next,
        };
        let bytes = body.slice(at..next);
        pieces.push(match pause {
            Some((p, d)) if at == p => Piece::After(d, bytes),
            _ => Piece::Data(bytes),
        });
        at = next;
    }
    if cut.is_some() {
        pieces.push(if stall {
            Piece::Stall
        } else {
            Piece::Drop {
                hard: hub.hard_cuts.load(Ordering::SeqCst),
            }
        });
    }
    let counter = Arc::clone(hub);
    let stream = futures_util::StreamExt::then(futures_util::stream::iter(pieces), move |piece| {
        let hub = Arc::clone(&counter);
        async move {
            let bytes = match piece {
                Piece::Data(bytes) => bytes,
                Piece::After(pause, bytes) => {
                    tokio::time::sleep(pause).await;
                    bytes
                }
                Piece::Drop { hard } => {
                    if !hard {
                        // Let the server hand what it sent to the socket first: a cut loses no
                        // counted byte (bar a starved machine, which the tests' bounds allow for).
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    return Err(std::io::Error::other("connection dropped"));
                }
                Piece::Stall => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Err(std::io::Error::other("stalled"));
                }
            };
            hub.served.fetch_add(bytes.len() as u64, Ordering::SeqCst);
            Ok::<_, std::io::Error>(bytes)
        }
    });
    respond(status, &headers, Body::from_stream(stream))
}

fn api_revision(hub: &Hub, repo_id: &str, rev: &str, auth: Option<&str>) -> Response {
    match check_repo(hub, repo_id, rev, auth) {
        Ok(repo) => {
            let siblings: Vec<_> = repo
                .files
                .keys()
                .map(|f| serde_json::json!({ "rfilename": f }))
                .collect();
            let body = serde_json::json!({ "id": repo_id, "sha": COMMIT, "siblings": siblings });
            respond(
                StatusCode::OK,
                &[("content-type", "application/json".into())],
                Body::from(body.to_string()),
            )
        }
        Err(response) => *response,
    }
}

fn api_tree(hub: &Hub, repo_id: &str, rev: &str, auth: Option<&str>) -> Response {
    match check_repo(hub, repo_id, rev, auth) {
        Ok(repo) => {
            let entries: Vec<_> = repo
                .files
                .iter()
                .map(|(path, f)| {
                    let mut entry = serde_json::json!({ "type": "file", "path": path, "size": f.bytes.len(), "oid": f.etag });
                    if f.lfs {
                        entry["lfs"] = serde_json::json!({ "oid": f.etag, "size": f.bytes.len(), "pointerSize": 134 });
                    }
                    entry
                })
                .collect();
            respond(
                StatusCode::OK,
                &[("content-type", "application/json".into())],
                Body::from(serde_json::to_vec(&entries).unwrap()),
            )
        }
        Err(response) => *response,
    }
}

// ---------------------------------------------------------------- helpers

fn options(hub: &Hub, cache: &Path) -> HubOptions {
    let mut o = HubOptions::new(&hub.base, cache);
    o.retry_base_delay = Duration::from_millis(10);
    o.progress_interval = Duration::from_millis(200);
    o
}

fn request(repo: &str, revision: &str, weights: HubWeights) -> ModelRequest {
    ModelRequest {
        source: ModelSource::Hub(HubModel {
            repo_id: repo.into(),
            revision: revision.into(),
            weights,
            pinned_sha256: None,
        }),
        preset: None,
    }
}

fn llama(revision: &str) -> ModelRequest {
    request("org/tiny-llama", revision, HubWeights::Safetensors)
}

fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

fn assert_matches_fixture(files: &ModelFiles) {
    let same = |path: &Option<PathBuf>, name: &str| {
        assert_eq!(
            std::fs::read(path.as_ref().unwrap()).unwrap(),
            std::fs::read(fixture_dir().join(name)).unwrap(),
            "{name}"
        );
    };
    same(&files.config, "config.json");
    same(&files.tokenizer_json, "tokenizer.json");
    same(&files.tokenizer_config, "tokenizer_config.json");
    same(&files.generation_config, "generation_config.json");
    let WeightFiles::Safetensors(shards) = &files.weights else {
        panic!("safetensors expected")
    };
    assert_eq!(shards.len(), 1);
    same(&Some(shards[0].clone()), "model.safetensors");
}

/// Resolves the fixture model at `main` from `hub` into `cache` and checks every file against the
/// fixture: the end state of each fault test.
async fn resolve_fixture(hub: &Hub, cache: &Path) -> ModelFiles {
    let files = resolve(&llama("main"), &options(hub, cache)).await.unwrap();
    assert_matches_fixture(&files);
    files
}

/// Files in the repo's `blobs/` that are not finished blobs or markers.
fn partial_files(cache: &Path, repo: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(repo_dir(cache, repo).join("blobs")) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".incomplete") || n.contains(".tmp-"))
        .collect()
}

fn model_sha() -> String {
    sha256_hex(&std::fs::read(fixture_dir().join("model.safetensors")).unwrap())
}

fn umask_file_mode() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap());
    0o666 & !umask.unwrap_or(0o022)
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn first_download_fetches_only_needed_files_and_verifies_them() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let files = resolve_fixture(&hub, cache.path()).await;

    let mut gets = hub.gets();
    gets.sort();
    let sha = model_sha();
    let mut expected = vec![
        format!("/cdn/{sha}"),
        "/org/tiny-llama/resolve/c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00/config.json".to_string(),
        "/org/tiny-llama/resolve/c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00/generation_config.json"
            .to_string(),
        "/org/tiny-llama/resolve/c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00/model.safetensors"
            .to_string(),
        "/org/tiny-llama/resolve/c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00/tokenizer.json"
            .to_string(),
        "/org/tiny-llama/resolve/c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00/tokenizer_config.json"
            .to_string(),
    ];
    expected.sort();
    assert_eq!(
        gets, expected,
        "exactly the needed files, each once, all at the resolved commit"
    );
    for r in hub.requests() {
        assert!(
            !r.path.contains("pytorch_model.bin")
                && !r.path.contains("reference_generations")
                && !r.path.contains("README"),
            "{r:?}"
        );
    }

    let repo = repo_dir(cache.path(), "org/tiny-llama");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(repo
        .join(format!(".no_exist/{COMMIT}/model.safetensors.index.json"))
        .exists());
    assert!(repo.join(format!("blobs/{sha}.verified")).exists());
    let blob_mode = std::fs::metadata(repo.join(format!("blobs/{sha}")))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        blob_mode,
        umask_file_mode(),
        "finished blobs get the normal file mode"
    );
    assert!(partial_files(cache.path(), "org/tiny-llama").is_empty());
    // The returned paths are the Python-compatible snapshot links.
    let WeightFiles::Safetensors(shards) = &files.weights else {
        unreachable!()
    };
    assert_eq!(
        shards[0],
        repo.join(format!("snapshots/{COMMIT}/model.safetensors"))
    );
}

#[tokio::test]
async fn warm_start_makes_no_get_and_does_not_hash_again() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    let first = resolve(&llama("main"), &opts).await.unwrap();
    let marker =
        repo_dir(cache.path(), "org/tiny-llama").join(format!("blobs/{}.verified", model_sha()));
    let marker_mtime = std::fs::metadata(&marker).unwrap().modified().unwrap();

    hub.clear();
    let second = resolve(&llama("main"), &opts).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(
        hub.requests(),
        vec![Request {
            method: Method::HEAD,
            path: "/org/tiny-llama/resolve/main/config.json".into()
        }],
        "a branch costs one HEAD to learn its commit, nothing else"
    );
    assert_eq!(
        std::fs::metadata(&marker).unwrap().modified().unwrap(),
        marker_mtime,
        "marker reused, not rewritten"
    );

    hub.clear();
    let pinned = resolve(&llama(COMMIT), &opts).await.unwrap();
    assert_eq!(pinned, first);
    assert!(
        hub.requests().is_empty(),
        "a pinned commit needs no request: {:?}",
        hub.requests()
    );
}

#[tokio::test]
async fn offline_mode_uses_the_cache_and_fails_clearly_when_uncached() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let mut offline = options(&hub, cache.path());
    offline.offline = true;

    let err = resolve(&llama("main"), &offline).await.unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    assert!(hub.requests().is_empty());

    let online = resolve(&llama("main"), &options(&hub, cache.path()))
        .await
        .unwrap();
    hub.clear();
    let files = resolve(&llama("main"), &offline).await.unwrap();
    assert_eq!(files, online);
    assert!(
        hub.requests().is_empty(),
        "offline never touches the network: {:?}",
        hub.requests()
    );

    // An uncached revision is still a clear error.
    let err = resolve(&llama("v2"), &offline).await.unwrap_err();
    assert!(
        matches!(err, HubError::NotCached { ref file, .. } if file == "refs/v2"),
        "{err:?}"
    );
}

#[tokio::test]
async fn offline_a_python_no_exist_marker_makes_a_required_file_missing_not_uncached() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let mut offline = options(&hub, cache.path());
    offline.offline = true;
    // What Python leaves after a 404 for `config.json` at `main`: the ref and the empty marker.
    let repo = repo_dir(cache.path(), "org/tiny-llama");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    std::fs::create_dir_all(repo.join(format!(".no_exist/{COMMIT}"))).unwrap();
    std::fs::write(repo.join(format!(".no_exist/{COMMIT}/config.json")), b"").unwrap();

    let err = resolve(&llama("main"), &offline).await.unwrap_err();
    assert!(
        matches!(err, HubError::FileNotFound { ref file, .. } if file == "config.json"),
        "{err:?}"
    );
    // Without the marker the same cache only says the file is not cached.
    std::fs::remove_file(repo.join(format!(".no_exist/{COMMIT}/config.json"))).unwrap();
    let err = resolve(&llama("main"), &offline).await.unwrap_err();
    assert!(
        matches!(err, HubError::NotCached { ref file, .. } if file == "config.json"),
        "{err:?}"
    );
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}

#[tokio::test]
async fn corrupt_blob_is_replaced_not_used() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());
    resolve(&llama("main"), &opts).await.unwrap();
    let sha = model_sha();
    let blob = repo_dir(cache.path(), "org/tiny-llama").join(format!("blobs/{sha}"));

    // Same size, different bytes (bit rot, a bad copy): the marker no longer matches, the hash fails.
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[1000] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();

    // Offline it cannot be replaced: refused, never used.
    let mut offline = opts.clone();
    offline.offline = true;
    let err = resolve(&llama("main"), &offline).await.unwrap_err();
    assert!(
        matches!(err, HubError::Corrupt { offline: true, .. }),
        "{err:?}"
    );

    let files = resolve(&llama("main"), &opts).await.unwrap();
    assert_matches_fixture(&files);
    assert_eq!(hub.count_gets(&format!("/cdn/{sha}")), 2);

    // Truncated by a killed worker, no marker: replaced as well.
    std::fs::remove_file(
        repo_dir(cache.path(), "org/tiny-llama").join(format!("blobs/{sha}.verified")),
    )
    .unwrap();
    std::fs::write(&blob, &bytes[..4096]).unwrap();
    let files = resolve(&llama("main"), &opts).await.unwrap();
    assert_matches_fixture(&files);
    assert_eq!(hub.count_gets(&format!("/cdn/{sha}")), 3);
}

fn model_size() -> u64 {
    std::fs::metadata(fixture_dir().join("model.safetensors"))
        .unwrap()
        .len()
}

#[tokio::test]
async fn broken_transfer_resumes_with_a_range_request_and_sends_each_byte_about_once() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let sha = model_sha();
    let size = model_size();
    hub.arm(&sha, Fault::DropMidBody);
    resolve_fixture(&hub, cache.path()).await;
    let half = size / 2;
    let replies = hub.cdn_replies();
    assert_eq!(
        replies.len(),
        2,
        "one broken transfer, one resume: {replies:?}"
    );
    assert_eq!(replies[0].range, None);
    // The resume starts where wick's file ended: at the cut, less what the cut lost in flight.
    let resumed = replies[1].range_start().unwrap();
    assert!(resumed > 0 && resumed <= half, "{replies:?}");
    assert_eq!(
        replies[1].if_range.as_deref(),
        Some(replies[0].etag.as_str()),
        "the validator the CDN sent guards the resume"
    );
    assert_eq!(replies[1].status, 206);
    assert_eq!(
        hub.served(),
        half + (size - resumed),
        "the broken half, then only the rest"
    );
    assert!(partial_files(cache.path(), "org/tiny-llama").is_empty());
}

#[tokio::test]
async fn many_resets_still_cost_about_one_file_of_traffic() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let sha = model_sha();
    let size = model_size();
    // Ten resets, more than max_attempts (5): attempts that move the file forward do not count.
    for i in 1..=10 {
        hub.arm(
            &sha,
            Fault::CutAt {
                at: size * i / 11,
                new_etag: false,
            },
        );
    }
    resolve_fixture(&hub, cache.path()).await;
    let replies = hub.cdn_replies();
    assert_eq!(replies.len(), 11);
    assert!(replies[1..].iter().all(|r| r.status == 206), "{replies:?}");
    // A cut can lose only what the server had not yet written to the socket (hyper buffers at most
    // ~400 KiB); with the mock's graceful cuts that is nothing unless the machine is starved.
    assert!(
        hub.served() <= size + 10 * 512 * 1024,
        "{} bytes sent for a {size}-byte file",
        hub.served()
    );
}

#[tokio::test]
async fn server_that_ignores_range_is_downloaded_from_the_start_again() {
    let hub = start_hub().await;
    hub.ignore_range.store(true, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let sha = model_sha();
    let size = model_size();
    hub.arm(&sha, Fault::DropMidBody);
    resolve_fixture(&hub, cache.path()).await;
    let replies = hub.cdn_replies();
    assert_eq!(replies.len(), 2);
    assert!(replies[1].range.is_some(), "wick asked for the rest");
    assert_eq!(
        replies[1].status, 200,
        "and got the whole file, which it kept"
    );
    assert_eq!(hub.served(), size / 2 + size);
}

#[tokio::test]
async fn replaced_object_fails_if_range_and_the_file_starts_over() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let sha = model_sha();
    let size = model_size();
    hub.arm(
        &sha,
        Fault::CutAt {
            at: size / 3,
            new_etag: true,
        },
    );
    resolve_fixture(&hub, cache.path()).await;
    let replies = hub.cdn_replies();
    assert_eq!(replies.len(), 2);
    assert!(replies[1]
        .range_start()
        .is_some_and(|n| n > 0 && n <= size / 3));
    assert_eq!(
        replies[1].if_range.as_deref(),
        Some(replies[0].etag.as_str())
    );
    assert_ne!(replies[1].etag, replies[0].etag);
    assert_eq!(
        replies[1].status, 200,
        "the old validator no longer matches: the whole file"
    );
    assert_eq!(hub.served(), size / 3 + size);
}

#[tokio::test]
async fn range_refused_with_416_starts_the_file_over() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let sha = model_sha();
    let size = model_size();
    hub.arm(&sha, Fault::DropMidBody);
    hub.arm(&sha, Fault::Refuse416);
    resolve_fixture(&hub, cache.path()).await;
    let statuses: Vec<(bool, u16)> = hub
        .cdn_replies()
        .iter()
        .map(|r| (r.range.is_some(), r.status))
        .collect();
    assert_eq!(statuses, vec![(false, 200), (true, 416), (false, 200)]);
    assert_eq!(hub.served(), size / 2 + size);
}

/// Runs one resolve that gives up, leaving a partial file of at most `at` bytes behind (as a worker
/// killed or out of retries would): the connection is cut at `at`, then again at `at` (no progress, so
/// `max_attempts = 1` ends it; spare cuts in case a starved machine lost bytes in flight). Returns the
/// partial's path and length, and forgets the CDN's counts and unused faults.
async fn leave_a_partial(hub: &Hub, cache: &Path, at: u64) -> (PathBuf, u64) {
    let sha = model_sha();
    for _ in 0..4 {
        hub.arm(
            &sha,
            Fault::CutAt {
                at,
                new_etag: false,
            },
        );
    }
    let mut opts = options(hub, cache);
    opts.max_attempts = 1;
    let err = resolve(&llama("main"), &opts).await.unwrap_err();
    assert!(matches!(err, HubError::Network { .. }), "{err:?}");
    let partial = repo_dir(cache, "org/tiny-llama").join(format!("blobs/{sha}.incomplete"));
    let meta = std::fs::metadata(&partial).unwrap();
    assert!(
        meta.len() > 0 && meta.len() <= at,
        "the broken attempts' bytes stay on disk: {}",
        meta.len()
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    hub.faults.lock().unwrap().clear();
    hub.reset_cdn_counts();
    (partial, meta.len())
}

#[tokio::test]
async fn a_new_process_resumes_the_partial_file_a_previous_one_left() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let size = model_size();
    let (partial, kept) = leave_a_partial(&hub, cache.path(), size * 3 / 5).await;
    // Old enough to count as stale: still resumed, because this very blob is being fetched.
    std::fs::File::options()
        .write(true)
        .open(&partial)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();

    resolve_fixture(&hub, cache.path()).await;
    let replies = hub.cdn_replies();
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].range, Some(format!("bytes={kept}-")));
    assert_eq!(
        replies[0].if_range, None,
        "no validator survives the process; the sha256 check guards the splice"
    );
    assert_eq!(replies[0].status, 206);
    assert_eq!(hub.served(), size - kept, "only the missing bytes");
    assert!(partial_files(cache.path(), "org/tiny-llama").is_empty());
}

#[tokio::test]
async fn disk_check_counts_only_the_bytes_a_resume_still_needs() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let size = model_size();
    let (_, kept) = leave_a_partial(&hub, cache.path(), size / 2).await;
    // Room for the rest of the weights, not for all of them (the small files are cached already).
    let mut opts = options(&hub, cache.path());
    let room = wick::hub::disk::required_with_margin(size - kept);
    assert!(room < wick::hub::disk::required_with_margin(size));
    opts.free_space = FreeSpace::Fixed(room);
    let files = resolve(&llama("main"), &opts).await.unwrap();
    assert_matches_fixture(&files);
    assert_eq!(hub.served(), size - kept);
}

#[tokio::test]
async fn corrupt_bytes_in_a_resumed_partial_are_caught_and_fetched_again() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let size = model_size();
    let (partial, kept) = leave_a_partial(&hub, cache.path(), size / 2).await;
    let mut bytes = std::fs::read(&partial).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&partial, &bytes).unwrap();

    resolve_fixture(&hub, cache.path()).await;
    let statuses: Vec<(Option<String>, u16)> = hub
        .cdn_replies()
        .iter()
        .map(|r| (r.range.clone(), r.status))
        .collect();
    assert_eq!(
        statuses,
        vec![(Some(format!("bytes={kept}-")), 206), (None, 200)],
        "resumed, failed the sha256 check, fetched again from byte 0"
    );
    assert_eq!(hub.served(), (size - kept) + size);
}

#[tokio::test]
async fn partial_as_long_as_the_file_is_only_verified() {
    use std::os::unix::fs::OpenOptionsExt;
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    // A worker killed after the last byte, before the rename.
    let blobs = repo_dir(cache.path(), "org/tiny-llama").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut partial = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(blobs.join(format!("{}.incomplete", model_sha())))
        .unwrap();
    std::io::Write::write_all(
        &mut partial,
        &std::fs::read(fixture_dir().join("model.safetensors")).unwrap(),
    )
    .unwrap();
    drop(partial);
    resolve_fixture(&hub, cache.path()).await;
    assert!(hub.cdn_replies().is_empty(), "{:?}", hub.cdn_replies());
}

#[tokio::test]
async fn partial_file_of_another_owner_or_mode_is_started_over() {
    use std::os::unix::fs::OpenOptionsExt;
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let size = model_size();
    // Readable by others (not wick's own 0600 file): never resumed, whatever it holds.
    let blobs = repo_dir(cache.path(), "org/tiny-llama").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let path = blobs.join(format!("{}.incomplete", model_sha()));
    let mut partial = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut partial, &vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(partial);
    resolve_fixture(&hub, cache.path()).await;
    let replies = hub.cdn_replies();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].range, None);
    assert_eq!(hub.served(), size);
}

#[tokio::test]
async fn token_reaches_the_hub_but_never_the_cdn_on_another_port() {
    let hub = start_hub().await;
    start_cdn(&hub).await;
    let mut repo = tiny_llama_repo();
    repo.gated = true;
    hub.add_repo("org/gated", repo);
    let sha = model_sha();
    hub.arm(&sha, Fault::DropMidBody);
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(&hub, cache.path());
    opts.token = Some(wick::config::Secret::new(TOKEN));
    let files = resolve(
        &request("org/gated", "main", HubWeights::Safetensors),
        &opts,
    )
    .await
    .unwrap();
    assert_matches_fixture(&files);
    let seen = hub.seen.lock().unwrap().clone();
    let cdn: Vec<&Seen> = seen.iter().filter(|s| s.server == "cdn").collect();
    assert_eq!(cdn.len(), 2, "the broken transfer and its resume: {seen:?}");
    assert!(
        cdn.iter().all(|s| s.authorization.is_none()),
        "no credential for another origin: {cdn:?}"
    );
    let resolves: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.server == "hub" && s.path.contains("/resolve/"))
        .collect();
    assert!(!resolves.is_empty());
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        resolves
            .iter()
            .all(|s| s.authorization.as_deref() == Some(bearer.as_str())),
        "the gated repo's own requests carry the token: {resolves:?}"
    );
}

#[tokio::test]
async fn corrupted_bytes_from_the_server_fail_verification_and_are_fetched_again() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let sha = model_sha();
    hub.arm(&sha, Fault::Corrupt);
    resolve_fixture(&hub, cache.path()).await;
    assert_eq!(hub.count_gets(&format!("/cdn/{sha}")), 2);
}

#[tokio::test]
async fn persistent_network_failure_gives_up_after_bounded_attempts() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(&hub, cache.path());
    opts.max_attempts = 3;
    opts.endpoint = "http://127.0.0.1:9".into(); // discard port: connection refused
    let err = resolve(&llama("main"), &opts).await.unwrap_err();
    assert!(
        matches!(err, HubError::Network { attempts: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("HF_ENDPOINT"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_download_is_private_and_never_under_the_final_name() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let sha = model_sha();
    hub.arm(&sha, Fault::Pause(Duration::from_secs(2)));
    let opts = options(&hub, cache.path());
    let task = tokio::spawn(async move { resolve(&llama("main"), &opts).await });

    let blobs = repo_dir(cache.path(), "org/tiny-llama").join("blobs");
    let partial = blobs.join(format!("{sha}.incomplete"));
    let mut seen = false;
    for _ in 0..400 {
        if let Ok(meta) = std::fs::metadata(&partial) {
            if meta.len() > 0 {
                assert_eq!(
                    meta.permissions().mode() & 0o777,
                    0o600,
                    "partial files are private"
                );
                assert!(
                    !blobs.join(&sha).exists(),
                    "nothing under the final name while in flight"
                );
                assert!(!repo_dir(cache.path(), "org/tiny-llama")
                    .join(format!("snapshots/{COMMIT}/model.safetensors"))
                    .exists());
                seen = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "the paused transfer was observed in flight");
    assert_matches_fixture(&task.await.unwrap().unwrap());
}

#[tokio::test]
async fn missing_file_repo_and_revision_errors_name_the_problem() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());

    let err = resolve(&request("org/nope", "main", HubWeights::Safetensors), &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HubError::RepoNotFound { ref repo, .. } if repo == "org/nope"),
        "{err:?}"
    );
    assert!(err.to_string().contains("MODEL_NAME"), "{err}");

    let err = resolve(&llama("no-such-branch"), &opts).await.unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("MODEL_REVISION"), "{err}");

    let mut repo = tiny_llama_repo();
    repo.files.remove("tokenizer.json");
    hub.add_repo("org/no-tokenizer", repo);
    let err = resolve(
        &request("org/no-tokenizer", "main", HubWeights::Safetensors),
        &opts,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, HubError::FileNotFound { ref file, .. } if file == "tokenizer.json"),
        "{err:?}"
    );

    let err = resolve(
        &request(
            "org/tiny-llama",
            "main",
            HubWeights::Gguf {
                file: "missing.gguf".into(),
            },
        ),
        &opts,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, HubError::FileNotFound { ref file, .. } if file == "missing.gguf"),
        "{err:?}"
    );

    // A repo with only pickle weights is refused without fetching them.
    let mut repo = tiny_llama_repo();
    repo.files.remove("model.safetensors");
    hub.add_repo("org/pickle-only", repo);
    let err = resolve(
        &request("org/pickle-only", "main", HubWeights::Safetensors),
        &opts,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, HubError::NoWeights { .. }) && err.to_string().contains("pickle"),
        "{err:?}"
    );
    assert_eq!(hub.count_gets("pytorch_model.bin"), 0);
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The process-wide log capture (a global subscriber: a thread-local one misses events when other
/// tests touch the same callsites first).
fn captured_logs() -> LogBuffer {
    static LOGS: std::sync::OnceLock<LogBuffer> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(logs.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        logs
    })
    .clone()
}

#[tokio::test]
async fn gated_repo_needs_a_token_which_never_reaches_logs_or_errors() {
    let logs = captured_logs();

    let hub = start_hub().await;
    let mut repo = tiny_llama_repo();
    repo.gated = true;
    hub.add_repo("org/gated", repo);
    let cache = tempfile::tempdir().unwrap();
    let gated = request("org/gated", "main", HubWeights::Safetensors);

    let err = resolve(&gated, &options(&hub, cache.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            HubError::Unauthorized {
                token_given: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("set HF_TOKEN"), "{err}");

    let mut wrong = options(&hub, cache.path());
    wrong.token = Some(wick::config::Secret::new("hf_wrong_canary_token"));
    let err_wrong = resolve(&gated, &wrong).await.unwrap_err();
    assert!(
        matches!(
            err_wrong,
            HubError::Unauthorized {
                token_given: true,
                ..
            }
        ),
        "{err_wrong:?}"
    );

    let mut right = options(&hub, cache.path());
    right.token = Some(wick::config::Secret::new(TOKEN));
    let files = resolve(&gated, &right).await.unwrap();
    assert_matches_fixture(&files);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("model files resolved"),
        "the log capture works"
    );
    for text in [
        logs,
        err.to_string(),
        format!("{err:?}"),
        err_wrong.to_string(),
        format!("{err_wrong:?}"),
        format!("{right:?}"),
    ] {
        assert!(
            !text.contains(TOKEN) && !text.contains("hf_wrong_canary_token"),
            "token leaked: {text}"
        );
    }
}

#[tokio::test]
async fn not_enough_disk_is_refused_before_any_download() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(&hub, cache.path());
    opts.free_space = FreeSpace::Fixed(10_000);
    let err = resolve(&llama("main"), &opts).await.unwrap_err();
    let HubError::DiskFull {
        download,
        available,
        needed,
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(available, 10_000);
    assert!(download > 0 && needed > download);
    assert!(
        hub.gets().is_empty(),
        "nothing downloaded: {:?}",
        hub.gets()
    );
    let blobs = repo_dir(cache.path(), "org/tiny-llama").join("blobs");
    assert!(!blobs.exists() || std::fs::read_dir(&blobs).unwrap().next().is_none());

    // Enough room for the small files but not the weights: refused before the weights' first byte.
    let small: u64 = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ]
    .iter()
    .map(|f| std::fs::metadata(fixture_dir().join(f)).unwrap().len())
    .sum();
    opts.free_space = FreeSpace::Fixed(wick::hub::disk::required_with_margin(small));
    let err = resolve(&llama("main"), &opts).await.unwrap_err();
    assert!(matches!(err, HubError::DiskFull { .. }), "{err:?}");
    assert!(err.to_string().contains("BASE_PATH"), "{err}");
    assert_eq!(hub.count_gets(&format!("/cdn/{}", model_sha())), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_one_cache_both_succeed_with_one_download() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let sha = model_sha();
    // Slow the weights down so both workers are certainly in flight together.
    hub.arm(&sha, Fault::Pause(Duration::from_millis(500)));
    let (a, b) = (options(&hub, cache.path()), options(&hub, cache.path()));
    let (ra, rb) = tokio::join!(
        tokio::spawn(async move { resolve(&llama("main"), &a).await }),
        tokio::spawn(async move { resolve(&llama("main"), &b).await })
    );
    let (fa, fb) = (ra.unwrap().unwrap(), rb.unwrap().unwrap());
    assert_eq!(fa, fb);
    assert_matches_fixture(&fa);
    assert_eq!(
        hub.count_gets(&format!("/cdn/{sha}")),
        1,
        "the second worker waited and reused the blob"
    );
    assert_eq!(hub.count_gets("/config.json"), 1);
    assert!(partial_files(cache.path(), "org/tiny-llama").is_empty());
}

/// Splits a safetensors file into two shards (tensors sorted by name, first half / second half) and
/// returns `(shard bytes, index json)`.
fn split_safetensors(bytes: &[u8]) -> (Vec<(String, Vec<u8>)>, String) {
    let header_len = usize::try_from(u64::from_le_bytes(bytes[..8].try_into().unwrap())).unwrap();
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    let halves = [&names[..names.len() / 2], &names[names.len() / 2..]];
    let mut shards = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, half) in halves.iter().enumerate() {
        let shard_name = format!("model-{:05}-of-00002.safetensors", i + 1);
        let mut new_header = serde_json::Map::new();
        let mut body = Vec::new();
        for name in half.iter() {
            let mut info = header[*name].clone();
            let offsets = info["data_offsets"].as_array().unwrap();
            let (start, end) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            info["data_offsets"] = serde_json::json!([body.len(), body.len() + end - start]);
            body.extend_from_slice(&data[start..end]);
            new_header.insert((*name).clone(), info);
            weight_map.insert(
                (*name).clone(),
                serde_json::Value::String(shard_name.clone()),
            );
        }
        let header_bytes = serde_json::to_vec(&new_header).unwrap();
        let mut shard = (header_bytes.len() as u64).to_le_bytes().to_vec();
        shard.extend_from_slice(&header_bytes);
        shard.extend_from_slice(&body);
        shards.push((shard_name, shard));
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": data.len() }, "weight_map": weight_map });
    (shards, index.to_string())
}

#[tokio::test]
async fn sharded_model_downloads_every_shard_in_index_order() {
    let hub = start_hub().await;
    let mut repo = tiny_llama_repo();
    let original = repo.files.remove("model.safetensors").unwrap();
    let (shards, index) = split_safetensors(&original.bytes);
    for (name, bytes) in &shards {
        repo.files
            .insert(name.clone(), mock_file(bytes.clone(), true));
    }
    repo.files.insert(
        "model.safetensors.index.json".into(),
        mock_file(index, false),
    );
    hub.add_repo("org/sharded", repo);

    let cache = tempfile::tempdir().unwrap();
    let files = resolve(
        &request("org/sharded", "main", HubWeights::Safetensors),
        &options(&hub, cache.path()),
    )
    .await
    .unwrap();
    let WeightFiles::Safetensors(paths) = &files.weights else {
        panic!("safetensors")
    };
    assert_eq!(paths.len(), 2);
    let original_tensors = candle_core::safetensors::load(
        fixture_dir().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut loaded = 0;
    for (path, (name, bytes)) in paths.iter().zip(&shards) {
        assert!(path.ends_with(name));
        assert_eq!(&std::fs::read(path).unwrap(), bytes);
        for (tensor, value) in
            candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
        {
            let want = &original_tensors[&tensor];
            assert_eq!(
                value.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            loaded += 1;
        }
    }
    assert_eq!(loaded, original_tensors.len());
}

#[tokio::test]
async fn index_with_path_traversal_is_refused() {
    let hub = start_hub().await;
    let mut repo = tiny_llama_repo();
    repo.files.remove("model.safetensors");
    let index = serde_json::json!({ "weight_map": { "w": "../../../../etc/evil.safetensors" } });
    repo.files.insert(
        "model.safetensors.index.json".into(),
        mock_file(index.to_string(), false),
    );
    hub.add_repo("org/evil", repo);
    let cache = tempfile::tempdir().unwrap();
    let err = resolve(
        &request("org/evil", "main", HubWeights::Safetensors),
        &options(&hub, cache.path()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HubError::UnsafePath { .. }), "{err:?}");
    assert!(hub
        .requests()
        .iter()
        .all(|r| !r.path.contains("evil.safetensors")));
}

#[tokio::test]
async fn gguf_selection_fetches_one_file_and_checks_the_preset_pin() {
    let hub = start_hub().await;
    let gguf_a: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sha_a = sha256_hex(&gguf_a);
    let mut files = BTreeMap::new();
    files.insert(
        "tiny.Q4_1.gguf".to_string(),
        mock_file(gguf_a.clone(), true),
    );
    files.insert(
        "tiny.Q8_0.gguf".to_string(),
        mock_file(vec![7u8; 1000], true),
    );
    files.insert("README.md".to_string(), mock_file(&b"# gguf"[..], false));
    hub.add_repo(
        "org/tiny-gguf",
        MockRepo {
            files,
            gated: false,
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());

    let presets = Presets::builtin().unwrap();
    let req = parse_model_request(Some("org/tiny-gguf:tiny.Q4_1.gguf"), None, &presets).unwrap();
    let resolved = resolve(&req, &opts).await.unwrap();
    let WeightFiles::Gguf(path) = &resolved.weights else {
        panic!("gguf")
    };
    assert_eq!(std::fs::read(path).unwrap(), gguf_a);
    assert!(resolved.config.is_none() && resolved.tokenizer_json.is_none());
    assert_eq!(
        hub.gets(),
        vec![
            format!("/org/tiny-gguf/resolve/{COMMIT}/tiny.Q4_1.gguf"),
            format!("/cdn/{sha_a}")
        ]
    );

    let toml = |sha: &str| {
        format!(
            "default = \"tiny\"\n[presets.tiny]\nrepo = \"org/tiny-gguf\"\nrevision = \"main\"\narchitecture = \"llama\"\n\
             dtype = \"f32\"\nformat = \"gguf\"\nfile = \"tiny.Q4_1.gguf\"\nsha256 = \"{sha}\"\n"
        )
    };
    let pinned_ok = Presets::parse(&toml(&sha_a), "test").unwrap();
    let req = parse_model_request(None, None, &pinned_ok).unwrap();
    assert_eq!(resolve(&req, &opts).await.unwrap(), resolved);

    let fresh = tempfile::tempdir().unwrap();
    hub.clear();
    let pinned_bad = Presets::parse(&toml(&"0".repeat(64)), "test").unwrap();
    let req = parse_model_request(None, None, &pinned_bad).unwrap();
    let err = resolve(&req, &options(&hub, fresh.path()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, HubError::PinMismatch { ref served, .. } if *served == sha_a),
        "{err:?}"
    );
    assert!(
        hub.gets().is_empty(),
        "a pin mismatch is caught before downloading"
    );
}

#[tokio::test]
async fn stale_partial_files_from_a_killed_worker_are_removed() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let blobs = repo_dir(cache.path(), "org/tiny-llama").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let stale = blobs.join(format!("{}.incomplete", "e".repeat(64)));
    std::fs::File::create(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    resolve(&llama("main"), &options(&hub, cache.path()))
        .await
        .unwrap();
    assert!(!stale.exists());
}

#[tokio::test]
async fn resolve_model_takes_everything_from_the_config() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let mut config = wick::config::Config::for_test();
    config.model_name = Some("org/tiny-llama".into());
    config.model_revision = None;
    config.models_toml = None;
    config.hub_env = wick::config::HubEnv {
        endpoint: Some(hub.base.clone()),
        hub_cache: Some(cache.path().to_path_buf()),
        offline: false,
        ..wick::config::HubEnv::default()
    };
    let files = wick::hub::download(&config, None).await.unwrap();
    assert_matches_fixture(&files);
    assert!(files
        .all_paths()
        .iter()
        .all(|p| p.starts_with(cache.path())));

    config.hub_env.offline = true;
    hub.clear();
    assert_eq!(
        wick::hub::resolve_model(&config, None).await.unwrap(),
        files
    );
    assert!(hub.requests().is_empty());
}

/// Median of a few timings, in milliseconds.
fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark (prints figures); run: cargo test --test hub_download -- --ignored --nocapture"]
async fn bench_cold_download_and_warm_resolve() {
    use std::time::Instant;
    let logs = captured_logs();
    let hub = start_hub().await;
    let size: usize = 100 * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(7) % 251) as u8).collect();
    let started = Instant::now();
    let sha = sha256_hex(&data);
    let hash_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut files = BTreeMap::new();
    files.insert("big.gguf".to_string(), mock_file(data, true));
    hub.add_repo(
        "org/bench",
        MockRepo {
            files,
            gated: false,
        },
    );
    let req = request(
        "org/bench",
        "main",
        HubWeights::Gguf {
            file: "big.gguf".into(),
        },
    );
    #[allow(clippy::cast_precision_loss)]
    let mb = size as f64 / 1e6;

    let mut cold = Vec::new();
    let mut warm_cache = None;
    for _ in 0..3 {
        let cache = tempfile::tempdir().unwrap();
        let opts = options(&hub, cache.path());
        let started = Instant::now();
        resolve(&req, &opts).await.unwrap();
        cold.push(started.elapsed());
        warm_cache = Some(cache);
    }
    let cache = warm_cache.unwrap();
    let opts = options(&hub, cache.path());
    let mut warm_branch = Vec::new();
    let mut warm_pinned = Vec::new();
    let pinned = request(
        "org/bench",
        COMMIT,
        HubWeights::Gguf {
            file: "big.gguf".into(),
        },
    );
    for _ in 0..5 {
        let started = Instant::now();
        resolve(&req, &opts).await.unwrap();
        warm_branch.push(started.elapsed());
        let started = Instant::now();
        resolve(&pinned, &opts).await.unwrap();
        warm_pinned.push(started.elapsed());
    }
    // A cache filled by another tool (no .verified marker): the first start hashes once.
    let marker = repo_dir(cache.path(), "org/bench").join(format!("blobs/{sha}.verified"));
    std::fs::remove_file(&marker).unwrap();
    let started = Instant::now();
    resolve(&pinned, &opts).await.unwrap();
    let rehash = started.elapsed();

    let cold_ms = median_ms(cold);
    println!("payload: {mb:.1} MB (one LFS file through the mock hub's 302 to its CDN route)");
    println!(
        "sha256 of the payload in memory: {hash_ms:.0} ms ({:.0} MB/s)",
        mb / hash_ms * 1000.0
    );
    println!(
        "cold download + verify (median of 3): {cold_ms:.0} ms = {:.1} MB/s",
        mb / cold_ms * 1000.0
    );
    println!(
        "warm resolve, branch `main` (1 HEAD, no hash), median of 5: {:.2} ms",
        median_ms(warm_branch)
    );
    println!(
        "warm resolve, pinned commit (no request, no hash), median of 5: {:.2} ms",
        median_ms(warm_pinned)
    );
    println!(
        "warm resolve without a .verified marker (hashes once): {:.0} ms",
        rehash.as_secs_f64() * 1000.0
    );
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for line in logs.lines().filter(|l| l.contains("wick::hub::")).take(4) {
        println!("log: {line}");
    }
}

#[tokio::test]
async fn cache_filled_by_another_tool_is_hashed_once_then_trusted() {
    let hub = start_hub().await;
    let cache = tempfile::tempdir().unwrap();
    let online = resolve(&llama("main"), &options(&hub, cache.path()))
        .await
        .unwrap();
    // Python/hf-hub leave the same layout without wick's markers.
    let blobs = repo_dir(cache.path(), "org/tiny-llama").join("blobs");
    let markers: Vec<PathBuf> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "verified"))
        .collect();
    assert_eq!(markers.len(), 5, "one marker per file");
    for marker in &markers {
        std::fs::remove_file(marker).unwrap();
    }
    let mut offline = options(&hub, cache.path());
    offline.offline = true;
    hub.clear();
    assert_eq!(resolve(&llama("main"), &offline).await.unwrap(), online);
    assert!(hub.requests().is_empty());
    assert!(
        markers.iter().all(|m| m.exists()),
        "markers written after hashing"
    );
}

/// xorshift64*: a seeded, dependency-free source of cut points.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement for docs/ROBUSTNESS.md Q10 (prints figures); run: cargo test --test hub_download -- --ignored --nocapture measure_"]
async fn measure_resume_under_50_stalls_and_resets() {
    use std::time::Instant;
    const EVENTS: usize = 50;
    const TRIALS: u64 = 6;
    let hub = start_hub().await;
    let size: usize = 100 * 1024 * 1024;
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(13) % 253) as u8)
        .collect();
    let sha = sha256_hex(&data);
    let mut files = BTreeMap::new();
    files.insert("big.gguf".to_string(), mock_file(data, true));
    hub.add_repo(
        "org/flaky",
        MockRepo {
            files,
            gated: false,
        },
    );
    let req = request(
        "org/flaky",
        "main",
        HubWeights::Gguf {
            file: "big.gguf".into(),
        },
    );
    let size = size as u64;
    let (mut served_total, mut corrupt, mut ranged, mut restart_cost) = (0u64, 0, 0, 0u64);
    for trial in 0..TRIALS {
        // Trials 0-2: every byte sent before a cut arrives; 3-5: cuts lose what was in flight.
        let hard = trial >= TRIALS / 2;
        hub.hard_cuts.store(hard, Ordering::SeqCst);
        hub.reset_cdn_counts();
        let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (trial + 1);
        let mut points: Vec<u64> = (0..EVENTS)
            .map(|_| 1 + next_random(&mut rng) % (size - 1))
            .collect();
        points.sort_unstable();
        points.dedup();
        assert_eq!(points.len(), EVENTS);
        // Every fifth event is a stall (the connection stays open, silent), the others resets.
        for (i, &at) in points.iter().enumerate() {
            hub.arm(
                &sha,
                if i % 5 == 4 {
                    Fault::StallAt(at)
                } else {
                    Fault::CutAt {
                        at,
                        new_etag: false,
                    }
                },
            );
        }
        let cache = tempfile::tempdir().unwrap();
        let mut opts = options(&hub, cache.path());
        opts.stall_timeout = Duration::from_secs(1);
        let started = Instant::now();
        let resolved = resolve(&req, &opts).await.unwrap();
        let elapsed = started.elapsed();
        let WeightFiles::Gguf(path) = &resolved.weights else {
            panic!("gguf")
        };
        let ok = sha256_hex(&std::fs::read(path).unwrap()) == sha;
        corrupt += usize::from(!ok);
        let replies = hub.cdn_replies();
        let ranged_here = replies.iter().filter(|r| r.status == 206).count();
        ranged += ranged_here;
        let served = hub.served();
        served_total += served;
        // What the same events cost when every broken transfer starts again at byte 0.
        restart_cost += points.iter().sum::<u64>() + size;
        #[allow(clippy::cast_precision_loss)]
        let ratio = served as f64 / size as f64;
        println!(
            "trial {trial} ({} cuts): {} resets + {} stalls, {} GETs ({ranged_here} answered 206), served {served} bytes for a {size}-byte file = {ratio:.4}x, sha256 {}, {:.1} s",
            if hard { "hard" } else { "graceful" },
            EVENTS - EVENTS / 5,
            EVENTS / 5,
            replies.len(),
            if ok { "ok" } else { "MISMATCH" },
            elapsed.as_secs_f64()
        );
        assert!(ok);
    }
    #[allow(clippy::cast_precision_loss)]
    let (ratio, restart_ratio) = (
        served_total as f64 / (size * TRIALS) as f64,
        restart_cost as f64 / (size * TRIALS) as f64,
    );
    println!(
        "total: {} stalls/resets over {TRIALS} downloads of {} MiB: bytes served / file size = {ratio:.4}x ({ranged} ranged resumes); corrupt files {corrupt}; restarting from byte 0 instead would have cost {restart_ratio:.1}x",
        EVENTS as u64 * TRIALS,
        size >> 20
    );
    assert_eq!(corrupt, 0);
    assert!(ratio < 1.25, "{ratio}");
}
