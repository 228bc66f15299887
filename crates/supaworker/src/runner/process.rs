//! Signals to a job's process group and the time-out and stop sequence
//! (SIGTERM, grace period, SIGKILL).

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;

/// Interval between checks whether a process group still has members.
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The process group that a job's child leads (its id is the child's pid).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcessGroup(Pid);

impl ProcessGroup {
    pub(crate) fn led_by(pid: u32) -> Self {
        // Linux pids fit in i32 (pid_max is at most 2^22).
        Self(Pid::from_raw(pid as i32))
    }

    /// Sends `signal` to every process in the group. Returns false when the group has
    /// no members left.
    pub(crate) fn signal(self, signal: Signal) -> bool {
        match killpg(self.0, signal) {
            Ok(()) => true,
            Err(Errno::ESRCH) => false,
            Err(error) => {
                tracing::warn!(pgid = self.0.as_raw(), %signal, %error, "signalling process group failed");
                false
            }
        }
    }

    /// Returns whether any process (a zombie included) is still in the group.
    pub(crate) fn has_members(self) -> bool {
        match killpg(self.0, None) {
            Ok(()) => true,
            // EPERM means a member exists that this user may not signal.
            Err(Errno::EPERM) => true,
            Err(_) => false,
        }
    }

    /// Sends SIGTERM to the group, waits up to `grace` for the child to exit and the
    /// group to empty, then sends SIGKILL to whatever is left and reaps the child.
    pub(crate) async fn terminate(self, child: &mut Child, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.signal(Signal::SIGTERM);

        let child_exited = tokio::time::timeout_at(deadline, child.wait())
            .await
            .is_ok();
        if child_exited {
            // Grandchildren get the rest of the grace period too.
            while self.has_members() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(GROUP_POLL_INTERVAL).await;
            }
        }

        if self.signal(Signal::SIGKILL) {
            tracing::info!(
                pgid = self.0.as_raw(),
                "killed process group after grace period"
            );
        }
        if let Err(error) = child.wait().await {
            tracing::error!(pgid = self.0.as_raw(), %error, "waiting for child process failed");
        }
    }
}

/// Kills the group if the run future is dropped before the job finished, so that no
/// grandchild outlives an abandoned run. `kill_on_drop` covers only the direct child.
pub(crate) struct GroupGuard {
    group: Option<ProcessGroup>,
}

impl GroupGuard {
    pub(crate) fn new(group: ProcessGroup) -> Self {
        Self { group: Some(group) }
    }

    pub(crate) fn disarm(&mut self) {
        self.group = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.group {
            group.signal(Signal::SIGKILL);
        }
    }
}
