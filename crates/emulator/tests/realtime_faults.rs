//! Realtime faults and token handling: socket drops and close codes, server-initiated
//! channel frames, heartbeat and delivery stalls, CDC restarts, rate limiting, deploys,
//! token expiry and `access_token` refreshes.

mod realtime_support;

use std::time::Duration;

use realtime_support::{jobs_inserts, Incoming, TestServer};
use serde_json::{json, Value};
use supabase_emulator::auth::now_seconds;

#[tokio::test]
async fn drop_sockets_with_close_codes() {
    let server = TestServer::start().await;
    for code in [1000, 1001, 1012] {
        let mut socket = server.socket("2.0.0").await;
        socket.join_ready("realtime:jobs", jobs_inserts()).await;
        server
            .control("/faults/drop-sockets", json!({ "close_code": code }))
            .await;
        assert_eq!(socket.expect_close().await, Some(code));
    }
}

#[tokio::test]
async fn abrupt_drop_sends_no_close_frame() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server.realtime.drop_all_sockets(None);
    match socket.next().await {
        Incoming::Dropped => {}
        other => panic!("expected a drop without close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn server_requested_disconnect_then_1012() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server.control("/faults/server-disconnect", json!({})).await;
    let message = socket.expect_event("system").await;
    assert_eq!(message.join_ref, Value::Null);
    assert_eq!(message.reference, Value::Null);
    assert_eq!(
        message.payload,
        json!({"extension": "system", "message": "Server requested disconnect", "status": "ok"})
    );
    assert!(message.payload.get("channel").is_none());
    assert_eq!(socket.expect_close().await, Some(1012));
}

#[tokio::test]
async fn paused_heartbeats_keep_events_flowing() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server
        .control("/faults/heartbeats", json!({"paused": true}))
        .await;
    socket
        .send(None, "100", "phoenix", "heartbeat", json!({}))
        .await;
    server.insert_job("during-pause").await;
    let event = socket.next_frame().await;
    assert_eq!(event.event, "postgres_changes", "{:?}", event.raw);
    server.realtime.pause_heartbeats(false);
    socket
        .send(None, "101", "phoenix", "heartbeat", json!({}))
        .await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(
        reply.reference,
        json!("101"),
        "the paused heartbeat got no reply"
    );
}

#[tokio::test]
async fn stalled_delivery_drops_events() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server
        .control("/faults/stall", json!({"stalled": true}))
        .await;
    server.insert_job("lost").await;
    // Heartbeats still work during the stall.
    socket.frames_before_heartbeat_reply().await;
    // Wait until the dispatcher has dropped the change before resuming.
    for _ in 0..2000 {
        if server.realtime.stats().events_dropped > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.realtime.stats().events_dropped, 1);
    server.realtime.stall_delivery(false);
    server.insert_job("kept").await;
    let event = socket.expect_event("postgres_changes").await;
    assert_eq!(event.payload["data"]["record"]["action"], "kept");
}

#[tokio::test]
async fn rate_limited_drops_silently() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server
        .control("/faults/rate-limited", json!({"enabled": true}))
        .await;
    server.insert_job("lost").await;
    for _ in 0..2000 {
        if server.realtime.stats().events_dropped > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let frames = socket.frames_before_heartbeat_reply().await;
    assert!(frames.is_empty(), "{frames:?}");
    server.realtime.set_rate_limited(false);
    server.insert_job("kept").await;
    let event = socket.expect_event("postgres_changes").await;
    assert_eq!(event.payload["data"]["record"]["action"], "kept");
}

#[tokio::test]
async fn cdc_restart_drops_then_resubscribes() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server
        .control("/faults/cdc-restart", json!({"window_ms": 3000}))
        .await;
    server.insert_job("lost").await;
    let ready = socket.next_frame().await;
    assert_eq!(ready.event, "system", "{:?}", ready.raw);
    assert_eq!(ready.join_ref, json!(join_ref));
    assert_eq!(ready.payload["message"], "Subscribed to PostgreSQL");
    server.insert_job("kept").await;
    let event = socket.expect_event("postgres_changes").await;
    assert_eq!(event.payload["data"]["record"]["action"], "kept");
}

