//! # ferry-tests: end-to-end tests against the real `ferry` binary
//!
//! [`Ferry::start`] writes a config, starts `target/<profile>/ferry` as a child process with
//! every listener on `127.0.0.1:0`, and reads the real ports from the `ready {...}` line the
//! binary prints on stdout. The handle can SIGKILL and restart the process on the same data
//! directory. [`require_tool`] implements the rule for tests that need a Debian tool: skip
//! loudly when it is missing, or fail when `FERRY_REQUIRE_TOOLS=1` (as in CI).

pub mod kafka_mock;
pub mod kinesis;
pub mod scripted;
pub mod uplink;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of a binary of this crate. `"ferry"` is the gateway's own entry point built here as
/// `ferry-under-test`: cargo builds a package's binaries before its integration tests, so it
/// is always present and current under `cargo test`, whatever was built before.
pub fn bin_path(name: &str) -> PathBuf {
    let name = if name == "ferry" {
        "ferry-under-test"
    } else {
        name
    };
    // target/<profile>/deps/<test-exe> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir")
        .to_path_buf();
    let p = dir.join(name);
    if !p.exists() {
        // `cargo test --workspace` builds every binary first; a filtered run may not have.
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", "ferry-tests", "--bin", name]);
        if profile == "release" {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build --bin {name} failed");
    }
    p
}

/// Where Debian installs tools off `PATH`: mosquitto in /usr/sbin, the Pub/Sub emulator's
/// launcher in the Cloud SDK's tree.
const OFF_PATH: &[&str] = &[
    "/usr/sbin/mosquitto",
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
];

/// Where `tool` is: on `PATH`, else where Debian installs it off `PATH` ([`OFF_PATH`]).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        OFF_PATH
            .iter()
            .map(PathBuf::from)
            .find(|p| p.file_name().is_some_and(|n| n == tool) && p.is_file())
    })
}

/// Whether an external tool is available ([`find_tool`]). When it is not: panics if
/// `FERRY_REQUIRE_TOOLS=1`, else prints a loud SKIPPED line and returns false.
pub fn require_tool(tool: &str, test: &str) -> bool {
    find_tool(tool).is_some() || skip_or_fail(&format!("'{tool}'"), test)
}

/// What a test does when `missing` (a tool, named for the reader) is not installed: panics
/// under `FERRY_REQUIRE_TOOLS=1` (as in CI), else prints a loud SKIPPED line. Returns false.
pub fn skip_or_fail(missing: &str, test: &str) -> bool {
    if std::env::var("FERRY_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{test}: {missing} is required (FERRY_REQUIRE_TOOLS=1) but not installed");
    }
    eprintln!(
        "\n========================================================================\n\
         SKIPPED {test}: {missing} is not installed (apt-get install it, or run .ci/run).\n\
         ========================================================================\n"
    );
    false
}

