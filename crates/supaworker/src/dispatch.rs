//! The dispatcher: turns wake-ups into claims. Realtime hints, readiness messages, the sweep
//! timer and freed slots all lead to a sweep of pending rows, because the table is the truth
//! and an event is only a hint. The oldest pending jobs are claimed while slots are free.
//!
//! Slots are bounded globally (`SUPAWORKER_CONCURRENCY`) and per action (`concurrency` in
//! the action table). Claims and job runs happen in their own tasks so the loop never waits
//! on the network or a child process.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::job::{self, JobContext, JobEnd};
use crate::postgrest::{Attempt, Claim, JobId, PendingJob, RestError};
use crate::realtime::{Hint, RealtimeStats};

/// Upper bound of hinted ids remembered to attribute claims to Realtime.
const HINT_MEMORY: usize = 10_000;

/// Time a committed job may wait for its Realtime event before a sweep that claims it
/// counts it as missed by Realtime. It covers the event's normal latency, so a sweep that
/// wins the race against the event is not a miss.
const HINT_GRACE: Duration = Duration::from_secs(2);

/// Dispatcher counters for telemetry and tests.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub sweeps: AtomicU64,
    pub sweep_errors: AtomicU64,
    pub claims_won: AtomicU64,
    pub claims_lost: AtomicU64,
    pub claimed_via_realtime: AtomicU64,
    pub claimed_via_sweep: AtomicU64,
    /// Jobs a sweep claimed that Realtime never announced although the channel was live
    /// from their insert until the claim (see [`missed_by_realtime`]).
    pub missed_by_realtime: AtomicU64,
    /// Unix time in milliseconds when the last sweep succeeded; 0 before the first.
    pub last_sweep_ok_unix_ms: AtomicU64,
}

/// The dispatcher's result when its loop ends.
#[derive(Debug, Default)]
pub struct DispatchReport {
    pub unrecorded_jobs: u64,
}

enum TaskResult {
    Swept(Result<Vec<PendingJob>, RestError>),
    Job {
        id: JobId,
        action: String,
        end: Option<JobEnd>,
    },
}

/// The dispatcher's inputs.
pub struct Dispatcher {
    pub ctx: Arc<JobContext>,
    pub hints: mpsc::Receiver<Hint>,
    pub ready: watch::Receiver<u64>,
    pub stats: Arc<DispatchStats>,
    /// The Realtime client's state, read to tell a job Realtime missed from one inserted
    /// while the channel was down.
    pub realtime: Arc<RealtimeStats>,
    /// Cancelled on the first shutdown signal: stop sweeping and claiming.
    pub stop_claiming: CancellationToken,
    /// Cancelled when running jobs must be stopped (drain over or second signal).
    pub interrupt: CancellationToken,
    /// Cancelled when stopped jobs are abandoned: abort their tasks and return.
    pub force: CancellationToken,
}

struct State {
    candidates: VecDeque<PendingJob>,
    candidate_ids: HashSet<JobId>,
    running: HashMap<JobId, String>,
    per_action: HashMap<String, usize>,
    hinted: HashSet<JobId>,
    hinted_order: VecDeque<JobId>,
    sweep_in_flight: bool,
    /// The sweep in flight, aborted at shutdown so a sweep retrying against an unreachable
    /// server does not hold the shutdown up.
    sweep_task: Option<tokio::task::AbortHandle>,
    sweep_wanted: bool,
    last_page_full: bool,
    /// `RealtimeStats::hints_dropped` when the last readiness message arrived.
    hints_dropped_at_ready: u64,
}

