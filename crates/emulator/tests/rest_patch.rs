//! PATCH, POST and DELETE at `/rest/v1/<table>`: status matrix, conditional claims, body
//! errors, type errors through Postgres input functions, and the rollback guards.

mod rest_support;

use reqwest::{Method, StatusCode};
use rest_support::{error_body, header, start};
use serde_json::{json, Value};

#[tokio::test]
async fn patch_status_matrix() {
    let env = start().await;
    let id = env.insert_job("a", "pending").await;

    let response = env
        .service(Method::PATCH, &format!("jobs?id=eq.{id}"))
        .json(&json!({"log": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&response, "content-range").as_deref(), Some("0-0/*"));
    assert!(header(&response, "content-type").is_none());
    assert!(header(&response, "preference-applied").is_none());

    let response = env
        .service(Method::PATCH, "jobs?id=eq.999")
        .header("Prefer", "return=minimal")
        .json(&json!({"log": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&response, "content-range").as_deref(), Some("*/*"));
    assert_eq!(
        header(&response, "preference-applied").as_deref(),
        Some("return=minimal")
    );

    let response = env
        .service(Method::PATCH, &format!("jobs?id=eq.{id}&select=id,status"))
        .header("Prefer", "return=representation, count=exact")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-range").as_deref(), Some("0-0/1"));
    assert_eq!(
        header(&response, "preference-applied").as_deref(),
        Some("return=representation, count=exact")
    );
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!([{"id": id, "status": "running"}])
    );

    let response = env
        .service(Method::PATCH, "jobs?id=eq.999")
        .header("Prefer", "return=representation, count=exact")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-range").as_deref(), Some("*/0"));
    assert_eq!(response.json::<Value>().await.unwrap(), json!([]));

    for body in ["{}", "[]", "[{}]"] {
        let response = env
            .service(Method::PATCH, &format!("jobs?id=eq.{id}"))
            .header("Prefer", "return=representation")
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "body {body}");
        assert_eq!(header(&response, "content-range").as_deref(), Some("*/*"));
        assert_eq!(response.json::<Value>().await.unwrap(), json!([]));
    }
}

