//! Shared setup for the REST tests: a started emulator, an HTTP client and a direct
//! database connection.

#![allow(dead_code)]

use reqwest::{Method, RequestBuilder};
use supabase_emulator::{Emulator, EmulatorOptions};
use tokio_postgres::NoTls;

pub struct Env {
    pub emulator: Emulator,
    pub http: reqwest::Client,
    pub db: tokio_postgres::Client,
}

pub async fn start() -> Env {
    start_with(EmulatorOptions::default()).await
}

pub async fn start_with(options: EmulatorOptions) -> Env {
    let emulator = Emulator::start(options).await.expect("emulator starts");
    let (db, connection) = tokio_postgres::connect(emulator.database_url(), NoTls)
        .await
        .expect("database connects");
    tokio::spawn(connection);
    let http = reqwest::Client::builder()
        .user_agent("rest-tests/1")
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    Env { emulator, http, db }
}

impl Env {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}/rest/v1/{}", self.emulator.url(), path_and_query)
    }

    /// A request with the secret key.
    pub fn service(&self, method: Method, path_and_query: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path_and_query))
            .header("apikey", &self.emulator.keys().secret_key)
    }

    /// A request with the publishable key (runs as `anon`).
    pub fn anon(&self, method: Method, path_and_query: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path_and_query))
            .header("apikey", &self.emulator.keys().publishable_key)
    }

    /// Inserts a job directly and returns its id.
    pub async fn insert_job(&self, action: &str, status: &str) -> i64 {
        self.db
            .query_one(
                "INSERT INTO jobs (action, status) VALUES ($1, $2) RETURNING id",
                &[&action, &status],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn status_of(&self, id: i64) -> String {
        self.db
            .query_one("SELECT status FROM jobs WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0)
    }
}

pub fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// Reads a PostgREST error body and checks it has exactly the four keys.
pub async fn error_body(response: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    let body: serde_json::Value = response.json().await.unwrap();
    let mut keys: Vec<&String> = body
        .as_object()
        .expect("error is an object")
        .keys()
        .collect();
    keys.sort();
    assert_eq!(keys, ["code", "details", "hint", "message"]);
    body
}
