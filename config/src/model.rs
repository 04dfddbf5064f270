//! The typed configuration tree. The `///` comment on every field is the user documentation.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::defaults;
pub use crate::kafka_cloud::KafkaCloud;

/// A secret string (password, token). Its `Debug` output is `***`, so it never ends up in logs.
///
/// It deserializes from and serializes to a plain TOML string; use [`Secret::expose`] to read it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Call this only where the value is really needed (authentication).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

/// The whole configuration of one ferry gateway.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identity, storage location, shutdown and logging of this gateway.
    pub gateway: GatewaySettings,
    /// The crash-safe on-disk buffer between the listeners and the uplinks.
    pub buffer: BufferSettings,
    /// The MQTT listener devices publish to.
    pub mqtt: MqttSettings,
    /// The HTTP ingestion endpoint devices POST readings to.
    pub http: HttpSettings,
    /// Where buffered readings are forwarded: one `[uplinks.NAME]` table per uplink, any
    /// number of each type. NAME is 1 to 64 characters of `a-z 0-9 _ -`; it also names the
    /// uplink's cursor in the buffer, so renaming an uplink makes it start over from the oldest
    /// buffered reading. No uplink is configured by default: without one, ferry only buffers.
    /// ferry 0.1's `[uplink.kafka]` and `[uplink.mqtt]` left cursors named `kafka` and `mqtt`:
    /// uplinks given those names continue where they stopped.
    pub uplinks: BTreeMap<String, UplinkSettings>,
    /// The status and metrics endpoint.
    pub status: StatusSettings,
}

impl Config {
    /// The enabled uplinks, by name (BTreeMap order).
    pub fn enabled_uplinks(&self) -> impl Iterator<Item = (&str, &UplinkSettings)> {
        self.uplinks
            .iter()
            .filter(|(_, u)| u.enabled)
            .map(|(name, u)| (name.as_str(), u))
    }

    /// The MQTT client id of the MQTT uplink `name`: its `client_id`, or
    /// `ferry-<gateway.id>-<name>`.
    pub fn mqtt_client_id(&self, name: &str, m: &MqttUplink) -> String {
        match &m.client_id {
            Some(id) => id.clone(),
            None => format!("ferry-{}-{name}", self.gateway.id),
        }
    }
}

/// `[gateway]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Identifier of this gateway, attached to every forwarded reading. 1 to 64 characters of
    /// `A-Z a-z 0-9 . _ -`. Default: the contents of `/etc/hostname` (if that is a valid id),
    /// else `"ferry"`.
    pub id: String,
    /// Directory holding the buffer database. Created if missing, with mode 0700. An existing
    /// directory other users can access is kept as it is but warned about (see
    /// [`Config::warnings`]). Default: `"./ferry-data"`.
    pub data_dir: PathBuf,
    /// On shutdown, how long listeners, in-flight acks, the buffer commit and the uplink flush
    /// may take in total before the remaining tasks are aborted. Default: 10000.
    pub shutdown_grace_ms: u64,
    /// Log output format on stderr: `"text"` or `"json"`. Default: `"text"`.
    pub log_format: LogFormat,
    /// Under systemd, when stderr is the journal (`JOURNAL_STREAM` names it), send logs
    /// through journald's native protocol instead, so that every field of an event is a
    /// journal field (`journalctl -o json` shows `UPLINK`, `ERROR`, …). `false` keeps stderr
    /// and `log_format`. Where this is decided: the gateway's `telemetry` module.
    /// Default: `true`.
    pub journald: bool,
    /// Log filter: a default level and per-target levels, comma-separated, e.g. `"info"` or
    /// `"info,ferry_uplink=debug"` (levels: `off`, `error`, `warn`, `info`, `debug`, `trace`).
    /// The `FERRY_LOG` environment variable takes precedence. Default: `"info"`.
    pub log_level: String,
    /// Whether the wall clock can be trusted: `"kernel"` asks the kernel whether it is
    /// synchronized (as `timedatectl` does); `"assume"` treats it as always synchronized, for
    /// VMs and containers whose host keeps the time while their kernel flag says otherwise.
    /// What ferry does with it: `ferry_buffer::clock`. Default: `"kernel"`.
    pub clock_sync: ClockSync,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            id: defaults::gateway_id(),
            data_dir: PathBuf::from(defaults::DATA_DIR),
            shutdown_grace_ms: defaults::SHUTDOWN_GRACE_MS,
            log_format: LogFormat::Text,
            journald: true,
            log_level: defaults::LOG_LEVEL.to_owned(),
            clock_sync: ClockSync::Kernel,
        }
    }
}

