//! Fan-out of captured changes: matching each change against the subscribed channels,
//! checking row level security for the channel's role, building the `postgres_changes`
//! payload, and queueing one frame per matching channel.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::capture::{self, Change, TableMeta};
use super::protocol;
use super::{Shared, Subscription};

/// Values longer than this (as text) are cut from oversize records.
const OVERSIZE_KEPT_VALUE_BYTES: usize = 64;

/// Reads notification payloads in commit order and dispatches each change.
pub(super) async fn run(shared: Arc<Shared>, mut notifications: mpsc::UnboundedReceiver<String>) {
    loop {
        let payload = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            payload = notifications.recv() => match payload {
                Some(payload) => payload,
                None => return,
            },
        };
        match capture::read_change(&shared.pool, &payload).await {
            Ok(change) => dispatch(&shared, change).await,
            Err(error) => tracing::error!(%error, "failed to read a captured change"),
        }
    }
}

async fn dispatch(shared: &Shared, change: Change) {
    let subscriptions: Vec<Arc<Subscription>> = shared
        .subscriptions
        .read()
        .expect("subscription registry lock")
        .values()
        .cloned()
        .collect();
    if subscriptions.is_empty() {
        return;
    }
    let meta = match shared
        .tables
        .get(&shared.pool, &change.schema, &change.table)
        .await
    {
        Ok(meta) => meta,
        Err(error) => {
            tracing::error!(%error, schema = %change.schema, table = %change.table,
                "failed to read table metadata; change dropped");
            return;
        }
    };
    // Filters see what the WAL carries: for a DELETE without REPLICA IDENTITY FULL that is
    // only the primary key.
    let row = if change.change_type == "DELETE" {
        let old = change.old_record.clone().unwrap_or(Value::Null);
        if meta.replica_identity_full {
            old
        } else {
            keep_columns(&old, &meta.primary_key)
        }
    } else {
        change.record.clone().unwrap_or(Value::Null)
    };
    let mut targets: Vec<(Arc<Subscription>, Vec<u32>)> = Vec::new();
    for subscription in subscriptions {
        let ids: Vec<u32> = subscription
            .bindings
            .iter()
            .filter(|b| b.matches(&change.change_type, &change.schema, &change.table, &row))
            .map(|b| b.id)
            .collect();
        if !ids.is_empty() {
            targets.push((subscription, ids));
        }
    }
    if targets.is_empty() {
        return;
    }
    if shared.events_suppressed() {
        shared
            .counters
            .events_dropped
            .fetch_add(targets.len() as u64, Ordering::Relaxed);
        return;
    }
    let data = build_data(&change, &meta, shared.options.max_record_bytes);
    let mut visibility: HashMap<(String, String), bool> = HashMap::new();
    for (subscription, ids) in targets {
        // DELETEs are not checked against row level security by the real server either.
        let check_rls = !subscription.bypass_rls && change.change_type != "DELETE";
        if check_rls {
            let key = (subscription.role.clone(), subscription.claims.clone());
            let visible = match visibility.get(&key) {
                Some(visible) => *visible,
                None => {
                    let visible = row_visible(shared, &subscription, &change, &meta).await;
                    visibility.insert(key, visible);
                    visible
                }
            };
            if !visible {
                continue;
            }
        }
        let payload = json!({"ids": ids, "data": data});
        let text = protocol::encode(
            subscription.vsn,
            None,
            None,
            &subscription.topic,
            "postgres_changes",
            &payload,
        );
        match subscription.events.try_send(text) {
            Ok(()) => {
                shared.counters.events_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                let dropped = shared
                    .counters
                    .events_dropped
                    .fetch_add(1, Ordering::Relaxed);
                if dropped.is_power_of_two() {
                    tracing::warn!(
                        socket_id = subscription.socket_id,
                        dropped_total = dropped + 1,
                        "socket event queue full; event dropped"
                    );
                }
            }
        }
    }
}

