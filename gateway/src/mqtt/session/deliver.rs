//! The connection as a subscriber: SUBSCRIBE and UNSUBSCRIBE, draining its queue
//! ([`crate::mqtt::broker::Outbox`]) into PUBLISHes within its in-flight window, and the
//! client's PUBACK / PUBREC / PUBCOMP for them. What reaches a queue, and when, is written in
//! [`crate::mqtt::broker`].

use super::*;
use crate::mqtt::broker::{Delivery, SubOpts, drop_reason};
use rumqttd::protocol::{
    PubRel, PubRelReason, QoS, RetainForwardRule, Subscribe, SubscribeProperties, Unsubscribe,
};

/// What a PUBLISH ferry sent waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    /// QoS 1: PUBACK.
    Ack,
    /// QoS 2: PUBREC.
    Rec,
    /// QoS 2, PUBREL sent: PUBCOMP.
    Comp,
}

/// The subscriber half of a session.
#[derive(Debug)]
pub(super) struct Subscriber {
    /// Created at the first SUBSCRIBE.
    pub(super) outbox: Option<Arc<Outbox>>,
    /// PUBLISHes sent and not yet acknowledged, by packet id.
    pub(super) sent: HashMap<u16, Sent>,
    next_pkid: u16,
    /// The client's Receive Maximum (MQTT 5), else `mqtt.max_inflight`.
    pub(super) window: usize,
    /// The client's Maximum Packet Size (MQTT 5).
    pub(super) max_packet: Option<u32>,
}

