//! The Pub/Sub uplink against Google's Pub/Sub emulator (`cloud-pubsub-emulator`, Java),
//! started by each test on a free loopback port, with the emulator's REST API as the
//! independent reader.
//!
//! Without the emulator the tests print a loud SKIPPED line and pass, unless
//! `FERRY_REQUIRE_TOOLS=1` (as in CI), where they fail.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use ferry_buffer::{Buffer, Reading};
use ferry_config::{KeyRule, PubsubUplink};
use ferry_tests::scripted::Scripted;
use ferry_tests::uplink::{Running, reading, wait_until};
use ferry_tests::{free_port, require_tool};
use ferry_uplink::Common;
use ferry_uplink::http::{HttpClient, Request, Response};
use ferry_uplink::pubsub::*;
use ferry_uplink::status::UplinkStatus;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn client() -> HttpClient {
    HttpClient::new(None, Duration::from_secs(5)).unwrap()
}

fn google_error(code: u16, status: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message, "status": status}}).to_string()
}

/// One message pulled from a subscription.
#[derive(Debug, Clone)]
struct Pulled {
    data: Vec<u8>,
    attributes: BTreeMap<String, String>,
    ordering_key: String,
    message_id: u64,
}

impl Pulled {
    fn a(&self, k: &str) -> &str {
        self.attributes.get(k).map_or("", |s| s.as_str())
    }
}

