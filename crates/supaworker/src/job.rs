//! One claimed job, from the claim's first log line to its final status: checks the action
//! and payload, builds the child's command line and environment, runs it, streams the log
//! to the row while it runs, and writes the outcome. Every write is fenced on the attempt.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::actions::{Action, ActionTable};
use crate::config::Config;
use crate::postgrest::{Attempt, Fence, JobId, JobRow, Rest, RestError};
use crate::runner::{self, Exit, LiveLog, OutputLimits, Redactor, RunSpec};

/// Bytes of stderr quoted after a failure's first line in `error`.
const ERROR_STDERR_TAIL_BYTES: usize = 4 * 1024;

/// A pending fenced write or fence check of a running job.
type FenceCheck =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fence, RestError>> + Send>>;

/// Aborts the runner task when the job's task is dropped (an abandoned shutdown), so the
/// runner kills the process group instead of outliving the job.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Variables copied from the worker's environment into every child, when set.
const BASE_ENVIRONMENT: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// Shared state that every job uses.
pub struct JobContext {
    pub rest: Rest,
    pub config: Arc<Config>,
    pub redactor: Arc<Redactor>,
    pub stats: Arc<JobStats>,
}

/// Job counters for telemetry.
#[derive(Debug, Default)]
pub struct JobStats {
    pub claimed: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub requeued: AtomicU64,
    pub lost: AtomicU64,
    pub unrecorded: AtomicU64,
}

/// The end of an attempt, from the worker's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Succeeded,
    Failed,
    /// Put back to pending (interrupted, and the action is safe to run twice).
    Requeued,
    /// The row stopped being this attempt's (operator or rescuer); nothing was written.
    Lost,
    /// The final write did not land; the rescuer will finish the row.
    Unrecorded,
}

/// Formats the first line of the log, naming the instance and the attempt. The rescuer reads the
/// instance back from it.
pub fn log_header(instance_id: &str, attempt: Attempt) -> String {
    format!("[supaworker] claimed by instance={instance_id} attempt={attempt}\n")
}

/// Reads the instance id from a log written by [`log_header`].
pub fn instance_from_log(log: &str) -> Option<&str> {
    let rest = log.strip_prefix("[supaworker] claimed by instance=")?;
    rest.split_whitespace().next()
}

