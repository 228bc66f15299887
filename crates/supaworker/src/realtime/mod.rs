//! Supabase Realtime client: one websocket with one Phoenix channel subscribed to
//! `postgres_changes` on the jobs table, kept alive for weeks (fixed-schedule heartbeats,
//! reconnect after every close, rejoin after every channel error). It emits job ids as
//! [`Hint`]s and bumps a readiness counter on every "Subscribed to PostgreSQL" message. It never
//! claims or runs jobs: Realtime delivers at most once, so the caller sweeps the table after
//! each readiness bump.

mod backoff;
mod frame;
mod key;
mod session;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use backoff::{Backoff, RetryState};
pub use frame::{Frame, FrameError};
pub use key::ApiKeyKind;
pub use session::RealtimeError;

/// Settings of the Realtime subscription.
#[derive(Debug, Clone)]
pub struct RealtimeConfig {
    /// Project URL, such as `https://<ref>.supabase.co` or `http://127.0.0.1:54321`. The
    /// websocket URL is `<url with ws/wss>/realtime/v1/websocket`.
    pub supabase_url: url::Url,
    /// Legacy `service_role` JWT or `sb_secret_…` key. Never logged.
    pub api_key: String,
    /// Schema of the jobs table, usually `public`.
    pub schema: String,
    /// Name of the jobs table, usually `jobs`.
    pub table: String,
    /// Period of socket heartbeats. A heartbeat still unanswered when the next one is due
    /// closes the socket. Supabase clients use 25 s; the server closes sockets that send
    /// nothing for 60 s.
    pub heartbeat_interval: Duration,
    /// Maximum time from sending a join to "Subscribed to PostgreSQL"; past it the client
    /// leaves and rejoins. Also bounds the websocket connect and handshake.
    pub readiness_timeout: Duration,
    /// Retry delays after consecutive failures; the last one repeats forever. Each delay gets
    /// ±20 % jitter.
    pub backoff: Vec<Duration>,
    /// The retry schedule starts over after the subscription has been live this long.
    pub healthy_reset_after: Duration,
    /// Delay before rejoining after "Unable to subscribe…", which a retry fixes only once an
    /// operator has changed the database.
    pub subscribe_error_retry: Duration,
}

impl RealtimeConfig {
    /// Builds a configuration with the production timings (25 s heartbeats, 30 s readiness
    /// timeout, backoff 1, 2, 5, 10 s, reset after 60 s live, 60 s after subscribe errors).
    pub fn new(supabase_url: url::Url, api_key: String, schema: String, table: String) -> Self {
        RealtimeConfig {
            supabase_url,
            api_key,
            schema,
            table,
            heartbeat_interval: Duration::from_secs(25),
            readiness_timeout: Duration::from_secs(30),
            backoff: [1, 2, 5, 10].map(Duration::from_secs).to_vec(),
            healthy_reset_after: Duration::from_secs(60),
            subscribe_error_retry: Duration::from_secs(60),
        }
    }

