//! # MQTT listener: ingest and the local broker
//!
//! Devices publish readings over MQTT 3.1.1 or 5; local clients subscribe to them
//! ([`broker`]). ferry frames packets with rumqttd's protocol
//! codecs (`rumqttd::protocol::{V4, V5}`) and runs the server-side session itself on tokio,
//! because rumqttd's broker acknowledges a publish before anything durable has happened.
//!
//! ## Invariants
//! - **PUBACK (QoS 1) and PUBREC (QoS 2) are sent only after [`ferry_buffer::Buffer::append`]
//!   returned `Ok`**, i.e. after the fsync of the group commit holding the reading. A reading
//!   that was refused (buffer full, disk error) is never acknowledged as a success.
//! - Acknowledgements leave a connection in the order the publishes arrived (MQTT 4.6): the
//!   appends of one connection are kept in a `FuturesOrdered`.
//! - A connection keeps reading while its appends are pending, up to `mqtt.max_inflight`
//!   unacknowledged QoS 1/2 publishes (sent to v5 clients as Receive Maximum). The publishes
//!   framed from one socket read go to the buffer as one append, and the appends of all
//!   connections are grouped into one commit by the buffer's writer. How connections pause
//!   for a stalled disk is written in [`session`].
//!
//! ## Files
//! - [`listener`]: the TCP and TLS accept loops, `max_connections`, shutdown.
//! - [`session`]: one connection: CONNECT, PUBLISH/PUBREL/PING/SUBSCRIBE, keep-alive, will,
//!   and delivery to it as a subscriber.
//! - [`broker`]: subscriptions, subscriber queues and retained messages; when a local
//!   subscriber sees a publish.
//! - [`auth`]: `[[mqtt.users]]` (constant-time password compare, argon2 PHC hashes).
//! - [`acl`]: `[[mqtt.acl]]`, the topics each client may publish and subscribe to.
//! - [`commands`]: commands from the cloud (an uplink's downlink), handed to the broker.
//! - [`tls`]: the rustls server config and the client certificate's Common Name.
//! - [`stats`]: the figures shown on the status page.
//!
//! ## Choices worth knowing
//! - The last will is ingested (source `mqtt-will`) when a connection ends without DISCONNECT:
//!   socket closed, keep-alive expired, protocol error, or v5 DISCONNECT 0x04. It is not
//!   ingested when the session is taken over by a new connection with the same client id, or
//!   when ferry itself shuts down: in both cases the device is not offline.
//! - When `device_from_topic_level` names a level the topic does not have (or that is empty),
//!   the client id is the device id.
//! - A client that leaves ferry's replies unread (its socket buffers full) for
//!   `write_timeout_ms` is disconnected (`ferry_mqtt_rejected_total{reason="write_timeout"}`):
//!   otherwise its session would wait on the write forever and hold a connection slot.
//! - Connections beyond `max_connections` get CONNACK 0x03 (v3.1.1) or 0x97 quota exceeded (v5)
//!   if they send CONNECT quickly, else they are closed.

pub mod acl;
pub mod auth;
pub mod broker;
pub mod commands;
pub mod listener;
pub(crate) mod session;
pub mod stats;
pub mod tls;

#[cfg(test)]
mod tests;

use crate::status::DeviceTable;
use ferry_buffer::Buffer;
use ferry_config::MqttSettings;
use std::sync::Arc;
use std::time::Duration;

pub use listener::{ListenError, MqttListener};
pub use session::Ctx;
pub use stats::MqttStats;

/// Why the MQTT listeners could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// `[[mqtt.users]]` could not be read.
    #[error(transparent)]
    Auth(#[from] auth::AuthConfigError),
    /// `[mqtt.tls]`'s files could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A listen address could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// What the MQTT listeners need from the rest of the gateway.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Where readings go.
    pub buffer: Buffer,
    /// The status page's device table.
    pub devices: DeviceTable,
    /// `buffer.when_full = "reject"`: a full buffer refuses publishes (v5 reason code).
    pub reject_when_full: bool,
    /// How long sessions get to finish their acks at shutdown.
    pub grace: Duration,
}

/// The bound MQTT listeners: `"mqtt"` on `mqtt.listen` and, with `[mqtt.tls]`, `"mqtts"` on
/// `mqtt.tls.listen`. They share one session table and one set of counters.
#[derive(Debug)]
pub struct MqttListeners {
    /// The plain TCP listener.
    pub tcp: MqttListener,
    /// The TLS listener.
    pub tls: Option<MqttListener>,
    /// Their counters.
    pub stats: MqttStats,
    /// The broker, as uplinks with a downlink hand commands to it.
    pub local: commands::LocalBroker,
}

impl MqttListeners {
    /// Loads the users and TLS files and binds the listen addresses.
    pub async fn bind(settings: &MqttSettings, deps: Deps) -> Result<Self, BindError> {
        let mut ctx = Ctx::new(settings.clone(), deps.buffer, deps.reject_when_full)?;
        ctx.devices = deps.devices;
        let ctx = Arc::new(ctx);
        let tcp =
            MqttListener::bind("mqtt", settings.listen, None, ctx.clone(), deps.grace).await?;
        let tls = match &settings.tls {
            Some(t) => {
                let acceptor = tls::acceptor(t)?;
                Some(
                    MqttListener::bind(
                        "mqtts",
                        t.listen,
                        Some((acceptor, t.device_from_cert_cn)),
                        ctx.clone(),
                        deps.grace,
                    )
                    .await?,
                )
            }
            None => None,
        };
        Ok(MqttListeners {
            tcp,
            tls,
            stats: ctx.stats.clone(),
            local: commands::LocalBroker::new(ctx.clone()),
        })
    }
}
