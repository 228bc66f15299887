//! Realtime `postgres_changes` over a real Postgres: the websocket server at
//! `/realtime/v1/websocket` and `/socket/websocket`, change capture from committed rows,
//! and the fault injection that tests use to reproduce the real server's failure modes.
//!
//! Submodules: [`protocol`] (frames), [`binding`] (join bindings and filters),
//! [`capture`] (trigger and LISTEN), `dispatch` (fan-out of changes), `socket` (one
//! websocket connection and its channels) and `control` (the JSON fault routes).

pub mod binding;
pub mod capture;
mod control;
mod dispatch;
pub mod protocol;
mod socket;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Keys;

/// Timing and limits of the Realtime server. [`Default`] has the real server's values;
/// [`RealtimeOptions::for_tests`] has zero delays so tests run fast.
#[derive(Debug, Clone)]
pub struct RealtimeOptions {
    /// Sleep before the response to a rejected connect (real: `CONNECT_ERROR_BACKOFF_MS`, 2 s).
    pub connect_error_delay: Duration,
    /// Sleep before an error join reply (real: `CHANNEL_ERROR_BACKOFF_MS`, 5 s).
    pub join_error_delay: Duration,
    /// Extra latency before every join reply (real: 0 when warm, up to 15 s when cold).
    pub join_delay: Duration,
    /// Time from the ok join reply to the `Subscribed to PostgreSQL` message.
    pub readiness_delay: Duration,
    /// Time from an accepted `access_token` push to the new `Subscribed to PostgreSQL`
    /// message (real: a random 1 to 3 s).
    pub access_token_resubscribe_delay: Duration,
    /// A socket that receives no client frame for this long is closed with code 1000 (real:
    /// 60 s, cowboy's idle timeout).
    pub idle_timeout: Duration,
    /// A socket without channels for this long is dropped without a close frame (real:
    /// `NO_CHANNEL_TIMEOUT_IN_MS`, 10 min).
    pub no_channel_timeout: Duration,
    /// Channels per socket (real: `max_channels_per_client`, 100).
    pub max_channels: usize,
    /// Changes larger than this are sent in the `Error 413` form (real:
    /// `poll_max_record_bytes`, 1 MiB).
    pub max_record_bytes: usize,
    /// Event frames queued per socket before further events for that socket are dropped.
    pub socket_queue_capacity: usize,
}

impl Default for RealtimeOptions {
    fn default() -> Self {
        RealtimeOptions {
            connect_error_delay: Duration::from_secs(2),
            join_error_delay: Duration::from_secs(5),
            join_delay: Duration::ZERO,
            // An estimate of a warm server, where the subscription row is inserted right
            // after the join.
            readiness_delay: Duration::from_millis(100),
            access_token_resubscribe_delay: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            no_channel_timeout: Duration::from_secs(600),
            max_channels: 100,
            max_record_bytes: 1024 * 1024,
            socket_queue_capacity: 4096,
        }
    }
}

impl RealtimeOptions {
    /// Options with zero error and readiness delays; limits stay at the real values.
    pub fn for_tests() -> Self {
        RealtimeOptions {
            connect_error_delay: Duration::ZERO,
            join_error_delay: Duration::ZERO,
            readiness_delay: Duration::ZERO,
            access_token_resubscribe_delay: Duration::ZERO,
            ..RealtimeOptions::default()
        }
    }
}

/// Counters of the server since start, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RealtimeStats {
    /// Websockets open now.
    pub sockets_open: u64,
    /// Websockets accepted since start.
    pub sockets_accepted: u64,
    /// `phx_join` requests that got an ok reply.
    pub joins: u64,
    /// Event frames queued to sockets.
    pub events_sent: u64,
    /// Event frames not delivered: socket queue full, delivery stalled, CDC restart window
    /// or rate limiting.
    pub events_dropped: u64,
}

#[derive(Default)]
struct Counters {
    sockets_open: AtomicU64,
    sockets_accepted: AtomicU64,
    joins: AtomicU64,
    events_sent: AtomicU64,
    events_dropped: AtomicU64,
}

/// A tenant-level rejection of new connections, sent before the websocket upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectRejection {
    /// 404 `Tenant not found`.
    TenantNotFound,
    /// 403 `Realtime was disabled for this tenant`.
    TenantDisabled,
    /// 429 `Too many connected users`.
    TooManyConnectedUsers,
    /// 429 `Too many joins per second`.
    TooManyJoins,
}

