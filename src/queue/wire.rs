//! Bodies exactly as they travel on the wire: job-take and job-stop answers in, job-done and
//! job-stream bodies out (spec §4.2, §4.3, §5.2, §7, §9). Nothing here does I/O, and these shapes
//! never leave `queue`.

use serde_json::{Map, Value};

use crate::job::input::python_truthy;

/// One job handed out by job-take.
#[derive(Debug, Clone, PartialEq)]
pub struct TakenJob {
    /// Opaque job id (e.g. `<uuid>-u1`, `sync-<uuid>`).
    pub id: String,
    /// The job's `input` (any JSON; the runner validates it).
    pub input: Value,
}

/// A job that arrived without a usable shape.
#[derive(Debug, Clone, PartialEq)]
pub struct MalformedJob {
    /// Its id, when it had one: such a job is failed with a validation error rather than dropped.
    pub id: Option<String>,
    /// What was wrong.
    pub reason: String,
}

/// What one job-take answer held.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TakeBatch {
    /// Jobs to run.
    pub jobs: Vec<TakenJob>,
    /// Jobs to fail (with an id) or to log (without).
    pub malformed: Vec<MalformedJob>,
}

/// Parses a 2xx job-take body: an object is one job, an array a batch; empty, non-JSON, or
/// other shapes hold no job (as the SDK treats them).
pub fn parse_take_body(body: &[u8]) -> TakeBatch {
    let mut batch = TakeBatch::default();
    if body.iter().all(u8::is_ascii_whitespace) {
        return batch;
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        batch.malformed.push(MalformedJob {
            id: None,
            reason: "job-take body is not JSON".into(),
        });
        return batch;
    };
    match value {
        Value::Array(items) => {
            for item in items {
                push_job(&mut batch, item);
            }
        }
        Value::Object(_) => push_job(&mut batch, value),
        other => batch.malformed.push(MalformedJob {
            id: None,
            reason: format!(
                "job-take body is a JSON {}, not an object or array",
                json_kind(&other)
            ),
        }),
    }
    batch
}

fn push_job(batch: &mut TakeBatch, item: Value) {
    let Value::Object(mut fields) = item else {
        batch.malformed.push(MalformedJob {
            id: None,
            reason: format!("job is a JSON {}", json_kind(&item)),
        });
        return;
    };
    let id = match fields.remove("id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    match (id, fields.remove("input")) {
        (Some(id), Some(input)) => batch.jobs.push(TakenJob { id, input }),
        (id, _) => batch.malformed.push(MalformedJob {
            id,
            reason: "Job has missing field(s): id or input.".into(),
        }),
    }
}

/// Parses a job-stop answer `{"jobsToStop": [...]}`; non-string ids and other shapes are dropped.
pub fn parse_stop_body(body: &[u8]) -> Vec<String> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    match fields.get("jobsToStop") {
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// The job-done body for a handler's return value (spec §5.2): a non-object becomes
/// `{"output": X}`; from an object, `error` and `refresh_worker` are popped (`error` kept when
/// truthy, JSON-encoded when not a string; `refresh_worker` → `"stopPod": true`), the rest is
/// `output`, dropped when empty.
pub fn result_body(output: Value) -> Value {
    let Value::Object(mut fields) = output else {
        return Value::Object(Map::from_iter([("output".to_string(), output)]));
    };
    let error = fields.remove("error");
    let refresh_worker = fields.remove("refresh_worker");
    let mut body = Map::new();
    if !fields.is_empty() {
        body.insert("output".into(), Value::Object(fields));
    }
    if let Some(error) = error.filter(python_truthy) {
        let text = match error {
            Value::String(s) => s,
            other => other.to_string(),
        };
        body.insert("error".into(), Value::String(text));
    }
    if refresh_worker.as_ref().is_some_and(python_truthy) {
        body.insert("stopPod".into(), Value::Bool(true));
    }
    Value::Object(body)
}

/// The job-stream body for one streamed chunk.
pub fn stream_body(chunk: Value) -> Value {
    Value::Object(Map::from_iter([("output".to_string(), chunk)]))
}

/// Who reports an error (the `hostname` / `worker_id` fields of the report).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerIdentity {
    /// `RUNPOD_POD_ID` or `unknown`.
    pub worker_id: String,
    /// `RUNPOD_POD_HOSTNAME` or `unknown`.
    pub hostname: String,
}

