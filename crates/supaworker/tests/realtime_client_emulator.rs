//! The Realtime client against the emulator over a real PostgreSQL. Rows inserted while the
//! channel is live become hints. After every fault the emulator can inject (socket drops
//! and closes, unanswered heartbeats, channel errors and closes, token expiry, "Unable to
//! subscribe", a restart that refuses connections) the client is live again and delivers
//! the next insert. Deadlines only guard against hangs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use supabase_emulator::realtime::RealtimeOptions;
use supabase_emulator::{Emulator, EmulatorOptions};
use supaworker::realtime::{self, Hint, RealtimeConfig, RealtimeStats};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Hang guard for any single wait; it is not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(60);

struct Harness {
    emulator: Emulator,
    database: tokio_postgres::Client,
    hints: mpsc::Receiver<Hint>,
    ready: watch::Receiver<u64>,
    stats: Arc<RealtimeStats>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

enum KeyChoice {
    ServiceRoleJwt,
    SecretKey,
    /// A service_role JWT whose `exp` passed a minute ago.
    ExpiredJwt,
}

fn client_config(url: &str, api_key: String) -> RealtimeConfig {
    let mut config = RealtimeConfig::new(
        url.parse().expect("emulator URL"),
        api_key,
        "public".to_owned(),
        "jobs".to_owned(),
    );
    config.heartbeat_interval = Duration::from_secs(2);
    config.readiness_timeout = Duration::from_secs(10);
    config.backoff = [100, 200, 400].map(Duration::from_millis).to_vec();
    config.healthy_reset_after = Duration::from_secs(1);
    config.subscribe_error_retry = Duration::from_millis(500);
    config
}

impl Harness {
    /// Starts the emulator and the client without waiting for readiness.
    async fn launch(
        key: KeyChoice,
        realtime_options: RealtimeOptions,
        hint_capacity: usize,
    ) -> Harness {
        let emulator = Emulator::start(EmulatorOptions {
            realtime: realtime_options,
            ..Default::default()
        })
        .await
        .expect("emulator start");
        let (database, connection) =
            tokio_postgres::connect(emulator.database_url(), tokio_postgres::NoTls)
                .await
                .expect("database connect");
        tokio::spawn(connection);

        let api_key = match key {
            KeyChoice::ServiceRoleJwt => emulator.keys().service_role_jwt.clone(),
            KeyChoice::SecretKey => emulator.keys().secret_key.clone(),
            KeyChoice::ExpiredJwt => {
                let now = supabase_emulator::auth::now_seconds();
                emulator.keys().sign("service_role", now - 60)
            }
        };
        let config = client_config(&emulator.url(), api_key);
        let (hint_sender, hints) = mpsc::channel(hint_capacity);
        let (ready_sender, ready) = watch::channel(0);
        let stats = Arc::new(RealtimeStats::default());
        let shutdown = CancellationToken::new();
        let task = realtime::spawn(
            config,
            hint_sender,
            ready_sender,
            stats.clone(),
            shutdown.clone(),
        );
        Harness {
            emulator,
            database,
            hints,
            ready,
            stats,
            shutdown,
            task,
        }
    }

    /// Starts the emulator and the client and waits for the first readiness.
    async fn start(
        key: KeyChoice,
        realtime_options: RealtimeOptions,
        hint_capacity: usize,
    ) -> Harness {
        let mut harness = Harness::launch(key, realtime_options, hint_capacity).await;
        harness.wait_ready_after(0, "first subscription").await;
        harness
    }

    fn ready_count(&self) -> u64 {
        *self.ready.borrow()
    }

    /// Waits until the readiness counter exceeds `previous` and returns the new value.
    async fn wait_ready_after(&mut self, previous: u64, step: &str) -> u64 {
        let changed =
            tokio::time::timeout(HANG_GUARD, self.ready.wait_for(|count| *count > previous))
                .await
                .unwrap_or_else(|_| panic!("{step}: no readiness after count {previous}"));
        *changed.expect("ready sender alive")
    }

