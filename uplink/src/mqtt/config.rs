//! Builds the rumqttc client options and the rustls configuration from an MQTT uplink's table.
//!
//! - **Session**: `clean_session = false` (v3.1.1), or clean start off with a session expiry
//!   of [`SESSION_EXPIRY_SECS`] (v5), so the broker keeps the session across reconnects. ferry
//!   does not rely on it for delivery: after a reconnect it re-sends every unacknowledged
//!   reading from the buffer with a fresh client state (see the module docs).
//! - **In flight**: rumqttc's own window (`inflight`, v5 outgoing upper limit) is set to
//!   `max_inflight`, the same bound ferry keeps, so rumqttc never holds more than ferry tracks.
//! - **Keep-alive**: `keep_alive_secs` (0 disables it in v3.1.1; rumqttc's v5 client needs at
//!   least 5 s, so v5 uses `max(5, keep_alive_secs)`).
//! - **TLS** (`mqtts://`): rustls on the `ring` provider (the workspace's one crypto backend),
//!   TLS 1.2 and 1.3. Server certificates are checked against `ca_path` (PEM, every certificate
//!   in it), or the system trust store when it is not set. `client_cert_path` +
//!   `client_key_path` (PEM; PKCS#8, PKCS#1 or SEC1 key) add a client certificate, as AWS IoT
//!   Core requires. The server name checked is the host of `url`.

pub use crate::tls::TlsSetupError;
use ferry_config::{MqttEndpoint, MqttUplink};
use std::sync::Arc;
use std::time::Duration;

/// Session expiry requested from a v5 broker, in seconds (one day).
pub const SESSION_EXPIRY_SECS: u32 = 86_400;

/// The largest MQTT packet (the protocol's limit), used as rumqttc's outgoing packet limit so
/// the client library never refuses a reading on its own (its default is 10 KiB).
pub const MAX_PACKET_BYTES: usize = 268_435_455;

/// The largest packet ferry takes from the upstream broker (a command, with its topic and
/// properties). A v5 broker is told so in CONNECT and does not send larger ones; a 3.1.1
/// broker that does closes the connection (rumqttc refuses the packet). Commands are further
/// limited by `mqtt.max_payload_bytes` locally ([`crate::downlink`]).
pub const MAX_INCOMING_BYTES: usize = 16 * 1024 * 1024;

/// The rustls client configuration for `cfg` (used when the URL is `mqtts://`).
pub fn tls_config(cfg: &MqttUplink) -> Result<rustls::ClientConfig, TlsSetupError> {
    let client_auth = match (&cfg.client_cert_path, &cfg.client_key_path) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        (None, None) => None,
        _ => return Err(TlsSetupError::HalfClientAuth),
    };
    crate::tls::client_config(cfg.ca_path.as_deref(), client_auth)
}

/// Everything needed to open one connection, built once.
#[derive(Clone)]
pub struct ConnectSettings {
    /// Where to connect.
    pub endpoint: MqttEndpoint,
    /// The client id.
    pub client_id: String,
    /// The uplink config.
    pub cfg: MqttUplink,
    /// The rustls config, for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The `downlink` routes: subscribed at every connect, and their messages acknowledged
    /// by ferry (manual acks) once handed over.
    pub routes: Vec<crate::downlink::Route>,
}

impl std::fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectSettings")
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl ConnectSettings {
    fn inflight(&self) -> u16 {
        self.cfg.max_inflight.max(1)
    }

    fn transport(&self) -> rumqttc::Transport {
        match &self.tls {
            Some(c) => {
                rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(c.clone()))
            }
            None => rumqttc::Transport::tcp(),
        }
    }

    /// rumqttc v3.1.1 options.
    pub fn v4_options(&self) -> rumqttc::MqttOptions {
        let mut o =
            rumqttc::MqttOptions::new(&self.client_id, &self.endpoint.host, self.endpoint.port);
        o.set_keep_alive(Duration::from_secs(self.cfg.keep_alive_secs))
            .set_clean_session(false)
            .set_inflight(self.inflight())
            .set_max_packet_size(MAX_INCOMING_BYTES, MAX_PACKET_BYTES)
            .set_manual_acks(!self.routes.is_empty())
            .set_transport(self.transport());
        if let Some(user) = &self.cfg.username {
            let pass = self.cfg.password.as_ref().map_or("", |p| p.expose());
            o.set_credentials(user, pass);
        }
        o
    }

    /// rumqttc v5 options.
    pub fn v5_options(&self) -> rumqttc::v5::MqttOptions {
        let mut o =
            rumqttc::v5::MqttOptions::new(&self.client_id, &self.endpoint.host, self.endpoint.port);
        o.set_keep_alive(Duration::from_secs(self.cfg.keep_alive_secs.max(5)))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
            .set_outgoing_inflight_upper_limit(self.inflight())
            .set_manual_acks(!self.routes.is_empty())
            .set_max_packet_size(Some(MAX_INCOMING_BYTES as u32))
            .set_transport(self.transport());
        if let Some(user) = &self.cfg.username {
            let pass = self.cfg.password.as_ref().map_or("", |p| p.expose());
            o.set_credentials(user, pass);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cfg: MqttUplink) -> ConnectSettings {
        ConnectSettings {
            endpoint: cfg.endpoint().unwrap(),
            client_id: "ferry-gw1".into(),
            cfg,
            tls: None,
            routes: Vec::new(),
        }
    }

    #[test]
    fn v4_and_v5_options() {
        let s = settings(MqttUplink {
            url: "mqtt://broker.example:1884".into(),
            username: Some("u".into()),
            password: Some("p".into()),
            keep_alive_secs: 2,
            max_inflight: 7,
            ..MqttUplink::default()
        });
        let o = s.v4_options();
        assert_eq!(o.broker_address(), ("broker.example".to_string(), 1884));
        assert_eq!(o.client_id(), "ferry-gw1");
        assert!(!o.clean_session());
        assert_eq!(o.inflight(), 7);
        assert_eq!(o.keep_alive(), Duration::from_secs(2));
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("u", "p")
        );
        let o = s.v5_options();
        assert!(!o.clean_start());
        assert_eq!(o.session_expiry_interval(), Some(SESSION_EXPIRY_SECS));
        assert_eq!(
            o.keep_alive(),
            Duration::from_secs(5),
            "v5 keep-alive floor"
        );
        assert_eq!(o.get_outgoing_inflight_upper_limit(), Some(7));
    }

    #[test]
    fn tls_errors_name_the_file() {
        let cfg = MqttUplink {
            ca_path: Some("/nonexistent/ca.pem".into()),
            ..MqttUplink::default()
        };
        let e = tls_config(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/ca.pem") && e.contains("ca_path"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        let cfg = MqttUplink {
            ca_path: Some(empty),
            ..MqttUplink::default()
        };
        let e = tls_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
