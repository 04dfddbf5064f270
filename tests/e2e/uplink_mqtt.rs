//! MQTT uplinks end to end, against the real binary and Debian's mosquitto:
//! - devices publish to ferry's MQTT listener, ferry forwards to mosquitto, while a Kafka
//!   uplink is enabled and pointed at a port where nothing listens: MQTT keeps flowing and the
//!   buffer keeps everything Kafka still needs;
//! - two MQTT uplinks to two brokers, one taking only `alarms/#`: each broker gets what its
//!   uplink's topics take, and a broker that goes away holds back only its own cursor.

use crate::support;

use ferry_tests::{Ferry, buffered_readings, mosquitto, mosquitto_on, require_tool};
use rumqttc::v5::mqttbytes::v5::Packet;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// (topic, payload, v5 user properties) of a message the upstream subscriber got.
type Received = (String, Vec<u8>, Vec<(String, String)>);

#[test]
fn kafka_down_mqtt_uplink_keeps_flowing() {
    if !require_tool("mosquitto", "kafka_down_mqtt_uplink_keeps_flowing") {
        return;
    }
    let broker = mosquitto();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Upstream subscriber first, so nothing is missed.
    let got = subscribe(&rt, broker.port, "e2e-sub");

    let mut ferry = Ferry::start(&format!(
        r#"
[uplinks.kafka]
type = "kafka"
brokers = "127.0.0.1:1"
message_timeout_ms = 500
initial_backoff_ms = 50
max_backoff_ms = 200

[uplinks.mqtt]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
protocol = "v5"
topic_prefix = "up/"
initial_backoff_ms = 50
max_backoff_ms = 400
"#,
        broker.port
    ));
    let addr = ferry.addr("mqtt");

    // A device publishes 20 readings at QoS 1 to ferry's MQTT listener.
    let payloads: Vec<(String, String)> = (0..20)
        .map(|i| ("sensors/dev-1/temp".to_string(), i.to_string()))
        .collect();
    publish(&rt, addr, "dev-1", &payloads);

    // Everything arrives upstream, with ferry's metadata.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = got.lock().unwrap().len();
        if n >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of 20 arrived upstream; ferry log:\n{}",
            ferry.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = got.lock().unwrap().clone();
    drop(rt);
    let mut ids = HashSet::new();
    let mut payloads = HashSet::new();
    for (topic, payload, props) in &got {
        assert_eq!(topic, "up/sensors/dev-1/temp");
        let prop = |k: &str| props.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        assert_eq!(prop("ferry-device").as_deref(), Some("dev-1"));
        let id = prop("ferry-id").unwrap();
        assert!(id.starts_with("test-gw-"), "{id}");
        ids.insert(id);
        payloads.insert(String::from_utf8(payload.clone()).unwrap());
    }
    assert_eq!(ids.len(), 20);
    assert_eq!(payloads, (0..20).map(|i| i.to_string()).collect());

    // Give the MQTT uplink a moment to record its acks, then stop ferry cleanly.
    std::thread::sleep(Duration::from_millis(300));
    ferry
        .terminate(Duration::from_secs(15))
        .expect("ferry exits after SIGTERM");
    let log = ferry.log();
    assert!(log.contains("The MQTT uplink is connected"), "{log}");
    // MQTT's cursor is past everything; Kafka's is not: every reading is still buffered.
    let inspector = ferry_buffer::Inspector::open(&ferry.data_dir).unwrap();
    assert_eq!(inspector.lag("mqtt").unwrap().readings, 0);
    assert_eq!(inspector.lag("kafka").unwrap().readings, 20);
    drop(inspector);
    let kept = buffered_readings(&ferry.data_dir, "kafka");
    assert_eq!(kept.len(), 20, "the buffer keeps what Kafka still needs");
}

/// Subscribes to `#` on the broker at `port` (waiting for the SUBACK) and collects what
/// arrives.
fn subscribe(rt: &tokio::runtime::Runtime, port: u16, id: &str) -> Arc<Mutex<Vec<Received>>> {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let (sub_client, mut sub_el) =
        rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port), 100);
    rt.block_on(async {
        sub_client
            .subscribe("#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let Packet::SubAck(_) = match sub_el.poll().await.unwrap() {
                rumqttc::v5::Event::Incoming(p) => p,
                _ => continue,
            } {
                break;
            }
        }
    });
    let g = got.clone();
    rt.spawn(async move {
        let _c = sub_client;
        while let Ok(ev) = sub_el.poll().await {
            if let rumqttc::v5::Event::Incoming(Packet::Publish(p)) = ev {
                g.lock().unwrap().push((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                    p.properties.map(|p| p.user_properties).unwrap_or_default(),
                ));
            }
        }
    });
    got
}

/// Publishes `(topic, payload)` pairs at QoS 1 to ferry's MQTT listener as `device` and waits
/// for every PUBACK: from then on, ferry owes each of them to every uplink that takes it.
fn publish(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    device: &str,
    readings: &[(String, String)],
) {
    rt.block_on(async {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let (client, mut el) = AsyncClient::new(
            MqttOptions::new(device, addr.ip().to_string(), addr.port()),
            readings.len().max(1),
        );
        for (topic, payload) in readings {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
        }
        let mut acks = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while acks < readings.len() {
            assert!(Instant::now() < deadline, "ferry acked only {acks}");
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                acks += 1;
            }
        }
        let _ = client.disconnect().await;
    });
}

