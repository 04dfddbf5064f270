use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use toml::{Table, Value};

use super::*;
use crate::load::{Node, sample, sample_uplinks, schema};

const EXAMPLE: &str = include_str!("../ferry.example.toml");

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn paths(errors: &ConfigErrors) -> Vec<&str> {
    errors.iter().map(|e| e.path.as_str()).collect()
}

/// The message of the error at `path`.
fn message<'a>(errors: &'a ConfigErrors, path: &str) -> &'a str {
    &errors
        .find(path)
        .unwrap_or_else(|| panic!("no error at {path} in:\n{errors}"))
        .message
}

/// The Kafka uplink `name`.
fn kafka<'a>(config: &'a Config, name: &str) -> &'a KafkaUplink {
    match config.uplinks.get(name).map(|u| &u.kind) {
        Some(UplinkKind::Kafka(k)) => k,
        other => panic!("uplinks.{name} is not a Kafka uplink: {other:?}"),
    }
}

/// The MQTT uplink `name`.
fn mqtt<'a>(config: &'a Config, name: &str) -> &'a MqttUplink {
    match config.uplinks.get(name).map(|u| &u.kind) {
        Some(UplinkKind::Mqtt(m)) => m,
        other => panic!("uplinks.{name} is not an MQTT uplink: {other:?}"),
    }
}

/// The Kinesis uplink `name`.
fn kinesis<'a>(config: &'a Config, name: &str) -> &'a KinesisUplink {
    match config.uplinks.get(name).map(|u| &u.kind) {
        Some(UplinkKind::Kinesis(k)) => k,
        other => panic!("uplinks.{name} is not a Kinesis uplink: {other:?}"),
    }
}

/// The Pub/Sub uplink `name`.
fn pubsub<'a>(config: &'a Config, name: &str) -> &'a PubsubUplink {
    match config.uplinks.get(name).map(|u| &u.kind) {
        Some(UplinkKind::Pubsub(g)) => g,
        other => panic!("uplinks.{name} is not a Pub/Sub uplink: {other:?}"),
    }
}

