//! The Kinesis uplink against real Kinesis implementations no one here wrote: **kinesalite**
//! (npm, in-memory) and **moto** in server mode (PyPI `moto[server]`, which picks the service
//! from the SigV4 credential scope, so requests must be signed for `kinesis`). Each test starts
//! its server on a free loopback port, creates the stream, and reads every shard back with an
//! independent client, boto3 (`python3 -c`): ListShards, GetShardIterator(TRIM_HORIZON),
//! GetRecords.
//!
//! Without kinesalite, moto_server or python3 with boto3 the tests print a loud SKIPPED line and
//! pass, unless `FERRY_REQUIRE_TOOLS=1` (as in CI), where they fail. `.ci/run` installs them.

use super::{KinesisSink, KinesisSinkError, MAX_RECORD_BYTES};
use crate::Common;
use crate::status::{LinkState, UplinkStatus};
use base64::Engine as _;
use bytes::Bytes;
use ferry_buffer::{Buffer, BufferOptions, Reading, Source};
use ferry_config::{KinesisUplink, RecordFormat};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

// ---------------------------------------------------------------------------------------------
// Harness: the servers and the boto3 read-back.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Kinesalite,
    Moto,
}

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    })
}

/// The command that runs kinesalite: on PATH, else the global npm package run with node.
fn kinesalite_cmd() -> Option<Command> {
    if let Some(p) = on_path("kinesalite") {
        return Some(Command::new(p));
    }
    let root = Command::new("npm").args(["root", "-g"]).output().ok()?;
    let root = PathBuf::from(String::from_utf8_lossy(&root.stdout).trim());
    let cli = root.join("kinesalite/cli.js");
    let bin = root.join(".bin/kinesalite");
    if bin.is_file() {
        Some(Command::new(bin))
    } else if cli.is_file() && on_path("node").is_some() {
        let mut c = Command::new("node");
        c.arg(cli);
        Some(c)
    } else {
        None
    }
}

