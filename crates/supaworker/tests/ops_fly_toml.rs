//! The deployment files at the workspace root: `fly.toml` must keep the settings that
//! docs/DEPLOY.md promises, and the Dockerfile must keep the properties the worker relies on
//! (same Debian release in both stages, exec-form entry point, a non-root user).

use std::path::PathBuf;
use std::time::Duration;

use supaworker::config;

fn workspace_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn fly_toml() -> toml::Table {
    workspace_file("fly.toml")
        .parse()
        .expect("fly.toml is valid TOML")
}

/// Computes the default drain period plus kill grace, as the worker's configuration sets them.
fn default_shutdown_budget() -> Duration {
    let config = config::from_lookup(|name| match name {
        "SUPABASE_URL" => Some("https://abcd.supabase.co".into()),
        "SUPABASE_SECRET_KEY" => Some("sb_secret_for_defaults".into()),
        "SUPAWORKER_SCRIPTS_DIR" => Some(env!("CARGO_MANIFEST_DIR").into()),
        _ => None,
    })
    .expect("defaults form a valid configuration");
    config.drain_period + config.kill_grace
}

/// Selects the `[[NAME]]` entries that apply to the worker group.
fn worker_entries<'a>(fly: &'a toml::Table, name: &str) -> Vec<&'a toml::Table> {
    fly.get(name)
        .and_then(toml::Value::as_array)
        .map(|entries| {
            entries
                .iter()
                .filter_map(toml::Value::as_table)
                .filter(|entry| match entry.get("processes") {
                    None => true,
                    Some(groups) => groups
                        .as_array()
                        .is_some_and(|groups| groups.iter().any(|g| g.as_str() == Some("worker"))),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Megabytes in a fly memory value: an integer (MB) or a string like "512mb" or "1gb".
fn memory_mb(value: &toml::Value) -> u64 {
    if let Some(mb) = value.as_integer() {
        return mb as u64;
    }
    let text = value
        .as_str()
        .expect("memory is a number or a string")
        .to_lowercase();
    if let Some(gb) = text.strip_suffix("gb") {
        return gb.trim().parse::<u64>().expect("whole gigabytes") * 1024;
    }
    let mb = text.strip_suffix("mb").unwrap_or(&text);
    mb.trim().parse().expect("whole megabytes")
}

#[test]
fn fly_worker_group_has_no_services() {
    let fly = fly_toml();
    let processes = fly
        .get("processes")
        .and_then(toml::Value::as_table)
        .expect("[processes] exists");
    assert_eq!(
        processes.get("worker").and_then(toml::Value::as_str),
        Some("run"),
        "the worker group runs `supaworker run`"
    );
    assert!(fly.get("http_service").is_none(), "no [http_service]");
    assert!(fly.get("services").is_none(), "no [[services]]");
}

#[test]
fn fly_restart_policy_always() {
    let fly = fly_toml();
    let restarts = worker_entries(&fly, "restart");
    assert_eq!(restarts.len(), 1, "one [[restart]] applies to the worker");
    assert_eq!(
        restarts[0].get("policy").and_then(toml::Value::as_str),
        Some("always")
    );
}

#[test]
fn fly_kill_signal_is_sigterm() {
    let fly = fly_toml();
    assert_eq!(
        fly.get("kill_signal").and_then(toml::Value::as_str),
        Some("SIGTERM")
    );
}

#[test]
fn fly_kill_timeout_covers_drain() {
    let fly = fly_toml();
    let text = fly
        .get("kill_timeout")
        .and_then(toml::Value::as_str)
        .expect("kill_timeout is a duration string");
    let kill_timeout = humantime::parse_duration(text).expect("kill_timeout parses");
    let budget = default_shutdown_budget();
    assert!(
        kill_timeout > budget,
        "kill_timeout {kill_timeout:?} must exceed the default drain plus kill grace {budget:?}"
    );
    assert!(
        kill_timeout <= Duration::from_secs(300),
        "fly caps kill_timeout at 300s"
    );
}

#[test]
fn fly_memory_fits_python_children() {
    let fly = fly_toml();
    let vms = worker_entries(&fly, "vm");
    assert_eq!(vms.len(), 1, "one [[vm]] applies to the worker");
    let memory = vms[0].get("memory").expect("[[vm]] sets memory");
    assert!(memory_mb(memory) >= 512, "memory {memory} is below 512 MB");
}

#[test]
fn fly_check_uses_health_port() {
    let fly = fly_toml();
    let port = fly
        .get("env")
        .and_then(|env| env.get("SUPAWORKER_HEALTH_ADDR"))
        .and_then(toml::Value::as_str)
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|port| port.parse::<i64>().ok())
        .expect("[env] sets SUPAWORKER_HEALTH_ADDR with a port");
    let check = fly
        .get("checks")
        .and_then(|checks| checks.get("ready"))
        .expect("[checks.ready] exists");
    assert_eq!(
        check.get("port").and_then(toml::Value::as_integer),
        Some(port)
    );
    assert_eq!(
        check.get("path").and_then(toml::Value::as_str),
        Some("/readyz")
    );
}

#[test]
fn dockerfile_stages_share_debian_release() {
    let dockerfile = workspace_file("Dockerfile");
    let images: Vec<&str> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("FROM "))
        .map(|rest| rest.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(images.len(), 2, "a build and a runtime stage: {images:?}");
    for image in &images {
        assert!(
            image.ends_with("bookworm") || image.ends_with("bookworm-slim"),
            "{image} is not pinned to bookworm"
        );
    }
}

#[test]
fn dockerfile_entrypoint_exec_form() {
    let dockerfile = workspace_file("Dockerfile");
    let entrypoint = dockerfile
        .lines()
        .find(|line| line.starts_with("ENTRYPOINT"))
        .expect("ENTRYPOINT exists");
    let json = entrypoint.trim_start_matches("ENTRYPOINT").trim();
    let argv: Vec<String> =
        serde_json::from_str(json).expect("ENTRYPOINT is exec form (a JSON array)");
    assert_eq!(argv.first().map(String::as_str), Some("/usr/bin/tini"));
    assert_eq!(
        argv.last().map(String::as_str),
        Some("/usr/local/bin/supaworker")
    );
}

#[test]
fn dockerfile_runs_as_fixed_uid() {
    let dockerfile = workspace_file("Dockerfile");
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("USER exists");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|uid| uid.trim().parse().ok())
        .expect("USER is a numeric uid");
    assert_ne!(uid, 0, "the worker must not run as root");
    assert!(dockerfile.contains("ca-certificates"));
    assert!(dockerfile.contains("python3 -m venv /app/.venv"));
}
