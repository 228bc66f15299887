//! Request handling for `/rest/v1/<table>`: faults, gateway, request parsing, one database
//! transaction, and the response headers PostgREST sends.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, Response, StatusCode, Uri};
use axum::Extension;
use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};

use super::error::ApiError;
use super::faults::RestFault;
use super::gateway::{authenticate, Session};
use super::query::{decode_query, parse_prefer, parse_query, parse_range, Preferences, QueryParts};
use super::schema::{Table, SCHEMA};
use super::sql::{self, ident, Params};
use super::RestState;
use crate::server::ConnectionControl;

const SINGULAR_MEDIA_TYPE: &str = "application/vnd.pgrst.object+json";

/// `/rest/v1` without a table.
pub(crate) async fn handle_root(
    State(state): State<Arc<RestState>>,
    method: Method,
) -> Response<Body> {
    state.faults.count(&method);
    ApiError::new(
        StatusCode::NOT_FOUND,
        "PGRST125",
        "Invalid path specified in request URL",
    )
    .into_response()
}

pub(crate) async fn handle(
    State(state): State<Arc<RestState>>,
    Path(table): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    connection: Option<Extension<ConnectionControl>>,
    body: Bytes,
) -> Response<Body> {
    state.faults.count(&method);
    let mut drop_after_commit = false;
    if let Some(fault) = state.faults.take(&method) {
        if let Some(response) = fault.response() {
            return response;
        }
        match fault {
            RestFault::Delay { millis } => {
                tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
            }
            RestFault::DropAfterCommit => drop_after_commit = true,
            _ => {}
        }
    }

    let raw_query = uri.query().unwrap_or("");
    let pairs = decode_query(raw_query);
    let query_apikey = pairs
        .iter()
        .find(|(k, _)| k == "apikey")
        .map(|(_, v)| v.as_str());
    let session = match authenticate(&headers, query_apikey, &state.keys) {
        Ok(session) => session,
        Err(response) => return response,
    };

    let request = RequestContext {
        table_name: table,
        method,
        raw_query: raw_query.to_string(),
        headers,
        session,
    };
    let plan = match prepare(&state, &request, &pairs, &body) {
        Ok(Prepared::Immediate(response)) => return response,
        Ok(Prepared::Run(plan)) => plan,
        Err(error) => return error.into_response(),
    };

    // The transaction runs in its own task so that a client that disconnects mid-request
    // cannot leave a pooled connection inside an open transaction.
    let task_state = state.clone();
    let session = request.session.clone();
    let statement = plan.statement.clone();
    let params = plan.params.clone();
    let guard = plan.guard;
    let read_only = plan.read_only;
    let result = tokio::spawn(async move {
        execute(&task_state, &session, &statement, params, read_only, guard).await
    })
    .await
    .unwrap_or_else(|error| {
        tracing::error!(%error, "request task failed");
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "XX000",
            "internal error",
        ))
    });
    let result = match result {
        Ok(result) => result,
        Err(error) => return error.into_response(),
    };

    if drop_after_commit {
        if let Some(Extension(connection)) = connection {
            tracing::info!(table = %request.table_name, "dropping connection after commit (fault)");
            connection.drop_connection();
            // The connection task drops this future; the response is never written.
            std::future::pending::<()>().await;
        }
    }
    respond(&request, &plan, result)
}

/// Request data the handler keeps besides the query string.
struct RequestContext {
    table_name: String,
    method: Method,
    raw_query: String,
    headers: HeaderMap,
    session: Session,
}

enum Prepared {
    Immediate(Response<Body>),
    Run(Plan),
}

/// Checks applied after the statement and before COMMIT; a failure rolls back.
#[derive(Debug, Clone, Copy)]
struct Guard {
    singular: bool,
    max_affected: Option<i64>,
}

struct Plan {
    statement: String,
    params: Vec<String>,
    read_only: bool,
    guard: Guard,
    prefs: Preferences,
    singular: bool,
    /// First row offset of a read, for `Content-Range`.
    offset: i64,
}

struct QueryResult {
    total: Option<i64>,
    rows: i64,
    body: Option<String>,
}

