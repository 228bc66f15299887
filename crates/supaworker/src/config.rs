//! Worker configuration from the environment (and `.env` in the working directory, loaded by
//! `main` before this runs). Everything is validated before the runtime connects anywhere;
//! every problem is reported by variable name with the fix, all at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;

use crate::actions::{ActionTable, TableError};

/// Exit status for a configuration error (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Upper bound of every duration setting; longer values are configuration mistakes.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The Twilio variables a real send needs.
pub const TWILIO_VARIABLES: [&str; 3] = ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_FROM"];

/// One invalid or missing setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub variable: String,
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.variable, self.message)
    }
}

/// Every problem found in the environment.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

/// The key the worker authenticates to Supabase with.
#[derive(Clone, PartialEq, Eq)]
pub enum ApiKey {
    /// A legacy `service_role` JWT: sent as `apikey` and as `Authorization: Bearer`.
    LegacyServiceRole(String),
    /// An `sb_secret_…` key: sent as `apikey` only.
    Secret(String),
}

impl ApiKey {
    pub fn expose(&self) -> &str {
        match self {
            ApiKey::LegacyServiceRole(key) | ApiKey::Secret(key) => key,
        }
    }

    pub fn is_jwt(&self) -> bool {
        matches!(self, ApiKey::LegacyServiceRole(_))
    }

    /// Returns the first six characters, the maximum a log line may show of a key.
    pub fn redacted(&self) -> String {
        let prefix: String = self.expose().chars().take(6).collect();
        format!("{prefix}…")
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({})", self.redacted())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal (fly.io's log stream), text at a terminal.
    Auto,
    Json,
    Text,
}

/// The worker's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub supabase_url: url::Url,
    pub api_key: ApiKey,
    /// Twilio settings by name, for the send action; empty values are treated as missing.
    pub twilio: BTreeMap<String, String>,
    pub sweep_interval: Duration,
    pub sweep_page_size: usize,
    pub concurrency: usize,
    pub scripts_dir: PathBuf,
    pub actions: ActionTable,
    pub instance_id: String,
    pub drain_period: Duration,
    pub kill_grace: Duration,
    pub log_format: LogFormat,
    pub log_flush_interval: Duration,
    pub log_max_bytes: usize,
    pub heartbeat_interval: Duration,
    pub realtime_enabled: bool,
    pub request_timeout: Duration,
    pub rescue_interval: Duration,
    pub rescue_grace: Duration,
    pub health_addr: Option<SocketAddr>,
}

