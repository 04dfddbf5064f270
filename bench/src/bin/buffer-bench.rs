//! Buffer benchmark: append throughput and readings per commit with N concurrent appenders,
//! commit latency, compression ratio, and bytes written to disk per raw payload byte.
//!
//! Usage: `cargo run --release -p ferry-bench --bin buffer-bench -- [SECONDS] [DIR]`
//! DIR defaults to a temporary directory on the current filesystem (`./target`), so the fsyncs
//! hit the real disk rather than a tmpfs.
//!
//! Recovery: `buffer-bench crash-fill DIR N` appends N readings and exits without closing the
//! buffer (as a crash would leave it); `buffer-bench reopen DIR` then times the open and
//! prints the peak RSS of the process.

use ferry_bench::{compression_ratios, percentile, proc_write_bytes, telemetry_json};
use ferry_buffer::{Buffer, BufferOptions, Reading, Source};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("crash-fill") => return crash_fill(&argv[1], argv[2].parse().expect("N")),
        Some("reopen") => return reopen(&argv[1]),
        _ => {}
    }
    let mut args = argv.into_iter();
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let base = args.next().unwrap_or_else(|| "target".into());
    std::fs::create_dir_all(&base).expect("bench dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "# buffer-bench: {secs} s per row, 100-byte JSON readings, gzip level 3, dir {base}; group commit: gap {} ms, cap {} ms, target {} B (BENCH_FLUSH_MS, BENCH_MAX_DELAY_MS, BENCH_TARGET_BYTES)",
        env_u64("BENCH_FLUSH_MS", 1),
        max_delay_ms(),
        target_bytes(),
    );
    println!(
        "| appenders | readings/s | readings/commit | commit p50 ms | commit p99 ms | append p50 ms | append p99 ms | disk bytes / payload byte | disk bytes / commit |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for appenders in [1usize, 16, 256] {
        rt.block_on(run(appenders, Duration::from_secs_f64(secs), &base));
    }
    rt.block_on(compression(&base));
}

async fn run(appenders: usize, dur: Duration, base: &str) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let opts = BufferOptions {
        consumers: vec!["kafka".into()],
        max_bytes: 4 << 30,
        flush_interval: Duration::from_millis(env_u64("BENCH_FLUSH_MS", 1)),
        max_flush_delay: Duration::from_millis(max_delay_ms()),
        flush_target_bytes: target_bytes(),
        quick_repair: env_u64("BENCH_QUICK_REPAIR", 0) == 1,
        ..BufferOptions::default()
    };
    let buf = Buffer::open(dir.path(), opts).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let payload_bytes = Arc::new(AtomicU64::new(0));
    let io_before = proc_write_bytes();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let buf = buf.clone();
        let stop = stop.clone();
        let payload_bytes = payload_bytes.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let p = telemetry_json(a, seq, 100);
                payload_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                let r = Reading::new(
                    Source::Mqtt,
                    format!("sensor-{a}"),
                    format!("sensors/{a}/env"),
                    p,
                );
                let t = Instant::now();
                buf.append(vec![r]).await.expect("append");
                lat.push(t.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u64> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let st = buf.stats();
    buf.close().await;
    let (written, per_commit) = match (io_before, proc_write_bytes()) {
        (Some(a), Some(b)) => (
            format!(
                "{:.2}",
                (b - a) as f64 / payload_bytes.load(Ordering::Relaxed) as f64
            ),
            format!("{:.0}", (b - a) as f64 / st.commits_total.max(1) as f64),
        ),
        _ => ("n/a".into(), "n/a".into()),
    };
    lat.sort_unstable();
    println!(
        "| {appenders} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {written} | {per_commit} |",
        st.appended_total as f64 / elapsed,
        st.appended_total as f64 / st.commits_total.max(1) as f64,
        st.commit_p50_us as f64 / 1000.0,
        st.commit_p99_us as f64 / 1000.0,
        percentile(&lat, 0.5) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
    );
}

async fn compression(base: &str) {
    println!();
    println!("| codec | raw bytes | stored bytes | ratio |");
    println!("|---|---:|---:|---:|");
    for (name, raw, stored) in compression_ratios(std::path::Path::new(base)).await {
        println!(
            "| {name} | {raw} | {stored} | {:.2}x |",
            raw as f64 / stored as f64
        );
    }
}

/// `BENCH_MAX_DELAY_MS`, or the buffer's own default.
fn max_delay_ms() -> u64 {
    let default = BufferOptions::default().max_flush_delay.as_millis() as u64;
    env_u64("BENCH_MAX_DELAY_MS", default)
}

/// `BENCH_TARGET_BYTES`, or the buffer's own default.
fn target_bytes() -> u64 {
    env_u64(
        "BENCH_TARGET_BYTES",
        BufferOptions::default().flush_target_bytes,
    )
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn crash_fill(dir: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = BufferOptions {
            consumers: vec!["kafka".into()],
            max_bytes: 16 << 30,
            quick_repair: env_u64("BENCH_QUICK_REPAIR", 0) == 1,
            ..BufferOptions::default()
        };
        let buf = Buffer::open(dir, opts).unwrap();
        let batch = 1000u64;
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let buf = buf.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = t * batch;
                while i < n {
                    let rs = (i..(i + batch).min(n))
                        .map(|s| {
                            let d = (s % 500) as usize;
                            Reading::new(
                                Source::Mqtt,
                                format!("sensor-{d}"),
                                format!("sensors/{d}/env"),
                                telemetry_json(d, s, 100),
                            )
                        })
                        .collect();
                    buf.append(rs).await.unwrap();
                    i += 16 * batch;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let st = buf.stats();
        println!(
            "filled {} readings, {} stored bytes, file {:?} bytes; exiting without close",
            st.readings, st.stored_bytes, st.file_bytes
        );
    });
    // No close: the file is left as after a crash (redb's clean-shutdown flag not written).
    std::process::exit(0);
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn reopen(dir: &str) {
    let before = peak_rss_kib();
    let t = Instant::now();
    let opts = BufferOptions {
        consumers: vec!["kafka".into()],
        max_bytes: 16 << 30,
        ..BufferOptions::default()
    };
    let buf = Buffer::open(dir, opts).unwrap();
    let took = t.elapsed();
    let st = buf.stats();
    println!(
        "reopened {} readings ({} segments, file {:?} bytes) in {:.1} ms; peak RSS {} KiB (before open {} KiB)",
        st.readings,
        st.segments,
        st.file_bytes,
        took.as_secs_f64() * 1000.0,
        peak_rss_kib(),
        before
    );
}