#[tokio::test]
async fn transient_error_then_readiness() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server
        .control(
            "/faults/transient-error",
            json!({"message": "Too many database timeouts", "recover_after_ms": 100}),
        )
        .await;
    let error = socket.expect_event("system").await;
    assert_eq!(
        error.payload,
        json!({"channel": "jobs", "extension": "postgres_changes",
               "message": "Too many database timeouts", "status": "error"})
    );
    let ready = socket.expect_event("system").await;
    assert_eq!(ready.payload["message"], "Subscribed to PostgreSQL");
    server.insert_job("after").await;
    socket.expect_event("postgres_changes").await;
}

#[tokio::test]
async fn phx_error_payloads_remove_channel() {
    let server = TestServer::start().await;
    for (body, payload) in [
        (json!({}), json!({})),
        (
            json!({"reason": "channel_crash"}),
            json!({"reason": "channel_crash"}),
        ),
    ] {
        let mut socket = server.socket("2.0.0").await;
        let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
        server.control("/faults/phx-error", body).await;
        let error = socket.expect_event("phx_error").await;
        assert_eq!(error.join_ref, json!(join_ref));
        assert_eq!(error.reference, json!(join_ref));
        assert_eq!(error.payload, payload);
        socket
            .send(
                Some(&join_ref),
                "77",
                "realtime:jobs",
                "access_token",
                json!({}),
            )
            .await;
        let reply = socket.expect_event("phx_reply").await;
        assert_eq!(reply.payload["response"]["reason"], "unmatched topic");
        drop(socket);
    }
}

#[tokio::test]
async fn phx_close_and_system_error_faults() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server.control("/faults/phx-close", json!({})).await;
    let close = socket.expect_event("phx_close").await;
    assert_eq!(close.join_ref, json!(join_ref));
    assert_eq!(close.payload, json!({}));

    let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server
        .control(
            "/faults/system-error",
            json!({"message": "Realtime was unable to connect to the project database"}),
        )
        .await;
    let error = socket.expect_event("system").await;
    assert_eq!(error.join_ref, json!(join_ref));
    assert_eq!(error.payload["status"], "error");
    assert_eq!(error.payload["extension"], "system");
    assert_eq!(error.payload["channel"], "jobs");
    let close = socket.expect_event("phx_close").await;
    assert_eq!(close.join_ref, json!(join_ref));
}

#[tokio::test]
async fn deploy_rejects_joins_and_closes_1012() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server.control("/faults/deploy", json!({})).await;
    // No per-channel frames before the close.
    match socket.next().await {
        Incoming::Close(code) => assert_eq!(code, Some(1012)),
        other => panic!("expected close 1012, got {other:?}"),
    }
    let mut socket = server.socket("2.0.0").await;
    socket.join("realtime:jobs", jobs_inserts()).await;
    let reply = socket.expect_event("phx_reply").await;
    assert_eq!(
        reply.payload["response"]["reason"],
        "RealtimeRestarting: Realtime is restarting, please standby"
    );
}

#[tokio::test]
async fn expire_tokens_closes_channels() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    server.control("/faults/expire-tokens", json!({})).await;
    let error = socket.expect_event("system").await;
    assert_eq!(error.join_ref, json!(join_ref));
    assert_eq!(error.reference, Value::Null);
    assert_eq!(error.payload["extension"], "system");
    assert_eq!(error.payload["status"], "error");
    let message = error.payload["message"].as_str().unwrap();
    assert!(message.starts_with("Token has expired "), "{message}");
    assert!(message.ends_with(" seconds ago"), "{message}");
    let close = socket.expect_event("phx_close").await;
    assert_eq!(close.reference, json!(join_ref));
    // The socket stays open.
    socket.frames_before_heartbeat_reply().await;
}

#[tokio::test]
async fn channel_token_expires_while_joined() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let mut payload = jobs_inserts();
    payload["access_token"] = json!(server.keys.sign("service_role", now_seconds() + 2));
    let (join_ref, _) = socket.join_ready("realtime:jobs", payload).await;
    let error = socket.expect_event("system").await;
    assert_eq!(error.join_ref, json!(join_ref));
    let message = error.payload["message"].as_str().unwrap();
    assert!(message.starts_with("Token has expired"), "{message}");
    socket.expect_event("phx_close").await;
}

