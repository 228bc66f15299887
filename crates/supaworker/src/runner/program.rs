//! Finding the program to run before anything is spawned, so that a wrong path, a
//! missing `chmod +x` or a missing interpreter is reported with its fix instead of as a
//! bare `ENOENT` from `execve`.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Bytes of a script that Linux reads for the `#!` line (`BINPRM_BUF_SIZE` is 256 since
/// Linux 5.1).
const SHEBANG_MAX_BYTES: usize = 256;

/// Reason that a job's program could not be started. Apart from [`SpawnError::Spawn`] with a
/// transient OS error, retrying does not help until the configuration or the machine
/// is fixed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpawnError {
    #[error(
        "working directory {} not found or not a directory: create it or fix the configured \
         scripts directory",
        cwd.display()
    )]
    CwdNotFound { cwd: PathBuf },

    #[error(
        "program {} not found (configured as {}, cwd {}): {}",
        path.display(),
        program.display(),
        cwd.display(),
        missing_path_hint(path)
    )]
    NotFound {
        program: PathBuf,
        path: PathBuf,
        cwd: PathBuf,
    },

    #[error(
        "{program} not found in PATH \"{path_env}\" of the job environment (cwd {}): {}",
        cwd.display(),
        missing_command_hint(program)
    )]
    NotInPath {
        program: String,
        path_env: String,
        cwd: PathBuf,
    },

    #[error(
        "program {} is a directory, not a file (cwd {}): fix the program path",
        path.display(),
        cwd.display()
    )]
    NotAFile { path: PathBuf, cwd: PathBuf },

    #[error(
        "program {} is not executable (cwd {}): run chmod +x {}",
        path.display(),
        cwd.display(),
        path.display()
    )]
    NotExecutable { path: PathBuf, cwd: PathBuf },

    #[error(
        "interpreter {interpreter} named by the #! line of {} not found: {}",
        script.display(),
        missing_command_hint(interpreter)
    )]
    InterpreterNotFound {
        script: PathBuf,
        interpreter: String,
    },

    #[error(
        "interpreter {interpreter} named by the #! line of {} is not executable: run chmod +x \
         {interpreter} or fix the #! line",
        script.display()
    )]
    InterpreterNotExecutable {
        script: PathBuf,
        interpreter: String,
    },

    #[error(
        "starting {} in {} failed: {message}{}",
        program.display(),
        cwd.display(),
        spawn_hint(*raw_os_error)
    )]
    Spawn {
        program: PathBuf,
        cwd: PathBuf,
        message: String,
        raw_os_error: Option<i32>,
    },
}

impl SpawnError {
    /// Returns whether the same spawn may succeed later without a change to the configuration:
    /// true only for out-of-memory and process-limit errors (`ENOMEM`, `EAGAIN`).
    pub fn retry_may_help(&self) -> bool {
        match self {
            SpawnError::Spawn { raw_os_error, .. } => matches!(
                raw_os_error.map(nix::errno::Errno::from_raw),
                Some(nix::errno::Errno::ENOMEM | nix::errno::Errno::EAGAIN)
            ),
            _ => false,
        }
    }
}

fn missing_path_hint(path: &Path) -> &'static str {
    let in_venv = path
        .components()
        .any(|component| matches!(component, Component::Normal(name) if name == ".venv" || name == "venv"));
    if in_venv {
        "create the virtual environment (python3 -m venv .venv) in the scripts directory"
    } else {
        "fix the program path or add the file"
    }
}

fn missing_command_hint(program: &str) -> String {
    let name = program.rsplit('/').next().unwrap_or(program);
    if name.starts_with("python") {
        format!("install {name} or create .venv and configure .venv/bin/python")
    } else {
        format!("install {name} or add its directory to PATH in the job environment")
    }
}

fn spawn_hint(raw_os_error: Option<i32>) -> &'static str {
    match raw_os_error.map(nix::errno::Errno::from_raw) {
        Some(nix::errno::Errno::ENOEXEC) => {
            " (the file is not a binary and has no #! line: add one such as #!/bin/sh)"
        }
        Some(nix::errno::Errno::EACCES) => {
            " (permission denied: check the execute bits of the program and its directories)"
        }
        _ => "",
    }
}

/// Resolves `program` as `execvp` in the child would, and checks that it can run.
///
/// A path with a `/` is taken relative to `cwd` (pass an absolute `cwd` to get an
/// absolute path). A bare name is looked up in `path_env`, the `PATH` of the job's
/// environment, skipping empty entries. The file must exist, be a regular file and
/// have an execute bit. If it starts with `#!`, the interpreter must exist too, and
/// for `#!/usr/bin/env NAME` (also with `-S`), `NAME` must be in `path_env`.
pub fn resolve_program(program: &Path, cwd: &Path, path_env: &str) -> Result<PathBuf, SpawnError> {
    if !cwd.is_dir() {
        return Err(SpawnError::CwdNotFound {
            cwd: cwd.to_path_buf(),
        });
    }

    let path = if program.as_os_str().as_encoded_bytes().contains(&b'/') {
        // `components` drops inner `.` parts, so "./run.sh" gives "<cwd>/run.sh".
        let path: PathBuf = cwd.join(program).components().collect();
        check_executable(&path, cwd).map_err(|error| match error {
            Unusable::Missing => SpawnError::NotFound {
                program: program.to_path_buf(),
                path: path.clone(),
                cwd: cwd.to_path_buf(),
            },
            Unusable::Spawn(error) => error,
        })?;
        path
    } else {
        search_path(program.as_os_str(), cwd, path_env)?
    };

    check_interpreter(&path, cwd, path_env)?;
    Ok(path)
}

