//! MQTT listener end to end, against the real binary: rumqttc v4 and v5 at QoS 0/1/2, auth,
//! oversized and wildcard publishes, malformed bytes, CONNECT timeout, keep-alive, last will.

use crate::support;
use bytes::BytesMut;
use ferry_tests::{Ferry, buffered_readings};
use rumqttc::mqttbytes::v4 as c4;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn payloads(f: &Ferry) -> Vec<(String, String, String)> {
    buffered_readings(&f.data_dir, "kafka")
        .into_iter()
        .map(|r| {
            (
                r.source.to_string(),
                r.topic.clone(),
                String::from_utf8_lossy(&r.payload).into_owned(),
            )
        })
        .collect()
}

/// v3.1.1 client: QoS 0, 1 and 2 with each ack checked.
#[test]
fn rumqttc_v4_qos_0_1_2() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut f = Ferry::start("");
    let addr = f.addr("mqtt");
    support::rt().block_on(async {
        let opts = MqttOptions::new("v4-dev", addr.ip().to_string(), addr.port());
        let (client, mut el) = AsyncClient::new(opts, 10);
        client
            .publish("s/v4/q0", QoS::AtMostOnce, false, "v4-q0")
            .await
            .unwrap();
        client
            .publish("s/v4/q1", QoS::AtLeastOnce, false, "v4-q1")
            .await
            .unwrap();
        client
            .publish("s/v4/q2", QoS::ExactlyOnce, false, "v4-q2")
            .await
            .unwrap();
        let (mut puback, mut pubrec, mut pubcomp) = (false, false, false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(puback && pubrec && pubcomp) {
            assert!(Instant::now() < deadline, "acks missing");
            match el.poll().await.expect("connection") {
                Event::Incoming(Packet::ConnAck(a)) => {
                    assert_eq!(a.code, rumqttc::ConnectReturnCode::Success)
                }
                Event::Incoming(Packet::PubAck(_)) => puback = true,
                Event::Incoming(Packet::PubRec(_)) => pubrec = true,
                Event::Incoming(Packet::PubComp(_)) => pubcomp = true,
                _ => {}
            }
        }
        client.disconnect().await.unwrap();
        while let Ok(ev) = el.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    });
    f.terminate(Duration::from_secs(10)).expect("clean exit");
    let got = payloads(&f);
    for p in ["v4-q0", "v4-q1", "v4-q2"] {
        assert!(
            got.iter().any(|(s, _, x)| s == "mqtt" && x == p),
            "{p} missing in {got:?}"
        );
    }
    assert_eq!(got.len(), 3, "nothing stored twice: {got:?}");
}