/// The example file with every `# key = value` and `# [table]` line uncommented.
fn uncommented_example() -> String {
    EXAMPLE
        .lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("# ") else {
                return line.to_owned();
            };
            let header = rest.starts_with('[')
                && rest.ends_with(']')
                && rest
                    .trim_matches(['[', ']'])
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_');
            let key = match rest.split_once(" = ") {
                Some((k, _)) => {
                    (!k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
                        || (k.starts_with('"') && k.ends_with('"'))
                }
                None => false,
            };
            if header || key {
                rest.to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Key paths of `table` that the schema has and `table` lacks. Every uplink type must be shown
/// by an uplink of that type, the uplinks of a type must show all its keys between them
/// (missing: `uplinks.<kafka>.brokers`), and the uplinks all keys every uplink takes
/// (missing: `uplinks.<name>.topics`).
fn missing_keys(table: &Table, node: &Node, path: &str, out: &mut Vec<String>) {
    let Node::Table(keys) = node else { return };
    missing_in(table, keys, path, out);
}

fn missing_in(
    table: &Table,
    keys: &std::collections::BTreeMap<String, Node>,
    path: &str,
    out: &mut Vec<String>,
) {
    for (k, child) in keys {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        match (table.get(k), child) {
            (None, _) => out.push(p),
            (Some(Value::Table(t)), Node::Table(_)) => missing_keys(t, child, &p, out),
            (Some(Value::Table(uplinks)), Node::Named { common, types }) => {
                let mut merged = Table::new();
                for uplink in uplinks.values().filter_map(Value::as_table) {
                    merged.extend(uplink.clone());
                }
                missing_in(&merged, common, &format!("{p}.<name>"), out);
                for (type_name, own) in types {
                    let mut merged = Table::new();
                    for uplink in uplinks.values().filter_map(Value::as_table) {
                        if uplink.get("type").and_then(Value::as_str) == Some(type_name) {
                            merged.extend(uplink.clone());
                        }
                    }
                    let p = format!("{p}.<{type_name}>");
                    if merged.is_empty() {
                        out.push(p);
                    } else {
                        missing_in(&merged, own, &p, out);
                    }
                }
            }
            (Some(Value::Array(items)), Node::Array(element)) => {
                // A key is documented when any element has it.
                let mut merged = Table::new();
                for item in items.iter().filter_map(Value::as_table) {
                    merged.extend(item.clone());
                }
                missing_keys(&merged, element, &format!("{p}[]"), out);
            }
            _ => {}
        }
    }
}

#[test]
fn defaults_are_valid() {
    let config = Config::default();
    config.validate().expect("the default config is valid");
    assert_eq!(load(None, no_env()).expect("no file loads"), config);
    assert_eq!(load_str("", no_env()).expect("empty file loads"), config);
    assert_eq!(config.buffer.max_bytes, 512 * 1024 * 1024);
    assert_eq!(config.mqtt.listen.port(), 1883);
    assert!(config.uplinks.is_empty(), "no uplink is on by default");
    assert_eq!(config.enabled_uplinks().count(), 0);
    check_gateway_id(&config.gateway.id).expect("default id is valid");
}

#[test]
fn default_serializes_and_round_trips() {
    let text = toml::to_string(&Config::default()).expect("serializes");
    let back = load_str(&text, no_env()).expect("serialized defaults load");
    assert_eq!(back, Config::default());

    let text = toml::to_string(&sample()).expect("sample serializes");
    let back: Config = toml::from_str(&text).expect("sample deserializes");
    assert_eq!(back, sample());
}

#[test]
fn example_file_loads_and_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ferry.example.toml");
    let config = load(Some(&path), no_env()).unwrap_or_else(|e| panic!("{e}"));
    let mut expected = Config::default();
    expected.gateway.id = config.gateway.id.clone();
    assert_eq!(config, expected, "the example shows the defaults");
}

#[test]
fn example_uplinks_are_what_their_comments_say() {
    // Uncommented, the example's uplinks are what its comments say they are: one of each type.
    let config: Config = toml::from_str(&uncommented_example()).expect("deserializes");
    let names: Vec<_> = config.uplinks.keys().map(String::as_str).collect();
    assert_eq!(names, ["aws", "gcp", "kafka", "local"]);
    let k = kafka(&config, "kafka");
    assert_eq!(k.routes.len(), 1);
    assert_eq!(k.librdkafka["socket.keepalive.enable"], "true");
    assert_eq!(config.uplinks["kafka"].topics, ["#"]);
    assert_eq!(mqtt(&config, "local").rewrites.len(), 2);
    assert_eq!(config.uplinks["local"].topics, ["alarms/#"]);
    let aws = kinesis(&config, "aws");
    assert_eq!(aws.stream, "ferry-readings");
    assert_eq!(aws.region.as_deref(), Some("eu-west-1"));
    assert_eq!(config.uplinks["aws"].topics, ["sensors/#"]);
    let gcp = pubsub(&config, "gcp");
    assert_eq!(
        (gcp.project.as_str(), gcp.topic.as_str()),
        ("my-project", "ferry-readings")
    );
    assert_eq!(gcp.endpoint.as_deref(), Some("http://127.0.0.1:8085"));
    // The uplinks the example shows are valid, and the values it shows for keys with a default
    // are those defaults.
    let mut both = Config::default();
    for name in ["aws", "gcp"] {
        both.uplinks
            .insert(name.into(), config.uplinks[name].clone());
    }
    both.validate().unwrap_or_else(|e| panic!("{e}"));
    let d = KinesisUplink::default();
    assert_eq!(
        (
            aws.partition_key,
            aws.format,
            aws.max_inflight_requests,
            aws.max_inflight_readings,
            aws.request_timeout_ms,
            aws.initial_backoff_ms,
            aws.max_backoff_ms
        ),
        (
            d.partition_key,
            d.format,
            d.max_inflight_requests,
            d.max_inflight_readings,
            d.request_timeout_ms,
            d.initial_backoff_ms,
            d.max_backoff_ms
        )
    );
    let d = PubsubUplink::default();
    assert_eq!(
        (
            gcp.ordering_key,
            gcp.max_inflight_requests,
            gcp.max_inflight_readings,
            gcp.request_timeout_ms,
            gcp.initial_backoff_ms,
            gcp.max_backoff_ms
        ),
        (
            d.ordering_key,
            d.max_inflight_requests,
            d.max_inflight_readings,
            d.request_timeout_ms,
            d.initial_backoff_ms,
            d.max_backoff_ms
        )
    );
}

#[test]
fn example_file_documents_every_key() {
    let text = uncommented_example();
    let table: Table = text.parse().expect("uncommented example is TOML");
    let mut missing = Vec::new();
    missing_keys(&table, schema(), "", &mut missing);
    assert!(
        missing.is_empty(),
        "keys missing from the example: {missing:?}"
    );

    // Everything in it is a known key of the right type.
    let errors = load_str(&text, no_env()).err();
    let bad: Vec<_> = errors
        .iter()
        .flatten()
        .filter(|e| {
            matches!(
                e.kind,
                ConfigErrorKind::UnknownKey
                    | ConfigErrorKind::InvalidType
                    | ConfigErrorKind::Syntax
            )
        })
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn serialized_keys_are_known() {
    // Every key serde writes (defaults and the fully populated sample) is in the schema,
    // and loads back without unknown-key errors.
    for config in [Config::default(), sample()] {
        let text = toml::to_string(&config).expect("serializes");
        if let Err(errors) = load_str(&text, no_env()) {
            assert!(
                errors
                    .iter()
                    .all(|e| e.kind == ConfigErrorKind::InvalidValue),
                "{errors}"
            );
        }
    }
}

/// The fields serde accepts for `T`, taken from its "unknown field" error.
fn serde_fields<T: for<'de> Deserialize<'de>>() -> BTreeSet<String> {
    let mut t = Table::new();
    t.insert("\u{1}probe".into(), Value::Integer(0));
    let err = T::deserialize(t).err().expect("probe key is rejected");
    let msg = err.message().to_owned();
    let list = msg
        .split_once("expected ")
        .map(|(_, l)| l)
        .unwrap_or_else(|| panic!("unexpected message {msg}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The keys the schema has at `path`; in `[uplinks]`, the segment after `uplinks` is a type.
fn schema_fields(path: &str) -> BTreeSet<String> {
    let mut keys = match schema() {
        Node::Table(keys) => keys,
        _ => panic!("the schema is not a table"),
    };
    let mut segs = path.split('.').filter(|s| !s.is_empty());
    while let Some(seg) = segs.next() {
        let mut node = &keys[seg];
        if let Node::Array(element) = node {
            node = element;
        }
        keys = match node {
            Node::Table(keys) => keys,
            Node::Named { types, .. } => &types[segs.next().expect("a type after uplinks")],
            _ => panic!("{path} is not a table"),
        };
    }
    keys.keys().cloned().collect()
}

#[test]
fn schema_matches_the_structs() {
    // If a field is added to a struct but the sample leaves it out (None / empty), the schema
    // would call the new key unknown; this catches it.
    let cases: Vec<(&str, BTreeSet<String>)> = vec![
        ("", serde_fields::<Config>()),
        ("gateway", serde_fields::<GatewaySettings>()),
        ("buffer", serde_fields::<BufferSettings>()),
        ("mqtt", serde_fields::<MqttSettings>()),
        ("mqtt.users", serde_fields::<MqttUser>()),
        ("mqtt.tls", serde_fields::<MqttTls>()),
        ("http", serde_fields::<HttpSettings>()),
        ("http.tokens", serde_fields::<HttpToken>()),
        ("http.tls", serde_fields::<HttpTls>()),
        ("uplinks.kafka", serde_fields::<KafkaUplink>()),
        ("uplinks.kafka.routes", serde_fields::<KafkaRoute>()),
        ("uplinks.kafka.downlink", serde_fields::<KafkaDownlink>()),
        ("uplinks.kinesis", serde_fields::<KinesisUplink>()),
        ("uplinks.mqtt", serde_fields::<MqttUplink>()),
        ("uplinks.mqtt.rewrites", serde_fields::<TopicRewrite>()),
        ("uplinks.mqtt.downlink", serde_fields::<MqttDownlink>()),
        ("uplinks.pubsub", serde_fields::<PubsubUplink>()),
        ("status", serde_fields::<StatusSettings>()),
    ];
    for (path, fields) in cases {
        assert_eq!(schema_fields(path), fields, "keys of [{path}]");
    }
    let Node::Table(root) = schema() else {
        panic!("the schema is not a table")
    };
    let Node::Named { common, types } = &root["uplinks"] else {
        panic!("uplinks is not a table of named uplinks")
    };
    assert_eq!(
        common.keys().map(String::as_str).collect::<Vec<_>>(),
        ["enabled", "topics"]
    );
    assert_eq!(types.keys().copied().collect::<Vec<_>>(), UplinkKind::TYPES);
}

/// The keys an uplink of type `t` cannot do without (names only the user knows), with a
/// valid value each.
fn required_keys(t: &str) -> &'static [(&'static str, &'static str)] {
    match t {
        "kafka" | "mqtt" => &[],
        "kinesis" => &[("stream", "s")],
        "pubsub" => &[("project", "p"), ("topic", "t-1")],
        _ => panic!("type {t} is new: list its required keys in required_keys()"),
    }
}

#[test]
fn every_uplink_type_has_a_sample_and_valid_defaults() {
    let sampled: Vec<_> = sample_uplinks()
        .iter()
        .map(|u| u.kind.type_name())
        .collect();
    assert_eq!(sampled, UplinkKind::TYPES);
    for u in sample_uplinks() {
        let t = u.kind.type_name();
        // `type` is what serde writes and reads.
        let table = Table::try_from(&u).expect("serializes");
        assert_eq!(table["type"].as_str(), Some(t));
        // An uplink of a type with its required keys and nothing else is valid: the defaults
        // of the other keys are.
        let required = required_keys(t);
        let with = |skip: Option<&str>| {
            let mut text = format!("[uplinks.x]\ntype = \"{t}\"\n");
            for (k, v) in required.iter().filter(|(k, _)| Some(*k) != skip) {
                text.push_str(&format!("{k} = \"{v}\"\n"));
            }
            load_str(&text, no_env())
        };
        let config = with(None).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(config.uplinks["x"].kind.type_name(), t);
        // ... and each of them is required.
        for (k, _) in required {
            let errors = with(Some(k)).expect_err(k);
            let path = format!("uplinks.x.{k}");
            assert_eq!(paths(&errors), [path.as_str()], "{t}: {errors}");
            assert!(
                message(&errors, &path).starts_with("is required"),
                "{errors}"
            );
        }
    }
    // An uplink whose type is missing or unknown is checked as one of the first type with its
    // defaults: they must be valid alone, so that only the type is reported.
    assert!(required_keys(UplinkKind::TYPES[0]).is_empty());
    for text in ["[uplinks.x]\n", "[uplinks.x]\ntype = \"eventhubs\"\n"] {
        let errors = load_str(text, no_env()).expect_err(text);
        assert_eq!(paths(&errors), ["uplinks.x.type"], "{errors}");
    }
}

#[test]
fn key_paths_of_uplinks() {
    let paths = key_paths();
    for p in [
        "uplinks.<name>.type",
        "uplinks.<name>.enabled",
        "uplinks.<name>.topics",
        "uplinks.<name>.brokers",
        "uplinks.<name>.routes[].filter",
        "uplinks.<name>.librdkafka.*",
        "uplinks.<name>.url",
        "uplinks.<name>.rewrites[].template",
        "uplinks.<name>.initial_backoff_ms",
        "uplinks.<name>.stream",
        "uplinks.<name>.partition_key",
        "uplinks.<name>.secret_access_key",
        "uplinks.<name>.project",
        "uplinks.<name>.ordering_key",
        "uplinks.<name>.credentials_file",
        "uplinks.<name>.max_inflight_requests",
    ] {
        assert!(paths.contains(&p.to_owned()), "{p} missing from {paths:?}");
    }
    let unique: BTreeSet<_> = paths.iter().collect();
    assert_eq!(
        unique.len(),
        paths.len(),
        "a key shared by types is listed once"
    );
    let uplink_keys = paths.iter().filter(|p| p.starts_with("uplinks.")).count();
    let type_keys: BTreeSet<String> = [
        serde_fields::<KafkaUplink>(),
        serde_fields::<KinesisUplink>(),
        serde_fields::<MqttUplink>(),
        serde_fields::<PubsubUplink>(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let expected = 1
        + 2
        + type_keys
            .iter()
            .map(|k| match k.as_str() {
                "routes" => serde_fields::<KafkaRoute>().len(),
                "rewrites" => serde_fields::<TopicRewrite>().len(),
                // A Kafka table and an MQTT array of tables.
                "downlink" => {
                    serde_fields::<KafkaDownlink>().len() + serde_fields::<MqttDownlink>().len()
                }
                _ => 1,
            })
            .sum::<usize>();
    assert_eq!(uplink_keys, expected, "{paths:?}");
    assert!(!paths.iter().any(|p| p.starts_with("uplink.")));
}

#[test]
fn env_names_are_unambiguous() {
    let paths = key_paths();
    let names: BTreeSet<String> = paths
        .iter()
        .filter(|p| !p.contains("[]") && !p.ends_with(".*"))
        .map(|p| env_var_name(p))
        .collect();
    let count = paths
        .iter()
        .filter(|p| !p.contains("[]") && !p.ends_with(".*"))
        .count();
    assert_eq!(names.len(), count);
}

const BAD: &str = r#"
[buffer]
max_byte = 1000000000
flush_interval_ms = "soon"
compression_level = 12

[mqtt]
max_inflight = 70000

[uplinks.kafka]
type = "kafka"
compression = "brotli"
brokers = "a:9092,b"

[[uplinks.kafka.routes]]
filter = "sensors/#"
topic = "all"

[[uplinks.kafka.routes]]
filter = "a/+/b"
topic = "ab"

[[uplinks.kafka.routes]]
filter = "sensors/temp+/x"
topic = "temp"

[stauts]
token = "x"
"#;

#[test]
fn bad_file_reports_every_problem() {
    let errors = load_str(BAD, no_env()).expect_err("bad config");
    let text = errors.to_string();
    let expect = [
        (
            "buffer.max_byte",
            ConfigErrorKind::UnknownKey,
            "unknown key; did you mean 'max_bytes'?",
        ),
        (
            "buffer.flush_interval_ms",
            ConfigErrorKind::InvalidType,
            "invalid type",
        ),
        (
            "buffer.compression_level",
            ConfigErrorKind::InvalidValue,
            "between 0 and 9",
        ),
        ("mqtt.max_inflight", ConfigErrorKind::InvalidType, "u16"),
        (
            "uplinks.kafka.compression",
            ConfigErrorKind::InvalidType,
            "brotli",
        ),
        (
            "uplinks.kafka.brokers",
            ConfigErrorKind::InvalidValue,
            "'b'",
        ),
        (
            "uplinks.kafka.routes[2].filter",
            ConfigErrorKind::InvalidValue,
            "'+' must stand alone in a level",
        ),
        (
            "stauts",
            ConfigErrorKind::UnknownKey,
            "did you mean 'status'?",
        ),
    ];
    for (path, kind, message) in expect {
        let e = errors
            .find(path)
            .unwrap_or_else(|| panic!("no error for {path} in:\n{text}"));
        assert_eq!(e.kind, kind, "{e}");
        assert!(e.message.contains(message), "{e}");
    }
    assert_eq!(errors.len(), expect.len(), "{text}");
    assert_eq!(text.lines().count(), errors.len(), "one line per problem");
    assert!(
        text.contains("buffer.max_byte: unknown key; did you mean 'max_bytes'?"),
        "{text}"
    );
}

#[test]
fn syntax_error_has_line_and_column() {
    let errors = load_str("[buffer]\nmax_bytes = = 3\n", no_env()).expect_err("syntax");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors.0[0].kind, ConfigErrorKind::Syntax);
    assert!(errors.0[0].path.starts_with("<config>:2:"), "{errors}");
}

#[test]
fn missing_file_is_an_io_error() {
    let errors = load(Some(Path::new("/nonexistent/ferry.toml")), no_env()).expect_err("io");
    assert_eq!(errors.0[0].kind, ConfigErrorKind::Io);
}

#[test]
fn unknown_keys_in_arrays_and_nested_tables() {
    let text = r#"
[[mqtt.users]]
username = "a"
password = "p"

[[mqtt.users]]
username = "b"
passwrd = "p"

[mqtt.tls]
cert_path = "c"
key_path = "k"
require_client_cert = true
"#;
    let errors = load_str(text, no_env()).expect_err("bad");
    let e = errors.find("mqtt.users[1].passwrd").expect("unknown key");
    assert!(e.message.contains("did you mean 'password'?"), "{e}");
    assert!(errors.find("mqtt.users[1]").is_some(), "{errors}");
    assert!(
        errors.find("mqtt.tls.require_client_cert").is_some(),
        "{errors}"
    );
}

#[test]
fn env_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ferry.toml");
    std::fs::write(
        &file,
        "[buffer]\nmax_bytes = 2000000\n[gateway]\nid = \"gw1\"\n",
    )
    .expect("write");
    let config = load(
        Some(&file),
        env(&[
            ("FERRY_BUFFER_MAX_BYTES", "4194304"),
            ("FERRY_BUFFER_MAX_BATCH_BYTES", "1000"),
            ("FERRY_UPLINKS_KAFKA_TYPE", "kafka"),
            ("FERRY_UPLINKS_KAFKA_BROKERS", "a:9092,b:9092"),
            ("FERRY_GATEWAY_DATA_DIR", "/var/lib/ferry"),
            ("FERRY_GATEWAY_ID", "1234"),
            ("FERRY_MQTT_ENABLED", "false"),
            ("FERRY_MQTT_DEVICE_FROM_TOPIC_LEVEL", "2"),
            ("FERRY_UPLINKS_KAFKA_KEY", "level:1"),
            (
                "FERRY_HTTP_TOKENS",
                r#"[{ token = "s3cret", name = "ci" }]"#,
            ),
            ("FERRY_STATUS_TOKEN", "tok"),
            ("FERRY_LOG", "debug"),
            ("FERRY_REQUIRE_TOOLS", "1"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.buffer.max_bytes, 4_194_304);
    assert_eq!(config.buffer.max_batch_bytes, 1000);
    assert_eq!(kafka(&config, "kafka").brokers, "a:9092,b:9092");
    assert_eq!(config.gateway.data_dir, Path::new("/var/lib/ferry"));
    assert_eq!(config.gateway.id, "1234", "string keys take the text as is");
    assert!(!config.mqtt.enabled);
    assert_eq!(config.mqtt.device_from_topic_level, Some(2));
    assert_eq!(kafka(&config, "kafka").key, KeyRule::Level(1));
    assert_eq!(config.http.tokens.len(), 1);
    assert_eq!(config.http.tokens[0].token.expose(), "s3cret");
    assert_eq!(
        config.status.token.as_ref().map(Secret::expose),
        Some("tok")
    );
}

#[test]
fn env_errors() {
    let errors = load_str(
        "",
        env(&[
            ("FERRY_BUFFER_MAX_BYTE", "1"),
            ("FERRY_NOPE", "1"),
            ("FERRY_BUFFER_COMPRESSION_LEVEL", "eleven"),
            ("FERRY_BUFFER_MAX_BATCH_READINGS", "0"),
        ]),
    )
    .expect_err("bad env");
    let e = errors.find("FERRY_BUFFER_MAX_BYTE").expect("unknown var");
    assert_eq!(e.kind, ConfigErrorKind::Env);
    assert!(
        e.message.contains("did you mean 'FERRY_BUFFER_MAX_BYTES'?"),
        "{e}"
    );
    assert_eq!(
        errors.find("FERRY_NOPE").map(|e| e.kind),
        Some(ConfigErrorKind::Env)
    );
    let e = errors.find("buffer.compression_level").expect("type error");
    assert_eq!(e.kind, ConfigErrorKind::InvalidType);
    assert!(
        e.message
            .contains("(set by FERRY_BUFFER_COMPRESSION_LEVEL)"),
        "{e}"
    );
    let e = errors.find("buffer.max_batch_readings").expect("invalid");
    assert_eq!(e.kind, ConfigErrorKind::InvalidValue);
    assert_eq!(errors.len(), 4, "{errors}");
}

#[test]
fn env_is_checked_even_with_a_syntax_error() {
    let errors = load_str("[[", env(&[("FERRY_BUFER_MAX_BYTES", "1")])).expect_err("bad");
    let kinds: Vec<_> = errors.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [ConfigErrorKind::Syntax, ConfigErrorKind::Env]);
}

#[test]
fn secret_debug_hides_the_value() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(s.expose(), "hunter2");

    let mut config = sample();
    let Some(UplinkKind::Kafka(k)) = config.uplinks.get_mut("kafka").map(|u| &mut u.kind) else {
        panic!("the sample has a Kafka uplink")
    };
    k.sasl_password = Some("kafka-pw-42".into());
    let Some(UplinkKind::Mqtt(m)) = config.uplinks.get_mut("mqtt").map(|u| &mut u.kind) else {
        panic!("the sample has an MQTT uplink")
    };
    m.password = Some("upstream-pw-42".into());
    let Some(UplinkKind::Kinesis(k)) = config.uplinks.get_mut("kinesis").map(|u| &mut u.kind)
    else {
        panic!("the sample has a Kinesis uplink")
    };
    k.secret_access_key = Some("aws-secret-42".into());
    k.session_token = Some("aws-session-42".into());
    config.http.tokens[0].token = "http-token-42".into();
    config.mqtt.users[0].password = Some("mqtt-pw-42".into());
    config.status.token = Some("status-token-42".into());
    let debug = format!("{config:?} {config:#?}");
    for secret in [
        "kafka-pw-42",
        "upstream-pw-42",
        "aws-secret-42",
        "aws-session-42",
        "http-token-42",
        "mqtt-pw-42",
        "status-token-42",
    ] {
        assert!(!debug.contains(secret), "{secret} leaked");
    }
}

#[test]
fn key_rule_round_trip() {
    for (text, rule) in [
        ("device", KeyRule::Device),
        ("topic", KeyRule::Topic),
        ("none", KeyRule::None),
        ("level:0", KeyRule::Level(0)),
        ("level:12", KeyRule::Level(12)),
    ] {
        assert_eq!(text.parse::<KeyRule>(), Ok(rule));
        assert_eq!(rule.to_string(), text);
        let toml_text = format!("key = \"{text}\"\n");
        #[derive(Debug, PartialEq, Deserialize, serde::Serialize)]
        struct W {
            key: KeyRule,
        }
        let w: W = toml::from_str(&toml_text).expect("deserializes");
        assert_eq!(w.key, rule);
        assert_eq!(toml::to_string(&w).expect("serializes"), toml_text);
    }
    for bad in [
        "", "Device", "level:", "level:x", "level:-1", "level: 1", "key",
    ] {
        assert!(bad.parse::<KeyRule>().is_err(), "{bad}");
    }
    let errors =
        load_str("[uplinks.k]\ntype = \"kafka\"\nkey = \"level\"\n", no_env()).expect_err("bad");
    assert_eq!(paths(&errors), ["uplinks.k.key"]);
}

#[test]
fn kafka_topics() {
    assert!(check_kafka_topic("ferry.readings_v1-x").is_ok());
    for bad in ["", ".", "..", "a b", "a/b", &"x".repeat(250)] {
        assert!(check_kafka_topic(bad).is_err(), "{bad}");
    }
    assert!(check_kafka_topic(&"x".repeat(249)).is_ok());
}

#[test]
fn gateway_ids() {
    assert!(check_gateway_id("gw-7.site_a").is_ok());
    for bad in ["", "a b", "ü", &"x".repeat(65)] {
        assert!(check_gateway_id(bad).is_err(), "{bad}");
    }
}

/// A `{#}` template, documented since rewrites existed, loads (validation used to refuse any
/// '#' in a template), and one without a trailing '#' to refer to is refused.
#[test]
fn rewrite_templates_take_the_hash_placeholder() {
    let cfg = |filter: &str| {
        format!(
            "[uplinks.up]\ntype = \"mqtt\"\nurl = \"mqtt://b\"\n\n[[uplinks.up.rewrites]]\nfilter = \"{filter}\"\ntemplate = \"archive/{{#}}\"\n"
        )
    };
    load_str(&cfg("logs/#"), no_env()).expect("a {#} template with a trailing '#' loads");
    let errors = load_str(&cfg("logs/+"), no_env()).expect_err("no '#' to refer to");
    assert_eq!(
        paths(&errors),
        ["uplinks.up.rewrites[0].template"],
        "{errors}"
    );
}

#[test]
fn rewrites_and_mqtt_uplink() {
    let text = r#"
[uplinks.up]
type = "mqtt"
url = "mqtts://broker.example:8884"
qos = 2
client_cert_path = "c.pem"

[[uplinks.up.rewrites]]
filter = "sensors/+/+"
template = "site/{2}/{1}"

[[uplinks.up.rewrites]]
filter = "sensors/+/#"
template = "site/{2}"

[[uplinks.up.rewrites]]
filter = "a/#/b"
template = "x/{0}"
"#;
    let errors = load_str(text, no_env()).expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.up.qos",
            "uplinks.up.client_key_path",
            "uplinks.up.rewrites[1].template",
            "uplinks.up.rewrites[2].filter",
            "uplinks.up.rewrites[2].template",
        ],
        "{errors}"
    );
    let ep = MqttEndpoint::parse("mqtts://broker.example").expect("valid");
    assert_eq!(
        (ep.tls, ep.host.as_str(), ep.port),
        (true, "broker.example", 8883)
    );
    let ep = MqttEndpoint::parse("mqtt://[::1]:1884").expect("valid");
    assert_eq!((ep.tls, ep.host.as_str(), ep.port), (false, "::1", 1884));
    for bad in [
        "http://x",
        "mqtt://",
        "mqtt://h:0",
        "mqtt://h:x",
        "mqtt://h/path",
    ] {
        assert!(MqttEndpoint::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn cross_field_rules() {
    let text = r#"
[buffer]
max_bytes = 2097152
max_batch_bytes = 1048576

[mqtt]
allow_anonymous = false

[[mqtt.users]]
username = "a"
password = "p"
password_hash = "$argon2id$x"

[[mqtt.users]]
username = "a"
password_hash = "plain"

[http]
max_body_bytes = 10
max_decompressed_bytes = 5

[[http.tokens]]
token = "t"

[[http.tokens]]
token = "t"

[uplinks.kafka]
type = "kafka"
security_protocol = "sasl_ssl"
sasl_mechanism = "SCRAM-SHA-256"
initial_backoff_ms = 10
max_backoff_ms = 5
topic = ".."

[status]
listen = "0.0.0.0:8080"
"#;
    let errors = load_str(text, no_env()).expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "buffer.max_batch_bytes",
            "mqtt.users[0]",
            "mqtt.users[1].username",
            "mqtt.users[1].password_hash",
            "http.max_decompressed_bytes",
            "http.tokens[1].token",
            "uplinks.kafka.topic",
            "uplinks.kafka.initial_backoff_ms",
            "uplinks.kafka.sasl_username",
            "uplinks.kafka.sasl_password",
            "status.listen",
        ],
        "{errors}"
    );
    // No anonymous access with users is fine; without users it is not.
    let errors = load_str("[mqtt]\nallow_anonymous = false\n", no_env()).expect_err("bad");
    assert_eq!(paths(&errors), ["mqtt.allow_anonymous"]);
}

#[test]
fn group_commit_limits() {
    let errors = load_str(
        "[buffer]\nmax_flush_delay_ms = 10001\nflush_target_bytes = 0\n",
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        ["buffer.flush_target_bytes", "buffer.max_flush_delay_ms"],
        "{errors}"
    );
    let text = errors.to_string();
    assert!(text.contains("at most 10000"), "{text}");
    let config = load_str(
        "[buffer]\nmax_flush_delay_ms = 10000\nflush_target_bytes = 1\n",
        no_env(),
    )
    .expect("valid");
    assert_eq!(
        (
            config.buffer.max_flush_delay_ms,
            config.buffer.flush_target_bytes
        ),
        (10_000, 1)
    );
    let d = Config::default();
    assert_eq!(
        (d.buffer.max_flush_delay_ms, d.buffer.flush_target_bytes),
        (100, 256 * 1024)
    );
}

#[test]
fn kafka_inflight_windows() {
    let errors = load_str(
        "[uplinks.k]\ntype = \"kafka\"\nmax_inflight_segments = 0\nmax_inflight_readings = 0\n",
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.k.max_inflight_segments",
            "uplinks.k.max_inflight_readings"
        ],
        "{errors}"
    );
    let config = load_str(
        "[uplinks.k]\ntype = \"kafka\"\nmax_inflight_readings = 1\n",
        env(&[("FERRY_UPLINKS_K_MAX_INFLIGHT_SEGMENTS", "3")]),
    )
    .expect("valid");
    let k = kafka(&config, "k");
    assert_eq!((k.max_inflight_segments, k.max_inflight_readings), (3, 1));
    let d = KafkaUplink::default();
    assert_eq!(
        (d.max_inflight_segments, d.max_inflight_readings),
        (256, 20_000)
    );
}

#[test]
fn sasl_mechanism_names() {
    let config = load_str(
        r#"
[uplinks.kafka]
type = "kafka"
security_protocol = "sasl_plaintext"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "u"
sasl_password = "p"
"#,
        no_env(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        kafka(&config, "kafka").sasl_mechanism,
        Some(SaslMechanism::ScramSha512)
    );
    let errors = load_str(
        "[uplinks.kafka]\ntype = \"kafka\"\nsasl_mechanism = \"plain\"\n",
        no_env(),
    )
    .expect_err("lower case is wrong");
    assert_eq!(paths(&errors), ["uplinks.kafka.sasl_mechanism"]);
    assert_eq!(errors.0[0].kind, ConfigErrorKind::InvalidType);
}

#[test]
fn client_id_default() {
    let mut config = Config::default();
    config.gateway.id = "gw1".into();
    let mut m = MqttUplink::default();
    assert_eq!(config.mqtt_client_id("local", &m), "ferry-gw1-local");
    m.client_id = Some("x".into());
    assert_eq!(config.mqtt_client_id("local", &m), "x");
}

#[cfg(unix)]
#[test]
fn private_keys_others_can_read_are_refused_and_an_open_data_dir_warns() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("server.key");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let toml = format!(
        "[gateway]\ndata_dir = {data:?}\n[mqtt.tls]\ncert_path = \"c.pem\"\nkey_path = {key:?}\n\
         [http.tls]\ncert_path = \"c.pem\"\nkey_path = {key:?}\n\
         [uplinks.up]\ntype = \"mqtt\"\nclient_cert_path = \"c.pem\"\nclient_key_path = {key:?}\n\
         [uplinks.off]\ntype = \"mqtt\"\nenabled = false\nclient_id = \"other\"\n\
         client_cert_path = \"c.pem\"\nclient_key_path = {key:?}\n"
    );
    let set = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    set(&key, 0o644);
    let errors = load_str(&toml, no_env()).unwrap_err();
    assert_eq!(
        paths(&errors),
        [
            "mqtt.tls.key_path",
            "http.tls.key_path",
            "uplinks.off.client_key_path",
            "uplinks.up.client_key_path"
        ]
    );
    let e = &errors.errors()[0];
    assert_eq!(e.kind, ConfigErrorKind::Permissions);
    assert!(
        e.message.contains("mode 0644") && e.message.contains("chmod 600"),
        "{e}"
    );
    for ok in [0o600, 0o640, 0o400] {
        set(&key, ok);
        load_str(&toml, no_env()).unwrap_or_else(|e| panic!("mode {ok:o}: {e}"));
    }
    // The data directory: a warning, not an error.
    set(&data, 0o755);
    let config = load_str(&toml, no_env()).unwrap();
    let warnings = config.warnings();
    assert_eq!(paths(&ConfigErrors(warnings.clone())), ["gateway.data_dir"]);
    assert!(warnings[0].message.contains("mode 0755"), "{}", warnings[0]);
    set(&data, 0o750);
    assert!(config.warnings().is_empty());
}

#[test]
fn a_secret_of_the_wrong_type_is_not_echoed() {
    let errors = load_str(
        "[[mqtt.users]]\nusername = \"u\"\npassword = 987654321\n[status]\ntoken = 1234567\n\
         [uplinks.kafka]\ntype = \"kafka\"\nsasl_password = 7654321\n",
        no_env(),
    )
    .unwrap_err();
    let text = errors.to_string();
    for secret in ["987654321", "1234567", "7654321"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert!(text.contains("mqtt.users[0].password: invalid type: integer, expected a string"));
}

#[test]
fn no_uplink_is_valid() {
    let config = load_str("[gateway]\nid = \"gw\"\n", no_env()).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.uplinks.is_empty());
    config.validate().expect("valid");
}

#[test]
fn two_uplinks_of_the_same_type() {
    let config = load_str(
        r#"
[uplinks.cloud]
type = "kafka"
brokers = "k1:9092"

[uplinks.backup]
type = "kafka"
brokers = "k2:9092"
delivery = "segment"
enabled = false

[uplinks.local]
type = "mqtt"
topics = ["alarms/#", "sensors/+/temp"]
"#,
        no_env(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kafka(&config, "cloud").brokers, "k1:9092");
    assert_eq!(kafka(&config, "backup").brokers, "k2:9092");
    assert_eq!(kafka(&config, "backup").delivery, Delivery::Segment);
    assert_eq!(kafka(&config, "cloud").delivery, Delivery::Reading);
    assert_eq!(
        config.uplinks["local"].topics,
        ["alarms/#", "sensors/+/temp"]
    );
    let enabled: Vec<_> = config.enabled_uplinks().map(|(name, _)| name).collect();
    assert_eq!(enabled, ["cloud", "local"]);
}

#[test]
fn uplink_defaults() {
    let config = load_str("[uplinks.x]\ntype = \"mqtt\"\n", no_env()).expect("valid");
    let x = &config.uplinks["x"];
    assert!(x.enabled);
    assert_eq!(x.topics, ["#"]);
    assert_eq!(x.kind, UplinkKind::Mqtt(MqttUplink::default()));
    assert_eq!(
        *x,
        UplinkSettings::new(UplinkKind::Mqtt(MqttUplink::default()))
    );
    assert_eq!(x.kind.type_name(), "mqtt");
}

#[test]
fn a_variant_still_denies_unknown_fields() {
    // The loader checks keys before serde sees them; serde's own check is the backstop.
    let ok: UplinkSettings =
        toml::from_str("type = \"kafka\"\nbrokers = \"k:1\"\nenabled = false\n").expect("valid");
    assert!(!ok.enabled);
    for text in [
        "type = \"kafka\"\nbogus = 1\n",
        "type = \"kafka\"\nurl = \"mqtt://x\"\n",
    ] {
        let e = toml::from_str::<UplinkSettings>(text).expect_err(text);
        assert!(e.message().contains("unknown field"), "{e}");
    }
    let e = toml::from_str::<UplinkSettings>("brokers = \"k:1\"\n").expect_err("no type");
    assert!(e.message().contains("type"), "{e}");
}

#[test]
fn missing_type() {
    let errors = load_str(
        r#"
[uplinks.Cloud]
brokers = "k1:9092"
url = 5
broker = "x"
topics = ["a/#/b"]
"#,
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.Cloud.type",
            "uplinks.Cloud.broker",
            "uplinks.Cloud",
            "uplinks.Cloud.topics[0]",
        ],
        "keys of a type are not reported (nor their types checked) without a type: {errors}"
    );
    assert_eq!(
        message(&errors, "uplinks.Cloud.type"),
        "missing; one of kafka, kinesis, mqtt, pubsub"
    );
    assert_eq!(
        message(&errors, "uplinks.Cloud.broker"),
        "unknown key; did you mean 'brokers'?"
    );
    let e = errors.find("uplinks.Cloud.type").expect("error");
    assert_eq!(e.kind, ConfigErrorKind::InvalidValue);
}

#[test]
fn unknown_type() {
    let errors = load_str(
        "[uplinks.a]\ntype = \"kafkaa\"\nbrokers = \"k:1\"\nenabled = \"yes\"\n\
         [uplinks.b]\ntype = \"eventhubs\"\n[uplinks.c]\ntype = 3\n",
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.a.type",
            "uplinks.a.enabled",
            "uplinks.b.type",
            "uplinks.c.type"
        ],
        "{errors}"
    );
    assert_eq!(
        message(&errors, "uplinks.a.type"),
        "unknown uplink type 'kafkaa'; did you mean 'kafka'? (types: kafka, kinesis, mqtt, pubsub)"
    );
    assert_eq!(
        message(&errors, "uplinks.b.type"),
        "unknown uplink type 'eventhubs' (types: kafka, kinesis, mqtt, pubsub)"
    );
    assert_eq!(
        message(&errors, "uplinks.c.type"),
        "invalid type: integer, expected a string: one of kafka, kinesis, mqtt, pubsub"
    );
    assert!(
        errors
            .iter()
            .all(|e| e.kind == ConfigErrorKind::InvalidType),
        "{errors:?}"
    );
}

#[test]
fn a_key_of_another_type() {
    let errors = load_str(
        "[uplinks.cloud]\ntype = \"kafka\"\nurl = \"mqtt://x\"\n\
         [uplinks.local]\ntype = \"mqtt\"\nbrokers = \"k:1\"\ntopic = \"t\"\n",
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.cloud.url",
            "uplinks.local.brokers",
            "uplinks.local.topic"
        ],
        "{errors}"
    );
    assert_eq!(
        message(&errors, "uplinks.cloud.url"),
        "`url` is a key of type mqtt; this uplink is type kafka"
    );
    assert_eq!(
        message(&errors, "uplinks.local.brokers"),
        "`brokers` is a key of type kafka; this uplink is type mqtt"
    );
    assert_eq!(
        message(&errors, "uplinks.local.topic"),
        "`topic` is a key of type kafka, pubsub; this uplink is type mqtt; did you mean 'topics'?"
    );
    assert!(errors.iter().all(|e| e.kind == ConfigErrorKind::UnknownKey));
}

#[test]
fn typos_inside_an_uplink() {
    let errors = load_str(
        "[uplinks.cloud]\ntype = \"kafka\"\nbrokerz = \"k:1\"\ntopicss = [\"#\"]\n\
         [uplinks.local]\ntype = \"mqtt\"\nclientid = \"c\"\nzzzzzz = 1\n",
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        message(&errors, "uplinks.cloud.brokerz"),
        "unknown key; did you mean 'brokers'?"
    );
    assert_eq!(
        message(&errors, "uplinks.cloud.topicss"),
        "unknown key; did you mean 'topics'?"
    );
    assert_eq!(
        message(&errors, "uplinks.local.clientid"),
        "unknown key; did you mean 'client_id'?"
    );
    let list = message(&errors, "uplinks.local.zzzzzz");
    assert!(
        list.starts_with("unknown key; valid keys here are ")
            && list.contains("'url'")
            && list.contains("'topics'")
            && list.contains("'type'")
            && !list.contains("'brokers'"),
        "{list}"
    );
    assert_eq!(errors.len(), 4, "{errors}");
}

#[test]
fn errors_inside_an_uplink_have_full_paths() {
    let errors = load_str(
        r#"
[uplinks.cloud]
type = "kafka"
max_inflight_segments = "many"
sasl_password = 7654321

[[uplinks.cloud.routes]]
filter = 5
topic = "t"
topc = "x"

[[uplinks.cloud.routes]]
filter = "a/#/b"
topic = "t"

[uplinks.cloud.librdkafka]
"socket.keepalive.enable" = true
"#,
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.cloud.librdkafka.\"socket.keepalive.enable\"",
            "uplinks.cloud.max_inflight_segments",
            "uplinks.cloud.routes[0].filter",
            "uplinks.cloud.routes[0].topc",
            "uplinks.cloud.sasl_password",
            "uplinks.cloud.routes[1].filter",
        ],
        "{errors}"
    );
    assert!(
        message(&errors, "uplinks.cloud.max_inflight_segments").contains("expected usize"),
        "{errors}"
    );
    assert_eq!(
        message(&errors, "uplinks.cloud.routes[0].topc"),
        "unknown key; did you mean 'topic'?"
    );
    assert!(!errors.to_string().contains("7654321"), "{errors}");

    let errors = load_str("[uplinks]\nx = 5\n", no_env()).expect_err("bad");
    assert_eq!(paths(&errors), ["uplinks.x"]);
    assert_eq!(
        message(&errors, "uplinks.x"),
        "expected a table, found integer"
    );
    let errors = load_str("uplinks = 5\n", no_env()).expect_err("bad");
    assert_eq!(paths(&errors), ["uplinks"]);
}

#[test]
fn the_uplink_tables_of_ferry_0_1_are_explained() {
    let errors = load_str(
        "[uplink.kafka]\nbrokers = \"k:1\"\n[uplink.mqtt]\nenabled = true\n",
        no_env(),
    )
    .expect_err("old shape");
    assert_eq!(paths(&errors), ["uplink.kafka", "uplink.mqtt"], "{errors}");
    assert_eq!(
        message(&errors, "uplink.kafka"),
        "[uplink.kafka] is now [uplinks.kafka] with type = \"kafka\" (uplinks are named now; \
         the name kafka keeps the buffer cursor of ferry 0.1)"
    );
    let m = message(&errors, "uplink.mqtt");
    assert!(
        m.starts_with("[uplink.mqtt] is now [uplinks.mqtt] with type = \"mqtt\"")
            && m.contains("on unless enabled = false"),
        "{m}"
    );
    assert!(errors.iter().all(|e| e.kind == ConfigErrorKind::UnknownKey));

    let errors = load_str("uplink = 3\n", no_env()).expect_err("old shape");
    assert_eq!(paths(&errors), ["uplink"]);
    assert!(
        message(&errors, "uplink").contains("[uplinks.NAME] tables now"),
        "{errors}"
    );
}

#[test]
fn env_sets_a_key_of_an_uplink_of_the_file() {
    let config = load_str(
        "[uplinks.cloud]\ntype = \"kafka\"\nbrokers = \"a:1\"\n",
        env(&[
            ("FERRY_UPLINKS_CLOUD_BROKERS", "k1:9092,k2:9092"),
            ("FERRY_UPLINKS_CLOUD_TOPICS", r#"["a/#", "b/+"]"#),
            ("FERRY_UPLINKS_CLOUD_ENABLED", "false"),
            ("FERRY_UPLINKS_CLOUD_MAX_INFLIGHT_SEGMENTS", "3"),
            ("FERRY_UPLINKS_CLOUD_TOPIC", "1234"),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.uplinks.len(), 1);
    let cloud = &config.uplinks["cloud"];
    assert!(!cloud.enabled);
    assert_eq!(cloud.topics, ["a/#", "b/+"]);
    let k = kafka(&config, "cloud");
    assert_eq!(k.brokers, "k1:9092,k2:9092");
    assert_eq!(k.max_inflight_segments, 3);
    assert_eq!(k.topic, "1234", "string keys take the text as is");

    let errors = load_str(
        "[uplinks.cloud]\ntype = \"kafka\"\n",
        env(&[
            ("FERRY_UPLINKS_CLOUD_URL", "mqtt://x"),
            ("FERRY_UPLINKS_CLOUD_MAX_INFLIGHT_READINGS", "0"),
        ]),
    )
    .expect_err("bad");
    assert_eq!(
        message(&errors, "uplinks.cloud.url"),
        "`url` is a key of type mqtt; this uplink is type kafka (set by FERRY_UPLINKS_CLOUD_URL)"
    );
    assert!(
        message(&errors, "uplinks.cloud.max_inflight_readings")
            .ends_with("(set by FERRY_UPLINKS_CLOUD_MAX_INFLIGHT_READINGS)"),
        "{errors}"
    );
}

#[test]
fn env_creates_an_uplink() {
    let config = load_str(
        "",
        env(&[
            ("FERRY_UPLINKS_EDGE_TYPE", "mqtt"),
            ("FERRY_UPLINKS_EDGE_URL", "mqtt://broker:1884"),
            ("FERRY_UPLINKS_EDGE_CLIENT_ID", "1234"),
            ("FERRY_UPLINKS_EDGE_TOPICS", r#"["alarms/#"]"#),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let m = mqtt(&config, "edge");
    assert_eq!(m.url, "mqtt://broker:1884");
    assert_eq!(m.client_id.as_deref(), Some("1234"));
    assert_eq!(config.uplinks["edge"].topics, ["alarms/#"]);

    // Without a type.
    let errors = load_str("", env(&[("FERRY_UPLINKS_EDGE_BROKERS", "k:1")])).expect_err("bad");
    assert_eq!(paths(&errors), ["uplinks.edge.type"]);
    assert_eq!(
        message(&errors, "uplinks.edge.type"),
        "missing; one of kafka, kinesis, mqtt, pubsub (uplinks.edge is created by \
         FERRY_UPLINKS_EDGE_BROKERS)"
    );
}

#[test]
fn env_refers_to_uplinks_by_upper_cased_name() {
    // `-` is written `_`, and a NAME of the file wins over a longer key.
    let config = load_str(
        "[uplinks.site-a]\ntype = \"mqtt\"\n[uplinks.x_sasl]\ntype = \"mqtt\"\n",
        env(&[
            ("FERRY_UPLINKS_SITE_A_URL", "mqtt://a"),
            ("FERRY_UPLINKS_X_SASL_USERNAME", "u"),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.uplinks.keys().collect::<Vec<_>>(),
        ["site-a", "x_sasl"]
    );
    assert_eq!(mqtt(&config, "site-a").url, "mqtt://a");
    assert_eq!(mqtt(&config, "x_sasl").username.as_deref(), Some("u"));

    // Without such an uplink in the file, the longest key wins.
    let config = load_str(
        "",
        env(&[
            ("FERRY_UPLINKS_X_SASL_USERNAME", "u"),
            ("FERRY_UPLINKS_X_SASL_PASSWORD", "p"),
            ("FERRY_UPLINKS_X_SASL_MECHANISM", "PLAIN"),
            ("FERRY_UPLINKS_X_SECURITY_PROTOCOL", "sasl_ssl"),
            ("FERRY_UPLINKS_X_TYPE", "kafka"),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.uplinks.keys().collect::<Vec<_>>(), ["x"]);
    assert_eq!(kafka(&config, "x").sasl_username.as_deref(), Some("u"));

    // Two uplinks of the file with the same variable name.
    let errors = load_str(
        "[uplinks.a-b]\ntype = \"mqtt\"\n[uplinks.a_b]\ntype = \"mqtt\"\n",
        env(&[("FERRY_UPLINKS_A_B_URL", "mqtt://a")]),
    )
    .expect_err("ambiguous");
    assert_eq!(paths(&errors), ["FERRY_UPLINKS_A_B_URL"]);
    assert!(
        message(&errors, "FERRY_UPLINKS_A_B_URL").contains("'a-b' and 'a_b'"),
        "{errors}"
    );
}

#[test]
fn env_errors_of_uplinks() {
    let errors = load_str(
        "",
        env(&[
            ("FERRY_UPLINK_KAFKA_BROKERS", "k:1"),
            ("FERRY_UPLINK_MQTT_ENABLED", "true"),
            ("FERRY_UPLINKS_CLOUD_BROKRS", "k:1"),
            ("FERRY_UPLINKS_BROKERS", "k:1"),
            ("FERRY_UPLINKS_SITE", "k:1"),
        ]),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "FERRY_UPLINKS_BROKERS",
            "FERRY_UPLINKS_CLOUD_BROKRS",
            "FERRY_UPLINKS_SITE",
            "FERRY_UPLINK_KAFKA_BROKERS",
            "FERRY_UPLINK_MQTT_ENABLED",
        ],
        "{errors}"
    );
    assert!(errors.iter().all(|e| e.kind == ConfigErrorKind::Env));
    assert_eq!(
        message(&errors, "FERRY_UPLINK_KAFKA_BROKERS"),
        "[uplink.kafka] is now [uplinks.kafka] with type = \"kafka\": set \
         FERRY_UPLINKS_KAFKA_BROKERS instead (and FERRY_UPLINKS_KAFKA_TYPE=kafka unless the file \
         has [uplinks.kafka])"
    );
    assert!(
        message(&errors, "FERRY_UPLINK_MQTT_ENABLED").contains("set FERRY_UPLINKS_MQTT_ENABLED"),
        "{errors}"
    );
    assert_eq!(
        message(&errors, "FERRY_UPLINKS_CLOUD_BROKRS"),
        "unknown environment variable; did you mean 'FERRY_UPLINKS_CLOUD_BROKERS'?"
    );
    assert!(
        message(&errors, "FERRY_UPLINKS_BROKERS").starts_with("names no uplink"),
        "{errors}"
    );
    assert!(
        message(&errors, "FERRY_UPLINKS_SITE")
            .starts_with("unknown environment variable: no key of an uplink ends it"),
        "{errors}"
    );
}

#[test]
fn uplink_names() {
    assert!(check_uplink_name("cloud_2-b").is_ok());
    assert!(check_uplink_name(&"x".repeat(64)).is_ok());
    for bad in ["", "Cloud", "a b", "a.b", "ü", &"x".repeat(65)] {
        assert!(check_uplink_name(bad).is_err(), "{bad}");
    }
    let long = "x".repeat(65);
    let text = format!(
        "[uplinks.Cloud]\ntype = \"kafka\"\n[uplinks.\"a b\"]\ntype = \"kafka\"\n\
         [uplinks.{long}]\ntype = \"kafka\"\n[uplinks.ok-1_a]\ntype = \"kafka\"\n"
    );
    let errors = load_str(&text, no_env()).expect_err("bad names");
    let long_path = format!("uplinks.{long}");
    assert_eq!(
        paths(&errors),
        ["uplinks.Cloud", "uplinks.\"a b\"", long_path.as_str()],
        "{errors}"
    );
    assert!(
        message(&errors, "uplinks.Cloud").contains("'C'"),
        "{errors}"
    );
    assert!(message(&errors, &long_path).contains("got 65"), "{errors}");
}

#[test]
fn uplink_topics() {
    let errors = load_str(
        "[uplinks.a]\ntype = \"mqtt\"\ntopics = []\n\
         [uplinks.b]\ntype = \"mqtt\"\ntopics = [\"a/#\", \"a/#/b\", \"\"]\n",
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.a.topics",
            "uplinks.b.topics[1]",
            "uplinks.b.topics[2]"
        ],
        "{errors}"
    );
    let m = message(&errors, "uplinks.a.topics");
    assert!(
        m.contains("forwards nothing") && m.contains("enabled = false"),
        "{m}"
    );
    assert!(
        message(&errors, "uplinks.b.topics[1]").contains("'#' must be the last level"),
        "{errors}"
    );
    let errors = load_str("[uplinks.a]\ntype = \"mqtt\"\ntopics = \"a/#\"\n", no_env())
        .expect_err("not a list");
    assert_eq!(paths(&errors), ["uplinks.a.topics"]);
    assert_eq!(errors.0[0].kind, ConfigErrorKind::InvalidType);
}

#[test]
fn segment_delivery_takes_every_topic() {
    let errors = load_str(
        "[uplinks.k]\ntype = \"kafka\"\ndelivery = \"segment\"\ntopics = [\"a/#\"]\n",
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(paths(&errors), ["uplinks.k.topics"]);
    assert!(
        message(&errors, "uplinks.k.topics").contains("delivery = \"segment\""),
        "{errors}"
    );
    for ok in [
        "[uplinks.k]\ntype = \"kafka\"\ndelivery = \"segment\"\n",
        "[uplinks.k]\ntype = \"kafka\"\ndelivery = \"segment\"\ntopics = [\"#\"]\n",
        "[uplinks.k]\ntype = \"kafka\"\ndelivery = \"reading\"\ntopics = [\"a/#\"]\n",
    ] {
        load_str(ok, no_env()).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn mqtt_uplinks_with_one_client_id_on_one_broker() {
    let two = |a: &str, b: &str| {
        format!(
            "[gateway]\nid = \"gw\"\n[uplinks.a]\ntype = \"mqtt\"\n{a}\n[uplinks.b]\ntype = \"mqtt\"\n{b}\n"
        )
    };
    let errors = load_str(
        &two(
            "url = \"mqtt://Broker\"\nclient_id = \"same\"",
            "url = \"mqtt://broker:1883\"\nclient_id = \"same\"",
        ),
        no_env(),
    )
    .expect_err("clash");
    assert_eq!(paths(&errors), ["uplinks.b.client_id"]);
    assert_eq!(
        message(&errors, "uplinks.b.client_id"),
        "'same' is also the client id of uplinks.a on the same broker (broker:1883): the broker \
         would disconnect one whenever the other connects; give each a client_id of its own"
    );
    // The default client id: ferry-gw-a against an explicit one.
    let errors = load_str(
        &two(
            "url = \"mqtt://h\"",
            "url = \"mqtt://h\"\nclient_id = \"ferry-gw-a\"",
        ),
        no_env(),
    )
    .expect_err("clash");
    assert_eq!(paths(&errors), ["uplinks.b.client_id"]);
    for ok in [
        two("url = \"mqtt://h\"", "url = \"mqtt://h\""),
        two(
            "url = \"mqtt://h\"\nclient_id = \"same\"",
            "url = \"mqtt://h:1884\"\nclient_id = \"same\"",
        ),
        two(
            "url = \"mqtt://h\"\nclient_id = \"same\"",
            "url = \"mqtt://h\"\nclient_id = \"same\"\nenabled = false",
        ),
    ] {
        load_str(&ok, no_env()).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// `[uplinks.aws]` of type kinesis with `stream = "s"` and `extra`.
fn kinesis_with(extra: &str) -> String {
    format!("[uplinks.aws]\ntype = \"kinesis\"\nstream = \"s\"\n{extra}\n")
}

/// `[uplinks.gcp]` of type pubsub with `project = "p"`, `topic = "t-1"` and `extra`.
fn pubsub_with(extra: &str) -> String {
    format!("[uplinks.gcp]\ntype = \"pubsub\"\nproject = \"p\"\ntopic = \"t-1\"\n{extra}\n")
}

#[test]
fn kinesis_streams() {
    let errors = load_str("[uplinks.aws]\ntype = \"kinesis\"\n", no_env()).expect_err("no stream");
    assert_eq!(paths(&errors), ["uplinks.aws.stream"]);
    assert_eq!(
        message(&errors, "uplinks.aws.stream"),
        "is required: the stream's name or ARN"
    );
    assert_eq!(errors.0[0].kind, ConfigErrorKind::InvalidValue);

    let good_name = "x".repeat(128);
    for ok in [
        "readings",
        "Ferry_readings.v1-a",
        good_name.as_str(),
        "arn:aws:kinesis:eu-west-1:123456789012:stream/readings",
        "arn:aws-cn:kinesis:cn-north-1:123456789012:stream/r",
    ] {
        let config = load_str(
            &format!("[uplinks.aws]\ntype = \"kinesis\"\nstream = \"{ok}\"\n"),
            no_env(),
        )
        .unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(kinesis(&config, "aws").stream, ok);
    }

    let long_name = "x".repeat(129);
    for (bad, says) in [
        ("a b", "a stream name has 1 to 128 characters"),
        ("a/b", "a stream name has 1 to 128 characters"),
        ("ström", "a stream name has 1 to 128 characters"),
        (long_name.as_str(), "a stream name has 1 to 128 characters"),
        (
            "arn:aws:kinesis:eu-west-1:123456789012:table/x",
            "is not a Kinesis stream ARN",
        ),
        (
            "arn:aws:s3:eu-west-1:123456789012:stream/x",
            "is not a Kinesis stream ARN",
        ),
        (
            "arn:aws:kinesis::123456789012:stream/x",
            "is not a Kinesis stream ARN",
        ),
        (
            "arn:aws:kinesis:eu-west-1:123456789012:stream/",
            "is not a Kinesis stream ARN",
        ),
        (
            "arn:aws:kinesis:eu-west-1:stream/x",
            "is not a Kinesis stream ARN",
        ),
    ] {
        let errors = load_str(
            &format!("[uplinks.aws]\ntype = \"kinesis\"\nstream = \"{bad}\"\n"),
            no_env(),
        )
        .expect_err(bad);
        assert_eq!(paths(&errors), ["uplinks.aws.stream"], "{bad}: {errors}");
        assert!(
            message(&errors, "uplinks.aws.stream").starts_with(says),
            "{bad}: {errors}"
        );
    }
}

#[test]
fn kinesis_keys_and_credentials() {
    let errors = load_str(&kinesis_with("partition_key = \"none\""), no_env())
        .expect_err("no partition key");
    assert_eq!(paths(&errors), ["uplinks.aws.partition_key"]);
    assert!(
        message(&errors, "uplinks.aws.partition_key").contains("Kinesis needs a partition key"),
        "{errors}"
    );
    for (rule, key) in [
        ("device", KeyRule::Device),
        ("topic", KeyRule::Topic),
        ("level:2", KeyRule::Level(2)),
    ] {
        let config = load_str(
            &kinesis_with(&format!("partition_key = \"{rule}\"")),
            no_env(),
        )
        .unwrap_or_else(|e| panic!("{rule}: {e}"));
        assert_eq!(kinesis(&config, "aws").partition_key, key);
    }
    let config = load_str(&kinesis_with("format = \"raw\""), no_env()).expect("raw");
    assert_eq!(kinesis(&config, "aws").format, RecordFormat::Raw);
    let errors = load_str(&kinesis_with("format = \"json\""), no_env()).expect_err("json");
    assert_eq!(paths(&errors), ["uplinks.aws.format"]);
    assert_eq!(errors.0[0].kind, ConfigErrorKind::InvalidType);

    // access_key_id and secret_access_key come together; session_token needs them.
    for (extra, path) in [
        ("access_key_id = \"AKIA1\"", "uplinks.aws.secret_access_key"),
        ("secret_access_key = \"s\"", "uplinks.aws.secret_access_key"),
        ("session_token = \"t\"", "uplinks.aws.session_token"),
        ("region = \"\"", "uplinks.aws.region"),
        ("profile = \"\"", "uplinks.aws.profile"),
    ] {
        let errors = load_str(&kinesis_with(extra), no_env()).expect_err(extra);
        assert_eq!(paths(&errors), [path], "{extra}: {errors}");
        assert_eq!(errors.0[0].kind, ConfigErrorKind::InvalidValue);
    }
    assert_eq!(
        message(
            &load_str(&kinesis_with("session_token = \"t\""), no_env()).expect_err("token"),
            "uplinks.aws.session_token"
        ),
        "needs access_key_id"
    );
    let config = load_str(
        &kinesis_with(
            "access_key_id = \"AKIA1\"\nsecret_access_key = \"s\"\nsession_token = \"t\"",
        ),
        no_env(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let k = kinesis(&config, "aws");
    assert_eq!(k.access_key_id.as_deref(), Some("AKIA1"));
    assert_eq!(k.secret_access_key.as_ref().map(Secret::expose), Some("s"));
    assert_eq!(k.session_token.as_ref().map(Secret::expose), Some("t"));
    load_str(
        &kinesis_with("access_key_id = \"AKIA1\"\nsecret_access_key = \"s\""),
        no_env(),
    )
    .unwrap_or_else(|e| panic!("without a session token: {e}"));
}

#[test]
fn endpoints() {
    for ok in [
        "https://kinesis.eu-west-1.amazonaws.com",
        "https://pubsub.googleapis.com/",
        "http://127.0.0.1:8085",
        "http://localhost:4566/",
        "https://h:65535",
        "http://[::1]:8085",
        "http://[::1]",
    ] {
        assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
    }
    for bad in [
        "",
        "kinesis.eu-west-1.amazonaws.com",
        "ftp://h",
        "HTTPS://h",
        "https://",
        "https:///",
        "https://h/path",
        "https://h//",
        "https://h?x=1",
        "https://h#f",
        "https://user:pw@h",
        "https://h x",
        "https://h:",
        "https://h:0",
        "https://h:65536",
        "https://h:+1",
        "https://h:port",
        "https://:443",
        "http://::1:8085",
        "http://[::1",
        "http://[::1]x",
    ] {
        assert!(check_endpoint(bad).is_err(), "{bad}");
    }
    // In a config, for both HTTP uplink types.
    for text in [
        kinesis_with("endpoint = \"kinesis.local:4566\""),
        pubsub_with("endpoint = \"http://emulator:8085/v1\""),
    ] {
        let errors = load_str(&text, no_env()).expect_err(&text);
        assert_eq!(errors.len(), 1, "{errors}");
        assert!(errors.0[0].path.ends_with(".endpoint"), "{errors}");
        assert_eq!(errors.0[0].kind, ConfigErrorKind::InvalidValue);
    }
    let config = load_str(
        &pubsub_with("endpoint = \"http://127.0.0.1:8085\""),
        no_env(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        pubsub(&config, "gcp").endpoint.as_deref(),
        Some("http://127.0.0.1:8085")
    );
}

#[test]
fn pubsub_projects_and_topics() {
    let errors = load_str("[uplinks.gcp]\ntype = \"pubsub\"\n", no_env()).expect_err("bad");
    assert_eq!(
        paths(&errors),
        ["uplinks.gcp.project", "uplinks.gcp.topic"],
        "{errors}"
    );
    assert!(message(&errors, "uplinks.gcp.project").starts_with("is required"));
    assert!(message(&errors, "uplinks.gcp.topic").starts_with("is required"));

    let project = |p: &str| {
        load_str(
            &format!("[uplinks.gcp]\ntype = \"pubsub\"\nproject = \"{p}\"\ntopic = \"t-1\"\n"),
            no_env(),
        )
    };
    for ok in ["my-project-42", "example.com:my-project"] {
        project(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in ["My-Project", "my_project", "my project", "prøject"] {
        let errors = project(bad).expect_err(bad);
        assert_eq!(paths(&errors), ["uplinks.gcp.project"], "{bad}: {errors}");
    }

    let topic = |t: &str| {
        load_str(
            &format!("[uplinks.gcp]\ntype = \"pubsub\"\nproject = \"p\"\ntopic = \"{t}\"\n"),
            no_env(),
        )
    };
    let longest = format!("t{}", "x".repeat(254));
    for ok in [
        "abc",
        "Readings",
        "a-_.~+%9",
        "gogo",
        "a-goog",
        longest.as_str(),
    ] {
        let config = topic(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(pubsub(&config, "gcp").topic, ok);
    }
    let too_long = format!("t{}", "x".repeat(255));
    for bad in [
        "ab",
        "1abc",
        "-abc",
        "goog",
        "google-readings",
        "a b c",
        "a/b/c",
        "projects/p/topics/t",
        too_long.as_str(),
    ] {
        let errors = topic(bad).expect_err(bad);
        assert_eq!(paths(&errors), ["uplinks.gcp.topic"], "{bad}: {errors}");
    }
    assert!(
        message(&topic("goog-x").expect_err("goog"), "uplinks.gcp.topic")
            .contains("not with \"goog\""),
    );

    for (rule, key) in [
        ("none", KeyRule::None),
        ("device", KeyRule::Device),
        ("level:0", KeyRule::Level(0)),
    ] {
        let config = load_str(
            &pubsub_with(&format!("ordering_key = \"{rule}\"")),
            no_env(),
        )
        .unwrap_or_else(|e| panic!("{rule}: {e}"));
        assert_eq!(pubsub(&config, "gcp").ordering_key, key);
    }
}

#[test]
fn http_uplink_windows_and_backoff() {
    for text in [kinesis_with, pubsub_with] {
        let errors = load_str(
            &text(
                "max_inflight_requests = 0\nmax_inflight_readings = 0\nrequest_timeout_ms = 0\n\
                 initial_backoff_ms = 2000\nmax_backoff_ms = 1000",
            ),
            no_env(),
        )
        .expect_err("bad");
        let name = errors.0[0]
            .path
            .split('.')
            .nth(1)
            .expect("a name")
            .to_owned();
        let expected: Vec<String> = [
            "max_inflight_requests",
            "max_inflight_readings",
            "request_timeout_ms",
            "initial_backoff_ms",
        ]
        .iter()
        .map(|k| format!("uplinks.{name}.{k}"))
        .collect();
        assert_eq!(paths(&errors), expected, "{errors}");
        assert_eq!(message(&errors, &expected[0]), "must be at least 1, got 0");
        let config = load_str(
            &text("max_inflight_requests = 1\nmax_inflight_readings = 1\nrequest_timeout_ms = 1"),
            no_env(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.uplinks.len(), 1);
    }
    let k = KinesisUplink::default();
    let g = PubsubUplink::default();
    for (requests, readings, timeout) in [
        (
            k.max_inflight_requests,
            k.max_inflight_readings,
            k.request_timeout_ms,
        ),
        (
            g.max_inflight_requests,
            g.max_inflight_readings,
            g.request_timeout_ms,
        ),
    ] {
        assert_eq!((requests, readings, timeout), (4, 5000, 30_000));
    }
    assert_eq!(
        (k.partition_key, k.format),
        (KeyRule::Device, RecordFormat::Envelope)
    );
    assert_eq!(g.ordering_key, KeyRule::None);
}

#[test]
fn full_kinesis_and_pubsub_uplinks_load() {
    let config = load_str(
        r#"
[uplinks.aws]
type = "kinesis"
topics = ["sensors/#"]
enabled = false
stream = "arn:aws:kinesis:eu-west-1:123456789012:stream/readings"
region = "eu-west-1"
endpoint = "https://kinesis.eu-west-1.amazonaws.com"
partition_key = "level:1"
format = "raw"
access_key_id = "AKIAIOSFODNN7EXAMPLE"
secret_access_key = "aws-secret"
session_token = "aws-token"
profile = "ferry"
ca_path = "/etc/ferry/aws-ca.pem"
max_inflight_requests = 2
max_inflight_readings = 100
request_timeout_ms = 5000
initial_backoff_ms = 100
max_backoff_ms = 1000

[uplinks.gcp]
type = "pubsub"
topics = ["alarms/#"]
project = "my-project"
topic = "ferry-readings"
endpoint = "http://127.0.0.1:8085"
ordering_key = "device"
credentials_file = "/etc/ferry/gcp-key.json"
ca_path = "/etc/ferry/gcp-ca.pem"
max_inflight_requests = 8
max_inflight_readings = 200
request_timeout_ms = 6000
initial_backoff_ms = 200
max_backoff_ms = 2000
"#,
        no_env(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        *kinesis(&config, "aws"),
        KinesisUplink {
            stream: "arn:aws:kinesis:eu-west-1:123456789012:stream/readings".into(),
            region: Some("eu-west-1".into()),
            endpoint: Some("https://kinesis.eu-west-1.amazonaws.com".into()),
            partition_key: KeyRule::Level(1),
            format: RecordFormat::Raw,
            access_key_id: Some("AKIAIOSFODNN7EXAMPLE".into()),
            secret_access_key: Some("aws-secret".into()),
            session_token: Some("aws-token".into()),
            profile: Some("ferry".into()),
            ca_path: Some("/etc/ferry/aws-ca.pem".into()),
            max_inflight_requests: 2,
            max_inflight_readings: 100,
            request_timeout_ms: 5000,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
        }
    );
    assert!(!config.uplinks["aws"].enabled);
    assert_eq!(config.uplinks["aws"].topics, ["sensors/#"]);
    assert_eq!(
        *pubsub(&config, "gcp"),
        PubsubUplink {
            project: "my-project".into(),
            topic: "ferry-readings".into(),
            endpoint: Some("http://127.0.0.1:8085".into()),
            ordering_key: KeyRule::Device,
            credentials_file: Some("/etc/ferry/gcp-key.json".into()),
            ca_path: Some("/etc/ferry/gcp-ca.pem".into()),
            max_inflight_requests: 8,
            max_inflight_readings: 200,
            request_timeout_ms: 6000,
            initial_backoff_ms: 200,
            max_backoff_ms: 2000,
        }
    );
    assert_eq!(config.uplinks["gcp"].topics, ["alarms/#"]);
    let enabled: Vec<_> = config.enabled_uplinks().map(|(name, _)| name).collect();
    assert_eq!(enabled, ["gcp"]);

    // Keys of the other HTTP type are named as such.
    let errors = load_str(&kinesis_with("credentials_file = \"k.json\""), no_env())
        .expect_err("a pubsub key");
    assert_eq!(
        message(&errors, "uplinks.aws.credentials_file"),
        "`credentials_file` is a key of type pubsub; this uplink is type kinesis"
    );
}

#[test]
fn env_creates_a_kinesis_uplink() {
    let config = load_str(
        "",
        env(&[
            ("FERRY_UPLINKS_AWS_TYPE", "kinesis"),
            ("FERRY_UPLINKS_AWS_STREAM", "s"),
            ("FERRY_UPLINKS_AWS_REGION", "eu-west-1"),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.uplinks.keys().collect::<Vec<_>>(), ["aws"]);
    let k = kinesis(&config, "aws");
    assert_eq!(k.stream, "s");
    assert_eq!(k.region.as_deref(), Some("eu-west-1"));
    assert_eq!(
        *k,
        KinesisUplink {
            stream: "s".into(),
            region: Some("eu-west-1".into()),
            ..KinesisUplink::default()
        }
    );
    config.validate().expect("valid");

    // Keys with underscores, secrets included; the type missing.
    let config = load_str(
        "[uplinks.aws]\ntype = \"kinesis\"\n",
        env(&[
            ("FERRY_UPLINKS_AWS_STREAM", "12345"),
            ("FERRY_UPLINKS_AWS_ACCESS_KEY_ID", "AKIA1"),
            ("FERRY_UPLINKS_AWS_SECRET_ACCESS_KEY", "s3cret"),
            ("FERRY_UPLINKS_AWS_SESSION_TOKEN", "tok"),
            ("FERRY_UPLINKS_AWS_MAX_INFLIGHT_REQUESTS", "2"),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let k = kinesis(&config, "aws");
    assert_eq!(k.stream, "12345", "string keys take the text as is");
    assert_eq!(
        k.secret_access_key.as_ref().map(Secret::expose),
        Some("s3cret")
    );
    assert_eq!(k.session_token.as_ref().map(Secret::expose), Some("tok"));
    assert_eq!(k.max_inflight_requests, 2);

    let errors = load_str(
        "",
        env(&[
            ("FERRY_UPLINKS_AWS_STREAM", "s"),
            ("FERRY_UPLINKS_GCP_TYPE", "pubsub"),
            ("FERRY_UPLINKS_GCP_PROJECT", "p"),
        ]),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        ["uplinks.aws.type", "uplinks.gcp.topic"],
        "{errors}"
    );
}

#[test]
fn secrets_of_http_uplinks_of_the_wrong_type_are_not_echoed() {
    let errors = load_str(
        "[uplinks.aws]\ntype = \"kinesis\"\nstream = \"s\"\naccess_key_id = \"AKIA1\"\n\
         secret_access_key = 123\nsession_token = 98765432\n",
        no_env(),
    )
    .unwrap_err();
    assert_eq!(
        paths(&errors),
        ["uplinks.aws.secret_access_key", "uplinks.aws.session_token"],
        "{errors}"
    );
    assert!(
        errors
            .iter()
            .all(|e| e.kind == ConfigErrorKind::InvalidType)
    );
    let text = errors.to_string();
    for secret in ["123", "98765432"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert!(
        text.contains("uplinks.aws.secret_access_key: invalid type: integer, expected a string"),
        "{text}"
    );
    // From the environment, a key holding a string takes the text as is, whatever it looks like.
    let config = load_str(
        "[uplinks.aws]\ntype = \"kinesis\"\nstream = \"s\"\naccess_key_id = \"AKIA1\"\n",
        env(&[("FERRY_UPLINKS_AWS_SECRET_ACCESS_KEY", "[55512345]")]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        kinesis(&config, "aws")
            .secret_access_key
            .as_ref()
            .map(Secret::expose),
        Some("[55512345]")
    );
}

// ---- Kafka cloud presets (rules in `kafka_cloud`) ----

const EH_KEY: &str = "c2VjcmV0LWtleS1kby1ub3QtcHJpbnQ=";

fn eh_string(entity: Option<&str>) -> String {
    let mut s = format!(
        "Endpoint=sb://my-ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={EH_KEY}"
    );
    if let Some(e) = entity {
        s.push_str(&format!(";EntityPath={e}"));
    }
    s
}

fn preset(extra: &str) -> Result<Config, ConfigErrors> {
    load_str(&format!("[uplinks.x]\ntype = \"kafka\"\n{extra}"), no_env())
}

fn connection(config: &Config) -> kafka_cloud::KafkaConnection {
    kafka(config, "x").connection().expect("valid preset")
}

#[test]
fn event_hubs_preset_derives_everything_from_the_connection_string() {
    let text = format!(
        "cloud = \"event-hubs\"\nconnection_string = \"{}\"\n",
        eh_string(Some("readings"))
    );
    let config = preset(&text).expect("valid");
    let c = connection(&config);
    assert_eq!(c.brokers, "my-ns.servicebus.windows.net:9093");
    assert_eq!(c.topic, "readings");
    assert_eq!(c.security_protocol, SecurityProtocol::SaslSsl);
    assert_eq!(c.compression, KafkaCompression::Gzip);
    assert!(!c.idempotent);
    let kafka_cloud::KafkaAuth::Password {
        mechanism,
        username,
        password,
    } = &c.auth
    else {
        panic!("{:?}", c.auth)
    };
    assert_eq!(*mechanism, SaslMechanism::Plain);
    assert_eq!(username, "$ConnectionString");
    assert_eq!(password.expose(), eh_string(Some("readings")));
    assert!(
        c.properties
            .contains(&("connections.max.idle.ms", "180000"))
    );

    // A namespace-level string keeps the topic; idempotence and brokers can be set.
    let text = format!(
        "cloud = \"event-hubs\"\nconnection_string = \"{}\"\nidempotent = true\nbrokers = \"10.0.0.9:9093\"\ncompression = \"none\"\n",
        eh_string(None)
    );
    let c = connection(&preset(&text).expect("valid"));
    assert_eq!(c.topic, "ferry.readings");
    assert_eq!(c.brokers, "10.0.0.9:9093");
    assert_eq!(c.compression, KafkaCompression::None);
    assert!(c.idempotent);
}

#[test]
fn event_hubs_preset_refuses_contradictions_without_quoting_the_key() {
    let text = format!(
        "cloud = \"event-hubs\"\nconnection_string = \"{}\"\ntopic = \"other\"\ncompression = \"lz4\"\n\
         sasl_username = \"me\"\napi_key = \"k\"\nsecurity_protocol = \"ssl\"\n\
         [[uplinks.x.routes]]\nfilter = \"a/#\"\ntopic = \"also-other\"\n\
         [uplinks.x.librdkafka]\n\"sasl.mechanism\" = \"PLAIN\"\n",
        eh_string(Some("readings"))
    );
    let errors = preset(&text).expect_err("contradictions");
    for path in [
        "uplinks.x.topic",
        "uplinks.x.compression",
        "uplinks.x.sasl_username",
        "uplinks.x.api_key",
        "uplinks.x.security_protocol",
        "uplinks.x.routes[0].topic",
        "uplinks.x.librdkafka.\"sasl.mechanism\"",
    ] {
        assert!(errors.find(path).is_some(), "no error at {path}:\n{errors}");
    }
    assert!(message(&errors, "uplinks.x.topic").contains("scoped to event hub \"readings\""));
    assert_eq!(
        message(&errors, "uplinks.x.api_key"),
        "belongs to cloud = \"confluent\", not cloud = \"event-hubs\""
    );
    assert!(!errors.to_string().contains(EH_KEY), "{errors}");

    for (bad, says) in [
        ("", "is required"),
        ("SharedAccessKey=abc", "has no Endpoint"),
        (
            "Endpoint=https://x/;SharedAccessKeyName=a;SharedAccessKey=b",
            "must start with sb://",
        ),
        (
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a",
            "has no credentials",
        ),
        ("garbage", "has no '='"),
    ] {
        let errors = preset(&format!(
            "cloud = \"event-hubs\"\nconnection_string = \"{bad}\"\n"
        ))
        .expect_err(bad);
        assert!(
            message(&errors, "uplinks.x.connection_string").contains(says),
            "{bad}: {errors}"
        );
    }
}

#[test]
fn msk_iam_preset_takes_the_region_from_the_brokers() {
    let brokers = "b-1.demo.abc123.c2.kafka.eu-west-1.amazonaws.com:9098,b-2.demo.abc123.c2.kafka.eu-west-1.amazonaws.com:9098";
    let c = connection(
        &preset(&format!("cloud = \"msk-iam\"\nbrokers = \"{brokers}\"\n")).expect("valid"),
    );
    assert_eq!(c.security_protocol, SecurityProtocol::SaslSsl);
    assert!(c.idempotent);
    assert_eq!(
        c.auth,
        kafka_cloud::KafkaAuth::MskIam {
            region: "eu-west-1".into(),
            keys: None,
            profile: None,
        }
    );
    assert_eq!(
        kafka_cloud::msk_region("boot-x.c1.kafka-serverless.us-east-2.amazonaws.com:9098"),
        Some("us-east-2")
    );
    assert_eq!(kafka_cloud::msk_region("kafka.example.com:9092"), None);

    let c = connection(
        &preset(
            "cloud = \"msk-iam\"\nbrokers = \"10.1.2.3:9098\"\nregion = \"us-east-1\"\n\
             access_key_id = \"AKID\"\nsecret_access_key = \"s\"\n",
        )
        .expect("valid"),
    );
    let kafka_cloud::KafkaAuth::MskIam { region, keys, .. } = c.auth else {
        panic!()
    };
    assert_eq!(region, "us-east-1");
    assert_eq!(keys.map(|k| k.0), Some("AKID".to_owned()));

    let errors = preset(&format!(
        "cloud = \"msk-iam\"\nbrokers = \"{brokers}\"\nregion = \"us-east-1\"\naccess_key_id = \"a\"\n"
    ))
    .expect_err("bad");
    assert_eq!(
        message(&errors, "uplinks.x.region"),
        "is \"us-east-1\" but the brokers are in \"eu-west-1\""
    );
    assert!(
        errors.find("uplinks.x.secret_access_key").is_some(),
        "{errors}"
    );
    let errors = preset("cloud = \"msk-iam\"\n").expect_err("no brokers");
    assert!(
        message(&errors, "uplinks.x.brokers").contains("9098"),
        "{errors}"
    );
    let errors =
        preset("cloud = \"msk-iam\"\nbrokers = \"10.1.2.3:9098\"\n").expect_err("no region");
    assert!(
        message(&errors, "uplinks.x.region").contains("is required"),
        "{errors}"
    );
}

#[test]
fn confluent_preset_and_keys_without_a_preset() {
    let c = connection(
        &preset(
            "cloud = \"confluent\"\nbrokers = \"pkc-1.eu-west-1.aws.confluent.cloud:9092\"\n\
             api_key = \"KEY1\"\napi_secret = \"sec\"\nsecurity_protocol = \"sasl_ssl\"\n",
        )
        .expect("valid"),
    );
    assert_eq!(c.security_protocol, SecurityProtocol::SaslSsl);
    assert_eq!(c.compression, KafkaCompression::Zstd);
    let kafka_cloud::KafkaAuth::Password {
        mechanism,
        username,
        password,
    } = c.auth
    else {
        panic!()
    };
    assert_eq!(
        (mechanism, username.as_str(), password.expose()),
        (SaslMechanism::Plain, "KEY1", "sec")
    );
    let errors = preset("cloud = \"confluent\"\n").expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.x.brokers",
            "uplinks.x.api_key",
            "uplinks.x.api_secret"
        ]
    );

    let errors = preset("connection_string = \"x\"\nregion = \"r\"\n").expect_err("no cloud");
    assert_eq!(
        message(&errors, "uplinks.x.connection_string"),
        "is only used with cloud = \"event-hubs\""
    );
    assert_eq!(
        message(&errors, "uplinks.x.region"),
        "is only used with cloud = \"msk-iam\""
    );
    let errors = preset("cloud = \"aws\"\n").expect_err("unknown cloud");
    assert!(errors.find("uplinks.x.cloud").is_some(), "{errors}");
}

#[test]
fn mqtt_acl_and_subscriber_limits_are_checked() {
    let errors = load_str(
        r#"
[mqtt]
subscriber_queue_messages = 0
subscriber_queue_bytes = 1000

[[mqtt.acl]]
user = "a"
cert_cn = "b"
publish = ["ok/%c/#", "bad/#/x"]
subscribe = ["%u/+"]
"#,
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "mqtt.subscriber_queue_messages",
            "mqtt.subscriber_queue_bytes",
            "mqtt.acl[0]",
            "mqtt.acl[0].cert_cn",
            "mqtt.acl[0].publish[1]",
        ]
    );
    let ok = load_str(
        "[[mqtt.acl]]\npublish = [\"s/%c/#\"]\nsubscribe = [\"cmd/%u/#\"]\n",
        no_env(),
    )
    .expect("good");
    assert_eq!(ok.mqtt.acl[0].subscribe, ["cmd/%u/#"]);
}

#[test]
fn downlinks_are_checked() {
    let errors = load_str(
        r#"
[mqtt]
enabled = false

[uplinks.cloud]
type = "mqtt"
[[uplinks.cloud.downlink]]
remote = "cmd/+/#"
local = "dev/{2}/{#}"
qos = 2
[[uplinks.cloud.downlink]]
remote = "cmd/+/#"
[[uplinks.cloud.downlink]]
remote = "a/#/b"

[uplinks.kafka]
type = "kafka"
[uplinks.kafka.downlink]
topic = ""
group_id = ""
qos = 3
"#,
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplinks.cloud.downlink[0].local",
            "uplinks.cloud.downlink[0].qos",
            "uplinks.cloud.downlink[1].remote",
            "uplinks.cloud.downlink[2].remote",
            "uplinks.cloud.downlink",
            "uplinks.kafka.downlink.topic",
            "uplinks.kafka.downlink.group_id",
            "uplinks.kafka.downlink.qos",
            "uplinks.kafka.downlink",
        ]
    );
    let text = errors.to_string();
    assert!(text.contains("needs the MQTT listener"), "{text}");
    let ok = load_str(
        r#"
[uplinks.cloud]
type = "mqtt"
[[uplinks.cloud.downlink]]
remote = "cmd/site-7/#"
local = "cmd/{#}"

[uplinks.kafka]
type = "kafka"
downlink = { topic = "ferry.commands" }
"#,
        no_env(),
    )
    .expect("good");
    assert!(ok.uplinks["cloud"].kind.has_downlink() && ok.uplinks["kafka"].kind.has_downlink());
    let UplinkKind::Mqtt(m) = &ok.uplinks["cloud"].kind else {
        panic!("mqtt");
    };
    assert_eq!(m.downlink[0].local.as_deref(), Some("cmd/{#}"));
}
