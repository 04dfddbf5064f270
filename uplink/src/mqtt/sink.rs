//! The MQTT uplink task: buffer segments in, PUBACKs in, buffer acks out.

use super::config::{ConnectSettings, TlsSetupError, tls_config};
use super::link::{Link, LinkEvent, Message, Refusal};
use super::message::{envelope, user_properties};
use super::routing::Rewriter;
use crate::backoff::Backoff;
use crate::status::UplinkStatus;
use ferry_buffer::{AckError, Buffer, ReadError, Reader, Reading, Segment};
use ferry_config::{MqttProtocol, MqttUplink};
use rumqttc::QoS;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The buffer consumer name of the MQTT uplink.
pub const CONSUMER: &str = "mqtt";

/// How long [`MqttSink::run`] waits for outstanding PUBACKs at shutdown, unless
/// [`MqttSink::shutdown_grace`] says otherwise.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// After this many failed connections in a row the state is `offline` rather than
/// `backing_off`.
const OFFLINE_AFTER_FAILURES: u32 = 3;

/// A connection that stayed up this long resets the backoff even if it confirmed nothing
/// (nothing to send). A connection that fails sooner without an ack keeps backing off, so a
/// broker that accepts and then drops every connection cannot cause a tight loop.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Why the MQTT uplink could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttSinkError {
    /// `uplink.mqtt.url` is not `mqtt://host[:port]` or `mqtts://host[:port]`.
    #[error("invalid uplink.mqtt.url: {0}")]
    Url(String),
    /// The TLS files could not be loaded.
    #[error("cannot set up TLS for the MQTT uplink: {0}")]
    Tls(#[from] TlsSetupError),
    /// The buffer has no `mqtt` consumer, or could not be read.
    #[error("cannot read the buffer for the MQTT uplink: {0}")]
    Read(#[from] ReadError),
}

/// Builds the upstream message for a reading.
struct Composer {
    rewriter: Rewriter,
    gateway_id: Arc<str>,
    envelope: bool,
    v5: bool,
}

fn valid_topic_name(t: &str) -> bool {
    !t.is_empty() && t.len() <= 65_535 && !t.contains(['+', '#', '\0'])
}

impl Composer {
    /// The message, or why the reading can never be published (dead-letter reason).
    fn compose(&self, r: &Reading, max_packet: Option<u32>) -> Result<Message, String> {
        let topic = self.rewriter.topic(&r.topic);
        if !valid_topic_name(&topic) {
            return Err(format!(
                "the upstream topic {topic:?} (from {:?}) is not a valid MQTT topic name",
                r.topic
            ));
        }
        let payload = if self.envelope {
            bytes::Bytes::from(envelope(&self.gateway_id, r))
        } else {
            r.payload.clone()
        };
        let (user_properties, content_type) = if self.v5 {
            (user_properties(&self.gateway_id, r), r.content_type.clone())
        } else {
            (Vec::new(), None)
        };
        if let Some(max) = max_packet {
            // Upper estimate: fixed header (5), topic (2 + n), packet id (2), properties
            // length (4), content type (3 + n), user properties (5 + k + v each), payload.
            let size = 5
                + 2
                + topic.len()
                + 2
                + 4
                + content_type.as_ref().map_or(0, |c| 3 + c.len())
                + user_properties
                    .iter()
                    .map(|(k, v)| 5 + k.len() + v.len())
                    .sum::<usize>()
                + payload.len();
            if size > max as usize {
                return Err(format!(
                    "the message ({size} bytes) is larger than the broker's maximum packet size ({max} bytes)"
                ));
            }
        }
        Ok(Message {
            topic,
            payload,
            user_properties,
            content_type,
        })
    }
}

/// One buffer segment being delivered.
#[derive(Debug)]
struct Seg {
    id: u64,
    readings: Vec<Reading>,
    /// Index of the next reading to publish.
    next: usize,
    /// Readings confirmed (PUBACK, written at QoS 0, or dead-lettered).
    confirmed: usize,
    /// Readings confirmed by the broker.
    delivered: u64,
    /// Indexes of readings to dead-letter, with the reason.
    dead: Vec<(usize, String)>,
}

impl Seg {
    fn fully_published(&self) -> bool {
        self.next >= self.readings.len()
    }
}

/// What [`Window::take_settled`] hands back: the buffer ack to make.
#[derive(Debug)]
struct Settled {
    ack_to: u64,
    delivered: u64,
    dead: Vec<(Reading, String)>,
}

/// The in-flight window of one connection: segments in order, readings handed to the client
/// (waiting for their packet id), and packet ids waiting for their PUBACK.
#[derive(Debug)]
struct Window {
    max: usize,
    qos: QoS,
    segs: VecDeque<Seg>,
    /// Handed to the client, in order, no packet id known yet.
    unsent: VecDeque<(u64, usize)>,
    /// Written with this packet id, waiting for the PUBACK.
    by_pkid: HashMap<u16, (u64, usize)>,
    /// The broker's maximum packet size (v5).
    max_packet: Option<u32>,
}

impl Window {
    fn new(max: usize, qos: QoS) -> Self {
        Window {
            max: max.max(1),
            qos,
            segs: VecDeque::new(),
            unsent: VecDeque::new(),
            by_pkid: HashMap::new(),
            max_packet: None,
        }
    }

    fn in_flight(&self) -> usize {
        self.unsent.len() + self.by_pkid.len()
    }

    /// Read another segment only when every held one is fully published and there is room,
    /// so memory stays at about one segment beyond the window.
    fn wants_segment(&self) -> bool {
        self.in_flight() < self.max && self.segs.iter().all(Seg::fully_published)
    }

    fn push(&mut self, seg: Segment) {
        self.segs.push_back(Seg {
            id: seg.id,
            readings: seg.readings,
            next: 0,
            confirmed: 0,
            delivered: 0,
            dead: Vec::new(),
        });
    }

    fn confirm(&mut self, seg: u64, idx: usize, dead: Option<String>) {
        if let Some(s) = self.segs.iter_mut().find(|s| s.id == seg) {
            s.confirmed += 1;
            match dead {
                Some(reason) => s.dead.push((idx, reason)),
                None => s.delivered += 1,
            }
        }
    }

    /// Publishes readings while the window has room.
    fn pump(&mut self, link: &Link, composer: &Composer) -> Result<(), String> {
        while self.in_flight() < self.max {
            let Some(s) = self.segs.iter_mut().find(|s| !s.fully_published()) else {
                break;
            };
            let (id, idx) = (s.id, s.next);
            s.next += 1;
            match composer.compose(&s.readings[idx], self.max_packet) {
                Ok(m) => {
                    link.publish(self.qos, m)?;
                    self.unsent.push_back((id, idx));
                }
                Err(reason) => self.confirm(id, idx, Some(reason)),
            }
        }
        Ok(())
    }

    /// The client wrote the oldest unsent publish with packet id `pkid`.
    fn on_sent(&mut self, pkid: u16) -> Result<(), String> {
        let Some((seg, idx)) = self.unsent.pop_front() else {
            return Err(format!(
                "the MQTT client reported a publish (packet id {pkid}) ferry did not hand it"
            ));
        };
        if self.qos == QoS::AtMostOnce || pkid == 0 {
            // QoS 0: written to the socket is all the confirmation there is.
            self.confirm(seg, idx, None);
        } else if self.by_pkid.insert(pkid, (seg, idx)).is_some() {
            return Err(format!(
                "the MQTT client reused packet id {pkid} before its PUBACK"
            ));
        }
        Ok(())
    }

    /// The broker acknowledged `pkid`. A retryable v5 refusal fails the connection.
    fn on_ack(&mut self, pkid: u16, refused: Option<Refusal>) -> Result<(), String> {
        let Some((seg, idx)) = self.by_pkid.remove(&pkid) else {
            // rumqttc rejects unsolicited PUBACKs itself; nothing of ours to settle.
            return Ok(());
        };
        match refused {
            None => self.confirm(seg, idx, None),
            Some(r) if r.permanent => self.confirm(seg, idx, Some(r.reason)),
            Some(r) => return Err(r.reason),
        }
        Ok(())
    }

    /// Removes the leading segments whose every reading is confirmed.
    fn take_settled(&mut self) -> Option<Settled> {
        let mut out: Option<Settled> = None;
        while self
            .segs
            .front()
            .is_some_and(|s| s.fully_published() && s.confirmed >= s.readings.len())
        {
            let Some(mut s) = self.segs.pop_front() else {
                break;
            };
            let o = out.get_or_insert(Settled {
                ack_to: s.id,
                delivered: 0,
                dead: Vec::new(),
            });
            o.ack_to = s.id;
            o.delivered += s.delivered;
            if !s.dead.is_empty() {
                s.dead.sort_by_key(|d| d.0);
                let mut readings: Vec<Option<Reading>> = s.readings.into_iter().map(Some).collect();
                for (i, why) in s.dead {
                    if let Some(r) = readings.get_mut(i).and_then(Option::take) {
                        o.dead.push((r, why));
                    }
                }
            }
        }
        out
    }
}

/// How one connection ended.
enum Exit {
    Shutdown,
    BufferClosed,
    Failed(String),
}

/// The MQTT uplink: forwards the buffer's `mqtt` consumer to an upstream broker and acks what
/// the broker confirmed. Build it with [`MqttSink::new`], keep [`MqttSink::status`], then spawn
/// [`MqttSink::run`].
pub struct MqttSink {
    settings: ConnectSettings,
    composer: Composer,
    qos: QoS,
    buffer: Buffer,
    status: UplinkStatus,
    grace: Duration,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink")
            .field("url", &self.settings.cfg.url)
            .field("client_id", &self.settings.client_id)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl MqttSink {
    /// Parses the URL, loads the TLS files (for `mqtts://`) and checks that the buffer has an
    /// `mqtt` consumer. The broker is contacted later, by [`MqttSink::run`]. `client_id` is
    /// [`ferry_config::Config::uplink_mqtt_client_id`].
    pub fn new(
        cfg: &MqttUplink,
        gateway_id: &str,
        client_id: &str,
        buffer: Buffer,
    ) -> Result<MqttSink, MqttSinkError> {
        drop(buffer.reader(CONSUMER)?);
        let endpoint = cfg.endpoint().map_err(MqttSinkError::Url)?;
        let tls = if endpoint.tls {
            Some(Arc::new(tls_config(cfg)?))
        } else {
            None
        };
        let secrets = cfg
            .password
            .iter()
            .map(|p| p.expose().to_string())
            .collect();
        Ok(MqttSink {
            settings: ConnectSettings {
                endpoint,
                client_id: client_id.to_string(),
                cfg: cfg.clone(),
                tls,
            },
            composer: Composer {
                rewriter: Rewriter::new(cfg),
                gateway_id: gateway_id.into(),
                envelope: cfg.envelope,
                v5: cfg.protocol == MqttProtocol::V5,
            },
            qos: if cfg.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            buffer,
            status: UplinkStatus::new(CONSUMER, secrets),
            grace: DEFAULT_SHUTDOWN_GRACE,
        })
    }

    /// How long [`MqttSink::run`] waits for outstanding PUBACKs once shutdown starts.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The status handle (clone it before calling [`MqttSink::run`]).
    pub fn status(&self) -> UplinkStatus {
        self.status.clone()
    }

    /// Forwards until `shutdown` resolves, then stops publishing, waits up to the grace period
    /// for outstanding PUBACKs, acks what was confirmed, disconnects and returns. Unconfirmed
    /// readings stay in the buffer. Returns early, with an error, only if the buffer cannot be
    /// read at all.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), MqttSinkError> {
        let MqttSink {
            settings,
            composer,
            qos,
            buffer,
            status,
            grace,
        } = self;
        let cfg = &settings.cfg;
        let mut reader = buffer.reader(CONSUMER)?;
        let mut backoff = Backoff::new(
            Duration::from_millis(cfg.initial_backoff_ms),
            Duration::from_millis(cfg.max_backoff_ms),
        );
        let mut failures = 0u32;
        let mut sent_upto = reader.acked();
        tokio::pin!(shutdown);
        tracing::info!(url = %cfg.url, client_id = %settings.client_id, protocol = ?cfg.protocol,
            "The MQTT uplink is starting.");

        loop {
            let mut link = Link::open(&settings);
            let mut win = Window::new(usize::from(cfg.max_inflight), qos);
            // Everything after the last ack is sent again on a new connection.
            reader.rewind();
            let mut session = Session {
                reader: &mut reader,
                status: &status,
                composer: &composer,
                sent_upto: &mut sent_upto,
                acked_any: false,
            };
            let started = Instant::now();
            let exit = session.run(&mut link, &mut win, &mut shutdown).await;
            let progressed = session.acked_any || started.elapsed() >= STABLE_AFTER;
            match exit {
                Exit::Shutdown => {
                    session.drain(&mut link, &mut win, grace).await;
                    status.set_in_flight(0);
                    tracing::info!("The MQTT uplink stopped.");
                    return Ok(());
                }
                Exit::BufferClosed => {
                    tracing::info!("The buffer closed; the MQTT uplink stops.");
                    link.disconnect();
                    status.set_in_flight(0);
                    return Ok(());
                }
                Exit::Failed(message) => {
                    drop(link);
                    status.set_in_flight(0);
                    if progressed {
                        backoff.reset();
                        failures = 0;
                    }
                    failures += 1;
                    let delay = backoff.next_delay();
                    status.record_retry(&message, delay, failures >= OFFLINE_AFTER_FAILURES);
                    tracing::warn!(
                        error = %status.scrub(&message),
                        retry_in_ms = delay.as_millis() as u64,
                        attempt = failures,
                        "The MQTT uplink lost its broker; unconfirmed readings stay in the buffer and will be sent again."
                    );
                    tokio::select! {
                        biased;
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// The per-connection loop.
struct Session<'a> {
    reader: &'a mut Reader,
    status: &'a UplinkStatus,
    composer: &'a Composer,
    sent_upto: &'a mut u64,
    acked_any: bool,
}

impl Session<'_> {
    async fn run(
        &mut self,
        link: &mut Link,
        win: &mut Window,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Exit {
        let mut connected = false;
        loop {
            let want = connected && win.wants_segment();
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return Exit::Shutdown,
                ev = link.events.recv() => {
                    let Some(ev) = ev else {
                        return Exit::Failed("the MQTT event loop stopped".into());
                    };
                    match ev {
                        LinkEvent::Connected { max_packet_size } => {
                            connected = true;
                            win.max_packet = max_packet_size;
                            self.status.set_state(crate::status::LinkState::Connected);
                            tracing::info!("The MQTT uplink is connected to its broker.");
                        }
                        LinkEvent::Sent(pkid) => {
                            if let Err(e) = win.on_sent(pkid) {
                                return Exit::Failed(e);
                            }
                        }
                        LinkEvent::Acked { pkid, refused } => {
                            if let Err(e) = win.on_ack(pkid, refused) {
                                return Exit::Failed(e);
                            }
                        }
                        LinkEvent::Failed(e) => return Exit::Failed(e),
                    }
                }
                segs = self.reader.next(1), if want => match segs {
                    Ok(segs) => {
                        let mut resent = 0;
                        for seg in segs {
                            if seg.id <= *self.sent_upto {
                                resent += seg.readings.len() as u64;
                            }
                            *self.sent_upto = (*self.sent_upto).max(seg.id);
                            win.push(seg);
                        }
                        self.status.record_resent(resent);
                    }
                    Err(ReadError::Closed) => return Exit::BufferClosed,
                    Err(e) => return Exit::Failed(format!("cannot read the buffer: {e}")),
                },
            }
            if connected && let Err(e) = win.pump(link, self.composer) {
                return Exit::Failed(e);
            }
            if let Some(exit) = self.settle(win).await {
                return exit;
            }
            self.status.set_in_flight(win.in_flight() as u64);
        }
    }

    /// Dead-letters and acks the confirmed prefix of the window.
    async fn settle(&mut self, win: &mut Window) -> Option<Exit> {
        let s = win.take_settled()?;
        let dead_n = s.dead.len() as u64;
        let reason = s.dead.first().map(|d| d.1.clone());
        if !s.dead.is_empty() {
            for (r, why) in &s.dead {
                tracing::warn!(reading = r.id, device = %r.device, topic = %r.topic, reason = %why,
                    "The MQTT broker cannot take a reading; it moves to the dead-letter table.");
            }
            if let Err(e) = self.reader.dead_letter(s.dead).await {
                return Some(ack_exit(e));
            }
        }
        if let Err(e) = self.reader.ack(s.ack_to).await {
            return Some(ack_exit(e));
        }
        if let Some(reason) = reason {
            self.status.record_dead_lettered(dead_n, &reason);
        }
        self.status.record_acked(s.delivered);
        self.acked_any = true;
        None
    }

    /// Shutdown: publish nothing new, settle what the broker confirms within `grace`, then
    /// disconnect.
    async fn drain(&mut self, link: &mut Link, win: &mut Window, grace: Duration) {
        let deadline = Instant::now() + grace;
        while win.in_flight() > 0 {
            let ev = match tokio::time::timeout_at(deadline, link.events.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => break,
            };
            let ok = match ev {
                LinkEvent::Sent(pkid) => win.on_sent(pkid).is_ok(),
                LinkEvent::Acked { pkid, refused } => win.on_ack(pkid, refused).is_ok(),
                LinkEvent::Connected { .. } => true,
                LinkEvent::Failed(_) => false,
            };
            if !ok || self.settle(win).await.is_some() {
                break;
            }
        }
        if win.in_flight() > 0 {
            tracing::warn!(
                readings = win.in_flight(),
                "Shutdown grace ran out; unconfirmed MQTT publishes stay in the buffer."
            );
        }
        link.disconnect();
        let rest = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        let _ = tokio::time::timeout(rest, link.closed()).await;
    }
}

fn ack_exit(e: AckError) -> Exit {
    match e {
        AckError::Closed => Exit::BufferClosed,
        e => Exit::Failed(format!("cannot record the ack in the buffer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_buffer::Source;

    fn seg(id: u64, n: usize) -> Segment {
        Segment {
            id,
            readings: (0..n)
                .map(|i| {
                    let mut r = Reading::new(Source::Mqtt, "d", "t", vec![i as u8]);
                    r.id = id * 100 + i as u64;
                    r
                })
                .collect(),
            stored: Vec::new(),
        }
    }

    /// Publishes without a link: what `pump` does, minus the client.
    fn fake_pump(w: &mut Window) -> usize {
        let mut n = 0;
        while w.in_flight() < w.max {
            let Some(s) = w.segs.iter_mut().find(|s| !s.fully_published()) else {
                break;
            };
            let (id, idx) = (s.id, s.next);
            s.next += 1;
            w.unsent.push_back((id, idx));
            n += 1;
        }
        n
    }

    #[test]
    fn acks_in_segment_order_only_when_every_reading_is_confirmed() {
        let mut w = Window::new(3, QoS::AtLeastOnce);
        w.push(seg(1, 2));
        w.push(seg(2, 2));
        assert!(!w.wants_segment());
        assert_eq!(fake_pump(&mut w), 3, "window of 3");
        for pkid in [1, 2, 3] {
            w.on_sent(pkid).unwrap();
        }
        // Out-of-order PUBACKs: segment 2's first reading, then segment 1's second.
        w.on_ack(3, None).unwrap();
        w.on_ack(2, None).unwrap();
        assert!(w.take_settled().is_none(), "segment 1 still misses pkid 1");
        w.on_ack(1, None).unwrap();
        let s = w.take_settled().unwrap();
        assert_eq!((s.ack_to, s.delivered), (1, 2));
        assert!(
            w.take_settled().is_none(),
            "segment 2 is not fully published"
        );
        assert_eq!(fake_pump(&mut w), 1);
        w.on_sent(1).unwrap();
        assert!(w.wants_segment());
        w.on_ack(1, None).unwrap();
        let s = w.take_settled().unwrap();
        assert_eq!((s.ack_to, s.delivered), (2, 2));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn permanent_refusals_are_dead_lettered_and_retryable_ones_fail() {
        let mut w = Window::new(10, QoS::AtLeastOnce);
        w.push(seg(5, 3));
        fake_pump(&mut w);
        for pkid in [1, 2, 3] {
            w.on_sent(pkid).unwrap();
        }
        w.on_ack(1, None).unwrap();
        w.on_ack(
            2,
            Some(Refusal {
                reason: "not authorized".into(),
                permanent: true,
            }),
        )
        .unwrap();
        let e = w
            .on_ack(
                3,
                Some(Refusal {
                    reason: "quota".into(),
                    permanent: false,
                }),
            )
            .unwrap_err();
        assert_eq!(e, "quota");
        assert!(w.take_settled().is_none());
        // A new window after the reconnect: everything is sent again; now all succeed.
        let mut w = Window::new(10, QoS::AtLeastOnce);
        w.push(seg(5, 3));
        fake_pump(&mut w);
        for pkid in [1, 2, 3] {
            w.on_sent(pkid).unwrap();
        }
        w.on_ack(
            2,
            Some(Refusal {
                reason: "acl".into(),
                permanent: true,
            }),
        )
        .unwrap();
        w.on_ack(1, None).unwrap();
        w.on_ack(3, None).unwrap();
        let s = w.take_settled().unwrap();
        assert_eq!((s.ack_to, s.delivered, s.dead.len()), (5, 2, 1));
        assert_eq!(s.dead[0].0.id, 501);
        assert_eq!(s.dead[0].1, "acl");
    }

    #[test]
    fn qos0_confirms_on_write_and_packet_id_reuse_is_an_error() {
        let mut w = Window::new(4, QoS::AtMostOnce);
        w.push(seg(1, 2));
        fake_pump(&mut w);
        w.on_sent(0).unwrap();
        w.on_sent(0).unwrap();
        assert_eq!(w.take_settled().unwrap().delivered, 2);
        assert!(w.on_sent(0).is_err(), "nothing handed to the client");

        let mut w = Window::new(4, QoS::AtLeastOnce);
        w.push(seg(1, 2));
        fake_pump(&mut w);
        w.on_sent(7).unwrap();
        assert!(w.on_sent(7).is_err());
    }

    #[test]
    fn composer_checks_topics_and_the_packet_limit() {
        let c = Composer {
            rewriter: Rewriter::new(&MqttUplink {
                rewrites: vec![ferry_config::TopicRewrite {
                    filter: "bad/+".into(),
                    template: "x/{1}/#".into(),
                }],
                ..MqttUplink::default()
            }),
            gateway_id: "gw".into(),
            envelope: false,
            v5: true,
        };
        let r = Reading::new(Source::Mqtt, "d", "bad/a", vec![0u8; 100]);
        assert!(
            c.compose(&r, None)
                .unwrap_err()
                .contains("not a valid MQTT topic")
        );
        let r = Reading::new(Source::Mqtt, "d", "ok/a", vec![0u8; 100]);
        let m = c.compose(&r, None).unwrap();
        assert_eq!(m.topic, "ok/a");
        assert!(
            m.user_properties
                .iter()
                .any(|(k, v)| k == "ferry-id" && v == "gw-0")
        );
        assert!(
            c.compose(&r, Some(120))
                .unwrap_err()
                .contains("maximum packet size")
        );
        assert!(c.compose(&r, Some(1000)).is_ok());
    }
}
