//! Shared load and delivery-check helpers for the reliability suites (`buffer_disk_full`,
//! `uplink_outage`, `gateway_crash_loop`) and the uplinks' end-to-end tests.
//!
//! Every reading these clients send carries a unique key in its payload (`{"k": "..."}`), and
//! each client records the key of every reading the gateway *acknowledged*: a PUBACK (QoS 1),
//! a PUBREC (QoS 2) or an HTTP 202. A Kafka consumer on the mock cluster then reads what
//! arrived, so a suite can compare "acknowledged" with "delivered" exactly.

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one load client saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Keys of acknowledged readings.
    pub acked: Mutex<HashSet<String>>,
    /// Keys of readings refused with a clear error (HTTP 503 / a v5 reason code).
    pub refused: Mutex<HashSet<String>>,
    /// Refusals by kind (`http.503.buffer-full`, `http.503.buffer-storage`, …).
    pub refusal_kinds: Mutex<BTreeMap<String, u64>>,
    /// Requests or publishes that ended without an answer (connection cut, …).
    pub unanswered: AtomicU64,
}

impl Tally {
    pub fn acked(&self) -> HashSet<String> {
        self.acked.lock().unwrap().clone()
    }
    pub fn refused(&self) -> HashSet<String> {
        self.refused.lock().unwrap().clone()
    }
    pub fn acked_len(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
    fn refuse(&self, kind: String, keys: impl IntoIterator<Item = String>) {
        self.refused.lock().unwrap().extend(keys);
        *self.refusal_kinds.lock().unwrap().entry(kind).or_default() += 1;
    }
}

/// A payload body of about `pad` bytes that gzip cannot squeeze much (hex of a counter hash),
/// so a small buffer cap fills quickly.
pub fn noise(seed: u64, pad: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut s = String::with_capacity(pad);
    while s.len() < pad {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.truncate(pad);
    s
}

/// A rumqttc v3.1.1 publisher at `qos` (1 or 2) sending unique keys `<prefix>-<n>` until
/// `stop` is set or the connection ends. A key counts as acknowledged on its PUBACK (QoS 1)
/// or PUBREC (QoS 2): that is the gateway's durability promise.
pub async fn mqtt_publisher(
    addr: SocketAddr,
    prefix: String,
    qos: QoS,
    pad: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut opts = MqttOptions::new(prefix.clone(), addr.ip().to_string(), addr.port());
    opts.set_inflight(16);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 32);
    let queued: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let q2 = queued.clone();
    let stop2 = stop.clone();
    let sender = tokio::spawn(async move {
        for n in 0u64.. {
            if stop2.load(Ordering::SeqCst) {
                return;
            }
            let key = format!("{prefix}-{n}");
            let body = json!({"k": key, "v": n, "pad": noise(n, pad)}).to_string();
            q2.lock().unwrap().push_back(key);
            if client
                .publish(format!("rel/{prefix}"), qos, false, body)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut by_pkid: HashMap<u16, String> = HashMap::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let ev = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
        match ev {
            Err(_) => continue,
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                let Some(k) = queued.lock().unwrap().pop_front() else {
                    break;
                };
                by_pkid.insert(pkid, k);
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) if qos == QoS::AtLeastOnce => {
                if let Some(k) = by_pkid.remove(&a.pkid) {
                    tally.acked.lock().unwrap().insert(k);
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubRec(a)))) if qos == QoS::ExactlyOnce => {
                if let Some(k) = by_pkid.remove(&a.pkid) {
                    tally.acked.lock().unwrap().insert(k);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
        }
    }
    tally
        .unanswered
        .fetch_add(by_pkid.len() as u64, Ordering::Relaxed);
    sender.abort();
}

/// An HTTP client posting batches of `batch` unique readings to `/v1/readings` until `stop`
/// is set. A 202 acknowledges the whole batch; a 503 refuses it (recorded with its problem
/// type); a cut connection is neither. `pause` is slept between requests.
pub async fn http_batcher(
    base: String,
    prefix: String,
    batch: usize,
    pad: usize,
    pause: Duration,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let keys: Vec<String> = (0..batch).map(|i| format!("{prefix}-{n}-{i}")).collect();
        let items: Vec<Value> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                json!({"topic": format!("rel/{prefix}"), "device": prefix,
                       "payload": {"k": k, "pad": noise(n * 1000 + i as u64, pad)}})
            })
            .collect();
        n += 1;
        match http
            .post(format!("{base}/v1/readings"))
            .json(&items)
            .send()
            .await
        {
            Ok(resp) if resp.status().as_u16() == 202 => {
                tally.acked.lock().unwrap().extend(keys);
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let kind = body["type"]
                    .as_str()
                    .unwrap_or("?")
                    .trim_start_matches("urn:ferry:problem:")
                    .to_string();
                tally.refuse(format!("http.{status}.{kind}"), keys);
            }
            Err(_) => {
                tally.unanswered.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Reads the topic from the start and counts arrivals per key, until every key in
/// `expected` has arrived and `settle` passed without a new message, or `timeout`.
pub fn kafka_arrivals(
    bootstrap: &str,
    topic: &str,
    group: &str,
    expected: &HashSet<String>,
    settle: Duration,
    timeout: Duration,
) -> HashMap<String, usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let start = Instant::now();
    let mut last_new = Instant::now();
    let mut missing: HashSet<&String> = expected.iter().collect();
    while start.elapsed() < timeout {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let v: Value =
                    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
                if let Some(k) = v["k"].as_str() {
                    missing.remove(&k.to_string());
                    *seen.entry(k.to_string()).or_default() += 1;
                }
                last_new = Instant::now();
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {
                if missing.is_empty() && last_new.elapsed() >= settle {
                    break;
                }
            }
        }
    }
    seen
}

/// `GET /api/status` as JSON (no status token).
pub async fn status(base: &str) -> Value {
    status_as(base, None).await
}

/// A small xorshift generator, seeded from the clock unless `FERRY_SEED` is set; the seed is
/// printed so a failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("FERRY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{test}: FERRY_SEED={seed}");
        Rng(seed | 1)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A multi-threaded runtime for driving the clients from a plain `#[test]`.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// HTTP clients posting batches of 20 unique readings (`{"k": "c<C>-n<N>-i<I>"}`, device
/// `dev-<C>`) in a loop, recording the key of every reading answered 202.
pub struct HttpClients {
    /// The keys of every reading answered 202 so far: what ferry promised to deliver.
    pub acked: Arc<Mutex<std::collections::BTreeSet<String>>>,
    running: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts `clients` [`HttpClients`] against `base`, each pausing `pause` between requests.
pub fn http_clients(base: &str, clients: u64, pause: Duration) -> HttpClients {
    let acked: Arc<Mutex<std::collections::BTreeSet<String>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (acked, running, base) = (acked.clone(), running.clone(), base.to_string());
        tasks.push(tokio::spawn(async move {
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
                tokio::time::sleep(pause).await;
            }
        }));
    }
    HttpClients {
        acked,
        running,
        tasks,
    }
}

impl HttpClients {
    /// Stops the clients and returns what was acknowledged; asserts it is more than 200
    /// readings (a load that barely ran proves nothing).
    pub async fn stop(self) -> std::collections::BTreeSet<String> {
        self.running.store(false, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        assert!(
            acked.len() > 200,
            "only {} readings were acknowledged before the kill",
            acked.len()
        );
        acked
    }
}

/// Runs `clients` [`HttpClients`] against `ferry` for `load`, SIGKILLs ferry while they still
/// post, and returns the keys of every reading answered 202.
pub async fn http_load_then_kill(
    ferry: &mut ferry_tests::Ferry,
    clients: u64,
    load: Duration,
) -> std::collections::BTreeSet<String> {
    let load_clients = http_clients(&ferry.http_url(), clients, Duration::ZERO);
    tokio::time::sleep(load).await;
    ferry.kill();
    load_clients.stop().await
}

/// Asserts that every acknowledged key arrived upstream (`seen`: key → the ferry ids it came
/// with, and its deliveries), each under one stable ferry id starting with `id_prefix`.
/// Returns the duplicate deliveries (re-sends after the kill: at least once, as promised).
pub fn assert_every_acked_arrived(
    acked: &std::collections::BTreeSet<String>,
    seen: &std::collections::BTreeMap<String, (std::collections::BTreeSet<String>, usize)>,
    upstream: &str,
    id_prefix: &str,
    ferry: &ferry_tests::Ferry,
) -> usize {
    let missing: Vec<&String> = acked.iter().filter(|k| !seen.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged readings never reached {upstream}, e.g. {:?}\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)],
        ferry.log()
    );
    for (k, (ids, _)) in seen {
        assert_eq!(
            ids.len(),
            1,
            "reading {k} arrived under several ferry ids: {ids:?}"
        );
        assert!(ids.iter().all(|i| i.starts_with(id_prefix)), "{ids:?}");
    }
    seen.values().map(|(_, n)| n - 1).sum()
}

