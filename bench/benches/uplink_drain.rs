//! The uplinks' drain benchmarks: a backlog in a real buffer drained upstream by one uplink,
//! against a peer client sending the same records in the same run. Not run by `cargo test`.
//!
//! ```text
//! cargo bench -p ferry-bench --bench uplink_drain -- kafka-drain        # vs kcat -P
//! cargo bench -p ferry-bench --bench uplink_drain -- kafka-wire-bytes   # bytes per reading
//! cargo bench -p ferry-bench --bench uplink_drain -- kinesis-drain      # vs boto3
//! ```

use base64::Engine as _;
use ferry_buffer::{Buffer, Compression, Reading};
use ferry_config::{Delivery, KafkaUplink};
use ferry_tests::kinesis::{BOTO3_PUT, Server, Stream, counting_forwarder, require};
use ferry_tests::uplink::{Running, open_buffer, open_buffer_compressed, reading, wait_empty};
use ferry_uplink::Common;
use ferry_uplink::kafka::KafkaSink;
use ferry_uplink::kinesis::KinesisSink;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

type Mock = MockCluster<'static, DefaultProducerContext>;

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let wants = |name: &str| which.is_empty() || which.iter().any(|w| w == name);
    rt.block_on(async {
        if wants("kafka-drain") {
            drain_bench().await;
        }
        if wants("kafka-wire-bytes") {
            wire_bytes_bench().await;
        }
        if wants("kinesis-drain") {
            kinesis_drain().await;
        }
    });
}

/// A Kafka uplink on `bootstrap` with short backoffs (the benchmarks' figures in
/// BENCHMARKS.md were measured with these).
fn kafka_uplink(bootstrap: &str) -> KafkaUplink {
    KafkaUplink {
        brokers: bootstrap.to_string(),
        topic: "readings".into(),
        initial_backoff_ms: 50,
        max_backoff_ms: 400,
        ..KafkaUplink::default()
    }
}

fn start_kafka(cfg: &KafkaUplink, buffer: &Buffer) -> Running {
    let common = Common::new("kafka", "gw1", buffer.clone()).grace(Duration::from_secs(2));
    Running::start(Box::new(KafkaSink::new(cfg, common).unwrap()))
}