/// Where ferry learns whether the wall clock is synchronized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockSync {
    /// The kernel's synchronized flag (`adjtimex`).
    #[default]
    Kernel,
    /// Always synchronized.
    Assume,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[buffer]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferSettings {
    /// Upper bound on the bytes of stored (compressed) readings. At least 1 MiB and at least
    /// 4 × `max_batch_bytes`. Default: 536870912 (512 MiB).
    pub max_bytes: u64,
    /// What happens when new readings would exceed `max_bytes`: `"drop_oldest"` deletes the
    /// oldest unforwarded readings, `"reject"` refuses the new readings (see
    /// `mqtt.full_ack_wait_ms` and `http.retry_after_secs`). Default: `"drop_oldest"`.
    pub when_full: WhenFull,
    /// Group commit gap: the writer keeps collecting readings into one commit (one fsync)
    /// while they arrive less than this many milliseconds apart, and commits once none has
    /// come for this long. Readings arriving while a commit is written always share the next
    /// one. 0 commits what is queued at once. Default: 1.
    pub flush_interval_ms: u64,
    /// The longest a reading waits for others to share its commit while they keep arriving
    /// (never less than `flush_interval_ms`): the most that group commit adds to an ack's
    /// latency. While readings keep arriving during commits (a steady stream), the gap of
    /// `flush_interval_ms` grows to a tenth of this, so that short scheduling pauses do not
    /// split commits, for as long as the longer gap keeps bridging such pauses
    /// (`ferry_buffer`'s crate doc, "Group commit"). At most 10000. Default: 100.
    pub max_flush_delay_ms: u64,
    /// A commit closes as soon as it holds this many uncompressed bytes. Every commit writes
    /// a fixed ~40 KB of database pages besides its data, so commits of at least this size
    /// keep the bytes written to the disk (SD card wear) below the bytes received; smaller
    /// values lower latency under heavy load and raise wear. At least 1. Default: 262144
    /// (256 KiB).
    pub flush_target_bytes: u64,
    /// Maximum number of readings in one stored segment / one commit. At least 1. Default: 10000.
    pub max_batch_readings: usize,
    /// Maximum uncompressed bytes in one stored segment / one commit. Default: 1048576 (1 MiB).
    pub max_batch_bytes: u64,
    /// Compression of stored segments: `"gzip"` or `"none"`. Default: `"gzip"`.
    pub compression: Compression,
    /// Gzip level, 0 (fastest) to 9 (smallest). Default: 6 (BENCHMARKS.md, "CPU per reading",
    /// weighs the levels).
    pub compression_level: u32,
    /// Readings that have waited longer than this many seconds are dropped instead of
    /// forwarded. The wait is counted as `ferry_buffer::clock` says (by the boot clock, so a
    /// clock stepped by NTP drops nothing early). 0 keeps readings until they are forwarded
    /// (no TTL). Default: 0.
    pub max_age_secs: u64,
    /// Size of the redb page cache in bytes: recently written and read database pages kept in
    /// ferry's memory. Segments are written once and read once, so pages that miss it come
    /// from the operating system's page cache at the cost of a copy; a larger cache mostly
    /// adds to ferry's resident memory (BENCHMARKS.md, footprint). Default: 2097152 (2 MiB).
    pub cache_bytes: u64,
    /// Memory for readings received and not yet committed, estimated as each reading's
    /// payload, topic, device and properties plus about 150 bytes of record. When the disk
    /// stalls (a slow SD card, writeback), MQTT connections stop reading their sockets above
    /// it, so the excess waits in the devices and the kernel's socket buffers instead of
    /// ferry's memory; nothing is refused or lost for it (the rule: `ferry_gateway::mqtt`'s
    /// session). HTTP requests are bounded by `http.max_connections` and
    /// `http.max_body_bytes` instead. At least 1. Default: 1048576 (1 MiB). What it saves
    /// in a disk stall: BENCHMARKS.md.
    pub max_pending_bytes: u64,
    /// Disk space ferry keeps free on the data directory's file system for the OS, journald
    /// and sshd; 0 turns the reserve off; unset: 5% of the file system, at most 256 MiB. What
    /// the buffer does at the reserve is written in `ferry_buffer::disk_reserve`.
    pub min_free_bytes: Option<u64>,
}

impl Default for BufferSettings {
    fn default() -> Self {
        BufferSettings {
            max_bytes: defaults::BUFFER_MAX_BYTES,
            when_full: WhenFull::DropOldest,
            flush_interval_ms: defaults::FLUSH_INTERVAL_MS,
            max_flush_delay_ms: defaults::MAX_FLUSH_DELAY_MS,
            flush_target_bytes: defaults::FLUSH_TARGET_BYTES,
            max_batch_readings: defaults::MAX_BATCH_READINGS,
            max_batch_bytes: defaults::BUFFER_MAX_BATCH_BYTES,
            compression: Compression::Gzip,
            compression_level: defaults::COMPRESSION_LEVEL,
            max_age_secs: 0,
            cache_bytes: defaults::BUFFER_CACHE_BYTES,
            max_pending_bytes: defaults::BUFFER_MAX_PENDING_BYTES,
            min_free_bytes: None,
        }
    }
}

/// Behaviour of a full buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest unforwarded readings to make room.
    #[default]
    DropOldest,
    /// Refuse new readings until there is room.
    Reject,
}

/// Compression of stored buffer segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// gzip at `buffer.compression_level`.
    #[default]
    Gzip,
    /// Stored as is.
    None,
}

