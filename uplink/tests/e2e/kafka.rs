//! End-to-end tests of the Kafka uplink against librdkafka's in-process mock cluster, with a
//! real rdkafka consumer (and `kcat`) reading back what arrived.

use ferry_buffer::{Buffer, BufferOptions, Compression, Reading, Source};
use ferry_config::{Delivery, KafkaRoute, KafkaUplink, KeyRule};
use ferry_tests::uplink::{Running, reading, wait_acked, wait_empty, wait_until};
use ferry_uplink::Common;
use ferry_uplink::kafka::*;
use ferry_uplink::status::{LinkState, UplinkSnapshot};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

type Mock = MockCluster<'static, DefaultProducerContext>;

/// One record as a consumer saw it.
#[derive(Debug, Clone)]
struct Rec {
    topic: String,
    partition: i32,
    key: Option<String>,
    value: Vec<u8>,
    headers: HashMap<String, String>,
}

impl Rec {
    fn h(&self, k: &str) -> &str {
        self.headers.get(k).map_or("", |s| s.as_str())
    }
}

fn open_buffer(dir: &std::path::Path, compression: Compression) -> Buffer {
    ferry_tests::uplink::open_buffer_compressed(dir, &["kafka"], compression)
}

fn uplink(bootstrap: &str) -> KafkaUplink {
    KafkaUplink {
        brokers: bootstrap.to_string(),
        topic: "readings".into(),
        message_timeout_ms: 1000,
        initial_backoff_ms: 50,
        max_backoff_ms: 400,
        max_inflight_segments: 4,
        ..KafkaUplink::default()
    }
}

fn start(cfg: &KafkaUplink, buffer: &Buffer, grace: Duration) -> Running {
    let common = Common::new("kafka", "gw1", buffer.clone()).grace(grace);
    Running::start(Box::new(KafkaSink::new(cfg, common).unwrap()))
}

