//! One Realtime websocket: connect-time key checks, the Phoenix socket loop (heartbeats,
//! idle timeout, channel sweep), and its channels (join, leave, tokens, readiness).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::binding::{self, Binding};
use super::capture;
use super::dispatch::quote_identifier;
use super::protocol::{self, Frame, Vsn};
use super::{Control, Shared, Subscription};
use crate::auth::{now_seconds, Claims, JwtError};

/// Inbound frame limit of the real server's endpoint.
const MAX_FRAME_BYTES: usize = 5_000_000;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/realtime/v1/websocket", any(connect))
        .route("/socket/websocket", any(connect))
        .with_state(shared)
}

/// Replaces an opaque `sb_secret_…`/`sb_publishable_…` key of this emulator with the
/// matching service_role/anon JWT. The Supabase API gateway (Kong) does this before a
/// request reaches Realtime, which itself only accepts JWTs. Unknown `sb_` keys pass
/// through and fail as malformed JWTs.
fn gateway_swap(shared: &Shared, key: &str) -> String {
    if key == shared.keys.secret_key {
        shared.keys.service_role_jwt.clone()
    } else if key == shared.keys.publishable_key {
        shared.keys.anon_jwt.clone()
    } else {
        key.to_string()
    }
}

async fn connect(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(vsn) = Vsn::parse(params.get("vsn").map(String::as_str)) else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let rejection = *shared.faults.connect_rejection.lock().expect("fault lock");
    if let Some(rejection) = rejection {
        let (status, message) = rejection.response();
        tracing::info!(reason = %message, "realtime connect rejected by fault");
        tokio::time::sleep(shared.options.connect_error_delay).await;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, Json(json!({ "error": message }))).into_response();
    }
    let header_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let key = header_key.or(params.get("apikey").map(String::as_str));
    let verified = match key {
        None => Err("API key is missing".to_string()),
        Some(key) => {
            let token = gateway_swap(&shared, key);
            shared
                .keys
                .verify(&token)
                .map(|_claims| token)
                .map_err(|error| error.to_string())
        }
    };
    let token = match verified {
        Ok(verified) => verified,
        Err(message) => {
            tracing::info!(reason = %message, "realtime connect rejected");
            tokio::time::sleep(shared.options.connect_error_delay).await;
            return (StatusCode::UNAUTHORIZED, Json(json!({ "error": message }))).into_response();
        }
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade
        .max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |websocket| async move {
            SocketTask::new(shared, vsn, token).run(websocket).await
        })
}

/// A joined channel.
struct Channel {
    /// The part of the topic after `realtime:`.
    name: String,
    join_ref: String,
    bindings: Vec<Binding>,
    /// The first binding error, reported in the readiness `system` message.
    binding_error: Option<String>,
    has_postgres_changes: bool,
    token: String,
    claims: Claims,
    subscription_id: Option<u64>,
}

struct SocketTask {
    shared: Arc<Shared>,
    id: u64,
    vsn: Vsn,
    token: String,
    channels: HashMap<String, Channel>,
    control_tx: mpsc::UnboundedSender<Control>,
    control_rx: mpsc::UnboundedReceiver<Control>,
    events_tx: mpsc::Sender<String>,
    events_rx: mpsc::Receiver<String>,
}

/// The socket loop's next step after handling one input.
enum Next {
    Continue,
    Close(Option<u16>),
}

impl SocketTask {
    fn new(shared: Arc<Shared>, vsn: Vsn, token: String) -> SocketTask {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::channel(shared.options.socket_queue_capacity.max(1));
        let id = shared.next_id();
        SocketTask {
            shared,
            id,
            vsn,
            token,
            channels: HashMap::new(),
            control_tx,
            control_rx,
            events_tx,
            events_rx,
        }
    }

