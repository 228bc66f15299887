//! The HTTP endpoint for probes and scrapes, served on `SUPAWORKER_HEALTH_ADDR` when it is
//! set: `/healthz` (the process is alive), `/readyz` (the worker can find jobs) and
//! `/metrics` (Prometheus text format).
//!
//! Ready means: Realtime is subscribed, or a sweep succeeded within the readiness window
//! (two sweep intervals plus the request time-out, so one late or slow sweep is tolerated),
//! and the worker is not shutting down.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::worker::WorkerStats;

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Failure to start the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The address cannot be bound, usually because another process listens there; a retry
    /// helps only once that process is gone.
    #[error("cannot listen on {addr} for health and metrics: {source}; free the port or change SUPAWORKER_HEALTH_ADDR")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Inputs of the readiness check.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub realtime_enabled: bool,
    /// Maximum age of the last successful sweep for the worker to count as ready.
    pub sweep_window: Duration,
}

impl Readiness {
    /// Builds the readiness rules for `config`.
    // NOTE: the dispatcher sweeps only while a slot is free, so a worker without Realtime
    // whose slots are all busy with long jobs reports unready until a slot frees up.
    pub fn for_config(config: &Config) -> Readiness {
        Readiness {
            realtime_enabled: config.realtime_enabled,
            sweep_window: config.sweep_interval * 2 + config.request_timeout,
        }
    }
}

/// A readiness verdict with the facts behind it, sent as the `/readyz` body.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReadyReport {
    pub ready: bool,
    /// `subscribed`, `connected` (socket open, channel not subscribed), `disconnected` or
    /// `disabled`.
    pub realtime: &'static str,
    /// Seconds since the last successful sweep, or `None` before the first.
    pub last_sweep_ok_seconds_ago: Option<f64>,
    pub sweep_window_seconds: f64,
    pub shutting_down: bool,
}

/// Decides readiness from the worker's counters. `now_unix_ms` is the current Unix time in
/// milliseconds.
pub fn ready_report(
    readiness: &Readiness,
    stats: &WorkerStats,
    shutting_down: bool,
    now_unix_ms: u64,
) -> ReadyReport {
    let realtime = if !readiness.realtime_enabled {
        "disabled"
    } else if stats.realtime.live.load(Ordering::Relaxed) {
        "subscribed"
    } else if stats.realtime.connected.load(Ordering::Relaxed) {
        "connected"
    } else {
        "disconnected"
    };
    let last_sweep_ok = stats.dispatch.last_sweep_ok_unix_ms.load(Ordering::Relaxed);
    let sweep_age = (last_sweep_ok > 0)
        .then(|| Duration::from_millis(now_unix_ms.saturating_sub(last_sweep_ok)));
    let sweep_fresh = sweep_age.is_some_and(|age| age <= readiness.sweep_window);
    ReadyReport {
        ready: !shutting_down && (realtime == "subscribed" || sweep_fresh),
        realtime,
        last_sweep_ok_seconds_ago: sweep_age.map(|age| age.as_secs_f64()),
        sweep_window_seconds: readiness.sweep_window.as_secs_f64(),
        shutting_down,
    }
}

struct Shared {
    stats: WorkerStats,
    readiness: Readiness,
    metrics: PrometheusHandle,
    /// Cancelled at the first shutdown signal; from then on the worker is not ready.
    stop_claiming: CancellationToken,
}

/// Binds `addr` and serves the endpoint until `stop` is cancelled. Returns the bound address
/// (the real port when `addr` has port 0) and the server task.
pub async fn start(
    addr: SocketAddr,
    stats: WorkerStats,
    readiness: Readiness,
    stop_claiming: CancellationToken,
    stop: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), HealthError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HealthError::Bind { addr, source })?;
    let shared = Arc::new(Shared {
        stats,
        readiness,
        metrics: crate::metrics::install(),
        stop_claiming,
    });
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(error = %error, "health endpoint stopped");
        }
    });
    Ok((bound, task))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let report = ready_report(
        &shared.readiness,
        &shared.stats,
        shared.stop_claiming.is_cancelled(),
        crate::realtime::unix_millis_now(),
    );
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let text = crate::metrics::render(&shared.metrics, &shared.stats);
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readiness() -> Readiness {
        Readiness {
            realtime_enabled: true,
            sweep_window: Duration::from_secs(45),
        }
    }

    #[test]
    fn subscribed_realtime_is_ready() {
        let stats = WorkerStats::default();
        stats.realtime.connected.store(true, Ordering::Relaxed);
        stats.realtime.live.store(true, Ordering::Relaxed);
        let report = ready_report(&readiness(), &stats, false, 1_000_000);
        assert!(report.ready);
        assert_eq!(report.realtime, "subscribed");
        assert_eq!(report.last_sweep_ok_seconds_ago, None);
    }

    #[test]
    fn fresh_sweep_is_ready_without_realtime() {
        let stats = WorkerStats::default();
        stats
            .dispatch
            .last_sweep_ok_unix_ms
            .store(1_000_000, Ordering::Relaxed);
        let report = ready_report(&readiness(), &stats, false, 1_000_000 + 44_000);
        assert!(report.ready);
        assert_eq!(report.realtime, "disconnected");
        assert_eq!(report.last_sweep_ok_seconds_ago, Some(44.0));
    }

    #[test]
    fn stale_sweep_without_realtime_is_unready() {
        let stats = WorkerStats::default();
        stats
            .dispatch
            .last_sweep_ok_unix_ms
            .store(1_000_000, Ordering::Relaxed);
        stats.realtime.connected.store(true, Ordering::Relaxed);
        let report = ready_report(&readiness(), &stats, false, 1_000_000 + 46_000);
        assert!(!report.ready);
        assert_eq!(report.realtime, "connected");
    }

    #[test]
    fn no_sweep_yet_is_unready() {
        let stats = WorkerStats::default();
        let report = ready_report(&readiness(), &stats, false, 1_000_000);
        assert!(!report.ready);
    }

    #[test]
    fn shutting_down_is_unready() {
        let stats = WorkerStats::default();
        stats.realtime.live.store(true, Ordering::Relaxed);
        let report = ready_report(&readiness(), &stats, true, 1_000_000);
        assert!(!report.ready);
        assert!(report.shutting_down);
    }

    #[test]
    fn disabled_realtime_relies_on_sweeps() {
        let readiness = Readiness {
            realtime_enabled: false,
            ..readiness()
        };
        let stats = WorkerStats::default();
        stats.realtime.live.store(true, Ordering::Relaxed);
        let report = ready_report(&readiness, &stats, false, 1_000_000);
        assert_eq!(report.realtime, "disabled");
        assert!(!report.ready);
    }
}
