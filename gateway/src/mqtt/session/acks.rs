//! A publish from framing to its ack: publishes gathered into one append, the ordered ack
//! queue (acks leave in publish order), refusals of single publishes, and the v3.1.1 retry
//! while the buffer is full.

use super::*;

/// A finished entry of the ordered ack queue.
pub(super) enum Done {
    /// An append completed (or failed) for these publishes.
    Appended {
        acks: Vec<(u16, u8)>,
        /// For local subscribers, after the acks: the messages and their deliveries to
        /// persistent sessions ([`Broker::prepare`]).
        routed: Box<Routed>,
        by_qos: [u64; 3],
        started: Instant,
        result: Result<(), AppendError>,
    },
    /// Answers that must keep their place in the order (rejections, DUP re-sends).
    Reply(Vec<Packet>),
    /// A QoS 2 DUP re-send: PUBREC again if the original was stored.
    Dup(u16),
    /// A SUBACK, in order, then the retained messages for the new subscriptions.
    Subscribed(Box<(Packet, Vec<broker::Delivery>)>),
}

/// What a committed batch hands to the broker.
#[derive(Default)]
pub(super) struct Routed {
    msgs: Vec<Arc<Message>>,
    durable: Vec<(u64, Arc<str>, broker::Delivery)>,
}

#[derive(Default)]
pub(super) struct Batch {
    readings: Vec<Reading>,
    msgs: Vec<Arc<Message>>,
    durable: Vec<(u64, Arc<str>, broker::Delivery)>,
    state: Vec<ferry_buffer::StateWrite>,
    acks: Vec<(u16, u8)>,
    by_qos: [u64; 3],
    bytes: usize,
    started: Option<Instant>,
}

impl Session {
    /// Queues answers that must keep their place in the ack order.
    pub(super) fn reply(&mut self, packets: Vec<Packet>) {
        self.flush_batch();
        self.pending
            .push_back(Box::pin(std::future::ready(Done::Reply(packets))));
    }

    pub(super) fn reject_publish(
        &mut self,
        qos: u8,
        pkid: u16,
        why: &'static str,
        code_v5: PubAckReason,
        message: String,
    ) -> Result<(), Close> {
        if self.v5() && qos > 0 {
            self.ctx.stats.rejected(why, 1);
            match self
                .ctx
                .stats
                .fold_refusal(&format!("PUBLISH {} {why}: {message}", self.client_id))
            {
                Say::New => tracing::info!(client_id = %self.client_id, reason = why,
                    "A PUBLISH was refused: {message}."),
                Say::Again(n) => tracing::info!(client_id = %self.client_id, reason = why,
                    repeats = n, "PUBLISHes keep being refused: {message}."),
                Say::Quiet => {}
            }
            let p = ack(qos, pkid, code_v5, Some(message));
            self.reply(vec![p]);
            return Ok(());
        }
        let v5 = match why {
            reason::TOO_LARGE => DisconnectReasonCode::PacketTooLarge,
            _ => DisconnectReasonCode::TopicNameInvalid,
        };
        Err(Close::error(why, v5, message))
    }

    /// A publish `[[mqtt.acl]]` does not allow: MQTT 5 gets PUBACK/PUBREC 0x87; 3.1.1 (which
    /// has no negative ack) gets its ack and the publish is dropped; counted either way.
    fn refuse_by_acl(&mut self, qos: u8, pkid: u16, topic: &str) -> Result<(), Close> {
        self.ctx.stats.rejected(reason::ACL_PUBLISH, 1);
        let message = format!("[[mqtt.acl]] does not allow this client to publish to {topic:?}");
        match self
            .ctx
            .stats
            .fold_refusal(&format!("ACL {} {topic}", self.client_id))
        {
            Say::New => {
                tracing::info!(client_id = %self.client_id, "A PUBLISH was refused: {message}.")
            }
            Say::Again(n) => {
                tracing::info!(client_id = %self.client_id, repeats = n, "PUBLISHes keep being refused: {message}.")
            }
            Say::Quiet => {}
        }
        if qos > 0 {
            let p = if self.v5() {
                ack(qos, pkid, PubAckReason::NotAuthorized, Some(message))
            } else {
                ack(qos, pkid, PubAckReason::Success, None)
            };
            self.reply(vec![p]);
        }
        Ok(())
    }

