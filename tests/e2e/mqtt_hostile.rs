//! Hostile MQTT clients against the real binary: garbage bytes, a huge
//! remaining length, a CONNECT flood past `max_connections`, CONNECTs that never finish, and
//! a client that stops reading its socket.
//!
//! Each case asserts three things: (a) a well-behaved rumqttc client publishing at QoS 1 is
//! acknowledged during or right after the attack, and its reading really is in the buffer;
//! (b) ferry's memory stays under a stated bound (`VmHWM`, the peak resident set, read from
//! `/proc/<pid>/status`); (c) the attacker gets the clear error: a CONNACK or v5 DISCONNECT
//! reason code, a `ferry_mqtt_rejected_total{reason=...}` count and a log line.
//!
//! Already covered elsewhere (not repeated here): single malformed packets and a client
//! packet type after CONNECT (`mqtt_ingest::malformed_bytes_do_not_hurt_the_gateway`), one
//! oversized publish (`mqtt_ingest::oversized_and_wildcard_publishes_close_v4_connections`), one
//! silent socket (`mqtt_ingest::silent_sockets_are_closed_after_connect_timeout`).

use crate::support;
use ferry_tests::{Ferry, buffered_readings};
use rumqttc::mqttbytes::v4 as c4;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

/// Starts ferry with `toml`, which configures no uplink: readings stay in the buffer for the
/// check.
fn start(toml: &str) -> Ferry {
    Ferry::start(toml)
}

/// The well-behaved client: rumqttc v3.1.1, one QoS 1 publish of `payload` on `good/<id>`,
/// waits for its PUBACK. `Err` carries what went wrong (e.g. a refusing CONNACK).
fn good_publish(addr: SocketAddr, id: &str, payload: &str) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    support::rt().block_on(async {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (c, mut el) = AsyncClient::new(o, 10);
        c.publish(format!("good/{id}"), QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("{e:?}")),
                Err(_) => return Err("no PUBACK within 20 s".into()),
            }
        }
        let _ = c.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
        Ok(())
    })
}

/// Stops ferry and asserts every `payload` is in its buffer.
fn assert_stored(f: &mut Ferry, payloads: &[String]) {
    f.terminate(Duration::from_secs(15));
    let stored: Vec<String> = buffered_readings(&f.data_dir, "kafka")
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    for p in payloads {
        assert!(
            stored.contains(p),
            "the acknowledged reading {p:?} is not in the buffer: {stored:?}"
        );
    }
}

/// `GET /metrics` over a raw HTTP/1.0 socket.
fn metrics(f: &Ferry) -> String {
    let mut s = TcpStream::connect(f.addr("http")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one metric line (`name{labels}`), 0 if absent.
fn metric(f: &Ferry, series: &str) -> u64 {
    let text = metrics(f);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap_or(0.0) as u64)
        .unwrap_or(0)
}

/// Polls `metric(series)` until it reaches `want`; returns the last value.
fn wait_metric(f: &Ferry, series: &str, want: u64, within: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let v = metric(f, series);
        if v >= want || start.elapsed() > within {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads from `s` until EOF or an error (both mean ferry closed it); returns the bytes read
/// and whether it was closed within `within`.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while start.elapsed() < within {
        match s.read(&mut b) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (got, true),
        }
    }
    (got, false)
}

fn connect_bytes(id: &str) -> Vec<u8> {
    support::encode4(c4::Packet::Connect(c4::Connect::new(id)))
}

/// A v5 CONNECT (protocol level 5, no properties, clean start, keep-alive 60 s).
fn connect_v5_bytes(id: &str) -> Vec<u8> {
    let mut vh = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0];
    vh.extend_from_slice(&(id.len() as u16).to_be_bytes());
    vh.extend_from_slice(id.as_bytes());
    let mut out = vec![0x10, vh.len() as u8];
    out.extend_from_slice(&vh);
    out
}

