//! Which Kafka topic and key a reading goes to.
//!
//! A Kafka uplink's `[[uplinks.NAME.routes]]` are MQTT topic filters matched against the reading's source
//! topic, in order (matched as [`ferry_config::topic`] states); the first match wins, and its
//! `topic` catches the rest.

use ferry_config::{KafkaUplink, KeyRule};

/// The routing table of one Kafka uplink.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(String, String, KeyRule)>,
    default_topic: String,
    default_key: KeyRule,
}

impl Router {
    /// Builds the table from the config (already validated).
    pub fn new(cfg: &KafkaUplink) -> Self {
        Router {
            routes: cfg
                .routes
                .iter()
                .map(|r| (r.filter.clone(), r.topic.clone(), r.key.unwrap_or(cfg.key)))
                .collect(),
            default_topic: cfg.topic.clone(),
            default_key: cfg.key,
        }
    }

    /// The Kafka topic and key rule for a reading with this source topic.
    pub fn route(&self, source_topic: &str) -> (&str, KeyRule) {
        self.routes
            .iter()
            .find(|(f, _, _)| ferry_config::topic::matches(f, source_topic))
            .map_or(
                (self.default_topic.as_str(), self.default_key),
                |(_, t, k)| (t.as_str(), *k),
            )
    }

    /// The topic segment records go to (`delivery = "segment"`): the default topic.
    pub fn default_topic(&self) -> &str {
        &self.default_topic
    }
}

pub use crate::meta::key_for;

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_buffer::{Reading, Source};
    use ferry_config::KafkaRoute;

    #[test]
    fn first_match_wins_and_default_catches_the_rest() {
        let cfg = KafkaUplink {
            topic: "default".into(),
            key: KeyRule::Device,
            routes: vec![
                KafkaRoute {
                    filter: "sensors/+/temp".into(),
                    topic: "temps".into(),
                    key: Some(KeyRule::Level(1)),
                },
                KafkaRoute {
                    filter: "sensors/#".into(),
                    topic: "sensors".into(),
                    key: None,
                },
                KafkaRoute {
                    filter: "sensors/x/temp".into(),
                    topic: "never".into(),
                    key: None,
                },
            ],
            ..KafkaUplink::default()
        };
        let r = Router::new(&cfg);
        assert_eq!(r.route("sensors/x/temp"), ("temps", KeyRule::Level(1)));
        assert_eq!(r.route("sensors/x/hum"), ("sensors", KeyRule::Device));
        assert_eq!(r.route("other"), ("default", KeyRule::Device));
        assert_eq!(r.default_topic(), "default");
    }

    #[test]
    fn keys() {
        let reading = Reading::new(Source::Mqtt, "dev-1", "site/7/temp", &b"1"[..]);
        assert_eq!(key_for(KeyRule::Device, &reading), Some("dev-1"));
        assert_eq!(key_for(KeyRule::Topic, &reading), Some("site/7/temp"));
        assert_eq!(key_for(KeyRule::None, &reading), None);
        assert_eq!(key_for(KeyRule::Level(0), &reading), Some("site"));
        assert_eq!(key_for(KeyRule::Level(1), &reading), Some("7"));
        assert_eq!(key_for(KeyRule::Level(3), &reading), Some("dev-1"));
    }
}
