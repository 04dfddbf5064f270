//! The local broker: subscriptions, the queue of each local subscriber, and retained messages.
//!
//! ## Rules
//! - **A subscriber sees a publish only after it is durable.** Sessions hand a publish to
//!   [`Broker::route`] after the commit holding its reading returned, and after its PUBACK or
//!   PUBREC was queued: a local subscriber never sees a reading ferry could still lose. Every
//!   publish is a reading: there is no local-only publish whose ack would mean less.
//! - **Retained messages are in the buffer file** (the `state` table, keys `retained/<topic>`,
//!   see [`ferry_buffer::StateWrite`]), written in the same transaction as the publish's
//!   reading; this map mirrors the file and changes only after that commit. An empty payload
//!   clears the topic. At most `mqtt.max_retained` topics are kept: a retained publish on a new
//!   topic beyond that is stored as a reading and delivered, but not retained, and counted
//!   (`ferry_mqtt_subscriber_dropped_total{reason="retained_full"}`).
//! - **A subscriber never slows anyone else.** Routing pushes into the subscriber's bounded
//!   [`Outbox`] and never waits: over `mqtt.subscriber_queue_messages` or
//!   `mqtt.subscriber_queue_bytes`, the oldest queued QoS 0 message is dropped to make room, and
//!   if there is none the new message is dropped, each counted by reason in
//!   `ferry_mqtt_subscriber_dropped_total{reason}`. The session drains its outbox as its
//!   in-flight window (the client's Receive Maximum, or `mqtt.max_inflight` for 3.1.1) and its
//!   socket allow.
//! - **One copy per message**: the payload is reference-counted; each subscriber costs a queue
//!   entry.
//! - A client with overlapping subscriptions gets a message once, at the highest QoS granted
//!   by any of them, with every matching subscription identifier (MQTT 5 3.3.4).
//! - Topics beginning with `$` are not matched by a filter that begins with a wildcard
//!   ([`ferry_config::topic::matches`]).
//! - Sessions are not persistent yet: a client's subscriptions and queue end with its
//!   connection, and CONNACK says no session is present.

use bytes::Bytes;
use ferry_buffer::{Buffer, StateWrite, now_ms};
use ferry_config::topic;
use rumqttd::protocol::PublishProperties;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Key prefix of retained messages in the buffer's `state` table.
const RETAINED: &str = "retained/";

/// Why a message did not reach a subscriber (the `reason` label of
/// `ferry_mqtt_subscriber_dropped_total`).
pub mod drop_reason {
    /// A QoS 0 message made room in a full queue, or found it full.
    pub const QOS0_QUEUE_FULL: &str = "qos0_queue_full";
    /// A QoS 1/2 message found the queue full of QoS 1/2 messages.
    pub const QUEUE_FULL: &str = "queue_full";
    /// Its message expiry interval passed while it was queued.
    pub const EXPIRED: &str = "expired";
    /// Larger than the Maximum Packet Size the subscriber asked for.
    pub const TOO_LARGE: &str = "too_large_for_client";
    /// A retained publish on a new topic beyond `mqtt.max_retained` (delivered, not retained).
    pub const RETAINED_FULL: &str = "retained_full";
}

/// A publish as ferry delivers it locally, shared by every queue it goes to.
#[derive(Debug)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
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
    /// The connection that published it (0: none), for No Local.
    pub from: u64,
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

/// One message on its way to one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub msg: Arc<Message>,
    /// QoS to deliver it with: the lower of the publish's and the subscription's.
    pub qos: u8,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions.
    pub ids: Vec<usize>,
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

