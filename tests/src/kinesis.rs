//! Kinesis servers no one here wrote, for the Kinesis uplink's tests and its drain benchmark:
//! **kinesalite** (npm, in-memory) and **moto** in server mode (PyPI `moto[server]`), each on a
//! free loopback port, and **boto3** (`python3 -c`) as the independent client that creates
//! streams and reads every shard back (ListShards, GetShardIterator(TRIM_HORIZON),
//! GetRecords).

use base64::Engine as _;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::free_port;

/// A Kinesis uplink's config for `stream` at `endpoint`, with the servers' dummy credentials
/// and short timeouts and backoffs.
pub fn uplink(endpoint: &str, stream: &str) -> ferry_config::KinesisUplink {
    ferry_config::KinesisUplink {
        stream: stream.into(),
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.into()),
        access_key_id: Some("AKIDTEST".into()),
        secret_access_key: Some("secret".into()),
        request_timeout_ms: 5000,
        initial_backoff_ms: 50,
        max_backoff_ms: 400,
        ..Default::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Kinesalite,
    Moto,
}

/// The command that runs kinesalite: on PATH, else the global npm package run with node.
pub fn kinesalite_cmd() -> Option<Command> {
    if let Some(p) = crate::find_tool("kinesalite") {
        return Some(Command::new(p));
    }
    let root = Command::new("npm").args(["root", "-g"]).output().ok()?;
    let root = PathBuf::from(String::from_utf8_lossy(&root.stdout).trim());
    let cli = root.join("kinesalite/cli.js");
    let bin = root.join(".bin/kinesalite");
    if bin.is_file() {
        Some(Command::new(bin))
    } else if cli.is_file() && crate::find_tool("node").is_some() {
        let mut c = Command::new("node");
        c.arg(cli);
        Some(c)
    } else {
        None
    }
}

pub fn boto3_available() -> bool {
    Command::new("python3")
        .args(["-c", "import boto3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `server` and boto3 are available; if not, skips loudly or (under
/// `FERRY_REQUIRE_TOOLS=1`) fails, like `ferry_tests::require_tool`.
pub fn require(server: Server, test: &str) -> bool {
    let missing = match server {
        Server::Kinesalite if kinesalite_cmd().is_none() => {
            Some("kinesalite (npm install -g kinesalite@3)")
        }
        Server::Moto if crate::find_tool("moto_server").is_none() => {
            Some("moto_server (pip install 'moto[server]')")
        }
        _ if !boto3_available() => Some("python3 with boto3 (pip install boto3)"),
        _ => None,
    };
    missing.is_none_or(|missing| crate::skip_or_fail(missing, test))
}

/// A kinesalite or moto_server child process on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct Stream {
    pub port: u16,
    child: Option<Child>,
}

impl Stream {
    pub fn start(server: Server) -> Stream {
        Self::start_on(server, free_port())
    }

    /// Starts the server on `port` and waits until it accepts connections.
    pub fn start_on(server: Server, port: u16) -> Stream {
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
                let mut c = Command::new(crate::find_tool("moto_server").expect("moto_server"));
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

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates `stream` with `shards` shards and waits until it is ACTIVE.
    pub async fn create(&self, stream: &str, shards: u32) {
        boto3(&self.endpoint(), stream, &["create", &shards.to_string()]).await;
    }

    /// Every record of every shard of `stream`, in shard order.
    pub async fn read_all(&self, stream: &str) -> Vec<Rec> {
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
pub const BOTO3: &str = r#"
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

pub async fn boto3(endpoint: &str, stream: &str, args: &[&str]) -> String {
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
pub struct Rec {
    pub shard: String,
    pub seq: String,
    pub key: String,
    pub data: Vec<u8>,
}

impl Rec {
    pub fn envelope(&self) -> Value {
        serde_json::from_slice(&self.data).unwrap_or_else(|e| {
            panic!(
                "record data is not a JSON envelope ({e}): {:?}",
                String::from_utf8_lossy(&self.data[..self.data.len().min(200)])
            )
        })
    }

    pub fn ferry_id(&self) -> String {
        self.envelope()["ferry_id"]
            .as_str()
            .expect("ferry_id")
            .to_string()
    }
}

/// Forwards 127.0.0.1:(returned port) to `upstream`, counting the bytes the client sends.
pub async fn counting_forwarder(upstream: u16) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
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
pub const BOTO3_PUT: &str = r#"
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
