//! API keys and JWTs: the legacy HS256 `anon` and `service_role` keys signed with the
//! emulator's secret, the opaque `sb_secret_…` and `sb_publishable_…` keys, and the checks
//! that PostgREST and Realtime run on a JWT.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Claims the emulator reads from a JWT. Other claims are kept in `extra` so they can be
/// passed to Postgres as `request.jwt.claims`, as PostgREST does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub role: Option<String>,
    pub exp: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<serde_json::Value>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// Returns `exp` as seconds since the epoch when it is an integer.
    pub fn exp_seconds(&self) -> Option<i64> {
        self.exp.as_ref().and_then(|v| v.as_i64())
    }
}

/// Why a JWT was rejected. Each variant maps to the texts PostgREST and Realtime send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("The token provided is not a valid JWT")]
    Malformed { parts: usize },
    #[error("Failed to validate JWT signature")]
    BadSignature,
    #[error("Token has expired")]
    Expired { seconds_ago: i64 },
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
}

/// The keys one emulator instance accepts.
#[derive(Debug, Clone)]
pub struct Keys {
    pub jwt_secret: String,
    pub anon_jwt: String,
    pub service_role_jwt: String,
    pub secret_key: String,
    pub publishable_key: String,
    /// When false, the legacy JWT keys are rejected at the gateway with
    /// "Legacy API keys are disabled", as on a project that turned them off.
    pub legacy_enabled: bool,
}

/// Seconds since the Unix epoch on this machine's clock.
pub fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Keys {
    /// Creates keys signed with `jwt_secret`. The legacy keys expire in ten years, like the
    /// keys of a hosted project.
    pub fn new(jwt_secret: &str) -> Keys {
        let exp = now_seconds() + 10 * 365 * 24 * 3600;
        let anon_jwt = sign_hs256(jwt_secret, "anon", exp);
        let service_role_jwt = sign_hs256(jwt_secret, "service_role", exp);
        Keys {
            jwt_secret: jwt_secret.to_string(),
            anon_jwt,
            service_role_jwt,
            secret_key: "sb_secret_emulator0000000000000000000000".to_string(),
            publishable_key: "sb_publishable_emulator000000000000000000".to_string(),
            legacy_enabled: true,
        }
    }

    /// Signs a JWT for `role` that expires at `exp` (seconds since the epoch).
    pub fn sign(&self, role: &str, exp: i64) -> String {
        sign_hs256(&self.jwt_secret, role, exp)
    }

    /// Checks the HS256 signature and returns the claims, without checking `exp` or `role`
    /// (PostgREST applies its own rules to those).
    pub fn decode(&self, token: &str) -> Result<Claims, JwtError> {
        let parts = token.split('.').count();
        if parts != 3 {
            return Err(JwtError::Malformed { parts });
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let data = decode::<Claims>(
            token,
            &DecodingKey::from_secret(self.jwt_secret.as_bytes()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => JwtError::BadSignature,
            _ => JwtError::Malformed { parts },
        })?;
        Ok(data.claims)
    }

    /// Verifies an HS256 JWT the way Realtime does at connect and join: a valid signature,
    /// `role` and an integer `exp` present, and `exp` in the future.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let claims = self.decode(token)?;
        let Some(exp) = claims.exp_seconds() else {
            return Err(JwtError::MissingClaims);
        };
        if claims.role.is_none() {
            return Err(JwtError::MissingClaims);
        }
        let now = now_seconds();
        if exp <= now {
            return Err(JwtError::Expired {
                seconds_ago: now - exp,
            });
        }
        Ok(claims)
    }
}

fn sign_hs256(secret: &str, role: &str, exp: i64) -> String {
    let claims = serde_json::json!({
        "iss": "supabase-emulator",
        "role": role,
        "iat": now_seconds(),
        "exp": exp,
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing with an in-memory secret cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_accepts_own_keys() {
        let keys = Keys::new("test-secret-with-at-least-32-characters");
        let claims = keys.verify(&keys.service_role_jwt).unwrap();
        assert_eq!(claims.role.as_deref(), Some("service_role"));
    }

    #[test]
    fn verify_rejects_expired_and_foreign() {
        let keys = Keys::new("test-secret-with-at-least-32-characters");
        let expired = keys.sign("service_role", now_seconds() - 5);
        assert!(matches!(
            keys.verify(&expired),
            Err(JwtError::Expired { .. })
        ));
        let other = Keys::new("another-secret-with-at-least-32-chars");
        assert_eq!(
            keys.verify(&other.anon_jwt).unwrap_err(),
            JwtError::BadSignature
        );
        assert!(matches!(
            keys.verify("sb_secret_x"),
            Err(JwtError::Malformed { parts: 1 })
        ));
    }
}
