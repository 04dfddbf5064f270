//! Named default values of the configuration tree.

use std::net::SocketAddr;

/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// `gateway.id` when `/etc/hostname` is missing or not a valid id.
pub const GATEWAY_ID: &str = "ferry";
/// File the default `gateway.id` is read from.
pub const HOSTNAME_FILE: &str = "/etc/hostname";
/// `gateway.data_dir`.
pub const DATA_DIR: &str = "./ferry-data";
/// `gateway.shutdown_grace_ms`.
pub const SHUTDOWN_GRACE_MS: u64 = 10_000;
/// `gateway.log_level`.
pub const LOG_LEVEL: &str = "info";

/// `buffer.max_bytes`.
pub const BUFFER_MAX_BYTES: u64 = 512 * MIB;
/// Smallest allowed `buffer.max_bytes`.
pub const BUFFER_MIN_MAX_BYTES: u64 = MIB;
/// `buffer.flush_interval_ms`.
pub const FLUSH_INTERVAL_MS: u64 = 1;
/// `buffer.max_flush_delay_ms`.
pub const MAX_FLUSH_DELAY_MS: u64 = 100;
/// Largest allowed `buffer.max_flush_delay_ms`.
pub const MAX_FLUSH_DELAY_LIMIT_MS: u64 = 10_000;
/// `buffer.flush_target_bytes`.
pub const FLUSH_TARGET_BYTES: u64 = 256 * 1024;
/// `buffer.max_batch_readings` and `http.max_batch_readings`.
pub const MAX_BATCH_READINGS: usize = 10_000;
/// `buffer.max_batch_bytes`.
pub const BUFFER_MAX_BATCH_BYTES: u64 = MIB;
/// `buffer.compression_level`.
pub const COMPRESSION_LEVEL: u32 = 6;
/// `buffer.cache_bytes`.
pub const BUFFER_CACHE_BYTES: u64 = 2 * MIB;
/// `buffer.max_pending_bytes`.
pub const BUFFER_MAX_PENDING_BYTES: u64 = MIB;

/// `mqtt.listen`.
pub const MQTT_LISTEN: &str = "0.0.0.0:1883";
/// `mqtt.tls.listen`.
pub const MQTT_TLS_LISTEN: &str = "0.0.0.0:8883";
/// `mqtt.max_connections` and `http.max_connections`.
pub const MAX_CONNECTIONS: usize = 1024;
/// `mqtt.connect_timeout_ms`.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// `mqtt.write_timeout_ms`.
pub const WRITE_TIMEOUT_MS: u64 = 30_000;
/// `mqtt.subscriber_queue_messages`.
pub const SUBSCRIBER_QUEUE_MESSAGES: usize = 1000;
/// `mqtt.subscriber_queue_bytes`.
pub const SUBSCRIBER_QUEUE_BYTES: usize = 4 * MIB as usize;
/// `mqtt.subscriber_queues_total_bytes`.
pub const SUBSCRIBER_QUEUES_TOTAL_BYTES: usize = 64 * MIB as usize;
/// `mqtt.max_sessions`.
pub const MAX_SESSIONS: usize = 1000;
/// `mqtt.max_retained`.
pub const MAX_RETAINED: usize = 10_000;
/// `mqtt.max_payload_bytes`.
pub const MQTT_MAX_PAYLOAD_BYTES: usize = 262_144;
/// `mqtt.max_inflight` and `max_inflight` of an MQTT uplink.
pub const MAX_INFLIGHT: u16 = 64;
/// `mqtt.full_ack_wait_ms`.
pub const FULL_ACK_WAIT_MS: u64 = 30_000;

/// `http.listen`.
pub const HTTP_LISTEN: &str = "0.0.0.0:8080";
/// `http.max_body_bytes`.
pub const HTTP_MAX_BODY_BYTES: u64 = MIB;
/// `http.max_decompressed_bytes`.
pub const HTTP_MAX_DECOMPRESSED_BYTES: u64 = 8 * MIB;
/// `http.header_timeout_ms`.
pub const HEADER_TIMEOUT_MS: u64 = 10_000;
/// `http.body_timeout_ms`.
pub const BODY_TIMEOUT_MS: u64 = 30_000;
/// `http.retry_after_secs`.
pub const RETRY_AFTER_SECS: u64 = 5;

/// `uplinks.NAME.enabled`.
pub const UPLINK_ENABLED: bool = true;
/// `uplinks.NAME.topics`: every reading.
pub const UPLINK_TOPICS: &[&str] = &["#"];

/// `brokers` of a Kafka uplink.
pub const KAFKA_BROKERS: &str = "localhost:9092";
/// `topic` of a Kafka uplink.
pub const KAFKA_TOPIC: &str = "ferry.readings";
/// `message_timeout_ms` of a Kafka uplink.
pub const MESSAGE_TIMEOUT_MS: u64 = 30_000;
/// `max_inflight_segments` of a Kafka uplink.
pub const MAX_INFLIGHT_SEGMENTS: usize = 256;
/// `max_inflight_readings` of a Kafka uplink.
pub const MAX_INFLIGHT_READINGS: usize = 20_000;
/// `initial_backoff_ms` of Kafka and MQTT uplinks.
pub const INITIAL_BACKOFF_MS: u64 = 500;
/// `max_backoff_ms` of Kafka and MQTT uplinks.
pub const MAX_BACKOFF_MS: u64 = 60_000;

/// `url` of an MQTT uplink.
pub const MQTT_UPLINK_URL: &str = "mqtt://localhost:1883";
/// `keep_alive_secs` of an MQTT uplink.
pub const KEEP_ALIVE_SECS: u64 = 30;

/// `status.stalled_after_secs`.
pub const STALLED_AFTER_SECS: u64 = 60;
/// `status.max_devices`.
pub const MAX_DEVICES: usize = 1000;

/// The default `gateway.id`: the trimmed contents of `/etc/hostname` when that is a valid
/// gateway id, else `"ferry"`.
pub fn gateway_id() -> String {
    std::fs::read_to_string(HOSTNAME_FILE)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| crate::validate::check_gateway_id(s).is_ok())
        .unwrap_or_else(|| GATEWAY_ID.to_owned())
}

pub(crate) fn uplink_enabled() -> bool {
    UPLINK_ENABLED
}

pub(crate) fn uplink_topics() -> Vec<String> {
    UPLINK_TOPICS.iter().map(|&t| t.to_owned()).collect()
}

pub(crate) fn socket_addr(s: &str) -> SocketAddr {
    s.parse().expect("default socket addresses are valid")
}

/// Kinesis and Pub/Sub: requests in flight at once.
pub const HTTP_UPLINK_MAX_INFLIGHT_REQUESTS: usize = 4;
/// Kinesis and Pub/Sub: readings in flight.
pub const HTTP_UPLINK_MAX_INFLIGHT_READINGS: usize = 5_000;
/// Kinesis and Pub/Sub: the time one request may take.
pub const HTTP_UPLINK_REQUEST_TIMEOUT_MS: u64 = 30_000;

/// `status.log_summary_secs`.
pub const LOG_SUMMARY_SECS: u64 = 300;
