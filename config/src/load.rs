//! Loading: TOML text → `toml::Table` → environment overrides → key and type checks against the
//! schema → `Config` → `Config::validate`. Every stage collects all of its problems.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use serde::Deserialize;
use toml::{Table, Value};

use crate::error::{ConfigError, ConfigErrorKind, ConfigErrors};
use crate::model::*;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "FERRY_";

/// `FERRY_*` environment variables that are not configuration overrides and are ignored:
/// `FERRY_CONFIG` (config file path, read by the binary), `FERRY_LOG` (log filter, read by the
/// binary) and `FERRY_REQUIRE_TOOLS` (used by the test suite).
pub const IGNORED_ENV_VARS: &[&str] = &["FERRY_CONFIG", "FERRY_LOG", "FERRY_REQUIRE_TOOLS"];

/// Tables whose keys are free-form (passed through), not fields of a struct.
const FREE_FORM_TABLES: &[&str] = &["uplink.kafka.librdkafka"];

/// Reads the TOML file at `path` (if any), applies `FERRY_*` overrides from `env`, deserializes
/// and validates. Returns every problem found.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    match path {
        None => load_str_named("", "<config>", env),
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => load_str_named(&text, &path.display().to_string(), env),
            Err(e) => Err(ConfigErrors(vec![ConfigError::new(
                ConfigErrorKind::Io,
                path.display().to_string(),
                format!("cannot read the config file: {e}"),
            )])),
        },
    }
}

/// [`load`] with the process environment (`std::env::vars()`).
pub fn load_from_env(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    load(path, std::env::vars())
}

/// [`load`] from TOML text instead of a file.
pub fn load_str(
    toml: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    load_str_named(toml, "<config>", env)
}

fn load_str_named(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut table = match text.parse::<Table>() {
        Ok(t) => Some(t),
        Err(e) => {
            let location = match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    format!("{origin}:{line}:{col}")
                }
                None => origin.to_owned(),
            };
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            errors.push(ConfigError::new(ConfigErrorKind::Syntax, location, message));
            None
        }
    };

    // Overrides are checked even when the file does not parse, so all problems show at once.
    let mut scratch = Table::new();
    let env_origin = apply_env(table.as_mut().unwrap_or(&mut scratch), env, &mut errors);
    let Some(mut table) = table else {
        return Err(ConfigErrors(errors));
    };

    let mut defaulted = Vec::new();
    check_table(
        &mut table,
        schema(),
        &mut Vec::new(),
        &mut errors,
        &mut defaulted,
    );

    let config = match Config::deserialize(table) {
        Ok(c) => c,
        Err(e) => {
            // The key and type checks above should have caught everything; this is a backstop.
            errors.push(ConfigError::new(
                ConfigErrorKind::InvalidType,
                "",
                e.message().to_owned(),
            ));
            annotate(&mut errors, &env_origin);
            return Err(ConfigErrors(errors));
        }
    };
    if let Err(problems) = config.validate() {
        // A key replaced by its default after a type error would only produce follow-up noise.
        errors.extend(
            problems
                .into_iter()
                .filter(|e| !defaulted.iter().any(|d| is_under(&e.path, d))),
        );
    }
    annotate(&mut errors, &env_origin);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn is_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

