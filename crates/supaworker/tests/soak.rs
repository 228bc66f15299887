//! Soak test: the worker binary runs for `SOAK_MINUTES` (default 30) against the local stack
//! while a steady stream of jobs arrives. A random fault hits every few seconds: REST errors
//! and lost responses, every Realtime fault, refused connections or a server restart.
//! At the end no job is lost, none ran twice, none is left running, and the worker's resident
//! memory (sampled every 10 s and printed) has stayed flat.
//!
//! Ignored by default because of its length:
//! `cargo test --release -p supaworker --test soak -- --ignored --nocapture`.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::IndexedRandom;
use rand::Rng;
use serde_json::json;
use supabase_emulator::rest::faults::RestFault;
use support::{assert_each_ran_once, Scripts, Stack, WorkerProcess};
use tokio_util::sync::CancellationToken;

/// Appends the job id to `runs.txt`. With the argument `slow` it then sleeps for 1 s, so
/// that faults also hit running jobs.
const RECORD_SCRIPT: &str =
    "#!/bin/sh\necho \"$SUPAWORKER_JOB_ID\" >> runs.txt\n[ \"$1\" = slow ] && sleep 1\necho done\n";

const ACTIONS: &str = r#"
[actions.record]
program = "./record.sh"
timeout = "30s"

[actions.slow]
program = "./record.sh"
args = ["slow"]
timeout = "30s"
"#;

/// Time between two inserted jobs.
const INSERT_PERIOD: Duration = Duration::from_millis(200);

/// Time between two RSS samples.
const RSS_PERIOD: Duration = Duration::from_secs(10);

/// Hang guard for the backlog to drain once the faults stop.
const DRAIN_GUARD: Duration = Duration::from_secs(300);

/// Allowed growth of the last-quarter median RSS over the first-quarter median: a factor
/// plus a constant, so that allocator noise on a small heap does not count as a leak.
const RSS_GROWTH_FACTOR: f64 = 1.25;
const RSS_GROWTH_KIB: f64 = 4096.0;

/// The faults the soak picks from, with equal weight.
#[derive(Debug, Clone, Copy)]
enum Fault {
    RestError,
    RestDropAfterCommit,
    RestDelay,
    SocketDrop,
    SocketClose1000,
    SocketClose1001,
    SocketClose1012,
    ConnectionsRefused,
    HeartbeatsUnanswered,
    DeliveryStalled,
    PhxError,
    PhxClose,
    TokenExpired,
    NotInPublication,
    ServerRestart,
    Deploy,
    ServerRequestedDisconnect,
    CdcRestart,
    TransientError,
    RateLimited,
}

const FAULTS: [Fault; 20] = [
    Fault::RestError,
    Fault::RestDropAfterCommit,
    Fault::RestDelay,
    Fault::SocketDrop,
    Fault::SocketClose1000,
    Fault::SocketClose1001,
    Fault::SocketClose1012,
    Fault::ConnectionsRefused,
    Fault::HeartbeatsUnanswered,
    Fault::DeliveryStalled,
    Fault::PhxError,
    Fault::PhxClose,
    Fault::TokenExpired,
    Fault::NotInPublication,
    Fault::ServerRestart,
    Fault::Deploy,
    Fault::ServerRequestedDisconnect,
    Fault::CdcRestart,
    Fault::TransientError,
    Fault::RateLimited,
];

/// Picks one of the REST errors the gateway or PostgREST can return. None of them touches
/// the database.
fn random_rest_error() -> RestFault {
    let errors = [
        RestFault::ProjectPaused,
        RestFault::GatewayTimeout,
        RestFault::BadGateway,
        RestFault::CloudflareUnknown,
        RestFault::DatabaseUnavailable { retry_after: 1 },
        RestFault::SchemaCacheUnavailable { retry_after: 1 },
        RestFault::PoolTimeout,
        RestFault::StatementTimeout,
    ];
    errors.choose(&mut rand::rng()).unwrap().clone()
}

