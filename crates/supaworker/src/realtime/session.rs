//! One websocket connection: connect, heartbeats, and the state machine of the single
//! `postgres_changes` channel (join, binding check, readiness, events, leave and rejoin).
//! A session ends on shutdown or on any socket failure; the caller then reconnects.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::backoff::RetryState;
use super::frame::{self, Frame};
use super::key::ApiKeyKind;
use super::{unix_millis_now, Hint, RealtimeConfig, RealtimeStats};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The SQL that adds the jobs table to the publication Realtime reads changes from.
const PUBLICATION_FIX: &str = "alter publication supabase_realtime add table";

/// Maximum bytes of an HTTP error body copied into an error message.
const MAX_ERROR_BODY_BYTES: usize = 300;

/// Minimum time between two log lines about dropped hints.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Time allowed for the close handshake at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Failures of a Realtime connection. Every variant except [`RealtimeError::InvalidUrl`] is
/// worth retrying, and the client retries all of them with backoff.
#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    /// The configured URL cannot become a websocket URL; a retry does not help.
    #[error("invalid Realtime URL: {0}")]
    InvalidUrl(String),
    /// The server rejected the upgrade request with an HTTP error. Realtime sends 401 for a
    /// missing, malformed or expired key (a retry helps only after the key is fixed) and 429
    /// or 5xx for load (a retry helps).
    #[error("websocket upgrade rejected with HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    /// TCP, TLS or websocket handshake failure; a retry helps once the server is reachable.
    #[error("websocket connect failed: {0}")]
    Connect(#[source] tungstenite::Error),
    #[error("websocket connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The server closed the websocket, for example 1000 after 60 s without client frames,
    /// 1001 after a join-rate limit, 1012 on a deploy. A retry helps.
    #[error("websocket closed by server with code {code}: {reason}")]
    Closed { code: u16, reason: String },
    /// The stream ended without a close frame (code 1006 in browser terms).
    #[error("websocket ended without a close frame")]
    Ended,
    #[error("websocket read failed: {0}")]
    Read(#[source] tungstenite::Error),
    #[error("websocket write failed: {0}")]
    Write(#[source] tungstenite::Error),
    #[error("websocket write timed out after {0:?}")]
    WriteTimeout(Duration),
    /// A heartbeat reply had not arrived when the next heartbeat was due.
    #[error("heartbeat reply not received within {0:?}")]
    HeartbeatTimeout(Duration),
    /// No frame at all arrived for this long, although the server replies to every heartbeat.
    #[error("no frame received within {0:?}")]
    ReadTimeout(Duration),
}

impl RealtimeError {
    /// Returns whether retrying the same request can succeed without a configuration change.
    pub fn is_retryable(&self) -> bool {
        match self {
            RealtimeError::InvalidUrl(_) => false,
            RealtimeError::Rejected { status, .. } => !matches!(status, 401 | 403 | 404),
            _ => true,
        }
    }
}

/// Opens the websocket, sending the key as the `apikey` query parameter (in `url`) and as
/// the `x-api-key` header, which the server reads first.
pub(super) async fn connect(
    url: &url::Url,
    config: &RealtimeConfig,
) -> Result<Socket, RealtimeError> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(RealtimeError::Connect)?;
    let mut key_header = HeaderValue::from_str(&config.api_key).map_err(|_| {
        RealtimeError::InvalidUrl("the API key contains characters not allowed in a header".into())
    })?;
    key_header.set_sensitive(true);
    request.headers_mut().insert("x-api-key", key_header);

    let timeout = config.readiness_timeout;
    // NOTE: tests run only plain `ws://` on loopback; the `wss://` path (rustls with the
    // webpki roots) is not exercised by any test here.
    match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request)).await {
        Err(_) => Err(RealtimeError::ConnectTimeout(timeout)),
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let body = response
                .body()
                .as_deref()
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
                .unwrap_or_default();
            Err(RealtimeError::Rejected {
                status: response.status().as_u16(),
                body: truncate(body, MAX_ERROR_BODY_BYTES),
            })
        }
        Ok(Err(error)) => Err(RealtimeError::Connect(error)),
    }
}

