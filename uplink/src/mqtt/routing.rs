//! Which upstream topic a reading is published to.
//!
//! An MQTT uplink's `[[uplinks.NAME.rewrites]]` are tried in order against the reading's source topic; the first
//! rule whose `filter` matches wins, and its `template` gives the new topic, with `{N}`
//! replaced by what the N-th (1-based) `+` of the filter matched. A `#` at the end of a filter
//! matches the rest of the topic and can be referred to as `{#}`. Topics no rule matches keep
//! their source topic. Its `topic_prefix` is then prepended to every topic, rewritten
//! or not. Filters follow MQTT matching ([`crate::topics::matches`]): wildcards
//! at the first level do not match topics starting with `$`.

use ferry_config::MqttUplink;

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

/// What a filter's wildcards matched.
#[derive(Debug, PartialEq, Eq)]
struct Captures<'a> {
    plus: Vec<&'a str>,
    hash: Option<&'a str>,
}

/// Matches `topic` against the MQTT filter `filter`, returning what each wildcard matched.
fn captures<'a>(filter: &str, topic: &'a str) -> Option<Captures<'a>> {
    if !crate::topics::matches(filter, topic) {
        return None;
    }
    let mut plus = Vec::new();
    let mut hash = None;
    let mut rest = topic;
    let mut levels = filter.split('/').peekable();
    while let Some(f) = levels.next() {
        if f == "#" {
            hash = Some(rest);
            break;
        }
        let (level, after) = match rest.split_once('/') {
            Some((l, a)) => (l, a),
            None => (rest, ""),
        };
        if f == "+" {
            plus.push(level);
        }
        rest = after;
        // "a/#" also matches "a": '#' then captures nothing.
        if rest.is_empty() && levels.peek() == Some(&"#") {
            hash = Some("");
            break;
        }
    }
    Some(Captures { plus, hash })
}

/// Replaces `{N}` (1-based `+` capture) and `{#}` in `template`. A placeholder with no capture
/// (validation rejects those) expands to nothing.
fn expand(template: &str, caps: &Captures<'_>) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let name = &after[..close];
                if name == "#" {
                    out.push_str(caps.hash.unwrap_or(""));
                } else if let Ok(n) = name.parse::<usize>() {
                    if let Some(v) = n.checked_sub(1).and_then(|i| caps.plus.get(i)) {
                        out.push_str(v);
                    }
                } else {
                    // Not a placeholder: keep it literally.
                    out.push('{');
                    out.push_str(name);
                    out.push('}');
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
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
    fn captures_plus_and_hash() {
        assert_eq!(
            captures("sensors/+/+", "sensors/a/temp"),
            Some(Captures {
                plus: vec!["a", "temp"],
                hash: None
            })
        );
        assert_eq!(
            captures("sensors/+/#", "sensors/a/b/c"),
            Some(Captures {
                plus: vec!["a"],
                hash: Some("b/c")
            })
        );
        assert_eq!(
            captures("sensors/#", "sensors"),
            Some(Captures {
                plus: vec![],
                hash: Some("")
            })
        );
        assert_eq!(
            captures("+/x", "/x"),
            Some(Captures {
                plus: vec![""],
                hash: None
            })
        );
        assert_eq!(captures("sensors/+/temp", "sensors/a/hum"), None);
        assert_eq!(captures("+/x", "$SYS/x"), None);
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

    #[test]
    fn odd_templates() {
        let caps = Captures {
            plus: vec!["a"],
            hash: None,
        };
        assert_eq!(expand("x/{1}/{2}", &caps), "x/a/");
        assert_eq!(expand("x/{name}/{1", &caps), "x/{name}/{1");
        assert_eq!(expand("{0}{1}{1}", &caps), "aa");
    }
}
