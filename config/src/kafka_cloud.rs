//! What a Kafka uplink connects to and how it authenticates, after its `cloud` preset.
//!
//! [`KafkaUplink::connection`] is the one place that turns a preset into settings, and the
//! one place that refuses keys contradicting it; `validate()`, the uplink and
//! `ferry check-config --explain` all call it.
//!
//! | `cloud`        | the user gives                       | ferry sets                                                         |
//! |----------------|--------------------------------------|--------------------------------------------------------------------|
//! | `"event-hubs"` | `connection_string`                  | brokers `NS…:9093`, `sasl_ssl` PLAIN as `$ConnectionString`, topic = `EntityPath` unless set, gzip, idempotence off |
//! | `"msk-iam"`    | `brokers` (+ `region`, AWS keys)     | `sasl_ssl` OAUTHBEARER with a SigV4-signed token (`kafka-cluster`) |
//! | `"confluent"`  | `brokers`, `api_key`, `api_secret`   | `sasl_ssl` PLAIN with the key as user                              |
//!
//! Keys a preset sets (`security_protocol`, `sasl_*`, and their `librdkafka` passthrough
//! names) are refused next to it; keys of another preset are refused too. `security_protocol =
//! "sasl_ssl"` (what every preset uses) is accepted as merely redundant. For Event Hubs an
//! explicit `brokers` wins over the connection string's endpoint (a private endpoint or a
//! proxy), and `check-config` warns about it.
//!
//! **Event Hubs and idempotence.** Event Hubs serves Kafka on its Standard, Premium and
//! Dedicated tiers, but not every namespace accepts the idempotent producer's
//! `InitProducerId`, so the preset turns idempotence off unless `idempotent = true`. What ferry
//! does then: `acks=all` stays, at most one request is in flight per connection (order holds
//! through retries), and a reading leaves the buffer only after a successful delivery report.
//! A retry after a lost response can write a reading twice (its `ferry-id` header tells
//! the copies apart); nothing is lost.
//!
//! Event Hubs also caps a message at 1 MB (librdkafka's default `message.max.bytes`, 1,000,000,
//! is below it; a larger reading is dead-lettered with the broker's reason), takes only gzip
//! among Kafka's codecs, and closes connections idle for 240 s, so the preset sets
//! `connections.max.idle.ms` and `metadata.max.age.ms` to 180000 and keepalives on, as
//! Microsoft's librdkafka guidance says.

use crate::defaults;
use crate::model::{KafkaCompression, KafkaUplink, SaslMechanism, Secret, SecurityProtocol};
use serde::{Deserialize, Serialize};

/// A managed Kafka service a Kafka uplink's settings are derived for (`cloud`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KafkaCloud {
    /// Azure Event Hubs' Kafka endpoint, from a connection string.
    EventHubs,
    /// Amazon MSK with IAM access control.
    MskIam,
    /// Confluent Cloud with an API key.
    Confluent,
}

impl KafkaCloud {
    /// The value in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCloud::EventHubs => "event-hubs",
            KafkaCloud::MskIam => "msk-iam",
            KafkaCloud::Confluent => "confluent",
        }
    }

    /// The keys that belong to this preset only.
    fn own_keys(self) -> &'static [&'static str] {
        match self {
            KafkaCloud::EventHubs => &["connection_string"],
            KafkaCloud::MskIam => &[
                "region",
                "access_key_id",
                "secret_access_key",
                "session_token",
                "profile",
            ],
            KafkaCloud::Confluent => &["api_key", "api_secret"],
        }
    }

    /// The preset a preset-only key belongs to.
    fn owner_of(key: &str) -> &'static str {
        Self::ALL
            .into_iter()
            .find(|c| c.own_keys().contains(&key))
            .map_or("", KafkaCloud::as_str)
    }

    const ALL: [KafkaCloud; 3] = [
        KafkaCloud::EventHubs,
        KafkaCloud::MskIam,
        KafkaCloud::Confluent,
    ];
}

/// How a Kafka uplink authenticates.
#[derive(Debug, Clone, PartialEq)]
pub enum KafkaAuth {
    /// No SASL.
    None,
    /// SASL with a user name and password (PLAIN or SCRAM).
    Password {
        /// The mechanism.
        mechanism: SaslMechanism,
        /// The user name.
        username: String,
        /// The password.
        password: Secret,
    },
    /// SASL OAUTHBEARER with Amazon MSK's IAM token, signed with AWS credentials.
    MskIam {
        /// The cluster's region (the token's signing scope).
        region: String,
        /// `access_key_id`, `secret_access_key`, `session_token` when configured.
        keys: Option<(String, Secret, Option<Secret>)>,
        /// `profile` of the shared credentials file.
        profile: Option<String>,
    },
}

