//! Live figures of the MQTT listener for the status page, and the metric names.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const RING: usize = 1024;

/// Why a connection or publish was refused (the `reason` label of
/// `ferry_mqtt_rejected_total`).
pub mod reason {
    /// Wrong username or password.
    pub const BAD_CREDENTIALS: &str = "bad_credentials";
    /// No credentials while `allow_anonymous = false`.
    pub const NOT_AUTHORIZED: &str = "not_authorized";
    /// Client id refused.
    pub const CLIENT_ID: &str = "client_id";
    /// Protocol level other than 4 or 5.
    pub const PROTOCOL_VERSION: &str = "protocol_version";
    /// Over `max_connections`.
    pub const MAX_CONNECTIONS: &str = "max_connections";
    /// No CONNECT within `connect_timeout_ms` (or TLS handshake failed).
    pub const CONNECT_TIMEOUT: &str = "connect_timeout";
    /// TLS handshake failed.
    pub const TLS: &str = "tls";
    /// Topic empty, not UTF-8 or with wildcards.
    pub const TOPIC_INVALID: &str = "topic_invalid";
    /// Payload over `max_payload_bytes`.
    pub const TOO_LARGE: &str = "payload_too_large";
    /// Buffer full in reject mode.
    pub const BUFFER_FULL: &str = "buffer_full";
    /// The buffer could not write.
    pub const STORAGE: &str = "storage";
    /// Malformed packet or protocol violation.
    pub const PROTOCOL: &str = "protocol_error";
    /// Keep-alive expired.
    pub const KEEP_ALIVE: &str = "keep_alive";
    /// The client left ferry's replies unread for `write_timeout_ms`.
    pub const WRITE_TIMEOUT: &str = "write_timeout";
    /// A subscription refused for an invalid filter.
    pub const SUBSCRIBE: &str = "subscribe";
    /// A CONNECT asking for a new persistent session beyond `mqtt.max_sessions`.
    pub const SESSIONS: &str = "max_sessions";
    /// A PUBLISH to a topic `[[mqtt.acl]]` does not allow the client.
    pub const ACL_PUBLISH: &str = "acl_publish";
    /// A SUBSCRIBE to a filter `[[mqtt.acl]]` does not allow the client.
    pub const ACL_SUBSCRIBE: &str = "acl_subscribe";
}

#[derive(Debug, Default)]
struct Inner {
    connected: AtomicI64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    readings: [AtomicU64; 3],
    wills: AtomicU64,
    read_pauses: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    latency: Mutex<(Vec<u32>, usize)>,
    /// Refusals repeat when a device retries in a loop: their log lines are folded.
    refusals: ferry_uplink::fold::Fold,
    /// The local broker, for its figures.
    broker: std::sync::OnceLock<Arc<crate::mqtt::broker::Broker>>,
}

/// The MQTT listener's counters. Cheap to clone; all clones share the same figures.
#[derive(Debug, Clone, Default)]
pub struct MqttStats(Arc<Inner>);

impl MqttStats {
    /// What to log for a refusal described by `key` (its text without the peer's address):
    /// the first at once, then a summary per period ([`ferry_uplink::fold`]).
    pub fn fold_refusal(&self, key: &str) -> ferry_uplink::fold::Say {
        self.0.refusals.note(key, std::time::Instant::now())
    }
}

impl MqttStats {
    pub(crate) fn set_broker(&self, broker: Arc<crate::mqtt::broker::Broker>) {
        let _ = self.0.broker.set(broker);
    }

    /// The local broker's figures: subscribers, retained messages, deliveries and drops.
    pub fn broker(&self) -> Option<&crate::mqtt::broker::Broker> {
        self.0.broker.get().map(|b| &**b)
    }

    pub(crate) fn connected(&self) {
        self.0.connects.fetch_add(1, Relaxed);
        let n = self.0.connected.fetch_add(1, Relaxed) + 1;
        metrics::counter!("ferry_mqtt_connects_total").increment(1);
        metrics::gauge!("ferry_mqtt_connections").set(n as f64);
    }

    pub(crate) fn disconnected(&self) {
        self.0.disconnects.fetch_add(1, Relaxed);
        let n = self.0.connected.fetch_sub(1, Relaxed) - 1;
        metrics::gauge!("ferry_mqtt_connections").set(n as f64);
    }

    /// A connection stopped reading its socket because the readings awaiting commit are
    /// over `buffer.max_pending_bytes`.
    pub(crate) fn read_paused(&self) {
        self.0.read_pauses.fetch_add(1, Relaxed);
        metrics::counter!("ferry_mqtt_read_pauses_total").increment(1);
    }

    /// How often a connection stopped reading for `buffer.max_pending_bytes`.
    pub fn read_pauses(&self) -> u64 {
        self.0.read_pauses.load(Relaxed)
    }

    pub(crate) fn rejected(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        *self
            .0
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += n;
        metrics::counter!("ferry_mqtt_rejected_total", "reason" => reason).increment(n);
    }

    /// Records one committed batch: readings per QoS and the time from receipt to ack.
    pub(crate) fn committed(&self, by_qos: [u64; 3], ack_latency: Option<Duration>) {
        for (q, n) in by_qos.iter().enumerate() {
            if *n > 0 {
                self.0.readings[q].fetch_add(*n, Relaxed);
                metrics::counter!("ferry_readings_received_total", "source" => "mqtt", "qos" => QOS[q])
                    .increment(*n);
            }
        }
        if let Some(l) = ack_latency {
            metrics::histogram!("ferry_mqtt_ack_latency_seconds").record(l.as_secs_f64());
            let us = l.as_micros().min(u32::MAX as u128) as u32;
            let mut ring = self.0.latency.lock().unwrap_or_else(|p| p.into_inner());
            let (v, pos) = &mut *ring;
            if v.len() < RING {
                v.push(us);
            } else {
                v[*pos] = us;
            }
            *pos = (*pos + 1) % RING;
        }
    }

    pub(crate) fn will(&self) {
        self.0.wills.fetch_add(1, Relaxed);
        metrics::counter!("ferry_readings_received_total", "source" => "mqtt-will").increment(1);
    }

    /// Currently connected clients.
    pub fn connected_clients(&self) -> i64 {
        self.0.connected.load(Relaxed)
    }

    /// Readings committed, by QoS.
    pub fn readings(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.0.readings[i].load(Relaxed))
    }

    /// Rejections so far, by reason.
    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        self.0
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ack latency (receipt to PUBACK/PUBREC) p50 and p99 over the last 1024 batches, in µs.
    pub fn ack_latency_us(&self) -> Option<(u64, u64)> {
        let mut v = self
            .0
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as u64;
        Some((pick(0.5), pick(0.99)))
    }
}

const QOS: [&str; 3] = ["0", "1", "2"];