fn boto3_available() -> bool {
    Command::new("python3")
        .args(["-c", "import boto3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `server` and boto3 are available; if not, skips loudly or (under
/// `FERRY_REQUIRE_TOOLS=1`) fails, like `ferry_tests::require_tool`.
fn require(server: Server, test: &str) -> bool {
    let missing = match server {
        Server::Kinesalite if kinesalite_cmd().is_none() => {
            Some("kinesalite (npm install -g kinesalite@3)")
        }
        Server::Moto if on_path("moto_server").is_none() => {
            Some("moto_server (pip install 'moto[server]')")
        }
        _ if !boto3_available() => Some("python3 with boto3 (pip install boto3)"),
        _ => None,
    };
    let Some(missing) = missing else {
        return true;
    };
    if std::env::var("FERRY_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{test}: {missing} is required (FERRY_REQUIRE_TOOLS=1) but not installed");
    }
    eprintln!(
        "\n========================================================================\n\
         SKIPPED {test}: {missing} is not installed (run .ci/run).\n\
         ========================================================================\n"
    );
    false
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A kinesalite or moto_server child process on 127.0.0.1, killed on drop.
struct Stream {
    port: u16,
    child: Option<Child>,
}

impl Stream {
    fn start(server: Server) -> Stream {
        Self::start_on(server, free_port())
    }

    /// Starts the server on `port` and waits until it accepts connections.
    fn start_on(server: Server, port: u16) -> Stream {
        let p = port.to_string();
        let mut cmd = match server {
            Server::Kinesalite => {
                let mut c = kinesalite_cmd().expect("kinesalite");
                c.args(["--port", &p, "--createStreamMs", "0"]).args([
                    "--deleteStreamMs",
                    "0",
                    "--updateStreamMs",
                    "0",
                ]);
                c
            }
            Server::Moto => {
                let mut c = Command::new(on_path("moto_server").expect("moto_server"));
                c.args(["-H", "127.0.0.1", "-p", &p]);
                c
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {server:?}: {e}"));
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{server:?} exited at start-up ({st}); is port {port} taken?");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{server:?} did not listen on {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        Stream {
            port,
            child: Some(child),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates `stream` with `shards` shards and waits until it is ACTIVE.
    async fn create(&self, stream: &str, shards: u32) {
        boto3(&self.endpoint(), stream, &["create", &shards.to_string()]).await;
    }

    /// Every record of every shard of `stream`, in shard order.
    async fn read_all(&self, stream: &str) -> Vec<Rec> {
        boto3(&self.endpoint(), stream, &["read"])
            .await
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                Rec {
                    shard: s("shard"),
                    seq: s("seq"),
                    key: s("key"),
                    data: base64::engine::general_purpose::STANDARD
                        .decode(s("data"))
                        .unwrap(),
                }
            })
            .collect()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The independent client: boto3, with dummy credentials (kinesalite ignores them, moto only
/// reads the scope). `create N`: CreateStream, wait ACTIVE. `read`: one JSON line per record.
const BOTO3: &str = r#"
import base64, json, sys, time, boto3
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
                print(json.dumps({"shard": sh["ShardId"], "seq": x["SequenceNumber"],
                                  "key": x["PartitionKey"],
                                  "data": base64.b64encode(x["Data"]).decode()}))
            if not r["Records"]:
                break
            it = r.get("NextShardIterator")
"#;

async fn boto3(endpoint: &str, stream: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(BOTO3)
        .arg(endpoint)
        .arg(stream)
        .args(args);
    // The client must not pick up a developer's AWS profile or proxy.
    for k in [
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("NO_PROXY", "*");
    let what = format!("boto3 {args:?} against {endpoint}");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run python3"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One record as boto3 read it.
#[derive(Debug, Clone)]
struct Rec {
    shard: String,
    seq: String,
    key: String,
    data: Vec<u8>,
}

impl Rec {
    fn envelope(&self) -> Value {
        serde_json::from_slice(&self.data).unwrap_or_else(|e| {
            panic!(
                "record data is not a JSON envelope ({e}): {:?}",
                String::from_utf8_lossy(&self.data[..self.data.len().min(200)])
            )
        })
    }

    fn ferry_id(&self) -> String {
        self.envelope()["ferry_id"]
            .as_str()
            .expect("ferry_id")
            .to_string()
    }
}

/// Sequence numbers are decimal strings of up to 128 bits and more: compare by length first.
fn seq_key(s: &str) -> (usize, &str) {
    (s.len(), s)
}

/// Within each shard, records come in sequence-number order, and the first arrival of each
/// reading of one partition key comes in reading-id order. Each key lives in one shard.
fn assert_order_per_key(recs: &[Rec]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<(&str, &str), (&str, u64)> = HashMap::new();
    let mut last_seq: HashMap<&str, &str> = HashMap::new();
    let mut shard_of: HashMap<&str, &str> = HashMap::new();
    for r in recs {
        if let Some(prev) = last_seq.insert(&r.shard, &r.seq) {
            assert!(
                seq_key(prev) < seq_key(&r.seq),
                "shard {} not in sequence order",
                r.shard
            );
        }
        let s = shard_of.entry(&r.key).or_insert(&r.shard);
        assert_eq!(*s, r.shard, "partition key {} in two shards", r.key);
        let id = r.ferry_id();
        if !seen.insert(id.clone()) {
            continue;
        }
        let n: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
        if let Some((pseq, pn)) = last.insert((&r.shard, &r.key), (&r.seq, n)) {
            assert!(
                n > pn && seq_key(&r.seq) > seq_key(pseq),
                "key {}: reading {n} (seq {}) after reading {pn} (seq {pseq})",
                r.key,
                r.seq
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The uplink under test.

const STREAM: &str = "readings";

fn open_buffer(dir: &Path) -> Buffer {
    Buffer::open(
        dir,
        BufferOptions {
            consumers: vec!["kinesis".into()],
            flush_interval: Duration::ZERO,
            ..Default::default()
        },
    )
    .unwrap()
}

fn uplink(endpoint: &str) -> KinesisUplink {
    KinesisUplink {
        stream: STREAM.into(),
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.into()),
        access_key_id: Some("AKIDTEST".into()),
        secret_access_key: Some("secret".into()),
        request_timeout_ms: 5000,
        initial_backoff_ms: 50,
        max_backoff_ms: 400,
        ..KinesisUplink::default()
    }
}

type Running = crate::test_util::Running<KinesisSinkError>;

fn start(cfg: &KinesisUplink, buffer: &Buffer) -> Running {
    let sink = KinesisSink::new(
        cfg,
        Common::new("kinesis", "gw1", buffer.clone()).grace(Duration::from_secs(2)),
    )
    .unwrap();
    let status = sink.status();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(sink.run(async move {
        let _ = rx.await;
    }));
    Running { status, stop, task }
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_empty(buffer: &Buffer, status: &UplinkStatus, timeout: Duration) {
    let start = Instant::now();
    while buffer.stats().readings != 0 {
        assert!(
            start.elapsed() < timeout,
            "buffer still holds {} readings; uplink status {:?}",
            buffer.stats().readings,
            status.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the status counts `acked` readings (it is updated just after the ack commit).
async fn wait_acked(status: &UplinkStatus, acked: u64) {
    wait_until(
        &format!("the status counts {acked} acked readings"),
        Duration::from_secs(2),
        || status.snapshot().acked_total >= acked,
    )
    .await;
    assert_eq!(status.snapshot().acked_total, acked);
}

fn reading(device: &str, topic: &str, payload: impl Into<Vec<u8>>) -> Reading {
    Reading::new(Source::Mqtt, device, topic, payload.into())
}

/// Appends `rs` and returns them with their ids.
async fn append(buffer: &Buffer, mut rs: Vec<Reading>) -> Vec<Reading> {
    let receipt = buffer.append(rs.clone()).await.unwrap();
    for (r, id) in rs.iter_mut().zip(receipt.first_id..) {
        r.id = id;
    }
    rs
}

/// `batches` appends of `per_batch` JSON readings spread over `devices` devices.
async fn append_json(
    buffer: &Buffer,
    tag: &str,
    batches: usize,
    per_batch: usize,
    devices: usize,
) -> Vec<Reading> {
    let mut all = Vec::new();
    for b in 0..batches {
        let rs = (0..per_batch)
            .map(|i| {
                let d = (b * per_batch + i) % devices;
                reading(
                    &format!("dev-{d}"),
                    &format!("sensors/dev-{d}/temp"),
                    format!(r#"{{"tag":"{tag}","b":{b},"i":{i},"t":21.5}}"#),
                )
                .with_content_type("application/json")
            })
            .collect();
        all.extend(append(buffer, rs).await);
    }
    all
}

fn ids(rs: &[Reading]) -> HashSet<String> {
    rs.iter().map(|r| format!("gw1-{}", r.id)).collect()
}

/// Asserts every reading of `sent` arrived once (no duplicates in a run without failures),
/// with its envelope and the device as partition key, in order per key.
fn assert_arrived_once(recs: &[Rec], sent: &[Reading]) {
    let by_id: HashMap<String, &Reading> =
        sent.iter().map(|r| (format!("gw1-{}", r.id), r)).collect();
    let mut got = HashSet::new();
    for rec in recs {
        let env = rec.envelope();
        let id = rec.ferry_id();
        let r = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("unexpected record {id}"));
        assert!(got.insert(id.clone()), "{id} arrived twice");
        assert_eq!(rec.key, r.device, "partition key of {id}");
        assert_eq!(env["gateway"], "gw1");
        assert_eq!(env["device"], r.device.as_str());
        assert_eq!(env["topic"], r.topic.as_str());
        assert_eq!(env["received_at_ms"], r.received_at_ms);
        assert_eq!(env["source"], "mqtt");
        assert_eq!(env["content_type"], "application/json");
        assert_eq!(env["payload_encoding"], "json");
        let payload: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(env["payload"], payload, "payload of {id}");
    }
    assert_eq!(got.len(), sent.len(), "readings missing in the stream");
    assert_order_per_key(recs);
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesalite_envelope_partition_keys_order_and_acks() {
    let test = "kinesalite_envelope_partition_keys_order_and_acks";
    if !require(Server::Kinesalite, test) {
        return;
    }
    let t0 = Instant::now();
    let server = Stream::start(Server::Kinesalite);
    server.create(STREAM, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path());
    let run = start(&uplink(&server.endpoint()), &buffer);

    // 2000 readings of 8 devices in 20 commits, appended while the uplink forwards.
    let sent = append_json(&buffer, "a", 20, 100, 8).await;
    wait_empty(&buffer, &run.status, Duration::from_secs(30)).await;
    wait_acked(&run.status, sent.len() as u64).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.state, LinkState::Connected, "{snap:?}");
    assert_eq!(
        (
            snap.dead_lettered_total,
            snap.retried_total,
            snap.throttled_total
        ),
        (0, 0, 0),
        "{snap:?}"
    );
    assert_eq!(snap.last_error, None, "{snap:?}");
    run.stop().await;

    let recs = server.read_all(STREAM).await;
    assert_arrived_once(&recs, &sent);
    let shards: HashSet<&str> = recs.iter().map(|r| r.shard.as_str()).collect();
    assert_eq!(shards.len(), 2, "8 devices spread over both shards");
    eprintln!("{test}: {} readings in {:?}", sent.len(), t0.elapsed());
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_requests_are_signed_for_kinesis_and_everything_arrives() {
    let test = "moto_requests_are_signed_for_kinesis_and_everything_arrives";
    if !require(Server::Moto, test) {
        return;
    }
    let t0 = Instant::now();
    let server = Stream::start(Server::Moto);
    server.create(STREAM, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path());
    let run = start(&uplink(&server.endpoint()), &buffer);

    let sent = append_json(&buffer, "m", 6, 100, 5).await;
    wait_empty(&buffer, &run.status, Duration::from_secs(30)).await;
    wait_acked(&run.status, sent.len() as u64).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.state, LinkState::Connected, "{snap:?}");
    assert_eq!(
        (snap.dead_lettered_total, snap.retried_total),
        (0, 0),
        "{snap:?}"
    );
    run.stop().await;

    let recs = server.read_all(STREAM).await;
    assert_arrived_once(&recs, &sent);
    eprintln!("{test}: {} readings in {:?}", sent.len(), t0.elapsed());
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_format_sends_the_payload_bytes_alone() {
    let test = "raw_format_sends_the_payload_bytes_alone";
    if !require(Server::Kinesalite, test) {
        return;
    }
    let server = Stream::start(Server::Kinesalite);
    server.create(STREAM, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path());
    let cfg = KinesisUplink {
        format: RecordFormat::Raw,
        ..uplink(&server.endpoint())
    };
    let run = start(&cfg, &buffer);
    let mut payloads: Vec<Vec<u8>> = (0..40u8)
        .map(|i| format!(r#"{{"n": {i}}}"#).into_bytes())
        .collect();
    payloads.push(vec![0xff, 0x00, 0xfe, 0x10, b'"']);
    payloads.push(b"plain text, not JSON\n".to_vec());
    let rs = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = reading(&format!("dev-{}", i % 3), "t/raw", p.clone());
            r.properties = vec![("unit".into(), "C".into())];
            r
        })
        .collect();
    let sent = append(&buffer, rs).await;
    wait_empty(&buffer, &run.status, Duration::from_secs(20)).await;
    wait_acked(&run.status, sent.len() as u64).await;
    run.stop().await;

    let recs = server.read_all(STREAM).await;
    // Each record is the payload alone, in order per partition key (kinesalite orders one
    // call's records of different keys by key within the shard).
    let mut got: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for r in recs {
        got.entry(r.key).or_default().push(r.data);
    }
    let mut want: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for r in &sent {
        want.entry(r.device.clone())
            .or_default()
            .push(r.payload.to_vec());
    }
    assert_eq!(got, want);
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_over_1_mib_is_dead_lettered_and_the_rest_arrive() {
    let test = "a_reading_over_1_mib_is_dead_lettered_and_the_rest_arrive";
    if !require(Server::Kinesalite, test) {
        return;
    }
    let server = Stream::start(Server::Kinesalite);
    server.create(STREAM, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path());
    let run = start(&uplink(&server.endpoint()), &buffer);
    let small = |n: u32| {
        reading("dev-1", "t", format!(r#"{{"n":{n}}}"#)).with_content_type("application/json")
    };
    // One commit: small, too big (a 1.1 MB text payload), small; then another small.
    let first = append(
        &buffer,
        vec![
            small(0),
            reading("dev-1", "t", vec![b'x'; 1_100_000]).with_content_type("application/json"),
            small(2),
        ],
    )
    .await;
    let second = append(&buffer, vec![small(3)]).await;
    wait_empty(&buffer, &run.status, Duration::from_secs(20)).await;
    wait_acked(&run.status, 3).await;
    let snap = run.status.snapshot();
    assert_eq!(snap.dead_lettered_total, 1, "{snap:?}");
    run.stop().await;

    assert_eq!(buffer.stats().dead_letters, 1);
    let dead = buffer.dead_letters(0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reading.id, first[1].id);
    assert_eq!(dead[0].consumer, "kinesis");
    eprintln!("{test}: dead-letter reason: {}", dead[0].reason);
    assert!(
        dead[0].reason.contains(&MAX_RECORD_BYTES.to_string()),
        "the reason names the limit: {}",
        dead[0].reason
    );
    let recs = server.read_all(STREAM).await;
    let got: Vec<String> = recs.iter().map(Rec::ferry_id).collect();
    let want: Vec<String> = [first[0].id, first[2].id, second[0].id]
        .iter()
        .map(|id| format!("gw1-{id}"))
        .collect();
    assert_eq!(got, want);
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_server_down_then_up_everything_arrives() {
    let test = "stream_server_down_then_up_everything_arrives";
    if !require(Server::Kinesalite, test) {
        return;
    }
    let t0 = Instant::now();
    let mut server = Stream::start(Server::Kinesalite);
    let port = server.port;
    server.create(STREAM, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path());
    let run = start(&uplink(&server.endpoint()), &buffer);

    let before = append_json(&buffer, "before", 2, 100, 4).await;
    wait_empty(&buffer, &run.status, Duration::from_secs(20)).await;
    assert_arrived_once(&server.read_all(STREAM).await, &before);

    // Down: readings keep coming; the uplink backs off and says why.
    server.stop();
    let mut during = Vec::new();
    for _ in 0..3 {
        during.extend(append_json(&buffer, "during", 1, 100, 4).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until(
        "the uplink backs off or goes offline with an error",
        Duration::from_secs(15),
        || {
            let s = run.status.snapshot();
            matches!(s.state, LinkState::BackingOff | LinkState::Offline) && s.last_error.is_some()
        },
    )
    .await;
    let down = run.status.snapshot();
    eprintln!(
        "{test}: while down: {:?}: {:?}",
        down.state, down.last_error
    );
    assert!(down.retried_total > 0, "{down:?}");
    assert_eq!(buffer.stats().readings, during.len() as u64);

    // Up again (kinesalite is in memory: the stream is created anew; calls in between find
    // no stream, which must be retried, not dead-lettered).
    let server = Stream::start_on(Server::Kinesalite, port);
    server.create(STREAM, 2).await;
    wait_empty(&buffer, &run.status, Duration::from_secs(30)).await;
    wait_acked(&run.status, (before.len() + during.len()) as u64).await;
    wait_until(
        "the uplink is connected again",
        Duration::from_secs(5),
        || run.status.snapshot().state == LinkState::Connected,
    )
    .await;
    let snap = run.status.snapshot();
    assert_eq!(snap.dead_lettered_total, 0, "{snap:?}");
    assert_eq!(buffer.stats().dead_letters, 0);
    run.stop().await;

    let recs = server.read_all(STREAM).await;
    let got: HashSet<String> = recs.iter().map(Rec::ferry_id).collect();
    let want = ids(&during);
    assert!(
        want.is_subset(&got),
        "{} readings appended during the outage never arrived",
        want.difference(&got).count()
    );
    let dups = recs.len() - got.len();
    eprintln!(
        "{test}: {} readings appended while down all arrived ({dups} duplicates) in {:?}",
        during.len(),
        t0.elapsed()
    );
    buffer.close().await;
}

// ---------------------------------------------------------------------------------------------
// Partial failure and throttling: a proxy in front of kinesalite.

const RATE_EXCEEDED: &str = "ProvisionedThroughputExceededException";

/// What the proxy saw.
#[derive(Debug, Default)]
struct ProxyLog {
    /// PutRecords calls.
    calls: usize,
    /// Records the uplink sent, in all calls.
    sent: usize,
    /// Records the proxy answered as throttled (the whole-call 400 included).
    refused: usize,
    /// How many times each ferry_id was forwarded to kinesalite.
    forwarded: HashMap<String, usize>,
}

/// What the proxy does to PutRecords calls (numbered from 0 in the order they arrive).
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    /// Call 0 is throttled as a whole: HTTP 400 `ProvisionedThroughputExceededException`.
    throttle_first_call: bool,
    /// In calls 1..=`partial_calls`, only the even-indexed records are forwarded; the odd ones
    /// are answered with a per-record `ProvisionedThroughputExceededException`.
    partial_calls: usize,
    /// Call 0 is held this long before it is forwarded (later calls overtake it).
    delay_first_call: Duration,
}

/// A proxy in front of kinesalite that injects [`Faults`] and logs what it forwarded.
struct Proxy {
    addr: SocketAddr,
    log: Arc<Mutex<ProxyLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy(upstream: u16, faults: Faults) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Arc<Mutex<ProxyLog>> = Arc::default();
    let l = log.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let l = l.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    proxy_call(req, upstream, l.clone(), faults)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Proxy { addr, log, task }
}

fn json_response(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Sends `body` with the original headers to kinesalite (which does not check signatures).
async fn forward(parts: &hyper::http::request::Parts, body: Bytes, upstream: u16) -> (u16, Bytes) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.path());
    for (k, v) in &parts.headers {
        if k != "content-length" {
            req = req.header(k, v);
        }
    }
    let resp = send
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn record_ferry_id(record: &Value) -> String {
    let data = base64::engine::general_purpose::STANDARD
        .decode(record["Data"].as_str().unwrap())
        .unwrap();
    let env: Value = serde_json::from_slice(&data).unwrap();
    env["ferry_id"].as_str().unwrap().to_string()
}

async fn proxy_call(
    req: Request<Incoming>,
    upstream: u16,
    log: Arc<Mutex<ProxyLog>>,
    faults: Faults,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if target != "Kinesis_20131202.PutRecords" {
        let (status, body) = forward(&parts, body, upstream).await;
        return Ok(json_response(
            status,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        ));
    }
    let mut put: Value = serde_json::from_slice(&body).unwrap();
    let records = put["Records"].as_array().cloned().unwrap_or_default();
    let call = {
        let mut l = log.lock().unwrap();
        l.calls += 1;
        l.sent += records.len();
        l.calls - 1
    };
    if call == 0 {
        tokio::time::sleep(faults.delay_first_call).await;
    }
    if call == 0 && faults.throttle_first_call {
        log.lock().unwrap().refused += records.len();
        return Ok(json_response(
            400,
            json!({"__type": RATE_EXCEEDED, "message": "Rate exceeded for stream readings under account 000000000000."}),
        ));
    }
    let keep: Vec<bool> = (0..records.len())
        .map(|i| call == 0 || call > faults.partial_calls || i.is_multiple_of(2))
        .collect();
    let forwarded: Vec<Value> = records
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(r, _)| r.clone())
        .collect();
    put["Records"] = Value::Array(forwarded.clone());
    let (status, answer) = forward(&parts, Bytes::from(put.to_string()), upstream).await;
    let answer: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    if status != 200 {
        return Ok(json_response(status, answer));
    }
    let mut upstream_results = answer["Records"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter();
    let mut failed = answer["FailedRecordCount"].as_u64().unwrap_or(0);
    let mut results = Vec::new();
    {
        let mut l = log.lock().unwrap();
        for (r, k) in records.iter().zip(&keep) {
            if *k {
                let res = upstream_results.next().expect("a result per record");
                if res.get("ErrorCode").is_none() {
                    *l.forwarded.entry(record_ferry_id(r)).or_default() += 1;
                }
                results.push(res);
            } else {
                l.refused += 1;
                failed += 1;
                results.push(json!({"ErrorCode": RATE_EXCEEDED, "ErrorMessage": "Rate exceeded for shard shardId-000000000000 in stream readings under account 000000000000."}));
            }
        }
    }
    Ok(json_response(
        200,
        json!({"FailedRecordCount": failed, "Records": results}),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_failures_and_throttling_resend_only_the_failed_records() {
    let test = "partial_failures_and_throttling_resend_only_the_failed_records";
    if !require(Server::Kinesalite, test) {
        return;
    }
    let t0 = Instant::now();
    let server = Stream::start(Server::Kinesalite);
    server.create(STREAM, 2).await;
    let faults = Faults {
        throttle_first_call: true,
        partial_calls: 4,
        ..Faults::default()
    };
    let proxy = proxy(server.port, faults).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path());
    let run = start(&uplink(&format!("http://{}", proxy.addr)), &buffer);

    let sent = append_json(&buffer, "p", 6, 100, 6).await;
    wait_empty(&buffer, &run.status, Duration::from_secs(30)).await;
    wait_acked(&run.status, sent.len() as u64).await;
    let snap = run.status.snapshot();
    run.stop().await;

    let log = std::mem::take(&mut *proxy.log.lock().unwrap());
    eprintln!(
        "{test}: {} calls, {} records sent, {} refused, {} forwarded; status {snap:?}",
        log.calls,
        log.sent,
        log.refused,
        log.forwarded.values().sum::<usize>()
    );
    assert!(log.calls > 5, "the proxy saw every kind of answer: {log:?}");
    assert!(snap.throttled_total > 0, "{snap:?}");
    assert_eq!(snap.dead_lettered_total, 0, "{snap:?}");
    // Only what was refused was sent again: every record the uplink sent is a reading's first
    // send or the re-send of a refused record, and each reading reached kinesalite once.
    assert_eq!(log.sent, sent.len() + log.refused, "{snap:?}");
    let want = ids(&sent);
    let forwarded: HashSet<String> = log.forwarded.keys().cloned().collect();
    assert_eq!(forwarded, want);
    let twice: Vec<_> = log.forwarded.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "forwarded more than once: {twice:?}");

    // kinesalite holds each reading once. Order per key is not checked: a throttled record
    // lands after a later record of its key that went through (documented in mod.rs).
    let recs = server.read_all(STREAM).await;
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for r in &recs {
        assert_eq!(r.key, r.envelope()["device"].as_str().unwrap());
        *per_id.entry(r.ferry_id()).or_default() += 1;
    }
    assert_eq!(per_id.len(), sent.len());
    assert!(per_id.values().all(|n| *n == 1));
    eprintln!("{test}: {:?}", t0.elapsed());
    buffer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_call_is_not_overtaken_by_a_later_call_of_the_same_partition_key() {
    let test = "a_slow_call_is_not_overtaken_by_a_later_call_of_the_same_partition_key";
    if !require(Server::Kinesalite, test) {
        return;
    }
    let server = Stream::start(Server::Kinesalite);
    server.create(STREAM, 2).await;
    // The first call is held 500 ms; calls sent meanwhile reach kinesalite first. Readings of
    // one device must still land in their order: a later call may not carry a key whose
    // earlier records are still in flight.
    let faults = Faults {
        delay_first_call: Duration::from_millis(500),
        ..Faults::default()
    };
    let proxy = proxy(server.port, faults).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path());
    let run = start(&uplink(&format!("http://{}", proxy.addr)), &buffer);
    let mut sent = Vec::new();
    for _ in 0..6 {
        sent.extend(append_json(&buffer, "o", 1, 50, 4).await);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_empty(&buffer, &run.status, Duration::from_secs(20)).await;
    wait_acked(&run.status, sent.len() as u64).await;
    run.stop().await;
    let calls = proxy.log.lock().unwrap().calls;
    eprintln!("{test}: {} readings in {calls} calls", sent.len());
    assert_arrived_once(&server.read_all(STREAM).await, &sent);
    buffer.close().await;
}

// ---------------------------------------------------------------------------------------------
// Benchmark (ignored: `cargo test --release -p ferry-uplink kinesis_drain_bench -- --ignored
// --nocapture`, `FERRY_BENCH_READINGS` readings, default 100000).

/// Forwards 127.0.0.1:(returned port) to `upstream`, counting the bytes the client sends.
async fn counting_forwarder(upstream: u16) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                let _ = tokio::join!(up, down);
            });
        }
    });
    (port, sent)
}

/// The same records through boto3's `put_records`, 500 per call, one call at a time (what a
/// script with the official client does); prints the seconds it took.
const BOTO3_PUT: &str = r#"
import base64, json, sys, time, boto3
url, stream, path = sys.argv[1:4]
c = boto3.client("kinesis", endpoint_url=url, region_name="us-east-1",
                 aws_access_key_id="AKIDTEST", aws_secret_access_key="secret")
recs = [json.loads(l) for l in open(path)]
recs = [{"Data": base64.b64decode(r["data"]), "PartitionKey": r["key"]} for r in recs]
t = time.time()
for i in range(0, len(recs), 500):
    batch = recs[i:i + 500]
    while batch:
        r = c.put_records(StreamName=stream, Records=batch)
        batch = [b for b, x in zip(batch, r["Records"]) if "ErrorCode" in x]
print(time.time() - t)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn kinesis_drain_bench() {
    if !require(Server::Kinesalite, "kinesis_drain_bench") {
        return;
    }
    let n: usize = std::env::var("FERRY_BENCH_READINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let server = Stream::start(Server::Kinesalite);
    server.create(STREAM, 4).await;
    server.create("boto3", 4).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = open_buffer(dir.path());
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
        sent.extend(append(&buffer, rs).await);
    }
    let (port, wire) = counting_forwarder(server.port).await;
    let cfg = uplink(&format!("http://127.0.0.1:{port}"));
    let t = Instant::now();
    let run = start(&cfg, &buffer);
    wait_empty(&buffer, &run.status, Duration::from_secs(1800)).await;
    let ferry_secs = t.elapsed().as_secs_f64();
    run.stop().await;
    let wire = wire.load(std::sync::atomic::Ordering::Relaxed);
    // The same records (envelope and partition key) for boto3.
    let file = dir.path().join("records.jsonl");
    let mut lines = String::new();
    for r in &sent {
        let data = crate::meta::envelope("gw1", r);
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
