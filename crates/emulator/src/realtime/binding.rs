//! `postgres_changes` bindings of a join: parsing the entries of
//! `config.postgres_changes`, their stable integer ids, and matching a change against
//! event type, schema, table and filter.

use serde_json::{Map, Value};

/// The change types a binding listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFilter {
    All,
    Insert,
    Update,
    Delete,
}

impl EventFilter {
    /// Parses `event` case-insensitively. Like the real server, any value other than
    /// `INSERT`, `UPDATE` or `DELETE` (including a missing one) means every event.
    fn parse(value: Option<&Value>) -> EventFilter {
        match value
            .and_then(Value::as_str)
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            Some("INSERT") => EventFilter::Insert,
            Some("UPDATE") => EventFilter::Update,
            Some("DELETE") => EventFilter::Delete,
            _ => EventFilter::All,
        }
    }

    /// Returns the operation name (`INSERT`, `UPDATE`, `DELETE`) or `*`.
    pub fn label(self) -> &'static str {
        match self {
            EventFilter::All => "*",
            EventFilter::Insert => "INSERT",
            EventFilter::Update => "UPDATE",
            EventFilter::Delete => "DELETE",
        }
    }

    fn matches(self, change_type: &str) -> bool {
        self == EventFilter::All || self.label() == change_type
    }
}

/// A PostgREST-style comparison operator supported in a binding filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
}

/// A parsed `column=op.value` filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub column: String,
    pub operator: Operator,
    /// One value, or the list of an `in` filter.
    pub values: Vec<String>,
}

/// One entry of `config.postgres_changes`.
#[derive(Debug, Clone)]
pub struct Binding {
    /// Stable id: the same entry always gets the same id, below 2^27 like the real one.
    pub id: u32,
    /// The entry as the client sent it, plus `id`; echoed in the join reply.
    pub echo: Value,
    pub event: EventFilter,
    pub schema: String,
    /// A table name or `*` for every table of the schema.
    pub table: String,
    pub filter: Option<Filter>,
}

/// A reason a binding cannot be subscribed. Each variant's text is the `system` error
/// message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("No subscription params provided. Please provide at least a `schema` or `table` to subscribe to.")]
    NoParams,
    #[error("Error parsing `filter` params: {0}")]
    BadFilter(String),
}

/// Parses one entry. Returns the binding, or the error the server reports after the ok
/// join reply (the reply itself still echoes the entry).
pub fn parse_entry(entry: &Map<String, Value>) -> (u32, Result<Binding, BindingError>) {
    let id = binding_id(&Value::Object(entry.clone()));
    let mut echo = entry.clone();
    echo.insert("id".to_string(), Value::from(id));
    let schema = entry.get("schema").and_then(Value::as_str);
    let table = entry.get("table").and_then(Value::as_str);
    let (schema, table) = match (schema, table) {
        (None, None) => return (id, Err(BindingError::NoParams)),
        (Some(schema), None) => (schema.to_string(), "*".to_string()),
        (None, Some(table)) => ("public".to_string(), table.to_string()),
        (Some(schema), Some(table)) => (schema.to_string(), table.to_string()),
    };
    let filter = match entry.get("filter").and_then(Value::as_str) {
        Some(text) if !text.trim().is_empty() => match parse_filter(text) {
            Ok(filter) => Some(filter),
            Err(error) => return (id, Err(error)),
        },
        _ => None,
    };
    let binding = Binding {
        id,
        echo: Value::Object(echo),
        event: EventFilter::parse(entry.get("event")),
        schema,
        table,
        filter,
    };
    (id, Ok(binding))
}

/// Parses `column=op.value`. Only `eq neq lt lte gt gte in`, the operators every server
/// version accepts, are supported.
// NOTE: servers from 2026-06 also accept like/ilike/is/match/imatch/isdistinct, `not.` and
// comma-joined filters; the emulator reports those as parse errors.
pub fn parse_filter(text: &str) -> Result<Filter, BindingError> {
    let parts_error = || {
        let parts: Vec<String> = text
            .splitn(2, '=')
            .flat_map(|p| p.splitn(2, '.'))
            .map(|p| format!("{p:?}"))
            .collect();
        BindingError::BadFilter(format!("[{}]", parts.join(", ")))
    };
    let (column, rest) = text.split_once('=').ok_or_else(parts_error)?;
    let (operator, value) = rest.split_once('.').ok_or_else(parts_error)?;
    let operator = match operator {
        "eq" => Operator::Eq,
        "neq" => Operator::Neq,
        "lt" => Operator::Lt,
        "lte" => Operator::Lte,
        "gt" => Operator::Gt,
        "gte" => Operator::Gte,
        "in" => Operator::In,
        _ => return Err(parts_error()),
    };
    let values = if operator == Operator::In {
        let inner = value
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(parts_error)?;
        let values: Vec<String> = inner
            .split(',')
            .map(|v| v.trim().trim_matches('"').to_string())
            .collect();
        if values.len() > 100 {
            return Err(parts_error());
        }
        values
    } else {
        vec![value.to_string()]
    };
    if column.is_empty() {
        return Err(parts_error());
    }
    Ok(Filter {
        column: column.to_string(),
        operator,
        values,
    })
}

