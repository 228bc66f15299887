//! REST fault injection, the control endpoint, and the main port's restart and refusal.

mod rest_support;

use std::io::{Read, Write};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use rest_support::{error_body, header, start};
use serde_json::json;
use supabase_emulator::rest::RestFault;

#[tokio::test]
async fn injected_edge_and_database_faults() {
    let env = start().await;
    let faults = env.emulator.rest_faults();

    faults.inject(RestFault::DatabaseUnavailable { retry_after: 7 }, 1, None);
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&response, "retry-after").as_deref(), Some("7"));
    assert_eq!(error_body(response).await["code"], "PGRST000");

    faults.inject(
        RestFault::SchemaCacheUnavailable { retry_after: 2 },
        1,
        None,
    );
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(header(&response, "retry-after").as_deref(), Some("2"));
    assert_eq!(error_body(response).await["code"], "PGRST002");

    // A PATCH-only fault leaves GET alone.
    faults.inject(RestFault::ProjectPaused, 2, Some("PATCH"));
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    for _ in 0..2 {
        let response = env
            .service(Method::PATCH, "jobs?id=eq.1")
            .json(&json!({"log": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 540);
    }

    faults.inject(RestFault::GatewayTimeout, 1, None);
    faults.inject(RestFault::BadGateway, 1, None);
    faults.inject(RestFault::CloudflareUnknown, 1, None);
    faults.inject(RestFault::PoolTimeout, 1, None);
    faults.inject(RestFault::StatementTimeout, 1, None);
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 544);
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({"message": "An invalid response was received from the upstream server"})
    );
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 520);
    assert!(header(&response, "content-type")
        .unwrap()
        .starts_with("text/html"));
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_body(response).await["code"], "PGRST003");
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error_body(response).await["code"], "57014");

    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "faults are used up");

    let counts = faults.request_counts();
    assert_eq!(counts.patch, 2);
    assert_eq!(counts.get, 9);
}

#[tokio::test]
async fn dropped_response_after_commit() {
    let env = start().await;
    let id = env.insert_job("a", "pending").await;
    env.emulator.rest_faults().drop_after_commit(1);

    let result = env
        .service(Method::PATCH, &format!("jobs?id=eq.{id}&status=eq.pending"))
        .header("Prefer", "return=representation")
        .json(&json!({"status": "running"}))
        .send()
        .await;
    let error = result.expect_err("the client gets no response");
    assert!(!error.is_status(), "unexpected error kind: {error:?}");
    assert_eq!(env.status_of(id).await, "running", "the write committed");

    let response = env
        .service(Method::PATCH, &format!("jobs?id=eq.{id}&status=eq.pending"))
        .header("Prefer", "return=representation")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!([])
    );
}

#[tokio::test]
async fn control_endpoint_injects_faults() {
    let env = start().await;
    let control = env.emulator.control_url();
    let response = env
        .http
        .post(format!("{control}/rest/faults"))
        .json(&json!({"fault": {"kind": "database_unavailable", "retry_after": 3}, "count": 1, "method": "GET"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&response, "retry-after").as_deref(), Some("3"));

    let counts: serde_json::Value = env
        .http
        .get(format!("{control}/rest/counts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counts["get"], 1);
}

#[tokio::test]
async fn restart_returns_on_same_port() {
    let env = start().await;
    let url = env.emulator.url();
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // A request held open by a delay is cut by the restart.
    env.emulator
        .rest_faults()
        .delay(Duration::from_secs(30), 1, Some("GET"));
    let held = tokio::spawn(env.service(Method::GET, "jobs").send());
    while env.emulator.rest_faults().request_counts().get < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    env.emulator.restart(Duration::from_millis(200)).await;
    assert!(held.await.unwrap().is_err(), "held request was cut");

    assert_eq!(env.emulator.url(), url);
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn refused_connections_then_reopened() {
    let env = start().await;
    let addr = env.emulator.url().trim_start_matches("http://").to_string();
    // The control route closes the listener before it answers.
    let response = env
        .http
        .post(format!("{}/lifecycle/refuse", env.emulator.control_url()))
        .json(&json!({"millis": 300}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let probe = tokio::net::TcpStream::connect(&addr).await;
    assert!(probe.is_err(), "connection accepted while refusing");

    // Hang guard only: the listener reopens after 300 ms.
    let reopened = async {
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), reopened)
        .await
        .expect("listener reopens on the same port");
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    env.emulator
        .refuse_connections(Duration::from_millis(10))
        .await;
    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "open after refuse_connections returns"
    );
}

#[tokio::test]
async fn idle_keep_alive_is_closed() {
    let env = start().await;
    env.emulator
        .rest_faults()
        .set_idle_timeout(Duration::from_millis(200));
    let addr = env.emulator.url().trim_start_matches("http://").to_string();
    let key = env.emulator.keys().secret_key.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        // Hang guard only: the server is expected to close long before this.
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET /rest/v1/jobs HTTP/1.1\r\nHost: localhost\r\napikey: {key}\r\n\r\n"
        )
        .unwrap();
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => return Ok(received),
                Ok(n) => received.extend_from_slice(&buffer[..n]),
                Err(error) => return Err(error),
            }
        }
    })
    .await
    .unwrap();
    let received = outcome.expect("server closes the idle connection");
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"));
}