    async fn run(mut self, mut websocket: WebSocket) {
        self.shared
            .sockets
            .lock()
            .expect("socket registry lock")
            .insert(self.id, self.control_tx.clone());
        let counters = &self.shared.counters;
        counters.sockets_open.fetch_add(1, Ordering::Relaxed);
        counters.sockets_accepted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(socket_id = self.id, "realtime socket opened");

        let options = self.shared.options.clone();
        let mut idle_deadline = Instant::now() + options.idle_timeout;
        let mut no_channel_deadline = Instant::now() + options.no_channel_timeout;
        let shutdown = self.shared.shutdown.clone();
        let close = loop {
            let next = tokio::select! {
                biased;
                control = self.control_rx.recv() => match control {
                    Some(control) => self.handle_control(&mut websocket, control).await,
                    None => Next::Close(None),
                },
                message = websocket.recv() => match message {
                    Some(Ok(message)) => {
                        idle_deadline = Instant::now() + options.idle_timeout;
                        self.handle_message(&mut websocket, message).await
                    }
                    _ => Next::Close(None),
                },
                Some(text) = self.events_rx.recv() => self.send(&mut websocket, text).await,
                _ = sleep_until(idle_deadline) => {
                    tracing::info!(socket_id = self.id, "realtime socket idle; closing");
                    Next::Close(Some(1000))
                }
                _ = sleep_until(no_channel_deadline), if self.channels.is_empty() => {
                    tracing::info!(socket_id = self.id, "realtime socket without channels; dropping");
                    Next::Close(None)
                }
                _ = shutdown.cancelled() => Next::Close(Some(1001)),
            };
            if !self.channels.is_empty() {
                no_channel_deadline = Instant::now() + options.no_channel_timeout;
            }
            if let Next::Close(code) = next {
                break code;
            }
        };
        if let Some(code) = close {
            let frame = CloseFrame {
                code,
                reason: "".into(),
            };
            let _ = websocket.send(Message::Close(Some(frame))).await;
        }
        drop(websocket);
        let topics: Vec<String> = self.channels.keys().cloned().collect();
        for topic in topics {
            self.remove_channel(&topic);
        }
        self.shared
            .sockets
            .lock()
            .expect("socket registry lock")
            .remove(&self.id);
        self.shared
            .counters
            .sockets_open
            .fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(socket_id = self.id, close_code = ?close, "realtime socket closed");
    }

