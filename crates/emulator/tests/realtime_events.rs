//! Realtime `postgres_changes` events from committed rows: frame shape, binding ids,
//! filters, JSON typing, size and primary-key error forms, row level security, ordering,
//! and at-most-once delivery.

mod realtime_support;

use realtime_support::{jobs_inserts, join_payload, Received, TestServer};
use serde_json::{json, Value};
use supabase_emulator::realtime::RealtimeOptions;

fn is_commit_timestamp(text: &str) -> bool {
    // YYYY-MM-DDTHH:MM:SS.mmmZ
    let bytes = text.as_bytes();
    text.len() == 24
        && bytes[4] == b'-'
        && bytes[10] == b'T'
        && bytes[19] == b'.'
        && bytes[23] == b'Z'
        && text[20..23].bytes().all(|b| b.is_ascii_digit())
}

async fn next_event(socket: &mut realtime_support::TestSocket) -> Received {
    socket.expect_event("postgres_changes").await
}

#[tokio::test]
async fn insert_event_shape_v2() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let (_, reply) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    let binding_id = reply["response"]["postgres_changes"][0]["id"].clone();
    let id = server.insert_job("render").await;
    let event = next_event(&mut socket).await;
    assert_eq!(event.join_ref, Value::Null);
    assert_eq!(event.reference, Value::Null);
    assert_eq!(event.topic, "realtime:jobs");
    assert_eq!(event.payload["ids"], json!([binding_id]));
    let data = &event.payload["data"];
    assert_eq!(data["type"], "INSERT");
    assert_eq!(data["schema"], "public");
    assert_eq!(data["table"], "jobs");
    assert_eq!(data["errors"], Value::Null);
    assert!(data.get("old_record").is_none());
    assert!(
        is_commit_timestamp(data["commit_timestamp"].as_str().unwrap()),
        "{data}"
    );
    assert_eq!(data["record"]["id"], json!(id));
    assert_eq!(data["record"]["action"], "render");
    assert_eq!(data["record"]["payload"], json!({}));
    assert_eq!(data["record"]["started_at"], Value::Null);
    let columns = data["columns"].as_array().unwrap();
    assert_eq!(columns[0], json!({"name": "id", "type": "int8"}));
    assert!(columns.contains(&json!({"name": "payload", "type": "jsonb"})));
    assert!(columns.contains(&json!({"name": "created_at", "type": "timestamptz"})));
}

#[tokio::test]
async fn insert_event_shape_v1() {
    let server = TestServer::start().await;
    let mut socket = server.socket("1.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server.insert_job("render").await;
    let event = next_event(&mut socket).await;
    assert_eq!(event.raw["ref"], Value::Null);
    assert!(event.raw.get("join_ref").is_none());
    assert_eq!(event.payload["data"]["type"], "INSERT");
}

#[tokio::test]
async fn record_values_are_json_typed() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server
        .db
        .execute(
            "INSERT INTO public.jobs (id, action, payload) VALUES ($1, 'big', $2)",
            &[
                &9_007_199_254_740_993_i64,
                &json!({"nested": {"list": [1, "two", null]}}),
            ],
        )
        .await
        .unwrap();
    let event = next_event(&mut socket).await;
    let record = &event.payload["data"]["record"];
    assert_eq!(record["id"].as_i64(), Some(9_007_199_254_740_993));
    assert_eq!(
        record["payload"],
        json!({"nested": {"list": [1, "two", null]}})
    );
    assert_eq!(record["log"], Value::Null);
}