/// The emulator as a child process (killed on drop), and a REST client for it.
struct Emulator {
    port: u16,
    child: Option<Child>,
    http: HttpClient,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Emulator {
    fn start() -> Emulator {
        let mut e = Emulator {
            port: free_port(),
            child: None,
            http: client(),
        };
        e.spawn();
        e
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts a fresh emulator (no topics) on the port.
    fn spawn(&mut self) {
        let child = Command::new(ferry_tests::find_tool("cloud-pubsub-emulator").unwrap())
            .arg("--host=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the Pub/Sub emulator did not listen on {} within 60 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Response {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.endpoint()))
            .header("content-type", "application/json")
            .body(Bytes::from(body.to_string()))
            .unwrap();
        self.http.send(req).await.unwrap()
    }

    async fn create_topic(&self, topic: &str) {
        let r = self
            .call(
                "PUT",
                &format!("/v1/projects/proj/topics/{topic}"),
                json!({}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }

    async fn create_subscription(&self, sub: &str, topic: &str, ordered: bool) {
        let r = self
            .call(
                "PUT",
                &format!("/v1/projects/proj/subscriptions/{sub}"),
                json!({"topic": format!("projects/proj/topics/{topic}"),
                       "enableMessageOrdering": ordered, "ackDeadlineSeconds": 600}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }

    /// Pulls (and acks) until `n` messages arrived, in the order pulled.
    async fn pull(&self, sub: &str, n: usize) -> Vec<Pulled> {
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < n {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "pulled {} of {n} messages",
                out.len()
            );
            let r = self
                .call(
                    "POST",
                    &format!("/v1/projects/proj/subscriptions/{sub}:pull"),
                    json!({"maxMessages": 1000, "returnImmediately": true}),
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            let got = v["receivedMessages"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if got.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let mut ack_ids = Vec::new();
            for m in got {
                ack_ids.push(m["ackId"].clone());
                let msg = &m["message"];
                out.push(Pulled {
                    data: STANDARD.decode(msg["data"].as_str().unwrap_or("")).unwrap(),
                    attributes: serde_json::from_value(msg["attributes"].clone())
                        .unwrap_or_default(),
                    ordering_key: msg["orderingKey"].as_str().unwrap_or("").to_owned(),
                    message_id: msg["messageId"].as_str().unwrap().parse().unwrap(),
                });
            }
            let r = self
                .call(
                    "POST",
                    &format!("/v1/projects/proj/subscriptions/{sub}:acknowledge"),
                    json!({ "ackIds": ack_ids }),
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
        out
    }
}

fn open_buffer(dir: &Path, consumers: &[&str]) -> Buffer {
    ferry_tests::uplink::open_buffer(dir, consumers)
}

fn uplink(endpoint: &str, ordering_key: KeyRule) -> PubsubUplink {
    PubsubUplink {
        project: "proj".into(),
        topic: "readings".into(),
        endpoint: Some(endpoint.into()),
        ordering_key,
        max_inflight_requests: 4,
        max_inflight_readings: 2000,
        request_timeout_ms: 5000,
        initial_backoff_ms: 50,
        max_backoff_ms: 500,
        ..PubsubUplink::default()
    }
}

fn start(cfg: &PubsubUplink, buffer: &Buffer) -> Running {
    let common = Common::new("gcp", "gw1", buffer.clone()).grace(Duration::from_secs(2));
    Running::start(Box::new(PubsubSink::new(cfg, common).unwrap()))
}

/// Waits (at most 5 s) until the status counts `acked` acked readings: it is updated right
/// after the ack's commit, a moment after the buffer's own counts change.
async fn wait_acked(status: &UplinkStatus, acked: u64) {
    wait_until(
        &format!("the status counts {acked} acked readings"),
        Duration::from_secs(5),
        || status.snapshot().acked_total >= acked,
    )
    .await;
}

async fn wait_empty(buffer: &Buffer, status: &UplinkStatus) {
    ferry_tests::uplink::wait_empty(buffer, status, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_arrives_with_its_attributes_and_the_oversized_one_is_dead_lettered() {
    if !require_tool(
        "cloud-pubsub-emulator",
        "every_reading_arrives_with_its_attributes_and_the_oversized_one_is_dead_lettered",
    ) {
        return;
    }
    let emu = Emulator::start();
    emu.create_topic("readings").await;
    emu.create_subscription("all", "readings", false).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["gcp"]);

    // 3,000 readings in 30 appends (segments), some with a content type and v5 properties,
    // some binary; one with a property value over Pub/Sub's 1,024 bytes.
    let mut first_id = None;
    let mut expected: HashMap<String, Reading> = HashMap::new();
    for batch in 0..30u32 {
        let rs: Vec<Reading> = (0..100u32)
            .map(|i| {
                let n = batch * 100 + i;
                let mut r = reading(
                    &format!("dev-{}", n % 7),
                    &format!("sensors/{n}/temp"),
                    format!("{{\"n\":{n}}}").as_bytes(),
                );
                if n % 3 == 0 {
                    r = r.with_content_type("application/json");
                }
                if n % 5 == 0 {
                    r.properties = vec![("unit".into(), "C".into()), ("seq".into(), n.to_string())];
                }
                if n % 11 == 0 {
                    r.payload = Bytes::from(vec![0xff, 0x00, n as u8]);
                }
                if n == 1234 {
                    r.properties = vec![("huge".into(), "x".repeat(2000))];
                }
                r
            })
            .collect();
        let receipt = buffer.append(rs.clone()).await.unwrap();
        first_id.get_or_insert(receipt.first_id);
        for (k, mut r) in rs.into_iter().enumerate() {
            r.id = receipt.first_id + k as u64;
            expected.insert(format!("gw1-{}", r.id), r);
        }
    }
    let run = start(&uplink(&emu.endpoint(), KeyRule::None), &buffer);
    wait_empty(&buffer, &run.status).await;
    wait_acked(&run.status, 2999).await;
    let snap = run.status.snapshot();
    assert_eq!(
        (snap.acked_total, snap.dead_lettered_total),
        (2999, 1),
        "{snap:?}"
    );
    assert_eq!(snap.retried_total, 0, "{snap:?}");
    // The dead letter's reason is the last thing said.
    assert_eq!(
        snap.last_error.as_deref(),
        Some(
            "the value of the attribute \"huge\" is 2000 bytes, more than Pub/Sub's limit of 1024"
        )
    );
    run.stop().await;

    let dead = buffer.dead_letters(0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reading.id, first_id.unwrap() + 1234);
    assert_eq!(dead[0].consumer, "gcp");
    assert_eq!(
        dead[0].reason,
        "the value of the attribute \"huge\" is 2000 bytes, more than Pub/Sub's limit of 1024"
    );

    let got = emu.pull("all", 2999).await;
    assert_eq!(got.len(), 2999, "nothing is published twice");
    let mut seen = std::collections::HashSet::new();
    for m in &got {
        let id = m.a("ferry-id");
        assert!(seen.insert(id.to_owned()), "{id} twice");
        let r = &expected[id];
        assert_eq!(m.data, r.payload.as_ref(), "{id}");
        assert_eq!(m.a("ferry-device"), r.device);
        assert_eq!(m.a("ferry-topic"), r.topic);
        assert_eq!(m.a("ferry-source"), "mqtt");
        assert_eq!(m.a("ferry-received-at"), r.received_at_ms.to_string());
        let mut want = BTreeMap::from([
            ("ferry-id".to_string(), id.to_string()),
            ("ferry-device".to_string(), r.device.clone()),
            ("ferry-topic".to_string(), r.topic.clone()),
            (
                "ferry-received-at".to_string(),
                r.received_at_ms.to_string(),
            ),
            ("ferry-source".to_string(), "mqtt".to_string()),
            // Stamped by the buffer with this machine's clock state.
            ("ferry-clock".to_string(), {
                let c = m.a("ferry-clock");
                assert!(c == "synced" || c == "unsynced", "{id}: ferry-clock {c}");
                c.to_string()
            }),
        ]);
        want.extend(r.properties.iter().cloned());
        if let Some(ct) = &r.content_type {
            want.insert("content-type".into(), ct.clone());
        }
        assert_eq!(m.attributes, want, "{id}");
        assert_eq!(m.ordering_key, "");
    }
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_key_device_keeps_each_devices_order() {
    if !require_tool(
        "cloud-pubsub-emulator",
        "ordering_key_device_keeps_each_devices_order",
    ) {
        return;
    }
    let emu = Emulator::start();
    emu.create_topic("readings").await;
    emu.create_subscription("ordered", "readings", true).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["gcp"]);
    let run = start(&uplink(&emu.endpoint(), KeyRule::Device), &buffer);
    // 5 devices interleaved, 2,000 readings, appended while the uplink runs.
    let mut n = 0u32;
    for _ in 0..40 {
        let rs: Vec<Reading> = (0..50)
            .map(|_| {
                n += 1;
                reading(
                    &format!("dev-{}", n % 5),
                    "sensors/x",
                    n.to_string().as_bytes(),
                )
            })
            .collect();
        buffer.append(rs).await.unwrap();
    }
    wait_empty(&buffer, &run.status).await;
    wait_acked(&run.status, 2000).await;
    assert_eq!(run.status.snapshot().acked_total, 2000);
    run.stop().await;

    let got = emu.pull("ordered", 2000).await;
    assert_eq!(got.len(), 2000);
    let mut per_device: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for m in &got {
        assert_eq!(m.ordering_key, m.a("ferry-device"));
        let seq: u64 = std::str::from_utf8(&m.data).unwrap().parse().unwrap();
        per_device
            .entry(m.ordering_key.clone())
            .or_default()
            .push((seq, m.message_id));
    }
    assert_eq!(per_device.len(), 5);
    for (device, list) in per_device {
        assert_eq!(list.len(), 400, "{device}");
        // Delivered in order, and published in order (the emulator numbers messages as it
        // takes them).
        assert!(
            list.windows(2).all(|w| w[0].0 < w[1].0),
            "{device} delivered out of order"
        );
        assert!(
            list.windows(2).all(|w| w[0].1 < w[1].1),
            "{device} published out of order"
        );
    }
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_emulator_without_the_topic_is_reported_and_recovered_from() {
    if !require_tool(
        "cloud-pubsub-emulator",
        "a_restarted_emulator_without_the_topic_is_reported_and_recovered_from",
    ) {
        return;
    }
    let mut emu = Emulator::start();
    emu.create_topic("readings").await;
    emu.create_subscription("before", "readings", false).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["gcp"]);
    let proxy = Gate::start(emu.endpoint()).await;
    let run = start(&uplink(&proxy.server.url(), KeyRule::Device), &buffer);
    let batch = |from: u32, n: u32| -> Vec<Reading> {
        (from..from + n)
            .map(|i| reading(&format!("dev-{}", i % 3), "s/t", i.to_string().as_bytes()))
            .collect()
    };
    let first = buffer.append(batch(0, 100)).await.unwrap().first_id;
    wait_empty(&buffer, &run.status).await;
    assert_eq!(emu.pull("before", 100).await.len(), 100);

    // The emulator goes away while readings keep arriving.
    emu.stop();
    for k in 0..10 {
        buffer.append(batch(100 + k * 20, 20)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_until(
        "the uplink reports the emulator unreachable",
        Duration::from_secs(15),
        || {
            run.status
                .snapshot()
                .last_error
                .is_some_and(|e| e.contains("(502 BAD GATEWAY: proxy: "))
        },
    )
    .await;
    assert_eq!(buffer.stats().readings, 200);

    // A fresh emulator has no topic: NOT_FOUND, said clearly.
    emu.spawn();
    wait_until(
        "the uplink reports the missing topic",
        Duration::from_secs(15),
        || {
            run.status.snapshot().last_error.as_deref()
                == Some("Pub/Sub topic projects/proj/topics/readings not found (404 NOT_FOUND)")
        },
    )
    .await;
    let snap = run.status.snapshot();
    assert!(
        matches!(
            snap.state,
            ferry_uplink::LinkState::BackingOff | ferry_uplink::LinkState::Offline
        ),
        "{snap:?}"
    );
    assert_eq!(buffer.stats().readings, 200);

    // Once the topic exists, everything arrives. (The gate keeps publishes away while the
    // test creates the topic and then its subscription, so none lands in between.)
    proxy.close().await;
    emu.create_topic("readings").await;
    emu.create_subscription("after", "readings", false).await;
    proxy.open();
    wait_empty(&buffer, &run.status).await;
    wait_acked(&run.status, 300).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.acked_total, 300, "{snap:?}");
    assert!(snap.retried_total >= 2, "{snap:?}");
    assert_eq!(snap.state, ferry_uplink::LinkState::Connected, "{snap:?}");
    run.stop().await;
    let got = emu.pull("after", 200).await;
    let ids: std::collections::HashSet<&str> = got.iter().map(|m| m.a("ferry-id")).collect();
    let want: std::collections::HashSet<String> = (first + 100..first + 300)
        .map(|id| format!("gw1-{id}"))
        .collect();
    assert_eq!(ids, want.iter().map(String::as_str).collect());
    buffer.close().await;
}

/// A forwarding proxy in front of the emulator that can be closed: closed, it answers 503
/// without forwarding.
struct Gate {
    server: Scripted,
    closed: Arc<std::sync::atomic::AtomicBool>,
    forwarding: Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    async fn start(upstream: String) -> Gate {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let closed = Arc::new(AtomicBool::new(false));
        let forwarding = Arc::new(AtomicUsize::new(0));
        let http = client();
        let (c, f) = (closed.clone(), forwarding.clone());
        let server = Scripted::start_async(move |req| {
            let (c, f, http, upstream) = (c.clone(), f.clone(), http.clone(), upstream.clone());
            Box::pin(async move {
                f.fetch_add(1, Ordering::SeqCst);
                let answer = if c.load(Ordering::SeqCst) {
                    (
                        503,
                        google_error(503, "UNAVAILABLE", "the test's gate is closed"),
                    )
                } else {
                    let fwd = Request::builder()
                        .method("POST")
                        .uri(format!("{upstream}{}", req.path))
                        .header("content-type", "application/json")
                        .body(Bytes::from(req.body))
                        .unwrap();
                    match http.send(fwd).await {
                        Ok(r) => (
                            r.status.as_u16(),
                            String::from_utf8_lossy(&r.body).into_owned(),
                        ),
                        Err(e) => (502, format!("proxy: {e}")),
                    }
                };
                f.fetch_sub(1, Ordering::SeqCst);
                answer
            })
        })
        .await;
        Gate {
            server,
            closed,
            forwarding,
        }
    }

    /// Closes the gate and waits until no forwarded request is under way.
    async fn close(&self) {
        use std::sync::atomic::Ordering;
        self.closed.store(true, Ordering::SeqCst);
        wait_until(
            "the proxy forwards nothing",
            Duration::from_secs(10),
            || self.forwarding.load(Ordering::SeqCst) == 0,
        )
        .await;
    }

    fn open(&self) {
        self.closed
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
