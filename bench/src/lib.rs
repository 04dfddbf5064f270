//! # ferry-bench: benchmarks and load tools
//!
//! - `ferry-load`: the load generator (MQTT v3.1.1/v5 QoS 0/1/2, HTTP single readings or
//!   batches), closed or open loop, with HDR latency percentiles and the acked reading ids.
//! - `bench-run`: runs every scenario side by side with its peer (mosquitto,
//!   `kcat -P`, a no-work axum handler) and prints one Markdown table; `--smoke` runs them all
//!   with tiny sizes in seconds (the CI smoke test in `tests/smoke.rs`).
//! - `buffer-bench`: the buffer's group commit, compression and crash-reopen figures.
//! - `null_http`: the no-work HTTP baseline.
//!
//! The ferry under test is the shipped binary, `ferry` of ferry-gateway, built as it is
//! shipped: [`ferry_binary`] builds it with cargo beside the tool that asks (cargo cannot make
//! one package's binary depend on another's without the unstable artifact dependencies).
//!
//! Nothing here is timed by the test suite: the machines are noisy, so results are reported
//! as figures and ratios from one run (see BENCHMARKS.md).

use ferry_buffer::{Buffer, BufferOptions, Compression, Reading, Source};

/// The `ferry` binary to benchmark: `explicit` if given, else `ferry` beside the running tool
/// (target/<profile>/), built first with `cargo build [--release] -p ferry-gateway --bin ferry`
/// so that it is current (a no-op when it is).
pub fn ferry_binary(explicit: Option<&std::path::Path>) -> Result<std::path::PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let dir = exe.parent().ok_or("this binary has no directory")?;
    let release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(&cargo);
    cmd.args(["build", "-q", "-p", "ferry-gateway", "--bin", "ferry"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cargo:?} to build ferry ({e}); pass --ferry PATH"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build -p ferry-gateway --bin ferry` failed ({status}); pass --ferry PATH"
        ));
    }
    let ferry = dir.join("ferry");
    if !ferry.is_file() {
        return Err(format!(
            "{} is missing after the build (another CARGO_TARGET_DIR?); pass --ferry PATH",
            ferry.display()
        ));
    }
    Ok(ferry)
}

/// Percentile of a sorted slice (nearest rank).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Bytes this process has caused to be written to storage, from `/proc/self/io`
/// (`write_bytes`); `None` where that file does not exist.
pub fn proc_write_bytes() -> Option<u64> {
    proc_field("self", "io", "write_bytes:")
}

/// A numeric field of `/proc/<pid>/<file>` (`VmRSS:` of `status`, `write_bytes:` of `io`);
/// `kB` values are returned as they are (KiB).
pub fn proc_field(pid: &str, file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds (user + system) from a `/proc/<pid>/stat` line: `utime` and `stime` with
/// `children = false`, or the `cutime` and `cstime` of the children waited for with
/// `children = true` (`pid = "self"`). Linux counts them in clock ticks of 1/100 s
/// (`USER_HZ`, fixed at 100 for user space on every architecture ferry runs on).
pub fn proc_cpu_secs(pid: &str, children: bool) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: the
    // state is field 3, so utime (14) is index 11 here, cutime (16) index 13.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = if children { 13 } else { 11 };
    let ticks: u64 = f.get(at)?.parse::<u64>().ok()? + f.get(at + 1)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// A realistic JSON telemetry payload of about `len` bytes.
pub fn telemetry_json(device: usize, seq: u64, len: usize) -> String {
    let mut s = format!(
        "{{\"device\":\"sensor-{device:04}\",\"ts\":{},\"temp\":{:.2},\"hum\":{:.1},\"seq\":{seq}",
        1_763_000_000_000u64 + seq * 1000,
        20.0 + (seq % 100) as f64 * 0.05,
        40.0 + (seq % 37) as f64 * 0.5,
    );
    pad_json(&mut s, len);
    s
}

/// A JSON telemetry reading of about `len` bytes carrying a unique reading id `id`
/// (`"seq":"<id>"`), so that a consumer can check later which acknowledged readings arrived.
pub fn telemetry_with_id(device: &str, id: &str, n: u64, ts_ms: u64, len: usize) -> String {
    let mut s = format!(
        "{{\"device\":\"{device}\",\"seq\":\"{id}\",\"ts\":{ts_ms},\"temp\":{:.2},\"hum\":{:.1},\"vbat\":{:.3}",
        20.0 + (n % 100) as f64 * 0.05,
        40.0 + (n % 37) as f64 * 0.5,
        3.3 - (n % 50) as f64 * 0.001,
    );
    pad_json(&mut s, len);
    s
}

/// Closes the JSON object in `s`, padded with a `"pad"` string so that it is about `len` bytes.
fn pad_json(s: &mut String, len: usize) {
    if s.len() + 10 < len {
        s.push_str(",\"pad\":\"");
        while s.len() + 2 < len {
            s.push('x');
        }
        s.push('"');
    }
    s.push('}');
}

/// Readings like a fleet of `devices` sensors sends them: ~100-byte JSON telemetry.
pub fn fleet_readings(from: u64, to: u64, devices: u64) -> Vec<Reading> {
    (from..to)
        .map(|s| {
            let d = (s % devices) as usize;
            Reading::new(
                Source::Mqtt,
                format!("sensor-{d:04}"),
                format!("sensors/sensor-{d:04}/env"),
                telemetry_json(d, s, 100),
            )
        })
        .collect()
}

/// Compression of one segment of JSON telemetry from 50 devices, per codec and level:
/// `(label, raw bytes, stored bytes)`, measured through the buffer's own stats.
pub async fn compression_ratios(base: &std::path::Path) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for (name, c) in [
        ("none", Compression::None),
        ("gzip 1", Compression::Gzip { level: 1 }),
        ("gzip 3", Compression::Gzip { level: 3 }),
        ("gzip 6", Compression::Gzip { level: 6 }),
        ("gzip 9", Compression::Gzip { level: 9 }),
    ] {
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        let opts = BufferOptions {
            compression: c,
            consumers: vec!["kafka".into()],
            ..BufferOptions::default()
        };
        let buf = Buffer::open(dir.path(), opts).expect("open buffer");
        buf.append(fleet_readings(0, 5000, 50))
            .await
            .expect("append");
        let st = buf.stats();
        buf.close().await;
        out.push((name.to_string(), st.raw_bytes_total, st.stored_bytes_total));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_grow_with_work() {
        let before = proc_cpu_secs("self", false).expect("own CPU time");
        // Burn at least 50 ms of CPU (two ticks of USER_HZ at 100), bounded in wall time.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while proc_cpu_secs("self", false).unwrap() < before + 0.05 {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(start.elapsed().as_secs() < 30, "CPU time did not grow");
        }
        assert_eq!(proc_cpu_secs("no-such-pid", false), None);
    }
}
