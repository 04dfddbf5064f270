//! The Kafka uplink through the real binary, against an in-process librdkafka mock cluster:
//! readings are ingested over HTTP while ferry forwards them, ferry is SIGKILLed with records
//! in flight, restarted on the same data directory, and every reading that got a 202 must
//! arrive in Kafka — at least once, with one stable `ferry-id` per reading.

use crate::support;

use ferry_tests::Ferry;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

fn config(bootstrap: &str) -> String {
    format!(
        r#"
[gateway]
id = "kafka-e2e"

[mqtt]
enabled = false

[uplinks.kafka]
type = "kafka"
brokers = "{bootstrap}"
topic = "readings"
message_timeout_ms = 3000
initial_backoff_ms = 100
max_backoff_ms = 1000
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_records_in_flight_loses_nothing_acknowledged() {
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    mock.create_topic("readings", 2, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let mut ferry = Ferry::start(&config(&bootstrap));

    // Ingest from 8 HTTP clients, SIGKILL ferry under load; `acked` is what it promised.
    let acked = support::http_load_then_kill(&mut ferry, 8, Duration::from_millis(1500)).await;

    // Restart on the same buffer: whatever Kafka had not confirmed is sent again.
    ferry.restart();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "kafka-e2e-check")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&["readings"]).unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        // payload key -> ferry-ids it arrived with, and how many times
        let mut seen: BTreeMap<String, (BTreeSet<String>, usize)> = BTreeMap::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                    let key = v["k"].as_str().unwrap_or_default().to_string();
                    let id = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "ferry-id"))
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    let e = seen.entry(key).or_default();
                    e.0.insert(id);
                    e.1 += 1;
                }
                Some(Err(e)) => panic!("consumer error: {e}"),
                None => {
                    if acked.iter().all(|k| seen.contains_key(k)) {
                        break;
                    }
                }
            }
        }
        (seen, acked)
    })
    .await
    .unwrap();
    let (seen, acked) = seen;
    let dups = support::assert_every_acked_arrived(&acked, &seen, "Kafka", "kafka-e2e-", &ferry);
    eprintln!(
        "{} readings acknowledged before SIGKILL, all {} arrived in Kafka after the restart; {dups} duplicate deliveries",
        acked.len(),
        acked.len()
    );
}
