//! The action table: which program a job's `action` runs, with which arguments taken from
//! its `payload`, and under which limits. The table is TOML; the built-in one ships as
//! `actions.toml` in this crate and another project supplies its own file of the same format.
//!
//! Payload validation happens here, before anything is spawned, so a rejected payload never
//! reaches a child process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// The built-in table for the lead pipeline.
pub const BUILTIN_ACTIONS: &str = include_str!("../actions.toml");

/// Upper bound of a `string` field when the table sets no `max_length`.
const DEFAULT_MAX_STRING_LENGTH: usize = 10_000;

/// Shortest and longest `timeout` an action may declare.
const MIN_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Time-out of an action that declares none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// A problem in an action table file; the message names the action and the key.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("action table {source_name} cannot be read: {message}")]
    Unreadable {
        source_name: String,
        message: String,
    },
    #[error("action table {source_name} is not valid TOML: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    #[error("action table {source_name}: action `{action}`: {message}")]
    Invalid {
        source_name: String,
        action: String,
        message: String,
    },
    #[error("action table {source_name} defines no actions; add at least one [actions.NAME]")]
    Empty { source_name: String },
}

/// The reason a job's payload was rejected. The message names the field, the offending value
/// (shortened) and the rule, so it can be stored in the job's `error` as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload must be a JSON object, got {found}")]
    NotAnObject { found: String },
    #[error("payload field `{field}` is required ({rule})")]
    Missing { field: String, rule: String },
    #[error("payload field `{field}` has invalid value {value}: {rule}")]
    Invalid {
        field: String,
        value: String,
        rule: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    #[serde(default)]
    actions: BTreeMap<String, RawAction>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    program: String,
    script: Option<String>,
    #[serde(default)]
    args: Vec<RawArg>,
    #[serde(default)]
    fields: BTreeMap<String, FieldSpec>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    require_env: Vec<String>,
    timeout: Option<String>,
    concurrency: Option<usize>,
    #[serde(default)]
    safe_to_retry: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawArg {
    Literal(String),
    Field(RawFieldArg),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFieldArg {
    field: String,
    option: Option<String>,
    flag: Option<String>,
}

/// The type and limits of one payload field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub kind: FieldKind,
    #[serde(default)]
    pub required: bool,
    pub default: Option<toml::Value>,
    pub max_length: Option<usize>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// Payload field types an action table can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    String,
    Integer,
    Number,
    Boolean,
    FileName,
}

/// One argument of an action's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgSpec {
    Literal(String),
    /// `--opt=<value>` as a single argument.
    Option {
        field: String,
        option: String,
    },
    /// `--opt` when the boolean field is true.
    Flag {
        field: String,
        flag: String,
    },
    /// The value itself as a positional argument.
    Positional {
        field: String,
    },
}

/// A validated action.
#[derive(Debug, Clone)]
pub struct Action {
    pub name: String,
    pub program: String,
    pub script: Option<String>,
    pub args: Vec<ArgSpec>,
    pub fields: BTreeMap<String, FieldSpec>,
    pub env: Vec<String>,
    pub require_env: Vec<String>,
    pub timeout: Duration,
    pub concurrency: Option<usize>,
    pub safe_to_retry: bool,
}

/// The command line a job runs, before the runner resolves the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// All actions, by name.
#[derive(Debug, Clone)]
pub struct ActionTable {
    pub source_name: String,
    actions: BTreeMap<String, Action>,
}

impl ActionTable {
    /// Parses the built-in table.
    pub fn builtin() -> ActionTable {
        ActionTable::parse(BUILTIN_ACTIONS, "built-in actions.toml")
            .expect("the built-in action table is valid; a test checks it")
    }