/// An HTTP client that gives up on a request after 30 s.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// GETs `url`, with `token` as a bearer token if given: the status code and the body.
pub async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = http().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// `/api/status` of the gateway at `base` (with the status `token`, if one is set), which must
/// answer 200.
pub async fn status_as(base: &str, token: Option<&str>) -> Value {
    let (code, body) = get(&format!("{base}/api/status"), token).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `/api/status` until `f` holds, or panics after `timeout` with the last report.
pub async fn wait_status(
    base: &str,
    token: Option<&str>,
    what: &str,
    timeout: Duration,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let v = status_as(base, token).await;
        if f(&v) {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting until {what}; last report:\n{v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A 3.1.1 packet as bytes, for tests that write to a raw socket.
pub fn encode4(p: rumqttc::mqttbytes::v4::Packet) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    p.write(&mut out, 1 << 28).unwrap();
    out.to_vec()
}

/// Runs the mosquitto client `tool` (`mosquitto_pub`, `mosquitto_sub`) against the broker
/// on 127.0.0.1:`port`; a `mosquitto_pub` that fails fails the test.
pub fn mosquitto(tool: &str, port: u16, args: &[&str]) -> std::process::Output {
    let out = Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success() || tool == "mosquitto_sub",
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What `mosquitto_sub` prints for `filter` within `secs` (at most `count` messages).
pub fn sub_lines(
    port: u16,
    v: &str,
    filter: &str,
    count: usize,
    secs: u32,
    format: &str,
) -> Vec<String> {
    let out = mosquitto(
        "mosquitto_sub",
        port,
        &[
            "-V",
            v,
            "-t",
            filter,
            "-C",
            &count.to_string(),
            "-W",
            &secs.to_string(),
            "-F",
            format,
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
