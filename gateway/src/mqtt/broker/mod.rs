//! The local broker: subscriptions, the queue of each subscriber, retained messages and
//! persistent sessions.
//!
//! ## Rules
//! - **A subscriber sees a publish only after it is durable.** Sessions hand a publish to
//!   [`Broker::route`] after the commit holding its reading returned, and after its PUBACK or
//!   PUBREC was queued: a local subscriber never sees a reading ferry could still lose. Every
//!   publish is a reading: there is no local-only publish whose ack would mean less. A command
//!   from the cloud ([`crate::mqtt::commands`]) is the one message that is not a reading (so no
//!   uplink sends it back up); its rows are committed before it is routed all the same.
//! - **Every durable copy of a publish is in the publish's own commit.** [`Broker::prepare`]
//!   runs before the commit and returns the rows to write with the reading
//!   ([`ferry_buffer::StateWrite`], layout in [`rows`]): the retained message, and the queue
//!   entry of every persistent session the publish goes to at QoS 1 or 2. So when the
//!   publisher gets its PUBACK, every copy is on disk; this map and the queues change only
//!   after that commit.
//! - **Retained messages**: an empty payload clears the topic. At most `mqtt.max_retained`
//!   topics are kept: a retained publish on a new topic beyond that is stored as a reading and
//!   delivered, but not retained, and counted
//!   (`ferry_mqtt_subscriber_dropped_total{reason="retained_full"}`).
//! - **A subscriber never slows anyone else.** Routing pushes into the subscriber's bounded
//!   [`Outbox`] and never waits: over `mqtt.subscriber_queue_messages` or
//!   `mqtt.subscriber_queue_bytes` (or all queues together over
//!   `mqtt.subscriber_queues_total_bytes`), the oldest queued QoS 0 message of that queue is
//!   dropped to make room, and if there is none the new message is dropped, each counted by
//!   reason in
//!   `ferry_mqtt_subscriber_dropped_total{reason}` (a dropped message's queue row is deleted).
//!   The session drains its outbox as its in-flight window (the client's Receive Maximum, or
//!   `mqtt.max_inflight` for 3.1.1) and its socket allow.
//! - **Persistent sessions** (3.1.1 clean session 0; MQTT 5 session expiry interval > 0) keep
//!   their subscriptions, queued QoS 1/2 messages, the packet ids of incoming QoS 2
//!   publishes awaiting PUBREL and of outgoing ones awaiting PUBCOMP in the buffer file, across
//!   disconnects, restarts and SIGKILL.
//!   The same queue limits apply while the client is away. QoS 0 messages for an offline
//!   session are queued in memory only. A queued message's row is deleted when the client
//!   acknowledges it (PUBACK, or PUBREC for QoS 2); messages sent and not acknowledged are sent
//!   again with DUP and their packet id on reconnect. An MQTT 5 session ends its expiry
//!   interval after the disconnect (after a restart, counted from the restart); a 3.1.1 one
//!   lasts until a clean connect with its client id. At most `mqtt.max_sessions` persistent
//!   sessions exist: a CONNECT asking for one more is refused (CONNACK 0x03 / 0x97), counted.
//! - **One copy per message**: the payload is reference-counted; each subscriber costs a queue
//!   entry.
//! - A client with overlapping subscriptions gets a message once, at the highest QoS granted
//!   by any of them, with every matching subscription identifier (MQTT 5 3.3.4).
//! - Topics beginning with `$` are not matched by a filter that begins with a wildcard.
//!
//! ## Files
//! - this file: the shared state, routing, retained messages, sessions;
//! - [`tree`]: subscriptions by topic level;
//! - [`outbox`]: a subscriber's queue;
//! - [`rows`]: what is kept in the buffer file.

mod outbox;
pub(crate) mod rows;
mod tree;

pub use outbox::{Delivery, Outbox};

use bytes::Bytes;
use ferry_buffer::{Buffer, StateWrite, now_ms};
use ferry_config::topic;
use ferry_uplink::fold::{Fold, Say};
use rumqttd::protocol::PublishProperties;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Why a message did not reach a subscriber (the `reason` label of
/// `ferry_mqtt_subscriber_dropped_total`).
pub mod drop_reason {
    /// A QoS 0 message made room in a full queue, or found it full.
    pub const QOS0_QUEUE_FULL: &str = "qos0_queue_full";
    /// A QoS 1/2 message found the queue full of QoS 1/2 messages.
    pub const QUEUE_FULL: &str = "queue_full";
    /// A QoS 1/2 message found all queues together at `mqtt.subscriber_queues_total_bytes`.
    pub const ALL_QUEUES_FULL: &str = "all_queues_full";
    /// Its message expiry interval passed while it was queued.
    pub const EXPIRED: &str = "expired";
    /// Larger than the Maximum Packet Size the subscriber asked for.
    pub const TOO_LARGE: &str = "too_large_for_client";
    /// A retained publish on a new topic beyond `mqtt.max_retained` (delivered, not retained).
    pub const RETAINED_FULL: &str = "retained_full";
    /// Queued for a persistent session that expired.
    pub const SESSION_EXPIRED: &str = "session_expired";
}

/// Subscriber ids of persistent sessions have this bit; those of clean sessions are their
/// connection id.
const PERSISTENT: u64 = 1 << 63;

/// The tree holds a shared subscription group under an id with this bit.
const SHARED: u64 = 1 << 62;

/// `$share/<group>/<filter>`: the group and the filter, if `filter` is a shared subscription.
pub fn shared(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

/// [`Message::from`] of a command from the cloud: no connection has this id (they count
/// from 1, and 0 marks an offline session).
pub const FROM_CLOUD: u64 = u64::MAX;

/// A session expiry interval meaning "never" (3.1.1 clean session 0).
pub const NEVER: u32 = u32::MAX;

/// A publish as ferry delivers it locally, shared by every queue it goes to.
#[derive(Debug)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
    /// The same, as the bytes every PUBLISH of it carries (one copy for all subscribers).
    pub topic_bytes: Bytes,
    /// Payload, shared with the reading.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: u8,
    /// Its RETAIN flag.
    pub retain: bool,
    /// Whether it was kept as the topic's retained message (decided before its commit).
    pub keep: bool,
    /// MQTT 5 properties passed through (payload format, content type, response topic,
    /// correlation data, user properties); expiry is kept in `expires`.
    pub props: Option<PublishProperties>,
    /// When its message expiry interval ends.
    pub expires: Option<Instant>,
    /// The connection that published it, for No Local ([`FROM_CLOUD`]: a command from the
    /// cloud, which no connection published).
    pub from: u64,
    /// Its number in routing order, which picks the member of a shared subscription group.
    pub n: u64,
}

/// MQTT 5 properties with nothing set.
pub fn no_props() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        subscription_identifiers: Vec::new(),
        content_type: None,
    }
}

