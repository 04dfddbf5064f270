//! `ferry-load`: the load generator for ferry and its peers.
//!
//! ```text
//! ferry-load mqtt HOST:PORT [--protocol v4|v5] [--qos 0|1|2] [--clients N] [--inflight N]
//!            [--topics-per-device N]
//!            [--subscribers N [--sub-filter F] [--sub-qos Q] [--hold S] [--sub-addr HOST:PORT]]
//!            [common flags]
//! ferry-load http http://HOST:PORT [--batch N] [--clients N] [--token T] [common flags]
//! common: [--secs S] [--messages N] [--rate R] [--size BYTES] [--json] [--acked-ids FILE]
//! ```
//!
//! Every client is one device (`sensor-00042`) sending realistic JSON telemetry (device id,
//! timestamp, a few float fields, padded to `--size` bytes) that carries a unique reading id
//! `"seq":"<prefix><client>-<n>"`. Closed loop (the default) sends as fast as acks allow with at most
//! `--inflight` unacknowledged publishes per MQTT client (one request at a time per HTTP
//! client); open loop (`--rate`) offers a fixed total rate spread over the clients.
//!
//! An ack is a PUBACK (QoS 1), a PUBREC (QoS 2: the point where ferry has stored the reading),
//! a PUBLISH written to the socket (QoS 0), or a 2xx response (HTTP, for every reading of the
//! request). Latency runs from the moment the PUBLISH is written to the socket (MQTT) or the
//! request is sent (HTTP) to its ack, and is kept in an HDR histogram (µs, 3 significant
//! digits). After `--secs` (or `--messages`) nothing new is sent, and acks still outstanding
//! are awaited for up to 10 s; the rate is acked readings over the time until the last ack.
//! `--acked-ids FILE` writes the id of every acknowledged reading, one per line.
//!
//! `--subscribers N` first connects N MQTT 3.1.1 subscribers to `--sub-filter` (on
//! `--sub-addr` when set: commands published to a cloud broker and received on the box; each waits
//! for its SUBACK before any publisher starts), then counts what they receive: `delivered`,
//! the delivered rate (messages over the time from the first publish to the last delivery),
//! and publish-to-delivery latency (the payload's `ts` field is then µs since the epoch, set
//! just before the PUBLISH is handed to the client). They stay connected at least `--hold`
//! seconds after the publishers finish and until nothing arrived for a second; with
//! `--clients 0` they only hold (idle connections, for memory figures).

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_bench::telemetry_with_id;
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// How long outstanding acks are awaited after the last send.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "ferry-load",
    about = "Load generator for ferry (MQTT and HTTP ingest)"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// MQTT publishers (rumqttc).
    Mqtt(MqttArgs),
    /// HTTP ingest clients (reqwest): `POST /v1/readings/{topic}` or JSON-array batches.
    Http(HttpArgs),
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Stop after this many readings in total (whichever of this and --secs comes first).
    #[arg(long)]
    messages: Option<u64>,
    /// Open loop: offer this many readings per second in total. Not set: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Payload size in bytes (JSON padded up to it).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Print one JSON summary line instead of the text summary.
    #[arg(long)]
    json: bool,
    /// Write the id of every acknowledged reading to this file, one per line.
    #[arg(long)]
    acked_ids: Option<PathBuf>,
    /// Put this before every reading id (`<prefix><client>-<n>`), to tell runs apart.
    #[arg(long, default_value = "")]
    id_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5.
    V5,
}

