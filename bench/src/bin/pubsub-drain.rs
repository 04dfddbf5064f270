//! `pubsub-drain`: drains a backlog of readings from ferry's buffer into Google's Pub/Sub
//! emulator, against the official Python client (`google-cloud-pubsub` from PyPI) publishing
//! the same messages to the same emulator, in alternating rounds of one run, each on a fresh
//! emulator; prints the rates and their ratio.
//!
//! ```text
//! cargo build --release -p ferry-bench --bin pubsub-drain
//! target/release/pubsub-drain [--backlog 100000] [--rounds 2] [--work-dir DIR]
//! ```
//!
//! - ferry: the shipped `ferry` binary on a copy of a backlog of ~100-byte
//!   JSON readings from 500 devices (the drain scenario's readings in `bench-run`), with one
//!   `type = "pubsub"` uplink, `ordering_key = "none"` and the default in-flight settings.
//!   Timed from its `ready` line until `ferry_buffer_readings` is 0: every reading confirmed
//!   by a message id and acked in the buffer.
//! - Python: the same messages (data = the payload, the five `ferry-*` attributes with values
//!   of the same lengths), read into memory first, published with `PublisherClient` (batches
//!   of up to 1,000 messages, the client's defaults otherwise) to `PUBSUB_EMULATOR_HOST`
//!   (gRPC; ferry speaks REST), timed from the first publish until every future resolved.
//!
//! The emulator is the bottleneck of both (a Java process on the same machine), so the ratio
//! says whether ferry keeps up with an official client there, not what Pub/Sub itself takes.
//! Missing emulator or Python client: the run stops with a message.

use clap::Parser;
use ferry_bench::{fleet_readings, proc_cpu_secs};
use ferry_buffer::{Buffer, BufferOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "pubsub-drain",
    about = "Drains a backlog into the Pub/Sub emulator, ferry against the Python client"
)]
struct Opts {
    /// Readings in the backlog.
    #[arg(long, default_value_t = 100_000)]
    backlog: u64,
    /// Alternating rounds (ferry, then Python).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Where the backlog and logs go (default: `target/pubsub-drain`).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The ferry binary. Default: `ferry` beside this binary, built first
    /// (`ferry_bench::ferry_binary`).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// The Python interpreter with `google-cloud-pubsub`.
    #[arg(long, default_value = "python3")]
    python: String,
}

type Res<T> = Result<T, String>;