    /// Builds the websocket URL, which contains the API key: never log it.
    pub fn websocket_url(&self) -> Result<url::Url, RealtimeError> {
        let mut url = self.supabase_url.clone();
        let scheme = match url.scheme() {
            "https" | "wss" => "wss",
            "http" | "ws" => "ws",
            other => {
                return Err(RealtimeError::InvalidUrl(format!(
                    "unsupported scheme `{other}`, expected http or https"
                )))
            }
        };
        url.set_scheme(scheme).map_err(|()| {
            RealtimeError::InvalidUrl(format!("cannot switch the scheme to {scheme}"))
        })?;
        let path = format!("{}/realtime/v1/websocket", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url.set_fragment(None);
        url.query_pairs_mut()
            .clear()
            .append_pair("apikey", &self.api_key)
            .append_pair("vsn", "2.0.0");
        Ok(url)
    }

    /// Channel topic; the part after `realtime:` is free-form.
    pub fn topic(&self) -> String {
        format!("realtime:supaworker.{}.{}", self.schema, self.table)
    }
}

/// A wake-up signal from Realtime. The row itself is read by the claim, never taken from
/// the event.
#[derive(Debug, Clone, PartialEq)]
pub enum Hint {
    /// A job row was inserted, or updated with status `pending`. `truncated` is true when the
    /// server cut the record down because it exceeded its size limit (`Error 413`).
    Job {
        id: serde_json::Value,
        truncated: bool,
    },
}

/// Counters and gauges of the Realtime client, updated lock-free by the client task.
#[derive(Debug, Default)]
pub struct RealtimeStats {
    /// Whether a websocket is open.
    pub connected: AtomicBool,
    /// Whether the channel has received "Subscribed to PostgreSQL" since its last join.
    pub live: AtomicBool,
    /// Websocket connect attempts, successful or not.
    pub connect_attempts: AtomicU64,
    /// Connect attempts after the first one.
    pub reconnects: AtomicU64,
    /// Joins sent, the first one included.
    pub joins: AtomicU64,
    /// Joins sent after the first one.
    pub rejoins: AtomicU64,
    /// "Subscribed to PostgreSQL" messages received (first and repeated).
    pub readiness_messages: AtomicU64,
    /// Unix time in milliseconds of the last "Subscribed to PostgreSQL".
    pub last_readiness_unix_ms: AtomicU64,
    /// Change events that carried a job id.
    pub hints_received: AtomicU64,
    /// Hints dropped because the hint queue was full or closed.
    pub hints_dropped: AtomicU64,
    /// Unix time in milliseconds of the last change event.
    pub last_event_unix_ms: AtomicU64,
    /// Change events whose `errors` field was not empty.
    pub event_errors: AtomicU64,
    /// "Unable to subscribe…" and filter errors from the server.
    pub subscribe_errors: AtomicU64,
    /// Heartbeats whose reply had not arrived when the next one was due.
    pub heartbeat_timeouts: AtomicU64,
    /// Heartbeat replies received.
    pub heartbeat_replies: AtomicU64,
    /// Round-trip time of the last heartbeat that got a reply, in microseconds.
    pub heartbeat_rtt_micros: AtomicU64,
}

/// A plain copy of [`RealtimeStats`] for health output.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RealtimeStatsSnapshot {
    pub connected: bool,
    pub live: bool,
    pub connect_attempts: u64,
    pub reconnects: u64,
    pub joins: u64,
    pub rejoins: u64,
    pub readiness_messages: u64,
    pub last_readiness_unix_ms: u64,
    pub hints_received: u64,
    pub hints_dropped: u64,
    pub last_event_unix_ms: u64,
    pub event_errors: u64,
    pub subscribe_errors: u64,
    pub heartbeat_timeouts: u64,
    pub heartbeat_replies: u64,
    pub heartbeat_rtt_micros: u64,
}

impl RealtimeStats {
    pub fn snapshot(&self) -> RealtimeStatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RealtimeStatsSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            live: self.live.load(Ordering::Relaxed),
            connect_attempts: load(&self.connect_attempts),
            reconnects: load(&self.reconnects),
            joins: load(&self.joins),
            rejoins: load(&self.rejoins),
            readiness_messages: load(&self.readiness_messages),
            last_readiness_unix_ms: load(&self.last_readiness_unix_ms),
            hints_received: load(&self.hints_received),
            hints_dropped: load(&self.hints_dropped),
            last_event_unix_ms: load(&self.last_event_unix_ms),
            event_errors: load(&self.event_errors),
            subscribe_errors: load(&self.subscribe_errors),
            heartbeat_timeouts: load(&self.heartbeat_timeouts),
            heartbeat_replies: load(&self.heartbeat_replies),
            heartbeat_rtt_micros: load(&self.heartbeat_rtt_micros),
        }
    }
}

pub(crate) fn unix_millis_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the Realtime client task. It runs until `shutdown` is cancelled, then leaves the
/// channel, closes the websocket with code 1000 and returns. Hints go to `hints` with
/// `try_send`, so a full queue drops them (counted in `hints_dropped`) instead of stalling
/// the socket. `ready` is incremented on every "Subscribed to PostgreSQL" message.
pub fn spawn(
    config: RealtimeConfig,
    hints: mpsc::Sender<Hint>,
    ready: watch::Sender<u64>,
    stats: Arc<RealtimeStats>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(run(config, hints, ready, stats, shutdown))
}

