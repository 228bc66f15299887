//! Phoenix channel frames as Realtime sends and accepts them: the V1 serializer (JSON
//! objects, `vsn=1.0.0`) and the V2 serializer (five-element JSON arrays, `vsn=2.0.0`).

use serde_json::{json, Value};

/// The serializer a socket negotiated with its `vsn` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    /// `vsn=1.0.0` or no `vsn`: JSON objects; output never contains `join_ref`.
    V1,
    /// `vsn=2.0.0`: `[join_ref, ref, topic, event, payload]` arrays.
    V2,
}

impl Vsn {
    /// Parses the `vsn` query parameter the way Phoenix matches `~> 1.0.0` and `~> 2.0.0`.
    /// Returns `None` for any other version, which Phoenix rejects with HTTP 403.
    pub fn parse(vsn: Option<&str>) -> Option<Vsn> {
        let Some(vsn) = vsn else {
            return Some(Vsn::V1);
        };
        let mut parts = vsn.split('.');
        let major = parts.next()?;
        let minor = parts.next()?;
        let patch = parts.next()?;
        if parts.next().is_some() || minor != "0" || patch.parse::<u32>().is_err() {
            return None;
        }
        match major {
            "1" => Some(Vsn::V1),
            "2" => Some(Vsn::V2),
            _ => None,
        }
    }
}

/// One decoded client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub join_ref: Option<String>,
    pub reference: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

/// Decodes a client text frame. Returns `None` for a frame the real server drops without
/// a reply: invalid JSON, a V2 frame that is not an array of at least five elements, or a
/// V1 object missing `topic`, `event`, `payload` or `ref`.
pub fn decode(vsn: Vsn, text: &str) -> Option<Frame> {
    let value: Value = serde_json::from_str(text).ok()?;
    match vsn {
        Vsn::V2 => {
            let items = value.as_array()?;
            if items.len() < 5 {
                return None;
            }
            Some(Frame {
                join_ref: optional_string(&items[0])?,
                reference: optional_string(&items[1])?,
                topic: items[2].as_str()?.to_string(),
                event: items[3].as_str()?.to_string(),
                payload: items[4].clone(),
            })
        }
        Vsn::V1 => {
            let object = value.as_object()?;
            let payload = object.get("payload")?.clone();
            let reference = optional_string(object.get("ref")?)?;
            let join_ref = match object.get("join_ref") {
                Some(v) => optional_string(v)?,
                None => None,
            };
            Some(Frame {
                join_ref,
                reference,
                topic: object.get("topic")?.as_str()?.to_string(),
                event: object.get("event")?.as_str()?.to_string(),
                payload,
            })
        }
    }
}

/// Reads a ref field: a string, a number (phoenix.js clients send strings, others may not)
/// or null. Anything else makes the frame malformed.
fn optional_string(value: &Value) -> Option<Option<String>> {
    match value {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        Value::Number(n) => Some(Some(n.to_string())),
        _ => None,
    }
}

/// Encodes a server frame. V1 output omits `join_ref`; V2 output always has five elements.
pub fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Value,
) -> String {
    let value = match vsn {
        Vsn::V2 => json!([join_ref, reference, topic, event, payload]),
        Vsn::V1 => json!({
            "topic": topic,
            "event": event,
            "payload": payload,
            "ref": reference,
        }),
    };
    value.to_string()
}

/// Builds the payload of an ok reply.
pub fn ok_reply(response: Value) -> Value {
    json!({"status": "ok", "response": response})
}

/// Builds the payload of an error reply with a `reason`.
pub fn error_reply(reason: &str) -> Value {
    json!({"status": "error", "response": {"reason": reason}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsn_accepts_patch_versions_only() {
        assert_eq!(Vsn::parse(None), Some(Vsn::V1));
        assert_eq!(Vsn::parse(Some("1.0.0")), Some(Vsn::V1));
        assert_eq!(Vsn::parse(Some("2.0.0")), Some(Vsn::V2));
        assert_eq!(Vsn::parse(Some("2.0.3")), Some(Vsn::V2));
        assert_eq!(Vsn::parse(Some("3.0.0")), None);
        assert_eq!(Vsn::parse(Some("2.1.0")), None);
        assert_eq!(Vsn::parse(Some("")), None);
    }

    #[test]
    fn decode_drops_malformed_frames() {
        assert!(decode(Vsn::V2, "not json").is_none());
        assert!(decode(Vsn::V2, r#"{"topic":"x"}"#).is_none());
        assert!(decode(Vsn::V2, r#"[null,"1","phoenix","heartbeat"]"#).is_none());
        assert!(decode(
            Vsn::V1,
            r#"{"topic":"phoenix","event":"heartbeat","payload":{}}"#
        )
        .is_none());
        let frame = decode(Vsn::V2, r#"[null,"1","phoenix","heartbeat",{},"extra"]"#).unwrap();
        assert_eq!(frame.reference.as_deref(), Some("1"));
    }

    #[test]
    fn v1_output_has_no_join_ref() {
        let text = encode(Vsn::V1, Some("3"), None, "realtime:x", "system", &json!({}));
        let value: Value = serde_json::from_str(&text).unwrap();
        assert!(value.get("join_ref").is_none());
        assert_eq!(value["ref"], Value::Null);
    }
}
