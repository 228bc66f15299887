//! Runner tests for how a child ends, spawn failures, argv and the environment.

mod runner_common;

use std::os::unix::fs::PermissionsExt;

use runner_common::{run_spec, spec, write_script, PATH};
use supaworker::runner::{resolve_program, Exit, SpawnError};

#[tokio::test]
async fn exit_code_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "fail.sh", "echo before; exit 3");

    let outcome = run_spec(spec(dir.path(), "./fail.sh", &[])).await;

    assert_eq!(outcome.exit, Exit::Code(3));
    assert!(!outcome.exit.is_success());
    assert_eq!(outcome.exit.describe(), "exited with code 3");
    assert_eq!(outcome.log, "before\n");
}

#[tokio::test]
async fn success_is_code_zero() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "ok.sh", "echo fine");

    let outcome = run_spec(spec(dir.path(), "./ok.sh", &[])).await;

    assert_eq!(outcome.exit, Exit::Code(0));
    assert!(outcome.exit.is_success());
}

#[tokio::test]
async fn death_by_signal_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "die.sh", "echo dying >&2; kill -KILL $$");

    let outcome = run_spec(spec(dir.path(), "./die.sh", &[])).await;

    assert_eq!(outcome.exit, Exit::Signal(9));
    assert_eq!(outcome.exit.describe(), "killed by signal 9 (SIGKILL)");
    assert_eq!(outcome.stderr_tail, "dying\n");
}

#[tokio::test]
async fn missing_program_fails_to_spawn() {
    let dir = tempfile::tempdir().unwrap();

    let outcome = run_spec(spec(dir.path(), "./missing.sh", &[])).await;

    let Exit::SpawnFailed(SpawnError::NotFound { path, cwd, .. }) = &outcome.exit else {
        panic!("expected NotFound, got {:?}", outcome.exit);
    };
    assert_eq!(path, &dir.path().join("missing.sh"));
    assert_eq!(cwd, dir.path());
    let message = outcome.exit.describe();
    assert!(message.contains("missing.sh"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert_eq!(outcome.log, "");
}

#[tokio::test]
async fn missing_bare_name_names_path() {
    let dir = tempfile::tempdir().unwrap();

    let outcome = run_spec(spec(dir.path(), "no-such-program-xyz", &[])).await;

    let Exit::SpawnFailed(SpawnError::NotInPath {
        program, path_env, ..
    }) = &outcome.exit
    else {
        panic!("expected NotInPath, got {:?}", outcome.exit);
    };
    assert_eq!(program, "no-such-program-xyz");
    assert_eq!(path_env, PATH);
    assert!(outcome
        .exit
        .describe()
        .contains("install no-such-program-xyz"));
}

#[tokio::test]
async fn non_executable_script_fails_to_spawn() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "plain.sh", "touch ran.txt");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();

    let outcome = run_spec(spec(dir.path(), "./plain.sh", &[])).await;

    assert!(
        matches!(
            outcome.exit,
            Exit::SpawnFailed(SpawnError::NotExecutable { .. })
        ),
        "got {:?}",
        outcome.exit
    );
    assert!(outcome.exit.describe().contains("chmod +x"));
    assert!(!dir.path().join("ran.txt").exists(), "the script ran");
}

#[tokio::test]
async fn missing_interpreter_fails_to_spawn() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tool.py");
    std::fs::write(&script, "#!/usr/bin/env python-missing-xyz\nprint('hi')\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let outcome = run_spec(spec(dir.path(), "./tool.py", &[])).await;

    let Exit::SpawnFailed(SpawnError::InterpreterNotFound { interpreter, .. }) = &outcome.exit
    else {
        panic!("expected InterpreterNotFound, got {:?}", outcome.exit);
    };
    assert_eq!(interpreter, "python-missing-xyz");
    assert!(outcome
        .exit
        .describe()
        .contains("install python-missing-xyz"));
}

#[tokio::test]
async fn missing_absolute_interpreter_fails_to_spawn() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tool.sh");
    std::fs::write(&script, "#!/opt/missing/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let outcome = run_spec(spec(dir.path(), "./tool.sh", &[])).await;

    assert!(
        matches!(
            &outcome.exit,
            Exit::SpawnFailed(SpawnError::InterpreterNotFound { interpreter, .. })
                if interpreter == "/opt/missing/bin/sh"
        ),
        "got {:?}",
        outcome.exit
    );
}

