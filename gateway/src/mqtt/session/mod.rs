//! One MQTT connection, from CONNECT to close.
//!
//! One task per connection reads and frames packets (rumqttd's codecs), runs the state
//! machine, encodes its replies into one output buffer and writes that buffer whenever the
//! socket takes it, all in one `select!`: a client that stops reading stops being read (at
//! [`OUT_HIGH`] unwritten bytes) and is cut off after `write_timeout_ms` without progress.
//!
//! Memory per connection is kept small because a Pi may hold a thousand of them: the read
//! buffer starts at [`READ_MIN`], grows while reads fill it (up to [`READ_MAX`] per read),
//! is given back when a connection goes quiet, and is otherwise reused in place, which works
//! only because nothing keeps a slice of it (payloads and wills are copied out); and there
//! is no second task or channel per connection for writing.
//! Publishes framed from one read go to the buffer as one append; the append futures of a
//! connection sit in a `FuturesOrdered`, so acks go out in publish order while the connection
//! keeps reading (up to `max_inflight` unacknowledged QoS 1/2 publishes). While the readings
//! of all connections that await their commit are over `buffer.max_pending_bytes` (a stalled
//! disk), connections stop reading their sockets until a commit frees room, and count it in
//! `ferry_mqtt_read_pauses_total`; the keep-alive does not run meanwhile. Each fall below the
//! cap gives every connection paused before it one read, so none is starved by the others.
//!
//! ## Files
//! - this file: the connection's lifecycle ([`serve`]), its loop (reads, writes, pacing,
//!   keep-alive) and packet dispatch;
//! - [`connect`]: reading the CONNECT, admission (client id, credentials, TLS identity), the
//!   will, and refusals;
//! - [`acks`]: a publish from framing to its ack: batching into appends, the ordered ack
//!   queue, refusals of single publishes;
//! - [`io`]: the codec, socket reads and writes, and what is read from a frame before it is
//!   decoded.

mod acks;
mod connect;
mod deliver;
mod io;

use acks::*;
#[cfg(test)]
pub(crate) use connect::client_id_rule;
use connect::*;
pub(crate) use connect::{device_id, refuse_busy};
use deliver::*;
use io::*;

use super::auth::{Auth, AuthConfigError, AuthOutcome};
use super::broker::{self, Broker, Message, Outbox};
use super::stats::{MqttStats, reason};
use bytes::{Buf, Bytes, BytesMut};
use ferry_buffer::{AppendError, Buffer, Reading, Source, now_ms};
use ferry_config::{MqttSettings, topic};
use ferry_uplink::fold::Say;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Error as CodecError, LastWill, LastWillProperties, Login, Packet,
    PingResp, PubAck, PubAckProperties, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecProperties, PubRecReason, Publish, PublishProperties, SubAck, SubscribeReasonCode,
    UnsubAck, UnsubAckReason,
};
use rumqttd::protocol::{Protocol, v4, v5};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Room for the topic, packet id and v5 properties on top of `max_payload_bytes`: a PUBLISH
/// whose remaining length exceeds `max_payload_bytes + FRAME_HEADROOM` is refused from its
/// fixed header, before its body is buffered.
pub const FRAME_HEADROOM: usize = 16 * 1024;
/// Largest CONNECT accepted (it may carry a will as large as a publish).
const MIN_CONNECT_LIMIT: usize = 64 * 1024;
/// Publishes gathered into one append at most (also bounded by `BATCH_BYTES`).
const BATCH_READINGS: usize = 1024;
const BATCH_BYTES: usize = 1 << 20;
/// Initial read buffer, and the least free room a read asks for. An MQTT telemetry publish is
/// a few hundred bytes; a larger frame grows the buffer as it needs.
const READ_MIN: usize = 512;
/// The most free room a read asks for, reached by doubling while reads fill the buffer (a
/// busy, pipelining client), so such a client still gets dozens of publishes per read. Small,
/// because when ferry falls behind every connection's reads fill the buffer at once.
const READ_MAX: usize = 4 * 1024;
/// Unwritten reply bytes at which a session stops reading its client until the socket takes
/// some: a client that does not read its acks gets no more publishes taken.
const OUT_HIGH: usize = 64 * 1024;
/// Retry period while a v3.1.1 ack is withheld because the buffer is full.
const FULL_RETRY: Duration = Duration::from_millis(200);