/// The queue of one local subscriber: routing pushes, its session pops.
#[derive(Debug)]
pub struct Outbox {
    /// Client id, for the status page.
    pub client: Arc<str>,
    /// Woken when a message is queued.
    pub notify: Notify,
    max_messages: usize,
    max_bytes: usize,
    q: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
    dropped: u64,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `d`, or drops a message to respect the limits (see the module doc); returns
    /// what was dropped, if anything.
    pub fn push(&self, d: Delivery) -> Option<&'static str> {
        let cost = d.msg.cost();
        let mut q = self.lock();
        let full =
            |q: &Queue| q.items.len() >= self.max_messages || q.bytes + cost > self.max_bytes;
        let mut dropped = None;
        if full(&q) {
            if d.qos == 0 {
                q.dropped += 1;
                return Some(drop_reason::QOS0_QUEUE_FULL);
            }
            // Make room by dropping the oldest QoS 0 messages.
            while full(&q) {
                let Some(i) = q.items.iter().position(|x| x.qos == 0) else {
                    q.dropped += 1;
                    return Some(drop_reason::QUEUE_FULL);
                };
                if let Some(old) = q.items.remove(i) {
                    q.bytes -= old.msg.cost();
                    q.dropped += 1;
                    dropped = Some(drop_reason::QOS0_QUEUE_FULL);
                }
            }
        }
        q.bytes += cost;
        q.items.push_back(d);
        drop(q);
        self.notify.notify_one();
        dropped
    }

    /// Takes the oldest message if it can go now: a QoS 0 one always, a QoS 1/2 one while
    /// `window_open`. Order is kept: nothing overtakes a message waiting for the window.
    pub fn pop(&self, window_open: bool) -> Option<Delivery> {
        let mut q = self.lock();
        let front = q.items.front()?;
        if front.qos > 0 && !window_open {
            return None;
        }
        let d = q.items.pop_front()?;
        q.bytes -= d.msg.cost();
        Some(d)
    }

    /// Messages queued now.
    pub fn depth(&self) -> usize {
        self.lock().items.len()
    }

    fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

/// A node of the subscription tree: one topic level.
#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Filters that end at this level, by connection.
    here: HashMap<u64, SubOpts>,
    /// Filters `<this level>/#`, by connection.
    hash: HashMap<u64, SubOpts>,
}

impl Node {
    /// Adds or replaces `conn`'s subscription to `filter`; whether it replaced one.
    fn insert(&mut self, filter: &str, conn: u64, o: SubOpts) -> bool {
        let mut n = self;
        for level in filter.split('/') {
            if level == "#" {
                return n.hash.insert(conn, o).is_some();
            }
            n = n.children.entry(level.into()).or_default();
        }
        n.here.insert(conn, o).is_some()
    }

