//! The Kinesis uplink through the real binary, against kinesalite (npm, in-memory, run by the
//! test on a free loopback port): readings are ingested over HTTP while ferry forwards them,
//! ferry is SIGKILLed with calls in flight, restarted on the same data directory, and every
//! reading that got a 202 must arrive in the stream — at least once, under one stable
//! `ferry_id` — as read back by an independent client (boto3, `python3 -c`; the servers and
//! the client are [`ferry_tests::kinesis`]'s).
//!
//! Without kinesalite or python3 with boto3 the test prints a loud SKIPPED line and passes,
//! unless `FERRY_REQUIRE_TOOLS=1` (as in CI), where it fails. `.ci/run` installs them.

use crate::support;

use ferry_tests::Ferry;
use ferry_tests::kinesis::{self, Stream};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const STREAM: &str = "readings";

/// (partition key, envelope) of every record in the stream, as boto3 reads it.
async fn read_stream(server: &Stream) -> Vec<(String, Value)> {
    server
        .read_all(STREAM)
        .await
        .into_iter()
        .map(|r| {
            let env = r.envelope();
            (r.key, env)
        })
        .collect()
}

fn config(endpoint: &str) -> String {
    format!(
        r#"
[gateway]
id = "kinesis-e2e"

[mqtt]
enabled = false

[uplinks.aws]
type = "kinesis"
stream = "{STREAM}"
region = "us-east-1"
endpoint = "{endpoint}"
access_key_id = "AKIDTEST"
secret_access_key = "secret"
request_timeout_ms = 5000
initial_backoff_ms = 100
max_backoff_ms = 1000
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_calls_in_flight_loses_nothing_acknowledged() {
    let test = "sigkill_with_calls_in_flight_loses_nothing_acknowledged";
    if !kinesis::require(kinesis::Server::Kinesalite, test) {
        return;
    }
    let t0 = Instant::now();
    let server = Stream::start(kinesis::Server::Kinesalite);
    let endpoint = server.endpoint();
    server.create(STREAM, 2).await;
    let mut ferry = Ferry::start(&config(&endpoint));

    // Ingest: batches of 20 unique readings from 4 concurrent clients, each pausing 40 ms
    // between requests (a few thousand readings in all), recording each 202.
    let load = support::http_clients(&ferry.http_url(), 4, Duration::from_millis(40));
    let acked = load.acked.clone();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Then a burst of 1600 readings in 16 concurrent requests, and SIGKILL 30 ms after the last
    // is acknowledged: ferry is then sending the burst, with calls in flight, and readings
    // acknowledged but only on disk.
    let mut burst = Vec::new();
    for c in 0..16u64 {
        let (acked, base) = (acked.clone(), ferry.http_url());
        burst.push(tokio::spawn(async move {
            let keys: Vec<String> = (0..100).map(|i| format!("burst{c}-i{i}")).collect();
            let items: Vec<Value> = keys
                .iter()
                .map(|k| json!({"topic": "plant/line-2/temp", "device": format!("dev-b{}", c % 4), "payload": {"k": k}}))
                .collect();
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/readings"))
                .json(&items)
                .send()
                .await;
            if resp.is_ok_and(|r| r.status().as_u16() == 202) {
                acked.lock().unwrap().extend(keys);
            }
        }));
    }
    for b in burst {
        b.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    ferry.kill();
    let acked = load.stop().await;
    let before = read_stream(&server).await.len();

    // Restart on the same buffer: whatever Kinesis had not confirmed is sent again.
    ferry.restart();
    let start = Instant::now();
    let records = loop {
        let recs = read_stream(&server).await;
        let keys: BTreeSet<&str> = recs
            .iter()
            .filter_map(|(_, env)| env["payload"]["k"].as_str())
            .collect();
        if acked.iter().all(|k| keys.contains(k.as_str()))
            || start.elapsed() > Duration::from_secs(60)
        {
            break recs;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // payload key -> (ferry_ids it arrived with, deliveries)
    let mut seen: BTreeMap<String, (BTreeSet<String>, usize)> = BTreeMap::new();
    for (key, env) in &records {
        let k = env["payload"]["k"].as_str().unwrap_or_default().to_string();
        assert_eq!(
            key,
            env["device"].as_str().unwrap(),
            "partition key = device"
        );
        assert_eq!(env["gateway"], "kinesis-e2e");
        let e = seen.entry(k).or_default();
        e.0.insert(env["ferry_id"].as_str().unwrap_or_default().to_string());
        e.1 += 1;
    }
    let dups =
        support::assert_every_acked_arrived(&acked, &seen, "Kinesis", "kinesis-e2e-", &ferry);
    eprintln!(
        "{test}: {} readings acknowledged before SIGKILL ({before} records in the stream at the \
         kill), all arrived after the restart; {} records, {dups} duplicate deliveries; {:?}",
        acked.len(),
        records.len(),
        t0.elapsed()
    );
}
