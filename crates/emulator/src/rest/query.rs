//! Parsing of the PostgREST URL grammar subset (filters, `or`/`and`, `select`, `order`,
//! `limit`, `offset`) and of the `Prefer` and `Range` headers.

use percent_encoding::percent_decode_str;

use super::error::ApiError;

/// Decodes a query string the way PostgREST does: `+` becomes a space, then percent-escapes
/// are decoded. Pairs keep their order.
pub fn decode_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(key), decode_component(value))
        })
        .collect()
}

fn decode_component(text: &str) -> String {
    let spaced = text.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// A comparison operator of the URL grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    Like,
    Ilike,
    In(Vec<String>),
    Is(IsValue),
}

/// The operand of `is`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsValue {
    Null,
    NotNull,
    True,
    False,
    Unknown,
}

/// One `column=[not.]op.value` filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub column: String,
    pub negated: bool,
    pub operator: Operator,
    pub value: String,
}

/// A filter tree: plain filters are ANDed at the top; `or=(…)` and `and=(…)` nest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Filter(Filter),
    Or {
        negated: bool,
        items: Vec<Condition>,
    },
    And {
        negated: bool,
        items: Vec<Condition>,
    },
}

/// One `select=` item: `column`, `alias:column` or `column::type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectItem {
    pub column: String,
    pub alias: Option<String>,
    pub cast: Option<String>,
}

/// One `order=` term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderTerm {
    pub column: String,
    pub descending: bool,
    pub nulls_first: Option<bool>,
}

/// The parsed query string of one request.
#[derive(Debug, Clone, Default)]
pub struct QueryParts {
    /// `None` means `*`.
    pub select: Option<Vec<SelectItem>>,
    pub conditions: Vec<Condition>,
    pub order: Vec<OrderTerm>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// Query parameters that are not filters. `apikey` is consumed by the gateway.
const RESERVED: [&str; 6] = ["select", "order", "limit", "offset", "columns", "apikey"];

pub fn parse_query(pairs: &[(String, String)]) -> Result<QueryParts, ApiError> {
    let mut parts = QueryParts::default();
    for (key, value) in pairs {
        match key.as_str() {
            "select" => parts.select = parse_select(value)?,
            "order" => parts.order = parse_order(value)?,
            "limit" => parts.limit = Some(parse_count("limit", value)?),
            "offset" => parts.offset = Some(parse_count("offset", value)?),
            "or" | "and" | "not.or" | "not.and" => {
                parts.conditions.push(parse_logic(key, value)?);
            }
            _ if RESERVED.contains(&key.as_str()) => {}
            _ => parts
                .conditions
                .push(Condition::Filter(parse_filter(key, value)?)),
        }
    }
    Ok(parts)
}

fn parse_count(name: &str, value: &str) -> Result<i64, ApiError> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            ApiError::parse(format!(
                "\"failed to parse {name} ({value})\" (line 1, column 1)"
            ))
        })
}

fn filter_error(text: &str) -> ApiError {
    // NOTE: PostgREST reports the parser's column position; this always says column 1.
    ApiError::parse(format!(
        "\"failed to parse filter ({text})\" (line 1, column 1)"
    ))
    .details("unexpected input")
}

/// Parses `[not.]op.value` for `column`.
pub fn parse_filter(column: &str, text: &str) -> Result<Filter, ApiError> {
    let (negated, rest) = match text.strip_prefix("not.") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (op, value) = rest.split_once('.').ok_or_else(|| filter_error(text))?;
    let operator = match op {
        "eq" => Operator::Eq,
        "neq" => Operator::Neq,
        "gt" => Operator::Gt,
        "gte" => Operator::Gte,
        "lt" => Operator::Lt,
        "lte" => Operator::Lte,
        "like" => Operator::Like,
        "ilike" => Operator::Ilike,
        "in" => Operator::In(parse_list(value).ok_or_else(|| filter_error(text))?),
        "is" => Operator::Is(match value.to_ascii_lowercase().as_str() {
            "null" => IsValue::Null,
            "not_null" => IsValue::NotNull,
            "true" => IsValue::True,
            "false" => IsValue::False,
            "unknown" => IsValue::Unknown,
            _ => return Err(filter_error(text)),
        }),
        _ => return Err(filter_error(text)),
    };
    Ok(Filter {
        column: column.trim().to_string(),
        negated,
        operator,
        value: value.to_string(),
    })
}

