//! Error responses in the two shapes clients meet: PostgREST's `{code, message, details,
//! hint}` and the Supabase gateway's `{message, hint}`, with the headers each carries.

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};

/// A PostgREST-layer error. `status` follows PostgREST's SQLSTATE-to-HTTP table.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub details: Option<String>,
    pub hint: Option<String>,
    /// Sent as `WWW-Authenticate` on 401 responses.
    pub www_authenticate: Option<String>,
    /// Sent as `Retry-After` (seconds); every 503 carries one.
    pub retry_after: Option<u32>,
    /// Sent as `Content-Range` (the 416 response carries `*/<total>`).
    pub content_range: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            details: None,
            hint: None,
            www_authenticate: None,
            retry_after: if status == StatusCode::SERVICE_UNAVAILABLE {
                Some(1)
            } else {
                None
            },
            content_range: None,
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> ApiError {
        self.details = Some(details.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> ApiError {
        self.hint = Some(hint.into());
        self
    }

    /// A 401 `PGRST301`/`PGRST303` JWT error with the `invalid_token` challenge.
    pub fn jwt(code: &str, message: &str) -> ApiError {
        let mut error = ApiError::new(StatusCode::UNAUTHORIZED, code, message);
        error.www_authenticate = Some(format!(
            "Bearer error=\"invalid_token\", error_description=\"{message}\""
        ));
        error
    }

    /// 400 `PGRST100`: a query parameter that does not parse.
    pub fn parse(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "PGRST100", message)
    }

    /// 400 `42703`, as Postgres reports a missing column.
    pub fn unknown_column(table: &str, column: &str) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "42703",
            format!("column {table}.{column} does not exist"),
        )
    }

    /// 400 `PGRST102`.
    pub fn invalid_body(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "PGRST102", message)
    }

    /// 406 `PGRST116` for a singular request whose result is not exactly one row.
    pub fn not_singular(rows: i64) -> ApiError {
        ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "PGRST116",
            "Cannot coerce the result to a single JSON object",
        )
        .details(format!("The result contains {rows} rows"))
    }

    /// Maps a Postgres error to PostgREST's status for its SQLSTATE. `anonymous` decides
    /// between 401 and 403 for `42501`.
    pub fn from_db(error: &tokio_postgres::error::DbError, anonymous: bool) -> ApiError {
        let code = error.code().code();
        let status = status_for_sqlstate(code, error.message(), anonymous);
        let mut api = ApiError::new(status, code, error.message());
        api.details = error.detail().map(str::to_string);
        api.hint = error.hint().map(str::to_string);
        if status == StatusCode::UNAUTHORIZED {
            api.www_authenticate = Some("Bearer".to_string());
        }
        api
    }

    /// Builds the HTTP response: exactly `code, message, details, hint`, JSON content type,
    /// and `Proxy-Status: PostgREST; error=<code>`.
    pub fn into_response(self) -> Response<Body> {
        let body = json!({
            "code": self.code,
            "message": self.message,
            "details": self.details,
            "hint": self.hint,
        })
        .to_string();
        let mut builder = Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .header(header::CONTENT_LENGTH, body.len())
            .header("Proxy-Status", format!("PostgREST; error={}", self.code));
        if let Some(challenge) = &self.www_authenticate {
            builder = builder.header(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(seconds) = self.retry_after {
            builder = builder.header(header::RETRY_AFTER, seconds);
        }
        if let Some(range) = &self.content_range {
            builder = builder.header(header::CONTENT_RANGE, range);
        }
        builder
            .body(Body::from(body))
            .expect("static headers are valid")
    }
}

/// PostgREST's `mapSQLtoHTTP` (v14).
fn status_for_sqlstate(code: &str, message: &str, anonymous: bool) -> StatusCode {
    match code {
        "23505" | "23503" => StatusCode::CONFLICT,
        "42P01" | "42883" => StatusCode::NOT_FOUND,
        "42501" if anonymous => StatusCode::UNAUTHORIZED,
        "42501" => StatusCode::FORBIDDEN,
        "22023" if message.starts_with("role ") => StatusCode::UNAUTHORIZED,
        "53400" => StatusCode::INTERNAL_SERVER_ERROR,
        "57P01" => StatusCode::SERVICE_UNAVAILABLE,
        "25006" => StatusCode::METHOD_NOT_ALLOWED,
        "P0001" => StatusCode::BAD_REQUEST,
        "21000" if message.contains("requires a WHERE clause") => StatusCode::BAD_REQUEST,
        "57014" | "40001" | "40P01" | "21000" => StatusCode::INTERNAL_SERVER_ERROR,
        _ if code.starts_with("08") || code.starts_with("53") => StatusCode::SERVICE_UNAVAILABLE,
        _ if code.starts_with("25") || code.starts_with("XX") || code.starts_with("P0") => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::BAD_REQUEST,
    }
}

/// A Supabase gateway error: only `message` and `hint`, no `code`.
pub fn gateway_error(status: StatusCode, message: &str, hint: Option<&str>) -> Response<Body> {
    let mut body = serde_json::Map::new();
    body.insert("message".into(), Value::from(message));
    if let Some(hint) = hint {
        body.insert("hint".into(), Value::from(hint));
    }
    let body = Value::Object(body).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .expect("static headers are valid")
}

/// 401 with no API key at all.
pub fn missing_api_key() -> Response<Body> {
    let mut response = gateway_error(
        StatusCode::UNAUTHORIZED,
        "No API key found in request",
        Some("No `apikey` request header or url param was found."),
    );
    response.headers_mut().insert(
        "sb-error-code",
        HeaderValue::from_static("UNAUTHORIZED_MISSING_API_KEY"),
    );
    response
}

/// 401 for a key the project does not have.
pub fn invalid_api_key() -> Response<Body> {
    gateway_error(
        StatusCode::UNAUTHORIZED,
        "Invalid API key",
        Some("Double check your Supabase `anon` or `service_role` API key."),
    )
}

/// 401 for a legacy JWT key while legacy keys are disabled.
pub fn legacy_keys_disabled() -> Response<Body> {
    // NOTE: Supabase's exact hint for this response is not documented; the message matches
    // reports from real projects.
    gateway_error(
        StatusCode::UNAUTHORIZED,
        "Legacy API keys are disabled",
        Some("Use a publishable or secret API key instead, or re-enable the legacy keys."),
    )
}

/// 401 with an empty body: a secret key sent with a browser `User-Agent`.
pub fn empty_unauthorized() -> Response<Body> {
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("static headers are valid")
}