impl Dispatcher {
    /// Runs until `stop_claiming` is cancelled and every running job has ended.
    pub async fn run(mut self) -> DispatchReport {
        let config = self.ctx.config.clone();
        let mut tasks: JoinSet<TaskResult> = JoinSet::new();
        let mut report = DispatchReport::default();
        let mut state = State {
            candidates: VecDeque::new(),
            candidate_ids: HashSet::new(),
            running: HashMap::new(),
            per_action: HashMap::new(),
            hinted: HashSet::new(),
            hinted_order: VecDeque::new(),
            sweep_in_flight: false,
            sweep_task: None,
            sweep_wanted: true,
            last_page_full: false,
            hints_dropped_at_ready: 0,
        };
        let mut sweep_timer = Box::pin(tokio::time::sleep(jittered(config.sweep_interval)));
        let mut hints_open = true;
        let mut ready_open = true;

        loop {
            let claiming = !self.stop_claiming.is_cancelled();
            if claiming {
                self.start_work(&mut state, &mut tasks);
            } else if tasks.is_empty() {
                break;
            }

            tokio::select! {
                _ = self.stop_claiming.cancelled(), if claiming => {
                    tracing::info!(running = state.running.len(), "dispatcher stopped claiming");
                    state.candidates.clear();
                    state.candidate_ids.clear();
                    if let Some(sweep) = state.sweep_task.take() {
                        sweep.abort();
                    }
                }
                hint = self.hints.recv(), if hints_open && claiming => match hint {
                    Some(Hint::Job { id, .. }) => {
                        if let Some(id) = JobId::from_json(&id) {
                            remember_hint(&mut state, id);
                        }
                        state.sweep_wanted = true;
                    }
                    None => hints_open = false,
                },
                changed = self.ready.changed(), if ready_open && claiming => match changed {
                    Ok(()) => {
                        state.hints_dropped_at_ready =
                            self.realtime.hints_dropped.load(Ordering::Relaxed);
                        state.sweep_wanted = true;
                    }
                    Err(_) => ready_open = false,
                },
                _ = &mut sweep_timer, if claiming => {
                    state.sweep_wanted = true;
                    sweep_timer.as_mut().reset(tokio::time::Instant::now() + jittered(config.sweep_interval));
                }
                _ = self.force.cancelled(), if !claiming && !tasks.is_empty() => {
                    let abandoned = state.running.len() as u64;
                    tracing::error!(jobs = abandoned, "abandoning jobs whose final status was not written; the rescuer finishes their rows");
                    // Dropping a job's task drops its runner, which kills the process group.
                    tasks.abort_all();
                    report.unrecorded_jobs += abandoned;
                    break;
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    match done {
                        Ok(result) => self.finish_task(&mut state, result, &mut report),
                        Err(error) if error.is_cancelled() => {}
                        Err(error) => tracing::error!(error = %error, "dispatcher task failed"),
                    }
                }
            }
        }
        report
    }

    fn free_slots(&self, state: &State) -> usize {
        self.ctx
            .config
            .concurrency
            .saturating_sub(state.running.len())
    }

    /// Actions whose per-action limit is reached.
    fn full_actions(&self, state: &State) -> Vec<String> {
        self.ctx
            .config
            .actions
            .iter()
            .filter(|a| {
                a.concurrency.is_some_and(|limit| {
                    state.per_action.get(&a.name).copied().unwrap_or(0) >= limit
                })
            })
            .map(|a| a.name.clone())
            .collect()
    }

    /// Starts a sweep when one is wanted, and claims candidates while slots are free.
    fn start_work(&self, state: &mut State, tasks: &mut JoinSet<TaskResult>) {
        let mut index = 0;
        while self.free_slots(state) > 0 && index < state.candidates.len() {
            let full = self.full_actions(state);
            let candidate = &state.candidates[index];
            if full.contains(&candidate.action) {
                index += 1;
                continue;
            }
            let candidate = state.candidates.remove(index).expect("index is in range");
            let Some(id) = JobId::from_json(&candidate.id) else {
                continue;
            };
            state.candidate_ids.remove(&id);
            if state.running.contains_key(&id) {
                continue;
            }
            state.running.insert(id.clone(), candidate.action.clone());
            *state
                .per_action
                .entry(candidate.action.clone())
                .or_default() += 1;
            let via_realtime = state.hinted.contains(&id);
            let missed = !via_realtime && missed_by_realtime(&self.realtime, state, &candidate);
            tasks.spawn(claim_and_run(
                self.ctx.clone(),
                self.stats.clone(),
                id,
                candidate.action,
                full,
                via_realtime,
                missed,
                self.stop_claiming.clone(),
                self.interrupt.clone(),
            ));
        }

        if state.candidates.is_empty() && state.last_page_full {
            state.sweep_wanted = true;
        }
        if state.sweep_wanted && !state.sweep_in_flight && self.free_slots(state) > 0 {
            state.sweep_wanted = false;
            state.sweep_in_flight = true;
            let rest = self.ctx.rest.clone();
            let limit = self.ctx.config.sweep_page_size;
            let exclude = self.full_actions(state);
            self.stats.sweeps.fetch_add(1, Ordering::Relaxed);
            let sweep = tasks
                .spawn(async move { TaskResult::Swept(rest.list_pending(limit, &exclude).await) });
            state.sweep_task = Some(sweep);
        }
    }