/// Parses `(a,"b,c",d)` into its items. Double quotes protect reserved characters and
/// `\` escapes the next character inside quotes.
fn parse_list(text: &str) -> Option<Vec<String>> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    split_top_level(inner)
        .into_iter()
        .map(|item| Some(unquote(&item)))
        .collect()
}

fn unquote(item: &str) -> String {
    let trimmed = item.trim();
    let Some(body) = trimmed.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
        return trimmed.to_string();
    };
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits on commas outside parentheses and double quotes.
fn split_top_level(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut in_quotes = false;
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            current.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quotes => {
                escaped = true;
                current.push(c);
            }
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            '(' if !in_quotes => {
                depth += 1;
                current.push(c);
            }
            ')' if !in_quotes => {
                depth = depth.saturating_sub(1);
                current.push(c);
            }
            ',' if !in_quotes && depth == 0 => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    items.push(current);
    items
}

/// Parses `or=(a.eq.1,and(b.gt.2,c.is.null))` and friends.
fn parse_logic(key: &str, value: &str) -> Result<Condition, ApiError> {
    let (negated, name) = match key.strip_prefix("not.") {
        Some(name) => (true, name),
        None => (false, key),
    };
    let inner = value
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| filter_error(value))?;
    let mut items = Vec::new();
    for item in split_top_level(inner) {
        let item = item.trim();
        let nested = ["or(", "and(", "not.or(", "not.and("]
            .iter()
            .find(|prefix| item.starts_with(*prefix));
        if let Some(prefix) = nested {
            let name_len = prefix.len() - 1;
            items.push(parse_logic(&item[..name_len], &item[name_len..])?);
        } else {
            let (column, rest) = item.split_once('.').ok_or_else(|| filter_error(item))?;
            items.push(Condition::Filter(parse_filter(column, rest)?));
        }
    }
    Ok(match name {
        "or" => Condition::Or { negated, items },
        _ => Condition::And { negated, items },
    })
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == ' ' || c == '$')
}

fn parse_select(text: &str) -> Result<Option<Vec<SelectItem>>, ApiError> {
    let text = text.trim();
    if text.is_empty() || text == "*" {
        return Ok(None);
    }
    let mut items = Vec::new();
    for raw in split_top_level(text) {
        let raw = raw.trim();
        if raw == "*" {
            return Ok(None);
        }
        let (alias, rest) = match raw.split_once(':') {
            Some((alias, rest)) if !rest.starts_with(':') => (Some(alias.trim().to_string()), rest),
            _ => (None, raw),
        };
        let (column, cast) = match rest.split_once("::") {
            Some((column, cast)) => (column.trim(), Some(cast.trim().to_string())),
            None => (rest.trim(), None),
        };
        let valid = is_identifier(column)
            && alias.as_deref().is_none_or(is_identifier)
            && cast.as_deref().is_none_or(is_identifier);
        if !valid {
            // NOTE: embedded resources (`other_table(...)`) and JSON paths are not supported.
            return Err(ApiError::parse(format!(
                "\"failed to parse select parameter ({text})\" (line 1, column 1)"
            )));
        }
        items.push(SelectItem {
            column: column.to_string(),
            alias,
            cast,
        });
    }
    Ok(Some(items))
}

