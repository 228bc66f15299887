//! SQL generation. Every statement has the same result shape, `(total bigint, rows bigint,
//! body text)`, and every value from the request is bound as text and converted by a
//! `CAST(… AS <column type>)` or `json_to_record`, so Postgres' own input functions accept
//! `now` and raise the real SQLSTATE for bad values.

use std::fmt::Write;

use super::error::ApiError;
use super::query::{Condition, Filter, IsValue, Operator, OrderTerm, QueryParts, SelectItem};
use super::schema::{Table, SCHEMA};

/// Quotes an identifier for SQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Bound text parameters; `$n` refers to `values[n - 1]`.
#[derive(Debug, Default)]
pub struct Params {
    pub values: Vec<String>,
}

impl Params {
    fn push(&mut self, value: String) -> String {
        self.values.push(value);
        format!("${}", self.values.len())
    }
}

fn column<'t>(table: &'t Table, name: &str) -> Result<&'t super::schema::Column, ApiError> {
    table
        .column(name)
        .ok_or_else(|| ApiError::unknown_column(&table.name, name))
}

/// Builds the WHERE clause for `conditions` (ANDed), or `true` when there are none.
pub fn where_clause(
    table: &Table,
    conditions: &[Condition],
    params: &mut Params,
) -> Result<String, ApiError> {
    if conditions.is_empty() {
        return Ok("true".to_string());
    }
    let parts = conditions
        .iter()
        .map(|c| condition_sql(table, c, params))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(parts.join(" AND "))
}

fn condition_sql(
    table: &Table,
    condition: &Condition,
    params: &mut Params,
) -> Result<String, ApiError> {
    let (negated, items, joiner) = match condition {
        Condition::Filter(filter) => return filter_sql(table, filter, params),
        Condition::Or { negated, items } => (*negated, items, " OR "),
        Condition::And { negated, items } => (*negated, items, " AND "),
    };
    let parts = items
        .iter()
        .map(|c| condition_sql(table, c, params))
        .collect::<Result<Vec<_>, _>>()?;
    let inner = if parts.is_empty() {
        "true".to_string()
    } else {
        parts.join(joiner)
    };
    Ok(if negated {
        format!("NOT ({inner})")
    } else {
        format!("({inner})")
    })
}

fn filter_sql(table: &Table, filter: &Filter, params: &mut Params) -> Result<String, ApiError> {
    let col = column(table, &filter.column)?;
    let target = format!("{}.{}", ident(&table.name), ident(&col.name));
    let mut typed = |value: &str| {
        format!(
            "CAST({}::text AS {})",
            params.push(value.to_string()),
            col.sql_type
        )
    };
    let sql = match &filter.operator {
        Operator::Eq => format!("{target} = {}", typed(&filter.value)),
        Operator::Neq => format!("{target} <> {}", typed(&filter.value)),
        Operator::Gt => format!("{target} > {}", typed(&filter.value)),
        Operator::Gte => format!("{target} >= {}", typed(&filter.value)),
        Operator::Lt => format!("{target} < {}", typed(&filter.value)),
        Operator::Lte => format!("{target} <= {}", typed(&filter.value)),
        Operator::Like | Operator::Ilike => {
            let op = if filter.operator == Operator::Like {
                "LIKE"
            } else {
                "ILIKE"
            };
            let pattern = params.push(filter.value.replace('*', "%"));
            format!("{target}::text {op} {pattern}::text")
        }
        Operator::In(values) if values.is_empty() => "false".to_string(),
        Operator::In(values) => {
            let items: Vec<String> = values.iter().map(|v| typed(v)).collect();
            format!("{target} = ANY(ARRAY[{}])", items.join(", "))
        }
        Operator::Is(value) => {
            let test = match value {
                IsValue::Null => "IS NULL",
                IsValue::NotNull => "IS NOT NULL",
                IsValue::True => "IS TRUE",
                IsValue::False => "IS FALSE",
                IsValue::Unknown => "IS UNKNOWN",
            };
            format!("{target} {test}")
        }
    };
    Ok(if filter.negated {
        format!("NOT ({sql})")
    } else {
        sql
    })
}

/// The select list over a relation named like the table.
pub fn select_list(table: &Table, select: &Option<Vec<SelectItem>>) -> Result<String, ApiError> {
    let Some(items) = select else {
        return Ok(format!("{}.*", ident(&table.name)));
    };
    let mut parts = Vec::with_capacity(items.len());
    for item in items {
        let col = column(table, &item.column)?;
        let mut expr = format!("{}.{}", ident(&table.name), ident(&col.name));
        if let Some(cast) = &item.cast {
            write!(expr, "::{cast}").expect("write to String");
        }
        let name = item.alias.as_deref().unwrap_or(&col.name);
        write!(expr, " AS {}", ident(name)).expect("write to String");
        parts.push(expr);
    }
    Ok(parts.join(", "))
}

