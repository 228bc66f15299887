//! The rescuer: finishes jobs left `running` by a worker that is gone. At start-up it takes
//! the jobs this instance id left behind in an earlier life. Periodically it takes jobs of
//! any instance that have been running longer than their action's time-out plus a grace
//! period. A rescued job becomes `failed` (the outcome is unknown), or `pending` again when
//! its action is safe to run twice. Every rescue write is fenced on the `started_at` seen,
//! so a job that has just finished or been claimed again is never overwritten.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::job;
use crate::postgrest::{parse_timestamp, Fence, JobId, JobRow, Rest, RestError};

/// Rescue counters for telemetry.
#[derive(Debug, Default)]
pub struct RescueStats {
    pub failed: AtomicU64,
    pub requeued: AtomicU64,
}

/// The running jobs a rescue pass takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Jobs this instance id claimed in an earlier life (the process restarted).
    StartUp,
    /// Jobs of any instance running past their action's time-out plus the grace period.
    Overdue,
}

/// Runs one rescue pass. `own_running` lists the jobs this process is running, which are
/// never touched.
pub async fn rescue_pass(
    rest: &Rest,
    config: &Config,
    stats: &RescueStats,
    pass: Pass,
    own_running: &HashSet<JobId>,
) -> Result<usize, RestError> {
    let rows = rest.list_running().await?;
    let now = time::OffsetDateTime::now_utc();
    let mut rescued = 0;
    for row in rows {
        let Some(id) = row.job_id() else { continue };
        if own_running.contains(&id) {
            continue;
        }
        let Some(started_at) = row.started_at.clone() else {
            continue;
        };
        let owner = row
            .log
            .as_deref()
            .and_then(job::instance_from_log)
            .unwrap_or("unknown")
            .to_string();
        let take = match pass {
            Pass::StartUp => owner == config.instance_id,
            Pass::Overdue => {
                let deadline =
                    job::rescue_deadline(&config.actions, &row.action, config.rescue_grace);
                parse_timestamp(&started_at)
                    .map(|started| (now - started) > deadline)
                    .unwrap_or(false)
            }
        };
        if !take {
            continue;
        }
        if rescue_one(rest, config, stats, &row, &id, &started_at, &owner, pass).await? {
            rescued += 1;
        }
    }
    Ok(rescued)
}

#[allow(clippy::too_many_arguments)]
async fn rescue_one(
    rest: &Rest,
    config: &Config,
    stats: &RescueStats,
    row: &JobRow,
    id: &JobId,
    started_at: &str,
    owner: &str,
    pass: Pass,
) -> Result<bool, RestError> {
    let requeue = config
        .actions
        .get(&row.action)
        .is_some_and(|action| action.safe_to_retry);
    let why = match pass {
        Pass::StartUp => format!("the worker instance {owner} restarted while the job ran"),
        Pass::Overdue => format!(
            "the worker instance {owner} stopped reporting and the job ran past its time-out plus {} grace",
            humantime::format_duration(config.rescue_grace)
        ),
    };
    let (error, note) = if requeue {
        (
            format!("rescued: {why}; the action is safe to run twice, so the job was put back to pending"),
            "put back to pending",
        )
    } else {
        (
            format!("rescued: {why}; the worker stopped while the job ran and the outcome is unknown, so it was not run again"),
            "marked failed",
        )
    };
    let mut log = row.log.clone().unwrap_or_default();
    log.push_str(&format!(
        "\n[supaworker] instance={} {note}: {why}\n",
        config.instance_id
    ));
    let fence = rest.rescue(id, started_at, requeue, &log, &error).await?;
    if fence == Fence::Lost {
        tracing::info!(job_id = %id, "rescue skipped, the job changed since it was read");
        return Ok(false);
    }
    let counter = if requeue {
        &stats.requeued
    } else {
        &stats.failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
    crate::metrics::job_rescued(&config.actions, &row.action, requeue);
    tracing::warn!(job_id = %id, action = %row.action, owner, started_at, requeue, pass = ?pass, "job rescued");
    Ok(true)
}

/// Runs an overdue pass every `rescue_interval` until `stop`. The start-up pass must run
/// before the dispatcher claims anything, because it takes every running job of this
/// instance id.
pub async fn run_periodic(
    rest: Rest,
    config: Arc<Config>,
    stats: Arc<RescueStats>,
    stop: CancellationToken,
) {
    let none = HashSet::new();
    let mut timer = tokio::time::interval(config.rescue_interval.max(Duration::from_millis(100)));
    timer.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = timer.tick() => {
                if let Err(error) = rescue_pass(&rest, &config, &stats, Pass::Overdue, &none).await {
                    tracing::warn!(error = %error, error_class = error.class(), "rescue pass failed");
                }
            }
        }
    }
}
