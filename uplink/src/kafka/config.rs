//! Builds the librdkafka producer configuration from a Kafka uplink's table and its effective
//! connection ([`KafkaUplink::connection`], which applies the `cloud` preset).
//!
//! ferry sets, in this order:
//!
//! 1. `bootstrap.servers`, `client.id`, `compression.type`, `message.timeout.ms`,
//!    `security.protocol`, and when configured `sasl.mechanism`, `sasl.username`,
//!    `sasl.password` (`OAUTHBEARER` for MSK IAM, whose token [`crate::aws::msk`] makes),
//!    `ssl.ca.location`, then the preset's own properties;
//! 2. the uplink's `librdkafka` passthrough table, which may override anything of (1);
//! 3. the **safety settings**, which always win: `acks = all`, and `enable.idempotence = true`
//!    unless the uplink says `idempotent = false`, in which case at most one request is in
//!    flight per connection (order holds through retries; a retry may duplicate).
//!
//! A passthrough entry that would weaken delivery safety is ignored with a warning:
//! `acks`/`request.required.acks` other than `all`/`-1`, `enable.idempotence` other than
//! the uplink's `idempotent`, `max.in.flight.requests.per.connection`/`max.in.flight` above
//! 5 (the idempotent producer's ordering limit; 1 without idempotence), and
//! `retries`/`message.send.max.retries` below 1.
//!
//! [`explain`] lists the result with secrets replaced, for `ferry check-config --explain`.

use ferry_config::KafkaUplink;
use ferry_config::kafka_cloud::{KafkaAuth, KafkaConnection};
use rdkafka::ClientConfig;

/// The highest `max.in.flight.requests.per.connection` that keeps idempotent ordering.
pub const MAX_IN_FLIGHT_LIMIT: i64 = 5;

/// Keys ferry sets itself that librdkafka also knows under another name. When the
/// passthrough uses one name, ferry's value under the other is removed so there is one value.
const ALIASES: &[(&str, &str)] = &[
    ("compression.codec", "compression.type"),
    ("delivery.timeout.ms", "message.timeout.ms"),
    ("metadata.broker.list", "bootstrap.servers"),
    ("sasl.mechanisms", "sasl.mechanism"),
];

/// Why a passthrough entry is refused, or `None` when it is accepted.
fn weakens(key: &str, value: &str, idempotent: bool) -> Option<&'static str> {
    let v = value.trim().to_ascii_lowercase();
    let limit = if idempotent { MAX_IN_FLIGHT_LIMIT } else { 1 };
    match key {
        "acks" | "request.required.acks" | "topic.request.required.acks" => {
            (v != "all" && v != "-1").then_some("ferry requires acks=all")
        }
        "enable.idempotence" if idempotent => {
            (v != "true").then_some("idempotence is the uplink's `idempotent` key")
        }
        "enable.idempotence" => {
            (v != "false").then_some("idempotence is the uplink's `idempotent` key")
        }
        "max.in.flight.requests.per.connection" | "max.in.flight" => match v.parse::<i64>() {
            Ok(n) if (1..=limit).contains(&n) => None,
            _ if idempotent => {
                Some("the idempotent producer keeps order only with at most 5 in flight")
            }
            _ => Some("without idempotence, only one request in flight keeps order"),
        },
        "retries" | "message.send.max.retries" => match v.parse::<i64>() {
            Ok(n) if n >= 1 => None,
            _ => Some("ferry requires the producer to retry"),
        },
        _ => None,
    }
}

/// Whether librdkafka property `key` holds a secret.
pub fn is_secret_property(key: &str) -> bool {
    key.contains("password") || key.contains("secret") || key.ends_with(".key.pem")
}