/// Drain rate of a backlog into the mock cluster, against `kcat -P` producing the same number
/// of records of the same size. Run with
/// `cargo bench -p ferry-bench --bench uplink_drain -- kafka-drain`
/// (`FERRY_BENCH_READINGS`, default 200000; `FERRY_BENCH_CHUNK`, readings per segment;
/// `FERRY_BENCH_LIBRDKAFKA="k=v,…"` adds librdkafka
/// properties to ferry's producer, never to kcat's).
async fn drain_bench() {
    let n: usize = std::env::var("FERRY_BENCH_READINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mock = Mock::new(1).unwrap();
    mock.create_topic("readings", 4, 1).unwrap();
    mock.create_topic("kcat", 4, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer_compressed(dir.path(), &["kafka"], Compression::Gzip { level: 1 });
    let payload = vec![b'7'; 100];
    // Readings per append (one commit each, so one segment each): `FERRY_BENCH_CHUNK`,
    // default 10,000. A slow site's backlog is made of small segments.
    let per: usize = std::env::var("FERRY_BENCH_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    for chunk in 0..n.div_ceil(per) {
        let rs = (0..per.min(n - chunk * per))
            .map(|i| {
                reading(
                    &format!("dev-{}", i % 100),
                    "sensors/x/temp",
                    payload.clone(),
                )
            })
            .collect();
        buffer.append(rs).await.unwrap();
    }
    let mut cfg = kafka_uplink(&mock.bootstrap_servers());
    cfg.message_timeout_ms = 30_000;
    // The defaults of a real config, not the small test windows.
    let d = ferry_config::KafkaUplink::default();
    cfg.max_inflight_segments = d.max_inflight_segments;
    // Extra librdkafka properties for experiments: `FERRY_BENCH_LIBRDKAFKA="k=v,k=v"`.
    for kv in std::env::var("FERRY_BENCH_LIBRDKAFKA")
        .unwrap_or_default()
        .split(',')
        .filter(|kv| !kv.is_empty())
    {
        let (k, v) = kv.split_once('=').expect("k=v");
        cfg.librdkafka.insert(k.into(), v.into());
    }
    let t = Instant::now();
    let run = start_kafka(&cfg, &buffer);
    wait_empty(&buffer, &run.status, Duration::from_secs(600)).await;
    let took = t.elapsed();
    run.stop().await;
    eprintln!(
        "ferry drained {n} readings in {took:?}: {:.0} readings/s",
        n as f64 / took.as_secs_f64()
    );
    buffer.close().await;

    if let Ok(out) = std::process::Command::new("kcat").arg("-V").output()
        && out.status.success()
    {
        let file = dir.path().join("kcat-input");
        let line = format!("dev-1:{}\n", String::from_utf8_lossy(&payload));
        std::fs::write(&file, line.repeat(n)).unwrap();
        let bootstrap = mock.bootstrap_servers();
        let t = Instant::now();
        let out = std::process::Command::new("kcat")
            .args(["-P", "-b", &bootstrap, "-t", "kcat", "-K:", "-z", "zstd"])
            .args(["-X", "enable.idempotence=true", "-X", "acks=all"])
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        let took_kcat = t.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "kcat -P produced {n} records in {took_kcat:?}: {:.0} records/s; ferry/kcat = {:.2}",
            n as f64 / took_kcat.as_secs_f64(),
            took_kcat.as_secs_f64() / took.as_secs_f64()
        );
    }
}

/// Bytes on the (loopback) wire per reading for each producer compression, and for
/// `delivery = "segment"`: 50,000 JSON telemetry readings from 100 devices are drained into a
/// mock cluster and the loopback interface's received-bytes counter is read before and after
/// (so broker responses and TCP/IP headers are included). Run with
/// `cargo bench -p ferry-bench --bench uplink_drain -- kafka-wire-bytes`.
async fn wire_bytes_bench() {
    fn lo_bytes() -> u64 {
        std::fs::read_to_string("/proc/net/dev")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.trim_start().starts_with("lo:"))
                    .map(|l| {
                        let f: Vec<u64> = l
                            .split_once(':')
                            .map(|x| x.1)
                            .unwrap_or_default()
                            .split_whitespace()
                            .filter_map(|v| v.parse().ok())
                            .collect();
                        // On loopback every byte is both received and sent: count it once.
                        f[0]
                    })
            })
            .unwrap_or(0)
    }
    use ferry_config::KafkaCompression as K;
    let n = 50_000usize;
    let readings: Vec<Reading> = (0..n)
        .map(|i| {
            let d = i % 100;
            let p = format!(
                "{{\"device\":\"sensor-{d:04}\",\"ts\":{},\"temp\":{:.2},\"hum\":{:.1},\"seq\":{i}}}",
                1_763_000_000_000u64 + i as u64 * 1000,
                20.0 + (i % 100) as f64 * 0.05,
                40.0 + (i % 37) as f64 * 0.5
            );
            reading(&format!("sensor-{d:04}"), &format!("sensors/{d}/env"), p)
        })
        .collect();
    let payload_bytes: usize = readings.iter().map(|r| r.payload.len()).sum();
    eprintln!(
        "{n} readings, {:.1} payload bytes each on average",
        payload_bytes as f64 / n as f64
    );
    for (label, compression, delivery) in [
        ("reading, zstd", K::Zstd, Delivery::Reading),
        ("reading, lz4", K::Lz4, Delivery::Reading),
        ("reading, gzip", K::Gzip, Delivery::Reading),
        ("reading, none", K::None, Delivery::Reading),
        (
            "segment (gzip 3 body), no producer compression",
            K::None,
            Delivery::Segment,
        ),
    ] {
        let mock = Mock::new(1).unwrap();
        mock.create_topic("readings", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let buffer = open_buffer_compressed(dir.path(), &["kafka"], Compression::Gzip { level: 3 });
        for chunk in readings.chunks(5000) {
            buffer.append(chunk.to_vec()).await.unwrap();
        }
        let mut cfg = kafka_uplink(&mock.bootstrap_servers());
        cfg.compression = compression;
        cfg.delivery = delivery;
        cfg.message_timeout_ms = 30_000;
        let before = lo_bytes();
        let run = start_kafka(&cfg, &buffer);
        wait_empty(&buffer, &run.status, Duration::from_secs(120)).await;
        run.stop().await;
        let bytes = lo_bytes() - before;
        eprintln!(
            "{label}: {:.1} loopback bytes per reading ({:.2} per payload byte)",
            bytes as f64 / n as f64,
            bytes as f64 / payload_bytes as f64
        );
        buffer.close().await;
    }
}

