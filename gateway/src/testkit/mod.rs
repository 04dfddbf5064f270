//! Entry points for the fuzz targets (`fuzz/`), their property-test twins ([`props`], run by
//! `cargo test`) and the MQTT session benchmark: each takes an input, runs the real code on
//! it, and panics when a property breaks. Compiled only with the `testkit` feature (or under
//! `cargo test`), which the shipped binary does not enable; not part of ferry's API.

#[cfg(test)]
mod props;

pub use crate::http::formats::BatchFormat;
pub use crate::mqtt::session::serve as mqtt_serve;

use crate::http::auth::Principal;
use crate::http::formats::{self, Origin};
use crate::http::senml;
use crate::mqtt::session::{self, Ctx};
use ferry_buffer::{Buffer, BufferOptions, Compression, Reading, Source};
use ferry_config::MqttSettings;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The fixed "now" of every HTTP body case, so equal inputs give equal readings.
const NOW_MS: u64 = 1_700_000_000_000;

/// Parses `body` as `format` with a limit of `max` readings, as the batch handler does, and
/// checks what comes out. `bound` binds the token to a device; `header_device` is the
/// `X-Ferry-Device` header.
///
/// Properties: no panic; at most `max` readings; every reading is an HTTP reading with a valid
/// topic and device, a content type of its format, and a JSON payload.
pub fn http_body(
    format: BatchFormat,
    body: &[u8],
    max: usize,
    bound: Option<&str>,
    header_device: Option<&str>,
) {
    let origin = Origin {
        principal: Principal {
            token: bound.map(|_| "fuzz".to_string()),
            device: bound.map(str::to_string),
        },
        header_device: header_device.map(str::to_string),
        now_ms: NOW_MS,
    };
    let parsed = match format {
        BatchFormat::JsonArray => formats::parse_json_array(body, &origin, max),
        BatchFormat::Ndjson => formats::parse_ndjson(body, &origin, max),
        BatchFormat::Senml => senml::parse_senml(body, &origin, max),
    };
    let Ok(readings) = parsed else {
        return;
    };
    assert!(
        readings.len() <= max,
        "{} readings over the limit of {max}",
        readings.len()
    );
    let content_type = match format {
        BatchFormat::Senml => formats::SENML_JSON,
        BatchFormat::JsonArray | BatchFormat::Ndjson => formats::JSON,
    };
    for r in &readings {
        assert_eq!(r.source, Source::Http);
        ferry_config::topic::check_name(&r.topic).expect("an accepted reading has a valid topic");
        formats::validate_device(&r.device).expect("an accepted reading has a valid device");
        if let Some(b) = bound {
            assert_eq!(r.device, b, "a bound token's readings carry its device");
        }
        assert_eq!(r.content_type.as_deref(), Some(content_type));
        serde_json::from_slice::<serde_json::Value>(&r.payload)
            .expect("an accepted reading's payload is JSON");
    }
}

/// The same items as a JSON array and as NDJSON (`items` must hold no raw newline) give the
/// same readings, or both fail.
pub fn json_vs_ndjson(items: &[String], max: usize) {
    let origin = Origin {
        principal: Principal::default(),
        header_device: None,
        now_ms: NOW_MS,
    };
    let array = format!("[{}]", items.join(","));
    let ndjson = items.join("\n");
    let a = formats::parse_json_array(array.as_bytes(), &origin, max);
    let n = formats::parse_ndjson(ndjson.as_bytes(), &origin, max);
    match (a, n) {
        (Ok(a), Ok(n)) => assert_eq!(a, n, "JSON array and NDJSON disagree"),
        (Ok(a), Err(e)) => panic!("the JSON array gives {a:?}, the NDJSON {e:?}"),
        _ => {}
    }
}