/// Deterministic junk (xorshift), never starting with a CONNECT byte.
fn junk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    if v[0] >> 4 == 1 {
        v[0] ^= 0x30;
    }
    v
}

/// The bound for every case below: ferry idles at about 15-25 MiB; 128 MiB leaves room for
/// the attack's sockets and a debug build, while a per-connection leak of the attacker's
/// bytes (e.g. 200 x 1 MiB of junk, or buffering a 256 MiB remaining length) would exceed it.
const PEAK_BOUND: u64 = 128 * MIB;

/// `FERRY_HOSTILE_SCALE=N` multiplies the attackers of the garbage and flood cases (the long
/// variant; default 1, the fast run in CI).
fn scale() -> usize {
    std::env::var("FERRY_HOSTILE_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize)
        .max(1)
}

/// 200 clients (x `FERRY_HOSTILE_SCALE`) each send 1 MiB of random bytes (half of them after a valid CONNECT); every
/// one is closed, the rejections are counted, and a good client is served during and after.
#[test]
fn garbage_bytes_from_200_clients() {
    let mut f = start("");
    let addr = f.addr("mqtt");
    let n = 200 * scale();
    let attackers: Vec<_> = (0..n as u64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                if i % 2 == 1 {
                    s.write_all(&connect_bytes(&format!("junk-{i}"))).unwrap();
                }
                // ferry closes at the first bad byte: later writes may fail, which is fine.
                for k in 0..16 {
                    if s.write_all(&junk(i * 100 + k, 64 * 1024)).is_err() {
                        break;
                    }
                }
                let (_, closed) = read_until_closed(&mut s, Duration::from_secs(20));
                closed
            })
        })
        .collect();
    let during = "during-garbage".to_string();
    good_publish(addr, "good-during", &during).expect("a good client during the attack");
    let closed = attackers
        .into_iter()
        .filter(|_| true)
        .map(|t| t.join().unwrap())
        .filter(|c| *c)
        .count();
    assert_eq!(closed, n, "every junk connection is closed by ferry");
    let after = "after-garbage".to_string();
    good_publish(addr, "good-after", &after).expect("a good client after the attack");
    // Junk after a CONNECT may frame as an oversized packet or a PUBLISH with a bad topic:
    // every connection counts once, under some reason, and most as protocol errors.
    let start = Instant::now();
    let rejected = loop {
        let text = metrics(&f);
        let sum: u64 = text
            .lines()
            .filter(|l| l.starts_with("ferry_mqtt_rejected_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if sum >= n as u64 || start.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{}",
                text.lines()
                    .filter(|l| l.starts_with("ferry_mqtt_rejected_total"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            break sum;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        rejected, n as u64,
        "each junk connection counts as one rejection"
    );
    assert!(metric(&f, "ferry_mqtt_rejected_total{reason=\"protocol_error\"}") >= n as u64 / 2);
    let log = f.log();
    assert!(
        log.contains("is not a valid CONNECT") && log.contains("malformed packet"),
        "{log}"
    );
    f.assert_peak_below(PEAK_BOUND, "garbage bytes");
    assert_stored(&mut f, &[during, after]);
}

/// A remaining length of 268435455 (the MQTT maximum, 256 MiB), as the first packet and as a
/// PUBLISH after v3.1.1 and v5 CONNECTs, followed by 1 MiB of body: ferry refuses it from the
/// fixed header (v5: DISCONNECT 0x95 Packet too large) and buffers none of it.
#[test]
fn huge_remaining_length_is_refused_from_the_header() {
    let mut f = start("");
    let addr = f.addr("mqtt");
    const HUGE: [u8; 4] = [0xFF, 0xFF, 0xFF, 0x7F];
    let attackers: Vec<_> = (0..60u32)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                match i % 3 {
                    0 => {} // the huge packet is the first one (a CONNECT)
                    1 => s.write_all(&connect_bytes(&format!("huge-{i}"))).unwrap(),
                    _ => s
                        .write_all(&connect_v5_bytes(&format!("huge-{i}")))
                        .unwrap(),
                }
                let first = if i % 3 == 0 { 0x10 } else { 0x32 };
                let mut head = vec![first];
                head.extend_from_slice(&HUGE);
                head.extend_from_slice(&[0, 1, b't', 0, 1]);
                let _ = s.write_all(&head);
                for _ in 0..16 {
                    if s.write_all(&[b'x'; 64 * 1024]).is_err() {
                        break;
                    }
                }
                let (got, closed) = read_until_closed(&mut s, Duration::from_secs(20));
                (i % 3, got, closed)
            })
        })
        .collect();
    good_publish(addr, "good-during", "during-huge").expect("a good client during the attack");
    for t in attackers {
        let (kind, got, closed) = t.join().unwrap();
        assert!(closed, "a connection announcing 256 MiB was left open");
        if kind == 2 {
            // CONNACK (4+ bytes) then DISCONNECT: type 0xE0, reason code 0x95.
            let at = got.iter().position(|b| *b == 0xE0);
            let code = at.and_then(|a| got.get(a + 2)).copied();
            assert_eq!(
                code,
                Some(0x95),
                "v5 gets DISCONNECT Packet too large: {got:02x?}"
            );
        }
    }
    good_publish(addr, "good-after", "after-huge").expect("a good client after the attack");
    assert_eq!(
        wait_metric(
            &f,
            "ferry_mqtt_rejected_total{reason=\"payload_too_large\"}",
            40,
            Duration::from_secs(10)
        ),
        40,
        "the 40 PUBLISHes count as too large"
    );
    assert!(
        metric(&f, "ferry_mqtt_rejected_total{reason=\"protocol_error\"}") >= 20,
        "the 20 huge CONNECTs count as protocol errors"
    );
    assert!(f.log().contains("exceeds max_payload_bytes"), "{}", f.log());
    f.assert_peak_below(PEAK_BOUND, "huge remaining length");
    assert_stored(&mut f, &["during-huge".into(), "after-huge".into()]);
}