#[tokio::test]
async fn connect_token_is_channel_fallback() {
    let server = TestServer::start().await;
    let key = server.keys.sign("service_role", now_seconds() + 2);
    let mut socket = server.socket_with_key("2.0.0", &key).await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    let error = socket.expect_event("system").await;
    assert!(error.payload["message"]
        .as_str()
        .unwrap()
        .starts_with("Token has expired"));
    socket.expect_event("phx_close").await;
}

#[tokio::test]
async fn access_token_refresh_resubscribes() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let short = server.keys.sign("service_role", now_seconds() + 3);
    let mut payload = jobs_inserts();
    payload["access_token"] = json!(short);
    let (join_ref, _) = socket.join_ready("realtime:jobs", payload).await;

    // The same token, null and `sb_` keys are ignored: no reply, no readiness.
    for token in [json!(short), Value::Null, json!("sb_secret_whatever")] {
        socket
            .send(
                Some(&join_ref),
                "60",
                "realtime:jobs",
                "access_token",
                json!({"access_token": token}),
            )
            .await;
    }
    let frames = socket.frames_before_heartbeat_reply().await;
    assert!(frames.is_empty(), "{frames:?}");

    let long = server.keys.sign("service_role", now_seconds() + 3600);
    socket
        .send(
            Some(&join_ref),
            "61",
            "realtime:jobs",
            "access_token",
            json!({"access_token": long}),
        )
        .await;
    let ready = socket.expect_event("system").await;
    assert_eq!(ready.payload["message"], "Subscribed to PostgreSQL");
    // The channel outlives the first token: the next frame is the event, not an expiry.
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.insert_job("still-here").await;
    let event = socket.expect_event("postgres_changes").await;
    assert_eq!(event.payload["data"]["record"]["action"], "still-here");
}

#[tokio::test]
async fn invalid_access_token_closes_channel() {
    let server = TestServer::start().await;
    let mut socket = server.socket("2.0.0").await;
    let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    let expired = server.keys.sign("service_role", now_seconds() - 5);
    socket
        .send(
            Some(&join_ref),
            "62",
            "realtime:jobs",
            "access_token",
            json!({"access_token": expired}),
        )
        .await;
    let error = socket.expect_event("system").await;
    assert_eq!(error.payload["extension"], "system");
    assert_eq!(error.payload["status"], "error");
    assert!(error.payload["message"]
        .as_str()
        .unwrap()
        .starts_with("Token has expired"));
    let close = socket.expect_event("phx_close").await;
    assert_eq!(close.join_ref, json!(join_ref));

    let (join_ref, _) = socket.join_ready("realtime:jobs", jobs_inserts()).await;
    socket
        .send(
            Some(&join_ref),
            "63",
            "realtime:jobs",
            "access_token",
            json!({"access_token": ""}),
        )
        .await;
    let error = socket.expect_event("system").await;
    assert_eq!(
        error.payload["message"],
        "The token provided is not a valid JWT"
    );
    socket.expect_event("phx_close").await;
}

#[tokio::test]
async fn slow_socket_events_are_dropped() {
    let mut options = supabase_emulator::realtime::RealtimeOptions::for_tests();
    options.socket_queue_capacity = 1;
    let server = TestServer::start_with(options).await;
    let mut socket = server.socket("2.0.0").await;
    socket.join_ready("realtime:jobs", jobs_inserts()).await;
    // The client reads nothing while about 24 MB of events are produced, more than the
    // loopback socket buffers take, so the server's write blocks and its queue of one
    // overflows.
    server
        .db
        .batch_execute(
            "INSERT INTO public.jobs (action, log)
             SELECT 'burst', repeat('z', 6000) FROM generate_series(1, 4000)",
        )
        .await
        .unwrap();
    for _ in 0..6000 {
        let stats = server.realtime.stats();
        if stats.events_sent + stats.events_dropped == 4000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = server.realtime.stats();
    assert_eq!(stats.events_sent + stats.events_dropped, 4000);
    assert!(stats.events_dropped > 0, "{stats:?}");
    drop(socket);
}