/// Reads settings from a name → value lookup, so tests need not touch the process
/// environment.
pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut problem = |variable: &str, message: String| {
        problems.push(ConfigProblem {
            variable: variable.to_string(),
            message,
        })
    };
    let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

    let supabase_url = match get("SUPABASE_URL") {
        None => {
            problem(
                "SUPABASE_URL",
                "missing; set it to your project URL, e.g. https://abcd.supabase.co \
                 (Project Settings → API)"
                    .into(),
            );
            None
        }
        Some(text) => match url::Url::parse(text.trim()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Some(url)
            }
            Ok(_) | Err(_) => {
                problem(
                    "SUPABASE_URL",
                    format!(
                        "{:?} is not an http(s) URL; set it like https://abcd.supabase.co",
                        text
                    ),
                );
                None
            }
        },
    };

    let api_key = read_api_key(&get, &mut problem);

    let mut twilio = BTreeMap::new();
    for name in TWILIO_VARIABLES {
        if let Some(value) = get(name) {
            twilio.insert(name.to_string(), value);
        }
    }

    let sweep_interval = read_duration(
        &get,
        &mut problem,
        "SUPAWORKER_SWEEP_INTERVAL",
        Duration::from_secs(15),
        Duration::from_millis(100),
    );
    let sweep_page_size = read_number(
        &get,
        &mut problem,
        "SUPAWORKER_SWEEP_PAGE_SIZE",
        100,
        1,
        1000,
    );
    let concurrency = read_number(&get, &mut problem, "SUPAWORKER_CONCURRENCY", 2, 1, 1024);
    let drain_period = read_duration(
        &get,
        &mut problem,
        "SUPAWORKER_DRAIN_PERIOD",
        Duration::from_secs(45),
        Duration::ZERO,
    );
    let kill_grace = read_duration(
        &get,
        &mut problem,
        "SUPAWORKER_KILL_GRACE",
        Duration::from_secs(10),
        Duration::ZERO,
    );
    let log_flush_interval = read_duration(
        &get,
        &mut problem,
        "SUPAWORKER_LOG_FLUSH_INTERVAL",
        Duration::from_secs(2),
        Duration::from_millis(100),
    );
    let log_max_bytes = read_number(
        &get,
        &mut problem,
        "SUPAWORKER_LOG_MAX_BYTES",
        256 * 1024,
        1024,
        16 * 1024 * 1024,
    );
    let heartbeat_interval = read_duration(
        &get,
        &mut problem,
        "SUPAWORKER_HEARTBEAT_INTERVAL",
        Duration::from_secs(25),
        Duration::from_millis(100),
    );
    let request_timeout = read_duration(
        &get,
        &mut problem,
        "SUPAWORKER_REQUEST_TIMEOUT",
        Duration::from_secs(15),
        Duration::from_millis(100),
    );
    let rescue_interval = read_duration(
        &get,
        &mut problem,
        "SUPAWORKER_RESCUE_INTERVAL",
        Duration::from_secs(60),
        Duration::from_millis(100),
    );
    let rescue_grace = read_duration(
        &get,
        &mut problem,
        "SUPAWORKER_RESCUE_GRACE",
        Duration::from_secs(300),
        Duration::ZERO,
    );

    let realtime_enabled = match get("SUPAWORKER_REALTIME").as_deref().map(str::trim) {
        None | Some("on") | Some("true") | Some("1") => true,
        Some("off") | Some("false") | Some("0") => false,
        Some(other) => {
            problem(
                "SUPAWORKER_REALTIME",
                format!("{other:?} is invalid; use on or off"),
            );
            true
        }
    };

    let log_format = match get("SUPAWORKER_LOG_FORMAT").as_deref().map(str::trim) {
        None | Some("auto") => LogFormat::Auto,
        Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(other) => {
            problem(
                "SUPAWORKER_LOG_FORMAT",
                format!("{other:?} is invalid; use auto, json or text"),
            );
            LogFormat::Auto
        }
    };

    let health_addr = match get("SUPAWORKER_HEALTH_ADDR") {
        None => None,
        Some(text) => match text.trim().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problem(
                    "SUPAWORKER_HEALTH_ADDR",
                    format!("{text:?} is not a socket address; write it like 0.0.0.0:9090"),
                );
                None
            }
        },
    };

    let scripts_dir = match get("SUPAWORKER_SCRIPTS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    };
    if !scripts_dir.is_dir() {
        problem(
            "SUPAWORKER_SCRIPTS_DIR",
            format!(
                "{} is not a directory; set it to the folder that holds the job scripts",
                scripts_dir.display()
            ),
        );
    }
    let scripts_dir = std::fs::canonicalize(&scripts_dir).unwrap_or(scripts_dir);

    let actions = match get("SUPAWORKER_ACTIONS_FILE") {
        None => Some(ActionTable::builtin()),
        Some(path) => match ActionTable::load(std::path::Path::new(path.trim())) {
            Ok(table) => Some(table),
            Err(error) => {
                let fix = match error {
                    TableError::Unreadable { .. } => {
                        "point the variable at an existing file, or unset it to use the built-in table"
                    }
                    TableError::Syntax { .. } => {
                        "fix the file or unset the variable to use the built-in table"
                    }
                    _ => "fix the action definition",
                };
                problem("SUPAWORKER_ACTIONS_FILE", format!("{error}; {fix}"));
                None
            }
        },
    };

    let instance_id = get("SUPAWORKER_INSTANCE_ID")
        .or_else(|| get("FLY_MACHINE_ID"))
        .or_else(host_name)
        .unwrap_or_else(|| "supaworker".to_string());
    if instance_id.len() > 200 || instance_id.chars().any(|c| c.is_control() || c == ' ') {
        problem(
            "SUPAWORKER_INSTANCE_ID",
            format!(
                "{:?} is invalid; use at most 200 characters without spaces",
                crate::actions::shorten(&instance_id)
            ),
        );
    }

    match (supabase_url, api_key, actions) {
        (Some(supabase_url), Some(api_key), Some(actions)) if problems.is_empty() => Ok(Config {
            supabase_url,
            api_key,
            twilio,
            sweep_interval,
            sweep_page_size,
            concurrency,
            scripts_dir,
            actions,
            instance_id,
            drain_period,
            kill_grace,
            log_format,
            log_flush_interval,
            log_max_bytes,
            heartbeat_interval,
            realtime_enabled,
            request_timeout,
            rescue_interval,
            rescue_grace,
            health_addr,
        }),
        _ => Err(ConfigError { problems }),
    }
}

