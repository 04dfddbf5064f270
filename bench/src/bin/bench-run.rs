//! `bench-run`: every benchmark scenario, side by side with its peer, in one run on
//! this machine, printed as one Markdown table with the machine description.
//!
//! ```text
//! cargo run --release -p ferry-bench --bin bench-run [-- --smoke] [--only 1,4] [--out FILE]
//! ```
//!
//! Scenarios (each row gives its goal and `pass` / `short`, or `info` where there is none):
//! 1. QoS1 ingest: ferry (durable acks, no uplink) against Debian's mosquitto (persistence
//!    off), same load (`ferry-load`), alternating rounds; the ratio of the mean rates.
//! 2. QoS0 ingest: the same.
//! 3. HTTP ingest, 1 and 100 readings per request, with a no-work axum handler (`null_http`)
//!    as the peer column.
//! 4. Drain: a backlog (1M readings) in ferry's buffer to librdkafka's mock cluster, against
//!    `kcat -P` producing the same records (key = device, value = payload, the five headers
//!    ferry puts on each reading; zstd, acks=all, idempotence), alternating rounds, each on a
//!    fresh mock cluster; the ratio of the mean rates. Two `info` rows: kcat producing key and
//!    value only, and ferry with `delivery = "segment"` (one record per buffer segment).
//! 5. Footprint: RSS idle and at 10k msg/s open loop over 1,000 connections (peak `VmHWM`,
//!    steady `VmRSS`), bytes written to disk (`/proc/PID/io` `write_bytes`) per payload byte
//!    during QoS1 runs, buffer file bytes per reading, compression ratio per codec and level.
//! 6. Recovery: ferry is SIGKILLed holding a 1M-reading backlog and restarted; time from spawn
//!    to its `ready` line, and its peak RSS by then.
//! 7. Ingest matrix: QoS 1 and 2 × 10, 50 and 500 clients × 1, 16 and 100 in flight per client
//!    × 64 B, 200 B and 1 KiB payloads, ferry (durable acks, `max_inflight` 100) against
//!    mosquitto (persistence off, no in-flight limit), same load, alternating rounds, `sync`
//!    before each run. Per cell: the rates, each broker's CPU seconds per 1M readings and
//!    cores used (`/proc/PID/stat`), and the load tool's cores. A cell is judged (goal ≥ 1.5×
//!    and CPU per reading ≤ mosquitto's) only where mosquitto, single-threaded, used at least
//!    [`SATURATED`] of a core; below that the load, not mosquitto, set its rate.
//! 8. Instructions per reading: ferry and mosquitto each run under `valgrind --tool=cachegrind`
//!    twice, for 5,000 and 25,000 readings of the same load (QoS 1, 10 clients × 16 in flight,
//!    100 B) and stopped with SIGTERM; the difference of the instruction totals over the
//!    difference of the readings. User-space instructions only (the kernel's share of
//!    fsync and sockets is not counted); noise cannot move the figure much, the group
//!    commit's batch sizes can a little.
//! 9. Local subscribers: ferry as the box's broker against mosquitto (persistence off, no
//!    queue limit, at most [`WINDOW`] unacknowledged messages per subscriber like ferry),
//!    `ferry-load --subscribers` (MQTT 3.1.1), QoS 1 both ways, alternating rounds. Delivered
//!    messages per second for 1 publisher → 10 subscribers on `sensors/#` and 50 publishers →
//!    1 subscriber (goal ≥ 1.0× mosquitto), with ferry's subscriber drops; publish-to-delivery
//!    latency p50 / p99 for 50 → 1 at half the lower of the two delivered rates; RSS per idle
//!    subscriber connection with 1,000 connected, and in total.
//! 10. Commands down: a cloud broker (mosquitto) to a device subscribed on the box, through
//!     ferry's MQTT uplink with a `downlink` (each command handed over before its PUBACK goes
//!     upstream) against a second mosquitto on the box bridging `sensors/# in 1` from the
//!     cloud (mosquitto's bridge `in` direction), both with a [`WINDOW`] of unacknowledged
//!     messages. `ferry-load --sub-addr`: 1 cloud publisher → 1 device, QoS 1, alternating
//!     rounds; delivered commands per second (goal ≥ 1.0× the bridge), and publish-to-delivery
//!     latency p50 / p99 at half the lower rate.
//!
//! `--smoke` runs everything with tiny sizes in seconds (the CI smoke test); its figures mean
//! nothing. A scenario whose peer tool is missing reports `skipped`, or fails the run when
//! `FERRY_REQUIRE_TOOLS=1`. The run exits non-zero if any row is an `error`.