#[derive(Debug, Clone, Args)]
struct MqttArgs {
    /// Broker address, HOST:PORT.
    addr: String,
    #[arg(long, value_enum, default_value_t = Protocol::V4)]
    protocol: Protocol,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Connections (one device each).
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Unacknowledged QoS 1/2 publishes per client at most.
    #[arg(long, default_value_t = 64)]
    inflight: u16,
    /// Topics per device (`sensors/<device>/t<k>`, used in turn).
    #[arg(long, default_value_t = 1)]
    topics_per_device: usize,
    /// MQTT username (and --password).
    #[arg(long)]
    username: Option<String>,
    #[arg(long, default_value = "")]
    password: String,
    /// Subscribers connected before the publishers start.
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// The subscribers' topic filter.
    #[arg(long, default_value = "sensors/#")]
    sub_filter: String,
    /// The subscribers' QoS.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    sub_qos: u8,
    /// The subscribers' broker, HOST:PORT, when it is not the publishers' (commands published
    /// to a cloud broker, received on the box). Not set: the broker address.
    #[arg(long)]
    sub_addr: Option<String>,
    /// Seconds the subscribers stay after the publishers finish, at least.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Clone, Args)]
struct HttpArgs {
    /// Base URL, e.g. http://127.0.0.1:8080.
    url: String,
    /// Readings per request: 1 posts to `/v1/readings/{topic}`, more posts a JSON array to
    /// `/v1/readings`.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Concurrent clients (one request in flight each, one device each).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Bearer token for `[[http.tokens]]`.
    #[arg(long)]
    token: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// What one client saw.
#[derive(Debug)]
struct Tally {
    hist: Histogram<u64>,
    /// Publish-to-delivery latency at the subscribers (µs).
    dhist: Histogram<u64>,
    delivered: u64,
    last_delivery: Option<Instant>,
    acked: u64,
    payload_bytes: u64,
    requests: u64,
    errors: BTreeMap<String, u64>,
    ids: Vec<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            hist: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
            dhist: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
            delivered: 0,
            last_delivery: None,
            acked: 0,
            payload_bytes: 0,
            requests: 0,
            errors: BTreeMap::new(),
            ids: Vec::new(),
        }
    }
    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }
    fn latency(&mut self, since: Instant) {
        let us = since.elapsed().as_micros().clamp(1, 600_000_000) as u64;
        let _ = self.hist.record(us);
    }
    fn merge(&mut self, o: Tally) {
        let _ = self.hist.add(&o.hist);
        let _ = self.dhist.add(&o.dhist);
        self.delivered += o.delivered;
        self.last_delivery = self.last_delivery.max(o.last_delivery);
        self.acked += o.acked;
        self.payload_bytes += o.payload_bytes;
        self.requests += o.requests;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.ids.extend(o.ids);
    }
}

/// State shared by every client of a run.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    claimed: AtomicU64,
    limit: Option<u64>,
    /// The run's length, from [`Shared::begin`].
    secs: f64,
    base: Instant,
    /// Nanoseconds after `base` when sending stops; set by [`Shared::begin`].
    deadline_ns: AtomicU64,
    keep_ids: bool,
    /// When the publishers started, and when the last one finished (ns after `base`).
    began_ns: AtomicU64,
    pubs_done_ns: AtomicU64,
}

