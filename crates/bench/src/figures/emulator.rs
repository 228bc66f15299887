//! Figure 1, the emulator alone: INSERT to Realtime event at a subscriber, and the rate of
//! claim PATCHes from concurrent clients.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use supaworker::realtime::{self, Hint, RealtimeConfig, RealtimeStats};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::stack::{Stack, PATIENCE};
use crate::stats::Table;

pub struct Options {
    pub runs: usize,
    pub events: usize,
    pub rows: i64,
    pub clients: Vec<usize>,
}

pub async fn run(options: &Options) -> anyhow::Result<()> {
    let mut events = Table::new(&format!(
        "Emulator: INSERT sent to Realtime event received, {} inserts one at a time (ms)",
        options.events
    ));
    let mut patches = Table::new(&format!(
        "Emulator: claim PATCHes per second over {} rows",
        options.rows
    ));
    for run in 0..options.runs {
        eprintln!("emulator run {}/{}", run + 1, options.runs);
        let stack = Stack::start().await?;
        let (latencies, insert_times) = event_latencies(&stack, options.events).await?;
        events.record_percentiles("INSERT sent to event", &latencies);
        events.record_percentiles("INSERT round trip (commit acknowledged)", &insert_times);
        for &clients in &options.clients {
            let rate = patch_rate(&stack, options.rows, clients).await?;
            patches.record(&format!("{clients} clients, PATCH/s"), rate);
        }
        stack.emulator.shutdown().await;
    }
    events.print();
    patches.print();
    Ok(())
}

/// Subscribes with the worker's own Realtime client, then inserts rows one at a time and
/// times each INSERT from sending to its change event arriving.
async fn event_latencies(stack: &Stack, count: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let url = url::Url::parse(&stack.emulator.url())?;
    let key = stack.emulator.keys().service_role_jwt.clone();
    let config = RealtimeConfig::new(url, key, "public".into(), "jobs".into());
    let (hints_tx, mut hints) = mpsc::channel::<Hint>(1024);
    let (ready_tx, mut ready) = watch::channel(0u64);
    let shutdown = CancellationToken::new();
    let client = realtime::spawn(
        config,
        hints_tx,
        ready_tx,
        Arc::new(RealtimeStats::default()),
        shutdown.clone(),
    );
    tokio::time::timeout(PATIENCE, ready.wait_for(|count| *count > 0))
        .await
        .context("Realtime subscription not live")??;

    let mut latencies = Vec::with_capacity(count);
    let mut insert_times = Vec::with_capacity(count);
    for _ in 0..count {
        let sent = Instant::now();
        let id = stack.insert("bench").await?;
        insert_times.push(sent.elapsed().as_secs_f64() * 1000.0);
        loop {
            let hint = tokio::time::timeout(PATIENCE, hints.recv())
                .await
                .context("no Realtime event")?
                .context("Realtime client stopped")?;
            let Hint::Job { id: hinted, .. } = hint;
            if hinted == json!(id) {
                break;
            }
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    shutdown.cancel();
    let _ = client.await;
    Ok((latencies, insert_times))
}

/// Inserts `rows` pending rows, then claims each with one conditional PATCH from `clients`
/// concurrent tasks, and returns claims per second.
async fn patch_rate(stack: &Stack, rows: i64, clients: usize) -> anyhow::Result<f64> {
    let first: i64 = stack
        .db
        .query_one("select coalesce(max(id), 0) + 1 from jobs", &[])
        .await?
        .get(0);
    stack.insert_many("bench", rows).await?;
    let next = Arc::new(AtomicI64::new(first));
    let claimed = Arc::new(AtomicU64::new(0));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let base = format!("{}/rest/v1/jobs", stack.emulator.url());
    let key = stack.emulator.keys().service_role_jwt.clone();
    let end = first + rows;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, claimed, http, base, key) = (
            next.clone(),
            claimed.clone(),
            http.clone(),
            base.clone(),
            key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= end {
                    return anyhow::Ok(());
                }
                let started_at = time::OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)?;
                let response = http
                    .patch(format!("{base}?id=eq.{id}&status=eq.pending"))
                    .header("apikey", &key)
                    .header("Authorization", format!("Bearer {key}"))
                    .header("Prefer", "return=representation")
                    .json(&json!({"status": "running", "started_at": started_at}))
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await?;
                let status = response.status();
                let body: Value = response.json().await?;
                if !status.is_success() {
                    bail!("PATCH of job {id} returned {status}: {body}");
                }
                if body.as_array().is_some_and(|rows| rows.len() == 1) {
                    claimed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let claimed = claimed.load(Ordering::Relaxed);
    if claimed != rows as u64 {
        bail!("{claimed} of {rows} claim PATCHes returned the row");
    }
    Ok(rows as f64 / elapsed)
}