impl ConnectRejection {
    /// Returns the HTTP status and `error` text the real server sends.
    pub fn response(self) -> (u16, &'static str) {
        match self {
            ConnectRejection::TenantNotFound => (404, "Tenant not found"),
            ConnectRejection::TenantDisabled => (403, "Realtime was disabled for this tenant"),
            ConnectRejection::TooManyConnectedUsers => (429, "Too many connected users"),
            ConnectRejection::TooManyJoins => (429, "Too many joins per second"),
        }
    }
}

/// A tenant-level rejection of new joins, sent as an error join reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinRejection {
    /// `ClientJoinRateLimitReached`, then the socket is closed with 1001.
    TooManyJoins,
    /// `TenantNotFound`, then the socket is closed with 1001.
    TenantNotFound,
    /// `ConnectionRateLimitReached: Too many connected users`.
    TooManyConnectedUsers,
    /// `UnableToConnectToProject`: the tenant database is unreachable.
    DatabaseUnavailable,
}

impl JoinRejection {
    /// Returns the reply's `reason` and the close code that follows it, if any.
    pub fn reason(self) -> (&'static str, Option<u16>) {
        match self {
            JoinRejection::TooManyJoins => (
                "ClientJoinRateLimitReached: Too many joins per second",
                Some(1001),
            ),
            JoinRejection::TenantNotFound => (
                "TenantNotFound: Tenant with the given ID does not exist",
                Some(1001),
            ),
            JoinRejection::TooManyConnectedUsers => {
                ("ConnectionRateLimitReached: Too many connected users", None)
            }
            JoinRejection::DatabaseUnavailable => (
                "UnableToConnectToProject: Realtime was unable to connect to the project database",
                None,
            ),
        }
    }
}

/// Fault switches read by the sockets and the dispatcher.
#[derive(Default)]
struct Faults {
    connect_rejection: Mutex<Option<ConnectRejection>>,
    join_rejection: Mutex<Option<JoinRejection>>,
    heartbeats_paused: AtomicBool,
    delivery_stalled: AtomicBool,
    rate_limited: AtomicBool,
    not_in_publication: AtomicBool,
    restarting: AtomicBool,
    drop_events_until: Mutex<Option<Instant>>,
}

/// A command sent to one socket task.
#[derive(Debug, Clone)]
enum Control {
    /// Close with this code, or drop the TCP connection without a close frame.
    Close(Option<u16>),
    /// "Server requested disconnect" on every channel, then close 1012.
    ServerDisconnect,
    /// Push `phx_error` with this payload on every channel and remove the channels.
    PhxError(serde_json::Value),
    /// Push `phx_close` on every channel and remove the channels.
    PhxClose,
    /// Push a `system` error with this message on every channel, then `phx_close`.
    SystemError(String),
    /// Run the token-expiry path on every channel now.
    ExpireTokens,
    /// Send a new `Subscribed to PostgreSQL` on every subscribed channel.
    Resubscribe,
    /// Send a transient `postgres_changes` error on every subscribed channel, stop its
    /// events, and resubscribe after the delay.
    TransientError {
        message: String,
        recover_after: Duration,
    },
    /// Internal: the readiness timer of a channel fired.
    Ready { topic: String, join_ref: String },
    /// Internal: the token timer of a channel fired.
    TokenCheck { topic: String, join_ref: String },
    /// Internal: send a frame that was delayed, then optionally close the socket.
    Send { text: String, close: Option<u16> },
}

/// A subscribed channel, as the dispatcher matches and delivers to it.
struct Subscription {
    topic: String,
    vsn: protocol::Vsn,
    bindings: Vec<binding::Binding>,
    role: String,
    claims: String,
    bypass_rls: bool,
    events: mpsc::Sender<String>,
    socket_id: u64,
}

