//! `supaworker check`: diagnoses a deployment before it runs jobs. It validates the
//! configuration, reads the `jobs` table through PostgREST with the key, joins Realtime and
//! waits for the readiness message, and checks each action's program, interpreter and
//! script. Every check prints one line, `ok`, `problem` (with the fix) or `skipped`.

use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::actions::Action;
use crate::config::{ApiKey, Config, ConfigError};
use crate::postgrest::{Rest, RestError, JOBS_COLUMNS};
use crate::realtime::{self, RealtimeConfig, RealtimeStats};

/// The SQL that puts `jobs` into the publication Realtime reads changes from.
pub const PUBLICATION_FIX: &str = "alter publication supabase_realtime add table public.jobs;";

/// PATH for children when the worker has none, as the job runner sets it.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Problem,
    /// Not run, because an earlier check failed or the feature is off.
    Skipped,
}

/// One printed line of `supaworker check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Name of the checked item, such as `postgrest` or `action send_sms`.
    pub subject: String,
    pub verdict: Verdict,
    pub detail: String,
    /// Action that resolves a problem.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(subject: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding {
            subject: subject.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn problem(
        subject: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            subject: subject.into(),
            verdict: Verdict::Problem,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skipped(subject: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding {
            subject: subject.into(),
            verdict: Verdict::Skipped,
            detail: detail.into(),
            fix: None,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Problem => "problem",
            Verdict::Skipped => "skipped",
        };
        write!(f, "{verdict:<8} {}: {}", self.subject, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// Settings of a check run.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// How long to wait for Realtime's "Subscribed to PostgreSQL".
    pub realtime_timeout: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            realtime_timeout: Duration::from_secs(20),
        }
    }
}

/// Runs every check that the configuration allows and returns the findings in order.
pub async fn run(config: Result<Config, ConfigError>, options: &CheckOptions) -> Vec<Finding> {
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            let mut findings: Vec<Finding> = error
                .problems
                .iter()
                .map(|problem| Finding {
                    subject: "config".into(),
                    verdict: Verdict::Problem,
                    detail: problem.to_string(),
                    fix: None,
                })
                .collect();
            findings.push(Finding::skipped(
                "postgrest, realtime, actions",
                "they need a valid configuration",
            ));
            return findings;
        }
    };
    let mut findings = vec![describe_config(&config)];

    let rest = Rest::new(
        &config.supabase_url,
        config.api_key.clone(),
        config.request_timeout,
    );
    let table = check_jobs_table(&rest, &config).await;
    let table_ok = table.verdict == Verdict::Ok;
    findings.push(table);

    if !config.realtime_enabled {
        findings.push(Finding::skipped(
            "realtime",
            "SUPAWORKER_REALTIME=off, so jobs are found by the sweep only",
        ));
    } else if !table_ok {
        findings.push(Finding::skipped(
            "realtime",
            "it needs a working key and jobs table",
        ));
    } else {
        findings.push(check_realtime(&config, options.realtime_timeout).await);
    }

    let path_env = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string());
    for action in config.actions.iter() {
        findings.push(check_action(&config, action, &path_env));
    }
    findings
}

/// Returns whether any finding is a problem.
pub fn has_problems(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.verdict == Verdict::Problem)
}

fn describe_config(config: &Config) -> Finding {
    let key = match &config.api_key {
        ApiKey::Secret(_) => "secret key (sb_secret_…)",
        ApiKey::LegacyServiceRole(_) => "legacy service_role JWT",
    };
    Finding::ok(
        "config",
        format!(
            "instance {}, {} at {}, {} actions from {}, scripts directory {}",
            config.instance_id,
            key,
            config.supabase_url,
            config.actions.iter().count(),
            config.actions.source_name,
            config.scripts_dir.display()
        ),
    )
}

