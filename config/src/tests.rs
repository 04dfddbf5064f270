use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use toml::{Table, Value};

use super::*;
use crate::load::{Node, sample, schema};

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

/// Key paths of `table` that the schema has and `table` lacks.
fn missing_keys(table: &Table, node: &Node, path: &str, out: &mut Vec<String>) {
    let Node::Table(keys) = node else { return };
    for (k, child) in keys {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        match (table.get(k), child) {
            (None, _) => out.push(p),
            (Some(Value::Table(t)), Node::Table(_)) => missing_keys(t, child, &p, out),
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
    assert_eq!(config.uplink.kafka.key, KeyRule::Device);
    assert!(!config.uplink.mqtt.enabled);
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

fn schema_fields(path: &str) -> BTreeSet<String> {
    let mut node = schema();
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let Node::Table(keys) = node else {
            panic!("{path} is not a table")
        };
        node = &keys[seg.trim_end_matches("[]")];
        if let Node::Array(element) = node {
            node = element;
        }
    }
    let Node::Table(keys) = node else {
        panic!("{path} is not a table")
    };
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
        ("uplink", serde_fields::<Uplinks>()),
        ("uplink.kafka", serde_fields::<KafkaUplink>()),
        ("uplink.kafka.routes", serde_fields::<KafkaRoute>()),
        ("uplink.mqtt", serde_fields::<MqttUplink>()),
        ("uplink.mqtt.rewrites", serde_fields::<TopicRewrite>()),
        ("status", serde_fields::<StatusSettings>()),
    ];
    for (path, fields) in cases {
        assert_eq!(schema_fields(path), fields, "keys of [{path}]");
    }
    assert!(key_paths().contains(&"uplink.kafka.routes[].filter".to_owned()));
    assert!(key_paths().contains(&"uplink.kafka.librdkafka.*".to_owned()));
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

[uplink.kafka]
compression = "brotli"
brokers = "a:9092,b"

[[uplink.kafka.routes]]
filter = "sensors/#"
topic = "all"

[[uplink.kafka.routes]]
filter = "a/+/b"
topic = "ab"

[[uplink.kafka.routes]]
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
            "uplink.kafka.compression",
            ConfigErrorKind::InvalidType,
            "brotli",
        ),
        ("uplink.kafka.brokers", ConfigErrorKind::InvalidValue, "'b'"),
        (
            "uplink.kafka.routes[2].filter",
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
            ("FERRY_UPLINK_KAFKA_BROKERS", "a:9092,b:9092"),
            ("FERRY_GATEWAY_DATA_DIR", "/var/lib/ferry"),
            ("FERRY_GATEWAY_ID", "1234"),
            ("FERRY_MQTT_ENABLED", "false"),
            ("FERRY_MQTT_DEVICE_FROM_TOPIC_LEVEL", "2"),
            ("FERRY_UPLINK_KAFKA_KEY", "level:1"),
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
    assert_eq!(config.uplink.kafka.brokers, "a:9092,b:9092");
    assert_eq!(config.gateway.data_dir, Path::new("/var/lib/ferry"));
    assert_eq!(config.gateway.id, "1234", "string keys take the text as is");
    assert!(!config.mqtt.enabled);
    assert_eq!(config.mqtt.device_from_topic_level, Some(2));
    assert_eq!(config.uplink.kafka.key, KeyRule::Level(1));
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
    config.uplink.kafka.sasl_password = Some("kafka-pw-42".into());
    config.http.tokens[0].token = "http-token-42".into();
    config.mqtt.users[0].password = Some("mqtt-pw-42".into());
    config.status.token = Some("status-token-42".into());
    let debug = format!("{config:?} {config:#?}");
    for secret in [
        "kafka-pw-42",
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
    let errors = load_str("[uplink.kafka]\nkey = \"level\"\n", no_env()).expect_err("bad");
    assert_eq!(paths(&errors), ["uplink.kafka.key"]);
}

#[test]
fn topic_filters() {
    assert_eq!(check_topic_filter("a/b"), Ok(0));
    assert_eq!(check_topic_filter("+/b/+"), Ok(2));
    assert_eq!(check_topic_filter("#"), Ok(0));
    assert_eq!(check_topic_filter("a/+/#"), Ok(1));
    assert_eq!(check_topic_filter("/"), Ok(0));
    for bad in ["", "a/b+", "a#", "#/a", "a/#/b", "a/++"] {
        assert!(check_topic_filter(bad).is_err(), "{bad}");
    }
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

#[test]
fn rewrites_and_mqtt_uplink() {
    let text = r#"
[uplink.mqtt]
enabled = true
url = "mqtts://broker.example:8884"
qos = 2
client_cert_path = "c.pem"

[[uplink.mqtt.rewrites]]
filter = "sensors/+/+"
template = "site/{2}/{1}"

[[uplink.mqtt.rewrites]]
filter = "sensors/+/#"
template = "site/{2}"

[[uplink.mqtt.rewrites]]
filter = "a/#/b"
template = "x/{0}"
"#;
    let errors = load_str(text, no_env()).expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplink.mqtt.qos",
            "uplink.mqtt.client_key_path",
            "uplink.mqtt.rewrites[1].template",
            "uplink.mqtt.rewrites[2].filter",
            "uplink.mqtt.rewrites[2].template",
        ],
        "{errors}"
    );
    assert_eq!(template_placeholders("a/{1}/{12}/{x}/{"), [1, 12]);
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

[uplink.kafka]
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
            "uplink.kafka.topic",
            "uplink.kafka.initial_backoff_ms",
            "uplink.kafka.sasl_username",
            "uplink.kafka.sasl_password",
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
        "[uplink.kafka]\nmax_inflight_segments = 0\nmax_inflight_readings = 0\n",
        no_env(),
    )
    .expect_err("bad");
    assert_eq!(
        paths(&errors),
        [
            "uplink.kafka.max_inflight_segments",
            "uplink.kafka.max_inflight_readings"
        ],
        "{errors}"
    );
    let config = load_str(
        "[uplink.kafka]\nmax_inflight_readings = 1\n",
        env(&[("FERRY_UPLINK_KAFKA_MAX_INFLIGHT_SEGMENTS", "3")]),
    )
    .expect("valid");
    let k = &config.uplink.kafka;
    assert_eq!((k.max_inflight_segments, k.max_inflight_readings), (3, 1));
    let d = Config::default().uplink.kafka;
    assert_eq!(
        (d.max_inflight_segments, d.max_inflight_readings),
        (256, 20_000)
    );
}