/// State shared by every MQTT connection (plain and TLS).
#[derive(Debug)]
pub struct Ctx {
    /// `[mqtt]`.
    pub settings: MqttSettings,
    /// Where readings go.
    pub buffer: Buffer,
    /// `[[mqtt.users]]`.
    pub auth: Auth,
    /// Status-page figures.
    pub stats: MqttStats,
    /// `buffer.when_full = "reject"`.
    pub reject_when_full: bool,
    /// Largest remaining length of a packet after CONNECT.
    pub frame_limit: usize,
    /// `max_connections` slots, shared by the plain and TLS listeners.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The status page's device table, fed once per committed batch.
    pub devices: crate::status::DeviceTable,
    /// Subscriptions, subscriber queues and retained messages.
    pub broker: Arc<Broker>,
    /// `[[mqtt.acl]]`.
    pub acl: super::acl::Acl,
    sessions: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_id: AtomicU64,
}

impl Ctx {
    /// Builds the shared state.
    pub fn new(
        settings: MqttSettings,
        buffer: Buffer,
        reject_when_full: bool,
    ) -> Result<Ctx, AuthConfigError> {
        let broker = Arc::new(Broker::new(&settings, Some(buffer.clone())));
        match broker.load(&buffer) {
            Ok(timers) => {
                let (retained, sessions) = (broker.retained_count(), broker.sessions());
                if retained + sessions > 0 {
                    tracing::info!(
                        retained,
                        sessions,
                        "Retained MQTT messages and persistent sessions were loaded from the buffer file."
                    );
                }
                for (client, after, generation) in timers {
                    expire_after(&broker, client, after, generation);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "The retained MQTT messages and persistent sessions could not be read from the buffer file; they are not served until published or subscribed again.")
            }
        }
        let stats = MqttStats::default();
        stats.set_broker(broker.clone());
        let acl = super::acl::Acl::new(&settings.acl);
        Ok(Ctx {
            auth: Auth::new(&settings)?,
            frame_limit: settings.max_payload_bytes.saturating_add(FRAME_HEADROOM),
            slots: Arc::new(tokio::sync::Semaphore::new(settings.max_connections.max(1))),
            settings,
            buffer,
            stats,
            devices: crate::status::DeviceTable::default(),
            broker,
            acl,
            reject_when_full,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a session; an older one with the same client id is told to go.
    fn take_over(&self, client_id: &str, conn: u64, token: CancellationToken) -> bool {
        let old = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_owned(), (conn, token));
        match old {
            Some((_, t)) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether a connection with this client id is open.
    fn is_connected(&self, client_id: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(client_id)
    }

    fn deregister(&self, client_id: &str, conn: u64) {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(client_id).is_some_and(|(c, _)| *c == conn) {
            m.remove(client_id);
        }
    }
}

/// Why a connection closes, and what that implies.
#[derive(Debug)]
struct Close {
    /// For the log and `ferry_mqtt_rejected_total` (None: an ordinary close).
    reason: Option<&'static str>,
    /// What the log says.
    message: String,
    /// v5 DISCONNECT reason code to send, if any.
    v5: Option<DisconnectReasonCode>,
    /// Whether the last will is ingested.
    will: bool,
    /// The socket failed or stopped taking writes: nothing more is written to it.
    write_failed: bool,
}

impl Close {
    fn lost(message: impl Into<String>) -> Close {
        Close {
            reason: None,
            message: message.into(),
            v5: None,
            will: true,
            write_failed: false,
        }
    }
    fn error(reason: &'static str, v5: DisconnectReasonCode, message: impl Into<String>) -> Close {
        Close {
            reason: Some(reason),
            message: message.into(),
            v5: Some(v5),
            will: true,
            write_failed: false,
        }
    }
}

struct Session {
    ctx: Arc<Ctx>,
    codec: Codec,
    client_id: Arc<str>,
    cert_cn: Option<String>,
    /// Replies encoded and not yet written.
    out: BytesMut,
    pending: FuturesOrdered<BoxFuture<'static, Done>>,
    inflight: usize,
    qos2: HashSet<u16>,
    batch: Batch,
    /// This connection's id (for No Local and the subscription table).
    conn: u64,
    /// What `[[mqtt.acl]]` allows this client; `None`: anything.
    acl: Option<super::acl::ClientAcl>,
    sub: Subscriber,
}

/// Serves one accepted connection until it closes. `cert_cn` is the TLS client certificate's
/// CN when `device_from_cert_cn` is on; `Some("")` means the certificate has none.
pub async fn serve<IO>(
    ctx: Arc<Ctx>,
    mut io: IO,
    peer: SocketAddr,
    cert_cn: Option<String>,
    deadline: Instant,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(READ_MIN);
    let connect_limit = ctx.frame_limit.max(MIN_CONNECT_LIMIT);
    // CONNECT, within the connect timeout.
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_connect(&mut io, &mut buf, connect_limit)) => r,
        _ = stop.cancelled() => return,
    };
    let (codec, packet) = match first {
        Err(_) => {
            ctx.stats.rejected(reason::CONNECT_TIMEOUT, 1);
            tracing::info!(peer = %peer, "A client sent no CONNECT within connect_timeout_ms; the connection is closed.");
            return;
        }
        Ok(Err(ConnectError::Io(e))) => {
            tracing::debug!(peer = %peer, error = %e, "A client closed the connection before CONNECT.");
            return;
        }
        Ok(Err(ConnectError::Version(level))) => {
            ctx.stats.rejected(reason::PROTOCOL_VERSION, 1);
            tracing::info!(peer = %peer, level, "A client asked for an unsupported MQTT protocol level; CONNACK 0x01 is sent.");
            let mut out = BytesMut::new();
            let _ = v4::V4.write(
                Packet::ConnAck(
                    ConnAck {
                        session_present: false,
                        code: ConnectReturnCode::RefusedProtocolVersion,
                    },
                    None,
                ),
                &mut out,
            );
            let _ = io.write_all(&out).await;
            let _ = io.shutdown().await;
            return;
        }
        Ok(Err(ConnectError::Malformed(why))) => {
            ctx.stats.rejected(reason::PROTOCOL, 1);
            tracing::info!(peer = %peer, error = %why, "A client's first packet is not a valid CONNECT; the connection is closed.");
            return;
        }
        Ok(Ok(x)) => x,
    };
    let Packet::Connect(mut connect, connect_props, will, will_props, login) = packet else {
        return;
    };
    let conn = ctx.next_conn_id();
    let v5 = codec.is_v5();

    // Admission: client id, credentials, TLS identity.
    let admitted = admit(&ctx, &connect, login.as_ref(), cert_cn.as_deref(), conn).await;
    if let Err((why, code, message)) = admitted {
        ctx.stats.rejected(why, 1);
        match ctx.stats.fold_refusal(&format!("CONNECT {why}: {message}")) {
            Say::New => tracing::info!(peer = %peer, client_id = %connect.client_id, reason = why,
                "A CONNECT was refused: {message}."),
            Say::Again(n) => tracing::info!(peer = %peer, client_id = %connect.client_id,
                reason = why, repeats = n, "CONNECTs keep being refused: {message}."),
            Say::Quiet => {}
        }
        refuse_connect(&mut io, &codec, code).await;
        return;
    }
    let mut out = BytesMut::new();
    let (client_id, assigned) = admitted.unwrap_or_default();
    let client: Arc<str> = Arc::from(client_id.as_str());
    let acl = ctx.acl.for_client(
        login.as_ref().map(|l| l.username.as_str()),
        cert_cn.as_deref().filter(|c| !c.is_empty()),
        &client_id,
    );
    // 3.1.1: clean session 0 is a session that never expires. MQTT 5: the session expiry
    // interval says how long it outlives the connection, and clean start 0 resumes it.
    let persist = if v5 {
        connect_props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .filter(|s| *s > 0)
    } else {
        (!connect.clean_session).then_some(broker::NEVER)
    };
    let mut start = match ctx
        .broker
        .start_session(&client, conn, persist, !connect.clean_session)
    {
        Ok(start) => start,
        Err(max) => {
            ctx.stats.rejected(reason::SESSIONS, 1);
            if let Say::New | Say::Again(_) = ctx.stats.fold_refusal("CONNECT sessions") {
                tracing::warn!(client_id = %client_id, max, "A CONNECT asking for a persistent session was refused: mqtt.max_sessions persistent sessions exist.");
            }
            let code = if v5 {
                ConnectReturnCode::QuotaExceeded
            } else {
                ConnectReturnCode::ServiceUnavailable
            };
            refuse_connect(&mut io, &codec, code).await;
            return;
        }
    };
    let writes = std::mem::take(&mut start.writes);
    if !writes.is_empty() {
        drop(ctx.buffer.submit_with_state(Vec::new(), writes));
    }
    // MQTT 5 Server Keep Alive: a keep alive of 0 (none) or above `mqtt.max_keep_alive_secs`
    // is replaced by it, and the client told so. 3.1.1 cannot be told: its value stands.
    let max_ka = ctx.settings.max_keep_alive_secs;
    let server_ka = (v5 && max_ka > 0 && (connect.keep_alive == 0 || connect.keep_alive > max_ka))
        .then_some(max_ka);
    if let Some(k) = server_ka {
        connect.keep_alive = k;
    }
    let props = v5.then(|| ConnAckProperties {
        server_keep_alive: server_ka,
        receive_max: Some(ctx.settings.max_inflight.max(1)),
        max_packet_size: Some((ctx.frame_limit + 5).min(u32::MAX as usize) as u32),
        assigned_client_identifier: assigned.then(|| client_id.clone()),
        // Retained messages, wildcards, subscription identifiers and shared subscriptions
        // are available: absent means available.
        ..Default::default()
    });
    let _ = codec.write(
        Packet::ConnAck(
            ConnAck {
                session_present: start.present,
                code: ConnectReturnCode::Success,
            },
            props,
        ),
        &mut out,
    );
    if io.write_all(&out).await.is_err() {
        return;
    }
    let takeover = CancellationToken::new();
    if ctx.take_over(&client_id, conn, takeover.clone()) {
        tracing::info!(client_id = %client_id, peer = %peer, "A new connection took over the session of client id {client_id}.");
    }
    ctx.stats.connected();
    tracing::debug!(client_id = %client_id, peer = %peer, v5, keep_alive = connect.keep_alive, "An MQTT client connected.");

    // MQTT 5 Will Delay Interval: it only matters while the session outlives the connection.
    let will_delay = will_props
        .as_ref()
        .and_then(|p| p.delay_interval)
        .unwrap_or(0)
        .min(persist.unwrap_or(0));
    let will = will.and_then(|w| {
        let (qos, retain) = (w.qos as u8, w.retain);
        let r = will_reading(&ctx, &client_id, cert_cn.as_deref(), w, will_props)?;
        Some((will_message(&r, qos, retain, conn), r))
    });
    // What the client takes unacknowledged: its Receive Maximum (MQTT 5; 65,535 when absent),
    // or `mqtt.max_inflight` for 3.1.1, which has no such limit.
    let window = match (v5, connect_props.as_ref().and_then(|p| p.receive_maximum)) {
        (true, r) => r.unwrap_or(u16::MAX),
        (false, _) => ctx.settings.max_inflight,
    };
    let max_packet = connect_props.as_ref().and_then(|p| p.max_packet_size);
    let alias_max = connect_props
        .as_ref()
        .and_then(|p| p.topic_alias_max)
        .unwrap_or(0);
    let (rd, mut wr) = tokio::io::split(io);
    let mut s = Session {
        ctx: ctx.clone(),
        codec,
        client_id: client.clone(),
        cert_cn: cert_cn.filter(|c| !c.is_empty()),
        out: BytesMut::new(),
        pending: FuturesOrdered::new(),
        inflight: 0,
        qos2: std::mem::take(&mut start.in_qos2),
        batch: Batch::default(),
        conn,
        acl: acl.clone(),
        sub: Subscriber::new(&start, (window as usize, max_packet, alias_max)),
    };
    s.resend_rel(start.rel);
    let close = s.run(rd, &mut wr, buf, &connect, stop, takeover).await;
    // Finish what is owed: every append already went to the buffer; send the acks that
    // can still be delivered, in order.
    while let Some(done) = s.pending.next().await {
        if s.on_done(done).is_err() {
            break;
        }
    }
    if let (true, Some(code)) = (v5, close.v5) {
        // Always with properties: rumqttd 0.20's v5 DISCONNECT writer miscounts the remaining
        // length of a non-zero reason code without properties.
        let props = DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(close.message.clone()),
            user_properties: Vec::new(),
            server_reference: None,
        };
        s.queue(Packet::Disconnect(
            Disconnect { reason_code: code },
            Some(props),
        ));
    }
    match close.reason {
        Some(r) => {
            ctx.stats.rejected(r, 1);
            tracing::info!(client_id = %client_id, peer = %peer, reason = r, "The MQTT connection is closed: {}.", close.message);
        }
        None => {
            tracing::debug!(client_id = %client_id, peer = %peer, "The MQTT connection is closed: {}.", close.message)
        }
    }
    if !close.write_failed {
        let out = std::mem::take(&mut s.out);
        let finish = async {
            wr.write_all(&out).await?;
            wr.flush().await?;
            wr.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), finish).await;
    }
    let left = s.sub.leftover(std::mem::take(&mut s.qos2));
    let sid = s.sub.sid;
    drop(s);
    if let Some((after, generation)) = ctx.broker.end_session(&client, conn, sid, left) {
        expire_after(&ctx.broker, client.clone(), after, generation);
    }
    ctx.deregister(&client_id, conn);
    ctx.stats.disconnected();
    let will = will.filter(|(_, w)| {
        let allowed = acl.as_ref().is_none_or(|a| a.may_publish(&w.topic));
        if !allowed {
            ctx.stats.rejected(reason::ACL_PUBLISH, 1);
            tracing::info!(client_id = %client_id, topic = %w.topic, "The client's last will is not published: [[mqtt.acl]] does not allow it that topic.");
        }
        allowed
    });
    if let (true, Some((msg, w))) = (close.will, will) {
        if will_delay == 0 {
            publish_will(&ctx, &client_id, msg, w).await;
        } else {
            // Published after the delay, unless the client is back by then. Kept in memory: a
            // ferry that stops meanwhile does not publish it.
            tracing::debug!(client_id = %client_id, delay_s = will_delay, "The client's last will waits for its will delay.");
            let ctx = ctx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(will_delay as u64)).await;
                if ctx.is_connected(&client_id) {
                    tracing::info!(client_id = %client_id, "The client came back within its will delay; its last will is not published.");
                } else {
                    publish_will(&ctx, &client_id, msg, w).await;
                }
            });
        }
    }
}

