//! Helpers shared by the runner tests: scripts in a temporary directory and a run
//! with a hang guard.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use supaworker::runner::{run, LiveLog, OutputLimits, Redactor, RunOutcome, RunSpec};
use tokio_util::sync::CancellationToken;

/// Hang guard for one run. Runs normally take well under a second.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Writes an executable `/bin/sh` script named `name` into `dir`.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Builds a spec for `program` in `dir` with only `PATH` set and no time-out.
pub fn spec(dir: &Path, program: &str, args: &[&str]) -> RunSpec {
    RunSpec {
        program: PathBuf::from(program),
        args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        cwd: dir.to_path_buf(),
        env: vec![("PATH".to_owned(), PATH.to_owned())],
        timeout: None,
        kill_grace: Duration::from_secs(5),
    }
}

pub async fn run_with(spec: RunSpec, limits: OutputLimits, redactor: Redactor) -> RunOutcome {
    let live = Arc::new(LiveLog::new());
    let run = run(
        spec,
        limits,
        Arc::new(redactor),
        live,
        CancellationToken::new(),
    );
    tokio::time::timeout(HANG_GUARD, run)
        .await
        .expect("run did not finish within the hang guard")
}

pub async fn run_spec(spec: RunSpec) -> RunOutcome {
    run_with(spec, OutputLimits::default(), Redactor::default()).await
}

/// Returns whether `pid` is gone or a zombie (dead, waiting for its new parent to reap it).
pub fn process_is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the first field after the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Polls until `pid` is dead, up to the hang guard. Returns whether it died.
pub async fn wait_until_dead(pid: u32) -> bool {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while tokio::time::Instant::now() < deadline {
        if process_is_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Reads a pid that a script wrote to `path`, waiting until the file is complete.
pub async fn read_pid_file(path: &Path) -> u32 {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Some(line) = text.strip_suffix('\n') {
                return line.trim().parse().expect("pid file contains a number");
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pid file {} was not written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
