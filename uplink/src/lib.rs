//! # ferry-uplink: carrying the buffer upstream
//!
//! Each uplink is a buffer consumer ([`ferry_buffer::Buffer::reader`]) with its own cursor.
//! It reads committed segments oldest first, sends them, and acks a segment only when the
//! upstream has confirmed every reading in it (or the reading was dead-lettered). The buffer,
//! not the upstream client's queue, is the storage: anything unconfirmed is sent again from
//! the buffer after a failure or a restart, so delivery is at least once and readings carry a
//! stable id (`ferry-id` = `<gateway id>-<reading id>`) for upstream de-duplication.
//!
//! - [`kafka`]: the Kafka uplink ([`kafka::KafkaSink`]).
//! - [`mqtt`]: the MQTT bridge to an upstream broker ([`mqtt::MqttSink`]).
//! - [`backoff`]: exponential backoff with full jitter, shared by every uplink.
//! - [`status`]: the [`status::UplinkStatus`] handle the status page reads.
//!
//! Every long-lived task is `async fn run(self, shutdown: impl Future<Output = ()>)`.

pub mod backoff;
pub mod kafka;
pub mod mqtt;
pub mod status;

pub use backoff::Backoff;
pub use status::{LinkState, UplinkReport, UplinkSnapshot, UplinkStatus, report};

#[cfg(test)]
mod test_util;