/// What the producer and the downlink's consumer share: brokers, client id, security and
/// the `cloud` preset's properties (not the `librdkafka` passthrough, which is the producer's).
pub fn connection_config(
    cfg: &KafkaUplink,
    conn: &KafkaConnection,
    client_id: &str,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &conn.brokers)
        .set("client.id", client_id)
        .set("security.protocol", conn.security_protocol.as_str());
    match &conn.auth {
        KafkaAuth::None => {}
        KafkaAuth::Password {
            mechanism,
            username,
            password,
        } => {
            c.set("sasl.mechanism", mechanism.as_str())
                .set("sasl.username", username)
                .set("sasl.password", password.expose());
        }
        KafkaAuth::MskIam { .. } => {
            c.set("sasl.mechanism", "OAUTHBEARER");
        }
    }
    if let Some(ca) = &cfg.ssl_ca_path {
        c.set("ssl.ca.location", ca.display().to_string());
    }
    for (key, value) in &conn.properties {
        c.set(*key, *value);
    }
    c
}

/// The producer configuration for `cfg`, whose effective connection is `conn`.
pub fn client_config(cfg: &KafkaUplink, conn: &KafkaConnection, client_id: &str) -> ClientConfig {
    let mut c = connection_config(cfg, conn, client_id);
    c.set("compression.type", conn.compression.as_str())
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string());
    for (key, value) in &cfg.librdkafka {
        if let Some(why) = weakens(key, value, conn.idempotent) {
            tracing::warn!(
                key = %key,
                value = %value,
                reason = why,
                "A librdkafka passthrough setting would weaken delivery safety and is ignored."
            );
            continue;
        }
        for (a, b) in ALIASES {
            if key == a {
                c.remove(b);
            } else if key == b {
                c.remove(a);
            }
        }
        c.set(key, value);
    }
    // The safety settings always win.
    c.set("acks", "all");
    c.remove("request.required.acks");
    c.remove("topic.request.required.acks");
    if conn.idempotent {
        c.set("enable.idempotence", "true");
    } else {
        c.set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1");
        c.remove("max.in.flight");
    }
    c
}