/// 500 clients CONNECT at once against `max_connections = 100` (both x `FERRY_HOSTILE_SCALE`):
/// exactly `max_connections` are admitted,
/// the others get CONNACK 0x03 (server unavailable) or are closed at once, and are counted.
/// The good client is refused with the same clear code while the 100 hold every slot, and is
/// served as soon as they leave.
#[test]
fn connect_flood_past_max_connections() {
    let (max, n) = (100 * scale(), 500 * scale());
    let mut f = start(&format!(
        "[mqtt]\nmax_connections = {max}\nconnect_timeout_ms = 3000\n"
    ));
    let addr = f.addr("mqtt");
    let socks: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let _ = s.write_all(&connect_bytes(&format!("flood-{i}")));
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut b = [0u8; 4];
                let code = match s.read_exact(&mut b) {
                    Ok(()) if b[0] == 0x20 => Some(b[3]),
                    Ok(()) => panic!("not a CONNACK: {b:02x?}"),
                    Err(_) => None, // closed without CONNACK
                };
                (s, code)
            })
        })
        .collect();
    let results: Vec<_> = socks.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted = results.iter().filter(|r| r.1 == Some(0)).count();
    let busy = results.iter().filter(|r| r.1 == Some(3)).count();
    let closed = results.iter().filter(|r| r.1.is_none()).count();
    eprintln!("flood: admitted {admitted}, CONNACK 0x03 {busy}, closed {closed}");
    assert_eq!(admitted, max, "exactly max_connections are admitted");
    assert_eq!(busy + closed, n - max);
    assert!(busy >= 1, "refused clients that wait get CONNACK 0x03");
    assert_eq!(
        wait_metric(
            &f,
            "ferry_mqtt_rejected_total{reason=\"max_connections\"}",
            (n - max) as u64,
            Duration::from_secs(10)
        ),
        (n - max) as u64
    );
    assert!(
        f.log().contains("max_connections is reached"),
        "{}",
        f.log()
    );
    // While the flood holds every slot, a good client is refused clearly, not left hanging.
    let during = good_publish(addr, "good-during", "refused");
    assert!(
        during
            .as_ref()
            .is_err_and(|e| e.contains("ServiceUnavailable")),
        "{during:?}"
    );
    drop(results);
    // Right after: the slots come back as the sockets close.
    let start = Instant::now();
    loop {
        match good_publish(addr, "good-after", "after-flood") {
            Ok(()) => break,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                eprintln!("retrying: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the good client is not served after the flood: {e}"),
        }
    }
    f.assert_peak_below(PEAK_BOUND, "connect flood");
    assert_stored(&mut f, &["after-flood".into()]);
}