    async fn insert_job(&self) -> i64 {
        let row = self
            .database
            .query_one(
                "insert into public.jobs (action) values ('realtime-test') returning id",
                &[],
            )
            .await
            .expect("insert job");
        row.get(0)
    }

    /// Receives hints until one names `id`, and returns it.
    async fn expect_hint(&mut self, id: i64, step: &str) -> Hint {
        let expected_id = serde_json::json!(id);
        loop {
            let hint = tokio::time::timeout(HANG_GUARD, self.hints.recv())
                .await
                .unwrap_or_else(|_| panic!("{step}: no hint for job {id}"))
                .expect("hint channel open");
            let Hint::Job { id: received, .. } = &hint;
            if *received == expected_id {
                return hint;
            }
        }
    }

    /// Inserts a row and checks that its hint arrives.
    async fn assert_delivers(&mut self, step: &str) {
        let id = self.insert_job().await;
        self.expect_hint(id, step).await;
    }

    /// Applies a fault, waits for the client to be live again and checks delivery.
    async fn assert_recovers(&mut self, step: &str, fault: impl FnOnce(&Emulator)) {
        let before = self.ready_count();
        fault(&self.emulator);
        self.wait_ready_after(before, step).await;
        self.assert_delivers(step).await;
    }

    async fn wait_until(&self, step: &str, condition: impl Fn(&Harness) -> bool) {
        let wait = async {
            while !condition(self) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(HANG_GUARD, wait)
            .await
            .unwrap_or_else(|_| panic!("{step}: condition not reached"));
    }

    /// Cancels the client and waits for its task; the emulator keeps running.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(HANG_GUARD, &mut self.task)
            .await
            .expect("client stops after shutdown")
            .expect("client task did not panic");
    }
}

#[tokio::test]
async fn insert_yields_hint_with_jwt() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    assert!(harness.stats.live.load(Ordering::Relaxed));
    assert!(harness.stats.connected.load(Ordering::Relaxed));

    let id = harness.insert_job().await;
    let hint = harness.expect_hint(id, "insert").await;
    assert_eq!(
        hint,
        Hint::Job {
            id: serde_json::json!(id),
            truncated: false
        }
    );
    assert_eq!(harness.stats.hints_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(harness.stats.joins.load(Ordering::Relaxed), 1);
    harness.stop().await;
}

#[tokio::test]
async fn insert_yields_hint_with_secret_key() {
    let mut harness = Harness::start(KeyChoice::SecretKey, RealtimeOptions::for_tests(), 64).await;
    harness.assert_delivers("insert with sb_secret key").await;
    harness.stop().await;
}

#[tokio::test]
async fn update_to_pending_yields_hint() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    let first = harness.insert_job().await;
    harness.expect_hint(first, "insert first").await;

    harness
        .database
        .execute(
            "update public.jobs set status = 'running' where id = $1",
            &[&first],
        )
        .await
        .expect("update to running");
    // The marker row proves the update to `running` sent no hint: events arrive in commit
    // order, so a hint for `first` before the marker would come from that update.
    let marker = harness.insert_job().await;
    let next = harness.expect_hint(marker, "marker insert").await;
    assert_eq!(
        next,
        Hint::Job {
            id: serde_json::json!(marker),
            truncated: false
        }
    );

    harness
        .database
        .execute(
            "update public.jobs set status = 'pending' where id = $1",
            &[&first],
        )
        .await
        .expect("update back to pending");
    let hint = tokio::time::timeout(HANG_GUARD, harness.hints.recv())
        .await
        .expect("hint for the job put back to pending")
        .expect("hint channel open");
    assert_eq!(
        hint,
        Hint::Job {
            id: serde_json::json!(first),
            truncated: false
        }
    );
    harness.stop().await;
}

#[tokio::test]
async fn reconnects_after_socket_closes() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    harness
        .assert_recovers("abrupt drop", |emulator| {
            emulator.realtime().drop_all_sockets(None)
        })
        .await;
    for code in [1000, 1001, 1012] {
        harness
            .assert_recovers(&format!("close {code}"), |emulator| {
                emulator.realtime().drop_all_sockets(Some(code))
            })
            .await;
    }
    harness
        .assert_recovers("server requested disconnect", |emulator| {
            emulator.realtime().server_requested_disconnect()
        })
        .await;
    assert!(harness.stats.reconnects.load(Ordering::Relaxed) >= 5);
    harness.stop().await;
}