    /// Removes `conn`'s subscription to the filter of `levels`; whether there was one.
    fn remove(&mut self, levels: &[&str], conn: u64) -> bool {
        match levels {
            [] => self.here.remove(&conn).is_some(),
            ["#"] => self.hash.remove(&conn).is_some(),
            [first, rest @ ..] => {
                let Some(child) = self.children.get_mut(*first) else {
                    return false;
                };
                let removed = child.remove(rest, conn);
                if child.is_empty() {
                    self.children.remove(*first);
                }
                removed
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.hash.is_empty()
    }

    /// Calls `f` for every subscription matching the topic of `levels` from level `i`.
    fn matches(&self, levels: &[&str], i: usize, dollar: bool, f: &mut impl FnMut(u64, SubOpts)) {
        let wild = !(i == 0 && dollar);
        if wild {
            for (c, o) in &self.hash {
                f(*c, *o);
            }
        }
        let Some(level) = levels.get(i) else {
            for (c, o) in &self.here {
                f(*c, *o);
            }
            return;
        };
        if let Some(child) = self.children.get(*level) {
            child.matches(levels, i + 1, dollar, f);
        }
        if wild && let Some(child) = self.children.get("+") {
            child.matches(levels, i + 1, dollar, f);
        }
    }
}

#[derive(Debug, Default)]
struct Subs {
    root: Node,
    clients: HashMap<u64, Client>,
}

#[derive(Debug)]
struct Client {
    outbox: Arc<Outbox>,
    filters: BTreeMap<String, SubOpts>,
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
    /// Messages dropped from its queue since it connected.
    pub dropped: u64,
}

/// Subscriptions, subscriber queues and retained messages, shared by every MQTT connection.
#[derive(Debug)]
pub struct Broker {
    subs: RwLock<Subs>,
    /// Subscriptions in total: routing is skipped while there are none.
    count: AtomicUsize,
    retained: Mutex<BTreeMap<String, Arc<Message>>>,
    max_retained: usize,
    queue_limits: (usize, usize),
    delivered: AtomicU64,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
}

impl Broker {
    /// An empty broker with the limits of `[mqtt]`.
    pub fn new(settings: &ferry_config::MqttSettings) -> Broker {
        Broker {
            subs: RwLock::default(),
            count: AtomicUsize::new(0),
            retained: Mutex::default(),
            max_retained: settings.max_retained,
            queue_limits: (
                settings.subscriber_queue_messages.max(1),
                settings.subscriber_queue_bytes.max(1),
            ),
            delivered: AtomicU64::new(0),
            dropped: Mutex::default(),
        }
    }

    /// Loads the retained messages from the buffer file. A row that does not decode is
    /// skipped and logged (it stays in the file until its topic is retained again).
    pub fn load_retained(&self, buffer: &Buffer) -> Result<usize, ferry_buffer::ReadError> {
        let rows = buffer.state(RETAINED)?;
        let mut map = self.retained_lock();
        let (now, wall) = (Instant::now(), now_ms());
        for (key, value) in rows {
            let topic = &key[RETAINED.len()..];
            match decode_retained(topic, &value, now, wall) {
                Some(m) => {
                    map.insert(topic.to_owned(), Arc::new(m));
                }
                None => {
                    tracing::warn!(
                        topic,
                        "A retained message in the buffer file could not be read; it is ignored."
                    )
                }
            }
        }
        metrics::gauge!("ferry_mqtt_retained_messages").set(map.len() as f64);
        Ok(map.len())
    }

    fn retained_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Message>>> {
        self.retained.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subs_read(&self) -> std::sync::RwLockReadGuard<'_, Subs> {
        self.subs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn subs_write(&self) -> std::sync::RwLockWriteGuard<'_, Subs> {
        self.subs.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether anyone subscribed to anything.
    pub fn has_subscriptions(&self) -> bool {
        self.count.load(Relaxed) > 0
    }

    /// A new queue for the connection of `client` (registered at its first subscription).
    pub fn outbox(&self, client: Arc<str>) -> Arc<Outbox> {
        Arc::new(Outbox {
            client,
            notify: Notify::new(),
            max_messages: self.queue_limits.0,
            max_bytes: self.queue_limits.1,
            q: Mutex::default(),
        })
    }

    /// Subscribes connection `conn` to `filter` (valid by [`topic::check_filter`]); whether
    /// it replaced a subscription of the same filter.
    pub fn subscribe(&self, conn: u64, outbox: &Arc<Outbox>, filter: &str, o: SubOpts) -> bool {
        let mut s = self.subs_write();
        let replaced = s.root.insert(filter, conn, o);
        s.clients
            .entry(conn)
            .or_insert_with(|| Client {
                outbox: outbox.clone(),
                filters: BTreeMap::new(),
            })
            .filters
            .insert(filter.to_owned(), o);
        if !replaced {
            let n = self.count.fetch_add(1, Relaxed) + 1;
            metrics::gauge!("ferry_mqtt_subscriptions").set(n as f64);
        }
        replaced
    }

    /// Ends `conn`'s subscription to `filter`; whether it had one.
    pub fn unsubscribe(&self, conn: u64, filter: &str) -> bool {
        let mut s = self.subs_write();
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = s.root.remove(&levels, conn);
        if let Some(c) = s.clients.get_mut(&conn) {
            c.filters.remove(filter);
            if c.filters.is_empty() {
                s.clients.remove(&conn);
            }
        }
        if removed {
            let n = self.count.fetch_sub(1, Relaxed) - 1;
            metrics::gauge!("ferry_mqtt_subscriptions").set(n as f64);
        }
        removed
    }

    /// Ends every subscription of `conn` (its connection closed).
    pub fn leave(&self, conn: u64) {
        let filters: Vec<String> = match self.subs_read().clients.get(&conn) {
            Some(c) => c.filters.keys().cloned().collect(),
            None => return,
        };
        for f in filters {
            self.unsubscribe(conn, &f);
        }
    }

    /// Delivers committed publishes to the matching subscribers' queues, and applies the
    /// retained ones (see the module doc: call only after their commit).
    pub fn route(&self, msgs: &[Arc<Message>]) {
        for m in msgs.iter().filter(|m| m.keep) {
            self.apply_retained(m);
        }
        if !self.has_subscriptions() {
            return;
        }
        let s = self.subs_read();
        let mut targets: HashMap<u64, Delivery> = HashMap::new();
        for m in msgs {
            let levels: Vec<&str> = m.topic.split('/').collect();
            s.root
                .matches(&levels, 0, m.topic.starts_with('$'), &mut |conn, o| {
                    if o.no_local && conn == m.from {
                        return;
                    }
                    let d = targets.entry(conn).or_insert_with(|| Delivery {
                        msg: m.clone(),
                        qos: 0,
                        retain: false,
                        ids: Vec::new(),
                    });
                    d.qos = d.qos.max(o.qos.min(m.qos));
                    d.retain |= o.retain_as_published && m.retain;
                    d.ids.extend(o.id);
                });
            for (conn, d) in targets.drain() {
                if let Some(c) = s.clients.get(&conn)
                    && let Some(why) = c.outbox.push(d)
                {
                    self.count_drop(why, 1);
                }
            }
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

    /// Decides whether a publish with the RETAIN flag is kept as its topic's retained message
    /// (see the module doc): returns it marked, with the state write to submit with its
    /// reading.
    pub fn prepare(&self, mut m: Message) -> (Arc<Message>, Vec<StateWrite>) {
        let w = if m.retain {
            self.retained_write(&m)
        } else {
            None
        };
        m.keep = w.is_some();
        (Arc::new(m), w.into_iter().collect())
    }

    /// Decides whether a retained publish on `topic` is kept, and the write that keeps (or
    /// clears) it; `None`: not kept, counted. Replacing or clearing a topic always works.
    pub fn retained_write(&self, m: &Message) -> Option<StateWrite> {
        let key = format!("{RETAINED}{}", m.topic);
        if m.payload.is_empty() {
            return Some(StateWrite { key, value: None });
        }
        let map = self.retained_lock();
        if map.len() >= self.max_retained && !map.contains_key(&*m.topic) {
            drop(map);
            self.count_drop(drop_reason::RETAINED_FULL, 1);
            return None;
        }
        Some(StateWrite {
            key,
            value: Some(encode_retained(m)),
        })
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

    /// Counts messages that did not reach a subscriber.
    pub fn count_drop(&self, why: &'static str, n: u64) {
        *self
            .dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(why)
            .or_default() += n;
        metrics::counter!("ferry_mqtt_subscriber_dropped_total", "reason" => why).increment(n);
    }

    /// Counts a PUBLISH written to a subscriber.
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
            })
            .collect();
        v.sort_by(|a, b| a.client.cmp(&b.client));
        v
    }
}

// The retained row: version 1, qos, expiry (wall ms, 0: none), payload format indicator (0xff:
// none), content type, response topic, correlation data, user properties, payload. Strings and
// byte strings are a u32 length (u32::MAX: absent) and the bytes; integers little-endian.
fn encode_retained(m: &Message) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
    }
    let mut out = Vec::with_capacity(32 + m.payload.len());
    out.push(1);
    out.push(m.qos);
    let expires_wall = m
        .expiry_left(Instant::now())
        .map_or(0, |s| now_ms() + s as u64 * 1000);
    out.extend_from_slice(&expires_wall.to_le_bytes());
    let p = m.props.as_ref();
    out.push(p.and_then(|p| p.payload_format_indicator).unwrap_or(0xff));
    put(
        &mut out,
        p.and_then(|p| p.content_type.as_deref()).map(str::as_bytes),
    );
    put(
        &mut out,
        p.and_then(|p| p.response_topic.as_deref())
            .map(str::as_bytes),
    );
    put(&mut out, p.and_then(|p| p.correlation_data.as_deref()));
    let user = p.map_or(&[][..], |p| &p.user_properties[..]);
    out.extend_from_slice(&(user.len() as u32).to_le_bytes());
    for (k, v) in user {
        put(&mut out, Some(k.as_bytes()));
        put(&mut out, Some(v.as_bytes()));
    }
    out.extend_from_slice(&m.payload);
    out
}

fn decode_retained(topic: &str, mut b: &[u8], now: Instant, wall: u64) -> Option<Message> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    fn u32_(b: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?))
    }
    fn get<'a>(b: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
        match u32_(b)? {
            u32::MAX => Some(None),
            n => Some(Some(take(b, n as usize)?)),
        }
    }
    fn string(b: &mut &[u8]) -> Option<Option<String>> {
        match get(b)? {
            Some(s) => Some(Some(std::str::from_utf8(s).ok()?.to_owned())),
            None => Some(None),
        }
    }
    if take(&mut b, 1)? != [1] {
        return None;
    }
    let qos = take(&mut b, 1)?[0].min(2);
    let expires_wall = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
    let pfi = take(&mut b, 1)?[0];
    let content_type = string(&mut b)?;
    let response_topic = string(&mut b)?;
    let correlation_data = get(&mut b)?.map(Bytes::copy_from_slice);
    let n = u32_(&mut b)?;
    let mut user_properties = Vec::new();
    for _ in 0..n {
        user_properties.push((string(&mut b)??, string(&mut b)??));
    }
    let props = PublishProperties {
        payload_format_indicator: (pfi != 0xff).then_some(pfi),
        message_expiry_interval: None,
        topic_alias: None,
        response_topic,
        correlation_data,
        user_properties,
        subscription_identifiers: Vec::new(),
        content_type,
    };
    let empty = props.payload_format_indicator.is_none()
        && props.content_type.is_none()
        && props.response_topic.is_none()
        && props.correlation_data.is_none()
        && props.user_properties.is_empty();
    Some(Message {
        topic: Arc::from(topic),
        payload: Bytes::copy_from_slice(b),
        qos,
        retain: true,
        keep: true,
        props: (!empty).then_some(props),
        expires: (expires_wall != 0)
            .then(|| now + Duration::from_millis(expires_wall.saturating_sub(wall))),
        from: 0,
    })
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
        Broker::new(&settings)
    }

    fn msg(topic: &str, qos: u8, from: u64) -> Arc<Message> {
        Arc::new(Message {
            topic: Arc::from(topic),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            keep: false,
            props: None,
            expires: None,
            from,
        })
    }

    fn opts(qos: u8) -> SubOpts {
        SubOpts {
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
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
            let conn = i as u64 + 1;
            let ob = b.outbox(Arc::from(format!("c{conn}").as_str()));
            b.subscribe(conn, &ob, filter, opts(1));
            for t in yes.iter().chain(no.iter()) {
                b.route(&[msg(t, 1, 0)]);
            }
            let topics: Vec<String> = got(&ob).into_iter().map(|(t, _)| t).collect();
            assert_eq!(topics, yes.to_vec(), "filter {filter}");
            // The tree agrees with the reference matcher every other part of ferry uses.
            for t in yes.iter().chain(no.iter()) {
                assert_eq!(topic::matches(filter, t), yes.contains(t), "{filter} {t}");
            }
        }
    }

    #[test]
    fn overlapping_subscriptions_give_one_copy_at_the_highest_qos_and_no_local_holds() {
        let b = broker(100);
        let ob = b.outbox(Arc::from("c"));
        b.subscribe(
            1,
            &ob,
            "a/#",
            SubOpts {
                id: Some(7),
                ..opts(0)
            },
        );
        b.subscribe(
            1,
            &ob,
            "a/+",
            SubOpts {
                id: Some(9),
                ..opts(2)
            },
        );
        b.route(&[msg("a/b", 2, 0), msg("a/b", 1, 0)]);
        let d: Vec<Delivery> = std::iter::from_fn(|| ob.pop(true)).collect();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].qos, d[1].qos), (2, 1));
        let mut ids = d[0].ids.clone();
        ids.sort();
        assert_eq!(ids, [7, 9]);
        // No Local: the subscriber's own publish does not come back.
        b.subscribe(
            1,
            &ob,
            "a/+",
            SubOpts {
                no_local: true,
                ..opts(1)
            },
        );
        b.unsubscribe(1, "a/#");
        b.route(&[msg("a/b", 1, 1), msg("a/b", 1, 2)]);
        assert_eq!(got(&ob), [("a/b".to_string(), 1)]);
        // Leaving removes everything, and routing stops.
        b.leave(1);
        assert!(!b.has_subscriptions());
        assert!(b.subscribers().is_empty());
        assert!(b.subs_read().root.is_empty());
    }

    #[test]
    fn a_full_queue_drops_qos0_first_then_new_messages_and_counts_them() {
        let b = broker(3);
        let ob = b.outbox(Arc::from("slow"));
        b.subscribe(1, &ob, "#", opts(2));
        b.route(&[msg("q1/a", 1, 0), msg("q0/a", 0, 0), msg("q1/b", 1, 0)]);
        // Full: a QoS 0 message is dropped itself; a QoS 1 one displaces the queued QoS 0.
        b.route(&[msg("q0/b", 0, 0), msg("q1/c", 1, 0), msg("q1/d", 1, 0)]);
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
    fn a_message_waiting_for_the_window_is_not_overtaken() {
        let b = broker(10);
        let ob = b.outbox(Arc::from("c"));
        b.subscribe(1, &ob, "#", opts(1));
        b.route(&[msg("a", 1, 0), msg("b", 0, 0)]);
        assert!(ob.pop(false).is_none());
        assert_eq!(ob.pop(true).unwrap().msg.topic.as_ref(), "a");
        assert_eq!(ob.pop(false).unwrap().msg.topic.as_ref(), "b");
    }

    #[test]
    fn retained_rows_round_trip_and_the_limit_spares_replacements() {
        let b = broker(10);
        let mut m = Message {
            topic: Arc::from("t/1"),
            payload: Bytes::from_static(b"21.5"),
            qos: 1,
            retain: true,
            keep: true,
            props: Some(PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: None,
                topic_alias: None,
                response_topic: Some("r/1".into()),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![("k".into(), "v".into())],
                subscription_identifiers: Vec::new(),
                content_type: Some("text/plain".into()),
            }),
            expires: Some(Instant::now() + Duration::from_secs(100)),
            from: 3,
        };
        let w = b.retained_write(&m).unwrap();
        assert_eq!(w.key, "retained/t/1");
        let back =
            decode_retained("t/1", w.value.as_ref().unwrap(), Instant::now(), now_ms()).unwrap();
        assert_eq!(
            (back.qos, &back.payload, &back.props),
            (1, &m.payload, &m.props)
        );
        assert!((95..=100).contains(&back.expiry_left(Instant::now()).unwrap()));
        assert!(decode_retained("t/1", &w.value.unwrap()[..10], Instant::now(), 0).is_none());

        // max_retained = 2: a third topic is refused, a replacement is not.
        for t in ["t/1", "t/2"] {
            m.topic = Arc::from(t);
            b.route(&[Arc::new(Message {
                props: None,
                expires: None,
                ..clone_msg(&m)
            })]);
        }
        m.topic = Arc::from("t/3");
        assert!(b.retained_write(&m).is_none());
        m.topic = Arc::from("t/2");
        assert!(b.retained_write(&m).is_some());
        assert_eq!(b.retained_matching("t/+").len(), 2);
        // An empty payload clears.
        m.payload = Bytes::new();
        assert_eq!(b.retained_write(&m).unwrap().value, None);
        b.route(&[Arc::new(clone_msg(&m))]);
        assert_eq!(b.retained_count(), 1);
    }

    fn clone_msg(m: &Message) -> Message {
        Message {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            props: m.props.clone(),
            ..*m
        }
    }
}
