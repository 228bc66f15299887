//! Runner tests for captured output: interleaving, Postgres-safe text, redaction,
//! truncation and the live log.

mod runner_common;

use std::sync::Arc;
use std::time::Duration;

use runner_common::{run_spec, run_with, spec, write_script, HANG_GUARD};
use supaworker::runner::{run, Exit, LiveLog, OutputLimits, Redactor};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn stdout_and_stderr_interleave() {
    let dir = tempfile::tempdir().unwrap();
    // The sleeps make the arrival order certain.
    write_script(
        dir.path(),
        "both.sh",
        "echo out1\nsleep 0.1\necho err1 >&2\nsleep 0.1\necho out2\nsleep 0.1\nprintf 'err2 no newline' >&2",
    );

    let outcome = run_spec(spec(dir.path(), "./both.sh", &[])).await;

    assert_eq!(outcome.exit, Exit::Code(0));
    assert_eq!(outcome.log, "out1\nerr1\nout2\nerr2 no newline");
    assert_eq!(outcome.stderr_tail, "err1\nerr2 no newline");
}

#[tokio::test]
async fn invalid_utf8_and_nul_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "bytes.sh",
        r"printf 'a\377b\000c\n'; printf '\342\202'; sleep 0.1; printf '\254 euro\n'",
    );

    let outcome = run_spec(spec(dir.path(), "./bytes.sh", &[])).await;

    assert_eq!(outcome.log, "a\u{FFFD}b\u{FFFD}c\n€ euro\n");
    assert!(!outcome.log.contains('\0'));
}

#[tokio::test]
async fn secrets_are_redacted_across_reads() {
    let dir = tempfile::tempdir().unwrap();
    // The sleep splits the secret over two writes, and so over two reads.
    write_script(
        dir.path(),
        "leak.sh",
        "printf 'token=sk-live-'; sleep 0.2; printf '0123456789abcdef\\n'\n\
         echo \"key=$SERVICE_KEY\" >&2",
    );
    let mut leak = spec(dir.path(), "./leak.sh", &[]);
    leak.env
        .push(("SERVICE_KEY".to_owned(), "service-role-secret".to_owned()));
    let redactor = Redactor::new([
        "sk-live-0123456789abcdef".to_owned(),
        "service-role-secret".to_owned(),
    ]);

    let outcome = run_with(leak, OutputLimits::default(), redactor).await;

    assert_eq!(outcome.log, "token=[REDACTED]\nkey=[REDACTED]\n");
    assert_eq!(outcome.stderr_tail, "key=[REDACTED]\n");
}

#[tokio::test]
async fn secret_in_long_line_is_redacted() {
    let dir = tempfile::tempdir().unwrap();
    // 200 KiB without a newline, so the runner commits the line in parts.
    let filler = "x".repeat(100 * 1024);
    let secret = "pg-password-9f8e7d6c5b4a";
    write_script(
        dir.path(),
        "long.sh",
        &format!("for i in 1 2 3 4 5 6 7 8; do printf '{filler}{secret}'; done"),
    );
    let limits = OutputLimits {
        log_max_bytes: 4 * 1024 * 1024,
        stderr_tail_bytes: 1024,
    };

    let outcome = run_with(
        spec(dir.path(), "./long.sh", &[]),
        limits,
        Redactor::new([secret.to_owned()]),
    )
    .await;

    assert!(!outcome.log.contains("pg-password"), "secret prefix leaked");
    assert!(!outcome.log.contains("5b4a"), "secret suffix leaked");
    assert_eq!(outcome.log.matches("[REDACTED]").count(), 8);
    assert_eq!(outcome.log.len(), 8 * (filler.len() + "[REDACTED]".len()));
}

#[tokio::test]
async fn truncated_log_keeps_head_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "many.sh",
        "i=0; while [ $i -lt 5000 ]; do echo \"line $i €\"; i=$((i+1)); done",
    );
    let limits = OutputLimits {
        log_max_bytes: 4096,
        stderr_tail_bytes: 256,
    };

    let outcome = run_with(
        spec(dir.path(), "./many.sh", &[]),
        limits,
        Redactor::default(),
    )
    .await;

    assert!(
        outcome.log.len() <= 4096,
        "log is {} bytes",
        outcome.log.len()
    );
    assert!(outcome.log.starts_with("line 0 €\nline 1 €\n"));
    assert!(outcome.log.ends_with("line 4998 €\nline 4999 €\n"));
    assert!(outcome.log.contains(" bytes omitted …]\n"));
    assert!(!outcome.log.contains('\u{FFFD}'), "a character was split");
}

#[tokio::test]
async fn live_log_shows_progress_while_running() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        dir.path(),
        "progress.sh",
        "echo 'step 1 with s3cret'\nwhile [ ! -e go ]; do sleep 0.05; done\necho 'step 2'",
    );
    let live = Arc::new(LiveLog::new());
    let version_before = live.version();

    let running = tokio::spawn(run(
        spec(dir.path(), "./progress.sh", &[]),
        OutputLimits::default(),
        Arc::new(Redactor::new(["s3cret".to_owned()])),
        live.clone(),
        CancellationToken::new(),
    ));
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while live.snapshot().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no progress seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(live.snapshot(), "step 1 with [REDACTED]\n");
    assert!(live.version() > version_before);
    let version_during = live.version();

    std::fs::write(dir.path().join("go"), "").unwrap();
    let outcome = tokio::time::timeout(HANG_GUARD, running)
        .await
        .expect("run did not finish")
        .unwrap();

    assert_eq!(outcome.log, "step 1 with [REDACTED]\nstep 2\n");
    assert_eq!(live.snapshot(), outcome.log);
    assert!(live.version() > version_during);
}
