//! Signals and the drain. The first SIGTERM or SIGINT stops subscribing and claiming and
//! starts the drain period; running jobs may finish within it. When it ends, or at a second
//! signal, running jobs are interrupted: each process group gets SIGTERM, then SIGKILL after
//! the kill grace, and each job is recorded as failed (or pending where its action is safe
//! to run twice).

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit status after a clean shutdown: every job finished or was recorded.
pub const EXIT_OK: i32 = 0;
/// Exit status when a fatal error stopped the worker.
pub const EXIT_FATAL: i32 = 1;
/// Exit status when the worker stopped but some job's final status could not be written
/// (the rescuer finishes those rows later).
pub const EXIT_UNRECORDED: i32 = 3;

/// Time the worker gives stopped jobs to write their final status after the kill grace,
/// before it gives up on them and exits.
pub const FINAL_WRITE_BUDGET: Duration = Duration::from_secs(10);

/// The stages of a shutdown.
#[derive(Clone)]
pub struct Shutdown {
    /// Cancelled at the first signal: stop subscribing and claiming.
    pub stop_claiming: CancellationToken,
    /// Cancelled when the drain ends or at a second signal: stop running jobs.
    pub interrupt: CancellationToken,
    /// Cancelled when stopped jobs did not record their status within the kill grace plus
    /// [`FINAL_WRITE_BUDGET`], or at a third signal: abandon them and exit.
    pub force: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            stop_claiming: CancellationToken::new(),
            interrupt: CancellationToken::new(),
            force: CancellationToken::new(),
        }
    }

    /// Listens for SIGTERM and SIGINT and drives the stages. Returns when the force stage has
    /// begun.
    pub async fn watch_signals(
        self,
        drain_period: Duration,
        kill_grace: Duration,
    ) -> std::io::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let first = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = self.stop_claiming.cancelled() => "none",
        };
        tracing::info!(
            signal = first,
            drain_ms = drain_period.as_millis() as u64,
            "shutdown started, no new jobs are claimed; running jobs may finish within the drain period"
        );
        self.stop_claiming.cancel();
        tokio::select! {
            _ = term.recv() => tracing::warn!(signal = "SIGTERM", "second signal, skipping the drain"),
            _ = int.recv() => tracing::warn!(signal = "SIGINT", "second signal, skipping the drain"),
            _ = tokio::time::sleep(drain_period) => tracing::warn!("drain period over, interrupting running jobs"),
            _ = self.interrupt.cancelled() => {}
        }
        self.interrupt.cancel();
        // Final writes retry for minutes when Supabase is unreachable; fly.io kills the
        // machine at kill_timeout anyway, so the worker bounds the wait itself.
        let budget = kill_grace + FINAL_WRITE_BUDGET;
        tokio::select! {
            _ = term.recv() => tracing::warn!(signal = "SIGTERM", "third signal, abandoning the final writes"),
            _ = int.recv() => tracing::warn!(signal = "SIGINT", "third signal, abandoning the final writes"),
            _ = tokio::time::sleep(budget) => tracing::warn!(budget_ms = budget.as_millis() as u64, "stopped jobs did not record their status in time, abandoning them"),
            _ = self.force.cancelled() => {}
        }
        self.force.cancel();
        Ok(())
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}