/// `[mqtt]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// Whether the MQTT listener runs. Default: true.
    pub enabled: bool,
    /// Address of the plain-TCP MQTT listener. Default: `"0.0.0.0:1883"`.
    pub listen: SocketAddr,
    /// Maximum number of simultaneous client connections (plain and TLS together). Default: 1024.
    pub max_connections: usize,
    /// Time a new connection has to send its CONNECT packet (and finish the TLS handshake).
    /// Default: 10000.
    pub connect_timeout_ms: u64,
    /// Largest accepted PUBLISH payload; larger packets close the connection. Default: 262144.
    pub max_payload_bytes: usize,
    /// Maximum unacknowledged QoS 1 publishes per client, 1 to 65535. Sent to v5 clients as
    /// Receive Maximum. Default: 64.
    pub max_inflight: u16,
    /// Whether clients may connect without a username. Must be true when `users` is empty.
    /// Default: true.
    pub allow_anonymous: bool,
    /// 0-based level of the PUBLISH topic used as the device id (e.g. 1 for
    /// `sensors/<device>/temp`). Not set: the MQTT client id is the device id. Default: not set.
    pub device_from_topic_level: Option<usize>,
    /// With `buffer.when_full = "reject"`, how long the PUBACK to a v3.1.1 client is withheld
    /// while the buffer is full before the connection is closed. Default: 30000.
    pub full_ack_wait_ms: u64,
    /// How long ferry waits for a client to take its replies (PUBACK, PINGRESP, ...) off the
    /// socket. A client that leaves them unread this long, with the socket's buffers full, is
    /// disconnected, so it cannot hold a connection slot forever. Default: 30000.
    pub write_timeout_ms: u64,
    /// Longest keep alive an MQTT 5 client gets, in seconds: one that asks for none (0) or more
    /// is given this one in CONNACK (Server Keep Alive). 3.1.1 clients keep theirs. 0: no
    /// limit. Default: 0.
    pub max_keep_alive_secs: u16,
    /// Messages queued for one local subscriber (waiting for its in-flight window or its
    /// socket) at most. Over it, a QoS 0 message is dropped first, else the new message, and
    /// counted. Default: 1000.
    pub subscriber_queue_messages: usize,
    /// Payload and topic bytes queued for one local subscriber at most (as above).
    /// Default: 4194304.
    pub subscriber_queue_bytes: usize,
    /// Payload and topic bytes queued for all local subscribers together at most, persistent
    /// sessions included (as above: QoS 0 dropped first, then the new message). Default:
    /// 67108864.
    pub subscriber_queues_total_bytes: usize,
    /// Topics with a retained message at most. A retained publish on a new topic over it is
    /// stored as a reading but not kept as retained, and counted. Default: 10000.
    pub max_retained: usize,
    /// Persistent sessions (3.1.1 clean session 0, MQTT 5 session expiry) at most, connected or
    /// not. A CONNECT asking for one more is refused (CONNACK 0x03, MQTT 5 0x97). Default: 1000.
    pub max_sessions: usize,
    /// Accounts allowed to connect (`[[mqtt.users]]`).
    pub users: Vec<MqttUser>,
    /// Topic access rules (`[[mqtt.acl]]`). None: every client that may connect may publish and
    /// subscribe to any topic. Any: a client may only what a rule that applies to it allows.
    pub acl: Vec<MqttAcl>,
    /// TLS listener (`[mqtt.tls]`). Not set: no TLS listener.
    pub tls: Option<MqttTls>,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            enabled: true,
            listen: defaults::socket_addr(defaults::MQTT_LISTEN),
            max_connections: defaults::MAX_CONNECTIONS,
            connect_timeout_ms: defaults::CONNECT_TIMEOUT_MS,
            max_payload_bytes: defaults::MQTT_MAX_PAYLOAD_BYTES,
            max_inflight: defaults::MAX_INFLIGHT,
            allow_anonymous: true,
            device_from_topic_level: None,
            full_ack_wait_ms: defaults::FULL_ACK_WAIT_MS,
            write_timeout_ms: defaults::WRITE_TIMEOUT_MS,
            max_keep_alive_secs: 0,
            subscriber_queue_messages: defaults::SUBSCRIBER_QUEUE_MESSAGES,
            subscriber_queue_bytes: defaults::SUBSCRIBER_QUEUE_BYTES,
            subscriber_queues_total_bytes: defaults::SUBSCRIBER_QUEUES_TOTAL_BYTES,
            max_retained: defaults::MAX_RETAINED,
            max_sessions: defaults::MAX_SESSIONS,
            users: Vec::new(),
            acl: Vec::new(),
            tls: None,
        }
    }
}

/// `[[mqtt.acl]]`: topics some clients may publish and subscribe to. A rule applies to the
/// client with username `user`, or to the one whose TLS client certificate has the Common Name
/// `cert_cn`, or, with neither, to every client. In the filters, `%u` stands for the username
/// and `%c` for the client id; a filter whose `%u` or `%c` a client cannot fill (no username;
/// a value with `/`, `+` or `#`) allows that client nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttAcl {
    /// The username the rule applies to.
    pub user: Option<String>,
    /// The client certificate CN the rule applies to (needs `mqtt.tls.device_from_cert_cn`).
    pub cert_cn: Option<String>,
    /// Topic filters the client may publish to.
    pub publish: Vec<String>,
    /// Topic filters the client may subscribe to (a subscription must lie within one).
    pub subscribe: Vec<String>,
}

/// `[[mqtt.users]]`: one MQTT account. Set exactly one of `password` and `password_hash`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttUser {
    /// The MQTT username. Required, unique.
    pub username: String,
    /// The password in clear text.
    pub password: Option<Secret>,
    /// The password as an argon2 PHC string (`"$argon2id$v=19$..."`).
    pub password_hash: Option<String>,
}

/// `[mqtt.tls]`: the MQTT-over-TLS listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttTls {
    /// Address of the TLS listener. Default: `"0.0.0.0:8883"`.
    pub listen: SocketAddr,
    /// PEM file with the server certificate chain. Required.
    pub cert_path: PathBuf,
    /// PEM file with the server private key. Required. Refused if other users can access it
    /// (use mode 0600, or 0640 with a group ferry is in).
    pub key_path: PathBuf,
    /// PEM file with the CA certificates client certificates are verified against. Required
    /// when `require_client_cert` or `device_from_cert_cn` is true.
    pub client_ca_path: Option<PathBuf>,
    /// Whether clients must present a certificate signed by `client_ca_path`. Default: false.
    pub require_client_cert: bool,
    /// Whether the client certificate's Common Name is used as the device id (takes precedence
    /// over `mqtt.device_from_topic_level`). Default: false.
    pub device_from_cert_cn: bool,
}

