//! Builds the librdkafka producer configuration from a Kafka uplink's table.
//!
//! ferry sets, in this order:
//!
//! 1. `bootstrap.servers`, `client.id`, `compression.type`, `message.timeout.ms`,
//!    `security.protocol`, and when configured `sasl.mechanism`, `sasl.username`,
//!    `sasl.password`, `ssl.ca.location`;
//! 2. the uplink's `librdkafka` passthrough table, which may override anything of (1);
//! 3. the **safety settings**, which always win: `enable.idempotence = true`, `acks = all`.
//!
//! A passthrough entry that would weaken delivery safety is ignored with a warning:
//! `acks`/`request.required.acks` other than `all`/`-1`, `enable.idempotence` other than
//! `true`, `max.in.flight.requests.per.connection`/`max.in.flight` above 5 (the idempotent
//! producer's ordering limit), and `retries`/`message.send.max.retries` below 1.

use ferry_config::KafkaUplink;
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
fn weakens(key: &str, value: &str) -> Option<&'static str> {
    let v = value.trim().to_ascii_lowercase();
    match key {
        "acks" | "request.required.acks" | "topic.request.required.acks" => {
            (v != "all" && v != "-1").then_some("ferry requires acks=all")
        }
        "enable.idempotence" => (v != "true").then_some("ferry requires enable.idempotence=true"),
        "max.in.flight.requests.per.connection" | "max.in.flight" => match v.parse::<i64>() {
            Ok(n) if (1..=MAX_IN_FLIGHT_LIMIT).contains(&n) => None,
            _ => Some("the idempotent producer keeps order only with at most 5 in flight"),
        },
        "retries" | "message.send.max.retries" => match v.parse::<i64>() {
            Ok(n) if n >= 1 => None,
            _ => Some("ferry requires the producer to retry"),
        },
        _ => None,
    }
}

/// The producer configuration for `cfg`.
pub fn client_config(cfg: &KafkaUplink, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id)
        .set("compression.type", cfg.compression.as_str())
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("security.protocol", cfg.security_protocol.as_str());
    if let Some(m) = cfg.sasl_mechanism {
        c.set("sasl.mechanism", m.as_str());
    }
    if let Some(u) = &cfg.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &cfg.sasl_password {
        c.set("sasl.password", p.expose());
    }
    if let Some(ca) = &cfg.ssl_ca_path {
        c.set("ssl.ca.location", ca.display().to_string());
    }
    for (key, value) in &cfg.librdkafka {
        if let Some(why) = weakens(key, value) {
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
    c.set("enable.idempotence", "true").set("acks", "all");
    c.remove("request.required.acks");
    c.remove("topic.request.required.acks");
    c
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
        client_config(&cfg, "ferry-gw1")
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
        let c = client_config(&cfg, "x");
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
}
