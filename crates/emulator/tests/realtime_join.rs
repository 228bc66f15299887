//! Realtime channel joins: topic routing, the ok reply with binding ids, the readiness
//! message, join errors, duplicate joins, leaves and the channel limit.

mod realtime_support;

use std::time::Duration;

use realtime_support::{jobs_inserts, join_payload, TestServer};
use serde_json::{json, Value};
use supabase_emulator::auth::now_seconds;
use supabase_emulator::realtime::RealtimeOptions;

#[tokio::test]
async fn join_reply_echoes_entries_with_ids() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let entries = json!([
        {"event": "INSERT", "schema": "public", "table": "jobs"},
        {"event": "UPDATE", "schema": "public", "table": "jobs", "filter": "status=eq.pending"},
        {"event": "bogus", "schema": "public", "table": "jobs", "unknown_key": 1}
    ]);
    let join_ref = socket
        .join("realtime:jobs", join_payload(entries.clone()))
        .await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.join_ref, json!(join_ref));
    assert_eq!(reply.reference, json!(join_ref));
    assert_eq!(reply.topic, "realtime:jobs");
    assert_eq!(reply.payload["status"], "ok");
    let echoed = reply.payload["response"]["postgres_changes"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(echoed.len(), 3);
    let mut ids = Vec::new();
    for (sent, echo) in entries.as_array().unwrap().iter().zip(&echoed) {
        let id = echo["id"].as_u64().expect("integer id");
        assert!(id < 1 << 27);
        ids.push(id);
        let mut without_id = echo.as_object().unwrap().clone();
        without_id.remove("id");
        assert_eq!(&Value::Object(without_id), sent);
    }
    assert_ne!(ids[0], ids[1]);

    // The same entries on a rejoin (here: a second socket) get the same ids.
    let mut other = server.socket("1.0.0").await;
    other.join("realtime:other", join_payload(entries)).await;
    let reply = other.expect_event("phx_reply").await;
    let again: Vec<u64> = reply.payload["response"]["postgres_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(again, ids);
}

#[tokio::test]
async fn readiness_follows_reply() {
    let server = TestServer::start().await;
    for vsn in ["2.0.0", "1.0.0"] {
        let mut socket = server.socket(vsn).await;
        let join_ref = socket.join("realtime:jobs", jobs_inserts()).await;
        let reply = socket.expect_event("phx_reply").await;
        assert_eq!(reply.payload["status"], "ok");
        let ready = socket.expect_event("system").await;
        assert_eq!(
            ready.payload,
            json!({"channel": "jobs", "extension": "postgres_changes",
                   "message": "Subscribed to PostgreSQL", "status": "ok"})
        );
        assert_eq!(ready.reference, Value::Null);
        if vsn == "2.0.0" {
            assert_eq!(ready.join_ref, json!(join_ref));
        }
    }
}

#[tokio::test]
async fn no_bindings_means_no_readiness() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join("realtime:quiet", join_payload(json!([]))).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.payload["response"]["postgres_changes"], json!([]));
    let frames = socket.frames_before_heartbeat_reply().await;
    assert!(frames.is_empty(), "{frames:?}");
}

#[tokio::test]
async fn topics_are_routed() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join("jobs", jobs_inserts()).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(
        reply.payload,
        json!({"status": "error", "response": {"reason": "unmatched topic"}})
    );
    socket.join("realtime:", jobs_inserts()).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(
        reply.payload["response"]["reason"],
        "TopicNameRequired: You must provide a topic name"
    );
    // A message for a topic that is not joined.
    socket
        .send(Some("9"), "9", "realtime:nothing", "broadcast", json!({}))
        .await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.join_ref, Value::Null);
    assert_eq!(reply.reference, json!("9"));
    assert_eq!(reply.payload["response"]["reason"], "unmatched topic");
}

#[tokio::test]
async fn token_errors_on_join() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let expired = server.keys.sign("service_role", now_seconds() - 30);
    let foreign = supabase_emulator::auth::Keys::new("some-other-secret-with-32-characters!!");
    let cases = [
        (expired.clone(), "InvalidJWTToken: Token has expired"),
        (
            "garbage".to_string(),
            "MalformedJWT: The token provided is not a valid JWT",
        ),
        (
            foreign.service_role_jwt.clone(),
            "JwtSignatureError: Failed to validate JWT signature",
        ),
    ];
    for (token, reason) in cases {
        let mut payload = jobs_inserts();
        payload["access_token"] = json!(token);
        socket.join("realtime:jobs", payload).await;
        let reply = socket.expect_event("phx_reply").await;
        assert_eq!(reply.payload["status"], "error");
        let text = reply.payload["response"]["reason"].as_str().unwrap();
        assert!(text.starts_with(reason), "{text}");
    }
    // An `sb_` access_token is ignored and the socket token is used.
    let mut payload = jobs_inserts();
    payload["access_token"] = json!("sb_publishable_whatever");
    socket.join_ready("realtime:jobs", payload).await;
}

#[tokio::test]
async fn join_error_is_delayed() {
    let mut options = RealtimeOptions::for_tests();
    options.join_error_delay = Duration::from_millis(300);
    let server = TestServer::start_with(options).await;
    let mut socket = server.socket("2.0.0").await;
    let started = std::time::Instant::now();
    socket.join("realtime:", jobs_inserts()).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.payload["status"], "error");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn duplicate_join_closes_old_after_reply() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let (first, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    let second = socket.join("realtime:jobs", jobs_inserts()).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.reference, json!(second));
    assert_eq!(reply.payload["status"], "ok");
    let close = socket.expect_event("phx_close").await;
    assert_eq!(close.join_ref, json!(first));
    assert_eq!(close.reference, json!(first));
    let ready = socket.expect_event("system").await;
    assert_eq!(ready.join_ref, json!(second));
}

