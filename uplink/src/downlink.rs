//! Cloud-to-device commands: what comes down an uplink, and how it reaches local devices.
//!
//! An uplink with a `downlink` receives commands (MQTT: messages on the `remote` filters it
//! subscribes to upstream; Kafka: records of its downlink topic) and hands each to the local
//! MQTT broker through [`Local`], which the gateway implements.
//!
//! ## Rules
//! - **A command is acknowledged upstream only after it was handed over durably**, i.e. after
//!   [`Local::hand_over`] returned `Ok`: queued for every online local subscriber it goes to,
//!   and, for persistent sessions and a retained message, written in a buffer commit that
//!   returned from fsync. MQTT: the PUBACK goes out after that; Kafka: the record's offset is
//!   stored after that (the consumer commits stored offsets every second and at shutdown). A
//!   crash in between loses nothing: the upstream sends the command again (at least once).
//! - **A command is never a reading.** It is not stored in the buffer's segments, so no
//!   uplink ever sends it up again: there is no echo, whatever the uplinks' `topics`. An MQTT
//!   v5 uplink also subscribes with No Local, so the upstream broker does not send ferry's own
//!   publishes back as commands; MQTT 3.1.1 has no such option, so there the `remote` filters
//!   must not match the topics the uplink publishes readings to (see `docs/commands.md`).
//! - **Refused for good, counted, skipped.** A command that can never be handed over is
//!   acknowledged upstream all the same (MQTT PUBACK, Kafka offset), so that it is not sent
//!   again forever; it is counted in `ferry_downlink_refused_total{uplink,reason}` and logged
//!   (the first of a kind, then a summary per period, [`crate::fold`]). The reasons are
//!   [`Refusal`].
//! - **A failure that may pass is not acknowledged** (a disk error, ferry shutting down): the
//!   upstream sends the command again, MQTT after the reconnect that follows, Kafka from the
//!   last stored offset.
//! - Commands are handed over and acknowledged in the order they arrived.
//! - A command for a topic nobody subscribes to, not retained, reaches nobody, as in any MQTT
//!   broker: it is counted (`ferry_downlink_unrouted_total`). A device that must not miss
//!   commands keeps a persistent session (3.1.1 clean session 0, MQTT 5 session expiry), or
//!   the cloud sends them retained.

use crate::fold::{Fold, Say};
use crate::status::UplinkStatus;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// A command as it is published locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Local MQTT topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS of the local publish (0, 1 or 2).
    pub qos: u8,
    /// Whether it is kept as the topic's retained message (an empty payload clears it).
    pub retain: bool,
    /// MQTT 5 properties passed on to local subscribers.
    pub props: Properties,
}

/// The MQTT 5 properties a command carries to local subscribers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// Payload format indicator (1: UTF-8).
    pub payload_format_indicator: Option<u8>,
    /// Content type.
    pub content_type: Option<String>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data.
    pub correlation_data: Option<Bytes>,
    /// User properties.
    pub user_properties: Vec<(String, String)>,
    /// Message expiry interval, seconds.
    pub message_expiry_interval: Option<u32>,
}

/// Why a command can never be handed over (the `reason` label of
/// `ferry_downlink_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// MQTT: no `downlink` route takes its upstream topic (a subscription the persistent
    /// session kept from an earlier configuration).
    NoRoute,
    /// Kafka: the record has no `ferry-topic` header.
    NoTopic,
    /// The local topic is not a valid MQTT topic name, or begins with `$`.
    InvalidTopic,
    /// Larger than `mqtt.max_payload_bytes`.
    TooLarge,
    /// `[[mqtt.acl]]` does not let the user `uplink:NAME` publish to its topic.
    Forbidden,
}

impl Refusal {
    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::NoTopic => "no_topic",
            Refusal::InvalidTopic => "invalid_topic",
            Refusal::TooLarge => "too_large",
            Refusal::Forbidden => "forbidden",
        }
    }
}

/// Why a command was not handed over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandOverError {
    /// It never can be: acknowledged upstream, counted, skipped.
    #[error("the command is refused: {detail}")]
    Refused {
        /// The reason, as a label.
        why: Refusal,
        /// What an operator reads.
        detail: String,
    },
    /// Not now (a disk error, shutdown): not acknowledged, so the upstream sends it again.
    #[error("cannot hand the command over now: {0}")]
    Failed(String),
}

impl HandOverError {
    /// A refusal for `why`, explained by `detail`.
    pub fn refused(why: Refusal, detail: impl Into<String>) -> Self {
        HandOverError::Refused {
            why,
            detail: detail.into(),
        }
    }
}

/// A command handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandedOver {
    /// Local subscribers it was queued for (persistent sessions included).
    pub queued: usize,
    /// Whether it was kept as the topic's retained message (or cleared it).
    pub retained: bool,
}

/// What [`Local::hand_over`] returns.
pub type HandOverFuture =
    Pin<Box<dyn Future<Output = Result<HandedOver, HandOverError>> + Send + 'static>>;

/// The local side commands are handed to: the gateway's MQTT broker.
pub trait Local: Send + Sync + std::fmt::Debug {
    /// Checks `cmd` for the uplink named `uplink` (size, topic, ACL), writes what must be
    /// durable in one buffer commit and queues it for local subscribers; resolves when that is
    /// done (see the module doc). The work runs on its own: dropping the future does not stop
    /// it halfway.
    fn hand_over(&self, uplink: &str, cmd: Command) -> HandOverFuture;
}

/// The user (and client id) a command is published as, for `[[mqtt.acl]]`.
pub fn acl_user(uplink: &str) -> String {
    format!("uplink:{uplink}")
}

