//! Gateway key checks and PostgREST JWT errors at `/rest/v1`.

mod rest_support;

use reqwest::{Method, StatusCode};
use rest_support::{error_body, header, start, start_with};
use serde_json::json;
use supabase_emulator::EmulatorOptions;

#[tokio::test]
async fn gateway_rejects_missing_and_unknown_keys() {
    let env = start().await;

    let response = env.http.get(env.url("jobs")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"message":"No API key found in request","hint":"No `apikey` request header or url param was found."})
    );

    let response = env
        .http
        .get(env.url("jobs"))
        .header("apikey", "sb_secret_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"message":"Invalid API key","hint":"Double check your Supabase `anon` or `service_role` API key."})
    );

    let query_key = format!("jobs?apikey={}", env.emulator.keys().secret_key);
    let response = env.http.get(env.url(&query_key)).send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "apikey query parameter is accepted"
    );
}

#[tokio::test]
async fn gateway_bearer_sb_key_and_browser_agent() {
    let env = start().await;
    let secret = env.emulator.keys().secret_key.clone();

    let response = env
        .service(Method::GET, "jobs")
        .header("Authorization", format!("Bearer {secret}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&response, "www-authenticate").as_deref(),
        Some(
            "Bearer error=\"invalid_token\", error_description=\"Expected 3 parts in JWT; got 1\""
        )
    );
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST301");
    assert_eq!(body["message"], "Expected 3 parts in JWT; got 1");

    let response = env
        .service(Method::GET, "jobs")
        .header("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn legacy_jwt_roles_and_expiry() {
    let env = start().await;
    let keys = env.emulator.keys().clone();
    let id = env.insert_job("echo", "pending").await;

    // The legacy service_role key alone: copied into Authorization, bypasses RLS.
    let response = env
        .http
        .get(env.url("jobs?select=id"))
        .header("apikey", &keys.service_role_jwt)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!([{"id": id}])
    );

    // The anon key with a service_role JWT in Authorization: the JWT decides.
    let response = env
        .http
        .get(env.url("jobs?select=id"))
        .header("apikey", &keys.anon_jwt)
        .header("Authorization", format!("Bearer {}", keys.service_role_jwt))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!([{"id": id}])
    );

    // The anon key alone: RLS hides every row.
    let response = env
        .http
        .get(env.url("jobs"))
        .header("apikey", &keys.anon_jwt)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!([])
    );

    let expired = keys.sign(
        "service_role",
        supabase_emulator::auth::now_seconds() - 3600,
    );
    let response = env
        .http
        .get(env.url("jobs"))
        .header("apikey", &keys.anon_jwt)
        .header("Authorization", format!("Bearer {expired}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&response, "www-authenticate").is_some());
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST303");
    assert_eq!(body["message"], "JWT expired");
}

#[tokio::test]
async fn legacy_keys_disabled_switch() {
    let options = EmulatorOptions {
        legacy_keys_enabled: false,
        ..EmulatorOptions::default()
    };
    let env = start_with(options).await;
    let response = env
        .http
        .get(env.url("jobs"))
        .header("apikey", &env.emulator.keys().service_role_jwt)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["message"], "Legacy API keys are disabled");

    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "secret key still works");
}

#[tokio::test]
async fn anon_updates_nothing_under_rls() {
    let env = start().await;
    let id = env.insert_job("echo", "pending").await;

    let response = env
        .anon(Method::PATCH, &format!("jobs?id=eq.{id}"))
        .header("Prefer", "return=representation")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-range").as_deref(), Some("*/*"));
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!([])
    );

    let response = env.anon(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!([])
    );
    assert_eq!(env.status_of(id).await, "pending");
}

#[tokio::test]
async fn missing_grant_is_401_for_anon_and_403_for_service() {
    let env = start().await;
    env.db
        .batch_execute("REVOKE ALL ON jobs FROM anon, service_role")
        .await
        .unwrap();

    let response = env.anon(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&response, "www-authenticate").as_deref(),
        Some("Bearer")
    );
    let body = error_body(response).await;
    assert_eq!(body["code"], "42501");
    assert_eq!(body["message"], "permission denied for table jobs");

    let response = env.service(Method::GET, "jobs").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_body(response).await["code"], "42501");
}