fn main() -> std::process::ExitCode {
    let opts = Opts::parse();
    match run(&opts) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pubsub-drain: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(opts: &Opts) -> Res<()> {
    let emulator = ferry_tests::find_tool("cloud-pubsub-emulator").ok_or(
        "the Pub/Sub emulator is not installed (Debian package google-cloud-cli-pubsub-emulator)",
    )?;
    let ok = Command::new(&opts.python)
        .args(["-c", "import google.cloud.pubsub_v1"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err(format!(
            "{} has no google-cloud-pubsub (pip install google-cloud-pubsub)",
            opts.python
        ));
    }
    let work = opts
        .work_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/pubsub-drain"));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let ferry = ferry_bench::ferry_binary(opts.ferry.as_deref())?;
    let n = opts.backlog;
    let template = backlog(&work, n)?;
    let input = python_input(&work, n)?;

    let (mut ferry_runs, mut python_runs) = (Vec::new(), Vec::new());
    for round in 0..opts.rounds.max(1) {
        let emu = Emulator::start(&emulator)?;
        let f = drain_ferry(&ferry, &work, &template, &emu, n)?;
        eprintln!(
            "round {round}: ferry {n} readings in {:.2} s ({:.0}/s, {:.2} CPU s)",
            f.0,
            n as f64 / f.0,
            f.1
        );
        ferry_runs.push(f);
        drop(emu);
        let emu = Emulator::start(&emulator)?;
        let p = drain_python(&opts.python, &input, &emu, n)?;
        eprintln!(
            "round {round}: python {n} messages in {:.2} s ({:.0}/s, {:.2} CPU s)",
            p.0,
            n as f64 / p.0,
            p.1
        );
        python_runs.push(p);
    }
    let rate = |r: &[(f64, f64)]| n as f64 * r.len() as f64 / r.iter().map(|x| x.0).sum::<f64>();
    let cpu = |r: &[(f64, f64)]| r.iter().map(|x| x.1).sum::<f64>() / r.len() as f64;
    let times = |r: &[(f64, f64)]| {
        r.iter()
            .map(|x| format!("{:.2}", x.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (fr, pr) = (rate(&ferry_runs), rate(&python_runs));
    println!(
        "| {n}-reading backlog to the Pub/Sub emulator, readings/s ({} alternating rounds) | ferry {fr:.0} ({} s; {:.2} CPU s) | google-cloud-pubsub {pr:.0} ({} s; {:.2} CPU s) | {:.2}× |",
        ferry_runs.len(),
        times(&ferry_runs),
        cpu(&ferry_runs),
        times(&python_runs),
        cpu(&python_runs),
        fr / pr
    );
    Ok(())
}

/// The emulator on a free port with the topic `projects/bench/topics/readings` (no
/// subscription: messages are counted by their ids, not stored), killed on drop.
struct Emulator {
    child: Child,
    addr: String,
}

impl Emulator {
    fn start(bin: &Path) -> Res<Emulator> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new(bin)
            .arg("--host=127.0.0.1")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start the emulator: {e}"))?;
        let emu = Emulator {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let t = Instant::now();
        while TcpStream::connect(&emu.addr).is_err() {
            if t.elapsed() > Duration::from_secs(60) {
                return Err("the emulator did not listen within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, body) = http(&emu.addr, "PUT", "/v1/projects/bench/topics/readings", "{}")?;
        if status != 200 {
            return Err(format!("creating the topic: {status} {body}"));
        }
        Ok(emu)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange, `Connection: close`: status and body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Res<(u16, String)> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    // Read the head, then exactly Content-Length bytes (the emulator keeps the connection
    // open whatever the request says).
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status line")?;
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().map_err(|_| "bad content-length")?;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A data directory with `n` readings for the consumer `gcp`, made once.
fn backlog(work: &Path, n: u64) -> Res<PathBuf> {
    let dir = work.join(format!("backlog-{n}"));
    if dir.join(ferry_buffer::FILE_NAME).exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let opts = BufferOptions {
            consumers: vec!["gcp".into()],
            max_bytes: 16 << 30,
            ..BufferOptions::default()
        };
        let buf = Buffer::open(&dir, opts).map_err(|e| e.to_string())?;
        let mut i = 0;
        while i < n {
            buf.append(fleet_readings(i, (i + 1000).min(n), 500))
                .await
                .map_err(|e| e.to_string())?;
            i += 1000;
        }
        buf.close().await;
        Ok::<(), String>(())
    })?;
    Ok(dir)
}

/// The same messages for the Python client, one per line: `device \t topic \t payload`.
fn python_input(work: &Path, n: u64) -> Res<PathBuf> {
    let path = work.join(format!("python-input-{n}"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| e.to_string())?);
    for chunk in (0..n).step_by(10_000) {
        for r in fleet_readings(chunk, (chunk + 10_000).min(n), 500) {
            f.write_all(format!("{}\t{}\t", r.device, r.topic).as_bytes())
                .and_then(|()| f.write_all(&r.payload))
                .and_then(|()| f.write_all(b"\n"))
                .map_err(|e| e.to_string())?;
        }
    }
    f.flush().map_err(|e| e.to_string())?;
    Ok(path)
}

/// ferry drains a copy of the backlog: (seconds from ready to empty, CPU seconds).
fn drain_ferry(
    bin: &Path,
    work: &Path,
    template: &Path,
    emu: &Emulator,
    n: u64,
) -> Res<(f64, f64)> {
    let dir = work.join("drain");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for e in std::fs::read_dir(template).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).map_err(|e| e.to_string())?;
        }
    }
    let cfg = work.join("ferry.toml");
    std::fs::write(&cfg, "").map_err(|e| e.to_string())?;
    let log = work.join("ferry.log");
    let stderr = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .env_remove("FERRY_CONFIG")
        .env("FERRY_GATEWAY_DATA_DIR", &dir)
        .env("FERRY_GATEWAY_ID", "bench")
        .env("FERRY_MQTT_ENABLED", "false")
        .env("FERRY_HTTP_LISTEN", "127.0.0.1:0")
        .env("FERRY_LOG", "warn")
        .env("FERRY_UPLINKS_GCP_TYPE", "pubsub")
        .env("FERRY_UPLINKS_GCP_PROJECT", "bench")
        .env("FERRY_UPLINKS_GCP_TOPIC", "readings")
        .env("FERRY_UPLINKS_GCP_ENDPOINT", format!("http://{}", emu.addr))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut ready = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(json) = line.strip_prefix("ready ") {
            ready = Some(json.to_owned());
            break;
        }
    }
    let kill = |mut c: Child| {
        let _ = c.kill();
        let _ = c.wait();
    };
    let Some(json) = ready else {
        kill(child);
        return Err(format!(
            "ferry did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    };
    let t = Instant::now();
    let addrs: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&json).map_err(|e| format!("ready line: {e}"))?;
    let http_addr = addrs.get("http").cloned().ok_or("no http listener")?;
    let metric = |name: &str| -> Option<f64> {
        let body = http(&http_addr, "GET", "/metrics", "").ok()?.1;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    while metric("ferry_buffer_readings ") != Some(0.0) {
        if t.elapsed() > Duration::from_secs(1800) {
            kill(child);
            return Err(format!("ferry did not drain {n} readings in 1800 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed().as_secs_f64();
    let cpu = proc_cpu_secs(&child.id().to_string(), false).ok_or("ferry's CPU time")?;
    // Every reading left the buffer confirmed by a message id, none dead-lettered.
    let acked = metric("ferry_uplink_acked_total{uplink=\"gcp\"} ");
    let dead = metric("ferry_uplink_dead_lettered_total{uplink=\"gcp\"} ").unwrap_or(0.0);
    kill(child);
    if acked != Some(n as f64) || dead != 0.0 {
        return Err(format!(
            "ferry acked {acked:?} of {n} readings and dead-lettered {dead}"
        ));
    }
    Ok((took, cpu))
}

/// The Python client publishes every line of the input: prints seconds and published count.
const PUBLISH: &str = r#"
import sys, time
from google.cloud import pubsub_v1
path, n = sys.argv[1], int(sys.argv[2])
msgs = []
with open(path, "rb") as f:
    for i, line in enumerate(f):
        device, topic, payload = line.rstrip(b"\n").split(b"\t", 2)
        attrs = {"ferry-id": "bench-%d" % (i + 1), "ferry-device": device.decode(),
                 "ferry-topic": topic.decode(), "ferry-received-at": str(1763000000000 + i),
                 "ferry-source": "mqtt"}
        msgs.append((payload, attrs))
client = pubsub_v1.PublisherClient(
    batch_settings=pubsub_v1.types.BatchSettings(max_messages=1000, max_bytes=9 * 1000 * 1000))
topic = client.topic_path("bench", "readings")
t = time.monotonic()
futures = [client.publish(topic, data, **attrs) for data, attrs in msgs]
ids = [f.result() for f in futures]
took = time.monotonic() - t
assert len(ids) == n, (len(ids), n)
print(took)
"#;

/// The Python client publishes the input: (seconds, CPU seconds of the process).
fn drain_python(python: &str, input: &Path, emu: &Emulator, n: u64) -> Res<(f64, f64)> {
    let cpu0 = proc_cpu_secs("self", true);
    let out = Command::new(python)
        .arg("-c")
        .arg(PUBLISH)
        .arg(input)
        .arg(n.to_string())
        .env("PUBSUB_EMULATOR_HOST", &emu.addr)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {python}: {e}"))?;
    let cpu = proc_cpu_secs("self", true)
        .zip(cpu0)
        .map(|(b, a)| b - a)
        .ok_or("the Python client's CPU time")?;
    if !out.status.success() {
        return Err(format!(
            "the Python client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let secs = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("the Python client's output: {e}"))?;
    Ok((secs, cpu))
}
