//! The platform's URL templates: placeholder substitution and query parameters as runpod-python
//! 1.12.0 builds them (spec §1.1, §4.1, §5.1, §8, §9), with the spec's safe improvements:
//! `$RUNPOD_POD_ID` is also replaced in the job-take template, a template without `?` gets `?` rather
//! than a blind `&`, and job ids are percent-encoded outside the URL-safe set (real ids are uuids with
//! dashes, which encode to themselves).

/// The job-take path segment, swapped for the batch and stop channels.
const TAKE_SEGMENT: &str = "/job-take/";
/// Batch job-take path segment (more than one free slot).
const TAKE_BATCH_SEGMENT: &str = "/job-take-batch/";
/// Per-job stop channel path segment.
const STOP_SEGMENT: &str = "/job-stop/";

/// The four platform URLs with the worker id already substituted.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoints {
    /// Job-take URL (`$ID` and `$RUNPOD_POD_ID` → worker id).
    take: String,
    /// Job-done template with the worker id substituted; `$ID` still to replace per job.
    done: String,
    /// Job-stream template with the worker id substituted; `$ID` still to replace per job.
    stream: String,
    /// Ping URL (worker id substituted), when a heartbeat is configured.
    ping: Option<String>,
}

impl Endpoints {
    /// Substitutes the worker id into the templates (done once at start, as the SDK does).
    pub fn new(take: &str, done: &str, stream: &str, ping: Option<&str>, worker_id: &str) -> Self {
        Endpoints {
            take: take
                .replace("$RUNPOD_POD_ID", worker_id)
                .replace("$ID", worker_id),
            done: done.replace("$RUNPOD_POD_ID", worker_id),
            stream: stream.replace("$RUNPOD_POD_ID", worker_id),
            ping: ping.map(|p| p.replace("$RUNPOD_POD_ID", worker_id)),
        }
    }

    /// The job-take URL: `/job-take-batch/` with `batch_size` when more than one slot is free, and
    /// always `job_in_progress=0|1`.
    pub fn take_url(&self, free_slots: usize, job_in_progress: bool) -> String {
        let mut url = if free_slots > 1 {
            with_query(
                &self.take.replace(TAKE_SEGMENT, TAKE_BATCH_SEGMENT),
                "batch_size",
                &free_slots.to_string(),
            )
        } else {
            self.take.clone()
        };
        url = with_query(
            &url,
            "job_in_progress",
            if job_in_progress { "1" } else { "0" },
        );
        url
    }

    /// The job-stop URL (same query as job-take, no `job_in_progress`); `None` when the take
    /// template has no `/job-take/` segment (the SDK disables the stop channel then).
    pub fn stop_url(&self) -> Option<String> {
        self.take
            .contains(TAKE_SEGMENT)
            .then(|| self.take.replace(TAKE_SEGMENT, STOP_SEGMENT))
    }

    /// The job-done URL for one job: `isStream=true` for the final post after streaming.
    pub fn done_url(&self, job_id: &str, is_stream: bool) -> String {
        let url = self.done.replace("$ID", &encode_component(job_id));
        with_query(&url, "isStream", if is_stream { "true" } else { "false" })
    }

    /// The job-stream URL for one job (the SDK sends `isStream=false` here).
    pub fn stream_url(&self, job_id: &str) -> String {
        let url = self.stream.replace("$ID", &encode_component(job_id));
        with_query(&url, "isStream", "false")
    }

    /// The ping URL with `job_id=<comma list>` (omitted when none) and `runpod_version`; values are
    /// URL-encoded (`,` → `%2C`), as the SDK's query builder does.
    pub fn ping_url(&self, job_ids: &[String], runpod_version: &str) -> Option<String> {
        let base = self.ping.as_ref()?;
        let mut url = base.clone();
        if !job_ids.is_empty() {
            url = with_query(&url, "job_id", &encode_component(&job_ids.join(",")));
        }
        Some(with_query(
            &url,
            "runpod_version",
            &encode_component(runpod_version),
        ))
    }

    /// Whether a heartbeat URL is configured.
    pub fn has_ping(&self) -> bool {
        self.ping.is_some()
    }
}

/// Appends `key=value` (value already encoded) with `?` when the URL has no query yet, else `&`.
pub fn with_query(url: &str, key: &str, value: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{key}={value}")
}