/// What one uplink's downlink shares with its tasks: the local side, the status counters and
/// the folded log of refusals.
#[derive(Debug, Clone)]
pub struct Downlink {
    /// Where commands go.
    pub local: Arc<dyn Local>,
    status: UplinkStatus,
    refusals: Arc<Fold>,
}

impl Downlink {
    /// The downlink of the uplink whose status is `status` (which then shows downlink counters).
    pub fn new(local: Arc<dyn Local>, status: UplinkStatus) -> Self {
        status.enable_downlink();
        Downlink {
            local,
            status,
            refusals: Arc::new(Fold::default()),
        }
    }

    /// Hands `cmd` over for this uplink.
    pub fn hand_over(&self, cmd: Command) -> HandOverFuture {
        self.local.hand_over(self.status.name(), cmd)
    }

    /// Records the outcome of one command; returns whether it is to be acknowledged upstream
    /// (handed over, or refused for good).
    pub fn record(&self, outcome: &Result<HandedOver, HandOverError>) -> bool {
        match outcome {
            Ok(h) => {
                self.status.record_command(Ok(h));
                true
            }
            Err(HandOverError::Refused { why, detail }) => {
                self.status.record_command(Err(*why));
                let uplink = self.status.name();
                match self.refusals.note(detail, Instant::now()) {
                    Say::New => tracing::warn!(uplink = %uplink, reason = why.label(),
                        detail = %detail, "A command from the cloud is refused and skipped."),
                    Say::Again(n) => tracing::warn!(uplink = %uplink, reason = why.label(),
                        detail = %detail, repeats = n,
                        "Commands from the cloud keep being refused and skipped."),
                    Say::Quiet => {}
                }
                true
            }
            Err(HandOverError::Failed(_)) => false,
        }
    }

    /// Records a command refused before it reached [`Local`] (no route, no topic).
    pub fn refuse(&self, why: Refusal, detail: String) {
        self.record(&Err(HandOverError::Refused { why, detail }));
    }
}

/// One MQTT `downlink` route: upstream filter to local topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The filter subscribed to upstream.
    pub remote: String,
    /// The local topic template (`None`: the upstream topic).
    pub local: Option<String>,
    /// QoS of the subscription.
    pub qos: u8,
}

impl Route {
    /// The routes of an MQTT uplink's `downlink` tables.
    pub fn of(cfg: &[ferry_config::MqttDownlink]) -> Vec<Route> {
        cfg.iter()
            .map(|d| Route {
                remote: d.remote.clone(),
                local: d.local.clone(),
                qos: d.qos.unwrap_or(1),
            })
            .collect()
    }
}

/// The local topic of a message that came down on `topic`: the first route whose `remote`
/// matches it, its template expanded. `None`: no route takes it.
pub fn local_topic(routes: &[Route], topic: &str) -> Option<String> {
    routes.iter().find_map(|r| {
        let caps = ferry_config::topic::captures(&r.remote, topic)?;
        Some(match &r.local {
            Some(t) => ferry_config::topic::expand(t, &caps),
            None => topic.to_owned(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_rewrite_the_topic_and_the_first_match_wins() {
        let routes = Route::of(&[
            ferry_config::MqttDownlink {
                remote: "cmd/site-7/+/set".into(),
                local: Some("dev/{1}/set".into()),
                qos: Some(0),
            },
            ferry_config::MqttDownlink {
                remote: "cmd/site-7/#".into(),
                local: Some("cmd/{#}".into()),
                qos: None,
            },
            ferry_config::MqttDownlink {
                remote: "cfg/#".into(),
                local: None,
                qos: None,
            },
        ]);
        assert_eq!(routes[0].qos, 0);
        assert_eq!(routes[1].qos, 1);
        assert_eq!(
            local_topic(&routes, "cmd/site-7/pump-1/set").as_deref(),
            Some("dev/pump-1/set")
        );
        assert_eq!(
            local_topic(&routes, "cmd/site-7/pump-1/reboot").as_deref(),
            Some("cmd/pump-1/reboot")
        );
        assert_eq!(local_topic(&routes, "cfg/a/b").as_deref(), Some("cfg/a/b"));
        assert_eq!(local_topic(&routes, "cmd/site-8/x"), None);
    }

    #[test]
    fn refusals_are_acknowledged_and_counted_failures_are_not() {
        #[derive(Debug)]
        struct Nobody;
        impl Local for Nobody {
            fn hand_over(&self, _: &str, _: Command) -> HandOverFuture {
                Box::pin(async { Ok(HandedOver::default()) })
            }
        }
        let status = UplinkStatus::new("cloud", "mqtt", Vec::new());
        let d = Downlink::new(Arc::new(Nobody), status.clone());
        assert!(d.record(&Ok(HandedOver {
            queued: 2,
            retained: false
        })));
        assert!(d.record(&Ok(HandedOver::default())));
        assert!(d.record(&Err(HandOverError::refused(Refusal::TooLarge, "big"))));
        assert!(!d.record(&Err(HandOverError::Failed("disk".into()))));
        d.refuse(Refusal::NoRoute, "x".into());
        let s = status.snapshot().downlink.expect("downlink counters");
        assert_eq!(s.received_total, 4);
        assert_eq!(s.handed_over_total, 2);
        assert_eq!(s.unrouted_total, 1);
        assert_eq!(s.refused_total, 2);
        assert_eq!(s.refused["too_large"], 1);
        assert_eq!(s.refused["no_route"], 1);
        assert!(s.last_command_ms.is_some());
        assert!(
            UplinkStatus::new("k", "kafka", Vec::new())
                .snapshot()
                .downlink
                .is_none(),
            "an uplink without a downlink shows none"
        );
    }
}
