//! The MQTT uplink task: buffer segments in (through the shared buffer task), PUBACKs in,
//! buffer acks out (committed by the buffer task, never on this loop).

use super::config::{ConnectSettings, TlsSetupError, tls_config};
use super::link::{COMMAND_WINDOW, Incoming, Link, LinkEvent, Message, Refusal};
use super::routing::Rewriter;
use crate::Common;
use crate::downlink::{self, Downlink, HandOverError, HandedOver, Refusal as Refused, Route};
use crate::feed::{self, Acked, Feed};
use crate::meta::{envelope, user_properties};
use crate::retry::Retry;
use crate::settle::{Outcome, SegTrack, Settled};
use crate::status::{LinkState, UplinkStatus};
use crate::topics::{Selection, TopicFilter};
use ferry_buffer::{ReadError, Reading, Segment};
use ferry_config::{MqttProtocol, MqttUplink};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttc::QoS;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The type name of the MQTT uplink.
pub const KIND: &str = "mqtt";

/// Segment batches the buffer task reads ahead of the window.
const READ_AHEAD: usize = 2;

/// Why the MQTT uplink could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttSinkError {
    /// `url` is not `mqtt://host[:port]` or `mqtts://host[:port]`.
    #[error("invalid url: {0}")]
    Url(String),
    /// The TLS files could not be loaded.
    #[error("cannot set up TLS for the MQTT uplink: {0}")]
    Tls(#[from] TlsSetupError),
    /// The buffer has no consumer of the uplink's name, or could not be read.
    #[error("cannot read the buffer for the MQTT uplink: {0}")]
    Read(#[from] ReadError),
    /// It has a `downlink` and there is no local broker.
    #[error(transparent)]
    NoLocal(#[from] crate::NoLocal),
}

/// A command being handed over, resolving to it and the outcome.
type Handing = Pin<Box<dyn Future<Output = (Incoming, Result<HandedOver, HandOverError>)> + Send>>;

/// Builds the upstream message for a reading.
struct Composer {
    rewriter: Rewriter,
    gateway_id: Arc<str>,
    envelope: bool,
    v5: bool,
}

impl Composer {
    /// The message, or why the reading can never be published (dead-letter reason).
    fn compose(&self, r: &Reading, max_packet: Option<u32>) -> Result<Message, String> {
        let topic = self.rewriter.topic(&r.topic);
        if let Err(why) = ferry_config::topic::check_name(&topic) {
            return Err(format!(
                "the upstream topic {topic:?} (from {:?}) is not a valid MQTT topic name: {why}",
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
    seg: Segment,
    /// The readings this uplink takes.
    sel: Selection,
    /// Index of the next record to publish.
    next: usize,
    track: SegTrack,
}

impl Seg {
    fn fully_published(&self) -> bool {
        self.next >= self.track.len
    }
}

/// The in-flight window of one connection: segments in order, records handed to the client
/// (waiting for their packet id), and packet ids waiting for their PUBACK.
#[derive(Debug)]
struct Window {
    max: usize,
    qos: QoS,
    topics: TopicFilter,
    segs: VecDeque<Seg>,
    /// Handed to the client, in order, no packet id known yet: (segment id, record).
    unsent: VecDeque<(u64, usize)>,
    /// Written with this packet id, waiting for the PUBACK.
    by_pkid: HashMap<u16, (u64, usize)>,
    /// The broker's maximum packet size (v5).
    max_packet: Option<u32>,
}

impl Window {
    fn new(max: usize, qos: QoS, topics: TopicFilter) -> Self {
        Window {
            max: max.max(1),
            qos,
            topics,
            segs: VecDeque::new(),
            unsent: VecDeque::new(),
            by_pkid: HashMap::new(),
            max_packet: None,
        }
    }

    fn in_flight(&self) -> usize {
        self.unsent.len() + self.by_pkid.len()
    }

    /// Take more segments only when every held one is fully published and there is room, so
    /// memory stays at about one read beyond the window.
    fn wants_segment(&self) -> bool {
        self.in_flight() < self.max && self.segs.iter().all(Seg::fully_published)
    }

    fn push(&mut self, seg: Segment) {
        let sel = self.topics.select(&seg);
        let track = SegTrack::new(sel.records(seg.readings.len()));
        self.segs.push_back(Seg {
            seg,
            sel,
            next: 0,
            track,
        });
    }

    fn confirm(&mut self, seg: u64, record: usize, outcome: Outcome) {
        if let Some(s) = self.segs.iter_mut().find(|s| s.seg.id == seg) {
            s.track.record(record, outcome);
        }
    }

    /// Publishes records while the window has room.
    fn pump(&mut self, link: &Link, composer: &Composer) -> Result<(), String> {
        while self.in_flight() < self.max {
            let Some(s) = self.segs.iter_mut().find(|s| !s.fully_published()) else {
                break;
            };
            let (id, record) = (s.seg.id, s.next);
            s.next += 1;
            let reading = &s.seg.readings[s.sel.reading(record)];
            match composer.compose(reading, self.max_packet) {
                Ok(m) => {
                    link.publish(self.qos, m)?;
                    self.unsent.push_back((id, record));
                }
                Err(reason) => self.confirm(id, record, Outcome::Refused(reason)),
            }
        }
        Ok(())
    }

    /// The client wrote the oldest unsent publish with packet id `pkid`.
    fn on_sent(&mut self, pkid: u16) -> Result<(), String> {
        let Some((seg, record)) = self.unsent.pop_front() else {
            return Err(format!(
                "the MQTT client reported a publish (packet id {pkid}) ferry did not hand it"
            ));
        };
        if self.qos == QoS::AtMostOnce || pkid == 0 {
            // QoS 0: written to the socket is all the confirmation there is.
            self.confirm(seg, record, Outcome::Delivered);
        } else if self.by_pkid.insert(pkid, (seg, record)).is_some() {
            return Err(format!(
                "the MQTT client reused packet id {pkid} before its PUBACK"
            ));
        }
        Ok(())
    }

    /// The broker acknowledged `pkid`. A retryable v5 refusal fails the connection.
    fn on_ack(&mut self, pkid: u16, refused: Option<Refusal>) -> Result<(), String> {
        let Some((seg, record)) = self.by_pkid.remove(&pkid) else {
            // rumqttc rejects unsolicited PUBACKs itself; nothing of ours to settle.
            return Ok(());
        };
        match refused {
            None => self.confirm(seg, record, Outcome::Delivered),
            Some(r) if r.permanent => self.confirm(seg, record, Outcome::Refused(r.reason)),
            Some(r) => return Err(r.reason),
        }
        Ok(())
    }

    /// Removes the leading segments whose every record is confirmed.
    fn take_settled(&mut self) -> Option<Settled> {
        let mut out: Option<Settled> = None;
        while self
            .segs
            .front()
            .is_some_and(|s| s.fully_published() && s.track.settled())
        {
            let Some(s) = self.segs.pop_front() else {
                break;
            };
            out.get_or_insert_with(Settled::default)
                .add(s.seg, &s.sel, s.track);
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

/// The MQTT uplink: forwards its buffer consumer to an upstream broker and acks what the
/// broker confirmed. Build it with [`MqttSink::new`], keep [`MqttSink::status`], then spawn
/// [`MqttSink::run`].
pub struct MqttSink {
    settings: ConnectSettings,
    composer: Composer,
    qos: QoS,
    common: Common,
    status: UplinkStatus,
    downlink: Option<Downlink>,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink")
            .field("name", &self.common.name)
            .field("url", &self.settings.cfg.url)
            .field("client_id", &self.settings.client_id)
            .field("grace", &self.common.grace)
            .finish_non_exhaustive()
    }
}

impl MqttSink {
    /// Parses the URL, loads the TLS files (for `mqtts://`) and checks that the buffer has the
    /// uplink's consumer. The broker is contacted later, by [`MqttSink::run`]. `client_id` is
    /// [`ferry_config::Config::mqtt_client_id`].
    pub fn new(
        cfg: &MqttUplink,
        client_id: &str,
        common: Common,
    ) -> Result<MqttSink, MqttSinkError> {
        drop(common.reader()?);
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
        let status = common.status(KIND, secrets);
        let downlink = common.downlink(!cfg.downlink.is_empty(), &status)?;
        Ok(MqttSink {
            settings: ConnectSettings {
                endpoint,
                client_id: client_id.to_string(),
                cfg: cfg.clone(),
                tls,
                routes: Route::of(&cfg.downlink),
            },
            composer: Composer {
                rewriter: Rewriter::new(cfg),
                gateway_id: common.gateway_id.clone(),
                envelope: cfg.envelope,
                v5: cfg.protocol == MqttProtocol::V5,
            },
            qos: if cfg.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            status,
            common,
            downlink,
        })
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
            common,
            status,
            downlink,
        } = self;
        let cfg = &settings.cfg;
        let reader = common.reader()?;
        let mut retry = Retry::new(cfg.initial_backoff_ms, cfg.max_backoff_ms);
        let max_bytes = feed::max_in_flight_bytes(&common.buffer);
        let sent_upto = reader.acked();
        let Feed {
            mut segs,
            cmds,
            mut acks,
            task,
        } = feed::spawn(
            reader,
            &common.buffer,
            (u64::from(cfg.max_inflight).max(1), max_bytes),
            READ_AHEAD,
            status.clone(),
        );
        let mut run = Run {
            status: &status,
            composer: &composer,
            retry: &mut retry,
            acks: feed::Acks::new(cmds),
            sent_upto,
            downlink: downlink.as_ref(),
            routes: &settings.routes,
        };
        tokio::pin!(shutdown);
        tracing::info!(uplink = %common.name, url = %cfg.url, client_id = %settings.client_id,
            protocol = ?cfg.protocol, "The MQTT uplink is starting.");

        loop {
            let mut link = Link::open(&settings);
            let mut win = Window::new(usize::from(cfg.max_inflight), qos, common.topics.clone());
            let started = Instant::now();
            // Commands being handed over, acked upstream in the order they came; dropped with
            // a failed link (the broker sends them again).
            let mut handing: FuturesOrdered<Handing> = FuturesOrdered::new();
            let exit = run
                .connection(
                    &mut link,
                    &mut win,
                    &mut handing,
                    &mut segs,
                    &mut acks,
                    &mut shutdown,
                )
                .await;
            match exit {
                Exit::Shutdown => {
                    let deadline = Instant::now() + common.grace;
                    run.finish_commands(&link, &mut handing, deadline).await;
                    run.drain(&mut link, &mut win, &mut acks, deadline).await;
                    status.set_in_flight(0);
                    drop(run);
                    feed::finish(task, deadline, &common.name).await;
                    tracing::info!(uplink = %common.name, "The MQTT uplink stopped.");
                    return Ok(());
                }
                Exit::BufferClosed => {
                    tracing::info!(uplink = %common.name, "The buffer closed; the MQTT uplink stops.");
                    link.disconnect();
                    status.set_in_flight(0);
                    drop(run);
                    feed::finish(task, Instant::now() + common.grace, &common.name).await;
                    return Ok(());
                }
                Exit::Failed(message) => {
                    drop(link);
                    if run.downlink.is_some() {
                        status.set_downlink_ready(false, "the connection to the broker failed");
                    }
                    status.set_in_flight(0);
                    run.retry.connection_lasted(started.elapsed());
                    let delay = run.retry.fail(&status, &message, false);
                    // Queued behind the acks sent before it: the buffer task goes back to the
                    // last committed ack, and batches read before now are dropped.
                    run.acks.abandon();
                    run.acks.rewind();
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            biased;
                            () = &mut shutdown => {
                                drop(run);
                                feed::finish(task, Instant::now() + common.grace, &common.name).await;
                                return Ok(());
                            }
                            Some(a) = acks.recv() => {
                                // A failed ack is covered by the rewind.
                                let _ = run.on_acked(a);
                            }
                            () = &mut sleep => break,
                        }
                    }
                }
            }
        }
    }
}

impl_uplink!(MqttSink, KIND);

/// The state of one `run` that outlives its connections.
struct Run<'a> {
    status: &'a UplinkStatus,
    composer: &'a Composer,
    retry: &'a mut Retry,
    /// Acks to the buffer task, and the epoch (bumped at every rewind: batches read before it
    /// are not sent).
    acks: feed::Acks,
    /// Highest segment id published; publishing one at or below it again is a re-send.
    sent_upto: u64,
    /// Where commands go, with a `downlink`.
    downlink: Option<&'a Downlink>,
    /// The `downlink` routes.
    routes: &'a [Route],
}

impl Run<'_> {
    /// One connection, until it fails, the buffer closes or shutdown starts.
    async fn connection(
        &mut self,
        link: &mut Link,
        win: &mut Window,
        handing: &mut FuturesOrdered<Handing>,
        segs: &mut tokio::sync::mpsc::Receiver<feed::Batch>,
        acks: &mut tokio::sync::mpsc::UnboundedReceiver<Acked>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Exit {
        let mut connected = false;
        loop {
            let want = connected && win.wants_segment();
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return Exit::Shutdown,
                Some((m, outcome)) = handing.next(), if !handing.is_empty() => {
                    if let Some(exit) = self.handed_over(link, &m, &outcome) {
                        return exit;
                    }
                }
                ev = link.events.recv(), if handing.len() < COMMAND_WINDOW => {
                    let Some(ev) = ev else {
                        return Exit::Failed("the MQTT event loop stopped".into());
                    };
                    match ev {
                        LinkEvent::Connected { max_packet_size } => {
                            connected = true;
                            win.max_packet = max_packet_size;
                            self.status.set_state(LinkState::Connected);
                            tracing::info!(uplink = %self.status.name(), "The MQTT uplink is connected to its broker.");
                            if let Err(e) = link.subscribe(self.routes) {
                                return Exit::Failed(e);
                            }
                        }
                        LinkEvent::Command(m) => handing.push_back(self.hand_over(m)),
                        LinkEvent::Subscribed(None) => {
                            self.status.set_downlink_ready(true, "the broker accepted the downlink subscriptions");
                        }
                        LinkEvent::Subscribed(Some(why)) => {
                            self.status.set_error(&why);
                            self.status.set_downlink_ready(false, &why);
                            tracing::warn!(uplink = %self.status.name(), reason = %why,
                                "Commands on some downlink filters will not come down: the broker refused them.");
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
                Some(a) = acks.recv() => {
                    if let Some(exit) = self.on_acked(a) {
                        return exit;
                    }
                }
                batch = segs.recv(), if want => match batch {
                    None | Some((_, Err(ReadError::Closed))) => return Exit::BufferClosed,
                    Some((epoch, _)) if epoch != self.acks.epoch() => {}
                    Some((_, Ok(batch))) => {
                        let mut resent = 0;
                        for seg in batch {
                            if seg.id <= self.sent_upto {
                                resent += seg.readings.len() as u64;
                            }
                            self.sent_upto = self.sent_upto.max(seg.id);
                            win.push(seg);
                        }
                        self.status.record_resent(resent);
                    }
                    Some((_, Err(e))) => return Exit::Failed(format!("cannot read the buffer: {e}")),
                },
            }
            if connected && let Err(e) = win.pump(link, self.composer) {
                return Exit::Failed(e);
            }
            if let Some(exit) = self.settle(win) {
                return exit;
            }
            self.status.set_in_flight(win.in_flight() as u64);
        }
    }

    /// Starts handing a command over: to the local topic its route gives, or refused when no
    /// route takes it.
    fn hand_over(&self, m: Incoming) -> Handing {
        let local = m
            .topic()
            .and_then(|t| downlink::local_topic(self.routes, t));
        let handing = match (self.downlink, local) {
            (Some(d), Some(topic)) => Some(d.hand_over(m.command(topic))),
            _ => None,
        };
        Box::pin(async move {
            let outcome = match handing {
                Some(f) => f.await,
                None => Err(HandOverError::refused(
                    Refused::NoRoute,
                    format!(
                        "no downlink route takes the upstream topic {:?} (a subscription the broker kept from an earlier configuration?)",
                        m.topic().unwrap_or("(not UTF-8)")
                    ),
                )),
            };
            (m, outcome)
        })
    }

    /// A command's hand-over ended: acked upstream when it was handed over or refused for
    /// good; a failure ends the connection, so that the broker sends it again.
    fn handed_over(
        &self,
        link: &Link,
        m: &Incoming,
        outcome: &Result<HandedOver, HandOverError>,
    ) -> Option<Exit> {
        let ack = self.downlink.is_none_or(|d| d.record(outcome));
        match outcome {
            Err(e @ HandOverError::Failed(_)) if !ack => Some(Exit::Failed(e.to_string())),
            _ => link.ack(m).err().map(Exit::Failed),
        }
    }

    /// Shutdown: the commands being handed over finish (until `deadline`) and are acked;
    /// those that came and were not started are not, and come again after the restart.
    async fn finish_commands(
        &self,
        link: &Link,
        handing: &mut FuturesOrdered<Handing>,
        deadline: Instant,
    ) {
        while let Ok(Some((m, outcome))) = tokio::time::timeout_at(deadline, handing.next()).await {
            if self.handed_over(link, &m, &outcome).is_some() {
                break;
            }
        }
    }

    /// Sends the ack of the confirmed prefix of the window (with its dead letters) to the
    /// buffer task.
    fn settle(&mut self, win: &mut Window) -> Option<Exit> {
        let settled = win.take_settled()?;
        self.acks
            .send(self.status, settled)
            .err()
            .map(|_| Exit::BufferClosed)
    }

    /// Notes an answer of the buffer task.
    fn on_acked(&mut self, a: Acked) -> Option<Exit> {
        match self.acks.answered(a) {
            Ok(true) => {
                self.retry.progress_on(self.status);
                None
            }
            Ok(false) => None,
            Err(ferry_buffer::AckError::Closed) => Some(Exit::BufferClosed),
            Err(e) => Some(Exit::Failed(format!(
                "cannot record the ack in the buffer: {e}"
            ))),
        }
    }

    /// Shutdown: publish nothing new, settle what the broker confirms until `deadline`, wait
    /// for those acks' commits, then disconnect.
    async fn drain(
        &mut self,
        link: &mut Link,
        win: &mut Window,
        acks: &mut tokio::sync::mpsc::UnboundedReceiver<Acked>,
        deadline: Instant,
    ) {
        while win.in_flight() > 0 {
            let ev = match tokio::time::timeout_at(deadline, link.events.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => break,
            };
            let ok = match ev {
                LinkEvent::Sent(pkid) => win.on_sent(pkid).is_ok(),
                LinkEvent::Acked { pkid, refused } => win.on_ack(pkid, refused).is_ok(),
                // Not acked: the broker sends it again after the restart.
                LinkEvent::Connected { .. } | LinkEvent::Command(_) | LinkEvent::Subscribed(_) => {
                    true
                }
                LinkEvent::Failed(_) => false,
            };
            if !ok || self.settle(win).is_some() {
                break;
            }
        }
        if win.in_flight() > 0 {
            tracing::warn!(
                uplink = %self.status.name(),
                readings = win.in_flight(),
                "Shutdown grace ran out; unconfirmed MQTT publishes stay in the buffer."
            );
        }
        link.disconnect();
        while self.acks.pending() > 0 {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some(a)) => {
                    let _ = self.on_acked(a);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let rest = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        let _ = tokio::time::timeout(rest, link.closed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_buffer::Source;

    fn seg(id: u64, n: usize) -> Segment {
        seg_on(id, &vec!["t"; n])
    }

    use crate::test_util::segment as seg_on;

    /// Publishes without a link: what `pump` does, minus the client.
    fn fake_pump(w: &mut Window) -> usize {
        let mut n = 0;
        while w.in_flight() < w.max {
            let Some(s) = w.segs.iter_mut().find(|s| !s.fully_published()) else {
                break;
            };
            let (id, record) = (s.seg.id, s.next);
            s.next += 1;
            w.unsent.push_back((id, record));
            n += 1;
        }
        n
    }

    #[test]
    fn acks_in_segment_order_only_when_every_reading_is_confirmed() {
        let mut w = Window::new(3, QoS::AtLeastOnce, TopicFilter::all());
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
        let mut w = Window::new(10, QoS::AtLeastOnce, TopicFilter::all());
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
        let mut w = Window::new(10, QoS::AtLeastOnce, TopicFilter::all());
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
    fn readings_the_topics_do_not_take_are_skipped_in_order() {
        let mut w = Window::new(10, QoS::AtLeastOnce, TopicFilter::new(&["alarms/#".into()]));
        w.push(seg_on(1, &["tele/a", "alarms/a", "tele/b"]));
        w.push(seg_on(2, &["tele/c"]));
        w.push(seg_on(3, &["alarms/b"]));
        assert_eq!(fake_pump(&mut w), 2, "only the two alarms are published");
        w.on_sent(1).unwrap();
        w.on_sent(2).unwrap();
        // Segment 3's alarm is confirmed first: nothing settles before segment 1's.
        w.on_ack(2, None).unwrap();
        assert!(w.take_settled().is_none());
        w.on_ack(1, None).unwrap();
        let s = w.take_settled().unwrap();
        assert_eq!((s.ack_to, s.delivered, s.skipped), (3, 2, 3));
        // A segment with nothing to publish settles on its own.
        w.push(seg_on(4, &["tele/d", "tele/e"]));
        assert_eq!(fake_pump(&mut w), 0);
        let s = w.take_settled().unwrap();
        assert_eq!((s.ack_to, s.delivered, s.skipped), (4, 0, 2));
    }

    #[test]
    fn qos0_confirms_on_write_and_packet_id_reuse_is_an_error() {
        let mut w = Window::new(4, QoS::AtMostOnce, TopicFilter::all());
        w.push(seg(1, 2));
        fake_pump(&mut w);
        w.on_sent(0).unwrap();
        w.on_sent(0).unwrap();
        assert_eq!(w.take_settled().unwrap().delivered, 2);
        assert!(w.on_sent(0).is_err(), "nothing handed to the client");

        let mut w = Window::new(4, QoS::AtLeastOnce, TopicFilter::all());
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