fn truncate(mut text: String, max_bytes: usize) -> String {
    if text.len() > max_bytes {
        let mut cut = max_bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Destinations of the client's output: hints, the readiness counter and the stats.
pub(super) struct Outputs {
    pub hints: mpsc::Sender<Hint>,
    pub ready: watch::Sender<u64>,
    pub stats: Arc<RealtimeStats>,
}

/// Server-side state of our channel, as far as the client knows it.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// No channel on the server; the next join is due at `rejoin_at`.
    Idle { rejoin_at: Instant },
    /// Join sent, reply pending. The channel must be live by `deadline`.
    Joining { join_ref: String, deadline: Instant },
    /// Join accepted with binding ids, waiting for "Subscribed to PostgreSQL" by `deadline`.
    Joined {
        join_ref: String,
        binding_ids: Vec<Value>,
        deadline: Instant,
    },
    /// "Subscribed to PostgreSQL" received: changes are being delivered.
    Live {
        join_ref: String,
        binding_ids: Vec<Value>,
    },
}

impl Phase {
    fn join_ref(&self) -> Option<&str> {
        match self {
            Phase::Idle { .. } => None,
            Phase::Joining { join_ref, .. }
            | Phase::Joined { join_ref, .. }
            | Phase::Live { join_ref, .. } => Some(join_ref),
        }
    }

    fn binding_ids(&self) -> &[Value] {
        match self {
            Phase::Joined { binding_ids, .. } | Phase::Live { binding_ids, .. } => binding_ids,
            _ => &[],
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Idle { rejoin_at } => Some(*rejoin_at),
            Phase::Joining { deadline, .. } | Phase::Joined { deadline, .. } => Some(*deadline),
            Phase::Live { .. } => None,
        }
    }
}

/// Classification of a `system` message with `status: "error"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SystemErrorKind {
    /// The server cannot create the subscription and never retries by itself: the table is
    /// not in the publication, or the filter is invalid.
    SubscribeFailed,
    /// Any other error, such as an expired token or a transient database failure.
    Other,
}

fn classify_system_error(extension: &str, message: &str) -> SystemErrorKind {
    let permanent = message.starts_with("Unable to subscribe")
        || message.starts_with("Error parsing `filter`")
        || message.starts_with("No subscription params");
    if extension == frame::POSTGRES_CHANGES && permanent {
        SystemErrorKind::SubscribeFailed
    } else {
        SystemErrorKind::Other
    }
}

/// Requested `postgres_changes` bindings: every INSERT, and every UPDATE that leaves a row
/// `pending`, so a job put back to pending wakes the worker.
pub(super) fn bindings(schema: &str, table: &str) -> Vec<Value> {
    vec![
        json!({"event": "INSERT", "schema": schema, "table": table}),
        json!({"event": "UPDATE", "schema": schema, "table": table, "filter": "status=eq.pending"}),
    ]
}

/// Builds the `phx_join` payload in the shape realtime-js sends. The key goes in
/// `access_token` only when it is a JWT, because Realtime ignores `sb_` access tokens and
/// uses the token the socket connected with.
fn join_payload(bindings: &[Value], key_kind: &ApiKeyKind, api_key: &str) -> Value {
    let mut payload = json!({
        "config": {
            "broadcast": {"ack": false, "self": false},
            "presence": {"key": "", "enabled": false},
            "postgres_changes": bindings,
            "private": false,
        }
    });
    if key_kind.is_jwt() {
        payload["access_token"] = Value::String(api_key.to_owned());
    }
    payload
}

/// Checks the join reply's `postgres_changes` list against the requested bindings, entry by
/// entry (the server echoes each entry as sent and adds an `id`), and returns the ids.
fn binding_ids_from_reply(requested: &[Value], reply: &Value) -> Result<Vec<Value>, String> {
    let Some(echoed) = reply.get("postgres_changes").and_then(Value::as_array) else {
        return Err("reply has no postgres_changes list".to_owned());
    };
    if echoed.len() != requested.len() {
        return Err(format!(
            "reply lists {} bindings, {} were requested",
            echoed.len(),
            requested.len()
        ));
    }
    let mut ids = Vec::with_capacity(echoed.len());
    for (index, (sent, received)) in requested.iter().zip(echoed).enumerate() {
        for field in ["event", "schema", "table", "filter"] {
            let sent_value = text_field(sent, field);
            let received_value = text_field(received, field);
            let same = match (sent_value, received_value) {
                (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                return Err(format!(
                    "binding {index} field `{field}`: sent {sent_value:?}, received {received_value:?}"
                ));
            }
        }
        match received.get("id") {
            Some(id) if !id.is_null() => ids.push(id.clone()),
            _ => return Err(format!("binding {index} has no id")),
        }
    }
    Ok(ids)
}

/// Returns a string field, treating `null`, absent and empty alike.
fn text_field<'a>(value: &'a Value, field: &str) -> Option<&'a str> {
    value
        .get(field)
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
}

