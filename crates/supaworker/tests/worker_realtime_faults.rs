//! The worker binary through every Realtime fault the emulator can inject: jobs inserted
//! before, during and after the fault all succeed, each exactly once. The sweep (every 2 s
//! here) covers the gap while the channel is down or silent, and Realtime delivers again once
//! the channel is live.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::{assert_each_ran_once, scrape_metric, Scripts, Stack, WorkerProcess, PATIENCE};

/// Appends the job id to `runs.txt`, so a second run of a job shows as a duplicate line.
const RECORD_SCRIPT: &str = "#!/bin/sh\necho \"$SUPAWORKER_JOB_ID\" >> runs.txt\n";

/// Records the run, then waits until the test creates the file `release`.
const HOLD_SCRIPT: &str = "#!/bin/sh\necho \"$SUPAWORKER_JOB_ID\" >> runs.txt\nwhile [ ! -e release ]; do sleep 0.05; done\n";

/// Records the run and writes its arguments to `args-<job id>`.
const TAGGED_SCRIPT: &str = "#!/bin/sh\necho \"$SUPAWORKER_JOB_ID\" >> runs.txt\necho \"$@\" > \"args-$SUPAWORKER_JOB_ID\"\n";

const ACTIONS: &str = r#"
[actions.record]
program = "./record.sh"
timeout = "30s"

[actions.hold]
program = "./hold.sh"
timeout = "5m"

[actions.tagged]
program = "./tagged.sh"
args = [{ field = "tag", option = "--tag" }]
timeout = "30s"

[actions.tagged.fields.tag]
type = "string"
required = true
"#;

/// Sweep period of these tests.
const SWEEP_INTERVAL: &str = "2s";

/// Hang guard for the jobs inserted during a fault. The expected bound is the reconnect
/// time (the backoff cap of 10 s plus 20 % jitter) plus one sweep interval (2 s plus 10 %
/// jitter), about 14 s. The guard is three times that, for a loaded machine.
const RECOVERY_GUARD: Duration = Duration::from_secs(45);

/// Jobs inserted in each phase of a scenario.
const JOBS_PER_PHASE: usize = 3;

/// The one-time warning of the dispatcher when a sweep claims a job that Realtime should have
/// announced.
const MISSED_WARNING: &str = "sweep found a pending job that Realtime never announced";

fn scripts() -> Scripts {
    let scripts = Scripts::new();
    scripts.write("record.sh", RECORD_SCRIPT, true);
    scripts.write("hold.sh", HOLD_SCRIPT, true);
    scripts.write("tagged.sh", TAGGED_SCRIPT, true);
    scripts.write("actions.toml", ACTIONS, false);
    scripts
}

fn env(stack: &Stack, scripts: &Scripts) -> HashMap<String, String> {
    let mut env = stack.worker_env("faults-1", &scripts.path());
    env.insert(
        "SUPAWORKER_ACTIONS_FILE".into(),
        scripts.path().join("actions.toml").display().to_string(),
    );
    env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), SWEEP_INTERVAL.into());
    env.insert("SUPAWORKER_HEALTH_ADDR".into(), "127.0.0.1:0".into());
    env
}

/// Returns the log lines whose message starts with `prefix`.
fn logged_prefix(worker: &WorkerProcess, prefix: &str) -> Vec<Value> {
    worker
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|line| {
            line.get("message")
                .and_then(Value::as_str)
                .is_some_and(|message| message.starts_with(prefix))
        })
        .cloned()
        .collect()
}