impl Binding {
    /// Tells whether a change of `change_type` on `schema.table` whose row is `row` (the new
    /// row, or the old row for DELETE) matches this binding.
    pub fn matches(&self, change_type: &str, schema: &str, table: &str, row: &Value) -> bool {
        if !self.event.matches(change_type) {
            return false;
        }
        if self.schema != "*" && self.schema != schema {
            return false;
        }
        if self.table != "*" && self.table != table {
            return false;
        }
        match &self.filter {
            None => true,
            Some(filter) => filter.matches(row),
        }
    }

    /// Describes the binding as the real server's "Unable to subscribe" message does, e.g.
    /// `[event: INSERT, schema: public, table: jobs, filters: [], select: nil]`.
    pub fn describe(&self) -> String {
        let filters = match &self.filter {
            None => "[]".to_string(),
            Some(filter) => format!(
                "[{{{:?}, {:?}, {:?}}}]",
                filter.column,
                format!("{:?}", filter.operator).to_ascii_lowercase(),
                filter.values.join(",")
            ),
        };
        format!(
            "[event: {}, schema: {}, table: {}, filters: {}, select: nil]",
            self.event.label(),
            self.schema,
            self.table,
            filters
        )
    }
}

impl Filter {
    /// Evaluates the filter against a row given as a JSON object. A missing column or a
    /// NULL value never matches, as in SQL.
    // NOTE: the real server casts the filter value to the column type in SQL. Here numbers
    // compare numerically and everything else compares as text, which is the same for
    // integers, text, booleans and ISO timestamps written in the same form.
    pub fn matches(&self, row: &Value) -> bool {
        let Some(value) = row.get(&self.column) else {
            return false;
        };
        if value.is_null() {
            return false;
        }
        match self.operator {
            Operator::In => self
                .values
                .iter()
                .any(|v| compare(value, v) == Some(std::cmp::Ordering::Equal)),
            operator => {
                let Some(ordering) = compare(value, &self.values[0]) else {
                    return operator == Operator::Neq;
                };
                match operator {
                    Operator::Eq => ordering.is_eq(),
                    Operator::Neq => ordering.is_ne(),
                    Operator::Lt => ordering.is_lt(),
                    Operator::Lte => ordering.is_le(),
                    Operator::Gt => ordering.is_gt(),
                    Operator::Gte => ordering.is_ge(),
                    Operator::In => unreachable!("handled above"),
                }
            }
        }
    }
}

fn compare(value: &Value, filter_value: &str) -> Option<std::cmp::Ordering> {
    match value {
        Value::Number(n) => {
            if let (Some(a), Ok(b)) = (n.as_i64(), filter_value.parse::<i64>()) {
                return Some(a.cmp(&b));
            }
            let b: f64 = filter_value.parse().ok()?;
            n.as_f64()?.partial_cmp(&b)
        }
        Value::String(s) => Some(s.as_str().cmp(filter_value)),
        Value::Bool(b) => Some(b.to_string().as_str().cmp(filter_value)),
        other => Some(other.to_string().as_str().cmp(filter_value)),
    }
}

/// Computes the id of a binding entry: FNV-1a over a canonical (key-sorted) rendering,
/// cut to 27 bits. The real server uses Erlang's `phash2`, which cannot be reproduced
/// here; clients must treat ids as opaque either way.
pub fn binding_id(entry: &Value) -> u32 {
    let mut canonical = String::new();
    write_canonical(entry, &mut canonical);
    let mut hash: u32 = 0x811c_9dc5;
    for byte in canonical.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash & ((1 << 27) - 1)
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for key in keys {
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
                out.push(',');
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for item in items {
                write_canonical(item, out);
                out.push(',');
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = json!({"event": "INSERT", "schema": "public", "table": "jobs"});
        let b = json!({"table": "jobs", "schema": "public", "event": "INSERT"});
        let c = json!({"event": "UPDATE", "schema": "public", "table": "jobs"});
        assert_eq!(binding_id(&a), binding_id(&b));
        assert_ne!(binding_id(&a), binding_id(&c));
        assert!(binding_id(&a) < 1 << 27);
    }

    #[test]
    fn unknown_event_means_all() {
        let (_, binding) = parse_entry(&entry(json!({"event": "bogus", "table": "jobs"})));
        let binding = binding.unwrap();
        assert_eq!(binding.event, EventFilter::All);
        assert_eq!(binding.schema, "public");
    }

    #[test]
    fn filters_match_rows() {
        let row = json!({"id": 5, "status": "pending", "n": null});
        let cases = [
            ("status=eq.pending", true),
            ("status=neq.pending", false),
            ("id=gt.4", true),
            ("id=lt.5", false),
            ("id=lte.5", true),
            ("id=gte.6", false),
            ("id=in.(1,5,7)", true),
            ("status=in.(running,failed)", false),
            ("n=eq.null", false),
            ("missing=eq.1", false),
        ];
        for (text, expected) in cases {
            let filter = parse_filter(text).unwrap();
            assert_eq!(filter.matches(&row), expected, "filter {text}");
        }
    }

    #[test]
    fn bad_filters_are_rejected() {
        assert!(parse_filter("status").is_err());
        assert!(parse_filter("status=like.x").is_err());
        assert!(parse_filter("id=in.1,2").is_err());
        let (_, result) = parse_entry(&entry(json!({"event": "*"})));
        assert_eq!(result.unwrap_err(), BindingError::NoParams);
    }
}