fn order_by(table: &Table, order: &[OrderTerm]) -> Result<String, ApiError> {
    if order.is_empty() {
        return Ok(String::new());
    }
    let mut parts = Vec::with_capacity(order.len());
    for term in order {
        let col = column(table, &term.column)?;
        let mut part = format!("{}.{}", ident(&table.name), ident(&col.name));
        part.push_str(if term.descending { " DESC" } else { " ASC" });
        match term.nulls_first {
            Some(true) => part.push_str(" NULLS FIRST"),
            Some(false) => part.push_str(" NULLS LAST"),
            None => {}
        }
        parts.push(part);
    }
    Ok(format!(" ORDER BY {}", parts.join(", ")))
}

fn qualified(table: &Table) -> String {
    format!("{}.{}", ident(SCHEMA), ident(&table.name))
}

/// `coalesce(json_agg(_t), '[]')::text` when the rows are wanted, else NULL.
fn body_expr(representation: bool) -> &'static str {
    if representation {
        "coalesce(json_agg(_t), '[]')::text"
    } else {
        "NULL::text"
    }
}

/// A read: `(total or NULL, rows, JSON array)`.
pub fn select_statement(
    table: &Table,
    parts: &QueryParts,
    offset: i64,
    limit: i64,
    count_exact: bool,
    params: &mut Params,
) -> Result<String, ApiError> {
    let columns = select_list(table, &parts.select)?;
    let filter = where_clause(table, &parts.conditions, params)?;
    let order = order_by(table, &parts.order)?;
    let from = format!("{} AS {}", qualified(table), ident(&table.name));
    let total = if count_exact {
        format!("(SELECT count(*) FROM {from} WHERE {filter})")
    } else {
        "NULL::bigint".to_string()
    };
    Ok(format!(
        "SELECT {total}, count(_t), {body} FROM (SELECT {columns} FROM {from} WHERE {filter}{order} LIMIT {limit} OFFSET {offset}) _t",
        body = body_expr(true)
    ))
}

/// Wraps a data-modifying statement returning the table's rows.
fn wrap_mutation(
    table: &Table,
    mutation: &str,
    select: &Option<Vec<SelectItem>>,
    representation: bool,
) -> Result<String, ApiError> {
    let columns = select_list(table, select)?;
    Ok(format!(
        "WITH pgrst_source AS ({mutation} RETURNING {name}.*) SELECT NULL::bigint, count(_t), {body} FROM (SELECT {columns} FROM pgrst_source AS {name}) _t",
        name = ident(&table.name),
        body = body_expr(representation)
    ))
}

/// `json_to_record` column definitions for the given body keys.
fn record_definition(table: &Table, keys: &[String]) -> Result<String, ApiError> {
    let mut defs = Vec::with_capacity(keys.len());
    for key in keys {
        let col = table.column(key).ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "PGRST204",
                format!(
                    "Could not find the '{key}' column of '{}' in the schema cache",
                    table.name
                ),
            )
        })?;
        defs.push(format!("{} {}", ident(&col.name), col.sql_type));
    }
    Ok(defs.join(", "))
}

/// One UPDATE whose SET list is exactly the body's keys. The body is `$1`.
pub fn update_statement(
    table: &Table,
    parts: &QueryParts,
    keys: &[String],
    representation: bool,
    params: &mut Params,
) -> Result<String, ApiError> {
    let definition = record_definition(table, keys)?;
    let body = params.push(String::new());
    let filter = where_clause(table, &parts.conditions, params)?;
    let assignments: Vec<String> = keys
        .iter()
        .map(|k| format!("{0} = _body.{0}", ident(k)))
        .collect();
    let mutation = format!(
        "UPDATE {target} AS {name} SET {set} FROM json_to_record({body}::json) AS _body({definition}) WHERE {filter}",
        target = qualified(table),
        name = ident(&table.name),
        set = assignments.join(", "),
    );
    wrap_mutation(table, &mutation, &parts.select, representation)
}

/// A DELETE of the filtered rows.
pub fn delete_statement(
    table: &Table,
    parts: &QueryParts,
    representation: bool,
    params: &mut Params,
) -> Result<String, ApiError> {
    let filter = where_clause(table, &parts.conditions, params)?;
    let mutation = format!(
        "DELETE FROM {target} AS {name} WHERE {filter}",
        target = qualified(table),
        name = ident(&table.name),
    );
    wrap_mutation(table, &mutation, &parts.select, representation)
}

/// An INSERT of every object in the JSON array `$1`, columns from `keys`.
pub fn insert_statement(
    table: &Table,
    parts: &QueryParts,
    keys: &[String],
    representation: bool,
    params: &mut Params,
) -> Result<String, ApiError> {
    let body = params.push(String::new());
    let mutation = if keys.is_empty() {
        // NOTE: an object without keys inserts one row of defaults, however many objects
        // the array holds.
        format!(
            "INSERT INTO {target} AS {name} DEFAULT VALUES",
            target = qualified(table),
            name = ident(&table.name),
        )
    } else {
        let definition = record_definition(table, keys)?;
        let columns: Vec<String> = keys.iter().map(|k| ident(k)).collect();
        format!(
            "INSERT INTO {target} AS {name} ({columns}) SELECT {columns} FROM json_to_recordset({body}::json) AS _body({definition})",
            target = qualified(table),
            name = ident(&table.name),
            columns = columns.join(", "),
        )
    };
    wrap_mutation(table, &mutation, &parts.select, representation)
}