impl Default for MqttTls {
    fn default() -> Self {
        MqttTls {
            listen: defaults::socket_addr(defaults::MQTT_TLS_LISTEN),
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
            client_ca_path: None,
            require_client_cert: false,
            device_from_cert_cn: false,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Whether the HTTP listener runs. Default: true.
    pub enabled: bool,
    /// Address of the HTTP listener (HTTPS when `[http.tls]` is set). Default: `"0.0.0.0:8080"`.
    pub listen: SocketAddr,
    /// Largest accepted request body as sent on the wire (possibly compressed); larger requests
    /// get 413. Default: 1048576 (1 MiB).
    pub max_body_bytes: u64,
    /// Largest request body after decompression (`Content-Encoding: gzip`); at least
    /// `max_body_bytes`. Default: 8388608 (8 MiB).
    pub max_decompressed_bytes: u64,
    /// Largest number of readings in one request. At least 1. Default: 10000.
    pub max_batch_readings: usize,
    /// Maximum number of simultaneous connections. Default: 1024.
    pub max_connections: usize,
    /// Time a client has to send the request headers. Default: 10000.
    pub header_timeout_ms: u64,
    /// Time a client has to send the whole request body. Default: 30000.
    pub body_timeout_ms: u64,
    /// Value of the `Retry-After` header sent when a request is refused because the buffer is
    /// full or the gateway is shutting down. Default: 5.
    pub retry_after_secs: u64,
    /// Bearer tokens accepted in `Authorization: Bearer <token>` (`[[http.tokens]]`). When empty,
    /// requests need no token.
    pub tokens: Vec<HttpToken>,
    /// Serve HTTPS instead of HTTP (`[http.tls]`). Not set: plain HTTP.
    pub tls: Option<HttpTls>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            enabled: true,
            listen: defaults::socket_addr(defaults::HTTP_LISTEN),
            max_body_bytes: defaults::HTTP_MAX_BODY_BYTES,
            max_decompressed_bytes: defaults::HTTP_MAX_DECOMPRESSED_BYTES,
            max_batch_readings: defaults::MAX_BATCH_READINGS,
            max_connections: defaults::MAX_CONNECTIONS,
            header_timeout_ms: defaults::HEADER_TIMEOUT_MS,
            body_timeout_ms: defaults::BODY_TIMEOUT_MS,
            retry_after_secs: defaults::RETRY_AFTER_SECS,
            tokens: Vec::new(),
            tls: None,
        }
    }
}

/// `[[http.tokens]]`: one accepted bearer token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpToken {
    /// The token. Required, non-empty, unique.
    pub token: Secret,
    /// If set, the token may only submit readings for this device id.
    pub device: Option<String>,
    /// Label for this token in logs and metrics (the token itself is never logged).
    pub name: Option<String>,
}

/// `[http.tls]`: serve HTTPS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTls {
    /// PEM file with the server certificate chain. Required.
    pub cert_path: PathBuf,
    /// PEM file with the server private key. Required. Refused if other users can access it
    /// (use mode 0600, or 0640 with a group ferry is in).
    pub key_path: PathBuf,
}

/// `[uplinks.NAME]`: one uplink. The keys every uplink has, and those of its type.
///
/// The config loader checks every key against the uplink's type before deserializing (serde
/// cannot deny unknown fields next to a flattened enum).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UplinkSettings {
    /// Whether the uplink runs; `false` switches it off without deleting its table (its
    /// cursor stays where it is). Default: true.
    #[serde(default = "defaults::uplink_enabled")]
    pub enabled: bool,
    /// MQTT topic filters (`+` matches one level, `#` the rest) of the readings this uplink
    /// forwards, matched against each reading's source topic (the MQTT topic, or the HTTP
    /// path). Not empty. Must be `["#"]` for a Kafka uplink with `delivery = "segment"`.
    /// Default: `["#"]` (every reading).
    #[serde(default = "defaults::uplink_topics")]
    pub topics: Vec<String>,
    /// `type`, required: `"kafka"` or `"mqtt"`. The other keys of the table are those of the
    /// type.
    #[serde(flatten)]
    pub kind: UplinkKind,
}

impl UplinkSettings {
    /// An enabled uplink of `kind` that forwards every reading (`topics = ["#"]`).
    pub fn new(kind: UplinkKind) -> Self {
        UplinkSettings {
            enabled: defaults::uplink_enabled(),
            topics: defaults::uplink_topics(),
            kind,
        }
    }
}

/// The type of an uplink (its `type` key) and the settings of that type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum UplinkKind {
    /// `type = "kafka"`: forward to Kafka.
    Kafka(KafkaUplink),
    /// `type = "mqtt"`: forward to an upstream MQTT broker.
    Mqtt(MqttUplink),
    /// `type = "kinesis"`: forward to an Amazon Kinesis data stream.
    Kinesis(KinesisUplink),
    /// `type = "pubsub"`: forward to a Google Cloud Pub/Sub topic.
    Pubsub(PubsubUplink),
}

impl UplinkKind {
    /// Every uplink type, as written in `type`, in alphabetical order (the order of the
    /// loader's messages). The first is the type an uplink whose `type` is missing or unknown
    /// is checked as, with its defaults: they must be valid on their own.
    pub const TYPES: &'static [&'static str] = &["kafka", "kinesis", "mqtt", "pubsub"];

    /// Whether commands come down through this uplink (a `downlink` is configured).
    pub fn has_downlink(&self) -> bool {
        match self {
            UplinkKind::Kafka(k) => k.downlink.is_some(),
            UplinkKind::Mqtt(m) => !m.downlink.is_empty(),
            UplinkKind::Kinesis(_) | UplinkKind::Pubsub(_) => false,
        }
    }

    /// The type as written in `type`, one of [`UplinkKind::TYPES`].
    pub fn type_name(&self) -> &'static str {
        match self {
            UplinkKind::Kafka(_) => "kafka",
            UplinkKind::Mqtt(_) => "mqtt",
            UplinkKind::Kinesis(_) => "kinesis",
            UplinkKind::Pubsub(_) => "pubsub",
        }
    }
}

