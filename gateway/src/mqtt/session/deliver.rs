//! The connection as a subscriber: SUBSCRIBE and UNSUBSCRIBE, draining its queue
//! ([`crate::mqtt::broker::Outbox`]) into PUBLISHes within its in-flight window, and the
//! client's PUBACK / PUBREC / PUBCOMP for them. What reaches a queue, and when, is written in
//! [`crate::mqtt::broker`].

use super::*;
use crate::mqtt::broker::{Delivery, Leftover, SessionStart, SubOpts, drop_reason};
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

/// A PUBLISH ferry sent and the client has not finished acknowledging.
#[derive(Debug)]
pub(super) struct Outgoing {
    state: Sent,
    /// Kept until PUBACK / PUBREC, to be sent again to a persistent session's next connection.
    d: Option<Delivery>,
    order: u64,
}

/// The subscriber half of a session.
#[derive(Debug)]
pub(super) struct Subscriber {
    /// Subscriber id in the broker ([`Broker::start_session`]).
    pub(super) sid: u64,
    /// Whether the session outlives the connection.
    pub(super) persistent: bool,
    /// A persistent session's from the start; a clean one's created at the first SUBSCRIBE.
    pub(super) outbox: Option<Arc<Outbox>>,
    /// PUBLISHes sent and not yet acknowledged, by packet id.
    pub(super) sent: HashMap<u16, Outgoing>,
    sent_count: u64,
    next_pkid: u16,
    /// The client's Receive Maximum (MQTT 5), else `mqtt.max_inflight`.
    pub(super) window: usize,
    /// The client's Maximum Packet Size (MQTT 5).
    pub(super) max_packet: Option<u32>,
    /// Topic aliases given to the client (MQTT 5), at most its Topic Alias Maximum; for this
    /// connection only (MQTT 5 3.3.2-7).
    aliases: HashMap<Arc<str>, u16>,
    alias_max: u16,
}

impl Subscriber {
    /// `limits`: the client's Receive Maximum (or ferry's window), Maximum Packet Size and
    /// Topic Alias Maximum.
    pub(super) fn new(
        start: &SessionStart,
        (window, max_packet, alias_max): (usize, Option<u32>, u16),
    ) -> Subscriber {
        Subscriber {
            sid: start.sid,
            persistent: start.persistent,
            outbox: start.outbox.clone(),
            sent: HashMap::new(),
            sent_count: 0,
            next_pkid: 0,
            window: window.max(1),
            max_packet,
            aliases: HashMap::new(),
            alias_max,
        }
    }

