//! Criterion micro-benchmarks of the buffer's hot paths: segment encode and decode (per codec),
//! and `append` through the group commit on a temporary directory (one appender, and 64
//! concurrent appenders sharing commits). Run with `cargo bench -p ferry-buffer`.
//!
//! The append benchmark fsyncs for real, so its figures are the disk's as much as ferry's.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferry_buffer::segment::{decode_segment, encode_segment};
use ferry_buffer::{Buffer, BufferOptions, Compression, Reading, Source};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// `n` readings of ~100-byte JSON telemetry from 50 devices.
fn readings(n: u64) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            let d = i % 50;
            let payload = format!(
                "{{\"device\":\"sensor-{d:04}\",\"ts\":{},\"temp\":{:.2},\"hum\":{:.1},\"seq\":{i}}}",
                1_763_000_000_000u64 + i * 1000,
                20.0 + (i % 100) as f64 * 0.05,
                40.0 + (i % 37) as f64 * 0.5,
            );
            let mut r = Reading::new(
                Source::Mqtt,
                format!("sensor-{d:04}"),
                format!("sensors/sensor-{d:04}/env"),
                payload,
            );
            r.id = i + 1;
            r
        })
        .collect()
}

fn segment(c: &mut Criterion) {
    let rs = readings(1000);
    let mut g = c.benchmark_group("segment");
    g.throughput(Throughput::Elements(rs.len() as u64));
    for (name, codec) in [
        ("none", Compression::None),
        ("gzip1", Compression::Gzip { level: 1 }),
        ("gzip3", Compression::Gzip { level: 3 }),
    ] {
        g.bench_with_input(
            BenchmarkId::new("encode_1000", name),
            &codec,
            |b, &codec| b.iter(|| encode_segment(black_box(&rs), codec)),
        );
        let encoded = encode_segment(&rs, codec);
        g.bench_with_input(
            BenchmarkId::new("decode_1000", name),
            &encoded,
            |b, encoded| b.iter(|| decode_segment(black_box(encoded)).expect("decode")),
        );
    }
    g.finish();
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // On the real disk under target/, not a tmpfs, so the fsync is real.
    let base = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let buf = Buffer::open(
        dir.path(),
        BufferOptions {
            consumers: vec!["kafka".into()],
            max_bytes: 8 << 30,
            flush_interval: Duration::from_millis(1),
            ..BufferOptions::default()
        },
    )
    .expect("open buffer");
    let one = readings(1);
    let mut g = c.benchmark_group("append_group_commit");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    g.bench_function("1_appender", |b| {
        b.iter(|| {
            rt.block_on(buf.append(one.clone())).expect("append");
        })
    });
    // 64 appends of one reading in flight at once: they share commits.
    g.throughput(Throughput::Elements(64));
    g.bench_function("64_concurrent_appenders", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                rt.block_on(async {
                    let tasks: Vec<_> = (0..64)
                        .map(|_| {
                            let (buf, r) = (buf.clone(), one.clone());
                            tokio::spawn(async move { buf.append(r).await })
                        })
                        .collect();
                    for t in tasks {
                        t.await.expect("join").expect("append");
                    }
                });
            }
            start.elapsed()
        })
    });
    g.finish();
    rt.block_on(buf.close());
}

criterion_group!(benches, segment, append);
criterion_main!(benches);