/// The librdkafka properties of `c`, sorted, with secret values replaced by `***`.
pub fn explain(c: &ClientConfig) -> Vec<(String, String)> {
    c.config_map()
        .into_iter()
        .map(|(k, v)| {
            let v = if is_secret_property(k) { "***" } else { v };
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_config::{KafkaCompression, SaslMechanism, SecurityProtocol};
    use std::collections::BTreeMap;

    fn with(pass: &[(&str, &str)]) -> ClientConfig {
        let cfg = KafkaUplink {
            brokers: "b1:9092,b2:9092".into(),
            compression: KafkaCompression::Lz4,
            message_timeout_ms: 12_345,
            librdkafka: pass
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..KafkaUplink::default()
        };
        build(&cfg)
    }

    fn build(cfg: &KafkaUplink) -> ClientConfig {
        client_config(cfg, &cfg.connection().expect("valid"), "ferry-gw1")
    }

    #[test]
    fn typed_settings() {
        let c = with(&[]);
        assert_eq!(c.get("bootstrap.servers"), Some("b1:9092,b2:9092"));
        assert_eq!(c.get("client.id"), Some("ferry-gw1"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert_eq!(c.get("message.timeout.ms"), Some("12345"));
        assert_eq!(c.get("security.protocol"), Some("plaintext"));
        assert_eq!(c.get("sasl.password"), None);
        // librdkafka accepts the result.
        c.create_native_config().unwrap();
    }

    #[test]
    fn sasl_ssl() {
        let cfg = KafkaUplink {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("user".into()),
            sasl_password: Some("pw".into()),
            ssl_ca_path: Some("/etc/ssl/ca.pem".into()),
            ..KafkaUplink::default()
        };
        let c = build(&cfg);
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("user"));
        assert_eq!(c.get("sasl.password"), Some("pw"));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/ssl/ca.pem"));
    }

    #[test]
    fn weakening_passthrough_is_ignored() {
        let c = with(&[
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("enable.idempotence", "false"),
            ("max.in.flight.requests.per.connection", "100"),
            ("max.in.flight", "banana"),
            ("retries", "0"),
        ]);
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("request.required.acks"), None);
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("max.in.flight.requests.per.connection"), None);
        assert_eq!(c.get("max.in.flight"), None);
        assert_eq!(c.get("retries"), None);
        c.create_native_config().unwrap();
    }

    #[test]
    fn harmless_passthrough_is_applied_and_may_override() {
        let c = with(&[
            ("acks", "-1"),
            ("max.in.flight.requests.per.connection", "5"),
            ("retries", "10"),
            ("linger.ms", "20"),
            ("compression.codec", "gzip"),
            ("socket.keepalive.enable", "true"),
        ]);
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("max.in.flight.requests.per.connection"), Some("5"));
        assert_eq!(c.get("retries"), Some("10"));
        assert_eq!(c.get("linger.ms"), Some("20"));
        assert_eq!(c.get("compression.codec"), Some("gzip"));
        assert_eq!(
            c.get("compression.type"),
            None,
            "alias replaced, not doubled"
        );
        assert_eq!(c.get("socket.keepalive.enable"), Some("true"));
        c.create_native_config().unwrap();
    }

    #[test]
    fn unknown_passthrough_fails_in_librdkafka() {
        let c = with(&[("no.such.property", "1")]);
        assert!(c.create_native_config().is_err());
    }

    #[test]
    fn event_hubs_preset() {
        let cs = "Endpoint=sb://ns1.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=k3y=;EntityPath=hub1";
        let cfg = KafkaUplink {
            cloud: Some(ferry_config::KafkaCloud::EventHubs),
            connection_string: Some(cs.into()),
            librdkafka: [("linger.ms".to_owned(), "50".to_owned())].into(),
            ..KafkaUplink::default()
        };
        let c = build(&cfg);
        assert_eq!(
            c.get("bootstrap.servers"),
            Some("ns1.servicebus.windows.net:9093")
        );
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(c.get("sasl.username"), Some("$ConnectionString"));
        assert_eq!(c.get("sasl.password"), Some(cs));
        assert_eq!(c.get("compression.type"), Some("gzip"));
        assert_eq!(c.get("enable.idempotence"), Some("false"));
        assert_eq!(c.get("max.in.flight.requests.per.connection"), Some("1"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("connections.max.idle.ms"), Some("180000"));
        assert_eq!(c.get("linger.ms"), Some("50"));
        c.create_native_config().unwrap();

        let shown = explain(&c);
        let text = format!("{shown:?}");
        assert!(!text.contains("k3y"), "{text}");
        assert!(
            shown.contains(&("sasl.password".into(), "***".into())),
            "{text}"
        );
        assert!(
            shown.contains(&("sasl.username".into(), "$ConnectionString".into())),
            "{text}"
        );
    }

    #[test]
    fn without_idempotence_one_request_is_in_flight() {
        let cfg = KafkaUplink {
            idempotent: Some(false),
            librdkafka: [
                ("max.in.flight".to_owned(), "5".to_owned()),
                ("enable.idempotence".to_owned(), "true".to_owned()),
            ]
            .into(),
            ..KafkaUplink::default()
        };
        let c = build(&cfg);
        assert_eq!(c.get("enable.idempotence"), Some("false"));
        assert_eq!(c.get("max.in.flight.requests.per.connection"), Some("1"));
        assert_eq!(c.get("max.in.flight"), None);
        assert_eq!(c.get("acks"), Some("all"));
        c.create_native_config().unwrap();
    }

    #[test]
    fn msk_iam_and_confluent_presets() {
        let cfg = KafkaUplink {
            cloud: Some(ferry_config::KafkaCloud::MskIam),
            brokers: "b-1.c.x.c2.kafka.eu-west-1.amazonaws.com:9098".into(),
            ..KafkaUplink::default()
        };
        let c = build(&cfg);
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("OAUTHBEARER"));
        assert_eq!(c.get("sasl.username"), None);
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        c.create_native_config().unwrap();

        let cfg = KafkaUplink {
            cloud: Some(ferry_config::KafkaCloud::Confluent),
            brokers: "pkc-1.eu-west-1.aws.confluent.cloud:9092".into(),
            api_key: Some("KEY".into()),
            api_secret: Some("s3cret".into()),
            ..KafkaUplink::default()
        };
        let c = build(&cfg);
        assert_eq!(c.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(c.get("sasl.username"), Some("KEY"));
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("compression.type"), Some("zstd"));
        c.create_native_config().unwrap();
    }
}
