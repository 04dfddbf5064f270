//! Unit tests: the session state machine over an in-memory duplex, auth, client-id rules.

use super::auth::{Auth, AuthOutcome, constant_time_eq, verify_hash};
use super::session::{self, Ctx, client_id_rule, device_id};
use bytes::BytesMut;
use ferry_buffer::{Buffer, BufferOptions, Compression, Reading, WhenFull};
use ferry_config::{MqttSettings, MqttUser, Secret};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4 as c4;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5 as c5;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

struct Env {
    ctx: Arc<Ctx>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

fn env_with(settings: MqttSettings, opts: BufferOptions) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let buffer = Buffer::open(dir.path(), opts.clone()).unwrap();
    let reject = opts.when_full == WhenFull::Reject;
    Env {
        ctx: Arc::new(Ctx::new(settings, buffer, reject).unwrap()),
        stop: CancellationToken::new(),
        _dir: dir,
    }
}

fn opts() -> BufferOptions {
    BufferOptions {
        consumers: vec!["kafka".into()],
        flush_interval: Duration::from_millis(1),
        compression: Compression::None,
        ..Default::default()
    }
}

fn env() -> Env {
    env_with(MqttSettings::default(), opts())
}

impl Env {
    fn connect(&self) -> Client {
        let (a, b) = tokio::io::duplex(1 << 20);
        let ctx = self.ctx.clone();
        let stop = self.stop.clone();
        let deadline = Instant::now() + Duration::from_millis(ctx.settings.connect_timeout_ms);
        tokio::spawn(session::serve(
            ctx,
            b,
            "127.0.0.1:1".parse().unwrap(),
            None,
            deadline,
            stop,
        ));
        Client {
            io: a,
            buf: BytesMut::new(),
        }
    }

    async fn stored(&self) -> Vec<Reading> {
        let mut rd = self.ctx.buffer.reader("kafka").unwrap();
        let mut out = Vec::new();
        loop {
            let segs = rd.try_next(64).await.unwrap();
            if segs.is_empty() {
                break;
            }
            out.extend(segs.into_iter().flat_map(|s| s.readings));
        }
        out
    }
}

struct Client {
    io: DuplexStream,
    buf: BytesMut,
}

