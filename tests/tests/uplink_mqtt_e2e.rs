//! The MQTT uplink end to end, against the real binary and Debian's mosquitto: devices publish
//! to ferry's MQTT listener, ferry forwards to mosquitto, while the Kafka uplink is enabled and
//! pointed at a port where nothing listens. MQTT keeps flowing; the buffer keeps everything
//! Kafka still needs.

use ferry_tests::{Ferry, buffered_readings, require_tool};
use rumqttc::v5::mqttbytes::v5::Packet;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// (topic, payload, v5 user properties) of a message the upstream subscriber got.
type Received = (String, Vec<u8>, Vec<(String, String)>);

struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto() -> Mosquitto {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n"),
    )
    .unwrap();
    let bin = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "mosquitto did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Mosquitto {
        child,
        port,
        _dir: dir,
    }
}

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
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let (sub_client, mut sub_el) = rumqttc::v5::AsyncClient::new(
        rumqttc::v5::MqttOptions::new("e2e-sub", "127.0.0.1", broker.port),
        100,
    );
    let g = got.clone();
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

    let mut ferry = Ferry::start(&format!(
        r#"
[uplink.kafka]
brokers = "127.0.0.1:1"
message_timeout_ms = 500
initial_backoff_ms = 50
max_backoff_ms = 200

[uplink.mqtt]
enabled = true
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
    rt.block_on(async {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let (client, mut el) = AsyncClient::new(
            MqttOptions::new("dev-1", addr.ip().to_string(), addr.port()),
            32,
        );
        for i in 0..20 {
            client
                .publish(
                    "sensors/dev-1/temp",
                    QoS::AtLeastOnce,
                    false,
                    format!("{i}"),
                )
                .await
                .unwrap();
        }
        let mut acks = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while acks < 20 {
            assert!(Instant::now() < deadline, "ferry acked only {acks}");
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                acks += 1;
            }
        }
    });

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