/// Waits until `f` holds for the status report, or fails with the report and the log.
fn wait_status(
    rt: &tokio::runtime::Runtime,
    ferry: &Ferry,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = rt.block_on(support::status(&ferry.http_url()));
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; status: {v:#}\nferry log:\n{}",
            ferry.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status report's entry for the uplink `name`.
fn uplink<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["uplinks"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == name))
        .unwrap_or_else(|| panic!("no uplink {name} in {v:#}"))
}

/// The distinct payloads received with a topic starting with `prefix`.
fn payloads(got: &Mutex<Vec<Received>>, prefix: &str) -> HashSet<String> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(t, _, _)| t.starts_with(prefix))
        .map(|(_, p, _)| String::from_utf8_lossy(p).into_owned())
        .collect()
}

#[test]
fn two_mqtt_uplinks_take_their_topics_and_hold_back_only_their_own_cursor() {
    let test = "two_mqtt_uplinks_take_their_topics_and_hold_back_only_their_own_cursor";
    if !require_tool("mosquitto", test) {
        return;
    }
    let all = mosquitto();
    let alarms = mosquitto();
    let alarms_port = alarms.port;
    let rt = support::rt();
    let got_all = subscribe(&rt, all.port, "sub-all");
    let got_alarms = subscribe(&rt, alarms_port, "sub-alarms");
    let ferry = Ferry::start(&format!(
        r#"
[uplinks.everything]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
protocol = "v5"
initial_backoff_ms = 50
max_backoff_ms = 300

[uplinks.alarms]
type = "mqtt"
topics = ["alarms/#"]
url = "mqtt://127.0.0.1:{alarms_port}"
protocol = "v5"
initial_backoff_ms = 50
max_backoff_ms = 300
"#,
        all.port
    ));
    let addr = ferry.addr("mqtt");
    let batch = |round: u32| -> Vec<(String, String)> {
        (0..15)
            .map(|i| {
                let topic = if i % 3 == 0 {
                    "alarms/fire"
                } else {
                    "tele/temp"
                };
                (topic.to_string(), format!("r{round}-{i}"))
            })
            .collect()
    };
    let expect = |round: u32, prefix: &str| -> HashSet<String> {
        batch(round)
            .into_iter()
            .filter(|(t, _)| t.starts_with(prefix))
            .map(|(_, p)| p)
            .collect()
    };

    // Round 1, both brokers up: every reading reaches the catch-all broker, only the alarms
    // reach the other one, and the buffer empties.
    publish(&rt, addr, "dev-1", &batch(1));
    let v = wait_status(&rt, &ferry, "both uplinks delivered round 1", |v| {
        v["buffer"]["readings"] == 0
            && uplink(v, "everything")["acked_total"] == 15
            && uplink(v, "alarms")["acked_total"] == 5
    });
    assert_eq!(uplink(&v, "alarms")["skipped_total"], 10);
    assert_eq!(uplink(&v, "alarms")["type"], "mqtt");
    assert_eq!(uplink(&v, "everything")["skipped_total"], 0);
    let wait_for = |got: &Mutex<Vec<Received>>, want: HashSet<String>, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let have = payloads(got, "");
            if want.is_subset(&have) {
                return have;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: have {have:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut want_all = expect(1, "");
    let have = wait_for(&got_all, want_all.clone(), "the catch-all broker");
    assert_eq!(have, want_all);
    let have = wait_for(&got_alarms, expect(1, "alarms/"), "the alarms broker");
    assert_eq!(
        have,
        expect(1, "alarms/"),
        "only alarms reach the alarms broker"
    );
    assert_eq!(payloads(&got_alarms, "tele/"), HashSet::new());

    // Round 2, the alarms broker gone: the catch-all uplink keeps delivering, the alarms
    // uplink holds back its own cursor, and the buffer keeps what it still owes.
    drop(alarms);
    publish(&rt, addr, "dev-1", &batch(2));
    want_all.extend(expect(2, ""));
    let have = wait_for(
        &got_all,
        want_all.clone(),
        "the catch-all broker, alarms down",
    );
    assert_eq!(have, want_all);
    let v = wait_status(&rt, &ferry, "the alarms uplink is held back", |v| {
        let a = uplink(v, "alarms");
        uplink(v, "everything")["acked_total"] == 30
            && uplink(v, "everything")["lag_readings"] == 0
            && a["lag_readings"].as_u64() >= Some(5)
            && (a["state"] == "backing_off" || a["state"] == "offline")
    });
    // Every round-2 alarm (and whatever telemetry shares their segments) waits for the alarms
    // uplink alone.
    assert_eq!(
        v["buffer"]["readings"],
        uplink(&v, "alarms")["lag_readings"],
        "{v:#}"
    );
    assert_eq!(uplink(&v, "everything")["state"], "connected");
    assert_eq!(uplink(&v, "alarms")["acked_total"], 5);

    // The alarms broker is back: its uplink catches up from its own cursor and the buffer
    // empties.
    let alarms = mosquitto_on(alarms_port);
    let got_back = subscribe(&rt, alarms.port, "sub-alarms-2");
    let v = wait_status(&rt, &ferry, "the alarms uplink caught up", |v| {
        v["buffer"]["readings"] == 0 && uplink(v, "alarms")["acked_total"].as_u64() >= Some(10)
    });
    assert_eq!(uplink(&v, "alarms")["lag_readings"], 0);
    // The subscriber may have joined after some re-sends: whatever it got are round-2 alarms.
    let back = payloads(&got_back, "");
    assert!(back.is_subset(&expect(2, "alarms/")), "{back:?}");
    drop(ferry);
    drop(rt);
}
