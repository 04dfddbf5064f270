//! One connection attempt to the upstream broker, v3.1.1 or v5, behind one small interface.
//!
//! A [`Link`] owns a fresh rumqttc client and event loop. The event loop runs in its own task
//! and reports what the sink needs over a channel ([`LinkEvent`]); its first error ends the
//! task and the link. The sink never polls a second time after an error: a failed link is
//! dropped with everything rumqttc still held (its queue is never ferry's storage), and a new
//! link starts with empty state, so rumqttc never retransmits on its own.

use super::config::ConnectSettings;
use ferry_config::MqttProtocol;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as V5Code, PubAckReason, PublishProperties};
use rumqttc::{ConnectReturnCode as V4Code, Outgoing, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the event loop task reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The broker accepted the connection. `max_packet_size` is the v5 broker's limit.
    Connected {
        /// The broker's maximum packet size (v5 CONNACK property).
        max_packet_size: Option<u32>,
    },
    /// A PUBLISH was written to the socket with this packet id (0 for QoS 0), in the order the
    /// publishes were handed to the client.
    Sent(u16),
    /// The broker acknowledged packet id `pkid`; `refused` carries a v5 failure reason code.
    Acked {
        /// Packet id.
        pkid: u16,
        /// A v5 PUBACK failure, with whether it is worth retrying.
        refused: Option<Refusal>,
    },
    /// The connection failed; the message is for humans (and the status page).
    Failed(String),
    /// A message on a `downlink` filter (only with downlink routes: ferry acks it itself).
    Command(Incoming),
    /// The broker answered the subscription to the `downlink` filters: `Some(why)` when it
    /// refused some, for humans.
    Subscribed(Option<String>),
}

/// A message that came down, kept whole until ferry acks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// From a 3.1.1 broker.
    V4(rumqttc::Publish),
    /// From a v5 broker.
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

impl Incoming {
    /// Its upstream topic (`None`: not UTF-8).
    pub fn topic(&self) -> Option<&str> {
        match self {
            Incoming::V4(p) => Some(&p.topic),
            Incoming::V5(p) => std::str::from_utf8(&p.topic).ok(),
        }
    }

    /// The command it carries to local subscribers, published on `topic`: payload, QoS,
    /// retain flag and (v5) properties kept.
    pub fn command(&self, topic: String) -> crate::downlink::Command {
        use crate::downlink::{Command, Properties};
        match self {
            Incoming::V4(p) => Command {
                topic,
                payload: p.payload.clone(),
                qos: p.qos as u8,
                retain: p.retain,
                props: Properties::default(),
            },
            Incoming::V5(p) => Command {
                topic,
                payload: p.payload.clone(),
                qos: p.qos as u8,
                retain: p.retain,
                props: p
                    .properties
                    .as_ref()
                    .map(|pp| Properties {
                        payload_format_indicator: pp.payload_format_indicator,
                        content_type: pp.content_type.clone(),
                        response_topic: pp.response_topic.clone(),
                        correlation_data: pp.correlation_data.clone(),
                        user_properties: pp.user_properties.clone(),
                        message_expiry_interval: pp.message_expiry_interval,
                    })
                    .unwrap_or_default(),
            },
        }
    }
}

/// A v5 PUBACK with a failure reason code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Human-readable reason.
    pub reason: String,
    /// True for reasons that will not change on a retry (not authorized, invalid topic,
    /// invalid payload format, implementation specific): the reading is dead-lettered.
    pub permanent: bool,
}

/// One outgoing message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Upstream topic.
    pub topic: String,
    /// Payload (the reading's payload, or its envelope).
    pub payload: bytes::Bytes,
    /// v5 user properties (ignored in v3.1.1).
    pub user_properties: Vec<(String, String)>,
    /// v5 content type (ignored in v3.1.1).
    pub content_type: Option<String>,
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A live connection attempt. Dropping it stops its event loop task.
pub struct Link {
    client: Client,
    /// Events from the event loop task.
    pub events: mpsc::UnboundedReceiver<LinkEvent>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Commands handed over and not yet acked, at most, per connection: the sink stops reading
/// the link's events beyond it (a QoS 0 flood cannot grow the queue of hand-overs).
pub const COMMAND_WINDOW: usize = 1024;

fn v5_qos(qos: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// A human-readable text for a refused v3.1.1 CONNACK.
pub fn v4_refusal(code: V4Code) -> &'static str {
    match code {
        V4Code::Success => "success",
        V4Code::RefusedProtocolVersion => "unacceptable protocol version",
        V4Code::BadClientId => "client identifier rejected",
        V4Code::ServiceUnavailable => "server unavailable",
        V4Code::BadUserNamePassword => "bad user name or password",
        V4Code::NotAuthorized => {
            "not authorized (wrong username or password, or not allowed by the broker)"
        }
    }
}

/// A human-readable text for a refused v5 CONNACK.
pub fn v5_refusal(code: V5Code) -> String {
    match code {
        V5Code::BadUserNamePassword => "bad user name or password".into(),
        V5Code::NotAuthorized => {
            "not authorized (wrong username or password, or not allowed by the broker)".into()
        }
        V5Code::BadClientId | V5Code::ClientIdentifierNotValid => {
            "client identifier rejected".into()
        }
        V5Code::ServerUnavailable | V5Code::ServiceUnavailable => "server unavailable".into(),
        V5Code::ServerBusy => "server busy".into(),
        V5Code::Banned => "banned".into(),
        V5Code::RefusedProtocolVersion | V5Code::UnsupportedProtocolVersion => {
            "unsupported protocol version".into()
        }
        other => format!("{other:?}"),
    }
}

fn v5_puback_refusal(reason: PubAckReason, text: Option<String>) -> Option<Refusal> {
    let permanent = match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => return None,
        PubAckReason::NotAuthorized
        | PubAckReason::TopicNameInvalid
        | PubAckReason::PayloadFormatInvalid
        | PubAckReason::ImplementationSpecificError => true,
        PubAckReason::UnspecifiedError
        | PubAckReason::QuotaExceeded
        | PubAckReason::PacketIdentifierInUse => false,
    };
    let reason = match text {
        Some(t) => format!("the broker refused the publish: {reason:?} ({t})"),
        None => format!("the broker refused the publish: {reason:?}"),
    };
    Some(Refusal { reason, permanent })
}