    /// Reads and parses a table file.
    pub fn load(path: &Path) -> Result<ActionTable, TableError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TableError::Unreadable {
            source_name: source_name.clone(),
            message: e.to_string(),
        })?;
        ActionTable::parse(&text, &source_name)
    }

    /// Parses and validates a table. `source_name` names the table in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<ActionTable, TableError> {
        let file: TableFile = toml::from_str(text).map_err(|e| TableError::Syntax {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        if file.actions.is_empty() {
            return Err(TableError::Empty {
                source_name: source_name.to_string(),
            });
        }
        let mut actions = BTreeMap::new();
        for (name, raw) in file.actions {
            let action = validate_action(&name, raw).map_err(|message| TableError::Invalid {
                source_name: source_name.to_string(),
                action: name.clone(),
                message,
            })?;
            actions.insert(name, action);
        }
        Ok(ActionTable {
            source_name: source_name.to_string(),
            actions,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Action> {
        self.actions.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.actions.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Action> {
        self.actions.values()
    }

    /// Returns the maximum time-out of all actions: the rescuer's bound for jobs of unknown actions.
    pub fn max_timeout(&self) -> Duration {
        self.actions
            .values()
            .map(|a| a.timeout)
            .max()
            .unwrap_or(DEFAULT_TIMEOUT)
    }
}

fn validate_action(name: &str, raw: RawAction) -> Result<Action, String> {
    if name.is_empty() {
        return Err("the action name is empty".into());
    }
    if raw.program.trim().is_empty() {
        return Err("`program` is empty; set it to an executable such as \"python\"".into());
    }
    for (field, spec) in &raw.fields {
        validate_field_spec(field, spec)?;
    }
    let mut args = Vec::with_capacity(raw.args.len());
    for raw_arg in raw.args {
        args.push(validate_arg(raw_arg, &raw.fields)?);
    }
    for var in raw.env.iter().chain(raw.require_env.iter()) {
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            return Err(format!(
                "environment variable name {var:?} is invalid; use a plain name such as TWILIO_FROM"
            ));
        }
    }
    let timeout = match raw.timeout {
        None => DEFAULT_TIMEOUT,
        Some(text) => {
            let timeout = humantime::parse_duration(&text).map_err(|e| {
                format!(
                    "`timeout` {text:?} is invalid ({e}); write it like \"90s\", \"30m\" or \"4h\""
                )
            })?;
            if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
                return Err(format!(
                    "`timeout` {text:?} is out of range; use between 1s and 7 days"
                ));
            }
            timeout
        }
    };
    if raw.concurrency == Some(0) {
        return Err("`concurrency` is 0, so no job could ever run; use 1 or more".into());
    }
    Ok(Action {
        name: name.to_string(),
        program: raw.program,
        script: raw.script,
        args,
        fields: raw.fields,
        env: raw.env,
        require_env: raw.require_env,
        timeout,
        concurrency: raw.concurrency,
        safe_to_retry: raw.safe_to_retry,
    })
}

fn validate_field_spec(field: &str, spec: &FieldSpec) -> Result<(), String> {
    if let (Some(min), Some(max)) = (spec.min, spec.max) {
        if min > max {
            return Err(format!(
                "field `{field}`: min {min} is greater than max {max}"
            ));
        }
    }
    if let Some(default) = &spec.default {
        let json = serde_json::to_value(default)
            .map_err(|e| format!("field `{field}`: default cannot be read: {e}"))?;
        check_value(field, spec, &json).map_err(|e| format!("default is invalid: {e}"))?;
    }
    Ok(())
}

fn validate_arg(raw: RawArg, fields: &BTreeMap<String, FieldSpec>) -> Result<ArgSpec, String> {
    let arg = match raw {
        RawArg::Literal(text) => return Ok(ArgSpec::Literal(text)),
        RawArg::Field(arg) => arg,
    };
    let Some(spec) = fields.get(&arg.field) else {
        return Err(format!(
            "argument uses field `{}` but [fields.{}] is not declared",
            arg.field, arg.field
        ));
    };
    match (arg.option, arg.flag) {
        (Some(_), Some(_)) => Err(format!(
            "argument for field `{}` sets both `option` and `flag`; keep one",
            arg.field
        )),
        (Some(option), None) => {
            check_option_name(&option)?;
            Ok(ArgSpec::Option {
                field: arg.field,
                option,
            })
        }
        (None, Some(flag)) => {
            check_option_name(&flag)?;
            if spec.kind != FieldKind::Boolean {
                return Err(format!(
                    "`flag` needs a boolean field, but `{}` is {:?}",
                    arg.field, spec.kind
                ));
            }
            Ok(ArgSpec::Flag {
                field: arg.field,
                flag,
            })
        }
        (None, None) => {
            if spec.kind == FieldKind::Boolean {
                return Err(format!(
                    "boolean field `{}` can only be passed with `flag`",
                    arg.field
                ));
            }
            Ok(ArgSpec::Positional { field: arg.field })
        }
    }
}

fn check_option_name(option: &str) -> Result<(), String> {
    let valid = option.starts_with('-')
        && option.len() > 1
        && !option.contains('=')
        && !option.chars().any(char::is_whitespace);
    if valid {
        Ok(())
    } else {
        Err(format!(
            "option name {option:?} is invalid; write it like \"--company\""
        ))
    }
}

impl Action {
    /// Validates `payload` and builds the command line. Nothing is spawned here; a payload
    /// error means nothing may be.
    pub fn invocation(&self, payload: &Value) -> Result<Invocation, PayloadError> {
        let values = self.resolve_fields(payload)?;
        let mut args = Vec::new();
        if let Some(script) = &self.script {
            args.push(script.clone());
        }
        for arg in &self.args {
            match arg {
                ArgSpec::Literal(text) => args.push(text.clone()),
                ArgSpec::Option { field, option } => {
                    if let Some(value) = values.get(field) {
                        args.push(format!("{option}={}", render_value(value)));
                    }
                }
                ArgSpec::Flag { field, flag } => {
                    if values.get(field) == Some(&Value::Bool(true)) {
                        args.push(flag.clone());
                    }
                }
                ArgSpec::Positional { field } => {
                    if let Some(value) = values.get(field) {
                        args.push(render_value(value));
                    }
                }
            }
        }
        Ok(Invocation {
            program: PathBuf::from(&self.program),
            args,
        })
    }

    /// Applies defaults and checks every declared field. Returns the normalised values of
    /// the fields that are present.
    fn resolve_fields(&self, payload: &Value) -> Result<BTreeMap<String, Value>, PayloadError> {
        let empty = serde_json::Map::new();
        let object = match payload {
            Value::Object(map) => map,
            Value::Null => &empty,
            other => {
                return Err(PayloadError::NotAnObject {
                    found: shorten(&other.to_string()),
                })
            }
        };
        let mut values = BTreeMap::new();
        for (field, spec) in &self.fields {
            let raw = match object.get(field) {
                Some(Value::Null) | None => None,
                Some(value) => Some(value.clone()),
            };
            let value = match raw {
                Some(value) => value,
                None => match &spec.default {
                    Some(default) => serde_json::to_value(default).unwrap_or(Value::Null),
                    None if spec.required => {
                        return Err(PayloadError::Missing {
                            field: field.clone(),
                            rule: describe_rule(spec),
                        })
                    }
                    None => continue,
                },
            };
            let normalised = check_value(field, spec, &value)?;
            values.insert(field.clone(), normalised);
        }
        Ok(values)
    }
}

/// Checks one value against its field spec and returns it normalised (strings that stand
/// for booleans or numbers become JSON booleans or numbers).
///
/// HTML forms send everything as text, so `"true"`/`"false"` are accepted for a boolean and
/// a decimal string such as `"5"` or `"1.5"` for a number. Anything else of the wrong type
/// is rejected; nothing is guessed.
fn check_value(field: &str, spec: &FieldSpec, value: &Value) -> Result<Value, PayloadError> {
    let invalid = |rule: String| PayloadError::Invalid {
        field: field.to_string(),
        value: shorten(&value.to_string()),
        rule,
    };
    match spec.kind {
        FieldKind::Boolean => match value {
            Value::Bool(b) => Ok(Value::Bool(*b)),
            Value::String(s) if s == "true" => Ok(Value::Bool(true)),
            Value::String(s) if s == "false" => Ok(Value::Bool(false)),
            _ => Err(invalid("must be true or false".into())),
        },
        FieldKind::Integer | FieldKind::Number => {
            let number = match value {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => parse_decimal(s),
                _ => None,
            };
            let Some(number) = number.filter(|n| n.is_finite()) else {
                return Err(invalid(describe_rule(spec)));
            };
            if spec.kind == FieldKind::Integer && number.fract() != 0.0 {
                return Err(invalid(describe_rule(spec)));
            }
            if spec.min.is_some_and(|min| number < min) || spec.max.is_some_and(|max| number > max)
            {
                return Err(invalid(describe_rule(spec)));
            }
            let normalised = match value {
                Value::String(s) => serde_json::from_str::<serde_json::Number>(s.trim())
                    .map(Value::Number)
                    .map_err(|_| invalid(describe_rule(spec)))?,
                other => other.clone(),
            };
            Ok(normalised)
        }
        FieldKind::String => {
            let Value::String(text) = value else {
                return Err(invalid(describe_rule(spec)));
            };
            let max = spec.max_length.unwrap_or(DEFAULT_MAX_STRING_LENGTH);
            if text.trim().is_empty() || text.chars().count() > max || text.contains('\0') {
                return Err(invalid(describe_rule(spec)));
            }
            Ok(value.clone())
        }
        FieldKind::FileName => {
            let Value::String(name) = value else {
                return Err(invalid(describe_rule(spec)));
            };
            check_file_name(name).map_err(invalid)?;
            Ok(value.clone())
        }
    }
}

/// Checks for a plain file name inside the scripts directory: no separators, no `..`, no
/// leading `-` (it would read as an option), no control characters.
fn check_file_name(name: &str) -> Result<(), String> {
    let rule = "must be a plain file name inside the scripts directory \
                (no '/', '\\', '..', leading '-' or control characters)";
    let bad = name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.starts_with('-')
        || name.contains('/')
        || name.contains('\\')
        || name.chars().any(char::is_control);
    if bad {
        Err(rule.to_string())
    } else {
        Ok(())
    }
}

fn parse_decimal(text: &str) -> Option<f64> {
    let trimmed = text.trim();
    let plain = !trimmed.is_empty()
        && trimmed
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '-' || c == '+');
    if plain {
        trimmed.parse().ok()
    } else {
        None
    }
}

fn describe_rule(spec: &FieldSpec) -> String {
    match spec.kind {
        FieldKind::Boolean => "must be true or false".into(),
        FieldKind::String => format!(
            "must be a non-empty string of at most {} characters without NUL",
            spec.max_length.unwrap_or(DEFAULT_MAX_STRING_LENGTH)
        ),
        FieldKind::FileName => "must be a plain file name inside the scripts directory".into(),
        FieldKind::Integer | FieldKind::Number => {
            let kind = if spec.kind == FieldKind::Integer {
                "an integer"
            } else {
                "a number"
            };
            match (spec.min, spec.max) {
                (Some(min), Some(max)) => format!("must be {kind} from {min} to {max}"),
                (Some(min), None) => format!("must be {kind} of at least {min}"),
                (None, Some(max)) => format!("must be {kind} of at most {max}"),
                (None, None) => format!("must be {kind}"),
            }
        }
    }
}

fn render_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Shortens a value for an error message: at most 80 characters, cut on a character
/// boundary.
pub fn shorten(text: &str) -> String {
    const MAX: usize = 80;
    if text.chars().count() <= MAX {
        return text.to_string();
    }
    let head: String = text.chars().take(MAX).collect();
    format!("{head}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn argv(action: &str, payload: Value) -> Result<Vec<String>, PayloadError> {
        let table = ActionTable::builtin();
        let invocation = table.get(action).unwrap().invocation(&payload)?;
        let mut argv = vec![invocation.program.display().to_string()];
        argv.extend(invocation.args);
        Ok(argv)
    }

    #[test]
    fn builtin_table_parses() {
        let table = ActionTable::builtin();
        let names: Vec<&str> = table.names().collect();
        assert_eq!(
            names,
            [
                "build_sms_list",
                "parse_quality_leads",
                "run_cbc",
                "send_campaign",
                "send_campaign_dry_run"
            ]
        );
        assert!(!table.get("send_campaign").unwrap().safe_to_retry);
        assert_eq!(table.get("send_campaign").unwrap().concurrency, Some(1));
    }

    #[test]
    fn build_sms_list_argv() {
        assert_eq!(
            argv("build_sms_list", json!({})).unwrap(),
            ["python", "scripts/build_sms_list.py"]
        );
        assert_eq!(
            argv(
                "build_sms_list",
                json!({"include_unknown_phone_type": true})
            )
            .unwrap(),
            [
                "python",
                "scripts/build_sms_list.py",
                "--include-unknown-phone-type"
            ]
        );
        assert_eq!(
            argv(
                "build_sms_list",
                json!({"include_unknown_phone_type": "false"})
            )
            .unwrap(),
            ["python", "scripts/build_sms_list.py"]
        );
    }

    #[test]
    fn parse_quality_leads_argv() {
        assert_eq!(
            argv("parse_quality_leads", json!({"ignored": 1})).unwrap(),
            ["python", "parse_quality_leads.py"]
        );
    }

    #[test]
    fn run_cbc_argv_and_default() {
        assert_eq!(
            argv("run_cbc", json!({})).unwrap(),
            ["./run_cbc_only.sh", "propwire_addresses.csv"]
        );
        assert_eq!(
            argv("run_cbc", json!({"addresses_csv_name": "march.csv"})).unwrap(),
            ["./run_cbc_only.sh", "march.csv"]
        );
    }

    #[test]
    fn send_campaign_argv() {
        let payload = json!({
            "company_name": "Acme Homes",
            "message_template": "Hi {first_name}",
            "sms_delay_sec": 2
        });
        assert_eq!(
            argv("send_campaign_dry_run", payload.clone()).unwrap(),
            [
                "python",
                "scripts/send_campaign.py",
                "--dry-run",
                "--company=Acme Homes",
                "--message=Hi {first_name}",
                "--delay=2"
            ]
        );
        assert_eq!(argv("send_campaign", payload).unwrap()[2], "--send");
    }

    #[test]
    fn hostile_message_stays_one_argument() {
        let message = "--send; $(rm -rf /) \"quoted\"\nnext line";
        let args = argv(
            "send_campaign_dry_run",
            json!({"company_name": "A", "message_template": message}),
        )
        .unwrap();
        assert_eq!(args[4], format!("--message={message}"));
        assert_eq!(args.len(), 6);
        assert!(!args.contains(&"--send".to_string()));
    }

    #[test]
    fn file_name_rules() {
        for bad in [
            "../secrets.csv",
            "/etc/passwd",
            "a/b.csv",
            "-rf",
            "..",
            "a\\b",
        ] {
            let err = argv("run_cbc", json!({"addresses_csv_name": bad})).unwrap_err();
            assert!(
                matches!(err, PayloadError::Invalid { ref field, .. } if field == "addresses_csv_name"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn payload_type_errors() {
        let err = argv(
            "send_campaign_dry_run",
            json!({"company_name": "A", "message_template": "m", "sms_delay_sec": "soon"}),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "payload field `sms_delay_sec` has invalid value \"soon\": must be a number from 0 to 3600"
        );
        let err = argv(
            "send_campaign_dry_run",
            json!({"company_name": "A", "message_template": "m", "sms_delay_sec": -1}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("from 0 to 3600"), "{err}");
        let err = argv("send_campaign_dry_run", json!({"company_name": "A"})).unwrap_err();
        assert!(
            matches!(err, PayloadError::Missing { ref field, .. } if field == "message_template")
        );
        let err = argv("build_sms_list", json!({"include_unknown_phone_type": 1})).unwrap_err();
        assert!(err.to_string().contains("true or false"), "{err}");
        let err = argv("build_sms_list", json!([1, 2])).unwrap_err();
        assert!(matches!(err, PayloadError::NotAnObject { .. }));
        let err = argv(
            "send_campaign_dry_run",
            json!({"company_name": "   ", "message_template": "m"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("non-empty"), "{err}");
    }

    #[test]
    fn numeric_strings_are_accepted() {
        let args = argv(
            "send_campaign_dry_run",
            json!({"company_name": "A", "message_template": "m", "sms_delay_sec": "5"}),
        )
        .unwrap();
        assert_eq!(args[5], "--delay=5");
    }

    #[test]
    fn long_values_are_shortened_in_errors() {
        let long = "x".repeat(5000);
        let err = argv(
            "send_campaign_dry_run",
            json!({"company_name": long, "message_template": "m"}),
        )
        .unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }

    #[test]
    fn table_errors_name_the_problem() {
        let err = ActionTable::parse(
            "[actions.a]\nprogram = \"x\"\nargs = [{ field = \"f\" }]\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("field `f`"), "{err}");
        let err = ActionTable::parse(
            "[actions.a]\nprogram = \"x\"\ntimeout = \"soon\"\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("`timeout`"), "{err}");
        let err =
            ActionTable::parse("[actions.a]\nprogram = \"x\"\ncolour = 1\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = ActionTable::parse("", "t.toml").unwrap_err();
        assert!(matches!(err, TableError::Empty { .. }));
    }
}