/// Runs a claimed job to its end. `interrupt` is cancelled when the worker stops running
/// jobs (the drain period is over, or a second signal came).
pub async fn run(
    ctx: Arc<JobContext>,
    row: JobRow,
    attempt: Attempt,
    interrupt: CancellationToken,
) -> JobEnd {
    let Some(id) = row.job_id() else {
        tracing::error!(job = ?row.id, "claimed row has no usable id");
        return JobEnd::Unrecorded;
    };
    let header = log_header(&ctx.config.instance_id, attempt);
    let started = Instant::now();
    let action_name = row.action.clone();

    let prepared = prepare(&ctx.config, &ctx.config.actions, &row, &id, attempt);
    let (action, spec) = match prepared {
        Ok(prepared) => prepared,
        Err(reason) => {
            let error = ctx.redactor.redact(&reason);
            tracing::warn!(job_id = %id, action = %action_name, error = %error, "job rejected before running");
            let end = write_final(&ctx, &id, attempt, "failed", &header, Some(&error)).await;
            log_finished(&id, &action_name, attempt, started, end, "rejected");
            return end;
        }
    };

    let live = Arc::new(LiveLog::new());
    let limits = OutputLimits {
        log_max_bytes: ctx
            .config
            .log_max_bytes
            .saturating_sub(header.len())
            .max(1024),
        stderr_tail_bytes: ERROR_STDERR_TAIL_BYTES,
    };
    let stop = CancellationToken::new();
    let mut child = AbortOnDrop(tokio::spawn(runner::run(
        spec,
        limits,
        ctx.redactor.clone(),
        live.clone(),
        stop.clone(),
    )));

    let mut flush_timer = tokio::time::interval(ctx.config.log_flush_interval);
    flush_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush_timer.tick().await;
    let mut flushed_version = 0;
    let mut lost = false;
    let mut interrupted = false;
    // A flush runs beside the child, so a slow or retried write never delays the reaction
    // to an interrupt or to the child's exit.
    let mut flush: Option<FenceCheck> = None;
    let outcome = loop {
        tokio::select! {
            outcome = &mut child.0 => break outcome,
            _ = interrupt.cancelled(), if !interrupted => {
                interrupted = true;
                tracing::warn!(job_id = %id, action = %action.name, attempt = %attempt, "stopping job, interrupted by shutdown");
                stop.cancel();
            }
            _ = flush_timer.tick(), if !lost && flush.is_none() => {
                let rest = ctx.rest.clone();
                let job_id = id.clone();
                flush = Some(if live.version() != flushed_version {
                    flushed_version = live.version();
                    let log = format!("{header}{}", live.snapshot());
                    Box::pin(async move { rest.flush_log(&job_id, attempt, &log).await })
                } else {
                    Box::pin(async move { check_still_ours(&rest, &job_id, attempt).await })
                });
            }
            fence = async { flush.as_mut().expect("guarded by is_some").await }, if flush.is_some() => {
                flush = None;
                match fence {
                    Ok(Fence::Held) => {}
                    Ok(Fence::Lost) => {
                        lost = true;
                        tracing::warn!(job_id = %id, action = %action.name, attempt = %attempt, "job is no longer this attempt's, stopping its process");
                        stop.cancel();
                    }
                    Err(error) => {
                        tracing::warn!(job_id = %id, error = %error, error_class = error.class(), "log flush failed, will retry at the next interval");
                    }
                }
            }
        }
    };

    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(join_error) => {
            tracing::error!(job_id = %id, error = %join_error, "runner task failed");
            let end = write_final(
                &ctx,
                &id,
                attempt,
                "failed",
                &header,
                Some("the worker's runner task failed; the outcome is unknown"),
            )
            .await;
            log_finished(&id, &action.name, attempt, started, end, "runner_failed");
            return end;
        }
    };
    let log = format!("{header}{}", outcome.log);

    if lost {
        ctx.stats.lost.fetch_add(1, Ordering::Relaxed);
        log_finished(&id, &action.name, attempt, started, JobEnd::Lost, "lost");
        return JobEnd::Lost;
    }

    let end = if interrupted && !outcome.exit.is_success() {
        let reason = "interrupted by shutdown: the worker was stopped while the job ran";
        if action.safe_to_retry {
            let log = format!("{log}\n[supaworker] {reason}; put back to pending\n");
            match ctx.rest.requeue(&id, attempt, &log).await {
                Ok(Fence::Held) => {
                    ctx.stats.requeued.fetch_add(1, Ordering::Relaxed);
                    JobEnd::Requeued
                }
                Ok(Fence::Lost) => JobEnd::Lost,
                Err(error) => {
                    tracing::error!(job_id = %id, error = %error, "requeue failed");
                    ctx.stats.unrecorded.fetch_add(1, Ordering::Relaxed);
                    JobEnd::Unrecorded
                }
            }
        } else {
            let error = format!(
                "{reason}; the outcome is unknown and the job was not retried because its action is not safe to run twice ({})",
                outcome.exit.describe()
            );
            write_final(&ctx, &id, attempt, "failed", &log, Some(&error)).await
        }
    } else if outcome.exit.is_success() {
        write_final(&ctx, &id, attempt, "success", &log, None).await
    } else {
        let mut error = match &outcome.exit {
            Exit::TimedOut(limit) => format!(
                "timed out after {}; the process group was stopped",
                humantime::format_duration(*limit)
            ),
            other => other.describe(),
        };
        let tail = outcome.stderr_tail.trim_end();
        if !tail.is_empty() {
            error.push_str("\n--- end of stderr ---\n");
            error.push_str(tail);
        }
        write_final(&ctx, &id, attempt, "failed", &log, Some(&error)).await
    };
    log_finished(
        &id,
        &action.name,
        attempt,
        started,
        end,
        &outcome.exit.describe(),
    );
    end
}

fn log_finished(
    id: &JobId,
    action: &str,
    attempt: Attempt,
    started: Instant,
    end: JobEnd,
    exit: &str,
) {
    tracing::info!(
        job_id = %id,
        action,
        attempt = %attempt,
        duration_ms = started.elapsed().as_millis() as u64,
        outcome = crate::metrics::outcome_label(end),
        exit,
        "job finished"
    );
}

/// Reads the row to see whether an operator or the rescuer took the job away.
async fn check_still_ours(rest: &Rest, id: &JobId, attempt: Attempt) -> Result<Fence, RestError> {
    match rest.get_job(id).await? {
        Some(row) if row.status == "running" && attempt.matches(row.started_at.as_deref()) => {
            Ok(Fence::Held)
        }
        _ => Ok(Fence::Lost),
    }
}

async fn write_final(
    ctx: &JobContext,
    id: &JobId,
    attempt: Attempt,
    status: &str,
    log: &str,
    error: Option<&str>,
) -> JobEnd {
    match ctx.rest.finish(id, attempt, status, log, error).await {
        Ok(Fence::Held) => count_final(ctx, status),
        Ok(Fence::Lost) => {
            // A retry after a lost response finds the row already final: read it back
            // before concluding that someone else changed the job.
            if let Ok(Some(row)) = ctx.rest.get_job(id).await {
                if row.status == status && attempt.matches(row.started_at.as_deref()) {
                    return count_final(ctx, status);
                }
            }
            ctx.stats.lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job_id = %id, attempt = %attempt, "job changed by someone else before its final status was written; left as it is");
            JobEnd::Lost
        }
        Err(error) => {
            ctx.stats.unrecorded.fetch_add(1, Ordering::Relaxed);
            tracing::error!(job_id = %id, attempt = %attempt, error = %error, "final status could not be written; the rescuer will finish the job");
            JobEnd::Unrecorded
        }
    }
}

