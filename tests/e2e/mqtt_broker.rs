//! ferry as the box's MQTT broker, with clients no one here wrote: rumqttc subscribers and
//! publishers, Debian's `mosquitto_sub` / `mosquitto_pub` (MQTT 3.1.1 and 5). Fan-out and
//! wildcards, `$` topics, QoS 2 to a subscriber, retained messages across SIGKILL, MQTT 5
//! properties and subscription options, and a stuck subscriber beside 50 publishers.

use crate::support::{encode4, mosquitto, rt, status, sub_lines};
use ferry_tests::{Ferry, buffered_readings, require_tool};
use rumqttc::mqttbytes::v4 as c4;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A rumqttc v3.1.1 subscriber to `filters`, gathering `(topic, payload, qos)` of what it
/// receives until it has `want` messages or `within` passed.
async fn subscribe(
    addr: SocketAddr,
    id: &str,
    filters: &[(&str, QoS)],
) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(2 << 20, 2 << 20);
    let (c, mut el) = AsyncClient::new(o, 64);
    for (f, q) in filters {
        c.subscribe(*f, *q).await.unwrap();
    }
    // Until every SUBACK is in: after that, a publish is routed to this client.
    let mut subacks = 0;
    while subacks < filters.len() {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(a)))) => {
                assert!(
                    a.return_codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                    "{id}: {a:?}"
                );
                subacks += 1;
            }
            Ok(Ok(_)) => {}
            other => panic!("{id}: no SUBACK: {other:?}"),
        }
    }
    (c, el)
}

async fn gather(
    el: &mut rumqttc::EventLoop,
    want: usize,
    within: Duration,
) -> Vec<(String, String, QoS)> {
    let until = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want {
        match tokio::time::timeout_at(until, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push((
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.qos,
            )),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber connection failed: {e}"),
            Err(_) => break,
        }
    }
    got
}

#[test]
fn fan_out_wildcards_dollar_topics_and_qos2_to_subscribers() {
    let mut f = Ferry::start("");
    let addr = f.addr("mqtt");
    rt().block_on(async {
        let (_a, mut a) = subscribe(addr, "sub-a", &[("site/+/temp", QoS::ExactlyOnce)]).await;
        let (_b, mut b) = subscribe(addr, "sub-b", &[("#", QoS::AtLeastOnce)]).await;
        let (_c, mut c) = subscribe(addr, "sub-c", &[("$ops/#", QoS::AtMostOnce)]).await;
        let (p, mut pel) = {
            let o = MqttOptions::new("pub", addr.ip().to_string(), addr.port());
            AsyncClient::new(o, 16)
        };
        let sends = [
            ("site/d1/temp", QoS::ExactlyOnce),
            ("site/d2/temp", QoS::AtLeastOnce),
            ("site/d1/hum", QoS::ExactlyOnce),
            ("$ops/health", QoS::AtLeastOnce),
        ];
        for (i, (t, q)) in sends.iter().enumerate() {
            p.publish(*t, *q, false, format!("m{i}")).await.unwrap();
        }
        let driver = tokio::spawn(async move { while pel.poll().await.is_ok() {} });
        let ga = gather(&mut a, 2, Duration::from_secs(10)).await;
        let gb = gather(&mut b, 3, Duration::from_secs(10)).await;
        let gc = gather(&mut c, 1, Duration::from_secs(10)).await;
        // Nothing more arrives: `#` does not match `$ops/health`, `site/+/temp` not `hum`.
        let more_a = gather(&mut a, 1, Duration::from_millis(500)).await;
        let more_b = gather(&mut b, 1, Duration::from_millis(500)).await;
        driver.abort();
        let topics =
            |g: &[(String, String, QoS)]| g.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(topics(&ga), ["site/d1/temp", "site/d2/temp"]);
        // The lower of the publish's and the subscription's QoS: QoS 2 end to end for the
        // first, QoS 1 for the one published at 1.
        assert_eq!((ga[0].2, ga[1].2), (QoS::ExactlyOnce, QoS::AtLeastOnce));
        assert_eq!(topics(&gb), ["site/d1/temp", "site/d2/temp", "site/d1/hum"]);
        assert!(gb.iter().all(|x| x.2 == QoS::AtLeastOnce), "{gb:?}");
        assert_eq!(topics(&gc), ["$ops/health"]);
        assert_eq!(gc[0].2, QoS::AtMostOnce);
        assert!(
            more_a.is_empty() && more_b.is_empty(),
            "{more_a:?} {more_b:?}"
        );

        let s = status(&f.http_url()).await;
        let subs = s["mqtt"]["subscribers"].as_array().unwrap();
        let clients: BTreeSet<&str> = subs.iter().map(|x| x["client"].as_str().unwrap()).collect();
        assert_eq!(clients, BTreeSet::from(["sub-a", "sub-b", "sub-c"]));
        assert!(s["mqtt"]["delivered_total"].as_u64().unwrap() >= 6, "{s}");
    });
    // Every message a subscriber saw is a committed reading.
    f.terminate(Duration::from_secs(10)).expect("clean exit");
    let stored: BTreeSet<String> = buffered_readings(&f.data_dir, "kafka")
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(
        stored,
        BTreeSet::from(["m0", "m1", "m2", "m3"].map(String::from))
    );
}

