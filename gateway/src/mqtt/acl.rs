//! Topic access (`[[mqtt.acl]]`): which topics a client may publish to and subscribe within.
//!
//! ## Rules
//! - With no rule, everything is allowed (the listener's authentication is the only gate).
//! - With rules, a client may publish to a topic a filter of an applying rule matches, and
//!   subscribe to a filter that lies within one ([`covers`]): every topic the requested filter
//!   can match, the allowed one matches too. A rule applies by username, by certificate CN, or
//!   to everyone (see [`ferry_config::MqttAcl`]).
//! - `%u` and `%c` are filled with the username and the client id when the client connects. A
//!   value with `/`, `+` or `#` would change what the filter means, so such a filter (and one
//!   with `%u` for a client without a username) allows nothing.
//! - What a refusal looks like on the wire is written in [`crate::mqtt::session`]'s
//!   subscriber and publish code: SUBACK 0x80 / 0x87; PUBLISH acked and dropped (3.1.1) or
//!   PUBACK 0x87 (MQTT 5); counted in `ferry_mqtt_rejected_total{reason="acl_publish"|"acl_subscribe"}`.

use ferry_config::{MqttAcl, topic};

/// The rules, as configured.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: Vec<MqttAcl>,
}

/// What one connected client may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl Acl {
    /// The rules of `[mqtt]`.
    pub fn new(rules: &[MqttAcl]) -> Acl {
        Acl {
            rules: rules.to_vec(),
        }
    }

    /// What a client may do; `None`: anything (no rules).
    pub fn for_client(
        &self,
        username: Option<&str>,
        cert_cn: Option<&str>,
        client_id: &str,
    ) -> Option<ClientAcl> {
        if self.rules.is_empty() {
            return None;
        }
        let mut acl = ClientAcl {
            publish: Vec::new(),
            subscribe: Vec::new(),
        };
        let applies = |r: &MqttAcl| match (&r.user, &r.cert_cn) {
            (Some(u), _) => username == Some(u.as_str()),
            (None, Some(cn)) => cert_cn == Some(cn.as_str()),
            (None, None) => true,
        };
        let fill = |f: &str| -> Option<String> {
            let safe = |v: &str| !v.contains(['/', '+', '#']);
            let mut out = f.to_owned();
            if out.contains("%u") {
                let u = username.filter(|u| safe(u))?;
                out = out.replace("%u", u);
            }
            if out.contains("%c") {
                if !safe(client_id) {
                    return None;
                }
                out = out.replace("%c", client_id);
            }
            topic::check_filter(&out).ok().map(|_| out)
        };
        for r in self.rules.iter().filter(|r| applies(r)) {
            acl.publish.extend(r.publish.iter().filter_map(|f| fill(f)));
            acl.subscribe
                .extend(r.subscribe.iter().filter_map(|f| fill(f)));
        }
        Some(acl)
    }
}

impl ClientAcl {
    /// Whether the client may publish to `topic_name`.
    pub fn may_publish(&self, topic_name: &str) -> bool {
        self.publish.iter().any(|f| topic::matches(f, topic_name))
    }

    /// Whether the client may subscribe to `filter` (the filter of a shared subscription).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe.iter().any(|a| covers(a, filter))
    }
}

/// Whether every topic `requested` can match, `allowed` matches too (both valid filters).
pub fn covers(allowed: &str, requested: &str) -> bool {
    let mut a = allowed.split('/');
    let mut r = requested.split('/');
    let mut first = true;
    loop {
        match (a.next(), r.next()) {
            // `x/#` also matches `x`.
            (Some("#"), None) => return true,
            (Some("#"), Some(level)) => return !(first && level.starts_with('$')),
            (Some("+"), Some(level)) if level != "#" => {
                if first && level.starts_with('$') {
                    return false;
                }
            }
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(user: Option<&str>, publish: &[&str], subscribe: &[&str]) -> MqttAcl {
        MqttAcl {
            user: user.map(String::from),
            cert_cn: None,
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_subscription_must_lie_within_an_allowed_filter() {
        for (allowed, requested, yes) in [
            ("a/#", "a/#", true),
            ("a/#", "a", true),
            ("a/#", "a/b/+", true),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/+", "a/b/c", false),
            ("a/b", "a/+", false),
            ("#", "x/#", true),
            ("#", "$SYS/#", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/a", true),
        ] {
            assert_eq!(covers(allowed, requested), yes, "{allowed} {requested}");
        }
    }

    #[test]
    fn rules_apply_by_user_or_to_everyone_and_fill_placeholders_safely() {
        let acl = Acl::new(&[
            rule(None, &["sensors/%c/#"], &["cmd/%c/#"]),
            rule(Some("dash"), &[], &["sensors/#"]),
            rule(None, &["users/%u"], &[]),
        ]);
        assert_eq!(Acl::default().for_client(None, None, "x"), None);
        let dev = acl.for_client(None, None, "d1").unwrap();
        assert!(dev.may_publish("sensors/d1/t"));
        assert!(!dev.may_publish("sensors/d2/t"));
        assert!(
            !dev.may_publish("users/d1"),
            "no username: %u fills nothing"
        );
        assert!(dev.may_subscribe("cmd/d1/#"));
        assert!(!dev.may_subscribe("sensors/#"));
        let dash = acl.for_client(Some("dash"), None, "ui").unwrap();
        assert!(dash.may_subscribe("sensors/+/t"));
        assert!(dash.may_publish("users/dash"));
        // A client id that would widen the filter gets nothing from it.
        let sly = acl.for_client(None, None, "#").unwrap();
        assert!(!sly.may_publish("sensors/x/t"));
        assert!(!sly.may_subscribe("cmd/x/y"));
    }
}
