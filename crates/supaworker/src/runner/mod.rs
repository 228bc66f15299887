//! Runs one job's program as a child process and reports how it ended and what it
//! printed. The runner does not use the jobs table and never calls PostgREST.
//!
//! Each run starts the program directly (argv, never a shell) with exactly the given
//! environment, in its own process group. It reads stdout and stderr concurrently into
//! a bounded, sanitized and redacted log (see [`output`]), and ends the whole group on
//! time-out or stop with SIGTERM, a grace period, then SIGKILL.

mod output;
mod process;
mod program;

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub use output::{LiveLog, OutputLimits, Redactor, REDACTED};
pub use program::{resolve_program, SpawnError};

use output::{LineAssembler, Stream};
use process::{GroupGuard, ProcessGroup};

/// Time the output readers get after the child exited, before the group is killed. A
/// grandchild that inherited stdout or stderr keeps the pipes open after the child is
/// gone, and reading until EOF would wait for that grandchild.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Size of one read from a pipe.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Program, arguments, environment and time limits for one run.
#[derive(Clone)]
pub struct RunSpec {
    /// The program as configured: a bare name looked up in the `PATH` of `env`, or a
    /// path with a `/`, relative to `cwd` unless absolute.
    pub program: PathBuf,
    /// Arguments, passed as argv without a shell.
    pub args: Vec<String>,
    /// Working directory of the child (the scripts directory).
    pub cwd: PathBuf,
    /// The child's complete environment. Nothing of the worker's environment is passed.
    pub env: Vec<(String, String)>,
    /// Time after which the process group is terminated, or `None` for no limit.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL to the process group.
    pub kill_grace: Duration,
}

impl fmt::Debug for RunSpec {
    /// Shows environment names and the argument count only, because values may be
    /// secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("RunSpec")
            .field("program", &self.program)
            .field("arg_count", &self.args.len())
            .field("cwd", &self.cwd)
            .field("env_names", &env_names)
            .field("timeout", &self.timeout)
            .field("kill_grace", &self.kill_grace)
            .finish()
    }
}

/// Result of one run: how the child ended and its output.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub exit: Exit,
    /// The bounded log of stdout and stderr as they arrived, sanitized and redacted.
    pub log: String,
    /// The latest stderr output alone, sanitized and redacted.
    pub stderr_tail: String,
    /// Time from the start of the run until the output was collected.
    pub duration: Duration,
}

/// End state of the child process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The child exited with this code.
    Code(i32),
    /// The child was killed by this signal number, not by the runner.
    Signal(i32),
    /// The run exceeded this time-out and the runner terminated the process group.
    TimedOut(Duration),
    /// The stop token was cancelled and the runner terminated the process group.
    Stopped,
    /// Nothing ran because the program could not be started.
    SpawnFailed(SpawnError),
}

impl Exit {
    /// Returns true when the child exited with code 0.
    pub fn is_success(&self) -> bool {
        matches!(self, Exit::Code(0))
    }

