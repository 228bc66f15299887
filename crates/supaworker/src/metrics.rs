//! Prometheus metrics: the metric names and help texts, the process-wide recorder, the
//! calls that the job, dispatch, rescue and REST code make, and the copy of the worker's
//! atomic counters into the registry at scrape time.
//!
//! The calls go through the `metrics` facade, so they cost nothing when no recorder is
//! installed (no `SUPAWORKER_HEALTH_ADDR`). Per-action labels use the action table's names.
//! A job whose action is not in the table is counted under `action="unknown"`, so a bad row
//! cannot add label values without bound.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::actions::ActionTable;
use crate::job::JobEnd;
use crate::worker::WorkerStats;

/// Jobs this worker claimed, by `action`.
pub const JOBS_CLAIMED: &str = "supaworker_jobs_claimed_total";
/// Jobs that ended on this worker, by `action` and `outcome`.
pub const JOBS_FINISHED: &str = "supaworker_jobs_finished_total";
/// Jobs the rescuer finished for a worker that was gone, by `action` and `outcome`.
pub const JOBS_RESCUED: &str = "supaworker_jobs_rescued_total";
/// Jobs running on this worker now.
pub const JOBS_RUNNING: &str = "supaworker_jobs_running";
/// Time from claim to end of a job, by `action`.
pub const JOB_RUN_DURATION: &str = "supaworker_job_run_duration_seconds";
/// Time from a job's `created_at` to its claim, by `action`.
pub const JOB_PICKUP_LATENCY: &str = "supaworker_job_pickup_latency_seconds";
/// PostgREST requests sent, retries included.
pub const REST_REQUESTS: &str = "supaworker_rest_requests_total";
/// PostgREST requests that failed, by error `class`.
pub const REST_ERRORS: &str = "supaworker_rest_errors_total";

const REALTIME_CONNECTED: &str = "supaworker_realtime_connected";
const REALTIME_SUBSCRIBED: &str = "supaworker_realtime_subscribed";
const REALTIME_RECONNECTS: &str = "supaworker_realtime_reconnects_total";
const REALTIME_REJOINS: &str = "supaworker_realtime_rejoins_total";
const REALTIME_SUBSCRIBE_ERRORS: &str = "supaworker_realtime_subscribe_errors_total";
const REALTIME_HEARTBEAT_RTT: &str = "supaworker_realtime_heartbeat_rtt_seconds";
const REALTIME_HEARTBEAT_TIMEOUTS: &str = "supaworker_realtime_heartbeat_timeouts_total";
const REALTIME_HINTS_RECEIVED: &str = "supaworker_realtime_hints_received_total";
const REALTIME_HINTS_DROPPED: &str = "supaworker_realtime_hints_dropped_total";
const SWEEPS: &str = "supaworker_sweeps_total";
const SWEEP_ERRORS: &str = "supaworker_sweep_errors_total";
const MISSED_BY_REALTIME: &str = "supaworker_jobs_missed_by_realtime_total";
const CLAIMS_LOST: &str = "supaworker_claims_lost_total";

/// Bucket bounds of the run duration, in seconds: jobs take from a second to hours.
const RUN_BUCKETS: [f64; 14] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
/// Bucket bounds of the pickup latency, in seconds: Realtime wake-ups take well under a
/// second, sweeps up to the sweep interval, and a backlog longer.
const PICKUP_BUCKETS: [f64; 13] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process on the first call and returns the
/// handle that renders it. When another recorder is already installed (an embedding
/// program set its own), the handle still renders the scrape-time metrics but not the
/// ones counted through the facade.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(JOB_RUN_DURATION.into()), &RUN_BUCKETS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(JOB_PICKUP_LATENCY.into()),
                        &PICKUP_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("metrics recorder not installed, another one was set first; /metrics lacks the job counters");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(JOBS_CLAIMED, Unit::Count, "Jobs this worker claimed.");
    describe_counter!(
        JOBS_FINISHED,
        Unit::Count,
        "Jobs that ended on this worker; outcome is succeeded, failed, requeued, lost or unrecorded."
    );
    describe_counter!(
        JOBS_RESCUED,
        Unit::Count,
        "Jobs left running by a stopped worker that this worker finished; outcome is failed or requeued."
    );
    describe_gauge!(JOBS_RUNNING, Unit::Count, "Jobs running on this worker.");

    describe_histogram!(
        JOB_RUN_DURATION,
        Unit::Seconds,
        "Time from claim to the end of a job."
    );
    describe_histogram!(
        JOB_PICKUP_LATENCY,
        Unit::Seconds,
        "Time from a job's created_at to its claim, on the database's and this machine's clocks."
    );

    describe_counter!(
        REST_REQUESTS,
        Unit::Count,
        "PostgREST requests sent, retries included."
    );
    describe_counter!(
        REST_ERRORS,
        Unit::Count,
        "PostgREST requests that failed; class is transient, ambiguous, auth, schema or rejected."
    );

    describe_gauge!(
        REALTIME_CONNECTED,
        "1 while the Realtime websocket is open."
    );
    describe_gauge!(
        REALTIME_SUBSCRIBED,
        "1 while the channel is subscribed (\"Subscribed to PostgreSQL\" received since the last join)."
    );
    describe_counter!(
        REALTIME_RECONNECTS,
        Unit::Count,
        "Realtime websocket connect attempts after the first."
    );
    describe_counter!(
        REALTIME_REJOINS,
        Unit::Count,
        "Channel joins after the first."
    );
    describe_counter!(
        REALTIME_SUBSCRIBE_ERRORS,
        Unit::Count,
        "\"Unable to subscribe\" and filter errors; the usual cause is a jobs table missing from the supabase_realtime publication."
    );
    describe_gauge!(
        REALTIME_HEARTBEAT_RTT,
        Unit::Seconds,
        "Round trip of the last answered Realtime heartbeat."
    );
    describe_counter!(
        REALTIME_HEARTBEAT_TIMEOUTS,
        Unit::Count,
        "Heartbeats unanswered when the next one was due; each closes the socket."
    );
    describe_counter!(
        REALTIME_HINTS_RECEIVED,
        Unit::Count,
        "Change events that carried a job id."
    );
    describe_counter!(
        REALTIME_HINTS_DROPPED,
        Unit::Count,
        "Change events dropped because the hint queue was full; the sweep finds those jobs."
    );

    describe_counter!(SWEEPS, Unit::Count, "Sweeps of pending jobs started.");
    describe_counter!(
        SWEEP_ERRORS,
        Unit::Count,
        "Sweeps that failed after their retries."
    );
    describe_counter!(
        MISSED_BY_REALTIME,
        Unit::Count,
        "Jobs a sweep claimed that Realtime never announced while subscribed."
    );
    describe_counter!(CLAIMS_LOST, Unit::Count, "Claims another worker won.");
}