fn header_str(headers: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn prepare(
    state: &RestState,
    request: &RequestContext,
    pairs: &[(String, String)],
    body: &Bytes,
) -> Result<Prepared, ApiError> {
    let headers = &request.headers;
    let reading = matches!(request.method, Method::GET | Method::HEAD);
    let profile_header = if reading {
        "accept-profile"
    } else {
        "content-profile"
    };
    if let Some(profile) = header_str(headers, profile_header) {
        if profile != SCHEMA {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "PGRST106",
                format!("Invalid schema: {profile}"),
            )
            .hint(format!("Only the following schemas are exposed: {SCHEMA}")));
        }
    }

    let schema = state.schema.read().expect("schema lock").clone();
    let Some(table) = schema.tables.get(&request.table_name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "PGRST205",
            format!(
                "Could not find the table '{SCHEMA}.{}' in the schema cache",
                request.table_name
            ),
        ));
    };

    let prefs = parse_prefer(
        headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    if prefs.strict && !prefs.invalid.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "PGRST122",
            "Invalid preferences given with handling=strict",
        )
        .details(format!("Invalid preferences: {}", prefs.invalid.join(", "))));
    }
    let singular =
        header_str(headers, header::ACCEPT).is_some_and(|a| a.contains(SINGULAR_MEDIA_TYPE));
    if let Some(accept) = header_str(headers, header::ACCEPT) {
        let acceptable = accept.split(',').any(|media| {
            let media = media.split(';').next().unwrap_or("").trim();
            matches!(
                media,
                "" | "*/*" | "application/*" | "application/json" | SINGULAR_MEDIA_TYPE
            )
        });
        if !acceptable {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "PGRST107",
                format!("None of these media types are available: {accept}"),
            ));
        }
    }
    let parts = parse_query(pairs)?;
    let mut params = Params::default();
    let representation = prefs.representation == Some(true);
    let guard = Guard {
        singular,
        max_affected: if prefs.strict {
            prefs.max_affected
        } else {
            None
        },
    };

    let (statement, offset) = match request.method {
        Method::GET | Method::HEAD => {
            let (offset, limit) = read_window(&parts, headers, state.options.max_rows);
            let statement = sql::select_statement(
                table,
                &parts,
                offset,
                limit,
                prefs.count_exact,
                &mut params,
            )?;
            (statement, offset)
        }
        Method::PATCH => {
            let document = parse_body(headers, body)?;
            let object = match &document {
                Value::Object(map) => Some(map.clone()),
                Value::Array(items) => items.first().and_then(|v| v.as_object()).cloned(),
                _ => return Err(ApiError::invalid_body("Empty or invalid json")),
            };
            let object = object.unwrap_or_default();
            if object.is_empty() {
                // `{}`, `[]` and `[{}]` update nothing and run no SQL.
                return Ok(Prepared::Immediate(empty_mutation(
                    request, &prefs, singular, table,
                )?));
            }
            let keys: Vec<String> = object.keys().cloned().collect();
            let statement = sql::update_statement(
                table,
                &parts,
                &keys,
                representation || singular,
                &mut params,
            )?;
            params.values[0] = match document {
                Value::Object(_) => String::from_utf8_lossy(body).into_owned(),
                _ => Value::Object(object).to_string(),
            };
            (statement, 0)
        }
        Method::POST => {
            let document = parse_body(headers, body)?;
            let (rows_json, keys) = insert_rows(&document, body)?;
            let statement = sql::insert_statement(
                table,
                &parts,
                &keys,
                representation || singular,
                &mut params,
            )?;
            params.values[0] = rows_json;
            (statement, 0)
        }
        Method::DELETE => {
            let statement =
                sql::delete_statement(table, &parts, representation || singular, &mut params)?;
            (statement, 0)
        }
        ref other => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "PGRST117",
                format!("Unsupported HTTP method: {other}"),
            ))
        }
    };
    Ok(Prepared::Run(Plan {
        statement,
        params: params.values,
        read_only: reading,
        guard,
        prefs,
        singular,
        offset,
    }))
}

