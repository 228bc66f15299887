//! The PostgREST client: the only code that builds REST requests. Callers see jobs-table
//! operations (list, claim, flush, finish, rescue) and a typed error that tells whether a
//! retry can help.
//!
//! Every write after a claim is fenced: it filters on `status=eq.running` and the attempt's
//! `started_at`, so a write that matches no row means the job is no longer this attempt's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::ApiKey;

/// A job's primary key as the text PostgREST filters take (`id=eq.<text>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub String);

impl JobId {
    /// Reads an id from a JSON value: a number or a string (bigint or uuid keys).
    pub fn from_json(value: &Value) -> Option<JobId> {
        match value {
            Value::Number(n) => Some(JobId(n.to_string())),
            Value::String(s) if !s.is_empty() => Some(JobId(s.clone())),
            _ => None,
        }
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The attempt token: the `started_at` the claim writes, at microsecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(pub OffsetDateTime);

impl Attempt {
    /// Takes a token from this machine's clock, truncated to microseconds (Postgres' precision).
    pub fn now() -> Attempt {
        let now = OffsetDateTime::now_utc();
        let micros = now.microsecond();
        Attempt(now.replace_microsecond(micros).unwrap_or(now))
    }

    /// Formats the token as it is written and filtered on: `2026-12-04T15:00:00.123456Z`.
    pub fn to_filter(&self) -> String {
        let t = self.0;
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }

    /// Tells whether a `started_at` read back from the table is this token.
    pub fn matches(&self, started_at: Option<&str>) -> bool {
        started_at
            .and_then(parse_timestamp)
            .is_some_and(|t| t == self.0)
    }
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_filter())
    }
}

/// Parses a timestamp as PostgREST returns it (`+00:00` offsets, 0 to 6 fraction digits).
pub fn parse_timestamp(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// The columns of `jobs` the worker reads or writes.
pub const JOBS_COLUMNS: [&str; 9] = [
    "id",
    "action",
    "payload",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "log",
    "error",
];

/// The columns the worker reads for a job. The payload comes as text (`payload::text`) so a
/// payload that serde_json cannot hold (a number beyond f64, nesting deeper than 128) fails
/// only that job, when it is parsed, instead of the whole response.
const ROW_SELECT: &str = "id,action,payload_text:payload::text,status,created_at,started_at";

/// A row of `jobs` as the worker reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct JobRow {
    pub id: Value,
    pub action: String,
    #[serde(default)]
    pub payload_text: Option<String>,
    pub status: String,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    #[serde(default)]
    pub log: Option<String>,
}

impl JobRow {
    pub fn job_id(&self) -> Option<JobId> {
        JobId::from_json(&self.id)
    }

    /// Parses the payload; a missing payload is JSON null.
    pub fn payload(&self) -> Result<Value, String> {
        match &self.payload_text {
            None => Ok(Value::Null),
            Some(text) => serde_json::from_str(text).map_err(|e| {
                format!("the payload cannot be read by the worker ({e}); fix the payload and put the job back to pending")
            }),
        }
    }
}

/// A pending job found by a sweep.
#[derive(Debug, Clone, Deserialize)]
pub struct PendingJob {
    pub id: Value,
    pub action: String,
    pub created_at: Option<String>,
}

/// The outcome of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The row matched: the job is still this attempt's.
    Held,
    /// No row matched: an operator or the rescuer changed the job; stop and do not overwrite.
    Lost,
}

/// The outcome of a claim.
#[derive(Debug, Clone)]
pub enum Claim {
    Won(JobRow),
    /// Another worker claimed it first, or it is no longer pending.
    Lost,
}

/// A REST failure, classified by what the caller should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RestError {
    /// The server or the network failed; the same request may succeed later.
    #[error("transient failure ({}): {message}", status_text(*.status))]
    Transient {
        status: Option<u16>,
        /// PostgREST's error code; `None` for gateway, edge and connection failures.
        postgrest_code: Option<String>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The request was sent but no response arrived (time-out or connection reset), so it
    /// may or may not have been applied. Safe to repeat only for idempotent requests.
    #[error("outcome unknown, the response was lost: {message}")]
    Ambiguous { message: String },
    /// The key was rejected; retrying does not help until the key is fixed.
    #[error("the API key was rejected ({status}): {message}; check SUPABASE_SECRET_KEY or SUPABASE_SERVICE_ROLE_KEY")]
    Auth { status: u16, message: String },
    /// The table or a column is missing (or the schema cache is stale).
    #[error("schema problem ({status}, {code}): {message}; run scripts/schema.sql on the project")]
    Schema {
        status: u16,
        code: String,
        message: String,
    },
    /// The server rejected this request; repeating it does not help.
    #[error("request rejected ({status}{}): {message}", .code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Rejected {
        status: u16,
        code: Option<String>,
        message: String,
    },
}