#[test]
fn retained_messages_survive_sigkill_and_clear_with_an_empty_payload() {
    let test = "retained_messages_survive_sigkill_and_clear_with_an_empty_payload";
    if !require_tool("mosquitto_pub", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    let mut f = Ferry::start("");
    let port = f.addr("mqtt").port();
    // Set two, replace one, add and then clear a third.
    for (v, t, m) in [
        ("mqttv311", "cfg/a", Some("a1")),
        ("mqttv5", "cfg/b", Some("b1")),
        ("mqttv5", "cfg/a", Some("a2")),
        ("mqttv311", "cfg/c", Some("c1")),
        ("mqttv311", "cfg/c", None),
    ] {
        let mut args = vec!["-V", v, "-q", "1", "-r", "-t", t];
        match m {
            Some(m) => args.extend(["-m", m]),
            None => args.push("-n"),
        }
        mosquitto("mosquitto_pub", port, &args);
    }
    let before = sub_lines(port, "mqttv311", "cfg/#", 3, 3, "%t %p %r");
    assert_eq!(before, ["cfg/a a2 1", "cfg/b b1 1"]);

    f.kill();
    f.restart();
    let port = f.addr("mqtt").port();
    for v in ["mqttv311", "mqttv5"] {
        let after = sub_lines(port, v, "cfg/#", 3, 3, "%t %p %r");
        assert_eq!(after, ["cfg/a a2 1", "cfg/b b1 1"], "{v} after SIGKILL");
    }
    // A live message to a subscriber has RETAIN 0 (MQTT-3.3.1-9); a new subscriber gets it
    // as retained.
    let port_s = port.to_string();
    let live = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port_s,
            "-t",
            "cfg/live",
            "-C",
            "1",
            "-W",
            "10",
            "-F",
            "%t %p %r",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    mosquitto(
        "mosquitto_pub",
        port,
        &["-q", "1", "-r", "-t", "cfg/live", "-m", "L"],
    );
    let out = live.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cfg/live L 0");
    let s = rt().block_on(status(&f.http_url()));
    assert_eq!(s["mqtt"]["retained"], 3, "{s}");
}

#[test]
fn mqtt5_properties_subscription_options_and_refusals() {
    let test = "mqtt5_properties_subscription_options_and_refusals";
    if !require_tool("mosquitto_pub", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    let f = Ferry::start("");
    let port = f.addr("mqtt").port();
    let port_s = port.to_string();
    // A v5 subscriber with a subscription identifier prints the properties it received.
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port_s,
            "-V",
            "mqttv5",
            "-t",
            "v5/#",
            "-C",
            "1",
            "-W",
            "10",
            "-D",
            "subscribe",
            "subscription-identifier",
            "42",
            "-F",
            "%t|%p|%C|%R|%D|%P|%S|%E",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    mosquitto(
        "mosquitto_pub",
        port,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "v5/x",
            "-m",
            "hello",
            "-D",
            "publish",
            "content-type",
            "text/plain",
            "-D",
            "publish",
            "response-topic",
            "reply/here",
            "-D",
            "publish",
            "correlation-data",
            "c0rr",
            "-D",
            "publish",
            "user-property",
            "unit",
            "C",
            "-D",
            "publish",
            "message-expiry-interval",
            "60",
        ],
    );
    let out = sub.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let parts: Vec<&str> = line.split('|').collect();
    assert_eq!(
        &parts[..7],
        [
            "v5/x",
            "hello",
            "text/plain",
            "reply/here",
            "c0rr",
            "unit:C",
            "42"
        ],
        "{line}"
    );
    // The expiry is passed on, less the time the message waited (at most 60 s).
    let left: u32 = parts[7].parse().unwrap_or_else(|_| panic!("{line}"));
    assert!((1..=60).contains(&left), "{line}");

    // A shared subscription without a group name is refused with 0x8F (143), topic filter
    // invalid; the valid filter in the same SUBSCRIBE is granted. mosquitto_sub prints the
    // SUBACK codes in debug mode.
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port_s,
            "-V",
            "mqttv5",
            "-d",
            "-W",
            "2",
            "-E",
            "-t",
            "$share//x",
            "-t",
            "ok/#",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Subscribed (mid: 1): 143, 0"), "{text}");
}

#[test]
fn a_shared_subscription_spreads_messages_over_its_members() {
    let test = "a_shared_subscription_spreads_messages_over_its_members";
    if !require_tool("mosquitto_pub", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    let f = Ferry::start("");
    let port = f.addr("mqtt").port().to_string();
    // Two members of group "workers" (MQTT 5 and 3.1.1) and a plain subscriber.
    let spawn = |v: &str, filter: &str| {
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                v,
                "-q",
                "1",
                "-t",
                filter,
                "-W",
                "4",
                "-F",
                "%p",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let members = [
        spawn("mqttv5", "$share/workers/jobs/#"),
        spawn("mqttv311", "$share/workers/jobs/#"),
    ];
    let plain = spawn("mqttv5", "jobs/#");
    std::thread::sleep(Duration::from_millis(700));
    for i in 0..20 {
        mosquitto(
            "mosquitto_pub",
            port.parse().unwrap(),
            &[
                "-q",
                "1",
                "-t",
                &format!("jobs/{i}"),
                "-m",
                &format!("j{i}"),
            ],
        );
    }
    let lines = |c: std::process::Child| -> Vec<String> {
        let out = c.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let per: Vec<Vec<String>> = members.into_iter().map(lines).collect();
    let all = lines(plain);
    assert_eq!(all.len(), 20, "{all:?}");
    // Each message went to exactly one member, and both members got a share.
    let mut shared: Vec<String> = per.concat();
    shared.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("j{i}")).collect();
    want.sort();
    assert_eq!(shared, want);
    assert!(per.iter().all(|p| !p.is_empty()), "{per:?}");
}

/// CONNECT (v3.1.1, clean session) as `id` and SUBSCRIBE `#` at `qos` from a raw socket
/// that then never reads.
fn stuck_subscriber(addr: SocketAddr, id: &str, qos: u8) -> TcpStream {
    let (mut s, present) = raw_connect(addr, id, true);
    assert!(!present);
    let q = match qos {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    };
    let mut sub = c4::Subscribe::new("#", q);
    sub.pkid = 1;
    s.write_all(&encode4(c4::Packet::Subscribe(sub))).unwrap();
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, qos]);
    s
}

/// A rumqttc publisher sending `n` QoS 1 messages `<id>-<i>` of about 500 bytes to
/// `load/<id>`, one every `pause`, then waiting for every PUBACK; returns how many came.
async fn paced_publisher(addr: SocketAddr, id: String, n: usize, pause: Duration) -> usize {
    let mut o = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = AsyncClient::new(o, 64);
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let body = format!("{id}-{i} {}", crate::support::noise(i as u64, 500));
            c.publish(format!("load/{id}"), QoS::AtLeastOnce, false, body)
                .await
                .unwrap();
            tokio::time::sleep(pause).await;
        }
        c
    });
    let mut acks = 0;
    while acks < n {
        match tokio::time::timeout(Duration::from_secs(20), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let _ = sender.await;
    acks
}

#[test]
fn a_stuck_subscriber_slows_no_publisher_and_no_other_subscriber() {
    let f = Ferry::start("[mqtt]\nsubscriber_queue_messages = 1000\nwrite_timeout_ms = 120000\n");
    let addr = f.addr("mqtt");
    // Two subscribers to everything that never read: one at QoS 0 (no window: it fills its
    // socket, then its queue), one at QoS 1 (its 64 unacknowledged messages close its window).
    let _stuck0 = stuck_subscriber(addr, "stuck0", 0);
    let _stuck1 = stuck_subscriber(addr, "stuck1", 1);
    rt().block_on(async {
        let (_h, mut healthy) = subscribe(addr, "healthy", &[("load/#", QoS::AtLeastOnce)]).await;
        // 50 publishers, 300 messages each, about 5,000 per second together for 3 s: 7.5 MB,
        // more than the stuck subscribers' sockets and queues hold.
        let (per, pubs) = (300, 50);
        let tasks: Vec<_> = (0..pubs)
            .map(|i| {
                tokio::spawn(paced_publisher(
                    addr,
                    format!("p{i}"),
                    per,
                    Duration::from_millis(10),
                ))
            })
            .collect();
        let reader = tokio::spawn(async move {
            let mut got: BTreeMap<String, usize> = BTreeMap::new();
            loop {
                let batch = gather(&mut healthy, 1000, Duration::from_secs(3)).await;
                if batch.is_empty() {
                    // The connection stays up for the status check below.
                    return (got, healthy);
                }
                for (_, payload, _) in batch {
                    let key = payload.split(' ').next().unwrap().to_owned();
                    *got.entry(key).or_default() += 1;
                }
            }
        });
        let mut acked = 0;
        for t in tasks {
            acked += t.await.unwrap();
        }
        // Every publish was acknowledged: the stuck subscribers held no publisher back.
        assert_eq!(acked, per * pubs);
        let (got, _healthy) = reader.await.unwrap();
        // The healthy subscriber got every one, once.
        assert_eq!(got.len(), per * pubs, "healthy subscriber");
        assert!(got.values().all(|n| *n == 1));

        let s = status(&f.http_url()).await;
        let subs = s["mqtt"]["subscribers"].as_array().unwrap();
        let by: BTreeMap<&str, &serde_json::Value> = subs
            .iter()
            .map(|x| (x["client"].as_str().unwrap(), x))
            .collect();
        assert_eq!(by["healthy"]["dropped"], 0, "{s}");
        for stuck in ["stuck0", "stuck1"] {
            // Bounded, and the excess dropped and counted.
            assert!(by[stuck]["queued"].as_u64().unwrap() <= 1000, "{s}");
            assert!(by[stuck]["dropped"].as_u64().unwrap() > 0, "{s}");
        }
        let drops = &s["mqtt"]["subscriber_drops"];
        assert!(drops["qos0_queue_full"].as_u64().unwrap_or(0) > 0, "{s}");
        assert!(drops["queue_full"].as_u64().unwrap_or(0) > 0, "{s}");
    });
}

/// A raw 3.1.1 CONNECT as `id` (clean session `clean`); returns the socket and CONNACK's
/// session present flag.
fn raw_connect(addr: SocketAddr, id: &str, clean: bool) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = c4::Connect::new(id);
    c.clean_session = clean;
    s.write_all(&encode4(c4::Packet::Connect(c))).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(
        (connack[0], connack[1], connack[3]),
        (0x20, 2, 0),
        "{connack:?}"
    );
    (s, connack[2] == 1)
}

