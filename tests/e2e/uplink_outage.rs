//! Reliability suite 2: a long upstream outage under steady ingest.
//!
//! The mock cluster's only broker goes down while two HTTP clients keep posting batches of
//! poorly compressible readings, so the 1 MiB buffer fills to its cap and stays there. Then
//! the broker comes back while ingest goes on.
//!
//! - `drop_oldest`: every reading is acknowledged; the ones the cap evicted are missing
//!   downstream, and their number is exactly what ferry reports as dropped.
//! - `reject`: readings beyond the cap are refused with 503 `buffer-full`; ferry's refusal
//!   count matches the clients', none of them ever reaches Kafka, and nothing acknowledged is
//!   missing.
//!
//! In both modes everything retained drains after recovery, and the live stream keeps being
//! acknowledged and delivered while the backlog drains. The drain rate is printed.
//! `FERRY_OUTAGE_SECS` lengthens the outage (4 s by default).

use crate::support;

use ferry_tests::Ferry;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::Tally;

#[test]
fn outage_with_drop_oldest_counts_every_dropped_reading() {
    outage("drop_oldest");
}

#[test]
fn outage_with_reject_refuses_clearly_and_loses_nothing() {
    outage("reject");
}

fn outage(when_full: &str) {
    let outage_secs: u64 = std::env::var("FERRY_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let bootstrap = mock.bootstrap_servers();
    let mut ferry = Ferry::start(&format!(
        r#"
[gateway]
id = "outage-{when_full}"

[buffer]
max_bytes = 1048576
max_batch_bytes = 131072
when_full = "{when_full}"

[mqtt]
enabled = false

[uplinks.kafka]
type = "kafka"
brokers = "{bootstrap}"
topic = "readings"
message_timeout_ms = 2000
initial_backoff_ms = 100
max_backoff_ms = 500
"#
    ));
    let base = ferry.http_url();
    let rt = support::rt();
    // Heavy while the link is down (to fill the cap fast), steady and light otherwise.
    let load = |phase: &str, tally: &Arc<Tally>, stop: &Arc<AtomicBool>| {
        let (clients, batch, pause_ms) = if phase == "down" {
            (2, 50, 10)
        } else {
            (1, 10, 50)
        };
        (0..clients)
            .map(|c| {
                rt.spawn(support::http_batcher(
                    base.clone(),
                    format!("{phase}{c}"),
                    batch,
                    400,
                    Duration::from_millis(pause_ms),
                    tally.clone(),
                    stop.clone(),
                ))
            })
            .collect::<Vec<_>>()
    };

    // Phase 1: the link is up, a little traffic flows through.
    let before = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load("up", &before, &stop);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });

    // Phase 2: the broker is down; ingest continues until well past the cap.
    mock.broker_down(1).unwrap();
    let during = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load("down", &during, &stop);
    std::thread::sleep(Duration::from_secs(outage_secs));
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    let st = rt.block_on(support::status(&base));
    let dropped = st["losses"]["dropped"]["buffer_full"].as_u64().unwrap_or(0);
    let rejected = st["losses"]["rejected"]["buffer.full"]
        .as_u64()
        .unwrap_or(0);
    let retained = st["buffer"]["readings"].as_u64().unwrap();
    match when_full {
        "drop_oldest" => {
            assert!(dropped > 0, "the cap never evicted: {st:#}");
            assert_eq!(rejected, 0, "drop_oldest refused readings: {st:#}");
            assert!(during.refused().is_empty(), "{:?}", during.refusal_kinds);
        }
        _ => {
            assert!(rejected > 0, "the cap never refused: {st:#}");
            assert_eq!(dropped, 0, "reject mode dropped readings: {st:#}");
            // Refused readings are counted per reading, exactly as the clients saw them.
            assert_eq!(
                rejected as usize,
                during.refused().len(),
                "ferry's refusal count differs from the clients': {:?}",
                during.refusal_kinds
            );
            let kinds = during.refusal_kinds.lock().unwrap().clone();
            assert_eq!(
                kinds.keys().collect::<Vec<_>>(),
                vec!["http.503.buffer-full"],
                "refusals must be 503 buffer-full"
            );
        }
    }
    assert!(
        !during.acked().is_empty(),
        "nothing acknowledged during the outage"
    );

    // Phase 3: the broker is back; live ingest goes on while the backlog drains.
    mock.broker_up(1).unwrap();
    let recovered_at = Instant::now();
    let live = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load("live", &live, &stop);
    // Wait until the backlog is gone from the buffer (the live stream keeps a little there).
    let mut drained_after = None;
    while recovered_at.elapsed() < Duration::from_secs(60) {
        let st = rt.block_on(support::status(&base));
        let waiting = st["buffer"]["readings"].as_u64().unwrap_or(u64::MAX);
        if waiting < retained / 4 && st["uplinks"][0]["state"] == "connected" {
            drained_after = Some(recovered_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    let drained_after = drained_after.unwrap_or_else(|| {
        panic!(
            "the backlog did not drain in 60 s: {:#}",
            rt.block_on(support::status(&base))
        )
    });
    // The live stream is served while the backlog drains. In reject mode the first live
    // requests may still meet a full buffer (a clear 503) until the drain frees room.
    assert!(
        live.acked_len() > 0,
        "the live stream was starved while the backlog drained: refusals {:?}",
        live.refusal_kinds
    );
    if when_full == "drop_oldest" {
        assert!(live.refused().is_empty(), "{:?}", live.refusal_kinds);
    }

    let mut acked: HashSet<String> = before.acked();
    acked.extend(during.acked());
    acked.extend(live.acked());
    let arrivals = support::kafka_arrivals(
        &bootstrap,
        "readings",
        &format!("outage-{when_full}-check"),
        // The live readings were appended last: once they are all in, so is the backlog
        // (one partition keeps the order); the settle time catches stragglers.
        &live.acked(),
        Duration::from_secs(3),
        Duration::from_secs(60),
    );
    let arrived: HashSet<&String> = arrivals.keys().collect();
    let missing: Vec<&String> = acked.iter().filter(|k| !arrived.contains(k)).collect();
    let refused_arrived = during
        .refused()
        .iter()
        .filter(|k| arrived.contains(k))
        .count();
    assert_eq!(refused_arrived, 0, "refused readings reached Kafka");
    let live_missing = live.acked().iter().filter(|k| !arrived.contains(k)).count();
    let end = rt.block_on(support::status(&base));
    assert_eq!(
        live_missing,
        0,
        "live readings missing downstream ({} arrived; missing: {} before, {} during); \
         status now: {end:#}",
        arrivals.len(),
        before
            .acked()
            .iter()
            .filter(|k| !arrived.contains(k))
            .count(),
        during
            .acked()
            .iter()
            .filter(|k| !arrived.contains(k))
            .count(),
    );
    // Exactly the evicted readings are missing: no silent loss beyond what was counted. The
    // cap may still evict while the live stream arrives before the drain makes room.
    let dropped = end["losses"]["dropped"]["buffer_full"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        missing.len() as u64,
        dropped,
        "{} acknowledged readings are missing downstream but ferry reports {dropped} dropped",
        missing.len()
    );
    let dups: usize = arrivals.values().map(|n| n - 1).sum();
    eprintln!(
        "outage ({when_full}, {outage_secs} s): acknowledged {}, refused {}, dropped (reported) \
         {dropped}, missing downstream {}, duplicates {dups}; {retained} readings retained at \
         the cap drained in {:.2} s ({:.0} readings/s) while {} live readings were \
         acknowledged ({} live refused while the buffer was still full)",
        acked.len(),
        during.refused().len(),
        missing.len(),
        drained_after.as_secs_f64(),
        retained as f64 / drained_after.as_secs_f64(),
        live.acked_len(),
        live.refused().len()
    );
    ferry
        .terminate(Duration::from_secs(10))
        .expect("clean exit");
}

/// A 30 s upstream outage under load writes a bounded number of log lines (start-up, the
/// state change, the first error of each kind, and with `status.log_summary_secs = 12` a
/// summary of each every 12 s saying for how long and how much waits), however often the
/// uplink retries; the status page and the metrics still count every retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_under_load_writes_a_bounded_log() {
    let ferry = Ferry::start(
        "[status]\nlog_summary_secs = 12\n\n[uplinks.kafka]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:1\"\nmessage_timeout_ms = 1000\ninitial_backoff_ms = 100\nmax_backoff_ms = 300\n",
    );
    let base = ferry.http_url();
    let http = reqwest::Client::new();
    let start = std::time::Instant::now();
    let mut posted = 0u64;
    while start.elapsed() < std::time::Duration::from_secs(30) {
        let resp = http
            .post(format!("{base}/v1/readings"))
            .json(&serde_json::json!([{"topic": "out/a", "payload": {"n": posted}}]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        posted += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let st = support::status(&base).await;
    let u = &st["uplinks"][0];
    let retries = u["retried_total"].as_u64().unwrap();
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let log = ferry.log();
    let lines = log.lines().count();
    eprintln!("30 s outage: {posted} requests, {retries} retries, {lines} log lines:\n{log}");
    assert!(retries >= 10, "the uplink kept retrying: {u:#}");
    let in_metrics: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_uplink_retries_total{uplink=\"kafka\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        in_metrics >= retries,
        "every retry is in the metrics: {in_metrics} < {retries}"
    );
    assert_eq!(u["state"], "offline", "{u:#}");
    assert!(u["last_error"].is_string(), "{u:#}");
    let summaries: Vec<&str> = log.lines().filter(|l| l.contains(" keeps ")).collect();
    assert!(
        lines - summaries.len() <= 18,
        "{lines} log lines for a 30 s outage with {retries} retries:\n{log}"
    );
    // At most one summary per source per 12 s period: the uplink's and librdkafka's.
    assert!(summaries.len() <= 6, "{summaries:#?}");
    // The uplink's summary says for how long and how much waits.
    let waiting = summaries
        .iter()
        .filter(|l| l.contains("The upstream keeps failing"))
        .filter_map(|l| l.split("waiting_readings=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .max();
    assert!(waiting.is_some_and(|n| n > 0), "{summaries:#?}");
    assert!(
        summaries.iter().any(|l| l.contains("failing_for_secs=")),
        "{summaries:#?}"
    );
}
