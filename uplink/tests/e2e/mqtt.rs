//! End-to-end tests of the MQTT uplink against Debian's `mosquitto` broker, started by each
//! test on a free loopback port, with a rumqttc v5 subscriber checking what arrived.
//!
//! Without mosquitto the tests print a loud SKIPPED line and pass, unless
//! `FERRY_REQUIRE_TOOLS=1` (as in CI), where they fail.

use ferry_buffer::{Buffer, Reading};
use ferry_config::{KafkaUplink, MqttProtocol, MqttUplink, TopicRewrite};
use ferry_tests::uplink::{Running, reading, wait_settled, wait_until};
use ferry_tests::{free_port, require_tool};
use ferry_uplink::Common;
use ferry_uplink::kafka::KafkaSink;
use ferry_uplink::mqtt::*;
use ferry_uplink::status::{LinkState, UplinkStatus};
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A mosquitto child process with a generated config.
struct Broker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    /// `listener` is the config of the main listener (after `listener <port> 127.0.0.1`);
    /// `extra` is appended at the end (more listeners).
    fn start(listener: &str, extra: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Broker {
            port: free_port(),
            dir,
            child: None,
        };
        let conf = format!(
            "user root\nmax_queued_messages 0\npersistence true\npersistence_location {}/\nlog_dest file {}\nlog_type all\n\
             listener {} 127.0.0.1\n{listener}\n{extra}\n",
            b.dir.path().display(),
            b.log_path().display(),
            b.port
        );
        std::fs::write(b.dir.path().join("mosquitto.conf"), conf).unwrap();
        b.spawn();
        b
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let child = Command::new(ferry_tests::find_tool("mosquitto").unwrap())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "mosquitto did not listen on {}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker with SIGTERM (it saves its persistent sessions) and waits for it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY-free: libc is not a dependency here, so use the kill(1) command.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let start = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(5) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One message as the subscriber saw it.
#[derive(Debug, Clone)]
struct Got {
    topic: String,
    payload: Vec<u8>,
    props: BTreeMap<String, String>,
    content_type: Option<String>,
}

impl Got {
    fn p(&self, k: &str) -> &str {
        self.props.get(k).map_or("", |s| s.as_str())
    }
}

/// A v5 subscriber on `#` with a persistent session, so nothing published while it
/// reconnects (after a broker restart) is lost.
struct Sub {
    got: Arc<Mutex<Vec<Got>>>,
    task: JoinHandle<()>,
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sub {
    async fn start(port: u16) -> Sub {
        let mut o = rumqttc::v5::MqttOptions::new("test-sub", "127.0.0.1", port);
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_max_packet_size(Some(1 << 20));
        let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 100);
        client.subscribe("#", V5QoS::AtLeastOnce).await.unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let (ready, ready_rx) = oneshot::channel();
        let g = got.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            let mut ready = Some(ready);
            loop {
                match el.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.clone().unwrap_or_default();
                        g.lock().unwrap().push(Got {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            props: props.user_properties.into_iter().collect(),
                            content_type: props.content_type,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ready_rx)
            .await
            .expect("subscribed")
            .unwrap();
        Sub { got, task }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, n: usize, f: impl Fn(&[Got]) -> usize) -> Vec<Got> {
        let start = Instant::now();
        loop {
            let got = self.got();
            if f(&got) >= n {
                return got;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "timed out waiting for {n} {what}; have {}",
                f(&got)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn open_buffer(dir: &Path, consumers: &[&str]) -> Buffer {
    ferry_tests::uplink::open_buffer(dir, consumers)
}

fn uplink(port: u16, protocol: MqttProtocol) -> MqttUplink {
    MqttUplink {
        url: format!("mqtt://127.0.0.1:{port}"),
        protocol,
        keep_alive_secs: 5,
        max_inflight: 8,
        initial_backoff_ms: 50,
        max_backoff_ms: 400,
        ..MqttUplink::default()
    }
}

fn start(cfg: &MqttUplink, buffer: &Buffer) -> Running {
    let common = Common::new("mqtt", "gw1", buffer.clone()).grace(Duration::from_secs(2));
    Running::start(Box::new(MqttSink::new(cfg, "ferry-gw1", common).unwrap()))
}

async fn append(buffer: &Buffer, rs: Vec<Reading>) {
    buffer.append(rs).await.unwrap();
}

async fn wait_empty(buffer: &Buffer, status: &UplinkStatus) {
    wait_settled(buffer, status, Duration::from_secs(10)).await;
}

fn distinct_ids(got: &[Got]) -> usize {
    got.iter()
        .map(|g| g.p("ferry-id").to_string())
        .filter(|s| !s.is_empty())
        .collect::<HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_forwards_with_rewrites_properties_and_order() {
    if !require_tool(
        "mosquitto",
        "v5_forwards_with_rewrites_properties_and_order",
    ) {
        return;
    }
    let broker = Broker::start("allow_anonymous true", "");
    let sub = Sub::start(broker.port).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["mqtt"]);
    let cfg = MqttUplink {
        topic_prefix: Some("gw/".into()),
        rewrites: vec![
            TopicRewrite {
                filter: "sensors/+/temp".into(),
                template: "site-7/{1}/temperature".into(),
            },
            TopicRewrite {
                filter: "sensors/#".into(),
                template: "never/{#}".into(),
            },
        ],
        ..uplink(broker.port, MqttProtocol::V5)
    };
    let run = start(&cfg, &buffer);
    // 30 readings in several commits (several segments), plus one that only the prefix
    // applies to, and one with a content type and device properties.
    for batch in 0..3 {
        let rs = (0..10)
            .map(|i| {
                let n = batch * 10 + i;
                reading(
                    &format!("dev{n}"),
                    &format!("sensors/dev{n}/temp"),
                    format!("{n}").as_bytes(),
                )
            })
            .collect();
        append(&buffer, rs).await;
    }
    let mut special =
        reading("devx", "other/topic", br#"{"t":1}"#).with_content_type("application/json");
    special.properties = vec![("unit".into(), "C".into())];
    append(&buffer, vec![special]).await;

    let got = sub.wait_for("messages", 31, |g| g.len()).await;
    wait_empty(&buffer, &run.status).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.state, LinkState::Connected);
    assert_eq!(snap.acked_total, 31);
    assert_eq!(snap.in_flight_readings, 0);

    for (n, g) in got[..30].iter().enumerate() {
        assert_eq!(g.topic, format!("gw/site-7/dev{n}/temperature"), "in order");
        assert_eq!(g.payload, n.to_string().as_bytes());
        assert_eq!(g.p("ferry-device"), format!("dev{n}"));
        assert_eq!(g.p("ferry-topic"), format!("sensors/dev{n}/temp"));
        assert_eq!(g.p("ferry-source"), "mqtt");
        assert!(g.p("ferry-received-at").parse::<u64>().unwrap() > 1_600_000_000_000);
        assert_eq!(g.content_type, None);
    }
    let ids: Vec<&str> = got.iter().map(|g| g.p("ferry-id")).collect();
    assert!(ids.iter().all(|i| i.starts_with("gw1-")));
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 31);
    let s = &got[30];
    assert_eq!(s.topic, "gw/other/topic");
    assert_eq!(s.payload, br#"{"t":1}"#);
    assert_eq!(s.content_type.as_deref(), Some("application/json"));
    assert_eq!(s.p("unit"), "C");
    run.stop().await;
    // The broker saw ferry's persistent session and client id.
    let log = broker.log();
    // "(p5, c0, k5)": protocol v5, clean start off (persistent session), keep-alive 5 s.
    assert!(log.contains("as ferry-gw1 (p5, c0, k5"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_envelope_and_qos0() {
    if !require_tool("mosquitto", "v311_envelope_and_qos0") {
        return;
    }
    let broker = Broker::start("allow_anonymous true", "");
    let sub = Sub::start(broker.port).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["mqtt"]);
    let cfg = MqttUplink {
        envelope: true,
        ..uplink(broker.port, MqttProtocol::V311)
    };
    let run = start(&cfg, &buffer);
    append(
        &buffer,
        vec![
            reading("d1", "a/json", br#"{"t": 21.50}"#).with_content_type("application/json"),
            reading("d2", "a/text", b"hello"),
            reading("d3", "a/bin", [0xff, 0x00, 0x01]),
        ],
    )
    .await;
    let got = sub.wait_for("messages", 3, |g| g.len()).await;
    wait_empty(&buffer, &run.status).await;
    run.stop().await;
    let env: Vec<serde_json::Value> = got
        .iter()
        .map(|g| serde_json::from_slice(&g.payload).expect("a JSON envelope"))
        .collect();
    assert_eq!(got[0].topic, "a/json");
    assert!(got[0].props.is_empty(), "v3.1.1 carries no properties");
    assert!(String::from_utf8_lossy(&got[0].payload).contains(r#""payload":{"t": 21.50}"#));
    assert_eq!(env[0]["device"], "d1");
    assert_eq!(env[0]["topic"], "a/json");
    assert_eq!(env[0]["gateway"], "gw1");
    assert_eq!(env[0]["content_type"], "application/json");
    assert_eq!(env[0]["payload_encoding"], "json");
    assert_eq!(env[0]["source"], "mqtt");
    assert!(env[0]["ferry_id"].as_str().unwrap().starts_with("gw1-"));
    assert!(env[0]["received_at_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(env[1]["payload"], "hello");
    assert_eq!(env[1]["payload_encoding"], "text");
    assert_eq!(env[2]["payload"], "/wAB");
    assert_eq!(env[2]["payload_encoding"], "base64");

    // QoS 0 without the envelope: the payload only, and the buffer still empties.
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["mqtt"]);
    let cfg = MqttUplink {
        qos: 0,
        ..uplink(broker.port, MqttProtocol::V311)
    };
    let run = start(&cfg, &buffer);
    append(&buffer, vec![reading("d", "q0/x", b"raw")]).await;
    let got = sub.wait_for("messages", 4, |g| g.len()).await;
    wait_empty(&buffer, &run.status).await;
    assert_eq!(got[3].topic, "q0/x");
    assert_eq!(got[3].payload, b"raw");
    assert_eq!(run.status.snapshot().acked_total, 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_everything_arrives_at_least_once() {
    if !require_tool(
        "mosquitto",
        "broker_restart_everything_arrives_at_least_once",
    ) {
        return;
    }
    let mut broker = Broker::start("allow_anonymous true", "");
    let sub = Sub::start(broker.port).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["mqtt"]);
    let cfg = MqttUplink {
        max_inflight: 4,
        ..uplink(broker.port, MqttProtocol::V5)
    };
    let run = start(&cfg, &buffer);
    let batch = |from: usize, n: usize| {
        (from..from + n)
            .map(|i| reading("d", &format!("t/{i}"), i.to_string().as_bytes()))
            .collect::<Vec<_>>()
    };
    // One big segment; the broker goes away while it is being delivered, so the segment is
    // not acked and must be sent again from the buffer.
    append(&buffer, batch(0, 3000)).await;
    sub.wait_for("distinct ferry-ids", 200, distinct_ids).await;
    broker.stop();
    assert_eq!(
        buffer.stats().readings,
        3000,
        "the broker stopped mid-segment: nothing may be acked yet"
    );
    // Appended while the broker is down.
    for k in 0..3 {
        append(&buffer, batch(3000 + k * 50, 50)).await;
    }
    let mut states = Vec::new();
    let down = Instant::now();
    while down.elapsed() < Duration::from_millis(1500) {
        let s = run.status.state();
        if !states.contains(&s) {
            states.push(s);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        states.contains(&LinkState::BackingOff) || states.contains(&LinkState::Offline),
        "{states:?}"
    );
    let snap = run.status.snapshot();
    assert_eq!(
        buffer.stats().readings,
        3150,
        "nothing acked while the broker is down"
    );
    assert!(snap.retried_total >= 1, "{snap:?}");
    let err = snap.last_error.clone().unwrap();
    assert!(err.contains("127.0.0.1"), "{err}");

    broker.spawn();
    let got = sub.wait_for("distinct ferry-ids", 3150, distinct_ids).await;
    wait_empty(&buffer, &run.status).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.state, LinkState::Connected);
    assert_eq!(snap.acked_total, 3150);
    assert!(
        snap.resent_total >= 3000,
        "the interrupted segment was re-sent: {snap:?}"
    );
    eprintln!(
        "restart: {} messages for 3150 readings, resent_total {}, retried_total {}",
        got.len(),
        snap.resent_total,
        snap.retried_total
    );
    // Every payload arrived at least once, each under a single ferry-id.
    let mut by_id: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for g in &got {
        let prev = by_id.insert(g.p("ferry-id").to_string(), g.payload.clone());
        assert!(prev.is_none_or(|p| p == g.payload), "one id, one payload");
    }
    let payloads: HashSet<Vec<u8>> = by_id.values().cloned().collect();
    for i in 0..3150 {
        assert!(
            payloads.contains(i.to_string().as_bytes()),
            "reading {i} missing"
        );
    }
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_clear_error_and_no_tight_loop() {
    if !require_tool(
        "mosquitto",
        "wrong_credentials_clear_error_and_no_tight_loop",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("passwd");
    let ok = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pwfile)
        .args(["ferry", "s3cret-pw"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("FERRY_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("mosquitto_passwd is required (FERRY_REQUIRE_TOOLS=1)");
        }
        eprintln!(
            "\n*** SKIPPED wrong_credentials_clear_error_and_no_tight_loop: no mosquitto_passwd ***\n"
        );
        return;
    }
    let broker = Broker::start(
        &format!("allow_anonymous false\npassword_file {}", pwfile.display()),
        "",
    );
    let buffer = open_buffer(&dir.path().join("buf"), &["mqtt"]);
    append(&buffer, vec![reading("d", "t", b"1")]).await;
    for protocol in [MqttProtocol::V311, MqttProtocol::V5] {
        let before = broker.log().matches("New connection from").count();
        let cfg = MqttUplink {
            username: Some("ferry".into()),
            password: Some("wrong-pw".into()),
            initial_backoff_ms: 100,
            max_backoff_ms: 400,
            ..uplink(broker.port, protocol)
        };
        let run = start(&cfg, &buffer);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let snap = run.status.snapshot();
        let attempts = broker.log().matches("New connection from").count() - before;
        eprintln!(
            "{protocol:?}: {attempts} connection attempts in 2 s, last error {:?}",
            snap.last_error
        );
        run.stop().await;
        assert_ne!(snap.state, LinkState::Connected, "{protocol:?}");
        let err = snap.last_error.unwrap_or_default();
        assert!(
            err == "broker refused the connection: bad user name or password"
                || err.starts_with("broker refused the connection: not authorized"),
            "{protocol:?}: {err}"
        );
        assert!(!err.contains("wrong-pw"));
        // Backoff 100 ms doubling to 400 ms with full jitter: about 8 tries in 2 s. A tight
        // loop would make hundreds.
        assert!(
            (2..=20).contains(&attempts),
            "{protocol:?}: {attempts} attempts in 2 s"
        );
        assert!(snap.retried_total as usize + 1 >= attempts.saturating_sub(1));
        assert_eq!(buffer.stats().readings, 1, "nothing delivered");
    }
    // The right password works (the test above could fail for other reasons otherwise).
    let cfg = MqttUplink {
        username: Some("ferry".into()),
        password: Some("s3cret-pw".into()),
        ..uplink(broker.port, MqttProtocol::V311)
    };
    let run = start(&cfg, &buffer);
    wait_empty(&buffer, &run.status).await;
    run.stop().await;
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files.
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server_key = KeyPair::generate().unwrap();
    let server = sp.signed_by(&server_key, &ca, &ca_key).unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(rcgen::DnType::CommonName, "ferry-gw1");
    let client_key = KeyPair::generate().unwrap();
    let client = cp.signed_by(&client_key, &ca, &ca_key).unwrap();
    let w = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(pem.as_bytes())
            .unwrap();
        p
    };
    (
        w("ca.pem", ca.pem()),
        w("server.pem", server.pem()),
        w("server.key", server_key.serialize_pem()),
        w("client.pem", client.pem()),
        w("client.key", client_key.serialize_pem()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_test_ca() {
    if !require_tool("mosquitto", "mutual_tls_with_a_test_ca") {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key, client_cert, client_key) = make_pki(pki.path());
    // The main listener is plain (for the subscriber); the TLS one requires a client cert.
    let tls_port = free_port();
    let broker = Broker::start(
        "allow_anonymous true",
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            ca.display(),
            cert.display(),
            key.display()
        ),
    );
    let sub = Sub::start(broker.port).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["mqtt"]);
    append(&buffer, vec![reading("d", "tls/a", b"secure")]).await;

    // Without a client certificate the handshake fails, with a clear error and no delivery.
    let no_client = MqttUplink {
        url: format!("mqtts://127.0.0.1:{tls_port}"),
        ca_path: Some(ca.clone()),
        ..uplink(broker.port, MqttProtocol::V5)
    };
    let run = start(&no_client, &buffer);
    wait_until(
        "the TLS failure is reported",
        Duration::from_secs(5),
        || run.status.snapshot().last_error.is_some(),
    )
    .await;
    let snap = run.status.snapshot();
    run.stop().await;
    assert_ne!(snap.state, LinkState::Connected);
    let err = snap.last_error.unwrap();
    assert!(err.contains(&format!("127.0.0.1:{tls_port}")), "{err}");
    assert_eq!(buffer.stats().readings, 1);

    let cfg = MqttUplink {
        client_cert_path: Some(client_cert),
        client_key_path: Some(client_key),
        ..no_client
    };
    let run = start(&cfg, &buffer);
    let got = sub.wait_for("messages", 1, |g| g.len()).await;
    wait_empty(&buffer, &run.status).await;
    run.stop().await;
    assert_eq!(got[0].topic, "tls/a");
    assert_eq!(got[0].payload, b"secure");
    assert!(got[0].p("ferry-id").starts_with("gw1-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_mqtt_keeps_flowing_and_the_buffer_keeps_kafkas_share() {
    if !require_tool(
        "mosquitto",
        "kafka_down_mqtt_keeps_flowing_and_the_buffer_keeps_kafkas_share",
    ) {
        return;
    }
    let broker = Broker::start("allow_anonymous true", "");
    let sub = Sub::start(broker.port).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["kafka", "mqtt"]);
    let mqtt = start(&uplink(broker.port, MqttProtocol::V5), &buffer);
    // A real Kafka uplink pointed at a port where nothing listens.
    let kafka_cfg = KafkaUplink {
        brokers: "127.0.0.1:1".into(),
        message_timeout_ms: 500,
        initial_backoff_ms: 50,
        max_backoff_ms: 200,
        ..KafkaUplink::default()
    };
    let kafka = KafkaSink::new(&kafka_cfg, Common::new("kafka", "gw1", buffer.clone())).unwrap();
    let kafka_status = kafka.status();
    let (kstop, krx) = oneshot::channel::<()>();
    let ktask = tokio::spawn(kafka.run(async move {
        let _ = krx.await;
    }));
    for k in 0..4 {
        let rs = (0..25)
            .map(|i| reading("d", "k/m", format!("{}", k * 25 + i).as_bytes()))
            .collect();
        append(&buffer, rs).await;
    }
    sub.wait_for("distinct ferry-ids", 100, distinct_ids).await;
    wait_until(
        "the MQTT uplink acked everything",
        Duration::from_secs(10),
        || mqtt.status.snapshot().acked_total == 100,
    )
    .await;
    let mqtt_lag = buffer.lag("mqtt").await.unwrap();
    let kafka_lag = buffer.lag("kafka").await.unwrap();
    assert_eq!(mqtt_lag.readings, 0);
    assert_eq!(kafka_lag.readings, 100);
    assert_eq!(
        buffer.stats().readings,
        100,
        "kafka has not acked: nothing deleted"
    );
    wait_until("kafka reports trouble", Duration::from_secs(10), || {
        matches!(
            kafka_status.state(),
            LinkState::BackingOff | LinkState::Offline
        )
    })
    .await;
    assert_eq!(kafka_status.snapshot().acked_total, 0);
    assert_eq!(mqtt.status.state(), LinkState::Connected);
    let _ = kstop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), ktask).await;
    mqtt.stop().await;

    // Once the other consumer acks, the segments go.
    let mut k = buffer.reader("kafka").unwrap();
    let newest = buffer.stats().newest_segment;
    k.ack(newest).await.unwrap();
    assert_eq!(buffer.stats().readings, 0);
}