/// Sends a QoS 2 PUBLISH (DUP if `dup`) and returns the 4 bytes that answer it.
fn raw_publish_qos2(
    s: &mut TcpStream,
    pkid: u16,
    topic: &str,
    payload: &str,
    dup: bool,
) -> [u8; 4] {
    let mut p = c4::Publish::new(topic, QoS::ExactlyOnce, payload.as_bytes().to_vec());
    p.pkid = pkid;
    p.dup = dup;
    s.write_all(&encode4(c4::Packet::Publish(p))).unwrap();
    let mut r = [0u8; 4];
    s.read_exact(&mut r).unwrap();
    r
}

#[test]
fn an_incoming_qos2_publish_is_stored_once_across_a_sigkill() {
    let mut f = Ferry::start("");
    let (mut s, present) = raw_connect(f.addr("mqtt"), "q2-device", false);
    assert!(!present);
    assert_eq!(
        raw_publish_qos2(&mut s, 7, "q2/t", "once", false),
        [0x50, 2, 0, 7]
    );
    // PUBREC came, so the reading and the packet id are on disk. ferry dies before PUBREL.
    f.kill();
    drop(s);
    f.restart();
    let (mut s, present) = raw_connect(f.addr("mqtt"), "q2-device", false);
    assert!(present, "the session survived the SIGKILL");
    // The device sends it again with DUP: PUBREC again, not a second reading.
    assert_eq!(
        raw_publish_qos2(&mut s, 7, "q2/t", "once", true),
        [0x50, 2, 0, 7]
    );
    s.write_all(&[0x62, 2, 0, 7]).unwrap();
    let mut comp = [0u8; 4];
    s.read_exact(&mut comp).unwrap();
    assert_eq!(comp, [0x70, 2, 0, 7]);
    // The packet id is free again: a new publish with it is a new reading.
    assert_eq!(
        raw_publish_qos2(&mut s, 7, "q2/t", "again", false),
        [0x50, 2, 0, 7]
    );
    s.write_all(&[0x62, 2, 0, 7]).unwrap();
    s.read_exact(&mut comp).unwrap();
    assert_eq!(comp, [0x70, 2, 0, 7]);
    drop(s);
    f.terminate(Duration::from_secs(10)).expect("clean exit");
    let payloads: Vec<String> = buffered_readings(&f.data_dir, "kafka")
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(payloads, ["once", "again"]);
}