    /// Returns a short English description, such as "exited with code 3".
    pub fn describe(&self) -> String {
        match self {
            Exit::Code(code) => format!("exited with code {code}"),
            Exit::Signal(number) => match Signal::try_from(*number) {
                Ok(signal) => format!("killed by signal {number} ({})", signal.as_str()),
                Err(_) => format!("killed by signal {number}"),
            },
            Exit::TimedOut(timeout) => format!("timed out after {}", format_duration(*timeout)),
            Exit::Stopped => "stopped".to_owned(),
            Exit::SpawnFailed(error) => error.to_string(),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Formats whole seconds as "30s", shorter times as "250ms", others as "1.5s".
fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else if duration < Duration::from_secs(1) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{:.1}s", duration.as_secs_f64())
    }
}

/// Runs `spec` to the end and returns how it ended with its output.
///
/// `live` is cleared and then receives the output as it arrives. Cancelling `stop`
/// terminates the process group as a time-out does and returns [`Exit::Stopped`]. The
/// direct child is always reaped. When the child has exited, processes left in its
/// group are killed: after at most 2 s if they keep stdout or stderr open, at once
/// otherwise. If this future is dropped early, the group is killed too.
pub async fn run(
    spec: RunSpec,
    limits: OutputLimits,
    redactor: Arc<Redactor>,
    live: Arc<LiveLog>,
    stop: CancellationToken,
) -> RunOutcome {
    let started = Instant::now();
    live.reset(limits);
    let exit = run_child(&spec, &redactor, &live, &stop).await;
    RunOutcome {
        exit,
        log: live.snapshot(),
        stderr_tail: live.stderr_tail(),
        duration: started.elapsed(),
    }
}

async fn run_child(
    spec: &RunSpec,
    redactor: &Arc<Redactor>,
    live: &Arc<LiveLog>,
    stop: &CancellationToken,
) -> Exit {
    let cwd = std::path::absolute(&spec.cwd).unwrap_or_else(|_| spec.cwd.clone());
    let path_env = spec
        .env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map_or("", |(_, value)| value.as_str());

    let program = match resolve_program(&spec.program, &cwd, path_env) {
        Ok(program) => program,
        Err(error) => {
            tracing::warn!(program = %spec.program.display(), %error, "starting job program failed");
            return Exit::SpawnFailed(error);
        }
    };
    if stop.is_cancelled() {
        return Exit::Stopped;
    }

    let mut command = Command::new(&program);
    command
        .arg0(&spec.program)
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(name, value)| (name, value)))
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);

    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let error = SpawnError::Spawn {
                program: program.clone(),
                cwd: cwd.clone(),
                message: error.to_string(),
                raw_os_error: error.raw_os_error(),
            };
            tracing::warn!(program = %program.display(), %error, "starting job program failed");
            return Exit::SpawnFailed(error);
        }
    };
    // `id` is None only after the child was reaped, which has not happened yet.
    let pid = child.id().unwrap_or_default();
    let group = ProcessGroup::led_by(pid);
    let mut group_guard = GroupGuard::new(group);
    tracing::info!(pid, program = %program.display(), "child process started");

    let drain_stop = CancellationToken::new();
    let _drain_stop_on_drop = drain_stop.clone().drop_guard();
    let stdout_reader = child.stdout.take().map(|pipe| {
        tokio::spawn(read_pipe(
            pipe,
            Stream::Stdout,
            redactor.clone(),
            live.clone(),
            drain_stop.clone(),
        ))
    });
    let stderr_reader = child.stderr.take().map(|pipe| {
        tokio::spawn(read_pipe(
            pipe,
            Stream::Stderr,
            redactor.clone(),
            live.clone(),
            drain_stop.clone(),
        ))
    });

    let exit = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => exit_from_status(status),
            Err(error) => {
                // NOTE: `Exit` has no variant for a failed wait (only possible if
                // something else reaped the child), so this reports the SIGKILL sent here.
                tracing::error!(pid, %error, "waiting for child process failed");
                group.signal(Signal::SIGKILL);
                Exit::Signal(Signal::SIGKILL as i32)
            }
        },
        () = sleep_or_forever(spec.timeout) => {
            let timeout = spec.timeout.unwrap_or_default();
            tracing::warn!(pid, timeout_ms = timeout.as_millis() as u64, "job timed out, terminating process group");
            group.terminate(&mut child, spec.kill_grace).await;
            Exit::TimedOut(timeout)
        },
        () = stop.cancelled() => {
            tracing::info!(pid, "job stop requested, terminating process group");
            group.terminate(&mut child, spec.kill_grace).await;
            Exit::Stopped
        },
    };

    let readers = futures::future::join(join_reader(stdout_reader), join_reader(stderr_reader));
    tokio::pin!(readers);
    if tokio::time::timeout(PIPE_DRAIN_TIMEOUT, &mut readers)
        .await
        .is_err()
    {
        tracing::warn!(
            pid,
            "output pipes still open after the child exited, killing process group"
        );
        group.signal(Signal::SIGKILL);
        drain_stop.cancel();
        readers.await;
    }
    if group.has_members() && group.signal(Signal::SIGKILL) {
        tracing::info!(pid, "killed processes left in the job's process group");
    }
    group_guard.disarm();

    tracing::info!(pid, exit = %exit, bytes = live.bytes_received(), "child process finished");
    exit
}

fn exit_from_status(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        // A reaped child always has a code or a signal, because `wait` does not report
        // stopped children.
        (None, None) => Exit::Code(-1),
    }
}

async fn sleep_or_forever(timeout: Option<Duration>) {
    match timeout {
        Some(timeout) => tokio::time::sleep(timeout).await,
        None => std::future::pending().await,
    }
}

async fn join_reader(reader: Option<tokio::task::JoinHandle<()>>) {
    if let Some(reader) = reader {
        if let Err(error) = reader.await {
            tracing::error!(%error, "output reader task failed");
        }
    }
}

/// Reads one pipe until EOF or until `drain_stop` is cancelled, committing text to
/// `live` as whole lines become ready.
async fn read_pipe(
    mut pipe: impl AsyncRead + Unpin,
    stream: Stream,
    redactor: Arc<Redactor>,
    live: Arc<LiveLog>,
    drain_stop: CancellationToken,
) {
    let mut assembler = LineAssembler::new(redactor);
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    loop {
        let read = tokio::select! {
            biased;
            () = drain_stop.cancelled() => break,
            read = pipe.read(&mut buffer) => read,
        };
        let bytes = match read {
            Ok(0) => break,
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(?stream, %error, "reading child output failed");
                break;
            }
        };
        live.count_received(bytes);
        if let Some(text) = assembler.push(&buffer[..bytes]) {
            live.commit(stream, &text);
        }
    }
    if let Some(text) = assembler.finish() {
        live.commit(stream, &text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_exits() {
        assert_eq!(Exit::Code(3).describe(), "exited with code 3");
        assert_eq!(Exit::Signal(9).describe(), "killed by signal 9 (SIGKILL)");
        assert_eq!(
            Exit::TimedOut(Duration::from_secs(30)).describe(),
            "timed out after 30s"
        );
        assert_eq!(
            Exit::TimedOut(Duration::from_millis(1500)).describe(),
            "timed out after 1.5s"
        );
        assert_eq!(
            Exit::TimedOut(Duration::from_millis(250)).describe(),
            "timed out after 250ms"
        );
        assert_eq!(Exit::Stopped.describe(), "stopped");
        assert!(Exit::Code(0).is_success());
        assert!(!Exit::Code(1).is_success());
        assert!(!Exit::Signal(15).is_success());
    }
}