/// The keys of an uplink of `type = "kafka"`: forward to Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaUplink {
    /// A managed Kafka service to derive the connection settings for: `"event-hubs"` (Azure
    /// Event Hubs, from `connection_string`), `"msk-iam"` (Amazon MSK with IAM access control,
    /// from `brokers`, `region` and AWS credentials) or `"confluent"` (Confluent Cloud, from
    /// `brokers`, `api_key` and `api_secret`). A preset sets `security_protocol` and the
    /// `sasl_*` keys itself and refuses them here. Not set: the keys below apply as written.
    /// What each preset does is in the `ferry_config::kafka_cloud` docs;
    /// `ferry check-config FILE --explain` prints the result.
    pub cloud: Option<KafkaCloud>,
    /// `cloud = "event-hubs"`: the connection string of the namespace or of one event hub,
    /// `Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…`
    /// (`;EntityPath=HUB` for one hub, which then is the topic).
    pub connection_string: Option<Secret>,
    /// `cloud = "confluent"`: the cluster's API key (the SASL user name).
    pub api_key: Option<String>,
    /// `cloud = "confluent"`: the API key's secret.
    pub api_secret: Option<Secret>,
    /// `cloud = "msk-iam"`: the cluster's AWS region. Default: from the brokers' host names
    /// (`…kafka.REGION.amazonaws.com`).
    pub region: Option<String>,
    /// `cloud = "msk-iam"`: AWS access key id. Not set: the usual AWS credential chain
    /// (environment, shared credentials file, container, instance metadata).
    pub access_key_id: Option<String>,
    /// `cloud = "msk-iam"`: AWS secret access key (with `access_key_id`).
    pub secret_access_key: Option<Secret>,
    /// `cloud = "msk-iam"`: AWS session token of temporary credentials.
    pub session_token: Option<Secret>,
    /// `cloud = "msk-iam"`: the profile of the shared credentials file. Default: `AWS_PROFILE`,
    /// else `default`.
    pub profile: Option<String>,
    /// Whether the producer is idempotent (no duplicates from its own retries). Turn it off
    /// only for a broker that refuses the idempotent producer: ferry then keeps `acks=all`
    /// and one request in flight per connection, so nothing is lost and order holds, but a
    /// retry may write a reading twice. Default: true (false with `cloud = "event-hubs"`).
    pub idempotent: Option<bool>,
    /// Comma-separated bootstrap brokers, each `host:port`. Default: `"localhost:9092"`.
    pub brokers: String,
    /// Topic for readings no route matches. Default: `"ferry.readings"`.
    pub topic: String,
    /// Producer compression: `"zstd"`, `"lz4"`, `"gzip"` or `"none"`. Default: `"zstd"`.
    pub compression: KafkaCompression,
    /// `"reading"`: one Kafka message per reading. `"segment"`: one message per stored buffer
    /// segment, its already-compressed bytes as the value (`content-encoding: gzip`; framing in
    /// the `ferry_uplink::kafka` docs), for metered links. Default: `"reading"`.
    pub delivery: Delivery,
    /// Message key: `"device"` (device id), `"topic"` (source MQTT topic or HTTP path), `"none"`,
    /// or `"level:N"` (0-based level N of the source topic). Default: `"device"`.
    pub key: KeyRule,
    /// How long the producer retries one message before the segment is retried from the buffer.
    /// Default: 30000.
    pub message_timeout_ms: u64,
    /// Most segments in flight (handed to the producer, not yet acknowledged). At least 1.
    /// Default: 256. Segments of a slow site hold a reading or a few each, so the readings
    /// limit below is the one that usually applies.
    pub max_inflight_segments: usize,
    /// Most readings in flight: no further segment is sent while this many are unconfirmed
    /// (one segment always may be, whatever its size). Bounds the memory a drain holds, about
    /// 600 bytes per reading of 100 bytes. Whatever this says, the segments in flight stay
    /// below an eighth of `buffer.max_bytes` (stored bytes): `drop_oldest` spares them while
    /// older segments are left, so a bigger share would make it drop the newest readings
    /// during an outage. At least 1. Default: 20000.
    pub max_inflight_readings: usize,
    /// First delay after a failed delivery; doubles up to `max_backoff_ms`. Default: 500.
    pub initial_backoff_ms: u64,
    /// Longest delay between retries. Default: 60000.
    pub max_backoff_ms: u64,
    /// `"plaintext"`, `"ssl"`, `"sasl_plaintext"` or `"sasl_ssl"`. Default: `"plaintext"`.
    pub security_protocol: SecurityProtocol,
    /// `"PLAIN"`, `"SCRAM-SHA-256"` or `"SCRAM-SHA-512"`. Required with a `sasl_*` protocol.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL username. Required with a `sasl_*` protocol.
    pub sasl_username: Option<String>,
    /// SASL password. Required with a `sasl_*` protocol.
    pub sasl_password: Option<Secret>,
    /// PEM file with the CA certificates the brokers are verified against (`ssl`, `sasl_ssl`).
    /// Not set: the system trust store.
    pub ssl_ca_path: Option<PathBuf>,
    /// Per-topic routing (`[[uplinks.NAME.routes]]`); the first route whose filter matches the
    /// reading's source topic wins.
    pub routes: Vec<KafkaRoute>,
    /// Extra librdkafka producer properties, passed through as is (e.g.
    /// `"socket.keepalive.enable" = "true"`). They override ferry's ordinary settings, except
    /// its safety settings (`acks=all`, idempotence, in-flight ≤ 5, retries): a passthrough that
    /// would weaken those is ignored with a warning.
    pub librdkafka: BTreeMap<String, String>,
    /// Commands for local devices read from a Kafka topic (`[uplinks.NAME.downlink]`). Not
    /// set: nothing comes down.
    pub downlink: Option<Box<KafkaDownlink>>,
}