/// Drain rate of a backlog into kinesalite through ferry's Kinesis uplink, against boto3's
/// `put_records` loop with the same records, and the bytes ferry sends per reading.
async fn kinesis_drain() {
    if !require(Server::Kinesalite, "kinesis-drain") {
        return;
    }
    let n: usize = std::env::var("FERRY_BENCH_READINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let server = Stream::start(Server::Kinesalite);
    server.create("readings", 4).await;
    server.create("boto3", 4).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path(), &["kinesis"]);
    // A backlog of 100-byte JSON readings from 100 devices, in commits of 1000.
    let mut sent = Vec::with_capacity(n);
    while sent.len() < n {
        let k = (n - sent.len()).min(1000);
        let base = sent.len();
        let rs: Vec<Reading> = (0..k)
            .map(|i| {
                let j = base + i;
                let d = j % 100;
                reading(
                    &format!("dev-{d:03}"),
                    &format!("sensors/dev-{d:03}/temp"),
                    format!(
                        r#"{{"seq":{j:09},"t":21.5,"h":40.25,"pad":"{}"}}"#,
                        "x".repeat(48)
                    ),
                )
            })
            .collect();
        let receipt = buffer.append(rs.clone()).await.unwrap();
        sent.extend(rs.into_iter().zip(receipt.first_id..).map(|(mut r, id)| {
            r.id = id;
            r
        }));
    }
    let (port, wire) = counting_forwarder(server.port).await;
    let cfg = ferry_tests::kinesis::uplink(&format!("http://127.0.0.1:{port}"), "readings");
    let t = Instant::now();
    let run = Running::start(Box::new(
        KinesisSink::new(&cfg, Common::new("kinesis", "gw1", buffer.clone())).unwrap(),
    ));
    wait_empty(&buffer, &run.status, Duration::from_secs(1800)).await;
    let ferry_secs = t.elapsed().as_secs_f64();
    run.stop().await;
    let wire = wire.load(std::sync::atomic::Ordering::Relaxed);
    // The same records (envelope and partition key) for boto3.
    let file = dir.path().join("records.jsonl");
    let mut lines = String::new();
    for r in &sent {
        let data = ferry_uplink::meta::envelope("gw1", r);
        lines.push_str(
            &json!({
                "data": base64::engine::general_purpose::STANDARD.encode(&data),
                "key": r.device,
            })
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&file, lines).unwrap();
    let endpoint = server.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(BOTO3_PUT)
            .arg(endpoint)
            .arg("boto3")
            .arg(file)
            .env("NO_PROXY", "*")
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
    let boto_secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    println!(
        "kinesis drain of {n} readings into kinesalite: ferry {:.0} readings/s ({ferry_secs:.2} s), \
         boto3 put_records loop {:.0} records/s ({boto_secs:.2} s): ferry/boto3 = {:.2}x; \
         ferry sent {:.1} bytes per reading (requests, headers included)",
        n as f64 / ferry_secs,
        n as f64 / boto_secs,
        boto_secs / ferry_secs,
        wire as f64 / n as f64
    );
    buffer.close().await;
}