async fn run(
    config: RealtimeConfig,
    hints: mpsc::Sender<Hint>,
    ready: watch::Sender<u64>,
    stats: Arc<RealtimeStats>,
    shutdown: CancellationToken,
) {
    let url = match config.websocket_url() {
        Ok(url) => url,
        Err(error) => {
            error!(%error, "Realtime client not started: fix SUPABASE_URL");
            return;
        }
    };
    let key_kind = ApiKeyKind::of(&config.api_key);
    let mut retry = RetryState::new(config.backoff.clone(), config.healthy_reset_after);
    let outputs = session::Outputs {
        hints,
        ready,
        stats: stats.clone(),
    };
    info!(
        host = url.host_str().unwrap_or(""),
        topic = %config.topic(),
        key_is_jwt = key_kind.is_jwt(),
        "Realtime client starting"
    );

    loop {
        if stats.connect_attempts.fetch_add(1, Ordering::Relaxed) > 0 {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let connected = tokio::select! {
            _ = shutdown.cancelled() => break,
            connected = session::connect(&url, &config) => connected,
        };
        let error = match connected {
            Ok(socket) => {
                info!("Realtime websocket connected");
                stats.connected.store(true, Ordering::Relaxed);
                let result = session::Session::new(
                    socket, &config, &key_kind, &outputs, &mut retry, &shutdown,
                )
                .run()
                .await;
                stats.connected.store(false, Ordering::Relaxed);
                stats.live.store(false, Ordering::Relaxed);
                match result {
                    Ok(()) => break,
                    Err(error) => error,
                }
            }
            Err(error) => error,
        };

        let wait = retry.failure_delay(tokio::time::Instant::now().into_std());
        if error.is_retryable() {
            warn!(%error, wait_ms = wait.as_millis() as u64, failures = retry.failures(), "Realtime connection failed; reconnecting after backoff");
        } else {
            error!(%error, wait_ms = wait.as_millis() as u64, failures = retry.failures(), "Realtime connection failed and a retry is unlikely to help; reconnecting after backoff");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    info!("Realtime client stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, key: &str) -> RealtimeConfig {
        RealtimeConfig::new(
            url.parse().unwrap(),
            key.to_owned(),
            "public".to_owned(),
            "jobs".to_owned(),
        )
    }

    #[test]
    fn websocket_url_for_hosted_project() {
        let url = config("https://abcd.supabase.co", "sb_secret_x&y")
            .websocket_url()
            .unwrap();
        assert_eq!(
            url.as_str(),
            "wss://abcd.supabase.co/realtime/v1/websocket?apikey=sb_secret_x%26y&vsn=2.0.0"
        );
    }

    #[test]
    fn websocket_url_for_local_port_and_path() {
        let url = config("http://127.0.0.1:54321/base/", "k")
            .websocket_url()
            .unwrap();
        assert_eq!(
            url.as_str(),
            "ws://127.0.0.1:54321/base/realtime/v1/websocket?apikey=k&vsn=2.0.0"
        );
    }

    #[test]
    fn websocket_url_rejects_other_schemes() {
        let error = config("ftp://example.org", "k")
            .websocket_url()
            .unwrap_err();
        assert!(matches!(error, RealtimeError::InvalidUrl(_)));
        assert!(!error.is_retryable());
    }

    #[test]
    fn topic_names_schema_and_table() {
        assert_eq!(
            config("http://127.0.0.1:1", "k").topic(),
            "realtime:supaworker.public.jobs"
        );
    }

    #[test]
    fn stats_snapshot_copies_counters() {
        let stats = RealtimeStats::default();
        stats.hints_dropped.store(3, Ordering::Relaxed);
        stats.live.store(true, Ordering::Relaxed);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.hints_dropped, 3);
        assert!(snapshot.live);
        assert!(!snapshot.connected);
    }
}