/// Extracts the hint from a `postgres_changes` payload, or `None` when the record has no id.
fn hint_from_change(data: &Value) -> Option<Hint> {
    let id = data.get("record")?.get("id")?;
    if id.is_null() {
        return None;
    }
    Some(Hint::Job {
        id: id.clone(),
        truncated: change_errors(data)
            .iter()
            .any(|error| error.starts_with("Error 413")),
    })
}

fn change_errors(data: &Value) -> Vec<&str> {
    data.get("errors")
        .and_then(Value::as_array)
        .map(|errors| errors.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// One connected websocket and the channel on it.
pub(super) struct Session<'a> {
    sink: SplitSink<Socket, Message>,
    stream: SplitStream<Socket>,
    config: &'a RealtimeConfig,
    key_kind: &'a ApiKeyKind,
    outputs: &'a Outputs,
    retry: &'a mut RetryState,
    shutdown: &'a CancellationToken,
    topic: String,
    bindings: Vec<Value>,
    next_ref: u64,
    phase: Phase,
    /// Ref and send time of the heartbeat whose reply is outstanding.
    pending_heartbeat: Option<(String, Instant)>,
    last_frame_at: Instant,
    last_drop_log: Option<Instant>,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        socket: Socket,
        config: &'a RealtimeConfig,
        key_kind: &'a ApiKeyKind,
        outputs: &'a Outputs,
        retry: &'a mut RetryState,
        shutdown: &'a CancellationToken,
    ) -> Self {
        let (sink, stream) = socket.split();
        Session {
            sink,
            stream,
            config,
            key_kind,
            outputs,
            retry,
            shutdown,
            topic: config.topic(),
            bindings: bindings(&config.schema, &config.table),
            next_ref: 0,
            // A fresh socket joins at once.
            phase: Phase::Idle {
                rejoin_at: Instant::now(),
            },
            pending_heartbeat: None,
            last_frame_at: Instant::now(),
            last_drop_log: None,
        }
    }

    fn stats(&self) -> &RealtimeStats {
        &self.outputs.stats
    }

    /// The server replies to each heartbeat within one period on a healthy link, so three
    /// silent periods mean the link is dead even if the heartbeat check itself was delayed.
    fn read_timeout(&self) -> Duration {
        self.config.heartbeat_interval * 3
    }

    fn write_timeout(&self) -> Duration {
        self.config.heartbeat_interval
    }

    fn make_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    /// Runs until shutdown (`Ok`) or a socket failure (`Err`).
    pub(super) async fn run(mut self) -> Result<(), RealtimeError> {
        let period = self.config.heartbeat_interval;
        // Fixed schedule: inbound traffic never delays a heartbeat, because the server's idle
        // timeout counts only frames sent by the client.
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            let read_deadline = self.last_frame_at + self.read_timeout();
            let channel_deadline = self.phase.deadline();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.close_for_shutdown().await;
                    return Ok(());
                }
                _ = heartbeat.tick() => self.send_heartbeat().await?,
                _ = sleep_until(read_deadline) => {
                    let timeout = self.read_timeout();
                    self.close_best_effort("read timeout").await;
                    return Err(RealtimeError::ReadTimeout(timeout));
                }
                _ = sleep_until(channel_deadline.unwrap_or(read_deadline)), if channel_deadline.is_some() => {
                    self.on_channel_deadline().await?;
                }
                message = self.stream.next() => {
                    match message {
                        None => return Err(RealtimeError::Ended),
                        Some(Err(error)) => return Err(RealtimeError::Read(error)),
                        Some(Ok(message)) => {
                            self.last_frame_at = Instant::now();
                            self.on_message(message).await?;
                        }
                    }
                }
            }
        }
    }

    async fn send_frame(&mut self, frame: Frame) -> Result<(), RealtimeError> {
        let timeout = self.write_timeout();
        // `SinkExt::send` flushes, which also pushes out pongs queued by the reader.
        match tokio::time::timeout(timeout, self.sink.send(Message::text(frame.encode()))).await {
            Err(_) => Err(RealtimeError::WriteTimeout(timeout)),
            Ok(result) => result.map_err(RealtimeError::Write),
        }
    }

    async fn send_heartbeat(&mut self) -> Result<(), RealtimeError> {
        if let Some((heartbeat_ref, _)) = &self.pending_heartbeat {
            warn!(heartbeat_ref = %heartbeat_ref, "heartbeat reply missing when the next heartbeat was due; reconnecting");
            self.stats()
                .heartbeat_timeouts
                .fetch_add(1, Ordering::Relaxed);
            self.close_best_effort("heartbeat timeout").await;
            return Err(RealtimeError::HeartbeatTimeout(
                self.config.heartbeat_interval,
            ));
        }
        let heartbeat_ref = self.make_ref();
        let frame = Frame::new(
            None,
            Some(&heartbeat_ref),
            frame::PHOENIX_TOPIC,
            frame::HEARTBEAT,
            json!({}),
        );
        self.send_frame(frame).await?;
        self.pending_heartbeat = Some((heartbeat_ref, Instant::now()));
        Ok(())
    }

    /// Sends a close frame with code 1000 and does not wait for the answer.
    async fn close_best_effort(&mut self, reason: &'static str) {
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(CLOSE_GRACE, self.sink.send(close)).await;
    }

    /// Leaves the channel, closes with 1000 and waits briefly for the server's close frame.
    async fn close_for_shutdown(&mut self) {
        if let Some(join_ref) = self.phase.join_ref().map(str::to_owned) {
            let leave_ref = self.make_ref();
            let leave = Frame::new(
                Some(&join_ref),
                Some(&leave_ref),
                &self.topic,
                frame::PHX_LEAVE,
                json!({}),
            );
            if let Err(error) = self.send_frame(leave).await {
                debug!(%error, "phx_leave at shutdown failed");
            }
        }
        self.close_best_effort("shutdown").await;
        let drain = async { while let Some(Ok(_)) = self.stream.next().await {} };
        let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
        info!("Realtime websocket closed for shutdown");
    }

    async fn join(&mut self) -> Result<(), RealtimeError> {
        let now_unix_seconds = (unix_millis_now() / 1000) as i64;
        if self.key_kind.is_expired_at(now_unix_seconds) {
            error!("the configured API key is a JWT whose exp has passed, so Realtime will reject it; configure a current service_role key or an sb_secret_ key");
        }
        let join_ref = self.make_ref();
        let payload = join_payload(&self.bindings, self.key_kind, &self.config.api_key);
        let frame = Frame::new(
            Some(&join_ref),
            Some(&join_ref),
            &self.topic,
            frame::PHX_JOIN,
            payload,
        );
        self.send_frame(frame).await?;
        if self.stats().joins.fetch_add(1, Ordering::Relaxed) > 0 {
            self.stats().rejoins.fetch_add(1, Ordering::Relaxed);
        }
        debug!(join_ref = %join_ref, topic = %self.topic, "phx_join sent");
        self.phase = Phase::Joining {
            join_ref,
            deadline: Instant::now() + self.config.readiness_timeout,
        };
        Ok(())
    }

    /// Drops the current channel and schedules a join after `delay`. Sends `phx_leave` unless
    /// the server already removed the channel, so the socket never has two channels on the topic.
    async fn rejoin_after(
        &mut self,
        delay: Duration,
        send_leave: bool,
    ) -> Result<(), RealtimeError> {
        let old_join_ref = self.phase.join_ref().map(str::to_owned);
        self.phase = Phase::Idle {
            rejoin_at: Instant::now() + delay,
        };
        self.stats().live.store(false, Ordering::Relaxed);
        if let (true, Some(join_ref)) = (send_leave, old_join_ref) {
            let leave_ref = self.make_ref();
            let leave = Frame::new(
                Some(&join_ref),
                Some(&leave_ref),
                &self.topic,
                frame::PHX_LEAVE,
                json!({}),
            );
            self.send_frame(leave).await?;
        }
        info!(
            wait_ms = delay.as_millis() as u64,
            "Realtime channel rejoin scheduled"
        );
        Ok(())
    }

    fn backoff_delay(&mut self) -> Duration {
        self.retry.failure_delay(std::time::Instant::now())
    }

    async fn on_channel_deadline(&mut self) -> Result<(), RealtimeError> {
        match &self.phase {
            Phase::Idle { .. } => self.join().await,
            Phase::Joining { join_ref, .. } | Phase::Joined { join_ref, .. } => {
                warn!(
                    join_ref = %join_ref,
                    timeout_ms = self.config.readiness_timeout.as_millis() as u64,
                    "Realtime subscription not confirmed in time; leaving and rejoining"
                );
                let delay = self.backoff_delay();
                self.rejoin_after(delay, true).await
            }
            Phase::Live { .. } => Ok(()),
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), RealtimeError> {
        match message {
            Message::Text(text) => match Frame::decode(&text) {
                Ok(frame) => self.on_frame(frame).await,
                Err(error) => {
                    warn!(%error, "invalid Realtime frame skipped");
                    Ok(())
                }
            },
            // Binary frames carry only broadcast features, which this client does not use.
            Message::Binary(_) => Ok(()),
            Message::Ping(_) => {
                // tungstenite queued the pong while reading; flush pushes it out now.
                let timeout = self.write_timeout();
                match tokio::time::timeout(timeout, self.sink.flush()).await {
                    Err(_) => Err(RealtimeError::WriteTimeout(timeout)),
                    Ok(result) => result.map_err(RealtimeError::Write),
                }
            }
            Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(close) => {
                let (code, reason) = match close {
                    Some(close) => (u16::from(close.code), close.reason.to_string()),
                    None => (1005, String::new()),
                };
                warn!(code, reason = %reason, "Realtime websocket closed by server");
                Err(RealtimeError::Closed { code, reason })
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), RealtimeError> {
        if frame.topic == frame::PHOENIX_TOPIC {
            self.on_socket_reply(&frame);
            return Ok(());
        }
        if frame.topic != self.topic {
            debug!(topic = %frame.topic, event = %frame.event, "frame for another topic ignored");
            return Ok(());
        }
        match frame.event.as_str() {
            frame::PHX_REPLY => self.on_reply(frame).await,
            frame::POSTGRES_CHANGES => {
                self.on_change(&frame);
                Ok(())
            }
            frame::SYSTEM => self.on_system(frame).await,
            frame::PHX_CLOSE | frame::PHX_ERROR => self.on_channel_end(frame).await,
            other => {
                debug!(event = %other, "unhandled channel event ignored");
                Ok(())
            }
        }
    }

    fn on_socket_reply(&mut self, frame: &Frame) {
        let Some((heartbeat_ref, sent_at)) = &self.pending_heartbeat else {
            return;
        };
        if frame.event == frame::PHX_REPLY && frame.msg_ref.as_deref() == Some(heartbeat_ref) {
            let rtt = sent_at.elapsed();
            self.stats()
                .heartbeat_rtt_micros
                .store(rtt.as_micros() as u64, Ordering::Relaxed);
            self.stats()
                .heartbeat_replies
                .fetch_add(1, Ordering::Relaxed);
            self.pending_heartbeat = None;
        }
    }

    /// Returns whether a frame's refs name the current join; absent refs are accepted.
    fn is_current(&self, frame: &Frame) -> bool {
        let Some(current) = self.phase.join_ref() else {
            return false;
        };
        let join_ref_matches = frame.join_ref.as_deref().is_none_or(|r| r == current);
        join_ref_matches
    }

    async fn on_reply(&mut self, frame: Frame) -> Result<(), RealtimeError> {
        let Phase::Joining { join_ref, deadline } = &self.phase else {
            debug!(reply_ref = ?frame.msg_ref, "reply outside a pending join ignored");
            return Ok(());
        };
        if frame.msg_ref.as_deref() != Some(join_ref.as_str()) {
            debug!(reply_ref = ?frame.msg_ref, "reply to another request ignored");
            return Ok(());
        }
        let (join_ref, deadline) = (join_ref.clone(), *deadline);
        let status = frame.payload.get("status").and_then(Value::as_str);
        let response = frame
            .payload
            .get("response")
            .cloned()
            .unwrap_or(Value::Null);
        if status != Some("ok") {
            let reason = response
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let delay = self.backoff_delay();
            warn!(join_ref = %join_ref, status = ?status, reason = %reason, wait_ms = delay.as_millis() as u64, "Realtime join rejected; rejoining after backoff");
            // The server never created the channel, so there is nothing to leave.
            return self.rejoin_after(delay, false).await;
        }
        match binding_ids_from_reply(&self.bindings, &response) {
            Ok(binding_ids) => {
                debug!(join_ref = %join_ref, ids = ?binding_ids, "Realtime join accepted");
                self.phase = Phase::Joined {
                    join_ref,
                    binding_ids,
                    deadline,
                };
                Ok(())
            }
            Err(mismatch) => {
                let delay = self.backoff_delay();
                error!(join_ref = %join_ref, %mismatch, received = %response, wait_ms = delay.as_millis() as u64, "Realtime join reply does not match the requested bindings; leaving and rejoining");
                self.rejoin_after(delay, true).await
            }
        }
    }

    fn on_change(&mut self, frame: &Frame) {
        if frame.join_ref.is_some() && !self.is_current(frame) {
            return;
        }
        let ids = frame.payload.get("ids").and_then(Value::as_array);
        let routed =
            ids.is_some_and(|ids| ids.iter().any(|id| self.phase.binding_ids().contains(id)));
        if !routed {
            debug!(ids = ?ids, "change event for no current binding ignored");
            return;
        }
        let stats = self.outputs.stats.clone();
        stats
            .last_event_unix_ms
            .store(unix_millis_now(), Ordering::Relaxed);
        let data = frame.payload.get("data").unwrap_or(&Value::Null);
        let errors = change_errors(data);
        let hint = hint_from_change(data);
        if !errors.is_empty() {
            stats.event_errors.fetch_add(1, Ordering::Relaxed);
            let truncated_only = errors.iter().all(|error| error.starts_with("Error 413"));
            if truncated_only && hint.is_some() {
                debug!(
                    ?errors,
                    "change event record truncated by the server; the claim reads the full row"
                );
            } else {
                error!(?errors, "change event carries errors: check that the jobs table has a primary key and that the key's role may select it");
            }
        }
        let Some(hint) = hint else {
            if errors.is_empty() {
                warn!("change event without record id ignored");
            }
            return;
        };
        stats.hints_received.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.outputs.hints.try_send(hint) {
            let dropped = stats.hints_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            let full = matches!(error, mpsc::error::TrySendError::Full(_));
            // A backlog can drop thousands of hints, so log at most once per interval.
            let now = Instant::now();
            let due = self
                .last_drop_log
                .is_none_or(|logged| now.duration_since(logged) >= DROP_LOG_INTERVAL);
            if due {
                self.last_drop_log = Some(now);
                warn!(
                    dropped_total = dropped,
                    queue_full = full,
                    "job hint dropped; the next sweep finds the job"
                );
            }
        }
    }

    async fn on_system(&mut self, frame: Frame) -> Result<(), RealtimeError> {
        let payload = &frame.payload;
        let extension = payload
            .get("extension")
            .and_then(Value::as_str)
            .unwrap_or("");
        let status = payload.get("status").and_then(Value::as_str).unwrap_or("");
        let message = payload.get("message").and_then(Value::as_str).unwrap_or("");

        // "Server requested disconnect" goes to every channel without a `channel` key and
        // precedes a close with 1012.
        if status == "ok" && extension != frame::POSTGRES_CHANGES {
            info!(
                extension,
                server_message = message,
                "Realtime system message"
            );
            return Ok(());
        }
        if frame.join_ref.is_some() && !self.is_current(&frame) {
            debug!(
                extension,
                status,
                server_message = message,
                "system message for an old join ignored"
            );
            return Ok(());
        }
        if status == "ok" {
            self.on_readiness(message);
            return Ok(());
        }
        if self.phase.join_ref().is_none() {
            debug!(
                extension,
                status,
                server_message = message,
                "system message while not joined ignored"
            );
            return Ok(());
        }
        match classify_system_error(extension, message) {
            SystemErrorKind::SubscribeFailed => {
                self.stats()
                    .subscribe_errors
                    .fetch_add(1, Ordering::Relaxed);
                let delay = self.config.subscribe_error_retry;
                error!(
                    server_message = message,
                    fix = %format!("{PUBLICATION_FIX} {}.{};", self.config.schema, self.config.table),
                    wait_ms = delay.as_millis() as u64,
                    "Realtime cannot subscribe to the jobs table: run the SQL in `fix` (or correct the filter); leaving and retrying slowly"
                );
                self.rejoin_after(delay, true).await
            }
            SystemErrorKind::Other => {
                let delay = self.backoff_delay();
                warn!(
                    extension,
                    server_message = message,
                    wait_ms = delay.as_millis() as u64,
                    "Realtime channel error; leaving and rejoining"
                );
                if message.contains("Token has expired")
                    && self
                        .key_kind
                        .is_expired_at((unix_millis_now() / 1000) as i64)
                {
                    error!("the configured API key is a JWT whose exp has passed; configure a current service_role key or an sb_secret_ key");
                }
                self.rejoin_after(delay, true).await
            }
        }
    }

    fn on_readiness(&mut self, message: &str) {
        let (join_ref, binding_ids) = match &self.phase {
            Phase::Joined {
                join_ref,
                binding_ids,
                ..
            }
            | Phase::Live {
                join_ref,
                binding_ids,
            } => (join_ref.clone(), binding_ids.clone()),
            _ => {
                warn!(message, "readiness message before the join reply ignored");
                return;
            }
        };
        let repeated = matches!(self.phase, Phase::Live { .. });
        self.phase = Phase::Live {
            join_ref: join_ref.clone(),
            binding_ids,
        };
        self.retry.mark_live(std::time::Instant::now());
        let stats = self.stats();
        stats.live.store(true, Ordering::Relaxed);
        stats.readiness_messages.fetch_add(1, Ordering::Relaxed);
        stats
            .last_readiness_unix_ms
            .store(unix_millis_now(), Ordering::Relaxed);
        self.outputs.ready.send_modify(|count| *count += 1);
        if repeated {
            info!(join_ref = %join_ref, server_message = message, "Realtime subscription re-created; changes may have been missed");
        } else {
            info!(join_ref = %join_ref, server_message = message, "Realtime subscription live");
        }
    }

    /// Handles `phx_close` and `phx_error`: the server removed the channel.
    async fn on_channel_end(&mut self, frame: Frame) -> Result<(), RealtimeError> {
        let Some(current) = self.phase.join_ref() else {
            return Ok(());
        };
        // Server frames carry ref = join_ref; V1 frames carry only the ref.
        let ref_matches = frame.msg_ref.as_deref().is_none_or(|r| r == current);
        if !self.is_current(&frame) || !ref_matches {
            debug!(event = %frame.event, join_ref = ?frame.join_ref, "channel end for an old join ignored");
            return Ok(());
        }
        let delay = self.backoff_delay();
        warn!(event = %frame.event, payload = %frame.payload, wait_ms = delay.as_millis() as u64, "Realtime channel ended by server; rejoining after backoff");
        self.rejoin_after(delay, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_payload_sends_jwt_as_access_token() {
        let jwt =
            "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIiwiZXhwIjo0MTAyNDQ0ODAwfQ.c2ln";
        let kind = ApiKeyKind::of(jwt);
        let payload = join_payload(&bindings("public", "jobs"), &kind, jwt);
        assert_eq!(payload["access_token"], jwt);
        assert_eq!(
            payload["config"]["postgres_changes"],
            json!(bindings("public", "jobs"))
        );
        assert_eq!(payload["config"]["private"], false);
    }

    #[test]
    fn join_payload_omits_secret_key() {
        let key = "sb_secret_abc";
        let payload = join_payload(&bindings("public", "jobs"), &ApiKeyKind::of(key), key);
        assert!(payload.get("access_token").is_none());
        assert!(!payload.to_string().contains(key));
    }

    #[test]
    fn bindings_cover_insert_and_pending_update() {
        let requested = bindings("public", "jobs");
        assert_eq!(requested.len(), 2);
        assert_eq!(
            requested[0],
            json!({"event": "INSERT", "schema": "public", "table": "jobs"})
        );
        assert_eq!(requested[1]["event"], "UPDATE");
        assert_eq!(requested[1]["filter"], "status=eq.pending");
    }

    #[test]
    fn reply_ids_follow_requested_order() {
        let requested = bindings("public", "jobs");
        let reply = json!({"postgres_changes": [
            {"id": 38274650, "event": "INSERT", "schema": "public", "table": "jobs"},
            {"id": 1234, "event": "UPDATE", "schema": "public", "table": "jobs", "filter": "status=eq.pending"},
        ]});
        let ids = binding_ids_from_reply(&requested, &reply).unwrap();
        assert_eq!(ids, vec![json!(38274650), json!(1234)]);
    }

    #[test]
    fn reply_null_filter_matches_absent_filter() {
        let requested = bindings("public", "jobs");
        let reply = json!({"postgres_changes": [
            {"id": 1, "event": "INSERT", "schema": "public", "table": "jobs", "filter": null},
            {"id": 2, "event": "update", "schema": "public", "table": "jobs", "filter": "status=eq.pending", "extra": true},
        ]});
        assert!(binding_ids_from_reply(&requested, &reply).is_ok());
    }

    #[test]
    fn reply_mismatches_are_rejected() {
        let requested = bindings("public", "jobs");
        let cases = [
            json!({}),
            json!({"postgres_changes": []}),
            json!({"postgres_changes": [
                {"id": 1, "event": "INSERT", "schema": "public", "table": "jobs"},
            ]}),
            json!({"postgres_changes": [
                {"id": 1, "event": "INSERT", "schema": "public", "table": "other"},
                {"id": 2, "event": "UPDATE", "schema": "public", "table": "jobs", "filter": "status=eq.pending"},
            ]}),
            json!({"postgres_changes": [
                {"id": 1, "event": "INSERT", "schema": "public", "table": "jobs"},
                {"id": 2, "event": "UPDATE", "schema": "public", "table": "jobs"},
            ]}),
            json!({"postgres_changes": [
                {"event": "INSERT", "schema": "public", "table": "jobs"},
                {"id": 2, "event": "UPDATE", "schema": "public", "table": "jobs", "filter": "status=eq.pending"},
            ]}),
        ];
        for reply in cases {
            assert!(
                binding_ids_from_reply(&requested, &reply).is_err(),
                "accepted {reply}"
            );
        }
    }

    #[test]
    fn hint_from_insert_with_large_id() {
        let data = json!({"record": {"id": 9007199254740993u64, "payload": {"a": [1]}}, "errors": null, "type": "INSERT"});
        let hint = hint_from_change(&data).unwrap();
        assert_eq!(
            hint,
            Hint::Job {
                id: json!(9007199254740993u64),
                truncated: false
            }
        );
    }

    #[test]
    fn hint_from_truncated_record() {
        let data =
            json!({"record": {"id": "0b6c…uuid"}, "errors": ["Error 413: Payload Too Large"]});
        let Some(Hint::Job { truncated, .. }) = hint_from_change(&data) else {
            panic!("no hint from a truncated record");
        };
        assert!(truncated);
    }

    #[test]
    fn no_hint_without_record_id() {
        let cases = [
            json!({"record": {}, "errors": ["Error 400: Bad Request, no primary key"]}),
            json!({"record": {"id": null}}),
            json!({"errors": ["Error 401: Unauthorized"]}),
            json!(null),
        ];
        for data in cases {
            assert_eq!(hint_from_change(&data), None, "hint from {data}");
        }
    }

    #[test]
    fn system_error_classification() {
        let unable = "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: INSERT, schema: public, table: jobs, filters: [], select: nil]";
        assert_eq!(
            classify_system_error("postgres_changes", unable),
            SystemErrorKind::SubscribeFailed
        );
        assert_eq!(
            classify_system_error(
                "postgres_changes",
                "Error parsing `filter` params: [\"foo\"]"
            ),
            SystemErrorKind::SubscribeFailed
        );
        assert_eq!(
            classify_system_error("postgres_changes", "Too many database timeouts"),
            SystemErrorKind::Other
        );
        assert_eq!(
            classify_system_error("system", "Token has expired 0 seconds ago"),
            SystemErrorKind::Other
        );
    }

    #[test]
    fn rejected_upgrade_retryability() {
        let unauthorized = RealtimeError::Rejected {
            status: 401,
            body: "{\"error\":\"Token has expired\"}".into(),
        };
        let busy = RealtimeError::Rejected {
            status: 429,
            body: String::new(),
        };
        assert!(!unauthorized.is_retryable());
        assert!(busy.is_retryable());
        assert!(RealtimeError::Ended.is_retryable());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("abc".into(), 5), "abc");
        assert_eq!(truncate("ééé".into(), 3), "é…");
    }
}