/// One step a fuzzed MQTT client takes after its CONNECT.
#[derive(Debug, Clone)]
pub enum SessionOp {
    /// A PUBLISH. `qos` 3 is invalid on purpose; `pkid` 0 with QoS > 0 too.
    Publish {
        /// QoS bits (0-3).
        qos: u8,
        /// The DUP flag.
        dup: bool,
        /// The packet id (written only for QoS > 0).
        pkid: u16,
        /// Topic bytes, not necessarily UTF-8.
        topic: Vec<u8>,
        /// The payload.
        payload: Vec<u8>,
        /// v5 only: a content type property.
        content_type: Option<String>,
    },
    /// PUBREL.
    PubRel(u16),
    /// PINGREQ.
    PingReq,
    /// SUBSCRIBE to one filter.
    Subscribe(u16, String),
    /// UNSUBSCRIBE from one filter.
    Unsubscribe(u16, String),
    /// DISCONNECT; v5 with this reason code.
    Disconnect(u8),
    /// Bytes as they are: anything, including other packets or garbage.
    Raw(Vec<u8>),
}

/// One fuzzed MQTT connection.
#[derive(Debug, Clone)]
pub struct SessionCase {
    /// MQTT 5 (else 3.1.1).
    pub v5: bool,
    /// The CONNECT's client id.
    pub client_id: String,
    /// The clean session / clean start flag.
    pub clean: bool,
    /// The CONNECT's keep-alive in seconds.
    pub keep_alive: u16,
    /// A last will: topic and message.
    pub will: Option<(String, Vec<u8>)>,
    /// Sent instead of the encoded CONNECT, when set.
    pub raw_connect: Option<Vec<u8>>,
    /// What the client sends after CONNECT.
    pub ops: Vec<SessionOp>,
    /// The write sizes the client's bytes are split into (cycled; 0 counts as 1).
    pub chunks: Vec<u16>,
    /// `mqtt.max_inflight` (0 counts as 1).
    pub max_inflight: u16,
    /// `mqtt.max_payload_bytes`.
    pub max_payload_bytes: usize,
    /// `mqtt.device_from_topic_level`.
    pub device_from_topic_level: Option<usize>,
}

/// A publish's topic and payload.
type TopicPayload = (Vec<u8>, Vec<u8>);

/// What a session case did, for callers that want to check coverage of their generator.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionOutcome {
    /// Whether the server answered CONNECT with success.
    pub connected: bool,
    /// Positive PUBACKs and PUBRECs the client received.
    pub acks: usize,
    /// Readings the case left in the buffer (publishes and a will).
    pub stored: usize,
}

/// Runs MQTT session cases against one buffer, reused from case to case.
#[derive(Debug)]
pub struct SessionHarness {
    rt: tokio::runtime::Runtime,
    buffer: Buffer,
    _dir: tempfile::TempDir,
}

impl Default for SessionHarness {
    fn default() -> Self {
        Self::new()
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn frame(out: &mut Vec<u8>, byte1: u8, body: &[u8]) {
    out.push(byte1);
    put_varint(out, body.len());
    out.extend_from_slice(body);
}

/// Encodes the CONNECT of `case`.
fn encode_connect(case: &SessionCase) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, b"MQTT");
    b.push(if case.v5 { 5 } else { 4 });
    let mut flags = u8::from(case.clean) << 1;
    if case.will.is_some() {
        flags |= 0b100 | (1 << 3); // will, will QoS 1
    }
    b.push(flags);
    b.extend_from_slice(&case.keep_alive.to_be_bytes());
    if case.v5 {
        b.push(0); // no properties
    }
    put_str(&mut b, case.client_id.as_bytes());
    if let Some((topic, msg)) = &case.will {
        if case.v5 {
            b.push(0); // no will properties
        }
        put_str(&mut b, topic.as_bytes());
        put_str(&mut b, msg);
    }
    let mut out = Vec::new();
    frame(&mut out, 0x10, &b);
    out
}

