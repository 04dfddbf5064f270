//! `Config::validate`: every rule that types alone cannot express.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use crate::defaults::{BUFFER_MIN_MAX_BYTES, MAX_FLUSH_DELAY_LIMIT_MS, MIB};
use crate::error::{ConfigError, ConfigErrorKind, ConfigErrors, path_segment};
use crate::model::*;
use crate::topic;

/// Checks a gateway id: 1 to 64 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_gateway_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("must be 1 to 64 characters long, got {}", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "invalid character {c:?}; allowed are A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks an uplink name (the NAME of `[uplinks.NAME]`, also the name of its buffer cursor):
/// 1 to 64 characters of `a-z 0-9 _ -`.
pub fn check_uplink_name(name: &str) -> Result<(), String> {
    let len = name.chars().count();
    if !(1..=64).contains(&len) {
        return Err(format!(
            "invalid uplink name: must be 1 to 64 characters long, got {len}"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')))
    {
        return Err(format!(
            "invalid character {c:?} in uplink name; allowed are a-z, 0-9, '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks a Kafka topic name: 1 to 249 characters of `A-Z a-z 0-9 . _ -`, not `.` or `..`.
pub fn check_kafka_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("must not be empty".into());
    }
    if topic.len() > 249 {
        return Err(format!(
            "must be at most 249 characters long, got {}",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return Err(format!("'{topic}' is not a valid Kafka topic name"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "invalid character {c:?} in Kafka topic name; allowed are A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    Ok(())
}

fn check_host_port(entry: &str) -> Result<(), String> {
    let (host, port) = entry
        .rsplit_once(':')
        .ok_or_else(|| format!("'{entry}' is not host:port"))?;
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("'{entry}' has no valid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("'{entry}' has an invalid port '{port}'")),
    }
}

/// The permission bits of `path` (following symlinks) if other users have any access to it
/// (`mode & 0o007 != 0`); `None` if they have none, or the path does not exist.
fn other_users_access(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
        (mode & 0o007 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

struct Problems(Vec<ConfigError>);

impl Problems {
    fn invalid(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(
            ConfigErrorKind::InvalidValue,
            path,
            message,
        ));
    }

    fn check(&mut self, path: impl Into<String>, result: Result<impl Sized, String>) {
        if let Err(message) = result {
            self.invalid(path, message);
        }
    }

    fn at_least(&mut self, path: impl Into<String>, value: u64, min: u64) {
        if value < min {
            self.invalid(path, format!("must be at least {min}, got {value}"));
        }
    }

    fn path_required(&mut self, path: &str, value: &Path) {
        if value.as_os_str().is_empty() {
            self.invalid(path, "is required");
        }
    }

    fn non_empty_opt(&mut self, path: impl Into<String>, value: Option<&str>) {
        if value == Some("") {
            self.invalid(path, "must not be empty when set");
        }
    }
}

impl Config {
    /// Checks every rule of the configuration and returns all problems found.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut p = Problems(Vec::new());
        self.validate_gateway(&mut p);
        self.validate_buffer(&mut p);
        self.validate_mqtt(&mut p);
        self.validate_http(&mut p);
        self.validate_uplinks(&mut p);
        self.validate_status(&mut p);
        self.validate_listeners(&mut p);
        self.validate_key_files(&mut p);
        ConfigErrors(p.0).into_result()
    }

    /// Problems ferry runs with but an operator should fix, each with its key path. Today: a
    /// `gateway.data_dir` that exists and that other users can access (ferry creates it with
    /// mode 0700, but never changes the mode of an existing directory, which the operator may
    /// have set on purpose). `ferry run` logs them as warnings at start, `ferry check-config`
    /// prints them.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let dir = &self.gateway.data_dir;
        match other_users_access(dir) {
            Some(mode) if dir.is_dir() => vec![ConfigError::new(
                ConfigErrorKind::Permissions,
                "gateway.data_dir",
                format!(
                    "{} is accessible by other users (mode {mode:04o}), so they can read the buffered readings; restrict it with chmod 700 {}",
                    dir.display(),
                    dir.display()
                ),
            )],
            _ => Vec::new(),
        }
    }

    /// A private key file other users can read is refused, as OpenSSH and PostgreSQL do. Only
    /// files that exist are checked; a missing file is reported when it is loaded.
    fn validate_key_files(&self, p: &mut Problems) {
        let mut keys = vec![
            (
                "mqtt.tls.key_path".to_owned(),
                self.mqtt.tls.as_ref().map(|t| &t.key_path),
            ),
            (
                "http.tls.key_path".to_owned(),
                self.http.tls.as_ref().map(|t| &t.key_path),
            ),
        ];
        for (name, u) in &self.uplinks {
            if let UplinkKind::Mqtt(m) = &u.kind {
                keys.push((
                    format!("{}.client_key_path", uplink_path(name)),
                    m.client_key_path.as_ref(),
                ));
            }
        }
        for (path, file) in keys {
            let Some(file) = file.filter(|f| !f.as_os_str().is_empty()) else {
                continue;
            };
            if let Some(mode) = other_users_access(file) {
                p.0.push(ConfigError::new(
                    ConfigErrorKind::Permissions,
                    path,
                    format!(
                        "the private key {} is accessible by other users (mode {mode:04o}); restrict it with chmod 600 {} (or 640 and a group ferry is in)",
                        file.display(),
                        file.display()
                    ),
                ));
            }
        }
    }

    fn validate_gateway(&self, p: &mut Problems) {
        let g = &self.gateway;
        p.check("gateway.id", check_gateway_id(&g.id));
        p.path_required("gateway.data_dir", &g.data_dir);
        if g.log_level.trim().is_empty() {
            p.invalid("gateway.log_level", "must not be empty");
        }
    }

    fn validate_buffer(&self, p: &mut Problems) {
        let b = &self.buffer;
        if b.max_bytes < BUFFER_MIN_MAX_BYTES {
            p.invalid(
                "buffer.max_bytes",
                format!("must be at least 1 MiB ({MIB}), got {}", b.max_bytes),
            );
        }
        p.at_least("buffer.max_batch_bytes", b.max_batch_bytes, 1);
        p.at_least("buffer.max_pending_bytes", b.max_pending_bytes, 1);
        if b.max_batch_bytes.saturating_mul(4) > b.max_bytes {
            p.invalid(
                "buffer.max_batch_bytes",
                format!(
                    "must be at most buffer.max_bytes / 4 ({}), got {}",
                    b.max_bytes / 4,
                    b.max_batch_bytes
                ),
            );
        }
        p.at_least("buffer.max_batch_readings", b.max_batch_readings as u64, 1);
        p.at_least("buffer.flush_target_bytes", b.flush_target_bytes, 1);
        if b.max_flush_delay_ms > MAX_FLUSH_DELAY_LIMIT_MS {
            p.invalid(
                "buffer.max_flush_delay_ms",
                format!(
                    "must be at most {MAX_FLUSH_DELAY_LIMIT_MS} (an ack held longer makes clients time out), got {}",
                    b.max_flush_delay_ms
                ),
            );
        }
        if b.compression_level > 9 {
            p.invalid(
                "buffer.compression_level",
                format!("must be between 0 and 9, got {}", b.compression_level),
            );
        }
    }

    fn validate_mqtt(&self, p: &mut Problems) {
        let m = &self.mqtt;
        p.at_least("mqtt.max_connections", m.max_connections as u64, 1);
        p.at_least("mqtt.max_payload_bytes", m.max_payload_bytes as u64, 1);
        p.at_least("mqtt.max_inflight", u64::from(m.max_inflight), 1);
        p.at_least(
            "mqtt.subscriber_queue_messages",
            m.subscriber_queue_messages as u64,
            1,
        );
        let one_message = m.max_payload_bytes as u64 + topic::MAX_LEN as u64;
        if (m.subscriber_queues_total_bytes) < m.subscriber_queue_bytes {
            p.invalid(
                "mqtt.subscriber_queues_total_bytes",
                format!(
                    "must be at least subscriber_queue_bytes ({}), got {}",
                    m.subscriber_queue_bytes, m.subscriber_queues_total_bytes
                ),
            );
        }
        if (m.subscriber_queue_bytes as u64) < one_message {
            p.invalid(
                "mqtt.subscriber_queue_bytes",
                format!(
                    "must hold one message of max_payload_bytes and the longest topic, \
                     at least {one_message}, got {}",
                    m.subscriber_queue_bytes
                ),
            );
        }
        if m.enabled && !m.allow_anonymous && m.users.is_empty() {
            p.invalid(
                "mqtt.allow_anonymous",
                "is false but no [[mqtt.users]] are configured, so no client could connect",
            );
        }
        let mut seen = HashSet::new();
        for (i, user) in m.users.iter().enumerate() {
            let base = format!("mqtt.users[{i}]");
            if user.username.is_empty() {
                p.invalid(format!("{base}.username"), "is required");
            } else if !seen.insert(user.username.as_str()) {
                p.invalid(
                    format!("{base}.username"),
                    format!("duplicate username '{}'", user.username),
                );
            }
            match (&user.password, &user.password_hash) {
                (Some(_), Some(_)) => p.invalid(
                    base.clone(),
                    "set either password or password_hash, not both",
                ),
                (None, None) => p.invalid(base.clone(), "set one of password or password_hash"),
                (Some(pw), None) if pw.expose().is_empty() => {
                    p.invalid(format!("{base}.password"), "must not be empty")
                }
                (None, Some(hash)) if !hash.starts_with("$argon2") => p.invalid(
                    format!("{base}.password_hash"),
                    "must be an argon2 PHC string starting with '$argon2' (e.g. '$argon2id$v=19$...')",
                ),
                _ => {}
            }
        }
        let cn = m.tls.as_ref().is_some_and(|t| t.device_from_cert_cn);
        for (i, rule) in m.acl.iter().enumerate() {
            let base = format!("mqtt.acl[{i}]");
            if rule.user.is_some() && rule.cert_cn.is_some() {
                p.invalid(base.clone(), "set user or cert_cn, not both");
            }
            if rule.cert_cn.is_some() && !cn {
                p.invalid(
                    format!("{base}.cert_cn"),
                    "needs mqtt.tls.device_from_cert_cn = true, which reads the certificate's CN",
                );
            }
            for (key, filters) in [("publish", &rule.publish), ("subscribe", &rule.subscribe)] {
                for (j, f) in filters.iter().enumerate() {
                    let filled = f.replace("%u", "u").replace("%c", "c");
                    if let Err(e) = topic::check_filter(&filled) {
                        p.invalid(
                            format!("{base}.{key}[{j}]"),
                            format!("topic filter {f:?} {e}"),
                        );
                    }
                }
            }
        }
        if let Some(tls) = &m.tls {
            p.path_required("mqtt.tls.cert_path", &tls.cert_path);
            p.path_required("mqtt.tls.key_path", &tls.key_path);
            if tls.client_ca_path.is_none() {
                for (set, key) in [
                    (tls.require_client_cert, "require_client_cert"),
                    (tls.device_from_cert_cn, "device_from_cert_cn"),
                ] {
                    if set {
                        p.invalid(
                            format!("mqtt.tls.{key}"),
                            "needs mqtt.tls.client_ca_path to verify client certificates",
                        );
                    }
                }
            }
        }
    }

    fn validate_http(&self, p: &mut Problems) {
        let h = &self.http;
        p.at_least("http.max_body_bytes", h.max_body_bytes, 1);
        if h.max_decompressed_bytes < h.max_body_bytes {
            p.invalid(
                "http.max_decompressed_bytes",
                format!(
                    "must be at least http.max_body_bytes ({}), got {}",
                    h.max_body_bytes, h.max_decompressed_bytes
                ),
            );
        }
        p.at_least("http.max_batch_readings", h.max_batch_readings as u64, 1);
        p.at_least("http.max_connections", h.max_connections as u64, 1);
        let mut seen = HashSet::new();
        for (i, t) in h.tokens.iter().enumerate() {
            let base = format!("http.tokens[{i}]");
            if t.token.expose().is_empty() {
                p.invalid(format!("{base}.token"), "is required");
            } else if !seen.insert(t.token.expose()) {
                p.invalid(
                    format!("{base}.token"),
                    "duplicate token (each token must be unique)",
                );
            }
            p.non_empty_opt(format!("{base}.device"), t.device.as_deref());
            p.non_empty_opt(format!("{base}.name"), t.name.as_deref());
        }
        if let Some(tls) = &h.tls {
            p.path_required("http.tls.cert_path", &tls.cert_path);
            p.path_required("http.tls.key_path", &tls.key_path);
        }
    }

    fn validate_uplinks(&self, p: &mut Problems) {
        for (name, u) in &self.uplinks {
            let base = uplink_path(name);
            p.check(base.clone(), check_uplink_name(name));
            if u.topics.is_empty() {
                p.invalid(
                    format!("{base}.topics"),
                    "must not be empty: an uplink without topics forwards nothing (to switch it off, set enabled = false)",
                );
            }
            for (i, filter) in u.topics.iter().enumerate() {
                p.check(format!("{base}.topics[{i}]"), topic::check_filter(filter));
            }
            match &u.kind {
                UplinkKind::Kafka(k) => {
                    if k.delivery == Delivery::Segment && u.topics != ["#"] {
                        p.invalid(
                            format!("{base}.topics"),
                            "must be [\"#\"] with delivery = \"segment\": a segment holds readings of any topic, so it cannot be filtered by topic",
                        );
                    }
                    validate_kafka(&base, k, p);
                }
                UplinkKind::Mqtt(m) => validate_mqtt_uplink(&base, m, p),
                UplinkKind::Kinesis(k) => validate_kinesis(&base, k, p),
                UplinkKind::Pubsub(g) => validate_pubsub(&base, g, p),
            }
            if u.enabled && u.kind.has_downlink() && !self.mqtt.enabled {
                p.invalid(
                    format!("{base}.downlink"),
                    "needs the MQTT listener (mqtt.enabled = true): commands are published to local MQTT subscribers",
                );
            }
        }
        self.validate_mqtt_client_ids(p);
    }

    /// Two enabled MQTT uplinks with the same client id on the same broker would take turns:
    /// the broker disconnects a client whenever another connects with its id.
    fn validate_mqtt_client_ids(&self, p: &mut Problems) {
        let mut seen: Vec<(&str, String, MqttEndpoint)> = Vec::new();
        for (name, u) in self.enabled_uplinks() {
            let UplinkKind::Mqtt(m) = &u.kind else {
                continue;
            };
            let Ok(mut endpoint) = m.endpoint() else {
                continue; // reported at its url
            };
            endpoint.host.make_ascii_lowercase();
            let id = self.mqtt_client_id(name, m);
            let same = seen
                .iter()
                .find(|(_, i, e)| *i == id && e.host == endpoint.host && e.port == endpoint.port);
            if let Some((other, _, _)) = same {
                p.invalid(
                    format!("{}.client_id", uplink_path(name)),
                    format!(
                        "'{id}' is also the client id of {} on the same broker ({}:{}): the broker would disconnect one whenever the other connects; give each a client_id of its own",
                        uplink_path(other),
                        endpoint.host,
                        endpoint.port
                    ),
                );
            } else {
                seen.push((name, id, endpoint));
            }
        }
    }

    fn validate_status(&self, p: &mut Problems) {
        let s = &self.status;
        p.at_least("status.max_devices", s.max_devices as u64, 1);
        p.at_least("status.stalled_after_secs", s.stalled_after_secs, 1);
        p.at_least("status.log_summary_secs", s.log_summary_secs, 1);
        if s.token.as_ref().is_some_and(|t| t.expose().is_empty()) {
            p.invalid("status.token", "must not be empty when set");
        }
    }

    /// Two enabled listeners on the same non-zero port (and overlapping addresses) would fail
    /// to bind at startup.
    fn validate_listeners(&self, p: &mut Problems) {
        let mut listeners: Vec<(&str, SocketAddr)> = Vec::new();
        if self.mqtt.enabled {
            listeners.push(("mqtt.listen", self.mqtt.listen));
            if let Some(tls) = &self.mqtt.tls {
                listeners.push(("mqtt.tls.listen", tls.listen));
            }
        }
        if self.http.enabled {
            listeners.push(("http.listen", self.http.listen));
        }
        if let Some(addr) = self.status.listen {
            listeners.push(("status.listen", addr));
        }
        for (i, (path, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            let clash = listeners[..i].iter().find(|(_, other)| {
                other.port() == addr.port()
                    && (other.ip() == addr.ip()
                        || other.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some((other_path, _)) = clash {
                p.invalid(*path, format!("{addr} clashes with {other_path}"));
            }
        }
    }
}

fn uplink_path(name: &str) -> String {
    format!("uplinks.{}", path_segment(name))
}

fn validate_kafka(base: &str, k: &KafkaUplink, p: &mut Problems) {
    if let Some(d) = &k.downlink {
        let path = format!("{base}.downlink");
        if d.topic.trim().is_empty() {
            p.invalid(format!("{path}.topic"), "is required");
        }
        p.non_empty_opt(format!("{path}.group_id"), d.group_id.as_deref());
        if d.qos.is_some_and(|q| q > 2) {
            p.invalid(format!("{path}.qos"), "must be 0, 1 or 2");
        }
    }
    if k.brokers.trim().is_empty() {
        p.invalid(format!("{base}.brokers"), "must not be empty");
    } else {
        for entry in k.brokers.split(',') {
            p.check(format!("{base}.brokers"), check_host_port(entry.trim()));
        }
    }
    p.check(format!("{base}.topic"), check_kafka_topic(&k.topic));
    p.at_least(
        format!("{base}.max_inflight_segments"),
        k.max_inflight_segments as u64,
        1,
    );
    p.at_least(
        format!("{base}.max_inflight_readings"),
        k.max_inflight_readings as u64,
        1,
    );
    p.at_least(
        format!("{base}.message_timeout_ms"),
        k.message_timeout_ms,
        1,
    );
    if k.initial_backoff_ms > k.max_backoff_ms {
        p.invalid(
            format!("{base}.initial_backoff_ms"),
            format!(
                "must be at most {base}.max_backoff_ms ({}), got {}",
                k.max_backoff_ms, k.initial_backoff_ms
            ),
        );
    }
    let proto = k.security_protocol.as_str();
    if k.cloud.is_some() {
        // The preset sets the protocol and SASL; `connection()` below refuses what contradicts it.
    } else if k.security_protocol.is_sasl() {
        if k.sasl_mechanism.is_none() {
            p.invalid(
                format!("{base}.sasl_mechanism"),
                format!("is required with security_protocol = \"{proto}\""),
            );
        }
        if k.sasl_username.as_deref().unwrap_or("").is_empty() {
            p.invalid(
                format!("{base}.sasl_username"),
                format!("is required with security_protocol = \"{proto}\""),
            );
        }
        if k.sasl_password
            .as_ref()
            .is_none_or(|s| s.expose().is_empty())
        {
            p.invalid(
                format!("{base}.sasl_password"),
                format!("is required with security_protocol = \"{proto}\""),
            );
        }
    } else {
        for (set, key) in [
            (k.sasl_mechanism.is_some(), "sasl_mechanism"),
            (k.sasl_username.is_some(), "sasl_username"),
            (k.sasl_password.is_some(), "sasl_password"),
        ] {
            if set {
                p.invalid(
                        format!("{base}.{key}"),
                        format!(
                            "is only used with security_protocol \"sasl_plaintext\" or \"sasl_ssl\", not \"{proto}\""
                        ),
                    );
            }
        }
    }
    if let Err(problems) = k.connection() {
        for c in problems {
            p.invalid(format!("{base}.{}", c.key), c.message);
        }
    }
    for (i, route) in k.routes.iter().enumerate() {
        let base = format!("{base}.routes[{i}]");
        p.check(format!("{base}.filter"), topic::check_filter(&route.filter));
        p.check(format!("{base}.topic"), check_kafka_topic(&route.topic));
    }
    for key in k.librdkafka.keys() {
        if key.trim().is_empty() {
            p.invalid(
                format!("{base}.librdkafka"),
                "property names must not be empty",
            );
        }
    }
}

fn validate_mqtt_uplink(base: &str, m: &MqttUplink, p: &mut Problems) {
    p.check(format!("{base}.url"), MqttEndpoint::parse(&m.url));
    if m.qos > 1 {
        p.invalid(
            format!("{base}.qos"),
            format!("must be 0 or 1, got {}", m.qos),
        );
    }
    p.at_least(format!("{base}.max_inflight"), u64::from(m.max_inflight), 1);
    p.non_empty_opt(format!("{base}.client_id"), m.client_id.as_deref());
    p.non_empty_opt(format!("{base}.username"), m.username.as_deref());
    if m.password.is_some() && m.username.is_none() {
        p.invalid(format!("{base}.password"), format!("needs {base}.username"));
    }
    if let Some(prefix) = &m.topic_prefix {
        p.check(format!("{base}.topic_prefix"), topic::check_part(prefix));
    }
    match (&m.client_cert_path, &m.client_key_path) {
        (Some(_), None) => p.invalid(
            format!("{base}.client_key_path"),
            "is required when client_cert_path is set",
        ),
        (None, Some(_)) => p.invalid(
            format!("{base}.client_cert_path"),
            "is required when client_key_path is set",
        ),
        _ => {}
    }
    if m.initial_backoff_ms > m.max_backoff_ms {
        p.invalid(
            format!("{base}.initial_backoff_ms"),
            format!(
                "must be at most {base}.max_backoff_ms ({}), got {}",
                m.max_backoff_ms, m.initial_backoff_ms
            ),
        );
    }
    for (i, d) in m.downlink.iter().enumerate() {
        let path = format!("{base}.downlink[{i}]");
        if let Err(e) = topic::check_filter(&d.remote) {
            p.invalid(format!("{path}.remote"), e);
        } else if let Some(local) = &d.local {
            p.check(
                format!("{path}.local"),
                topic::check_rewrite(&d.remote, local),
            );
        }
        if d.qos.is_some_and(|q| q > 1) {
            p.invalid(format!("{path}.qos"), "must be 0 or 1");
        }
        if m.downlink[..i].iter().any(|o| o.remote == d.remote) {
            p.invalid(
                format!("{path}.remote"),
                format!(
                    "{:?} is subscribed by an earlier downlink already",
                    d.remote
                ),
            );
        }
    }
    for (i, rw) in m.rewrites.iter().enumerate() {
        let base = format!("{base}.rewrites[{i}]");
        match topic::check_filter(&rw.filter) {
            Err(e) => {
                p.invalid(format!("{base}.filter"), e);
                p.check(
                    format!("{base}.template"),
                    topic::check_template(&rw.template),
                );
            }
            Ok(_) => p.check(
                format!("{base}.template"),
                topic::check_rewrite(&rw.filter, &rw.template),
            ),
        }
    }
}

/// An `endpoint` override: `http://` or `https://`, a host, an optional port, nothing else.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .ok_or_else(|| format!("'{endpoint}' must start with https:// or http://"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "'{endpoint}' must be scheme://host[:port], with no path, query or credentials"
        ));
    }
    // An IPv6 address is bracketed ("[::1]:8085"); otherwise the last ':' starts the port.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, "")) => (addr, None),
            Some((addr, tail)) => match tail.strip_prefix(':') {
                Some(port) => (addr, Some(port)),
                None => ("", None),
            },
            None => ("", None),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() || (!authority.starts_with('[') && host.contains(':')) {
        return Err(format!("'{endpoint}' has no valid host"));
    }
    let valid_port =
        |p: &str| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0);
    if let Some(port) = port.filter(|p| !valid_port(p)) {
        return Err(format!(
            "'{endpoint}': the port must be a number from 1 to 65535, got '{port}'"
        ));
    }
    Ok(())
}

/// The rules every HTTP-based uplink (Kinesis, Pub/Sub) shares: endpoint, windows, backoff.
fn validate_http_uplink(
    base: &str,
    endpoint: Option<&str>,
    (max_requests, max_readings, timeout_ms): (usize, usize, u64),
    (initial_backoff_ms, max_backoff_ms): (u64, u64),
    p: &mut Problems,
) {
    if let Some(e) = endpoint {
        p.check(format!("{base}.endpoint"), check_endpoint(e));
    }
    p.at_least(
        format!("{base}.max_inflight_requests"),
        max_requests as u64,
        1,
    );
    p.at_least(
        format!("{base}.max_inflight_readings"),
        max_readings as u64,
        1,
    );
    p.at_least(format!("{base}.request_timeout_ms"), timeout_ms, 1);
    if initial_backoff_ms > max_backoff_ms {
        p.invalid(
            format!("{base}.initial_backoff_ms"),
            format!(
                "must be at most {base}.max_backoff_ms ({max_backoff_ms}), got {initial_backoff_ms}"
            ),
        );
    }
}

fn validate_kinesis(base: &str, k: &KinesisUplink, p: &mut Problems) {
    let arn = k.stream.starts_with("arn:");
    if k.stream.is_empty() {
        p.invalid(
            format!("{base}.stream"),
            "is required: the stream's name or ARN",
        );
    } else if arn {
        let parts: Vec<&str> = k.stream.split(':').collect();
        let ok = parts.len() == 6
            && parts[2] == "kinesis"
            && !parts[3].is_empty()
            && parts[5]
                .strip_prefix("stream/")
                .is_some_and(|n| !n.is_empty());
        if !ok {
            p.invalid(
                format!("{base}.stream"),
                "is not a Kinesis stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)",
            );
        }
    } else if k.stream.len() > 128
        || !k
            .stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        p.invalid(
            format!("{base}.stream"),
            "a stream name has 1 to 128 characters of a-z A-Z 0-9 _ . -",
        );
    }
    p.non_empty_opt(format!("{base}.region"), k.region.as_deref());
    if k.partition_key == KeyRule::None {
        p.invalid(
            format!("{base}.partition_key"),
            "Kinesis needs a partition key: use \"device\", \"topic\" or \"level:N\"",
        );
    }
    if k.access_key_id.is_some() != k.secret_access_key.is_some() {
        p.invalid(
            format!("{base}.secret_access_key"),
            "access_key_id and secret_access_key are set together",
        );
    }
    if k.session_token.is_some() && k.access_key_id.is_none() {
        p.invalid(format!("{base}.session_token"), "needs access_key_id");
    }
    p.non_empty_opt(format!("{base}.profile"), k.profile.as_deref());
    validate_http_uplink(
        base,
        k.endpoint.as_deref(),
        (
            k.max_inflight_requests,
            k.max_inflight_readings,
            k.request_timeout_ms,
        ),
        (k.initial_backoff_ms, k.max_backoff_ms),
        p,
    );
}

/// A Pub/Sub project id (not empty): a-z 0-9 `-`, and `.` `:` for domain-scoped projects.
/// New ids have 6 to 30 characters; older ones differ, so only the characters are checked.
pub fn check_pubsub_project(project: &str) -> Result<(), String> {
    let ok = project
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err("a project id has the characters a-z 0-9 - (and . : for domain projects)".into())
    }
}

/// A Pub/Sub topic id (not empty): 3 to 255 characters of A-Z a-z 0-9 `- _ . ~ + %`, starting
/// with a letter and not with `goog`.
pub fn check_pubsub_topic(t: &str) -> Result<(), String> {
    let ok = (3..=255).contains(&t.len())
        && t.as_bytes()[0].is_ascii_alphabetic()
        && !t.starts_with("goog")
        && t.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+' | b'%')
        });
    if ok {
        Ok(())
    } else {
        Err("a topic id has 3 to 255 characters of A-Z a-z 0-9 - _ . ~ + %, starts with a letter and not with \"goog\"".into())
    }
}

fn validate_pubsub(base: &str, g: &PubsubUplink, p: &mut Problems) {
    if g.project.is_empty() {
        p.invalid(
            format!("{base}.project"),
            "is required: the Google Cloud project id",
        );
    } else {
        p.check(format!("{base}.project"), check_pubsub_project(&g.project));
    }
    if g.topic.is_empty() {
        p.invalid(format!("{base}.topic"), "is required: the topic id");
    } else {
        p.check(format!("{base}.topic"), check_pubsub_topic(&g.topic));
    }
    validate_http_uplink(
        base,
        g.endpoint.as_deref(),
        (
            g.max_inflight_requests,
            g.max_inflight_readings,
            g.request_timeout_ms,
        ),
        (g.initial_backoff_ms, g.max_backoff_ms),
        p,
    );
}
