//! Reliability suite 1: crash loop.
//!
//! Mixed load runs against the real binary — two MQTT QoS 1 publishers, one MQTT QoS 2
//! publisher and two HTTP clients posting batches of 20 — while ferry forwards to an
//! in-process librdkafka mock cluster. ferry is SIGKILLed at a random moment, restarted on the
//! same data directory, and the load starts again; after the last cycle ferry drains.
//!
//! Asserted: every acknowledged reading (PUBACK, PUBREC, HTTP 202) arrived in Kafka at least
//! once, and the duplicates are bounded by what the uplink can have in flight at a kill
//! (`max_inflight_segments` × `max_batch_readings` per cycle).
//!
//! `FERRY_CRASH_CYCLES` sets the cycles (20 by default; the long variant is 50+), and
//! `FERRY_SEED` repeats a run's kill moments.

use crate::support;

use ferry_tests::Ferry;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rumqttc::QoS;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::{Rng, Tally};

const MAX_BATCH_READINGS: u64 = 256;
const MAX_INFLIGHT_SEGMENTS: u64 = 4;

#[test]
fn sigkill_loop_under_mixed_load_loses_nothing_acknowledged() {
    let cycles: u64 = std::env::var("FERRY_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = Rng::from_env("crash_loop");
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    mock.create_topic("readings", 2, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let config = format!(
        r#"
[gateway]
id = "crash-loop"

[buffer]
max_batch_readings = {MAX_BATCH_READINGS}

[uplinks.kafka]
type = "kafka"
brokers = "{bootstrap}"
topic = "readings"
max_inflight_segments = {MAX_INFLIGHT_SEGMENTS}
initial_backoff_ms = 50
max_backoff_ms = 500
"#
    );
    let rt = support::rt();
    let mut ferry = Ferry::start(&config);
    let mut acked: HashSet<String> = HashSet::new();
    let mut by_kind = [0usize; 3]; // qos1, qos2, http
    let started = Instant::now();
    let mut slowest_ready = Duration::ZERO;
    for cycle in 0..cycles {
        if cycle > 0 {
            let t = Instant::now();
            ferry.restart();
            slowest_ready = slowest_ready.max(t.elapsed());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mqtt = ferry.addr("mqtt");
        let base = ferry.http_url();
        let clients: Vec<(usize, Arc<Tally>, tokio::task::JoinHandle<()>)> = (0..5)
            .map(|c| {
                let tally = Arc::new(Tally::default());
                let (t, s) = (tally.clone(), stop.clone());
                let prefix = format!("x{cycle}c{c}");
                let (kind, task) = match c {
                    0 | 1 => (
                        0,
                        rt.spawn(support::mqtt_publisher(
                            mqtt,
                            prefix,
                            QoS::AtLeastOnce,
                            16,
                            t,
                            s,
                        )),
                    ),
                    2 => (
                        1,
                        rt.spawn(support::mqtt_publisher(
                            mqtt,
                            prefix,
                            QoS::ExactlyOnce,
                            16,
                            t,
                            s,
                        )),
                    ),
                    _ => (
                        2,
                        rt.spawn(support::http_batcher(
                            base.clone(),
                            prefix,
                            20,
                            16,
                            Duration::ZERO,
                            t,
                            s,
                        )),
                    ),
                };
                (kind, tally, task)
            })
            .collect();
        // A random moment: anywhere from while clients are still connecting to well into the
        // stream, with the uplink forwarding all along.
        std::thread::sleep(Duration::from_millis(100 + rng.below(900)));
        ferry.kill();
        stop.store(true, Ordering::SeqCst);
        for (kind, tally, task) in clients {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            });
            let a = tally.acked();
            by_kind[kind] += a.len();
            acked.extend(a);
        }
    }
    let load_secs = started.elapsed().as_secs_f64();
    assert!(
        acked.len() as u64 > cycles * 50,
        "too little load to mean anything: {} acknowledged in {cycles} cycles",
        acked.len()
    );

    // Restart once more and let the uplink drain everything to the mock cluster.
    ferry.restart();
    let t = Instant::now();
    let arrivals = support::kafka_arrivals(
        &bootstrap,
        "readings",
        "crash-loop-check",
        &acked,
        Duration::from_secs(2),
        Duration::from_secs(120),
    );
    let drained_in = t.elapsed();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|k| !arrivals.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged readings never reached Kafka, e.g. {:?}\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)],
        ferry.log()
    );
    let dups: usize = arrivals.values().map(|n| n - 1).sum();
    let bound = (cycles * MAX_INFLIGHT_SEGMENTS * MAX_BATCH_READINGS) as usize;
    eprintln!(
        "crash loop: {cycles} SIGKILL cycles in {load_secs:.1} s; acknowledged {} readings \
         (QoS1 {}, QoS2 {}, HTTP {}), lost 0, {} arrived (incl. unacknowledged), \
         {dups} duplicate deliveries (bound {bound}), slowest restart to ready {} ms, \
         final drain {:.1} s",
        acked.len(),
        by_kind[0],
        by_kind[1],
        by_kind[2],
        arrivals.len(),
        slowest_ready.as_millis(),
        drained_in.as_secs_f64()
    );
    assert!(
        dups <= bound,
        "{dups} duplicates exceed what the uplink can have in flight at {cycles} kills ({bound})"
    );
    ferry
        .terminate(Duration::from_secs(10))
        .expect("clean exit after draining");
}
