//! Classification of the configured API key: a legacy JWT (sent as the channel's
//! `access_token`, with an `exp` claim to watch) or an opaque `sb_…` key (never sent as
//! `access_token`, because Realtime ignores `sb_` access tokens and uses the socket's token).

use base64::Engine;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiKeyKind {
    /// A JWT; `expires_at` is its `exp` claim in Unix seconds, if present and numeric.
    Jwt { expires_at: Option<i64> },
    /// An opaque key such as `sb_secret_…`, or any other string that is not a JWT.
    Opaque,
}

impl ApiKeyKind {
    /// Classifies `key` without verifying any signature.
    pub fn of(key: &str) -> ApiKeyKind {
        if key.starts_with("sb_") {
            return ApiKeyKind::Opaque;
        }
        let mut parts = key.split('.');
        let (Some(_header), Some(claims), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return ApiKeyKind::Opaque;
        };
        let Ok(bytes) =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims.trim_end_matches('='))
        else {
            return ApiKeyKind::Opaque;
        };
        let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(&bytes) else {
            return ApiKeyKind::Opaque;
        };
        let expires_at = claims.get("exp").and_then(|exp| {
            exp.as_i64()
                .or_else(|| exp.as_f64().map(|seconds| seconds as i64))
        });
        ApiKeyKind::Jwt { expires_at }
    }

    pub fn is_jwt(&self) -> bool {
        matches!(self, ApiKeyKind::Jwt { .. })
    }

    /// Returns whether the key is a JWT whose `exp` lies at or before `now_unix_seconds`.
    pub fn is_expired_at(&self, now_unix_seconds: i64) -> bool {
        match self {
            ApiKeyKind::Jwt {
                expires_at: Some(expires_at),
            } => *expires_at <= now_unix_seconds,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt_with_claims(claims: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.c2lnbmF0dXJl",
            engine.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            engine.encode(claims)
        )
    }

    #[test]
    fn jwt_with_exp() {
        let key = jwt_with_claims(r#"{"role":"service_role","exp":1983812996}"#);
        let kind = ApiKeyKind::of(&key);
        assert_eq!(
            kind,
            ApiKeyKind::Jwt {
                expires_at: Some(1983812996)
            }
        );
        assert!(kind.is_jwt());
        assert!(!kind.is_expired_at(1_700_000_000));
        assert!(kind.is_expired_at(1983812996));
    }

    #[test]
    fn jwt_without_exp_never_expires() {
        let kind = ApiKeyKind::of(&jwt_with_claims(r#"{"role":"service_role"}"#));
        assert_eq!(kind, ApiKeyKind::Jwt { expires_at: None });
        assert!(!kind.is_expired_at(i64::MAX));
    }

    #[test]
    fn secret_key_is_opaque() {
        let kind = ApiKeyKind::of("sb_secret_abcdefghijklmnop");
        assert_eq!(kind, ApiKeyKind::Opaque);
        assert!(!kind.is_jwt());
    }

    #[test]
    fn malformed_tokens_are_opaque() {
        for key in ["", "a.b", "a.b.c.d", "eyJ.!!!.sig", "x.bm90IGpzb24.sig"] {
            assert_eq!(ApiKeyKind::of(key), ApiKeyKind::Opaque, "key {key:?}");
        }
    }
}