/// The MQTT 5 properties a subscriber gets with a message (its expiry is kept apart, in
/// [`Message::expires`]); `None` when none is set.
pub fn passed_on(
    payload_format_indicator: Option<u8>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    user_properties: Vec<(String, String)>,
) -> Option<PublishProperties> {
    let props = PublishProperties {
        payload_format_indicator,
        response_topic,
        correlation_data,
        user_properties,
        content_type,
        ..no_props()
    };
    (props != no_props()).then_some(props)
}

impl Message {
    fn cost(&self) -> usize {
        self.topic.len() + self.payload.len()
    }

    /// Whole seconds left of its expiry interval (at least 1), `None` without one; `Some(0)`
    /// when it has expired.
    pub fn expiry_left(&self, now: Instant) -> Option<u32> {
        self.expires.map(|e| {
            if e <= now {
                0
            } else {
                (e - now).as_secs_f64().ceil().max(1.0) as u32
            }
        })
    }
}

/// One subscription's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOpts {
    /// Maximum QoS granted.
    pub qos: u8,
    /// MQTT 5 No Local: not the subscriber's own publishes.
    pub no_local: bool,
    /// MQTT 5 Retain As Published: keep the RETAIN flag on forwarded publishes.
    pub retain_as_published: bool,
    /// MQTT 5 Subscription Identifier.
    pub id: Option<usize>,
}

/// A publish ready for its commit: the message, the rows to commit with its reading, and its
/// deliveries to persistent sessions (whose rows those are).
#[derive(Debug)]
pub struct Prepared {
    /// The message.
    pub msg: Arc<Message>,
    /// Rows to commit with the reading.
    pub writes: Vec<StateWrite>,
    /// Deliveries to persistent sessions: subscriber id, client id, delivery.
    pub durable: Vec<(u64, Arc<str>, Delivery)>,
}

/// How a connection's session starts.
#[derive(Debug)]
pub struct SessionStart {
    /// Subscriber id of the session.
    pub sid: u64,
    /// Its queue: a resumed or new persistent session's (a clean session gets one at its first
    /// SUBSCRIBE).
    pub outbox: Option<Arc<Outbox>>,
    /// CONNACK's session present.
    pub present: bool,
    /// Whether the session outlives the connection.
    pub persistent: bool,
    /// Incoming QoS 2 packet ids awaiting PUBREL.
    pub in_qos2: HashSet<u16>,
    /// Outgoing QoS 2 packet ids whose PUBREL is to be sent again.
    pub rel: Vec<u16>,
    /// Rows to commit: the session's, or the deletion of a discarded one's.
    pub writes: Vec<StateWrite>,
}

/// What a connection leaves to its persistent session when it closes.
#[derive(Debug, Default)]
pub struct Leftover {
    /// Messages sent and not acknowledged, in the order sent.
    pub unacked: Vec<Delivery>,
    /// Outgoing QoS 2 packet ids PUBREC'd and not PUBCOMP'd.
    pub rel: Vec<u16>,
    /// Incoming QoS 2 packet ids awaiting PUBREL.
    pub in_qos2: HashSet<u16>,
}

#[derive(Debug)]
struct Client {
    outbox: Arc<Outbox>,
    filters: BTreeMap<String, SubOpts>,
    /// The connection now (0: offline), for No Local.
    conn: u64,
}

#[derive(Debug, Default)]
struct Subs {
    root: tree::Node,
    clients: HashMap<u64, Client>,
    /// Shared subscription groups by id, and their ids by `$share/<group>/<filter>`.
    groups: HashMap<u64, BTreeMap<u64, SubOpts>>,
    group_ids: HashMap<String, u64>,
    next_group: u64,
}

impl Subs {
    /// Adds `sid`'s subscription to `filter`, shared or not; whether it replaced one.
    fn insert(&mut self, filter: &str, sid: u64, o: SubOpts) -> bool {
        let Some((_, real)) = shared(filter) else {
            return self.root.insert(filter, sid, o);
        };
        let gid = match self.group_ids.get(filter) {
            Some(g) => *g,
            None => {
                self.next_group += 1;
                let gid = SHARED | self.next_group;
                self.group_ids.insert(filter.to_owned(), gid);
                // The group's own options are not used: its members' are.
                self.root.insert(real, gid, o);
                gid
            }
        };
        self.groups.entry(gid).or_default().insert(sid, o).is_some()
    }

    /// Removes `sid`'s subscription to `filter`; whether there was one.
    fn remove(&mut self, filter: &str, sid: u64) -> bool {
        let Some((_, real)) = shared(filter) else {
            return self.root.remove(filter, sid);
        };
        let Some(&gid) = self.group_ids.get(filter) else {
            return false;
        };
        let members = self.groups.entry(gid).or_default();
        let removed = members.remove(&sid).is_some();
        if members.is_empty() {
            self.groups.remove(&gid);
            self.group_ids.remove(filter);
            self.root.remove(real, gid);
        }
        removed
    }
}

/// A persistent session, online or not.
#[derive(Debug)]
struct Persist {
    sid: u64,
    /// Seconds it outlives a disconnect ([`NEVER`]; 0: it ends with the connection).
    expiry: u32,
    online: Option<u64>,
    /// Bumped at every connect and disconnect, so a stale expiry timer does nothing.
    generation: u64,
    outbox: Arc<Outbox>,
    in_qos2: HashSet<u16>,
    rel: Vec<u16>,
}

/// One local subscriber, for the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberInfo {
    /// Client id.
    pub client: String,
    /// Its filters.
    pub filters: Vec<String>,
    /// Messages queued for it now.
    pub queued: usize,
    /// Messages dropped from its queue.
    pub dropped: u64,
    /// Whether it is connected (a persistent session may not be).
    pub online: bool,
}

/// Subscriptions, subscriber queues, retained messages and persistent sessions, shared by
/// every MQTT connection.
#[derive(Debug)]
pub struct Broker {
    subs: RwLock<Subs>,
    /// Subscriptions in total: routing is skipped while there are none.
    count: AtomicUsize,
    /// Subscriptions of persistent sessions: the durable routing before a commit is skipped
    /// while there are none.
    durable_count: AtomicUsize,
    persist: Mutex<HashMap<Arc<str>, Persist>>,
    next_sid: AtomicU64,
    next_seq: AtomicU64,
    next_msg: AtomicU64,
    retained: Mutex<BTreeMap<String, Arc<Message>>>,
    max_retained: usize,
    max_sessions: usize,
    limits: outbox::Limits,
    delivered: AtomicU64,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
    /// Drops repeat under overload: their log lines are folded.
    drops_said: Fold,
    /// Where rows go outside a publish's commit (acks, expiry); `None` in unit tests.
    buffer: Option<Buffer>,
}

