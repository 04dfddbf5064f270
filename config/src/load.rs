//! Loading: TOML text → `toml::Table` → environment overrides → key and type checks against the
//! schema → `Config` → `Config::validate`. Every stage collects all of its problems.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use serde::Deserialize;
use toml::{Table, Value};

use crate::error::{ConfigError, ConfigErrorKind, ConfigErrors, path_segment};
use crate::model::*;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "FERRY_";

/// `FERRY_*` environment variables that are not configuration overrides and are ignored:
/// `FERRY_CONFIG` (config file path, read by the binary), `FERRY_LOG` (log filter, read by the
/// binary) and `FERRY_REQUIRE_TOOLS` (used by the test suite).
pub const IGNORED_ENV_VARS: &[&str] = &["FERRY_CONFIG", "FERRY_LOG", "FERRY_REQUIRE_TOOLS"];

/// The table of named uplinks, `[uplinks.NAME]`.
const UPLINKS: &str = "uplinks";
/// The key of an uplink that names its type.
const TYPE_KEY: &str = "type";
/// How key paths write the NAME of `[uplinks.NAME]`.
const ANY_NAME: &str = "<name>";
/// The table of ferry 0.1's uplinks, `[uplink.kafka]` and `[uplink.mqtt]`, and their types.
const OLD_UPLINKS: &str = "uplink";
const OLD_UPLINK_TYPES: &[&str] = &["kafka", "mqtt"];

/// Tables whose keys are free-form (passed through), not fields of a struct.
const FREE_FORM_TABLES: &[&str] = &["uplinks.<name>.librdkafka"];

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

    let mut checker = Checker::default();
    checker.table(&mut table, schema());
    let Checker {
        errors: found,
        defaulted,
        ..
    } = checker;
    errors.extend(found);

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