impl Default for WorkerIdentity {
    fn default() -> Self {
        WorkerIdentity {
            worker_id: "unknown".into(),
            hostname: "unknown".into(),
        }
    }
}

/// The job-done body for a failed job: `{"error": "<JSON text>"}` whose JSON carries `error_type`,
/// `error_message`, `hostname`, `worker_id`, `retryable` and `runpod_version` (spec §5.2; our
/// `error_type` is a stable snake_case name rather than a Python class repr).
pub fn error_body(
    error_type: &str,
    message: &str,
    retryable: bool,
    identity: &WorkerIdentity,
) -> Value {
    let report = serde_json::json!({
        "error_type": error_type,
        "error_message": message,
        "hostname": identity.hostname,
        "worker_id": identity.worker_id,
        "retryable": retryable,
        "runpod_version": super::RUNPOD_SDK_VERSION,
    });
    Value::Object(Map::from_iter([(
        "error".to_string(),
        Value::String(report.to_string()),
    )]))
}

/// Whether a final body reports a failure (a truthy `error`).
pub fn is_error_body(body: &Value) -> bool {
    body.get("error").is_some_and(python_truthy)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn take_body_object_is_one_job_and_array_a_batch() {
        let one = parse_take_body(br#"{"id":"a","input":{"prompt":"x"},"webhook":"w"}"#);
        assert_eq!(
            one.jobs,
            vec![TakenJob {
                id: "a".into(),
                input: json!({"prompt":"x"})
            }]
        );
        let two = parse_take_body(br#"[{"id":"a","input":1},{"id":"b","input":null}]"#);
        assert_eq!(two.jobs.len(), 2);
        assert!(parse_take_body(b"[]").jobs.is_empty());
        assert!(parse_take_body(b"").jobs.is_empty());
    }

    #[test]
    fn take_body_garbage_and_missing_fields_are_reported() {
        let html = parse_take_body(b"<html>oops</html>");
        assert!(html.jobs.is_empty());
        assert_eq!(html.malformed[0].id, None);
        let no_input = parse_take_body(br#"{"id":"j1"}"#);
        assert_eq!(no_input.malformed[0].id.as_deref(), Some("j1"));
        assert_eq!(
            no_input.malformed[0].reason,
            "Job has missing field(s): id or input."
        );
        let no_id = parse_take_body(br#"{"input":{}}"#);
        assert_eq!(no_id.malformed[0].id, None);
        assert!(parse_take_body(b"{}").jobs.is_empty());
    }

    #[test]
    fn stop_body_keeps_string_ids_only() {
        assert_eq!(
            parse_stop_body(br#"{"jobsToStop":["a",1,"b"]}"#),
            vec!["a", "b"]
        );
        assert!(parse_stop_body(br#"{"jobsToStop":"a"}"#).is_empty());
        assert!(parse_stop_body(b"nope").is_empty());
    }

    #[test]
    fn result_body_follows_sdk_shaping() {
        assert_eq!(result_body(json!("x")), json!({"output": "x"}));
        assert_eq!(result_body(json!([1, 2])), json!({"output": [1, 2]}));
        assert_eq!(
            result_body(json!({"output": "x"})),
            json!({"output": {"output": "x"}})
        );
        assert_eq!(
            result_body(json!({"error": "msg"})),
            json!({"error": "msg"})
        );
        assert_eq!(result_body(json!({})), json!({}));
        assert_eq!(
            result_body(json!({"a": 1, "refresh_worker": true, "error": ""})),
            json!({"output": {"a": 1}, "stopPod": true})
        );
    }

    #[test]
    fn non_string_errors_are_json_encoded() {
        let body = result_body(json!({"error": ["x is a required input."]}));
        assert_eq!(body, json!({"error": "[\"x is a required input.\"]"}));
        assert!(is_error_body(&body));
    }

    #[test]
    fn error_body_is_a_json_string_with_report_fields() {
        let id = WorkerIdentity {
            worker_id: "w1".into(),
            hostname: "h1".into(),
        };
        let body = error_body("validation", "`n` must be <= 8. Given: 9", false, &id);
        let text = body["error"].as_str().unwrap();
        let report: Value = serde_json::from_str(text).unwrap();
        assert_eq!(report["error_type"], "validation");
        assert_eq!(report["error_message"], "`n` must be <= 8. Given: 9");
        assert_eq!(report["hostname"], "h1");
        assert_eq!(report["worker_id"], "w1");
        assert_eq!(report["retryable"], false);
    }
}