impl Broker {
    /// An empty broker with the limits of `[mqtt]`, keeping its rows in `buffer`.
    pub fn new(settings: &ferry_config::MqttSettings, buffer: Option<Buffer>) -> Broker {
        Broker {
            subs: RwLock::default(),
            count: AtomicUsize::new(0),
            durable_count: AtomicUsize::new(0),
            persist: Mutex::default(),
            next_sid: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
            next_msg: AtomicU64::new(0),
            retained: Mutex::default(),
            max_retained: settings.max_retained,
            max_sessions: settings.max_sessions,
            limits: outbox::Limits {
                messages: settings.subscriber_queue_messages.max(1),
                bytes: settings.subscriber_queue_bytes.max(1),
                total: Arc::default(),
                max_total: settings.subscriber_queues_total_bytes.max(1),
            },
            delivered: AtomicU64::new(0),
            dropped: Mutex::default(),
            drops_said: Fold::default(),
            buffer,
        }
    }

    fn retained_lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Message>>> {
        self.retained.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist_lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Persist>> {
        self.persist.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subs_read(&self) -> std::sync::RwLockReadGuard<'_, Subs> {
        self.subs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn subs_write(&self) -> std::sync::RwLockWriteGuard<'_, Subs> {
        self.subs.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits rows that belong to no publish (acks, expiry), without waiting.
    fn write(&self, writes: Vec<StateWrite>) {
        if let (Some(b), false) = (&self.buffer, writes.is_empty()) {
            // Sent to the writer now; nothing waits for the answer.
            drop(b.submit_with_state(Vec::new(), writes));
        }
    }

    /// Whether anyone subscribed to anything.
    pub fn has_subscriptions(&self) -> bool {
        self.count.load(Relaxed) > 0
    }

    /// A new queue for a clean session of `client`.
    pub fn outbox(&self, client: Arc<str>) -> Arc<Outbox> {
        Arc::new(Outbox::new(client, &self.limits))
    }

    /// Starts the session of a connection: `persist` is the expiry interval of a persistent
    /// session (`None`: it ends with the connection); `resume` is 3.1.1 clean session 0 or MQTT
    /// 5 clean start 0. `Err(max)`: a new persistent session would exceed `mqtt.max_sessions`.
    pub fn start_session(
        &self,
        client: &Arc<str>,
        conn: u64,
        persist: Option<u32>,
        resume: bool,
    ) -> Result<SessionStart, usize> {
        let mut start = SessionStart {
            sid: conn,
            outbox: None,
            present: false,
            persistent: false,
            in_qos2: HashSet::new(),
            rel: Vec::new(),
            writes: Vec::new(),
        };
        let prefix = rows::session_prefix(client);
        let mut sessions = self.persist_lock();
        if let Some(mut p) = sessions.remove(client) {
            if resume {
                p.online = Some(conn);
                p.generation += 1;
                p.expiry = persist.unwrap_or(0);
                if let Some(c) = self.subs_write().clients.get_mut(&p.sid) {
                    c.conn = conn;
                }
                start.sid = p.sid;
                start.outbox = Some(p.outbox.clone());
                start.present = true;
                start.persistent = true;
                start.in_qos2 = std::mem::take(&mut p.in_qos2);
                start.rel = std::mem::take(&mut p.rel);
                start.writes.push(StateWrite::Put(
                    format!("{prefix}meta"),
                    rows::meta(p.expiry),
                ));
                sessions.insert(client.clone(), p);
                return Ok(start);
            }
            self.forget_subs(p.sid);
            start.writes.push(StateWrite::DeletePrefix(prefix.clone()));
        }
        if persist.is_some() && sessions.len() >= self.max_sessions {
            // What the discard above wrote still has to be committed.
            drop(sessions);
            self.write(start.writes);
            return Err(self.max_sessions);
        }
        if let Some(expiry) = persist {
            let sid = PERSISTENT | self.next_sid.fetch_add(1, Relaxed);
            let outbox = self.outbox(client.clone());
            sessions.insert(
                client.clone(),
                Persist {
                    sid,
                    expiry,
                    online: Some(conn),
                    generation: 0,
                    outbox: outbox.clone(),
                    in_qos2: HashSet::new(),
                    rel: Vec::new(),
                },
            );
            start.sid = sid;
            start.outbox = Some(outbox);
            start.persistent = true;
            start
                .writes
                .push(StateWrite::Put(format!("{prefix}meta"), rows::meta(expiry)));
        }
        Ok(start)
    }

    /// Ends connection `conn`'s part in its session: a clean session ends; a persistent one
    /// keeps what is left, and starts its expiry. Returns when an MQTT 5 session expires.
    pub fn end_session(
        &self,
        client: &Arc<str>,
        conn: u64,
        sid: u64,
        left: Leftover,
    ) -> Option<(Duration, u64)> {
        if sid & PERSISTENT == 0 {
            self.forget_subs(sid);
            return None;
        }
        let mut sessions = self.persist_lock();
        let p = sessions.get_mut(client).filter(|p| p.sid == sid)?;
        p.outbox.requeue(left.unacked);
        if p.online != Some(conn) {
            // Taken over by a newer connection, which already has the session.
            return None;
        }
        p.online = None;
        p.generation += 1;
        p.in_qos2 = left.in_qos2;
        p.rel = left.rel;
        if let Some(c) = self.subs_write().clients.get_mut(&sid) {
            c.conn = 0;
        }
        match p.expiry {
            0 => {
                let p = sessions.remove(client)?;
                drop(sessions);
                self.discard(client, p);
                None
            }
            NEVER => None,
            secs => Some((Duration::from_secs(secs as u64), p.generation)),
        }
    }

    /// Ends a persistent session that stayed offline for its expiry interval.
    pub fn expire(&self, client: &Arc<str>, generation: u64) {
        let mut sessions = self.persist_lock();
        let due = sessions
            .get(client)
            .is_some_and(|p| p.online.is_none() && p.generation == generation);
        if !due {
            return;
        }
        if let Some(p) = sessions.remove(client) {
            drop(sessions);
            tracing::info!(client_id = %client, "A persistent MQTT session expired; its subscriptions and queued messages are gone.");
            self.discard(client, p);
        }
    }

    fn discard(&self, client: &str, p: Persist) {
        let lost = p.outbox.depth() as u64;
        if lost > 0 {
            self.count_drop(drop_reason::SESSION_EXPIRED, lost);
        }
        self.forget_subs(p.sid);
        self.write(vec![StateWrite::DeletePrefix(rows::session_prefix(client))]);
    }

    /// Removes every subscription of subscriber `sid`.
    fn forget_subs(&self, sid: u64) {
        let mut s = self.subs_write();
        let Some(c) = s.clients.remove(&sid) else {
            return;
        };
        for f in c.filters.keys() {
            s.remove(f, sid);
        }
        self.counted(-(c.filters.len() as isize), sid);
    }

    fn counted(&self, delta: isize, sid: u64) {
        let n = if delta >= 0 {
            self.count.fetch_add(delta as usize, Relaxed) + delta as usize
        } else {
            self.count.fetch_sub((-delta) as usize, Relaxed) - (-delta) as usize
        };
        if sid & PERSISTENT != 0 {
            if delta >= 0 {
                self.durable_count.fetch_add(delta as usize, Relaxed);
            } else {
                self.durable_count.fetch_sub((-delta) as usize, Relaxed);
            }
        }
        metrics::gauge!("ferry_mqtt_subscriptions").set(n as f64);
    }

    /// Subscribes `sid` to `filter` (valid by [`topic::check_filter`]); whether it replaced a
    /// subscription of the same filter, and the row to commit for a persistent session.
    pub fn subscribe(
        &self,
        client: &str,
        sid: u64,
        conn: u64,
        outbox: &Arc<Outbox>,
        filter: &str,
        o: SubOpts,
    ) -> (bool, Option<StateWrite>) {
        let mut s = self.subs_write();
        let replaced = s.insert(filter, sid, o);
        s.clients
            .entry(sid)
            .or_insert_with(|| Client {
                outbox: outbox.clone(),
                filters: BTreeMap::new(),
                conn,
            })
            .filters
            .insert(filter.to_owned(), o);
        drop(s);
        if !replaced {
            self.counted(1, sid);
        }
        let row = (sid & PERSISTENT != 0).then(|| {
            StateWrite::Put(
                format!("{}sub/{filter}", rows::session_prefix(client)),
                rows::sub(&o),
            )
        });
        (replaced, row)
    }

    /// Ends `sid`'s subscription to `filter`; whether it had one, and the row to commit.
    pub fn unsubscribe(&self, client: &str, sid: u64, filter: &str) -> (bool, Option<StateWrite>) {
        let mut s = self.subs_write();
        let removed = s.remove(filter, sid);
        if let Some(c) = s.clients.get_mut(&sid) {
            c.filters.remove(filter);
            if c.filters.is_empty() && sid & PERSISTENT == 0 {
                s.clients.remove(&sid);
            }
        }
        drop(s);
        if removed {
            self.counted(-1, sid);
        }
        let row = (removed && sid & PERSISTENT != 0)
            .then(|| StateWrite::Delete(format!("{}sub/{filter}", rows::session_prefix(client))));
        (removed, row)
    }

    /// Decides what a publish needs before its commit (see the module doc): whether it is
    /// kept as retained, and its queue entries for persistent sessions.
    pub fn prepare(&self, mut m: Message) -> Prepared {
        let retained = if m.retain {
            self.retained_write(&m)
        } else {
            None
        };
        m.keep = retained.is_some();
        m.n = self.next_msg.fetch_add(1, Relaxed);
        let msg = Arc::new(m);
        let mut p = Prepared {
            writes: retained.into_iter().collect(),
            durable: Vec::new(),
            msg,
        };
        if self.durable_count.load(Relaxed) > 0 && p.msg.qos > 0 {
            let s = self.subs_read();
            for (sid, mut d) in
                self.targets(&s, &p.msg, |sid, qos| sid & PERSISTENT != 0 && qos > 0)
            {
                let Some(c) = s.clients.get(&sid) else {
                    continue;
                };
                let seq = self.next_seq.fetch_add(1, Relaxed);
                d.seq = Some(seq);
                p.writes.push(StateWrite::Put(
                    format!("{}q/{seq:016x}", rows::session_prefix(&c.outbox.client)),
                    rows::queued(&d),
                ));
                p.durable.push((sid, c.outbox.client.clone(), d));
            }
        }
        p
    }

    /// The deliveries of `m` to the subscribers `pick(sid, qos)` takes, one per subscriber.
    fn targets(
        &self,
        s: &Subs,
        m: &Arc<Message>,
        pick: impl Fn(u64, u8) -> bool,
    ) -> Vec<(u64, Delivery)> {
        let mut hits: Vec<(u64, SubOpts)> = Vec::new();
        s.root.matches(&m.topic, &mut |sid, o| {
            // A shared group: one member per message, by the message's number.
            let (sid, o) = if sid & SHARED == 0 {
                (sid, o)
            } else {
                let Some(members) = s.groups.get(&sid).filter(|g| !g.is_empty()) else {
                    return;
                };
                let i = (m.n % members.len() as u64) as usize;
                match members.iter().nth(i) {
                    Some((sid, o)) => (*sid, *o),
                    None => return,
                }
            };
            if o.no_local && s.clients.get(&sid).is_some_and(|c| c.conn == m.from) {
                return;
            }
            hits.push((sid, o));
        });
        // One delivery per subscriber, merging its overlapping subscriptions.
        hits.sort_unstable_by_key(|h| h.0);
        let mut targets: Vec<(u64, Delivery)> = Vec::with_capacity(hits.len());
        for (sid, o) in hits {
            let d = match targets.last_mut() {
                Some((last, d)) if *last == sid => d,
                _ => {
                    targets.push((
                        sid,
                        Delivery {
                            msg: m.clone(),
                            qos: 0,
                            retain: false,
                            ids: Vec::new(),
                            seq: None,
                            pkid: None,
                        },
                    ));
                    match targets.last_mut() {
                        Some((_, d)) => d,
                        None => continue,
                    }
                }
            };
            d.qos = d.qos.max(o.qos.min(m.qos));
            d.retain |= o.retain_as_published && m.retain;
            d.ids.extend(o.id);
        }
        targets.retain(|(sid, d)| pick(*sid, d.qos));
        targets
    }

    /// Delivers committed publishes to the matching subscribers' queues, and applies the
    /// retained ones (see the module doc: call only after their commit). `durable` are the
    /// deliveries [`Broker::prepare`] made for persistent sessions.
    /// Returns how many deliveries were queued (or dropped by a full queue, and counted).
    pub fn route(&self, msgs: &[Arc<Message>], durable: Vec<(u64, Arc<str>, Delivery)>) -> usize {
        for m in msgs.iter().filter(|m| m.keep) {
            self.apply_retained(m);
        }
        if !self.has_subscriptions() {
            return 0;
        }
        let mut routed = 0;
        let s = self.subs_read();
        for (sid, client, d) in durable {
            match (s.clients.get(&sid), d.seq) {
                (Some(c), _) => {
                    self.push(&c.outbox, d);
                    routed += 1;
                }
                // The session ended between prepare and commit: the row must not outlive it.
                (None, Some(seq)) => self.acked(&client, seq),
                (None, None) => {}
            }
        }
        for m in msgs {
            // What `prepare` routed already: persistent sessions at QoS 1/2.
            for (sid, d) in self.targets(&s, m, |sid, qos| sid & PERSISTENT == 0 || qos == 0) {
                if let Some(c) = s.clients.get(&sid) {
                    self.push(&c.outbox, d);
                    routed += 1;
                }
            }
        }
        routed
    }

    /// The queues of the subscribers a QoS 1/2 message on `topic` of `cost` bytes (topic and
    /// payload) would overflow now, each with how many messages it has handed out so far. (A
    /// shared subscription's members are not checked: any one of them may take it.)
    pub fn full_queues(&self, topic: &str, cost: usize) -> Vec<(Arc<Outbox>, u64)> {
        if !self.has_subscriptions() {
            return Vec::new();
        }
        let s = self.subs_read();
        let mut full = Vec::new();
        s.root.matches(topic, &mut |sid, o| {
            if sid & SHARED != 0 || o.qos == 0 {
                return;
            }
            if let Some(c) = s.clients.get(&sid)
                && let Some(popped) = c.outbox.full_for(cost)
            {
                full.push((c.outbox.clone(), popped));
            }
        });
        full
    }

    /// Queues `d`, counting what is dropped (and deleting its row).
    pub fn push(&self, outbox: &Outbox, d: Delivery) {
        if let Err((why, back)) = outbox.push(d) {
            self.count_drop(why, 1);
            if let Some(seq) = back.and_then(|d| d.seq) {
                self.acked(&outbox.client, seq);
            }
        }
    }

    /// A persistent session's client acknowledged the queued message `seq`: its row goes.
    pub fn acked(&self, client: &str, seq: u64) {
        self.write(vec![StateWrite::Delete(format!(
            "{}q/{seq:016x}",
            rows::session_prefix(client)
        ))]);
    }

    /// A persistent session's client PUBREC'd the queued message `seq` (packet id `pkid`): its
    /// row is replaced by the PUBREL owed, which is sent again after a reconnect or restart.
    pub fn released(&self, client: &str, seq: Option<u64>, pkid: u16) {
        let prefix = rows::session_prefix(client);
        let mut writes = vec![StateWrite::Put(
            format!("{prefix}rel/{pkid:04x}"),
            Vec::new(),
        )];
        if let Some(seq) = seq {
            writes.push(StateWrite::Delete(format!("{prefix}q/{seq:016x}")));
        }
        self.write(writes);
    }

    /// The PUBCOMP for `pkid` came: nothing is owed any more.
    pub fn completed(&self, client: &str, pkid: u16) {
        self.write(vec![StateWrite::Delete(format!(
            "{}rel/{pkid:04x}",
            rows::session_prefix(client)
        ))]);
    }

    /// The row that records an incoming QoS 2 publish awaiting PUBREL.
    pub fn in_qos2_row(client: &str, pkid: u16, on: bool) -> StateWrite {
        let key = format!("{}in2/{pkid:04x}", rows::session_prefix(client));
        if on {
            StateWrite::Put(key, Vec::new())
        } else {
            StateWrite::Delete(key)
        }
    }

    /// The retained messages whose topics `filter` matches, for a new subscription.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let now = Instant::now();
        self.retained_lock()
            .values()
            .filter(|m| topic::matches(filter, &m.topic) && m.expiry_left(now) != Some(0))
            .cloned()
            .collect()
    }

    /// The row that keeps (or clears) a retained publish; `None`: not kept, counted.
    /// Replacing or clearing a topic always works.
    fn retained_write(&self, m: &Message) -> Option<StateWrite> {
        let key = format!("{}{}", rows::RETAINED, m.topic);
        if m.payload.is_empty() {
            return Some(StateWrite::Delete(key));
        }
        let map = self.retained_lock();
        if map.len() >= self.max_retained && !map.contains_key(&*m.topic) {
            drop(map);
            self.count_drop(drop_reason::RETAINED_FULL, 1);
            return None;
        }
        Some(StateWrite::Put(key, rows::retained(m)))
    }

    fn apply_retained(&self, m: &Arc<Message>) {
        let mut map = self.retained_lock();
        if m.payload.is_empty() {
            map.remove(&*m.topic);
        } else {
            map.insert(m.topic.to_string(), m.clone());
        }
        metrics::gauge!("ferry_mqtt_retained_messages").set(map.len() as f64);
    }

    /// Loads retained messages and persistent sessions from the buffer file. A row that does
    /// not decode is skipped and logged. Returns the sessions whose expiry must be started.
    #[allow(clippy::type_complexity)]
    pub fn load(
        &self,
        buffer: &Buffer,
    ) -> Result<Vec<(Arc<str>, Duration, u64)>, ferry_buffer::ReadError> {
        let (now, wall) = (Instant::now(), now_ms());
        let mut bad = 0;
        {
            let mut map = self.retained_lock();
            for (key, value) in buffer.state(rows::RETAINED)? {
                match rows::decode_retained(&value, now, wall) {
                    Some(m) => {
                        map.insert(key[rows::RETAINED.len()..].to_owned(), Arc::new(m));
                    }
                    None => bad += 1,
                }
            }
            metrics::gauge!("ferry_mqtt_retained_messages").set(map.len() as f64);
        }
        let mut timers = Vec::new();
        let mut max_seq = 0;
        let mut current: Option<(Arc<str>, Arc<Outbox>, u64)> = None;
        for (key, value) in buffer.state(rows::SESSION)? {
            let rest = &key[rows::SESSION.len()..];
            let Some((hex, what)) = rest.split_once('/') else {
                bad += 1;
                continue;
            };
            let Some(client) = rows::client_of(hex) else {
                bad += 1;
                continue;
            };
            // Rows come in key order: `meta` sorts before `q/` and `sub/` but after `in2/`, so
            // a session is created at its first row of any kind.
            if current.as_ref().is_none_or(|(c, _, _)| **c != *client) {
                let client: Arc<str> = Arc::from(client.as_str());
                let sid = PERSISTENT | self.next_sid.fetch_add(1, Relaxed);
                let outbox = self.outbox(client.clone());
                self.persist_lock().insert(
                    client.clone(),
                    Persist {
                        sid,
                        // Until its `meta` row says otherwise: a session without one is left
                        // over from one that was ending, and ends now.
                        expiry: 0,
                        online: None,
                        generation: 0,
                        outbox: outbox.clone(),
                        in_qos2: HashSet::new(),
                        rel: Vec::new(),
                    },
                );
                current = Some((client, outbox, sid));
            }
            let Some((client, outbox, sid)) = current.clone() else {
                continue;
            };
            let ok = if what == "meta" {
                rows::decode_meta(&value).map(|e| {
                    if let Some(p) = self.persist_lock().get_mut(&client) {
                        p.expiry = e;
                    }
                })
            } else if let Some(filter) = what.strip_prefix("sub/") {
                rows::decode_sub(&value).map(|o| {
                    self.subscribe(&client, sid, 0, &outbox, filter, o);
                })
            } else if let Some(seq) = what.strip_prefix("q/") {
                u64::from_str_radix(seq, 16)
                    .ok()
                    .and_then(|seq| {
                        max_seq = max_seq.max(seq);
                        rows::decode_queued(&value, seq, now, wall)
                    })
                    .map(|d| outbox.load(d))
            } else if let Some(pkid) = what.strip_prefix("in2/") {
                u16::from_str_radix(pkid, 16).ok().map(|pkid| {
                    if let Some(p) = self.persist_lock().get_mut(&client) {
                        p.in_qos2.insert(pkid);
                    }
                })
            } else if let Some(pkid) = what.strip_prefix("rel/") {
                u16::from_str_radix(pkid, 16).ok().map(|pkid| {
                    if let Some(p) = self.persist_lock().get_mut(&client) {
                        p.rel.push(pkid);
                    }
                })
            } else {
                None
            };
            if ok.is_none() {
                bad += 1;
            }
        }
        self.next_seq.fetch_max(max_seq + 1, Relaxed);
        for (client, p) in self.persist_lock().iter() {
            if p.expiry == 0 {
                // It should have ended with its connection; the crash kept it.
                timers.push((client.clone(), Duration::ZERO, p.generation));
            } else if p.expiry != NEVER {
                timers.push((
                    client.clone(),
                    Duration::from_secs(p.expiry as u64),
                    p.generation,
                ));
            }
        }
        if bad > 0 {
            tracing::warn!(
                rows = bad,
                "Rows of retained messages or MQTT sessions in the buffer file could not be read; they are ignored."
            );
        }
        Ok(timers)
    }

    /// Counts messages that did not reach a subscriber, and logs it: the first time, then a
    /// summary per period while it goes on ([`ferry_uplink::fold`]).
    pub fn count_drop(&self, why: &'static str, n: u64) {
        *self
            .dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(why)
            .or_default() += n;
        metrics::counter!("ferry_mqtt_subscriber_dropped_total", "reason" => why).increment(n);
        let cause = match why {
            drop_reason::QOS0_QUEUE_FULL | drop_reason::QUEUE_FULL => {
                "a subscriber's queue is full (mqtt.subscriber_queue_messages, subscriber_queue_bytes): it takes messages slower than they are published"
            }
            drop_reason::ALL_QUEUES_FULL => {
                "all subscriber queues together reached mqtt.subscriber_queues_total_bytes"
            }
            drop_reason::EXPIRED => "their message expiry interval passed while they were queued",
            drop_reason::TOO_LARGE => "they are larger than a subscriber's Maximum Packet Size",
            drop_reason::RETAINED_FULL => {
                "mqtt.max_retained topics already have a retained message: retained publishes on new topics are delivered but not retained"
            }
            drop_reason::SESSION_EXPIRED => "a persistent session ended with messages queued",
            _ => "see ferry_mqtt_subscriber_dropped_total",
        };
        match self.drops_said.note(why, Instant::now()) {
            Say::New => tracing::warn!(
                reason = why,
                messages = n,
                "Messages for local MQTT subscribers are dropped: {cause}."
            ),
            Say::Again(k) => tracing::warn!(
                reason = why,
                repeats = k,
                "Messages for local MQTT subscribers are still dropped: {cause}."
            ),
            Say::Quiet => {}
        }
    }

    /// Counts PUBLISHes written to a subscriber.
    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Relaxed);
        metrics::counter!("ferry_mqtt_delivered_total").increment(n);
    }

    /// PUBLISHes written to local subscribers since start.
    pub fn delivered_total(&self) -> u64 {
        self.delivered.load(Relaxed)
    }

    /// Messages that did not reach a subscriber since start, by reason.
    pub fn drops(&self) -> BTreeMap<&'static str, u64> {
        self.dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Topics with a retained message.
    pub fn retained_count(&self) -> usize {
        self.retained_lock().len()
    }

    /// Persistent sessions, online and offline.
    pub fn sessions(&self) -> usize {
        self.persist_lock().len()
    }

    /// The local subscribers, by client id.
    pub fn subscribers(&self) -> Vec<SubscriberInfo> {
        let mut v: Vec<SubscriberInfo> = self
            .subs_read()
            .clients
            .values()
            .map(|c| SubscriberInfo {
                client: c.outbox.client.to_string(),
                filters: c.filters.keys().cloned().collect(),
                queued: c.outbox.depth(),
                dropped: c.outbox.dropped(),
                online: c.conn != 0,
            })
            .collect();
        v.sort_by(|a, b| a.client.cmp(&b.client));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(max_messages: usize) -> Broker {
        let settings = ferry_config::MqttSettings {
            subscriber_queue_messages: max_messages,
            max_retained: 2,
            ..Default::default()
        };
        Broker::new(&settings, None)
    }

    fn msg(topic: &str, qos: u8, from: u64) -> Message {
        Message {
            topic: Arc::from(topic),
            topic_bytes: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            keep: false,
            props: None,
            expires: None,
            from,
            n: 0,
        }
    }

    /// Prepares and routes, as a session does around the commit.
    fn publish(b: &Broker, m: Message) -> Vec<StateWrite> {
        let p = b.prepare(m);
        b.route(&[p.msg], p.durable);
        p.writes
    }

    fn opts(qos: u8) -> SubOpts {
        SubOpts {
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }

    fn sub(b: &Broker, sid: u64, ob: &Arc<Outbox>, filter: &str, o: SubOpts) -> bool {
        b.subscribe(&ob.client, sid, sid, ob, filter, o).0
    }

    fn got(o: &Outbox) -> Vec<(String, u8)> {
        std::iter::from_fn(|| o.pop(true))
            .map(|d| (d.msg.topic.to_string(), d.qos))
            .collect()
    }

    #[test]
    fn wildcards_match_as_the_spec_says_and_dollar_topics_are_apart() {
        let b = broker(100);
        let cases: [(&str, &[&str], &[&str]); 6] = [
            ("a/+/c", &["a/b/c", "a//c"], &["a/b", "a/b/c/d", "$a/b/c"]),
            ("a/#", &["a", "a/b", "a/b/c"], &["b", "ab"]),
            ("#", &["a", "/", "a/b"], &["$SYS/x", "$x"]),
            ("+/x", &["a/x", "/x"], &["$SYS/x", "x"]),
            ("$SYS/#", &["$SYS/a", "$SYS"], &["SYS/a"]),
            ("a/b", &["a/b"], &["a/b/", "a"]),
        ];
        for (i, (filter, yes, no)) in cases.iter().enumerate() {
            let sid = i as u64 + 1;
            let ob = b.outbox(Arc::from(format!("c{sid}").as_str()));
            sub(&b, sid, &ob, filter, opts(1));
            for t in yes.iter().chain(no.iter()) {
                publish(&b, msg(t, 1, 0));
            }
            let topics: Vec<String> = got(&ob).into_iter().map(|(t, _)| t).collect();
            assert_eq!(topics, yes.to_vec(), "filter {filter}");
            // The tree agrees with the matcher every other part of ferry uses.
            for t in yes.iter().chain(no.iter()) {
                assert_eq!(topic::matches(filter, t), yes.contains(t), "{filter} {t}");
            }
        }
    }

    #[test]
    fn overlapping_subscriptions_give_one_copy_at_the_highest_qos_and_no_local_holds() {
        let b = broker(100);
        let ob = b.outbox(Arc::from("c"));
        sub(
            &b,
            1,
            &ob,
            "a/#",
            SubOpts {
                id: Some(7),
                ..opts(0)
            },
        );
        sub(
            &b,
            1,
            &ob,
            "a/+",
            SubOpts {
                id: Some(9),
                ..opts(2)
            },
        );
        publish(&b, msg("a/b", 2, 0));
        publish(&b, msg("a/b", 1, 0));
        let d: Vec<Delivery> = std::iter::from_fn(|| ob.pop(true)).collect();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].qos, d[1].qos), (2, 1));
        let mut ids = d[0].ids.clone();
        ids.sort();
        assert_eq!(ids, [7, 9]);
        // No Local: the subscriber's own publish does not come back.
        sub(
            &b,
            1,
            &ob,
            "a/+",
            SubOpts {
                no_local: true,
                ..opts(1)
            },
        );
        b.unsubscribe("c", 1, "a/#");
        publish(&b, msg("a/b", 1, 1));
        publish(&b, msg("a/b", 1, 2));
        assert_eq!(got(&ob), [("a/b".to_string(), 1)]);
        // A clean session's end removes everything, and routing stops.
        b.end_session(&Arc::from("c"), 1, 1, Leftover::default());
        assert!(!b.has_subscriptions());
        assert!(b.subscribers().is_empty());
        assert!(b.subs_read().root.is_empty());
    }

    #[test]
    fn a_full_queue_drops_qos0_first_then_new_messages_and_counts_them() {
        let b = broker(3);
        let ob = b.outbox(Arc::from("slow"));
        sub(&b, 1, &ob, "#", opts(2));
        for (t, q) in [("q1/a", 1), ("q0/a", 0), ("q1/b", 1)] {
            publish(&b, msg(t, q, 0));
        }
        // Full: a QoS 0 message is dropped itself; a QoS 1 one displaces the queued QoS 0.
        for (t, q) in [("q0/b", 0), ("q1/c", 1), ("q1/d", 1)] {
            publish(&b, msg(t, q, 0));
        }
        assert_eq!(
            got(&ob).into_iter().map(|(t, _)| t).collect::<Vec<_>>(),
            ["q1/a", "q1/b", "q1/c"]
        );
        let drops = b.drops();
        assert_eq!(drops[drop_reason::QOS0_QUEUE_FULL], 2);
        assert_eq!(drops[drop_reason::QUEUE_FULL], 1);
        assert_eq!(b.subscribers()[0].dropped, 3);
    }

    #[test]
    fn a_shared_group_gets_each_message_once_spread_over_its_members() {
        let b = broker(100);
        let obs: Vec<Arc<Outbox>> = (1..=3)
            .map(|i| b.outbox(Arc::from(format!("w{i}").as_str())))
            .collect();
        for (i, ob) in obs.iter().enumerate() {
            sub(&b, i as u64 + 1, ob, "$share/workers/jobs/+", opts(1));
        }
        // A plain subscriber beside the group gets everything.
        let all = b.outbox(Arc::from("all"));
        sub(&b, 9, &all, "jobs/#", opts(1));
        for i in 0..30 {
            publish(&b, msg(&format!("jobs/{i}"), 1, 0));
        }
        let per: Vec<usize> = obs.iter().map(|o| got(o).len()).collect();
        assert_eq!(per, [10, 10, 10]);
        assert_eq!(got(&all).len(), 30);
        // Members leave; the last one takes everything; then the group is gone.
        b.unsubscribe("w1", 1, "$share/workers/jobs/+");
        b.end_session(&Arc::from("w2"), 2, 2, Leftover::default());
        for i in 0..5 {
            publish(&b, msg(&format!("jobs/{i}"), 1, 0));
        }
        assert_eq!(got(&obs[2]).len(), 5);
        b.unsubscribe("w3", 3, "$share/workers/jobs/+");
        b.unsubscribe("all", 9, "jobs/#");
        assert!(b.subs_read().root.is_empty() && b.subs_read().groups.is_empty());
        assert!(!b.has_subscriptions());
    }

    #[test]
    fn all_queues_together_are_bounded_and_a_gone_queue_gives_its_bytes_back() {
        let settings = ferry_config::MqttSettings {
            // Each message below costs 2 bytes (topic "a", payload "x"): 4 fit in total.
            subscriber_queues_total_bytes: 8,
            ..Default::default()
        };
        let b = Broker::new(&settings, None);
        let (x, y) = (b.outbox(Arc::from("x")), b.outbox(Arc::from("y")));
        sub(&b, 1, &x, "a", opts(1));
        sub(&b, 2, &y, "a", opts(1));
        for _ in 0..3 {
            publish(&b, msg("a", 1, 0));
        }
        assert_eq!((x.depth(), y.depth()), (2, 2));
        assert_eq!(b.drops()[drop_reason::ALL_QUEUES_FULL], 2);
        // Taking one out makes room for one.
        x.pop(true);
        publish(&b, msg("a", 1, 0));
        assert_eq!(x.depth() + y.depth(), 4);
        // A queue that goes gives its bytes back.
        b.end_session(&Arc::from("y"), 2, 2, Leftover::default());
        drop(y);
        publish(&b, msg("a", 1, 0));
        assert_eq!(x.depth(), 3);
    }

    #[test]
    fn a_message_waiting_for_the_window_is_not_overtaken() {
        let b = broker(10);
        let ob = b.outbox(Arc::from("c"));
        sub(&b, 1, &ob, "#", opts(1));
        publish(&b, msg("a", 1, 0));
        publish(&b, msg("b", 0, 0));
        assert!(ob.pop(false).is_none());
        assert_eq!(ob.pop(true).unwrap().msg.topic.as_ref(), "a");
        assert_eq!(ob.pop(false).unwrap().msg.topic.as_ref(), "b");
    }

    #[test]
    fn the_retained_limit_spares_replacements_and_an_empty_payload_clears() {
        let b = broker(10);
        let retained = |t: &str, payload: &'static [u8]| Message {
            retain: true,
            payload: Bytes::from_static(payload),
            ..msg(t, 1, 0)
        };
        for t in ["t/1", "t/2"] {
            assert!(matches!(
                &publish(&b, retained(t, b"v"))[..],
                [StateWrite::Put(..)]
            ));
        }
        // max_retained = 2: a third topic is refused and counted, a replacement is not.
        assert!(publish(&b, retained("t/3", b"v")).is_empty());
        assert_eq!(b.drops()[drop_reason::RETAINED_FULL], 1);
        assert_eq!(publish(&b, retained("t/2", b"w")).len(), 1);
        let now: Vec<_> = b.retained_matching("t/+");
        assert_eq!(now.len(), 2);
        assert_eq!(
            publish(&b, retained("t/1", b"")),
            [StateWrite::Delete("retained/t/1".into())]
        );
        assert_eq!(b.retained_count(), 1);
    }

    #[test]
    fn a_persistent_session_queues_durably_while_away_and_resumes() {
        let b = broker(10);
        let c: Arc<str> = Arc::from("sensor-hub");
        let start = b.start_session(&c, 11, Some(NEVER), false).unwrap();
        assert!(start.persistent && !start.present);
        assert!(matches!(&start.writes[..], [StateWrite::Put(k, _)] if k.ends_with("/meta")));
        let ob = start.outbox.unwrap();
        let (_, row) = b.subscribe(&c, start.sid, 11, &ob, "cmd/#", opts(1));
        assert!(matches!(row, Some(StateWrite::Put(k, _)) if k.ends_with("/sub/cmd/#")));
        // The connection goes; a sent and unacknowledged message is left to the session.
        let sent = ob.pop(true);
        assert!(sent.is_none());
        publish(&b, msg("cmd/a", 1, 0));
        let mut first = ob.pop(true).unwrap();
        first.pkid = Some(5);
        let left = Leftover {
            unacked: vec![first],
            ..Default::default()
        };
        assert_eq!(b.end_session(&c, 11, start.sid, left), None);
        // While away: QoS 1 messages get a queue row in the publish's commit.
        let writes = publish(&b, msg("cmd/b", 1, 0));
        assert!(
            matches!(&writes[..], [StateWrite::Put(k, _)] if k.contains("/q/")),
            "{writes:?}"
        );
        assert!(!b.subscribers()[0].online);
        // Back with clean session 0: the same queue, the unacknowledged message first, with
        // its packet id.
        let again = b.start_session(&c, 12, Some(NEVER), true).unwrap();
        assert!(again.present);
        assert_eq!(again.sid, start.sid);
        let ob = again.outbox.unwrap();
        let d = ob.pop(true).unwrap();
        assert_eq!((&*d.msg.topic, d.pkid), ("cmd/a", Some(5)));
        let d = ob.pop(true).unwrap();
        assert_eq!(&*d.msg.topic, "cmd/b");
        assert!(d.seq.is_some());
        // A clean connect discards it, rows and all.
        let clean = b.start_session(&c, 13, None, false).unwrap();
        assert!(!clean.present && !clean.persistent);
        assert!(
            matches!(&clean.writes[..], [StateWrite::DeletePrefix(p)] if p.starts_with("session/"))
        );
        assert!(!b.has_subscriptions());
        assert_eq!(b.sessions(), 0);
    }

    #[test]
    fn persistent_sessions_are_capped_and_clean_ones_are_not() {
        let settings = ferry_config::MqttSettings {
            max_sessions: 2,
            ..Default::default()
        };
        let b = Broker::new(&settings, None);
        for (i, id) in ["a", "b"].iter().enumerate() {
            assert!(
                b.start_session(&Arc::from(*id), i as u64 + 1, Some(NEVER), false)
                    .is_ok()
            );
        }
        assert_eq!(
            b.start_session(&Arc::from("c"), 3, Some(NEVER), false)
                .unwrap_err(),
            2
        );
        assert!(b.start_session(&Arc::from("c"), 4, None, false).is_ok());
        // Resuming an existing one is not a new one.
        assert!(
            b.start_session(&Arc::from("a"), 5, Some(NEVER), true)
                .is_ok()
        );
    }

    #[test]
    fn an_expiring_session_ends_only_if_it_stayed_away() {
        let b = broker(10);
        let c: Arc<str> = Arc::from("v5");
        let s = b.start_session(&c, 1, Some(60), false).unwrap();
        b.subscribe(&c, s.sid, 1, s.outbox.as_ref().unwrap(), "x", opts(1));
        let (after, g) = b.end_session(&c, 1, s.sid, Leftover::default()).unwrap();
        assert_eq!(after, Duration::from_secs(60));
        // It came back in time: the old timer does nothing.
        b.start_session(&c, 2, Some(60), true).unwrap();
        b.expire(&c, g);
        assert_eq!(b.sessions(), 1);
        let (_, g) = b.end_session(&c, 2, s.sid, Leftover::default()).unwrap();
        b.expire(&c, g);
        assert_eq!(b.sessions(), 0);
        assert!(!b.has_subscriptions());
    }
}