impl Default for KafkaUplink {
    fn default() -> Self {
        KafkaUplink {
            cloud: None,
            connection_string: None,
            api_key: None,
            api_secret: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            profile: None,
            idempotent: None,
            brokers: defaults::KAFKA_BROKERS.to_owned(),
            topic: defaults::KAFKA_TOPIC.to_owned(),
            compression: KafkaCompression::Zstd,
            delivery: Delivery::Reading,
            key: KeyRule::Device,
            message_timeout_ms: defaults::MESSAGE_TIMEOUT_MS,
            max_inflight_segments: defaults::MAX_INFLIGHT_SEGMENTS,
            max_inflight_readings: defaults::MAX_INFLIGHT_READINGS,
            initial_backoff_ms: defaults::INITIAL_BACKOFF_MS,
            max_backoff_ms: defaults::MAX_BACKOFF_MS,
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_path: None,
            routes: Vec::new(),
            librdkafka: BTreeMap::new(),
            downlink: None,
        }
    }
}

/// `[uplinks.NAME.downlink]` of a Kafka uplink: commands for local devices, read from a Kafka
/// topic and published to the local MQTT broker. A record is for this gateway when its
/// `ferry-gateway` header is `gateway.id` (no such header: for every gateway); its local MQTT
/// topic is its `ferry-topic` header. How they are handed over is written in
/// `ferry_uplink::downlink`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaDownlink {
    /// The Kafka topic to read commands from. Required.
    pub topic: String,
    /// The consumer group, whose committed offsets say which commands were handed over. Not
    /// set: `"ferry-<gateway.id>"`, one group per gateway (every gateway reads every record).
    pub group_id: Option<String>,
    /// QoS of the local publish: 0, 1 or 2. Default: 1.
    pub qos: Option<u8>,
}

/// `[[uplinks.NAME.routes]]` of a Kafka uplink: send readings whose source topic matches
/// `filter` to `topic`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaRoute {
    /// MQTT topic filter (`+` matches one level, `#` the rest) matched against the reading's
    /// source topic. Required.
    pub filter: String,
    /// Kafka topic for matching readings. Required.
    pub topic: String,
    /// Message key for matching readings (same syntax as the uplink's `key`). Not set: the
    /// uplink's `key`.
    pub key: Option<KeyRule>,
}

/// Kafka producer compression codec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaCompression {
    /// zstd.
    #[default]
    Zstd,
    /// lz4.
    Lz4,
    /// gzip.
    Gzip,
    /// No compression.
    None,
}

impl KafkaCompression {
    /// The librdkafka `compression.codec` value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCompression::Zstd => "zstd",
            KafkaCompression::Lz4 => "lz4",
            KafkaCompression::Gzip => "gzip",
            KafkaCompression::None => "none",
        }
    }
}

/// How readings map to Kafka messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// One message per reading.
    #[default]
    Reading,
    /// One message per stored segment.
    Segment,
}

/// Kafka `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL authentication without TLS.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    /// Whether this protocol authenticates with SASL.
    pub fn is_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// Kafka `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// `PLAIN`.
    #[serde(rename = "PLAIN")]
    Plain,
    /// `SCRAM-SHA-256`.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// `SCRAM-SHA-512`.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka `sasl.mechanism` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// How the Kafka message key is derived from a reading. Written as a string in the config:
/// `"device"`, `"topic"`, `"none"` or `"level:N"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum KeyRule {
    /// The device id.
    #[default]
    Device,
    /// The source topic (MQTT topic, or the HTTP path).
    Topic,
    /// No key (round-robin partitioning).
    None,
    /// 0-based level N of the source topic (the device id when the topic has fewer levels).
    Level(usize),
}

impl fmt::Display for KeyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRule::Device => f.write_str("device"),
            KeyRule::Topic => f.write_str("topic"),
            KeyRule::None => f.write_str("none"),
            KeyRule::Level(n) => write!(f, "level:{n}"),
        }
    }
}

impl FromStr for KeyRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "device" => Ok(KeyRule::Device),
            "topic" => Ok(KeyRule::Topic),
            "none" => Ok(KeyRule::None),
            _ => s
                .strip_prefix("level:")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(KeyRule::Level)
                .ok_or_else(|| {
                    format!(
                        "invalid key rule '{s}', expected 'device', 'topic', 'none' or 'level:N'"
                    )
                }),
        }
    }
}

impl TryFrom<String> for KeyRule {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<KeyRule> for String {
    fn from(value: KeyRule) -> Self {
        value.to_string()
    }
}

/// The keys of an uplink of `type = "mqtt"`: forward to an upstream MQTT broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttUplink {
    /// Broker address, `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]`
    /// (TLS, default port 8883). Default: `"mqtt://localhost:1883"`.
    pub url: String,
    /// MQTT protocol version: `"v311"` or `"v5"`. Default: `"v311"`.
    pub protocol: MqttProtocol,
    /// Client id. Two enabled MQTT uplinks to the same broker need different ones (the broker
    /// disconnects a client when another connects with its id). Not set:
    /// `"ferry-<gateway.id>-<NAME>"` (ferry 0.1 used `"ferry-<gateway.id>"`; set it to keep a
    /// broker-side session).
    pub client_id: Option<String>,
    /// Username. Not set: connect without credentials.
    pub username: Option<String>,
    /// Password (requires `username`).
    pub password: Option<Secret>,
    /// MQTT keep-alive interval. Default: 30.
    pub keep_alive_secs: u64,
    /// QoS of forwarded publishes: 0 or 1. Default: 1.
    pub qos: u8,
    /// Prepended to every forwarded topic (e.g. `"site-7/"`). Not set: no prefix.
    pub topic_prefix: Option<String>,
    /// Topic rewrites (`[[uplinks.NAME.rewrites]]`); the first matching rule wins, topics no rule
    /// matches are forwarded unchanged.
    pub rewrites: Vec<TopicRewrite>,
    /// Wrap each payload in a JSON envelope carrying the device id, gateway id and receive time
    /// (metadata v3.1.1 has no user properties for). Default: false.
    pub envelope: bool,
    /// Maximum unacknowledged QoS 1 publishes. At least 1. Default: 64.
    pub max_inflight: u16,
    /// PEM file with CA certificates for `mqtts://`. Not set: the system trust store.
    pub ca_path: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (requires `client_key_path`).
    pub client_cert_path: Option<PathBuf>,
    /// PEM client private key for mutual TLS (requires `client_cert_path`). Refused if other
    /// users can access it.
    pub client_key_path: Option<PathBuf>,
    /// First reconnect delay; doubles up to `max_backoff_ms`. Default: 500.
    pub initial_backoff_ms: u64,
    /// Longest reconnect delay. Default: 60000.
    pub max_backoff_ms: u64,
    /// Commands for local devices (`[[uplinks.NAME.downlink]]`): filters ferry subscribes to
    /// upstream, and the local topic each message is published to. None: nothing comes down.
    pub downlink: Vec<MqttDownlink>,
}

