//! The `Reading` record: one sensor message as ferry received it.

use crate::clock::ClockStamp;
use bytes::Bytes;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where a reading came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// An MQTT PUBLISH from a device.
    Mqtt,
    /// An MQTT last-will message, ingested when a device dropped without DISCONNECT.
    MqttWill,
    /// An HTTP POST to the ingest API.
    Http,
    /// A reading put back from the dead-letter table.
    Requeue,
}

impl Source {
    /// The stable lowercase name used in headers, metrics labels and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::MqttWill => "mqtt-will",
            Source::Http => "http",
            Source::Requeue => "requeue",
        }
    }

    /// The source named by [`Source::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Source::Mqtt,
            Source::MqttWill,
            Source::Http,
            Source::Requeue,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Source::Mqtt => 1,
            Source::MqttWill => 2,
            Source::Http => 3,
            Source::Requeue => 4,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Source::Mqtt,
            2 => Source::MqttWill,
            3 => Source::Http,
            4 => Source::Requeue,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One sensor reading.
///
/// `id` is assigned by the buffer when the reading is committed: it is unique within the
/// gateway and grows with every commit. Whatever a caller puts there before `append` is
/// overwritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// Gateway-unique, monotonic id, assigned at commit.
    pub id: u64,
    /// When ferry received the reading, in milliseconds since the Unix epoch (or the device's
    /// own timestamp, where an ingest format carries one: mark it [`ClockMark::Device`]).
    /// Readers hand out the corrected time where the clock was not synchronized at receipt
    /// ([`crate::clock`]).
    ///
    /// [`ClockMark::Device`]: crate::ClockMark::Device
    pub received_at_ms: u64,
    /// Which listener took it in.
    pub source: Source,
    /// The device or client id.
    pub device: String,
    /// The MQTT topic, or the HTTP path's topic.
    pub topic: String,
    /// The payload's content type, when the device said (MQTT v5 property, HTTP header).
    pub content_type: Option<String>,
    /// MQTT v5 user properties, in the order the device sent them.
    pub properties: Vec<(String, String)>,
    /// The payload bytes, as received.
    pub payload: Bytes,
    /// The clock at receipt, stamped by the buffer at commit; see [`crate::clock`].
    pub clock: ClockStamp,
    /// Where the reading was first buffered, when it was imported from another gateway's
    /// export (`ferry buffer import`): its `ferry-id` stays the one that gateway gave it, so
    /// consumers de-duplicate across both paths. `None` for a reading received here.
    pub origin: Option<Origin>,
}

/// The gateway that first buffered an imported reading, and the id it gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// That gateway's `gateway.id`.
    pub gateway: String,
    /// Its reading id there.
    pub id: u64,
}

impl Reading {
    /// A reading received now, with no content type and no properties.
    pub fn new(
        source: Source,
        device: impl Into<String>,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Reading {
            id: 0,
            received_at_ms: now_ms(),
            source,
            device: device.into(),
            topic: topic.into(),
            content_type: None,
            properties: Vec::new(),
            payload: payload.into(),
            clock: ClockStamp::default(),
            origin: None,
        }
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// The number of bytes this reading takes in a segment before compression.
    pub fn encoded_len(&self) -> usize {
        crate::segment::reading_encoded_len(self)
    }

    /// An estimate of the memory this reading holds: the record itself and its strings and
    /// payload. Allocator overhead and the caller's own bookkeeping come on top.
    pub fn memory_len(&self) -> usize {
        std::mem::size_of::<Reading>()
            + self.payload.len()
            + self.topic.len()
            + self.device.len()
            + self.content_type.as_ref().map_or(0, |c| c.len())
            + self.origin.as_ref().map_or(0, |o| o.gateway.len())
            + self
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + std::mem::size_of::<(String, String)>())
                .sum::<usize>()
    }
}

/// Milliseconds since the Unix epoch, by the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