enum Unusable {
    Missing,
    Spawn(SpawnError),
}

fn check_executable(path: &Path, cwd: &Path) -> Result<(), Unusable> {
    let metadata = std::fs::metadata(path).map_err(|_| Unusable::Missing)?;
    if metadata.is_dir() {
        return Err(Unusable::Spawn(SpawnError::NotAFile {
            path: path.to_path_buf(),
            cwd: cwd.to_path_buf(),
        }));
    }
    // NOTE: this checks the mode bits, not access(2) for this user, so a file executable
    // only by another user passes here and fails at spawn with EACCES.
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(Unusable::Spawn(SpawnError::NotExecutable {
            path: path.to_path_buf(),
            cwd: cwd.to_path_buf(),
        }));
    }
    Ok(())
}

/// Looks `name` up in `path_env`. As with `execvp`, a match that is not executable is
/// skipped, but it is reported if nothing later matches.
fn search_path(name: &OsStr, cwd: &Path, path_env: &str) -> Result<PathBuf, SpawnError> {
    let mut first_unusable = None;
    for dir in path_env.split(':').filter(|dir| !dir.is_empty()) {
        let candidate = cwd.join(dir).join(name);
        match check_executable(&candidate, cwd) {
            Ok(()) => return Ok(candidate),
            Err(Unusable::Missing) => {}
            Err(Unusable::Spawn(error)) => {
                first_unusable.get_or_insert(error);
            }
        }
    }
    Err(first_unusable.unwrap_or_else(|| SpawnError::NotInPath {
        program: name.to_string_lossy().into_owned(),
        path_env: path_env.to_owned(),
        cwd: cwd.to_path_buf(),
    }))
}

/// Checks the interpreter named by a `#!` line, if the file has one.
fn check_interpreter(script: &Path, cwd: &Path, path_env: &str) -> Result<(), SpawnError> {
    let Some(line) = read_shebang(script) else {
        return Ok(());
    };
    let mut parts = line.splitn(2, [' ', '\t']);
    let interpreter = parts.next().unwrap_or_default();
    let argument = parts.next().unwrap_or_default().trim();
    if interpreter.is_empty() {
        return Ok(());
    }

    let interpreter_path = cwd.join(interpreter);
    match check_executable(&interpreter_path, cwd) {
        Ok(()) => {}
        Err(Unusable::Missing) => {
            return Err(SpawnError::InterpreterNotFound {
                script: script.to_path_buf(),
                interpreter: interpreter.to_owned(),
            })
        }
        Err(Unusable::Spawn(_)) => {
            return Err(SpawnError::InterpreterNotExecutable {
                script: script.to_path_buf(),
                interpreter: interpreter.to_owned(),
            })
        }
    }

    let is_env = Path::new(interpreter).file_name() == Some(OsStr::new("env"));
    let Some(command) = is_env.then(|| env_command(argument)).flatten() else {
        return Ok(());
    };
    match search_path(OsStr::new(&command), cwd, path_env) {
        Ok(_) => Ok(()),
        Err(SpawnError::NotInPath { .. }) => Err(SpawnError::InterpreterNotFound {
            script: script.to_path_buf(),
            interpreter: command,
        }),
        Err(_) => Err(SpawnError::InterpreterNotExecutable {
            script: script.to_path_buf(),
            interpreter: command,
        }),
    }
}

/// Returns the command that `env` runs for the rest of a `#!/usr/bin/env …` line, if it can be
/// determined without running `env`. Linux passes the rest of the line as one argument, so
/// without `-S` the whole rest (spaces included) is the command name.
fn env_command(argument: &str) -> Option<String> {
    if let Some(split) = argument.strip_prefix("-S") {
        return split
            .split_whitespace()
            .find(|word| !word.starts_with('-') && !word.contains('='))
            .map(str::to_owned);
    }
    if argument.is_empty() || argument.starts_with('-') {
        return None;
    }
    Some(argument.to_owned())
}

/// Returns the `#!` line of `path` without `#!` and surrounding whitespace, if the file
/// starts with one.
fn read_shebang(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut start = Vec::with_capacity(SHEBANG_MAX_BYTES);
    file.take(SHEBANG_MAX_BYTES as u64)
        .read_to_end(&mut start)
        .ok()?;
    let rest = start.strip_prefix(b"#!")?;
    let line_end = rest
        .iter()
        .position(|&byte| byte == b'\n')
        .unwrap_or(rest.len());
    let line = std::str::from_utf8(&rest[..line_end]).ok()?;
    Some(line.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_command_forms() {
        assert_eq!(env_command("python3"), Some("python3".to_owned()));
        assert_eq!(env_command("-S python3 -u"), Some("python3".to_owned()));
        assert_eq!(env_command("-S A=1 -i bash"), Some("bash".to_owned()));
        assert_eq!(env_command("python3 -u"), Some("python3 -u".to_owned()));
        assert_eq!(env_command(""), None);
        assert_eq!(env_command("-i"), None);
    }

    #[test]
    fn retry_helps_only_for_transient_errors() {
        let spawn = |errno: nix::errno::Errno| SpawnError::Spawn {
            program: PathBuf::from("/x"),
            cwd: PathBuf::from("/"),
            message: errno.desc().to_owned(),
            raw_os_error: Some(errno as i32),
        };
        assert!(spawn(nix::errno::Errno::EAGAIN).retry_may_help());
        assert!(!spawn(nix::errno::Errno::ENOEXEC).retry_may_help());
        assert!(!SpawnError::CwdNotFound {
            cwd: PathBuf::from("/nope")
        }
        .retry_may_help());
    }
}
