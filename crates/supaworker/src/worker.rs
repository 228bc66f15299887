//! Wires the roles together for `supaworker run`: the start-up rescue, the Realtime
//! subscriber, the dispatcher, the periodic rescuer and the shutdown stages.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::{Config, TWILIO_VARIABLES};
use crate::dispatch::{DispatchStats, Dispatcher};
use crate::health::{self, Readiness};
use crate::job::{JobContext, JobStats};
use crate::postgrest::Rest;
use crate::realtime::{self, RealtimeConfig, RealtimeStats};
use crate::rescue::{self, Pass, RescueStats};
use crate::runner::Redactor;
use crate::shutdown::{Shutdown, EXIT_FATAL, EXIT_OK, EXIT_UNRECORDED};

/// Capacity of the hint queue between the Realtime reader and the dispatcher. When it is
/// full, hints are dropped and counted; the sweep finds those jobs.
const HINT_QUEUE: usize = 1024;

/// Everything a running worker counts, for telemetry and tests.
#[derive(Debug, Default, Clone)]
pub struct WorkerStats {
    pub jobs: Arc<JobStats>,
    pub dispatch: Arc<DispatchStats>,
    pub realtime: Arc<RealtimeStats>,
    pub rescue: Arc<RescueStats>,
}

/// Lists the secrets the worker holds, which are redacted from everything it stores or logs.
pub fn secrets(config: &Config) -> Vec<String> {
    let mut secrets = vec![config.api_key.expose().to_string()];
    for name in TWILIO_VARIABLES {
        if name == "TWILIO_FROM" {
            continue;
        }
        if let Some(value) = config.twilio.get(name) {
            secrets.push(value.clone());
        }
    }
    secrets.retain(|s| s.len() >= 4);
    secrets
}

/// Runs the worker until a shutdown completes. Returns the process exit status.
pub async fn run(config: Config, shutdown: Shutdown, stats: WorkerStats) -> i32 {
    let config = Arc::new(config);
    log_start(&config);
    let rest = Rest::new(
        &config.supabase_url,
        config.api_key.clone(),
        config.request_timeout,
    );
    let ctx = Arc::new(JobContext {
        rest: rest.clone(),
        config: config.clone(),
        redactor: Arc::new(Redactor::new(secrets(&config))),
        stats: stats.jobs.clone(),
    });

    // The endpoint stays up through the drain and stops when this function returns.
    let health_stop = tokio_util::sync::CancellationToken::new();
    let _health_guard = health_stop.clone().drop_guard();
    if let Some(addr) = config.health_addr {
        let readiness = Readiness::for_config(&config);
        let stop_claiming = shutdown.stop_claiming.clone();
        match health::start(addr, stats.clone(), readiness, stop_claiming, health_stop).await {
            Ok((bound, _task)) => tracing::info!(addr = %bound, "health endpoint listening"),
            Err(error) => {
                tracing::error!(error = %error, "health endpoint not started, stopping");
                return EXIT_FATAL;
            }
        }
    }

    // The start-up pass takes every running job of this instance id, so it must finish
    // before this process claims anything.
    match rescue::rescue_pass(
        &rest,
        &config,
        &stats.rescue,
        Pass::StartUp,
        &HashSet::new(),
    )
    .await
    {
        Ok(count) => tracing::info!(rescued = count, "start-up rescue finished"),
        Err(error) => {
            tracing::error!(error = %error, error_class = error.class(), "start-up rescue failed; jobs of this instance stay running until the periodic rescue takes them")
        }
    }

    let (hint_tx, hint_rx) = mpsc::channel(HINT_QUEUE);
    let (ready_tx, ready_rx) = watch::channel(0u64);
    let realtime_task = if config.realtime_enabled {
        let mut realtime_config = RealtimeConfig::new(
            config.supabase_url.clone(),
            config.api_key.expose().to_string(),
            "public".into(),
            "jobs".into(),
        );
        realtime_config.heartbeat_interval = config.heartbeat_interval;
        Some(realtime::spawn(
            realtime_config,
            hint_tx,
            ready_tx,
            stats.realtime.clone(),
            shutdown.stop_claiming.clone(),
        ))
    } else {
        tracing::warn!(
            "realtime disabled by SUPAWORKER_REALTIME=off; jobs are found by the sweep only"
        );
        drop(hint_tx);
        drop(ready_tx);
        None
    };

    let rescuer = tokio::spawn(rescue::run_periodic(
        rest.clone(),
        config.clone(),
        stats.rescue.clone(),
        shutdown.stop_claiming.clone(),
    ));

    let dispatcher = Dispatcher {
        ctx,
        hints: hint_rx,
        ready: ready_rx,
        stats: stats.dispatch.clone(),
        realtime: stats.realtime.clone(),
        stop_claiming: shutdown.stop_claiming.clone(),
        interrupt: shutdown.interrupt.clone(),
        force: shutdown.force.clone(),
    };
    let report = dispatcher.run().await;

    if let Some(task) = realtime_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    // A rescue pass retrying against an unreachable server must not hold the exit up.
    let _ = tokio::time::timeout(Duration::from_secs(5), rescuer).await;
    if report.unrecorded_jobs > 0 {
        tracing::error!(
            jobs = report.unrecorded_jobs,
            "worker stopped, some final statuses could not be written"
        );
        EXIT_UNRECORDED
    } else {
        tracing::info!("worker stopped");
        EXIT_OK
    }
}

fn log_start(config: &Config) {
    let actions: Vec<&str> = config.actions.names().collect();
    let twilio: Vec<&str> = config.twilio.keys().map(String::as_str).collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        instance_id = %config.instance_id,
        supabase_url = %config.supabase_url,
        api_key = %config.api_key.redacted(),
        scripts_dir = %config.scripts_dir.display(),
        actions_source = %config.actions.source_name,
        actions = %actions.join(","),
        concurrency = config.concurrency,
        sweep_interval_ms = config.sweep_interval.as_millis() as u64,
        drain_ms = config.drain_period.as_millis() as u64,
        kill_grace_ms = config.kill_grace.as_millis() as u64,
        realtime = config.realtime_enabled,
        twilio_set = %twilio.join(","),
        "worker starting"
    );
}