impl Client {
    async fn send4(&mut self, p: c4::Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, 1 << 24).unwrap();
        self.io.write_all(&out).await.unwrap();
    }

    async fn send5(&mut self, p: c5::Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).unwrap();
        self.io.write_all(&out).await.unwrap();
    }

    /// Reads until a packet can be framed; `None` on EOF.
    async fn fill(&mut self) -> bool {
        self.buf.reserve(4096);
        let n = tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf))
            .await
            .expect("no answer within 5 s")
            .unwrap_or(0);
        n > 0
    }

    async fn recv4(&mut self) -> Option<c4::Packet> {
        loop {
            match c4::Packet::read(&mut self.buf, 1 << 24) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if !self.fill().await {
                        return None;
                    }
                }
                Err(e) => panic!("bad packet from server: {e:?}"),
            }
        }
    }

    async fn recv5(&mut self) -> Option<c5::Packet> {
        loop {
            match c5::Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {
                    if !self.fill().await {
                        return None;
                    }
                }
                Err(e) => panic!("bad packet from server: {e:?}"),
            }
        }
    }

    async fn connect4(&mut self, c: c4::Connect) -> c4::ConnectReturnCode {
        self.send4(c4::Packet::Connect(c)).await;
        match self.recv4().await {
            Some(c4::Packet::ConnAck(a)) => a.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

fn publish4(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> c4::Packet {
    let mut p = c4::Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    c4::Packet::Publish(p)
}

#[tokio::test]
async fn qos1_is_acked_after_the_reading_is_stored() {
    let e = env();
    let mut c = e.connect();
    assert_eq!(
        c.connect4(c4::Connect::new("dev-1")).await,
        c4::ConnectReturnCode::Success
    );
    c.send4(publish4("sensors/dev-1/t", QoS::AtLeastOnce, 7, b"21.5"))
        .await;
    match c.recv4().await {
        Some(c4::Packet::PubAck(a)) => assert_eq!(a.pkid, 7),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let stored = e.stored().await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].device, "dev-1");
    assert_eq!(stored[0].topic, "sensors/dev-1/t");
    assert_eq!(&stored[0].payload[..], b"21.5");
    assert_eq!(stored[0].source, ferry_buffer::Source::Mqtt);
}

#[tokio::test]
async fn pipelined_publishes_are_acked_in_order() {
    let e = env();
    let mut c = e.connect();
    c.connect4(c4::Connect::new("dev-2")).await;
    for i in 1..=200u16 {
        let qos = if i % 3 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        c.send4(publish4("t", qos, i, format!("{i}").as_bytes()))
            .await;
    }
    for i in 1..=200u16 {
        match c.recv4().await {
            Some(c4::Packet::PubAck(a)) if i % 3 != 0 => assert_eq!(a.pkid, i),
            Some(c4::Packet::PubRec(a)) if i % 3 == 0 => assert_eq!(a.pkid, i),
            other => panic!("ack {i}: got {other:?}"),
        }
    }
    assert_eq!(e.stored().await.len(), 200);
}

#[tokio::test]
async fn qos2_dup_before_pubrel_is_stored_once() {
    let e = env();
    let mut c = e.connect();
    c.connect4(c4::Connect::new("dev-3")).await;
    c.send4(publish4("t", QoS::ExactlyOnce, 9, b"once")).await;
    assert!(matches!(c.recv4().await, Some(c4::Packet::PubRec(a)) if a.pkid == 9));
    let mut dup = c4::Publish::new("t", QoS::ExactlyOnce, b"once".to_vec());
    dup.pkid = 9;
    dup.dup = true;
    c.send4(c4::Packet::Publish(dup)).await;
    assert!(matches!(c.recv4().await, Some(c4::Packet::PubRec(a)) if a.pkid == 9));
    c.send4(c4::Packet::PubRel(c4::PubRel::new(9))).await;
    assert!(matches!(c.recv4().await, Some(c4::Packet::PubComp(a)) if a.pkid == 9));
    assert_eq!(e.stored().await.len(), 1);
}

#[tokio::test]
async fn qos0_then_disconnect_is_stored_without_will() {
    let e = env();
    let mut c = e.connect();
    let mut conn = c4::Connect::new("dev-4");
    conn.last_will = Some(c4::LastWill::new(
        "status/dev-4",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    c.connect4(conn).await;
    c.send4(publish4("t", QoS::AtMostOnce, 0, b"zero")).await;
    c.send4(c4::Packet::Disconnect).await;
    assert!(
        c.recv4().await.is_none(),
        "the server closes after DISCONNECT"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = e.stored().await;
    assert_eq!(s.len(), 1);
    assert_eq!(&s[0].payload[..], b"zero");
}

#[tokio::test]
async fn dropped_connection_delivers_the_will() {
    let e = env();
    let mut c = e.connect();
    let mut conn = c4::Connect::new("dev-5");
    conn.last_will = Some(c4::LastWill::new(
        "status/dev-5",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    c.connect4(conn).await;
    drop(c);
    for _ in 0..50 {
        let s = e.stored().await;
        if let Some(r) = s.first() {
            assert_eq!(r.source, ferry_buffer::Source::MqttWill);
            assert_eq!(&r.payload[..], b"offline");
            assert_eq!(r.topic, "status/dev-5");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no will reading");
}

#[tokio::test]
async fn empty_client_id_rules() {
    let e = env();
    let mut c = e.connect();
    let mut conn = c4::Connect::new("");
    conn.clean_session = false;
    assert_eq!(c.connect4(conn).await, c4::ConnectReturnCode::BadClientId);
    let mut c = e.connect();
    assert_eq!(
        c.connect4(c4::Connect::new("")).await,
        c4::ConnectReturnCode::Success
    );
    assert!(client_id_rule("", false, 1).is_none());
    let (id, assigned) = client_id_rule("", true, 1).unwrap();
    assert!(assigned && id.starts_with("ferry-auto-"));
    assert_eq!(client_id_rule("abc", false, 1), Some(("abc".into(), false)));
}

fn users_settings() -> MqttSettings {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
    let hash = argon2::Argon2::default()
        .hash_password(b"hashed-pw", &salt)
        .unwrap()
        .to_string();
    MqttSettings {
        allow_anonymous: false,
        users: vec![
            MqttUser {
                username: "plain".into(),
                password: Some(Secret::new("s3cret")),
                password_hash: None,
            },
            MqttUser {
                username: "hashed".into(),
                password: None,
                password_hash: Some(hash),
            },
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn auth_rules() {
    let auth = Auth::new(&users_settings()).unwrap();
    assert_eq!(auth.check(None).await, AuthOutcome::NotAuthorized);
    assert_eq!(
        auth.check(Some(("plain", "s3cret"))).await,
        AuthOutcome::Allowed
    );
    assert_eq!(
        auth.check(Some(("plain", "s3cre"))).await,
        AuthOutcome::BadCredentials
    );
    assert_eq!(
        auth.check(Some(("hashed", "hashed-pw"))).await,
        AuthOutcome::Allowed
    );
    assert_eq!(
        auth.check(Some(("hashed", "nope"))).await,
        AuthOutcome::BadCredentials
    );
    assert_eq!(
        auth.check(Some(("ghost", "s3cret"))).await,
        AuthOutcome::BadCredentials
    );
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"abcd"));
    assert!(!verify_hash("not a phc string", "x"));
    let mut bad = users_settings();
    bad.users[1].password_hash = Some("not-a-phc-string".into());
    assert!(Auth::new(&bad).is_err());
}

#[tokio::test]
async fn connack_codes_for_bad_credentials_v4_and_v5() {
    let e = env_with(users_settings(), opts());
    let mut c = e.connect();
    let mut conn = c4::Connect::new("a");
    conn.login = Some(c4::Login::new("plain", "wrong"));
    assert_eq!(
        c.connect4(conn).await,
        c4::ConnectReturnCode::BadUserNamePassword
    );
    let mut c = e.connect();
    assert_eq!(
        c.connect4(c4::Connect::new("b")).await,
        c4::ConnectReturnCode::NotAuthorized
    );
    let mut c = e.connect();
    let conn = c5::Connect {
        keep_alive: 30,
        client_id: "c".into(),
        clean_start: true,
        properties: None,
    };
    c.send5(c5::Packet::Connect(
        conn,
        None,
        Some(c5::Login::new("hashed", "wrong")),
    ))
    .await;
    match c.recv5().await {
        Some(c5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, c5::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn v5_reason_codes_and_properties() {
    let e = env_with(
        MqttSettings {
            max_payload_bytes: 100,
            max_inflight: 10,
            ..Default::default()
        },
        opts(),
    );
    let mut c = e.connect();
    c.send5(c5::Packet::Connect(
        c5::Connect {
            keep_alive: 30,
            client_id: "v5dev".into(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    ))
    .await;
    match c.recv5().await {
        Some(c5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, c5::ConnectReturnCode::Success);
            assert_eq!(a.properties.unwrap().receive_max, Some(10));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut p = c5::Publish::new("a/+/b", Q5::AtLeastOnce, b"x".to_vec(), None);
    p.pkid = 1;
    c.send5(c5::Packet::Publish(p)).await;
    let mut p = c5::Publish::new("big", Q5::AtLeastOnce, vec![0u8; 101], None);
    p.pkid = 2;
    c.send5(c5::Packet::Publish(p)).await;
    let props = c5::PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("unit".into(), "C".into())],
        ..Default::default()
    };
    let mut p = c5::Publish::new("ok", Q5::AtLeastOnce, b"{}".to_vec(), Some(props));
    p.pkid = 3;
    c.send5(c5::Packet::Publish(p)).await;
    c.send5(c5::Packet::Subscribe(c5::Subscribe::new(
        c5::Filter::new("x/#", Q5::AtLeastOnce),
        None,
    )))
    .await;
    match c.recv5().await {
        Some(c5::Packet::PubAck(a)) => {
            assert_eq!((a.pkid, a.reason), (1, c5::PubAckReason::TopicNameInvalid))
        }
        other => panic!("got {other:?}"),
    }
    match c.recv5().await {
        Some(c5::Packet::PubAck(a)) => {
            assert_eq!((a.pkid, a.reason), (2, c5::PubAckReason::QuotaExceeded))
        }
        other => panic!("got {other:?}"),
    }
    match c.recv5().await {
        Some(c5::Packet::PubAck(a)) => {
            assert_eq!((a.pkid, a.reason), (3, c5::PubAckReason::Success))
        }
        other => panic!("got {other:?}"),
    }
    match c.recv5().await {
        Some(c5::Packet::SubAck(a)) => {
            assert_eq!(
                a.return_codes,
                vec![c5::SubscribeReasonCode::Success(Q5::AtLeastOnce)]
            )
        }
        other => panic!("got {other:?}"),
    }
    let s = e.stored().await;
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(s[0].properties, vec![("unit".to_string(), "C".to_string())]);
    // Shutdown: v5 clients get DISCONNECT 0x8B.
    e.stop.cancel();
    match c.recv5().await {
        Some(c5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, c5::DisconnectReasonCode::ServerShuttingDown)
        }
        other => panic!("got {other:?}"),
    }
}

#[tokio::test]
async fn v4_wildcard_topic_closes_the_connection() {
    let e = env();
    let mut c = e.connect();
    c.connect4(c4::Connect::new("dev-6")).await;
    c.send4(publish4("a/#", QoS::AtLeastOnce, 1, b"x")).await;
    assert!(c.recv4().await.is_none());
    assert!(e.stored().await.is_empty());
}

#[tokio::test]
async fn malformed_bytes_close_the_connection() {
    let e = env();
    let mut c = e.connect();
    c.io.write_all(&[0x10, 0x03, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(c.recv4().await.is_none());
    let mut c = e.connect();
    c.connect4(c4::Connect::new("dev-7")).await;
    // A CONNACK from a client (rumqttd's v5 decoder panicked on those once).
    c.io.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    assert!(c.recv4().await.is_none());
}

#[tokio::test]
async fn second_connection_takes_over_the_client_id() {
    let e = env();
    let mut a = e.connect();
    a.connect4(c4::Connect::new("same")).await;
    let mut b = e.connect();
    b.connect4(c4::Connect::new("same")).await;
    assert!(a.recv4().await.is_none(), "the old connection is closed");
    b.send4(c4::Packet::PingReq).await;
    assert!(matches!(b.recv4().await, Some(c4::Packet::PingResp)));
}

/// A 3,000-byte buffer in reject mode (a 600-byte publish is a segment of its own), and v3.1.1
/// acks withheld for up to `full_ack_wait_ms` when it is full.
fn small_rejecting_env(full_ack_wait_ms: u64) -> Env {
    let mut o = opts();
    o.max_bytes = 3000;
    o.max_batch_bytes = 700;
    o.when_full = WhenFull::Reject;
    env_with(
        MqttSettings {
            full_ack_wait_ms,
            ..Default::default()
        },
        o,
    )
}

#[tokio::test]
async fn full_buffer_v5_gets_quota_exceeded_and_v4_is_withheld_then_closed() {
    let e = small_rejecting_env(300);
    let mut c = e.connect();
    c.send5(c5::Packet::Connect(
        c5::Connect {
            keep_alive: 30,
            client_id: "full5".into(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    ))
    .await;
    assert!(matches!(c.recv5().await, Some(c5::Packet::ConnAck(_))));
    let mut reasons = Vec::new();
    for i in 1..=10u16 {
        let mut p = c5::Publish::new("t", Q5::AtLeastOnce, vec![b'x'; 600], None);
        p.pkid = i;
        c.send5(c5::Packet::Publish(p)).await;
        match c.recv5().await {
            Some(c5::Packet::PubAck(a)) => reasons.push(a.reason),
            other => panic!("got {other:?}"),
        }
    }
    assert_eq!(reasons[0], c5::PubAckReason::Success);
    assert_eq!(*reasons.last().unwrap(), c5::PubAckReason::QuotaExceeded);
    let acked = reasons
        .iter()
        .filter(|r| **r == c5::PubAckReason::Success)
        .count();
    assert_eq!(
        e.stored().await.len(),
        acked,
        "exactly the acked readings are stored"
    );

    let mut c = e.connect();
    c.connect4(c4::Connect::new("full4")).await;
    let t0 = std::time::Instant::now();
    c.send4(publish4("t", QoS::AtLeastOnce, 1, &[b'y'; 600]))
        .await;
    assert!(c.recv4().await.is_none(), "no PUBACK, then closed");
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_eq!(e.stored().await.len(), acked);
}

#[tokio::test]
async fn full_buffer_v4_ack_is_sent_once_space_frees() {
    let e = small_rejecting_env(10_000);
    let mut c = e.connect();
    c.connect4(c4::Connect::new("wait4")).await;
    // Fill the buffer: each 600-byte publish is its own segment.
    let mut pkid = 0u16;
    loop {
        pkid += 1;
        assert!(pkid < 20, "the buffer never filled");
        c.send4(publish4("t", QoS::AtLeastOnce, pkid, &[b'f'; 600]))
            .await;
        let got = tokio::time::timeout(Duration::from_millis(600), c.recv4()).await;
        match got {
            Ok(Some(c4::Packet::PubAck(a))) => assert_eq!(a.pkid, pkid),
            Err(_) => break, // withheld: the buffer is full
            Ok(other) => panic!("got {other:?}"),
        }
    }
    let before = e.stored().await.len();
    // The uplink catches up: everything stored so far is acked and deleted.
    let mut rd = e.ctx.buffer.reader("kafka").unwrap();
    let mut last = 0;
    loop {
        let segs = rd.try_next(64).await.unwrap();
        match segs.last() {
            Some(s) => last = s.id,
            None => break,
        }
    }
    rd.ack(last).await.unwrap();
    // The withheld publish is retried, stored and acked.
    match tokio::time::timeout(Duration::from_secs(5), c.recv4()).await {
        Ok(Some(c4::Packet::PubAck(a))) => assert_eq!(a.pkid, pkid),
        other => panic!("expected the withheld PUBACK, got {other:?}"),
    }
    let after = e.stored().await;
    assert_eq!(
        after.len(),
        1,
        "{before} acked before, then the withheld one"
    );
    assert!(after[0].payload.iter().all(|&b| b == b'f'));
}

#[tokio::test(start_paused = true)]
async fn connect_timeout_closes_silent_sockets() {
    let s = MqttSettings {
        connect_timeout_ms: 10_000,
        ..Default::default()
    };
    let e = env_with(s, opts());
    let mut c = e.connect();
    let t0 = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(c.io.read(&mut b).await.unwrap(), 0);
    assert!(t0.elapsed() >= Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_is_enforced_at_one_and_a_half() {
    let e = env();
    let mut c = e.connect();
    let mut conn = c4::Connect::new("ka");
    conn.keep_alive = 10;
    c.send4(c4::Packet::Connect(conn)).await;
    let t0 = Instant::now();
    let mut b = [0u8; 64];
    let n = c.io.read(&mut b).await.unwrap();
    assert!(n > 0, "CONNACK");
    assert_eq!(c.io.read(&mut b).await.unwrap(), 0);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(15) && waited < Duration::from_secs(16),
        "{waited:?}"
    );
}

#[test]
fn device_rules() {
    assert_eq!(device_id(None, Some(1), "s/dev9/t", "cid"), "dev9");
    assert_eq!(device_id(None, Some(5), "s/dev9/t", "cid"), "cid");
    assert_eq!(device_id(None, None, "s/dev9/t", "cid"), "cid");
    assert_eq!(device_id(Some("cn"), Some(1), "s/dev9/t", "cid"), "cn");
}

#[tokio::test]
async fn over_the_pending_cap_a_session_stops_reading_until_a_commit_frees_room() {
    // Commits wait for a 300 ms gathering gap, and one reading is over the cap.
    let mut o = opts();
    o.flush_interval = Duration::from_millis(300);
    o.max_flush_delay = Duration::from_millis(300);
    o.max_pending_bytes = 1;
    let e = env_with(MqttSettings::default(), o);
    let mut c = e.connect();
    c.connect4(c4::Connect::new("paced")).await;
    c.send4(publish4("t", QoS::AtLeastOnce, 1, b"first")).await;
    // Long enough for the session to read and submit the first publish.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(e.ctx.buffer.pending_over());
    for pkid in 2..=20u16 {
        c.send4(publish4("t", QoS::AtLeastOnce, pkid, b"more"))
            .await;
    }
    for pkid in 1..=20u16 {
        match tokio::time::timeout(Duration::from_secs(5), c.recv4()).await {
            Ok(Some(c4::Packet::PubAck(a))) => assert_eq!(a.pkid, pkid),
            other => panic!("publish {pkid}: {other:?}"),
        }
    }
    assert_eq!(e.ctx.buffer.pending_bytes(), 0);
    assert!(e.ctx.stats.read_pauses() >= 1);
    // The 19 publishes sent during the first commit's gap were read only after it: they are
    // in a later commit. Read at once, they would have joined the first.
    let mut rd = e.ctx.buffer.reader("kafka").unwrap();
    let segs = rd.try_next(64).await.unwrap();
    let sizes: Vec<usize> = segs.iter().map(|s| s.readings.len()).collect();
    assert_eq!(sizes.first(), Some(&1), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 20, "{sizes:?}");
}

/// An MQTT 5 CONNECT of `id` with a session expiry of 60 s and a will delayed by 1 s.
async fn connect_with_delayed_will(e: &Env, id: &str) -> Client {
    let mut c = e.connect();
    let mut props = c5::ConnectProperties::new();
    props.session_expiry_interval = Some(60);
    let will_props = c5::LastWillProperties {
        delay_interval: Some(1),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    c.send5(c5::Packet::Connect(
        c5::Connect {
            keep_alive: 30,
            client_id: id.into(),
            clean_start: false,
            properties: Some(props),
        },
        Some(c5::LastWill::new(
            format!("status/{id}"),
            "offline",
            Q5::AtLeastOnce,
            false,
            Some(will_props),
        )),
        None,
    ))
    .await;
    match c.recv5().await {
        Some(c5::Packet::ConnAck(a)) => assert_eq!(a.code, c5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c
}

#[tokio::test]
async fn a_delayed_will_waits_and_is_dropped_if_the_client_comes_back() {
    let e = env();
    let c = connect_with_delayed_will(&e, "dev-w").await;
    drop(c);
    // Back within the delay: no will.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = connect_with_delayed_will(&e, "dev-w").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        e.stored().await.is_empty(),
        "the will was published though the client came back"
    );
    // Gone for longer than the delay: the will comes, after it.
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        e.stored().await.is_empty(),
        "the will did not wait for its delay"
    );
    for _ in 0..100 {
        if let Some(r) = e.stored().await.first() {
            assert_eq!(
                (r.topic.as_str(), &r.payload[..]),
                ("status/dev-w", &b"offline"[..])
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no will after its delay");
}

#[tokio::test]
async fn mqtt5_subscribers_get_topic_aliases_and_the_server_keep_alive() {
    let e = env_with(
        MqttSettings {
            max_keep_alive_secs: 30,
            ..Default::default()
        },
        opts(),
    );
    let mut sub = e.connect();
    let mut props = c5::ConnectProperties::new();
    props.topic_alias_max = Some(2);
    sub.send5(c5::Packet::Connect(
        c5::Connect {
            keep_alive: 0,
            client_id: "sub5".into(),
            clean_start: true,
            properties: Some(props),
        },
        None,
        None,
    ))
    .await;
    match sub.recv5().await {
        Some(c5::Packet::ConnAck(a)) => {
            // It asked for no keep alive: it gets ferry's longest.
            assert_eq!(a.properties.unwrap().server_keep_alive, Some(30));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    sub.send5(c5::Packet::Subscribe(c5::Subscribe::new(
        c5::Filter::new("a/#", Q5::AtMostOnce),
        None,
    )))
    .await;
    assert!(matches!(sub.recv5().await, Some(c5::Packet::SubAck(..))));
    let mut publisher = e.connect();
    publisher.connect4(c4::Connect::new("pub4")).await;
    for (i, t) in ["a/1", "a/1", "a/2", "a/3", "a/2"].iter().enumerate() {
        publisher
            .send4(publish4(t, QoS::AtLeastOnce, i as u16 + 1, b"x"))
            .await;
    }
    // (topic sent, alias): a new alias while the client takes more (2), then the alias alone.
    let mut got = Vec::new();
    while got.len() < 5 {
        match sub.recv5().await {
            Some(c5::Packet::Publish(p)) => got.push((
                String::from_utf8_lossy(&p.topic).into_owned(),
                p.properties.and_then(|p| p.topic_alias),
            )),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    let want = [
        ("a/1", Some(1)),
        ("", Some(1)),
        ("a/2", Some(2)),
        ("a/3", None),
        ("", Some(2)),
    ];
    assert_eq!(
        got,
        want.map(|(t, a)| (t.to_string(), a)).to_vec(),
        "(topic, alias) as sent"
    );
}