/// Percent-encodes everything outside RFC 3986's unreserved set (`A-Z a-z 0-9 - . _ ~`).
pub fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Checks that a URL template (`$ID` / `$RUNPOD_POD_ID` placeholders allowed) is an absolute
/// `http`/`https` URL, so a malformed `RUNPOD_WEBHOOK_*` variable is refused at startup rather than
/// failing every call. The error says why, never the template itself (it may carry secrets).
///
/// # Errors
/// The reason the template is not a usable URL.
pub fn check_template(template: &str) -> Result<(), String> {
    let sample = template
        .replace("$RUNPOD_POD_ID", "worker")
        .replace("$ID", "id");
    let url = reqwest::Url::parse(&sample).map_err(|e| e.to_string())?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(()),
        "http" | "https" => Err("the URL has no host".to_string()),
        other => Err(format!("scheme `{other}` is not http or https")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_templates_are_refused_and_real_ones_accepted() {
        assert!(check_template("http://127.0.0.1:8080/v2/e/job-take/$ID?gpu=x").is_ok());
        assert!(
            check_template("https://api.example.test/v2/e/job-done/$RUNPOD_POD_ID/$ID").is_ok()
        );
        let why = check_template("::not a url::/$ID").unwrap_err();
        assert!(
            !why.contains("not a url"),
            "the template is not echoed: {why}"
        );
        assert!(check_template("ftp://host/$ID").is_err());
        assert!(check_template("/relative/$ID").is_err());
        assert!(check_template("").is_err());
    }

    fn endpoints() -> Endpoints {
        Endpoints::new(
            "https://api.example/v2/ep/job-take/$ID?gpu=NVIDIA+H200",
            "https://api.example/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=NVIDIA+H200",
            "https://api.example/v2/ep/job-stream/$RUNPOD_POD_ID/$ID?gpu=NVIDIA+H200",
            Some("https://api.example/v2/ep/ping/$RUNPOD_POD_ID"),
            "w42",
        )
    }

    #[test]
    fn take_url_substitutes_worker_id_and_flags_in_progress() {
        let e = endpoints();
        assert_eq!(
            e.take_url(1, false),
            "https://api.example/v2/ep/job-take/w42?gpu=NVIDIA+H200&job_in_progress=0"
        );
        assert_eq!(
            e.take_url(3, true),
            "https://api.example/v2/ep/job-take-batch/w42?gpu=NVIDIA+H200&batch_size=3&job_in_progress=1"
        );
    }

    #[test]
    fn take_template_also_accepts_runpod_pod_id_placeholder() {
        let e = Endpoints::new(
            "http://h/v2/ep/job-take/$RUNPOD_POD_ID",
            "http://h/d/$ID",
            "http://h/s/$ID",
            None,
            "w1",
        );
        assert_eq!(
            e.take_url(1, false),
            "http://h/v2/ep/job-take/w1?job_in_progress=0"
        );
    }

    #[test]
    fn done_and_stream_urls_substitute_job_id_and_is_stream() {
        let e = endpoints();
        assert_eq!(
            e.done_url("abc-u1", true),
            "https://api.example/v2/ep/job-done/w42/abc-u1?gpu=NVIDIA+H200&isStream=true"
        );
        assert_eq!(
            e.stream_url("abc-u1"),
            "https://api.example/v2/ep/job-stream/w42/abc-u1?gpu=NVIDIA+H200&isStream=false"
        );
    }

    #[test]
    fn question_mark_used_when_template_has_no_query() {
        let e = Endpoints::new(
            "http://h/job-take/$ID",
            "http://h/job-done/$RUNPOD_POD_ID/$ID",
            "http://h/s/$ID",
            None,
            "w",
        );
        assert_eq!(
            e.done_url("j", false),
            "http://h/job-done/w/j?isStream=false"
        );
    }

    #[test]
    fn odd_job_ids_are_percent_encoded() {
        let e = endpoints();
        assert!(e
            .done_url("a/b?c", false)
            .contains("/job-done/w42/a%2Fb%3Fc?gpu="));
    }

    #[test]
    fn stop_url_swaps_segment_and_is_absent_without_job_take() {
        assert_eq!(
            endpoints().stop_url().as_deref(),
            Some("https://api.example/v2/ep/job-stop/w42?gpu=NVIDIA+H200")
        );
        let e = Endpoints::new(
            "http://h/take/$ID",
            "http://h/d/$ID",
            "http://h/s/$ID",
            None,
            "w",
        );
        assert_eq!(e.stop_url(), None);
    }

    #[test]
    fn ping_url_lists_job_ids_encoded() {
        let e = endpoints();
        assert_eq!(
            e.ping_url(&["a".into(), "b".into()], "1.12.0").as_deref(),
            Some("https://api.example/v2/ep/ping/w42?job_id=a%2Cb&runpod_version=1.12.0")
        );
        assert_eq!(
            e.ping_url(&[], "1.12.0").as_deref(),
            Some("https://api.example/v2/ep/ping/w42?runpod_version=1.12.0")
        );
    }
}