#[tokio::test]
async fn ids_list_every_matching_binding() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let entries = json!([
        {"event": "INSERT", "schema": "public", "table": "jobs"},
        {"event": "*", "schema": "public", "table": "jobs"},
        {"event": "DELETE", "schema": "public", "table": "jobs"},
        {"event": "INSERT", "schema": "public", "table": "jobs", "filter": "action=eq.other"}
    ]);
    let (_, reply) = socket
        .join_ready("realtime:all", join_payload(entries))
        .await;
    let ids: Vec<Value> = reply["response"]["postgres_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    server.insert_job("one").await;
    let event = next_event(&mut socket).await;
    assert_eq!(event.payload["ids"], json!([ids[0], ids[1]]));
    // Exactly one frame for the change.
    let rest = socket.frames_before_heartbeat_reply().await;
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn filters_pick_rows_and_update_matches_new_row() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let entries = json!([
        {"event": "UPDATE", "schema": "public", "table": "jobs", "filter": "status=eq.pending"}
    ]);
    socket
        .join_ready("realtime:pending", join_payload(entries))
        .await;
    let id = server.insert_job("x").await;
    // Pending -> running: the new row does not match.
    server
        .db
        .execute(
            "UPDATE public.jobs SET status = 'running' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    // Running -> pending: the new row matches.
    server
        .db
        .execute(
            "UPDATE public.jobs SET status = 'pending' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    // Events keep commit order, so had the first UPDATE matched it would arrive first.
    let event = next_event(&mut socket).await;
    let data = &event.payload["data"];
    assert_eq!(data["type"], "UPDATE");
    assert_eq!(data["record"]["status"], "pending");
    // Default replica identity: the old record carries only the primary key.
    assert_eq!(data["old_record"], json!({"id": id}));
    let rest = socket.frames_before_heartbeat_reply().await;
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn delete_carries_old_key_only() {
    let server = TestServer::start().await;
    server
        .db
        .batch_execute("ALTER TABLE public.jobs REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let mut socket = server.socket("2.0.0").await;
    let entries = json!([{"event": "DELETE", "schema": "public", "table": "jobs"}]);
    socket
        .join_ready("realtime:deletes", join_payload(entries))
        .await;
    let id = server.insert_job("gone").await;
    server
        .db
        .execute("DELETE FROM public.jobs WHERE id = $1", &[&id])
        .await
        .unwrap();
    let event = next_event(&mut socket).await;
    let data = &event.payload["data"];
    assert_eq!(data["type"], "DELETE");
    assert!(data.get("record").is_none());
    // jobs has row level security, so DELETEs keep only the key even with FULL identity.
    assert_eq!(data["old_record"], json!({"id": id}));
}

#[tokio::test]
async fn oversize_record_keeps_short_fields() {
    let mut options = RealtimeOptions::for_tests();
    options.max_record_bytes = 4096;
    let server = TestServer::start_with(options).await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    let long_log = "x".repeat(10_000);
    server
        .db
        .execute(
            "INSERT INTO public.jobs (action, log) VALUES ('huge', $1)",
            &[&long_log],
        )
        .await
        .unwrap();
    let event = next_event(&mut socket).await;
    let data = &event.payload["data"];
    assert_eq!(data["errors"], json!(["Error 413: Payload Too Large"]));
    assert_eq!(data["record"]["action"], "huge");
    assert!(data["record"].get("log").is_none());
    assert!(data["record"].get("id").is_some());
}

#[tokio::test]
async fn large_record_within_limit_is_complete() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    // Larger than a NOTIFY payload, smaller than the 1 MiB record limit.
    let log = "y".repeat(100_000);
    server
        .db
        .execute(
            "INSERT INTO public.jobs (action, log) VALUES ('big', $1)",
            &[&log],
        )
        .await
        .unwrap();
    let event = next_event(&mut socket).await;
    assert_eq!(event.payload["data"]["errors"], Value::Null);
    assert_eq!(event.payload["data"]["record"]["log"], json!(log));
    let stored: i64 = server
        .db
        .query_one("SELECT count(*) FROM _emulator.changes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "consumed change rows are deleted");
}

#[tokio::test]
async fn table_without_primary_key_gets_400() {
    let server = TestServer::start().await;
    server
        .db
        .batch_execute(
            "CREATE TABLE public.nokey (v text);
             ALTER PUBLICATION supabase_realtime ADD TABLE public.nokey;",
        )
        .await
        .unwrap();
    let mut socket = server.socket("2.0.0").await;
    let entries = json!([{"event": "INSERT", "schema": "public", "table": "nokey"}]);
    socket
        .join_ready("realtime:nokey", join_payload(entries))
        .await;
    server
        .db
        .batch_execute("INSERT INTO public.nokey VALUES ('a')")
        .await
        .unwrap();
    let event = next_event(&mut socket).await;
    let data = &event.payload["data"];
    assert_eq!(
        data["errors"],
        json!(["Error 400: Bad Request, no primary key"])
    );
    assert_eq!(data["record"], json!({}));
    assert_eq!(data["columns"], json!([]));
    assert_eq!(data["commit_timestamp"], Value::Null);
}

#[tokio::test]
async fn anon_channel_sees_no_jobs() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let mut anon = jobs_inserts();
    anon["access_token"] = json!(server.keys.anon_jwt);
    socket.join_ready("realtime:anon", anon).await;
    socket.join_ready("realtime:service", jobs_inserts()).await;
    server.insert_job("secret").await;
    // Both channels share the socket's queue, so the service channel's event is a barrier.
    let event = next_event(&mut socket).await;
    assert_eq!(event.topic, "realtime:service");
    let rest = socket.frames_before_heartbeat_reply().await;
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn anon_channel_sees_rows_its_policy_allows() {
    let server = TestServer::start().await;
    server
        .db
        .batch_execute(
            "CREATE POLICY anon_reads_public ON public.jobs FOR SELECT TO anon
             USING (action = 'public')",
        )
        .await
        .unwrap();
    let mut socket = server.socket("2.0.0").await;
    let mut anon = jobs_inserts();
    anon["access_token"] = json!(server.keys.anon_jwt);
    socket.join_ready("realtime:anon", anon).await;
    server.insert_job("private").await;
    server.insert_job("public").await;
    let event = next_event(&mut socket).await;
    assert_eq!(event.payload["data"]["record"]["action"], "public");
}

#[tokio::test]
async fn events_follow_commit_order() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    let mut expected = Vec::new();
    for i in 0..20 {
        expected.push(server.insert_job(&format!("job-{i}")).await);
    }
    server
        .db
        .batch_execute(
            "BEGIN;
             INSERT INTO public.jobs (action) SELECT 'batch' FROM generate_series(1, 20);
             COMMIT;",
        )
        .await
        .unwrap();
    let mut received = Vec::new();
    for _ in 0..40 {
        let event = next_event(&mut socket).await;
        received.push(event.payload["data"]["record"]["id"].as_i64().unwrap());
    }
    assert_eq!(&received[..20], &expected[..]);
    let batch = &received[20..];
    assert!(batch.windows(2).all(|w| w[0] < w[1]), "{batch:?}");
}

#[tokio::test]
async fn rolled_back_rows_are_not_sent() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server
        .db
        .batch_execute("BEGIN; INSERT INTO public.jobs (action) VALUES ('undone'); ROLLBACK;")
        .await
        .unwrap();
    server.insert_job("kept").await;
    let event = next_event(&mut socket).await;
    assert_eq!(event.payload["data"]["record"]["action"], "kept");
}

#[tokio::test]
async fn events_are_not_replayed_after_rejoin() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    socket
        .send(
            Some(&join_ref),
            "50",
            "realtime:jobs",
            "phx_leave",
            json!({}),
        )
        .await;
    socket.expect_event("phx_reply").await;
    socket.expect_event("phx_close").await;
    server.insert_job("while-away").await;
    drop(socket);
    server.insert_job("while-disconnected").await;

    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server.insert_job("after").await;
    let event = next_event(&mut socket).await;
    assert_eq!(event.payload["data"]["record"]["action"], "after");
}

#[tokio::test]
async fn stats_count_sockets_and_events() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server.insert_job("counted").await;
    next_event(&mut socket).await;
    let stats = server.realtime.stats();
    assert_eq!(stats.sockets_open, 1);
    assert_eq!(stats.joins, 1);
    assert_eq!(stats.events_sent, 1);
    assert_eq!(stats.events_dropped, 0);
}

