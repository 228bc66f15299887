//! The worker's health endpoint against the local Supabase stack: `/metrics` scraped after a
//! run matches the jobs that ran, and `/readyz` turns unready while the stack is down and
//! ready again once it is back.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::{Scripts, Stack, WorkerProcess, PATIENCE};

const ACTIONS: &str = r#"
[actions.record]
program = "./record.sh"
timeout = "30s"

[actions.fails]
program = "/bin/sh"
args = ["-c", "echo working; exit 7"]
timeout = "30s"
"#;

fn scripts() -> Scripts {
    let scripts = Scripts::new();
    scripts.write("record.sh", "#!/bin/sh\necho recorded\n", true);
    scripts.write("actions.toml", ACTIONS, false);
    scripts
}

fn env(stack: &Stack, scripts: &Scripts) -> HashMap<String, String> {
    let mut env = stack.worker_env("health-1", &scripts.path());
    env.insert(
        "SUPAWORKER_ACTIONS_FILE".into(),
        scripts.path().join("actions.toml").display().to_string(),
    );
    env.insert("SUPAWORKER_HEALTH_ADDR".into(), "127.0.0.1:0".into());
    env
}

/// Reads the endpoint's base URL from the worker's `health endpoint listening` line.
async fn health_url(worker: &WorkerProcess) -> String {
    let event = worker.wait_event("health endpoint listening").await;
    let addr = event["addr"].as_str().expect("addr field").to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{event}");
    format!("http://{addr}")
}

/// One sample of the Prometheus text format: name, labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Parses the sample lines of the Prometheus text format (version 0.0.4). Label values in
/// these tests contain no escaped quotes or commas.
fn parse_samples(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), HashMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) = pair.split_once('=').expect("label is key=value");
                        (key.to_string(), value.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// Finds the value of the sample `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

async fn scrape(client: &reqwest::Client, base: &str) -> (String, Vec<Sample>) {
    let response = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    let samples = parse_samples(&text);
    (text, samples)
}

async fn readyz(client: &reqwest::Client, base: &str) -> (u16, Value) {
    let response = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("get /readyz");
    let status = response.status().as_u16();
    (status, response.json().await.expect("/readyz body is JSON"))
}

async fn wait_ready(client: &reqwest::Client, base: &str, expected: u16) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = readyz(client, base).await;
        if status == expected {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz stayed {status}, expected {expected}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_jobs_that_ran() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let worker = WorkerProcess::spawn(&env(&stack, &scripts));
    let base = health_url(&worker).await;
    worker.wait_event("Realtime subscription live").await;
    let client = reqwest::Client::new();

    let healthz = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(stack.insert("record", json!({})).await);
    }
    ids.push(stack.insert("fails", json!({})).await);
    for id in &ids {
        stack.wait_status(*id, &["success", "failed"]).await;
    }

    // The counters are updated right after the final write, so poll until they settle.
    let finished = "supaworker_jobs_finished_total";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (text, samples) = loop {
        let (text, samples) = scrape(&client, &base).await;
        let failed = value(
            &samples,
            finished,
            &[("action", "fails"), ("outcome", "failed")],
        );
        let succeeded = value(
            &samples,
            finished,
            &[("action", "record"), ("outcome", "succeeded")],
        );
        if failed == Some(1.0) && succeeded == Some(3.0) {
            break (text, samples);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counters never matched:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let claimed = "supaworker_jobs_claimed_total";
    assert_eq!(
        value(&samples, claimed, &[("action", "record")]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&samples, claimed, &[("action", "fails")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&samples, "supaworker_jobs_running", &[]),
        Some(0.0),
        "{text}"
    );
    let runs = "supaworker_job_run_duration_seconds_count";
    assert_eq!(
        value(&samples, runs, &[("action", "record")]),
        Some(3.0),
        "{text}"
    );
    let pickups = "supaworker_job_pickup_latency_seconds_count";
    assert_eq!(
        value(&samples, pickups, &[("action", "record")]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&samples, "supaworker_realtime_subscribed", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&samples, "supaworker_realtime_connected", &[]),
        Some(1.0),
        "{text}"
    );
    let sweeps = value(&samples, "supaworker_sweeps_total", &[]).expect("sweeps exported");
    assert!(sweeps >= 1.0, "{text}");
    let requests = value(&samples, "supaworker_rest_requests_total", &[]).expect("requests");
    assert!(
        requests >= 8.0,
        "4 claims and 4 final writes at least:\n{text}"
    );
    assert!(
        text.contains("# TYPE supaworker_job_run_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("# HELP supaworker_jobs_claimed_total "),
        "{text}"
    );

    let body = wait_ready(&client, &base, 200).await;
    assert_eq!(body["realtime"], "subscribed", "{body}");
    assert_eq!(worker.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_stack_outage() {
    let stack = Stack::start().await;
    let scripts = scripts();
    let mut env = env(&stack, &scripts);
    // A 3 s readiness window: two 1 s sweep intervals plus the 1 s request time-out.
    env.insert("SUPAWORKER_SWEEP_INTERVAL".into(), "1s".into());
    env.insert("SUPAWORKER_REQUEST_TIMEOUT".into(), "1s".into());
    let worker = WorkerProcess::spawn(&env);
    let base = health_url(&worker).await;
    let client = reqwest::Client::new();

    let body = wait_ready(&client, &base, 200).await;
    assert_eq!(body["ready"], true, "{body}");

    // Both Realtime and the sweep fail while the stack is down. The outage lasts far longer
    // than the readiness window, so the endpoint must report it.
    let outage = stack.emulator.restart(Duration::from_secs(20));
    let watch = async {
        let body = wait_ready(&client, &base, 503).await;
        assert_eq!(body["ready"], false, "{body}");
        assert_ne!(body["realtime"], "subscribed", "{body}");
        assert_eq!(body["shutting_down"], false, "{body}");
    };
    tokio::join!(outage, watch);

    let body = wait_ready(&client, &base, 200).await;
    assert_eq!(body["ready"], true, "{body}");

    let (_, samples) = scrape(&client, &base).await;
    let reconnects = value(&samples, "supaworker_realtime_reconnects_total", &[]);
    assert!(reconnects.is_some_and(|n| n >= 1.0), "{samples:?}");
    assert_eq!(worker.stop().await, 0);
}