    pub(super) async fn on_publish(
        &mut self,
        p: Publish,
        props: Option<PublishProperties>,
        qos: u8,
        dup: bool,
        pkid: u16,
    ) -> Result<(), Close> {
        let Some(topic) = topic::name_from_bytes(&p.topic) else {
            return self.reject_publish(
                qos,
                pkid,
                reason::TOPIC_INVALID,
                PubAckReason::TopicNameInvalid,
                format!(
                    "topic {:?} is not a valid topic name (empty, not UTF-8, or with a wildcard)",
                    String::from_utf8_lossy(&p.topic)
                ),
            );
        };
        if p.payload.len() > self.ctx.settings.max_payload_bytes {
            return self.reject_publish(
                qos,
                pkid,
                reason::TOO_LARGE,
                PubAckReason::QuotaExceeded,
                format!(
                    "a payload of {} bytes exceeds max_payload_bytes ({})",
                    p.payload.len(),
                    self.ctx.settings.max_payload_bytes
                ),
            );
        }
        if let Some(acl) = &self.acl
            && !acl.may_publish(topic)
        {
            return self.refuse_by_acl(qos, pkid, topic);
        }
        if qos == 2 && !self.qos2.insert(pkid) {
            // A re-send of a QoS 2 publish already stored (or being stored): do not store it
            // twice, answer PUBREC again in order.
            let _ = dup;
            self.flush_batch();
            self.pending
                .push_back(Box::pin(std::future::ready(Done::Dup(pkid))));
            return Ok(());
        }
        let device = device_id(
            self.cert_cn.as_deref(),
            self.ctx.settings.device_from_topic_level,
            topic,
            &self.client_id,
        )
        .to_owned();
        // A copy, so that no reading keeps the connection's read buffer alive (see the module
        // doc): the buffer is then reused in place instead of reallocated at every read.
        let payload = Bytes::copy_from_slice(&p.payload);
        // Routed to local subscribers after the commit; a retained one is also kept.
        let routed = p.retain || self.ctx.broker.has_subscriptions();
        let mut routed = routed.then(|| Message {
            topic: Arc::from(topic),
            topic_bytes: Bytes::copy_from_slice(topic.as_bytes()),
            payload: payload.clone(),
            qos,
            retain: p.retain,
            keep: false,
            props: None,
            expires: props
                .as_ref()
                .and_then(|pp| pp.message_expiry_interval)
                .map(|s| std::time::Instant::now() + Duration::from_secs(s as u64)),
            from: self.conn,
            n: 0,
        });
        let mut r = Reading::new(Source::Mqtt, device, topic, payload);
        if let Some(pp) = props {
            if let Some(m) = &mut routed {
                m.props = passed_through(
                    pp.content_type.clone(),
                    pp.user_properties.clone(),
                    Some(&pp),
                );
            }
            r.content_type = pp.content_type;
            r.properties = pp.user_properties;
        }
        let b = &mut self.batch;
        if let Some(m) = routed {
            let p = self.ctx.broker.prepare(m);
            b.msgs.push(p.msg);
            b.state.extend(p.writes);
            b.durable.extend(p.durable);
        }
        if qos == 2 && self.sub.persistent {
            // Committed with the reading: a re-send after a crash is still recognised.
            b.state
                .push(Broker::in_qos2_row(&self.client_id, pkid, true));
        }
        b.started.get_or_insert_with(Instant::now);
        b.bytes += r.payload.len() + r.topic.len();
        if b.readings.capacity() == 0 {
            // Most batches of a slow device hold one reading; a Vec's first growth would
            // reserve four (600 bytes), held until the commit.
            b.readings.reserve_exact(1);
        }
        b.readings.push(r);
        b.by_qos[qos.min(2) as usize] += 1;
        if qos > 0 {
            b.acks.push((pkid, qos));
            self.inflight += 1;
        }
        if b.readings.len() >= BATCH_READINGS || b.bytes >= BATCH_BYTES {
            self.flush_batch();
        }
        Ok(())
    }

    /// Hands the gathered publishes to the buffer as one append.
    pub(super) fn flush_batch(&mut self) {
        if self.batch.readings.is_empty() {
            return;
        }
        let b = std::mem::take(&mut self.batch);
        let started = b.started.unwrap_or_else(Instant::now);
        let seen = crate::status::DeviceBatch::of(&b.readings);
        // Submitted now, so the readings reach the buffer's writer whatever this loop does
        // next; the queue entry only waits for the answer. No task per append: with a
        // thousand slow connections, appends in flight are what the heap holds.
        let retry = (!self.v5() && self.ctx.reject_when_full)
            .then(|| (self.client_id.clone(), b.state.clone()));
        let submitted = self.ctx.buffer.submit_with_state(b.readings, b.state);
        let ctx = self.ctx.clone();
        self.pending.push_back(Box::pin(async move {
            let result = match (submitted.await, retry) {
                (Ok(_), _) => Ok(()),
                (
                    Err(AppendError::Full {
                        readings,
                        used,
                        max,
                        ..
                    }),
                    Some((client_id, state)),
                ) if ctx.settings.full_ack_wait_ms > 0 => {
                    // Rare: boxed, so the common entry stays small.
                    Box::pin(retry_full(&ctx, readings, state, (used, max), &client_id)).await
                }
                (Err(e), _) => Err(e),
            };
            if result.is_ok() {
                ctx.devices.record(&seen);
            }
            Done::Appended {
                acks: b.acks,
                routed: Box::new(Routed {
                    msgs: b.msgs,
                    durable: b.durable,
                }),
                by_qos: b.by_qos,
                started,
                result,
            }
        }));
    }