/// v5 client: QoS 0, 1 and 2 with each ack's reason code checked; properties are kept.
#[test]
fn rumqttc_v5_qos_0_1_2_with_properties() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut f = Ferry::start("");
    let addr = f.addr("mqtt");
    support::rt().block_on(async {
        let opts = MqttOptions::new("v5-dev", addr.ip().to_string(), addr.port());
        let (client, mut el) = AsyncClient::new(opts, 10);
        let props = PublishProperties {
            content_type: Some("application/json".into()),
            user_properties: vec![("unit".into(), "C".into())],
            ..Default::default()
        };
        client
            .publish("s/v5/q0", QoS::AtMostOnce, false, "v5-q0")
            .await
            .unwrap();
        client
            .publish_with_properties("s/v5/q1", QoS::AtLeastOnce, false, "v5-q1", props)
            .await
            .unwrap();
        client
            .publish("s/v5/q2", QoS::ExactlyOnce, false, "v5-q2")
            .await
            .unwrap();
        let (mut puback, mut pubrec, mut pubcomp) = (false, false, false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(puback && pubrec && pubcomp) {
            assert!(Instant::now() < deadline, "acks missing");
            match el.poll().await.expect("connection") {
                Event::Incoming(Packet::ConnAck(a)) => {
                    let p = a.properties.expect("v5 CONNACK properties");
                    assert_eq!(p.receive_max, Some(64));
                }
                Event::Incoming(Packet::PubAck(a)) => {
                    assert_eq!(a.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
                    puback = true
                }
                Event::Incoming(Packet::PubRec(a)) => {
                    assert_eq!(a.reason, rumqttc::v5::mqttbytes::v5::PubRecReason::Success);
                    pubrec = true
                }
                Event::Incoming(Packet::PubComp(_)) => pubcomp = true,
                _ => {}
            }
        }
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
    });
    f.terminate(Duration::from_secs(10)).expect("clean exit");
    let all = buffered_readings(&f.data_dir, "kafka");
    assert_eq!(all.len(), 3);
    let q1 = all.iter().find(|r| &r.payload[..] == b"v5-q1").unwrap();
    assert_eq!(q1.content_type.as_deref(), Some("application/json"));
    assert_eq!(q1.properties, vec![("unit".to_string(), "C".to_string())]);
    assert_eq!(q1.device, "v5-dev");
}

/// Raw v3.1.1 client over a blocking socket.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    fn open(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }
    fn send(&mut self, p: c4::Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, 1 << 24).unwrap();
        self.s.write_all(&out).unwrap();
    }
    /// The next packet, or `None` when the server closed the connection.
    fn recv(&mut self) -> Option<c4::Packet> {
        loop {
            match c4::Packet::read(&mut self.buf, 1 << 24) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    let mut b = [0u8; 4096];
                    match self.s.read(&mut b) {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => self.buf.extend_from_slice(&b[..n]),
                    }
                }
                Err(e) => panic!("bad packet from ferry: {e:?}"),
            }
        }
    }
    fn connect(addr: SocketAddr, c: c4::Connect) -> (Raw, c4::ConnectReturnCode) {
        let mut r = Raw::open(addr);
        r.send(c4::Packet::Connect(c));
        match r.recv() {
            Some(c4::Packet::ConnAck(a)) => (r, a.code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

fn publish(topic: &str, qos: rumqttc::QoS, pkid: u16, payload: &[u8]) -> c4::Packet {
    let mut p = c4::Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    c4::Packet::Publish(p)
}

#[test]
fn auth_failures_get_refusing_connacks() {
    let f = Ferry::start(
        "[mqtt]\nallow_anonymous = false\n[[mqtt.users]]\nusername = \"dev\"\npassword = \"pw\"\n",
    );
    let addr = f.addr("mqtt");
    let mut c = c4::Connect::new("a");
    c.login = Some(c4::Login::new("dev", "wrong"));
    assert_eq!(
        Raw::connect(addr, c).1,
        c4::ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        Raw::connect(addr, c4::Connect::new("b")).1,
        c4::ConnectReturnCode::NotAuthorized
    );
    let mut c = c4::Connect::new("c");
    c.login = Some(c4::Login::new("dev", "pw"));
    assert_eq!(Raw::connect(addr, c).1, c4::ConnectReturnCode::Success);
    // rumqttc sees the refusal too.
    support::rt().block_on(async {
        let mut o = rumqttc::MqttOptions::new("d", addr.ip().to_string(), addr.port());
        o.set_credentials("dev", "nope");
        let (_c, mut el) = rumqttc::AsyncClient::new(o, 10);
        match el.poll().await {
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    });
    assert!(!f.log().contains("wrong"), "passwords are never logged");
}

#[test]
fn oversized_and_wildcard_publishes_close_v4_connections() {
    let mut f = Ferry::start("[mqtt]\nmax_payload_bytes = 1000\n");
    let addr = f.addr("mqtt");
    let (mut r, _) = Raw::connect(addr, c4::Connect::new("big"));
    r.send(publish("t", rumqttc::QoS::AtLeastOnce, 1, &[b'x'; 1001]));
    assert!(r.recv().is_none(), "no PUBACK; closed");
    // Far over the frame limit: refused from the fixed header.
    let (mut r, _) = Raw::connect(addr, c4::Connect::new("huge"));
    r.send(publish(
        "t",
        rumqttc::QoS::AtLeastOnce,
        1,
        &vec![b'x'; 200_000],
    ));
    assert!(r.recv().is_none());
    let (mut r, _) = Raw::connect(addr, c4::Connect::new("wild"));
    r.send(publish("a/+/b", rumqttc::QoS::AtLeastOnce, 1, b"x"));
    assert!(r.recv().is_none());
    let (mut r, _) = Raw::connect(addr, c4::Connect::new("ok"));
    r.send(publish("t", rumqttc::QoS::AtLeastOnce, 2, &[b'y'; 1000]));
    assert!(matches!(r.recv(), Some(c4::Packet::PubAck(a)) if a.pkid == 2));
    let log = f.log();
    assert!(log.contains("exceeds max_payload_bytes"), "{log}");
    assert!(log.contains("not a valid topic name"), "{log}");
    f.terminate(Duration::from_secs(10));
    assert_eq!(payloads(&f).len(), 1);
}

#[test]
fn malformed_bytes_do_not_hurt_the_gateway() {
    let f = Ferry::start("");
    let addr = f.addr("mqtt");
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01][..],
        &[0x10, 0x05, 0x00, 0x04, b'M', b'Q', b'T'][..],
        &[0x20, 0x02, 0x00, 0x00][..],
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
    }
    // After a good CONNECT, junk closes that connection only.
    let (mut r, _) = Raw::connect(addr, c4::Connect::new("junk"));
    r.s.write_all(&[0xB0, 0x02, 0x00, 0x01]).unwrap(); // UNSUBACK from a client
    assert!(r.recv().is_none());
    let (mut r, code) = Raw::connect(addr, c4::Connect::new("good"));
    assert_eq!(code, c4::ConnectReturnCode::Success);
    r.send(publish("t", rumqttc::QoS::AtLeastOnce, 5, b"fine"));
    assert!(matches!(r.recv(), Some(c4::Packet::PubAck(a)) if a.pkid == 5));
}

#[test]
fn silent_sockets_are_closed_after_connect_timeout() {
    let f = Ferry::start("[mqtt]\nconnect_timeout_ms = 300\n");
    let mut s = TcpStream::connect(f.addr("mqtt")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = Instant::now();
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn keep_alive_expiry_closes_and_delivers_the_will() {
    let mut f = Ferry::start("");
    let mut c = c4::Connect::new("sleepy");
    c.keep_alive = 1;
    c.last_will = Some(c4::LastWill::new(
        "status/sleepy",
        "gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (mut r, _) = Raw::connect(f.addr("mqtt"), c);
    let t0 = Instant::now();
    assert!(r.recv().is_none());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    f.terminate(Duration::from_secs(10));
    let got = payloads(&f);
    assert_eq!(
        got,
        vec![("mqtt-will".into(), "status/sleepy".into(), "gone".into())]
    );
}

#[test]
fn abrupt_disconnect_delivers_the_will() {
    let mut f = Ferry::start("");
    let mut c = c4::Connect::new("flaky");
    c.last_will = Some(c4::LastWill::new(
        "status/flaky",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (r, _) = Raw::connect(f.addr("mqtt"), c);
    drop(r);
    // A clean DISCONNECT sends no will.
    let mut c = c4::Connect::new("polite");
    c.last_will = Some(c4::LastWill::new(
        "status/polite",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (mut r, _) = Raw::connect(f.addr("mqtt"), c);
    r.send(c4::Packet::Disconnect);
    assert!(r.recv().is_none());
    std::thread::sleep(Duration::from_millis(300));
    f.terminate(Duration::from_secs(10));
    let got = payloads(&f);
    assert_eq!(
        got,
        vec![("mqtt-will".into(), "status/flaky".into(), "offline".into())]
    );
}