/// Encodes one op.
fn encode_op(v5: bool, op: &SessionOp, out: &mut Vec<u8>) {
    let mut b = Vec::new();
    match op {
        SessionOp::Publish {
            qos,
            dup,
            pkid,
            topic,
            payload,
            content_type,
        } => {
            put_str(&mut b, topic);
            if *qos > 0 {
                b.extend_from_slice(&pkid.to_be_bytes());
            }
            if v5 {
                let mut props = Vec::new();
                if let Some(ct) = content_type {
                    props.push(0x03);
                    put_str(&mut props, ct.as_bytes());
                }
                put_varint(&mut b, props.len());
                b.extend_from_slice(&props);
            }
            b.extend_from_slice(payload);
            frame(out, 0x30 | (u8::from(*dup) << 3) | ((qos & 3) << 1), &b);
        }
        SessionOp::PubRel(pkid) => frame(out, 0x62, &pkid.to_be_bytes()),
        SessionOp::PingReq => frame(out, 0xC0, &[]),
        SessionOp::Subscribe(pkid, filter) | SessionOp::Unsubscribe(pkid, filter) => {
            let sub = matches!(op, SessionOp::Subscribe(..));
            b.extend_from_slice(&pkid.to_be_bytes());
            if v5 {
                b.push(0);
            }
            put_str(&mut b, filter.as_bytes());
            if sub {
                b.push(1);
            }
            frame(out, if sub { 0x82 } else { 0xA2 }, &b);
        }
        SessionOp::Disconnect(reason) => {
            if v5 {
                frame(out, 0xE0, &[*reason, 0]);
            } else {
                frame(out, 0xE0, &[]);
            }
        }
        SessionOp::Raw(bytes) => out.extend_from_slice(bytes),
    }
}

/// Splits a server's output into `(packet type, body)` frames; stops at a partial frame.
fn frames(buf: &mut Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut len = 0usize;
        let mut at = 1;
        let mut complete = false;
        while at < buf.len() && at <= 4 {
            let b = buf[at];
            len |= ((b & 0x7f) as usize) << (7 * (at - 1));
            at += 1;
            if b & 0x80 == 0 {
                complete = true;
                break;
            }
        }
        if !complete || buf.len() < at + len {
            return out;
        }
        let body = buf[at..at + len].to_vec();
        out.push((buf[0] >> 4, body));
        buf.drain(..at + len);
    }
}