#[tokio::test]
async fn capture_follows_subscriptions() {
    let server = TestServer::start().await;
    let wanted = || async {
        let rows = server
            .db
            .query(
                "SELECT relid::regclass::text, op FROM _emulator.wanted ORDER BY 1, 2",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    assert!(
        wanted().await.is_empty(),
        "nothing is captured without subscribers"
    );
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    assert_eq!(wanted().await, vec!["jobs INSERT"]);
    let entries = json!([{"event": "*", "schema": "public", "table": "jobs"}]);
    socket
        .join_ready("realtime:all", join_payload(entries))
        .await;
    assert_eq!(
        wanted().await,
        vec!["jobs DELETE", "jobs INSERT", "jobs UPDATE"]
    );
}

#[tokio::test]
async fn delete_filters_need_full_identity() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let entries = json!([
        {"event": "DELETE", "schema": "public", "table": "jobs", "filter": "action=eq.gone"},
        {"event": "INSERT", "schema": "public", "table": "jobs", "filter": "action=eq.barrier"}
    ]);
    socket
        .join_ready("realtime:deletes", join_payload(entries))
        .await;
    let first = server.insert_job("gone").await;
    // Default replica identity: the old row has only the key, so the filter cannot match.
    server
        .db
        .execute("DELETE FROM public.jobs WHERE id = $1", &[&first])
        .await
        .unwrap();
    server.insert_job("barrier").await;
    let event = next_event(&mut socket).await;
    assert_eq!(event.payload["data"]["type"], "INSERT");

    let server = TestServer::start().await;
    server
        .db
        .batch_execute("ALTER TABLE public.jobs REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let mut socket = server.socket("2.0.0").await;
    let entries = json!([
        {"event": "DELETE", "schema": "public", "table": "jobs", "filter": "action=eq.gone"}
    ]);
    socket
        .join_ready("realtime:deletes", join_payload(entries))
        .await;
    let second = server.insert_job("gone").await;
    server
        .db
        .execute("DELETE FROM public.jobs WHERE id = $1", &[&second])
        .await
        .unwrap();
    let event = next_event(&mut socket).await;
    assert_eq!(event.payload["data"]["type"], "DELETE");
    assert_eq!(event.payload["data"]["old_record"], json!({"id": second}));
}
