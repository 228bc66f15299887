//! The control endpoint: JSON routes on a separate loopback port that inject REST faults,
//! restart or pause the main listener, and expose Realtime's own control routes under
//! `/realtime`. It stays up while the main port restarts.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::realtime::Realtime;
use crate::rest::{Rest, RestFault};
use crate::server::HttpServer;

#[derive(Clone)]
pub(crate) struct ControlState {
    pub rest: Rest,
    pub main: HttpServer,
    pub realtime: Realtime,
}

/// Body of `POST /rest/faults`.
#[derive(Debug, Deserialize)]
struct FaultRequest {
    fault: RestFault,
    #[serde(default = "one")]
    count: u32,
    method: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
struct DurationRequest {
    millis: u64,
}

pub(crate) fn router(state: ControlState) -> Router {
    let realtime = state.realtime.control_router();
    Router::new()
        .route(
            "/rest/faults",
            post(inject_fault).get(list_faults).delete(clear_faults),
        )
        .route("/rest/idle-timeout", post(set_idle_timeout))
        .route("/rest/counts", get(counts).delete(reset_counts))
        .route("/rest/schema/reload", post(reload_schema))
        .route("/lifecycle/restart", post(restart))
        .route("/lifecycle/refuse", post(refuse))
        .with_state(state)
        .nest("/realtime", realtime)
}

async fn inject_fault(
    State(state): State<ControlState>,
    Json(request): Json<FaultRequest>,
) -> Json<Value> {
    state
        .rest
        .faults()
        .inject(request.fault, request.count, request.method.as_deref());
    Json(json!({"pending": state.rest.faults().pending()}))
}

async fn list_faults(State(state): State<ControlState>) -> Json<Value> {
    Json(json!({"pending": state.rest.faults().pending()}))
}

async fn clear_faults(State(state): State<ControlState>) -> StatusCode {
    state.rest.faults().clear();
    StatusCode::NO_CONTENT
}

async fn set_idle_timeout(
    State(state): State<ControlState>,
    Json(request): Json<DurationRequest>,
) -> StatusCode {
    state
        .rest
        .faults()
        .set_idle_timeout(Duration::from_millis(request.millis));
    StatusCode::NO_CONTENT
}

async fn counts(State(state): State<ControlState>) -> Json<Value> {
    let counts = state.rest.faults().request_counts();
    Json(json!({
        "get": counts.get,
        "post": counts.post,
        "patch": counts.patch,
        "delete": counts.delete,
        "other": counts.other,
        "total": counts.total(),
    }))
}

async fn reset_counts(State(state): State<ControlState>) -> StatusCode {
    state.rest.faults().reset_counts();
    StatusCode::NO_CONTENT
}

async fn reload_schema(State(state): State<ControlState>) -> (StatusCode, Json<Value>) {
    match state.rest.reload_schema().await {
        Ok(()) => (StatusCode::OK, Json(json!({"reloaded": true}))),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": format!("schema reload failed: {error:#}")})),
        ),
    }
}

/// Cuts every connection and closes the main listener before answering 202; the listener
/// reopens on the same port after `millis` in the background.
async fn restart(
    State(state): State<ControlState>,
    Json(request): Json<DurationRequest>,
) -> StatusCode {
    crate::take_down(&state.main, Some(&state.realtime)).await;
    spawn_reopen(state.main, Duration::from_millis(request.millis));
    StatusCode::ACCEPTED
}

/// Closes the main listener (open connections stay) before answering 202; it reopens on the
/// same port after `millis` in the background.
async fn refuse(
    State(state): State<ControlState>,
    Json(request): Json<DurationRequest>,
) -> StatusCode {
    crate::take_down(&state.main, None).await;
    spawn_reopen(state.main, Duration::from_millis(request.millis));
    StatusCode::ACCEPTED
}

fn spawn_reopen(main: HttpServer, after: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        if let Err(error) = main.open().await {
            tracing::error!(error = %format!("{error:#}"), "failed to reopen the main listener");
        }
    });
}