struct Shared {
    options: RealtimeOptions,
    keys: Arc<Keys>,
    pool: deadpool_postgres::Pool,
    tables: capture::TableCache,
    sockets: Mutex<HashMap<u64, mpsc::UnboundedSender<Control>>>,
    subscriptions: RwLock<HashMap<u64, Arc<Subscription>>>,
    next_id: AtomicU64,
    faults: Faults,
    counters: Counters,
    shutdown: CancellationToken,
    /// Serializes [`Shared::sync_capture`] so an older set never overwrites a newer one.
    capture_sync: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Makes the capture trigger record exactly the (table, operation) pairs that the
    /// current subscriptions need.
    async fn sync_capture(&self) {
        let _guard = self.capture_sync.lock().await;
        let mut entries: Vec<(String, String, String)> = self
            .subscriptions
            .read()
            .expect("subscription registry lock")
            .values()
            .flat_map(|subscription| subscription.bindings.iter())
            .map(|b| {
                (
                    b.schema.clone(),
                    b.table.clone(),
                    b.event.label().to_string(),
                )
            })
            .collect();
        entries.sort();
        entries.dedup();
        let result = match self.pool.get().await {
            Ok(mut client) => {
                let client: &mut tokio_postgres::Client = &mut client;
                capture::set_wanted(client, &entries).await
            }
            Err(error) => Err(error.into()),
        };
        if let Err(error) = result {
            tracing::error!(%error, "failed to update the captured tables");
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn broadcast(&self, control: Control) {
        let sockets = self.sockets.lock().expect("socket registry lock");
        for sender in sockets.values() {
            let _ = sender.send(control.clone());
        }
    }

    /// Tells whether events must be discarded now because of a fault.
    fn events_suppressed(&self) -> bool {
        if self.faults.delivery_stalled.load(Ordering::Relaxed)
            || self.faults.rate_limited.load(Ordering::Relaxed)
        {
            return true;
        }
        let until = self.faults.drop_events_until.lock().expect("fault lock");
        until.is_some_and(|until| Instant::now() < until)
    }
}

/// The Realtime server: cheap to clone, all clones share one server.
#[derive(Clone)]
pub struct Realtime {
    shared: Arc<Shared>,
}

impl Realtime {
    /// Connects to Postgres, installs change capture on the tables of publication
    /// `supabase_realtime` and starts delivering changes. The schema must already exist.
    pub async fn start(
        database_url: &str,
        keys: Arc<Keys>,
        options: RealtimeOptions,
    ) -> anyhow::Result<Realtime> {
        let config = tokio_postgres::Config::from_str(database_url)?;
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(4)
            .build()?;
        {
            let mut client = pool.get().await?;
            let client: &mut tokio_postgres::Client = &mut client;
            capture::install(client).await?;
            capture::set_wanted(client, &[]).await?;
        }
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let (listen_client, listener) = capture::listen(&config, notify_tx).await?;
        let shared = Arc::new(Shared {
            options,
            keys,
            pool,
            tables: capture::TableCache::default(),
            sockets: Mutex::new(HashMap::new()),
            subscriptions: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            faults: Faults::default(),
            counters: Counters::default(),
            shutdown: CancellationToken::new(),
            capture_sync: tokio::sync::Mutex::new(()),
        });
        let dispatcher = shared.clone();
        tokio::spawn(async move {
            dispatch::run(dispatcher.clone(), notify_rx).await;
            listener.abort();
            drop(listen_client);
        });
        tracing::info!("realtime server started");
        Ok(Realtime { shared })
    }

    /// Builds the websocket routes `/realtime/v1/websocket` and `/socket/websocket`.
    pub fn router(&self) -> axum::Router {
        socket::router(self.shared.clone())
    }

    /// JSON fault routes (see the crate README), meant to be nested under `/realtime`.
    pub fn control_router(&self) -> axum::Router {
        control::router(self.clone())
    }

    /// Drops every socket: with a close frame carrying `close_code`, or abruptly without a
    /// close frame (the client sees 1006) when it is `None`.
    pub fn drop_all_sockets(&self, close_code: Option<u16>) {
        self.shared.broadcast(Control::Close(close_code));
    }

    /// Sends "Server requested disconnect" on every channel, then closes every socket with
    /// 1012, as the real server does when the tenant is reconfigured.
    pub fn server_requested_disconnect(&self) {
        self.shared.broadcast(Control::ServerDisconnect);
    }

    /// Stops (`true`) or resumes heartbeat replies. The TCP connection stays open.
    pub fn pause_heartbeats(&self, paused: bool) {
        self.shared
            .faults
            .heartbeats_paused
            .store(paused, Ordering::Relaxed);
    }

    /// Stalls event delivery (`true`) or resumes it. Heartbeats keep working. Events
    /// committed during the stall are dropped, never held back and sent later.
    pub fn stall_delivery(&self, stalled: bool) {
        self.shared
            .faults
            .delivery_stalled
            .store(stalled, Ordering::Relaxed);
    }

    /// Simulates a CDC restart: drops events for `window`, then sends a new `Subscribed to
    /// PostgreSQL` on every subscribed channel.
    pub fn cdc_restart(&self, window: Duration) {
        *self
            .shared
            .faults
            .drop_events_until
            .lock()
            .expect("fault lock") = Some(Instant::now() + window);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            shared.broadcast(Control::Resubscribe);
        });
    }