/// Reads every record of `topics` from the beginning until `want` distinct `ferry-id`s (or
/// segment ids) have arrived, or `timeout`.
async fn consume(bootstrap: &str, topics: &[(&str, i32)], want: usize) -> Vec<Rec> {
    let bootstrap = bootstrap.to_string();
    let topics: Vec<(String, i32)> = topics.iter().map(|(t, p)| (t.to_string(), *p)).collect();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "ferry-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for (t, parts) in &topics {
            for p in 0..*parts {
                tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
            }
        }
        c.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let mut ids = HashSet::new();
        let start = Instant::now();
        while ids.len() < want && start.elapsed() < Duration::from_secs(15) {
            let Some(m) = c.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.unwrap();
            let mut headers = HashMap::new();
            if let Some(hs) = m.headers() {
                for h in hs.iter() {
                    headers.insert(
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            let rec = Rec {
                topic: m.topic().to_string(),
                partition: m.partition(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
            };
            let id = rec
                .headers
                .get("ferry-id")
                .or(rec.headers.get("ferry-segment"))
                .cloned()
                .unwrap_or_default();
            ids.insert(id);
            out.push(rec);
        }
        out
    })
    .await
    .unwrap()
}

/// For each key, the reading ids in the order they first arrived (per partition order).
fn first_arrivals_per_key(recs: &[Rec]) -> BTreeMap<(String, i32, String), Vec<u64>> {
    let mut seen = HashSet::new();
    let mut per_key: BTreeMap<(String, i32, String), Vec<u64>> = BTreeMap::new();
    for r in recs {
        let id = r.h("ferry-id").to_string();
        if !seen.insert(id.clone()) {
            continue;
        }
        let n: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
        per_key
            .entry((
                r.topic.clone(),
                r.partition,
                r.key.clone().unwrap_or_default(),
            ))
            .or_default()
            .push(n);
    }
    per_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_flow_headers_keys_routing_and_acks() {
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 2, 1).unwrap();
    mock.create_topic("temps", 3, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::Gzip { level: 3 });
    let mut cfg = uplink(&mock.bootstrap_servers());
    cfg.routes = vec![
        KafkaRoute {
            filter: "sensors/+/temp".into(),
            topic: "temps".into(),
            key: Some(KeyRule::Level(1)),
        },
        KafkaRoute {
            filter: "sensors/#".into(),
            topic: "readings".into(),
            key: Some(KeyRule::Topic),
        },
    ];
    let run = start(&cfg, &buffer, Duration::from_secs(2));

    let mut appended = Vec::new();
    for batch in 0..5 {
        let mut rs = Vec::new();
        for i in 0..4 {
            let dev = format!("dev-{i}");
            rs.push(
                reading(
                    &dev,
                    &format!("sensors/room{i}/temp"),
                    format!("t{batch}-{i}"),
                )
                .with_content_type("text/plain"),
            );
            rs.push(reading(
                &dev,
                &format!("sensors/{dev}/hum"),
                format!("h{batch}-{i}"),
            ));
            rs.push(Reading::new(
                Source::Http,
                &dev,
                "ingest",
                format!("x{batch}-{i}").into_bytes(),
            ));
        }
        // The device's own MQTT v5 user properties travel as headers, as over MQTT.
        rs[0].properties = vec![("unit".into(), "C".into()), ("fw".into(), "1.2".into())];
        let receipt = buffer.append(rs.clone()).await.unwrap();
        for (r, id) in rs.iter_mut().zip(receipt.first_id..) {
            r.id = id;
        }
        appended.extend(rs);
    }
    wait_empty(&buffer, &run.status, Duration::from_secs(10)).await;
    wait_acked(&run.status, 60).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.acked_total, 60);
    assert_eq!(snap.state, LinkState::Connected);
    assert_eq!(snap.in_flight_readings, 0);
    assert_eq!((snap.retried_total, snap.dead_lettered_total), (0, 0));
    assert!(snap.last_ack_ms.is_some());
    run.stop().await;

    let recs = consume(
        &mock.bootstrap_servers(),
        &[("readings", 2), ("temps", 3)],
        60,
    )
    .await;
    assert_eq!(recs.len(), 60, "exactly one record per reading");
    let by_id: HashMap<String, &Rec> = recs
        .iter()
        .map(|r| (r.h("ferry-id").to_string(), r))
        .collect();
    for r in &appended {
        let rec = by_id
            .get(&format!("gw1-{}", r.id))
            .unwrap_or_else(|| panic!("reading {} missing", r.id));
        assert_eq!(rec.value, r.payload.as_ref());
        assert_eq!(rec.h("ferry-topic"), r.topic);
        assert_eq!(rec.h("ferry-device"), r.device);
        assert_eq!(rec.h("ferry-received-at"), r.received_at_ms.to_string());
        assert_eq!(rec.h("ferry-source"), r.source.as_str());
        assert_eq!(rec.headers.get("content-type"), r.content_type.as_ref());
        for (k, v) in &r.properties {
            assert_eq!(rec.h(k), v, "property {k} of {r:?}");
        }
        let (topic, key) = if r.topic.ends_with("/temp") {
            ("temps", r.topic.split('/').nth(1).unwrap().to_string())
        } else if r.topic.starts_with("sensors/") {
            ("readings", r.topic.clone())
        } else {
            ("readings", r.device.clone())
        };
        assert_eq!(rec.topic, topic, "{r:?}");
        assert_eq!(rec.key.as_deref(), Some(key.as_str()), "{r:?}");
    }
    // Order per key: ids grow within each key.
    for (k, ids) in first_arrivals_per_key(&recs) {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{k:?}: {ids:?}");
    }
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_filter_skips_the_rest_without_holding_segments_back() {
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::None);
    let cfg = uplink(&mock.bootstrap_servers());
    let common = Common::new("kafka", "gw1", buffer.clone())
        .topics(ferry_uplink::topics::TopicFilter::new(&["alarms/#".into()]))
        .grace(Duration::from_secs(2));
    let run = Running::start(Box::new(KafkaSink::new(&cfg, common).unwrap()));
    // Segments of telemetry only, of alarms only, and mixed.
    let mut alarms = HashSet::new();
    for batch in 0..6u32 {
        let rs: Vec<Reading> = (0..5u32)
            .map(|i| match (batch % 3, i % 2) {
                (0, _) | (2, 0) => reading("d", "tele/t", format!("t{batch}-{i}")),
                _ => reading("d", "alarms/fire", format!("a{batch}-{i}")),
            })
            .collect();
        let receipt = buffer.append(rs.clone()).await.unwrap();
        for (r, id) in rs.iter().zip(receipt.first_id..) {
            if r.topic.starts_with("alarms/") {
                alarms.insert(format!("gw1-{id}"));
            }
        }
    }
    wait_empty(&buffer, &run.status, Duration::from_secs(10)).await;
    let want = alarms.len() as u64;
    wait_acked(&run.status, want).await;
    let snap = run.status.snapshot();
    assert_eq!((snap.acked_total, snap.skipped_total), (want, 30 - want));
    run.stop().await;
    let recs = consume(&mock.bootstrap_servers(), &[("readings", 1)], alarms.len()).await;
    let got: HashSet<String> = recs.iter().map(|r| r.h("ferry-id").to_string()).collect();
    assert_eq!(got, alarms, "exactly the alarms arrive");
    assert!(recs.iter().all(|r| r.h("ferry-topic") == "alarms/fire"));
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_down_then_up_loses_nothing_and_keeps_key_order() {
    let mock = Mock::new(3).unwrap();
    mock.create_topic("readings", 3, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::Gzip { level: 1 });
    let cfg = uplink(&mock.bootstrap_servers());
    let run = start(&cfg, &buffer, Duration::from_secs(2));

    // Record every state the uplink goes through.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let states = {
        let status = run.status.clone();
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut seen = vec![status.state()];
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                let s = status.state();
                if *seen.last().unwrap() != s {
                    seen.push(s);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    };

    let mut total = 0usize;
    let mut append = async |round: usize| {
        let rs: Vec<Reading> = (0..10)
            .map(|i| reading(&format!("dev-{}", i % 5), "t", format!("{round}-{i}")))
            .collect();
        total += rs.len();
        buffer.append(rs).await.unwrap();
    };
    for round in 0..5 {
        append(round).await;
    }
    wait_until(
        "the first batches are acked",
        Duration::from_secs(10),
        || run.status.snapshot().acked_total == 50,
    )
    .await;

    for b in 1..=3 {
        mock.broker_down(b).unwrap();
    }
    // Ingest continues while Kafka is unreachable.
    for round in 5..25 {
        append(round).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // librdkafka may report "all brokers down" (state offline) before the first delivery
    // times out; wait for the uplink's own retry.
    wait_until("the uplink backs off", Duration::from_secs(10), || {
        let s = run.status.snapshot();
        s.retried_total >= 1 && matches!(s.state, LinkState::BackingOff | LinkState::Offline)
    })
    .await;
    let down: UplinkSnapshot = run.status.snapshot();
    assert!(down.retried_total >= 1, "{down:?}");
    assert!(down.last_error.is_some(), "{down:?}");
    assert!(buffer.stats().readings > 0);

    for b in 1..=3 {
        mock.broker_up(b).unwrap();
    }
    for round in 25..30 {
        append(round).await;
    }
    wait_empty(&buffer, &run.status, Duration::from_secs(15)).await;
    wait_acked(&run.status, total as u64).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.state, LinkState::Connected);
    assert_eq!(snap.acked_total, total as u64);
    assert!(snap.resent_total > 0, "{snap:?}");
    // The watcher samples every 5 ms: give it time to see the state asserted above.
    tokio::time::sleep(Duration::from_millis(50)).await;
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let states = states.await.unwrap();
    run.stop().await;
    assert!(
        states
            .iter()
            .any(|s| matches!(s, LinkState::BackingOff | LinkState::Offline)),
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&LinkState::Connected), "{states:?}");

    let recs = consume(&mock.bootstrap_servers(), &[("readings", 3)], total).await;
    let ids: HashSet<&str> = recs.iter().map(|r| r.h("ferry-id")).collect();
    assert_eq!(ids.len(), total, "every reading arrives at least once");
    eprintln!(
        "brokers-down test: {} records for {} readings, resent_total {}, retried_total {}",
        recs.len(),
        total,
        snap.resent_total,
        snap.retried_total
    );
    for (k, ids) in first_arrivals_per_key(&recs) {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "order broken for {k:?}: {ids:?}"
        );
    }
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_produce_errors_are_retried_from_the_buffer() {
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    // More NOT_ENOUGH_REPLICAS answers than librdkafka's own retries get through within
    // message.timeout.ms, so deliveries time out and the uplink must retry from the buffer.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 12],
    );
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::Gzip { level: 1 });
    let mut cfg = uplink(&mock.bootstrap_servers());
    cfg.message_timeout_ms = 500;
    let run = start(&cfg, &buffer, Duration::from_secs(2));
    for round in 0..3 {
        let rs: Vec<Reading> = (0..10)
            .map(|i| reading("dev-1", "t", format!("{round}-{i}")))
            .collect();
        buffer.append(rs).await.unwrap();
    }
    wait_empty(&buffer, &run.status, Duration::from_secs(15)).await;
    wait_acked(&run.status, 30).await;
    let snap = run.status.snapshot();
    assert!(snap.retried_total >= 1, "{snap:?}");
    assert!(snap.resent_total >= 1, "{snap:?}");
    assert_eq!(snap.acked_total, 30);
    assert_eq!(snap.state, LinkState::Connected);
    run.stop().await;
    let recs = consume(&mock.bootstrap_servers(), &[("readings", 1)], 30).await;
    let ids: HashSet<&str> = recs.iter().map(|r| r.h("ferry-id")).collect();
    assert_eq!(ids.len(), 30);
    for (k, ids) in first_arrivals_per_key(&recs) {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{k:?}: {ids:?}");
    }
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_authorization_waits_in_the_buffer_with_a_readable_line() {
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    // The broker refuses the topic for a while (an ACL or IAM policy fixed later).
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 4],
    );
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::Gzip { level: 1 });
    let cfg = uplink(&mock.bootstrap_servers());
    let run = start(&cfg, &buffer, Duration::from_secs(2));
    let rs: Vec<Reading> = (0..10)
        .map(|i| reading("dev-1", "t", format!("a-{i}")))
        .collect();
    buffer.append(rs).await.unwrap();
    let mut lines = Vec::new();
    wait_until("the refusal on the status", Duration::from_secs(10), || {
        lines.extend(run.status.snapshot().last_error);
        lines
            .iter()
            .any(|l| l.contains("do not let ferry write to the topic"))
    })
    .await;
    wait_empty(&buffer, &run.status, Duration::from_secs(15)).await;
    wait_acked(&run.status, 10).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.dead_lettered_total, 0, "{snap:?}");
    assert!(snap.retried_total >= 1, "{snap:?}");
    run.stop().await;
    let recs = consume(&mock.bootstrap_servers(), &[("readings", 1)], 10).await;
    let ids: HashSet<&str> = recs.iter().map(|r| r.h("ferry-id")).collect();
    assert_eq!(ids.len(), 10);
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanently_refused_reading_is_dead_lettered_and_the_rest_flows() {
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::Gzip { level: 1 });
    let mut cfg = uplink(&mock.bootstrap_servers());
    cfg.librdkafka
        .insert("message.max.bytes".into(), "2000".into());
    let run = start(&cfg, &buffer, Duration::from_secs(2));
    let rs = vec![
        reading("dev-1", "t", "small-0"),
        reading("dev-1", "t", vec![b'x'; 10_000]),
        reading("dev-1", "t", "small-2"),
    ];
    let receipt = buffer.append(rs).await.unwrap();
    buffer
        .append(vec![reading("dev-2", "t", "small-3")])
        .await
        .unwrap();
    wait_empty(&buffer, &run.status, Duration::from_secs(10)).await;
    wait_acked(&run.status, 3).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.dead_lettered_total, 1, "{snap:?}");
    assert_eq!(snap.acked_total, 3);
    assert_eq!(snap.retried_total, 0, "a permanent error is not retried");
    run.stop().await;

    let dead = buffer.dead_letters(0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reading.id, receipt.first_id + 1);
    assert_eq!(dead[0].consumer, "kafka");
    assert!(
        dead[0].reason.to_lowercase().contains("too large"),
        "{}",
        dead[0].reason
    );
    let recs = consume(&mock.bootstrap_servers(), &[("readings", 1)], 3).await;
    let mut values: Vec<String> = recs
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    values.sort();
    assert_eq!(values, ["small-0", "small-2", "small-3"]);
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_delivery_end_to_end() {
    for (compression, encoding) in [
        (Compression::Gzip { level: 6 }, "gzip"),
        (Compression::None, "identity"),
    ] {
        let mock = Mock::new(1).unwrap();
        mock.create_topic("readings", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let buffer = open_buffer(dir.path(), compression);
        let mut cfg = uplink(&mock.bootstrap_servers());
        cfg.delivery = Delivery::Segment;
        let run = start(&cfg, &buffer, Duration::from_secs(2));
        let mut sent = Vec::new();
        for seg in 0..3 {
            let mut rs: Vec<Reading> = (0..20)
                .map(|i| {
                    reading(&format!("dev-{i}"), "sensors/a/temp", format!("{seg}:{i}"))
                        .with_content_type("text/plain")
                })
                .collect();
            let receipt = buffer.append(rs.clone()).await.unwrap();
            for (r, id) in rs.iter_mut().zip(receipt.first_id..) {
                r.id = id;
            }
            sent.push((receipt, rs));
        }
        wait_empty(&buffer, &run.status, Duration::from_secs(10)).await;
        wait_acked(&run.status, 60).await;
        assert_eq!(run.status.snapshot().acked_total, 60);
        run.stop().await;

        let recs = consume(&mock.bootstrap_servers(), &[("readings", 1)], 3).await;
        assert_eq!(recs.len(), 3, "one record per segment");
        for (rec, (receipt, readings)) in recs.iter().zip(&sent) {
            assert_eq!(rec.h("content-encoding"), encoding);
            assert_eq!(rec.h("ferry-segment"), receipt.segment.to_string());
            assert_eq!(rec.h("ferry-first-id"), receipt.first_id.to_string());
            assert_eq!(rec.h("ferry-count"), "20");
            assert_eq!(rec.h("ferry-gateway"), "gw1");
            assert_eq!(rec.key.as_deref(), Some("gw1"));
            let mut decoded = decode_segment(&rec.value).unwrap();
            for r in &mut decoded {
                // The buffer stamped each reading with the clock at its commit.
                assert_ne!(r.clock.boot, 0, "{r:?}");
                r.clock = Default::default();
            }
            assert_eq!(&decoded, readings);
        }
        buffer.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_unconfirmed_readings_in_the_buffer() {
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::Gzip { level: 1 });
    let mut cfg = uplink(&mock.bootstrap_servers());
    cfg.message_timeout_ms = 10_000;
    mock.broker_down(1).unwrap();
    let run = start(&cfg, &buffer, Duration::from_millis(300));
    buffer
        .append((0..10).map(|i| reading("d", "t", format!("{i}"))).collect())
        .await
        .unwrap();
    wait_until("readings are in flight", Duration::from_secs(5), || {
        run.status.snapshot().in_flight_readings == 10
    })
    .await;
    let t = Instant::now();
    run.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert_eq!(buffer.stats().readings, 10, "nothing unconfirmed was acked");
    assert_eq!(buffer.stats().cursors.get("kafka"), Some(&0));

    // A new run after the broker is back delivers them.
    mock.broker_up(1).unwrap();
    let run = start(&cfg, &buffer, Duration::from_secs(2));
    wait_empty(&buffer, &run.status, Duration::from_secs(10)).await;
    run.stop().await;
    let recs = consume(&mock.bootstrap_servers(), &[("readings", 1)], 10).await;
    let ids: HashSet<&str> = recs.iter().map(|r| r.h("ferry-id")).collect();
    assert_eq!(ids.len(), 10);
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_segments_fill_the_readings_window_and_no_more() {
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 2, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::Gzip { level: 1 });
    // A slow site's backlog: one reading per commit, so one per segment.
    for i in 0..60 {
        buffer
            .append(vec![reading(&format!("d{}", i % 3), "t", format!("{i}"))])
            .await
            .unwrap();
    }
    assert_eq!(buffer.stats().segments, 60);
    let mut cfg = uplink(&mock.bootstrap_servers());
    cfg.message_timeout_ms = 10_000;
    cfg.max_inflight_segments = 256;
    cfg.max_inflight_readings = 25;
    mock.broker_down(1).unwrap();
    let run = start(&cfg, &buffer, Duration::from_millis(300));
    // Far more than the old limit of segments, exactly the readings window.
    wait_until("the window is full", Duration::from_secs(5), || {
        run.status.snapshot().in_flight_readings == 25
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(run.status.snapshot().in_flight_readings, 25);
    mock.broker_up(1).unwrap();
    wait_empty(&buffer, &run.status, Duration::from_secs(15)).await;
    run.stop().await;
    let recs = consume(&mock.bootstrap_servers(), &[("readings", 2)], 60).await;
    let ids: HashSet<&str> = recs.iter().map(|r| r.h("ferry-id")).collect();
    assert_eq!(ids.len(), 60);
    buffer.close().await;
}

#[tokio::test]
async fn a_buffer_without_the_kafka_consumer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = Buffer::open(
        dir.path(),
        BufferOptions {
            consumers: vec!["mqtt".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let err = KafkaSink::new(
        &KafkaUplink::default(),
        Common::new("kafka", "gw1", buffer.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, KafkaSinkError::Read(_)), "{err}");
    buffer.close().await;
}

#[tokio::test]
async fn an_unknown_librdkafka_property_is_refused_at_construction() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::None);
    let mut cfg = KafkaUplink::default();
    cfg.librdkafka.insert("no.such.thing".into(), "1".into());
    let err = KafkaSink::new(&cfg, Common::new("kafka", "gw1", buffer.clone())).unwrap_err();
    assert!(matches!(err, KafkaSinkError::Producer(_)), "{err}");
    buffer.close().await;
}

#[test]
fn error_classes() {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};
    let p = |c| classify(&KafkaError::MessageProduction(c));
    assert_eq!(p(C::MessageSizeTooLarge), ErrorClass::Permanent);
    assert_eq!(p(C::TopicAuthorizationFailed), ErrorClass::Transient);
    assert_eq!(p(C::InvalidRecord), ErrorClass::Permanent);
    assert_eq!(p(C::UnknownTopic), ErrorClass::Transient);
    assert_eq!(p(C::MessageTimedOut), ErrorClass::Transient);
    assert_eq!(p(C::NotEnoughReplicas), ErrorClass::Transient);
    assert_eq!(p(C::UnknownTopicOrPartition), ErrorClass::Transient);
    assert_eq!(p(C::AllBrokersDown), ErrorClass::Transient);
    assert_eq!(p(C::PurgeInflight), ErrorClass::Transient);
    assert_eq!(p(C::Fatal), ErrorClass::Fatal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_reads_what_the_uplink_sent() {
    let kcat = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kcat"))
            .find(|p| p.is_file())
    });
    let Some(kcat) = kcat else {
        if std::env::var("FERRY_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("kcat is not installed and FERRY_REQUIRE_TOOLS=1");
        }
        eprintln!(
            "SKIPPED: kcat not installed (apt-get install kcat); the independent-client check did not run"
        );
        return;
    };
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::Gzip { level: 1 });
    let cfg = uplink(&mock.bootstrap_servers());
    let run = start(&cfg, &buffer, Duration::from_secs(2));
    let receipt = buffer
        .append(
            (0..5)
                .map(|i| reading(&format!("dev-{i}"), "sensors/x", format!("value-{i}")))
                .collect(),
        )
        .await
        .unwrap();
    wait_empty(&buffer, &run.status, Duration::from_secs(10)).await;
    run.stop().await;

    let bootstrap = mock.bootstrap_servers();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(kcat)
            .args([
                "-C",
                "-b",
                &bootstrap,
                "-t",
                "readings",
                "-o",
                "beginning",
                "-e",
            ])
            .args(["-f", "%k|%s|%h\n"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 5, "{text}");
    for (i, line) in lines.iter().enumerate() {
        let mut parts = line.splitn(3, '|');
        assert_eq!(parts.next(), Some(format!("dev-{i}").as_str()));
        assert_eq!(parts.next(), Some(format!("value-{i}").as_str()));
        let headers = parts.next().unwrap();
        assert!(
            headers.contains(&format!("ferry-id=gw1-{}", receipt.first_id + i as u64)),
            "{headers}"
        );
        assert!(headers.contains("ferry-source=mqtt"), "{headers}");
    }
    buffer.close().await;
}

/// A Pi without a clock, through the real buffer to the mock cluster: readings taken before
/// NTP's first sync (3 days forward) arrive with corrected times and `ferry-clock:
/// corrected`, later ones `synced`; and a 1 h TTL drops none of them although the wall clock
/// jumped 3 days. A segment-mode record says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_before_the_clock_sync_arrive_with_corrected_times() {
    const DAY: u64 = 86_400_000;
    const REAL: u64 = 1_800_000_000_000;
    for delivery in [Delivery::Reading, Delivery::Segment] {
        let mock = Mock::new(1).unwrap();
        mock.create_topic("readings", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let clock = ferry_buffer::ManualClock::new("boot-1", REAL - 3 * DAY, 45_000, false);
        let buffer = Buffer::open(
            dir.path(),
            BufferOptions {
                consumers: vec!["kafka".into()],
                flush_interval: Duration::ZERO,
                max_age: Some(Duration::from_secs(3600)),
                clock: std::sync::Arc::new(clock.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let mut early = Vec::new();
        for i in 0..3u64 {
            let mut r = reading("dev-1", "sensors/dev-1/temp", format!("early-{i}"));
            r.received_at_ms = REAL - 3 * DAY + i * 60_000;
            early.push(buffer.append(vec![r]).await.unwrap().first_id);
            clock.advance(60_000);
        }
        // NTP: the wall clock steps 3 days forward; then one more reading.
        clock.step_wall(3 * DAY as i64);
        clock.set_synced(true);
        let mut late = reading("dev-1", "sensors/dev-1/temp", "late");
        late.received_at_ms = REAL + 180_000;
        let late_id = buffer.append(vec![late]).await.unwrap().first_id;
        assert_eq!(buffer.stats().dropped_ttl_total, 0);

        let mut cfg = uplink(&mock.bootstrap_servers());
        cfg.delivery = delivery;
        let run = start(&cfg, &buffer, Duration::from_secs(2));
        wait_empty(&buffer, &run.status, Duration::from_secs(10)).await;
        run.stop().await;
        let want: BTreeMap<u64, (u64, &str)> = early
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, (REAL + i as u64 * 60_000, "corrected")))
            .chain([(late_id, (REAL + 180_000, "synced"))])
            .collect();
        let mut got = BTreeMap::new();
        match delivery {
            Delivery::Reading => {
                for rec in consume(&mock.bootstrap_servers(), &[("readings", 1)], 4).await {
                    let id: u64 = rec
                        .h("ferry-id")
                        .rsplit('-')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let at: u64 = rec.h("ferry-received-at").parse().unwrap();
                    got.insert(id, (at, rec.h("ferry-clock").to_string()));
                }
            }
            _ => {
                for rec in consume(&mock.bootstrap_servers(), &[("readings", 1)], 4).await {
                    for r in ferry_buffer::segment::decode_segment(&rec.value).unwrap() {
                        got.insert(r.id, (r.received_at_ms, r.clock.mark.as_str().to_string()));
                    }
                }
            }
        }
        let got: BTreeMap<u64, (u64, &str)> = got
            .iter()
            .map(|(k, (a, m))| (*k, (*a, m.as_str())))
            .collect();
        assert_eq!(got, want, "{delivery:?}");
        buffer.close().await;
    }
}

/// While the brokers cannot be reached, the uplink keeps a probe's window in flight, not its
/// full one: a long outage holds little memory (BENCHMARKS.md, RSS in an outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_gets_a_probe_window() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), Compression::None);
    for b in 0..40 {
        let rs = (0..100)
            .map(|i| reading("d", "t", format!("{b}-{i}")))
            .collect();
        buffer.append(rs).await.unwrap();
    }
    let mut cfg = uplink("127.0.0.1:1");
    cfg.max_inflight_segments = 256;
    cfg.max_inflight_readings = 20_000;
    let run = start(&cfg, &buffer, Duration::from_secs(2));
    wait_until("two failed rounds", Duration::from_secs(20), || {
        run.status.snapshot().retried_total >= 2
    })
    .await;
    let mut most = 0;
    for _ in 0..100 {
        let s = run.status.snapshot();
        assert_ne!(s.state, LinkState::Connected);
        most = most.max(s.in_flight_readings);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The window, plus at most the one segment that may always be in flight.
    assert!(
        most <= ferry_uplink::retry::FAILING_WINDOW_READINGS + 100,
        "{most} readings in flight while offline"
    );
    assert!(most > 0, "the uplink keeps probing");
    run.stop().await;
    buffer.close().await;
}