/// Offset and row limit of a read: the intersection of `offset`/`limit` with the `Range`
/// header (honoured on GET and HEAD only), cut to `max_rows`.
fn read_window(parts: &QueryParts, headers: &HeaderMap, max_rows: i64) -> (i64, i64) {
    let mut lower = parts.offset.unwrap_or(0);
    let mut upper = parts.limit.map(|limit| lower + limit - 1);
    if let Some((first, last)) = header_str(headers, header::RANGE).and_then(parse_range) {
        lower = lower.max(first);
        upper = match (upper, last) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let limit = match upper {
        Some(upper) => (upper - lower + 1).max(0).min(max_rows),
        None => max_rows,
    };
    (lower, limit)
}

/// Parses a JSON request body. A missing `Content-Type` is read as JSON.
fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    if let Some(content_type) = header_str(headers, header::CONTENT_TYPE) {
        let media = content_type.split(';').next().unwrap_or("").trim();
        if !matches!(media, "application/json" | SINGULAR_MEDIA_TYPE | "") {
            return Err(ApiError::invalid_body(format!(
                "Content-Type not acceptable: {content_type}"
            )));
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_body("Empty or invalid json"));
    }
    serde_json::from_slice(body).map_err(|_| ApiError::invalid_body("Empty or invalid json"))
}

/// The JSON array to insert and its keys. Every object of an array must have the same keys.
fn insert_rows(document: &Value, body: &Bytes) -> Result<(String, Vec<String>), ApiError> {
    match document {
        Value::Object(map) => Ok((
            format!("[{}]", String::from_utf8_lossy(body)),
            map.keys().cloned().collect(),
        )),
        Value::Array(items) => {
            let mut keys: Option<Vec<String>> = None;
            for item in items {
                let Value::Object(map) = item else {
                    return Err(ApiError::invalid_body("Empty or invalid json"));
                };
                let item_keys: Vec<String> = map.keys().cloned().collect();
                match &keys {
                    Some(first) if *first != item_keys => {
                        return Err(ApiError::invalid_body("All object keys must match"));
                    }
                    Some(_) => {}
                    None => keys = Some(item_keys),
                }
            }
            Ok((
                String::from_utf8_lossy(body).into_owned(),
                keys.unwrap_or_default(),
            ))
        }
        _ => Err(ApiError::invalid_body("Empty or invalid json")),
    }
}

/// The response to a PATCH whose body has no keys: nothing is updated.
fn empty_mutation(
    request: &RequestContext,
    prefs: &Preferences,
    singular: bool,
    _table: &Table,
) -> Result<Response<Body>, ApiError> {
    if singular {
        return Err(ApiError::not_singular(0));
    }
    let plan = Plan {
        statement: String::new(),
        params: Vec::new(),
        read_only: false,
        guard: Guard {
            singular: false,
            max_affected: None,
        },
        prefs: prefs.clone(),
        singular: false,
        offset: 0,
    };
    let result = QueryResult {
        total: None,
        rows: 0,
        body: Some("[]".to_string()),
    };
    Ok(respond(request, &plan, result))
}

fn map_db_error(error: &tokio_postgres::Error, session: &Session) -> ApiError {
    match error.as_db_error() {
        Some(db) => ApiError::from_db(db, session.is_anonymous()),
        None => {
            tracing::warn!(%error, role = %session.role, "database connection failed during a request");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "PGRST000",
                "Database connection error. Retrying the connection.",
            )
            .details(error.to_string())
        }
    }
}

/// Runs `statement` in one READ COMMITTED transaction as the session's role.
async fn execute(
    state: &RestState,
    session: &Session,
    statement: &str,
    params: Vec<String>,
    read_only: bool,
    guard: Guard,
) -> Result<QueryResult, ApiError> {
    let client = state.pool.get().await.map_err(|error| match error {
        deadpool_postgres::PoolError::Timeout(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "PGRST003",
            "Timed out acquiring connection from connection pool.",
        ),
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "PGRST000",
            "Database connection error. Retrying the connection.",
        )
        .details(other.to_string()),
    })?;
    // One round trip opens the transaction, switches role and publishes the claims.
    let begin = format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED{}; SET LOCAL ROLE {}; SELECT set_config('request.jwt.claims', '{}', true)",
        if read_only { " READ ONLY" } else { "" },
        ident(&session.role),
        session.claims.replace('\'', "''"),
    );
    let run = async {
        client.batch_execute(&begin).await?;
        let types = vec![Type::TEXT; params.len()];
        let prepared = client.prepare_typed_cached(statement, &types).await?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        client.query_one(&prepared, &refs).await
    };
    let row = match run.await {
        Ok(row) => row,
        Err(error) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(map_db_error(&error, session));
        }
    };
    let result = QueryResult {
        total: row.get(0),
        rows: row.get(1),
        body: row.get(2),
    };
    if guard.singular && result.rows != 1 {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(ApiError::not_singular(result.rows));
    }
    if let Some(max) = guard.max_affected {
        if !read_only && result.rows > max {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "PGRST124",
                "Query result exceeds max-affected preference constraint",
            )
            .details(format!("The query affects {} rows", result.rows)));
        }
    }
    if let Err(error) = client.batch_execute("COMMIT").await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(map_db_error(&error, session));
    }
    Ok(result)
}

