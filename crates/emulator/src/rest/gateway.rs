//! The Supabase gateway's key handling in front of PostgREST, then PostgREST's JWT checks:
//! which Postgres role a request runs as, or the 401 it gets.

use axum::body::Body;
use axum::http::{header, HeaderMap, Response};

use super::error::{self, ApiError};
use crate::auth::{now_seconds, JwtError, Keys};

/// PostgREST accepts tokens up to this many seconds past `exp`.
const CLOCK_SKEW_SECONDS: i64 = 30;

/// Who a request runs as.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// The Postgres role for `SET LOCAL ROLE`.
    pub role: String,
    /// The JWT claims as JSON, for `request.jwt.claims`.
    pub claims: String,
}

impl Session {
    pub fn is_anonymous(&self) -> bool {
        self.role == "anon"
    }
}

/// Applies the gateway's key checks, then verifies the JWT PostgREST would receive.
pub(crate) fn authenticate(
    headers: &HeaderMap,
    query_apikey: Option<&str>,
    keys: &Keys,
) -> Result<Session, Response<Body>> {
    let apikey = headers
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .or(query_apikey)
        .filter(|k| !k.is_empty());
    let Some(apikey) = apikey else {
        return Err(error::missing_api_key());
    };

    // The role an opaque key maps to when no `Authorization` header is sent. A legacy JWT
    // key is copied into `Authorization` instead, as Kong does.
    let (key_role, legacy_token) = if apikey == keys.secret_key {
        let browser = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ua| ua.contains("Mozilla/"));
        if browser {
            return Err(error::empty_unauthorized());
        }
        ("service_role", None)
    } else if apikey == keys.publishable_key {
        ("anon", None)
    } else if apikey == keys.anon_jwt || apikey == keys.service_role_jwt {
        if !keys.legacy_enabled {
            return Err(error::legacy_keys_disabled());
        }
        ("anon", Some(apikey))
    } else {
        return Err(error::invalid_api_key());
    };

    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = match authorization {
        Some(value) => {
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .unwrap_or(value)
                .trim();
            if token.is_empty() {
                return Err(
                    ApiError::jwt("PGRST301", "Empty JWT is sent in Authorization header")
                        .into_response(),
                );
            }
            Some(token)
        }
        None => legacy_token,
    };

    let Some(token) = token else {
        return Ok(Session {
            role: key_role.to_string(),
            claims: serde_json::json!({"role": key_role, "iss": "supabase-emulator"}).to_string(),
        });
    };
    verify_jwt(token, keys).map_err(ApiError::into_response)
}

/// PostgREST's JWT validation (v14 codes and messages).
fn verify_jwt(token: &str, keys: &Keys) -> Result<Session, ApiError> {
    let claims = keys.decode(token).map_err(|e| match e {
        JwtError::Malformed { parts } if parts != 3 => {
            ApiError::jwt("PGRST301", &format!("Expected 3 parts in JWT; got {parts}"))
        }
        JwtError::BadSignature => ApiError::jwt("PGRST301", "No suitable key or wrong key type")
            .details("None of the keys was able to decode the JWT"),
        _ => ApiError::jwt("PGRST301", "JWT cryptographic operation failed"),
    })?;
    if let Some(exp) = &claims.exp {
        let Some(exp) = exp.as_i64() else {
            return Err(ApiError::jwt(
                "PGRST303",
                "The JWT 'exp' claim must be a number",
            ));
        };
        if exp + CLOCK_SKEW_SECONDS < now_seconds() {
            return Err(ApiError::jwt("PGRST303", "JWT expired"));
        }
    }
    let role = claims.role.clone().unwrap_or_else(|| "anon".to_string());
    let claims = serde_json::to_string(&claims).expect("claims serialise");
    Ok(Session { role, claims })
}