#[tokio::test]
async fn reconnects_after_deploy() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    let before = harness.ready_count();
    let joins_before = harness.stats.joins.load(Ordering::Relaxed);
    harness.emulator.realtime().deploy();
    // Joins are rejected with RealtimeRestarting until the deploy ends.
    harness
        .wait_until("rejected joins during deploy", |harness| {
            harness.stats.joins.load(Ordering::Relaxed) >= joins_before + 2
        })
        .await;
    assert_eq!(harness.ready_count(), before);
    harness.emulator.realtime().set_restarting(false);
    harness.wait_ready_after(before, "after deploy").await;
    harness.assert_delivers("after deploy").await;
    harness.stop().await;
}

#[tokio::test]
async fn rejoins_after_channel_faults() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    harness
        .assert_recovers("phx_error without reason", |emulator| {
            emulator.realtime().push_phx_error(None)
        })
        .await;
    harness
        .assert_recovers("phx_error channel_crash", |emulator| {
            emulator.realtime().push_phx_error(Some("channel_crash"))
        })
        .await;
    harness
        .assert_recovers("phx_close", |emulator| emulator.realtime().push_phx_close())
        .await;
    harness
        .assert_recovers("system error", |emulator| {
            emulator
                .realtime()
                .push_system_error("Too many messages per second")
        })
        .await;
    harness
        .assert_recovers("token expiry", |emulator| {
            emulator.realtime().expire_tokens()
        })
        .await;
    harness
        .assert_recovers("transient subscription error", |emulator| {
            emulator
                .realtime()
                .transient_error("Too many database timeouts", Duration::from_millis(200))
        })
        .await;
    harness
        .assert_recovers("CDC restart", |emulator| {
            emulator.realtime().cdc_restart(Duration::from_millis(200))
        })
        .await;
    assert!(harness.stats.rejoins.load(Ordering::Relaxed) >= 5);
    assert_eq!(harness.stats.reconnects.load(Ordering::Relaxed), 0);
    harness.stop().await;
}

#[tokio::test]
async fn reconnects_after_unanswered_heartbeats() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    let before = harness.ready_count();
    harness.emulator.realtime().pause_heartbeats(true);
    harness
        .wait_until("heartbeat timeout", |harness| {
            harness.stats.heartbeat_timeouts.load(Ordering::Relaxed) >= 1
        })
        .await;
    harness.emulator.realtime().pause_heartbeats(false);
    // A reply after the resume comes from a socket opened after the timeout, so no heartbeat
    // sent during the pause is still outstanding on it.
    let replies = harness.stats.heartbeat_replies.load(Ordering::Relaxed);
    harness
        .wait_until("heartbeat reply after resume", |harness| {
            harness.stats.heartbeat_replies.load(Ordering::Relaxed) > replies
        })
        .await;
    harness
        .wait_ready_after(before, "after heartbeat timeout")
        .await;
    harness.assert_delivers("after heartbeat timeout").await;
    assert!(harness.stats.reconnects.load(Ordering::Relaxed) >= 1);
    harness.stop().await;
}

#[tokio::test]
async fn retries_after_unable_to_subscribe() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    let before = harness.ready_count();
    harness.emulator.realtime().set_not_in_publication(true);
    harness.emulator.realtime().push_phx_error(None);
    harness
        .wait_until("two subscribe errors", |harness| {
            harness.stats.subscribe_errors.load(Ordering::Relaxed) >= 2
        })
        .await;
    assert_eq!(harness.ready_count(), before);
    assert!(!harness.stats.live.load(Ordering::Relaxed));

    harness.emulator.realtime().set_not_in_publication(false);
    harness
        .wait_ready_after(before, "after publication fix")
        .await;
    harness.assert_delivers("after publication fix").await;
    harness.stop().await;
}