#[test]
fn a_persistent_session_keeps_its_subscription_and_queue_across_sigkill() {
    let test = "a_persistent_session_keeps_its_subscription_and_queue_across_sigkill";
    if !require_tool("mosquitto_pub", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    let mut f = Ferry::start("");
    let port = f.addr("mqtt").port();
    // Two persistent subscribers: 3.1.1 clean session 0, and MQTT 5 with an hour's session
    // expiry. Each subscribes and leaves at once (-E).
    let v311 = [
        "-V",
        "mqttv311",
        "-c",
        "-i",
        "keeper-311",
        "-q",
        "1",
        "-t",
        "cmd/#",
    ];
    let v5 = [
        "-V", "mqttv5", "-c", "-x", "3600", "-i", "keeper-5", "-q", "2", "-t", "cmd/#",
    ];
    for args in [&v311[..], &v5[..]] {
        let mut a = args.to_vec();
        a.push("-E");
        mosquitto("mosquitto_sub", port, &a);
    }
    for i in 0..3 {
        mosquitto(
            "mosquitto_pub",
            port,
            &["-q", "1", "-t", &format!("cmd/{i}"), "-m", &format!("c{i}")],
        );
    }
    let s = rt().block_on(status(&f.http_url()));
    assert_eq!(s["mqtt"]["sessions"], 2, "{s}");
    let offline: Vec<u64> = s["mqtt"]["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["online"] == false)
        .map(|x| x["queued"].as_u64().unwrap())
        .collect();
    assert_eq!(offline, [3, 3], "{s}");

    f.kill();
    f.restart();
    let port = f.addr("mqtt").port();
    for args in [&v311[..], &v5[..]] {
        let mut a = args.to_vec();
        a.extend(["-C", "3", "-W", "10", "-F", "%t %p"]);
        let out = mosquitto("mosquitto_sub", port, &a);
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(lines, ["cmd/0 c0", "cmd/1 c1", "cmd/2 c2"], "{args:?}");
    }
    // Acknowledged: gone from the file too, so a later SIGKILL does not bring them back.
    std::thread::sleep(Duration::from_millis(500));
    f.kill();
    f.restart();
    let port = f.addr("mqtt").port();
    for args in [&v311[..], &v5[..]] {
        let mut a = args.to_vec();
        a.extend(["-C", "1", "-W", "2", "-F", "%t %p"]);
        let out = mosquitto("mosquitto_sub", port, &a);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{args:?}");
    }
    // A clean connect ends the 3.1.1 session.
    mosquitto(
        "mosquitto_sub",
        port,
        &["-V", "mqttv311", "-i", "keeper-311", "-t", "x", "-E"],
    );
    let s = rt().block_on(status(&f.http_url()));
    assert_eq!(s["mqtt"]["sessions"], 1, "{s}");
}

#[test]
fn acl_rules_refuse_what_they_do_not_allow_and_count_it() {
    let test = "acl_rules_refuse_what_they_do_not_allow_and_count_it";
    if !require_tool("mosquitto_pub", test) || !require_tool("mosquitto_sub", test) {
        return;
    }
    let mut f = Ferry::start(
        r#"
[[mqtt.users]]
username = "dash"
password = "pw"

[[mqtt.acl]]
publish = ["sensors/%c/#"]
subscribe = ["cmd/%c/#"]

[[mqtt.acl]]
user = "dash"
subscribe = ["sensors/#"]
"#,
    );
    let port = f.addr("mqtt").port();
    // A device publishes to its own topics; another device's are refused: MQTT 5 with 0x87,
    // 3.1.1 acknowledged and dropped.
    for (v, t, m) in [
        ("mqttv5", "sensors/d1/t", "mine-5"),
        ("mqttv5", "sensors/d2/t", "theirs-5"),
        ("mqttv311", "sensors/d1/t", "mine-311"),
        ("mqttv311", "sensors/d2/t", "theirs-311"),
    ] {
        let out = mosquitto(
            "mosquitto_pub",
            port,
            &["-V", v, "-q", "1", "-i", "d1", "-t", t, "-m", m],
        );
        let refused = String::from_utf8_lossy(&out.stderr).contains("Not authorized");
        assert_eq!(
            refused,
            m == "theirs-5",
            "{v} {t}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Subscriptions: within an allowed filter or refused (0x87 MQTT 5, 0x80 3.1.1).
    let suback = |args: &[&str]| -> String {
        let mut a = vec!["-d", "-E"];
        a.extend_from_slice(args);
        let out = mosquitto("mosquitto_sub", port, &a);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("Subscribed"))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        suback(&[
            "-V",
            "mqttv5",
            "-u",
            "dash",
            "-P",
            "pw",
            "-t",
            "#",
            "-t",
            "sensors/+/t"
        ]),
        "Subscribed (mid: 1): 135, 0"
    );
    assert_eq!(
        suback(&[
            "-V", "mqttv311", "-i", "d1", "-t", "cmd/d1/#", "-t", "cmd/d2/#"
        ]),
        "Subscribed (mid: 1): 0, 128"
    );
    let s = rt().block_on(status(&f.http_url()));
    assert_eq!(s["losses"]["rejected"]["mqtt.acl_publish"], 2, "{s}");
    assert_eq!(s["losses"]["rejected"]["mqtt.acl_subscribe"], 2, "{s}");
    f.terminate(Duration::from_secs(10)).expect("clean exit");
    let mut stored: Vec<String> = buffered_readings(&f.data_dir, "kafka")
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    stored.sort();
    assert_eq!(stored, ["mine-311", "mine-5"]);
}

#[test]
fn persistent_sessions_beyond_max_sessions_are_refused() {
    let test = "persistent_sessions_beyond_max_sessions_are_refused";
    if !require_tool("mosquitto_sub", test) {
        return;
    }
    let f = Ferry::start("[mqtt]\nmax_sessions = 1\n");
    let port = f.addr("mqtt").port().to_string();
    let sub = |args: &[&str]| {
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-t", "x", "-E"])
            .args(args)
            .output()
            .unwrap()
    };
    assert!(sub(&["-c", "-i", "first"]).status.success());
    // A second persistent session is refused (0x03 for 3.1.1); a clean one is not.
    let refused = sub(&["-c", "-i", "second"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("unavailable"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(sub(&["-i", "third"]).status.success());
    // Resuming the first is not a new session.
    assert!(sub(&["-c", "-i", "first"]).status.success());
    let s = rt().block_on(status(&f.http_url()));
    assert_eq!(s["losses"]["rejected"]["mqtt.max_sessions"], 1, "{s}");
}

/// Reads one packet from a raw socket with rumqttc's 3.1.1 codec.
fn read_packet(s: &mut TcpStream) -> c4::Packet {
    let mut buf = bytes::BytesMut::new();
    loop {
        match c4::Packet::read(&mut buf, 1 << 20) {
            Ok(p) => return p,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                let mut chunk = [0u8; 1];
                s.read_exact(&mut chunk).expect("a packet from ferry");
                buf.extend_from_slice(&chunk);
            }
            Err(e) => panic!("bad packet from ferry: {e:?}"),
        }
    }
}

#[test]
fn an_outgoing_qos2_exchange_resumes_with_pubrel_after_a_sigkill() {
    let mut f = Ferry::start("");
    let addr = f.addr("mqtt");
    let (mut sub, _) = raw_connect(addr, "q2-sub", false);
    let mut s = c4::Subscribe::new("out/#", QoS::ExactlyOnce);
    s.pkid = 1;
    sub.write_all(&encode4(c4::Packet::Subscribe(s))).unwrap();
    assert!(matches!(read_packet(&mut sub), c4::Packet::SubAck(_)));
    let (mut publ, _) = raw_connect(addr, "q2-pub", true);
    assert_eq!(
        raw_publish_qos2(&mut publ, 9, "out/x", "exactly-once", false),
        [0x50, 2, 0, 9]
    );
    // The subscriber gets it at QoS 2, PUBRECs it and gets PUBREL, but never PUBCOMPs.
    let pkid = match read_packet(&mut sub) {
        c4::Packet::Publish(p) => {
            assert_eq!(
                (p.qos, &p.payload[..]),
                (QoS::ExactlyOnce, &b"exactly-once"[..])
            );
            p.pkid
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    let [hi, lo] = pkid.to_be_bytes();
    sub.write_all(&[0x50, 2, hi, lo]).unwrap();
    assert!(matches!(read_packet(&mut sub), c4::Packet::PubRel(r) if r.pkid == pkid));
    std::thread::sleep(Duration::from_millis(500));
    f.kill();
    drop((sub, publ));
    f.restart();
    // Back: the PUBREL again, with its packet id, and not the PUBLISH.
    let (mut sub, present) = raw_connect(f.addr("mqtt"), "q2-sub", false);
    assert!(present);
    assert!(matches!(read_packet(&mut sub), c4::Packet::PubRel(r) if r.pkid == pkid));
    sub.write_all(&[0x70, 2, hi, lo]).unwrap();
    sub.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut more = [0u8; 1];
    assert!(
        sub.read(&mut more).is_err(),
        "something came after the PUBCOMP"
    );
}