/// Sends `child` SIGTERM and waits up to `timeout` for it to exit; returns its exit status,
/// or `None` after killing it when it did not exit in time.
pub fn terminate_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A running ferry child process.
#[derive(Debug)]
pub struct Ferry {
    child: Option<Child>,
    /// The data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// The config file.
    pub config_path: PathBuf,
    /// Bound addresses by listener name (`mqtt`, `http`, ...).
    pub addrs: BTreeMap<String, SocketAddr>,
    stderr_log: PathBuf,
    extra_env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl Ferry {
    /// Starts ferry with `config_toml` appended to a base config that puts every listener on
    /// 127.0.0.1:0 and the data directory in a fresh temporary directory. Sections given in
    /// `config_toml` must not repeat the base's keys: the base sets only `gateway.data_dir`,
    /// `gateway.id`, `mqtt.listen` and `http.listen` through the environment, so any TOML works.
    pub fn start(config_toml: &str) -> Ferry {
        Self::start_with_env(config_toml, &[])
    }

    /// Like [`Ferry::start`] with extra environment variables.
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Ferry {
        Self::start_in(config_toml, env, None)
    }

    /// Like [`Ferry::start_with_env`], with the data directory at `data_dir` (for example on
    /// a small filesystem) instead of inside the temporary directory.
    pub fn start_in(config_toml: &str, env: &[(&str, &str)], data_dir: Option<&Path>) -> Ferry {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = data_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("data"));
        let config_path = dir.path().join("ferry.toml");
        std::fs::write(&config_path, config_toml).expect("write config");
        let mut f = Ferry {
            child: None,
            data_dir,
            config_path,
            addrs: BTreeMap::new(),
            stderr_log: dir.path().join("ferry.stderr.log"),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: Some(dir),
        };
        f.spawn();
        f
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .expect("stderr log");
        let toml = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        let mut cmd = Command::new(bin_path("ferry"));
        // The gateway reads FERRY_* variables as config overrides and refuses unknown ones:
        // the test suite's own knobs (FERRY_SEED, FERRY_CRASH_CYCLES, …) must not reach it.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FERRY_") {
                cmd.env_remove(&k);
            }
        }
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("FERRY_GATEWAY_DATA_DIR", &self.data_dir)
            .env_remove("FERRY_CONFIG")
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if !toml.contains("id =") {
            cmd.env("FERRY_GATEWAY_ID", "test-gw");
        }
        for (key, var) in [("mqtt", "FERRY_MQTT_LISTEN"), ("http", "FERRY_HTTP_LISTEN")] {
            if !section_sets(&toml, key, "listen") {
                cmd.env(var, "127.0.0.1:0");
            }
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ferry");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(json) = line.strip_prefix("ready ") {
                    let _ = tx.send(json.to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(json) => {
                let m: BTreeMap<String, String> = serde_json::from_str(&json).expect("ready json");
                self.addrs = m
                    .into_iter()
                    .map(|(k, v)| (k, v.parse().expect("addr")))
                    .collect();
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ferry did not become ready in 30 s; its log:\n{}",
                    self.log()
                );
            }
        }
        self.child = Some(child);
    }

    /// The address of a listener.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("no '{name}' listener in {:?}", self.addrs))
    }

    /// `http://127.0.0.1:PORT` of the HTTP listener.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr("http"))
    }

    /// Everything ferry wrote to stderr so far (its log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit. Returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        terminate_child(&mut self.child.take()?, timeout)
    }

    /// Starts ferry again on the same data directory and config.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Runs `ferry <args>` (e.g. `buffer stats --data-dir ...`) and returns (exit code, stdout).
    pub fn cli(args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin_path("ferry"))
            .args(args)
            .output()
            .expect("run ferry");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// (VmRSS, VmHWM) of the running ferry process, in bytes.
    pub fn memory(&self) -> (u64, u64) {
        let pid = self.pid().expect("ferry runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Asserts ferry's peak resident set (VmHWM) is below `bound` bytes, printing both
    /// figures for `case`, and returns the peak.
    pub fn assert_peak_below(&self, bound: u64, case: &str) -> u64 {
        const MIB: f64 = 1024.0 * 1024.0;
        let (rss, hwm) = self.memory();
        eprintln!(
            "{case}: ferry VmRSS {:.1} MiB, VmHWM {:.1} MiB (bound {:.0} MiB)",
            rss as f64 / MIB,
            hwm as f64 / MIB,
            bound as f64 / MIB
        );
        assert!(
            hwm < bound,
            "{case}: ferry's peak RSS {hwm} B is over the bound {bound} B"
        );
        hwm
    }

    /// The data directory as a string, for CLI arguments.
    pub fn data_dir_str(&self) -> String {
        self.data_dir.display().to_string()
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- ferry log ----\n{}", self.log());
        }
    }
}

/// Whether `toml` sets `key` in `[section]` (a rough line-based check for the test harness).
fn section_sets(toml: &str, section: &str, key: &str) -> bool {
    let mut current = String::new();
    for line in toml.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            current = l.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if current == section && l.split('=').next().map(str::trim) == Some(key) {
            return true;
        }
    }
    false
}

/// Reads every reading in a stopped gateway's buffer, through the buffer crate, in id order.
pub fn buffered_readings(data_dir: &Path, consumer: &str) -> Vec<ferry_buffer::Reading> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = ferry_buffer::BufferOptions {
            consumers: vec![consumer.to_string()],
            max_bytes: u64::MAX,
            when_full: ferry_buffer::WhenFull::Reject,
            ..Default::default()
        };
        let buf = ferry_buffer::Buffer::open(data_dir, opts).expect("open buffer");
        let mut rd = buf.reader(consumer).expect("reader");
        let mut out = Vec::new();
        loop {
            let segs = rd.try_next(64).await.expect("read");
            if segs.is_empty() {
                break;
            }
            out.extend(segs.into_iter().flat_map(|s| s.readings));
        }
        buf.close().await;
        out.sort_by_key(|r| r.id);
        out
    })
}

/// A Debian mosquitto broker on 127.0.0.1 accepting anonymous clients, killed on drop (check
/// [`require_tool`] first).
#[derive(Debug)]
pub struct Mosquitto {
    _server: Server,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// Starts mosquitto on a free port.
pub fn mosquitto() -> Mosquitto {
    mosquitto_on(free_port())
}

/// Starts mosquitto on `port` (e.g. again after a simulated outage).
pub fn mosquitto_on(port: u16) -> Mosquitto {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n"),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(find_tool("mosquitto").expect("mosquitto"));
    cmd.arg("-c").arg(&conf);
    Mosquitto {
        _server: Server::spawn(cmd, port, "mosquitto", std::time::Duration::from_secs(5)),
        port,
        _dir: dir,
    }
}

/// A child process serving on a 127.0.0.1 port (a broker, an emulator), killed on drop.
#[derive(Debug)]
pub struct Server {
    child: std::process::Child,
    /// Its port.
    pub port: u16,
}

impl Server {
    /// Spawns `cmd` (its output discarded) and waits up to `timeout` until `port` accepts
    /// connections; panics, naming `what`, if it exits or does not listen in time.
    pub fn spawn(
        mut cmd: std::process::Command,
        port: u16,
        what: &str,
        timeout: std::time::Duration,
    ) -> Server {
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{what} exited at start-up ({status}); is port {port} taken?");
            }
            assert!(
                start.elapsed() < timeout,
                "{what} did not listen on port {port} within {timeout:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        Server { child, port }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (free when asked; a server started right after gets it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}
