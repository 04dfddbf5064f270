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

use super::auth::{Auth, AuthConfigError, AuthOutcome};
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
        Ok(Ctx {
            auth: Auth::new(&settings)?,
            frame_limit: settings.max_payload_bytes.saturating_add(FRAME_HEADROOM),
            slots: Arc::new(tokio::sync::Semaphore::new(settings.max_connections.max(1))),
            settings,
            buffer,
            stats: MqttStats::default(),
            devices: crate::status::DeviceTable::default(),
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

    fn deregister(&self, client_id: &str, conn: u64) {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(client_id).is_some_and(|(c, _)| *c == conn) {
            m.remove(client_id);
        }
    }
}

/// The codec of one connection, chosen from the CONNECT's protocol level.
#[derive(Debug, Clone)]
enum Codec {
    V4(v4::V4),
    V5(v5::V5),
}

impl Codec {
    fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, CodecError> {
        // rumqttd's decoders have had `unreachable!()` arms for unexpected packet types; the
        // caller filters those, and this keeps any other panic to one closed connection.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self {
            Codec::V4(c) => c.read_mut(buf, max),
            Codec::V5(c) => c.read_mut(buf, max),
        }))
        .unwrap_or(Err(CodecError::MalformedPacket))
    }

    fn write(&self, p: Packet, out: &mut BytesMut) -> Result<usize, CodecError> {
        match self {
            Codec::V4(c) => c.write(p, out),
            Codec::V5(c) => c.write(p, out),
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

/// Where a PUBLISH's QoS, DUP flag and packet id live in its frame. rumqttd parses them but
/// keeps the fields crate-private, so they are read from the frame before decoding.
fn publish_meta(frame: &[u8], fixed_header_len: usize) -> (u8, bool, u16) {
    let byte1 = frame[0];
    let qos = (byte1 >> 1) & 0b11;
    let dup = byte1 & 0b1000 != 0;
    let mut pkid = 0;
    if qos > 0 {
        let at = fixed_header_len;
        if let Some(t) = frame.get(at..at + 2) {
            let tlen = u16::from_be_bytes([t[0], t[1]]) as usize;
            if let Some(p) = frame.get(at + 2 + tlen..at + 4 + tlen) {
                pkid = u16::from_be_bytes([p[0], p[1]]);
            }
        }
    }
    (qos, dup, pkid)
}

/// The device id of a reading: the certificate CN, else the topic level, else the client id.
pub fn device_id<'a>(
    cert_cn: Option<&'a str>,
    level: Option<usize>,
    topic: &'a str,
    client_id: &'a str,
) -> &'a str {
    if let Some(cn) = cert_cn {
        return cn;
    }
    if let Some(l) = level.and_then(|n| topic.split('/').nth(n).filter(|l| !l.is_empty())) {
        return l;
    }
    client_id
}

/// Client id rule: an empty id gets an assigned one with clean session, and is refused
/// without it. Returns the id to use and whether it was assigned.
pub fn client_id_rule(id: &str, clean: bool, conn: u64) -> Option<(String, bool)> {
    if !id.is_empty() {
        return Some((id.to_owned(), false));
    }
    clean.then(|| (format!("ferry-auto-{:x}-{conn:x}", now_ms()), true))
}

/// A finished entry of the ordered ack queue.
enum Done {
    /// An append completed (or failed) for these publishes.
    Appended {
        acks: Vec<(u16, u8)>,
        by_qos: [u64; 3],
        started: Instant,
        result: Result<(), AppendError>,
    },
    /// Answers that must keep their place in the order (rejections, DUP re-sends).
    Reply(Vec<Packet>),
    /// A QoS 2 DUP re-send: PUBREC again if the original was stored.
    Dup(u16),
}

#[derive(Default)]
struct Batch {
    readings: Vec<Reading>,
    acks: Vec<(u16, u8)>,
    by_qos: [u64; 3],
    bytes: usize,
    started: Option<Instant>,
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
    let Packet::Connect(connect, connect_props, will, will_props, login) = packet else {
        return;
    };
    let _ = connect_props;
    let conn = ctx.next_conn_id();
    let v5 = codec.is_v5();