use clap::Parser;
use ferry_bench::{compression_ratios, fleet_readings, proc_cpu_secs, proc_field};
use ferry_buffer::{Buffer, BufferOptions};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "bench-run",
    about = "Runs ferry's benchmark scenarios and prints one table"
)]
struct Opts {
    /// Tiny sizes, seconds in all (CI). The figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Run only these scenarios (comma-separated numbers 1-8).
    #[arg(long, value_delimiter = ',')]
    only: Vec<u32>,
    /// Also write the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The ferry binary. Default: `ferry` beside this binary, built first
    /// (`ferry_bench::ferry_binary`).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// Seconds per load run (default 10; smoke 1).
    #[arg(long)]
    secs: Option<f64>,
    /// Alternating rounds per comparison (default 2; smoke 1).
    #[arg(long)]
    rounds: Option<u32>,
    /// Backlog for the drain and recovery scenarios (default 1,000,000; smoke 2,000).
    #[arg(long)]
    backlog: Option<u64>,
    /// Seconds per load run in the ingest matrix, scenario 7 (default 3; smoke 1).
    #[arg(long)]
    matrix_secs: Option<f64>,
    /// Keep scenario 8's cachegrind profiles here (for `cg_annotate`); by default they go
    /// with the work directory.
    #[arg(long)]
    cachegrind_dir: Option<PathBuf>,
    /// Where temporary data directories go (default: `target/bench-run` under the current
    /// directory, on the real disk rather than a tmpfs).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// The sizes of one run.
#[derive(Debug, Clone)]
struct Sizes {
    smoke: bool,
    secs: f64,
    matrix_secs: f64,
    rounds: u32,
    clients: usize,
    http_clients: usize,
    backlog: u64,
    footprint_conns: usize,
    footprint_rate: f64,
    idle_wait: Duration,
}

#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Pass,
    Short,
    Info,
    Skipped(String),
    Error(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Pass => write!(f, "pass"),
            Verdict::Short => write!(f, "**short**"),
            Verdict::Info => write!(f, "info"),
            Verdict::Skipped(w) => write!(f, "skipped: {w}"),
            Verdict::Error(w) => write!(f, "error: {w}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Row {
    scenario: &'static str,
    metric: String,
    ferry: String,
    peer: String,
    ratio: String,
    goal: String,
    verdict: Verdict,
}

fn row(scenario: &'static str, metric: impl Into<String>) -> Row {
    Row {
        scenario,
        metric: metric.into(),
        ferry: "–".into(),
        peer: "–".into(),
        ratio: "–".into(),
        goal: "–".into(),
        verdict: Verdict::Info,
    }
}

impl Row {
    fn ferry(mut self, v: impl Into<String>) -> Row {
        self.ferry = v.into();
        self
    }
    fn peer(mut self, v: impl Into<String>) -> Row {
        self.peer = v.into();
        self
    }
    fn ratio(mut self, r: f64) -> Row {
        self.ratio = format!("{r:.2}×");
        self
    }
    fn goal(mut self, g: impl Into<String>, pass: bool) -> Row {
        self.goal = g.into();
        self.verdict = if pass { Verdict::Pass } else { Verdict::Short };
        self
    }
    fn verdict(mut self, v: Verdict) -> Row {
        self.verdict = v;
        self
    }
}

type Res<T> = Result<T, String>;

/// One scenario: its rows.
type Scenario = fn(&Ctx) -> Vec<Row>;

fn main() -> std::process::ExitCode {
    let opts = Opts::parse();
    let sizes = if opts.smoke {
        Sizes {
            smoke: true,
            secs: opts.secs.unwrap_or(1.0),
            matrix_secs: opts.matrix_secs.unwrap_or(1.0),
            rounds: opts.rounds.unwrap_or(1),
            clients: 4,
            http_clients: 4,
            backlog: opts.backlog.unwrap_or(2_000),
            footprint_conns: 20,
            footprint_rate: 200.0,
            idle_wait: Duration::from_millis(300),
        }
    } else {
        Sizes {
            smoke: false,
            secs: opts.secs.unwrap_or(10.0),
            matrix_secs: opts.matrix_secs.unwrap_or(3.0),
            rounds: opts.rounds.unwrap_or(2),
            clients: 50,
            http_clients: 64,
            backlog: opts.backlog.unwrap_or(1_000_000),
            footprint_conns: 1000,
            footprint_rate: 10_000.0,
            idle_wait: Duration::from_secs(3),
        }
    };
    raise_nofile();
    let bins = Bins::locate(&opts);
    let base = opts
        .work_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench-run"));
    std::fs::create_dir_all(&base).expect("create the work directory");
    let work = tempfile::tempdir_in(&base).expect("work directory");
    let ctx = Ctx {
        bins,
        sizes: sizes.clone(),
        work: work.path().to_path_buf(),
        cachegrind_dir: opts.cachegrind_dir.clone(),
        require_tools: std::env::var("FERRY_REQUIRE_TOOLS").as_deref() == Ok("1"),
    };
    let want = |n: u32| opts.only.is_empty() || opts.only.contains(&n);
    let mut rows = Vec::new();
    let scenarios: [(u32, &str, Scenario); 10] = [
        (1, "1 QoS1 ingest", |c| qos_vs_mosquitto(c, 1)),
        (2, "2 QoS0 ingest", |c| qos_vs_mosquitto(c, 0)),
        (3, "3 HTTP ingest", http_ingest),
        (4, "4 drain", drain),
        (5, "5 footprint", footprint),
        (6, "6 recovery", recovery),
        (7, "7 ingest matrix", matrix),
        (8, "8 instructions", instructions),
        (9, "9 local subscribers", subscribers),
        (10, "10 commands down", commands),
    ];
    for (n, name, f) in scenarios {
        if want(n) {
            eprintln!("bench-run: scenario {name} ...");
            // Each scenario starts with no dirty pages of the one before (the drain's backlog
            // copies are ~100 MB): their writeback would stall this one's fsyncs.
            let _ = Command::new("sync").status();
            let t = Instant::now();
            let rs = f(&ctx);
            eprintln!(
                "bench-run: scenario {name} took {:.1} s",
                t.elapsed().as_secs_f64()
            );
            rows.extend(rs);
        }
    }
    // Scenario order (scenario 1 also reports footprint rows); stable within a scenario.
    rows.sort_by_key(|r| r.scenario);
    let table = render(&ctx, &opts, &rows);
    println!("{table}");
    if let Some(p) = &opts.out {
        std::fs::write(p, &table).expect("write --out");
    }
    if rows.iter().any(|r| matches!(r.verdict, Verdict::Error(_))) {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// Raises the soft open-files limit to the hard one (1,000 connections need ~1,000 sockets on
/// each side); children inherit it.
fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.maximum.is_none() || l.current < l.maximum {
        l.current = l.maximum.or(Some(65_536));
        let _ = setrlimit(Resource::Nofile, l);
    }
}

#[derive(Debug, Clone)]
struct Bins {
    ferry: PathBuf,
    load: PathBuf,
    null_http: PathBuf,
    floor: PathBuf,
}

impl Bins {
    fn locate(opts: &Opts) -> Bins {
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe.parent().expect("bin dir").to_path_buf();
        Bins {
            ferry: ferry_bench::ferry_binary(opts.ferry.as_deref()).unwrap_or_else(|e| {
                eprintln!("bench-run: {e}");
                std::process::exit(2)
            }),
            load: dir.join("ferry-load"),
            null_http: dir.join("null_http"),
            floor: dir.join("producer-floor"),
        }
    }
}

#[derive(Debug)]
struct Ctx {
    bins: Bins,
    sizes: Sizes,
    work: PathBuf,
    cachegrind_dir: Option<PathBuf>,
    require_tools: bool,
}

impl Ctx {
    /// Whether a Debian tool is on PATH; `Err` (an error row) when it is missing and
    /// `FERRY_REQUIRE_TOOLS=1`, as `ferry_tests::require_tool` does for tests.
    fn tool(&self, tool: &str) -> Res<bool> {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found && self.require_tools {
            return Err(format!(
                "'{tool}' is required (FERRY_REQUIRE_TOOLS=1) but not installed"
            ));
        }
        if !found {
            eprintln!("bench-run: SKIPPED the {tool} side: '{tool}' is not installed");
        }
        Ok(found)
    }

    fn fresh_dir(&self, name: &str) -> PathBuf {
        let d = self.work.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create dir");
        d
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A running ferry.
#[derive(Debug)]
struct Gw {
    child: Child,
    addrs: BTreeMap<String, String>,
    /// From spawn to the `ready` line.
    ready_after: Duration,
    log: PathBuf,
}

impl Gw {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }
    fn mqtt(&self) -> Res<String> {
        self.addrs
            .get("mqtt")
            .cloned()
            .ok_or("no mqtt listener".into())
    }
    fn http(&self) -> Res<String> {
        self.addrs
            .get("http")
            .map(|a| format!("http://{a}"))
            .ok_or("no http listener".into())
    }
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// A gauge or counter from `/metrics` (the first sample of that name).
    fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.addrs.get("http")?, "/metrics").ok()?.1;
        body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name || k.starts_with(&format!("{name}{{"))).then(|| v.parse().ok())?
        })
    }
    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" / ")
    }
}

/// Starts ferry on `data_dir` with every listener on 127.0.0.1:0, the Kafka uplink off unless
/// `env` turns it on, and waits for its `ready` line.
fn start_ferry(ctx: &Ctx, data_dir: &Path, env: &[(&str, &str)]) -> Res<Gw> {
    start_ferry_under(ctx, data_dir, env, &[])
}

/// [`start_ferry`] under a wrapper command (`valgrind --tool=cachegrind ...`), if not empty.
fn start_ferry_under(
    ctx: &Ctx,
    data_dir: &Path,
    env: &[(&str, &str)],
    wrapper: &[String],
) -> Res<Gw> {
    start_ferry_conf(ctx, data_dir, env, wrapper, "")
}