#[tokio::test]
async fn script_without_shebang_fails_to_spawn() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bare.sh");
    std::fs::write(&script, "touch ran.txt\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let outcome = run_spec(spec(dir.path(), "./bare.sh", &[])).await;

    let Exit::SpawnFailed(SpawnError::Spawn { raw_os_error, .. }) = &outcome.exit else {
        panic!("expected Spawn, got {:?}", outcome.exit);
    };
    assert_eq!(*raw_os_error, Some(nix::errno::Errno::ENOEXEC as i32));
    assert!(outcome
        .exit
        .describe()
        .contains("add one such as #!/bin/sh"));
    assert!(!dir.path().join("ran.txt").exists(), "the script ran");
}

#[tokio::test]
async fn missing_venv_python_suggests_venv() {
    let dir = tempfile::tempdir().unwrap();

    let outcome = run_spec(spec(dir.path(), ".venv/bin/python", &["x.py"])).await;

    let message = outcome.exit.describe();
    assert!(message.contains("python3 -m venv .venv"), "{message}");
}

#[test]
fn resolve_program_finds_bare_name_in_path() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    write_script(&bin, "tool", "true");
    let path_env = format!("/nonexistent::{}", bin.display());

    let resolved = resolve_program("tool".as_ref(), dir.path(), &path_env).unwrap();

    assert_eq!(resolved, bin.join("tool"));
}

#[test]
fn resolve_program_rejects_missing_cwd() {
    let error = resolve_program("sh".as_ref(), "/nonexistent/dir".as_ref(), PATH).unwrap_err();

    assert!(matches!(error, SpawnError::CwdNotFound { .. }), "{error:?}");
    assert!(!error.retry_may_help());
}

#[tokio::test]
async fn environment_is_exactly_the_given_one() {
    let dir = tempfile::tempdir().unwrap();
    // The test process has HOME and more, and none of it may reach the child.
    assert!(std::env::var_os("PATH").is_some());
    let mut run = spec(dir.path(), "/usr/bin/env", &[]);
    run.env.push(("JOB_ID".to_owned(), "42".to_owned()));
    run.env.push(("EMPTY".to_owned(), String::new()));

    let outcome = run_spec(run).await;

    assert_eq!(outcome.exit, Exit::Code(0));
    let mut lines: Vec<&str> = outcome.log.lines().collect();
    lines.sort_unstable();
    let expected_path = format!("PATH={PATH}");
    assert_eq!(lines, vec!["EMPTY=", "JOB_ID=42", expected_path.as_str()]);
}

#[tokio::test]
async fn argv_values_arrive_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    // Each argument is followed by the ASCII unit separator, which none of them contains.
    write_script(
        dir.path(),
        "args.sh",
        r#"printf '%s\n' "$#"; for arg in "$@"; do printf '%s\037' "$arg"; done"#,
    );
    let args = [
        "two words",
        "it's \"quoted\"",
        "a; rm -rf /tmp/x",
        "$(touch pwned.txt)",
        "`touch pwned.txt`",
        "line one\nline two",
        "--send",
        "",
        "*",
    ];

    let outcome = run_spec(spec(dir.path(), "./args.sh", &args)).await;

    assert_eq!(outcome.exit, Exit::Code(0));
    let (count, values) = outcome.log.split_once('\n').unwrap();
    assert_eq!(count, args.len().to_string());
    let received: Vec<&str> = values
        .strip_suffix('\u{1f}')
        .unwrap()
        .split('\u{1f}')
        .collect();
    assert_eq!(received, args);
    assert!(!dir.path().join("pwned.txt").exists(), "a shell ran");
}

#[tokio::test]
async fn script_receives_resolved_path() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "name.sh", r#"printf '%s\n' "$0""#);

    let outcome = run_spec(spec(dir.path(), "./name.sh", &[])).await;

    // The kernel passes the path given to execve, not argv[0], to the interpreter.
    let expected = format!("{}\n", dir.path().join("name.sh").display());
    assert_eq!(outcome.log, expected);
}

#[tokio::test]
async fn cwd_is_the_scripts_directory() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), "where.sh", "pwd -P");

    let outcome = run_spec(spec(dir.path(), "./where.sh", &[])).await;

    let expected = dir.path().canonicalize().unwrap();
    assert_eq!(outcome.log.trim_end(), expected.display().to_string());
}