/// The effective connection of a Kafka uplink: its keys after the `cloud` preset.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConnection {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The default topic.
    pub topic: String,
    /// `security.protocol`.
    pub security_protocol: SecurityProtocol,
    /// SASL.
    pub auth: KafkaAuth,
    /// `compression.type`.
    pub compression: KafkaCompression,
    /// Whether the producer is idempotent.
    pub idempotent: bool,
    /// librdkafka properties the preset adds (the passthrough table may override them).
    pub properties: Vec<(&'static str, &'static str)>,
    /// Where the preset took each derived value from, for `check-config --explain`.
    pub notes: Vec<String>,
}

/// A key that contradicts the preset, or a preset key that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionProblem {
    /// The key, relative to the uplink's table (`connection_string`, `librdkafka."sasl.mechanism"`).
    pub key: String,
    /// What is wrong, never the secret itself.
    pub message: String,
}

fn problem(key: impl Into<String>, message: impl Into<String>) -> ConnectionProblem {
    ConnectionProblem {
        key: key.into(),
        message: message.into(),
    }
}

/// The parts of an Event Hubs connection string ferry uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHubsString {
    /// The namespace host, `NS.servicebus.windows.net`.
    pub host: String,
    /// `EntityPath`: the one event hub a hub-level key is scoped to.
    pub entity_path: Option<String>,
}

/// Parses `Endpoint=sb://HOST/;SharedAccessKeyName=…;SharedAccessKey=…[;EntityPath=…]` (or
/// `SharedAccessSignature=…` instead of the key pair). Errors never quote the key.
pub fn parse_event_hubs(s: &str) -> Result<EventHubsString, String> {
    let mut endpoint = None;
    let mut key_name = false;
    let mut key = false;
    let mut sas = false;
    let mut entity_path = None;
    for part in s.trim().split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(
                "is not a connection string: a part has no '=' (expected Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…)"
                    .to_owned(),
            );
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "endpoint" => endpoint = Some(v.trim().to_owned()),
            "sharedaccesskeyname" => key_name = !v.trim().is_empty(),
            "sharedaccesskey" => key = !v.trim().is_empty(),
            "sharedaccesssignature" => sas = !v.trim().is_empty(),
            "entitypath" => entity_path = Some(v.trim().to_owned()).filter(|e| !e.is_empty()),
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or("has no Endpoint=sb://NAMESPACE.servicebus.windows.net/")?;
    let host = endpoint
        .strip_prefix("sb://")
        .ok_or_else(|| format!("Endpoint must start with sb://, got {endpoint:?}"))?
        .trim_end_matches('/');
    if host.is_empty() || host.contains(['/', ':', ' ']) {
        return Err(format!(
            "Endpoint must be sb://NAMESPACE.servicebus.windows.net/, got {endpoint:?}"
        ));
    }
    if !(sas || key_name && key) {
        return Err(
            "has no credentials: it needs SharedAccessKeyName and SharedAccessKey (or SharedAccessSignature)"
                .into(),
        );
    }
    Ok(EventHubsString {
        host: host.to_ascii_lowercase(),
        entity_path,
    })
}

/// The region in an MSK broker host name (`b-1.NAME.ID.c2.kafka.REGION.amazonaws.com`, or
/// `….kafka-serverless.REGION.amazonaws.com`).
pub fn msk_region(host_port: &str) -> Option<&str> {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let labels: Vec<&str> = host.split('.').collect();
    let kafka = labels
        .iter()
        .position(|l| *l == "kafka" || *l == "kafka-serverless")?;
    let region = labels.get(kafka + 1)?;
    let rest = &labels[kafka + 2..];
    (rest.first() == Some(&"amazonaws") && !region.is_empty()).then_some(region)
}

/// librdkafka passthrough names a preset sets itself.
fn preset_owned_property(key: &str) -> bool {
    matches!(
        key,
        "security.protocol"
            | "sasl.mechanism"
            | "sasl.mechanisms"
            | "sasl.username"
            | "sasl.password"
    ) || key.starts_with("sasl.oauthbearer")
}

impl KafkaUplink {
    /// Which optional keys are set, by name, for the preset checks.
    fn set_keys(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        for (is_set, key) in [
            (self.connection_string.is_some(), "connection_string"),
            (self.api_key.is_some(), "api_key"),
            (self.api_secret.is_some(), "api_secret"),
            (self.region.is_some(), "region"),
            (self.access_key_id.is_some(), "access_key_id"),
            (self.secret_access_key.is_some(), "secret_access_key"),
            (self.session_token.is_some(), "session_token"),
            (self.profile.is_some(), "profile"),
        ] {
            if is_set {
                set.push(key);
            }
        }
        set
    }