#[tokio::test]
async fn concurrent_claims_have_one_winner() {
    let env = start().await;
    let id = env.insert_job("a", "pending").await;

    let mut claims = Vec::new();
    for worker in 0..16 {
        let request = env
            .service(Method::PATCH, &format!("jobs?id=eq.{id}&status=eq.pending&select=id,log"))
            .header("Prefer", "return=representation")
            .json(&json!({"status": "running", "log": format!("worker {worker}"), "started_at": "now"}));
        claims.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.unwrap()
        }));
    }
    let mut winners = Vec::new();
    for claim in claims {
        let rows = claim.await.unwrap();
        if !rows.as_array().unwrap().is_empty() {
            winners.push(rows);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let log: String = env
        .db
        .query_one("SELECT log FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(winners[0][0]["log"], log);
}

#[tokio::test]
async fn patch_body_errors() {
    let env = start().await;
    let id = env.insert_job("a", "pending").await;
    let path = format!("jobs?id=eq.{id}");

    let response = env
        .service(Method::PATCH, &path)
        .json(&json!({"status": "x", "helicopter": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST204");
    assert_eq!(
        body["message"],
        "Could not find the 'helicopter' column of 'jobs' in the schema cache"
    );
    assert_eq!(env.status_of(id).await, "pending");

    for raw in ["", "{not json"] {
        let response = env
            .service(Method::PATCH, &path)
            .header("Content-Type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = error_body(response).await;
        assert_eq!(body["code"], "PGRST102");
        assert_eq!(body["message"], "Empty or invalid json");
    }

    let response = env
        .service(Method::PATCH, &path)
        .header("Content-Type", "text/plain")
        .body("{\"status\":\"x\"}")
        .send()
        .await
        .unwrap();
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST102");
    assert_eq!(body["message"], "Content-Type not acceptable: text/plain");

    let response = env
        .service(Method::PATCH, &path)
        .body("{\"log\":\"no content type\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NO_CONTENT,
        "missing Content-Type is JSON"
    );
}

#[tokio::test]
async fn patch_type_errors_use_postgres_input() {
    let env = start().await;
    let id = env.insert_job("a", "pending").await;
    let path = format!("jobs?id=eq.{id}");
    let cases = [
        (
            json!({"id": "abc"}),
            "22P02",
            "invalid input syntax for type bigint: \"abc\"",
        ),
        (
            json!({"started_at": 1700000000}),
            "22008",
            "date/time field value out of range: \"1700000000\"",
        ),
        (
            json!({"started_at": "yesterday-ish"}),
            "22007",
            "invalid input syntax for type timestamp with time zone: \"yesterday-ish\"",
        ),
        (
            json!({"status": null}),
            "23502",
            "null value in column \"status\" of relation \"jobs\" violates not-null constraint",
        ),
        (
            json!({"log": "a\u{0000}b"}),
            "22P05",
            "unsupported Unicode escape sequence",
        ),
        (
            json!({"payload": {"k": "a\u{0000}"}}),
            "22P05",
            "unsupported Unicode escape sequence",
        ),
    ];
    for (body, code, message) in cases {
        let response = env
            .service(Method::PATCH, &path)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "body {body}");
        let error = error_body(response).await;
        assert_eq!(error["code"], code, "body {body}");
        assert_eq!(error["message"], message, "body {body}");
    }

    let response = env
        .service(Method::PATCH, &format!("{path}&select=started_at"))
        .header("Prefer", "return=representation")
        .json(&json!({"started_at": "now", "finished_at": "now()"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let same: bool = env
        .db
        .query_one(
            "SELECT started_at = finished_at AND started_at > now() - interval '1 hour' FROM jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(same, "now and now() are the transaction time");
}

#[tokio::test]
async fn patch_guards_roll_back() {
    let env = start().await;
    let first = env.insert_job("a", "pending").await;
    let second = env.insert_job("b", "pending").await;

    let response = env
        .service(Method::PATCH, "jobs?status=eq.pending")
        .header("Prefer", "return=representation")
        .header("Accept", "application/vnd.pgrst.object+json")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST116");
    assert_eq!(body["details"], "The result contains 2 rows");
    assert_eq!(env.status_of(first).await, "pending");

    let response = env
        .service(Method::PATCH, "jobs?status=eq.pending")
        .header("Prefer", "handling=strict, max-affected=1")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST124");
    assert_eq!(body["details"], "The query affects 2 rows");
    assert_eq!(env.status_of(second).await, "pending");

    let response = env
        .service(Method::PATCH, &format!("jobs?id=eq.{first}"))
        .header("Prefer", "handling=strict, max-affected=1")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        header(&response, "preference-applied").as_deref(),
        Some("handling=strict, max-affected=1")
    );

    let response = env
        .service(Method::PATCH, &format!("jobs?id=eq.{second}"))
        .header("Prefer", "handling=strict, foo")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST122");
    assert_eq!(body["details"], "Invalid preferences: foo");

    // `tx=rollback` is dropped and the write commits.
    let response = env
        .service(Method::PATCH, &format!("jobs?id=eq.{second}"))
        .header("Prefer", "tx=rollback")
        .json(&json!({"status": "running"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(header(&response, "preference-applied").is_none());
    assert_eq!(env.status_of(second).await, "running");
}

#[tokio::test]
async fn insert_and_delete() {
    let env = start().await;
    let response = env
        .service(Method::POST, "jobs?select=action,status")
        .header("Prefer", "return=representation")
        .json(&json!([{"action": "a"}, {"action": "b"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!([{"action": "a", "status": "pending"}, {"action": "b", "status": "pending"}])
    );

    let response = env
        .service(Method::POST, "jobs")
        .json(&json!({"action": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(response.bytes().await.unwrap().is_empty());

    let response = env
        .service(Method::DELETE, "jobs?action=in.(a,b)")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&response, "content-range").as_deref(), Some("0-1/*"));
    let left: i64 = env
        .db
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
}