    fn finish_task(&self, state: &mut State, result: TaskResult, report: &mut DispatchReport) {
        match result {
            TaskResult::Swept(Ok(jobs)) => {
                state.sweep_in_flight = false;
                self.stats
                    .last_sweep_ok_unix_ms
                    .store(crate::realtime::unix_millis_now(), Ordering::Relaxed);
                state.last_page_full = jobs.len() >= self.ctx.config.sweep_page_size;
                state.candidates.clear();
                state.candidate_ids.clear();
                for job in jobs {
                    let Some(id) = JobId::from_json(&job.id) else {
                        continue;
                    };
                    if state.running.contains_key(&id) || !state.candidate_ids.insert(id) {
                        continue;
                    }
                    state.candidates.push_back(job);
                }
            }
            TaskResult::Swept(Err(error)) => {
                state.sweep_in_flight = false;
                self.stats.sweep_errors.fetch_add(1, Ordering::Relaxed);
                if error.is_retryable() {
                    tracing::warn!(error = %error, error_class = error.class(), "sweep failed, the next sweep is on the timer");
                } else {
                    // A rejected key or a missing column does not heal by retrying. The
                    // message names the fix, and the timer keeps trying at its slow pace.
                    tracing::error!(error = %error, error_class = error.class(), "sweep failed and retrying cannot help until the configuration or schema is fixed");
                }
            }
            TaskResult::Job { id, action, end } => {
                state.running.remove(&id);
                if let Some(count) = state.per_action.get_mut(&action) {
                    *count = count.saturating_sub(1);
                }
                if end == Some(JobEnd::Unrecorded) {
                    report.unrecorded_jobs += 1;
                }
                if end.is_some() {
                    // A slot freed after a real run: more work may be waiting.
                    state.sweep_wanted |= state.candidates.is_empty();
                }
            }
        }
    }
}

fn remember_hint(state: &mut State, id: JobId) {
    if state.hinted.insert(id.clone()) {
        state.hinted_order.push_back(id);
        while state.hinted_order.len() > HINT_MEMORY {
            if let Some(old) = state.hinted_order.pop_front() {
                state.hinted.remove(&old);
            }
        }
    }
}

/// Decides whether an unhinted job that a sweep is about to claim is one Realtime should
/// have announced: the channel is live now, the job was inserted after the last readiness
/// message (so the channel has been live since the insert, because every rejoin ends with a
/// new readiness message), its event is more than [`HINT_GRACE`] overdue, and no hint was
/// dropped from the full queue since that readiness message (a dropped hint is not a miss).
///
/// NOTE: `created_at` comes from the database clock and the readiness time from the
/// worker's clock; skew between the two shifts the boundary by that much.
fn missed_by_realtime(realtime: &RealtimeStats, state: &State, job: &PendingJob) -> bool {
    if !realtime.live.load(Ordering::Relaxed) {
        return false;
    }
    if realtime.hints_dropped.load(Ordering::Relaxed) != state.hints_dropped_at_ready {
        return false;
    }
    let Some(created) = job
        .created_at
        .as_deref()
        .and_then(crate::postgrest::parse_timestamp)
    else {
        return false;
    };
    let created_ms = created.unix_timestamp_nanos() / 1_000_000;
    let ready_ms = i128::from(realtime.last_readiness_unix_ms.load(Ordering::Relaxed));
    let overdue = time::OffsetDateTime::now_utc() - created > HINT_GRACE;
    created_ms > ready_ms && overdue
}

