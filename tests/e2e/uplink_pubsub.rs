//! The Pub/Sub uplink through the real binary, against Google's Pub/Sub emulator (Debian
//! package `google-cloud-cli-pubsub-emulator`, Java, run by the test on a free loopback port):
//! readings are ingested over HTTP while ferry publishes them, ferry is SIGKILLed with
//! requests in flight, restarted on the same data directory, and every reading that got a 202
//! must arrive in the subscription — at least once, under one stable `ferry-id` attribute —
//! as pulled over the emulator's REST API.
//!
//! Without the emulator the test prints a loud SKIPPED line and passes, unless
//! `FERRY_REQUIRE_TOOLS=1` (as in CI), where it fails.

use crate::support;

use ferry_tests::{Ferry, Server, free_port, require_tool};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

/// The emulator on a free 127.0.0.1 port, killed on drop.
struct Emulator(Server);

impl Emulator {
    fn start() -> Emulator {
        let port = free_port();
        let mut cmd = Command::new(
            ferry_tests::find_tool("cloud-pubsub-emulator").expect("the Pub/Sub emulator"),
        );
        cmd.arg("--host=127.0.0.1").arg(format!("--port={port}"));
        Emulator(Server::spawn(
            cmd,
            port,
            "the Pub/Sub emulator",
            Duration::from_secs(60),
        ))
    }

    fn endpoint(&self) -> String {
        self.0.endpoint()
    }

    async fn call(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Value {
        let resp = http
            .request(
                method,
                format!("{}/v1/projects/proj/{path}", self.endpoint()),
            )
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap()
    }
}

fn config(endpoint: &str) -> String {
    format!(
        r#"
[gateway]
id = "pubsub-e2e"

[mqtt]
enabled = false

[uplinks.gcp]
type = "pubsub"
project = "proj"
topic = "readings"
endpoint = "{endpoint}"
ordering_key = "device"
request_timeout_ms = 5000
initial_backoff_ms = 100
max_backoff_ms = 1000
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_requests_in_flight_loses_nothing_acknowledged() {
    let test = "sigkill_with_requests_in_flight_loses_nothing_acknowledged";
    if !require_tool("cloud-pubsub-emulator", test) {
        return;
    }
    let t0 = Instant::now();
    let emu = Emulator::start();
    let http = reqwest::Client::new();
    emu.call(&http, reqwest::Method::PUT, "topics/readings", json!({}))
        .await;
    emu.call(
        &http,
        reqwest::Method::PUT,
        "subscriptions/all",
        json!({"topic": "projects/proj/topics/readings", "ackDeadlineSeconds": 600}),
    )
    .await;
    let mut ferry = Ferry::start(&config(&emu.endpoint()));

    // Ingest from 8 HTTP clients, SIGKILL ferry under load; `acked` is what it promised.
    let acked = support::http_load_then_kill(&mut ferry, 8, Duration::from_millis(1500)).await;

    // Restart on the same buffer: whatever Pub/Sub had not confirmed is published again.
    ferry.restart();
    // payload key -> (ferry-ids it arrived with, deliveries)
    let mut seen: BTreeMap<String, (BTreeSet<String>, usize)> = BTreeMap::new();
    let mut messages = 0usize;
    let start = Instant::now();
    while acked.iter().any(|k| !seen.contains_key(k)) && start.elapsed() < Duration::from_secs(60) {
        let got = emu
            .call(
                &http,
                reqwest::Method::POST,
                "subscriptions/all:pull",
                json!({"maxMessages": 1000, "returnImmediately": true}),
            )
            .await;
        let got = got["receivedMessages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut ack_ids = Vec::new();
        for m in &got {
            ack_ids.push(m["ackId"].clone());
            let msg = &m["message"];
            let attrs = &msg["attributes"];
            let data = base64_decode(msg["data"].as_str().unwrap());
            let payload: Value = serde_json::from_slice(&data)
                .unwrap_or_else(|e| panic!("data is not the JSON payload ({e}): {msg}"));
            assert_eq!(
                msg["orderingKey"], attrs["ferry-device"],
                "ordering key = device"
            );
            let e = seen
                .entry(payload["k"].as_str().unwrap_or_default().to_string())
                .or_default();
            e.0.insert(attrs["ferry-id"].as_str().unwrap_or_default().to_string());
            e.1 += 1;
            messages += 1;
        }
        emu.call(
            &http,
            reqwest::Method::POST,
            "subscriptions/all:acknowledge",
            json!({ "ackIds": ack_ids }),
        )
        .await;
    }
    let dups = support::assert_every_acked_arrived(&acked, &seen, "Pub/Sub", "pubsub-e2e-", &ferry);
    eprintln!(
        "{test}: {} readings acknowledged before SIGKILL, all arrived after the restart; \
         {messages} messages, {dups} duplicate deliveries; {:?}",
        acked.len(),
        t0.elapsed()
    );
}

/// Standard base64 with padding (the emulator's `data`), without a dependency for it.
fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("not base64: {s}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