/// Builds the success response from the statement's result.
fn respond(request: &RequestContext, plan: &Plan, result: QueryResult) -> Response<Body> {
    let prefs = &plan.prefs;
    let reading = matches!(request.method, Method::GET | Method::HEAD);
    let mutation_total = if prefs.count_exact {
        Some(result.rows)
    } else {
        None
    };
    let total = if reading {
        result.total
    } else {
        mutation_total
    };
    let total_text = total.map_or("*".to_string(), |t| t.to_string());
    let offset = plan.offset;

    if reading {
        if let Some(total) = total {
            if offset > total {
                let mut error = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "PGRST103",
                    "Requested range not satisfiable",
                )
                .details(format!(
                    "An offset of {offset} was requested, but there are only {total} rows."
                ));
                error.content_range = Some(format!("*/{total}"));
                return error.into_response();
            }
        }
    }
    let range = if result.rows > 0 && request.method != Method::POST {
        format!("{}-{}/{total_text}", offset, offset + result.rows - 1)
    } else {
        format!("*/{total_text}")
    };

    let mut applied = Vec::new();
    if !reading {
        match prefs.representation {
            Some(true) => applied.push("return=representation".to_string()),
            Some(false) => applied.push("return=minimal".to_string()),
            None => {}
        }
    }
    if prefs.count_exact {
        applied.push("count=exact".to_string());
    }
    if prefs.strict {
        applied.push("handling=strict".to_string());
        if let Some(max) = prefs.max_affected {
            if !reading {
                applied.push(format!("max-affected={max}"));
            }
        }
    }

    let status = match request.method {
        Method::POST => StatusCode::CREATED,
        _ if !(reading || prefs.representation == Some(true) || plan.singular) => {
            StatusCode::NO_CONTENT
        }
        _ => match total {
            // PostgREST's `rangeStatus`.
            Some(total) if reading && (1 + (offset + result.rows - 1) - offset) < total => {
                StatusCode::PARTIAL_CONTENT
            }
            _ => StatusCode::OK,
        },
    };

    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_RANGE, range);
    if reading {
        let location = if request.raw_query.is_empty() {
            format!("/{}", request.table_name)
        } else {
            format!("/{}?{}", request.table_name, request.raw_query)
        };
        builder = builder.header(header::CONTENT_LOCATION, location);
    }
    if !applied.is_empty() {
        builder = builder.header("Preference-Applied", applied.join(", "));
    }
    let with_body = reading || prefs.representation == Some(true) || plan.singular;
    if status == StatusCode::NO_CONTENT || (!with_body && status == StatusCode::CREATED) {
        return builder.body(Body::empty()).expect("valid response");
    }
    let mut text = result.body.unwrap_or_else(|| "[]".to_string());
    let content_type = if plan.singular {
        text = singular_object(&text);
        "application/vnd.pgrst.object+json; charset=utf-8"
    } else {
        "application/json; charset=utf-8"
    };
    builder = builder
        .header(header::CONTENT_TYPE, content_type)
        .header("Content-Profile", SCHEMA);
    if request.method == Method::HEAD {
        return builder.body(Body::empty()).expect("valid response");
    }
    builder.body(Body::from(text)).expect("valid response")
}

/// The only element of a one-element JSON array.
fn singular_object(array: &str) -> String {
    match serde_json::from_str::<Value>(array) {
        Ok(Value::Array(mut items)) if items.len() == 1 => items.remove(0).to_string(),
        _ => array.to_string(),
    }
}