/// Returns the label value for `action`: its name when the action table has it, else `unknown`.
fn action_label(actions: &ActionTable, action: &str) -> String {
    match actions.get(action) {
        Some(known) => known.name.clone(),
        None => "unknown".to_string(),
    }
}

/// Returns the `outcome` label of a job end.
pub fn outcome_label(end: JobEnd) -> &'static str {
    match end {
        JobEnd::Succeeded => "succeeded",
        JobEnd::Failed => "failed",
        JobEnd::Requeued => "requeued",
        JobEnd::Lost => "lost",
        JobEnd::Unrecorded => "unrecorded",
    }
}

/// Counts a won claim and its pickup latency, and one more running job.
pub fn job_claimed(actions: &ActionTable, action: &str, pickup: Option<Duration>) {
    let action = action_label(actions, action);
    counter!(JOBS_CLAIMED, "action" => action.clone()).increment(1);
    gauge!(JOBS_RUNNING).increment(1.0);
    if let Some(pickup) = pickup {
        histogram!(JOB_PICKUP_LATENCY, "action" => action).record(pickup.as_secs_f64());
    }
}

/// Counts the end of a claimed job and its run duration, and one less running job.
pub fn job_finished(actions: &ActionTable, action: &str, end: JobEnd, duration: Duration) {
    let action = action_label(actions, action);
    counter!(JOBS_FINISHED, "action" => action.clone(), "outcome" => outcome_label(end))
        .increment(1);
    histogram!(JOB_RUN_DURATION, "action" => action).record(duration.as_secs_f64());
    gauge!(JOBS_RUNNING).decrement(1.0);
}

/// Counts a job the rescuer finished.
pub fn job_rescued(actions: &ActionTable, action: &str, requeued: bool) {
    let outcome = if requeued { "requeued" } else { "failed" };
    counter!(JOBS_RESCUED, "action" => action_label(actions, action), "outcome" => outcome)
        .increment(1);
}

/// Counts a PostgREST request.
pub fn rest_request() {
    counter!(REST_REQUESTS).increment(1);
}

/// Counts a failed PostgREST request by its error class.
pub fn rest_error(class: &'static str) {
    counter!(REST_ERRORS, "class" => class).increment(1);
}

/// Copies the worker's atomic counters into the registry; called before each render.
pub fn export_stats(stats: &WorkerStats) {
    let realtime = stats.realtime.snapshot();
    let as_gauge = |flag: bool| if flag { 1.0 } else { 0.0 };
    gauge!(REALTIME_CONNECTED).set(as_gauge(realtime.connected));
    gauge!(REALTIME_SUBSCRIBED).set(as_gauge(realtime.live));
    counter!(REALTIME_RECONNECTS).absolute(realtime.reconnects);
    counter!(REALTIME_REJOINS).absolute(realtime.rejoins);
    counter!(REALTIME_SUBSCRIBE_ERRORS).absolute(realtime.subscribe_errors);
    counter!(REALTIME_HEARTBEAT_TIMEOUTS).absolute(realtime.heartbeat_timeouts);
    counter!(REALTIME_HINTS_RECEIVED).absolute(realtime.hints_received);
    counter!(REALTIME_HINTS_DROPPED).absolute(realtime.hints_dropped);
    if realtime.heartbeat_replies > 0 {
        gauge!(REALTIME_HEARTBEAT_RTT).set(realtime.heartbeat_rtt_micros as f64 / 1e6);
    }

    let dispatch = &stats.dispatch;
    let load = |value: &std::sync::atomic::AtomicU64| value.load(Ordering::Relaxed);
    counter!(SWEEPS).absolute(load(&dispatch.sweeps));
    counter!(SWEEP_ERRORS).absolute(load(&dispatch.sweep_errors));
    counter!(MISSED_BY_REALTIME).absolute(load(&dispatch.missed_by_realtime));
    counter!(CLAIMS_LOST).absolute(load(&dispatch.claims_lost));
}

/// Renders the registry in the Prometheus text format (version 0.0.4).
pub fn render(handle: &PrometheusHandle, stats: &WorkerStats) -> String {
    export_stats(stats);
    handle.run_upkeep();
    handle.render()
}
