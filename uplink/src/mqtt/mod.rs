//! The MQTT uplink (`[uplinks.NAME]` with `type = "mqtt"`): forwards the buffer to an
//! upstream MQTT broker (AWS IoT Core, Azure IoT Hub, HiveMQ, EMQX, RabbitMQ's MQTT plugin,
//! mosquitto, …) with rumqttc.
//!
//! ## Flow
//! [`MqttSink::run`] reads segments of its buffer consumer (the uplink's name) oldest first,
//! through the shared buffer task ([`crate::feed`]): each uplink has its own cursor and the
//! buffer deletes a segment only once every uplink acked it. Each reading its `topics` take
//! becomes one PUBLISH, at QoS 1 (or 0 with `qos = 0`). At most `max_inflight` readings are
//! outside a confirmation at any time. A reading is confirmed by its PUBACK (QoS 1) or, at
//! QoS 0, by being written to the socket. Segments settle as [`crate::settle`] says (in
//! order, every reading confirmed, dead-lettered or skipped), and their acks are committed by
//! the buffer task, never on this uplink's event loop. rumqttc reports each PUBLISH it writes
//! with its packet id, in the order the publishes were handed to it; ferry maps packet id →
//! (segment, reading) from those reports and settles on each PUBACK.
//!
//! - **Connection loss, refused CONNACK, a retryable v5 PUBACK reason** (unspecified error,
//!   quota exceeded): the connection and everything rumqttc held are dropped, the uplink
//!   backs off as [`crate::retry`] says (state `backing_off`, `offline` after 3 failed
//!   connections in a row; the backoff starts over only after progress), opens a fresh
//!   client, rewinds to the last ack and publishes again. rumqttc's own retransmission is
//!   never used: a new client has no pending state, so the buffer is the only source of
//!   re-sends. Re-sent readings are counted (`resent_total`) and may arrive twice; receivers
//!   de-duplicate on `ferry-id`. A refused CONNACK shows on the status page as, e.g.,
//!   `broker refused the connection: bad user name or password`.
//! - **Permanent failures of one reading** (a v5 PUBACK with not authorized, topic name
//!   invalid, payload format invalid or implementation specific error; a rewritten topic that
//!   is not a valid topic name; a message larger than a v5 broker's maximum packet size): the
//!   reading goes to the dead-letter table with the reason, and the stream moves on.
//!
//! ## Commands from the cloud
//! With `[[uplinks.NAME.downlink]]`, the same connection subscribes to each `remote` filter
//! at every connect (v5: No Local, Retain As Published, retained messages only for a new
//! subscription) and acknowledges incoming publishes itself: each is handed to the local
//! broker ([`crate::downlink`], which holds the rules), and its PUBACK goes out, in order,
//! only after that returned. A hand-over that fails for a reason that may pass ends the
//! connection, so the broker sends the command again on the next one.
//!
//! ## Message layout
//! Topic: see [`routing`] (rewrites, then `topic_prefix`). Retain is off. Payload: the
//! reading's payload exactly as received, unless `envelope = true`.
//!
//! - **MQTT v5**: the metadata fields of [`crate::meta`] travel as user properties; the
//!   device's content type is the v5 content-type property.
//! - **MQTT v3.1.1** has no properties. With `envelope = true` the payload is a JSON envelope
//!   ([`crate::meta::envelope`]) with `ferry_id`, `gateway`, `device`, `topic`,
//!   `received_at_ms`, `source`, `clock`, `content_type`, `properties`, `payload_encoding`
//!   and `payload`: a JSON payload is embedded verbatim, UTF-8 text as a string, anything else as
//!   base64 (`payload_encoding` says which). **Without the envelope only the payload is sent,
//!   and every piece of metadata, including `ferry-id`, is lost upstream** (so re-sends
//!   cannot be de-duplicated). `envelope = true` with v5 sends the envelope and the
//!   properties.
//!
//! ## Session and TLS
//! See [`config`]: persistent session (`clean_session = false`, v5 session expiry of one day),
//! keep-alive, username/password, and rustls on `ring` with a CA file and an optional client
//! certificate (mutual TLS, as AWS IoT Core requires).
//!
//! ## Stats
//! The same as every uplink's, through [`crate::status::UplinkStatus`] under the uplink's
//! name: `ferry_uplink_acked_total{uplink="NAME"}`, `…_skipped_total`, `…_retries_total`,
//! `…_dead_lettered_total`, `…_resent_total`, `ferry_uplink_in_flight_readings` and
//! `ferry_uplink_state`.

pub mod config;
mod link;
pub mod routing;
mod sink;

pub use config::TlsSetupError;
pub use sink::{KIND, MqttSink, MqttSinkError};