impl Shared {
    fn new(limit: Option<u64>, secs: f64, keep_ids: bool) -> Shared {
        let s = Shared {
            stop: AtomicBool::new(false),
            claimed: AtomicU64::new(0),
            limit,
            secs,
            base: Instant::now(),
            deadline_ns: AtomicU64::new(0),
            keep_ids,
            began_ns: AtomicU64::new(0),
            pubs_done_ns: AtomicU64::new(u64::MAX),
        };
        s.begin();
        s
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The publishers start now: `--secs` counts from here.
    fn begin(&self) {
        let now = self.now_ns();
        self.began_ns.store(now, Ordering::Relaxed);
        self.deadline_ns
            .store(now + (self.secs * 1e9) as u64, Ordering::Relaxed);
    }

    /// Takes `n` readings from the budget; false when the run is over.
    fn claim(&self, n: u64) -> bool {
        if self.stop.load(Ordering::Relaxed)
            || self.now_ns() >= self.deadline_ns.load(Ordering::Relaxed)
        {
            return false;
        }
        let before = self.claimed.fetch_add(n, Ordering::Relaxed);
        match self.limit {
            Some(l) if before + n > l => {
                self.claimed.fetch_sub(n, Ordering::Relaxed);
                false
            }
            _ => true,
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (common, label, extra) = match &cli.mode {
        Mode::Mqtt(a) => (
            a.common.clone(),
            format!("mqtt {:?} qos{} {} clients", a.protocol, a.qos, a.clients),
            serde_json::json!({"mode": "mqtt", "protocol": format!("{:?}", a.protocol).to_lowercase(),
                "qos": a.qos, "clients": a.clients, "inflight": a.inflight}),
        ),
        Mode::Http(a) => (
            a.common.clone(),
            format!("http batch {} {} clients", a.batch, a.clients),
            serde_json::json!({"mode": "http", "batch": a.batch, "clients": a.clients}),
        ),
    };
    let shared = Arc::new(Shared::new(
        common.messages,
        common.secs,
        common.acked_ids.is_some(),
    ));
    let start = Instant::now();
    let tally = rt.block_on(async {
        match cli.mode {
            Mode::Mqtt(a) => run_mqtt(a, shared.clone()).await,
            Mode::Http(a) => run_http(a, shared.clone()).await,
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(path) = &common.acked_ids {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("--acked-ids file"));
        for id in &tally.ids {
            writeln!(f, "{id}").expect("write --acked-ids");
        }
        f.flush().expect("write --acked-ids");
    }
    let rate = tally.acked as f64 / elapsed;
    // Deliveries over the time from the first publish to the last delivery.
    let delivered_rate = tally.last_delivery.map(|last| {
        let began = shared.base + Duration::from_nanos(shared.began_ns.load(Ordering::Relaxed));
        tally.delivered as f64
            / last
                .saturating_duration_since(began)
                .as_secs_f64()
                .max(1e-3)
    });
    let dms = |q: f64| {
        (!tally.dhist.is_empty()).then(|| tally.dhist.value_at_quantile(q) as f64 / 1000.0)
    };
    let errors_total: u64 = tally.errors.values().sum();
    let has_lat = !tally.hist.is_empty();
    let ms = |q: f64| has_lat.then(|| tally.hist.value_at_quantile(q) as f64 / 1000.0);
    if common.json {
        let mut v = serde_json::json!({
            "size": common.size, "offered_rate": common.rate, "elapsed_s": elapsed,
            "sent": shared.claimed.load(Ordering::Relaxed), "acked": tally.acked,
            "requests": tally.requests, "payload_bytes": tally.payload_bytes, "rate": rate,
            "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
            "max_ms": has_lat.then(|| tally.hist.max() as f64 / 1000.0),
            "errors_total": errors_total, "errors": tally.errors,
            "delivered": tally.delivered, "delivered_rate": delivered_rate,
            "deliver_p50_ms": dms(0.5), "deliver_p99_ms": dms(0.99),
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        println!("{v}");
    } else {
        let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.2} ms"));
        println!(
            "{label} {}B: {} acked in {elapsed:.1} s = {rate:.0} readings/s; ack p50 {} p99 {} p99.9 {}; errors {errors_total} {:?}",
            common.size,
            tally.acked,
            f(ms(0.5)),
            f(ms(0.99)),
            f(ms(0.999)),
            tally.errors
        );
        if tally.delivered > 0 {
            println!(
                "subscribers: {} delivered = {:.0}/s; publish to delivery p50 {} p99 {}",
                tally.delivered,
                delivered_rate.unwrap_or(0.0),
                f(dms(0.5)),
                f(dms(0.99))
            );
        }
    }
    std::process::ExitCode::SUCCESS
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A pacing interval for one client of an open-loop run (`None`: closed loop).
fn pacer(rate: Option<f64>, clients: usize) -> Option<tokio::time::Interval> {
    rate.map(|r| {
        let per = (r / clients as f64).max(1e-3);
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / per));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    })
}

async fn run_mqtt(a: MqttArgs, shared: Arc<Shared>) -> Tally {
    let (host, port) = a.addr.rsplit_once(':').expect("HOST:PORT");
    let port: u16 = port.parse().expect("port");
    let mut subscribers = Vec::new();
    if a.subscribers > 0 {
        let (sub_host, sub_port) = match &a.sub_addr {
            Some(s) => {
                let (h, p) = s.rsplit_once(':').expect("--sub-addr HOST:PORT");
                (h.to_string(), p.parse().expect("--sub-addr port"))
            }
            None => (host.to_string(), port),
        };
        let ready = Arc::new(tokio::sync::Semaphore::new(0));
        for k in 0..a.subscribers {
            let (a, shared, ready, host) =
                (a.clone(), shared.clone(), ready.clone(), sub_host.clone());
            subscribers.push(tokio::spawn(async move {
                subscriber(k, &host, sub_port, &a, &shared, &ready).await
            }));
        }
        let all = ready.acquire_many(a.subscribers as u32);
        if tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .is_err()
        {
            eprintln!("ferry-load: not every subscriber got its SUBACK within 60 s");
        }
        shared.begin();
    }
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let a = a.clone();
        let shared = shared.clone();
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            match a.protocol {
                Protocol::V4 => mqtt_client_v4(c, &host, port, &a, shared).await,
                Protocol::V5 => mqtt_client_v5(c, &host, port, &a, shared).await,
            }
        }));
    }
    let mut total = Tally::new();
    for t in tasks {
        match t.await {
            Ok(t) => total.merge(t),
            Err(_) => total.error("client_panicked"),
        }
    }
    shared
        .pubs_done_ns
        .store(shared.now_ns(), Ordering::Relaxed);
    for t in subscribers {
        match t.await {
            Ok(t) => total.merge(t),
            Err(_) => total.error("subscriber_panicked"),
        }
    }
    total
}

/// One subscriber (see the crate doc): connects, subscribes, adds a permit to `ready`, then
/// counts deliveries until the publishers are done, `--hold` passed and a second was quiet.
async fn subscriber(
    k: usize,
    host: &str,
    port: u16,
    a: &MqttArgs,
    shared: &Shared,
    ready: &tokio::sync::Semaphore,
) -> Tally {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut t = Tally::new();
    let mut opts = MqttOptions::new(
        format!("ferry-load-sub-{}-{k}", std::process::id()),
        host,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(u) = &a.username {
        opts.set_credentials(u, &a.password);
    }
    let (client, mut el) = AsyncClient::new(opts, 16);
    let qos = match a.sub_qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    if client.subscribe(&a.sub_filter, qos).await.is_err() {
        t.error("subscribe");
        ready.add_permits(1);
        return t;
    }
    let mut subscribed = false;
    let mut last_rx = Instant::now();
    loop {
        let done_ns = shared.pubs_done_ns.load(Ordering::Relaxed);
        if subscribed && done_ns != u64::MAX {
            let since_done = shared.now_ns().saturating_sub(done_ns) as f64 / 1e9;
            if since_done >= a.hold && last_rx.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
        match tokio::time::timeout(Duration::from_millis(200), el.poll()).await {
            Err(_) => {}
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subscribed = true;
                ready.add_permits(1);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let now = Instant::now();
                last_rx = now;
                t.delivered += 1;
                t.last_delivery = Some(now);
                if let Some(sent) = payload_ts(&p.payload) {
                    let us = now_us().saturating_sub(sent).clamp(1, 600_000_000);
                    let _ = t.dhist.record(us);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                t.error(format!("subscriber_{}", conn_error_kind(&e)));
                if !subscribed {
                    ready.add_permits(1);
                }
                break;
            }
        }
    }
    let _ = client.disconnect().await;
    t
}

/// The `ts` field of a telemetry payload.
fn payload_ts(payload: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(payload).ok()?;
    let rest = &s[s.find("\"ts\":")? + 5..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What the publisher of one client tells its event loop: the id of the reading whose
/// PUBLISH comes next, so a packet id maps back to the reading.
type IdTx = mpsc::UnboundedSender<(String, usize)>;

/// The publishing half of one MQTT client, shared by v4 and v5: sends until the run is over,
/// waits for its outstanding acks (up to [`DRAIN_WAIT`]), then returns.
async fn publish_loop<F, Fut>(
    c: usize,
    a: &MqttArgs,
    shared: &Shared,
    outstanding: &AtomicU64,
    ids: IdTx,
    mut publish: F,
) where
    F: FnMut(String, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let device = format!("sensor-{c:05}");
    let topics: Vec<String> = (0..a.topics_per_device.max(1))
        .map(|k| format!("sensors/{device}/t{k}"))
        .collect();
    let mut tick = pacer(a.common.rate, a.clients);
    let mut n = 0u64;
    while shared.claim(1) {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        n += 1;
        let id = format!("{}{c}-{n}", a.common.id_prefix);
        // With subscribers, `ts` is µs, for the publish-to-delivery latency.
        let ts = if a.subscribers > 0 {
            now_us()
        } else {
            now_ms()
        };
        let payload = telemetry_with_id(&device, &id, n, ts, a.common.size);
        let len = payload.len();
        outstanding.fetch_add(1, Ordering::Relaxed);
        if ids.send((id, len)).is_err() {
            break;
        }
        let topic = topics[(n as usize) % topics.len()].clone();
        if !publish(topic, payload.into_bytes()).await {
            break;
        }
    }
    let until = Instant::now() + DRAIN_WAIT;
    while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Book-keeping of one client's event loop: packet id to (reading id, payload bytes, sent at).
#[derive(Debug)]
struct Pending {
    ids: mpsc::UnboundedReceiver<(String, usize)>,
    by_pkid: HashMap<u16, (String, usize, Instant)>,
    tally: Tally,
    keep_ids: bool,
}

impl Pending {
    /// A PUBLISH was written: QoS 0 counts as acked now; QoS 1/2 wait for their ack. A packet
    /// id already pending is a retransmission after a reconnect and takes no new reading.
    fn written(&mut self, pkid: u16, qos: u8, outstanding: &AtomicU64) {
        if qos > 0 && self.by_pkid.contains_key(&pkid) {
            return;
        }
        let Ok((id, len)) = self.ids.try_recv() else {
            return;
        };
        if qos == 0 {
            self.ack_entry(id, len, None);
            outstanding.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.by_pkid.insert(pkid, (id, len, Instant::now()));
        }
    }

    fn acked(&mut self, pkid: u16, ok: Result<(), String>, outstanding: &AtomicU64) {
        if let Some((id, len, at)) = self.by_pkid.remove(&pkid) {
            outstanding.fetch_sub(1, Ordering::Relaxed);
            match ok {
                Ok(()) => self.ack_entry(id, len, Some(at)),
                Err(kind) => self.tally.error(kind),
            }
        }
    }

    fn ack_entry(&mut self, id: String, len: usize, at: Option<Instant>) {
        self.tally.acked += 1;
        self.tally.requests += 1;
        self.tally.payload_bytes += len as u64;
        if let Some(at) = at {
            self.tally.latency(at);
        }
        if self.keep_ids {
            self.tally.ids.push(id);
        }
    }

    /// Readings never acked (connection lost for good, or no ack within the wait).
    fn finish(mut self) -> Tally {
        let lost = self.by_pkid.len() as u64;
        if lost > 0 {
            *self.tally.errors.entry("no_ack".into()).or_default() += lost;
        }
        self.tally
    }
}

fn conn_error_kind(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => format!("connack_{code:?}"),
        E::Io(_) => "io".into(),
        E::NetworkTimeout | E::FlushTimeout => "timeout".into(),
        E::MqttState(_) => "protocol".into(),
        _ => "connection".into(),
    }
}

fn conn_error_kind_v5(e: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => format!("connack_{code:?}"),
        E::Io(_) => "io".into(),
        E::Timeout(_) => "timeout".into(),
        E::MqttState(_) => "protocol".into(),
        _ => "connection".into(),
    }
}

fn client_id(c: usize) -> String {
    format!("ferry-load-{}-{c}", std::process::id())
}

async fn mqtt_client_v4(
    c: usize,
    host: &str,
    port: u16,
    a: &MqttArgs,
    shared: Arc<Shared>,
) -> Tally {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new(client_id(c), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(a.inflight.max(1));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(u) = &a.username {
        opts.set_credentials(u, &a.password);
    }
    let (client, mut el) = AsyncClient::new(opts, a.inflight as usize * 2);
    let qos = match a.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let outstanding = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (a, shared, outstanding, done) =
            (a.clone(), shared.clone(), outstanding.clone(), done.clone());
        tokio::spawn(async move {
            publish_loop(c, &a, &shared, &outstanding, tx, |topic, payload| {
                let client = client.clone();
                async move { client.publish(topic, qos, false, payload).await.is_ok() }
            })
            .await;
            done.store(true, Ordering::Relaxed);
            let _ = client.disconnect().await;
        })
    };
    let mut p = Pending {
        ids: rx,
        by_pkid: HashMap::new(),
        tally: Tally::new(),
        keep_ids: shared.keep_ids,
    };
    let mut failures = 0u32;
    loop {
        match el.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => p.written(pkid, a.qos, &outstanding),
            Ok(Event::Incoming(Packet::PubAck(ack))) => p.acked(ack.pkid, Ok(()), &outstanding),
            Ok(Event::Incoming(Packet::PubRec(rec))) => p.acked(rec.pkid, Ok(()), &outstanding),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => failures = 0,
            Err(e) => {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                p.tally.error(conn_error_kind(&e));
                failures += 1;
                if failures > 50 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    publisher.abort();
    p.finish()
}

async fn mqtt_client_v5(
    c: usize,
    host: &str,
    port: u16,
    a: &MqttArgs,
    shared: Arc<Shared>,
) -> Tally {
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(client_id(c), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_outgoing_inflight_upper_limit(a.inflight.max(1));
    opts.set_max_packet_size(Some(1 << 20));
    if let Some(u) = &a.username {
        opts.set_credentials(u, &a.password);
    }
    let (client, mut el) = AsyncClient::new(opts, a.inflight as usize * 2);
    let qos = match a.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let outstanding = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (a, shared, outstanding, done) =
            (a.clone(), shared.clone(), outstanding.clone(), done.clone());
        tokio::spawn(async move {
            publish_loop(c, &a, &shared, &outstanding, tx, |topic, payload| {
                let client = client.clone();
                async move { client.publish(topic, qos, false, payload).await.is_ok() }
            })
            .await;
            done.store(true, Ordering::Relaxed);
            let _ = client.disconnect().await;
        })
    };
    let mut p = Pending {
        ids: rx,
        by_pkid: HashMap::new(),
        tally: Tally::new(),
        keep_ids: shared.keep_ids,
    };
    let mut failures = 0u32;
    loop {
        match el.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => p.written(pkid, a.qos, &outstanding),
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let ok = match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                    r => Err(format!("puback_{r:?}")),
                };
                p.acked(ack.pkid, ok, &outstanding)
            }
            Ok(Event::Incoming(Packet::PubRec(rec))) => {
                let ok = match rec.reason {
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers => Ok(()),
                    r => Err(format!("pubrec_{r:?}")),
                };
                p.acked(rec.pkid, ok, &outstanding)
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => failures = 0,
            Err(e) => {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                p.tally.error(conn_error_kind_v5(&e));
                failures += 1;
                if failures > 50 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    publisher.abort();
    p.finish()
}

async fn run_http(a: HttpArgs, shared: Arc<Shared>) -> Tally {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.clients)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let base = a.url.trim_end_matches('/').to_string();
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let (a, shared, client, base) = (a.clone(), shared.clone(), client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            http_client(c, &a, &shared, &client, &base).await
        }));
    }
    let mut total = Tally::new();
    for t in tasks {
        match t.await {
            Ok(t) => total.merge(t),
            Err(_) => total.error("client_panicked"),
        }
    }
    total
}

async fn http_client(
    c: usize,
    a: &HttpArgs,
    shared: &Shared,
    client: &reqwest::Client,
    base: &str,
) -> Tally {
    let mut tally = Tally::new();
    let device = format!("sensor-{c:05}");
    let batch = a.batch.max(1);
    let mut tick = pacer(a.common.rate.map(|r| r / batch as f64), a.clients);
    let mut n = 0u64;
    while shared.claim(batch as u64) {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let mut ids = Vec::with_capacity(batch);
        let mut bytes = 0u64;
        let mut items = Vec::with_capacity(batch);
        for _ in 0..batch {
            n += 1;
            let id = format!("{}{c}-{n}", a.common.id_prefix);
            let payload = telemetry_with_id(&device, &id, n, now_ms(), a.common.size);
            bytes += payload.len() as u64;
            items.push(payload);
            ids.push(id);
        }
        let req = if batch == 1 {
            client
                .post(format!("{base}/v1/readings/sensors/{device}/env"))
                .header("content-type", "application/json")
                .header("x-ferry-device", &device)
                .body(items.pop().unwrap_or_default())
        } else {
            // A JSON array of {topic, payload, device}; the payloads are JSON texts already.
            let mut body = String::with_capacity(items.iter().map(|i| i.len() + 64).sum());
            body.push('[');
            for (i, p) in items.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!(
                    "{{\"topic\":\"sensors/{device}/env\",\"device\":\"{device}\",\"payload\":{p}}}"
                ));
            }
            body.push(']');
            client
                .post(format!("{base}/v1/readings"))
                .header("content-type", "application/json")
                .body(body)
        };
        let req = match &a.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let sent = Instant::now();
        match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                let _ = resp.bytes().await;
                tally.latency(sent);
                tally.requests += 1;
                tally.acked += batch as u64;
                tally.payload_bytes += bytes;
                if shared.keep_ids {
                    tally.ids.extend(ids);
                }
            }
            Ok(resp) => {
                tally.error(format!("http_{}", resp.status().as_u16()));
                let _ = resp.bytes().await;
            }
            Err(e) if e.is_timeout() => tally.error("timeout"),
            Err(e) if e.is_connect() => {
                tally.error("connect");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => tally.error("transport"),
        }
    }
    tally
}