    async fn send(&self, websocket: &mut WebSocket, text: String) -> Next {
        match websocket.send(Message::Text(text.into())).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close(None),
        }
    }

    async fn push(
        &self,
        websocket: &mut WebSocket,
        join_ref: Option<&str>,
        reference: Option<&str>,
        topic: &str,
        event: &str,
        payload: &Value,
    ) -> Next {
        let text = protocol::encode(self.vsn, join_ref, reference, topic, event, payload);
        self.send(websocket, text).await
    }

    /// Sends `text` after `delay` from a timer, so the socket keeps serving meanwhile.
    fn send_later(&self, delay: Duration, text: String, close: Option<u16>) {
        let control = self.control_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = control.send(Control::Send { text, close });
        });
    }

    fn schedule(&self, delay: Duration, control: Control) {
        let sender = self.control_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = sender.send(control);
        });
    }

    async fn handle_message(&mut self, websocket: &mut WebSocket, message: Message) -> Next {
        let text = match message {
            Message::Text(text) => text,
            Message::Close(_) => return Next::Close(None),
            // Binary frames carry broadcast features only, and axum replies to pings itself.
            _ => return Next::Continue,
        };
        let Some(frame) = protocol::decode(self.vsn, text.as_str()) else {
            tracing::debug!(socket_id = self.id, "malformed realtime frame dropped");
            return Next::Continue;
        };
        if frame.topic == "phoenix" {
            if frame.event == "heartbeat"
                && !self.shared.faults.heartbeats_paused.load(Ordering::Relaxed)
            {
                let reply = protocol::ok_reply(json!({}));
                let reference = frame.reference.as_deref();
                return self
                    .push(websocket, None, reference, "phoenix", "phx_reply", &reply)
                    .await;
            }
            return Next::Continue;
        }
        match frame.event.as_str() {
            "phx_join" => self.handle_join(websocket, frame).await,
            "phx_leave" => self.handle_leave(websocket, frame).await,
            _ if !self.channels.contains_key(&frame.topic) => {
                let reply = protocol::error_reply("unmatched topic");
                let reference = frame.reference.as_deref();
                self.push(
                    websocket,
                    None,
                    reference,
                    &frame.topic,
                    "phx_reply",
                    &reply,
                )
                .await
            }
            "access_token" => self.handle_access_token(websocket, frame).await,
            // Broadcast and presence messages are accepted and ignored.
            _ => Next::Continue,
        }
    }

    async fn handle_join(&mut self, websocket: &mut WebSocket, frame: Frame) -> Next {
        let reference = frame.reference.clone();
        let join_ref = frame
            .join_ref
            .clone()
            .or(reference.clone())
            .unwrap_or_default();
        let topic = frame.topic.clone();
        let Some(name) = topic.strip_prefix("realtime:") else {
            let reply = protocol::error_reply("unmatched topic");
            return self
                .push(
                    websocket,
                    Some(&join_ref),
                    reference.as_deref(),
                    &topic,
                    "phx_reply",
                    &reply,
                )
                .await;
        };
        let name = name.to_string();
        if !self.shared.options.join_delay.is_zero() {
            tokio::time::sleep(self.shared.options.join_delay).await;
        }
        let error_frame = |reason: &str| {
            protocol::encode(
                self.vsn,
                Some(&join_ref),
                reference.as_deref(),
                &topic,
                "phx_reply",
                &protocol::error_reply(reason),
            )
        };
        let replaced = self.channels.contains_key(&topic);
        let channel_count = self.channels.len() - usize::from(replaced);
        let fault = *self
            .shared
            .faults
            .join_rejection
            .lock()
            .expect("fault lock");
        if let Some(fault) = fault {
            let (reason, close) = fault.reason();
            tracing::info!(socket_id = self.id, %topic, %reason, "realtime join rejected by fault");
            self.send_later(
                self.shared.options.join_error_delay,
                error_frame(reason),
                close,
            );
            return Next::Continue;
        }
        let rejection = if name.is_empty() {
            Some("TopicNameRequired: You must provide a topic name".to_string())
        } else if self.shared.faults.restarting.load(Ordering::Relaxed) {
            Some("RealtimeRestarting: Realtime is restarting, please standby".to_string())
        } else if channel_count >= self.shared.options.max_channels {
            Some("ChannelRateLimitReached: Too many channels".to_string())
        } else {
            None
        };
        if let Some(reason) = rejection {
            tracing::info!(socket_id = self.id, %topic, %reason, "realtime join rejected");
            self.send_later(
                self.shared.options.join_error_delay,
                error_frame(&reason),
                None,
            );
            return Next::Continue;
        }

        let token = channel_token(&frame.payload).unwrap_or_else(|| self.token.clone());
        let claims = match self.shared.keys.verify(&token) {
            Ok(claims) => claims,
            Err(error) => {
                let reason = join_error_reason(&error);
                tracing::info!(socket_id = self.id, %topic, %reason, "realtime join rejected");
                self.send_later(
                    self.shared.options.join_error_delay,
                    error_frame(&reason),
                    None,
                );
                return Next::Continue;
            }
        };

        let entries = frame
            .payload
            .pointer("/config/postgres_changes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut echoes = Vec::new();
        let mut bindings = Vec::new();
        let mut binding_error = None;
        for entry in entries.iter().filter_map(Value::as_object) {
            let (id, parsed) = binding::parse_entry(entry);
            let mut echo = entry.clone();
            echo.insert("id".into(), Value::from(id));
            echoes.push(Value::Object(echo));
            match parsed {
                Ok(binding) => bindings.push(binding),
                Err(error) => {
                    binding_error.get_or_insert(error.to_string());
                }
            }
        }

        let old_join_ref = if replaced {
            let old = self.remove_channel(&topic);
            old.map(|channel| channel.join_ref)
        } else {
            None
        };
        let reply = protocol::ok_reply(json!({ "postgres_changes": echoes }));
        if let Next::Close(code) = self
            .push(
                websocket,
                Some(&join_ref),
                reference.as_deref(),
                &topic,
                "phx_reply",
                &reply,
            )
            .await
        {
            return Next::Close(code);
        }
        if let Some(old_join_ref) = old_join_ref {
            let old = Some(old_join_ref.as_str());
            if let Next::Close(code) = self
                .push(websocket, old, old, &topic, "phx_close", &json!({}))
                .await
            {
                return Next::Close(code);
            }
        }
        self.shared.counters.joins.fetch_add(1, Ordering::Relaxed);
        let has_postgres_changes = !echoes.is_empty();
        self.schedule_token_check(&topic, &join_ref, &claims);
        self.channels.insert(
            topic.clone(),
            Channel {
                name,
                join_ref: join_ref.clone(),
                bindings,
                binding_error,
                has_postgres_changes,
                token,
                claims,
                subscription_id: None,
            },
        );
        if has_postgres_changes {
            self.schedule(
                self.shared.options.readiness_delay,
                Control::Ready { topic, join_ref },
            );
        }
        Next::Continue
    }

    fn schedule_token_check(&self, topic: &str, join_ref: &str, claims: &Claims) {
        let Some(exp) = claims.exp_seconds() else {
            return;
        };
        let seconds = (exp - now_seconds()).max(0) as u64;
        // The real server re-checks at least every 5 minutes; one check just after `exp` is
        // enough here because the emulator's clock is the only one.
        let delay = Duration::from_secs(seconds) + Duration::from_millis(50);
        if delay > Duration::from_secs(30 * 24 * 3600) {
            return;
        }
        self.schedule(
            delay,
            Control::TokenCheck {
                topic: topic.to_string(),
                join_ref: join_ref.to_string(),
            },
        );
    }

    async fn handle_leave(&mut self, websocket: &mut WebSocket, frame: Frame) -> Next {
        let reference = frame.reference.as_deref();
        let removed = self.remove_channel(&frame.topic);
        let join_ref = removed
            .as_ref()
            .map(|c| c.join_ref.clone())
            .or(frame.join_ref.clone());
        let reply = protocol::ok_reply(json!({}));
        let next = self
            .push(
                websocket,
                join_ref.as_deref(),
                reference,
                &frame.topic,
                "phx_reply",
                &reply,
            )
            .await;
        if let (Next::Continue, Some(channel)) = (&next, removed) {
            let join_ref = Some(channel.join_ref.as_str());
            return self
                .push(
                    websocket,
                    join_ref,
                    join_ref,
                    &frame.topic,
                    "phx_close",
                    &json!({}),
                )
                .await;
        }
        next
    }

    async fn handle_access_token(&mut self, websocket: &mut WebSocket, frame: Frame) -> Next {
        let Some(token) = frame.payload.get("access_token").and_then(Value::as_str) else {
            return Next::Continue;
        };
        let Some(channel) = self.channels.get(&frame.topic) else {
            return Next::Continue;
        };
        if token == channel.token || token.starts_with("sb_") {
            return Next::Continue;
        }
        match self.shared.keys.verify(token) {
            Ok(claims) => {
                let join_ref = channel.join_ref.clone();
                let has_postgres_changes = channel.has_postgres_changes;
                self.schedule_token_check(&frame.topic, &join_ref, &claims);
                if let Some(channel) = self.channels.get_mut(&frame.topic) {
                    channel.token = token.to_string();
                    channel.claims = claims;
                }
                if has_postgres_changes {
                    self.schedule(
                        self.shared.options.access_token_resubscribe_delay,
                        Control::Ready {
                            topic: frame.topic.clone(),
                            join_ref,
                        },
                    );
                }
                Next::Continue
            }
            Err(error) => {
                let message = match error {
                    JwtError::Expired { seconds_ago } => {
                        format!("Token has expired {seconds_ago} seconds ago")
                    }
                    other => other.to_string(),
                };
                self.close_channel_with_system_error(websocket, &frame.topic, &message)
                    .await
            }
        }
    }

    /// Pushes a `system` error (`extension: "system"`) and then `phx_close` on a channel,
    /// and removes it.
    async fn close_channel_with_system_error(
        &mut self,
        websocket: &mut WebSocket,
        topic: &str,
        message: &str,
    ) -> Next {
        let Some(channel) = self.remove_channel(topic) else {
            return Next::Continue;
        };
        let payload = json!({
            "channel": channel.name,
            "extension": "system",
            "message": message,
            "status": "error",
        });
        let join_ref = Some(channel.join_ref.as_str());
        if let Next::Close(code) = self
            .push(websocket, join_ref, None, topic, "system", &payload)
            .await
        {
            return Next::Close(code);
        }
        self.push(
            websocket,
            join_ref,
            join_ref,
            topic,
            "phx_close",
            &json!({}),
        )
        .await
    }

    fn remove_channel(&mut self, topic: &str) -> Option<Channel> {
        let channel = self.channels.remove(topic)?;
        if let Some(id) = channel.subscription_id {
            self.drop_subscription(id);
        }
        Some(channel)
    }

    /// Removes a subscription and narrows the capture trigger in the background. Changes
    /// captured meanwhile match no subscription and are discarded.
    fn drop_subscription(&self, id: u64) {
        self.shared
            .subscriptions
            .write()
            .expect("subscription registry lock")
            .remove(&id);
        let shared = self.shared.clone();
        tokio::spawn(async move { shared.sync_capture().await });
    }

    fn unsubscribe(&mut self, topic: &str) {
        let id = self
            .channels
            .get_mut(topic)
            .and_then(|channel| channel.subscription_id.take());
        if let Some(id) = id {
            self.drop_subscription(id);
        }
    }

    async fn push_postgres_system(
        &self,
        websocket: &mut WebSocket,
        topic: &str,
        status: &str,
        message: &str,
    ) -> Next {
        let Some(channel) = self.channels.get(topic) else {
            return Next::Continue;
        };
        let payload = json!({
            "channel": channel.name,
            "extension": "postgres_changes",
            "message": message,
            "status": status,
        });
        let join_ref = Some(channel.join_ref.as_str());
        self.push(websocket, join_ref, None, topic, "system", &payload)
            .await
    }

    /// Creates the channel's subscription and sends the readiness `system` message, or
    /// the error the real server sends when the subscription cannot be created.
    async fn subscribe(&mut self, websocket: &mut WebSocket, topic: &str) -> Next {
        let Some(channel) = self.channels.get(topic) else {
            return Next::Continue;
        };
        if let Some(error) = &channel.binding_error {
            let error = error.clone();
            return self
                .push_postgres_system(websocket, topic, "error", &error)
                .await;
        }
        self.shared.tables.clear();
        let check = check_bindings(&self.shared, &channel.bindings).await;
        let bypass_rls = match check {
            Ok(()) => role_bypasses_rls(&self.shared, channel.claims.role.as_deref()).await,
            Err(message) => {
                self.unsubscribe(topic);
                return self
                    .push_postgres_system(websocket, topic, "error", &message)
                    .await;
            }
        };
        let Some(channel) = self.channels.get_mut(topic) else {
            return Next::Continue;
        };
        let subscription = Subscription {
            topic: topic.to_string(),
            vsn: self.vsn,
            bindings: channel.bindings.clone(),
            role: channel.claims.role.clone().unwrap_or_default(),
            claims: serde_json::to_string(&channel.claims).unwrap_or_default(),
            bypass_rls,
            events: self.events_tx.clone(),
            socket_id: self.id,
        };
        let id = *channel
            .subscription_id
            .get_or_insert_with(|| self.shared.next_id());
        self.shared
            .subscriptions
            .write()
            .expect("subscription registry lock")
            .insert(id, Arc::new(subscription));
        // The trigger must capture this binding's changes before readiness is announced.
        self.shared.sync_capture().await;
        self.push_postgres_system(websocket, topic, "ok", "Subscribed to PostgreSQL")
            .await
    }

    fn joined(&self, topic: &str, join_ref: &str) -> bool {
        self.channels
            .get(topic)
            .is_some_and(|channel| channel.join_ref == join_ref)
    }

    async fn handle_control(&mut self, websocket: &mut WebSocket, control: Control) -> Next {
        match control {
            Control::Close(code) => Next::Close(code),
            Control::Send { text, close } => {
                if let Next::Close(code) = self.send(websocket, text).await {
                    return Next::Close(code);
                }
                match close {
                    Some(code) => Next::Close(Some(code)),
                    None => Next::Continue,
                }
            }
            Control::Ready { topic, join_ref } => {
                if !self.joined(&topic, &join_ref) {
                    return Next::Continue;
                }
                self.subscribe(websocket, &topic).await
            }
            Control::TokenCheck { topic, join_ref } => {
                if !self.joined(&topic, &join_ref) {
                    return Next::Continue;
                }
                let exp = self.channels[&topic].claims.exp_seconds().unwrap_or(0);
                let now = now_seconds();
                if exp > now {
                    return Next::Continue;
                }
                let message = format!("Token has expired {} seconds ago", now - exp);
                self.close_channel_with_system_error(websocket, &topic, &message)
                    .await
            }
            Control::ExpireTokens => {
                for topic in self.topics() {
                    let exp = self.channels[&topic].claims.exp_seconds().unwrap_or(0);
                    let seconds_ago = (now_seconds() - exp).max(0);
                    let message = format!("Token has expired {seconds_ago} seconds ago");
                    if let Next::Close(code) = self
                        .close_channel_with_system_error(websocket, &topic, &message)
                        .await
                    {
                        return Next::Close(code);
                    }
                }
                Next::Continue
            }
            Control::SystemError(message) => {
                for topic in self.topics() {
                    if let Next::Close(code) = self
                        .close_channel_with_system_error(websocket, &topic, &message)
                        .await
                    {
                        return Next::Close(code);
                    }
                }
                Next::Continue
            }
            Control::PhxError(payload) => {
                self.end_all_channels(websocket, "phx_error", &payload)
                    .await
            }
            Control::PhxClose => {
                self.end_all_channels(websocket, "phx_close", &json!({}))
                    .await
            }
            Control::ServerDisconnect => {
                let payload = json!({
                    "extension": "system",
                    "message": "Server requested disconnect",
                    "status": "ok",
                });
                for topic in self.topics() {
                    if let Next::Close(code) = self
                        .push(websocket, None, None, &topic, "system", &payload)
                        .await
                    {
                        return Next::Close(code);
                    }
                }
                Next::Close(Some(1012))
            }
            Control::Resubscribe => {
                for topic in self.topics() {
                    if self.channels[&topic].subscription_id.is_none() {
                        continue;
                    }
                    if let Next::Close(code) = self.subscribe(websocket, &topic).await {
                        return Next::Close(code);
                    }
                }
                Next::Continue
            }
            Control::TransientError {
                message,
                recover_after,
            } => {
                for topic in self.topics() {
                    if self.channels[&topic].subscription_id.is_none() {
                        continue;
                    }
                    self.unsubscribe(&topic);
                    if let Next::Close(code) = self
                        .push_postgres_system(websocket, &topic, "error", &message)
                        .await
                    {
                        return Next::Close(code);
                    }
                    let join_ref = self.channels[&topic].join_ref.clone();
                    self.schedule(recover_after, Control::Ready { topic, join_ref });
                }
                Next::Continue
            }
        }
    }

    fn topics(&self) -> Vec<String> {
        self.channels.keys().cloned().collect()
    }

    async fn end_all_channels(
        &mut self,
        websocket: &mut WebSocket,
        event: &str,
        payload: &Value,
    ) -> Next {
        for topic in self.topics() {
            let Some(channel) = self.remove_channel(&topic) else {
                continue;
            };
            let join_ref = Some(channel.join_ref.as_str());
            if let Next::Close(code) = self
                .push(websocket, join_ref, join_ref, &topic, event, payload)
                .await
            {
                return Next::Close(code);
            }
        }
        Next::Continue
    }
}