#[tokio::test]
async fn leave_replies_then_closes() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    let reference = socket.new_ref();
    socket
        .send(
            Some(&join_ref),
            &reference,
            "realtime:jobs",
            "phx_leave",
            json!({}),
        )
        .await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.reference, json!(reference));
    assert_eq!(reply.payload, json!({"status": "ok", "response": {}}));
    let close = socket.expect_event("phx_close").await;
    assert_eq!(close.join_ref, json!(join_ref));
    assert_eq!(close.payload, json!({}));
    // Leaving a topic that is not joined still gets an ok reply.
    socket
        .send(None, "99", "realtime:never", "phx_leave", json!({}))
        .await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.payload["status"], "ok");
}

#[tokio::test]
async fn channel_limit_is_enforced() {
    let mut options = RealtimeOptions::for_tests();
    options.max_channels = 2;
    let server = TestServer::start_with(options).await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:a", jobs_inserts()).await;
    socket.join_ready("realtime:b", jobs_inserts()).await;
    socket.join("realtime:c", jobs_inserts()).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(
        reply.payload["response"]["reason"],
        "ChannelRateLimitReached: Too many channels"
    );
    // Rejoining an existing topic does not count as a new channel.
    socket.join("realtime:a", jobs_inserts()).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.payload["status"], "ok");
}

#[tokio::test]
async fn missing_table_gets_unable_to_subscribe() {
    let server = TestServer::start().await;
    server
        .db
        .batch_execute("CREATE TABLE public.unpublished (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let mut socket = server.socket("2.0.0").await;
    let payload = join_payload(json!([
        {"event": "INSERT", "schema": "public", "table": "unpublished"}
    ]));
    socket.join("realtime:x", payload).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(reply.payload["status"], "ok", "the join itself succeeds");
    let error = socket.expect_event("system").await;
    assert_eq!(error.payload["status"], "error");
    assert_eq!(error.payload["extension"], "postgres_changes");
    assert_eq!(
        error.payload["message"],
        "Unable to subscribe to changes with given parameters. Please check Realtime is \
         enabled for the given connect parameters: [event: INSERT, schema: public, table: \
         unpublished, filters: [], select: nil]"
    );
    server
        .db
        .batch_execute("INSERT INTO public.unpublished VALUES (1)")
        .await
        .unwrap();
    let frames = socket.frames_before_heartbeat_reply().await;
    assert!(frames.is_empty(), "{frames:?}");
}

#[tokio::test]
async fn publication_toggle_and_bad_filter_column() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let payload = join_payload(json!([
        {"event": "UPDATE", "schema": "public", "table": "jobs", "filter": "nope=eq.1"}
    ]));
    socket.join("realtime:bad", payload).await;
    socket.expect_event("phx_reply").await;
    let error = socket.expect_event("system").await;
    let message = error.payload["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Unable to subscribe to changes with given parameters. An exception happened"
        ),
        "{message}"
    );
    assert!(
        message.ends_with("invalid column for filter nope"),
        "{message}"
    );

    server.realtime.set_not_in_publication(true);
    socket.join("realtime:jobs", jobs_inserts()).await;
    socket.expect_event("phx_reply").await;
    let error = socket.expect_event("system").await;
    assert_eq!(error.payload["status"], "error");
    assert!(error.payload["message"]
        .as_str()
        .unwrap()
        .contains("Please check Realtime is enabled"));
    server.insert_job("silent").await;
    let frames = socket.frames_before_heartbeat_reply().await;
    assert!(frames.is_empty(), "{frames:?}");
}

#[tokio::test]
async fn restarting_rejects_joins() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    server.realtime.set_restarting(true);
    socket.join("realtime:jobs", jobs_inserts()).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(
        reply.payload["response"]["reason"],
        "RealtimeRestarting: Realtime is restarting, please standby"
    );
    server.realtime.set_restarting(false);
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
}

#[tokio::test]
async fn tenant_join_rejections() {
    let server = TestServer::start().await;
    let cases = [
        (
            "too_many_joins",
            "ClientJoinRateLimitReached: Too many joins per second",
            Some(1001),
        ),
        (
            "tenant_not_found",
            "TenantNotFound: Tenant with the given ID does not exist",
            Some(1001),
        ),
        (
            "too_many_connected_users",
            "ConnectionRateLimitReached: Too many connected users",
            None,
        ),
        (
            "database_unavailable",
            "UnableToConnectToProject: Realtime was unable to connect to the project database",
            None,
        ),
    ];
    for (rejection, reason, close) in cases {
        server
            .control("/faults/join-rejection", json!({ "rejection": rejection }))
            .await;
        let mut socket = server.socket("2.0.0").await;
        socket.join("realtime:jobs", jobs_inserts()).await;
        let reply = socket.expect_event("phx_reply").await;
        assert_eq!(reply.payload["status"], "error", "{rejection}");
        assert_eq!(reply.payload["response"]["reason"], reason, "{rejection}");
        match close {
            Some(code) => assert_eq!(socket.expect_close().await, Some(code), "{rejection}"),
            None => {
                let frames = socket.frames_before_heartbeat_reply().await;
                assert!(frames.is_empty(), "{rejection}: {frames:?}");
            }
        }
    }
}

#[tokio::test]
async fn join_latency_is_configurable() {
    let mut options = RealtimeOptions::for_tests();
    options.join_delay = Duration::from_millis(300);
    let server = TestServer::start_with(options).await;
    let mut socket = server.socket("2.0.0").await;
    let started = std::time::Instant::now();
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
}