    /// The effective connection: this table's keys after its `cloud` preset. The rules are in
    /// the [module docs](self).
    pub fn connection(&self) -> Result<KafkaConnection, Vec<ConnectionProblem>> {
        let mut problems = Vec::new();
        let set = self.set_keys();
        let Some(cloud) = self.cloud else {
            for key in set {
                let owner = KafkaCloud::owner_of(key);
                problems.push(problem(
                    key,
                    format!("is only used with cloud = \"{owner}\""),
                ));
            }
            if !problems.is_empty() {
                return Err(problems);
            }
            let auth = match (
                self.sasl_mechanism,
                &self.sasl_username,
                &self.sasl_password,
            ) {
                (Some(mechanism), Some(username), Some(password))
                    if self.security_protocol.is_sasl() =>
                {
                    KafkaAuth::Password {
                        mechanism,
                        username: username.clone(),
                        password: password.clone(),
                    }
                }
                _ => KafkaAuth::None,
            };
            return Ok(KafkaConnection {
                brokers: self.brokers.clone(),
                topic: self.topic.clone(),
                security_protocol: self.security_protocol,
                auth,
                compression: self.compression,
                idempotent: self.idempotent.unwrap_or(true),
                properties: Vec::new(),
                notes: Vec::new(),
            });
        };
        let name = cloud.as_str();
        for key in set {
            if !cloud.own_keys().contains(&key) {
                let owner = KafkaCloud::owner_of(key);
                problems.push(problem(
                    key,
                    format!("belongs to cloud = \"{owner}\", not cloud = \"{name}\""),
                ));
            }
        }
        if !matches!(
            self.security_protocol,
            SecurityProtocol::Plaintext | SecurityProtocol::SaslSsl
        ) {
            problems.push(problem(
                "security_protocol",
                format!("is set by cloud = \"{name}\" (sasl_ssl); remove it"),
            ));
        }
        for (is_set, key) in [
            (self.sasl_mechanism.is_some(), "sasl_mechanism"),
            (self.sasl_username.is_some(), "sasl_username"),
            (self.sasl_password.is_some(), "sasl_password"),
        ] {
            if is_set {
                problems.push(problem(
                    key,
                    format!("is set by cloud = \"{name}\"; remove it"),
                ));
            }
        }
        for key in self.librdkafka.keys() {
            if preset_owned_property(key) {
                problems.push(problem(
                    format!("librdkafka.\"{key}\""),
                    format!("is set by cloud = \"{name}\"; remove it"),
                ));
            }
        }
        let default_brokers = self.brokers == defaults::KAFKA_BROKERS;
        let mut notes = Vec::new();
        let mut conn = KafkaConnection {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            security_protocol: SecurityProtocol::SaslSsl,
            auth: KafkaAuth::None,
            compression: self.compression,
            idempotent: self.idempotent.unwrap_or(true),
            properties: Vec::new(),
            notes: Vec::new(),
        };
        match cloud {
            KafkaCloud::EventHubs => {
                match self.connection_string.as_ref().map(|s| s.expose()) {
                    None | Some("") => problems.push(problem(
                        "connection_string",
                        "is required with cloud = \"event-hubs\" (Azure portal: the namespace or event hub → Shared access policies → Connection string–primary key)",
                    )),
                    Some(s) => match parse_event_hubs(s) {
                        Err(why) => problems.push(problem("connection_string", why)),
                        Ok(eh) => {
                            let endpoint = format!("{}:9093", eh.host);
                            if default_brokers {
                                conn.brokers = endpoint;
                                notes.push(format!(
                                    "brokers from the connection string's Endpoint ({})",
                                    eh.host
                                ));
                            } else {
                                notes.push(format!(
                                    "brokers as set, instead of the connection string's endpoint {endpoint}"
                                ));
                            }
                            if let Some(hub) = eh.entity_path {
                                if self.topic == defaults::KAFKA_TOPIC {
                                    conn.topic = hub.clone();
                                    notes.push(format!(
                                        "topic from the connection string's EntityPath ({hub})"
                                    ));
                                } else if self.topic != hub {
                                    problems.push(problem(
                                        "topic",
                                        format!(
                                            "the connection string is scoped to event hub {hub:?} (EntityPath), so topic {:?} would be refused; use a namespace-level connection string or remove topic",
                                            self.topic
                                        ),
                                    ));
                                }
                                for (i, r) in self.routes.iter().enumerate() {
                                    if r.topic != hub {
                                        problems.push(problem(
                                            format!("routes[{i}].topic"),
                                            format!(
                                                "the connection string is scoped to event hub {hub:?} (EntityPath), so topic {:?} would be refused",
                                                r.topic
                                            ),
                                        ));
                                    }
                                }
                            }
                            conn.auth = KafkaAuth::Password {
                                mechanism: SaslMechanism::Plain,
                                username: "$ConnectionString".into(),
                                password: Secret::new(s.trim()),
                            };
                        }
                    },
                }
                match self.compression {
                    KafkaCompression::Zstd => {
                        conn.compression = KafkaCompression::Gzip;
                        notes.push("compression gzip: the only codec Event Hubs takes".into());
                    }
                    KafkaCompression::Lz4 => problems.push(problem(
                        "compression",
                        "Event Hubs takes gzip only among Kafka's codecs; use \"gzip\" or \"none\"",
                    )),
                    KafkaCompression::Gzip | KafkaCompression::None => {}
                }
                if self.idempotent.is_none() {
                    conn.idempotent = false;
                    notes.push(
                        "idempotent = false: not every Event Hubs tier accepts the idempotent producer; acks=all and one request in flight keep every reading and its order"
                            .into(),
                    );
                }
                conn.properties = vec![
                    ("socket.keepalive.enable", "true"),
                    ("metadata.max.age.ms", "180000"),
                    ("connections.max.idle.ms", "180000"),
                ];
            }
            KafkaCloud::MskIam => {
                if default_brokers {
                    problems.push(problem(
                        "brokers",
                        "is required with cloud = \"msk-iam\": the cluster's IAM bootstrap brokers (port 9098, or 9198 for public access), from `aws kafka get-bootstrap-brokers`",
                    ));
                }
                let derived = self.brokers.split(',').find_map(|b| msk_region(b.trim()));
                let region = match (self.region.as_deref().map(str::trim), derived) {
                    (Some(r), Some(d)) if !r.is_empty() && r != d => {
                        problems.push(problem(
                            "region",
                            format!("is {r:?} but the brokers are in {d:?}"),
                        ));
                        None
                    }
                    (Some(r), _) if !r.is_empty() => Some(r.to_owned()),
                    (Some(_), _) => {
                        problems.push(problem("region", "must not be empty"));
                        None
                    }
                    (None, Some(d)) => {
                        notes.push(format!("region {d} from the brokers' host names"));
                        Some(d.to_owned())
                    }
                    (None, None) if !default_brokers => {
                        problems.push(problem(
                            "region",
                            "is required with cloud = \"msk-iam\" when the brokers' host names do not name it (…kafka.REGION.amazonaws.com)",
                        ));
                        None
                    }
                    (None, None) => None,
                };
                let keys = match (&self.access_key_id, &self.secret_access_key) {
                    (Some(id), Some(secret)) => {
                        Some((id.clone(), secret.clone(), self.session_token.clone()))
                    }
                    (None, None) => {
                        if self.session_token.is_some() {
                            problems.push(problem(
                                "session_token",
                                "needs access_key_id and secret_access_key",
                            ));
                        }
                        None
                    }
                    (Some(_), None) => {
                        problems.push(problem(
                            "secret_access_key",
                            "is required with access_key_id",
                        ));
                        None
                    }
                    (None, Some(_)) => {
                        problems.push(problem(
                            "access_key_id",
                            "is required with secret_access_key",
                        ));
                        None
                    }
                };
                if keys.is_none() {
                    notes.push(
                        "AWS credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the shared credentials file, the container or the instance metadata, in that order"
                            .into(),
                    );
                }
                conn.auth = KafkaAuth::MskIam {
                    region: region.unwrap_or_default(),
                    keys,
                    profile: self.profile.clone(),
                };
            }
            KafkaCloud::Confluent => {
                if default_brokers {
                    problems.push(problem(
                        "brokers",
                        "is required with cloud = \"confluent\": the cluster's bootstrap server (pkc-….confluent.cloud:9092, Cluster settings → Endpoints)",
                    ));
                }
                let user = self.api_key.as_deref().map(str::trim).unwrap_or("");
                if user.is_empty() {
                    problems.push(problem(
                        "api_key",
                        "is required with cloud = \"confluent\" (a Kafka API key of the cluster)",
                    ));
                }
                let secret = self.api_secret.clone().unwrap_or_default();
                if secret.expose().is_empty() {
                    problems.push(problem(
                        "api_secret",
                        "is required with cloud = \"confluent\" (the API key's secret)",
                    ));
                }
                conn.auth = KafkaAuth::Password {
                    mechanism: SaslMechanism::Plain,
                    username: user.to_owned(),
                    password: secret,
                };
            }
        }
        conn.notes = notes;
        if problems.is_empty() {
            Ok(conn)
        } else {
            Err(problems)
        }
    }
}