/// 60 clients start a CONNECT and never finish it (half send a fixed header announcing 40
/// bytes and stop, half drip one byte every 200 ms, which does not extend the deadline).
/// Every one is closed at `connect_timeout_ms`; the slots they held come back (all 64 slots
/// admit new clients afterwards), so no session task is leaked.
#[test]
fn connects_that_never_finish_are_closed_and_release_their_slot() {
    let mut f = start("[mqtt]\nmax_connections = 64\nconnect_timeout_ms = 1000\n");
    let addr = f.addr("mqtt");
    let t0 = Instant::now();
    let stalled: Vec<_> = (0..60u32)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let full = connect_bytes(&format!("stalled-client-{i:04}"));
                if i % 2 == 0 {
                    s.write_all(&full[..5]).unwrap();
                    read_until_closed(&mut s, Duration::from_secs(20)).1
                } else {
                    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                    let start = Instant::now();
                    // The whole CONNECT would take ~6 s at this pace.
                    for b in &full[..full.len() - 1] {
                        if s.write_all(&[*b]).is_err() {
                            return true;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                        let mut x = [0u8; 1];
                        if matches!(s.read(&mut x), Ok(0)) {
                            return true;
                        }
                        if start.elapsed() > Duration::from_secs(20) {
                            return false;
                        }
                    }
                    read_until_closed(&mut s, Duration::from_secs(20)).1
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    good_publish(addr, "good-during", "during-stall").expect("a good client during the attack");
    let closed = stalled
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|c| *c)
        .count();
    let took = t0.elapsed();
    assert_eq!(closed, 60, "every unfinished CONNECT is closed");
    assert!(
        took < Duration::from_secs(15),
        "closing took {took:?} (timeout 1 s)"
    );
    assert!(
        wait_metric(
            &f,
            "ferry_mqtt_rejected_total{reason=\"connect_timeout\"}",
            60,
            Duration::from_secs(10)
        ) >= 60
    );
    assert!(
        f.log().contains("no CONNECT within connect_timeout_ms"),
        "{}",
        f.log()
    );
    // Every slot is free again: 64 clients are all admitted.
    let held: Vec<_> = (0..64)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&connect_bytes(&format!("after-{i}"))).unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b, [0x20, 2, 0, 0], "client {i} after the stall is admitted");
            s
        })
        .collect();
    drop(held);
    let start = Instant::now();
    while let Err(e) = good_publish(addr, "good-after", "after-stall") {
        assert!(start.elapsed() < Duration::from_secs(20), "{e}");
        std::thread::sleep(Duration::from_millis(200));
    }
    f.assert_peak_below(PEAK_BOUND, "unfinished connects");
    assert_stored(&mut f, &["during-stall".into(), "after-stall".into()]);
}