/// Adds up to 10% jitter to the sweep interval, so instances do not sweep in step.
fn jittered(interval: Duration) -> Duration {
    let spread = interval.as_secs_f64() * 0.1;
    let offset = rand::rng().random_range(-spread..=spread);
    Duration::from_secs_f64((interval.as_secs_f64() + offset).max(0.05))
}

#[allow(clippy::too_many_arguments)]
async fn claim_and_run(
    ctx: Arc<JobContext>,
    stats: Arc<DispatchStats>,
    id: JobId,
    action: String,
    exclude_actions: Vec<String>,
    via_realtime: bool,
    missed_by_realtime: bool,
    stop_claiming: CancellationToken,
    interrupt: CancellationToken,
) -> TaskResult {
    // A claim task queued just before the shutdown signal must not take new work.
    if stop_claiming.is_cancelled() {
        return TaskResult::Job {
            id,
            action,
            end: None,
        };
    }
    let attempt = Attempt::now();
    let header = job::log_header(&ctx.config.instance_id, attempt);
    let claim = ctx
        .rest
        .claim(&id, attempt, &header, &exclude_actions)
        .await;
    let row = match claim {
        Ok(Claim::Won(row)) => row,
        Ok(Claim::Lost) => {
            stats.claims_lost.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(job_id = %id, "claim lost, another worker has the job");
            return TaskResult::Job {
                id,
                action,
                end: None,
            };
        }
        Err(error) => {
            tracing::warn!(job_id = %id, error = %error, error_class = error.class(), "claim failed");
            return TaskResult::Job {
                id,
                action,
                end: None,
            };
        }
    };
    if interrupt.is_cancelled() {
        // Jobs are being stopped: hand this one back untouched instead of starting it only
        // to kill it.
        let log = format!("{header}[supaworker] claimed during shutdown and put back to pending without running\n");
        if let Err(error) = ctx.rest.requeue(&id, attempt, &log).await {
            tracing::error!(job_id = %id, error = %error, "job claimed during shutdown could not be put back; the rescuer finishes it");
        }
        return TaskResult::Job {
            id,
            action,
            end: None,
        };
    }
    stats.claims_won.fetch_add(1, Ordering::Relaxed);
    ctx.stats.claimed.fetch_add(1, Ordering::Relaxed);
    let via = if via_realtime {
        stats.claimed_via_realtime.fetch_add(1, Ordering::Relaxed);
        "realtime"
    } else {
        stats.claimed_via_sweep.fetch_add(1, Ordering::Relaxed);
        "sweep"
    };
    if missed_by_realtime {
        let before = stats.missed_by_realtime.fetch_add(1, Ordering::Relaxed);
        if before == 0 {
            tracing::warn!(
                job_id = %id,
                likely_causes = "the tenant's event rate limit, a change-capture restart without a new \
                                 readiness message, a dead connection not yet detected, or row level \
                                 security hiding the row from the key's role",
                "sweep found a pending job that Realtime never announced although the channel was live; \
                 the sweep keeps jobs running, but later than Realtime would"
            );
        }
    }
    let pickup = row
        .created_at
        .as_deref()
        .and_then(crate::postgrest::parse_timestamp)
        .map(|created| time::OffsetDateTime::now_utc() - created);
    let pickup_ms = pickup.map(|pickup| pickup.whole_milliseconds() as i64);
    tracing::info!(job_id = %id, action = %row.action, attempt = %attempt, via, pickup_ms, "job claimed");
    let actions = &ctx.config.actions;
    let pickup = pickup.and_then(|pickup| Duration::try_from(pickup).ok());
    crate::metrics::job_claimed(actions, &row.action, pickup);
    // The slot was taken under the sweep's action, so it is released under that name even if
    // someone edited the row's action in between.
    let row_action = row.action.clone();
    let started = Instant::now();
    let end = job::run(ctx.clone(), row, attempt, interrupt).await;
    crate::metrics::job_finished(&ctx.config.actions, &row_action, end, started.elapsed());
    TaskResult::Job {
        id,
        action,
        end: Some(end),
    }
}