    /// Silently drops every event (`true`) while everything else stays healthy, like the
    /// real server's tenant event rate limit.
    pub fn set_rate_limited(&self, limited: bool) {
        self.shared
            .faults
            .rate_limited
            .store(limited, Ordering::Relaxed);
    }

    /// Makes later subscriptions behave as if no table were in the publication (`true`):
    /// they get the "Unable to subscribe" error and then no events. Existing
    /// subscriptions are not touched.
    pub fn set_not_in_publication(&self, missing: bool) {
        self.shared
            .faults
            .not_in_publication
            .store(missing, Ordering::Relaxed);
    }

    /// Rejects new connections with a tenant-level error (`Some`) or accepts them again.
    pub fn set_connect_rejection(&self, rejection: Option<ConnectRejection>) {
        *self
            .shared
            .faults
            .connect_rejection
            .lock()
            .expect("fault lock") = rejection;
    }

    /// Rejects new joins with a tenant-level error (`Some`) or accepts them again.
    pub fn set_join_rejection(&self, rejection: Option<JoinRejection>) {
        *self
            .shared
            .faults
            .join_rejection
            .lock()
            .expect("fault lock") = rejection;
    }

    /// Rejects later joins with `RealtimeRestarting` (`true`) or accepts them again.
    pub fn set_restarting(&self, restarting: bool) {
        self.shared
            .faults
            .restarting
            .store(restarting, Ordering::Relaxed);
    }

    /// Simulates a deploy: rejects joins with `RealtimeRestarting`, then closes every
    /// socket with 1012 without per-channel frames. Call `set_restarting(false)` to end it.
    pub fn deploy(&self) {
        self.set_restarting(true);
        self.shared.broadcast(Control::Close(Some(1012)));
    }

    /// Pushes `phx_error` on every channel and removes the channels. `reason` `None`
    /// sends `{}`, otherwise `{"reason": reason}` (e.g. `channel_crash`).
    pub fn push_phx_error(&self, reason: Option<&str>) {
        let payload = match reason {
            None => serde_json::json!({}),
            Some(reason) => serde_json::json!({ "reason": reason }),
        };
        self.shared.broadcast(Control::PhxError(payload));
    }

    /// Pushes `phx_close` on every channel and removes the channels.
    pub fn push_phx_close(&self) {
        self.shared.broadcast(Control::PhxClose);
    }

    /// Pushes a `system` error with `message` on every channel, then `phx_close`.
    pub fn push_system_error(&self, message: &str) {
        self.shared
            .broadcast(Control::SystemError(message.to_string()));
    }

    /// Runs the token-expiry path on every channel now: `Token has expired N seconds ago`,
    /// then `phx_close`.
    pub fn expire_tokens(&self) {
        self.shared.broadcast(Control::ExpireTokens);
    }

    /// Sends a transient `postgres_changes` error on every subscribed channel, drops its
    /// events, and sends a new `Subscribed to PostgreSQL` after `recover_after`.
    pub fn transient_error(&self, message: &str, recover_after: Duration) {
        self.shared.broadcast(Control::TransientError {
            message: message.to_string(),
            recover_after,
        });
    }

    /// Sends a new `Subscribed to PostgreSQL` on every subscribed channel.
    pub fn resubscribe_all(&self) {
        self.shared.broadcast(Control::Resubscribe);
    }

    /// Counters since start.
    pub fn stats(&self) -> RealtimeStats {
        let counters = &self.shared.counters;
        RealtimeStats {
            sockets_open: counters.sockets_open.load(Ordering::Relaxed),
            sockets_accepted: counters.sockets_accepted.load(Ordering::Relaxed),
            joins: counters.joins.load(Ordering::Relaxed),
            events_sent: counters.events_sent.load(Ordering::Relaxed),
            events_dropped: counters.events_dropped.load(Ordering::Relaxed),
        }
    }

    /// Closes every socket with 1001 and stops change delivery.
    pub async fn shutdown(&self) {
        self.shared.broadcast(Control::Close(Some(1001)));
        self.shared.shutdown.cancel();
        tracing::info!("realtime server stopped");
    }
}
