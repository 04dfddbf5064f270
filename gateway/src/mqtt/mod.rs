//! # MQTT ingest listener
//!
//! Devices publish readings over MQTT 3.1.1 or 5. ferry frames packets with rumqttd's protocol
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
//!   connections are grouped into one commit by the buffer's writer. While the readings of
//!   all connections that await their commit hold more than `buffer.max_pending_bytes`
//!   (a stalled disk), connections stop reading until a commit frees room.
//!
//! ## Files
//! - [`listener`]: the TCP and TLS accept loops, `max_connections`, shutdown.
//! - [`session`]: one connection: CONNECT, PUBLISH/PUBREL/PING/SUBSCRIBE, keep-alive, will.
//! - [`auth`]: `[[mqtt.users]]` (constant-time password compare, argon2 PHC hashes).
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

pub mod auth;
pub mod listener;
pub mod session;
pub mod stats;
pub mod tls;

#[cfg(test)]
mod tests;

use crate::app::{Gateway, StartError};
use std::sync::Arc;

pub use listener::MqttListener;
pub use session::Ctx;
pub use stats::MqttStats;

/// Binds the MQTT listener(s) if enabled and registers them with the gateway: `"mqtt"` on
/// `mqtt.listen` and, with `[mqtt.tls]`, `"mqtts"` on `mqtt.tls.listen`.
pub async fn register(gw: &mut Gateway) -> Result<(), StartError> {
    let config = gw.config.clone();
    let settings = &config.mqtt;
    if !settings.enabled {
        return Ok(());
    }
    let err = |message: String| StartError::Component {
        component: "mqtt",
        message,
    };
    let mut ctx = Ctx::new(
        settings.clone(),
        gw.buffer.clone(),
        matches!(config.buffer.when_full, ferry_config::WhenFull::Reject),
    )
    .map_err(|e| err(e.to_string()))?;
    ctx.devices = gw.status.devices.clone();
    let ctx = Arc::new(ctx);
    let grace = std::time::Duration::from_millis(config.gateway.shutdown_grace_ms);

    let tcp = MqttListener::bind("mqtt", settings.listen, None, ctx.clone(), grace)
        .await
        .map_err(|e| err(e.to_string()))?;
    gw.add_listener("mqtt", tcp.local_addr(), move |shutdown| {
        Box::pin(tcp.run(shutdown))
    });

    if let Some(tls_settings) = &settings.tls {
        let acceptor = tls::acceptor(tls_settings).map_err(|e| err(e.to_string()))?;
        let tls = MqttListener::bind(
            "mqtts",
            tls_settings.listen,
            Some((acceptor, tls_settings.device_from_cert_cn)),
            ctx.clone(),
            grace,
        )
        .await
        .map_err(|e| err(e.to_string()))?;
        gw.add_listener("mqtts", tls.local_addr(), move |shutdown| {
            Box::pin(tls.run(shutdown))
        });
    }

    let stats = ctx.stats.clone();
    gw.add_status_source("mqtt", Arc::new(move || stats.to_json()));
    Ok(())
}