/// Builds the `data` object of a `postgres_changes` payload.
fn build_data(change: &Change, meta: &TableMeta, max_record_bytes: usize) -> Value {
    let mut data = Map::new();
    data.insert("schema".into(), Value::from(change.schema.as_str()));
    data.insert("table".into(), Value::from(change.table.as_str()));
    data.insert("type".into(), Value::from(change.change_type.as_str()));
    if meta.primary_key.is_empty() {
        data.insert("columns".into(), json!([]));
        data.insert("commit_timestamp".into(), Value::Null);
        data.insert(
            "errors".into(),
            json!(["Error 400: Bad Request, no primary key"]),
        );
        data.insert("record".into(), json!({}));
        if change.change_type != "INSERT" {
            data.insert("old_record".into(), json!({}));
        }
        return Value::Object(data);
    }
    let mut record = change.record.clone();
    let mut old_record = change.old_record.as_ref().map(|old| {
        // Default replica identity logs only the key; RLS tables cut DELETEs to the key
        // even with REPLICA IDENTITY FULL.
        let key_only =
            !meta.replica_identity_full || (change.change_type == "DELETE" && meta.row_security);
        if key_only {
            keep_columns(old, &meta.primary_key)
        } else {
            old.clone()
        }
    });
    let size = record.as_ref().map_or(0, |r| r.to_string().len())
        + old_record.as_ref().map_or(0, |r| r.to_string().len());
    let errors = if size > max_record_bytes {
        record = record.map(|r| keep_short_values(&r));
        old_record = old_record.map(|r| keep_short_values(&r));
        json!(["Error 413: Payload Too Large"])
    } else {
        Value::Null
    };
    data.insert("columns".into(), meta.columns.clone());
    data.insert(
        "commit_timestamp".into(),
        Value::from(change.commit_timestamp.as_str()),
    );
    data.insert("errors".into(), errors);
    if let Some(record) = record {
        data.insert("record".into(), record);
    }
    if let Some(old_record) = old_record {
        data.insert("old_record".into(), old_record);
    }
    Value::Object(data)
}

fn keep_columns(row: &Value, columns: &[String]) -> Value {
    let mut kept = Map::new();
    if let Some(object) = row.as_object() {
        for column in columns {
            if let Some(value) = object.get(column) {
                kept.insert(column.clone(), value.clone());
            }
        }
    }
    Value::Object(kept)
}

fn keep_short_values(row: &Value) -> Value {
    let mut kept = Map::new();
    if let Some(object) = row.as_object() {
        for (column, value) in object {
            let length = match value {
                Value::String(s) => s.len(),
                other => other.to_string().len(),
            };
            if length <= OVERSIZE_KEPT_VALUE_BYTES {
                kept.insert(column.clone(), value.clone());
            }
        }
    }
    Value::Object(kept)
}

/// Checks with a real query, under the subscriber's role and JWT claims, whether the
/// subscriber may see the changed row now. Any error counts as not visible.
async fn row_visible(
    shared: &Shared,
    subscription: &Subscription,
    change: &Change,
    meta: &TableMeta,
) -> bool {
    let Some(record) = &change.record else {
        return false;
    };
    match query_visible(shared, subscription, change, meta, record).await {
        Ok(visible) => visible,
        Err(error) => {
            tracing::debug!(%error, role = %subscription.role, "row visibility check failed");
            false
        }
    }
}

async fn query_visible(
    shared: &Shared,
    subscription: &Subscription,
    change: &Change,
    meta: &TableMeta,
    record: &Value,
) -> Result<bool, capture::CaptureError> {
    let relation = format!(
        "{}.{}",
        quote_identifier(&change.schema),
        quote_identifier(&change.table)
    );
    let table_key: Vec<String> = meta
        .primary_key
        .iter()
        .map(|c| format!("t.{}", quote_identifier(c)))
        .collect();
    let record_key: Vec<String> = meta
        .primary_key
        .iter()
        .map(|c| format!("r.{}", quote_identifier(c)))
        .collect();
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {relation} t WHERE ({}) = (SELECT {} FROM \
         jsonb_populate_record(NULL::{relation}, $1::text::jsonb) r))",
        table_key.join(", "),
        record_key.join(", ")
    );
    let mut client = shared.pool.get().await?;
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)",
            &[&subscription.role, &subscription.claims],
        )
        .await?;
    let row = transaction.query_one(&sql, &[&record.to_string()]).await?;
    let visible: bool = row.get(0);
    transaction.rollback().await?;
    Ok(visible)
}

/// Quotes a Postgres identifier.
pub(super) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
