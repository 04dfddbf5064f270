//! Which upstream topic a reading is published to.
//!
//! An MQTT uplink's `[[uplinks.NAME.rewrites]]` are tried in order against the reading's source topic; the first
//! rule whose `filter` matches wins, and its `template` gives the new topic, with `{N}`
//! replaced by what the N-th (1-based) `+` of the filter matched. A `#` at the end of a filter
//! matches the rest of the topic and can be referred to as `{#}` (the matching and the template
//! syntax are [`ferry_config::topic`]'s). Topics no rule matches keep their source topic. Its
//! `topic_prefix` is then prepended to every topic, rewritten or not.

use ferry_config::MqttUplink;
use ferry_config::topic::{captures, expand};

/// The topic rewriting table of one MQTT uplink.
#[derive(Debug, Clone, Default)]
pub struct Rewriter {
    rules: Vec<(String, String)>,
    prefix: String,
}

impl Rewriter {
    /// Builds the table from the config (already validated).
    pub fn new(cfg: &MqttUplink) -> Self {
        Rewriter {
            rules: cfg
                .rewrites
                .iter()
                .map(|r| (r.filter.clone(), r.template.clone()))
                .collect(),
            prefix: cfg.topic_prefix.clone().unwrap_or_default(),
        }
    }

    /// The upstream topic for a reading with this source topic.
    pub fn topic(&self, source_topic: &str) -> String {
        let rewritten = self.rules.iter().find_map(|(filter, template)| {
            captures(filter, source_topic).map(|caps| expand(template, &caps))
        });
        let topic = rewritten.as_deref().unwrap_or(source_topic);
        if self.prefix.is_empty() {
            topic.to_string()
        } else {
            format!("{}{topic}", self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_config::TopicRewrite;

    fn rw(prefix: Option<&str>, rules: &[(&str, &str)]) -> Rewriter {
        Rewriter::new(&MqttUplink {
            topic_prefix: prefix.map(str::to_string),
            rewrites: rules
                .iter()
                .map(|(f, t)| TopicRewrite {
                    filter: f.to_string(),
                    template: t.to_string(),
                })
                .collect(),
            ..MqttUplink::default()
        })
    }

    #[test]
    fn first_match_wins_then_prefix() {
        let r = rw(
            Some("gw/"),
            &[
                ("sensors/+/temp", "site-7/{1}/temperature"),
                ("sensors/+/+", "site-7/{2}/{1}"),
                ("sensors/x/temp", "never"),
                ("logs/#", "archive/{#}"),
            ],
        );
        assert_eq!(r.topic("sensors/x/temp"), "gw/site-7/x/temperature");
        assert_eq!(r.topic("sensors/x/hum"), "gw/site-7/hum/x");
        assert_eq!(r.topic("logs/a/b"), "gw/archive/a/b");
        assert_eq!(r.topic("other/topic"), "gw/other/topic");
    }

    #[test]
    fn no_rules_no_prefix_is_identity() {
        let r = rw(None, &[]);
        assert_eq!(r.topic("a/b/c"), "a/b/c");
    }
}