fn parse_order(text: &str) -> Result<Vec<OrderTerm>, ApiError> {
    let mut terms = Vec::new();
    for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let mut pieces = raw.split('.');
        let column = pieces.next().unwrap_or_default().to_string();
        let mut term = OrderTerm {
            column,
            descending: false,
            nulls_first: None,
        };
        for modifier in pieces {
            match modifier {
                "asc" => term.descending = false,
                "desc" => term.descending = true,
                "nullsfirst" => term.nulls_first = Some(true),
                "nullslast" => term.nulls_first = Some(false),
                _ => {
                    return Err(ApiError::parse(format!(
                        "\"failed to parse order ({text})\" (line 1, column 1)"
                    )))
                }
            }
        }
        terms.push(term);
    }
    Ok(terms)
}

/// `Prefer` header values the emulator understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preferences {
    /// `Some(true)` for `return=representation`, `Some(false)` for `return=minimal`.
    pub representation: Option<bool>,
    pub count_exact: bool,
    pub strict: bool,
    pub max_affected: Option<i64>,
    /// Preferences that are not recognised; an error under `handling=strict`.
    pub invalid: Vec<String>,
}

/// Parses every `Prefer` header value (comma separated).
pub fn parse_prefer<'a>(values: impl Iterator<Item = &'a str>) -> Preferences {
    let mut prefs = Preferences::default();
    for token in values.flat_map(|v| v.split(',')).map(str::trim) {
        if token.is_empty() {
            continue;
        }
        match token.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
            Some(("return", "representation")) => prefs.representation = Some(true),
            Some(("return", "minimal")) => prefs.representation = Some(false),
            Some(("return", "headers-only")) => prefs.representation = Some(false),
            Some(("count", "exact")) => prefs.count_exact = true,
            // Planned and estimated counts are not emulated; they are accepted and ignored.
            Some(("count", "planned" | "estimated")) => {}
            Some(("handling", "strict")) => prefs.strict = true,
            Some(("handling", "lenient")) => prefs.strict = false,
            Some(("max-affected", n)) if n.parse::<i64>().is_ok() => {
                prefs.max_affected = n.parse().ok();
            }
            // Known preferences without an effect here. `tx=rollback` is dropped, as with
            // PostgREST's default `db-tx-end = commit`.
            Some(("tx", "commit" | "rollback"))
            | Some(("missing", "default" | "null"))
            | Some(("resolution", "merge-duplicates" | "ignore-duplicates"))
            | Some(("timezone", _)) => {}
            _ => prefs.invalid.push(token.to_string()),
        }
    }
    prefs
}

/// Parses a `Range: [items=]a-b` or `a-` header into an inclusive (first, last) pair.
pub fn parse_range(value: &str) -> Option<(i64, Option<i64>)> {
    let value = value.trim();
    let value = value.strip_prefix("items=").unwrap_or(value);
    let (first, last) = value.split_once('-')?;
    let first = first.trim().parse::<i64>().ok()?;
    let last = match last.trim() {
        "" => None,
        text => Some(text.parse::<i64>().ok()?),
    };
    Some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_decodes_to_space() {
        let pairs = decode_query("created_at=lt.2026-01-02T03:04:05+00:00&x=%2B1");
        assert_eq!(pairs[0].1, "lt.2026-01-02T03:04:05 00:00");
        assert_eq!(pairs[1].1, "+1");
    }

    #[test]
    fn in_list_with_quotes() {
        let filter = parse_filter("status", "in.(pending,\"a,b\",\"c\\\"d\")").unwrap();
        assert_eq!(
            filter.operator,
            Operator::In(vec!["pending".into(), "a,b".into(), "c\"d".into()])
        );
    }

    #[test]
    fn nested_or_parses() {
        let condition = parse_logic("or", "(status.eq.a,and(id.gt.1,log.is.null))").unwrap();
        let Condition::Or { items, negated } = condition else {
            panic!("expected or");
        };
        assert!(!negated);
        assert_eq!(items.len(), 2);
        assert!(matches!(items[1], Condition::And { .. }));
    }

    #[test]
    fn prefer_collects_unknown() {
        let prefs = parse_prefer(["return=representation, handling=strict", "foo"].into_iter());
        assert_eq!(prefs.representation, Some(true));
        assert!(prefs.strict);
        assert_eq!(prefs.invalid, vec!["foo".to_string()]);
    }
}