    // Admission: client id, credentials, TLS identity.
    let refuse = |code_v4: ConnectReturnCode, code_v5: ConnectReturnCode| {
        if v5 { code_v5 } else { code_v4 }
    };
    let mut refusal = None;
    let id = client_id_rule(&connect.client_id, connect.clean_session, conn);
    if id.is_none() {
        refusal = Some((
            reason::CLIENT_ID,
            refuse(
                ConnectReturnCode::ClientIdentifierNotValid,
                ConnectReturnCode::ClientIdentifierNotValid,
            ),
            "an empty client id needs clean session".to_string(),
        ));
    }
    if refusal.is_none() {
        let creds = login
            .as_ref()
            .map(|l: &Login| (l.username.as_str(), l.password.as_str()));
        match ctx.auth.check(creds).await {
            AuthOutcome::Allowed => {}
            AuthOutcome::BadCredentials => {
                refusal = Some((
                    reason::BAD_CREDENTIALS,
                    refuse(
                        ConnectReturnCode::BadUserNamePassword,
                        ConnectReturnCode::BadUserNamePassword,
                    ),
                    format!(
                        "bad username or password for user '{}'",
                        creds.map(|c| c.0).unwrap_or("")
                    ),
                ))
            }
            AuthOutcome::NotAuthorized => {
                refusal = Some((
                    reason::NOT_AUTHORIZED,
                    refuse(
                        ConnectReturnCode::NotAuthorized,
                        ConnectReturnCode::NotAuthorized,
                    ),
                    "anonymous clients are not allowed".to_string(),
                ))
            }
        }
    }
    if refusal.is_none() && cert_cn.as_deref() == Some("") {
        refusal = Some((
            reason::NOT_AUTHORIZED,
            refuse(
                ConnectReturnCode::NotAuthorized,
                ConnectReturnCode::NotAuthorized,
            ),
            "device_from_cert_cn is on and the client certificate has no Common Name".to_string(),
        ));
    }
    if let Some((why, code, message)) = refusal {
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
    let (client_id, assigned) = id.unwrap_or_default();
    let props = v5.then(|| ConnAckProperties {
        receive_max: Some(ctx.settings.max_inflight.max(1)),
        max_packet_size: Some((ctx.frame_limit + 5).min(u32::MAX as usize) as u32),
        assigned_client_identifier: assigned.then(|| client_id.clone()),
        retain_available: Some(0),
        wildcard_subscription_available: Some(0),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        ..Default::default()
    });
    let _ = codec.write(
        Packet::ConnAck(
            ConnAck {
                session_present: false,
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

    let will = will.and_then(|w| will_reading(&ctx, &client_id, cert_cn.as_deref(), w, will_props));
    let (rd, mut wr) = tokio::io::split(io);
    let mut s = Session {
        ctx: ctx.clone(),
        codec,
        client_id: Arc::from(client_id.as_str()),
        cert_cn: cert_cn.filter(|c| !c.is_empty()),
        out: BytesMut::new(),
        pending: FuturesOrdered::new(),
        inflight: 0,
        qos2: HashSet::new(),
        batch: Batch::default(),
    };
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
    drop(s);
    ctx.deregister(&client_id, conn);
    ctx.stats.disconnected();
    if let (true, Some(w)) = (close.will, will) {
        let topic = w.topic.clone();
        let seen = crate::status::DeviceBatch::of(std::slice::from_ref(&w));
        match ctx.buffer.append(vec![w]).await {
            Ok(_) => {
                ctx.stats.will();
                ctx.devices.record(&seen);
                tracing::info!(client_id = %client_id, topic = %topic, "The client's last will was stored as a reading.");
            }
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "The client's last will could not be stored.")
            }
        }
    }
}

fn will_reading(
    ctx: &Ctx,
    client_id: &str,
    cert_cn: Option<&str>,
    w: LastWill,
    props: Option<LastWillProperties>,
) -> Option<Reading> {
    let topic = topic::name_from_bytes(&w.topic)?;
    let device = device_id(
        cert_cn.filter(|c| !c.is_empty()),
        ctx.settings.device_from_topic_level,
        topic,
        client_id,
    );
    // Held for the whole connection: a copy, so it does not pin the CONNECT's read buffer.
    let message = Bytes::copy_from_slice(&w.message);
    let mut r = Reading::new(Source::MqttWill, device, topic, message);
    if let Some(p) = props {
        r.content_type = p.content_type;
        r.properties = p.user_properties;
    }
    Some(r)
}

#[derive(Debug)]
enum ConnectError {
    Io(std::io::Error),
    Version(u8),
    Malformed(String),
}

/// Reads the CONNECT: frames it, peeks the protocol level, and decodes it with V4 or V5.
async fn read_connect<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<(Codec, Packet), ConnectError> {
    loop {
        match v4::check(buf.iter(), limit) {
            Ok(fh) => {
                if fh.byte1 >> 4 != 1 {
                    return Err(ConnectError::Malformed(format!(
                        "packet type {} before CONNECT",
                        fh.byte1 >> 4
                    )));
                }
                // Variable header: protocol name (u16 length + bytes), then the level.
                let at = fh.fixed_header_len;
                let name_len = buf
                    .get(at..at + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                    .ok_or_else(|| ConnectError::Malformed("short CONNECT".into()))?;
                let level = *buf
                    .get(at + 2 + name_len)
                    .ok_or_else(|| ConnectError::Malformed("short CONNECT".into()))?;
                let mut codec = match level {
                    4 => Codec::V4(v4::V4),
                    5 => Codec::V5(v5::V5),
                    3 => return Err(ConnectError::Version(level)),
                    l => return Err(ConnectError::Version(l)),
                };
                let p = codec
                    .read(buf, limit)
                    .map_err(|e| ConnectError::Malformed(e.to_string()))?;
                return Ok((codec, p));
            }
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(ConnectError::Malformed(e.to_string())),
        }
        buf.reserve(READ_MIN);
        match io.read_buf(buf).await {
            Ok(0) => {
                return Err(ConnectError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(_) => {}
            Err(e) => return Err(ConnectError::Io(e)),
        }
    }
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
            tokio::select! {
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
                self.queue(Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason,
                    },
                    None,
                ));
            }
            Packet::PingReq(_) => self.queue(Packet::PingResp(PingResp)),
            Packet::Subscribe(sub, _) => {
                self.ctx.stats.rejected(reason::SUBSCRIBE, 1);
                tracing::info!(client_id = %self.client_id, "A SUBSCRIBE was refused: ferry is ingest-only.");
                let code = if self.v5() {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                };
                let return_codes = vec![code; sub.filters.len().max(1)];
                self.reply(vec![Packet::SubAck(
                    SubAck {
                        pkid: sub.pkid,
                        return_codes,
                    },
                    None,
                )]);
            }
            Packet::Unsubscribe(unsub, _) => {
                let reasons = if self.v5() {
                    vec![UnsubAckReason::NotAuthorized; unsub.filters.len().max(1)]
                } else {
                    Vec::new()
                };
                self.reply(vec![Packet::UnsubAck(
                    UnsubAck {
                        pkid: unsub.pkid,
                        reasons,
                    },
                    None,
                )]);
            }
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
            // ferry sends no PUBLISH, so client PUBACK/PUBREC/PUBCOMP have nothing to match.
            Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..) => {}
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

    /// Queues answers that must keep their place in the ack order.
    fn reply(&mut self, packets: Vec<Packet>) {
        self.flush_batch();
        self.pending
            .push_back(Box::pin(std::future::ready(Done::Reply(packets))));
    }

    fn reject_publish(
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
            let props = Some(message);
            let p = if qos == 1 {
                Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: code_v5,
                    },
                    props.map(|m| PubAckProperties {
                        reason_string: Some(m),
                        user_properties: vec![],
                    }),
                )
            } else {
                Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: pubrec_reason(code_v5),
                    },
                    props.map(|m| PubRecProperties {
                        reason_string: Some(m),
                        user_properties: vec![],
                    }),
                )
            };
            self.reply(vec![p]);
            return Ok(());
        }
        let v5 = match why {
            reason::TOO_LARGE => DisconnectReasonCode::PacketTooLarge,
            _ => DisconnectReasonCode::TopicNameInvalid,
        };
        Err(Close::error(why, v5, message))
    }

    async fn on_publish(
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
        let mut r = Reading::new(Source::Mqtt, device, topic, payload);
        if let Some(pp) = props {
            r.content_type = pp.content_type;
            r.properties = pp.user_properties;
        }
        let b = &mut self.batch;
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
    fn flush_batch(&mut self) {
        if self.batch.readings.is_empty() {
            return;
        }
        let b = std::mem::take(&mut self.batch);
        let started = b.started.unwrap_or_else(Instant::now);
        let seen = crate::status::DeviceBatch::of(&b.readings);
        // Submitted now, so the readings reach the buffer's writer whatever this loop does
        // next; the queue entry only waits for the answer. No task per append: with a
        // thousand slow connections, appends in flight are what the heap holds.
        let submitted = self.ctx.buffer.submit(b.readings);
        let retry = (!self.v5() && self.ctx.reject_when_full).then(|| self.client_id.clone());
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
                    Some(client_id),
                ) if ctx.settings.full_ack_wait_ms > 0 => {
                    // Rare: boxed, so the common entry stays small.
                    Box::pin(retry_full(&ctx, readings, (used, max), &client_id)).await
                }
                (Err(e), _) => Err(e),
            };
            if result.is_ok() {
                ctx.devices.record(&seen);
            }
            Done::Appended {
                acks: b.acks,
                by_qos: b.by_qos,
                started,
                result,
            }
        }));
    }

    /// Queues what a finished queue entry owes, in order.
    fn on_done(&mut self, done: Done) -> Result<(), Close> {
        match done {
            Done::Reply(ps) => {
                for p in ps {
                    self.queue(p);
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

/// Reads into `buf`, asking for `room` free bytes (see [`READ_MIN`], [`READ_MAX`]): doubled
/// after a read that filled what it asked for, halved after one that did not.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    room: &mut usize,
) -> std::io::Result<usize> {
    if buf.is_empty() && buf.capacity() > 2 * *room {
        // A quiet connection gives back what a burst made it grow to.
        *buf = BytesMut::new();
    }
    if buf.capacity() - buf.len() < *room / 2 {
        // Unique (nothing keeps a slice of it), so this moves the unread bytes to the front of
        // the same allocation when that makes room, and grows it only when that does not.
        buf.reserve(*room);
    }
    let asked = buf.capacity() - buf.len();
    let n = rd.read_buf(buf).await?;
    *room = if n >= asked {
        (*room * 2).min(READ_MAX)
    } else {
        (*room / 2).max(READ_MIN)
    };
    Ok(n)
}

/// Writes what the socket takes of `out`, or flushes (a TLS writer buffers) when `out` is
/// empty, returning 0. One step each, so that it is cancel-safe in a `select!`: nothing is
/// written unless the count written is returned, and `out` is advanced only by the caller.
async fn write_some<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> std::io::Result<usize> {
    if out.is_empty() {
        wr.flush().await?;
        return Ok(0);
    }
    match wr.write(out).await? {
        0 => Err(std::io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

/// A v3.1.1 client in reject mode found the buffer full (`used` of `max` bytes). MQTT 3.1.1
/// has no negative PUBACK, so the append is retried until `full_ack_wait_ms` has passed: the
/// ack is withheld rather than lost.
async fn retry_full(
    ctx: &Ctx,
    mut readings: Vec<Reading>,
    (used, max): (u64, u64),
    client_id: &str,
) -> Result<(), AppendError> {
    let wait = Duration::from_millis(ctx.settings.full_ack_wait_ms);
    let until = Instant::now() + wait;
    tracing::warn!(client_id = %client_id, used, max, wait_ms = wait.as_millis() as u64,
        "The buffer is full: the acknowledgement to this MQTT 3.1.1 client is withheld until space frees or full_ack_wait_ms passes.");
    loop {
        tokio::time::sleep(FULL_RETRY).await;
        match ctx.buffer.append(readings).await {
            Err(AppendError::Full { readings: back, .. }) if Instant::now() < until => {
                readings = back
            }
            result => return result.map(|_| ()),
        }
    }
}

fn pubrec_reason(r: PubAckReason) -> PubRecReason {
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
fn ack(qos: u8, pkid: u16, reason: PubAckReason, message: Option<String>) -> Packet {
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

/// Answers a connection beyond `max_connections`: CONNACK "server unavailable" (v3.1.1 0x03,
/// v5 0x97 quota exceeded) if it sends CONNECT within `wait`, then closes.
pub async fn refuse_busy<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, wait: Duration) {
    let mut buf = BytesMut::with_capacity(512);
    if let Ok(Ok((codec, _))) =
        tokio::time::timeout(wait, read_connect(&mut io, &mut buf, MIN_CONNECT_LIMIT)).await
    {
        let code = if codec.is_v5() {
            ConnectReturnCode::QuotaExceeded
        } else {
            ConnectReturnCode::ServiceUnavailable
        };
        refuse_connect(&mut io, &codec, code).await;
    } else {
        let _ = io.shutdown().await;
    }
}

/// Sends a refusing CONNACK with `code` and closes the connection.
async fn refuse_connect<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    codec: &Codec,
    code: ConnectReturnCode,
) {
    let mut out = BytesMut::new();
    let _ = codec.write(
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        ),
        &mut out,
    );
    let _ = io.write_all(&out).await;
    let _ = io.shutdown().await;
}