/// Points every error about a value that came from the environment to its variable.
fn annotate(errors: &mut [ConfigError], origin: &EnvOrigin) {
    for e in errors {
        if e.kind == ConfigErrorKind::Env {
            continue;
        }
        if let Some(var) = origin.keys.get(&e.path) {
            e.message.push_str(&format!(" (set by {var})"));
        } else if let Some((entry, var)) = origin
            .created
            .iter()
            .find(|(entry, _)| is_under(&e.path, entry))
        {
            e.message
                .push_str(&format!(" ({entry} is created by {var})"));
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
    /// `[uplinks]`: tables of any name, each of the type its `type` key names. `common` holds
    /// the keys every uplink takes besides `type`, `types` the keys of each type.
    Named {
        common: BTreeMap<String, Node>,
        types: BTreeMap<&'static str, BTreeMap<String, Node>>,
    },
}

/// A `Config` in which every optional value is set and every list has one element, so that
/// serializing it shows every key. Its uplinks are [`sample_uplinks`], each named by its type.
pub(crate) fn sample() -> Config {
    let mut c = Config::default();
    c.buffer.min_free_bytes = Some(0);
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
    c.uplinks = sample_uplinks()
        .into_iter()
        .map(|u| (u.kind.type_name().to_owned(), u))
        .collect();
    c.status.listen = Some("127.0.0.1:0".parse().expect("valid address"));
    c.status.token = Some("t".into());
    c
}

/// One uplink of every type, in the order of [`UplinkKind::TYPES`], with every optional value
/// set and every list holding one element.
pub(crate) fn sample_uplinks() -> Vec<UplinkSettings> {
    let k = KafkaUplink {
        cloud: Some(KafkaCloud::Confluent),
        connection_string: Some("c".into()),
        api_key: Some("k".into()),
        api_secret: Some("s".into()),
        region: Some("r".into()),
        access_key_id: Some("a".into()),
        secret_access_key: Some("s".into()),
        session_token: Some("t".into()),
        profile: Some("p".into()),
        idempotent: Some(true),
        sasl_mechanism: Some(SaslMechanism::Plain),
        sasl_username: Some("u".into()),
        sasl_password: Some("p".into()),
        ssl_ca_path: Some("ca.pem".into()),
        routes: vec![KafkaRoute {
            filter: "#".into(),
            topic: "t".into(),
            key: Some(KeyRule::Device),
        }],
        librdkafka: [("x".into(), "y".into())].into(),
        downlink: Some(Box::new(KafkaDownlink {
            topic: "t".into(),
            group_id: Some("g".into()),
            qos: Some(1),
        })),
        ..KafkaUplink::default()
    };
    let m = MqttUplink {
        client_id: Some("c".into()),
        username: Some("u".into()),
        password: Some("p".into()),
        topic_prefix: Some("p/".into()),
        rewrites: vec![TopicRewrite {
            filter: "#".into(),
            template: "t".into(),
        }],
        ca_path: Some("ca.pem".into()),
        client_cert_path: Some("c.pem".into()),
        client_key_path: Some("k.pem".into()),
        downlink: vec![MqttDownlink {
            remote: "#".into(),
            local: Some("t".into()),
            qos: Some(1),
        }],
        ..MqttUplink::default()
    };
    let kinesis = KinesisUplink {
        stream: "s".into(),
        region: Some("r".into()),
        endpoint: Some("http://e".into()),
        access_key_id: Some("a".into()),
        secret_access_key: Some("s".into()),
        session_token: Some("t".into()),
        profile: Some("p".into()),
        ca_path: Some("ca.pem".into()),
        ..KinesisUplink::default()
    };
    let pubsub = PubsubUplink {
        project: "p".into(),
        topic: "t".into(),
        endpoint: Some("http://e".into()),
        credentials_file: Some("k.json".into()),
        ca_path: Some("ca.pem".into()),
        ..PubsubUplink::default()
    };
    [
        UplinkKind::Kafka(k),
        UplinkKind::Kinesis(kinesis),
        UplinkKind::Mqtt(m),
        UplinkKind::Pubsub(pubsub),
    ]
    .into_iter()
    .map(UplinkSettings::new)
    .collect()
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
    if path == UPLINKS {
        return node_of_uplinks();
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

/// The keys of each type are those its sample serializes; the other keys of an uplink
/// (`enabled`, `topics`) are common to all types.
fn node_of_uplinks() -> Node {
    let base = format!("{UPLINKS}.{ANY_NAME}");
    let mut common = BTreeMap::new();
    let mut types = BTreeMap::new();
    for uplink in sample_uplinks() {
        let entry = Table::try_from(&uplink).expect("the sample uplink serializes");
        let own = Table::try_from(&uplink.kind).expect("the sample uplink serializes");
        let mut keys = BTreeMap::new();
        for (k, v) in entry.iter().filter(|(k, _)| *k != TYPE_KEY) {
            let node = node_of_value(v, &format!("{base}.{k}"));
            if own.contains_key(k) {
                keys.insert(k.clone(), node);
            } else {
                common.insert(k.clone(), node);
            }
        }
        types.insert(uplink.kind.type_name(), keys);
    }
    Node::Named { common, types }
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
/// written `[]` (`mqtt.users[].username`), free-form tables end in `.*`, and the name of an
/// uplink is written `<name>`: `uplinks.<name>.type`, then the keys every uplink takes
/// (`uplinks.<name>.enabled`, `uplinks.<name>.topics`), then the keys of each type in turn
/// (`uplinks.<name>.brokers`, `uplinks.<name>.routes[].filter`,
/// `uplinks.<name>.librdkafka.*`, ..., `uplinks.<name>.url`, ...), each key once even when
/// several types take it.
pub fn key_paths() -> Vec<String> {
    fn walk(node: &Node, path: &str, out: &mut Vec<String>) {
        let join = |k: &str| {
            if path.is_empty() {
                k.to_owned()
            } else {
                format!("{path}.{k}")
            }
        };
        match node {
            Node::Leaf { .. } => out.push(path.to_owned()),
            Node::Map => out.push(format!("{path}.*")),
            Node::Array(element) => walk(element, &format!("{path}[]"), out),
            Node::Table(keys) => {
                for (k, child) in keys {
                    walk(child, &join(k), out);
                }
            }
            Node::Named { common, types } => {
                let base = join(ANY_NAME);
                out.push(format!("{base}.{TYPE_KEY}"));
                // A key of several types is listed once; one of the same name but another
                // shape (a Kafka `downlink` table, an MQTT `downlink` array) adds its paths.
                let mut seen = BTreeSet::new();
                for (k, child) in common.iter().chain(types.values().flatten()) {
                    let mut paths = Vec::new();
                    walk(child, &format!("{base}.{k}"), &mut paths);
                    out.extend(paths.into_iter().filter(|p| seen.insert(p.clone())));
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
                out.push_str(&path_segment(k));
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// serde's message without Rust type names: "expected struct MqttTls" → "expected a table".
fn plain_message(message: &str) -> String {
    let message = message.trim();
    match message.find("expected struct ") {
        Some(i) => format!("{}expected a table", &message[..i]),
        None => message.replace("expected a sequence", "expected an array"),
    }
}

/// `settings` as the TOML of its `[uplinks.NAME]` table, every default filled in and every
/// secret shown as `"***"`: what `ferry check-config --explain` prints.
pub fn redacted_toml(name: &str, settings: &UplinkSettings) -> String {
    fn redact(table: &mut Table) {
        for (key, value) in table.iter_mut() {
            match value {
                Value::String(s) if is_secret_key(key) && !s.is_empty() => *s = "***".into(),
                Value::Table(t) => redact(t),
                Value::Array(items) => {
                    for item in items {
                        if let Value::Table(t) = item {
                            redact(t);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut table = Table::try_from(settings).unwrap_or_default();
    redact(&mut table);
    let mut uplinks = Table::new();
    uplinks.insert(name.to_owned(), Value::Table(table));
    let mut root = Table::new();
    root.insert("uplinks".to_owned(), Value::Table(uplinks));
    toml::to_string(&root).unwrap_or_default()
}

/// Keys holding a secret ([`crate::Secret`] values, and password hashes).
fn is_secret_key(key: &str) -> bool {
    matches!(
        key,
        "password"
            | "password_hash"
            | "token"
            | "sasl_password"
            | "connection_string"
            | "api_secret"
            | "secret_access_key"
            | "session_token"
    )
}

/// "unknown key" with the closest of `valid`, or the list of them.
fn unknown_key<'a>(key: &str, valid: impl Iterator<Item = &'a str>) -> String {
    let valid: BTreeSet<&str> = valid.collect();
    match suggest(key, valid.iter().copied()) {
        Some(s) => format!("unknown key; did you mean '{s}'?"),
        None => format!(
            "unknown key; valid keys here are {}",
            valid
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Where ferry 0.1's `[uplink.TYPE]` went.
fn moved_uplink(type_name: &str) -> String {
    format!("[uplink.{type_name}] is now [uplinks.{type_name}] with type = \"{type_name}\"")
}

/// Walks the TOML table along the schema: reports unknown keys (and removes them) and values
/// of the wrong type (and removes them, so that their defaults apply).
#[derive(Debug, Default)]
struct Checker {
    errors: Vec<ConfigError>,
    /// Paths of the values removed after a type error: validation problems under them would
    /// only be follow-up noise.
    defaulted: Vec<String>,
    /// The path being checked.
    segs: Vec<Seg>,
    /// Inside `[uplinks.NAME]`: the position in `segs` of the uplink's keys, and its type,
    /// which `check_type` writes into the uplink it builds.
    in_uplink: Option<(usize, &'static str)>,
}

impl Checker {
    fn report(&mut self, kind: ConfigErrorKind, message: impl Into<String>) {
        self.errors
            .push(ConfigError::new(kind, display_path(&self.segs), message));
    }

    /// Deserializes a `Config` holding only `value` at the current path; every struct has
    /// defaults, so this fails exactly when the value has the wrong type for its key.
    fn check_type(&self, value: &Value) -> Result<(), String> {
        let mut v = value.clone();
        for (i, seg) in self.segs.iter().enumerate().rev() {
            v = match seg {
                Seg::Key(k) => {
                    let mut t = Table::new();
                    t.insert(k.clone(), v);
                    if let Some((at, type_name)) = self.in_uplink
                        && i == at
                    {
                        t.insert(TYPE_KEY.to_owned(), Value::String(type_name.to_owned()));
                    }
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

    /// Reports (and removes) `table[key]` if it has the wrong type; the current path is its.
    fn type_error(&mut self, table: &mut Table, key: &str) -> bool {
        let Some(value) = table.get(key) else {
            return false;
        };
        match self.check_type(value) {
            Ok(()) => false,
            Err(message) => {
                // serde quotes the offending value ("invalid type: integer `12345`"): never for
                // a key holding a secret, whose value would end up in the log or a terminal.
                let message = if is_secret_key(key) {
                    format!(
                        "invalid type: {}, expected a string (the value is not shown: it is a secret)",
                        value.type_str()
                    )
                } else {
                    message
                };
                self.report(ConfigErrorKind::InvalidType, message);
                self.defaulted.push(display_path(&self.segs));
                table.remove(key);
                true
            }
        }
    }

    /// Reports a type error for `key` unless its value has the expected shape.
    fn type_error_unless(
        &mut self,
        table: &mut Table,
        key: &str,
        shape_ok: fn(&Value) -> bool,
    ) -> bool {
        match table.get(key) {
            Some(v) if shape_ok(v) => false,
            _ => self.type_error(table, key),
        }
    }

    /// Checks the keys of `table` (at the current path) against `node`.
    fn table(&mut self, table: &mut Table, node: &Node) {
        let keys: Vec<String> = table.keys().cloned().collect();
        for key in keys {
            self.segs.push(Seg::Key(key.clone()));
            match node {
                Node::Map => {
                    self.type_error(table, &key);
                }
                Node::Table(known) => match known.get(&key) {
                    Some(child) => self.value(table, &key, child),
                    None => {
                        if self.segs.len() == 1 && key == OLD_UPLINKS {
                            self.old_uplinks(&table[&key]);
                        } else {
                            let message = unknown_key(&key, known.keys().map(String::as_str));
                            self.report(ConfigErrorKind::UnknownKey, message);
                        }
                        table.remove(&key);
                    }
                },
                _ => unreachable!("tables are checked against table nodes"),
            }
            self.segs.pop();
        }
    }

    /// Checks `table[key]` (the current path) against `node`.
    fn value(&mut self, table: &mut Table, key: &str, node: &Node) {
        match node {
            Node::Leaf { .. } => {
                self.type_error(table, key);
            }
            Node::Table(_) | Node::Map => {
                if !self.type_error_unless(table, key, Value::is_table)
                    && let Some(Value::Table(t)) = table.get_mut(key)
                {
                    self.table(t, node);
                }
            }
            Node::Named { common, types } => {
                if !self.type_error_unless(table, key, Value::is_table)
                    && let Some(Value::Table(t)) = table.get_mut(key)
                {
                    self.uplinks(t, common, types);
                }
            }
            Node::Array(element) => {
                if !self.type_error_unless(table, key, Value::is_array)
                    && let Some(Value::Array(items)) = table.get_mut(key)
                {
                    for (i, item) in items.iter_mut().enumerate() {
                        self.segs.push(Seg::Index(i));
                        if let Value::Table(t) = item {
                            self.table(t, element);
                        } else {
                            self.report(
                                ConfigErrorKind::InvalidType,
                                format!("expected a table, found {}", item.type_str()),
                            );
                            self.defaulted.push(display_path(&self.segs));
                            *item = Value::Table(Table::new());
                        }
                        self.segs.pop();
                    }
                }
            }
        }
    }

    /// `[uplinks]`: every entry must be a table.
    fn uplinks(
        &mut self,
        entries: &mut Table,
        common: &BTreeMap<String, Node>,
        types: &BTreeMap<&'static str, BTreeMap<String, Node>>,
    ) {
        let names: Vec<String> = entries.keys().cloned().collect();
        for name in names {
            self.segs.push(Seg::Key(name.clone()));
            if let Some(Value::Table(entry)) = entries.get_mut(&name) {
                self.uplink(entry, common, types);
            } else if let Some(other) = entries.remove(&name) {
                self.report(
                    ConfigErrorKind::InvalidType,
                    format!("expected a table, found {}", other.type_str()),
                );
                self.defaulted.push(display_path(&self.segs));
            }
            self.segs.pop();
        }
    }

    /// `[uplinks.NAME]`: its type, then each key against the common keys and those of the type.
    fn uplink(
        &mut self,
        entry: &mut Table,
        common: &BTreeMap<String, Node>,
        types: &BTreeMap<&'static str, BTreeMap<String, Node>>,
    ) {
        let type_name = self.uplink_type(entry);
        // Without a valid type, the keys of a type mean nothing: they are dropped, and the
        // uplink stays as one of the first type with its defaults, so that its name and
        // common keys are still checked and validated.
        let checked_as = type_name.unwrap_or(UplinkKind::TYPES[0]);
        entry.insert(TYPE_KEY.to_owned(), Value::String(checked_as.to_owned()));
        self.in_uplink = Some((self.segs.len(), checked_as));
        let keys: Vec<String> = entry.keys().filter(|k| *k != TYPE_KEY).cloned().collect();
        for key in keys {
            self.segs.push(Seg::Key(key.clone()));
            let owners: Vec<&str> = types
                .iter()
                .filter(|(_, keys)| keys.contains_key(&key))
                .map(|(t, _)| *t)
                .collect();
            if let Some(node) = common.get(&key) {
                self.value(entry, &key, node);
            } else if let Some(t) = type_name {
                if owners.contains(&t) {
                    self.value(entry, &key, &types[t][&key]);
                } else {
                    let valid = || {
                        common
                            .keys()
                            .chain(types[t].keys())
                            .map(String::as_str)
                            .chain([TYPE_KEY])
                    };
                    let message = if owners.is_empty() {
                        unknown_key(&key, valid())
                    } else {
                        let mut m = format!(
                            "`{key}` is a key of type {}; this uplink is type {t}",
                            owners.join(", ")
                        );
                        if let Some(s) = suggest(&key, valid()) {
                            m.push_str(&format!("; did you mean '{s}'?"));
                        }
                        m
                    };
                    self.report(ConfigErrorKind::UnknownKey, message);
                    entry.remove(&key);
                }
            } else {
                // A key of some type may be right for the type meant: only a key of no type
                // is reported.
                if owners.is_empty() {
                    let all = common
                        .keys()
                        .chain(types.values().flat_map(BTreeMap::keys))
                        .map(String::as_str)
                        .chain([TYPE_KEY]);
                    let message = match suggest(&key, all) {
                        Some(s) => format!("unknown key; did you mean '{s}'?"),
                        None => format!(
                            "unknown key: no uplink type ({}) has it",
                            UplinkKind::TYPES.join(", ")
                        ),
                    };
                    self.report(ConfigErrorKind::UnknownKey, message);
                }
                entry.remove(&key);
            }
            self.segs.pop();
        }
        self.in_uplink = None;
    }

    /// The type named by the uplink's `type` key; reports it when missing or unknown.
    fn uplink_type(&mut self, entry: &Table) -> Option<&'static str> {
        let types = UplinkKind::TYPES.join(", ");
        self.segs.push(Seg::Key(TYPE_KEY.to_owned()));
        let found = match entry.get(TYPE_KEY) {
            None => {
                self.report(
                    ConfigErrorKind::InvalidValue,
                    format!("missing; one of {types}"),
                );
                None
            }
            Some(Value::String(s)) => {
                let found = UplinkKind::TYPES.iter().copied().find(|t| t == s);
                if found.is_none() {
                    let hint = suggest(s, UplinkKind::TYPES.iter().copied())
                        .map(|t| format!("; did you mean '{t}'?"))
                        .unwrap_or_default();
                    self.report(
                        ConfigErrorKind::InvalidType,
                        format!("unknown uplink type '{s}'{hint} (types: {types})"),
                    );
                }
                found
            }
            Some(other) => {
                self.report(
                    ConfigErrorKind::InvalidType,
                    format!(
                        "invalid type: {}, expected a string: one of {types}",
                        other.type_str()
                    ),
                );
                None
            }
        };
        self.segs.pop();
        found
    }

    /// `[uplink]`, the uplinks of ferry 0.1: says where each went.
    fn old_uplinks(&mut self, value: &Value) {
        let general = format!(
            "unknown key; uplinks are [uplinks.NAME] tables now, each with a type ({})",
            UplinkKind::TYPES.join(", ")
        );
        let Some(old) = value.as_table().filter(|t| !t.is_empty()) else {
            self.report(ConfigErrorKind::UnknownKey, general);
            return;
        };
        for key in old.keys() {
            self.segs.push(Seg::Key(key.clone()));
            let message = match OLD_UPLINK_TYPES.iter().find(|t| *t == key) {
                Some(&t) => {
                    let mut m = format!(
                        "{} (uplinks are named now; the name {t} keeps the buffer cursor of ferry 0.1)",
                        moved_uplink(t)
                    );
                    if t == "mqtt" {
                        m.push_str(
                            "; [uplink.mqtt] was off unless enabled = true, an [uplinks.NAME] table is on unless enabled = false",
                        );
                    }
                    m
                }
                None => general.clone(),
            };
            self.report(ConfigErrorKind::UnknownKey, message);
            self.segs.pop();
        }
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
#[derive(Debug, Clone)]
struct EnvKey {
    path: Vec<String>,
    string: bool,
}

/// The variables of the keys outside `[uplinks]`, by name.
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
                Node::Named { .. } => return,
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

/// The keys an uplink takes (`type`, the common keys, the keys of every type), by their
/// upper-cased name; a key holds a string when it does in any type.
fn uplink_env_keys() -> &'static BTreeMap<String, EnvKey> {
    static KEYS: OnceLock<BTreeMap<String, EnvKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let Node::Table(root) = schema() else {
            unreachable!("the schema is a table")
        };
        let Some(Node::Named { common, types }) = root.get(UPLINKS) else {
            unreachable!("the schema has [uplinks]")
        };
        let mut out = BTreeMap::new();
        let type_key = (TYPE_KEY.to_owned(), Node::Leaf { string: true });
        let keys = common
            .iter()
            .chain(types.values().flatten())
            .chain([(&type_key.0, &type_key.1)]);
        for (k, node) in keys {
            let string = matches!(node, Node::Leaf { string: true });
            out.entry(k.to_uppercase())
                .and_modify(|e: &mut EnvKey| e.string |= string)
                .or_insert_with(|| EnvKey {
                    path: vec![k.clone()],
                    string,
                });
        }
        out
    })
}

/// The environment variable overriding a key path: `buffer.max_bytes` → `FERRY_BUFFER_MAX_BYTES`.
pub fn env_var_name(key_path: &str) -> String {
    format!("{ENV_PREFIX}{}", key_path.replace('.', "_").to_uppercase())
}

/// How a variable's NAME part refers to the uplink `name`: upper-cased, `-` as `_`.
fn uplink_env_name(name: &str) -> String {
    name.to_uppercase().replace('-', "_")
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

/// Which environment variable set what.
#[derive(Debug, Default)]
struct EnvOrigin {
    /// Key path → the variable that set it.
    keys: HashMap<String, String>,
    /// `uplinks.NAME` of an uplink the file does not have → the first variable setting a key
    /// of it.
    created: Vec<(String, String)>,
}

/// What a variable sets.
struct EnvTarget {
    key: EnvKey,
    /// Whether it creates the uplink it sets a key of.
    creates_uplink: bool,
}

fn apply_env(
    table: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<ConfigError>,
) -> EnvOrigin {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !IGNORED_ENV_VARS.contains(&k.as_str()))
        .collect();
    vars.sort();
    let uplinks_prefix = format!("{}_", env_var_name(UPLINKS));
    let old_prefix = format!("{}_", env_var_name(OLD_UPLINKS));
    let mut origin = EnvOrigin::default();
    for (name, raw) in vars {
        let target = if let Some(rest) = name.strip_prefix(&uplinks_prefix) {
            uplink_env_target(table, &name, rest)
        } else if let Some(rest) = name.strip_prefix(&old_prefix) {
            Err(old_uplink_var(rest))
        } else {
            plain_env_target(&name)
        };
        let target = match target {
            Ok(t) => t,
            Err(message) => {
                errors.push(ConfigError::new(ConfigErrorKind::Env, name, message));
                continue;
            }
        };
        let (last, parents) = target.key.path.split_last().expect("paths are not empty");
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
        t.insert(last.clone(), env_value(&raw, target.key.string));
        let path = |p: &[String]| {
            p.iter()
                .map(|k| path_segment(k))
                .collect::<Vec<_>>()
                .join(".")
        };
        if target.creates_uplink {
            origin.created.push((path(parents), name.clone()));
        }
        origin.keys.insert(path(&target.key.path), name);
    }
    origin
}

/// A variable outside `[uplinks]`: `FERRY_<PATH>`.
fn plain_env_target(name: &str) -> Result<EnvTarget, String> {
    let keys = env_keys();
    match keys.get(name) {
        Some(key) => Ok(EnvTarget {
            key: key.clone(),
            creates_uplink: false,
        }),
        None => Err(match suggest(name, keys.keys().map(String::as_str)) {
            Some(s) => format!("unknown environment variable; did you mean '{s}'?"),
            None => "unknown environment variable (FERRY_* variables override config keys, \
                     e.g. FERRY_BUFFER_MAX_BYTES for buffer.max_bytes)"
                .to_owned(),
        }),
    }
}

/// `FERRY_UPLINKS_<NAME>_<KEY>` (`rest` is `<NAME>_<KEY>`): KEY is a key an uplink takes, NAME
/// the rest. Of the ways to split `rest`, one whose NAME is an uplink of the table wins, then
/// the one with the longest KEY. NAME refers to the uplink whose name, upper-cased with `-` as
/// `_`, it is; else it is a new uplink named NAME lower-cased.
fn uplink_env_target(table: &Table, var: &str, rest: &str) -> Result<EnvTarget, String> {
    let keys = uplink_env_keys();
    let uplinks: Vec<&String> = match table.get(UPLINKS) {
        Some(Value::Table(t)) => t.keys().collect(),
        _ => Vec::new(),
    };
    // (names an existing uplink, key length, uplink name, key)
    let mut best: Option<(bool, usize, String, &EnvKey)> = None;
    for (upper, key) in keys {
        let Some(prefix) = rest
            .strip_suffix(upper.as_str())
            .and_then(|p| p.strip_suffix('_'))
            .filter(|p| !p.is_empty())
        else {
            continue;
        };
        let existing: Vec<&&String> = uplinks
            .iter()
            .filter(|u| uplink_env_name(u) == prefix)
            .collect();
        let candidate = match existing[..] {
            [] => (false, upper.len(), prefix.to_lowercase(), key),
            [u] => (true, upper.len(), u.to_string(), key),
            [a, b, ..] => {
                return Err(format!(
                    "refers to both uplinks '{a}' and '{b}' (their names differ only in '-' and '_'); rename one"
                ));
            }
        };
        if best
            .as_ref()
            .is_none_or(|b| (candidate.0, candidate.1) > (b.0, b.1))
        {
            best = Some(candidate);
        }
    }
    let Some((exists, _, uplink, key)) = best else {
        return Err(unknown_uplink_var(var, rest, &uplinks));
    };
    let mut path = vec![UPLINKS.to_owned(), uplink];
    path.extend(key.path.iter().cloned());
    Ok(EnvTarget {
        key: EnvKey {
            path,
            string: key.string,
        },
        creates_uplink: !exists,
    })
}

/// The error for a `FERRY_UPLINKS_*` variable that does not end in a key.
fn unknown_uplink_var(var: &str, rest: &str, uplinks: &[&String]) -> String {
    let keys = uplink_env_keys();
    if let Some(key) = keys.get(rest) {
        return format!(
            "names no uplink: FERRY_UPLINKS_<NAME>_{rest} sets {} of the uplink NAME",
            key.path.join(".")
        );
    }
    // Every NAME this variable could mean, with every key.
    let mut names: BTreeSet<String> = uplinks.iter().map(|u| uplink_env_name(u)).collect();
    names.extend(
        rest.match_indices('_')
            .map(|(i, _)| rest[..i].to_owned())
            .filter(|n| !n.is_empty()),
    );
    let candidates: Vec<String> = names
        .iter()
        .flat_map(|n| {
            keys.keys()
                .map(move |k| format!("{ENV_PREFIX}UPLINKS_{n}_{k}"))
        })
        .collect();
    match suggest(var, candidates.iter().map(String::as_str)) {
        Some(s) => format!("unknown environment variable; did you mean '{s}'?"),
        None => "unknown environment variable: no key of an uplink ends it \
                 (FERRY_UPLINKS_<NAME>_<KEY> sets KEY of [uplinks.NAME], e.g. \
                 FERRY_UPLINKS_CLOUD_BROKERS)"
            .to_owned(),
    }
}

/// The error for `FERRY_UPLINK_<rest>`, a variable of ferry 0.1.
fn old_uplink_var(rest: &str) -> String {
    let new = format!("{ENV_PREFIX}UPLINKS_{rest}");
    for t in OLD_UPLINK_TYPES {
        let upper = t.to_uppercase();
        if rest.starts_with(&format!("{upper}_")) {
            return format!(
                "{}: set {new} instead (and {ENV_PREFIX}UPLINKS_{upper}_TYPE={t} unless the file has [uplinks.{t}])",
                moved_uplink(t)
            );
        }
    }
    format!(
        "unknown environment variable; uplinks are [uplinks.NAME] tables now, set with FERRY_UPLINKS_<NAME>_<KEY>: did you mean '{new}'?"
    )
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