/// Injects `fault` and, for faults that last, waits and ends it.
async fn inject(stack: &Stack, fault: Fault) {
    let realtime = stack.emulator.realtime();
    let rest = stack.emulator.rest_faults();
    let count = rand::rng().random_range(1..=3);
    match fault {
        Fault::RestError => rest.inject(random_rest_error(), count, None),
        Fault::RestDropAfterCommit => rest.drop_after_commit(count),
        Fault::RestDelay => rest.delay(Duration::from_millis(1500), count, None),
        Fault::SocketDrop => realtime.drop_all_sockets(None),
        Fault::SocketClose1000 => realtime.drop_all_sockets(Some(1000)),
        Fault::SocketClose1001 => realtime.drop_all_sockets(Some(1001)),
        Fault::SocketClose1012 => realtime.drop_all_sockets(Some(1012)),
        Fault::ConnectionsRefused => {
            let drop_sockets = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                realtime.drop_all_sockets(None);
            };
            tokio::join!(
                stack.emulator.refuse_connections(Duration::from_secs(3)),
                drop_sockets
            );
        }
        Fault::HeartbeatsUnanswered => {
            realtime.pause_heartbeats(true);
            tokio::time::sleep(Duration::from_secs(5)).await;
            realtime.pause_heartbeats(false);
        }
        Fault::DeliveryStalled => {
            realtime.stall_delivery(true);
            tokio::time::sleep(Duration::from_secs(4)).await;
            realtime.stall_delivery(false);
        }
        Fault::PhxError => realtime.push_phx_error(Some("channel_crash")),
        Fault::PhxClose => realtime.push_phx_close(),
        Fault::TokenExpired => realtime.expire_tokens(),
        Fault::NotInPublication => {
            // The rejoin fails with "Unable to subscribe", and the worker retries only after
            // a minute unless a later fault reconnects it sooner.
            realtime.set_not_in_publication(true);
            realtime.push_phx_error(None);
            tokio::time::sleep(Duration::from_secs(3)).await;
            realtime.set_not_in_publication(false);
        }
        Fault::ServerRestart => {
            let down_for = Duration::from_millis(rand::rng().random_range(500..3000));
            stack.emulator.restart(down_for).await;
        }
        Fault::Deploy => {
            realtime.deploy();
            tokio::time::sleep(Duration::from_secs(2)).await;
            realtime.set_restarting(false);
        }
        Fault::ServerRequestedDisconnect => realtime.server_requested_disconnect(),
        Fault::CdcRestart => realtime.cdc_restart(Duration::from_secs(2)),
        Fault::TransientError => {
            realtime.transient_error("Too many database timeouts", Duration::from_secs(1))
        }
        Fault::RateLimited => {
            realtime.set_rate_limited(true);
            tokio::time::sleep(Duration::from_secs(4)).await;
            realtime.set_rate_limited(false);
        }
    }
}

/// Inserts a job every [`INSERT_PERIOD`] over its own database connection until `stop`.
async fn insert_jobs(database_url: String, ids: Arc<Mutex<Vec<i64>>>, stop: CancellationToken) {
    let (db, connection) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls)
        .await
        .expect("connect the inserter to the test database");
    tokio::spawn(connection);
    let mut ticker = tokio::time::interval(INSERT_PERIOD);
    while !stop.is_cancelled() {
        ticker.tick().await;
        let action = if rand::rng().random_bool(0.2) {
            "slow"
        } else {
            "record"
        };
        let row = db
            .query_one(
                "insert into jobs (action, payload) values ($1, $2::text::jsonb) returning id",
                &[&action, &json!({}).to_string()],
            )
            .await
            .expect("insert a job");
        ids.lock().unwrap().push(row.get(0));
    }
}

/// Records `(seconds since start, VmRSS in KiB)` of process `pid` every [`RSS_PERIOD`],
/// starting one period in so that start-up is not sampled, until `stop`.
async fn sample_rss(pid: u32, samples: Arc<Mutex<Vec<(u64, u64)>>>, stop: CancellationToken) {
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval_at(started + RSS_PERIOD, RSS_PERIOD);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("read the worker's /proc status");
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS line in /proc status");
        samples
            .lock()
            .unwrap()
            .push((started.elapsed().as_secs(), kib));
    }
}