fn describe_v4(e: &rumqttc::ConnectionError, addr: &str) -> String {
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => {
            format!("broker refused the connection: {}", v4_refusal(*code))
        }
        E::Io(io) => format!("cannot talk to the broker at {addr}: {io}"),
        E::Tls(t) => format!("TLS with the broker at {addr} failed: {t}"),
        E::NetworkTimeout => format!("connecting to the broker at {addr} timed out"),
        other => format!("the connection to the broker at {addr} failed: {other}"),
    }
}

fn describe_v5(e: &rumqttc::v5::ConnectionError, addr: &str) -> String {
    use rumqttc::v5::ConnectionError as E;
    use rumqttc::v5::StateError as S;
    match e {
        E::ConnectionRefused(code) | E::MqttState(S::ConnFail { reason: code }) => {
            format!("broker refused the connection: {}", v5_refusal(*code))
        }
        E::MqttState(S::ServerDisconnect {
            reason_code,
            reason_string,
        }) => format!(
            "the broker at {addr} closed the connection: {reason_code:?}{}",
            reason_string
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        ),
        E::Io(io) => format!("cannot talk to the broker at {addr}: {io}"),
        E::Tls(t) => format!("TLS with the broker at {addr} failed: {t}"),
        E::Timeout(_) => format!("connecting to the broker at {addr} timed out"),
        other => format!("the connection to the broker at {addr} failed: {other}"),
    }
}

async fn drive_v4(
    mut el: rumqttc::EventLoop,
    tx: mpsc::UnboundedSender<LinkEvent>,
    addr: String,
    commands: bool,
) {
    use rumqttc::{Event, Packet, SubscribeReasonCode};
    loop {
        let ev = match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) if commands => {
                LinkEvent::Command(Incoming::V4(p))
            }
            Ok(Event::Incoming(Packet::SubAck(a))) => {
                let refused = a
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, SubscribeReasonCode::Failure))
                    .count();
                LinkEvent::Subscribed((refused > 0).then(|| {
                    format!(
                        "the broker refused {refused} of the downlink subscriptions (SUBACK 0x80)"
                    )
                }))
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => LinkEvent::Connected {
                max_packet_size: None,
            },
            Ok(Event::Incoming(Packet::PubAck(a))) => LinkEvent::Acked {
                pkid: a.pkid,
                refused: None,
            },
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => LinkEvent::Sent(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(LinkEvent::Failed(describe_v4(&e, &addr)));
                return;
            }
        };
        if tx.send(ev).is_err() {
            return;
        }
    }
}

async fn drive_v5(
    mut el: rumqttc::v5::EventLoop,
    tx: mpsc::UnboundedSender<LinkEvent>,
    addr: String,
    commands: bool,
) {
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
    loop {
        let ev = match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) if commands => {
                LinkEvent::Command(Incoming::V5(p))
            }
            Ok(Event::Incoming(Packet::SubAck(a))) => {
                let refused: Vec<_> = a
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .map(|c| format!("{c:?}"))
                    .collect();
                LinkEvent::Subscribed((!refused.is_empty()).then(|| {
                    format!(
                        "the broker refused downlink subscriptions: {}{}",
                        refused.join(", "),
                        a.properties
                            .and_then(|p| p.reason_string)
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    )
                }))
            }
            Ok(Event::Incoming(Packet::ConnAck(c))) => LinkEvent::Connected {
                max_packet_size: c.properties.and_then(|p| p.max_packet_size),
            },
            Ok(Event::Incoming(Packet::PubAck(a))) => LinkEvent::Acked {
                pkid: a.pkid,
                refused: v5_puback_refusal(a.reason, a.properties.and_then(|p| p.reason_string)),
            },
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => LinkEvent::Sent(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(LinkEvent::Failed(describe_v5(&e, &addr)));
                return;
            }
        };
        if tx.send(ev).is_err() {
            return;
        }
    }
}

