//! GET at `/rest/v1/<table>`: filters, ordering, paging, counting and read errors.

mod rest_support;

use reqwest::{Method, StatusCode};
use rest_support::{error_body, header, start};
use serde_json::{json, Value};

#[tokio::test]
async fn get_filters_and_headers() {
    let env = start().await;
    let a = env.insert_job("a", "pending").await;
    let b = env.insert_job("b", "running").await;
    let c = env.insert_job("c", "done").await;

    let response = env
        .service(Method::GET, "jobs?select=id&status=eq.pending")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-range").as_deref(), Some("0-0/*"));
    assert_eq!(
        header(&response, "content-location").as_deref(),
        Some("/jobs?select=id&status=eq.pending")
    );
    assert_eq!(response.json::<Value>().await.unwrap(), json!([{"id": a}]));

    let cases = [
        (
            "select=id&status=neq.pending&order=id.asc",
            json!([{"id": b}, {"id": c}]),
        ),
        (
            "select=id&status=in.(pending,%22done%22)&order=id.desc",
            json!([{"id": c}, {"id": a}]),
        ),
        ("select=id&status=not.in.(pending,done)", json!([{"id": b}])),
        (
            "select=id&log=is.null&order=id",
            json!([{"id": a}, {"id": b}, {"id": c}]),
        ),
        ("select=id&finished_at=not.is.null", json!([])),
        ("select=id&action=like.*b*", json!([{"id": b}])),
        (
            "select=id&or=(status.eq.done,action.eq.a)&order=id",
            json!([{"id": a}, {"id": c}]),
        ),
        (
            "select=id&created_at=lt.2999-01-01T00:00:00Z&id=lte.1&order=id",
            json!([{"id": 1}]),
        ),
    ];
    for (query, expected) in cases {
        let response = env
            .service(Method::GET, &format!("jobs?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "query {query}");
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            expected,
            "query {query}"
        );
    }

    let response = env
        .service(Method::GET, "jobs?status=eq.nothing")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "content-range").as_deref(), Some("*/*"));
    assert_eq!(response.json::<Value>().await.unwrap(), json!([]));
}

#[tokio::test]
async fn plus_in_query_is_a_space() {
    let env = start().await;
    env.insert_job("a", "pending").await;

    let response = env
        .service(Method::GET, "jobs?created_at=lt.2026-01-02T03:04:05+00:00")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = error_body(response).await;
    assert_eq!(body["code"], "22007");
    assert_eq!(
        body["message"],
        "invalid input syntax for type timestamp with time zone: \"2026-01-02T03:04:05 00:00\""
    );

    for query in [
        "jobs?created_at=lt.2999-01-02T03:04:05%2B00:00",
        "jobs?created_at=lt.2999-01-02T03:04:05Z",
        "jobs?created_at=lte.now",
    ] {
        let response = env.service(Method::GET, query).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "query {query}");
        assert_eq!(
            response
                .json::<Value>()
                .await
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
}

#[tokio::test]
async fn order_limit_offset_range_and_cap() {
    let env = start().await;
    env.db
        .batch_execute("INSERT INTO jobs (action) SELECT 'bulk' FROM generate_series(1, 1005)")
        .await
        .unwrap();

    let response = env
        .service(Method::GET, "jobs?select=id&order=id.desc&limit=2&offset=1")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "content-range").as_deref(), Some("1-2/*"));
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!([{"id": 1004}, {"id": 1003}])
    );

    let response = env
        .service(Method::GET, "jobs?select=id&order=id.asc")
        .header("Range", "3-4")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!([{"id": 4}, {"id": 5}])
    );

    let response = env
        .service(Method::GET, "jobs?select=id&limit=5000")
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&response, "content-range").as_deref(),
        Some("0-999/*")
    );
    assert_eq!(
        response
            .json::<Value>()
            .await
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1000
    );

    // Range is ignored on PATCH: every matching row is updated.
    let response = env
        .service(Method::PATCH, "jobs?id=lte.10")
        .header("Range", "0-0")
        .json(&json!({"status": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "content-range").as_deref(), Some("0-9/*"));
}

#[tokio::test]
async fn count_exact_statuses() {
    let env = start().await;
    for _ in 0..15 {
        env.insert_job("a", "pending").await;
    }

    let response = env
        .service(Method::GET, "jobs?limit=10")
        .header("Prefer", "count=exact")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&response, "content-range").as_deref(),
        Some("0-9/15")
    );
    assert_eq!(
        header(&response, "preference-applied").as_deref(),
        Some("count=exact")
    );

    let response = env
        .service(Method::GET, "jobs")
        .header("Prefer", "count=exact")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-range").as_deref(),
        Some("0-14/15")
    );

    let response = env
        .service(Method::GET, "jobs?status=eq.none")
        .header("Prefer", "count=exact")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-range").as_deref(), Some("*/0"));

    let response = env
        .service(Method::GET, "jobs?offset=100")
        .header("Prefer", "count=exact")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&response, "content-range").as_deref(), Some("*/15"));
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST103");
    assert_eq!(
        body["details"],
        "An offset of 100 was requested, but there are only 15 rows."
    );
}

#[tokio::test]
async fn read_errors_and_timestamps() {
    let env = start().await;
    env.db
        .batch_execute(
            "INSERT INTO jobs (action, created_at) VALUES ('a', '2026-01-02T03:04:05.12Z')",
        )
        .await
        .unwrap();

    let response = env
        .service(Method::GET, "jobs?select=created_at")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!([{"created_at": "2026-01-02T03:04:05.12+00:00"}])
    );

    let response = env
        .service(Method::GET, "jobs?select=id,banana")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        header(&response, "proxy-status").as_deref(),
        Some("PostgREST; error=42703")
    );
    let body = error_body(response).await;
    assert_eq!(body["code"], "42703");
    assert_eq!(body["message"], "column jobs.banana does not exist");

    let response = env.service(Method::GET, "nope").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = error_body(response).await;
    assert_eq!(body["code"], "PGRST205");
    assert_eq!(
        body["message"],
        "Could not find the table 'public.nope' in the schema cache"
    );

    let response = env
        .service(Method::GET, "jobs")
        .header("Accept-Profile", "private")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);
    assert_eq!(error_body(response).await["code"], "PGRST106");

    let response = env
        .service(Method::GET, "jobs")
        .header("Accept", "application/vnd.pgrst.object+json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["action"], "a");
}