/// Stores the will as a reading and delivers it to local subscribers.
async fn publish_will(ctx: &Ctx, client_id: &str, msg: Message, w: Reading) {
    let topic = w.topic.clone();
    let seen = crate::status::DeviceBatch::of(std::slice::from_ref(&w));
    let p = ctx.broker.prepare(msg);
    match ctx.buffer.submit_with_state(vec![w], p.writes).await {
        Ok(_) => {
            ctx.stats.will();
            ctx.devices.record(&seen);
            ctx.broker.route(&[p.msg], p.durable);
            tracing::info!(client_id = %client_id, topic = %topic, "The client's last will was stored as a reading.");
        }
        Err(e) => {
            tracing::warn!(client_id = %client_id, error = %e, "The client's last will could not be stored.")
        }
    }
}

/// Ends `client`'s persistent session after `after` offline, unless it came back since.
fn expire_after(broker: &Arc<Broker>, client: Arc<str>, after: Duration, generation: u64) {
    let broker = broker.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        broker.expire(&client, generation);
    });
}

impl Session {
    fn v5(&self) -> bool {
        self.codec.is_v5()
    }

    /// Encodes `p` behind the replies not yet written; `run` writes them in order.
    fn queue(&mut self, p: Packet) {
        let _ = self.codec.write(p, &mut self.out);
    }