fn annotate(errors: &mut [ConfigError], env_origin: &HashMap<String, String>) {
    for e in errors {
        if e.kind != ConfigErrorKind::Env
            && let Some(var) = env_origin.get(&e.path)
        {
            e.message.push_str(&format!(" (set by {var})"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Schema

/// The shape of the configuration tree, derived from a fully populated sample `Config`.
#[derive(Debug)]
pub(crate) enum Node {
    /// A scalar or an array of scalars; `true` when it is written as a TOML string.
    Leaf { string: bool },
    /// A struct: its keys.
    Table(BTreeMap<String, Node>),
    /// An array of tables (`[[x]]`): the shape of one element.
    Array(Box<Node>),
    /// A table with free-form keys.
    Map,
}

/// A `Config` in which every optional value is set and every list has one element, so that
/// serializing it shows every key.
pub(crate) fn sample() -> Config {
    let mut c = Config::default();
    c.mqtt.device_from_topic_level = Some(0);
    c.mqtt.users.push(MqttUser {
        username: "u".into(),
        password: Some("p".into()),
        password_hash: Some("$argon2id$".into()),
    });
    c.mqtt.tls = Some(MqttTls {
        client_ca_path: Some("ca.pem".into()),
        ..MqttTls::default()
    });
    c.http.tokens.push(HttpToken {
        token: "t".into(),
        device: Some("d".into()),
        name: Some("n".into()),
    });
    c.http.tls = Some(HttpTls::default());
    let k = &mut c.uplink.kafka;
    k.sasl_mechanism = Some(SaslMechanism::Plain);
    k.sasl_username = Some("u".into());
    k.sasl_password = Some("p".into());
    k.ssl_ca_path = Some("ca.pem".into());
    k.routes.push(KafkaRoute {
        filter: "#".into(),
        topic: "t".into(),
        key: Some(KeyRule::Device),
    });
    k.librdkafka.insert("x".into(), "y".into());
    let m = &mut c.uplink.mqtt;
    m.client_id = Some("c".into());
    m.username = Some("u".into());
    m.password = Some("p".into());
    m.topic_prefix = Some("p/".into());
    m.rewrites.push(TopicRewrite {
        filter: "#".into(),
        template: "t".into(),
    });
    m.ca_path = Some("ca.pem".into());
    m.client_cert_path = Some("c.pem".into());
    m.client_key_path = Some("k.pem".into());
    c.status.listen = Some("127.0.0.1:0".parse().expect("valid address"));
    c.status.token = Some("t".into());
    c
}

pub(crate) fn schema() -> &'static Node {
    static SCHEMA: OnceLock<Node> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let table = Table::try_from(sample()).expect("the sample config serializes");
        node_of_table(&table, "")
    })
}

fn node_of_table(table: &Table, path: &str) -> Node {
    if FREE_FORM_TABLES.contains(&path) {
        return Node::Map;
    }
    let keys = table
        .iter()
        .map(|(k, v)| {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            (k.clone(), node_of_value(v, &child))
        })
        .collect();
    Node::Table(keys)
}

fn node_of_value(value: &Value, path: &str) -> Node {
    match value {
        Value::Table(t) => node_of_table(t, path),
        Value::Array(a) => match a.first() {
            Some(Value::Table(t)) => Node::Array(Box::new(node_of_table(t, path))),
            _ => Node::Leaf { string: false },
        },
        Value::String(_) => Node::Leaf { string: true },
        _ => Node::Leaf { string: false },
    }
}

/// Every key path of the configuration tree, in schema order. Elements of `[[...]]` lists are
/// written `[]` (`mqtt.users[].username`), free-form tables end in `.*`
/// (`uplink.kafka.librdkafka.*`).
pub fn key_paths() -> Vec<String> {
    fn walk(node: &Node, path: &str, out: &mut Vec<String>) {
        match node {
            Node::Leaf { .. } => out.push(path.to_owned()),
            Node::Map => out.push(format!("{path}.*")),
            Node::Array(element) => walk(element, &format!("{path}[]"), out),
            Node::Table(keys) => {
                for (k, child) in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(child, &p, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(schema(), "", &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Key and type checks

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn display_path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                if !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Deserializes a `Config` holding only `value` at `segs`; every struct has defaults, so this
/// fails exactly when the value has the wrong type for its key.
fn check_type(segs: &[Seg], value: &Value) -> Result<(), String> {
    let mut v = value.clone();
    for seg in segs.iter().rev() {
        v = match seg {
            Seg::Key(k) => {
                let mut t = Table::new();
                t.insert(k.clone(), v);
                Value::Table(t)
            }
            Seg::Index(_) => Value::Array(vec![v]),
        };
    }
    let Value::Table(t) = v else {
        unreachable!("paths start with a key")
    };
    Config::deserialize(t)
        .map(drop)
        .map_err(|e| plain_message(e.message()))
}

/// serde's message without Rust type names: "expected struct MqttTls" → "expected a table".
fn plain_message(message: &str) -> String {
    let message = message.trim();
    match message.find("expected struct ") {
        Some(i) => format!("{}expected a table", &message[..i]),
        None => message.replace("expected a sequence", "expected an array"),
    }
}

fn type_error(
    table: &mut Table,
    key: &str,
    segs: &[Seg],
    errors: &mut Vec<ConfigError>,
    defaulted: &mut Vec<String>,
) -> bool {
    let Some(value) = table.get(key) else {
        return false;
    };
    match check_type(segs, value) {
        Ok(()) => false,
        Err(message) => {
            // serde quotes the offending value ("invalid type: integer `12345`"): never for a
            // key holding a secret, whose value would end up in the log or a terminal.
            let message = if is_secret_key(key) {
                format!(
                    "invalid type: {}, expected a string (the value is not shown: it is a secret)",
                    value.type_str()
                )
            } else {
                message
            };
            let path = display_path(segs);
            errors.push(ConfigError::new(
                ConfigErrorKind::InvalidType,
                path.clone(),
                message,
            ));
            defaulted.push(path);
            table.remove(key);
            true
        }
    }
}

/// Keys holding a secret ([`crate::Secret`] values, and password hashes).
fn is_secret_key(key: &str) -> bool {
    matches!(
        key,
        "password" | "password_hash" | "token" | "sasl_password"
    )
}

fn check_table(
    table: &mut Table,
    node: &Node,
    segs: &mut Vec<Seg>,
    errors: &mut Vec<ConfigError>,
    defaulted: &mut Vec<String>,
) {
    let keys: Vec<String> = table.keys().cloned().collect();
    let known = match node {
        Node::Table(known) => known,
        Node::Map => {
            for key in keys {
                segs.push(Seg::Key(key.clone()));
                type_error(table, &key, segs, errors, defaulted);
                segs.pop();
            }
            return;
        }
        _ => unreachable!("check_table is called for tables only"),
    };
    for key in keys {
        segs.push(Seg::Key(key.clone()));
        match known.get(&key) {
            None => {
                let message = match suggest(&key, known.keys().map(String::as_str)) {
                    Some(s) => format!("unknown key; did you mean '{s}'?"),
                    None => format!(
                        "unknown key; valid keys here are {}",
                        known
                            .keys()
                            .map(|k| format!("'{k}'"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                errors.push(ConfigError::new(
                    ConfigErrorKind::UnknownKey,
                    display_path(segs),
                    message,
                ));
                table.remove(&key);
            }
            Some(Node::Leaf { .. }) => {
                type_error(table, &key, segs, errors, defaulted);
            }
            Some(child @ (Node::Table(_) | Node::Map)) => {
                if !type_error_unless(table, &key, segs, errors, defaulted, Value::is_table)
                    && let Some(Value::Table(t)) = table.get_mut(&key)
                {
                    check_table(t, child, segs, errors, defaulted);
                }
            }
            Some(Node::Array(element)) => {
                if !type_error_unless(table, &key, segs, errors, defaulted, Value::is_array)
                    && let Some(Value::Array(items)) = table.get_mut(&key)
                {
                    for (i, item) in items.iter_mut().enumerate() {
                        segs.push(Seg::Index(i));
                        if let Value::Table(t) = item {
                            check_table(t, element, segs, errors, defaulted);
                        } else {
                            let path = display_path(segs);
                            errors.push(ConfigError::new(
                                ConfigErrorKind::InvalidType,
                                path.clone(),
                                format!("expected a table, found {}", item.type_str()),
                            ));
                            defaulted.push(path);
                            *item = Value::Table(Table::new());
                        }
                        segs.pop();
                    }
                }
            }
        }
        segs.pop();
    }
}

/// Reports a type error for `key` unless its value has the expected shape.
fn type_error_unless(
    table: &mut Table,
    key: &str,
    segs: &[Seg],
    errors: &mut Vec<ConfigError>,
    defaulted: &mut Vec<String>,
    shape_ok: fn(&Value) -> bool,
) -> bool {
    match table.get(key) {
        Some(v) if shape_ok(v) => false,
        _ => type_error(table, key, segs, errors, defaulted),
    }
}

/// The candidate closest to `name`, if it is close enough to be a likely typo.
pub(crate) fn suggest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = name.chars().count().max(3) / 3;
    candidates
        .map(|c| (strsim::levenshtein(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

// ---------------------------------------------------------------------------------------------
// Environment overrides

/// An overridable key: its path and whether its value is a TOML string.
struct EnvKey {
    path: Vec<String>,
    string: bool,
}

fn env_keys() -> &'static BTreeMap<String, EnvKey> {
    static KEYS: OnceLock<BTreeMap<String, EnvKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        fn walk(node: &Node, path: &mut Vec<String>, out: &mut BTreeMap<String, EnvKey>) {
            let string = match node {
                Node::Table(keys) => {
                    for (k, child) in keys {
                        path.push(k.clone());
                        walk(child, path, out);
                        path.pop();
                    }
                    return;
                }
                Node::Leaf { string } => *string,
                Node::Array(_) | Node::Map => false,
            };
            out.insert(
                env_var_name(&path.join(".")),
                EnvKey {
                    path: path.clone(),
                    string,
                },
            );
        }
        let mut out = BTreeMap::new();
        walk(schema(), &mut Vec::new(), &mut out);
        out
    })
}

/// The environment variable overriding a key path: `buffer.max_bytes` → `FERRY_BUFFER_MAX_BYTES`.
pub fn env_var_name(key_path: &str) -> String {
    format!("{ENV_PREFIX}{}", key_path.replace('.', "_").to_uppercase())
}

/// Parses an override: as a TOML value when it is one (numbers, booleans, arrays, inline
/// tables), else as a string. Keys that hold strings always take the text as is.
fn env_value(raw: &str, string: bool) -> Value {
    if !string
        && let Ok(mut t) = format!("v = {raw}").parse::<Table>()
        && t.len() == 1
        && let Some(v) = t.remove("v")
    {
        return v;
    }
    Value::String(raw.to_owned())
}

fn apply_env(
    table: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<ConfigError>,
) -> HashMap<String, String> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !IGNORED_ENV_VARS.contains(&k.as_str()))
        .collect();
    vars.sort();
    let keys = env_keys();
    let mut origin = HashMap::new();
    for (name, raw) in vars {
        let Some(key) = keys.get(&name) else {
            let message = match suggest(&name, keys.keys().map(String::as_str)) {
                Some(s) => format!("unknown environment variable; did you mean '{s}'?"),
                None => "unknown environment variable (FERRY_* variables override config keys, \
                         e.g. FERRY_BUFFER_MAX_BYTES for buffer.max_bytes)"
                    .to_owned(),
            };
            errors.push(ConfigError::new(ConfigErrorKind::Env, name, message));
            continue;
        };
        let (last, parents) = key.path.split_last().expect("paths are not empty");
        let t = match descend(table, parents) {
            Ok(t) => t,
            Err(blocked) => {
                errors.push(ConfigError::new(
                    ConfigErrorKind::Env,
                    name,
                    format!("cannot be applied because '{blocked}' is not a table in the file"),
                ));
                continue;
            }
        };
        t.insert(last.clone(), env_value(&raw, key.string));
        origin.insert(key.path.join("."), name);
    }
    origin
}

/// The table at `path`, created as needed; `Err` names the first non-table on the way.
fn descend<'a>(table: &'a mut Table, path: &[String]) -> Result<&'a mut Table, String> {
    let Some((first, rest)) = path.split_first() else {
        return Ok(table);
    };
    match table
        .entry(first.clone())
        .or_insert_with(|| Value::Table(Table::new()))
    {
        Value::Table(inner) => descend(inner, rest).map_err(|e| format!("{first}.{e}")),
        _ => Err(first.clone()),
    }
}
