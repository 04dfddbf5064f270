//! The Kinesis uplink through the real binary, against kinesalite (npm, in-memory, run by the
//! test on a free loopback port): readings are ingested over HTTP while ferry forwards them,
//! ferry is SIGKILLed with calls in flight, restarted on the same data directory, and every
//! reading that got a 202 must arrive in the stream — at least once, under one stable
//! `ferry_id` — as read back by an independent client (boto3, `python3 -c`).
//!
//! Without kinesalite or python3 with boto3 the test prints a loud SKIPPED line and passes,
//! unless `FERRY_REQUIRE_TOOLS=1` (as in CI), where it fails. `.ci/run` installs them.

use crate::support;

use ferry_tests::{Ferry, Server, free_port, require_tool};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STREAM: &str = "readings";

/// kinesalite on PATH, else the global npm package run with node.
fn kinesalite_cmd() -> Option<Command> {
    let on_path = |t: &str| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(t))
                .find(|f| f.is_file())
        })
    };
    if let Some(p) = on_path("kinesalite") {
        return Some(Command::new(p));
    }
    let root = Command::new("npm").args(["root", "-g"]).output().ok()?;
    let cli = PathBuf::from(String::from_utf8_lossy(&root.stdout).trim()).join("kinesalite/cli.js");
    (cli.is_file() && on_path("node").is_some()).then(|| {
        let mut c = Command::new("node");
        c.arg(cli);
        c
    })
}

/// Whether kinesalite and boto3 are there; if not, skips loudly or fails under
/// `FERRY_REQUIRE_TOOLS=1`.
fn require(test: &str) -> bool {
    // `require_tool` prints the SKIPPED line or panics; kinesalite may also sit in npm's root.
    let kinesalite = kinesalite_cmd().is_some() || require_tool("kinesalite", test);
    let boto3 = Command::new("python3")
        .args(["-c", "import boto3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if kinesalite && !boto3 {
        if std::env::var("FERRY_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{test}: python3 with boto3 is required (FERRY_REQUIRE_TOOLS=1)");
        }
        eprintln!(
            "\n========================================================================\n\
             SKIPPED {test}: python3 with boto3 is not installed (run .ci/run).\n\
             ========================================================================\n"
        );
    }
    kinesalite && boto3
}

/// kinesalite on a free 127.0.0.1 port, killed on drop.
fn kinesalite() -> Server {
    let port = free_port();
    let mut cmd = kinesalite_cmd().expect("kinesalite");
    cmd.args(["--port", &port.to_string(), "--createStreamMs", "0"])
        .args(["--deleteStreamMs", "0", "--updateStreamMs", "0"]);
    Server::spawn(cmd, port, "kinesalite", Duration::from_secs(30))
}

/// boto3 as the independent client. `create N`: CreateStream, wait ACTIVE. `read`: every
/// record of every shard from TRIM_HORIZON, one JSON line each, its data as UTF-8 text.
const BOTO3: &str = r#"
import json, sys, time, boto3
url, stream, cmd = sys.argv[1:4]
c = boto3.client("kinesis", endpoint_url=url, region_name="us-east-1",
                 aws_access_key_id="AKIDTEST", aws_secret_access_key="secret")
if cmd == "create":
    c.create_stream(StreamName=stream, ShardCount=int(sys.argv[4]))
    end = time.time() + 20
    while c.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
        assert time.time() < end, "stream not ACTIVE after 20 s"
        time.sleep(0.05)
else:
    for sh in c.list_shards(StreamName=stream)["Shards"]:
        it = c.get_shard_iterator(StreamName=stream, ShardId=sh["ShardId"],
                                  ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            r = c.get_records(ShardIterator=it, Limit=10000)
            for x in r["Records"]:
                print(json.dumps({"shard": sh["ShardId"], "key": x["PartitionKey"],
                                  "text": x["Data"].decode("utf-8", "replace")}))
            if not r["Records"]:
                break
            it = r.get("NextShardIterator")
"#;

fn boto3(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(BOTO3)
        .arg(endpoint)
        .arg(STREAM)
        .args(args)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_CONFIG_FILE")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE")
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "boto3 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// (partition key, envelope) of every record in the stream.
fn read_stream(endpoint: &str) -> Vec<(String, Value)> {
    boto3(endpoint, &["read"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let env: Value = serde_json::from_str(v["text"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("record is not a JSON envelope ({e}): {l}"));
            (v["key"].as_str().unwrap().to_string(), env)
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
    if !require(test) {
        return;
    }
    let t0 = Instant::now();
    let server = kinesalite();
    let endpoint = server.endpoint();
    boto3(&endpoint, &["create", "2"]);
    let mut ferry = Ferry::start(&config(&endpoint));

    // Ingest: batches of 20 unique readings from 4 concurrent clients, each pausing 40 ms
    // between requests (a few thousand readings in all), recording each 202.
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for c in 0..4u64 {
        let (acked, running, base) = (acked.clone(), running.clone(), ferry.http_url());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while running.load(Ordering::SeqCst) {
                let keys: Vec<String> = (0..20).map(|i| format!("c{c}-n{n}-i{i}")).collect();
                let items: Vec<Value> = keys
                    .iter()
                    .map(|k| json!({"topic": "plant/line-1/temp", "device": format!("dev-{c}"), "payload": {"k": k}}))
                    .collect();
                n += 1;
                // A refused or cut-off request is not acknowledged: only 202s count.
                if let Ok(resp) = http.post(format!("{base}/v1/readings")).json(&items).send().await
                    && resp.status().as_u16() == 202
                {
                    acked.lock().unwrap().extend(keys);
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }));
    }
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
    running.store(false, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 200,
        "only {} readings were acknowledged before the kill",
        acked.len()
    );
    let ep = endpoint.clone();
    let before = tokio::task::spawn_blocking(move || read_stream(&ep).len())
        .await
        .unwrap();

    // Restart on the same buffer: whatever Kinesis had not confirmed is sent again.
    ferry.restart();
    let ep = endpoint.clone();
    let wanted = acked.clone();
    let records = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        loop {
            let recs = read_stream(&ep);
            let keys: BTreeSet<&str> = recs
                .iter()
                .filter_map(|(_, env)| env["payload"]["k"].as_str())
                .collect();
            if wanted.iter().all(|k| keys.contains(k.as_str()))
                || start.elapsed() > Duration::from_secs(60)
            {
                return recs;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await
    .unwrap();

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
