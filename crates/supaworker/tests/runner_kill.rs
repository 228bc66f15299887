//! Runner tests for time-outs, stop requests and grandchildren: the whole process
//! group must end, and a run must never wait on a grandchild.

mod runner_common;

use std::sync::Arc;
use std::time::Duration;

use runner_common::{read_pid_file, run_spec, spec, wait_until_dead, write_script, HANG_GUARD};
use supaworker::runner::{run, Exit, LiveLog, OutputLimits, Redactor};
use tokio_util::sync::CancellationToken;

/// A script whose grandchild ignores SIGTERM, so only the SIGKILL after the grace
/// period ends it. The grandchild's pid goes to `grandchild.pid`.
const STUBBORN_GRANDCHILD: &str = r#"
(trap '' TERM; exec sleep 1000) &
echo $! > grandchild.pid
echo ready
wait
"#;

#[tokio::test]
async fn timeout_kills_sleeping_grandchild() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "slow.sh", STUBBORN_GRANDCHILD);
    let mut slow = spec(dir.path(), "./slow.sh", &[]);
    slow.timeout = Some(Duration::from_millis(500));
    slow.kill_grace = Duration::from_millis(200);

    let outcome = run_spec(slow).await;

    assert_eq!(outcome.exit, Exit::TimedOut(Duration::from_millis(500)));
    assert_eq!(outcome.exit.describe(), "timed out after 500ms");
    assert!(outcome.log.contains("ready\n"), "log: {:?}", outcome.log);
    let grandchild = read_pid_file(&dir.path().join("grandchild.pid")).await;
    assert!(
        wait_until_dead(grandchild).await,
        "grandchild {grandchild} survived the time-out"
    );
}

#[tokio::test]
async fn timeout_sends_sigterm_before_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "graceful.sh",
        "trap 'echo got TERM; exit 7' TERM\necho ready\nwhile :; do sleep 0.05; done",
    );
    let mut graceful = spec(dir.path(), "./graceful.sh", &[]);
    graceful.timeout = Some(Duration::from_millis(300));
    graceful.kill_grace = Duration::from_secs(30);

    let outcome = run_spec(graceful).await;

    assert_eq!(outcome.exit, Exit::TimedOut(Duration::from_millis(300)));
    assert!(outcome.log.contains("got TERM\n"), "log: {:?}", outcome.log);
    // The script exits on SIGTERM, so the run ends well before the 30 s grace period.
    assert!(outcome.duration < Duration::from_secs(30));
}

#[tokio::test]
async fn grandchild_holding_pipes_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "detach.sh",
        "sleep 1000 &\necho $! > grandchild.pid\necho parent done",
    );

    let outcome = run_spec(spec(dir.path(), "./detach.sh", &[])).await;

    assert_eq!(outcome.exit, Exit::Code(0));
    assert_eq!(outcome.log, "parent done\n");
    let grandchild = read_pid_file(&dir.path().join("grandchild.pid")).await;
    assert!(
        wait_until_dead(grandchild).await,
        "grandchild {grandchild} outlived the run"
    );
}

#[tokio::test]
async fn leftover_grandchild_without_pipes_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "daemon.sh",
        "sleep 1000 >/dev/null 2>&1 &\necho $! > grandchild.pid",
    );

    let outcome = run_spec(spec(dir.path(), "./daemon.sh", &[])).await;

    assert_eq!(outcome.exit, Exit::Code(0));
    let grandchild = read_pid_file(&dir.path().join("grandchild.pid")).await;
    assert!(
        wait_until_dead(grandchild).await,
        "grandchild {grandchild} outlived the run"
    );
}

#[tokio::test]
async fn stop_cancels_child_and_group() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "slow.sh", STUBBORN_GRANDCHILD);
    let mut slow = spec(dir.path(), "./slow.sh", &[]);
    slow.kill_grace = Duration::from_millis(200);
    let live = Arc::new(LiveLog::new());
    let stop = CancellationToken::new();

    let running = tokio::spawn(run(
        slow,
        OutputLimits::default(),
        Arc::new(Redactor::default()),
        live.clone(),
        stop.clone(),
    ));
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while !live.snapshot().contains("ready") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "script never printed ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let outcome = tokio::time::timeout(HANG_GUARD, running)
        .await
        .expect("run did not finish after stop")
        .unwrap();

    assert_eq!(outcome.exit, Exit::Stopped);
    assert_eq!(outcome.exit.describe(), "stopped");
    let grandchild = read_pid_file(&dir.path().join("grandchild.pid")).await;
    assert!(
        wait_until_dead(grandchild).await,
        "grandchild {grandchild} survived the stop"
    );
}

#[tokio::test]
async fn stop_before_start_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "touch.sh", "touch ran.txt");
    let stop = CancellationToken::new();
    stop.cancel();

    let outcome = run(
        spec(dir.path(), "./touch.sh", &[]),
        OutputLimits::default(),
        Arc::new(Redactor::default()),
        Arc::new(LiveLog::new()),
        stop,
    )
    .await;

    assert_eq!(outcome.exit, Exit::Stopped);
    assert!(!dir.path().join("ran.txt").exists(), "the script ran");
}

#[tokio::test]
async fn dropped_run_kills_group() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "slow.sh", STUBBORN_GRANDCHILD);
    let live = Arc::new(LiveLog::new());

    let running = run(
        spec(dir.path(), "./slow.sh", &[]),
        OutputLimits::default(),
        Arc::new(Redactor::default()),
        live.clone(),
        CancellationToken::new(),
    );
    let wait_for_ready = async {
        while !live.snapshot().contains("ready") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = running => panic!("the script finished by itself"),
        ready = tokio::time::timeout(HANG_GUARD, wait_for_ready) => {
            ready.expect("script never printed ready");
        }
    }

    let grandchild = read_pid_file(&dir.path().join("grandchild.pid")).await;
    assert!(
        wait_until_dead(grandchild).await,
        "grandchild {grandchild} survived dropping the run"
    );
}
