//! # ferry-bench: benchmarks and load tools
//!
//! Binaries under `src/bin/` measure ferry and print figures; `bench/*.sh` scripts run them
//! side by side with peers. Nothing here is timed by the test suite: the machines are noisy,
//! so results are reported as figures and ratios from one run (see BENCHMARKS.md).

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
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

/// A realistic JSON telemetry payload of about `len` bytes.
pub fn telemetry_json(device: usize, seq: u64, len: usize) -> String {
    let mut s = format!(
        "{{\"device\":\"sensor-{device:04}\",\"ts\":{},\"temp\":{:.2},\"hum\":{:.1},\"seq\":{seq}",
        1_763_000_000_000u64 + seq * 1000,
        20.0 + (seq % 100) as f64 * 0.05,
        40.0 + (seq % 37) as f64 * 0.5,
    );
    if s.len() + 1 < len {
        s.push_str(",\"pad\":\"");
        while s.len() + 2 < len {
            s.push('x');
        }
        s.push('"');
    }
    s.push('}');
    s
}