fn median(values: &[u64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) as f64 / 2.0
    } else {
        sorted[middle] as f64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for SOAK_MINUTES (default 30); run with --ignored"]
async fn soak_under_random_faults() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .map(|value| value.parse().expect("SOAK_MINUTES must be a number"))
        .unwrap_or(30.0);
    let duration = Duration::from_secs_f64(minutes * 60.0);

    let stack = Stack::start().await;
    let scripts = Scripts::new();
    scripts.write("record.sh", RECORD_SCRIPT, true);
    scripts.write("actions.toml", ACTIONS, false);
    let mut env = stack.worker_env("soak-1", &scripts.path());
    env.insert(
        "SUPAWORKER_ACTIONS_FILE".into(),
        scripts.path().join("actions.toml").display().to_string(),
    );
    env.insert("SUPAWORKER_CONCURRENCY".into(), "4".into());
    env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "2s".into());
    env.insert("SUPAWORKER_HEARTBEAT_INTERVAL".into(), "2s".into());
    env.insert("SUPAWORKER_REQUEST_TIMEOUT".into(), "5s".into());
    env.insert("RUST_LOG".into(), "warn".into());
    let worker = WorkerProcess::spawn(&env);

    let ids = Arc::new(Mutex::new(Vec::new()));
    let stop_inserts = CancellationToken::new();
    let inserter = tokio::spawn(insert_jobs(
        stack.emulator.database_url().to_string(),
        ids.clone(),
        stop_inserts.clone(),
    ));

    let started = tokio::time::Instant::now();
    let deadline = started + duration;
    let rss = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample_rss(
        worker.child.id().expect("the worker is running"),
        rss.clone(),
        stop_inserts.clone(),
    ));
    let mut faults: BTreeMap<String, u32> = BTreeMap::new();
    while tokio::time::Instant::now() < deadline {
        let fault = *FAULTS.choose(&mut rand::rng()).unwrap();
        *faults.entry(format!("{fault:?}")).or_default() += 1;
        inject(&stack, fault).await;
        let pause = rand::rng().random_range(2000..6000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }

    stop_inserts.cancel();
    inserter.await.expect("the inserter task ends");
    sampler.await.expect("the RSS sampler ends");
    let rss: Vec<(u64, u64)> = rss.lock().unwrap().clone();
    stack.emulator.rest_faults().clear();
    let ids = ids.lock().unwrap().clone();
    stack.wait_finished(&ids, DRAIN_GUARD).await;
    let drained_after = started.elapsed().as_secs() - duration.as_secs();

    let not_successful = stack.not_successful(&ids).await;
    let running = stack.count("running").await;
    let runs = scripts.runs();
    let exit = worker.stop().await;

    let total: u32 = faults.values().sum();
    println!("soak: {minutes} min, {} jobs, {total} faults, backlog drained {drained_after} s after the faults stopped", ids.len());
    for (fault, count) in &faults {
        println!("  fault {fault}: {count}");
    }
    println!("  RSS (seconds, KiB): {rss:?}");
    let quarter = (rss.len() / 4).max(1);
    let samples: Vec<u64> = rss.iter().map(|(_, kib)| *kib).collect();
    let first = median(&samples[..quarter]);
    let last = median(&samples[samples.len() - quarter..]);
    println!("  RSS median: first quarter {first} KiB, last quarter {last} KiB");

    assert_eq!(not_successful, [], "jobs lost or failed");
    assert_eq!(running, 0, "jobs left running");
    assert_each_ran_once(&runs, &ids);
    assert_eq!(exit, 0, "worker exit status");
    assert!(
        last <= first * RSS_GROWTH_FACTOR + RSS_GROWTH_KIB,
        "RSS grew from a median of {first} KiB to {last} KiB"
    );
}