fn status_text(status: Option<u16>) -> String {
    status.map_or_else(|| "no response".to_string(), |s| s.to_string())
}

impl RestError {
    /// Tells whether repeating an idempotent request may help.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RestError::Transient { .. } | RestError::Ambiguous { .. }
        )
    }

    /// Returns a short label for metrics and logs.
    pub fn class(&self) -> &'static str {
        match self {
            RestError::Transient { .. } => "transient",
            RestError::Ambiguous { .. } => "ambiguous",
            RestError::Auth { .. } => "auth",
            RestError::Schema { .. } => "schema",
            RestError::Rejected { .. } => "rejected",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            RestError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Counters of REST traffic, read by telemetry and benchmarks.
#[derive(Debug, Default)]
pub struct RestStats {
    pub requests: AtomicU64,
    pub errors_transient: AtomicU64,
    pub errors_ambiguous: AtomicU64,
    pub errors_auth: AtomicU64,
    pub errors_schema: AtomicU64,
    pub errors_rejected: AtomicU64,
}

impl RestStats {
    fn count_error(&self, error: &RestError) {
        let counter = match error {
            RestError::Transient { .. } => &self.errors_transient,
            RestError::Ambiguous { .. } => &self.errors_ambiguous,
            RestError::Auth { .. } => &self.errors_auth,
            RestError::Schema { .. } => &self.errors_schema,
            RestError::Rejected { .. } => &self.errors_rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        crate::metrics::rest_error(error.class());
    }
}

/// How long idempotent requests keep retrying.
#[derive(Debug, Clone, Copy)]
pub enum Persistence {
    /// A few attempts over about half a minute (sweeps, flushes).
    Brief,
    /// Keep trying for about ten minutes (final writes: giving up leaves the job `running`
    /// until the rescuer finds it).
    Persistent,
}

/// The PostgREST client for the `jobs` table.
#[derive(Clone)]
pub struct Rest {
    client: reqwest::Client,
    base: url::Url,
    key: ApiKey,
    pub stats: Arc<RestStats>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

impl Rest {
    /// Builds a client for `<supabase_url>/rest/v1/`. Every request has `request_timeout`.
    /// Pooled connections idle for 4 s are dropped, because the local emulator closes them
    /// after 5 s and a reused closed connection fails the request.
    pub fn new(supabase_url: &url::Url, key: ApiKey, request_timeout: Duration) -> Rest {
        let client = reqwest::Client::builder()
            .user_agent(concat!("supaworker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5).min(request_timeout))
            .timeout(request_timeout)
            .pool_idle_timeout(Duration::from_secs(4))
            .http1_only()
            .build()
            .expect("reqwest client with rustls builds");
        let mut base = supabase_url.clone();
        let path = format!("{}/rest/v1/", base.path().trim_end_matches('/'));
        base.set_path(&path);
        Rest {
            client,
            base,
            key,
            stats: Arc::new(RestStats::default()),
        }
    }

    fn url(&self, table: &str, query: &[(&str, String)]) -> url::Url {
        let mut url = self.base.join(table).expect("table names are plain words");
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in query {
                pairs.append_pair(name, value);
            }
        }
        url
    }

    async fn send(
        &self,
        method: Method,
        url: url::Url,
        body: Option<&Value>,
        prefer: Option<&str>,
    ) -> Result<Reply, RestError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        crate::metrics::rest_request();
        let mut request = self
            .client
            .request(method, url)
            .header("apikey", self.key.expose())
            .header("Accept", "application/json");
        if let ApiKey::LegacyServiceRole(jwt) = &self.key {
            request = request.bearer_auth(jwt);
        }
        if let Some(prefer) = prefer {
            request = request.header("Prefer", prefer);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let result = async {
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(transport_error)?;
            Ok(Reply {
                status,
                headers,
                body,
            })
        }
        .await;
        let reply = match result {
            Ok(reply) if reply.status.is_success() => return Ok(reply),
            Ok(reply) => Err(classify(&reply)),
            Err(error) => Err(error),
        };
        if let Err(error) = &reply {
            self.stats.count_error(error);
        }
        reply
    }

    /// Repeats an idempotent request while its error is retryable, with capped, jittered
    /// exponential backoff that honours `Retry-After`.
    async fn retrying<T, F, Fut>(
        &self,
        operation: &'static str,
        persistence: Persistence,
        request: F,
    ) -> Result<T, RestError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RestError>>,
    {
        let (times, max_delay) = match persistence {
            Persistence::Brief => (5, Duration::from_secs(10)),
            Persistence::Persistent => (40, Duration::from_secs(30)),
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(max_delay)
            .with_jitter()
            .with_max_times(times);
        request
            .retry(backoff)
            .when(RestError::is_retryable)
            .adjust(|error, delay| {
                // Wait at least what the server asked for, capped at five minutes.
                let asked = error.retry_after().map(|d| d.min(Duration::from_secs(300)));
                match (delay, asked) {
                    (Some(delay), Some(asked)) => Some(delay.max(asked)),
                    (delay, _) => delay,
                }
            })
            .notify(|error, wait| {
                tracing::warn!(
                    operation,
                    error = %error,
                    error_class = error.class(),
                    wait_ms = wait.as_millis() as u64,
                    "rest request failed, retrying"
                );
            })
            .await
    }

    /// Lists pending jobs, oldest first. Jobs whose action is in `exclude_actions` are left
    /// out, so a full per-action slot does not hide the jobs behind it.
    pub async fn list_pending(
        &self,
        limit: usize,
        exclude_actions: &[String],
    ) -> Result<Vec<PendingJob>, RestError> {
        let mut query = vec![
            ("select", "id,action,created_at".to_string()),
            ("status", "eq.pending".to_string()),
            ("order", "created_at.asc,id.asc".to_string()),
            ("limit", limit.to_string()),
        ];
        if !exclude_actions.is_empty() {
            query.push(("action", format!("not.in.({})", in_list(exclude_actions))));
        }
        let url = self.url("jobs", &query);
        self.retrying("list_pending", Persistence::Brief, || async {
            let reply = self.send(Method::GET, url.clone(), None, None).await?;
            parse_json(&reply)
        })
        .await
    }

    /// Reads one job, or `None` when it no longer exists.
    pub async fn get_job(&self, id: &JobId) -> Result<Option<JobRow>, RestError> {
        self.read_job(id, Persistence::Brief).await
    }

    async fn read_job(
        &self,
        id: &JobId,
        persistence: Persistence,
    ) -> Result<Option<JobRow>, RestError> {
        let url = self.url(
            "jobs",
            &[
                ("select", ROW_SELECT.to_string()),
                ("id", format!("eq.{id}")),
            ],
        );
        self.retrying("get_job", persistence, || async {
            let reply = self.send(Method::GET, url.clone(), None, None).await?;
            let mut rows: Vec<JobRow> = parse_json(&reply)?;
            Ok(rows.pop())
        })
        .await
    }

    /// Claims a pending job with one conditional PATCH by primary key. `exclude_actions`
    /// keeps the claim from taking a job whose action has no free slot.
    ///
    /// When the response is lost, the row is read back: the claim is ours only if the row is
    /// `running` with this attempt's `started_at`. A still-pending row is claimed again with
    /// the same token, which is safe because only one PATCH can move it out of `pending`.
    pub async fn claim(
        &self,
        id: &JobId,
        attempt: Attempt,
        first_log: &str,
        exclude_actions: &[String],
    ) -> Result<Claim, RestError> {
        let mut query = vec![
            ("id", format!("eq.{id}")),
            ("status", "eq.pending".to_string()),
        ];
        if !exclude_actions.is_empty() {
            query.push(("action", format!("not.in.({})", in_list(exclude_actions))));
        }
        query.push(("select", ROW_SELECT.to_string()));
        let url = self.url("jobs", &query);
        let body = json!({
            "status": "running",
            "started_at": attempt.to_filter(),
            "finished_at": null,
            "error": null,
            "log": first_log,
        });
        let mut resends = 0;
        loop {
            let outcome = self
                .send(
                    Method::PATCH,
                    url.clone(),
                    Some(&body),
                    Some("return=representation"),
                )
                .await;
            let error = match outcome {
                Ok(reply) => match parse_json::<Vec<JobRow>>(&reply) {
                    Ok(mut rows) => {
                        return Ok(match rows.pop() {
                            Some(row) => Claim::Won(row),
                            None => Claim::Lost,
                        })
                    }
                    // The claim may have committed: decide from the row, as for a lost
                    // response.
                    Err(error) => RestError::Ambiguous {
                        message: error.to_string(),
                    },
                },
                Err(error) => error,
            };
            let ambiguous = match &error {
                RestError::Ambiguous { .. } => true,
                // A gateway or edge response (no PostgREST code) may come after Postgres
                // committed the update, so it is treated like a lost response.
                RestError::Transient {
                    status: Some(status),
                    postgrest_code: None,
                    ..
                } => matches!(status, 502 | 504 | 520 | 522 | 524 | 544),
                _ => false,
            };
            if !ambiguous && (resends >= 3 || !error.is_retryable()) {
                return Err(error);
            }
            resends += 1;
            if !ambiguous {
                // Not sent, or rolled back by PostgREST: nothing changed.
                let wait = error
                    .retry_after()
                    .unwrap_or(Duration::from_millis(200 * resends))
                    .min(Duration::from_secs(30));
                tracing::warn!(job_id = %id, error = %error, error_class = error.class(), wait_ms = wait.as_millis() as u64, "claim failed, retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
            tracing::warn!(job_id = %id, attempt = %attempt, error = %error, error_class = error.class(), "claim outcome unknown, reading the job back");
            // The read-back is retried for minutes: giving up here could leave a committed
            // claim that no worker runs.
            let row = self
                .read_job(id, Persistence::Persistent)
                .await
                .inspect_err(|read_error| {
                    tracing::error!(job_id = %id, attempt = %attempt, error = %read_error, "claim outcome still unknown; the rescuer finishes the job if the claim landed");
                })?;
            match row {
                Some(row)
                    if row.status == "running" && attempt.matches(row.started_at.as_deref()) =>
                {
                    return Ok(Claim::Won(row));
                }
                // NOTE: a PATCH still in flight could land after this read; that claim would
                // then stay `running` unrun until the overdue rescue takes it.
                Some(row) if row.status == "pending" && resends <= 3 => continue,
                Some(row) if row.status == "pending" => return Err(error),
                _ => return Ok(Claim::Lost),
            }
        }
    }

    /// Writes the log of a running attempt. Idempotent, so it is retried briefly.
    pub async fn flush_log(
        &self,
        id: &JobId,
        attempt: Attempt,
        log: &str,
    ) -> Result<Fence, RestError> {
        self.fenced_patch(
            "flush_log",
            id,
            attempt,
            &json!({ "log": log }),
            Persistence::Brief,
        )
        .await
    }

    /// Writes the final status of an attempt. Retried persistently: until it lands the row
    /// stays `running`.
    pub async fn finish(
        &self,
        id: &JobId,
        attempt: Attempt,
        status: &str,
        log: &str,
        error: Option<&str>,
    ) -> Result<Fence, RestError> {
        let body = json!({
            "status": status,
            "finished_at": "now",
            "log": log,
            "error": error,
        });
        self.fenced_patch("finish", id, attempt, &body, Persistence::Persistent)
            .await
    }

    /// Puts an attempt's job back to `pending` (for actions that are safe to run twice).
    pub async fn requeue(
        &self,
        id: &JobId,
        attempt: Attempt,
        log: &str,
    ) -> Result<Fence, RestError> {
        let body = json!({
            "status": "pending",
            "started_at": null,
            "finished_at": null,
            "log": log,
        });
        self.fenced_patch("requeue", id, attempt, &body, Persistence::Persistent)
            .await
    }

    async fn fenced_patch(
        &self,
        operation: &'static str,
        id: &JobId,
        attempt: Attempt,
        body: &Value,
        persistence: Persistence,
    ) -> Result<Fence, RestError> {
        let url = self.url(
            "jobs",
            &[
                ("id", format!("eq.{id}")),
                ("status", "eq.running".to_string()),
                ("started_at", format!("eq.{}", attempt.to_filter())),
            ],
        );
        self.retrying(operation, persistence, || async {
            let reply = self
                .send(
                    Method::PATCH,
                    url.clone(),
                    Some(body),
                    Some("return=minimal"),
                )
                .await?;
            Ok(fence_from(&reply))
        })
        .await
    }

    /// Lists jobs in `running`, for the rescuer.
    pub async fn list_running(&self) -> Result<Vec<JobRow>, RestError> {
        let url = self.url(
            "jobs",
            &[
                (
                    "select",
                    "id,action,status,created_at,started_at,log".to_string(),
                ),
                ("status", "eq.running".to_string()),
                ("order", "started_at.asc,id.asc".to_string()),
                ("limit", "1000".to_string()),
            ],
        );
        self.retrying("list_running", Persistence::Brief, || async {
            let reply = self.send(Method::GET, url.clone(), None, None).await?;
            parse_json(&reply)
        })
        .await
    }

    /// Finishes a job left `running` by a dead attempt, fenced on the `started_at` seen, so a
    /// job that has just finished or was claimed again is never overwritten.
    pub async fn rescue(
        &self,
        id: &JobId,
        seen_started_at: &str,
        requeue: bool,
        log: &str,
        error: &str,
    ) -> Result<Fence, RestError> {
        let url = self.url(
            "jobs",
            &[
                ("id", format!("eq.{id}")),
                ("status", "eq.running".to_string()),
                ("started_at", format!("eq.{seen_started_at}")),
            ],
        );
        let body = if requeue {
            json!({"status": "pending", "started_at": null, "finished_at": null, "log": log, "error": error})
        } else {
            json!({"status": "failed", "finished_at": "now", "log": log, "error": error})
        };
        self.retrying("rescue", Persistence::Brief, || async {
            let reply = self
                .send(
                    Method::PATCH,
                    url.clone(),
                    Some(&body),
                    Some("return=minimal"),
                )
                .await?;
            Ok(fence_from(&reply))
        })
        .await
    }

    /// Inserts a pending job and returns the new row.
    pub async fn insert_job(&self, action: &str, payload: &Value) -> Result<JobRow, RestError> {
        let url = self.url("jobs", &[("select", ROW_SELECT.to_string())]);
        let body = json!({"action": action, "payload": payload, "status": "pending"});
        // NOTE: an insert is not idempotent, so it is sent once and never retried.
        let reply = self
            .send(
                Method::POST,
                url,
                Some(&body),
                Some("return=representation"),
            )
            .await?;
        let mut rows: Vec<JobRow> = parse_json(&reply)?;
        rows.pop().ok_or_else(|| RestError::Rejected {
            status: reply.status.as_u16(),
            code: None,
            message: "the insert returned no row".into(),
        })
    }

    /// Reads the columns of `jobs` the worker needs (one row at most), to check the schema.
    pub async fn probe_jobs_table(&self) -> Result<(), RestError> {
        self.probe_jobs_columns(&JOBS_COLUMNS).await
    }

    /// Reads `columns` of `jobs` (one row at most). PostgREST names only the first missing
    /// column in its error, so callers probe one column at a time to list them all.
    pub async fn probe_jobs_columns(&self, columns: &[&str]) -> Result<(), RestError> {
        let url = self.url(
            "jobs",
            &[("select", columns.join(",")), ("limit", "1".to_string())],
        );
        let reply = self.send(Method::GET, url, None, None).await?;
        let _: Vec<Value> = parse_json(&reply)?;
        Ok(())
    }
}

/// `Content-Range: 0-0/*` means a row matched; `*/*` (or `*/0`) means none did.
fn fence_from(reply: &Reply) -> Fence {
    let range = reply
        .headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("*/*");
    if range.starts_with('*') {
        Fence::Lost
    } else {
        Fence::Held
    }
}

/// Quotes values for an `in.(…)` list, so names with commas or dots stay whole.
fn in_list(values: &[String]) -> String {
    values
        .iter()
        .map(|v| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_json<T: serde::de::DeserializeOwned>(reply: &Reply) -> Result<T, RestError> {
    serde_json::from_slice(&reply.body).map_err(|e| RestError::Rejected {
        status: reply.status.as_u16(),
        code: None,
        message: format!("the response body is not the expected JSON: {e}"),
    })
}

fn transport_error(error: reqwest::Error) -> RestError {
    let message = error_chain(&error);
    if error.is_connect() {
        RestError::Transient {
            status: None,
            postgrest_code: None,
            message,
            retry_after: None,
        }
    } else {
        RestError::Ambiguous { message }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Classifies an error response from PostgREST, the Supabase gateway or an edge proxy.
fn classify(reply: &Reply) -> RestError {
    let status = reply.status.as_u16();
    let retry_after = reply
        .headers
        .get("retry-after")
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body: Option<Value> = serde_json::from_slice(&reply.body).ok();
    let code = body
        .as_ref()
        .and_then(|b| b.get("code"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let message = match &body {
        Some(body) => {
            let message = body
                .get("message")
                .or_else(|| body.get("error"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let hint = body.get("hint").and_then(Value::as_str).unwrap_or("");
            match (message.is_empty(), hint.is_empty()) {
                (false, false) => format!("{message} ({hint})"),
                (false, true) => message.to_string(),
                _ => body.to_string(),
            }
        }
        None if reply.body.is_empty() => format!("HTTP {status} with an empty body"),
        None => {
            let text = String::from_utf8_lossy(&reply.body);
            format!(
                "HTTP {status} with a non-JSON body: {}",
                crate::actions::shorten(text.trim())
            )
        }
    };
    let schema_code = matches!(
        code.as_deref(),
        Some("PGRST204" | "PGRST205" | "PGRST106" | "42P01" | "42703")
    );
    if schema_code {
        return RestError::Schema {
            status,
            code: code.unwrap_or_default(),
            message,
        };
    }
    match status {
        401 | 403 => RestError::Auth { status, message },
        408 | 429 | 500..=599 => RestError::Transient {
            status: Some(status),
            message: match &code {
                Some(code) => format!("{code}: {message}"),
                None => message,
            },
            postgrest_code: code,
            retry_after,
        },
        _ => RestError::Rejected {
            status,
            code,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_token_round_trips() {
        let attempt = Attempt::now();
        let text = attempt.to_filter();
        assert!(text.ends_with('Z'));
        assert_eq!(text.len(), "2026-12-04T15:00:00.123456Z".len());
        assert!(attempt.matches(Some(&text)));
        let postgres_form = text.replace('Z', "+00:00");
        assert!(attempt.matches(Some(&postgres_form)));
        assert!(!attempt.matches(Some("2001-01-01T00:00:00+00:00")));
        assert!(!attempt.matches(None));
    }

    #[test]
    fn postgres_trims_trailing_zeros() {
        let token = Attempt(parse_timestamp("2026-12-04T15:00:00.120000Z").unwrap());
        assert!(token.matches(Some("2026-12-04T15:00:00.12+00:00")));
    }

    fn reply(status: u16, body: &str, retry_after: Option<&str>) -> Reply {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert("retry-after", HeaderValue::from_str(value).unwrap());
        }
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn errors_are_classified() {
        let e = classify(&reply(
            503,
            r#"{"code":"PGRST000","message":"Database connection error.","details":null,"hint":null}"#,
            Some("7"),
        ));
        assert!(
            matches!(e, RestError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(7))
        );
        let e = classify(&reply(
            401,
            r#"{"message":"Invalid API key","hint":"Double check your Supabase `anon` or `service_role` API key."}"#,
            None,
        ));
        assert!(matches!(e, RestError::Auth { status: 401, .. }));
        assert!(!e.is_retryable());
        let e = classify(&reply(
            400,
            r#"{"code":"PGRST204","message":"Could not find the 'log' column of 'jobs' in the schema cache","details":null,"hint":null}"#,
            None,
        ));
        assert!(e.to_string().contains("'log' column"), "{e}");
        assert!(matches!(e, RestError::Schema { .. }));
        let e = classify(&reply(520, "<html><body>Cloudflare</body></html>", None));
        assert!(matches!(
            e,
            RestError::Transient {
                status: Some(520),
                ..
            }
        ));
        assert!(e.to_string().contains("non-JSON"), "{e}");
        let e = classify(&reply(
            400,
            r#"{"code":"22P02","message":"invalid input syntax for type bigint: \"x\"","details":null,"hint":null}"#,
            None,
        ));
        assert!(matches!(e, RestError::Rejected { .. }));
    }

    #[test]
    fn in_list_quotes_values() {
        assert_eq!(in_list(&["a".into(), "b,c".into()]), "\"a\",\"b,c\"");
    }
}