    fn can_take_more(&self) -> bool {
        self.inflight < self.ctx.settings.max_inflight.max(1) as usize
            && self.pending.len() < self.ctx.settings.max_inflight.max(1) as usize * 2
    }

    async fn run<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        mut rd: R,
        wr: &mut W,
        mut buf: BytesMut,
        connect: &Connect,
        stop: CancellationToken,
        takeover: CancellationToken,
    ) -> Close {
        let ka = Duration::from_millis(connect.keep_alive as u64 * 1500);
        let mut last_rx = Instant::now();
        let mut room = READ_MIN;
        // A client that stops reading its socket fills the kernel buffers; then no write makes
        // progress, and without a limit the connection, its slot and its task would live as
        // long as the client wants. So the output must make progress within
        // `mqtt.write_timeout_ms`.
        let write_timeout = Duration::from_millis(self.ctx.settings.write_timeout_ms.max(1));
        let mut write_by = Instant::now() + write_timeout;
        // Bytes handed to a writer that buffers (TLS) and not yet flushed.
        let mut unflushed = false;
        // Paused for `buffer.max_pending_bytes` at this room generation; `granted`: room was
        // freed since, one read may go ahead.
        let mut paused_at: Option<u64> = None;
        let mut granted = false;
        loop {
            // Frame and handle what is buffered, as far as the inflight window allows.
            while self.can_take_more() {
                match self.next_packet(&mut buf).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(c) => {
                        self.flush_batch();
                        return c;
                    }
                }
            }
            self.flush_batch();
            // After the client's acks were read: they may have opened its window.
            self.drain_outbox();
            let wants_read = self.can_take_more() && self.out.len() < OUT_HIGH;
            // Readings awaiting commit over `buffer.max_pending_bytes` (a stalled disk): stop
            // reading, so the excess waits in the client and the kernel, not in memory.
            if wants_read && !granted {
                match paused_at {
                    // Room was freed since the pause: one read, even if other connections
                    // have filled the room again by now, so that none is starved.
                    Some(g) if self.ctx.buffer.room_generation() > g => {
                        paused_at = None;
                        granted = true;
                        // The client's packets were not read meanwhile: not its silence.
                        last_rx = Instant::now();
                    }
                    Some(_) => {}
                    None => {
                        let g = self.ctx.buffer.room_generation();
                        if self.ctx.buffer.pending_over() {
                            paused_at = Some(g);
                            self.ctx.stats.read_paused();
                        }
                    }
                }
            }
            let paused = paused_at.is_some();
            let reading = wants_read && !paused;
            let writing = !self.out.is_empty() || unflushed;
            if !writing {
                write_by = Instant::now() + write_timeout;
            }
            let ka_on = connect.keep_alive > 0 && self.pending.is_empty() && !paused;
            let outbox = self
                .sub
                .outbox
                .clone()
                .filter(|_| self.out.len() < OUT_HIGH);
            tokio::select! {
                () = async { if let Some(o) = &outbox { o.notify.notified().await } }, if outbox.is_some() => {}
                _ = stop.cancelled() => {
                    return Close { reason: None, message: "ferry is shutting down".into(), v5: Some(DisconnectReasonCode::ServerShuttingDown), will: false, write_failed: false };
                }
                _ = takeover.cancelled() => {
                    return Close { reason: None, message: "another connection took over the client id".into(), v5: Some(DisconnectReasonCode::SessionTakenOver), will: false, write_failed: false };
                }
                r = write_some(wr, &self.out), if writing => {
                    match r {
                        Ok(n) => {
                            // n bytes taken, to be flushed; or 0: flushed.
                            self.out.advance(n);
                            unflushed = n > 0;
                            write_by = Instant::now() + write_timeout;
                        }
                        Err(e) => {
                            let mut c = Close::lost(format!("write error: {e}"));
                            c.write_failed = true;
                            return c;
                        }
                    }
                }
                _ = tokio::time::sleep_until(write_by), if writing => {
                    let mut c = Close::error(reason::WRITE_TIMEOUT, DisconnectReasonCode::ImplementationSpecificError,
                        format!("the client does not read its socket: a reply could not be written within write_timeout_ms ({} ms)", self.ctx.settings.write_timeout_ms));
                    c.write_failed = true;
                    return c;
                }
                Some(done) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(c) = self.on_done(done) {
                        return c;
                    }
                }
                () = self.ctx.buffer.room_since(paused_at.unwrap_or(0)), if paused && wants_read => {}
                r = read_some(&mut rd, &mut buf, &mut room), if reading => {
                    granted = false;
                    match r {
                        Ok(0) => return Close::lost("the client closed the connection without DISCONNECT"),
                        Ok(_) => last_rx = Instant::now(),
                        Err(e) => return Close::lost(format!("read error: {e}")),
                    }
                }
                _ = tokio::time::sleep_until(last_rx + ka), if ka_on => {
                    return Close::error(reason::KEEP_ALIVE, DisconnectReasonCode::KeepAliveTimeout,
                        format!("no packet for 1.5 x the keep-alive of {} s", connect.keep_alive));
                }
            }
        }
    }

    /// Frames and handles one packet. `Ok(false)`: more bytes are needed.
    async fn next_packet(&mut self, buf: &mut BytesMut) -> Result<bool, Close> {
        let limit = self.ctx.frame_limit;
        let fh = match v4::check(buf.iter(), limit) {
            Ok(fh) => fh,
            Err(CodecError::InsufficientBytes(_)) => return Ok(false),
            Err(CodecError::PayloadSizeLimitExceeded(n)) => {
                return Err(Close::error(
                    reason::TOO_LARGE,
                    DisconnectReasonCode::PacketTooLarge,
                    format!(
                        "a packet of {n} bytes exceeds max_payload_bytes ({}) plus headroom",
                        self.ctx.settings.max_payload_bytes
                    ),
                ));
            }
            Err(e) => {
                return Err(Close::error(
                    reason::PROTOCOL,
                    DisconnectReasonCode::MalformedPacket,
                    format!("malformed packet: {e}"),
                ));
            }
        };
        let ptype = fh.byte1 >> 4;
        // Types a client never sends; rumqttd's v5 decoder would panic on some of them.
        if matches!(ptype, 0 | 1 | 2 | 9 | 11 | 13 | 15) {
            return Err(Close::error(
                reason::PROTOCOL,
                DisconnectReasonCode::ProtocolError,
                format!("unexpected packet type {ptype} from a client"),
            ));
        }
        let meta =
            (ptype == 3).then(|| publish_meta(&buf[..fh.frame_length()], fh.fixed_header_len));
        let packet = self.codec.read(buf, limit).map_err(|e| {
            Close::error(
                reason::PROTOCOL,
                DisconnectReasonCode::MalformedPacket,
                format!("malformed packet: {e}"),
            )
        })?;
        match packet {
            Packet::Publish(p, props) => {
                let (qos, dup, pkid) = meta.unwrap_or_default();
                self.on_publish(p, props, qos, dup, pkid).await?;
            }
            Packet::PubRel(rel, _) => {
                let known = self.qos2.remove(&rel.pkid);
                let reason = if known || !self.v5() {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                let comp = Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason,
                    },
                    None,
                );
                if known && self.sub.persistent {
                    // The packet id is free again only once that is on disk: else, after a
                    // crash, a new publish reusing it would be taken for a re-send.
                    let row = Broker::in_qos2_row(&self.client_id, rel.pkid, false);
                    let committed = self.ctx.buffer.submit_with_state(Vec::new(), vec![row]);
                    self.flush_batch();
                    self.pending.push_back(Box::pin(async move {
                        let _ = committed.await;
                        Done::Reply(vec![comp])
                    }));
                } else {
                    self.queue(comp);
                }
            }
            Packet::PingReq(_) => self.queue(Packet::PingResp(PingResp)),
            Packet::Subscribe(sub, props) => self.on_subscribe(sub, props)?,
            Packet::Unsubscribe(unsub, _) => self.on_unsubscribe(unsub),
            Packet::Disconnect(d, _) => {
                let with_will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                return Err(Close {
                    reason: None,
                    message: "the client sent DISCONNECT".into(),
                    v5: None,
                    will: with_will,
                    write_failed: false,
                });
            }
            // Answers to the PUBLISHes ferry sent to this client as a subscriber.
            p @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                self.on_client_ack(&p)
            }
            other => {
                return Err(Close::error(
                    reason::PROTOCOL,
                    DisconnectReasonCode::ProtocolError,
                    format!("unexpected {:?} packet", std::mem::discriminant(&other)),
                ));
            }
        }
        Ok(true)
    }
}