#[tokio::test]
async fn reconnects_after_restart() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    let before = harness.ready_count();
    let attempts = harness.stats.connect_attempts.load(Ordering::Relaxed);
    harness.emulator.restart(Duration::from_secs(2)).await;
    harness.wait_ready_after(before, "after restart").await;
    harness.assert_delivers("after restart").await;
    assert!(harness.stats.connect_attempts.load(Ordering::Relaxed) > attempts);
    harness.stop().await;
}

#[tokio::test]
async fn full_queue_drops_hints() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 1).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(harness.insert_job().await);
    }
    harness
        .wait_until("three change events", |harness| {
            harness.stats.hints_received.load(Ordering::Relaxed) >= 3
        })
        .await;
    assert_eq!(harness.stats.hints_dropped.load(Ordering::Relaxed), 2);
    let queued = harness.hints.recv().await.expect("one queued hint");
    assert_eq!(
        queued,
        Hint::Job {
            id: serde_json::json!(ids[0]),
            truncated: false
        }
    );
    harness.assert_delivers("after drops").await;
    harness.stop().await;
}

#[tokio::test]
async fn oversize_record_marked_truncated() {
    let options = RealtimeOptions {
        max_record_bytes: 2048,
        ..RealtimeOptions::for_tests()
    };
    let mut harness = Harness::start(KeyChoice::ServiceRoleJwt, options, 64).await;
    let big = "x".repeat(10_000);
    let row = harness
        .database
        .query_one(
            "insert into public.jobs (action, payload) values ('realtime-test', jsonb_build_object('blob', $1::text)) returning id",
            &[&big],
        )
        .await
        .expect("insert oversize job");
    let id: i64 = row.get(0);
    let hint = harness.expect_hint(id, "oversize insert").await;
    assert_eq!(
        hint,
        Hint::Job {
            id: serde_json::json!(id),
            truncated: true
        }
    );
    assert!(harness.stats.event_errors.load(Ordering::Relaxed) >= 1);
    harness.stop().await;
}

#[tokio::test]
async fn shutdown_closes_socket() {
    let mut harness =
        Harness::start(KeyChoice::ServiceRoleJwt, RealtimeOptions::for_tests(), 64).await;
    assert_eq!(harness.emulator.realtime().stats().sockets_open, 1);
    harness.stop().await;
    assert!(!harness.stats.connected.load(Ordering::Relaxed));
    assert!(!harness.stats.live.load(Ordering::Relaxed));
    harness
        .wait_until("server sees the socket closed", |harness| {
            harness.emulator.realtime().stats().sockets_open == 0
        })
        .await;
}

#[tokio::test]
async fn expired_key_keeps_retrying() {
    let mut harness =
        Harness::launch(KeyChoice::ExpiredJwt, RealtimeOptions::for_tests(), 64).await;
    // The server rejects the upgrade with 401, and the client must go on retrying instead
    // of giving up, so an operator who fixes the key server-side needs no restart.
    harness
        .wait_until("three rejected connects", |harness| {
            harness.stats.connect_attempts.load(Ordering::Relaxed) >= 3
        })
        .await;
    assert_eq!(harness.ready_count(), 0);
    assert!(!harness.stats.live.load(Ordering::Relaxed));
    assert_eq!(harness.stats.joins.load(Ordering::Relaxed), 0);
    harness.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_idle_socket_open() {
    // The server closes a socket after this long without a client frame. Heartbeats every
    // 2 s keep it open although the client sends nothing else.
    let options = RealtimeOptions {
        idle_timeout: Duration::from_secs(5),
        ..RealtimeOptions::for_tests()
    };
    let mut harness = Harness::start(KeyChoice::ServiceRoleJwt, options, 64).await;
    let replies = harness.stats.heartbeat_replies.load(Ordering::Relaxed);
    harness
        .wait_until("heartbeats spanning three idle timeouts", |harness| {
            harness.stats.heartbeat_replies.load(Ordering::Relaxed) >= replies + 8
        })
        .await;
    assert_eq!(harness.stats.reconnects.load(Ordering::Relaxed), 0);
    assert_eq!(harness.stats.heartbeat_timeouts.load(Ordering::Relaxed), 0);
    harness.assert_delivers("after idle period").await;
    harness.stop().await;
}