    /// Queues what a finished queue entry owes, in order.
    pub(super) fn on_done(&mut self, done: Done) -> Result<(), Close> {
        match done {
            Done::Reply(ps) => {
                for p in ps {
                    self.queue(p);
                }
            }
            Done::Subscribed(s) => {
                let (suback, retained) = *s;
                self.queue(suback);
                if let Some(outbox) = &self.sub.outbox {
                    for d in retained {
                        self.ctx.broker.push(outbox, d);
                    }
                }
            }
            Done::Dup(pkid) => {
                if self.qos2.contains(&pkid) {
                    self.queue(Packet::PubRec(
                        PubRec {
                            pkid,
                            reason: PubRecReason::Success,
                        },
                        None,
                    ));
                }
            }
            Done::Appended {
                acks,
                routed,
                by_qos,
                started,
                result,
            } => {
                self.inflight -= acks.len();
                match result {
                    Ok(()) => {
                        for (pkid, qos) in &acks {
                            self.queue(ack(*qos, *pkid, PubAckReason::Success, None));
                        }
                        self.ctx
                            .stats
                            .committed(by_qos, (!acks.is_empty()).then(|| started.elapsed()));
                        if !routed.msgs.is_empty() {
                            let Routed { msgs, durable } = *routed;
                            self.ctx.broker.route(&msgs, durable);
                        }
                    }
                    Err(e) => {
                        let n = e.readings().len() as u64;
                        for (pkid, qos) in &acks {
                            if *qos == 2 {
                                self.qos2.remove(pkid);
                            }
                        }
                        let (why, code) = match &e {
                            AppendError::Full { .. } | AppendError::TooLarge { .. } => {
                                (reason::BUFFER_FULL, PubAckReason::QuotaExceeded)
                            }
                            _ => (reason::STORAGE, PubAckReason::UnspecifiedError),
                        };
                        self.ctx.stats.rejected(why, n);
                        if !self.v5() {
                            // v3.1.1 has no negative ack: withhold it and close, so the
                            // device keeps the message and sends it again later.
                            return Err(Close::error(
                                why,
                                DisconnectReasonCode::UnspecifiedError,
                                format!("{n} readings were not stored and not acknowledged ({e})"),
                            ));
                        }
                        match self.ctx.stats.fold_refusal(&format!("NACK {e}")) {
                            Say::New => tracing::warn!(client_id = %self.client_id, error = %e,
                                readings = n, "Publishes were refused with a negative acknowledgement."),
                            Say::Again(k) => {
                                tracing::warn!(client_id = %self.client_id, error = %e,
                                readings = n, repeats = k,
                                "Publishes keep being refused with a negative acknowledgement.")
                            }
                            Say::Quiet => {}
                        }
                        let msg = e.to_string();
                        for (pkid, qos) in &acks {
                            self.queue(ack(*qos, *pkid, code, Some(msg.clone())));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A v3.1.1 client in reject mode found the buffer full (`used` of `max` bytes). MQTT 3.1.1
/// has no negative PUBACK, so the append is retried until `full_ack_wait_ms` has passed: the
/// ack is withheld rather than lost.
pub(super) async fn retry_full(
    ctx: &Ctx,
    mut readings: Vec<Reading>,
    state: Vec<ferry_buffer::StateWrite>,
    (used, max): (u64, u64),
    client_id: &str,
) -> Result<(), AppendError> {
    let wait = Duration::from_millis(ctx.settings.full_ack_wait_ms);
    let until = Instant::now() + wait;
    tracing::warn!(client_id = %client_id, used, max, wait_ms = wait.as_millis() as u64,
        "The buffer is full: the acknowledgement to this MQTT 3.1.1 client is withheld until space frees or full_ack_wait_ms passes.");
    loop {
        tokio::time::sleep(FULL_RETRY).await;
        match ctx.buffer.submit_with_state(readings, state.clone()).await {
            Err(AppendError::Full { readings: back, .. }) if Instant::now() < until => {
                readings = back
            }
            result => return result.map(|_| ()),
        }
    }
}

pub(super) fn pubrec_reason(r: PubAckReason) -> PubRecReason {
    match r {
        PubAckReason::Success => PubRecReason::Success,
        PubAckReason::TopicNameInvalid => PubRecReason::TopicNameInvalid,
        PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
        PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
        PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
        PubAckReason::ImplementationSpecificError => PubRecReason::ImplementationSpecificError,
        _ => PubRecReason::UnspecifiedError,
    }
}

/// PUBACK (QoS 1) or PUBREC (QoS 2).
pub(super) fn ack(qos: u8, pkid: u16, reason: PubAckReason, message: Option<String>) -> Packet {
    if qos == 1 {
        Packet::PubAck(
            PubAck { pkid, reason },
            message.map(|m| PubAckProperties {
                reason_string: Some(m),
                user_properties: vec![],
            }),
        )
    } else {
        Packet::PubRec(
            PubRec {
                pkid,
                reason: pubrec_reason(reason),
            },
            message.map(|m| PubRecProperties {
                reason_string: Some(m),
                user_properties: vec![],
            }),
        )
    }
}