/// `[[uplinks.NAME.downlink]]` of an MQTT uplink: ferry subscribes to `remote` upstream with
/// its persistent session and publishes what arrives to the local broker on `local`. How
/// they are handed over is written in `ferry_uplink::downlink`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttDownlink {
    /// Topic filter subscribed to upstream (`+` and `#`). Required.
    pub remote: String,
    /// The local topic: a template with the syntax of `rewrites` (`{N}` for the N-th `+` of
    /// `remote`, `{#}` for its trailing `#`). Not set: the upstream topic unchanged.
    pub local: Option<String>,
    /// QoS of the subscription: 0 or 1. Default: 1.
    pub qos: Option<u8>,
}

impl Default for MqttUplink {
    fn default() -> Self {
        MqttUplink {
            url: defaults::MQTT_UPLINK_URL.to_owned(),
            protocol: MqttProtocol::V311,
            client_id: None,
            username: None,
            password: None,
            keep_alive_secs: defaults::KEEP_ALIVE_SECS,
            qos: 1,
            topic_prefix: None,
            rewrites: Vec::new(),
            envelope: false,
            max_inflight: defaults::MAX_INFLIGHT,
            ca_path: None,
            client_cert_path: None,
            client_key_path: None,
            initial_backoff_ms: defaults::INITIAL_BACKOFF_MS,
            max_backoff_ms: defaults::MAX_BACKOFF_MS,
            downlink: Vec::new(),
        }
    }
}

impl MqttUplink {
    /// The parsed `url`. Fails only on a config that does not pass validation.
    pub fn endpoint(&self) -> Result<MqttEndpoint, String> {
        MqttEndpoint::parse(&self.url)
    }
}

/// A parsed `url` of an MQTT uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    /// `mqtts://`.
    pub tls: bool,
    /// Host name or IP address (without brackets for IPv6).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl MqttEndpoint {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub fn parse(url: &str) -> Result<MqttEndpoint, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err("must start with 'mqtt://' or 'mqtts://'".into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@', ' ']) {
            return Err("must be scheme://host[:port], without path, query or credentials".into());
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or("unterminated '[' in IPv6 address")?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err("unexpected characters after ']'".into()),
                },
            }
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err("host is missing".into());
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("invalid port '{p}'")),
            },
        };
        Ok(MqttEndpoint {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

/// MQTT protocol version of the upstream connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[default]
    V311,
    /// MQTT 5.
    V5,
}

/// `[[uplinks.NAME.rewrites]]` of an MQTT uplink: rewrite topics matching `filter` to `template`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicRewrite {
    /// MQTT topic filter matched against the source topic. Required.
    pub filter: String,
    /// New topic; `{N}` is replaced by what the N-th (1-based) `+` of the filter matched, e.g.
    /// filter `"sensors/+/+"` and template `"site-7/{2}/{1}"`, and `{#}` by what a trailing `#`
    /// matched, e.g. filter `"logs/#"` and template `"archive/{#}"` (the syntax is
    /// `ferry_config::topic`'s). Required.
    pub template: String,
}

/// `[status]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusSettings {
    /// Separate address for `/status` and `/metrics`. Not set: served on the HTTP listener.
    pub listen: Option<SocketAddr>,
    /// Bearer token required for the status endpoints (`/api/status`, `/metrics`). Not set:
    /// no token needed.
    pub token: Option<Secret>,
    /// An uplink that is connected but has acked nothing for this long while readings wait
    /// is reported as stalled. Default: 60.
    pub stalled_after_secs: u64,
    /// Maximum number of devices tracked in the status report; the least recently seen are
    /// forgotten first. Default: 1000.
    pub max_devices: usize,
    /// A log message that keeps repeating (an upstream that stays down, a device that keeps
    /// reconnecting with a wrong password) is logged once, then at most once per this many
    /// seconds with how often it came meanwhile. At least 1. Default: 300.
    pub log_summary_secs: u64,
}

impl Default for StatusSettings {
    fn default() -> Self {
        StatusSettings {
            listen: None,
            token: None,
            stalled_after_secs: defaults::STALLED_AFTER_SECS,
            max_devices: defaults::MAX_DEVICES,
            log_summary_secs: defaults::LOG_SUMMARY_SECS,
        }
    }
}

/// How a reading becomes a record on an upstream without headers (Kinesis).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// The JSON envelope: the reading's metadata (`ferry_id`, gateway, device, topic, receive
    /// time, source, content type, the device's properties) with the payload embedded.
    #[default]
    Envelope,
    /// The payload bytes alone. Every piece of metadata, including the `ferry-id` consumers
    /// de-duplicate on, is lost upstream.
    Raw,
}