fn count_final(ctx: &JobContext, status: &str) -> JobEnd {
    if status == "success" {
        ctx.stats.succeeded.fetch_add(1, Ordering::Relaxed);
        JobEnd::Succeeded
    } else {
        ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
        JobEnd::Failed
    }
}

/// Checks the action, the worker's environment and the payload, and builds the run
/// specification. An `Err` is the job's `error` text; nothing has been spawned.
pub fn prepare(
    config: &Config,
    table: &ActionTable,
    row: &JobRow,
    id: &JobId,
    attempt: Attempt,
) -> Result<(Action, RunSpec), String> {
    let Some(action) = table.get(&row.action) else {
        let known: Vec<&str> = table.names().collect();
        return Err(format!(
            "unknown action {:?}; known actions: {}",
            crate::actions::shorten(&row.action),
            known.join(", ")
        ));
    };
    let missing = missing_required_env(config, action);
    if !missing.is_empty() {
        return Err(format!(
            "action {} needs {} set on the worker; missing: {}. Nothing was run",
            action.name,
            action.require_env.join(", "),
            missing.join(", ")
        ));
    }
    let payload = row.payload().map_err(|e| format!("{e}. Nothing was run"))?;
    let invocation = action
        .invocation(&payload)
        .map_err(|e| format!("{e}. Nothing was run"))?;

    let scripts_dir = &config.scripts_dir;
    if let Some(script) = &action.script {
        let path = scripts_dir.join(script);
        if !path.is_file() {
            return Err(format!(
                "script not found: {} (action {}, scripts directory {}); put the script there or set SUPAWORKER_SCRIPTS_DIR",
                path.display(),
                action.name,
                scripts_dir.display()
            ));
        }
    }
    let program = program_path(&invocation.program, scripts_dir);
    let env = child_environment(config, action, id, attempt, scripts_dir);

    // The runner resolves the program (PATH, interpreter, executable bit) right before it
    // spawns, and reports a missing one as the job's error without running anything.
    let spec = RunSpec {
        program,
        args: invocation.args,
        cwd: scripts_dir.clone(),
        env,
        timeout: Some(action.timeout),
        kill_grace: config.kill_grace,
    };
    Ok((action.clone(), spec))
}

/// `python` means the scripts directory's virtual environment when it has one, else
/// `python3` from PATH.
pub fn program_path(program: &Path, scripts_dir: &Path) -> PathBuf {
    if program == Path::new("python") {
        let venv = scripts_dir.join(".venv/bin/python");
        if venv.exists() {
            return venv;
        }
        return PathBuf::from("python3");
    }
    program.to_path_buf()
}

/// Lists the variables in the action's `require_env` that the worker does not have.
pub fn missing_required_env<'a>(config: &Config, action: &'a Action) -> Vec<&'a str> {
    action
        .require_env
        .iter()
        .map(String::as_str)
        .filter(|name| lookup_worker_env(config, name).is_none())
        .collect()
}

/// Reads a variable from the worker's settings or environment. Empty values count as unset.
pub fn lookup_worker_env(config: &Config, name: &str) -> Option<String> {
    config
        .twilio
        .get(name)
        .cloned()
        .or_else(|| std::env::var(name).ok())
        .filter(|v| !v.is_empty())
}

/// Builds the child's complete environment: a minimal base, the job's facts, and only the
/// variables its action lists. The Supabase key is never passed unless an action lists it.
fn child_environment(
    config: &Config,
    action: &Action,
    id: &JobId,
    attempt: Attempt,
    scripts_dir: &Path,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = BASE_ENVIRONMENT
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| (name.to_string(), v)))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    let venv = scripts_dir.join(".venv");
    if venv.join("bin/python").exists() {
        env.push(("VIRTUAL_ENV".into(), venv.display().to_string()));
    }
    env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    env.push(("SUPAWORKER_JOB_ID".into(), id.to_string()));
    env.push(("SUPAWORKER_JOB_ACTION".into(), action.name.clone()));
    env.push(("SUPAWORKER_ATTEMPT".into(), attempt.to_filter()));
    env.push(("SUPAWORKER_INSTANCE_ID".into(), config.instance_id.clone()));
    for name in &action.env {
        if let Some(value) = lookup_worker_env(config, name) {
            env.retain(|(k, _)| k != name);
            env.push((name.clone(), value));
        }
    }
    env
}

/// Returns how long a job may stay `running` before the rescuer treats its worker as gone.
pub fn rescue_deadline(table: &ActionTable, action: &str, grace: Duration) -> Duration {
    let timeout = table
        .get(action)
        .map(|a| a.timeout)
        .unwrap_or_else(|| table.max_timeout());
    timeout + grace
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_instance() {
        let attempt = Attempt::now();
        let header = log_header("machine-1", attempt);
        assert_eq!(instance_from_log(&header), Some("machine-1"));
        assert_eq!(
            instance_from_log(&format!("{header}more output")),
            Some("machine-1")
        );
        assert_eq!(instance_from_log("something else"), None);
    }
}