/// Picks the channel token from a join payload: `user_token`, else `access_token`, unless
/// it is an opaque `sb_` key, which the real server ignores here.
fn channel_token(payload: &Value) -> Option<String> {
    ["user_token", "access_token"]
        .iter()
        .filter_map(|key| payload.get(*key).and_then(Value::as_str))
        .find(|token| !token.starts_with("sb_"))
        .map(str::to_string)
}

fn join_error_reason(error: &JwtError) -> String {
    match error {
        JwtError::Expired { seconds_ago } => {
            format!("InvalidJWTToken: Token has expired {seconds_ago} seconds ago")
        }
        JwtError::MissingClaims => format!("InvalidJWTToken: {error}"),
        JwtError::Malformed { .. } => format!("MalformedJWT: {error}"),
        JwtError::BadSignature => format!("JwtSignatureError: {error}"),
    }
}

/// Checks every binding against the database: its table must be in the publication and its
/// filter column must exist. Returns the real server's error text otherwise.
async fn check_bindings(shared: &Shared, bindings: &[Binding]) -> Result<(), String> {
    let client = shared.pool.get().await.map_err(|e| e.to_string())?;
    if let Err(error) = capture::ensure_triggers(&client).await {
        tracing::error!(%error, "failed to install change capture triggers");
    }
    let not_in_publication = shared.faults.not_in_publication.load(Ordering::Relaxed);
    for binding in bindings {
        let published: i64 = if not_in_publication {
            0
        } else {
            client
                .query_one(
                    "SELECT count(*) FROM pg_publication_tables
                     WHERE pubname = $1 AND ($2 = '*' OR schemaname = $2)
                       AND ($3 = '*' OR tablename = $3)",
                    &[&capture::PUBLICATION, &binding.schema, &binding.table],
                )
                .await
                .map_err(|e| e.to_string())?
                .get(0)
        };
        if published == 0 {
            return Err(format!(
                "Unable to subscribe to changes with given parameters. Please check Realtime \
                 is enabled for the given connect parameters: {}",
                binding.describe()
            ));
        }
        let Some(filter) = &binding.filter else {
            continue;
        };
        if binding.table == "*" {
            continue;
        }
        let relation = format!(
            "{}.{}",
            quote_identifier(&binding.schema),
            quote_identifier(&binding.table)
        );
        let found: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_attribute
                 WHERE attrelid = to_regclass($1) AND attname = $2
                   AND attnum > 0 AND NOT attisdropped",
                &[&relation, &filter.column],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if found == 0 {
            return Err(format!(
                "Unable to subscribe to changes with given parameters. An exception happened \
                 so please check your connect parameters: {}. Exception: ERROR P0001 \
                 (raise_exception) invalid column for filter {}",
                binding.describe(),
                filter.column
            ));
        }
    }
    Ok(())
}

/// Tells whether `role` bypasses row level security (superuser or BYPASSRLS, like
/// `service_role`). Unknown roles and errors count as not bypassing.
async fn role_bypasses_rls(shared: &Shared, role: Option<&str>) -> bool {
    let Some(role) = role else {
        return false;
    };
    let Ok(client) = shared.pool.get().await else {
        return false;
    };
    client
        .query_opt(
            "SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .ok()
        .flatten()
        .map(|row| row.get::<_, bool>(0))
        .unwrap_or(false)
}
