//! The uplinks against real upstreams no one here wrote: librdkafka's mock cluster (Kafka),
//! Debian's mosquitto (MQTT), kinesalite and moto (Kinesis), Google's Pub/Sub emulator. One
//! test binary, one module per uplink; each drives the uplink's public API (`new`, `status`,
//! `run`) over a real buffer. Unit tests stay beside the code (`uplink/src/*/tests.rs`).
//!
//! A test whose upstream is not installed skips loudly, or fails under
//! `FERRY_REQUIRE_TOOLS=1` (as in CI).

mod kafka;
mod kinesis;
mod mqtt;
mod pubsub;