/// Polls `/metrics` until the counter `name` reaches `at_least`.
async fn wait_metric(base: &str, name: &str, at_least: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = scrape_metric(base, name).await;
        if value >= at_least {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {value}, expected at least {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Inserts one job at a time until one is claimed through a Realtime hint, which shows that
/// the channel is live and delivers again. Returns every job inserted.
async fn wait_realtime_delivery(stack: &Stack, worker: &WorkerProcess) -> Vec<i64> {
    let deadline = tokio::time::Instant::now() + RECOVERY_GUARD;
    let mut probes = Vec::new();
    loop {
        let id = stack.insert("record", json!({})).await;
        probes.push(id);
        stack.wait_finished(&[id], PATIENCE).await;
        if worker.claims_of(id).iter().any(|via| via == "realtime") {
            return probes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no job was claimed through Realtime after the fault; log:\n{}",
            worker.dump()
        );
    }
}

/// The faults of the scenario matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Sockets closed with this code, or dropped without a close frame when `None`.
    SocketClosed(Option<u16>),
    /// Sockets dropped, then new connections refused for a few seconds.
    ConnectionsRefused,
    /// Heartbeats unanswered for a few seconds, with a 1 s heartbeat period.
    HeartbeatsUnanswered,
    /// Event delivery stalled while heartbeats succeed.
    DeliveryStalled,
    /// `phx_error` on the channel, with or without a reason.
    PhxError(Option<&'static str>),
    PhxClose,
    /// `Token has expired` followed by `phx_close`.
    TokenExpired,
    /// The whole HTTP server down for a few seconds; the database keeps running.
    ServerRestart,
    /// A deploy: joins rejected with `RealtimeRestarting`, sockets closed with 1012.
    Deploy,
    /// "Server requested disconnect" on the channel, then close 1012.
    ServerRequestedDisconnect,
    /// Events dropped for a while, then a repeated `Subscribed to PostgreSQL`.
    CdcRestart,
    /// A transient `postgres_changes` error, then a repeated `Subscribed to PostgreSQL`.
    TransientError,
    /// Events silently dropped, as under the tenant's event rate limit.
    RateLimited,
}

impl Fault {
    /// Returns whether events are lost while the channel stays live, with no readiness message to
    /// mark the gap.
    fn loses_silently(self) -> bool {
        matches!(self, Fault::DeliveryStalled | Fault::RateLimited)
    }
}

/// Keeps the silent-loss faults on while the jobs inserted during them grow older than the
/// dispatcher's 2 s grace for Realtime events, then frees the single slot (held by a `hold`
/// job) so that a sweep claims them.
async fn lose_silently(stack: &Stack, scripts: &Scripts, set: impl Fn(bool)) -> Vec<i64> {
    set(true);
    let ids = stack.insert_many("record", JOBS_PER_PHASE).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    scripts.write("release", "", false);
    stack.wait_finished(&ids, RECOVERY_GUARD).await;
    set(false);
    ids
}

/// Injects `fault`, inserts the jobs of the "during" phase while it lasts, ends it, and
/// returns their ids.
async fn inject(
    stack: &Stack,
    scripts: &Scripts,
    worker: &WorkerProcess,
    fault: Fault,
) -> Vec<i64> {
    let realtime = stack.emulator.realtime();
    match fault {
        Fault::SocketClosed(code) => {
            realtime.drop_all_sockets(code);
            stack.insert_many("record", JOBS_PER_PHASE).await
        }
        Fault::ConnectionsRefused => {
            let during = async {
                // Lets `refuse_connections` close the listener before the sockets drop.
                tokio::time::sleep(Duration::from_millis(300)).await;
                realtime.drop_all_sockets(None);
                stack.insert_many("record", JOBS_PER_PHASE).await
            };
            let ((), ids) = tokio::join!(
                stack.emulator.refuse_connections(Duration::from_secs(4)),
                during
            );
            let refused = worker
                .events("Realtime connection failed; reconnecting after backoff")
                .into_iter()
                .filter(|line| {
                    line["error"]
                        .as_str()
                        .is_some_and(|error| error.starts_with("websocket connect failed"))
                })
                .count();
            assert!(refused > 0, "no refused connect; log:\n{}", worker.dump());
            ids
        }
        Fault::HeartbeatsUnanswered => {
            realtime.pause_heartbeats(true);
            let ids = stack.insert_many("record", JOBS_PER_PHASE).await;
            worker
                .wait_event("heartbeat reply missing when the next heartbeat was due; reconnecting")
                .await;
            realtime.pause_heartbeats(false);
            ids
        }
        Fault::DeliveryStalled => {
            lose_silently(stack, scripts, |on| realtime.stall_delivery(on)).await
        }
        Fault::PhxError(reason) => {
            realtime.push_phx_error(reason);
            stack.insert_many("record", JOBS_PER_PHASE).await
        }
        Fault::PhxClose => {
            realtime.push_phx_close();
            stack.insert_many("record", JOBS_PER_PHASE).await
        }
        Fault::TokenExpired => {
            realtime.expire_tokens();
            stack.insert_many("record", JOBS_PER_PHASE).await
        }
        Fault::ServerRestart => {
            let during = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                stack.insert_many("record", JOBS_PER_PHASE).await
            };
            let ((), ids) = tokio::join!(stack.emulator.restart(Duration::from_secs(3)), during);
            ids
        }
        Fault::Deploy => {
            realtime.deploy();
            let ids = stack.insert_many("record", JOBS_PER_PHASE).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            realtime.set_restarting(false);
            ids
        }
        Fault::ServerRequestedDisconnect => {
            realtime.server_requested_disconnect();
            stack.insert_many("record", JOBS_PER_PHASE).await
        }
        Fault::CdcRestart => {
            realtime.cdc_restart(Duration::from_secs(2));
            stack.insert_many("record", JOBS_PER_PHASE).await
        }
        Fault::TransientError => {
            realtime.transient_error("Too many database timeouts", Duration::from_secs(1));
            stack.insert_many("record", JOBS_PER_PHASE).await
        }
        Fault::RateLimited => {
            lose_silently(stack, scripts, |on| realtime.set_rate_limited(on)).await
        }
    }
}

/// Runs jobs before, during and after `fault` and checks that each succeeds exactly once,
/// that Realtime delivers again afterwards, and that the missed-delivery warning appears only
/// for faults that silently lose events on a live channel.
async fn survives(fault: Fault) {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts);
    if fault == Fault::HeartbeatsUnanswered {
        env.insert("SUPAWORKER_HEARTBEAT_INTERVAL".into(), "1s".into());
    }
    if fault.loses_silently() {
        env.insert("SUPAWORKER_CONCURRENCY".into(), "1".into());
    }
    let worker = WorkerProcess::spawn(&env);
    let base = worker.health_url().await;
    worker.wait_event("Realtime subscription live").await;

    let mut before = stack.insert_many("record", JOBS_PER_PHASE).await;
    stack.wait_finished(&before, PATIENCE).await;
    if fault.loses_silently() {
        let hold = stack.insert("hold", json!({})).await;
        stack.wait_status(hold, &["running"]).await;
        before.push(hold);
    }

    let readiness = worker.readiness_count();
    let during = inject(&stack, &scripts, &worker, fault).await;
    stack.wait_finished(&during, RECOVERY_GUARD).await;
    if !fault.loses_silently() {
        worker.wait_readiness_after(readiness).await;
    }

    let mut after = wait_realtime_delivery(&stack, &worker).await;
    let hints = scrape_metric(&base, "supaworker_realtime_hints_received_total").await;
    let more = stack.insert_many("record", JOBS_PER_PHASE).await;
    stack.wait_finished(&more, RECOVERY_GUARD).await;
    // Every job inserted once the channel is live again is announced, whichever path
    // claimed it.
    wait_metric(
        &base,
        "supaworker_realtime_hints_received_total",
        hints + JOBS_PER_PHASE as f64,
    )
    .await;
    after.extend(more);

    let all: Vec<i64> = [before, during.clone(), after].concat();
    assert_eq!(stack.not_successful(&all).await, [], "fault {fault:?}");
    assert_eq!(stack.count("running").await, 0, "fault {fault:?}");
    assert_each_ran_once(&scripts.runs(), &all);

    let silent_loss = fault.loses_silently();
    let missed = logged_prefix(&worker, MISSED_WARNING);
    if silent_loss {
        for id in &during {
            assert_eq!(worker.claims_of(*id), ["sweep"], "job {id} in {fault:?}");
        }
        assert_eq!(
            missed.len(),
            1,
            "warning logged once; log:\n{}",
            worker.dump()
        );
        assert_eq!(missed[0]["level"], "WARN", "{}", missed[0]);
        let count = scrape_metric(&base, "supaworker_jobs_missed_by_realtime_total").await;
        assert!(count >= 1.0, "missed_by_realtime is {count}");
    }
    assert_eq!(worker.stop().await, 0, "fault {fault:?}");
    if !silent_loss {
        assert_eq!(missed, Vec::<Value>::new(), "fault {fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_abrupt_drop() {
    survives(Fault::SocketClosed(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_close_1000() {
    survives(Fault::SocketClosed(Some(1000))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_close_1001() {
    survives(Fault::SocketClosed(Some(1001))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_close_1012() {
    survives(Fault::SocketClosed(Some(1012))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_refused_connections() {
    survives(Fault::ConnectionsRefused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_unanswered_heartbeats() {
    survives(Fault::HeartbeatsUnanswered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_delivery_stall() {
    survives(Fault::DeliveryStalled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_phx_error() {
    survives(Fault::PhxError(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_phx_error_channel_crash() {
    survives(Fault::PhxError(Some("channel_crash"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_phx_close() {
    survives(Fault::PhxClose).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_token_expiry() {
    survives(Fault::TokenExpired).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_server_restart() {
    survives(Fault::ServerRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_deploy() {
    survives(Fault::Deploy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_server_requested_disconnect() {
    survives(Fault::ServerRequestedDisconnect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_cdc_restart() {
    survives(Fault::CdcRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_transient_error() {
    survives(Fault::TransientError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_rate_limit() {
    survives(Fault::RateLimited).await;
}

/// Hang guard for the tests whose sweep timer is 60 s: a job that finishes within it was
/// found by a sweep that something other than the timer started.
const BEFORE_TIMER_SWEEP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_message_starts_sweep() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts);
    env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "60s".into());
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;
    let realtime = stack.emulator.realtime();

    // A repeated readiness message on a live channel: the events of the window are lost.
    let readiness = worker.readiness_count();
    realtime.cdc_restart(Duration::from_secs(2));
    let lost = stack.insert_many("record", JOBS_PER_PHASE).await;
    worker.wait_readiness_after(readiness).await;
    worker
        .wait_event("Realtime subscription re-created; changes may have been missed")
        .await;
    stack.wait_finished(&lost, BEFORE_TIMER_SWEEP).await;
    for id in &lost {
        assert_eq!(worker.claims_of(*id), ["sweep"], "job {id}");
    }

    // The first readiness message on a new socket after an abrupt drop.
    let readiness = worker.readiness_count();
    realtime.drop_all_sockets(None);
    let gap = stack.insert_many("record", JOBS_PER_PHASE).await;
    worker.wait_readiness_after(readiness).await;
    stack.wait_finished(&gap, BEFORE_TIMER_SWEEP).await;

    let all = [lost, gap].concat();
    assert_eq!(stack.not_successful(&all).await, []);
    assert_each_ran_once(&scripts.runs(), &all);
    // Jobs inserted before a readiness message are the gap it reports, not a miss.
    assert_eq!(logged_prefix(&worker, MISSED_WARNING), Vec::<Value>::new());
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unable_to_subscribe_falls_back_to_sweep() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let realtime = stack.emulator.realtime();
    realtime.set_not_in_publication(true);
    let worker = WorkerProcess::spawn(&env(&stack, &scripts));
    let base = worker.health_url().await;
    let message = "Realtime cannot subscribe to the jobs table";
    let error = logged_prefix_wait(&worker, message).await;
    assert_eq!(error["level"], "ERROR", "{error}");
    assert_eq!(
        error["fix"], "alter publication supabase_realtime add table public.jobs;",
        "{error}"
    );
    let wait_ms = error["wait_ms"].as_u64().expect("wait_ms field");
    assert!(wait_ms >= 30_000, "retry after {wait_ms} ms is not slow");

    let during = stack.insert_many("record", 2 * JOBS_PER_PHASE).await;
    stack.wait_finished(&during, RECOVERY_GUARD).await;
    for id in &during {
        assert_eq!(worker.claims_of(*id), ["sweep"], "job {id}");
    }
    assert_eq!(logged_prefix(&worker, message).len(), 1, "retried too soon");
    assert_eq!(
        scrape_metric(&base, "supaworker_realtime_subscribe_errors_total").await,
        1.0
    );

    // After the fix, a new connection subscribes at once.
    realtime.set_not_in_publication(false);
    realtime.drop_all_sockets(None);
    worker.wait_event("Realtime subscription live").await;
    let after = wait_realtime_delivery(&stack, &worker).await;

    let all = [during, after].concat();
    assert_eq!(stack.not_successful(&all).await, []);
    assert_each_ran_once(&scripts.runs(), &all);
    assert_eq!(logged_prefix(&worker, MISSED_WARNING), Vec::<Value>::new());
    assert_eq!(worker.stop().await, 0);
}

/// Waits for a log line whose message starts with `prefix` and returns the first.
async fn logged_prefix_wait(worker: &WorkerProcess, prefix: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(line) = logged_prefix(worker, prefix).into_iter().next() {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never logged {prefix:?}; log:\n{}",
            worker.dump()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_record_still_runs_job() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts);
    // Only Realtime can start the job within the test, so the claim follows the cut event.
    env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "60s".into());
    env.insert("RUST_LOG".into(), "info,supaworker::realtime=debug".into());
    let worker = WorkerProcess::spawn(&env);
    worker.wait_event("Realtime subscription live").await;

    // Realtime's limit is 1 MiB for the whole change. Above it, the event keeps only the
    // columns whose text is at most 64 bytes, so `payload` is left out.
    let padding = "x".repeat(1024 * 1024 + 1);
    let id = stack
        .insert(
            "tagged",
            json!({"tag": "from-the-claimed-row", "padding": padding}),
        )
        .await;
    stack.wait_finished(&[id], BEFORE_TIMER_SWEEP).await;

    worker
        .wait_event("change event record truncated by the server; the claim reads the full row")
        .await;
    assert_eq!(stack.not_successful(&[id]).await, []);
    assert_eq!(worker.claims_of(id), ["realtime"]);
    let args = std::fs::read_to_string(scripts.path().join(format!("args-{id}"))).unwrap();
    assert_eq!(args.trim(), "--tag=from-the-claimed-row");
    assert_each_ran_once(&scripts.runs(), &[id]);
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_not_counted_as_missed() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let backlog = stack.insert_many("record", 8).await;
    // Older than the 2 s grace by the time the worker claims them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut env = env(&stack, &scripts);
    env.insert("SUPAWORKER_CONCURRENCY".into(), "1".into());
    let worker = WorkerProcess::spawn(&env);
    let base = worker.health_url().await;
    worker.wait_event("Realtime subscription live").await;
    stack.wait_finished(&backlog, RECOVERY_GUARD).await;

    assert_eq!(stack.not_successful(&backlog).await, []);
    assert_each_ran_once(&scripts.runs(), &backlog);
    assert_eq!(
        scrape_metric(&base, "supaworker_jobs_missed_by_realtime_total").await,
        0.0
    );
    assert_eq!(logged_prefix(&worker, MISSED_WARNING), Vec::<Value>::new());
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hint_burst_keeps_socket_reading() {
    const BURST: usize = 2000;
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts);
    env.insert("SUPAWORKER_CONCURRENCY".into(), "1".into());
    env.insert("SUPAWORKER_HEARTBEAT_INTERVAL".into(), "1s".into());
    let worker = WorkerProcess::spawn(&env);
    let base = worker.health_url().await;
    worker.wait_event("Realtime subscription live").await;

    // The only slot stays busy while the burst arrives, so every hint waits on job handling.
    let hold = stack.insert("hold", json!({})).await;
    stack.wait_status(hold, &["running"]).await;
    let burst = stack.insert_many("record", BURST).await;
    let announced = wait_hints(&base, BURST as f64 + 1.0).await;
    scripts.write("release", "", false);
    stack.wait_finished(&burst, Duration::from_secs(600)).await;

    let all = [vec![hold], burst].concat();
    assert_eq!(stack.not_successful(&all).await, []);
    assert_each_ran_once(&scripts.runs(), &all);
    // No reconnect and no heartbeat time-out: the reader kept reading heartbeat replies
    // while the burst waited for the slot.
    assert_eq!(
        scrape_metric(&base, "supaworker_realtime_reconnects_total").await,
        0.0
    );
    assert_eq!(
        scrape_metric(&base, "supaworker_realtime_heartbeat_timeouts_total").await,
        0.0
    );
    let dropped = scrape_metric(&base, "supaworker_realtime_hints_dropped_total").await;
    println!("burst of {BURST}: {announced} hints received, {dropped} of them dropped");
    assert_eq!(worker.stop().await, 0);
}

/// Waits until the worker has received `total` hints (dropped ones included), and returns
/// the count.
async fn wait_hints(base: &str, total: f64) -> f64 {
    wait_metric(base, "supaworker_realtime_hints_received_total", total).await
}