impl Subscriber {
    pub(super) fn new(window: usize, max_packet: Option<u32>) -> Subscriber {
        Subscriber {
            outbox: None,
            sent: HashMap::new(),
            next_pkid: 0,
            window: window.max(1),
            max_packet,
        }
    }

    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.sent.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

/// The will as local subscribers get it, sharing the payload of its reading.
pub(super) fn will_message(r: &Reading, qos: u8, retain: bool, conn: u64) -> Message {
    Message {
        topic: Arc::from(r.topic.as_str()),
        payload: r.payload.clone(),
        qos,
        retain,
        keep: false,
        props: passed_through(r.content_type.clone(), r.properties.clone(), None),
        expires: None,
        from: conn,
    }
}

/// The MQTT 5 properties a local subscriber gets from a publish: content type, user
/// properties, and those of `p` (payload format, response topic, correlation data).
pub(super) fn passed_through(
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
    p: Option<&PublishProperties>,
) -> Option<PublishProperties> {
    let props = PublishProperties {
        payload_format_indicator: p.and_then(|p| p.payload_format_indicator),
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: p.and_then(|p| p.response_topic.clone()),
        correlation_data: p.and_then(|p| p.correlation_data.clone()),
        user_properties,
        subscription_identifiers: Vec::new(),
        content_type,
    };
    let empty = props.payload_format_indicator.is_none()
        && props.response_topic.is_none()
        && props.correlation_data.is_none()
        && props.user_properties.is_empty()
        && props.content_type.is_none();
    (!empty).then_some(props)
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Session {
    pub(super) fn on_subscribe(
        &mut self,
        sub: Subscribe,
        props: Option<SubscribeProperties>,
    ) -> Result<(), Close> {
        let v5 = self.v5();
        let id = props.and_then(|p| p.id);
        if id == Some(0) {
            return Err(Close::error(
                reason::PROTOCOL,
                DisconnectReasonCode::ProtocolError,
                "a SUBSCRIBE carried subscription identifier 0",
            ));
        }
        let outbox = self
            .sub
            .outbox
            .get_or_insert_with(|| self.ctx.broker.outbox(self.client_id.clone()))
            .clone();
        // A live message may reach the client before the SUBACK (MQTT 5 3.8.4 allows it).
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut retained = Vec::new();
        for f in &sub.filters {
            let refused = if f.path.starts_with("$share/") {
                Some((
                    SubscribeReasonCode::SharedSubscriptionsNotSupported,
                    "shared subscriptions are not supported yet".to_string(),
                ))
            } else if let Err(e) = topic::check_filter(&f.path) {
                Some((
                    SubscribeReasonCode::TopicFilterInvalid,
                    format!("topic filter {:?} {e}", f.path),
                ))
            } else {
                None
            };
            if let Some((code, why)) = refused {
                self.ctx.stats.rejected(reason::SUBSCRIBE, 1);
                tracing::info!(client_id = %self.client_id, "A subscription was refused: {why}.");
                codes.push(if v5 {
                    code
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            let o = SubOpts {
                qos: (f.qos as u8).min(2),
                no_local: v5 && f.nolocal,
                retain_as_published: v5 && f.preserve_retain,
                id,
            };
            let existed = self.ctx.broker.subscribe(self.conn, &outbox, &f.path, o);
            let send_retained = match f.retain_forward_rule {
                RetainForwardRule::OnEverySubscribe => true,
                RetainForwardRule::OnNewSubscribe => !existed,
                RetainForwardRule::Never => false,
            };
            if send_retained {
                for m in self.ctx.broker.retained_matching(&f.path) {
                    retained.push(Delivery {
                        qos: m.qos.min(o.qos),
                        retain: true,
                        ids: o.id.into_iter().collect(),
                        msg: m,
                    });
                }
            }
            codes.push(SubscribeReasonCode::Success(qos_of(o.qos)));
        }
        // In order with the acks (MQTT allows either), and the retained messages after it.
        let suback = Packet::SubAck(
            SubAck {
                pkid: sub.pkid,
                return_codes: codes,
            },
            None,
        );
        self.flush_batch();
        let done = Done::Subscribed(Box::new((suback, retained)));
        self.pending.push_back(Box::pin(std::future::ready(done)));
        Ok(())
    }

    pub(super) fn on_unsubscribe(&mut self, unsub: Unsubscribe) {
        let mut reasons = Vec::with_capacity(unsub.filters.len());
        for f in &unsub.filters {
            let had = self.ctx.broker.unsubscribe(self.conn, f);
            reasons.push(if had {
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            });
        }
        if !self.v5() {
            reasons.clear();
        }
        self.reply(vec![Packet::UnsubAck(
            UnsubAck {
                pkid: unsub.pkid,
                reasons,
            },
            None,
        )]);
    }

    /// Writes queued messages as PUBLISHes while the in-flight window and the output buffer
    /// allow.
    pub(super) fn drain_outbox(&mut self) {
        let Some(outbox) = self.sub.outbox.clone() else {
            return;
        };
        let now = std::time::Instant::now();
        let mut sent = 0;
        while self.out.len() < OUT_HIGH {
            let open = self.sub.sent.len() < self.sub.window;
            let Some(d) = outbox.pop(open) else { break };
            let left = d.msg.expiry_left(now);
            if left == Some(0) {
                self.ctx.broker.count_drop(drop_reason::EXPIRED, 1);
                continue;
            }
            let pkid = if d.qos > 0 { self.sub.pkid() } else { 0 };
            let props = if self.v5() {
                let mut p = d.msg.props.clone().unwrap_or_else(|| PublishProperties {
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    topic_alias: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                    subscription_identifiers: Vec::new(),
                    content_type: None,
                });
                p.message_expiry_interval = left;
                p.subscription_identifiers = d.ids;
                Some(p)
            } else {
                None
            };
            let start = self.out.len();
            let publish = Publish::new(
                Bytes::copy_from_slice(d.msg.topic.as_bytes()),
                d.msg.payload.clone(),
                d.retain,
            );
            if self
                .codec
                .write(Packet::Publish(publish, props), &mut self.out)
                .is_err()
            {
                self.out.truncate(start);
                continue;
            }
            if d.qos > 0 {
                set_qos(&mut self.out, start, d.qos, pkid);
            }
            if let Some(max) = self.sub.max_packet
                && self.out.len() - start > max as usize
            {
                self.out.truncate(start);
                self.ctx.broker.count_drop(drop_reason::TOO_LARGE, 1);
                continue;
            }
            if d.qos > 0 {
                let state = if d.qos == 1 { Sent::Ack } else { Sent::Rec };
                self.sub.sent.insert(pkid, state);
            }
            sent += 1;
        }
        if sent > 0 {
            self.ctx.broker.delivered(sent);
        }
    }

    /// The client's answer to a PUBLISH ferry sent.
    pub(super) fn on_client_ack(&mut self, p: &Packet) {
        match p {
            Packet::PubAck(a, _) if self.sub.sent.get(&a.pkid) == Some(&Sent::Ack) => {
                self.sub.sent.remove(&a.pkid);
            }
            Packet::PubRec(r, _) => {
                let known = self.sub.sent.get(&r.pkid) == Some(&Sent::Rec);
                // A v5 PUBREC with a failure code ends the exchange.
                if known
                    && !matches!(
                        r.reason,
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                    )
                {
                    self.sub.sent.remove(&r.pkid);
                    return;
                }
                if known {
                    self.sub.sent.insert(r.pkid, Sent::Comp);
                }
                let reason = if known || !self.v5() {
                    PubRelReason::Success
                } else {
                    PubRelReason::PacketIdentifierNotFound
                };
                self.queue(Packet::PubRel(
                    PubRel {
                        pkid: r.pkid,
                        reason,
                    },
                    None,
                ));
            }
            Packet::PubComp(c, _) if self.sub.sent.get(&c.pkid) == Some(&Sent::Comp) => {
                self.sub.sent.remove(&c.pkid);
            }
            _ => {}
        }
    }
}