#[test]
fn sasl_mechanism_names() {
    let config = load_str(
        r#"
[uplink.kafka]
security_protocol = "sasl_plaintext"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "u"
sasl_password = "p"
"#,
        no_env(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.uplink.kafka.sasl_mechanism,
        Some(SaslMechanism::ScramSha512)
    );
    let errors = load_str("[uplink.kafka]\nsasl_mechanism = \"plain\"\n", no_env())
        .expect_err("lower case is wrong");
    assert_eq!(errors.0[0].kind, ConfigErrorKind::InvalidType);
}

#[test]
fn client_id_default() {
    let mut config = Config::default();
    config.gateway.id = "gw1".into();
    assert_eq!(config.uplink_mqtt_client_id(), "ferry-gw1");
    config.uplink.mqtt.client_id = Some("x".into());
    assert_eq!(config.uplink_mqtt_client_id(), "x");
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
         [uplink.mqtt]\nclient_cert_path = \"c.pem\"\nclient_key_path = {key:?}\n"
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
            "uplink.mqtt.client_key_path"
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
         [uplink.kafka]\nsasl_password = 7654321\n",
        no_env(),
    )
    .unwrap_err();
    let text = errors.to_string();
    for secret in ["987654321", "1234567", "7654321"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert!(text.contains("mqtt.users[0].password: invalid type: integer, expected a string"));
}
