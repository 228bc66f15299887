//! Fault injection and request counters for `/rest/v1`. Tests hold a [`RestFaults`] handle;
//! the control endpoint exposes the same operations as JSON.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::error::{gateway_error, ApiError};

/// One way to answer a request. All of them except `Delay` and `DropAfterCommit` answer
/// without touching the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RestFault {
    /// 540: the project is paused.
    ProjectPaused,
    /// 544: the gateway's request time limit ran out.
    GatewayTimeout,
    /// 502 with the Kong body `An invalid response was received from the upstream server`.
    BadGateway,
    /// 520 with a Cloudflare HTML page.
    CloudflareUnknown,
    /// 503 `PGRST000` (database connection error) with `Retry-After`.
    DatabaseUnavailable { retry_after: u32 },
    /// 503 `PGRST002` (schema cache query failed) with `Retry-After`.
    SchemaCacheUnavailable { retry_after: u32 },
    /// 504 `PGRST003`: no pool connection became free in time.
    PoolTimeout,
    /// 500 `57014`: the statement was cancelled by `statement_timeout` and rolled back.
    StatementTimeout,
    /// Waits this long, then handles the request normally.
    Delay { millis: u64 },
    /// Runs and commits the request, then closes the connection without a response: the
    /// client cannot tell whether the write happened.
    DropAfterCommit,
}

impl RestFault {
    /// The response for faults that answer without running the request.
    pub(crate) fn response(&self) -> Option<Response<Body>> {
        let response = match self {
            RestFault::ProjectPaused => bare_status(540),
            RestFault::GatewayTimeout => bare_status(544),
            RestFault::BadGateway => gateway_error(
                StatusCode::BAD_GATEWAY,
                "An invalid response was received from the upstream server",
                None,
            ),
            RestFault::CloudflareUnknown => {
                let html = "<!DOCTYPE html>\n<html><head><title>520: Web server is returning an unknown error</title></head>\
                            <body><h1>Web server is returning an unknown error</h1><p>Error code 520</p></body></html>\n";
                Response::builder()
                    .status(520)
                    .header(header::CONTENT_TYPE, "text/html; charset=UTF-8")
                    .body(Body::from(html))
                    .expect("static response")
            }
            RestFault::DatabaseUnavailable { retry_after } => {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "PGRST000",
                    "Database connection error. Retrying the connection.",
                )
                .details("connection to server at \"127.0.0.1\" failed: Connection refused");
                error.retry_after = Some(*retry_after);
                error.into_response()
            }
            RestFault::SchemaCacheUnavailable { retry_after } => {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "PGRST002",
                    "Could not query the database for the schema cache. Retrying.",
                );
                error.retry_after = Some(*retry_after);
                error.into_response()
            }
            RestFault::PoolTimeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "PGRST003",
                "Timed out acquiring connection from connection pool.",
            )
            .into_response(),
            RestFault::StatementTimeout => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "57014",
                "canceling statement due to statement timeout",
            )
            .into_response(),
            RestFault::Delay { .. } | RestFault::DropAfterCommit => return None,
        };
        Some(response)
    }
}

fn bare_status(code: u16) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("static response")
}

/// A queued fault: applies to the next `remaining` requests that match `method`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRule {
    pub fault: RestFault,
    pub remaining: u32,
    /// Only requests with this method (e.g. `PATCH`) match; `None` matches every method.
    pub method: Option<String>,
}

/// Requests received at `/rest/v1`, by method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub get: u64,
    pub post: u64,
    pub patch: u64,
    pub delete: u64,
    pub other: u64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.get + self.post + self.patch + self.delete + self.other
    }
}

/// Shared handle to the REST fault switches and counters. Cloning shares the state.
#[derive(Clone, Default)]
pub struct RestFaults {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    rules: Mutex<VecDeque<FaultRule>>,
    /// Idle keep-alive timeout in milliseconds; 0 means the default.
    idle_timeout_ms: AtomicU64,
    counts: [AtomicU64; 5],
}

/// Idle keep-alive connections are closed after this long unless changed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

impl RestFaults {
    /// Answers the next `count` requests (of `method` only, when given) with `fault`.
    /// Rules queue up: the first matching rule with requests left is applied.
    pub fn inject(&self, fault: RestFault, count: u32, method: Option<&str>) {
        let rule = FaultRule {
            fault,
            remaining: count,
            method: method.map(|m| m.to_ascii_uppercase()),
        };
        self.inner.rules.lock().expect("fault lock").push_back(rule);
    }

    /// Delays the next `count` requests by `delay`, then handles them normally.
    pub fn delay(&self, delay: Duration, count: u32, method: Option<&str>) {
        let millis = delay.as_millis().try_into().unwrap_or(u64::MAX);
        self.inject(RestFault::Delay { millis }, count, method);
    }

    /// Commits the next `count` PATCH requests and then drops their connections unanswered.
    pub fn drop_after_commit(&self, count: u32) {
        self.inject(RestFault::DropAfterCommit, count, Some("PATCH"));
    }

    /// Removes every queued fault.
    pub fn clear(&self) {
        self.inner.rules.lock().expect("fault lock").clear();
    }

    /// The queued faults with their remaining counts.
    pub fn pending(&self) -> Vec<FaultRule> {
        self.inner
            .rules
            .lock()
            .expect("fault lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Sets how long a keep-alive connection may sit idle before the server closes it.
    /// Applies to connections as they next become idle.
    pub fn set_idle_timeout(&self, timeout: Duration) {
        let millis = timeout.as_millis().clamp(1, u64::MAX as u128) as u64;
        self.inner.idle_timeout_ms.store(millis, Ordering::Relaxed);
    }

    pub fn idle_timeout(&self) -> Duration {
        match self.inner.idle_timeout_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_IDLE_TIMEOUT,
            millis => Duration::from_millis(millis),
        }
    }

    /// Counts of REST requests received since start or the last [`RestFaults::reset_counts`].
    pub fn request_counts(&self) -> RequestCounts {
        let load = |i: usize| self.inner.counts[i].load(Ordering::Relaxed);
        RequestCounts {
            get: load(0),
            post: load(1),
            patch: load(2),
            delete: load(3),
            other: load(4),
        }
    }

    pub fn reset_counts(&self) {
        for counter in &self.inner.counts {
            counter.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn count(&self, method: &Method) {
        let index = match *method {
            Method::GET | Method::HEAD => 0,
            Method::POST => 1,
            Method::PATCH => 2,
            Method::DELETE => 3,
            _ => 4,
        };
        self.inner.counts[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one use of the first rule matching `method`.
    pub(crate) fn take(&self, method: &Method) -> Option<RestFault> {
        let mut rules = self.inner.rules.lock().expect("fault lock");
        let position = rules.iter().position(|rule| {
            rule.remaining > 0 && rule.method.as_deref().is_none_or(|m| m == method.as_str())
        })?;
        let rule = &mut rules[position];
        rule.remaining -= 1;
        let fault = rule.fault.clone();
        if rule.remaining == 0 {
            rules.remove(position);
        }
        Some(fault)
    }
}
