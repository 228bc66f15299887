//! Phoenix channel frames: decoding of serializer V2 (`[join_ref, ref, topic, event, payload]`
//! arrays) and V1 (`{"topic", "event", "payload", "ref", "join_ref"}` objects), and encoding as
//! V2, which is what the client negotiates with `vsn=2.0.0`.

use serde_json::Value;

// Event names of Phoenix channel messages.
pub const PHX_JOIN: &str = "phx_join";
pub const PHX_LEAVE: &str = "phx_leave";
pub const PHX_REPLY: &str = "phx_reply";
pub const PHX_CLOSE: &str = "phx_close";
pub const PHX_ERROR: &str = "phx_error";
pub const HEARTBEAT: &str = "heartbeat";
pub const SYSTEM: &str = "system";
pub const POSTGRES_CHANGES: &str = "postgres_changes";
/// Topic of socket-level messages such as heartbeats.
pub const PHOENIX_TOPIC: &str = "phoenix";

/// One Phoenix channel message, independent of the serializer that carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Ref of the join this message belongs to; `None` for socket-level messages and for
    /// `postgres_changes` events, and always `None` in V1 frames from the server.
    pub join_ref: Option<String>,
    /// Request ref; replies carry the ref of the request they reply to, pushes carry `None`.
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

/// Reasons a text frame is not a Phoenix message. A retry does not help: the frame is
/// logged and skipped, as the server does with malformed client frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not valid JSON: {0}")]
    InvalidJson(#[from] serde_json::Error),
    #[error("frame is neither a V2 array of 5 elements nor a V1 object")]
    InvalidShape,
    #[error("frame field `{0}` is missing or has the wrong type")]
    InvalidField(&'static str),
}

impl Frame {
    /// Builds a client frame.
    pub fn new(
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> Self {
        Frame {
            join_ref: join_ref.map(str::to_owned),
            msg_ref: msg_ref.map(str::to_owned),
            topic: topic.to_owned(),
            event: event.to_owned(),
            payload,
        }
    }

    /// Decodes a text frame in either serializer format. V2 arrays may carry more than five
    /// elements (extras are ignored, as the server does); V1 objects may carry unknown keys.
    pub fn decode(text: &str) -> Result<Frame, FrameError> {
        let value: Value = serde_json::from_str(text)?;
        match value {
            Value::Array(items) => Self::from_v2(items),
            Value::Object(map) => Self::from_v1(map),
            _ => Err(FrameError::InvalidShape),
        }
    }

    fn from_v2(items: Vec<Value>) -> Result<Frame, FrameError> {
        if items.len() < 5 {
            return Err(FrameError::InvalidShape);
        }
        let mut items = items.into_iter();
        let join_ref = decode_ref(items.next(), "join_ref")?;
        let msg_ref = decode_ref(items.next(), "ref")?;
        let topic = decode_string(items.next(), "topic")?;
        let event = decode_string(items.next(), "event")?;
        let payload = items.next().unwrap_or(Value::Null);
        Ok(Frame {
            join_ref,
            msg_ref,
            topic,
            event,
            payload,
        })
    }

    fn from_v1(mut map: serde_json::Map<String, Value>) -> Result<Frame, FrameError> {
        Ok(Frame {
            join_ref: decode_ref(map.remove("join_ref"), "join_ref")?,
            msg_ref: decode_ref(map.remove("ref"), "ref")?,
            topic: decode_string(map.remove("topic"), "topic")?,
            event: decode_string(map.remove("event"), "event")?,
            payload: map.remove("payload").unwrap_or(Value::Null),
        })
    }

    /// Encodes the frame as a V2 JSON array with explicit `null`s.
    pub fn encode(&self) -> String {
        Value::Array(vec![
            ref_value(&self.join_ref),
            ref_value(&self.msg_ref),
            Value::String(self.topic.clone()),
            Value::String(self.event.clone()),
            self.payload.clone(),
        ])
        .to_string()
    }

    /// Encodes the frame as a V1 JSON object (used only to test the V1 decoder).
    pub fn encode_v1(&self) -> String {
        serde_json::json!({
            "topic": self.topic,
            "event": self.event,
            "payload": self.payload,
            "ref": ref_value(&self.msg_ref),
            "join_ref": ref_value(&self.join_ref),
        })
        .to_string()
    }
}

fn ref_value(value: &Option<String>) -> Value {
    match value {
        Some(text) => Value::String(text.clone()),
        None => Value::Null,
    }
}

/// Reads a ref: a string, `null` or absent. Numbers are accepted and rendered in decimal
/// because some Phoenix clients and servers have sent integer refs.
fn decode_ref(value: Option<Value>, field: &'static str) -> Result<Option<String>, FrameError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(FrameError::InvalidField(field)),
    }
}

fn decode_string(value: Option<Value>, field: &'static str) -> Result<String, FrameError> {
    match value {
        Some(Value::String(text)) => Ok(text),
        _ => Err(FrameError::InvalidField(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decode_v2_event_with_null_refs() {
        let text = r#"[null,null,"realtime:jobs","postgres_changes",{"ids":[38274650],"data":{"record":{"id":9223372036854775807,"payload":{"k":[1,{"x":null}]}},"errors":null,"type":"INSERT","unknown":1}}]"#;
        let frame = Frame::decode(text).unwrap();
        assert_eq!(frame.join_ref, None);
        assert_eq!(frame.msg_ref, None);
        assert_eq!(frame.topic, "realtime:jobs");
        assert_eq!(frame.event, POSTGRES_CHANGES);
        assert_eq!(
            frame.payload["data"]["record"]["id"].as_i64(),
            Some(i64::MAX)
        );
        assert_eq!(
            frame.payload["data"]["record"]["payload"],
            json!({"k":[1,{"x":null}]})
        );
    }

    #[test]
    fn decode_v2_reply_with_refs() {
        let text = r#"["3","3","realtime:jobs","phx_reply",{"status":"ok","response":{}}]"#;
        let frame = Frame::decode(text).unwrap();
        assert_eq!(frame.join_ref.as_deref(), Some("3"));
        assert_eq!(frame.msg_ref.as_deref(), Some("3"));
        assert_eq!(frame.event, PHX_REPLY);
        assert_eq!(frame.payload["status"], "ok");
    }

    #[test]
    fn decode_v2_ignores_extra_elements() {
        let text = r#"[null,"7","phoenix","phx_reply",{"status":"ok"},"extra",42]"#;
        let frame = Frame::decode(text).unwrap();
        assert_eq!(frame.msg_ref.as_deref(), Some("7"));
        assert_eq!(frame.topic, PHOENIX_TOPIC);
    }

    #[test]
    fn decode_v1_object_without_join_ref() {
        let text = r#"{"topic":"realtime:jobs","event":"system","payload":{"status":"ok","extension":"postgres_changes"},"ref":null,"extra":"ignored"}"#;
        let frame = Frame::decode(text).unwrap();
        assert_eq!(frame.join_ref, None);
        assert_eq!(frame.msg_ref, None);
        assert_eq!(frame.event, SYSTEM);
        assert_eq!(frame.payload["extension"], POSTGRES_CHANGES);
    }

    #[test]
    fn decode_v1_numeric_ref() {
        let text = r#"{"topic":"phoenix","event":"phx_reply","payload":{},"ref":12}"#;
        let frame = Frame::decode(text).unwrap();
        assert_eq!(frame.msg_ref.as_deref(), Some("12"));
    }

    #[test]
    fn decode_rejects_malformed_frames() {
        let cases = [
            "not json",
            "42",
            r#"[null,null,"topic","event"]"#,
            r#"[null,null,7,"event",{}]"#,
            r#"[{},null,"topic","event",{}]"#,
            r#"{"event":"e","payload":{},"ref":null}"#,
        ];
        for text in cases {
            assert!(
                Frame::decode(text).is_err(),
                "accepted malformed frame {text}"
            );
        }
    }

    #[test]
    fn encode_v2_round_trip() {
        let frame = Frame::new(
            Some("5"),
            Some("6"),
            "realtime:jobs",
            PHX_JOIN,
            json!({"config":{"postgres_changes":[]}}),
        );
        let text = frame.encode();
        assert_eq!(
            text,
            r#"["5","6","realtime:jobs","phx_join",{"config":{"postgres_changes":[]}}]"#
        );
        assert_eq!(Frame::decode(&text).unwrap(), frame);
    }

    #[test]
    fn encode_v2_heartbeat_has_explicit_nulls() {
        let frame = Frame::new(None, Some("7"), PHOENIX_TOPIC, HEARTBEAT, json!({}));
        assert_eq!(frame.encode(), r#"[null,"7","phoenix","heartbeat",{}]"#);
    }

    #[test]
    fn encode_v1_round_trip() {
        let frame = Frame::new(None, Some("9"), "realtime:jobs", PHX_LEAVE, json!({}));
        assert_eq!(Frame::decode(&frame.encode_v1()).unwrap(), frame);
    }
}