    /// What the connection leaves to its session: unacknowledged messages in the order sent,
    /// and QoS 2 exchanges waiting for PUBCOMP.
    pub(super) fn leftover(&mut self, in_qos2: HashSet<u16>) -> Leftover {
        let mut unacked = Vec::new();
        let mut rel = Vec::new();
        for (pkid, o) in self.sent.drain() {
            match (o.state, o.d) {
                (Sent::Comp, _) => rel.push(pkid),
                (_, Some(mut d)) => {
                    d.pkid = Some(pkid);
                    unacked.push((o.order, d));
                }
                (_, None) => {}
            }
        }
        unacked.sort_by_key(|(order, _)| *order);
        Leftover {
            unacked: unacked.into_iter().map(|(_, d)| d).collect(),
            rel,
            in_qos2,
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
        topic_bytes: Bytes::copy_from_slice(r.topic.as_bytes()),
        payload: r.payload.clone(),
        qos,
        retain,
        keep: false,
        props: passed_through(r.content_type.clone(), r.properties.clone(), None),
        expires: None,
        from: conn,
        n: 0,
    }
}

/// The MQTT 5 properties a local subscriber gets from a publish: content type, user
/// properties, and those of `p` (payload format, response topic, correlation data).
pub(super) fn passed_through(
    content_type: Option<String>,
    user_properties: Vec<(String, String)>,
    p: Option<&PublishProperties>,
) -> Option<PublishProperties> {
    broker::passed_on(
        p.and_then(|p| p.payload_format_indicator),
        content_type,
        p.and_then(|p| p.response_topic.clone()),
        p.and_then(|p| p.correlation_data.clone()),
        user_properties,
    )
}

/// Whether `filter` can be subscribed to: a valid topic filter, or `$share/<group>/<filter>`
/// with a group name without wildcards.
pub(super) fn check_subscription(filter: &str) -> Result<(), String> {
    let (group, real) = match broker::shared(filter) {
        Some((g, f)) => (Some(g), f),
        None if filter.starts_with("$share/") => {
            return Err(format!(
                "shared subscription {filter:?} has no topic filter"
            ));
        }
        None => (None, filter),
    };
    if let Some(g) = group
        && (g.is_empty() || g.contains(['+', '#']))
    {
        return Err(format!(
            "shared subscription {filter:?}: the group name must be non-empty, without wildcards"
        ));
    }
    topic::check_filter(real)
        .map(|_| ())
        .map_err(|e| format!("topic filter {real:?} {e}"))
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
        let mut rows = Vec::new();
        // A live message may reach the client before the SUBACK (MQTT 5 3.8.4 allows it).
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut retained = Vec::new();
        for f in &sub.filters {
            let group = broker::shared(&f.path);
            if group.is_some() && v5 && f.nolocal {
                return Err(Close::error(
                    reason::PROTOCOL,
                    DisconnectReasonCode::ProtocolError,
                    format!("No Local on the shared subscription {:?}", f.path),
                ));
            }
            let refused = match check_subscription(&f.path) {
                Err(why) => Some((
                    reason::SUBSCRIBE,
                    SubscribeReasonCode::TopicFilterInvalid,
                    why,
                )),
                Ok(()) => {
                    let real = group.map_or(f.path.as_str(), |(_, real)| real);
                    self.acl
                        .as_ref()
                        .filter(|a| !a.may_subscribe(real))
                        .map(|_| {
                            (
                                reason::ACL_SUBSCRIBE,
                                SubscribeReasonCode::NotAuthorized,
                                format!(
                                    "[[mqtt.acl]] does not allow this client to subscribe to {:?}",
                                    f.path
                                ),
                            )
                        })
                }
            };
            if let Some((counter, code, why)) = refused {
                self.ctx.stats.rejected(counter, 1);
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
            let (existed, row) = self.ctx.broker.subscribe(
                &self.client_id,
                self.sub.sid,
                self.conn,
                &outbox,
                &f.path,
                o,
            );
            rows.extend(row);
            // Not for a shared subscription (MQTT 5 4.8.2).
            let send_retained = group.is_none()
                && match f.retain_forward_rule {
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
                        seq: None,
                        pkid: None,
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
        if rows.is_empty() {
            self.pending.push_back(Box::pin(std::future::ready(done)));
        } else {
            // A persistent session's subscriptions are on disk before its SUBACK.
            let committed = self.ctx.buffer.submit_with_state(Vec::new(), rows);
            let client_id = self.client_id.clone();
            self.pending.push_back(Box::pin(async move {
                if let Err(e) = committed.await {
                    tracing::warn!(client_id = %client_id, error = %e, "A persistent session's subscription could not be stored; it holds until ferry restarts.");
                }
                done
            }));
        }
        Ok(())
    }

    pub(super) fn on_unsubscribe(&mut self, unsub: Unsubscribe) {
        let mut reasons = Vec::with_capacity(unsub.filters.len());
        let mut rows = Vec::new();
        for f in &unsub.filters {
            let (had, row) = self
                .ctx
                .broker
                .unsubscribe(&self.client_id, self.sub.sid, f);
            rows.extend(row);
            reasons.push(if had {
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            });
        }
        if !rows.is_empty() {
            // Sent now, in order before anything later; the UNSUBACK need not wait for it.
            drop(self.ctx.buffer.submit_with_state(Vec::new(), rows));
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
                self.delivered_durably(Some(d));
                continue;
            }
            let (pkid, dup) = match (d.qos, d.pkid) {
                (0, _) => (0, false),
                // Sent before to this persistent session: again with its packet id and DUP.
                (_, Some(p)) => (p, true),
                _ => (self.sub.pkid(), false),
            };
            let props = if self.v5() {
                let mut p = d.msg.props.clone().unwrap_or_else(broker::no_props);
                p.message_expiry_interval = left;
                p.subscription_identifiers = d.ids.clone();
                Some(p)
            } else {
                None
            };
            let start = self.out.len();
            let mut new_alias = None;
            let mut props = props;
            if !self.v5() {
                // 3.1.1 has no properties: written here, with its QoS and packet id at once.
                publish_v4(
                    &mut self.out,
                    &d.msg.topic_bytes,
                    &d.msg.payload,
                    (d.qos, pkid, dup, d.retain),
                );
            } else {
                // A topic alias for a topic sent before (the topic then goes empty), or a new
                // one while the client takes more; kept once the packet is.
                let mut topic = d.msg.topic_bytes.clone();
                if let Some(p) = props.as_mut() {
                    match self.sub.aliases.get(&d.msg.topic) {
                        Some(a) => {
                            p.topic_alias = Some(*a);
                            topic = Bytes::new();
                        }
                        None if self.sub.aliases.len() < self.sub.alias_max as usize => {
                            let a = self.sub.aliases.len() as u16 + 1;
                            p.topic_alias = Some(a);
                            new_alias = Some(a);
                        }
                        None => {}
                    }
                }
                let publish = Publish::new(topic, d.msg.payload.clone(), d.retain);
                if self
                    .codec
                    .write(Packet::Publish(publish, props), &mut self.out)
                    .is_err()
                {
                    self.out.truncate(start);
                    continue;
                }
                if d.qos > 0 {
                    set_qos(&mut self.out, start, d.qos, pkid, dup);
                }
            }
            if let Some(max) = self.sub.max_packet
                && self.out.len() - start > max as usize
            {
                self.out.truncate(start);
                self.ctx.broker.count_drop(drop_reason::TOO_LARGE, 1);
                self.delivered_durably(Some(d));
                continue;
            }
            if let Some(a) = new_alias {
                self.sub.aliases.insert(d.msg.topic.clone(), a);
            }
            if d.qos > 0 {
                let state = if d.qos == 1 { Sent::Ack } else { Sent::Rec };
                self.sub.sent_count += 1;
                let order = self.sub.sent_count;
                let d = (d.seq.is_some() || self.sub.persistent).then_some(d);
                self.sub.sent.insert(pkid, Outgoing { state, d, order });
            }
            sent += 1;
        }
        if sent > 0 {
            self.ctx.broker.delivered(sent);
        }
    }

    /// The client's answer to a PUBLISH ferry sent.
    pub(super) fn on_client_ack(&mut self, p: &Packet) {
        let state = |s: &Subscriber, pkid: u16| s.sent.get(&pkid).map(|o| o.state);
        match p {
            Packet::PubAck(a, _) if state(&self.sub, a.pkid) == Some(Sent::Ack) => {
                if let Some(o) = self.sub.sent.remove(&a.pkid) {
                    self.delivered_durably(o.d);
                }
            }
            Packet::PubRec(r, _) => {
                let known = state(&self.sub, r.pkid) == Some(Sent::Rec);
                let failed = !matches!(
                    r.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                );
                if known {
                    // The client has the message (or, with a failure code, refused it): its
                    // row goes; a failure code ends the exchange.
                    let o = self.sub.sent.remove(&r.pkid);
                    if !failed && let Some(mut o) = o {
                        let d = o.d.take();
                        o.state = Sent::Comp;
                        self.sub.sent.insert(r.pkid, o);
                        if self.sub.persistent {
                            // The message's row becomes the PUBREL owed, in one write.
                            let seq = d.and_then(|d| d.seq);
                            self.ctx.broker.released(&self.client_id, seq, r.pkid);
                        }
                    } else if let Some(o) = o {
                        self.delivered_durably(o.d);
                    }
                    if failed {
                        return;
                    }
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
            Packet::PubComp(c, _) if state(&self.sub, c.pkid) == Some(Sent::Comp) => {
                self.sub.sent.remove(&c.pkid);
                if self.sub.persistent {
                    self.ctx.broker.completed(&self.client_id, c.pkid);
                }
            }
            _ => {}
        }
    }

    /// A message leaves a persistent session's queue for good (acknowledged, expired, too
    /// large): its row goes.
    fn delivered_durably(&self, d: Option<Delivery>) {
        if let Some(seq) = d.and_then(|d| d.seq) {
            self.ctx.broker.acked(&self.client_id, seq);
        }
    }

    /// PUBRELs owed from a persistent session's last connection, sent again first.
    pub(super) fn resend_rel(&mut self, rel: Vec<u16>) {
        for pkid in rel {
            self.sub.sent_count += 1;
            let order = self.sub.sent_count;
            self.sub.sent.insert(
                pkid,
                Outgoing {
                    state: Sent::Comp,
                    d: None,
                    order,
                },
            );
            self.queue(Packet::PubRel(
                PubRel {
                    pkid,
                    reason: PubRelReason::Success,
                },
                None,
            ));
        }
    }
}
