//! Realtime connection behaviour: websocket paths, API key checks before the upgrade,
//! serializer negotiation, malformed frames, heartbeats and the idle timeout.

mod realtime_support;

use std::time::Duration;

use realtime_support::{TestServer, HANG_GUARD};
use serde_json::{json, Value};
use supabase_emulator::auth::now_seconds;
use supabase_emulator::realtime::RealtimeOptions;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

/// Attempts a websocket connect and returns the HTTP status and JSON body of a rejection.
async fn rejected(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> (u16, Value) {
    let result = tokio::time::timeout(HANG_GUARD, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect timed out");
    match result {
        Err(WsError::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            (response.status().as_u16(), body)
        }
        Err(other) => panic!("expected an HTTP rejection, got {other}"),
        Ok(_) => panic!("expected an HTTP rejection, got an open websocket"),
    }
}

#[tokio::test]
async fn both_paths_serve_websockets() {
    let server = TestServer::start().await;
    let key = server.keys.service_role_jwt.clone();
    for path in ["/realtime/v1/websocket", "/socket/websocket"] {
        let url = server.url(&format!("{path}?apikey={key}&vsn=2.0.0"));
        let connected = tokio_tungstenite::connect_async(url).await;
        assert!(connected.is_ok(), "{path}: {:?}", connected.err());
    }
}

#[tokio::test]
async fn key_errors_return_401_texts() {
    let server = TestServer::start().await;
    let expired = server.keys.sign("service_role", now_seconds() - 10);
    let foreign = supabase_emulator::auth::Keys::new("some-other-secret-with-32-characters!!");
    let cases = [
        ("", "API key is missing"),
        ("apikey=not-a-jwt&", "The token provided is not a valid JWT"),
        (
            "apikey=sb_secret_unknown&",
            "The token provided is not a valid JWT",
        ),
        (&*format!("apikey={expired}&"), "Token has expired"),
        (
            &*format!("apikey={}&", foreign.service_role_jwt),
            "Failed to validate JWT signature",
        ),
    ];
    for (query, text) in cases {
        let url = server.url(&format!("/realtime/v1/websocket?{query}vsn=2.0.0"));
        let (status, body) = rejected(url.into_client_request().unwrap()).await;
        assert_eq!(status, 401, "query {query}");
        assert_eq!(body, json!({ "error": text }), "query {query}");
    }
}

#[tokio::test]
async fn missing_claims_are_rejected() {
    let server = TestServer::start().await;
    let claims = json!({"role": "service_role"});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(realtime_support::JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let url = server.url(&format!("/realtime/v1/websocket?apikey={token}&vsn=2.0.0"));
    let (status, body) = rejected(url.into_client_request().unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "Fields `role` and `exp` are required in JWT");
}

#[tokio::test]
async fn header_key_wins_over_query() {
    let server = TestServer::start().await;
    let url = server.url("/realtime/v1/websocket?apikey=garbage&vsn=2.0.0");
    let mut request = url.clone().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", server.keys.service_role_jwt.parse().unwrap());
    let connected = tokio_tungstenite::connect_async(request).await;
    assert!(connected.is_ok(), "valid header key: {:?}", connected.err());

    let good = server.url(&format!(
        "/realtime/v1/websocket?apikey={}&vsn=2.0.0",
        server.keys.service_role_jwt
    ));
    let mut request = good.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", "garbage".parse().unwrap());
    let (status, _) = rejected(request).await;
    assert_eq!(
        status, 401,
        "an invalid header key must win over a valid query key"
    );
}

#[tokio::test]
async fn opaque_keys_are_swapped_like_gateway() {
    let server = TestServer::start().await;
    for key in [
        server.keys.secret_key.clone(),
        server.keys.publishable_key.clone(),
    ] {
        let url = server.url(&format!("/realtime/v1/websocket?apikey={key}&vsn=2.0.0"));
        let connected = tokio_tungstenite::connect_async(url).await;
        assert!(connected.is_ok(), "{key}: {:?}", connected.err());
    }
}

#[tokio::test]
async fn connect_error_is_delayed() {
    let mut options = RealtimeOptions::for_tests();
    options.connect_error_delay = Duration::from_millis(300);
    let server = TestServer::start_with(options).await;
    let url = server.url("/realtime/v1/websocket?vsn=2.0.0");
    let started = std::time::Instant::now();
    let (status, _) = rejected(url.into_client_request().unwrap()).await;
    assert_eq!(status, 401);
    // A lower bound only: the machine may be slow, never faster than the delay.
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn unsupported_vsn_is_403() {
    let server = TestServer::start().await;
    let url = server.url(&format!(
        "/realtime/v1/websocket?apikey={}&vsn=3.0.0",
        server.keys.service_role_jwt
    ));
    let (status, _) = rejected(url.into_client_request().unwrap()).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn vsn_selects_frame_shape() {
    let server = TestServer::start().await;
    for vsn in ["2.0.0", "1.0.0"] {
        let mut socket = server.socket(vsn).await;
        let frames = socket.frames_before_heartbeat_reply().await;
        assert!(frames.is_empty());
    }
    // No vsn at all means 1.0.0 (object frames).
    let path = format!(
        "/realtime/v1/websocket?apikey={}",
        server.keys.service_role_jwt
    );
    let mut socket = server.socket_at(&path, false).await;
    // The support client asserts the object shape of every frame it decodes.
    socket.frames_before_heartbeat_reply().await;
}

#[tokio::test]
async fn heartbeat_reply_shapes() {
    let server = TestServer::start().await;
    let mut v2 = server.socket("2.0.0").await;
    v2.send_raw(r#"[null,"7","phoenix","heartbeat",{}]"#).await;
    let reply = v2.next_frame().await;
    assert_eq!(
        reply.raw,
        json!([null, "7", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
    let mut v1 = server.socket("1.0.0").await;
    v1.send_raw(r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"7"}"#)
        .await;
    let reply = v1.next_frame().await;
    assert_eq!(
        reply.raw,
        json!({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "7"})
    );
}

#[tokio::test]
async fn malformed_frames_are_dropped() {
    let server = TestServer::start().await;
    let mut v2 = server.socket("2.0.0").await;
    for text in [
        "not json",
        r#"{"topic":"phoenix"}"#,
        r#"[null,"1","phoenix"]"#,
        r#"[null,{"x":1},"phoenix","heartbeat",{}]"#,
    ] {
        v2.send_raw(text).await;
    }
    let frames = v2.frames_before_heartbeat_reply().await;
    assert!(frames.is_empty(), "replies to malformed frames: {frames:?}");

    let mut v1 = server.socket("1.0.0").await;
    // Missing `ref`.
    v1.send_raw(r#"{"topic":"phoenix","event":"heartbeat","payload":{}}"#)
        .await;
    v1.send_raw(r#"[null,"1","phoenix","heartbeat",{}]"#).await;
    let frames = v1.frames_before_heartbeat_reply().await;
    assert!(frames.is_empty(), "replies to malformed frames: {frames:?}");
}

#[tokio::test]
async fn idle_socket_closes_with_1000() {
    let mut options = RealtimeOptions::for_tests();
    options.idle_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(options).await;
    let mut socket = server.socket("2.0.0").await;
    socket
        .join_ready("realtime:jobs", realtime_support::jobs_inserts())
        .await;
    assert_eq!(socket.expect_close().await, Some(1000));
}

#[tokio::test]
async fn socket_without_channels_is_dropped() {
    let mut options = RealtimeOptions::for_tests();
    options.no_channel_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(options).await;
    let mut socket = server.socket("2.0.0").await;
    match socket.next().await {
        realtime_support::Incoming::Dropped => {}
        other => panic!("expected a drop without close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn tenant_rejections_at_connect() {
    let server = TestServer::start().await;
    let url = server.url(&format!(
        "/realtime/v1/websocket?apikey={}&vsn=2.0.0",
        server.keys.service_role_jwt
    ));
    let cases = [
        ("tenant_not_found", 404, "Tenant not found"),
        (
            "tenant_disabled",
            403,
            "Realtime was disabled for this tenant",
        ),
        ("too_many_connected_users", 429, "Too many connected users"),
        ("too_many_joins", 429, "Too many joins per second"),
    ];
    for (rejection, expected_status, text) in cases {
        server
            .control(
                "/faults/connect-rejection",
                json!({ "rejection": rejection }),
            )
            .await;
        let (status, body) = rejected(url.clone().into_client_request().unwrap()).await;
        assert_eq!(status, expected_status, "{rejection}");
        assert_eq!(body, json!({ "error": text }), "{rejection}");
    }
    server
        .control("/faults/connect-rejection", json!({ "rejection": null }))
        .await;
    let connected = tokio_tungstenite::connect_async(url).await;
    assert!(connected.is_ok(), "{:?}", connected.err());
}