impl SessionHarness {
    /// A harness with a fresh buffer, on tmpfs (`/dev/shm`) when there is one, so the buffer's
    /// fsync per commit costs little.
    pub fn new() -> SessionHarness {
        let dir = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm"),
            false => tempfile::tempdir(),
        }
        .expect("a temporary directory");
        let opts = BufferOptions {
            consumers: vec!["fuzz".into()],
            flush_interval: Duration::from_millis(0),
            compression: Compression::None,
            ..Default::default()
        };
        let buffer = Buffer::open(dir.path(), opts).expect("the buffer opens");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        SessionHarness {
            rt,
            buffer,
            _dir: dir,
        }
    }

    /// Runs one connection of `case` and checks it. Panics when the session panics, hangs
    /// (no end within 20 s), or sends a positive PUBACK/PUBREC for a packet id none of whose
    /// publishes is in the buffer, or more positive PUBACKs than readings stored.
    pub fn run(&self, case: &SessionCase) -> SessionOutcome {
        self.rt.block_on(async {
            match tokio::time::timeout(Duration::from_secs(20), self.run_case(case)).await {
                Ok(outcome) => outcome,
                Err(_) => panic!("the MQTT session did not end within 20 s: {case:?}"),
            }
        })
    }

    async fn run_case(&self, case: &SessionCase) -> SessionOutcome {
        let settings = MqttSettings {
            max_inflight: case.max_inflight.max(1),
            max_payload_bytes: case.max_payload_bytes,
            device_from_topic_level: case.device_from_topic_level,
            connect_timeout_ms: 5_000,
            write_timeout_ms: 5_000,
            ..Default::default()
        };
        let ctx = Arc::new(Ctx::new(settings, self.buffer.clone(), false).expect("a context"));
        let (client, server) = tokio::io::duplex(64 * 1024);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let serve = tokio::spawn(session::serve(
            ctx,
            server,
            "127.0.0.1:1".parse().expect("an address"),
            None,
            deadline,
            CancellationToken::new(),
        ));

        // Everything the client sends, and which publishes a packet id stands for. Raw bytes
        // may hold publishes too: their ids are only checked by count.
        let mut wire = case
            .raw_connect
            .clone()
            .unwrap_or_else(|| encode_connect(case));
        let mut by_pkid: HashMap<u16, Vec<TopicPayload>> = HashMap::new();
        for op in &case.ops {
            encode_op(case.v5, op, &mut wire);
            if let SessionOp::Publish {
                qos: 1 | 2,
                pkid,
                topic,
                payload,
                ..
            } = op
            {
                by_pkid
                    .entry(*pkid)
                    .or_default()
                    .push((topic.clone(), payload.clone()));
            }
        }
        let raw =
            case.raw_connect.is_some() || case.ops.iter().any(|o| matches!(o, SessionOp::Raw(_)));

        let (mut rd, mut wr) = tokio::io::split(client);
        let chunks = case.chunks.clone();
        let write = async move {
            let mut rest = &wire[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = chunks
                    .get(i % chunks.len().max(1))
                    .copied()
                    .unwrap_or(u16::MAX);
                let n = (n.max(1) as usize).min(rest.len());
                if wr.write_all(&rest[..n]).await.is_err() {
                    return;
                }
                rest = &rest[n..];
                i += 1;
                if i % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            let _ = wr.shutdown().await;
        };

        let mut reader = self.buffer.reader("fuzz").expect("a reader");
        let mut seen: Vec<Reading> = Vec::new();
        let mut outcome = SessionOutcome::default();
        let read = async {
            let mut buf = Vec::new();
            let mut puback_ok = 0usize;
            let mut chunk = [0u8; 4096];
            loop {
                let n = rd.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                for (ptype, body) in frames(&mut buf) {
                    match ptype {
                        2 => outcome.connected |= body.get(1) == Some(&0),
                        4 | 5 => {
                            let reason = body.get(2).copied().unwrap_or(0);
                            if body.len() < 2 || reason >= 0x80 {
                                continue;
                            }
                            let pkid = u16::from_be_bytes([body[0], body[1]]);
                            outcome.acks += 1;
                            // What is committed now.
                            loop {
                                let segs = reader.try_next(64).await.expect("the buffer reads");
                                if segs.is_empty() {
                                    break;
                                }
                                seen.extend(segs.into_iter().flat_map(|s| s.readings));
                            }
                            if ptype == 4 {
                                puback_ok += 1;
                                assert!(
                                    puback_ok <= seen.len(),
                                    "PUBACK #{puback_ok} with only {} readings stored",
                                    seen.len()
                                );
                            }
                            let stored = by_pkid.get(&pkid).is_some_and(|pubs| {
                                pubs.iter().any(|(t, p)| {
                                    seen.iter()
                                        .any(|r| r.topic.as_bytes() == t && r.payload == p[..])
                                })
                            });
                            assert!(
                                stored || raw,
                                "ack (type {ptype}) for packet id {pkid}, and no publish with that id is in the buffer"
                            );
                        }
                        _ => {}
                    }
                }
            }
        };
        tokio::join!(write, read);
        serve.await.expect("the session task does not panic");

        // Empty the buffer for the next case: read the rest, then ack all this case read.
        loop {
            let segs = reader.try_next(64).await.expect("the buffer reads");
            if segs.is_empty() {
                break;
            }
            seen.extend(segs.into_iter().flat_map(|s| s.readings));
        }
        reader
            .ack(reader.position())
            .await
            .expect("the ack commits");
        outcome.stored = seen.len();
        outcome
    }
}