async fn check_jobs_table(rest: &Rest, config: &Config) -> Finding {
    let url = &config.supabase_url;
    let error = match rest.probe_jobs_table().await {
        Ok(()) => {
            return Finding::ok(
                "postgrest",
                format!(
                    "the key is accepted at {url} and table jobs has the columns {}",
                    JOBS_COLUMNS.join(", ")
                ),
            )
        }
        Err(error) => error,
    };
    match &error {
        RestError::Auth { status, message } => Finding::problem(
            "postgrest",
            format!("the API key was rejected at {url} ({status}: {message})"),
            "copy the secret key (sb_secret_…) into SUPABASE_SECRET_KEY, or the service_role \
             JWT into SUPABASE_SERVICE_ROLE_KEY, from Project Settings → API Keys of this project",
        ),
        RestError::Schema { code, message, .. } if is_missing_table(code) => Finding::problem(
            "jobs table",
            format!("table public.jobs not found ({code}: {message})"),
            "create it with PART 1 of scripts/schema.sql in the SQL editor",
        ),
        RestError::Schema { code, message, .. } if is_missing_column(code) => {
            missing_columns_finding(rest, code, message).await
        }
        RestError::Schema { code, message, .. } => Finding::problem(
            "jobs table",
            format!("schema problem ({code}: {message})"),
            "expose the public schema in the project's API settings and create jobs with scripts/schema.sql",
        ),
        RestError::Transient { .. } | RestError::Ambiguous { .. } => Finding::problem(
            "postgrest",
            format!("cannot read jobs at {url}: {error}"),
            "check SUPABASE_URL and that the project is running and reachable from this machine",
        ),
        RestError::Rejected { .. } => Finding::problem(
            "postgrest",
            format!("reading jobs at {url} failed: {error}"),
            "check SUPABASE_URL (the project URL, without /rest/v1)",
        ),
    }
}

fn is_missing_table(code: &str) -> bool {
    matches!(code, "PGRST205" | "42P01")
}

fn is_missing_column(code: &str) -> bool {
    matches!(code, "PGRST204" | "42703")
}

/// Probes each column alone, because PostgREST names only the first missing one.
async fn missing_columns_finding(rest: &Rest, code: &str, message: &str) -> Finding {
    let mut missing = Vec::new();
    for column in JOBS_COLUMNS {
        if let Err(RestError::Schema { code, .. }) = rest.probe_jobs_columns(&[column]).await {
            if is_missing_column(&code) {
                missing.push(column);
            }
        }
    }
    if missing.is_empty() {
        // NOTE: a column can fail the combined select but pass alone while the schema cache
        // is being reloaded. The server's message is then the best lead.
        return Finding::problem(
            "jobs table",
            format!("a column is missing ({code}: {message})"),
            "add the column named in the message (types in scripts/schema.sql), then run: notify pgrst, 'reload schema';",
        );
    }
    let statements: Vec<String> = missing
        .iter()
        .map(|column| {
            format!(
                "alter table public.jobs add column {column} {};",
                column_type(column)
            )
        })
        .collect();
    Finding::problem(
        "jobs table",
        format!("table jobs lacks the column(s) {}", missing.join(", ")),
        format!(
            "run: {} notify pgrst, 'reload schema';",
            statements.join(" ")
        ),
    )
}

/// Returns the column type of `jobs`, as scripts/schema.sql creates it.
fn column_type(column: &str) -> &'static str {
    match column {
        "id" => "bigint generated by default as identity primary key",
        "payload" => "jsonb not null default '{}'::jsonb",
        "status" => "text not null default 'pending'",
        "created_at" => "timestamptz not null default now()",
        "started_at" | "finished_at" => "timestamptz",
        "action" => "text not null",
        _ => "text",
    }
}