/// Reads the process environment.
pub fn from_env() -> Result<Config, ConfigError> {
    from_lookup(|name| std::env::var(name).ok())
}

fn read_api_key(
    get: &impl Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(&str, String),
) -> Option<ApiKey> {
    let service_role = get("SUPABASE_SERVICE_ROLE_KEY");
    let secret = get("SUPABASE_SECRET_KEY");
    let (variable, key) = match (secret, service_role) {
        (Some(key), _) => ("SUPABASE_SECRET_KEY", key.trim().to_string()),
        (None, Some(key)) => ("SUPABASE_SERVICE_ROLE_KEY", key.trim().to_string()),
        (None, None) => {
            problem(
                "SUPABASE_SECRET_KEY",
                "missing; set SUPABASE_SECRET_KEY to an sb_secret_… key, or \
                 SUPABASE_SERVICE_ROLE_KEY to the legacy service_role JWT \
                 (Project Settings → API Keys)"
                    .into(),
            );
            return None;
        }
    };
    if key.starts_with("sb_secret_") {
        return Some(ApiKey::Secret(key));
    }
    let under_rls = "under row level security it would claim nothing and every job would \
                     stay pending without an error";
    if key.starts_with("sb_publishable_") {
        problem(
            variable,
            format!(
                "is a publishable key (sb_publishable_…); {under_rls}. Use the secret key \
                 (sb_secret_…) in SUPABASE_SECRET_KEY"
            ),
        );
        return None;
    }
    match jwt_role(&key) {
        Some(role) if role == "service_role" => Some(ApiKey::LegacyServiceRole(key)),
        Some(role) => {
            problem(
                variable,
                format!(
                    "is a JWT for role {role:?}, not service_role; {under_rls}. Use the \
                     service_role key, or an sb_secret_… key in SUPABASE_SECRET_KEY"
                ),
            );
            None
        }
        None => {
            problem(
                variable,
                "is neither an sb_secret_… key nor a JWT with a role claim; copy the key \
                 again from Project Settings → API Keys"
                    .into(),
            );
            None
        }
    }
}

/// Reads the `role` claim of a JWT without verifying it: the server verifies, the worker only
/// wants to catch a wrong key before it starts.
pub fn jwt_role(token: &str) -> Option<String> {
    let claims = jwt_claims(token)?;
    claims.get("role")?.as_str().map(str::to_string)
}

/// Decodes the claims segment of a JWT without verifying it.
pub fn jwt_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_header, claims, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

fn read_duration(
    get: &impl Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(&str, String),
    variable: &str,
    default: Duration,
    min: Duration,
) -> Duration {
    let Some(text) = get(variable) else {
        return default;
    };
    let parsed = humantime::parse_duration(text.trim()).or_else(|error| {
        // A bare number means seconds.
        text.trim()
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or(error)
    });
    match parsed {
        Ok(value) if value > MAX_DURATION => {
            problem(
                variable,
                format!("{text:?} is too long; use at most 7 days"),
            );
            default
        }
        Ok(value) if value >= min => value,
        Ok(_) => {
            problem(
                variable,
                format!(
                    "{text:?} is too short; use at least {}",
                    humantime::format_duration(min)
                ),
            );
            default
        }
        Err(_) => {
            problem(
                variable,
                format!("{text:?} is not a duration; write it like 15s, 500ms or 2m"),
            );
            default
        }
    }
}