/// A client CONNECTs, then sends PINGREQs as fast as its socket takes them but never reads
/// (its receive buffer is set to 4 KiB). ferry's PINGRESPs fill both socket buffers; ferry
/// must not stay blocked on that write forever (the connection, its slot and its task would
/// live as long as the client wants): it closes the connection after `mqtt.write_timeout_ms`
/// and logs why. Memory stays bounded meanwhile, and a good client is served.
#[test]
fn a_client_that_stops_reading_is_cut_off() {
    let mut f = start("[mqtt]\nwrite_timeout_ms = 1000\n");
    let addr = f.addr("mqtt");
    let mut s = support::rt().block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let s = sock.connect(addr).await.unwrap();
        s.into_std().unwrap()
    });
    s.set_nonblocking(false).unwrap();
    s.write_all(&connect_bytes("deaf")).unwrap();
    let mut ack = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    // 64 KiB of PINGREQs per write; never read again.
    let chunk = [0xC0u8, 0x00].repeat(32 * 1024);
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // The good client publishes while the deaf one floods.
    let good = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        good_publish(addr, "good-during", "during-deaf")
    });
    let start = Instant::now();
    let (mut sent, mut pos) = (0usize, 0usize);
    let mut cut = false;
    while start.elapsed() < Duration::from_secs(60) {
        match s.write(&chunk[pos..]) {
            Ok(n) => {
                sent += n;
                pos = (pos + n) % chunk.len();
            }
            // Our writes are blocked: ferry stopped reading because its replies are stuck.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    let took = start.elapsed();
    eprintln!(
        "deaf client: sent {:.1} MiB before ferry cut it off after {took:?}",
        sent as f64 / MIB as f64
    );
    assert!(
        cut,
        "ferry kept a client that reads nothing for {took:?} (sent {sent} B)"
    );
    good.join()
        .unwrap()
        .expect("a good client while a client is deaf");
    // ferry logs right after it closed the socket: poll for the line.
    let start = Instant::now();
    while !f.log().contains("does not read its socket") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no log line says why:\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        wait_metric(
            &f,
            "ferry_mqtt_rejected_total{reason=\"write_timeout\"}",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    good_publish(addr, "good-after", "after-deaf").expect("a good client after");
    f.assert_peak_below(PEAK_BOUND, "client that stops reading");
    assert_stored(&mut f, &["during-deaf".into(), "after-deaf".into()]);
}

/// A device that reconnects in a loop with a wrong password is refused every time, counted
/// every time, and logged once, then once per `status.log_summary_secs` with a count.
#[test]
fn a_reconnect_loop_with_a_wrong_password_is_logged_once_then_summarised() {
    let ferry = start(
        "[[mqtt.users]]\nusername = \"dev\"\npassword = \"right-password\"\n\n[status]\nlog_summary_secs = 2\n",
    );
    let addr = ferry.addr("mqtt");
    let attempt = |i: usize| {
        let mut c = c4::Connect::new(format!("loop-{i}"));
        c.set_login("dev", "wrong-password");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.write_all(&support::encode4(c4::Packet::Connect(c)))
            .unwrap();
        let (got, _) = read_until_closed(&mut s, Duration::from_secs(2));
        // CONNACK, return code 4 (bad user name or password).
        assert_eq!(
            got.get(..4),
            Some(&[0x20, 2, 0, 4][..]),
            "attempt {i}: {got:?}"
        );
    };
    for i in 0..40 {
        attempt(i);
    }
    let count = |text: &str| ferry.log().matches(text).count();
    assert_eq!(count("A CONNECT was refused"), 1, "{}", ferry.log());
    assert_eq!(count("CONNECTs keep being refused"), 0, "{}", ferry.log());
    // After the summary period, the next refusal brings one line with the count.
    std::thread::sleep(Duration::from_millis(2100));
    attempt(40);
    let log = ferry.log();
    assert_eq!(count("CONNECTs keep being refused"), 1, "{log}");
    assert!(log.contains("repeats=40"), "{log}");
    // Every refusal is still counted for the status page and metrics.
    let rt = support::rt();
    let st: serde_json::Value = rt.block_on(async {
        reqwest::get(format!("{}/api/status", ferry.http_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let refused = st["losses"]["rejected"]["mqtt.bad_credentials"].as_u64();
    assert_eq!(refused, Some(41), "{:#}", st["losses"]);
}