async fn check_realtime(config: &Config, timeout: Duration) -> Finding {
    let mut realtime_config = RealtimeConfig::new(
        config.supabase_url.clone(),
        config.api_key.expose().to_string(),
        "public".into(),
        "jobs".into(),
    );
    realtime_config.readiness_timeout = timeout;
    realtime_config.heartbeat_interval = config.heartbeat_interval;
    let (hint_tx, _hint_rx) = mpsc::channel(16);
    let (ready_tx, mut ready_rx) = watch::channel(0u64);
    let stats = Arc::new(RealtimeStats::default());
    let stop = CancellationToken::new();
    let task = realtime::spawn(
        realtime_config,
        hint_tx,
        ready_tx,
        stats.clone(),
        stop.clone(),
    );

    let deadline = tokio::time::Instant::now() + timeout;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let outcome = loop {
        if stats.subscribe_errors.load(Ordering::Relaxed) > 0 {
            break RealtimeOutcome::NotInPublication;
        }
        tokio::select! {
            changed = ready_rx.changed() => match changed {
                Ok(()) => break RealtimeOutcome::Subscribed,
                Err(_) => break RealtimeOutcome::TimedOut,
            },
            _ = poll.tick() => {}
            _ = tokio::time::sleep_until(deadline) => break RealtimeOutcome::TimedOut,
        }
    };
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;

    match outcome {
        RealtimeOutcome::Subscribed => Finding::ok(
            "realtime",
            "joined the channel and received \"Subscribed to PostgreSQL\" for public.jobs",
        ),
        RealtimeOutcome::NotInPublication => Finding::problem(
            "realtime",
            "the server could not subscribe to public.jobs (\"Unable to subscribe to changes\"), \
             so no insert would wake the worker; the usual cause is that jobs is not in the \
             supabase_realtime publication",
            format!("run in the SQL editor: {PUBLICATION_FIX}"),
        ),
        RealtimeOutcome::TimedOut => {
            let snapshot = stats.snapshot();
            let state = if snapshot.connected {
                "the websocket is open but the channel never became ready"
            } else {
                "the websocket did not stay connected"
            };
            Finding::problem(
                "realtime",
                format!(
                    "no \"Subscribed to PostgreSQL\" within {}: {state} ({} connect attempts, {} joins)",
                    humantime::format_duration(timeout),
                    snapshot.connect_attempts,
                    snapshot.joins
                ),
                "check that Realtime is enabled for the project and that wss connections to \
                 SUPABASE_URL are allowed; run with RUST_LOG=info to see the client's errors. \
                 The worker still finds jobs by sweeping, later",
            )
        }
    }
}

enum RealtimeOutcome {
    Subscribed,
    NotInPublication,
    TimedOut,
}

fn check_action(config: &Config, action: &Action, path_env: &str) -> Finding {
    let subject = format!("action {}", action.name);
    let scripts_dir = &config.scripts_dir;
    let program = crate::job::program_path(Path::new(&action.program), scripts_dir);
    let resolved = match crate::runner::resolve_program(&program, scripts_dir, path_env) {
        Ok(path) => path,
        Err(error) => {
            return Finding::problem(subject, error.to_string(), program_fix(action, scripts_dir))
        }
    };
    let mut detail = format!("program {}", resolved.display());
    if action.program == "python" && !scripts_dir.join(".venv/bin/python").exists() {
        detail.push_str(&format!(
            " (no virtual environment at {}, so python3 from PATH)",
            scripts_dir.join(".venv").display()
        ));
    }
    if let Some(script) = &action.script {
        let path = scripts_dir.join(script);
        if !path.is_file() {
            return Finding::problem(
                subject,
                format!("script not found: {}", path.display()),
                format!(
                    "put {script} into the scripts directory {} or set SUPAWORKER_SCRIPTS_DIR to the folder that has it",
                    scripts_dir.display()
                ),
            );
        }
        detail.push_str(&format!(", script {}", path.display()));
    }
    let missing = crate::job::missing_required_env(config, action);
    if !missing.is_empty() {
        return Finding::problem(
            subject,
            format!(
                "jobs fail before running because these variables are not set: {}",
                missing.join(", ")
            ),
            "set them in the worker's environment or .env (on fly.io: fly secrets set NAME=value)",
        );
    }
    Finding::ok(subject, detail)
}

fn program_fix(action: &Action, scripts_dir: &Path) -> String {
    if action.program == "python" {
        format!(
            "install python3, or create the virtual environment: python3 -m venv {}/.venv",
            scripts_dir.display()
        )
    } else if action.program.contains('/') {
        format!(
            "put {} into {} and make it executable (chmod +x)",
            action.program,
            scripts_dir.display()
        )
    } else {
        format!("install {} or add its folder to PATH", action.program)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_prints_one_line_with_fix() {
        let finding = Finding::problem("realtime", "not subscribed", PUBLICATION_FIX);
        let line = finding.to_string();
        assert_eq!(
            line,
            "problem  realtime: not subscribed; fix: alter publication supabase_realtime add table public.jobs;"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn ok_finding_has_no_fix() {
        let line = Finding::ok("config", "instance w1").to_string();
        assert_eq!(line, "ok       config: instance w1");
    }

    #[test]
    fn column_types_match_schema() {
        assert_eq!(column_type("log"), "text");
        assert_eq!(column_type("started_at"), "timestamptz");
        assert!(column_type("payload").starts_with("jsonb"));
    }
}