fn read_number(
    get: &impl Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(&str, String),
    variable: &str,
    default: usize,
    min: usize,
    max: usize,
) -> usize {
    let Some(text) = get(variable) else {
        return default;
    };
    match text.trim().parse::<usize>() {
        Ok(value) if (min..=max).contains(&value) => value,
        _ => {
            problem(
                variable,
                format!("{text:?} is invalid; use a whole number from {min} to {max}"),
            );
            default
        }
    }
}

fn host_name() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn unsigned_jwt(role: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = engine.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = engine.encode(format!(r#"{{"role":"{role}","exp":4102444800}}"#));
        format!("{header}.{claims}.c2ln")
    }

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn minimal_config_has_defaults() {
        let config = config(&[
            ("SUPABASE_URL", "http://127.0.0.1:54321"),
            ("SUPABASE_SECRET_KEY", "sb_secret_abc"),
            ("SUPAWORKER_INSTANCE_ID", "w1"),
        ])
        .unwrap();
        assert_eq!(config.sweep_interval, Duration::from_secs(15));
        assert_eq!(config.concurrency, 2);
        assert_eq!(config.instance_id, "w1");
        assert!(matches!(config.api_key, ApiKey::Secret(_)));
        assert!(!format!("{config:?}").contains("sb_secret_abc"));
    }

    #[test]
    fn missing_values_are_all_reported() {
        let err = config(&[("SUPAWORKER_CONCURRENCY", "zero")]).unwrap_err();
        let names: Vec<&str> = err.problems.iter().map(|p| p.variable.as_str()).collect();
        assert!(names.contains(&"SUPABASE_URL"), "{err}");
        assert!(names.contains(&"SUPABASE_SECRET_KEY"), "{err}");
        assert!(names.contains(&"SUPAWORKER_CONCURRENCY"), "{err}");
    }

    #[test]
    fn anon_and_publishable_keys_are_rejected() {
        let anon = unsigned_jwt("anon");
        let err = config(&[
            ("SUPABASE_URL", "https://abcd.supabase.co"),
            ("SUPABASE_SERVICE_ROLE_KEY", &anon),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("\"anon\""), "{err}");
        assert!(err.to_string().contains("row level security"), "{err}");
        let err = config(&[
            ("SUPABASE_URL", "https://abcd.supabase.co"),
            ("SUPABASE_SECRET_KEY", "sb_publishable_x"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("publishable"), "{err}");
    }

    #[test]
    fn service_role_jwt_is_accepted() {
        let key = unsigned_jwt("service_role");
        let config = config(&[
            ("SUPABASE_URL", "https://abcd.supabase.co"),
            ("SUPABASE_SERVICE_ROLE_KEY", &key),
        ])
        .unwrap();
        assert!(config.api_key.is_jwt());
    }

    #[test]
    fn invalid_values_name_the_fix() {
        let err = config(&[
            ("SUPABASE_URL", "abcd.supabase.co"),
            ("SUPABASE_SECRET_KEY", "sb_secret_x"),
            ("SUPAWORKER_SWEEP_INTERVAL", "often"),
            ("SUPAWORKER_KILL_GRACE", "1e20"),
            ("SUPAWORKER_LOG_FORMAT", "xml"),
            ("SUPAWORKER_SCRIPTS_DIR", "/nonexistent/dir"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("SUPABASE_URL: \"abcd.supabase.co\""),
            "{text}"
        );
        assert!(text.contains("SUPAWORKER_SWEEP_INTERVAL"), "{text}");
        assert!(
            text.contains("SUPAWORKER_KILL_GRACE: \"1e20\" is not a duration"),
            "{text}"
        );
        assert!(text.contains("auto, json or text"), "{text}");
        assert!(text.contains("/nonexistent/dir"), "{text}");
    }

    #[test]
    fn bare_seconds_are_durations() {
        let config = config(&[
            ("SUPABASE_URL", "http://127.0.0.1:1"),
            ("SUPABASE_SECRET_KEY", "sb_secret_x"),
            ("SUPAWORKER_SWEEP_INTERVAL", "1.5"),
        ])
        .unwrap();
        assert_eq!(config.sweep_interval, Duration::from_millis(1500));
    }
}