/// The keys of an uplink of `type = "kinesis"`: forward to an Amazon Kinesis data stream
/// with `PutRecords`, signed with AWS Signature Version 4.
///
/// Credentials, in this order: `access_key_id` + `secret_access_key` (+ `session_token`) here;
/// the `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` variables; the
/// shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`), section
/// `profile` (else `AWS_PROFILE`, else `default`); the ECS container endpoint
/// (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`); the EC2 instance metadata service (IMDSv2).
/// Credentials that expire are fetched again before they do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KinesisUplink {
    /// The stream: its name, or its ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
    /// Required.
    pub stream: String,
    /// The AWS region, e.g. `"eu-west-1"`. Required unless `stream` is an ARN (whose region is
    /// then used) or `AWS_REGION` is set.
    pub region: Option<String>,
    /// The endpoint, `https://host[:port]` (or `http://` for a local test server). Not set:
    /// `https://kinesis.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    /// The partition key: `"device"`, `"topic"` or `"level:N"` (as Kafka's key; `"none"` is not
    /// possible: Kinesis needs one). Readings with the same key go to the same shard, in order.
    /// Default: `"device"`.
    pub partition_key: KeyRule,
    /// `"envelope"` (the JSON envelope with the metadata) or `"raw"` (the payload alone; the
    /// metadata, `ferry-id` included, is lost). Default: `"envelope"`.
    pub format: RecordFormat,
    /// AWS access key id. Not set: the other sources of credentials (see above).
    pub access_key_id: Option<String>,
    /// AWS secret access key (requires `access_key_id`).
    pub secret_access_key: Option<Secret>,
    /// AWS session token, for temporary credentials (requires `access_key_id`).
    pub session_token: Option<Secret>,
    /// The section of the shared credentials file. Not set: `AWS_PROFILE`, else `"default"`.
    pub profile: Option<String>,
    /// PEM file with the CA certificates the endpoint is verified against. Not set: the system
    /// trust store.
    pub ca_path: Option<PathBuf>,
    /// Most `PutRecords` requests in flight at once. At least 1. Default: 4.
    pub max_inflight_requests: usize,
    /// Most readings in flight (sent, not yet confirmed). At least 1. Default: 5000.
    pub max_inflight_readings: usize,
    /// How long one request may take before it counts as failed. Default: 30000.
    pub request_timeout_ms: u64,
    /// First delay after a failed request; doubles up to `max_backoff_ms`. Default: 500.
    pub initial_backoff_ms: u64,
    /// Longest delay between retries. Default: 60000.
    pub max_backoff_ms: u64,
}

impl Default for KinesisUplink {
    fn default() -> Self {
        KinesisUplink {
            stream: String::new(),
            region: None,
            endpoint: None,
            partition_key: KeyRule::Device,
            format: RecordFormat::Envelope,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            profile: None,
            ca_path: None,
            max_inflight_requests: defaults::HTTP_UPLINK_MAX_INFLIGHT_REQUESTS,
            max_inflight_readings: defaults::HTTP_UPLINK_MAX_INFLIGHT_READINGS,
            request_timeout_ms: defaults::HTTP_UPLINK_REQUEST_TIMEOUT_MS,
            initial_backoff_ms: defaults::INITIAL_BACKOFF_MS,
            max_backoff_ms: defaults::MAX_BACKOFF_MS,
        }
    }
}

/// The keys of an uplink of `type = "pubsub"`: forward to a Google Cloud Pub/Sub topic with
/// the REST `publish` method.
///
/// Credentials: a service account key file (`credentials_file`, else
/// `GOOGLE_APPLICATION_CREDENTIALS`), from which ferry signs its own access tokens (JWTs with
/// the Pub/Sub API as audience), or else the GCE metadata server's token. A custom `endpoint`
/// with `http://` (the emulator) needs no credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PubsubUplink {
    /// The Google Cloud project id. Required.
    pub project: String,
    /// The topic id (not its full name). Required.
    pub topic: String,
    /// The endpoint, `https://host[:port]` (or `http://host:port` for the emulator). Not set:
    /// `https://pubsub.googleapis.com`.
    pub endpoint: Option<String>,
    /// The ordering key: `"none"`, `"device"`, `"topic"` or `"level:N"`. With a key, Pub/Sub
    /// delivers messages of one key in order (to subscriptions with message ordering on).
    /// Default: `"none"`.
    pub ordering_key: KeyRule,
    /// A service account key (JSON). Not set: `GOOGLE_APPLICATION_CREDENTIALS`, else the GCE
    /// metadata server.
    pub credentials_file: Option<PathBuf>,
    /// PEM file with the CA certificates the endpoint is verified against. Not set: the system
    /// trust store.
    pub ca_path: Option<PathBuf>,
    /// Most publish requests in flight at once. At least 1. Default: 4.
    pub max_inflight_requests: usize,
    /// Most readings in flight (sent, not yet confirmed). At least 1. Default: 5000.
    pub max_inflight_readings: usize,
    /// How long one request may take before it counts as failed. Default: 30000.
    pub request_timeout_ms: u64,
    /// First delay after a failed request; doubles up to `max_backoff_ms`. Default: 500.
    pub initial_backoff_ms: u64,
    /// Longest delay between retries. Default: 60000.
    pub max_backoff_ms: u64,
}

impl Default for PubsubUplink {
    fn default() -> Self {
        PubsubUplink {
            project: String::new(),
            topic: String::new(),
            endpoint: None,
            ordering_key: KeyRule::None,
            credentials_file: None,
            ca_path: None,
            max_inflight_requests: defaults::HTTP_UPLINK_MAX_INFLIGHT_REQUESTS,
            max_inflight_readings: defaults::HTTP_UPLINK_MAX_INFLIGHT_READINGS,
            request_timeout_ms: defaults::HTTP_UPLINK_REQUEST_TIMEOUT_MS,
            initial_backoff_ms: defaults::INITIAL_BACKOFF_MS,
            max_backoff_ms: defaults::MAX_BACKOFF_MS,
        }
    }
}