/// [`start_ferry_under`] with `toml` as its config file (what the environment cannot say,
/// such as arrays of tables).
fn start_ferry_conf(
    ctx: &Ctx,
    data_dir: &Path,
    env: &[(&str, &str)],
    wrapper: &[String],
    toml: &str,
) -> Res<Gw> {
    let cfg = ctx.work.join("ferry.toml");
    std::fs::write(&cfg, toml).map_err(|e| e.to_string())?;
    let log = ctx.work.join(format!(
        "ferry-{}.log",
        data_dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| e.to_string())?;
    let mut cmd = command_under(wrapper, &ctx.bins.ferry);
    cmd.arg("run")
        .arg("--config")
        .arg(&cfg)
        .env_remove("FERRY_CONFIG")
        .env("FERRY_GATEWAY_DATA_DIR", data_dir)
        .env("FERRY_GATEWAY_ID", "bench")
        .env("FERRY_MQTT_LISTEN", "127.0.0.1:0")
        .env("FERRY_HTTP_LISTEN", "127.0.0.1:0")
        .env("FERRY_MQTT_MAX_CONNECTIONS", "4096")
        .env("FERRY_HTTP_MAX_CONNECTIONS", "4096")
        .env("FERRY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", ctx.bins.ferry.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(json) = line.strip_prefix("ready ") {
                let _ = tx.send((json.to_string(), Instant::now()));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok((json, at)) => {
            let addrs: BTreeMap<String, String> =
                serde_json::from_str(&json).map_err(|e| format!("ready line: {e}"))?;
            Ok(Gw {
                child,
                addrs,
                ready_after: at - t,
                log,
            })
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "ferry was not ready within 120 s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }
}

/// `program` run by `wrapper` (`valgrind --tool=cachegrind ...`), or directly when it is empty.
fn command_under(wrapper: &[String], program: impl AsRef<std::ffi::OsStr>) -> Command {
    match wrapper.split_first() {
        Some((w, args)) => {
            let mut c = Command::new(w);
            c.args(args).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Debian's mosquitto with persistence off on a free port.
#[derive(Debug)]
struct Mosquitto {
    child: Child,
    addr: String,
}

impl Mosquitto {
    fn start(ctx: &Ctx) -> Res<Mosquitto> {
        Mosquitto::start_under(ctx, &[])
    }
    /// [`Mosquitto::start`] under a wrapper command, if not empty.
    fn start_under(ctx: &Ctx, wrapper: &[String]) -> Res<Mosquitto> {
        Mosquitto::start_conf(ctx, wrapper, 0)
    }
    /// With `max_inflight` unacknowledged QoS 1/2 messages per subscriber at most (0: no limit).
    fn start_conf(ctx: &Ctx, wrapper: &[String], max_inflight: u16) -> Res<Mosquitto> {
        Mosquitto::start_with(ctx, wrapper, max_inflight, "")
    }
    /// [`Mosquitto::start_conf`] with `extra` lines at the end of its config (a bridge).
    fn start_with(ctx: &Ctx, wrapper: &[String], max_inflight: u16, extra: &str) -> Res<Mosquitto> {
        let port = free_port()?;
        let conf = ctx.work.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_inflight_messages {max_inflight}\nmax_queued_messages 0\nmax_connections -1\n\
                 {extra}"
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = command_under(wrapper, "mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn mosquitto: {e}"))?;
        let addr = format!("127.0.0.1:{port}");
        wait_port(&addr)?;
        Ok(Mosquitto { child, addr })
    }
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn wait_port(addr: &str) -> Res<()> {
    let a: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("nothing listens on {addr} after 10 s"))
}

/// A minimal HTTP/1.1 GET: (status, body).
fn http_get(addr: &str, path: &str) -> Res<(u16, String)> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status line")?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, body.to_string()))
}

/// One `ferry-load` run's JSON summary.
#[derive(Debug, Clone, serde::Deserialize)]
struct Load {
    acked: u64,
    rate: f64,
    payload_bytes: u64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    errors_total: u64,
    errors: BTreeMap<String, u64>,
}

impl Load {
    fn p99(&self) -> String {
        self.p99_ms.map_or("n/a".into(), |v| format!("{v:.1}"))
    }
}

/// Runs `ferry-load ARGS --json` and reads its summary.
fn run_json<T: serde::de::DeserializeOwned>(ctx: &Ctx, args: &[String]) -> Res<T> {
    let out = Command::new(&ctx.bins.load)
        .args(args)
        .arg("--json")
        .output()
        .map_err(|e| format!("spawn ferry-load: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ferry-load {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).map_err(|e| format!("ferry-load output {line:?}: {e}"))
}

fn run_load(ctx: &Ctx, args: &[String]) -> Res<Load> {
    let l: Load = run_json(ctx, args)?;
    if l.acked == 0 {
        return Err(format!(
            "ferry-load {args:?}: nothing acked, errors {:?}",
            l.errors
        ));
    }
    Ok(l)
}

fn mqtt_args(addr: &str, qos: u8, clients: usize, secs: f64) -> Vec<String> {
    vec![
        "mqtt".into(),
        addr.into(),
        "--qos".into(),
        qos.to_string(),
        "--clients".into(),
        clients.to_string(),
        "--secs".into(),
        secs.to_string(),
    ]
}

fn error_rows(scenario: &'static str, e: String) -> Vec<Row> {
    vec![row(scenario, "run").verdict(Verdict::Error(e))]
}

fn errs(l: &Load) -> String {
    if l.errors_total == 0 {
        String::new()
    } else {
        format!(" ({} errors: {:?})", l.errors_total, l.errors)
    }
}

fn rss_mib(pid: &str, key: &str) -> f64 {
    proc_field(pid, "status", key).unwrap_or(0) as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Scenarios 1 and 2

/// Per round: (ferry load, ferry write_bytes delta, ferry buffer file bytes), mosquitto load.
type QosRounds = (Vec<(Load, Option<u64>, u64)>, Vec<Load>);

fn qos_rounds(ctx: &Ctx, qos: u8, with_peer: bool) -> Res<QosRounds> {
    let s = &ctx.sizes;
    let (mut ferry, mut mosq) = (Vec::new(), Vec::new());
    for r in 0..s.rounds {
        let dir = ctx.fresh_dir(&format!("qos{qos}-r{r}"));
        let gw = start_ferry(ctx, &dir, &[])?;
        let before = proc_field(&gw.pid(), "io", "write_bytes:");
        let l = run_load(ctx, &mqtt_args(&gw.mqtt()?, qos, s.clients, s.secs));
        let after = proc_field(&gw.pid(), "io", "write_bytes:");
        let file = std::fs::metadata(dir.join(ferry_buffer::FILE_NAME))
            .map(|m| m.len())
            .unwrap_or(0);
        let tail = gw.log_tail();
        gw.kill();
        let l = l.map_err(|e| format!("{e}; ferry log: {tail}"))?;
        ferry.push((l, after.zip(before).map(|(a, b)| a - b), file));
        if with_peer {
            let m = Mosquitto::start(ctx)?;
            let l = run_load(ctx, &mqtt_args(&m.addr, qos, s.clients, s.secs));
            m.kill();
            mosq.push(l?);
        }
    }
    Ok((ferry, mosq))
}

fn qos_vs_mosquitto(ctx: &Ctx, qos: u8) -> Vec<Row> {
    let sc: &'static str = if qos == 1 {
        "1 QoS1 ingest"
    } else {
        "2 QoS0 ingest"
    };
    let with_peer = match ctx.tool("mosquitto") {
        Ok(b) => b,
        Err(e) => return error_rows(sc, e),
    };
    let (ferry, mosq) = match qos_rounds(ctx, qos, with_peer) {
        Ok(x) => x,
        Err(e) => return error_rows(sc, e),
    };
    let s = &ctx.sizes;
    let fr = ferry.iter().map(|(l, ..)| l.rate).sum::<f64>() / ferry.len() as f64;
    let per_round = |v: &mut dyn Iterator<Item = f64>| {
        v.map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
    };
    let metric = format!(
        "msg/s, {} clients, {} B, {} s × {} alternating rounds (per round)",
        s.clients, 100, s.secs, s.rounds
    );
    let ferry_cell = format!(
        "{fr:.0} ({}){}",
        per_round(&mut ferry.iter().map(|(l, ..)| l.rate)),
        ferry.iter().map(|(l, ..)| errs(l)).collect::<String>()
    );
    let goal = if qos == 1 {
        "≥ 1.0× mosquitto"
    } else {
        "≥ 1.0× mosquitto (QoS1's goal)"
    };
    let mut rows = Vec::new();
    let mut r = row(sc, metric).ferry(ferry_cell);
    if with_peer {
        let mr = mosq.iter().map(|l| l.rate).sum::<f64>() / mosq.len() as f64;
        let ratio = fr / mr;
        r = r
            .peer(format!(
                "mosquitto {mr:.0} ({}){}",
                per_round(&mut mosq.iter().map(|l| l.rate)),
                mosq.iter().map(errs).collect::<String>()
            ))
            .ratio(ratio)
            .goal(goal, ratio >= 1.0);
    } else {
        r = r
            .goal(goal, false)
            .verdict(Verdict::Skipped("mosquitto not installed".into()));
    }
    rows.push(r);
    if qos == 1 {
        let last = &ferry[ferry.len() - 1].0;
        let mut r = row(sc, "ack p50 / p99 ms (last round)").ferry(format!(
            "{:.1} / {}",
            last.p50_ms.unwrap_or(0.0),
            last.p99()
        ));
        if let Some(m) = mosq.last() {
            r = r.peer(format!("{:.1} / {}", m.p50_ms.unwrap_or(0.0), m.p99()));
        }
        rows.push(r);
        // Write amplification and buffer bytes per reading from the same QoS1 runs.
        let wa: Vec<f64> = ferry
            .iter()
            .filter_map(|(l, w, _)| w.map(|w| w as f64 / l.payload_bytes.max(1) as f64))
            .collect();
        if wa.is_empty() {
            rows.push(
                row(
                    "5 footprint",
                    "disk bytes written / payload byte, QoS1 max rate",
                )
                .verdict(Verdict::Skipped("/proc/PID/io not readable".into())),
            );
        } else {
            let mean = wa.iter().sum::<f64>() / wa.len() as f64;
            rows.push(
                row(
                    "5 footprint",
                    "disk bytes written / payload byte, QoS1 max rate (scenario 1 runs)",
                )
                .ferry(format!(
                    "{mean:.2} ({})",
                    wa.iter()
                        .map(|w| format!("{w:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .goal("≤ 1.0", mean <= 1.0),
            );
        }
        let (l, _, file) = &ferry[ferry.len() - 1];
        rows.push(
            row(
                "5 footprint",
                "buffer file bytes / reading (after the last QoS1 run)",
            )
            .ferry(format!(
                "{:.1} ({} B file, {} readings)",
                *file as f64 / l.acked.max(1) as f64,
                file,
                l.acked
            )),
        );
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// Scenario 3

fn http_ingest(ctx: &Ctx) -> Vec<Row> {
    const SC: &str = "3 HTTP ingest";
    match http_runs(ctx) {
        Ok(rows) => rows,
        Err(e) => error_rows(SC, e),
    }
}

fn http_runs(ctx: &Ctx) -> Res<Vec<Row>> {
    const SC: &str = "3 HTTP ingest";
    let s = &ctx.sizes;
    let args = |url: &str, batch: usize| -> Vec<String> {
        vec![
            "http".into(),
            url.into(),
            "--batch".into(),
            batch.to_string(),
            "--clients".into(),
            s.http_clients.to_string(),
            "--secs".into(),
            s.secs.to_string(),
        ]
    };
    let mut null = NullHttp::start(ctx)?;
    let n1 = run_load(ctx, &args(&null.url, 1));
    let n100 = run_load(ctx, &args(&null.url, 100));
    null.kill();
    let (n1, n100) = (n1?, n100?);
    let mut out = Vec::new();
    for (batch, nl) in [(1usize, &n1), (100, &n100)] {
        let dir = ctx.fresh_dir(&format!("http-{batch}"));
        let gw = start_ferry(ctx, &dir, &[("FERRY_MQTT_ENABLED", "false")])?;
        let l = run_load(ctx, &args(&gw.http()?, batch));
        let tail = gw.log_tail();
        gw.kill();
        let l = l.map_err(|e| format!("{e}; ferry log: {tail}"))?;
        let metric = format!(
            "readings/s, {batch} reading(s)/request, {} clients (p99 ms)",
            s.http_clients
        );
        let ratio = l.rate / nl.rate;
        let r = row(SC, metric)
            .ferry(format!("{:.0} ({}){}", l.rate, l.p99(), errs(&l)))
            .peer(format!("no-work handler {:.0} ({})", nl.rate, nl.p99()))
            .ratio(ratio);
        out.push(if batch == 1 {
            r.goal("≥ 0.5× no-work handler", ratio >= 0.5)
        } else {
            r.goal("≥ 200,000 readings/s", l.rate >= 200_000.0)
        });
    }
    Ok(out)
}

#[derive(Debug)]
struct NullHttp {
    child: Child,
    url: String,
}

impl NullHttp {
    fn start(ctx: &Ctx) -> Res<NullHttp> {
        let mut child = Command::new(&ctx.bins.null_http)
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn null_http: {e}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().ok_or("no stdout")?)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .ok_or("null_http printed no address")?;
        Ok(NullHttp {
            url: format!("http://{addr}"),
            child,
        })
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Backlogs (scenarios 4 and 6)

/// A data directory holding `n` readings of ~100-byte JSON telemetry from 500 devices, for
/// consumer `kafka`, written through the buffer crate in 1,000-reading appends and closed
/// cleanly. Made once per run and copied.
fn backlog(ctx: &Ctx) -> Res<PathBuf> {
    let dir = ctx.work.join("backlog-template");
    if dir.join(ferry_buffer::FILE_NAME).exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let n = ctx.sizes.backlog;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let opts = BufferOptions {
            consumers: vec!["kafka".into()],
            max_bytes: 16 << 30,
            ..BufferOptions::default()
        };
        let buf = Buffer::open(&dir, opts).map_err(|e| e.to_string())?;
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let buf = buf.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = t * 1000;
                while i < n {
                    buf.append(fleet_readings(i, (i + 1000).min(n), 500))
                        .await
                        .map_err(|e| e.to_string())?;
                    i += 8 * 1000;
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        buf.close().await;
        Ok::<(), String>(())
    })?;
    Ok(dir)
}

fn copy_backlog(ctx: &Ctx, name: &str) -> Res<PathBuf> {
    let src = backlog(ctx)?;
    let dst = ctx.fresh_dir(name);
    for e in std::fs::read_dir(&src).map_err(|e| e.to_string())? {
        let e = e.map_err(|e| e.to_string())?;
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).map_err(|e| e.to_string())?;
        }
    }
    Ok(dst)
}

// ---------------------------------------------------------------------------------------------
// Scenario 4

fn drain(ctx: &Ctx) -> Vec<Row> {
    const SC: &str = "4 drain";
    let with_kcat = match ctx.tool("kcat") {
        Ok(b) => b,
        Err(e) => return error_rows(SC, e),
    };
    match drain_run(ctx, with_kcat) {
        Ok(r) => r,
        Err(e) => error_rows(SC, e),
    }
}

fn drain_run(ctx: &Ctx, with_kcat: bool) -> Res<Vec<Row>> {
    const SC: &str = "4 drain";
    let n = ctx.sizes.backlog;
    let input = with_kcat.then(|| kcat_input(ctx, n)).transpose()?;
    // The same records: key = device id, value = payload, and the five headers ferry sends
    // with every reading (`ferry-id`, `ferry-topic`, `ferry-device`, `ferry-received-at`,
    // `ferry-source`). kcat can only give every record the same header values, so they are
    // those of the middle reading: same names, same lengths, the same work for librdkafka.
    let mid = fleet_readings(n / 2, n / 2 + 1, 500).remove(0);
    let headers = [
        format!("ferry-id=bench-{}", n / 2 + 1),
        format!("ferry-topic={}", mid.topic),
        format!("ferry-device={}", mid.device),
        format!("ferry-received-at={}", mid.received_at_ms),
        format!("ferry-source={}", mid.source.as_str()),
    ];
    // Alternating rounds, each on a fresh mock cluster (it keeps every record in memory).
    let (mut ferry_s, mut kcat_s, mut bare_s, mut floor_s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ctx.sizes.rounds.max(1) {
        ferry_s.push(drain_ferry(ctx, n, "reading")?);
        if let Some(input) = &input {
            kcat_s.push(drain_kcat(input, &headers)?);
            floor_s.push(drain_floor(ctx, input, &headers)?);
            if round == 0 {
                // For reference: kcat's records without the headers (the comparison in
                // BENCHMARKS.md before 2026-12-01).
                bare_s.push(drain_kcat(input, &[])?);
            }
        }
    }
    let rate = |d: &[Drained]| n as f64 * d.len() as f64 / d.iter().map(|d| d.secs).sum::<f64>();
    let times = |d: &[Drained]| {
        d.iter()
            .map(|d| format!("{:.2}", d.secs))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // CPU seconds (all threads) per million records, the mean of the rounds: less noisy than
    // the wall clock, and what a shared edge box pays.
    let cpu =
        |d: &[Drained]| d.iter().map(|d| d.cpu).sum::<f64>() / d.len() as f64 * 1e6 / n as f64;
    let fr = rate(&ferry_s);
    let r = row(
        SC,
        format!(
            "{n}-reading backlog to the mock cluster, readings/s ({} alternating rounds)",
            ferry_s.len()
        ),
    )
    .ferry(format!("{fr:.0} ({} s)", times(&ferry_s)));
    if input.is_none() {
        return Ok(vec![
            r.goal("≥ 1.0× kcat", false)
                .verdict(Verdict::Skipped("kcat not installed".into())),
        ]);
    }
    let (kr, br) = (rate(&kcat_s), rate(&bare_s));
    let ratio = fr / kr;
    // For reference: one record per segment (the segment as stored, gzip), once.
    let seg_s = [drain_ferry(ctx, n, "segment")?];
    let sr = rate(&seg_s);
    let (fc, kc) = (cpu(&ferry_s), cpu(&kcat_s));
    let fl = rate(&floor_s);
    Ok(vec![
        r.peer(format!("kcat -P {kr:.0} ({} s)", times(&kcat_s)))
            .ratio(ratio)
            .goal("≥ 1.0× kcat", ratio >= 1.0),
        row(
            SC,
            "CPU seconds per 1M readings, every thread of the producing process (same records)",
        )
        .ferry(format!("{fc:.2}"))
        .peer(format!("kcat -P {kc:.2}"))
        // Higher is better, as in every other row: kcat's CPU over ferry's.
        .ratio(kc / fc),
        row(
            SC,
            "against a bare producer loop with ferry's rdkafka 0.39 / librdkafka 2.12.1 \
             (`producer-floor`, same records, no buffer), readings/s",
        )
        .ferry(format!("{fr:.0}"))
        .peer(format!(
            "{fl:.0} ({} s; CPU {:.2} s per 1M)",
            times(&floor_s),
            cpu(&floor_s)
        ))
        .ratio(fr / fl),
        row(
            SC,
            format!("{n}-reading backlog, against kcat -P with key and value only, readings/s"),
        )
        .ferry(format!("{fr:.0}"))
        .peer(format!("{br:.0} ({} s)", times(&bare_s)))
        .ratio(fr / br),
        row(
            SC,
            format!(
                "{n}-reading backlog with `delivery = \"segment\"` (one record per segment), readings/s"
            ),
        )
        .ferry(format!("{sr:.0} ({} s)", times(&seg_s)))
        .peer(format!("kcat -P {kr:.0}, same records as above"))
        .ratio(sr / kr),
    ])
}

/// A fresh mock cluster with the topic `topic` (4 partitions).
fn drain_cluster(topic: &str) -> Res<MockCluster<'static, DefaultProducerContext>> {
    let mock: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).map_err(|e| format!("mock cluster: {e}"))?;
    mock.create_topic(topic, 4, 1).map_err(|e| e.to_string())?;
    Ok(mock)
}

/// ferry drains a copy of the backlog with a Kafka uplink's `delivery = delivery`; seconds from its
/// ready line until the buffer is empty.
fn drain_ferry(ctx: &Ctx, n: u64, delivery: &str) -> Res<Drained> {
    let dir = copy_backlog(ctx, "drain")?;
    let mock = drain_cluster("ferry.readings")?;
    let bootstrap = mock.bootstrap_servers();
    let gw = start_ferry(
        ctx,
        &dir,
        &[
            ("FERRY_UPLINKS_KAFKA_TYPE", "kafka"),
            ("FERRY_UPLINKS_KAFKA_BROKERS", &bootstrap),
            ("FERRY_UPLINKS_KAFKA_DELIVERY", delivery),
            ("FERRY_MQTT_ENABLED", "false"),
        ],
    )?;
    // Timed from the ready line: recovery is scenario 6.
    let t = Instant::now();
    let until = t + Duration::from_secs(900);
    let mut drained = false;
    while Instant::now() < until {
        if gw.metric("ferry_buffer_readings") == Some(0.0) {
            drained = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed().as_secs_f64();
    // All of ferry's CPU time until drained, its start included.
    let cpu = proc_cpu_secs(&gw.child.id().to_string(), false);
    let tail = gw.log_tail();
    gw.kill();
    if !drained {
        return Err(format!(
            "ferry did not drain {n} readings in 900 s; log: {tail}"
        ));
    }
    Ok(Drained {
        secs: took,
        cpu: cpu.ok_or("cannot read ferry's CPU time")?,
    })
}

/// One drain: wall-clock seconds, and CPU seconds (user + system, every thread) of the
/// process that produced the records.
struct Drained {
    secs: f64,
    cpu: f64,
}

/// The backlog's records as kcat input: `device \t payload` per line.
fn kcat_input(ctx: &Ctx, n: u64) -> Res<PathBuf> {
    let input = ctx.work.join("kcat-input");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&input).map_err(|e| e.to_string())?);
    for chunk in (0..n).step_by(10_000) {
        for r in fleet_readings(chunk, (chunk + 10_000).min(n), 500) {
            f.write_all(r.device.as_bytes())
                .map_err(|e| e.to_string())?;
            f.write_all(b"\t").map_err(|e| e.to_string())?;
            f.write_all(&r.payload).map_err(|e| e.to_string())?;
            f.write_all(b"\n").map_err(|e| e.to_string())?;
        }
    }
    f.flush().map_err(|e| e.to_string())?;
    Ok(input)
}

/// `kcat -P` produces `input` with `headers` to a fresh mock cluster; seconds it took.
fn drain_kcat(input: &Path, headers: &[String]) -> Res<Drained> {
    let mock = drain_cluster("kcat")?;
    let mut cmd = Command::new("kcat");
    cmd.args([
        "-P",
        "-b",
        &mock.bootstrap_servers(),
        "-t",
        "kcat",
        "-K\t",
        "-z",
        "zstd",
    ])
    .args(["-X", "enable.idempotence=true", "-X", "acks=all"]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    drain_child(cmd.stdin(std::fs::File::open(input).map_err(|e| e.to_string())?))
}

/// `producer-floor` produces the same records as kcat, with ferry's rdkafka and librdkafka.
fn drain_floor(ctx: &Ctx, input: &Path, headers: &[String]) -> Res<Drained> {
    let mock = drain_cluster("floor")?;
    let mut cmd = Command::new(&ctx.bins.floor);
    cmd.arg(mock.bootstrap_servers())
        .arg("floor")
        .arg(input)
        .args(headers)
        .stdin(Stdio::null());
    drain_child(&mut cmd)
}

/// Runs a producer to its end: wall-clock and CPU seconds.
fn drain_child(cmd: &mut Command) -> Res<Drained> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    // The child's CPU time is added to this process's children's once it is waited for.
    let cpu0 = proc_cpu_secs("self", true);
    let t = Instant::now();
    let out = cmd.output().map_err(|e| format!("spawn {name}: {e}"))?;
    let took = t.elapsed().as_secs_f64();
    let cpu = proc_cpu_secs("self", true)
        .zip(cpu0)
        .map(|(b, a)| b - a)
        .ok_or_else(|| format!("cannot read the CPU time of {name}"))?;
    if !out.status.success() {
        return Err(format!(
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Drained { secs: took, cpu })
}

// ---------------------------------------------------------------------------------------------
// Scenario 5

fn footprint(ctx: &Ctx) -> Vec<Row> {
    const SC: &str = "5 footprint";
    let mut rows = match footprint_load(ctx) {
        Ok(r) => r,
        Err(e) => error_rows(SC, e),
    };
    let dir = ctx.work.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (name, raw, stored) in rt.block_on(compression_ratios(&dir)) {
        rows.push(
            row(
                SC,
                format!("compression ratio, one segment of telemetry, {name}"),
            )
            .ferry(format!("{:.2}×", raw as f64 / stored.max(1) as f64)),
        );
    }
    rows
}

fn footprint_load(ctx: &Ctx) -> Res<Vec<Row>> {
    const SC: &str = "5 footprint";
    let s = &ctx.sizes;
    let dir = ctx.fresh_dir("footprint");
    let gw = start_ferry(ctx, &dir, &[])?;
    let pid = gw.pid();
    std::thread::sleep(s.idle_wait);
    let idle = rss_mib(&pid, "VmRSS:");
    // Sample VmRSS while the open-loop load runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pid, stop) = (pid.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                v.push(rss_mib(&pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(100));
            }
            v
        })
    };
    let before = proc_field(&pid, "io", "write_bytes:");
    let mut args = mqtt_args(&gw.mqtt()?, 1, s.footprint_conns, s.secs);
    args.extend(["--rate".into(), s.footprint_rate.to_string()]);
    let l = run_load(ctx, &args);
    let after = proc_field(&pid, "io", "write_bytes:");
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap_or_default();
    let peak = rss_mib(&pid, "VmHWM:");
    let tail = gw.log_tail();
    gw.kill();
    let l = l.map_err(|e| format!("{e}; ferry log: {tail}"))?;
    // Steady: the median of the second half of the samples.
    let mut half: Vec<f64> = samples[samples.len() / 2..].to_vec();
    half.sort_by(|a, b| a.total_cmp(b));
    let steady = half.get(half.len() / 2).copied().unwrap_or(0.0);
    let load = format!(
        "QoS1 open loop {:.0} msg/s offered over {} connections",
        s.footprint_rate, s.footprint_conns
    );
    let mut rows = vec![
        row(SC, "RSS idle, MiB (VmRSS)").ferry(format!("{idle:.1}")),
        row(SC, format!("peak RSS, MiB (VmHWM), {load}"))
            .ferry(format!(
                "{peak:.1} (achieved {:.0} msg/s, ack p99 {} ms){}",
                l.rate,
                l.p99(),
                errs(&l)
            ))
            .goal("≤ 25 MB", peak * 1.048_576 <= 25.0),
        row(
            SC,
            format!("steady RSS, MiB (median VmRSS, 2nd half), {load}"),
        )
        .ferry(format!("{steady:.1}"))
        .goal("≤ 25 MB", steady * 1.048_576 <= 25.0),
    ];
    if let (Some(a), Some(b)) = (after, before) {
        let wa = (a - b) as f64 / l.payload_bytes.max(1) as f64;
        rows.push(
            row(SC, format!("disk bytes written / payload byte, {load}"))
                .ferry(format!("{wa:.2}"))
                .goal("≤ 1.0", wa <= 1.0),
        );
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Scenario 6

fn recovery(ctx: &Ctx) -> Vec<Row> {
    const SC: &str = "6 recovery";
    match recovery_run(ctx) {
        Ok(r) => r,
        Err(e) => error_rows(SC, e),
    }
}

fn recovery_run(ctx: &Ctx) -> Res<Vec<Row>> {
    const SC: &str = "6 recovery";
    let n = ctx.sizes.backlog;
    let dir = copy_backlog(ctx, "recovery")?;
    // The Kafka uplink points at a closed port, so the backlog stays put.
    let dead = format!("127.0.0.1:{}", free_port()?);
    let env = [
        ("FERRY_UPLINKS_KAFKA_TYPE", "kafka"),
        ("FERRY_UPLINKS_KAFKA_BROKERS", dead.as_str()),
    ];
    let gw = start_ferry(ctx, &dir, &env)?;
    // Some live QoS1 traffic, then SIGKILL in the middle of it.
    let mut load = Command::new(&ctx.bins.load)
        .args(mqtt_args(&gw.mqtt()?, 1, 4, 30.0))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn ferry-load: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let held = gw.metric("ferry_buffer_readings").unwrap_or(0.0);
    gw.kill();
    let _ = load.kill();
    let _ = load.wait();
    if held < n as f64 {
        return Err(format!(
            "ferry held {held} readings before the kill, fewer than the {n} backlog"
        ));
    }
    let gw = start_ferry(ctx, &dir, &env)?;
    let peak = rss_mib(&gw.pid(), "VmHWM:");
    let ready = gw.ready_after.as_secs_f64();
    let after = gw.metric("ferry_buffer_readings").unwrap_or(0.0);
    gw.kill();
    if after < n as f64 {
        return Err(format!(
            "after the restart ferry holds {after} readings, fewer than the {n} backlog"
        ));
    }
    Ok(vec![
        row(
            SC,
            format!("SIGKILL with {held:.0} readings held: spawn to `ready` line, s"),
        )
        .ferry(format!("{ready:.3}"))
        .goal("< 1 s", ready < 1.0),
        row(SC, "peak RSS until ready, MiB (VmHWM)").ferry(format!("{peak:.1}")),
    ])
}

// ---------------------------------------------------------------------------------------------
// Scenario 7: the ingest matrix

/// The cells of the matrix: (QoS, clients, in flight per client, payload bytes).
fn matrix_cells(smoke: bool) -> Vec<(u8, usize, u16, usize)> {
    let (clients, inflight, sizes): (&[usize], &[u16], &[usize]) = if smoke {
        (&[4], &[16], &[64])
    } else {
        (&[10, 50, 500], &[1, 16, 100], &[64, 200, 1024])
    };
    let mut cells = Vec::new();
    for qos in [1u8, 2] {
        for &c in clients {
            for &i in inflight {
                for &b in sizes {
                    cells.push((qos, c, i, b));
                }
            }
        }
    }
    cells
}

/// One load run against one broker process: its rate, and CPU use from `/proc`.
#[derive(Debug, Clone)]
struct Measured {
    load: Load,
    /// The broker's CPU seconds (user + system) during the run.
    cpu: f64,
    /// The load tool's CPU seconds.
    tool_cpu: f64,
    /// Wall seconds of the run.
    wall: f64,
}

impl Measured {
    fn cpu_per_million(&self) -> f64 {
        self.cpu / self.load.acked.max(1) as f64 * 1e6
    }
}

/// Runs the load against `pid`'s broker at `addr` and reads the CPU both sides used.
fn measured_load(ctx: &Ctx, pid: &str, args: &[String]) -> Res<Measured> {
    let cpu0 = ferry_bench::proc_cpu_secs(pid, false).ok_or("no /proc/PID/stat")?;
    let tool0 = ferry_bench::proc_cpu_secs("self", true).unwrap_or(0.0);
    let t = Instant::now();
    let load = run_load(ctx, args)?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = ferry_bench::proc_cpu_secs(pid, false).ok_or("no /proc/PID/stat")? - cpu0;
    let tool_cpu = ferry_bench::proc_cpu_secs("self", true).unwrap_or(0.0) - tool0;
    Ok(Measured {
        load,
        cpu,
        tool_cpu,
        wall,
    })
}

/// A mosquitto run below this share of one core was not limited by mosquitto (it is
/// single-threaded): the load tool or the round trips set its rate, so the cell has no goal.
const SATURATED: f64 = 0.85;

fn matrix(ctx: &Ctx) -> Vec<Row> {
    const SC: &str = "7 ingest matrix";
    let with_peer = match ctx.tool("mosquitto") {
        Ok(b) => b,
        Err(e) => return error_rows(SC, e),
    };
    let secs = ctx.sizes.matrix_secs;
    let mut rows = Vec::new();
    for (qos, clients, inflight, size) in matrix_cells(ctx.sizes.smoke) {
        let metric = format!("QoS{qos}, {clients} clients × {inflight} in flight, {size} B");
        eprintln!("bench-run: matrix {metric}");
        let with = |addr: &str| -> Vec<String> {
            let mut a = mqtt_args(addr, qos, clients, secs);
            a.extend([
                "--inflight".into(),
                inflight.to_string(),
                "--size".into(),
                size.to_string(),
            ]);
            a
        };
        let mut ferry: Vec<Measured> = Vec::new();
        let mut mosq: Vec<Measured> = Vec::new();
        let mut failed = None;
        for r in 0..ctx.sizes.rounds {
            let _ = Command::new("sync").status();
            let dir = ctx.fresh_dir(&format!("matrix-r{r}"));
            let res =
                start_ferry(ctx, &dir, &[("FERRY_MQTT_MAX_INFLIGHT", "100")]).and_then(|gw| {
                    let m = measured_load(ctx, &gw.pid(), &with(&gw.mqtt()?));
                    let tail = gw.log_tail();
                    gw.kill();
                    m.map_err(|e| format!("{e}; ferry log: {tail}"))
                });
            match res {
                Ok(m) => ferry.push(m),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if with_peer {
                let _ = Command::new("sync").status();
                let res = Mosquitto::start(ctx).and_then(|m| {
                    let pid = m.child.id().to_string();
                    let l = measured_load(ctx, &pid, &with(&m.addr));
                    m.kill();
                    l
                });
                match res {
                    Ok(m) => mosq.push(m),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = failed {
            rows.push(row(SC, metric).verdict(Verdict::Error(e)));
            continue;
        }
        rows.push(matrix_row(SC, metric, &ferry, &mosq));
    }
    rows
}

/// Means over the rounds: (rate, CPU s per 1M readings, broker cores used, tool cores used).
fn matrix_means(runs: &[Measured]) -> (f64, f64, f64, f64) {
    let n = runs.len().max(1) as f64;
    let sum = |f: &dyn Fn(&Measured) -> f64| runs.iter().map(f).sum::<f64>() / n;
    (
        sum(&|m| m.load.rate),
        sum(&|m| m.cpu_per_million()),
        sum(&|m| m.cpu / m.wall.max(1e-9)),
        sum(&|m| m.tool_cpu / m.wall.max(1e-9)),
    )
}

fn matrix_row(sc: &'static str, metric: String, ferry: &[Measured], mosq: &[Measured]) -> Row {
    let (fr, fc, fu, ft) = matrix_means(ferry);
    let errors: String = ferry.iter().chain(mosq).map(|m| errs(&m.load)).collect();
    let r = row(sc, metric).ferry(format!(
        "{fr:.0}/s · {fc:.1} CPU s/1M · {fu:.2} cores (load tool {ft:.2}){errors}"
    ));
    if mosq.is_empty() {
        return r.verdict(Verdict::Skipped("mosquitto not installed".into()));
    }
    let (mr, mc, mu, mt) = matrix_means(mosq);
    let ratio = fr / mr;
    let r = r
        .peer(format!(
            "mosquitto {mr:.0}/s · {mc:.1} CPU s/1M · {mu:.2} cores (load tool {mt:.2})"
        ))
        .ratio(ratio);
    if mu < SATURATED {
        // Not judged: mosquitto had CPU to spare, so the load set its rate.
        r.verdict(Verdict::Info)
    } else {
        r.goal(
            "≥ 1.5× and CPU/reading ≤ mosquitto's",
            ratio >= 1.5 && fc <= mc,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 8: instructions per reading (cachegrind)

/// The fixed workload: QoS 1, 10 clients × 16 in flight, 100-byte payloads; two runs of
/// different length per broker, so that start-up, connections and shutdown cancel out.
fn instructions(ctx: &Ctx) -> Vec<Row> {
    const SC: &str = "8 instructions";
    let with_valgrind = match ctx.tool("valgrind") {
        Ok(b) => b,
        Err(e) => return error_rows(SC, e),
    };
    let metric = |n: (u64, u64)| {
        format!(
            "user-space instructions per reading (cachegrind), QoS1, 10 clients × 16 in flight, \
             100 B, ({} − {}) readings",
            n.1, n.0
        )
    };
    let counts = if ctx.sizes.smoke {
        (200, 600)
    } else {
        (5_000, 25_000)
    };
    if !with_valgrind {
        return vec![
            row(SC, metric(counts)).verdict(Verdict::Skipped("valgrind not installed".into())),
        ];
    }
    let with_peer = match ctx.tool("mosquitto") {
        Ok(b) => b,
        Err(e) => return error_rows(SC, e),
    };
    let ferry = match per_reading(ctx, counts, false) {
        Ok(x) => x,
        Err(e) => return error_rows(SC, e),
    };
    let r = row(SC, metric(counts)).ferry(format!("{ferry:.0}"));
    if !with_peer {
        return vec![r.verdict(Verdict::Skipped("mosquitto not installed".into()))];
    }
    match per_reading(ctx, counts, true) {
        Ok(m) => vec![r.peer(format!("mosquitto {m:.0}")).ratio(ferry / m)],
        Err(e) => vec![r.verdict(Verdict::Error(e))],
    }
}

/// Instructions per reading: the difference of two cachegrind runs' totals over the
/// difference of their readings.
fn per_reading(ctx: &Ctx, (n1, n2): (u64, u64), mosquitto: bool) -> Res<f64> {
    let a = instructions_total(ctx, n1, mosquitto)?;
    let b = instructions_total(ctx, n2, mosquitto)?;
    Ok((b as f64 - a as f64) / (n2 - n1) as f64)
}

/// Runs ferry (or mosquitto) under cachegrind for a load of `n` readings, stops it with
/// SIGTERM and returns the instructions counted over its whole life. cachegrind rather than
/// callgrind: callgrind opens its output file at start, which mosquitto can no longer write
/// once it has dropped root for its own user.
fn instructions_total(ctx: &Ctx, n: u64, mosquitto: bool) -> Res<u64> {
    let who = if mosquitto { "mosquitto" } else { "ferry" };
    let dir = ctx
        .cachegrind_dir
        .clone()
        .unwrap_or_else(|| ctx.work.join("cachegrind"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // mosquitto started as root drops to its own user before it writes the profile.
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
    }
    let out = dir.join(format!("cachegrind.{who}.{n}"));
    let _ = std::fs::remove_file(&out);
    let wrapper = vec![
        "valgrind".to_string(),
        "--tool=cachegrind".into(),
        "--cache-sim=no".into(),
        "--quiet".into(),
        format!("--cachegrind-out-file={}", out.display()),
    ];
    let load = |addr: &str| {
        let mut a = mqtt_args(addr, 1, 10, 600.0);
        a.extend([
            "--inflight".into(),
            "16".into(),
            "--size".into(),
            "100".into(),
            "--messages".into(),
            n.to_string(),
        ]);
        run_load(ctx, &a)
    };
    let (mut child, l) = if mosquitto {
        let m = Mosquitto::start_under(ctx, &wrapper)?;
        let l = load(&m.addr);
        (m.child, l)
    } else {
        let data = ctx.fresh_dir(&format!("cachegrind-{n}"));
        let gw = start_ferry_under(ctx, &data, &[], &wrapper)?;
        let l = load(&gw.mqtt()?);
        (gw.child, l)
    };
    let exited = ferry_tests::terminate_child(&mut child, Duration::from_secs(120));
    let l = l?;
    if l.acked != n {
        return Err(format!("{who}: {} of {n} readings acked", l.acked));
    }
    if exited.is_none() {
        return Err(format!("{who} did not exit within 120 s of SIGTERM"));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no totals in {}", out.display()))
}

// ---------------------------------------------------------------------------------------------
// Output

// ---------------------------------------------------------------------------------------------
// Scenario 9

/// A `ferry-load --subscribers` summary.
#[derive(Debug, Clone, serde::Deserialize)]
struct Fan {
    acked: u64,
    delivered: u64,
    delivered_rate: Option<f64>,
    deliver_p50_ms: Option<f64>,
    deliver_p99_ms: Option<f64>,
    errors_total: u64,
    errors: BTreeMap<String, u64>,
}

fn fan_args(addr: &str, publishers: usize, subscribers: usize, secs: f64) -> Vec<String> {
    let mut a = mqtt_args(addr, 1, publishers, secs);
    a.extend(
        [
            "--subscribers",
            &subscribers.to_string(),
            "--sub-filter",
            "sensors/#",
            "--sub-qos",
            "1",
        ]
        .map(String::from),
    );
    a
}

/// One fan-out run against the broker at `addr`; `drops`: ferry's subscriber drops after it.
fn fan_run(ctx: &Ctx, args: &[String]) -> Res<Fan> {
    let f: Fan = run_json(ctx, args)?;
    if f.delivered == 0 || f.errors_total > 0 {
        return Err(format!(
            "ferry-load {args:?}: {} delivered, errors {:?}",
            f.delivered, f.errors
        ));
    }
    Ok(f)
}

/// Unacknowledged QoS 1/2 messages per subscriber, for both brokers: ferry's default
/// `mqtt.max_inflight`, which 3.1.1 subscribers get (mosquitto's `max_inflight_messages`).
const WINDOW: u16 = 64;

fn subscribers(ctx: &Ctx) -> Vec<Row> {
    const SC: &str = "9 local subscribers";
    let with_peer = match ctx.tool("mosquitto") {
        Ok(b) => b,
        Err(e) => return error_rows(SC, e),
    };
    match subscriber_runs(ctx, with_peer) {
        Ok(rows) => rows,
        Err(e) => error_rows(SC, e),
    }
}

fn subscriber_runs(ctx: &Ctx, with_peer: bool) -> Res<Vec<Row>> {
    const SC: &str = "9 local subscribers";
    let s = &ctx.sizes;
    let mut rows = Vec::new();
    let mut half_rate = f64::MAX;
    for (label, publishers, subs) in [
        ("1 publisher → 10 subscribers".to_string(), 1, 10),
        (
            format!("{} publishers → 1 subscriber", s.clients),
            s.clients,
            1,
        ),
    ] {
        eprintln!("bench-run: local subscribers, {label}");
        let (mut ferry, mut mosq, mut drops) = (Vec::new(), Vec::new(), 0.0);
        for r in 0..s.rounds {
            let dir = ctx.fresh_dir(&format!("fan-{publishers}-{subs}-r{r}"));
            let gw = start_ferry(ctx, &dir, &[])?;
            let f = fan_run(ctx, &fan_args(&gw.mqtt()?, publishers, subs, s.secs));
            drops += gw
                .metric("ferry_mqtt_subscriber_dropped_total")
                .unwrap_or(0.0);
            let tail = gw.log_tail();
            gw.kill();
            ferry.push(f.map_err(|e| format!("{e}; ferry log: {tail}"))?);
            if with_peer {
                let m = Mosquitto::start_conf(ctx, &[], WINDOW)?;
                let f = fan_run(ctx, &fan_args(&m.addr, publishers, subs, s.secs));
                m.kill();
                mosq.push(f?);
            }
        }
        let mean = |v: &[Fan]| {
            v.iter()
                .map(|f| f.delivered_rate.unwrap_or(0.0))
                .sum::<f64>()
                / v.len().max(1) as f64
        };
        let share = |v: &[Fan]| {
            let (d, a): (u64, u64) = v
                .iter()
                .fold((0, 0), |(d, a), f| (d + f.delivered, a + f.acked));
            d as f64 / (a.max(1) * subs as u64) as f64 * 100.0
        };
        let (fr, mr) = (mean(&ferry), mean(&mosq));
        let mut row = row(
            SC,
            format!("{label}, QoS 1: delivered msg/s (share of published delivered)"),
        )
        .ferry(format!(
            "{fr:.0} ({:.1} %, {drops:.0} dropped by the queue limit)",
            share(&ferry)
        ));
        if with_peer {
            half_rate = half_rate.min(fr.min(mr) / 2.0);
            row = row
                .peer(format!("mosquitto {mr:.0} ({:.1} %)", share(&mosq)))
                .ratio(fr / mr.max(1.0))
                .goal("≥ 1.0×", fr >= mr);
        } else {
            half_rate = half_rate.min(fr / 2.0);
            row = row.verdict(Verdict::Skipped("mosquitto is not installed".into()));
        }
        rows.push(row);
    }

    // Latency at half the lower delivered rate, 50 → 1.
    let rate = half_rate.max(10.0).round();
    let lat = |addr: &str| -> Res<Fan> {
        let mut a = fan_args(addr, s.clients, 1, s.secs);
        a.extend(["--rate".to_string(), rate.to_string()]);
        fan_run(ctx, &a)
    };
    let ms = |f: &Fan| {
        format!(
            "{} / {}",
            f.deliver_p50_ms.map_or("n/a".into(), |v| format!("{v:.1}")),
            f.deliver_p99_ms.map_or("n/a".into(), |v| format!("{v:.1}"))
        )
    };
    let dir = ctx.fresh_dir("fan-latency");
    let gw = start_ferry(ctx, &dir, &[])?;
    let f = lat(&gw.mqtt()?);
    gw.kill();
    let mut lat_row = row(
        SC,
        format!("publish → delivery p50 / p99 ms, 50 → 1 at {rate:.0} msg/s"),
    )
    .ferry(ms(&f?));
    if with_peer {
        let m = Mosquitto::start_conf(ctx, &[], WINDOW)?;
        let f = lat(&m.addr);
        m.kill();
        lat_row = lat_row.peer(format!("mosquitto {}", ms(&f?)));
    }
    rows.push(lat_row);

    // Idle subscriber connections.
    let n = s.footprint_conns;
    // (RSS with them, KiB per connection, what `count` said while they were connected)
    let idle =
        |pid: &str, addr: &str, count: &dyn Fn() -> Option<f64>| -> Res<(f64, f64, Option<f64>)> {
            let before = rss_mib(pid, "VmRSS:");
            let hold = s.idle_wait.as_secs_f64() + 2.0;
            let mut child = Command::new(&ctx.bins.load)
                .args(fan_args(addr, 0, n, 0.1))
                .args(["--hold", &hold.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn ferry-load: {e}"))?;
            std::thread::sleep(s.idle_wait + Duration::from_secs(1));
            let during = rss_mib(pid, "VmRSS:");
            let counted = count();
            let _ = child.wait();
            Ok((during, (during - before) * 1024.0 / n as f64, counted))
        };
    let dir = ctx.fresh_dir("fan-idle");
    let gw = start_ferry(ctx, &dir, &[])?;
    let (f_total, f_per, subscribed) = idle(&gw.pid(), &gw.mqtt()?, &|| {
        gw.metric("ferry_mqtt_subscriptions")
    })?;
    let subscribed = subscribed.unwrap_or(0.0);
    gw.kill();
    let mut per = row(
        SC,
        format!("RSS per idle subscriber connection, {n} connected"),
    )
    .ferry(format!("{f_per:.1} KiB ({subscribed:.0} subscribed)"));
    let mut total =
        row(SC, format!("RSS with {n} idle subscribers")).ferry(format!("{f_total:.1} MiB"));
    if with_peer {
        let m = Mosquitto::start(ctx)?;
        let (m_total, m_per, _) = idle(&m.child.id().to_string(), &m.addr, &|| None)?;
        m.kill();
        per = per
            .peer(format!("mosquitto {m_per:.1} KiB"))
            .ratio(f_per / m_per.max(0.1));
        total = total
            .peer(format!("mosquitto {m_total:.1} MiB"))
            .ratio(f_total / m_total.max(0.1));
    }
    rows.push(per);
    rows.push(total);
    Ok(rows)
}

fn machine() -> Vec<(String, String)> {
    let sh = |c: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(c)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "n/a".into())
    };
    vec![
        ("cores (nproc)".into(), sh("nproc")),
        (
            "CPU".into(),
            sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-"),
        ),
        (
            "memory".into(),
            sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo"),
        ),
        ("kernel".into(), sh("uname -srm")),
        (
            "disk (work dir)".into(),
            sh("src=$(df --output=source . | tail -1); \
                echo \"$src $(df --output=fstype . | tail -1), $(df -h --output=size . | tail -1 | tr -d ' ') total, \
                rotational=$(lsblk -ndo ROTA \"$src\" 2>/dev/null | tr -d ' ')\""),
        ),
        (
            "load average at start".into(),
            sh("cut -d' ' -f1-3 /proc/loadavg"),
        ),
        ("mosquitto".into(), sh("mosquitto -h 2>/dev/null | head -1")),
        ("kcat".into(), sh("kcat -V 2>/dev/null | head -1")),
    ]
}

fn render(ctx: &Ctx, opts: &Opts, rows: &[Row]) -> String {
    let mut s = String::new();
    let s_ = &ctx.sizes;
    s.push_str(&format!(
        "## bench-run{} — {}\n\n",
        if opts.smoke { " --smoke" } else { "" },
        Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    ));
    for (k, v) in machine() {
        s.push_str(&format!("- {k}: {}\n", v.replace('\n', " ")));
    }
    s.push_str(&format!(
        "- sizes: {} s per load run, {} rounds, {} MQTT clients, {} HTTP clients, backlog {}, \
         footprint {} connections at {:.0} msg/s\n\n",
        s_.secs,
        s_.rounds,
        s_.clients,
        s_.http_clients,
        s_.backlog,
        s_.footprint_conns,
        s_.footprint_rate
    ));
    s.push_str("| scenario | metric | ferry | peer | ratio | goal | result |\n");
    s.push_str("|---|---|---:|---:|---:|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.metric,
            r.ferry.replace('|', "/"),
            r.peer.replace('|', "/"),
            r.ratio,
            r.goal,
            r.verdict.to_string().replace('|', "/").replace('\n', " ")
        ));
    }
    s
}

fn commands(ctx: &Ctx) -> Vec<Row> {
    const SC: &str = "10 commands down";
    // The cloud broker is a mosquitto either way.
    match ctx.tool("mosquitto") {
        Ok(true) => {}
        Ok(false) => {
            return vec![row(SC, "cloud → device").verdict(Verdict::Skipped(
                "mosquitto (the cloud broker) is not installed".into(),
            ))];
        }
        Err(e) => return error_rows(SC, e),
    }
    match command_runs(ctx) {
        Ok(rows) => rows,
        Err(e) => error_rows(SC, e),
    }
}

/// The box: ferry with a downlink from `cloud`, or a mosquitto bridging from it; the address
/// devices subscribe on, and what to stop afterwards.
enum OnBox {
    Ferry(Gw),
    Bridge(Mosquitto),
}

impl OnBox {
    fn start(ctx: &Ctx, cloud: &str, ferry: bool, tag: &str) -> Res<(OnBox, String)> {
        if ferry {
            let dir = ctx.fresh_dir(tag);
            let gw = start_ferry_conf(
                ctx,
                &dir,
                &[],
                &[],
                &format!(
                    "[uplinks.cloud]\ntype = \"mqtt\"\nurl = \"mqtt://{cloud}\"\n\
                     [[uplinks.cloud.downlink]]\nremote = \"sensors/#\"\n"
                ),
            )?;
            let t = Instant::now();
            while gw.metric("ferry_downlink_ready") != Some(1.0) {
                if t.elapsed() > Duration::from_secs(30) {
                    return Err(format!(
                        "ferry's downlink did not subscribe: {}",
                        gw.log_tail()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let addr = gw.mqtt()?;
            Ok((OnBox::Ferry(gw), addr))
        } else {
            let m = Mosquitto::start_with(
                ctx,
                &[],
                WINDOW,
                &format!(
                    "connection cloud\naddress {cloud}\ntopic sensors/# in 1\n\
                     cleansession false\nclientid bench-bridge-{tag}\n"
                ),
            )?;
            // The bridge connects on its own; its subscription must be in place first.
            std::thread::sleep(Duration::from_secs(2));
            let addr = m.addr.clone();
            Ok((OnBox::Bridge(m), addr))
        }
    }

    fn kill(self) {
        match self {
            OnBox::Ferry(gw) => gw.kill(),
            OnBox::Bridge(m) => m.kill(),
        }
    }
}

fn command_runs(ctx: &Ctx) -> Res<Vec<Row>> {
    const SC: &str = "10 commands down";
    let s = &ctx.sizes;
    let args = |cloud: &str, device: &str, secs: f64| {
        let mut a = fan_args(cloud, 1, 1, secs);
        a.extend(["--sub-addr".to_string(), device.to_string()]);
        a
    };
    let run = |ferry: bool, tag: &str, rate: Option<f64>| -> Res<Fan> {
        let cloud = Mosquitto::start_conf(ctx, &[], WINDOW)?;
        let started = OnBox::start(ctx, &cloud.addr, ferry, tag);
        let (on_box, device) = match started {
            Ok(v) => v,
            Err(e) => {
                cloud.kill();
                return Err(e);
            }
        };
        let mut a = args(&cloud.addr, &device, s.secs);
        if let Some(r) = rate {
            a.extend(["--rate".to_string(), r.to_string()]);
        }
        let f = fan_run(ctx, &a);
        on_box.kill();
        cloud.kill();
        f
    };
    let (mut ferry, mut bridge) = (Vec::new(), Vec::new());
    for r in 0..s.rounds {
        eprintln!("bench-run: commands down, round {r}");
        ferry.push(run(true, &format!("cmd-ferry-r{r}"), None)?);
        bridge.push(run(false, &format!("cmd-bridge-r{r}"), None)?);
    }
    let mean = |v: &[Fan]| {
        v.iter()
            .map(|f| f.delivered_rate.unwrap_or(0.0))
            .sum::<f64>()
            / v.len().max(1) as f64
    };
    let share = |v: &[Fan]| {
        let (d, a): (u64, u64) = v
            .iter()
            .fold((0, 0), |(d, a), f| (d + f.delivered, a + f.acked));
        d as f64 / a.max(1) as f64 * 100.0
    };
    let (fr, br) = (mean(&ferry), mean(&bridge));
    let mut rows = vec![
        row(
            SC,
            "cloud → device, 1 publisher → 1 subscriber, QoS 1: delivered msg/s (share of published delivered)",
        )
        .ferry(format!("{fr:.0} ({:.1} %)", share(&ferry)))
        .peer(format!("mosquitto bridge {br:.0} ({:.1} %)", share(&bridge)))
        .ratio(fr / br.max(1.0))
        .goal("≥ 1.0×", fr >= br),
    ];
    let rate = (fr.min(br) / 2.0).max(10.0).round();
    let ms = |f: &Fan| {
        format!(
            "{} / {}",
            f.deliver_p50_ms.map_or("n/a".into(), |v| format!("{v:.1}")),
            f.deliver_p99_ms.map_or("n/a".into(), |v| format!("{v:.1}"))
        )
    };
    let f = run(true, "cmd-ferry-lat", Some(rate))?;
    let b = run(false, "cmd-bridge-lat", Some(rate))?;
    rows.push(
        row(
            SC,
            format!("cloud publish → device delivery p50 / p99 ms at {rate:.0} msg/s"),
        )
        .ferry(ms(&f))
        .peer(format!("mosquitto bridge {}", ms(&b))),
    );
    Ok(rows)
}
