//! JSON routes that trigger Realtime faults and read its counters. Every fault route is a
//! `POST` with a JSON body and returns `204 No Content`; `GET /stats` returns the counters.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{ConnectRejection, JoinRejection, Realtime, RealtimeStats};

pub(super) fn router(realtime: Realtime) -> Router {
    Router::new()
        .route("/stats", get(stats))
        .route("/faults/drop-sockets", post(drop_sockets))
        .route("/faults/server-disconnect", post(server_disconnect))
        .route("/faults/heartbeats", post(heartbeats))
        .route("/faults/stall", post(stall))
        .route("/faults/cdc-restart", post(cdc_restart))
        .route("/faults/rate-limited", post(rate_limited))
        .route("/faults/publication", post(publication))
        .route("/faults/restarting", post(restarting))
        .route("/faults/deploy", post(deploy))
        .route("/faults/phx-error", post(phx_error))
        .route("/faults/phx-close", post(phx_close))
        .route("/faults/system-error", post(system_error))
        .route("/faults/expire-tokens", post(expire_tokens))
        .route("/faults/transient-error", post(transient_error))
        .route("/faults/resubscribe", post(resubscribe))
        .route("/faults/connect-rejection", post(connect_rejection))
        .route("/faults/join-rejection", post(join_rejection))
        .with_state(realtime)
}

async fn stats(State(realtime): State<Realtime>) -> Json<RealtimeStats> {
    Json(realtime.stats())
}

/// `{"close_code": 1012}`; `null` or a missing code drops the TCP connection abruptly.
#[derive(Deserialize)]
struct DropSockets {
    close_code: Option<u16>,
}

async fn drop_sockets(
    State(realtime): State<Realtime>,
    Json(body): Json<DropSockets>,
) -> StatusCode {
    realtime.drop_all_sockets(body.close_code);
    StatusCode::NO_CONTENT
}

async fn server_disconnect(State(realtime): State<Realtime>) -> StatusCode {
    realtime.server_requested_disconnect();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Heartbeats {
    paused: bool,
}

async fn heartbeats(State(realtime): State<Realtime>, Json(body): Json<Heartbeats>) -> StatusCode {
    realtime.pause_heartbeats(body.paused);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Stall {
    stalled: bool,
}

async fn stall(State(realtime): State<Realtime>, Json(body): Json<Stall>) -> StatusCode {
    realtime.stall_delivery(body.stalled);
    StatusCode::NO_CONTENT
}

/// `{"window_ms": 2000}`: events are dropped for that many milliseconds.
#[derive(Deserialize)]
struct CdcRestart {
    window_ms: u64,
}

async fn cdc_restart(State(realtime): State<Realtime>, Json(body): Json<CdcRestart>) -> StatusCode {
    realtime.cdc_restart(Duration::from_millis(body.window_ms));
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Enabled {
    enabled: bool,
}

async fn rate_limited(State(realtime): State<Realtime>, Json(body): Json<Enabled>) -> StatusCode {
    realtime.set_rate_limited(body.enabled);
    StatusCode::NO_CONTENT
}

async fn restarting(State(realtime): State<Realtime>, Json(body): Json<Enabled>) -> StatusCode {
    realtime.set_restarting(body.enabled);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct Publication {
    in_publication: bool,
}

async fn publication(
    State(realtime): State<Realtime>,
    Json(body): Json<Publication>,
) -> StatusCode {
    realtime.set_not_in_publication(!body.in_publication);
    StatusCode::NO_CONTENT
}

async fn deploy(State(realtime): State<Realtime>) -> StatusCode {
    realtime.deploy();
    StatusCode::NO_CONTENT
}

/// `{"reason": "channel_crash"}`; `null` or a missing reason sends `{}`.
#[derive(Deserialize)]
struct PhxError {
    reason: Option<String>,
}

async fn phx_error(State(realtime): State<Realtime>, Json(body): Json<PhxError>) -> StatusCode {
    realtime.push_phx_error(body.reason.as_deref());
    StatusCode::NO_CONTENT
}

async fn phx_close(State(realtime): State<Realtime>) -> StatusCode {
    realtime.push_phx_close();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct SystemError {
    message: String,
}

async fn system_error(
    State(realtime): State<Realtime>,
    Json(body): Json<SystemError>,
) -> StatusCode {
    realtime.push_system_error(&body.message);
    StatusCode::NO_CONTENT
}

async fn expire_tokens(State(realtime): State<Realtime>) -> StatusCode {
    realtime.expire_tokens();
    StatusCode::NO_CONTENT
}

/// `{"message": "Too many database timeouts", "recover_after_ms": 1000}`.
#[derive(Deserialize)]
struct TransientError {
    message: String,
    recover_after_ms: u64,
}

async fn transient_error(
    State(realtime): State<Realtime>,
    Json(body): Json<TransientError>,
) -> StatusCode {
    realtime.transient_error(&body.message, Duration::from_millis(body.recover_after_ms));
    StatusCode::NO_CONTENT
}

async fn resubscribe(State(realtime): State<Realtime>) -> StatusCode {
    realtime.resubscribe_all();
    StatusCode::NO_CONTENT
}

/// `{"rejection": "tenant_not_found"}`; `null` accepts connections again. Values:
/// `tenant_not_found`, `tenant_disabled`, `too_many_connected_users`, `too_many_joins`.
#[derive(Deserialize)]
struct ConnectRejectionBody {
    rejection: Option<ConnectRejection>,
}

async fn connect_rejection(
    State(realtime): State<Realtime>,
    Json(body): Json<ConnectRejectionBody>,
) -> StatusCode {
    realtime.set_connect_rejection(body.rejection);
    StatusCode::NO_CONTENT
}

/// `{"rejection": "too_many_joins"}`; `null` accepts joins again. Values: `too_many_joins`,
/// `tenant_not_found`, `too_many_connected_users`, `database_unavailable`.
#[derive(Deserialize)]
struct JoinRejectionBody {
    rejection: Option<JoinRejection>,
}

async fn join_rejection(
    State(realtime): State<Realtime>,
    Json(body): Json<JoinRejectionBody>,
) -> StatusCode {
    realtime.set_join_rejection(body.rejection);
    StatusCode::NO_CONTENT
}