impl Link {
    /// Starts connecting (the event loop connects on its first poll).
    pub fn open(s: &ConnectSettings) -> Link {
        let (tx, events) = mpsc::unbounded_channel();
        let addr = format!("{}:{}", s.endpoint.host, s.endpoint.port);
        // ferry never has more than `max_inflight` publishes outside PUBACK, nor more than
        // `COMMAND_WINDOW` commands handed over and not acked, so the request channel cannot
        // fill up.
        let commands = !s.routes.is_empty();
        let cap = usize::from(s.cfg.max_inflight.max(1))
            + 4
            + if commands { COMMAND_WINDOW + 1 } else { 0 };
        let (client, task) = match s.cfg.protocol {
            MqttProtocol::V311 => {
                let (c, el) = rumqttc::AsyncClient::new(s.v4_options(), cap);
                (
                    Client::V4(c),
                    tokio::spawn(drive_v4(el, tx, addr, commands)),
                )
            }
            MqttProtocol::V5 => {
                let (c, el) = rumqttc::v5::AsyncClient::new(s.v5_options(), cap);
                (
                    Client::V5(c),
                    tokio::spawn(drive_v5(el, tx, addr, commands)),
                )
            }
        };
        Link {
            client,
            events,
            task,
        }
    }

    /// Hands one publish to the client. Fails only if the event loop is gone or the request
    /// channel is full (neither happens while the link is healthy).
    pub fn publish(&self, qos: QoS, m: Message) -> Result<(), String> {
        let r = match &self.client {
            Client::V4(c) => c
                .try_publish(m.topic, qos, false, m.payload.to_vec())
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                let v5qos = v5_qos(qos);
                let props = PublishProperties {
                    user_properties: m.user_properties,
                    content_type: m.content_type,
                    ..PublishProperties::default()
                };
                c.try_publish_with_properties(m.topic, v5qos, false, m.payload, props)
                    .map_err(|e| e.to_string())
            }
        };
        r.map_err(|e| format!("cannot hand a publish to the MQTT client: {e}"))
    }

    /// Subscribes to the `downlink` filters (at every connect: a broker that kept the session
    /// replaces the subscriptions). v5: No Local, so ferry's own publishes do not come back,
    /// Retain As Published, so a retained command stays retained, and retained messages only
    /// for a subscription that is new.
    pub fn subscribe(&self, routes: &[crate::downlink::Route]) -> Result<(), String> {
        if routes.is_empty() {
            return Ok(());
        }
        let qos = |q: u8| {
            if q == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            }
        };
        let r = match &self.client {
            Client::V4(c) => c
                .try_subscribe_many(
                    routes
                        .iter()
                        .map(|r| rumqttc::SubscribeFilter::new(r.remote.clone(), qos(r.qos))),
                )
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
                c.try_subscribe_many(routes.iter().map(|r| Filter {
                    path: r.remote.clone(),
                    qos: v5_qos(qos(r.qos)),
                    nolocal: true,
                    preserve_retain: true,
                    retain_forward_rule: RetainForwardRule::OnNewSubscribe,
                }))
                .map_err(|e| e.to_string())
            }
        };
        r.map_err(|e| format!("cannot subscribe to the downlink filters: {e}"))
    }

    /// Acknowledges a command (PUBACK for QoS 1; nothing for QoS 0).
    pub fn ack(&self, m: &Incoming) -> Result<(), String> {
        let r = match (&self.client, m) {
            (Client::V4(c), Incoming::V4(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            (Client::V5(c), Incoming::V5(p)) => c.try_ack(p).map_err(|e| e.to_string()),
            _ => Err("a command of another protocol version".into()),
        };
        r.map_err(|e| format!("cannot acknowledge a command: {e}"))
    }

    /// Asks the client to send DISCONNECT (best effort).
    pub fn disconnect(&self) {
        let _ = match &self.client {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }

    /// Waits (bounded by the caller) until the event loop task has ended, e.g. after
    /// [`Link::disconnect`].
    pub async fn closed(&mut self) {
        let _ = (&mut self.task).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_readable() {
        assert_eq!(
            v4_refusal(V4Code::BadUserNamePassword),
            "bad user name or password"
        );
        assert!(v5_refusal(V5Code::NotAuthorized).starts_with("not authorized"));
        let r = v5_puback_refusal(PubAckReason::NotAuthorized, Some("acl".into())).unwrap();
        assert!(r.permanent);
        assert!(r.reason.contains("NotAuthorized") && r.reason.contains("acl"));
        assert!(
            !v5_puback_refusal(PubAckReason::QuotaExceeded, None)
                .unwrap()
                .permanent
        );
        assert_eq!(
            v5_puback_refusal(PubAckReason::NoMatchingSubscribers, None),
            None
        );
        let e = rumqttc::ConnectionError::ConnectionRefused(V4Code::BadUserNamePassword);
        assert_eq!(
            describe_v4(&e, "h:1"),
            "broker refused the connection: bad user name or password"
        );
    }
}
