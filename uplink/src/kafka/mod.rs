//! The Kafka uplink (`[uplinks.NAME]` with `type = "kafka"`).
//!
//! ## Flow
//! [`KafkaSink::run`] reads segments of its buffer consumer (the uplink's name) oldest first,
//! through the shared buffer task ([`crate::feed`]), and keeps the readings its `topics` take
//! in flight in an idempotent producer (`enable.idempotence=true`, `acks=all`, see
//! [`config`]): up to `max_inflight_readings` readings, `max_inflight_segments` segments and
//! an eighth of `buffer.max_bytes` (stored), and always at least one segment. (`drop_oldest`
//! spares segments in flight while older ones are left; a window covering the whole cap
//! would make it drop the newest readings during an outage.) The window counts readings because a segment holds what
//! one commit gathered: thousands at a busy site, one or two at a slow one, whose backlog
//! would otherwise drain a few segments per round trip. Segments are settled strictly in
//! order: a segment is acked in the buffer only when every reading in it has a successful
//! delivery report or was dead-lettered, and a later segment that finishes first waits.
//!
//! - **Transient failures** (timeouts, brokers down, not enough replicas, …): everything
//!   librdkafka still holds is purged (its queue is never the storage), the state goes to
//!   `backing_off` (`offline` after 3 failures in a row or when librdkafka reports every
//!   broker down), the uplink waits as [`crate::retry`] says, rewinds to the last ack and
//!   sends again. Readings sent again are
//!   counted (`resent_total`); each may be a duplicate upstream.
//! - **Permanent failures of one reading** ([`ErrorClass::Permanent`]: message too large,
//!   invalid record, policy violation, …): the reading goes to the dead-letter table with the
//!   reason, and the stream moves on. A missing topic or a refused authorization is not the
//!   reading's fault but the cloud side's configuration: it is transient, with a status line
//!   that says what to fix, and the readings wait in the buffer.
//! - **Fatal producer errors** (`fatal_error()`): the producer is rebuilt.
//!
//! ## Record layout, `delivery = "reading"` (default)
//! One record per reading, on the topic chosen by [`routing`]; key by the key rule; value =
//! payload bytes; headers: the metadata fields of [`crate::meta`] (the device's own MQTT v5
//! user properties, then ferry's `ferry-*` fields), then `content-type` when the device gave
//! one.
//!
//! ## Record layout, `delivery = "segment"`
//! One record per buffer segment, on the uplink's `topic` (routes and `topics` filters do not
//! apply: a segment mixes topics), keyed by the gateway id so a gateway's segments stay in order in one
//! partition. The value is the stored segment exactly as in the buffer, with headers
//! `content-encoding` (`gzip`, or `identity` when the buffer stores uncompressed),
//! `ferry-segment` (segment id, stable across re-sends: de-duplicate on it together with
//! `ferry-gateway`), `ferry-first-id`, `ferry-count` and `ferry-gateway`.
//!
//! To unpack a value (framing from `ferry_buffer::segment`, all integers little-endian):
//!
//! ```text
//! 0  4  magic "FRY2" ("FRY1": format 1, records without the clock fields)
//! 4  1  codec: 0 = none, 1 = gzip (one RFC 1952 member)
//! 5  4  reading count (u32)
//! 9  8  id of the first reading (u64)
//! 17 4  body length before compression (u32)
//! 21 4  CRC-32 (IEEE) of the uncompressed body (u32)
//! 25 .. body, compressed with the codec
//! ```
//!
//! Decompress the body (gunzip if the codec is 1), check its length and CRC-32, then read
//! `count` records back to back, each
//! `u64 id | u64 received_at_ms | u8 source (1 mqtt, 2 mqtt-will, 3 http, 4 requeue) |
//! str device | str topic | u8 has_content_type [str content_type] |
//! u32 n, n × (str key, str value) | bytes payload | u32 boot | u64 boottime_ms | u8 clock |
//! u8 has_origin [str gateway | u64 id]`, where `str`/`bytes` are a u32 length and that many
//! bytes; the fields after the payload are the clock stamp ([`ferry_buffer::clock`]: `clock`
//! 1 synced, 2 unsynced, 3 corrected, 4 device, 0 unknown) and, for a reading imported from
//! another gateway's export, the gateway and id it was first buffered with (de-duplicate such
//! a reading by those rather than by `ferry-gateway` and its id here); they are absent in
//! segments with the format-1 magic `FRY1`. A segment holding a
//! reading whose time was corrected is re-encoded with the corrected time before it is sent. [`decode_segment`] is the reference decoder (Rust consumers can use it
//! directly); the tests decode what arrives in Kafka with it.
//!
//! Readings larger than the topic's `max.message.bytes` are dead-lettered; in segment mode
//! that is the whole segment, so keep `buffer.max_batch_bytes` below the topic limit.
//!
//! ## Commands from the cloud
//! With `[uplinks.NAME.downlink]`, a consumer of the command topic runs beside the producer
//! until the same shutdown: which records are for this gateway, their headers and the
//! offsets are in `commands.rs`; the hand-over rules in [`crate::downlink`].

mod commands;
pub mod config;
mod diagnose;
mod pump;
pub mod routing;
mod sink;
mod track;

pub use ferry_buffer::segment::decode_segment;
pub use sink::{ErrorClass, KIND, KafkaSink, KafkaSinkError, classify};
